"""Nothing learnt is lost on restart: the real daemon, stopped cleanly
or killed with SIGKILL, comes back on the same SQLite file and answers every
policy it had answered, with DNS and HTTPS broken; a corrupt file is kept
aside and the daemon starts clean."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from tests.support.daemon import (
    LOOPBACK,
    DaemonProcess,
    async_yield_fixture,
    ensure_deferred,
    free_port,
    socketmap_lookup,
)
from tests.support.https_server import Hang
from tests.support.world import World

pytestmark = pytest.mark.integration

#: Bytes written over the database file after its first page (its header and
#: schema), so that it stays recognisably ours but its data is damaged.
GARBAGE = bytes(range(256)) * 32
SQLITE_PAGE = 4096
#: Long enough that a restarted daemon has no reason to ask DNS again.
NO_RECHECK = 3600
#: The stream of updates: the daemon rechecks every second, the world changes
#: one domain's policy this often, and the client looks up all of them this often.
STREAM_RECHECK = 1
CHURN_INTERVAL = 0.15
CLIENT_PAUSE = 0.02
#: SIGKILL lands at a random moment in this window (seconds into the stream).
KILL_WINDOW = (1.5, 4.0)


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


@async_yield_fixture
async def world() -> AsyncIterator[World]:
    started = await World.start(reactor())
    try:
        yield started
    finally:
        await started.stop()


class Flag:
    """Raised once, read by loops running concurrently."""

    def __init__(self) -> None:
        self._raised = False

    def raise_(self) -> None:
        self._raised = True

    def __bool__(self) -> bool:
        return self._raised


def answer_for(mx: str) -> str:
    return f"secure match={mx} servername=hostname"


def break_the_world(world: World, domains: list[str]) -> None:
    """DNS SERVFAIL for every name of ``domains`` and a policy host that never answers."""
    for domain in domains:
        world.dns.set_fault(f"_mta-sts.{domain}", "servfail")
        world.dns.set_fault(f"mta-sts.{domain}", "servfail")
        world.https.set_host(f"mta-sts.{domain}", Hang())


def dns_names(world: World) -> set[str]:
    return {name for name, _ in world.dns.queries}


@ensure_deferred
async def test_a_corrupt_database_is_kept_aside_and_the_daemon_starts_clean(
    tmp_path: Path, world: World
) -> None:
    domain = "damaged.example"
    expected = answer_for(f"mx.{domain}")
    world.publish(domain, World.policy_text(mx=(f"mx.{domain}",)), "c1")
    database = tmp_path / "cache.db"
    address = f"inet:{LOOPBACK}:{free_port()}"
    config = world.config_toml(socketmap=(address,), cache_backend="sqlite", cache_path=str(database))
    first = await DaemonProcess.start(reactor(), tmp_path, config, name="first")
    try:
        assert await socketmap_lookup(reactor(), address, "postfix", domain) == ("OK", expected)
        await first.stop()
    finally:
        await first.close()
    damaged = database.read_bytes()[:SQLITE_PAGE] + GARBAGE
    database.write_bytes(damaged)

    second = await DaemonProcess.start(reactor(), tmp_path, config, name="second")
    try:
        # Nothing was kept, so the policy is discovered again, and still served.
        assert await socketmap_lookup(reactor(), address, "postfix", domain) == ("OK", expected)
        await second.stop()
    finally:
        await second.close()

    assert world.https.requests[f"mta-sts.{domain}"] == 2
    about_it = [line for line in second.stderr_lines if str(database) in line]
    assert len(about_it) == 1, second.stderr_text()
    assert "corrupt" in about_it[0]
    assert "Traceback" not in second.stderr_text()
    aside = sorted(
        name
        for name in os.listdir(tmp_path)
        if name.startswith("cache.db.corrupt-") and not name.endswith(("-wal", "-shm"))
    )
    assert len(aside) == 1, os.listdir(tmp_path)
    assert aside[0] in about_it[0]
    # Kept exactly as it was found, and a working database took its place.
    assert (tmp_path / aside[0]).read_bytes() == damaged
    assert database.read_bytes()[:16] == b"SQLite format 3\x00"
    assert any("0 entries loaded" in line for line in second.stderr_lines), second.stderr_text()


@ensure_deferred
async def test_a_clean_restart_answers_every_learnt_policy_without_any_network(
    tmp_path: Path, world: World
) -> None:
    domains = [f"d{n}.example" for n in range(5)]
    expected = {}
    for n, domain in enumerate(domains):
        mx = f"mx{n}.{domain}"
        world.publish(domain, World.policy_text(mx=(mx,)), f"id{n}")
        expected[domain] = answer_for(mx)
    port = free_port()
    address = f"inet:{LOOPBACK}:{port}"
    config = world.config_toml(
        socketmap=(address,),
        cache_backend="sqlite",
        cache_path=str(tmp_path / "cache.db"),
        policy={"recheck_interval": NO_RECHECK},
    )

    first = await DaemonProcess.start(reactor(), tmp_path, config, name="first")
    try:
        for domain in domains:
            assert await socketmap_lookup(reactor(), address, "postfix", domain) == ("OK", expected[domain])
        await first.stop()
    finally:
        await first.close()
    assert all(world.dns.count(f"_mta-sts.{domain}", "TXT") == 1 for domain in domains)

    break_the_world(world, domains)
    queries_before, requests_before = len(world.dns.queries), sum(world.https.requests.values())
    second = await DaemonProcess.start(reactor(), tmp_path, config, name="second")
    try:
        for domain in domains:
            assert await socketmap_lookup(reactor(), address, "postfix", domain) == ("OK", expected[domain])
        # No question reached DNS and no request the policy host, before or after.
        assert world.dns.queries[queries_before:] == []
        assert sum(world.https.requests.values()) == requests_before
        await second.stop()
    finally:
        await second.close()
    assert any(f"{len(domains)} entries loaded" in line for line in second.stderr_lines), second.stderr_text()


@ensure_deferred
async def test_sigkill_during_policy_updates_loses_no_answered_policy(tmp_path: Path, world: World) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    domains = [f"k{n}.example" for n in range(4)]
    #: Every answer the world ever published, per domain, in order (its generation).
    published: dict[str, list[str]] = {domain: [] for domain in domains}

    def publish_next(domain: str) -> None:
        generation = len(published[domain])
        mx = f"mx{generation}.{domain}"
        world.publish(domain, World.policy_text(mx=(mx,)), f"gen{generation}")
        published[domain].append(answer_for(mx))

    for domain in domains:
        publish_next(domain)
    address = f"inet:{LOOPBACK}:{free_port()}"
    config = world.config_toml(
        socketmap=(address,),
        cache_backend="sqlite",
        cache_path=str(tmp_path / "cache.db"),
        policy={"recheck_interval": STREAM_RECHECK},
    )
    first = await DaemonProcess.start(reactor(), tmp_path, config, name="first")
    #: Highest generation the first daemon answered, per domain.
    answered: dict[str, int] = {}
    kill = Flag()

    async def client() -> None:
        while not kill:
            for domain in domains:
                try:
                    status, data = await socketmap_lookup(reactor(), address, "postfix", domain)
                except Exception:
                    if kill:
                        return  # the connection died with the daemon
                    raise
                # A reply that arrived was given, even if the kill came right after.
                if status == "OK":
                    generation = published[domain].index(data)
                    answered[domain] = max(answered.get(domain, 0), generation)
            await deferLater(reactor(), CLIENT_PAUSE, lambda: None)

    async def churn() -> None:
        while not kill:
            publish_next(rng.choice(domains))
            await deferLater(reactor(), CHURN_INTERVAL, lambda: None)

    running = gatherResults(
        [Deferred.fromCoroutine(client()), Deferred.fromCoroutine(churn())], consumeErrors=True
    )
    try:
        await deferLater(reactor(), rng.uniform(*KILL_WINDOW), lambda: None)
        kill.raise_()
        await first.kill()
        await running
    finally:
        await first.close()

    context = f"seed {seed}, answered {answered}, published {published}\n{first.stderr_text()}"
    assert set(answered) == set(domains), context
    # The stream really replaced policies the daemon had answered.
    assert any(generation > 0 for generation in answered.values()), context

    break_the_world(world, domains)
    second = await DaemonProcess.start(reactor(), tmp_path, config, name="second")
    try:
        for domain, generation in answered.items():
            status, data = await socketmap_lookup(reactor(), address, "postfix", domain)
            assert status == "OK", f"{domain}: {status} {data}; {context}"
            # The policy last answered, or a later one stored before the kill.
            assert data in published[domain][generation:], f"{domain}: {data}; {context}"
        await second.stop()
    finally:
        await second.close()
