"""``postfix-mtasts doctor`` end to end with Debian's real postconf and
postmap: good and broken main.cf / master.cf files in a private Postfix
configuration directory, a real daemon child answering the lookup (over a
unix socket inside a chrooted smtp service's queue directory, or TCP through
proxymap), nothing listening, a socket the postfix user may not open, the
exit status (0 clean, 1 with a ✗, 2 when postconf cannot run) and --json;
and Debian 13's Postfix 3.10 postconf (in the chroot MTASTS_POSTFIX310_ROOT
names) read through the same shell, for smtp_tls_enforce_sts_mx_patterns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from postfix_mtasts.check.findings import Level
from postfix_mtasts.config import parse_config
from postfix_mtasts.doctor.postfix import Version, parse_version
from postfix_mtasts.doctor.run import Commands, read_postfix
from postfix_mtasts.doctor.settings import mx_pattern_findings, version_findings
from tests.conftest import missing, require
from tests.support.daemon import (
    LOOPBACK,
    CommandResult,
    DaemonProcess,
    async_yield_fixture,
    ensure_deferred,
    free_port,
    run_cli,
)

pytestmark = [pytest.mark.integration, pytest.mark.postfix]

#: A master.cf as Debian ships it, cut to what doctor looks at: the smtp
#: client chrooted, proxymap not.
MASTER_CF = """\
smtp      inet  n       -       y       -       -       smtpd
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       y       -       -       smtp
relay     unix  -       -       y       -       -       smtp
        -o syslog_name=postfix/$service_name
"""
#: The lines of a ✓ / ⚠ / ✗ report that are findings.
SYMBOLS = ("✓", "⚠", "✗")


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


@dataclass
class Lab:
    """A Postfix configuration directory and queue directory of our own."""

    postfix_dir: Path
    queue: Path
    daemon_dir: Path

    @property
    def socket_path(self) -> str:
        return str(self.queue / "private" / "mtasts")

    def write_main_cf(self, *lines: str) -> None:
        main_cf = self.postfix_dir / "main.cf"
        main_cf.write_text(
            "\n".join(["compatibility_level = 3.6", f"queue_directory = {self.queue}", *lines]) + "\n"
        )
        # Postfix programs pause on a main.cf modified a moment ago; one from the past is read at once.
        an_hour_ago = time.time() - 3600
        os.utime(main_cf, (an_hour_ago, an_hour_ago))

    def write_daemon_config(self, text: str) -> Path:
        path = self.daemon_dir / "doctor.toml"
        path.write_text(text)
        return path

    async def start_daemon(self, listen: str) -> DaemonProcess:
        config = f'[listen]\nsocketmap = ["{listen}"]\n[cache]\nbackend = "memory"\n'
        return await DaemonProcess.start(reactor(), self.daemon_dir, config)

    async def doctor(self, config: Path | None = None, *extra: str) -> CommandResult:
        args = ["doctor", "--postfix-dir", str(self.postfix_dir), *extra]
        if config is not None:
            args += ["--config", str(config)]
        result = await run_cli(reactor(), *args, private_directory=self.daemon_dir)
        assert "Traceback" not in result.stderr, result.stderr
        return result


@pytest.fixture
def postfix_tools() -> None:
    """Skip (under CI: fail) without Debian's postconf and postmap."""
    require(
        "Debian's postfix (postconf, postmap)", bool(shutil.which("postconf") and shutil.which("postmap"))
    )


@async_yield_fixture
async def lab(tmp_path: Path, postfix_tools: None) -> AsyncIterator[Lab]:
    # Outside pytest's private tmp_path: postmap runs as the postfix user,
    # which must read main.cf and reach the socket; and a socket path must
    # stay under 108 bytes.
    top = Path(tempfile.mkdtemp(prefix="mtasts-doctor-"))
    try:
        postfix_dir, queue = top / "postfix", top / "queue"
        (queue / "private").mkdir(parents=True)
        postfix_dir.mkdir()
        for directory in (top, postfix_dir, queue, queue / "private"):
            directory.chmod(0o755)
        (postfix_dir / "master.cf").write_text(MASTER_CF)
        yield Lab(postfix_dir, queue, tmp_path)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def installed_version() -> Version:
    text = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, check=True
    )
    version = parse_version(text.stdout)
    assert version is not None, text
    return version


def lines(result: CommandResult, symbol: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(symbol)]


