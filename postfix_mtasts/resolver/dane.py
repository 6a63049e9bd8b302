"""DANE for SMTP (RFC 7672) taking precedence over MTA-STS (RFC 8461 §2).

For a domain with an MTA-STS policy, ask a trusted DNSSEC-validating resolver
for the MX hosts and their ``_25._tcp`` TLSA records. Only answers that
resolver marked authenticated (the AD bit, asked for with the DO bit) count.
Every MX host with usable TLSA records gives ``dane-only``, some of them
``dane``; a SERVFAIL from the validating resolver is a DNSSEC failure and
answers TEMP rather than falling back to MTA-STS, which an attacker who can
break DNSSEC answers could otherwise force. Results are kept in memory for the
DNS TTLs; they are cheap to find again after a restart.

The queries are dnspython's, on the reactor through
:class:`~postfix_mtasts.resolver.twisted_backend.TwistedBackend`, so any
Twisted reactor will do.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from postfix_mtasts import limits
from postfix_mtasts.policy.model import Answer, AnswerKind
from postfix_mtasts.resolver.dns import EDNS_PAYLOAD, NameserverSpec, do53_nameservers
from postfix_mtasts.resolver.twisted_backend import TwistedBackend, cancellable

log = logging.getLogger("postfix_mtasts.dane")

#: Postfix's security levels for mandatory and opportunistic DANE.
DANE_ONLY_LEVEL = "dane-only"
DANE_LEVEL = "dane"
#: The TLSA owner prefix for SMTP to an MX host (RFC 7672 §2.2).
SMTP_TLSA_PREFIX = "_25._tcp"
#: TLSA usages RFC 7672 §3.1 lets SMTP use: DANE-TA(2) and DANE-EE(3);
#: PKIX-TA(0) and PKIX-EE(1) are "unusable" for SMTP.
USABLE_USAGES = frozenset({2, 3})
#: Selectors (full certificate, SubjectPublicKeyInfo) and matching types
#: (exact, SHA-256, SHA-512) that Postfix implements.
USABLE_SELECTORS = frozenset({0, 1})
USABLE_MATCHING_TYPES = frozenset({0, 1, 2})
#: More MX hosts than this are not checked (answer: MTA-STS stands), so one
#: domain cannot make us send a flood of TLSA queries.
MAX_MX_HOSTS = 16
#: Bounds on how long a DANE result is kept, whatever the DNS TTLs say.
DANE_TTL_MIN = 5.0
DANE_TTL_MAX = 86_400.0
#: How long a DNS or DNSSEC failure is kept before asking again.
DANE_FAILURE_RETRY = 30.0
#: Kept when the answers carry no TTL (no MX RRset at all).
DANE_NEGATIVE_TTL = 300.0


class DaneStatus(enum.Enum):
    """What DNSSEC says about a domain's MX hosts."""

    #: Every MX host has usable, authenticated TLSA records: ``dane-only``.
    ALL = "all"
    #: Some MX hosts do: ``dane`` (Postfix uses TLSA where present).
    SOME = "some"
    #: None do, or the MX RRset is not signed: the MTA-STS answer stands.
    NONE = "none"
    #: The validating resolver failed to validate (SERVFAIL): TEMP.
    BOGUS = "bogus"
    #: The resolver did not answer (timeout, refused): TEMP.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DaneResult:
    """The DANE status of one domain, why, and how long it holds (seconds)."""

    status: DaneStatus
    reason: str
    ttl: float


def dane_precedence(answer: Answer, result: DaneResult) -> Answer:
    """The answer for a domain whose MTA-STS answer is ``answer``.

    DANE takes precedence over MTA-STS (RFC 8461 §2): never ``secure`` where
    TLSA records are proven; a DNSSEC failure is a temporary failure.
    """
    if answer.kind is not AnswerKind.OK:
        return answer
    if result.status is DaneStatus.ALL:
        return Answer.ok(DANE_ONLY_LEVEL)
    if result.status is DaneStatus.SOME:
        return Answer.ok(DANE_LEVEL)
    if result.status is DaneStatus.NONE:
        return answer
    return Answer.temp(f"DANE check failed: {result.reason}")


