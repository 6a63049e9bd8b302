"""A policy store in Redis, shared by a fleet of MTAs.

Layout under ``key_prefix``: ``entry:<domain>`` holds ``CacheEntry.to_json()``
with a TTL that ends when the entry does, so Redis expires policies itself
(an entry written already expired gets a short grace instead);
the sorted set ``used`` (score ``last_used``) orders :meth:`load`, and the
sorted set ``expires`` (score ``expires_at``) lets :meth:`prune` find what is
due without scanning. ``lease:<domain>`` holds the fleet member resolving a
domain. Every call is bounded by ``op_timeout`` and any failure to talk to
Redis becomes :class:`StoreUnavailable`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from zope.interface import implementer

from postfix_mtasts.asyncio_bridge import from_asyncio
from postfix_mtasts.cache import CacheEntry, IPolicyStore, StoreUnavailable
from postfix_mtasts.errors import one_line

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Default namespace of every key the store writes.
DEFAULT_KEY_PREFIX = "mtasts:"
#: Default bound, in seconds, on one call to Redis (connect included).
DEFAULT_OP_TIMEOUT = 2.0
#: Default Sentinel port when a sentinel is given as a bare host name.
SENTINEL_DEFAULT_PORT = 26379
#: Domains read per round trip by load() and removed per script run by prune().
BATCH_SIZE = 1000
#: Extra time load() may take per entry asked for, on top of op_timeout: warming
#: a full front (200,000 entries) takes seconds, not one operation's bound.
LOAD_SECONDS_PER_ENTRY = 1e-4
#: Keys per DEL while delete_all() empties the namespace.
DELETE_BATCH = 1000
#: Connections the client may keep open to Redis.
MAX_CONNECTIONS = 16
#: Seconds an entry already expired when written is kept, so that it reads
#: back and prunes like in every other backend, yet costs Redis no lasting memory.
EXPIRED_ENTRY_GRACE = 60

#: Take a lease, or extend it when ``holder`` has it already.
_ACQUIRE_LEASE = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if current then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return 1
"""

#: Drop a lease only while ``holder`` still has it.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: Remove up to ARGV[3] entries whose expires_at <= ARGV[1], with their index members.
_PRUNE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, domain in ipairs(due) do
  redis.call('DEL', ARGV[2] .. domain)
  redis.call('ZREM', KEYS[1], domain)
  redis.call('ZREM', KEYS[2], domain)
