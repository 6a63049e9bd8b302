"""The Debian package, built and installed for real: ``make deb`` (from a copy
of the checkout's tracked files) names the package by version and
architecture; ``apt-get install`` puts the command, the three systemd units
and the configuration (a conffile) in place; the command runs the packaged
code on Debian's own Python with every extra and exactly the pinned versions;
``systemd-analyze verify`` accepts the installed units; the installed daemon,
run as an unprivileged user the way the service's dynamic user runs it,
answers with the installed configuration, and answers Postfix (``postmap`` as
the postfix user) on a socket made as the installed unix socket unit says;
``remove`` keeps the edited configuration and ``purge`` leaves nothing.

The test installs and purges a system package, so it needs root, Debian's
build tools, and a machine where postfix-mtasts is not installed already
(it never touches an existing installation): it skips otherwise, and fails
under MTASTS_REQUIRE_ALL=1. Two checks of the sources need none of that and
run everywhere: debian/changelog names the code's version, debian/rules
packages every runtime extra of setup.cfg.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from postfix_mtasts import __version__
from tests.conftest import require
from tests.support.daemon import (
    LOOPBACK,
    PROJECT_ROOT,
    DaemonProcess,
    Launch,
    async_yield_fixture,
    ensure_deferred,
    postfix_config_directory,
    postmap_query,
    probe_accepts,
)
from tests.support.socket_unit import (
    POSTFIX_USER,
    RUNUSER,
    debian_queue_directory,
    postmap_as,
    socket_as_the_unit_makes_it,
    unit_settings,
)
from tests.support.world import World

pytestmark = [pytest.mark.integration, pytest.mark.postfix]

PACKAGE = "postfix-mtasts"
COMMAND = Path("/usr/bin/postfix-mtasts")
CONFIG = Path("/etc/postfix-mtasts.toml")
VENV = Path("/opt/venvs/postfix-mtasts")
UNIT_DIRECTORY = Path("/lib/systemd/system")
UNITS = ("postfix-mtasts.service", "postfix-mtasts.socket", "postfix-mtasts-unix.socket")
#: Where systemd keeps a DynamicUser service's StateDirectory=, and the link to it.
PRIVATE_STATE = Path("/var/lib/private/postfix-mtasts")
STATE = Path("/var/lib/postfix-mtasts")
#: The service's dynamic user stands in as a user with no rights of its own.
SERVICE_USER = "nobody"
#: Where the shipped configuration's defaults listen.
DEFAULT_PORT = 8461
#: Bounds a build, an install or a purge (guards against a hang, not a timing).
COMMAND_TIMEOUT = 900
#: apt-get waits this long for another apt or dpkg run to release its lock.
APT_LOCK_TIMEOUT = 300
BUILD_TOOLS = ("dpkg-buildpackage", "dh_virtualenv", "apt-get", "make", "git")
ENFORCE = "enforce.example"
#: A next hop the daemon answers without DNS.
IP_LITERAL = "[192.0.2.25]"
ENFORCE_ANSWER = "secure match=mx1.enforce.example servername=hostname"


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


def run(*argv: str, cwd: str | Path = "/") -> str:
    """Run a command to completion; fail the test with its output if it fails."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environment["DEBIAN_FRONTEND"] = "noninteractive"
    result = subprocess.run(
        argv, cwd=cwd, env=environment, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )
    output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{output}"
    return result.stdout


def apt_get(*args: str) -> str:
    return run("apt-get", "-y", "-q", "-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT}", *args)


def installed() -> bool:
    result = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${db:Status-Status}", PACKAGE], capture_output=True, text=True
    )
    return result.returncode == 0 and result.stdout not in ("", "not-installed")


def pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    pinned: dict[str, str] = {}
    for line in (Path(PROJECT_ROOT) / "constraints.txt").read_text().splitlines():
        name, separator, version = line.partition("==")
        if separator and not line.startswith("#"):
            pinned[normalise(name)] = version.strip()
    return pinned


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def copy_of_tracked_files(destination: Path) -> Path:
    """The checkout's tracked files as they are on disk: a file the build needs
    but nobody added to git is missing here as on a fresh clone."""
    listing = run("git", "ls-files", "-z", cwd=PROJECT_ROOT)
    for name in filter(None, listing.split("\0")):
        source = Path(PROJECT_ROOT) / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


