"""End to end with Debian's real Postfix: ``postmap -q`` against a
``postfix-mtasts serve`` child pointed at a loopback DNS server and policy host.

What Postfix 3.7 does, as these tests pin down: a found key prints its value
and exits 0; not found prints nothing and exits 1, silently; a socketmap PERM
reply is a table error ("socketmap server permanent error: ..." then "fatal:
table ...: query error", exit 1), so in the SMTP client it defers the mail
rather than falling back to another TLS level. ``tcp:`` (tcp_table) decodes
the daemon's %XX quoting, so both protocols print the same policy string.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.support.daemon import (
    LOOPBACK,
    DaemonProcess,
    async_yield_fixture,
    ensure_deferred,
    free_port,
    postfix_config_directory,
    postmap_batch,
    postmap_query,
)
from tests.support.world import World

pytestmark = [pytest.mark.integration, pytest.mark.postfix]

ENFORCE = "enforce.example"
ENFORCE_MX = ("mx1.enforce.example", "*.backup.enforce.example")
#: What Postfix must print for ENFORCE: patterns sorted, "*." written as ".".
ENFORCE_ANSWER = "secure match=.backup.enforce.example:mx1.enforce.example servername=hostname"
TESTING = "testing.example"
TESTING_ANSWER = "secure match=mx.testing.example servername=hostname"
#: No TXT record at all (NXDOMAIN).
PLAIN = "plain.example"
IP_LITERAL = "[192.0.2.25]"
PARENT_PROBE = ".enforce.example"
#: A profile (socketmap name) that enforces testing-mode policies.
STRICT = "strict"


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


@dataclass
class Setup:
    world: World
    daemon: DaemonProcess
    socketmap_port: int
    tcp_table_port: int
    socket_path: str
    postfix_dir: Path

    def table(self, kind: str, name: str = "postfix") -> str:
        """The Postfix table name that reaches the daemon over ``kind``."""
        if kind == "socketmap-inet":
            return f"socketmap:inet:{LOOPBACK}:{self.socketmap_port}:{name}"
        if kind == "socketmap-unix":
            return f"socketmap:unix:{self.socket_path}:{name}"
        assert kind == "tcp" and name == "postfix"
        return f"tcp:{LOOPBACK}:{self.tcp_table_port}"

    async def postmap(self, table: str, key: str) -> Any:
        return await postmap_query(reactor(), table, key, config_directory=self.postfix_dir)


@pytest.fixture
def postmap() -> None:
    """Skip (under CI: fail) without Postfix's postmap. A plain fixture: a skip
    raised inside pytest-twisted's async fixture breaks the next test's set-up
    instead of skipping it."""
    require("Debian's postfix (postmap)", shutil.which("postmap") is not None)


@async_yield_fixture
async def setup(tmp_path: Path, postmap: None) -> AsyncIterator[Setup]:
    world = await World.start(reactor())
    world.publish(ENFORCE, World.policy_text(mode="enforce", mx=ENFORCE_MX), "e1")
    world.publish(TESTING, World.policy_text(mode="testing", mx=("mx.testing.example",)), "t1")
    # A unix socket path must stay under 108 bytes; pytest's tmp_path may not.
    socket_directory = tempfile.mkdtemp(prefix="mtasts-")
    socket_path = f"{socket_directory}/mtasts.sock"
    socketmap_port, tcp_table_port = free_port(), free_port()
    config = world.config_toml(
        socketmap=(f"inet:{LOOPBACK}:{socketmap_port}", f"unix:{socket_path}"),
        tcp_table=(f"inet:{LOOPBACK}:{tcp_table_port}",),
        cache_backend="sqlite",
        cache_path=str(tmp_path / "cache.db"),
        profiles={STRICT: {"enforce_testing": True}},
    )
    daemon = await DaemonProcess.start(reactor(), tmp_path, config)
    try:
        yield Setup(
            world,
            daemon,
            socketmap_port,
            tcp_table_port,
            socket_path,
            postfix_config_directory(tmp_path / "postfix"),
        )
        await daemon.stop()
    finally:
        await daemon.close()
        await world.stop()
        shutil.rmtree(socket_directory, ignore_errors=True)
    assert "Traceback" not in daemon.stderr_text(), daemon.stderr_text()


TABLES = ["socketmap-inet", "socketmap-unix", "tcp"]


@pytest.mark.parametrize("kind", TABLES)
@ensure_deferred
async def test_enforce_domain_prints_the_secure_policy(setup: Setup, kind: str) -> None:
    result = await setup.postmap(setup.table(kind), ENFORCE)

    assert (result.code, result.stdout, result.stderr) == (0, ENFORCE_ANSWER + "\n", "")
    assert setup.world.https.requests[f"mta-sts.{ENFORCE}"] == 1


@pytest.mark.parametrize("kind", TABLES)
@pytest.mark.parametrize(
    "key",
    [
        pytest.param(PLAIN, id="no-mta-sts"),
        pytest.param(TESTING, id="testing-mode"),
        pytest.param(IP_LITERAL, id="ip-literal"),
        pytest.param(PARENT_PROBE, id="parent-probe"),
    ],
)
@ensure_deferred
async def test_keys_without_an_enforced_policy_are_not_found(setup: Setup, kind: str, key: str) -> None:
    result = await setup.postmap(setup.table(kind), key)

    assert (result.code, result.stdout, result.stderr) == (1, "", "")


@ensure_deferred
async def test_ip_literal_and_parent_probe_cause_no_dns_query(setup: Setup) -> None:
    for key in (IP_LITERAL, PARENT_PROBE):
        result = await setup.postmap(setup.table("socketmap-inet"), key)
        assert result.code == 1, result
    assert setup.world.dns.queries == []

    # The same daemon does query DNS for a real domain, so the log above is live.
    await setup.postmap(setup.table("socketmap-inet"), PLAIN)
    assert setup.world.dns.count(f"_mta-sts.{PLAIN}", "TXT") >= 1


@pytest.mark.parametrize("kind", ["socketmap-inet", "socketmap-unix"])
@ensure_deferred
async def test_a_profile_with_enforce_testing_answers_the_testing_domain(setup: Setup, kind: str) -> None:
    strict = setup.table(kind, STRICT)

    testing = await setup.postmap(strict, TESTING)
    enforce = await setup.postmap(strict, ENFORCE)
    default = await setup.postmap(setup.table(kind), TESTING)

    assert (testing.code, testing.stdout) == (0, TESTING_ANSWER + "\n")
    assert (enforce.code, enforce.stdout) == (0, ENFORCE_ANSWER + "\n")
    assert (default.code, default.stdout) == (1, "")
    # One fetch served both profiles.
    assert setup.world.https.requests[f"mta-sts.{TESTING}"] == 1


@ensure_deferred
async def test_an_unknown_socketmap_name_is_a_permanent_table_error(setup: Setup) -> None:
    table = setup.table("socketmap-inet", "nosuch")

    result = await setup.postmap(table, ENFORCE)

    assert result.code == 1
    assert result.stdout == ""
    # Postfix logs our PERM text, then gives up on the table as a query error.
    assert f"{table} socketmap server permanent error: unknown map name 'nosuch'" in result.stderr
    assert "configured: postfix, postfix310, strict" in result.stderr
    assert f"fatal: table {table}: query error" in result.stderr
    assert any("unknown map name 'nosuch'" in line for line in setup.daemon.stderr_lines)


@pytest.mark.parametrize("kind", TABLES)
@ensure_deferred
async def test_many_keys_over_one_postfix_connection(setup: Setup, kind: str) -> None:
    keys = [ENFORCE, PLAIN, IP_LITERAL, TESTING, PARENT_PROBE, ENFORCE.upper()]

    result = await postmap_batch(reactor(), setup.table(kind), keys, config_directory=setup.postfix_dir)

    assert result.code == 0, result
    assert result.stderr == ""
    # postmap prints "key<TAB>value" for each key found, in input order.
    assert result.stdout.splitlines() == [
        f"{ENFORCE}\t{ENFORCE_ANSWER}",
        f"{ENFORCE.upper()}\t{ENFORCE_ANSWER}",
    ]
