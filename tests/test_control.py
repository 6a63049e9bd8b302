"""``postfix-mtasts ctl`` end to end: every command against a real daemon (a
child process) whose DNS and policy host run on loopback in this process,
table and JSON output, the raw JSON-lines protocol, and the one-line errors
an admin sees."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import sysconfig
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from postfix_mtasts.control import (
    SOCKET_NAME,
    START_HINT,
    client_socket_path,
    default_socket_path,
    format_list,
)
from tests.conftest import require
from tests.support.daemon import (
    LOOPBACK,
    PROJECT_ROOT,
    CommandResult,
    DaemonProcess,
    async_yield_fixture,
    daemon_environment,
    ensure_deferred,
    free_port,
    run_cli,
    socketmap_lookup,
)
from tests.support.world import World

pytestmark = pytest.mark.integration

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
POLICY_DOMAIN = "policy.example"
NEGATIVE_DOMAIN = "nosts.example"
#: uid and gid of nobody/nogroup on Debian.
NOBODY = 65534


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


@dataclass
class Running:
    world: World
    daemon: DaemonProcess
    socketmap: str
    control: str
    directory: Path

    async def ctl(self, *args: str) -> CommandResult:
        return await run_cli(reactor(), "ctl", "--socket", self.control, *args)

    async def lookup(self, domain: str, name: str = "postfix") -> tuple[str, str]:
        return await socketmap_lookup(reactor(), self.socketmap, name, domain)


def config_text(world: World, port: int, control: str, extra: str = "") -> str:
    return world.config_toml(
        socketmap=[f"inet:{LOOPBACK}:{port}"],
        extra=f'[control]\nsocket = "{control}"\nmode = "0600"\n' + extra,
    )


@async_yield_fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    world = await World.start(reactor())
    world.publish(POLICY_DOMAIN, World.policy_text(mx=("mx1.policy.example",)), "id1")
    port = free_port()
    control = str(tmp_path / "control.sock")
    daemon = await DaemonProcess.start(reactor(), tmp_path, config_text(world, port, control))
    try:
        # The daemon opens its control socket just after the Postfix listener
        # that DaemonProcess waits for.
        await _appears(control)
        yield Running(world, daemon, f"inet:{LOOPBACK}:{port}", control, tmp_path)
    finally:
        await daemon.close()
        await world.stop()


async def _appears(path: str, limit: float = 10.0) -> None:
    waited = 0.0
    while not os.path.exists(path):
        assert waited < limit, f"{path} did not appear within {limit}s"
        pause: Deferred[None] = Deferred()
        reactor().callLater(0.02, pause.callback, None)
        await pause
        waited += 0.02


async def cached_two(running: Running) -> None:
    """One fetched policy and one negative entry in the daemon's cache."""
    assert await running.lookup(POLICY_DOMAIN) == (
        "OK", "secure match=mx1.policy.example servername=hostname"
    )
    assert await running.lookup(NEGATIVE_DOMAIN) == ("NOTFOUND", "")


def ok(result: CommandResult) -> str:
    assert result.code == 0, result
    assert result.stderr == "", result
    return result.stdout


# --- list ------------------------------------------------------------------------


@ensure_deferred
async def test_list_shows_an_aligned_table_of_cached_domains(running: Running) -> None:
    await cached_two(running)

    lines = ok(await running.ctl("list")).splitlines()

    header, *rows = lines
    assert header.split() == ["DOMAIN", "SOURCE", "MODE", "POLICY", "ID", "FETCHED", "EXPIRES"]
    assert [row.split()[0] for row in rows] == [NEGATIVE_DOMAIN, POLICY_DOMAIN]  # sorted
    negative, fetched = (row.split() for row in rows)
    assert fetched[1:4] == ["fetched", "enforce", "id1"]
    assert ISO_UTC.fullmatch(fetched[4]) and ISO_UTC.fullmatch(fetched[5])
    assert negative[1:5] == ["negative", "-", "-", "-"]
    assert ISO_UTC.fullmatch(negative[5])
    # Every column starts at the same offset on every line.
    for title in ("SOURCE", "MODE", "POLICY ID", "FETCHED", "EXPIRES"):
        offset = header.index(title)
        assert all(row[offset - 2 : offset] == "  " and row[offset] != " " for row in rows), title