@dataclass
class Package:
    deb: Path
    #: Every path the package holds, as dpkg-deb lists it (absolute).
    contents: list[Path]
    #: Those of them that existed before the install (shared directories).
    pre_existing: set[Path]
    architecture: str


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Package]:
    """The package, built from a copy of the checkout and installed; purged at
    the end if a test left it installed."""
    for tool in BUILD_TOOLS:
        require(f"{tool} (Debian's package build tools)", shutil.which(tool) is not None)
    require("root (to install a package)", os.geteuid() == 0)
    require(f"a machine without {PACKAGE} installed (the test purges what it installs)", not installed())
    for path in (CONFIG, COMMAND, VENV, STATE, PRIVATE_STATE):
        require(f"a machine without {path} (the package's purge would remove it)", not os.path.lexists(path))

    source = copy_of_tracked_files(tmp_path_factory.mktemp("source"))
    run("make", "deb", cwd=source)
    architecture = run("dpkg", "--print-architecture").strip()
    deb = source / "dist" / f"{PACKAGE}_{__version__}_{architecture}.deb"
    assert deb.exists(), sorted(os.listdir(source / "dist"))
    contents = [
        Path(line.split(None, 5)[5].split(" -> ")[0].lstrip(".").rstrip("/") or "/")
        for line in run("dpkg-deb", "--contents", str(deb)).splitlines()
    ]
    pre_existing = {path for path in contents if os.path.lexists(path)}
    assert all(path.is_dir() for path in pre_existing), sorted(p for p in pre_existing if not p.is_dir())
    private_parent_made = not PRIVATE_STATE.parent.exists()
    apt_get("install", str(deb))
    try:
        yield Package(deb, contents, pre_existing, architecture)
    finally:
        if installed():
            apt_get("purge", PACKAGE)
        if private_parent_made and PRIVATE_STATE.parent.exists() and not any(PRIVATE_STATE.parent.iterdir()):
            PRIVATE_STATE.parent.rmdir()


def service_state_directory() -> None:
    """What systemd makes for the service's StateDirectory=: the directory,
    owned by the service's user (the environment's STATE_DIRECTORY names it)."""
    STATE.mkdir(mode=0o750, exist_ok=True)
    shutil.chown(STATE, SERVICE_USER)


def dynamic_user_state_directory() -> None:
    """What systemd makes for StateDirectory= with DynamicUser=: the directory
    under /var/lib/private, and a link to it where the plain one would be."""
    PRIVATE_STATE.parent.mkdir(mode=0o700, exist_ok=True)
    PRIVATE_STATE.mkdir(mode=0o750, exist_ok=True)
    if not os.path.lexists(STATE):
        STATE.symlink_to(Path("private") / PRIVATE_STATE.name)