end
return #due
"""


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _sentinel_address(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` as a (host, port) pair."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not port:
        return host, SENTINEL_DEFAULT_PORT
    if not port.isdigit():
        raise ValueError(f"bad Redis sentinel address {text!r}: expected host:port")
    return host, int(port)


@implementer(IPolicyStore)
class RedisStore:
    """Policies in Redis (optionally found through Sentinel), one key per domain."""

    name = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        sentinels: Sequence[str] = (),
        sentinel_service: str = "",
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if sentinels and not sentinel_service:
            raise ValueError("Redis sentinels are set but sentinel_service is empty: name the master")
        self.url = url
        self.key_prefix = key_prefix
        self.sentinels = tuple(sentinels)
        self.sentinel_service = sentinel_service
        self.op_timeout = op_timeout
        self._clock = clock
        self._client: Any = None
        self._acquire: Any = None
        self._release: Any = None
        self._prune: Any = None
        self._used_key = f"{key_prefix}used"
        self._expires_key = f"{key_prefix}expires"

    # --- keys -----------------------------------------------------------------

    def entry_key(self, domain: str) -> str:
        """The Redis key holding ``domain``'s entry."""
        return f"{self.key_prefix}entry:{domain}"

    def lease_key(self, domain: str) -> str:
        """The Redis key holding ``domain``'s lease."""
        return f"{self.key_prefix}lease:{domain}"

    @property
    def where(self) -> str:
        """Where the store points, for error messages (no password)."""
        if self.sentinels:
            return f"sentinel {self.sentinel_service}@{','.join(self.sentinels)}"
        from redis.asyncio.connection import parse_url

        try:
            parts = parse_url(self.url)
        except ValueError:
            return "bad URL"
        if "path" in parts:
            return str(parts["path"])
        return f"{parts.get('host', 'localhost')}:{parts.get('port', 6379)}"

    # --- plumbing -------------------------------------------------------------

    def _make_client(self) -> Any:
        import redis.asyncio as aioredis
        from redis.asyncio.connection import BlockingConnectionPool, parse_url
        from redis.asyncio.retry import Retry
        from redis.asyncio.sentinel import Sentinel
        from redis.backoff import NoBackoff

        common: dict[str, Any] = {
            "socket_timeout": self.op_timeout,
            "socket_connect_timeout": self.op_timeout,
            "decode_responses": True,
            # One immediate retry replaces a pooled connection that died with
            # the server; anything longer is the caller's (ResilientStore's) job.
            "retry": Retry(NoBackoff(), 1),
        }
        if not self.sentinels:
            # A blocking pool makes a burst of calls wait for a free connection
            # (within op_timeout) instead of failing with "Too many connections".
            pool = BlockingConnectionPool.from_url(
                self.url, max_connections=MAX_CONNECTIONS, timeout=self.op_timeout, **common
            )
            return aioredis.Redis.from_pool(pool)
        try:
            parts: dict[str, Any] = dict(parse_url(self.url)) if self.url else {}
        except ValueError as e:
            raise ValueError(f"bad Redis URL {self.url!r}: {e}") from None
        for key in ("host", "port", "path", "connection_class"):
            parts.pop(key, None)
        addresses = [_sentinel_address(s) for s in self.sentinels]
        sentinel = Sentinel(
            addresses,
            sentinel_kwargs={
                "socket_timeout": self.op_timeout,
                "socket_connect_timeout": self.op_timeout,
            },
        )
        return sentinel.master_for(self.sentinel_service, **parts, **common)

    async def _run(
        self, what: str, operation: Callable[[], Coroutine[Any, Any, T]], timeout: float | None = None
    ) -> T:
        """Run ``operation`` on the asyncio loop within the timeout; failures become StoreUnavailable."""
        if self._client is None:
            raise StoreUnavailable(f"redis {self.where}: store is not open")
        from redis.exceptions import RedisError

        bound = self.op_timeout if timeout is None else timeout
        try:
            return await from_asyncio(operation(), bound)
        except TimeoutError:
            raise StoreUnavailable(f"redis {self.where}: {what} timed out after {bound:g}s") from None
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"redis {self.where}: {what} failed: {one_line(e)}") from None

    def _ttl_seconds(self, entry: CacheEntry) -> int:
        """Whole seconds, rounded up, until ``entry`` expires; a short grace if it has."""
        remaining = math.ceil(entry.expires_at - self._clock())
        return remaining if remaining > 0 else EXPIRED_ENTRY_GRACE

    def _queue_put(self, pipe: Any, entry: CacheEntry) -> None:
        ttl = self._ttl_seconds(entry)
        pipe.set(self.entry_key(entry.domain), entry.to_json(), ex=ttl)
        pipe.zadd(self._used_key, {entry.domain: entry.last_used})
        pipe.zadd(self._expires_key, {entry.domain: entry.expires_at})

    def _queue_delete(self, pipe: Any, domain: str) -> None:
        pipe.delete(self.entry_key(domain))
        pipe.zrem(self._used_key, domain)
        pipe.zrem(self._expires_key, domain)

    @staticmethod
    def _parse(domain: str, text: str | None) -> CacheEntry | None:
        if text is None:
            return None
        try:
            return CacheEntry.from_json(text)
        except ValueError as e:
            log.warning("redis: ignoring unreadable cache entry for %s: %s", domain, e)
            return None

    # --- IPolicyStore ---------------------------------------------------------

    async def open(self) -> None:
        """Connect and check that Redis answers."""
        if self._client is None:
            self._client = self._make_client()
            self._acquire = self._client.register_script(_ACQUIRE_LEASE)
            self._release = self._client.register_script(_RELEASE_LEASE)
            self._prune = self._client.register_script(_PRUNE)
        await self._run("ping", lambda: self._client.ping())

    async def load(self, limit: int) -> list[CacheEntry]:
        """Up to ``limit`` entries, most recently used first."""
        if limit <= 0:
            return []
        client = self._client

        async def operation() -> list[CacheEntry]:
            found: list[CacheEntry] = []
            start = 0
            while len(found) < limit:
                domains: list[str] = await client.zrevrange(self._used_key, start, start + BATCH_SIZE - 1)
                if not domains:
                    break
                start += len(domains)
                texts = await client.mget([self.entry_key(d) for d in domains])
                gone: list[str] = []
                for domain, text in zip(domains, texts, strict=True):
                    if text is None:
                        gone.append(domain)
                        continue
                    entry = self._parse(domain, text)
                    if entry is not None:
                        found.append(entry)
                        if len(found) == limit:
                            break
                if gone:
                    # Keys evicted or expired by Redis: drop their index members.
                    async with client.pipeline(transaction=True) as pipe:
                        for domain in gone:
                            pipe.zrem(self._used_key, domain)
                            pipe.zrem(self._expires_key, domain)
                        await pipe.execute()
                    start -= len(gone)
            return found

        return await self._run("load", operation, self.op_timeout + limit * LOAD_SECONDS_PER_ENTRY)

    async def get(self, domain: str) -> CacheEntry | None:
        """The stored entry for ``domain``, or None."""
        text = await self._run("get", lambda: self._client.get(self.entry_key(domain)))
        return self._parse(domain, text)

    async def put(self, entry: CacheEntry) -> None:
        """Store ``entry`` with a TTL ending when it does."""
        await self.put_many([entry])

    async def put_many(self, entries: list[CacheEntry]) -> None:
        """Store ``entries`` in one MULTI/EXEC transaction."""
        if not entries:
            return

        async def operation() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                for entry in entries:
                    self._queue_put(pipe, entry)
                await pipe.execute()

        await self._run("put", operation)

    async def delete(self, domain: str) -> None:
        """Forget ``domain``."""

        async def operation() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                self._queue_delete(pipe, domain)
                await pipe.execute()

        await self._run("delete", operation)

    async def delete_all(self) -> None:
        """Forget every entry under the prefix (leases expire by themselves)."""
        client = self._client
        pattern = _glob_escape(f"{self.key_prefix}entry:") + "*"

        async def operation() -> None:
            batch: list[str] = []
            async for key in client.scan_iter(match=pattern, count=DELETE_BATCH):
                batch.append(key)
                if len(batch) >= DELETE_BATCH:
                    await client.delete(*batch)
                    batch = []
            batch += [self._used_key, self._expires_key]
            await client.delete(*batch)

        await self._run("delete_all", operation)

    async def prune(self, now: float) -> int:
        """Delete entries whose ``expires_at`` is not after ``now``; return how many.

        Redis drops expired keys by itself; this also removes their members
        from the ``used`` and ``expires`` indexes.
        """

        async def operation() -> int:
            removed = 0
            while True:
                n = int(
                    await self._prune(
                        keys=[self._expires_key, self._used_key],
                        args=[repr(float(now)), f"{self.key_prefix}entry:", BATCH_SIZE],
                    )
                )
                removed += n
                if n < BATCH_SIZE:
                    return removed

        return await self._run("prune", operation)

    async def count(self) -> int:
        """Number of indexed entries (those Redis expired count until the next prune)."""
        return int(await self._run("count", lambda: self._client.zcard(self._used_key)))

    async def acquire_lease(self, domain: str, holder: str, ttl: float) -> bool:
        """Take ``domain``'s lease for ``ttl`` seconds unless another holder has it."""
        ttl_ms = max(1, math.ceil(ttl * 1000))
        result = await self._run(
            "acquire_lease",
            lambda: self._acquire(keys=[self.lease_key(domain)], args=[holder, ttl_ms]),
        )
        return bool(int(result))

    async def release_lease(self, domain: str, holder: str) -> None:
        """Drop ``domain``'s lease if ``holder`` still has it."""
        await self._run(
            "release_lease",
            lambda: self._release(keys=[self.lease_key(domain)], args=[holder]),
        )

    async def close(self) -> None:
        """Close the connections (writes are durable once their call returned)."""
        client, self._client = self._client, None
        if client is not None:
            try:
                await from_asyncio(client.aclose(), self.op_timeout)
            except Exception as e:  # closing a dead connection must not stop shutdown
                log.debug("redis: error while closing: %s", one_line(e))

    async def memory_usage(self, domain: str) -> int | None:
        """Bytes Redis uses for ``domain``'s entry key (``MEMORY USAGE``), for sizing."""
        result = await self._run(
            "memory usage",
            lambda: self._client.memory_usage(self.entry_key(domain), samples=0),
        )
        return None if result is None else int(result)