class _Bogus(Exception):
    """The validating resolver answered SERVFAIL: DNSSEC validation failed."""


class _Unanswered(Exception):
    """No answer at all (timeout, network error, REFUSED)."""


@dataclass(frozen=True, slots=True)
class _Reply:
    """One validated-or-not answer: its records (empty: none), AD bit and TTL."""

    records: tuple[object, ...]
    authenticated: bool
    ttl: float | None


class DaneResolver:
    """Asks one trusted validating resolver (with the DO bit) about MX and TLSA, on ``reactor``."""

    def __init__(
        self, nameservers: Sequence[NameserverSpec], timeout: float = limits.DNS_TIMEOUT, *, reactor: Any
    ) -> None:
        if not nameservers:
            raise ValueError("DANE needs the address of a DNSSEC-validating resolver")
        self.timeout = float(timeout)
        self._backend = TwistedBackend(reactor)
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = do53_nameservers(nameservers)
        resolver.cache = None
        resolver.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        resolver.retry_servfail = False
        resolver.timeout = min(2.0, self.timeout)
        resolver.lifetime = self.timeout
        self._resolver = resolver

    async def check(self, domain: str) -> DaneResult:
        """The DANE status of ``domain`` (an A-label, no final dot)."""
        try:
            return await self._check(domain)
        except _Bogus as error:
            return DaneResult(DaneStatus.BOGUS, str(error), DANE_FAILURE_RETRY)
        except _Unanswered as error:
            return DaneResult(DaneStatus.FAILED, str(error), DANE_FAILURE_RETRY)

    async def _check(self, domain: str) -> DaneResult:
        mx = await self._ask(f"{domain}.", dns.rdatatype.MX)
        if not mx.records:
            return DaneResult(DaneStatus.NONE, f"no MX records for {domain}", _ttl(mx.ttl))
        if not mx.authenticated:
            return DaneResult(DaneStatus.NONE, f"MX of {domain} not DNSSEC-validated", _ttl(mx.ttl))
        hosts: list[str] = []
        for rdata in mx.records:
            exchange: dns.name.Name = rdata.exchange  # type: ignore[attr-defined]
            host = exchange.to_text(omit_final_dot=True).lower()
            if host and host not in hosts:
                hosts.append(host)
        if not hosts:
            return DaneResult(DaneStatus.NONE, f"{domain} has a null MX", _ttl(mx.ttl))
        if len(hosts) > MAX_MX_HOSTS:
            return DaneResult(DaneStatus.NONE, f"{domain} has more than {MAX_MX_HOSTS} MX hosts; "
                                               "TLSA not checked", _ttl(mx.ttl))
        queries = [Deferred.fromCoroutine(self._ask(f"{SMTP_TLSA_PREFIX}.{host}.", dns.rdatatype.TLSA))
                   for host in hosts]
        try:
            replies = [await query for query in queries]
        finally:
            for query in queries:
                query.cancel()  # the others, once one failed
        ttls = [t for t in [mx.ttl, *(r.ttl for r in replies)] if t is not None]
        ttl = _ttl(min(ttls) if ttls else None)
        with_tlsa = [host for host, reply in zip(hosts, replies, strict=True) if _usable(reply)]
        if len(with_tlsa) == len(hosts):
            return DaneResult(DaneStatus.ALL, f"usable TLSA for every MX host ({', '.join(hosts)})", ttl)
        if with_tlsa:
            return DaneResult(DaneStatus.SOME, f"usable TLSA for {', '.join(with_tlsa)} only", ttl)
        return DaneResult(DaneStatus.NONE, "no MX host has usable DNSSEC-validated TLSA records", ttl)

    async def _ask(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Reply:
        qname = dns.name.from_text(name)
        what = f"{dns.rdatatype.to_text(rdtype)} {name.rstrip('.')}"
        try:
            answer = await cancellable(
                self._resolver.resolve(
                    qname, rdtype, raise_on_no_answer=False, search=False, backend=self._backend
                )
            )
        except dns.resolver.NXDOMAIN as error:
            responses: dict[dns.name.Name, dns.message.Message] = error.kwargs.get("responses", {})
            response = responses.get(qname)
            secure = response is not None and bool(response.flags & dns.flags.AD)
            return _Reply((), secure, None)
        except dns.resolver.NoNameservers as error:
            problems = [problem for _s, _t, _p, problem, _r in error.kwargs.get("errors", [])]
            if "SERVFAIL" in problems:
                raise _Bogus(f"{what}: SERVFAIL from the validating resolver (DNSSEC bogus?)") from None
            raise _Unanswered(f"{what}: {', '.join(map(str, problems)) or 'no answer'}") from None
        except dns.exception.Timeout:
            raise _Unanswered(f"{what}: timeout after {self.timeout:g}s") from None
        except (dns.exception.DNSException, OSError) as error:
            raise _Unanswered(f"{what}: {error}") from None
        authenticated = bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is None:
            return _Reply((), authenticated, None)
        return _Reply(tuple(answer.rrset), authenticated, float(answer.chaining_result.minimum_ttl))


def _usable(reply: _Reply) -> bool:
    """Authenticated TLSA records of which at least one Postfix can use."""
    return reply.authenticated and any(
        getattr(r, "usage", None) in USABLE_USAGES
        and getattr(r, "selector", None) in USABLE_SELECTORS
        and getattr(r, "mtype", None) in USABLE_MATCHING_TYPES
        for r in reply.records
    )


def _ttl(ttl: float | None) -> float:
    if ttl is None:
        return DANE_NEGATIVE_TTL
    return min(max(ttl, DANE_TTL_MIN), DANE_TTL_MAX)


class DaneCache:
    """DANE results by domain, in memory, each until its TTL runs out.

    One check per domain runs at a time; every lookup asking meanwhile shares
    it. ``check`` is the resolver's coroutine function (a fake in unit tests).
    """

    def __init__(
        self,
        clock: IReactorTime,
        check: Callable[[str], Coroutine[Any, Any, DaneResult]],
        max_entries: int = limits.MEMORY_ENTRIES,
    ) -> None:
        self.clock = clock
        self._check = check
        self.max_entries = max_entries
        self._results: dict[str, tuple[float, DaneResult]] = {}
        self._inflight: dict[str, Deferred[DaneResult]] = {}

    def cached(self, domain: str) -> DaneResult | None:
        """The result for ``domain`` while it holds, else None (no I/O)."""
        kept = self._results.get(domain)
        if kept is None:
            return None
        expires_at, result = kept
        if self.clock.seconds() >= expires_at:
            del self._results[domain]
            return None
        return result

    async def get(self, domain: str) -> DaneResult:
        """The result for ``domain``, checking DNS when none holds."""
        result = self.cached(domain)
        if result is not None:
            return result
        shared = self._inflight.get(domain)
        if shared is None:
            shared = Deferred.fromCoroutine(self._run(domain))
            if not shared.called:
                self._inflight[domain] = shared
        # A waiter per caller: one caller's timeout must not cancel the
        # check the others share.
        waiter: Deferred[DaneResult] = Deferred()

        def relay(outcome: DaneResult) -> DaneResult:
            waiter.callback(outcome)
            return outcome

        shared.addCallback(relay)
        return await waiter

    async def _run(self, domain: str) -> DaneResult:
        try:
            result = await self._check(domain)
        except Exception as error:  # a bug, not a DNS outcome: still answer
            log.exception("%s: DANE check failed unexpectedly", domain)
            result = DaneResult(DaneStatus.FAILED, f"internal error: {error}", DANE_FAILURE_RETRY)
        finally:
            self._inflight.pop(domain, None)
        if len(self._results) >= self.max_entries:
            self._results.pop(next(iter(self._results)))
        self._results[domain] = (self.clock.seconds() + result.ttl, result)
        log.info("%s: DANE %s (%s; kept %gs)", domain, result.status.value, result.reason, result.ttl)
        return result
