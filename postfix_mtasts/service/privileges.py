"""Running as root without systemd: the service user, the files handed to it,
and the switch to it (``[service] user``)."""

from __future__ import annotations

import logging
import os
import pwd
import stat

from postfix_mtasts.errors import StartupError

log = logging.getLogger("postfix_mtasts.service")

#: Name of the runtime and state directories a daemon may hand to its user.
OWN_DIRECTORY_NAME = "postfix-mtasts"
#: Side files of an SQLite database in WAL mode, and its lock file
#: (cache/sqlite_file.py), handed over with it.
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal", ".lock")


def service_user(name: str) -> pwd.struct_passwd | None:
    """The account ``[service] user`` names, checked before anything is opened."""
    if not name:
        return None
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise StartupError(
            f"service.user: no such user {name!r} (create it, e.g. adduser --system {name})"
        ) from None
    if os.geteuid() != 0 and os.geteuid() != user.pw_uid:
        raise StartupError(f"service.user = {name!r}: the daemon must be started as root to become it")
    return user


def make_runtime_directory(directory: str) -> None:
    """Create the control socket's directory; refuse one that another user owns."""
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        info = os.stat(directory)
    except OSError as e:
        raise StartupError(f"cannot create control socket directory {directory}: {e.strerror}") from e
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"control socket directory {directory} is not a directory")
    if info.st_uid not in (0, os.geteuid()):
        owner = user_name(info.st_uid)
        raise StartupError(f"control socket directory {directory} belongs to {owner}, not to this user")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def owned_paths(database: str | None, control_path: str) -> list[str]:
    """What the service user must own to keep working: the SQLite files (the
    sqlite backend's, or a shared backend's local copy) and the control socket."""
    paths: list[str] = []
    if database:
        directory = os.path.dirname(os.path.abspath(database))
        # A directory of our own is handed over (SQLite creates its -wal
        # file there); a shared one like /tmp is never touched.
        if os.path.basename(directory) == OWN_DIRECTORY_NAME:
            paths.append(directory)
        paths.append(database)
        paths.extend(database + suffix for suffix in SQLITE_SIDE_FILES)
    if control_path:
        directory = os.path.dirname(control_path)
        if os.path.basename(directory).startswith(OWN_DIRECTORY_NAME):
            paths.append(directory)
        paths.append(control_path)
    return paths


def drop_privileges(user: pwd.struct_passwd, paths: list[str]) -> None:
    """Hand ``paths`` to ``user``, then become it."""
    if os.geteuid() == user.pw_uid:
        return
    uid, gid = user.pw_uid, user.pw_gid
    for path in paths:
        try:
            os.chown(path, uid, gid)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise StartupError(f"cannot hand {path} to user {user.pw_name}: {e.strerror}") from e
    try:
        os.initgroups(user.pw_name, gid)
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        raise StartupError(f"cannot become user {user.pw_name}: {e.strerror}") from e
    log.info("running as user %s (uid %d, gid %d)", user.pw_name, uid, gid)
