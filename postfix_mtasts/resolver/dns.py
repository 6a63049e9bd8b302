"""DNS discovery: the ``_mta-sts`` TXT record (RFC 8461 §3.1) and the
addresses of a host, through dnspython's async resolver.

dnspython does the resolving; its sockets and timers are the reactor's, through
:class:`~postfix_mtasts.resolver.twisted_backend.TwistedBackend`, so any Twisted
reactor will do and cancelling the awaiting Deferred stops the query.
DNS outcomes are returned as values (TxtFound/TxtAbsent/TxtFailed), never raised.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.rrset
from dns.message import Message
from dns.rdtypes.ANY.SOA import SOA
from twisted.internet.defer import Deferred

from postfix_mtasts import limits
from postfix_mtasts.policy.txt import parse_sts_records
from postfix_mtasts.resolver import TxtAbsent, TxtFailed, TxtFound, TxtResult
from postfix_mtasts.resolver.twisted_backend import TwistedBackend, cancellable

#: Where the system's resolver configuration lives.
RESOLV_CONF = "/etc/resolv.conf"
#: Seconds one attempt at one nameserver may take; the whole query (with
#: retries and other nameservers) is bounded by the resolver's ``timeout``.
DNS_ATTEMPT_TIMEOUT = 2.0
#: EDNS0 UDP payload size we advertise (the DNS Flag Day 2020 value).
EDNS_PAYLOAD = 1232
#: The label the MTA-STS TXT record lives under.
STS_LABEL = "_mta-sts"
#: The port a nameserver without one listens on.
DNS_PORT = 53


class RecordLookupError(Exception):
    """A name has no records of the asked type (``absent`` is True) or DNS
    could not answer (``absent`` is False); ``reason`` is one line."""

    def __init__(self, reason: str, *, absent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.absent = absent


class AddressLookupError(Exception):
    """A host has no usable A or AAAA record; ``reason`` is one line that does
    not repeat the host name (callers say which host they were resolving)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_nameserver(text: str) -> tuple[str, int]:
    """Parse ``ADDRESS`` or ``ADDRESS:PORT`` (IPv6 with a port in brackets)
    into ``(address, port)``; a bad value raises ValueError with the fix."""
    value = text.strip()
    port_text: str | None = None
    if value.startswith("["):
        close = value.find("]")
        rest = value[close + 1 :] if close >= 0 else ""
        if close < 0 or (rest and not rest.startswith(":")):
            raise _bad_nameserver(text, "unbalanced brackets")
        host = value[1:close]
        port_text = rest[1:] if rest else None
        if ":" not in host:
            raise _bad_nameserver(text, "brackets are only for IPv6 addresses")
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host = value
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise _bad_nameserver(text, f"{host!r} is not an IP address") from None
    if port_text is None:
        return str(address), DNS_PORT
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad_nameserver(text, f"port {port_text!r} is not a number from 1 to 65535")
    return str(address), int(port_text)


class ParsedNameserver(Protocol):
    """A nameserver the configuration has already parsed (config.Nameserver)."""

    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...


#: A nameserver as text (``ADDRESS[:PORT]``) or already parsed.
NameserverSpec = str | ParsedNameserver


def do53_nameservers(nameservers: Sequence[NameserverSpec]) -> list[dns.nameserver.Do53Nameserver]:
    """dnspython's servers for ``nameservers``; text is parsed, parsed values are taken as they are."""
    servers = []
    for item in nameservers:
        address, port = parse_nameserver(item) if isinstance(item, str) else (item.address, item.port)
        servers.append(dns.nameserver.Do53Nameserver(address, port))
    return servers


def _bad_nameserver(text: str, why: str) -> ValueError:
    return ValueError(
        f"invalid nameserver {text!r}: {why}; write an IP address with an optional "
        "port, like 192.0.2.1, 192.0.2.1:5353, 2001:db8::1 or [2001:db8::1]:5353"
    )


