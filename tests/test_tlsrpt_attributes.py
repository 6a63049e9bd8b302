"""Postfix 3.10 TLSRPT attributes and policy_failure answers, through a real
lookup, responder and both protocols (fakes only for DNS and HTTPS).

Every reply is read back with a parser written after Postfix's own rules
(smtp_tls_policy.c splits on blanks and commas outside braces; extpar strips
one brace pair and the blanks inside it; split_nameval cuts at the first
"="), so "Postfix would accept it" is checked, not assumed.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from postfix_mtasts import limits
from postfix_mtasts.answers import entry_answer
from postfix_mtasts.cache import CacheEntry, Source
from postfix_mtasts.cache.memory import MemoryStore
from postfix_mtasts.codec import socketmap, tcptable
from postfix_mtasts.config import PolicyConfig, Profile
from postfix_mtasts.lookup import LookupSettings, PolicyLookup
from postfix_mtasts.policy.model import Answer, AnswerKind
from postfix_mtasts.policy.policyfile import parse_policy
from postfix_mtasts.policy.tlsrpt import (
    POLICY_STRING_MAX,
    AnswerOptions,
    policy_strings,
    unsafe_reason,
)
from postfix_mtasts.protocol import SocketmapProtocol, TcpTableProtocol
from postfix_mtasts.resolver import FailureCategory, FetchFailed, FetchOK, TxtAbsent
from postfix_mtasts.responder import Responder
from tests.fakes import FakeFetcher, FakeTxtResolver, opened, txt

T0 = 1_700_000_000.0
DOMAIN = "example.com"
RFC_POLICY = (
    "version: STSv1\n"
    "mode: enforce\n"
    "mx: mail.example.com\n"
    "mx: *.example.net\n"
    "mx: backupmx.example.com\n"
    "max_age: 604800\n"
)
RFC_ANSWER = (
    "secure match=.example.net:backupmx.example.com:mail.example.com servername=hostname"
    " policy_type=sts policy_domain=example.com"
    " mx_host_pattern=mail.example.com mx_host_pattern=*.example.net mx_host_pattern=backupmx.example.com"
    " { policy_string = version: STSv1 } { policy_string = mode: enforce }"
    " { policy_string = mx: mail.example.com } { policy_string = mx: *.example.net }"
    " { policy_string = mx: backupmx.example.com } { policy_string = max_age: 604800 }"
)
PROFILES = {
    "postfix": Profile(),
    "report": Profile(tlsrpt=True),
    "failures": Profile(tlsrpt_policy_failure=True),
    "both": Profile(enforce_testing=True, tlsrpt=True, tlsrpt_policy_failure=True),
}


# --- Postfix's parser, as a test oracle -----------------------------------------

SEPARATORS = " \t\r\n,"
BLANKS = " \t\r\n"
LEVELS = {"none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify", "secure"}
ONCE = {"servername", "policy_type", "policy_domain", "policy_failure", "policy_ttl"}
MANY = {"match", "mx_host_pattern", "policy_string"}
FAILURES = {"sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid", "validation-failure"}


class PostfixRejects(ValueError):
    """What Postfix would log as a malformed policy (and then defer the mail)."""


def postfix_tokens(text: str) -> list[str]:
    """mystrtokq: blanks and commas separate, except inside balanced braces."""
    tokens: list[str] = []
    i = 0
    while i < len(text):
        if text[i] in SEPARATORS:
            i += 1
            continue
        start, depth = i, 0
        while i < len(text) and (depth or text[i] not in SEPARATORS):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth < 0:
                raise PostfixRejects(f"unbalanced '}}' in {text[start:i + 1]!r}")
            i += 1
        if depth:
            raise PostfixRejects(f"unbalanced '{{' in {text[start:i]!r}")
        tokens.append(text[start:i])
    return tokens


def split_nameval(token: str) -> tuple[str, str]:
    """extpar (for a braced token) then split_nameval."""
    if token.startswith("{"):
        if not token.endswith("}"):
            raise PostfixRejects(f"text after '}}' in {token!r}")
        token = token[1:-1].strip(BLANKS)
    text = token.lstrip(BLANKS)
    name_match = re.match(r"[^\s=]+", text)
    if name_match is None:
        raise PostfixRejects(f"missing attribute name in {token!r}")
    name = name_match.group()
    rest = text[len(name):].lstrip(BLANKS)
    if not rest.startswith("="):
        raise PostfixRejects(f"missing '=' after attribute name in {token!r}")
    return name, rest[1:].strip(BLANKS)


def parse_postfix_policy(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The security level and the attributes, or PostfixRejects."""
    tokens = postfix_tokens(text)
    if not tokens or tokens[0] not in LEVELS:
        raise PostfixRejects(f"invalid security level in {text[:40]!r}")
    attributes = [split_nameval(token) for token in tokens[1:]]
    names = [name for name, _ in attributes]
    for name, value in attributes:
        if name not in ONCE | MANY:
            raise PostfixRejects(f"invalid attribute name {name!r}")
        if name in ONCE and names.count(name) > 1:
            raise PostfixRejects(f"attribute {name!r} is specified multiple times")
        if not value:
            raise PostfixRejects(f"attribute {name!r} has empty value")
        if name == "policy_type" and value not in {"sts", "no-policy-found"}:
            raise PostfixRejects(f"bad policy_type {value!r}")
        if name == "policy_failure" and value not in FAILURES:
            raise PostfixRejects(f"bad policy_failure {value!r}")
    sts_only = {"policy_domain", "mx_host_pattern", "policy_string", "policy_failure"}
    if sts_only & set(names) and ("policy_type", "sts") not in attributes:
        raise PostfixRejects("STS attributes without policy_type=sts")
    return tokens[0], attributes