@ensure_deferred
async def test_list_json_gives_every_field(running: Running) -> None:
    await cached_two(running)

    entries = json.loads(ok(await running.ctl("list", "--json")))

    by_domain = {entry["domain"]: entry for entry in entries}
    assert set(by_domain) == {POLICY_DOMAIN, NEGATIVE_DOMAIN}
    fetched = by_domain[POLICY_DOMAIN]
    assert (fetched["source"], fetched["mode"], fetched["policy_id"], fetched["in_force"]) == (
        "fetched", "enforce", "id1", True
    )
    assert ISO_UTC.fullmatch(fetched["fetched"]) and ISO_UTC.fullmatch(fetched["expires"])
    negative = by_domain[NEGATIVE_DOMAIN]
    assert (negative["source"], negative["mode"], negative["policy_id"], negative["fetched"]) == (
        "negative", None, None, None
    )


@ensure_deferred
async def test_list_of_an_empty_cache_is_the_header_alone(running: Running) -> None:
    assert ok(await running.ctl("list")).splitlines() == [
        "DOMAIN  SOURCE  MODE  POLICY ID  FETCHED  EXPIRES"
    ]
    assert json.loads(ok(await running.ctl("list", "--json"))) == []


# --- show ------------------------------------------------------------------------


@ensure_deferred
async def test_show_prints_the_entry_the_policy_and_the_last_trace(running: Running) -> None:
    await cached_two(running)

    text = ok(await running.ctl("show", POLICY_DOMAIN))

    assert f"domain:    {POLICY_DOMAIN}" in text
    assert "mode:      enforce" in text
    assert "policy id: id1" in text
    assert "mx:        mx1.policy.example" in text
    assert "max_age:   86400" in text
    policy = text.split("policy:\n", 1)[1].split("last resolution:", 1)[0]
    assert policy.splitlines() == [
        "  version: STSv1", "  mode: enforce", "  mx: mx1.policy.example", "  max_age: 86400"
    ]
    trace = text.split("last resolution:\n", 1)[1].splitlines()
    assert trace[0].startswith(f"  TXT _mta-sts.{POLICY_DOMAIN}: 'v=STSv1; id=id1;'")
    assert trace[-1].startswith("  result: policy id1 fetched: mode enforce")


@ensure_deferred
async def test_show_json_and_domain_normalisation(running: Running) -> None:
    await cached_two(running)

    details = json.loads(ok(await running.ctl("show", "Policy.Example.", "--json")))

    assert details["domain"] == POLICY_DOMAIN
    assert details["mx"] == ["mx1.policy.example"]
    assert details["policy_text"].startswith("version: STSv1")
    assert details["trace"][-1].startswith("result: policy id1 fetched")
    negative = json.loads(ok(await running.ctl("show", NEGATIVE_DOMAIN, "--json")))
    assert negative["source"] == "negative"
    assert negative["trace"][0].startswith(f"TXT _mta-sts.{NEGATIVE_DOMAIN}:")


@ensure_deferred
async def test_show_of_an_unknown_domain_is_one_error_line_and_exit_2(running: Running) -> None:
    result = await running.ctl("show", "unknown.example")

    assert result.code == 2
    assert result.stdout == ""
    assert result.stderr_lines == [
        "postfix-mtasts: unknown domain: unknown.example is not in the cache "
        "(postfix-mtasts ctl refresh unknown.example looks it up)"
    ]
    bad = await running.ctl("show", "192.0.2.1")
    assert bad.code == 2
    assert bad.stderr_lines == ["postfix-mtasts: not a mail domain: '192.0.2.1' (IP literal)"]


# --- refresh and flush -----------------------------------------------------------------


@ensure_deferred
async def test_refresh_fetches_now_and_the_new_policy_answers(running: Running) -> None:
    await cached_two(running)
    running.world.publish(POLICY_DOMAIN, World.policy_text(mx=("mx2.policy.example",)), "id2")

    out = ok(await running.ctl("refresh", POLICY_DOMAIN))

    assert out.splitlines() == [f"{POLICY_DOMAIN}: policy id2 fetched: mode enforce, max_age 86400"]
    assert await running.lookup(POLICY_DOMAIN) == (
        "OK", "secure match=mx2.policy.example servername=hostname"
    )


