"""RedisStore against the store contract and a real Redis on 127.0.0.1.

Every test works under its own random key prefix and deletes its keys after.
``MTASTS_TEST_REDIS_URL`` points the tests at another server.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from twisted.internet import reactor as global_reactor
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol, ServerFactory

from postfix_mtasts.cache import StoreUnavailable
from postfix_mtasts.cache.redis import (
    EXPIRED_ENTRY_GRACE,
    RedisStore,
    _sentinel_address,
)
from tests.conftest import require
from tests.store_contract import (
    DAY,
    NOW,
    PolicyStore,
    StoreContract,
    StoreFactory,
    async_yield_fixture,
    ensure_deferred,
    fetched,
    negative,
)

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("MTASTS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_WHAT = f"Redis at {REDIS_URL}"
#: How long a test waits for Redis to expire a short lease (a bound, not an assertion).
EXPIRY_WAIT = 10.0


def redis_reachable(url: str = REDIS_URL) -> bool:
    """True when a Redis server answers PING at ``url``."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def sync_client() -> Any:
    """A blocking client for looking behind the store's back."""
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_timeout=5, decode_responses=True)


def new_prefix() -> str:
    return f"mtasts-test-{secrets.token_hex(6)}:"


def drop_prefix(prefix: str) -> None:
    """Delete every key a test wrote under ``prefix``."""
    client = sync_client()
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


async def sleep(seconds: float) -> None:
    await task.deferLater(global_reactor, seconds, lambda: None)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after EXPIRY_WAIT."""
    deadline = time.monotonic() + EXPIRY_WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {EXPIRY_WAIT}s")
        await sleep(0.05)


class RedisFactory(StoreFactory):
    """Stores on one key prefix of the test Redis; their clock is the contract's NOW."""

    shared = True

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    async def _create(self) -> PolicyStore:
        return RedisStore(REDIS_URL, key_prefix=self.prefix, op_timeout=5.0, clock=lambda: NOW)


@pytest.fixture
def redis_server() -> None:
    """Skip (under CI: fail) without a Redis server. A plain fixture: a skip
    raised inside pytest-twisted's async fixture breaks the next test's set-up
    instead of skipping it."""
    require(REDIS_WHAT, redis_reachable())


@async_yield_fixture
async def store_factory(redis_server: None) -> AsyncIterator[StoreFactory]:
    factory = RedisFactory(new_prefix())
    try:
        yield factory
    finally:
        await factory.close_all()
        drop_prefix(factory.prefix)


@async_yield_fixture
async def prefix(redis_server: None) -> AsyncIterator[str]:
    chosen = new_prefix()
    try:
        yield chosen
    finally:
        drop_prefix(chosen)


class TestRedisStore(StoreContract):
    pass


@ensure_deferred
async def test_key_ttl_ends_with_the_entry(prefix: str) -> None:
    store = RedisStore(REDIS_URL, key_prefix=prefix)
    await store.open()
    try:
        now = time.time()
        await store.put(fetched("example.com", expires_at=now + 3600.2, last_used=now))
        client = sync_client()
        ttl = client.ttl(f"{prefix}entry:example.com")
        # Rounded up from 3600.2 s, less what elapsed since (well under a minute).
        assert 3541 <= ttl <= 3601
        assert client.zscore(f"{prefix}used", "example.com") == now
        assert client.zscore(f"{prefix}expires", "example.com") == now + 3600.2

        # An entry written already expired is kept only for the short grace.
        await store.put(negative("example.com", expires_at=now - 5))
        assert 0 < client.ttl(f"{prefix}entry:example.com") <= EXPIRED_ENTRY_GRACE
        client.close()
    finally:
        await store.close()


@ensure_deferred
async def test_prune_clears_index_of_keys_redis_expired(prefix: str) -> None:
    store = RedisStore(REDIS_URL, key_prefix=prefix, clock=lambda: NOW)
    await store.open()
    try:
        await store.put_many([fetched("gone.example", expires_at=NOW + 60), fetched("kept.example")])
        client = sync_client()
        client.pexpire(f"{prefix}entry:gone.example", 1)
        await wait_until(lambda: not client.exists(f"{prefix}entry:gone.example"), "key expiry")
        # The index still counts it until prune runs.
        assert await store.count() == 2
        assert await store.prune(NOW + 60) == 1
        assert await store.count() == 1
        assert client.zrange(f"{prefix}used", 0, -1) == ["kept.example"]
        assert client.zrange(f"{prefix}expires", 0, -1) == ["kept.example"]
        client.close()
    finally:
        await store.close()


@ensure_deferred
async def test_load_repairs_index_of_evicted_keys(prefix: str) -> None:
    store = RedisStore(REDIS_URL, key_prefix=prefix, clock=lambda: NOW)
    await store.open()
    try:
        await store.put_many([fetched(f"d{i}.example", last_used=NOW + i) for i in range(5)])
        client = sync_client()
        client.delete(f"{prefix}entry:d4.example", f"{prefix}entry:d2.example")
        loaded = await store.load(3)
        assert [e.domain for e in loaded] == ["d3.example", "d1.example", "d0.example"]
        assert await store.count() == 3
        client.close()
    finally:
        await store.close()


@ensure_deferred
async def test_two_stores_see_each_others_writes(prefix: str) -> None:
    first = RedisStore(REDIS_URL, key_prefix=prefix, clock=lambda: NOW)
    second = RedisStore(REDIS_URL, key_prefix=prefix, clock=lambda: NOW)
    await first.open()
    await second.open()
    try:
        entry = fetched("shared.example")
        await first.put(entry)
        assert await second.get("shared.example") == entry
        await second.delete("shared.example")
        assert await first.get("shared.example") is None
        assert await first.count() == 0
    finally:
        await first.close()
        await second.close()


