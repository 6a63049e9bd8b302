"""The ``postfix-mtasts`` command as an administrator runs it: ``query``,
``serve`` start-up errors and ``--version``, each in a real child process."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from postfix_mtasts import __version__
from tests.support.daemon import (
    LOOPBACK,
    CommandResult,
    async_yield_fixture,
    ensure_deferred,
    free_port,
    run_cli,
)
from tests.support.world import World

pytestmark = pytest.mark.integration


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# --- --version and configuration errors -----------------------------------


@ensure_deferred
async def test_version_prints_the_package_version() -> None:
    result = await run_cli(reactor(), "--version")

    assert result.code == 0, result
    assert result.stdout.strip() == f"postfix-mtasts {__version__}"


@pytest.mark.parametrize(
    ("command", "described"),
    [("serve", "until SIGTERM or SIGINT"), ("query", "Exit status: 0 for a policy answer")],
)
@ensure_deferred
async def test_help_of_serve_and_query_describes_the_command(command: str, described: str) -> None:
    result = await run_cli(reactor(), command, "--help")

    assert result.code == 0, result
    assert described in " ".join(result.stdout.split()), result.stdout


BAD_CONFIGS = [
    pytest.param('[policy]\nrecheck_interval = "soon"\n', "policy.recheck_interval", id="wrong-type"),
    pytest.param('[listen]\nsocketmapp = ["inet:127.0.0.1:8461"]\n', "listen.socketmapp", id="unknown-key"),
    pytest.param('[cache]\nbackend = "sqlight"\n', "cache.backend", id="bad-choice"),
    pytest.param('[listen]\nsocketmap = ["inet:127.0.0.1:99999"]\n', "listen.socketmap[0]", id="bad-port"),
]


@pytest.mark.parametrize(("text", "key"), BAD_CONFIGS)
@ensure_deferred
async def test_serve_with_a_bad_config_says_one_line_naming_the_key(
    tmp_path: Path, text: str, key: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)

    result = await run_cli(reactor(), "serve", "--config", str(config))

    assert result.code == 2, result
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert key in line
    assert str(config) in line
    assert result.stdout == ""


@ensure_deferred
async def test_serve_with_a_missing_config_file_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"

    result = await run_cli(reactor(), "serve", "--config", str(missing))

    assert result.code == 2, result
    assert result.stderr_lines == [
        f"postfix-mtasts: {missing}: cannot read configuration: No such file or directory"
    ]


@ensure_deferred
async def test_serve_on_an_address_in_use_fails_with_one_error_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupant:
        occupant.bind((LOOPBACK, 0))
        occupant.listen()
        taken = occupant.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(
            f'[listen]\nsocketmap = ["inet:{LOOPBACK}:{free_port()}"]\n'
            f'tcp_table = ["inet:{LOOPBACK}:{taken}"]\n'
            f'[cache]\nbackend = "sqlite"\npath = "{tmp_path}/cache.db"\n'
        )

        result = await run_cli(reactor(), "serve", "--config", str(config), private_directory=tmp_path)

    assert result.code == 1, result
    assert_no_traceback(result.stderr)
    errors = [line for line in result.stderr_lines if " ERROR " in f" {line} "]
    assert len(errors) == 1, result.stderr
    assert f"inet:{LOOPBACK}:{taken}" in errors[0]
    assert "tcp_table" in errors[0]
    # It never claimed to be ready, and said nothing but the error: no
    # "listening", no "loaded", no "stopped" around it.
    assert [line for line in result.stderr_lines if line.strip()] == errors, result.stderr


# --- query ----------------------------------------------------------------

ENFORCE = "q.example"
ENFORCE_ANSWER = "secure match=.backup.q.example:mx.q.example servername=hostname"
TESTING = "t.example"


@async_yield_fixture
async def world() -> AsyncIterator[World]:
    started = await World.start(reactor())
    started.publish(ENFORCE, World.policy_text(mx=("mx.q.example", "*.backup.q.example")), "q1")
    started.publish(TESTING, World.policy_text(mode="testing", mx=("mx.t.example",)), "t1")
    try:
        yield started
    finally:
        await started.stop()


async def query(world: World, tmp_path: Path, *args: str) -> CommandResult:
    config = tmp_path / "query.toml"
    config.write_text(world.config_toml(profiles={"strict": {"enforce_testing": True}}))
    result = await run_cli(reactor(), "query", *args, "--config", str(config))
    assert_no_traceback(result.stderr)
    return result


def log_errors(result: CommandResult) -> list[str]:
    return [line for line in result.stderr_lines if " ERROR " in line or " WARNING " in line]


@ensure_deferred
async def test_query_shows_every_step_of_an_enforced_policy(world: World, tmp_path: Path) -> None:
    result = await query(world, tmp_path, ENFORCE)

    assert result.code == 0, result
    lines = result.stdout.splitlines()
    assert lines[0] == f"key '{ENFORCE}': policy domain {ENFORCE}"
    assert lines[1].startswith(f"  TXT _mta-sts.{ENFORCE}: 'v=STSv1; id=q1;' (id q1, ttl ")
    steps = lines[2:-2]
    assert steps[0] == f"  GET https://mta-sts.{ENFORCE}:{world.https_port}/.well-known/mta-sts.txt"
    for expected in (
        f"  resolved mta-sts.{ENFORCE}: 127.0.0.1",
        f"  connected to 127.0.0.1:{world.https_port}",
        f"  certificate valid for mta-sts.{ENFORCE}",
        "  HTTP 200 OK",
    ):
        assert expected in steps, result.stdout
    assert steps[-1].startswith("  policy valid: mode enforce, max_age 86400"), result.stdout
    assert lines[-2] == "result: policy q1 fetched: mode enforce, max_age 86400"
    assert lines[-1] == f"answer (postfix): OK {ENFORCE_ANSWER}"
    assert log_errors(result) == []
    assert world.https.requests[f"mta-sts.{ENFORCE}"] == 1


@ensure_deferred
async def test_query_keeps_the_resolution_log_line_out_of_its_trace(world: World, tmp_path: Path) -> None:
    """The daemon's one line per resolution repeats the "result:" line, and
    on a terminal it lands in the middle of the printed steps: query shows it
    only with -v."""
    plain = await query(world, tmp_path, ENFORCE)
    verbose = await query(world, tmp_path, ENFORCE, "-v")

    assert plain.code == verbose.code == 0
    assert [line for line in plain.stderr_lines if ENFORCE in line] == [], plain.stderr
    logged = [line for line in verbose.stderr_lines if f" INFO {ENFORCE}: secure match=" in line]
    assert len(logged) == 1, verbose.stderr


@ensure_deferred
async def test_query_of_a_domain_without_mta_sts_exits_1(world: World, tmp_path: Path) -> None:
    result = await query(world, tmp_path, "none.example")

    assert result.code == 1, result
    assert result.stdout.splitlines() == [
        "key 'none.example': policy domain none.example",
        "  TXT _mta-sts.none.example: NXDOMAIN",
        "result: no MTA-STS record (NXDOMAIN); remembered for 600s",
        "answer (postfix): NOTFOUND",
    ]
    assert log_errors(result) == []
    assert world.dns.count("_mta-sts.none.example", "TXT") >= 1


@ensure_deferred
async def test_query_shows_why_a_fetch_failed(world: World, tmp_path: Path) -> None:
    world.dns.set_txt("_mta-sts.nohost.example", "v=STSv1; id=n1;")
    world.dns.set_a("mta-sts.nohost.example", LOOPBACK)  # the policy host answers 404

    result = await query(world, tmp_path, "nohost.example")

    assert result.code == 1, result
    lines = result.stdout.splitlines()
    assert "  HTTP 404 Not Found" in lines, result.stdout
    assert lines[-2].startswith("result: fetch failed: "), result.stdout
    assert "404" in lines[-2]
    assert lines[-1] == "answer (postfix): NOTFOUND"


@ensure_deferred
async def test_query_with_a_profile_enforcing_testing_mode(world: World, tmp_path: Path) -> None:
    strict = await query(world, tmp_path, TESTING, "--profile", "strict")
    default = await query(world, tmp_path, TESTING)

    assert strict.code == 0, strict
    assert (
        strict.stdout.splitlines()[-1] == "answer (strict): OK secure match=mx.t.example servername=hostname"
    )
    assert default.code == 1, default
    assert default.stdout.splitlines()[-2:] == [
        "result: policy t1 fetched: mode testing, max_age 86400",
        "answer (postfix): NOTFOUND",
    ]


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("[192.0.2.1]", "IP literal"),
        ("[ipv6:2001:db8::1]", "IP literal"),
        (".q.example", "parent-domain probe"),
    ],
)
@ensure_deferred
async def test_query_of_a_key_that_needs_no_lookup_asks_no_dns(
    world: World, tmp_path: Path, key: str, reason: str
) -> None:
    result = await query(world, tmp_path, key)

    assert result.code == 1, result
    assert result.stdout.splitlines() == [f"key '{key}': {reason}", "answer: NOTFOUND (no lookup needed)"]
    assert world.dns.queries == []
    assert world.https.connections_accepted == 0


@ensure_deferred
async def test_query_with_an_unknown_profile_says_one_line(world: World, tmp_path: Path) -> None:
    result = await query(world, tmp_path, ENFORCE, "--profile", "nope")

    assert result.code == 2, result
    assert result.stderr_lines == [
        "postfix-mtasts: unknown profile 'nope'; configured: postfix, postfix310, strict"
    ]
    assert world.dns.queries == []