def readable_directory(prefix: str) -> Path:
    """A temporary directory the service's user can read (pytest's are root's only)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    return directory


# --- the sources, everywhere (no build) ----------------------------------------------------


def test_the_changelog_names_the_version_of_the_code() -> None:
    first = (Path(PROJECT_ROOT) / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"{PACKAGE} ({__version__}) "), first


def test_the_package_has_every_runtime_extra() -> None:
    import configparser

    setup = configparser.ConfigParser()
    setup.read(Path(PROJECT_ROOT) / "setup.cfg")
    runtime = set(setup["options.extras_require"]) - {"test"}
    rules = (Path(PROJECT_ROOT) / "debian" / "rules").read_text()
    packaged = re.search(r"^EXTRAS := (.*)$", rules, re.MULTILINE)

    assert packaged is not None
    assert set(packaged.group(1).split(",")) == runtime


# --- what the package holds ----------------------------------------------------------------


def test_make_deb_names_the_package_by_version_and_architecture(package: Package) -> None:
    fields = run("dpkg-deb", "--field", str(package.deb), "Package", "Version", "Architecture", "Depends")
    interpreter = Path(os.path.realpath("/usr/bin/python3")).name

    assert f"Package: {PACKAGE}\nVersion: {__version__}\nArchitecture: {package.architecture}\n" in fields
    depends = fields.split("Depends:", 1)[1]
    assert re.search(rf"\b{re.escape(interpreter)}\b", depends), depends
    assert "libpq5" in depends  # psycopg loads libpq at run time


def test_the_package_installs_the_command_units_and_configuration(package: Package) -> None:
    listed = set(run("dpkg", "--listfiles", PACKAGE).split())
    conffiles = run("dpkg-query", "--show", "--showformat=${Conffiles}", PACKAGE)

    assert {str(COMMAND), str(CONFIG)} <= listed
    assert os.path.realpath(COMMAND) == str(VENV / "bin" / "postfix-mtasts")
    assert str(CONFIG) in conffiles
    assert CONFIG.read_text() == (Path(PROJECT_ROOT) / "conf" / "postfix-mtasts.toml").read_text()
    for unit in UNITS:
        assert str(UNIT_DIRECTORY / unit) in listed
        assert (UNIT_DIRECTORY / unit).read_text() == (Path(PROJECT_ROOT) / "systemd" / unit).read_text()
    assert f"ExecStart={COMMAND} serve --config {CONFIG}" in (UNIT_DIRECTORY / UNITS[0]).read_text()
    # Installing starts and enables nothing: the administrator reviews the configuration first.
    assert not list(Path("/etc/systemd/system").rglob("postfix-mtasts*"))


def test_the_command_runs_the_packaged_code_on_debians_python(package: Package) -> None:
    assert run(str(COMMAND), "--version").strip() == f"postfix-mtasts {__version__}"
    probe = (
        "import os, sys, postfix_mtasts, redis, psycopg, prometheus_client; "
        "print(postfix_mtasts.__file__); print(os.path.realpath(sys.executable)); "
        "print(psycopg.pq.version())"
    )
    module, interpreter, libpq = run(str(VENV / "bin" / "python"), "-c", probe).split()

    assert module.startswith(f"{VENV}/lib/")
    assert interpreter == os.path.realpath("/usr/bin/python3")
    assert int(libpq) > 0


def test_every_packaged_distribution_is_the_pinned_version(package: Package) -> None:
    listing = "import importlib.metadata as m\nfor d in m.distributions(): print(d.name, d.version)"
    packaged = dict(line.split() for line in run(str(VENV / "bin" / "python"), "-c", listing).splitlines())
    pinned = pins()

    packaged_by_name = {normalise(name): version for name, version in packaged.items()}
    assert packaged_by_name.pop(PACKAGE) == __version__
    assert {name: pinned.get(name) for name in packaged_by_name} == packaged_by_name
    # The tools that built the virtualenv are not shipped.
    assert not {"pip", "setuptools", "wheel"} & set(packaged_by_name)


def test_systemd_analyze_verify_accepts_the_installed_units(package: Package) -> None:
    analyze = shutil.which("systemd-analyze")
    require("systemd-analyze", analyze is not None)
    assert analyze is not None

    result = subprocess.run(
        [analyze, "verify", *(str(UNIT_DIRECTORY / unit) for unit in UNITS)],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


# --- the installed daemon ------------------------------------------------------------------


@ensure_deferred
async def test_the_installed_daemon_serves_with_the_installed_configuration(
    package: Package, tmp_path: Path
) -> None:
    require("Debian's postfix (postmap)", shutil.which("postmap") is not None)
    assert not probe_accepts(("inet", DEFAULT_PORT)), f"{LOOPBACK}:{DEFAULT_PORT} is taken; it must be free"
    service_state_directory()
    launch = Launch(command=[str(COMMAND)], user=SERVICE_USER, state_directory=str(STATE))
    daemon = DaemonProcess(reactor(), CONFIG, ("inet", DEFAULT_PORT), launch)
    daemon.spawn()
    postfix = postfix_config_directory(tmp_path / "postfix")
    try:
        await daemon.wait_ready()
        table = f"socketmap:inet:{LOOPBACK}:{DEFAULT_PORT}"
        # Keys that need no DNS: nothing leaves the machine.
        not_found = await postmap_query(reactor(), f"{table}:postfix", IP_LITERAL, config_directory=postfix)
        unknown = await postmap_query(reactor(), f"{table}:nosuch", "example.com", config_directory=postfix)
        await daemon.stop()
    finally:
        await daemon.close()

    assert (not_found.code, not_found.stdout, not_found.stderr) == (1, "", "")
    assert unknown.code == 1 and "unknown map name 'nosuch'; configured: postfix" in unknown.stderr
    assert (STATE / "cache.sqlite3").exists(), daemon.stderr_text()
    assert "Traceback" not in daemon.stderr_text()


@dataclass
class UnixSetup:
    world: World
    daemon: DaemonProcess
    queue: Path


@async_yield_fixture
async def unix_setup(package: Package) -> AsyncIterator[UnixSetup]:
    """The installed daemon as the service's user, with a socket made as the
    installed postfix-mtasts-unix.socket says, answering a loopback world."""
    require("Debian's postfix (postmap)", shutil.which("postmap") is not None)
    require("runuser (util-linux)", os.path.exists(RUNUSER))
    settings = unit_settings(UNIT_DIRECTORY / "postfix-mtasts-unix.socket")
    world = await World.start(reactor())
    world.publish(ENFORCE, World.policy_text(mode="enforce", mx=("mx1.enforce.example",)), "e1")
    # The service's user reads the CA of the world's policy host.
    Path(world.ca_file).parent.chmod(0o755)
    queue = debian_queue_directory()
    listener, _ = socket_as_the_unit_makes_it(queue, settings)
    directory = readable_directory("mtasts-pkg-")
    name = settings["FileDescriptorName"]
    launch = Launch(command=[str(COMMAND)], user=SERVICE_USER, sockets=[(name, listener)])
    try:
        config = world.config_toml(socketmap=(f"systemd:{name}",))
        daemon = await DaemonProcess.start(reactor(), directory, config, launch=launch)
        listener.close()
        try:
            yield UnixSetup(world, daemon, queue)
            await daemon.stop()
        finally:
            await daemon.close()
        assert "Traceback" not in daemon.stderr_text(), daemon.stderr_text()
    finally:
        listener.close()
        await world.stop()
        shutil.rmtree(queue, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)


@ensure_deferred
async def test_the_installed_daemon_answers_postfix_on_the_unix_socket_unit(unix_setup: UnixSetup) -> None:
    result = await postmap_as(
        reactor(), POSTFIX_USER, unix_setup.queue, ENFORCE, "socketmap:unix:private/mtasts:postfix"
    )

    assert (result.code, result.stdout, result.stderr) == (0, ENFORCE_ANSWER + "\n", "")
    # Served by a daemon whose user cannot even reach the path, only the socket it was given.
    uid = pwd.getpwnam(SERVICE_USER).pw_uid
    status = Path(f"/proc/{unix_setup.daemon.pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s", status, re.MULTILINE), status
    private = os.stat(unix_setup.queue / "private")
    assert (private.st_uid, private.st_mode & 0o777) == (pwd.getpwnam(POSTFIX_USER).pw_uid, 0o700)


# --- removal -------------------------------------------------------------------------------


def test_remove_keeps_the_configuration_and_purge_leaves_nothing(package: Package) -> None:
    dynamic_user_state_directory()
    (PRIVATE_STATE / "cache.sqlite3").touch()
    helper_state = Path("/var/lib/systemd")
    edited = CONFIG.read_text() + "\n# edited by the administrator\n"
    CONFIG.write_text(edited)

    apt_get("remove", PACKAGE)
    assert not COMMAND.exists() and not VENV.exists()
    assert CONFIG.read_text() == edited

    apt_get("purge", PACKAGE)
    assert not installed()
    left = [path for path in package.contents if path not in package.pre_existing and os.path.lexists(path)]
    assert left == []
    for path in (CONFIG, STATE, PRIVATE_STATE):
        assert not os.path.lexists(path), path
    assert not list(Path("/etc").glob("postfix-mtasts.toml*"))  # no .dpkg-old, .dpkg-dist
    # deb-systemd-helper's record of the units' enablement goes too.
    assert not list(helper_state.glob("deb-systemd-helper-*/**/postfix-mtasts*"))