@ensure_deferred
async def test_lease_exclusive_between_holders_and_expiring(prefix: str) -> None:
    first = RedisStore(REDIS_URL, key_prefix=prefix)
    second = RedisStore(REDIS_URL, key_prefix=prefix)
    await first.open()
    await second.open()
    try:
        assert await first.acquire_lease("example.com", "daemon-a", 0.3) is True
        assert await second.acquire_lease("example.com", "daemon-b", 30.0) is False
        # Releasing someone else's lease does nothing.
        await second.release_lease("example.com", "daemon-b")
        assert await second.acquire_lease("example.com", "daemon-b", 30.0) is False

        client = sync_client()
        await wait_until(lambda: not client.exists(f"{prefix}lease:example.com"), "lease expiry")
        assert await second.acquire_lease("example.com", "daemon-b", 30.0) is True
        assert await first.acquire_lease("example.com", "daemon-a", 30.0) is False
        # The holder may extend its own lease.
        assert await second.acquire_lease("example.com", "daemon-b", 60.0) is True
        assert client.pttl(f"{prefix}lease:example.com") > 30_000
        client.close()
    finally:
        await first.close()
        await second.close()


def free_port() -> int:
    """A loopback port that nothing listens on (just released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@ensure_deferred
async def test_unreachable_server_is_unavailable() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", key_prefix=new_prefix(), op_timeout=2.0)
    with pytest.raises(StoreUnavailable) as caught:
        await store.open()
    message = str(caught.value)
    assert message.startswith("redis 127.0.0.1:") and "ping failed" in message
    assert "\n" not in message
    await store.close()


class _Silent(Protocol):
    """Accepts a connection and never answers: a hung server."""


class _SilentFactory(ServerFactory):
    protocol = _Silent


@ensure_deferred
async def test_hung_server_times_out() -> None:
    port = global_reactor.listenTCP(0, _SilentFactory(), interface="127.0.0.1")
    try:
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        store = RedisStore(f"redis://127.0.0.1:{address.port}/0", op_timeout=0.3)
        with pytest.raises(StoreUnavailable, match=r"ping timed out after 0\.3s"):
            await store.open()
        await store.close()
    finally:
        stopped = port.stopListening()
        if stopped is not None:
            await stopped


@ensure_deferred
async def test_memory_per_fetched_policy(prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Size a typical FETCHED entry (three mx patterns) with MEMORY USAGE."""
    store = RedisStore(REDIS_URL, key_prefix=prefix, clock=lambda: NOW)
    await store.open()
    try:
        entry = fetched("a-typical-domain.example", expires_at=NOW + 7 * DAY)
        await store.put(entry)
        usage = await store.memory_usage(entry.domain)
        assert usage is not None and usage > len(entry.to_json())
        with capsys.disabled():
            print(f"\nredis MEMORY USAGE of one FETCHED entry key: {usage} bytes")
    finally:
        await store.close()


def test_sentinel_addresses() -> None:
    assert _sentinel_address("10.0.0.1:26380") == ("10.0.0.1", 26380)
    assert _sentinel_address("sentinel.example") == ("sentinel.example", 26379)
    assert _sentinel_address("[::1]:26381") == ("::1", 26381)
    assert _sentinel_address("::1") == ("::1", 26379)
    with pytest.raises(ValueError, match="host:port"):
        _sentinel_address("host:port")


def test_sentinel_needs_a_service_name() -> None:
    with pytest.raises(ValueError, match="sentinel_service"):
        RedisStore("redis://", sentinels=["127.0.0.1:26379"])


@pytest.fixture
def sentinel_port(tmp_path: Any) -> Iterator[int]:
    """A real Redis Sentinel on 127.0.0.1 watching the test Redis as master ``mtasts-test``."""
    import shutil
    import subprocess

    import redis
    from redis.asyncio.connection import parse_url

    require(REDIS_WHAT, redis_reachable())
    server = shutil.which("redis-server")
    require("redis-server (to run a Sentinel)", server is not None)
    assert server is not None
    target = parse_url(REDIS_URL)
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor {SENTINEL_SERVICE} {target.get('host', '127.0.0.1')} "
        f"{target.get('port', 6379)} 1\n"
    )
    process = subprocess.Popen(
        [server, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + EXPIRY_WAIT
        while True:
            try:
                if client.sentinel_master(SENTINEL_SERVICE):
                    break
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail("redis-server --sentinel did not start")
            time.sleep(0.05)
        client.close()
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


SENTINEL_SERVICE = "mtasts-test"


@ensure_deferred
async def test_store_found_through_sentinel(sentinel_port: int, prefix: str) -> None:
    from redis.asyncio.connection import parse_url

    db = parse_url(REDIS_URL).get("db", 0)
    store = RedisStore(
        f"redis:///{db}",
        key_prefix=prefix,
        sentinels=[f"127.0.0.1:{sentinel_port}"],
        sentinel_service=SENTINEL_SERVICE,
        clock=lambda: NOW,
    )
    await store.open()
    try:
        assert store.where == f"sentinel {SENTINEL_SERVICE}@127.0.0.1:{sentinel_port}"
        entry = fetched("via-sentinel.example")
        await store.put(entry)
        assert await store.get("via-sentinel.example") == entry
        client = sync_client()
        assert client.exists(f"{prefix}entry:via-sentinel.example") == 1
        client.close()
    finally:
        await store.close()