@ensure_deferred
async def test_good_set_up_over_a_unix_socket_in_the_chroot(lab: Lab) -> None:
    daemon = await lab.start_daemon(f"unix:{lab.socket_path}:mode=0666")
    try:
        lab.write_main_cf(
            "smtp_tls_policy_maps = socketmap:unix:private/mtasts:postfix", "smtp_tls_security_level = may"
        )
        config = lab.write_daemon_config(f'[listen]\nsocketmap = ["unix:{lab.socket_path}:mode=0666"]\n')
        result = await lab.doctor(config)
    finally:
        await daemon.stop()

    assert result.code == 0, result.stdout + result.stderr
    assert lines(result, "✗") == lines(result, "⚠") == [], result.stdout
    answered = [line for line in lines(result, "✓") if "the daemon answers (" in line]
    assert answered == [
        "✓ socketmap:unix:private/mtasts:postfix: the daemon answers (postmap -q '[192.0.2.1]' "
        f"socketmap:unix:{lab.socket_path}:postfix, as postfix would from smtp/unix (chrooted))"
    ]
    assert result.stdout.splitlines()[-1].endswith(", 0 errors, 0 warnings")


@ensure_deferred
async def test_good_set_up_over_tcp_through_proxymap(lab: Lab) -> None:
    port = free_port()
    daemon = await lab.start_daemon(f"inet:{LOOPBACK}:{port}")
    try:
        table = f"proxy:socketmap:inet:{LOOPBACK}:{port}:postfix"
        # proxy_read_maps keeps its default, which holds $smtp_tls_policy_maps.
        lab.write_main_cf(
            f"smtp_tls_policy_maps = hash:/etc/postfix/tls_policy, {table}", "smtp_tls_security_level = may"
        )
        config = lab.write_daemon_config(f'[listen]\nsocketmap = ["inet:{LOOPBACK}:{port}"]\n')
        result = await lab.doctor(config, "--json")
    finally:
        await daemon.stop()

    assert result.code == 0, result.stdout + result.stderr
    findings = json.loads(result.stdout)
    assert {f["level"] for f in findings} == {"ok"}, findings
    by_topic = {f["topic"]: f["message"] for f in findings}
    assert by_topic["proxy-read-maps"] == f"proxy_read_maps lists {table}: proxymap may open it"
    assert "after hash:/etc/postfix/tls_policy" in by_topic["policy-maps"]
    assert by_topic["lookup"].startswith(f"{table}: the daemon answers")
    assert by_topic["lookup"].endswith("as postfix would from proxymap/unix)")


@ensure_deferred
async def test_nothing_listening_is_an_error_with_the_fix(lab: Lab) -> None:
    port = free_port()
    lab.write_main_cf(f"smtp_tls_policy_maps = socketmap:inet:{LOOPBACK}:{port}:postfix")
    config = lab.write_daemon_config(f'[listen]\nsocketmap = ["inet:{LOOPBACK}:{port}"]\n')

    result = await lab.doctor(config)

    assert result.code == 1, result.stdout + result.stderr
    (failed,) = [line for line in lines(result, "✗") if "lookup failed" in line]
    assert "Connection refused" in failed
    assert "fix:   start postfix-mtasts (systemctl start postfix-mtasts)" in result.stdout


@ensure_deferred
async def test_absolute_socket_path_in_a_chrooted_smtp_service(lab: Lab) -> None:
    """The daemon answers on the path, but the chrooted smtp client looks for
    it under the queue directory: doctor says so and gives the relative path."""
    daemon = await lab.start_daemon(f"unix:{lab.socket_path}:mode=0666")
    try:
        lab.write_main_cf(f"smtp_tls_policy_maps = socketmap:unix:{lab.socket_path}:postfix")
        config = lab.write_daemon_config(f'[listen]\nsocketmap = ["unix:{lab.socket_path}:mode=0666"]\n')
        result = await lab.doctor(config)
    finally:
        await daemon.stop()

    assert result.code == 1, result.stdout + result.stderr
    (failed,) = [line for line in lines(result, "✗") if "lookup failed" in line]
    assert "No such file or directory" in failed
    assert "(chrooted)" in failed
    assert (
        "write the path relative to the queue directory: socketmap:unix:private/mtasts:postfix"
        in result.stdout
    )


@ensure_deferred
async def test_a_socket_the_postfix_user_may_not_open(lab: Lab) -> None:
    """Run as root, doctor looks up as mail_owner, as the smtp processes do."""
    require("root (doctor then looks up as the postfix user)", os.geteuid() == 0)
    daemon = await lab.start_daemon(f"unix:{lab.socket_path}:mode=0600")
    try:
        lab.write_main_cf("smtp_tls_policy_maps = socketmap:unix:private/mtasts:postfix")
        config = lab.write_daemon_config(f'[listen]\nsocketmap = ["unix:{lab.socket_path}:mode=0600"]\n')
        result = await lab.doctor(config)
    finally:
        await daemon.stop()

    assert result.code == 1, result.stdout + result.stderr
    (failed,) = [line for line in lines(result, "✗") if "lookup failed" in line]
    assert "Permission denied" in failed and "as postfix would" in failed
    assert f"let postfix connect to {lab.socket_path}" in result.stdout