@ensure_deferred
async def test_refresh_all_resolves_every_cached_domain(running: Running) -> None:
    await cached_two(running)
    before = running.world.dns.count(f"_mta-sts.{NEGATIVE_DOMAIN}")

    lines = ok(await running.ctl("refresh", "--all")).splitlines()

    assert [line.split(":")[0] for line in lines] == [NEGATIVE_DOMAIN, POLICY_DOMAIN]
    assert lines[0].startswith(f"{NEGATIVE_DOMAIN}: no MTA-STS record")
    assert lines[1] == f"{POLICY_DOMAIN}: policy id1 refreshed: mode enforce, max_age 86400"
    assert running.world.dns.count(f"_mta-sts.{NEGATIVE_DOMAIN}") == before + 1
    as_json = json.loads(ok(await running.ctl("refresh", POLICY_DOMAIN, "--json")))
    refreshed = "policy id1 refreshed: mode enforce, max_age 86400"
    assert as_json == [{"domain": POLICY_DOMAIN, "result": refreshed}]


@ensure_deferred
async def test_refresh_of_a_new_domain_looks_it_up(running: Running) -> None:
    out = ok(await running.ctl("refresh", "fresh.example"))

    assert out.startswith("fresh.example: no MTA-STS record")
    assert "fresh.example" in ok(await running.ctl("list"))


@ensure_deferred
async def test_flush_one_domain_then_all(running: Running) -> None:
    await cached_two(running)

    assert ok(await running.ctl("flush", NEGATIVE_DOMAIN)) == f"flushed {NEGATIVE_DOMAIN}\n"
    listed = [entry["domain"] for entry in json.loads(ok(await running.ctl("list", "--json")))]
    assert listed == [POLICY_DOMAIN]

    again = await running.ctl("flush", NEGATIVE_DOMAIN)
    assert again.code == 2
    assert again.stderr_lines == [f"postfix-mtasts: unknown domain: {NEGATIVE_DOMAIN} is not in the cache"]

    assert ok(await running.ctl("flush", "--all")) == "flushed 1 entries\n"
    assert json.loads(ok(await running.ctl("list", "--json"))) == []
    # Flushed means forgotten: the next lookup fetches the policy again.
    await running.lookup(POLICY_DOMAIN)
    stats = json.loads(ok(await running.ctl("stats", "--json")))
    assert stats["fetches"] == 2, stats


@ensure_deferred
async def test_refresh_and_flush_need_a_domain_or_all(running: Running) -> None:
    result = await running.ctl("flush")

    assert result.code == 2
    assert "one of the arguments domain --all is required" in result.stderr


# --- stats and reload ---------------------------------------------------------------


@ensure_deferred
async def test_stats_counts_lookups_hits_fetches_and_latency(running: Running) -> None:
    await cached_two(running)
    await running.lookup(POLICY_DOMAIN)  # from memory
    await running.lookup("[192.0.2.1]")  # no lookup at all
    await running.lookup("x", name="nosuchprofile")

    stats = json.loads(ok(await running.ctl("stats", "--json")))

    assert stats["lookups"] == 4
    assert stats["answers"] == {"OK": 2, "NOTFOUND": 2}
    assert stats["profiles"] == {"postfix": {"OK": 2, "NOTFOUND": 2}, "(unknown)": {"PERM": 1}}
    assert (stats["cache_hits"], stats["misses"], stats["skipped"]) == (1, 2, 1)
    assert stats["hit_ratio"] == pytest.approx(1 / 3)
    assert stats["fetches"] == 1 and stats["fetch_failures"] == {}
    assert stats["cached"] == {"fetched": 1, "negative": 1, "failed": 0}
    assert stats["uptime"] > 0
    assert set(stats["latency"]) == {"p50", "p90", "p99", "p999"}
    assert all(value > 0 for value in stats["latency"].values())

    text = ok(await running.ctl("stats")).splitlines()
    fields = dict(line.split(":", 1) for line in text)
    assert fields["lookups"].strip() == "4 (NOTFOUND 2, OK 2)"
    assert fields["  postfix"].strip() == "4 (NOTFOUND 2, OK 2)"
    assert fields["cache hits"].strip().startswith("33.3% (memory 1, store 0, misses 2, not looked up 1)")
    assert fields["fetches"].strip() == "1, failed 0"
    assert fields["cached"].strip() == "2 (fetched 1, negative 1)"
    assert re.fullmatch(r" +\d\d:\d\d:\d\d", fields["uptime"])