def test_the_oracle_rejects_what_postfix_rejects() -> None:
    for bad in ("secure { policy_string = a{b }", "secure { policy_string = a } }", "secure policy_string",
                "secure policy_type=dane", "secure policy_failure=oops policy_type=sts",
                "secure mx_host_pattern=a.example", "securest match=a"):
        with pytest.raises(PostfixRejects):
            parse_postfix_policy(bad)
    level, attributes = parse_postfix_policy(
        "secure ,match=a:b,{ policy_string =  x = y , z  } policy_type=sts"
    )
    assert level == "secure"
    assert attributes == [("match", "a:b"), ("policy_string", "x = y , z"), ("policy_type", "sts")]


# --- a real lookup and responder, with scripted DNS and HTTPS --------------------


class Rig:
    """PolicyLookup + Responder on a Clock; protocols on StringTransports."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.dns = FakeTxtResolver()
        self.https = FakeFetcher()
        settings = LookupSettings(PolicyConfig(recheck_interval=10.0**9))
        self.lookup = PolicyLookup(self.clock, self.dns, self.https, opened(MemoryStore()), settings)
        self.responder = Responder(self.lookup, PROFILES)

    def publish(self, domain: str, body: str, policy_id: str = "1") -> None:
        self.dns.set_id(domain, policy_id)
        self.https.set(domain, FetchOK(policy=parse_policy(body.encode()), text=body))

    def socketmap(self, profile: str, domain: str = DOMAIN) -> tuple[str, str]:
        protocol = SocketmapProtocol(self.responder, clock=self.clock)
        transport = _transport(protocol)
        protocol.dataReceived(socketmap.encode_request(profile, domain.encode()))
        replies = socketmap.SocketmapReplyDecoder().feed(transport.value())  # type: ignore[no-untyped-call]
        assert len(replies) == 1
        return replies[0]

    def tcp_table(self, profile: str, domain: str = DOMAIN) -> tuple[int, str, bytes]:
        protocol = TcpTableProtocol(self.responder, profile=profile, clock=self.clock)
        transport = _transport(protocol)
        protocol.dataReceived(tcptable.encode_request(domain.encode()))
        raw: bytes = transport.value()  # type: ignore[no-untyped-call]
        replies = tcptable.TcpTableReplyDecoder().feed(raw)
        assert len(replies) == 1
        return replies[0][0], replies[0][1], raw


def _transport(protocol: Any) -> StringTransport:
    transport = StringTransport()  # type: ignore[no-untyped-call]
    protocol.makeConnection(transport)
    return transport


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_rfc_example_exact_reply_on_both_protocols(rig: Rig) -> None:
    rig.publish(DOMAIN, RFC_POLICY)
    assert rig.socketmap("report") == ("OK", RFC_ANSWER)
    code, text, raw = rig.tcp_table("report")
    assert (code, text) == (200, RFC_ANSWER)
    assert raw == b"200 " + tcptable.quote(RFC_ANSWER.encode()) + b"\n"
    # Without the switch, the answer is what it always was.
    assert rig.socketmap("postfix") == (
        "OK", "secure match=.example.net:backupmx.example.com:mail.example.com servername=hostname"
    )


def test_reply_round_trips_through_postfix_rules(rig: Rig) -> None:
    rig.publish(DOMAIN, RFC_POLICY)
    level, attributes = parse_postfix_policy(rig.socketmap("report")[1])
    assert level == "secure"
    assert attributes == [
        ("match", ".example.net:backupmx.example.com:mail.example.com"),
        ("servername", "hostname"),
        ("policy_type", "sts"),
        ("policy_domain", "example.com"),
        ("mx_host_pattern", "mail.example.com"),
        ("mx_host_pattern", "*.example.net"),
        ("mx_host_pattern", "backupmx.example.com"),
        *(("policy_string", line) for line in RFC_POLICY.splitlines()),
    ]


def test_many_mx_lines_keep_published_order(rig: Rig) -> None:
    patterns = [f"mx{n:02d}.example.{'org' if n % 2 else 'net'}" for n in range(40, 0, -1)]
    mx_lines = "".join(f"mx: {p}\r\n" for p in patterns)
    body = "version: STSv1\r\nmode: testing\r\n" + mx_lines + "max_age: 86400\r\n"
    rig.publish(DOMAIN, body)
    # testing mode: only a profile that enforces testing gets an OK answer.
    assert rig.socketmap("report") == ("NOTFOUND", "")
    level, attributes = parse_postfix_policy(rig.socketmap("both")[1])
    assert level == "secure"
    assert [v for n, v in attributes if n == "mx_host_pattern"] == patterns
    assert [v for n, v in attributes if n == "policy_string"] == [
        line.rstrip("\r") for line in body.split("\n") if line
    ]
    assert [v for n, v in attributes if n == "match"] == [":".join(sorted(patterns))]


def test_hostile_policy_lines_are_left_out_and_logged(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    long_line = "x_long: " + "y" * POLICY_STRING_MAX
    body = (
        "version: STSv1\n"
        "mode: enforce\n"
        "ext1: a{b\n"
        "ext2: }\n"
        "ext3: policy_string = injected } { policy_failure = sts-policy-invalid\n"
        "ext4: key=value, with = signs\n"
        "mx: mail.example.com\n"
        f"{long_line}\n"
        "max_age: 86400\n"
    )
    rig.publish(DOMAIN, body)
    with caplog.at_level(logging.INFO, logger="postfix_mtasts.lookup"):
        answer = rig.socketmap("report")[1]
    _, attributes = parse_postfix_policy(answer)
    assert [v for n, v in attributes if n == "policy_string"] == [
        "version: STSv1",
        "mode: enforce",
        "ext4: key=value, with = signs",
        "mx: mail.example.com",
        "max_age: 86400",
    ]
    assert ("policy_failure", "sts-policy-invalid") not in attributes
    omitted = [m for m in caplog.messages if "left out of the TLSRPT attributes" in m]
    assert omitted == [
        "example.com: left out of the TLSRPT attributes: "
        "line 3 contains '{', which Postfix's policy parser would misread; "
        "line 4 contains '}', which Postfix's policy parser would misread; "
        "line 5 contains '}', which Postfix's policy parser would misread; "
        f"line 8 is longer than {POLICY_STRING_MAX} characters"
    ]
    # Answered from memory afterwards: the precomputed answer, no new log line.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="postfix_mtasts.lookup"):
        assert rig.socketmap("report")[1] == answer
    assert not [r for r in caplog.records if "left out" in r.getMessage()]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("a\rb", "contains control character \\x0d,"),
        ("a\nb", "contains control character \\x0a,"),
        ("a\x7fb", "contains control character \\x7f,"),
        ("", "is empty"),
        ("y" * (POLICY_STRING_MAX + 1), f"is longer than {POLICY_STRING_MAX} characters"),
    ],
)
def test_unsafe_values(value: str, reason: str) -> None:
    found = unsafe_reason(value)
    assert found is not None and found.startswith(reason)


def test_policy_strings_keep_tabs_and_unicode_and_skip_blank_lines() -> None:
    strings = policy_strings("version: STSv1\r\n\r\n   \nnote:\tcafé ok\n")
    assert strings.lines == ("version: STSv1", "note:\tcafé ok") and strings.omitted == ()
    assert parse_postfix_policy("secure policy_type=sts { policy_string = note:\tcafé ok }")[1][1] == (
        "policy_string", "note:\tcafé ok"
    )


# --- size limits -------------------------------------------------------------------


def _label_host(n: int) -> str:
    """A valid 241-character MX host name, distinct per ``n``."""
    return f"m{n:03d}" + "a" * 56 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 40 + ".example.com"


def test_tcp_table_drops_policy_strings_first(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    extensions = "".join(f"ext{n}: {'z' * 900}\n" for n in range(5))
    body = "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 86400\n"
    body += extensions
    rig.publish(DOMAIN, body)
    full = rig.socketmap("report")[1]
    essential = (
        "secure match=.example.net:mail.example.com servername=hostname policy_type=sts"
        " policy_domain=example.com mx_host_pattern=mail.example.com mx_host_pattern=*.example.net"
    )
    assert full.startswith(essential + " { policy_string = version: STSv1 }")
    assert len(tcptable.quote(full.encode())) + 5 > limits.TCP_TABLE_MAX_LINE
    with caplog.at_level(logging.INFO, logger="postfix_mtasts.protocol"):
        code, text, raw = rig.tcp_table("report")
    assert (code, text) == (200, essential)
    assert len(raw) <= limits.TCP_TABLE_MAX_LINE
    assert any("sent without policy_string" in r.getMessage() for r in caplog.records)


def test_socketmap_drops_policy_strings_and_tcp_table_answers_temp(rig: Rig) -> None:
    hosts = [_label_host(n) for n in range(110)]
    extensions = "".join(f"ext{n}: {'z' * 950}\n" for n in range(36))
    mx_lines = "".join(f"mx: {h}\n" for h in hosts)
    body = "version: STSv1\nmode: enforce\n" + mx_lines + "max_age: 86400\n" + extensions
    assert len(body) <= limits.POLICY_BODY_LIMIT
    rig.publish(DOMAIN, body)
    status, text = rig.socketmap("report")
    assert status == "OK"
    _, attributes = parse_postfix_policy(text)
    assert [v for n, v in attributes if n == "match"] == [":".join(sorted(hosts))]  # whole, never cut
    assert [v for n, v in attributes if n == "mx_host_pattern"] == hosts
    assert [n for n, _ in attributes if n == "policy_string"] == []
    assert len(text) + 3 <= limits.SOCKETMAP_MAX_REPLY
    code, reason, _ = rig.tcp_table("report")
    assert (code, reason) == (400, "policy answer too long for this protocol")


def test_temp_when_even_match_does_not_fit_socketmap(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    hosts = [_label_host(n) for n in range(240)]
    body = "version: STSv1\nmode: enforce\n" + "".join(f"mx: {h}\n" for h in hosts) + "max_age: 86400\n"
    assert len(body) <= limits.POLICY_BODY_LIMIT
    rig.publish(DOMAIN, body)
    with caplog.at_level(logging.ERROR, logger="postfix_mtasts.protocol"):
        assert rig.socketmap("report") == ("TEMP", "policy answer too long for this protocol")
    assert any("answering TEMP" in r.getMessage() for r in caplog.records)
    # The plain answer (no TLSRPT attributes) still fits: only "report" pays.
    status, text = rig.socketmap("postfix")
    assert status == "OK" and text.endswith(" servername=hostname")


# --- policy_failure ------------------------------------------------------------------


@pytest.mark.parametrize(
    "category", [FailureCategory.FETCH, FailureCategory.INVALID, FailureCategory.WEBPKI]
)
def test_policy_failure_answer_is_opt_in(rig: Rig, category: str) -> None:
    rig.dns.set_id(DOMAIN, "7")
    rig.https.set(DOMAIN, FetchFailed(reason="the policy host said no", category=category))
    expected = f"secure policy_type=sts policy_domain=example.com policy_failure={category}"
    assert rig.socketmap("failures") == ("OK", expected)
    assert rig.tcp_table("both")[:2] == (200, expected)
    assert rig.socketmap("postfix") == ("NOTFOUND", "")
    assert rig.socketmap("report") == ("NOTFOUND", "")
    assert parse_postfix_policy(expected) == ("secure", [
        ("policy_type", "sts"), ("policy_domain", "example.com"), ("policy_failure", category),
    ])
    assert rig.https.calls[DOMAIN] == 1  # one fetch; the rest from memory


def test_no_policy_failure_without_a_promised_policy(rig: Rig) -> None:
    rig.dns.set(DOMAIN, TxtAbsent("no record"))
    assert rig.socketmap("failures") == ("NOTFOUND", "")
    other = "dns-broken.example"
    entry = CacheEntry(other, Source.FAILED, expires_at=T0 + 60, checked_at=T0, failure="DNS failed: timeout")
    assert entry_answer(entry, AnswerOptions(policy_failure=True)).kind is AnswerKind.NOTFOUND


def test_policy_failure_category_survives_the_store() -> None:
    entry = CacheEntry(DOMAIN, Source.FAILED, expires_at=T0 + 300, checked_at=T0, failed_id="9",
                       retry_at=T0 + 300, failure="bad certificate", failure_category=FailureCategory.WEBPKI)
    again = CacheEntry.from_json(entry.to_json())
    assert again == entry
    assert entry_answer(again, AnswerOptions(policy_failure=True)) == Answer.ok(
        "secure policy_type=sts policy_domain=example.com policy_failure=sts-webpki-invalid"
    )
    # An entry written before the field existed loads with no category: not found.
    old_json = entry.to_json().replace(',"failure_category":"sts-webpki-invalid"', "")
    assert "failure_category" not in old_json
    assert CacheEntry.from_json(old_json).failure_category == ""


def test_expired_policy_with_failed_refresh_keeps_the_category(rig: Rig) -> None:
    rig.publish(DOMAIN, RFC_POLICY.replace("604800", "1000"))
    assert rig.socketmap("failures")[0] == "OK"
    rig.dns.set_id(DOMAIN, "2")
    rig.https.set(DOMAIN, FetchFailed(reason="invalid policy", category=FailureCategory.INVALID))
    rig.lookup.settings = LookupSettings(PolicyConfig(recheck_interval=1.0))
    rig.clock.advance(5)
    assert rig.socketmap("failures")[1].startswith("secure match=")  # old policy still in force
    rig.clock.advance(1000)  # expired; the failed id is in its back-off
    assert rig.socketmap("failures") == (
        "OK", "secure policy_type=sts policy_domain=example.com policy_failure=sts-policy-invalid"
    )
    assert rig.socketmap("postfix") == ("NOTFOUND", "")


def test_a_reload_changes_what_a_known_profile_answers(rig: Rig) -> None:
    rig.publish(DOMAIN, RFC_POLICY)
    plain = "secure match=.example.net:backupmx.example.com:mail.example.com servername=hostname"
    assert rig.socketmap("postfix") == ("OK", plain)
    # What a reload does: the same name, other switches; an unknown name is refused.
    rig.responder.profiles = {"postfix": Profile(tlsrpt=True)}
    assert rig.socketmap("postfix") == ("OK", RFC_ANSWER)
    kind, text = rig.socketmap("report")
    assert kind == "PERM" and "unknown map name 'report'" in text
    rig.responder.profiles = PROFILES
    assert rig.socketmap("postfix") == ("OK", plain)
    assert rig.socketmap("report") == ("OK", RFC_ANSWER)


def test_answer_options_codes_tell_every_combination_apart() -> None:
    import itertools

    combos = [AnswerOptions(*bits) for bits in itertools.product((False, True), repeat=4)]
    assert len({options.code for options in combos}) == 16
    assert all(hash(options) == options.code for options in combos)
    assert AnswerOptions(tlsrpt=True) == AnswerOptions(tlsrpt=True)


def test_answer_options_from_profiles() -> None:
    assert AnswerOptions.of(False) == AnswerOptions()
    assert AnswerOptions.of(True) == AnswerOptions(enforce_testing=True)
    assert AnswerOptions.of(Profile(tlsrpt=True, tlsrpt_policy_failure=True, dane=True)) == AnswerOptions(
        tlsrpt=True, policy_failure=True, dane=True
    )
    assert txt("1").policy_id == "1"