@ensure_deferred
async def test_broken_main_cf_without_the_daemon(lab: Lab) -> None:
    lab.write_main_cf("smtp_tls_policy_maps =", "smtp_tls_security_level = none")

    result = await lab.doctor(None, "--json")

    assert result.code == 1, result.stdout + result.stderr
    findings = {f["topic"]: f for f in json.loads(result.stdout)}
    assert findings["policy-maps"]["level"] == "error"
    assert findings["policy-maps"]["fix"] == (
        "in main.cf: smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8461:postfix (then: postfix reload)"
    )
    assert findings["security-level"]["level"] == "warning"
    assert findings["postfix-version"]["level"] == "ok"  # Debian 12's 3.7 accepts servername


@ensure_deferred
async def test_unknown_profile_and_tlsrpt_on_a_postfix_too_old(lab: Lab) -> None:
    lab.write_main_cf(
        "smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8461:nope, socketmap:inet:127.0.0.1:8461:postfix310"
    )

    result = await lab.doctor(None)

    assert result.code == 1
    errors = lines(result, "✗")
    assert any("the daemon has no profile 'nope'" in line for line in errors), result.stdout
    too_old = [line for line in errors if "is older than 3.10, which profile postfix310 needs" in line]
    if installed_version() < Version(3, 10):
        assert len(too_old) == 1, result.stdout
    else:
        assert too_old == [] and "accepts what profile postfix310 sends" in result.stdout


@ensure_deferred
async def test_postconf_failing_is_one_line_and_status_2(lab: Lab) -> None:
    result = await run_cli(reactor(), "doctor", "--postfix-dir", str(lab.postfix_dir / "missing"))

    assert result.code == 2, result
    assert result.stdout == ""
    (line,) = result.stderr_lines
    assert line.startswith("postfix-mtasts doctor: ") and "missing" in line


#: The variable naming the Debian 13 chroot with Postfix 3.10 (.ci/run makes it).
POSTFIX310_ROOT_VARIABLE = "MTASTS_POSTFIX310_ROOT"


@pytest.fixture
def postfix310_root() -> Path:
    """The chroot, or skip (under CI: fail) saying what is missing."""
    value = os.environ.get(POSTFIX310_ROOT_VARIABLE, "")
    if not value:
        missing(f"a chroot with Postfix 3.10 ({POSTFIX310_ROOT_VARIABLE})")
    if os.geteuid() != 0:
        missing("root (chroot) to run Postfix 3.10's postconf")
    root = Path(value)
    if not (root / "usr/sbin/postconf").exists():
        missing(f"Postfix in {root} ({POSTFIX310_ROOT_VARIABLE})")
    return root


def test_postfix_3_10_has_the_mx_pattern_check_on_and_needs_the_attributes(
    tmp_path: Path, postfix310_root: Path
) -> None:
    """Debian 13's real postconf, read through doctor's shell: the release is
    3.10.5 or later, smtp_tls_enforce_sts_mx_patterns is on by default, so
    the plain profile is a ✗ and the built-in postfix310 profile a ✓."""
    inside = Path(tempfile.mkdtemp(prefix="mtasts-doctor-", dir=postfix310_root / "tmp"))
    try:
        (inside / "main.cf").write_text("compatibility_level = 3.6\n")
        (inside / "master.cf").write_text(MASTER_CF)
        wrapper = tmp_path / "postconf"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/sbin/chroot {postfix310_root} /usr/sbin/postconf "$@"\n')
        wrapper.chmod(0o755)
        view = read_postfix(Commands(postconf=str(wrapper), postmap="/bin/false"), f"/tmp/{inside.name}")
    finally:
        shutil.rmtree(inside, ignore_errors=True)

    assert view.version is not None and view.version >= Version(3, 10, 5), view.version
    assert view.parameters["smtp_tls_enforce_sts_mx_patterns"] == "yes"
    config = parse_config("")
    plain = {"postfix": config.profiles["postfix"]}
    sts = {"postfix310": config.profiles["postfix310"]}
    assert [f.level for f in mx_pattern_findings(view, plain, config)] == [Level.ERROR]
    assert [f.level for f in mx_pattern_findings(view, sts, config)] == [Level.OK]
    assert [f.level for f in version_findings(view, sts, config)] == [Level.OK]
