"""The admin control socket and the ``postfix-mtasts ctl`` client.

A unix socket (never TCP): file permissions decide who may look into and
change the cache. The protocol is one JSON object per line each way, so it is
easy to script (``socat - UNIX-CONNECT:/run/postfix-mtasts/control.sock``)::

    → {"command": "show", "domain": "example.com"}
    ← {"ok": true, "result": {...}}
    ← {"ok": false, "error": "example.com is not in the cache"}

Commands: ``list``, ``show`` (``domain``), ``refresh`` and ``flush``
(``domain``, or ``"all": true``), ``stats``, ``reload``. Requests on one
connection are answered in order.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from postfix_mtasts.cache import CacheEntry, StoreUnavailable
from postfix_mtasts.errors import ReloadRefused
from postfix_mtasts.lookup import PolicyLookup
from postfix_mtasts.policy.nexthop import BracketedNextHop, Resolve, classify_key

log = logging.getLogger("postfix_mtasts.control")

#: Longest request line the daemon reads; a longer one closes the connection.
MAX_REQUEST = 64 * 1024
#: Name of the socket inside its directory.
SOCKET_NAME = "control.sock"
#: The daemon's runtime directory when it runs as root.
SYSTEM_RUNTIME_DIRECTORY = "/run/postfix-mtasts"
#: How long ``ctl`` waits for an answer: a refresh runs DNS and an HTTPS fetch.
CLIENT_TIMEOUT = 300.0
#: The one-line hint for an admin whose daemon is not running.
START_HINT = "start it with systemctl start postfix-mtasts"

COMMANDS = ("list", "show", "refresh", "flush", "stats", "reload")


def default_socket_path(environ: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """Where the daemon puts its control socket when ``[control] socket`` is empty.

    ``$RUNTIME_DIRECTORY`` (systemd's RuntimeDirectory=) first, then
    /run/postfix-mtasts for root, then ``$XDG_RUNTIME_DIR/postfix-mtasts``,
    then /tmp/postfix-mtasts-UID.
    """
    env = os.environ if environ is None else environ
    uid = os.geteuid() if euid is None else euid
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime.startswith("/"):
        return os.path.join(runtime, SOCKET_NAME)
    if uid == 0:
        return os.path.join(SYSTEM_RUNTIME_DIRECTORY, SOCKET_NAME)
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg.startswith("/"):
        return os.path.join(xdg, "postfix-mtasts", SOCKET_NAME)
    return f"/tmp/postfix-mtasts-{uid}/{SOCKET_NAME}"


def client_socket_path(environ: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """The socket ``ctl`` talks to without --socket or a configured path.

    An admin's shell lacks the service's environment: the path this user's
    own daemon would use if that exists, else the system one if that exists,
    else the former (for the error message).
    """
    own = default_socket_path(environ, euid)
    system = os.path.join(SYSTEM_RUNTIME_DIRECTORY, SOCKET_NAME)
    for candidate in (own, system):
        if os.path.exists(candidate):
            return candidate
    return own


# --- the daemon side --------------------------------------------------------------


class ControlError(Exception):
    """A request that cannot be carried out; ``str(e)`` is the one-line answer."""


class ControlBackend(Protocol):
    """What the control socket needs of the running service."""

    @property
    def lookup(self) -> PolicyLookup: ...

    def extra_stats(self) -> dict[str, Any]: ...

    async def reload(self) -> str: ...


def iso(when: float) -> str | None:
    """A UTC time as ``2026-01-31T12:00:00Z``; None for "never" (0)."""
    if not when:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def entry_summary(entry: CacheEntry, now: float) -> dict[str, Any]:
    """The fields ``ctl list`` shows for one cached domain."""
    policy = entry.policy
    return {
        "domain": entry.domain,
        "source": entry.source.value,
        "mode": policy.mode.value if policy is not None else None,
        "policy_id": entry.policy_id or None,
        "fetched": iso(entry.fetched_at),
        "expires": iso(entry.expires_at),
        "in_force": entry.in_force(now),
    }


def entry_details(entry: CacheEntry, now: float) -> dict[str, Any]:
    """Everything ``ctl show`` tells about one cached domain."""
    policy = entry.policy
    details = entry_summary(entry, now)
    details.update(
        {
            "max_age": policy.max_age if policy is not None else None,
            "mx": list(policy.mx) if policy is not None else [],
            "checked": iso(entry.checked_at),
            "last_used": iso(entry.last_used),
            "failure": entry.failure or None,
            "failed_id": entry.failed_id or None,
            "retry_at": iso(entry.retry_at),
            "policy_text": entry.policy_text,
        }
    )
    return details


class ControlHandler:
    """Carries out one decoded request against the running service."""

    def __init__(self, backend: ControlBackend) -> None:
        self.backend = backend

    async def handle(self, request: object) -> dict[str, Any]:
        try:
            return {"ok": True, "result": await self._dispatch(request)}
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        except StoreUnavailable as e:
            return {"ok": False, "error": f"cache store unavailable: {e}"}
        except Exception as e:
            log.exception("control request %r failed", request)
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}

    async def _dispatch(self, request: object) -> Any:
        if not isinstance(request, dict):
            raise ControlError('a request is a JSON object like {"command": "stats"}')
        command = request.get("command")
        if command not in COMMANDS:
            raise ControlError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
        lookup = self.backend.lookup
        now = lookup.reactor.seconds()
        if command == "list":
            entries = sorted(lookup.front.entries(), key=lambda e: e.domain)
            return [entry_summary(entry, now) for entry in entries]
        if command == "stats":
            return {**lookup.stats.snapshot(), **self.backend.extra_stats()}
        if command == "reload":
            try:
                return await self.backend.reload()
            except ReloadRefused as e:
                raise ControlError(f"reload refused: {e}") from e
        everything = request.get("all") is True
        if command == "refresh" and everything:
            return await self._refresh_all(lookup)
        if command == "flush" and everything:
            return {"flushed": await lookup.flush(None)}
        domain = _domain(request.get("domain"))
        if command == "show":
            entry = lookup.front.peek(domain) or await lookup.store.get(domain)
            if entry is None:
                raise ControlError(f"unknown domain: {domain} is not in the cache "
                                   f"(postfix-mtasts ctl refresh {domain} looks it up)")
            return {**entry_details(entry, now), "trace": list(lookup.last_trace(domain))}
        if command == "refresh":
            resolution = await lookup.refresh(domain)
            return [{"domain": domain, "result": resolution.why}]
        # flush
        known = domain in lookup.front or await lookup.store.get(domain) is not None
        if not known:
            raise ControlError(f"unknown domain: {domain} is not in the cache")
        await lookup.flush(domain)
        return {"flushed": 1}

    async def _refresh_all(self, lookup: PolicyLookup) -> list[dict[str, str]]:
        """Refresh every cached domain, at most refresh_concurrency at a time."""
        limit = DeferredSemaphore(max(1, lookup.settings.policy.refresh_concurrency))
        domains = sorted(entry.domain for entry in lookup.front.entries())

        async def one(domain: str) -> dict[str, str]:
            await limit.acquire()
            try:
                resolution = await lookup.refresh(domain)
                return {"domain": domain, "result": resolution.why}
            except Exception as e:
                return {"domain": domain, "result": f"failed: {e}"}
            finally:
                limit.release()

        running = [Deferred.fromCoroutine(one(domain)) for domain in domains]
        return [await d for d in running]


def _domain(value: object) -> str:
    """The policy domain (A-labels, lower case) an admin typed."""
    if not isinstance(value, str) or not value:
        raise ControlError('this command needs a domain (or "all": true)')
    decision = classify_key(value.encode("utf-8", "surrogateescape"), BracketedNextHop.HOST)
    if not isinstance(decision, Resolve):
        raise ControlError(f"not a mail domain: {value!r} ({decision.reason})")
    return decision.domain


class ControlProtocol(LineOnlyReceiver):
    """One JSON request per line in, one JSON answer per line out, in order."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(self, handler: ControlHandler) -> None:
        self.handler = handler
        self._last: Deferred[None] = succeed(None)

    def lineReceived(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line.strip():
            return
        try:
            request: object = json.loads(line)
        except ValueError as e:
            self._reply_after(succeed({"ok": False, "error": f"not a JSON request: {e}"}))
            return
        self._reply_after(Deferred.fromCoroutine(self.handler.handle(request)))

    def _reply_after(self, answer: Deferred[dict[str, Any]]) -> None:
        previous = self._last
        done: Deferred[None] = Deferred()

        def send(reply: dict[str, Any]) -> None:
            def write(_: object) -> None:
                if self.transport is not None:
                    self.sendLine(  # type: ignore[no-untyped-call]
                        json.dumps(reply, separators=(",", ":")).encode("utf-8")
                    )
                done.callback(None)

            previous.addCallback(write)

        answer.addCallback(send)
        self._last = done

    def lineLengthExceeded(self, line: bytes) -> None:
        error = {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
        self.sendLine(json.dumps(error).encode())  # type: ignore[no-untyped-call]
        if self.transport is not None:
            self.transport.loseConnection()


class ControlFactory(Factory):
    noisy = False

    def __init__(self, backend: ControlBackend) -> None:
        self.handler = ControlHandler(backend)

    def buildProtocol(self, addr: IAddress | None) -> ControlProtocol:
        protocol = ControlProtocol(self.handler)
        protocol.factory = self
        return protocol


# --- the client (``postfix-mtasts ctl``) -----------------------------------------------


class ControlUnavailable(Exception):
    """``ctl`` cannot talk to the daemon; ``str(e)`` is one line for the admin."""


def call(path: str, request: Mapping[str, Any], timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """Send one request to the daemon at ``path`` and return its decoded answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlUnavailable(f"no daemon listening on {path}: {START_HINT}") from None
        except PermissionError:
            raise ControlUnavailable(
                f"permission denied on {path}: run as root or a member of the socket's group"
            ) from None
        except OSError as e:
            if e.errno == errno.ENOTSOCK or e.errno == errno.ENOTDIR:
                raise ControlUnavailable(f"no daemon listening on {path}: {START_HINT}") from None
            raise ControlUnavailable(f"cannot connect to {path}: {e.strerror or e}") from None
        try:
            sock.sendall(json.dumps(dict(request)).encode("utf-8") + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlUnavailable(f"the daemon on {path} closed the connection without answering")
                data += chunk
        except TimeoutError:
            raise ControlUnavailable(f"no answer from the daemon on {path} within {timeout:g}s") from None
        except OSError as e:
            raise ControlUnavailable(f"lost the connection to {path}: {e.strerror or e}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlUnavailable(f"the daemon on {path} answered something that is not JSON") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlUnavailable(f"the daemon on {path} answered an unexpected {type(reply).__name__}")
    return reply


# --- how ``ctl`` prints answers ---------------------------------------------------------

LIST_COLUMNS = (
    ("DOMAIN", "domain"),
    ("SOURCE", "source"),
    ("MODE", "mode"),
    ("POLICY ID", "policy_id"),
    ("FETCHED", "fetched"),
    ("EXPIRES", "expires"),
)


def format_list(entries: list[dict[str, Any]]) -> str:
    """Cached domains as a table whose columns line up."""
    rows = [[header for header, _ in LIST_COLUMNS]]
    for entry in entries:
        rows.append([_cell(entry.get(key)) for _, key in LIST_COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(LIST_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def format_show(details: dict[str, Any]) -> str:
    fields = [
        ("domain", details.get("domain")),
        ("source", details.get("source")),
        ("mode", details.get("mode")),
        ("policy id", details.get("policy_id")),
        ("max_age", details.get("max_age")),
        ("mx", ", ".join(details.get("mx") or []) or None),
        ("fetched", details.get("fetched")),
        ("checked", details.get("checked")),
        ("expires", _expires(details)),
        ("last used", details.get("last_used")),
        ("failure", details.get("failure")),
        ("failed id", details.get("failed_id")),
        ("retry at", details.get("retry_at")),
    ]
    lines = [f"{name + ':':<11}{_cell(value)}" for name, value in fields]
    text = details.get("policy_text") or ""
    lines.append("policy:" if text else "policy:    -")
    lines.extend(f"  {line}" for line in text.splitlines())
    trace = details.get("trace") or []
    lines.append("last resolution:" if trace else "last resolution: - (none since the daemon started)")
    lines.extend(f"  {step}" for step in trace)
    return "\n".join(lines)


def format_stats(stats: dict[str, Any]) -> str:
    answers = stats.get("answers") or {}
    ratio = stats.get("hit_ratio")
    latency = stats.get("latency") or {}
    failures = stats.get("fetch_failures") or {}
    cached = stats.get("cached") or {}
    profiles = stats.get("profiles") or {}
    lines = [
        ("uptime", f"{_duration(stats.get('uptime', 0.0))}"),
        ("lookups", f"{stats.get('lookups', 0)}{_counts(answers)}"),
    ]
    for profile, counts in sorted(profiles.items()):
        lines.append((f"  {profile}", f"{sum(counts.values())}{_counts(counts)}"))
    lines += [
        ("cache hits", (f"{ratio * 100:.1f}%" if ratio is not None else "-")
         + f" (memory {stats.get('cache_hits', 0)}, store {stats.get('store_hits', 0)},"
         f" misses {stats.get('misses', 0)}, not looked up {stats.get('skipped', 0)})"),
        ("dns queries", str(stats.get("dns_queries", 0))),
        ("fetches", f"{stats.get('fetches', 0)}, failed {sum(failures.values())}{_counts(failures)}"),
        ("latency", ", ".join(f"{name} {_seconds(value)}" for name, value in latency.items()) or "-"),
        ("cached", f"{sum(cached.values())}{_counts(cached)}"),
        ("refreshing", str(stats.get("refresh_queue", 0))),
        ("connections", str(stats.get("connections", 0))),
    ]
    return "\n".join(f"{name + ':':<14}{value}" for name, value in lines)


def format_results(results: list[dict[str, str]]) -> str:
    return "\n".join(f"{item['domain']}: {item['result']}" for item in results)


def _expires(details: Mapping[str, Any]) -> str | None:
    expires = details.get("expires")
    if not expires:
        return None
    return f"{expires}" + ("" if details.get("in_force") else " (expired)")


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _counts(counts: Mapping[str, int]) -> str:
    shown = [f"{name} {count}" for name, count in sorted(counts.items()) if count]
    return f" ({', '.join(shown)})" if shown else ""


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "> 100s"
    if value < 1:
        return f"<= {value * 1000:g}ms"
    return f"<= {value:g}s"


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text
