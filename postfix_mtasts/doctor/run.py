"""The shell of ``postfix-mtasts doctor``: runs ``postconf`` and ``postmap``
as subprocesses, looks at the sockets they name, and hands the values to the
pure decisions in doctor.maps and doctor.settings. Synchronous: a one-shot
command with no reactor."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from typing import Any

from postfix_mtasts.check.findings import Finding
from postfix_mtasts.config import Config
from postfix_mtasts.doctor.maps import (
    PROBE_KEY,
    ProbeOutcome,
    plan_probe,
    policy_map_findings,
    probe_finding,
    profiles_in_use,
)
from postfix_mtasts.doctor.postfix import (
    PARAMETERS,
    PostfixView,
    parse_master,
    parse_parameters,
    parse_version,
)
from postfix_mtasts.doctor.settings import (
    dane_findings,
    mx_pattern_findings,
    security_level_findings,
    tlsrpt_findings,
    tlsrpt_socket_path,
    version_findings,
)

#: Where Postfix's commands are looked for, whatever the caller's PATH.
SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin"
#: Seconds one postconf run may take (it reads two files).
POSTCONF_TIMEOUT = 30.0
#: Seconds the postmap lookup may take; the daemon answers an IP literal at
#: once, and Postfix's own socketmap client waits far longer than this.
LOOKUP_TIMEOUT = 15.0


class DoctorSetupError(Exception):
    """doctor cannot read the Postfix configuration at all; one line."""


@dataclass(frozen=True, slots=True)
class Commands:
    """The Postfix programs doctor runs."""

    postconf: str
    postmap: str

    @classmethod
    def find(cls) -> Commands:
        found = {name: shutil.which(name, path=SEARCH_PATH) for name in ("postconf", "postmap")}
        missing = [name for name, path in found.items() if path is None]
        if missing:
            raise DoctorSetupError(
                f"{' and '.join(missing)} not found in {SEARCH_PATH}: is Postfix installed?"
            )
        return cls(postconf=str(found["postconf"]), postmap=str(found["postmap"]))


def _environment() -> dict[str, str]:
    return {"PATH": SEARCH_PATH, "LANG": "C"}


def _postconf(commands: Commands, directory: str | None, *args: str) -> str:
    argv = [commands.postconf, *(["-c", directory] if directory else []), *args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=POSTCONF_TIMEOUT, env=_environment(), check=False
        )
    except subprocess.TimeoutExpired:
        raise DoctorSetupError(f"{' '.join(argv)}: no result within {POSTCONF_TIMEOUT:g}s") from None
    except OSError as error:
        raise DoctorSetupError(f"{commands.postconf}: {error.strerror or error}") from None
    if done.returncode != 0:
        complaint = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise DoctorSetupError(f"{' '.join(argv)}: {complaint}")
    return done.stdout


def read_postfix(commands: Commands, directory: str | None) -> PostfixView:
    """main.cf parameters ($names expanded), master.cf entries and the version."""
    version_text = _postconf(commands, directory, "-d", "-h", "mail_version").strip()
    parameters = parse_parameters(_postconf(commands, directory, "-x", "config_directory", *PARAMETERS))
    master = parse_master(_postconf(commands, directory, "-M"))
    shown = directory or parameters.get("config_directory", "") or "(Postfix's default)"
    return PostfixView(shown, parse_version(version_text), parameters, master)


def _lookup_user(view: PostfixView) -> tuple[str, dict[str, Any]]:
    """Who postmap runs as: as root, Postfix's mail_owner (as the smtp and
    proxymap processes do), so that socket permissions are tested too."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name, {}
    owner = view.parameters.get("mail_owner", "") or "postfix"
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        return "root", {}
    groups = os.getgrouplist(owner, entry.pw_gid)
    return owner, {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": groups}


def _run_postmap(
    commands: Commands, view: PostfixView, directory: str | None, table: str, as_user: dict[str, Any]
) -> subprocess.CompletedProcess[str] | None:
    argv = [commands.postmap, *(["-c", directory] if directory else []), "-q", PROBE_KEY, table]
    # Every Postfix daemon runs in the queue directory: relative socket paths start there.
    cwd = view.queue_directory if os.path.isdir(view.queue_directory) else None
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=LOOKUP_TIMEOUT, env=_environment(),
            cwd=cwd, check=False, **as_user,
        )
    except subprocess.TimeoutExpired:
        return None


def lookup(commands: Commands, view: PostfixView, directory: str | None, table: str) -> ProbeOutcome:
    """``postmap -q PROBE_KEY table``, as mail_owner when run as root."""
    user, as_user = _lookup_user(view)
    done = _run_postmap(commands, view, directory, table, as_user)
    if done is not None and as_user and "main.cf" in done.stderr:
        # mail_owner cannot read this configuration directory (a private copy
        # of it, say): look up as ourselves rather than report a false failure.
        user, as_user = pwd.getpwuid(os.geteuid()).pw_name, {}
        done = _run_postmap(commands, view, directory, table, as_user)
    if done is None:
        return ProbeOutcome(None, user=user, timeout=LOOKUP_TIMEOUT)
    return ProbeOutcome(done.returncode, done.stdout, done.stderr, user=user, timeout=LOOKUP_TIMEOUT)


def _is_socket(path: str) -> bool | None:
    if not path:
        return None
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def diagnose(
    config: Config, directory: str | None, commands: Commands | None = None
) -> tuple[str, list[Finding]]:
    """Every finding for the Postfix configuration in ``directory`` (None:
    Postfix's default) and the daemon's ``config``; and the label to show."""
    commands = commands or Commands.find()
    view = read_postfix(commands, directory)
    map_findings, ours = policy_map_findings(view, config)
    for daemon in ours:
        if daemon.profile in config.profiles:  # else the ✗ above says it all
            probe = plan_probe(view, daemon)
            outcome = lookup(commands, view, directory, probe.postmap_table)
            map_findings.append(probe_finding(probe, outcome, config, view))
    profiles = profiles_in_use(ours, config)
    findings: list[Finding] = [
        *version_findings(view, profiles, config),
        *map_findings,
        *mx_pattern_findings(view, profiles, config),
        *security_level_findings(view),
        *dane_findings(view, profiles, config),
        *tlsrpt_findings(view, profiles, _is_socket(tlsrpt_socket_path(view))),
    ]
    return view.directory, findings

