"""RFC 8461 cache rules end to end: a real in-process daemon, the real
reactor, a loopback DNS server and policy host that the test turns hostile.

The daemon rechecks the TXT id every ``RECHECK`` second (the smallest the
config accepts); tests wait a little longer than that in real time, so each
module run stays within a few seconds.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from postfix_mtasts.cache import Source
from postfix_mtasts.codec import socketmap as socketmap_codec
from tests.support.daemon import async_yield_fixture, ensure_deferred
from tests.support.https_server import Drip, Hang, Serve
from tests.support.world import RawConnection, RunningDaemon, World, socketmap_query, start_daemon

pytestmark = pytest.mark.integration

#: recheck_interval of the daemon under test, in seconds.
RECHECK = 1.0
#: A real-time wait that makes the next lookup recheck the TXT id.
PAST_RECHECK = RECHECK + 0.2
STRICT_PROFILE = "strict"
FIRST_MX = ("mx1.example.com",)
SECOND_MX = ("mx2.example.com", "*.example.org")
FIRST_ANSWER = ("OK", "secure match=mx1.example.com servername=hostname")
SECOND_ANSWER = ("OK", "secure match=.example.org:mx2.example.com servername=hostname")
CONCURRENT_FIRST_LOOKUPS = 60
FAILING_LOOKUPS = 20
NEGATIVE_LOOKUPS = 10


@async_yield_fixture
async def world() -> AsyncIterator[World]:
    started = await World.start(reactor)
    yield started
    await started.stop()


@async_yield_fixture
async def daemon(world: World) -> AsyncIterator[RunningDaemon]:
    running = await start_daemon(reactor, world.config(policy={"recheck_interval": RECHECK}))
    yield running
    await running.stop()


async def ask(daemon: RunningDaemon, domain: str, name: str = "postfix") -> tuple[str, str]:
    return await socketmap_query(daemon.socketmap_port, name, domain.encode("ascii"))


async def wait_past_recheck() -> None:
    await deferLater(reactor, PAST_RECHECK, lambda: None)


def txt_queries(world: World, domain: str) -> int:
    return world.dns.count(f"_mta-sts.{domain}", "TXT")


# --- a cached policy outlives the attacker -------------------------------------


@ensure_deferred
async def test_attacker_removing_txt_and_breaking_https_cannot_downgrade(
    world: World, daemon: RunningDaemon
) -> None:
    world.publish("victim.example", World.policy_text(mx=FIRST_MX), "id1")
    assert await ask(daemon, "victim.example") == FIRST_ANSWER

    world.dns.remove("_mta-sts.victim.example")
    world.https.set_host("mta-sts.victim.example", Serve(b"gone", status=404))
    await wait_past_recheck()
    assert await ask(daemon, "victim.example") == FIRST_ANSWER
    assert txt_queries(world, "victim.example") == 2  # the recheck happened and saw no record

    world.dns.set_fault("_mta-sts.victim.example", "servfail")
    world.https.set_host("mta-sts.victim.example", Hang())
    await wait_past_recheck()
    assert await ask(daemon, "victim.example") == FIRST_ANSWER
    assert txt_queries(world, "victim.example") >= 3
    assert world.https.requests["mta-sts.victim.example"] == 1


@ensure_deferred
async def test_new_id_brings_the_new_policy(world: World, daemon: RunningDaemon) -> None:
    world.publish("moving.example", World.policy_text(mx=FIRST_MX), "id1")
    assert await ask(daemon, "moving.example") == FIRST_ANSWER

    # Same id, new file: not fetched again, the id says nothing changed.
    world.publish("moving.example", World.policy_text(mx=SECOND_MX), "id1")
    await wait_past_recheck()
    assert await ask(daemon, "moving.example") == FIRST_ANSWER
    assert world.https.requests["mta-sts.moving.example"] == 1

    world.publish("moving.example", World.policy_text(mx=SECOND_MX), "id2")
    await wait_past_recheck()
    assert await ask(daemon, "moving.example") == SECOND_ANSWER
    assert world.https.requests["mta-sts.moving.example"] == 2
    store: Any = daemon.daemon.store
    stored = await store.get("moving.example")
    assert stored is not None and stored.policy_id == "id2"


@ensure_deferred
async def test_new_id_with_an_invalid_policy_keeps_the_old_one(
    world: World, daemon: RunningDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="postfix_mtasts")
    world.publish("broken.example", World.policy_text(mx=FIRST_MX), "id1")
    assert await ask(daemon, "broken.example") == FIRST_ANSWER

    world.dns.set_txt("_mta-sts.broken.example", "v=STSv1; id=id2;")
    world.https.set_host("mta-sts.broken.example", Serve(b"version: STSv1\r\nmode: enforce\r\n"))
    await wait_past_recheck()
    assert await ask(daemon, "broken.example") == FIRST_ANSWER
    assert world.https.requests["mta-sts.broken.example"] == 2
    assert any(
        "broken.example" in record.getMessage() and "fetch of policy id2 failed" in record.getMessage()
        for record in caplog.records
    ), [record.getMessage() for record in caplog.records]

    # The failed id is not fetched again on every recheck.
    await wait_past_recheck()
    assert await ask(daemon, "broken.example") == FIRST_ANSWER
    assert world.https.requests["mta-sts.broken.example"] == 2
    store: Any = daemon.daemon.store
    stored = await store.get("broken.example")
    assert stored is not None and stored.source is Source.FETCHED and stored.policy_id == "id1"


@ensure_deferred
async def test_switching_to_mode_none_is_not_found(world: World, daemon: RunningDaemon) -> None:
    world.publish("optout.example", World.policy_text(mx=FIRST_MX), "id1")
    assert await ask(daemon, "optout.example") == FIRST_ANSWER

    world.publish("optout.example", World.policy_text(mode="none", mx=FIRST_MX), "id2")
    await wait_past_recheck()
    assert await ask(daemon, "optout.example") == ("NOTFOUND", "")
    assert world.https.requests["mta-sts.optout.example"] == 2


# --- traffic the cache saves --------------------------------------------------------


@ensure_deferred
async def test_concurrent_first_lookups_share_one_discovery(world: World, daemon: RunningDaemon) -> None:
    policy = World.policy_text(mx=FIRST_MX)
    world.publish("popular.example", policy, "id1")
    # A policy host slow enough that every lookup arrives while the fetch runs.
    world.https.set_host("mta-sts.popular.example", Drip(policy.encode("ascii"), interval=0.005))
    connections = await gatherResults(
        [
            Deferred.fromCoroutine(RawConnection.open(daemon.socketmap_port))
            for _ in range(CONCURRENT_FIRST_LOOKUPS)
        ]
    )
    try:
        for connection in connections:
            connection.send(socketmap_codec.encode_request("postfix", b"popular.example"))
        replies = await gatherResults(
            [Deferred.fromCoroutine(connection.socketmap_replies(1)) for connection in connections]
        )
    finally:
        for connection in connections:
            connection.close()
    assert replies == [[FIRST_ANSWER]] * CONCURRENT_FIRST_LOOKUPS
    assert world.https.requests["mta-sts.popular.example"] == 1
    assert txt_queries(world, "popular.example") == 1


@ensure_deferred
async def test_a_failing_policy_host_is_not_hammered(world: World, daemon: RunningDaemon) -> None:
    world.publish("failing.example", World.policy_text(mx=FIRST_MX), "id1")
    world.https.set_host("mta-sts.failing.example", Serve(b"oops", status=500))
    answers = []
    for _ in range(FAILING_LOOKUPS):
        answers.append(await ask(daemon, "failing.example"))
        # Spread the lookups past several recheck intervals.
        await deferLater(reactor, 3 * RECHECK / FAILING_LOOKUPS, lambda: None)
    assert answers == [("NOTFOUND", "")] * FAILING_LOOKUPS
    assert 1 <= world.https.requests["mta-sts.failing.example"] <= 2


@ensure_deferred
async def test_a_domain_without_mta_sts_is_asked_about_once(world: World, daemon: RunningDaemon) -> None:
    for _ in range(NEGATIVE_LOOKUPS):
        assert await ask(daemon, "plain.example") == ("NOTFOUND", "")
    assert txt_queries(world, "plain.example") == 1
    assert sum(world.https.requests.values()) == 0


# --- restart ------------------------------------------------------------------------


@ensure_deferred
async def test_after_a_restart_cached_policies_answer_before_any_network_traffic(
    world: World, tmp_path: Path
) -> None:
    domains = {
        "one.example": (World.policy_text(mx=FIRST_MX), "a1", "postfix", FIRST_ANSWER),
        "two.example": (World.policy_text(mx=SECOND_MX), "b2", "postfix", SECOND_ANSWER),
        "three.example": (World.policy_text(mode="testing", mx=FIRST_MX), "c3", STRICT_PROFILE, FIRST_ANSWER),
    }
    config = world.config(
        cache_backend="sqlite",
        cache_path=str(tmp_path / "policies.sqlite"),
        profiles={STRICT_PROFILE: {"enforce_testing": True}},
    )
    first = await start_daemon(reactor, config)
    try:
        for domain, (text, policy_id, profile, expected) in domains.items():
            world.publish(domain, text, policy_id)
            assert await socketmap_query(first.socketmap_port, profile, domain.encode()) == expected
    finally:
        await first.stop()

    for domain in domains:
        world.dns.set_fault(f"_mta-sts.{domain}", "servfail")
        world.dns.remove(f"mta-sts.{domain}")
        world.https.set_host(f"mta-sts.{domain}", Hang())
    world.dns.queries.clear()
    fetched_before = sum(world.https.requests.values())

    second = await start_daemon(reactor, config)
    try:
        for domain, (_, _, profile, expected) in domains.items():
            assert await socketmap_query(second.socketmap_port, profile, domain.encode()) == expected
        assert await socketmap_query(second.socketmap_port, "postfix", b"three.example") == ("NOTFOUND", "")
    finally:
        await second.stop()
    assert world.dns.queries == []
    assert sum(world.https.requests.values()) == fetched_before
