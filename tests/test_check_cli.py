# pytest_twisted has no type information: its decorators are untyped.
# mypy: disable-error-code="untyped-decorator"
"""``postfix-mtasts check`` as a real child process against the loopback
world: text and JSON output, and the exit status (0 clean, 1 with a ✗, 2 for
usage errors)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as global_reactor

from tests.support.daemon import CommandResult, run_cli
from tests.support.smtp_server import SmtpServer, set_mx
from tests.support.world import LOOPBACK, World

reactor: Any = global_reactor

DOMAIN = "example.test"
MX1 = "mx1.example.test"
SYMBOLS = ("✓", "⚠", "✗")


class CheckLab:
    def __init__(self, world: World, smtp: SmtpServer, config: Path) -> None:
        self.world = world
        self.smtp = smtp
        self.config = config

    async def check(self, *extra: str, domain: str = DOMAIN) -> CommandResult:
        return await run_cli(
            reactor, "check", "-c", str(self.config), "--smtp-port", str(self.smtp.port), *extra, domain
        )


@pytest_twisted.async_yield_fixture()
async def lab(tmp_path: Path) -> AsyncIterator[CheckLab]:
    world = await World.start(reactor)
    smtp = SmtpServer(world.https.ca)
    await smtp.start(reactor)
    world.publish(DOMAIN, World.policy_text(mx=(MX1,), max_age=604800), "20240601")
    set_mx(world.dns, DOMAIN, (10, MX1))
    world.dns.set_a(MX1, LOOPBACK)
    world.dns.set_txt(f"_smtp._tls.{DOMAIN}", f"v=TLSRPTv1; rua=mailto:tlsrpt@{DOMAIN}")
    config = tmp_path / "check.toml"
    config.write_text(world.config_toml())
    try:
        yield CheckLab(world, smtp, config)
    finally:
        await smtp.stop()
        await world.stop()


def finding_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(SYMBOLS)]


@pytest_twisted.ensureDeferred
async def test_correct_domain_prints_only_ticks_and_exits_0(lab: CheckLab) -> None:
    result = await lab.check()
    assert result.code == 0, result.stdout + result.stderr
    lines = finding_lines(result.stdout)
    assert len(lines) >= 10
    assert all(line.startswith("✓ ") for line in lines), result.stdout
    assert f"✓ _mta-sts.{DOMAIN}: one record, id 20240601" in lines
    assert result.stdout.splitlines()[-1] == f"{DOMAIN}: {len(lines)} checks, 0 errors, 0 warnings"


@pytest_twisted.ensureDeferred
async def test_uncovered_mx_exits_1_with_meaning_and_fix(lab: CheckLab) -> None:
    lab.world.publish(DOMAIN, World.policy_text(mx=("mx.example.test", "*.mail.example.test")), "2")
    result = await lab.check()
    assert result.code == 1
    lines = result.stdout.splitlines()
    message = f"✗ {MX1} is not covered by the policy's mx patterns (mx.example.test, *.mail.example.test)"
    index = lines.index(message)
    assert lines[index + 1] == f"    means: in enforce mode, senders refuse to deliver to {MX1}"
    assert lines[index + 2] == (
        f'    fix:   add "mx: {MX1}" to the policy, publish it, and change the id in the TXT record'
    )


@pytest_twisted.ensureDeferred
async def test_warnings_alone_exit_0(lab: CheckLab) -> None:
    lab.world.dns.remove(f"_smtp._tls.{DOMAIN}")
    result = await lab.check()
    assert result.code == 0, result.stdout
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"⚠ _smtp._tls.{DOMAIN}: no TLSRPT record") for line in lines)
    assert "means: you will not receive TLS reports" in result.stdout


@pytest_twisted.ensureDeferred
async def test_json_output_parses(lab: CheckLab) -> None:
    lab.world.dns.remove(f"_mta-sts.{DOMAIN}")
    result = await lab.check("--json")
    assert result.code == 1
    findings = json.loads(result.stdout)
    assert isinstance(findings, list) and findings
    for finding in findings:
        assert set(finding) == {"level", "topic", "message", "meaning", "fix"}
        assert finding["level"] in ("ok", "warning", "error")
        if finding["level"] != "ok":
            assert finding["meaning"] and finding["fix"]
    errors = [f for f in findings if f["level"] == "error"]
    assert [f["topic"] for f in errors] == ["mta-sts-txt"]


@pytest_twisted.ensureDeferred
async def test_usage_errors_exit_2(lab: CheckLab, tmp_path: Path) -> None:
    bad_names = (("localhost", "is not a domain name"), ("exa mple.test", "is not a valid domain name"))
    for text, reason in bad_names:
        bad_domain = await lab.check(domain=text)
        assert bad_domain.code == 2
        assert bad_domain.stdout == ""
        assert len(bad_domain.stderr_lines) == 1
        assert bad_domain.stderr.startswith(f"postfix-mtasts check: {text!r} {reason}")
    no_domain = await run_cli(reactor, "check")
    assert no_domain.code == 2
    assert "the following arguments are required: domain" in no_domain.stderr
    missing_ca = tmp_path / "missing.toml"
    missing_ca.write_text(lab.world.config_toml(resolver={"ca_file": str(tmp_path / "nowhere.pem")}))
    bad_ca = await run_cli(reactor, "check", "-c", str(missing_ca), DOMAIN)
    assert bad_ca.code == 2
    assert len(bad_ca.stderr_lines) == 1 and "nowhere.pem" in bad_ca.stderr, bad_ca.stderr