@ensure_deferred
async def test_reload_applies_a_new_profile_and_refuses_a_broken_file(running: Running) -> None:
    config = running.daemon.config_path
    assert (await running.lookup(POLICY_DOMAIN, name="strict"))[0] == "PERM"
    original = config.read_text()
    config.write_text(original + "\n[profiles.strict]\nenforce_testing = true\n")

    out = ok(await running.ctl("reload"))

    assert out.startswith(f"configuration reloaded from {config}: ")
    assert "profiles: postfix, postfix310, strict" in out
    assert (await running.lookup(POLICY_DOMAIN, name="strict"))[0] == "OK"

    config.write_text(original + "\n[policy]\nrecheck_interval = 'soon'\n")
    refused = await running.ctl("reload")
    assert refused.code == 2
    assert len(refused.stderr_lines) == 1
    assert refused.stderr_lines[0].startswith("postfix-mtasts: reload refused: ")
    assert "policy" in refused.stderr_lines[0]
    assert (await running.lookup(POLICY_DOMAIN, name="strict"))[0] == "OK"  # old config kept


# --- the protocol itself ------------------------------------------------------------------


def raw_exchange(path: str, payload: bytes, replies: int) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(20)
        client.connect(path)
        client.sendall(payload)
        data = b""
        while data.count(b"\n") < replies:
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@ensure_deferred
async def test_json_lines_protocol_answers_in_order_with_errors_as_values(running: Running) -> None:
    from twisted.internet.threads import deferToThread

    payload = (
        b'{"command": "stats"}\n'
        b"this is not json\n"
        b'{"command": "launch"}\n'
        b'{"command": "show", "domain": "nowhere.example"}\n'
        b'["list"]\n'
        b'{"command": "list"}\n'
    )
    replies = await deferToThread(raw_exchange, running.control, payload, 6)

    assert [reply["ok"] for reply in replies] == [True, False, False, False, False, True]
    assert replies[0]["result"]["lookups"] == 0
    assert replies[1]["error"].startswith("not a JSON request")
    assert replies[2]["error"] == (
        "unknown command 'launch'; commands: list, show, refresh, flush, stats, reload"
    )
    assert replies[3]["error"].startswith("unknown domain: nowhere.example")
    assert replies[4]["error"] == 'a request is a JSON object like {"command": "stats"}'
    assert replies[5]["result"] == []


@ensure_deferred
async def test_the_control_socket_has_the_configured_mode(running: Running) -> None:
    assert os.stat(running.control).st_mode & 0o777 == 0o600


# --- errors an admin meets -----------------------------------------------------------------


