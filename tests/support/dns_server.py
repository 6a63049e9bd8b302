"""A small authoritative DNS server on loopback for integration tests.

It answers over UDP and TCP on one port from a zone the test edits between
lookups, can misbehave on request (SERVFAIL, REFUSED, silence, truncation) and
records every question it receives, so tests can count DNS traffic.

Usage::

    server = await DnsServer.start(reactor)
    server.set_txt("_mta-sts.example.com", b"v=STSv1; id=1;")
    resolver = DnsResolver([server.nameserver])
    ...
    await server.stop()

Names are case-insensitive and may be given with or without the final dot.
The server is authoritative for every name: a name never set answers NXDOMAIN,
a set name without the asked type answers NODATA; both carry the SOA (owner
``.``, TTL ``soa_ttl``, MINIMUM ``soa_minimum``) in the authority section.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.TXT
import dns.rrset
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IReactorTCP,
    IReactorUDP,
)
from twisted.internet.protocol import (
    DatagramProtocol,
    Factory,
    Protocol,
    connectionDone,
)
from twisted.python.failure import Failure

#: The address the server listens on unless told another.
LOOPBACK = "127.0.0.1"
#: TTL of records set without an explicit one.
DEFAULT_TTL = 300
#: Default SOA TTL and MINIMUM (the negative-caching TTL is the smaller one).
DEFAULT_SOA_TTL = 3600
DEFAULT_SOA_MINIMUM = 600
#: Largest UDP answer to a query without EDNS (RFC 1035 §4.2.1).
CLASSIC_UDP_LIMIT = 512
#: Largest DNS message over TCP (RFC 1035 §4.2.2: a two-byte length).
TCP_LIMIT = 65_535
#: Longest CNAME chain the server follows inside its own zone.
MAX_CNAME_CHAIN = 8
#: Attempts at finding a port number free for both UDP and TCP.
PORT_ATTEMPTS = 20

#: The misbehaviours :meth:`DnsServer.set_fault` accepts.
FAULTS = frozenset({"servfail", "refused", "drop", "truncate"})

TxtStrings = bytes | str | Sequence[bytes | str]

_IN = dns.rdataclass.IN


def _name(text: str | dns.name.Name) -> dns.name.Name:
    if isinstance(text, dns.name.Name):
        return text if text.is_absolute() else text.concatenate(dns.name.root)
    return dns.name.from_text(text)


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else value


class DnsServer:
    """The zone, the faults and the query log; see the module docstring."""

    def __init__(self) -> None:
        self.soa_ttl = DEFAULT_SOA_TTL
        self.soa_minimum = DEFAULT_SOA_MINIMUM
        #: ``(qname, rdtype)`` per question received, in arrival order; qname
        #: lower-cased without the final dot, rdtype as text (``"TXT"``).
        #: A UDP question retried over TCP appears twice.
        self.queries: list[tuple[str, str]] = []
        self.interface = LOOPBACK
        self.port = 0
        self._zone: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
        self._faults: dict[dns.name.Name, str] = {}
        # Twisted's interfaces do not type-check without the mypy-zope plugin,
        # so the reactor and its ports are Any here (checked at run time).
        self._udp: Any = None
        self._tcp: Any = None
        self._connections: set[_DnsStreamProtocol] = set()

    @classmethod
    async def start(cls, reactor: Any, *, interface: str = LOOPBACK, port: int = 0) -> DnsServer:
        """Listen on UDP and TCP ``interface`` on ``port``, or on one free port
        (0) of ``reactor`` (which must provide IReactorUDP and IReactorTCP).
        A fixed port serves clients that cannot be told one, such as the
        system's resolver (port 53, which needs root)."""
        if not (IReactorUDP.providedBy(reactor) and IReactorTCP.providedBy(reactor)):
            raise TypeError(f"{reactor!r} provides no UDP and TCP listening")
        server = cls()
        server.interface = interface
        await server._listen(reactor, port)
        return server

    @property
    def nameserver(self) -> str:
        """``"ADDRESS:PORT"``, as DnsResolver and the config take it."""
        return f"{self.interface}:{self.port}"

    # --- the zone ---------------------------------------------------------

    def set_txt(self, name: str, *records: TxtStrings, ttl: int = DEFAULT_TTL) -> None:
        """Replace ``name``'s TXT RRset; each record is one string or several
        character-strings (which a resolver joins)."""
        if not records:
            raise ValueError("set_txt needs at least one record; use remove()")
        rdatas: list[dns.rdata.Rdata] = []
        for record in records:
            strings = [record] if isinstance(record, bytes | str) else list(record)
            rdatas.append(dns.rdtypes.ANY.TXT.TXT(_IN, dns.rdatatype.TXT, [_as_bytes(s) for s in strings]))
        self._put(name, dns.rdatatype.TXT, rdatas, ttl)

    def set_cname(self, name: str, target: str, ttl: int = DEFAULT_TTL) -> None:
        """Make ``name`` an alias of ``target``, dropping its other records."""
        self._zone.pop(_name(name), None)
        rdata = dns.rdata.from_text(_IN, dns.rdatatype.CNAME, _name(target).to_text())
        self._put(name, dns.rdatatype.CNAME, [rdata], ttl)

    def set_a(self, name: str, *ips: str, ttl: int = DEFAULT_TTL) -> None:
        """Replace ``name``'s A RRset."""
        rdatas: list[dns.rdata.Rdata] = [dns.rdata.from_text(_IN, dns.rdatatype.A, ip) for ip in ips]
        self._put(name, dns.rdatatype.A, rdatas, ttl)

    def set_aaaa(self, name: str, *ips: str, ttl: int = DEFAULT_TTL) -> None:
        """Replace ``name``'s AAAA RRset."""
        rdatas: list[dns.rdata.Rdata] = [dns.rdata.from_text(_IN, dns.rdatatype.AAAA, ip) for ip in ips]
        self._put(name, dns.rdatatype.AAAA, rdatas, ttl)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Forget ``name`` (then NXDOMAIN) or only its ``rdtype`` records
        (then NODATA while other types remain)."""
        owner = _name(name)
        if rdtype is None:
            self._zone.pop(owner, None)
            return
        node = self._zone.get(owner)
        if node is not None:
            node.pop(dns.rdatatype.from_text(rdtype), None)

    def set_fault(self, name: str, fault: str | None) -> None:
        """Misbehave for questions about exactly ``name``: "servfail",
        "refused", "drop" (never answer), "truncate" (UDP answers are
        truncated, so the client retries over TCP); None heals it."""
        owner = _name(name)
        if fault is None:
            self._faults.pop(owner, None)
            return
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose one of {sorted(FAULTS)}")
        self._faults[owner] = fault

    def count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """How many questions arrived, optionally only about ``name``/``rdtype``."""
        wanted_name = None if name is None else _name(name).to_text(omit_final_dot=True).lower()
        return sum(
            1
            for qname, qtype in self.queries
            if (wanted_name is None or qname == wanted_name) and (rdtype is None or qtype == rdtype.upper())
        )

    def _put(
        self,
        name: str,
        rdtype: dns.rdatatype.RdataType,
        rdatas: Sequence[dns.rdata.Rdata],
        ttl: int,
    ) -> None:
        owner = _name(name)
        node = self._zone.setdefault(owner, {})
        if rdtype != dns.rdatatype.CNAME:
            node.pop(dns.rdatatype.CNAME, None)
        rrset = dns.rrset.RRset(owner, _IN, rdtype)
        for rdata in rdatas:
            rrset.add(rdata, ttl)
        node[rdtype] = rrset

    # --- answering --------------------------------------------------------

    def fault_for(self, query: dns.message.Message) -> str | None:
        """The fault configured for the query's name, if any."""
        if len(query.question) != 1:
            return None
        return self._faults.get(query.question[0].name)

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """Build the response to ``query``; None means stay silent."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        self.queries.append(
            (
                question.name.to_text(omit_final_dot=True).lower(),
                dns.rdatatype.to_text(question.rdtype),
            )
        )
        fault = self._faults.get(question.name)
        if fault == "drop":
            return None
        if fault == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if fault == "refused":
            response.set_rcode(dns.rcode.REFUSED)
            return response
        if question.rdclass != _IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        self._resolve(question.name, question.rdtype, response)
        return response

    def _resolve(
        self,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        response: dns.message.Message,
    ) -> None:
        name = qname
        for _ in range(MAX_CNAME_CHAIN):
            node = self._zone.get(name)
            if node is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(self._soa())
                return
            if rdtype in node:
                response.answer.append(node[rdtype])
                return
            alias = node.get(dns.rdatatype.CNAME)
            if alias is None:
                response.authority.append(self._soa())
                return
            response.answer.append(alias)
            name = cast(dns.rdtypes.ANY.CNAME.CNAME, alias[0]).target
        # A chain longer than we follow: answer what we have, as servers do.

    def _soa(self) -> dns.rrset.RRset:
        soa = dns.rdata.from_text(
            _IN,
            dns.rdatatype.SOA,
            f"ns.test. hostmaster.test. 1 3600 600 86400 {self.soa_minimum}",
        )
        rrset = dns.rrset.RRset(dns.name.root, _IN, dns.rdatatype.SOA)
        rrset.add(soa, self.soa_ttl)
        return rrset

    def udp_reply(self, wire: bytes) -> bytes | None:
        """Answer one UDP datagram; truncate when asked to or when too big."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = self.answer(query)
        if response is None:
            return None
        limit = max(CLASSIC_UDP_LIMIT, query.payload) if query.edns >= 0 else CLASSIC_UDP_LIMIT
        if self.fault_for(query) != "truncate":
            try:
                return response.to_wire(max_size=limit)
            except dns.exception.TooBig:
                pass
        truncated = dns.message.make_response(query)
        truncated.flags |= dns.flags.AA | dns.flags.TC
        return truncated.to_wire()

    def tcp_reply(self, wire: bytes) -> bytes | None:
        """Answer one TCP message (without its length prefix)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = self.answer(query)
        return None if response is None else response.to_wire(max_size=TCP_LIMIT)

    # --- listening --------------------------------------------------------

    async def _listen(self, reactor: Any, wanted: int) -> None:
        last_error: CannotListenError | None = None
        for _ in range(1 if wanted else PORT_ATTEMPTS):
            udp = reactor.listenUDP(wanted, _DnsDatagramProtocol(self), interface=self.interface)
            port: int = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, _DnsStreamFactory(self), interface=self.interface)
            except CannotListenError as error:
                last_error = error
                await stop_listening(udp)
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise RuntimeError(f"no port free for both UDP and TCP on {self.interface}: {last_error}")

    async def stop(self) -> None:
        """Close both listeners and every open TCP connection."""
        for listener in (self._udp, self._tcp):
            if listener is not None:
                await stop_listening(listener)
        self._udp = self._tcp = None
        closing = [connection.closed for connection in self._connections]
        for connection in list(self._connections):
            transport: Any = connection.transport
            if transport is not None:
                transport.abortConnection()
        for closed in closing:
            await closed


async def stop_listening(listener: Any) -> None:
    """Stop a Twisted listening port, waiting for it when it says to."""
    result = listener.stopListening()
    if isinstance(result, Deferred):
        await result


class _DnsDatagramProtocol(DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.udp_reply(datagram)
        transport: Any = self.transport
        if reply is not None and transport is not None:
            transport.write(reply, addr)


_LENGTH = struct.Struct("!H")


class _DnsStreamProtocol(Protocol):
    """DNS over TCP: each message behind a two-byte length (RFC 1035 §4.2.2)."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.buffer = b""
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.server._connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self.buffer)
            end = _LENGTH.size + length
            if len(self.buffer) < end:
                return
            message, self.buffer = self.buffer[_LENGTH.size : end], self.buffer[end:]
            reply = self.server.tcp_reply(message)
            transport: Any = self.transport
            if reply is not None and transport is not None:
                transport.write(_LENGTH.pack(len(reply)) + reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server._connections.discard(self)
        self.closed.callback(None)


class _DnsStreamFactory(Factory):
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def buildProtocol(self, addr: IAddress | None) -> _DnsStreamProtocol:
        return _DnsStreamProtocol(self.server)