def _display(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


_DO53 = re.compile(r"^Do53:(?P<address>.*)@(?P<port>\d+)$")


def _server_name(described: str | None) -> str:
    """``"127.0.0.1:5353"`` from dnspython's ``"Do53:127.0.0.1@5353"``."""
    if described is None:
        return "nameserver"
    match = _DO53.match(described)
    return _display(match["address"], int(match["port"])) if match else described


@dataclass(frozen=True, slots=True)
class _Positive:
    rrset: dns.rrset.RRset
    ttl: int


@dataclass(frozen=True, slots=True)
class _Negative:
    reason: str
    negative_ttl: int | None


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str


_Outcome = _Positive | _Negative | _Failure


def _negative_ttl(response: Message | None) -> int | None:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) from the authority section."""
    if response is None:
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
            soa = rrset[0]
            assert isinstance(soa, SOA)
            return int(min(rrset.ttl, soa.minimum))
    return None


class DnsResolver:
    """Looks up the MTA-STS TXT record and host addresses.

    Without ``nameservers`` it uses the system's resolv.conf; otherwise only
    the given ``ADDRESS[:PORT]`` servers. dnspython's cache stays off (the
    policy cache above decides what to remember); EDNS0 is on and truncated
    UDP answers are retried over TCP. Queries run on ``reactor``.
    """

    def __init__(
        self,
        nameservers: Sequence[NameserverSpec] = (),
        timeout: float = limits.DNS_TIMEOUT,
        *,
        reactor: Any,
        resolv_conf: str = RESOLV_CONF,
    ) -> None:
        self.timeout = float(timeout)
        self._backend = TwistedBackend(reactor)
        self._unconfigured: str | None = None
        resolver = dns.asyncresolver.Resolver(configure=False)
        if nameservers:
            resolver.nameservers = do53_nameservers(nameservers)
        else:
            try:
                resolver.read_resolv_conf(resolv_conf)
            except dns.resolver.NoResolverConfiguration as error:
                self._unconfigured = f"no DNS nameservers configured ({resolv_conf}: {error})"
        resolver.cache = None
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        resolver.retry_servfail = False
        resolver.timeout = min(DNS_ATTEMPT_TIMEOUT, timeout)
        resolver.lifetime = timeout
        self._resolver = resolver

    async def lookup_sts(self, domain: str) -> TxtResult:
        """Query TXT ``_mta-sts.<domain>`` and judge it by RFC 8461 §3.1.

        The TTL of a found record is the smallest TTL along its CNAME chain.
        """
        try:
            qname = dns.name.from_text(f"{STS_LABEL}.{domain.rstrip('.')}.")
        except (dns.exception.DNSException, UnicodeError) as error:
            return TxtAbsent(f"invalid domain name {domain!r}: {error}")
        outcome = await self._query(qname, dns.rdatatype.TXT)
        if isinstance(outcome, _Failure):
            return TxtFailed(outcome.reason)
        if isinstance(outcome, _Negative):
            return TxtAbsent(outcome.reason, negative_ttl=outcome.negative_ttl)
        records = [b"".join(rdata.strings) for rdata in outcome.rrset]
        parsed = parse_sts_records(records)
        if parsed.policy_id is None:
            return TxtAbsent(parsed.reason, negative_ttl=outcome.ttl)
        return TxtFound(policy_id=parsed.policy_id, ttl=outcome.ttl, record=parsed.record)

    async def addresses(self, host: str) -> list[str]:
        """The IPv4 then IPv6 addresses of ``host`` (A and AAAA queried at once);
        AddressLookupError with one line when there are none."""
        try:
            qname = dns.name.from_text(f"{host.rstrip('.')}.")
        except (dns.exception.DNSException, UnicodeError) as error:
            raise AddressLookupError(f"invalid host name {host!r}: {error}") from None
        queries = [
            Deferred.fromCoroutine(self._query(qname, rdtype))
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        ]
        try:
            outcomes = [await query for query in queries]
        finally:
            for query in queries:
                query.cancel()  # no-op for the ones that already fired
        found = [
            rdata.address for outcome in outcomes if isinstance(outcome, _Positive) for rdata in outcome.rrset
        ]
        if found:
            return found
        failures = [
            f"{rdtype}: {outcome.reason}"
            for rdtype, outcome in zip(("A", "AAAA"), outcomes, strict=True)
            if isinstance(outcome, _Failure)
        ]
        if failures:
            raise AddressLookupError("; ".join(failures))
        if any(isinstance(o, _Negative) and o.reason == "NXDOMAIN" for o in outcomes):
            raise AddressLookupError("NXDOMAIN")
        raise AddressLookupError("no A or AAAA record")

    async def txt_records(self, name: str) -> list[bytes]:
        """The TXT records at ``name``, each with its character-strings joined;
        RecordLookupError when there are none or DNS fails (for ``check``'s
        reading of ``_mta-sts`` and ``_smtp._tls`` records as published)."""
        outcome = await self._query(_record_name(name), dns.rdatatype.TXT)
        return [b"".join(rdata.strings) for rdata in _records(outcome)]

    async def mx_hosts(self, domain: str) -> list[tuple[int, str]]:
        """The MX records of ``domain`` as ``(preference, host)``, lowest
        preference first, hosts lower-cased without the final dot (a null MX,
        RFC 7505, is ``(0, "")``); RecordLookupError when none or DNS fails."""
        outcome = await self._query(_record_name(domain), dns.rdatatype.MX)
        found = [(int(rdata.preference), _host_text(rdata.exchange)) for rdata in _records(outcome)]
        return sorted(found)

    async def _query(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Outcome:
        """One question, CNAMEs followed, every DNS outcome as a value."""
        if self._unconfigured is not None:
            return _Failure(self._unconfigured)
        try:
            answer = await cancellable(
                self._resolver.resolve(
                    qname, rdtype, raise_on_no_answer=False, search=False, backend=self._backend
                )
            )
        except dns.resolver.NXDOMAIN as error:
            responses: dict[dns.name.Name, Message] = error.kwargs.get("responses", {})
            return _Negative("NXDOMAIN", _negative_ttl(responses.get(qname)))
        except dns.exception.Timeout:
            return _Failure(f"DNS timeout after {self.timeout}s")
        except dns.resolver.NoNameservers as error:
            return _Failure(_describe_errors(error.kwargs.get("errors", [])))
        except dns.exception.DNSException as error:
            return _Failure(f"DNS error: {error}")
        except OSError as error:
            return _Failure(f"DNS network error: {error}")
        if answer.rrset is None:
            return _Negative(
                f"no {dns.rdatatype.to_text(rdtype)} record",
                _negative_ttl(answer.response),
            )
        return _Positive(answer.rrset, int(answer.chaining_result.minimum_ttl))


def _record_name(name: str) -> dns.name.Name:
    try:
        return dns.name.from_text(f"{name.rstrip('.')}.")
    except (dns.exception.DNSException, UnicodeError) as error:
        raise RecordLookupError(f"invalid name {name!r}: {error}", absent=True) from None


def _host_text(name: dns.name.Name) -> str:
    """``mx.example.com`` for ``mx.example.com.``; the root (a null MX) is ``""``."""
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


def _records(outcome: _Outcome) -> dns.rrset.RRset:
    """The RRset of a positive outcome; RecordLookupError for the others."""
    if isinstance(outcome, _Failure):
        raise RecordLookupError(outcome.reason, absent=False)
    if isinstance(outcome, _Negative):
        raise RecordLookupError(outcome.reason, absent=True)
    return outcome.rrset


def _describe_errors(errors: Sequence[tuple[Any, ...]]) -> str:
    """One line from dnspython's per-server error list."""
    parts: list[str] = []
    for server, _tcp, _port, problem, _response in errors:
        where = _server_name(server)
        if isinstance(problem, str):
            part = f"{problem} from {where}"
        else:
            part = f"{where}: {type(problem).__name__}: {problem}".rstrip(": ")
        if part not in parts:
            parts.append(part)
    return "; ".join(parts) or "no DNS nameserver answered"