@ensure_deferred
async def test_no_daemon_is_one_line_with_the_fix(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")

    result = await run_cli(reactor(), "ctl", "--socket", path, "stats")

    assert result.code == 2
    assert result.stdout == ""
    assert result.stderr_lines == [f"postfix-mtasts: no daemon listening on {path}: {START_HINT}"]
    # A socket file left behind by a dead daemon: the same message.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)
    result = await run_cli(reactor(), "ctl", "--socket", path, "list")
    assert result.stderr_lines == [f"postfix-mtasts: no daemon listening on {path}: {START_HINT}"]


@ensure_deferred
async def test_ctl_finds_the_socket_in_the_config(tmp_path: Path) -> None:
    path = str(tmp_path / "from-config.sock")
    config = tmp_path / "ctl.toml"
    config.write_text(f'[control]\nsocket = "{path}"\n')

    result = await run_cli(reactor(), "ctl", "--config", str(config), "reload")

    assert result.stderr_lines == [f"postfix-mtasts: no daemon listening on {path}: {START_HINT}"]
    config.write_text("[control]\nsocket = 'relative'\n")
    bad = await run_cli(reactor(), "ctl", "--config", str(config), "list")
    assert bad.code == 2 and len(bad.stderr_lines) == 1 and "control.socket" in bad.stderr


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.done: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = 0 if isinstance(value, ProcessDone) else value.exitCode if isinstance(
            value, ProcessTerminated) else -1
        self.done.callback(code)


@pytest.fixture
def open_directory() -> Iterator[Path]:
    """A directory any user may enter (tmp_path is private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="mtasts-ctl-"))
    directory.chmod(0o755)
    yield directory
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


@ensure_deferred
async def test_socket_not_permitted_is_one_line_with_the_fix(open_directory: Path) -> None:
    require("running as root (to run ctl as another user)", os.geteuid() == 0)
    path = str(open_directory / SOCKET_NAME)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    os.chmod(path, 0o600)
    # The real "postfix-mtasts ctl", as user nobody. The test's own Python may
    # live where nobody cannot read (/root): use the system's of the same version.
    system_python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    interpreter = system_python if os.path.exists(system_python) else sys.executable
    environment = daemon_environment()
    environment["PYTHONPATH"] = os.pathsep.join([PROJECT_ROOT, sysconfig.get_paths()["purelib"]])
    protocol = _Collect()
    reactor().spawnProcess(
        protocol, interpreter,
        [interpreter, "-m", "postfix_mtasts.cli", "ctl", "--socket", path, "stats"],
        env=environment, path="/", uid=NOBODY, gid=NOBODY,
    )
    code = await protocol.done
    listener.close()

    assert code == 2, protocol.err
    assert protocol.out == b""
    assert protocol.err.decode().splitlines() == [
        f"postfix-mtasts: permission denied on {path}: run as root or a member of the socket's group"
    ]


# --- where the socket is by default (no daemon needed) -----------------------------------------


@pytest.mark.parametrize(
    ("environ", "euid", "expected"),
    [
        ({"RUNTIME_DIRECTORY": "/run/postfix-mtasts"}, 999, "/run/postfix-mtasts/control.sock"),
        ({"RUNTIME_DIRECTORY": "/run/a:/run/b"}, 0, "/run/a/control.sock"),
        ({}, 0, "/run/postfix-mtasts/control.sock"),
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, "/run/user/1000/postfix-mtasts/control.sock"),
        ({"XDG_RUNTIME_DIR": "relative"}, 1000, "/tmp/postfix-mtasts-1000/control.sock"),
        ({}, 1000, "/tmp/postfix-mtasts-1000/control.sock"),
    ],
)
def test_default_socket_path(environ: dict[str, str], euid: int, expected: str) -> None:
    assert default_socket_path(environ, euid) == expected


def test_client_prefers_an_existing_socket(tmp_path: Path) -> None:
    own = tmp_path / "postfix-mtasts" / "control.sock"
    environ = {"XDG_RUNTIME_DIR": str(tmp_path)}
    system_exists = os.path.exists("/run/postfix-mtasts/control.sock")
    expected = "/run/postfix-mtasts/control.sock" if system_exists else str(own)
    assert client_socket_path(environ, 1000) == expected
    own.parent.mkdir()
    own.touch()
    assert client_socket_path(environ, 1000) == str(own)


def test_format_list_pads_columns_to_the_longest_cell() -> None:
    table = format_list([
        {"domain": "a.example", "source": "negative", "mode": None, "policy_id": None,
         "fetched": None, "expires": "2026-01-01T00:00:00Z"},
        {"domain": "much-longer.example", "source": "fetched", "mode": "testing", "policy_id": "20260101",
         "fetched": "2025-12-31T00:00:00Z", "expires": "2026-01-01T00:00:00Z"},
    ])

    assert table.splitlines() == [
        "DOMAIN               SOURCE    MODE     POLICY ID  FETCHED               EXPIRES",
        "a.example            negative  -        -          -                     2026-01-01T00:00:00Z",
        "much-longer.example  fetched   testing  20260101   2025-12-31T00:00:00Z  2026-01-01T00:00:00Z",
    ]
