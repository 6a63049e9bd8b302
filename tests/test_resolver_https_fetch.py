"""The RFC 8461 fetch rules of resolver/https/fetch.py, against a hostile policy host on
127.0.0.1: a good policy is fetched, parsed and traced; the request; redirects,
statuses, media types and content codings refused; invalid policies; the body cap;
the policy host's name (``policy_host``) agreeing with idna."""

from __future__ import annotations

import gzip
import logging

import idna
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st

from postfix_mtasts.policy.policyfile import PolicyError, parse_policy
from postfix_mtasts.resolver import FailureCategory, FetchOK, FetchProblem
from postfix_mtasts.resolver.https.fetch import policy_host
from tests.support import policy_fetch
from tests.support.https_server import HostileHttpsServer, Oversized, Redirect, Serve
from tests.support.policy_fetch import (
    DOMAIN,
    EXPECTED,
    HOST,
    POLICY,
    LoopbackResolver,
    fetch_failed,
    fetcher_for,
)

pytestmark = pytest.mark.integration

#: The loopback policy host, fresh for each test (a fixture).
server = policy_fetch.server


@pytest_twisted.ensureDeferred
async def test_good_policy_is_fetched_parsed_and_traced(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY))
    resolver = LoopbackResolver()

    result = await fetcher_for(server, resolver).fetch(DOMAIN)

    assert isinstance(result, FetchOK), result
    assert result.policy == EXPECTED
    assert result.text == POLICY.decode()
    assert result.tls_version.startswith("TLSv1.")
    assert result.not_after is not None and result.not_after.tzinfo is not None
    assert result.body_bytes == len(POLICY)
    assert resolver.asked == [HOST]
    assert server.requests[HOST] == 1
    assert server.state(HOST).paths == ["/.well-known/mta-sts.txt"]
    assert server.sni_names == [HOST]
    trace = "\n".join(result.trace)
    for expected in (
        "resolved mta-sts.example.com: 127.0.0.1",
        f"connected to 127.0.0.1:{server.port}",
        "TLSv1.",
        "SAN mta-sts.example.com",
        "notAfter",
        "certificate valid for mta-sts.example.com",
        "HTTP 200 OK",
        "Content-Type text/plain",
        f"body {len(POLICY)} bytes",
        "policy valid: mode enforce",
    ):
        assert expected in trace, (expected, result.trace)


@pytest_twisted.ensureDeferred
async def test_request_headers(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY))

    assert isinstance(await fetcher_for(server).fetch(DOMAIN), FetchOK)

    (headers,) = server.state(HOST).request_headers
    assert headers["accept-encoding"] == ["gzip"]
    assert headers["host"] == [f"{HOST}:{server.port}"]


@pytest_twisted.ensureDeferred
async def test_domain_is_normalised_to_the_policy_host(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY))

    result = await fetcher_for(server).fetch("Example.COM.")

    assert isinstance(result, FetchOK), result
    assert server.sni_names == [HOST]


@pytest.mark.parametrize(
    "content_type", ["text/plain; charset=utf-8", 'Text/Plain;charset="UTF-8"', "TEXT/PLAIN"]
)
@pytest_twisted.ensureDeferred
async def test_text_plain_with_parameters_and_any_case_is_accepted(
    server: HostileHttpsServer, content_type: str
) -> None:
    server.set_host(HOST, Serve(POLICY, content_type=content_type))

    result = await fetcher_for(server).fetch(DOMAIN)

    assert isinstance(result, FetchOK), result
    assert result.policy == EXPECTED


@pytest_twisted.ensureDeferred
async def test_identity_content_encoding_is_accepted(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY, headers=(("Content-Encoding", "identity"),)))

    assert isinstance(await fetcher_for(server).fetch(DOMAIN), FetchOK)


# --- HTTP-level failures -------------------------------------------------------


MEDIA, STATUS, CODING = FetchProblem.MEDIA_TYPE, FetchProblem.HTTP_STATUS, FetchProblem.CONTENT_CODING


@pytest.mark.parametrize(
    ("serve", "expected", "problem"),
    [
        (Serve(POLICY, content_type="text/html"), "media type text/html, not text/plain", MEDIA),
        (Serve(POLICY, content_type="text/plainish"), "media type text/plainish, not text/plain", MEDIA),
        (Serve(POLICY, content_type=None), "no Content-Type headers", MEDIA),
        (Serve(POLICY, status=404), "HTTP 404 Not Found, not 200", STATUS),
        (Serve(POLICY, status=500), "HTTP 500", STATUS),
        (Serve(POLICY, status=204), "HTTP 204", STATUS),
        (
            Serve(POLICY, headers=(("Content-Encoding", "br"),)),
            "content coding br refused",
            CODING,
        ),
        (
            Serve(gzip.compress(POLICY), headers=(("Content-Encoding", "br, gzip"),)),
            "content coding br refused",
            CODING,
        ),
        (
            Serve(POLICY, headers=(("Content-Encoding", "gzip, br"),)),
            "content coding gzip, br refused",
            CODING,
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_http_answers_are_fetch_errors(
    server: HostileHttpsServer, serve: Serve, expected: str, problem: str
) -> None:
    server.set_host(HOST, serve)

    failed = await fetch_failed(fetcher_for(server))

    assert failed.category == FailureCategory.FETCH
    assert failed.problem == problem
    assert expected in failed.reason, failed.reason
    assert server.requests[HOST] == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest_twisted.ensureDeferred
async def test_redirect_is_not_followed(server: HostileHttpsServer, status: int) -> None:
    target = "https://mta-sts.elsewhere.example/.well-known/mta-sts.txt"
    server.set_host(HOST, Redirect(target, status=status))
    server.set_host("mta-sts.elsewhere.example", Serve(POLICY))

    failed = await fetch_failed(fetcher_for(server))

    assert failed.category == FailureCategory.FETCH
    assert failed.problem == FetchProblem.REDIRECT
    assert f"HTTP {status} redirect to {target} (not followed)" in failed.reason
    assert server.requests[HOST] == 1
    assert server.requests["mta-sts.elsewhere.example"] == 0
    assert server.connections_accepted == 1


@pytest_twisted.ensureDeferred
async def test_mx_with_a_trailing_dot_is_forgiven_and_logged(
    server: HostileHttpsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A fully qualified ``mx: MX1.Example.COM.`` keeps the domain protected:
    the policy is used, the warning is in the trace, the FetchOK and the log."""
    server.set_host(HOST, Serve(b"version: STSv1\nmode: enforce\nmx: MX1.Example.COM.\nmax_age: 86400\n"))

    with caplog.at_level(logging.WARNING, logger="postfix_mtasts.resolver.https"):
        result = await fetcher_for(server).fetch(DOMAIN)

    assert isinstance(result, FetchOK), result
    assert result.policy.mx == ("mx1.example.com",)
    assert len(result.warnings) == 1 and "ends with a dot" in result.warnings[0]
    assert f"policy {result.warnings[0]}" in result.trace
    logged = [r.getMessage() for r in caplog.records if r.name == "postfix_mtasts.resolver.https"]
    assert logged == [f"{HOST}: policy {result.warnings[0]}"]


@pytest_twisted.ensureDeferred
async def test_invalid_policy_is_invalid_with_the_parsers_reason(server: HostileHttpsServer) -> None:
    body = b"version: STSv1\nmode: sometimes\nmx: mail.example.com\nmax_age: 86400\n"
    with pytest.raises(PolicyError) as parsed:
        parse_policy(body)
    server.set_host(HOST, Serve(body))

    failed = await fetch_failed(fetcher_for(server))

    assert failed.category == FailureCategory.INVALID
    assert failed.problem == FetchProblem.INVALID_POLICY
    assert str(parsed.value) in failed.reason
    assert any("body" in step for step in failed.trace)


# --- size limits ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_oversized_chunked_body_is_cut_off(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Oversized())

    failed = await fetch_failed(fetcher_for(server))

    assert failed.category == FailureCategory.FETCH
    assert failed.problem == FetchProblem.TOO_LARGE
    assert "policy body over 65536 bytes" in failed.reason
    await server.wait_idle()
    state = server.state(HOST)
    assert state.aborted == 1
    assert state.finished == 0
    assert state.bytes_sent < Oversized().total


@pytest_twisted.ensureDeferred
async def test_oversized_declared_length_is_refused_before_reading(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Oversized(declare_length=True))

    failed = await fetch_failed(fetcher_for(server))

    assert f"policy body over 65536 bytes (Content-Length {Oversized().total})" in failed.reason
    assert failed.problem == FetchProblem.TOO_LARGE
    await server.wait_idle()
    assert server.state(HOST).aborted == 1


@pytest_twisted.ensureDeferred
async def test_body_limit_is_configurable_and_inclusive(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY))

    exact = await fetcher_for(server, body_limit=len(POLICY)).fetch(DOMAIN)
    over = await fetch_failed(fetcher_for(server, body_limit=len(POLICY) - 1))

    assert isinstance(exact, FetchOK)
    assert f"policy body over {len(POLICY) - 1} bytes" in over.reason


# --- the policy host's name ----------------------------------------------------


def test_policy_host_names() -> None:
    assert policy_host("Example.COM.") == "mta-sts.example.com"
    assert policy_host("bücher.example") == "mta-sts.xn--bcher-kva.example"


def idna_policy_host(domain: str) -> str | None:
    """What policy_host must answer, straight from idna (None: not a valid name)."""
    name = domain.strip().rstrip(".")
    try:
        return "mta-sts." + idna.encode(name, uts46=True).decode("ascii").lower() if name else None
    except idna.IDNAError:
        return None


def policy_host_or_none(domain: str) -> str | None:
    try:
        return policy_host(domain)
    except Exception:
        return None


@pytest.mark.parametrize(
    "domain",
    [
        "example.com",
        "EXAMPLE.com.",
        " a.b ",
        "a-b.c9",
        "123.456",
        "-a.example",
        "a-.example",
        "ab--c.example",
        "xn--bcher-kva.example",
        "xn--zz.example",
        "a..b",
        ".a",
        "a_b.example",
        "a b.example",
        "\u212a.example",  # KELVIN SIGN: lower-cases to an ASCII "k"
        "x" * 63 + ".example",
        "x" * 64 + ".example",
        ".".join(["a" * 63] * 4)[:253],
        ".".join(["a" * 63] * 4)[:254],
    ],
)
def test_policy_host_agrees_with_idna_on_edge_cases(domain: str) -> None:
    assert policy_host_or_none(domain) == idna_policy_host(domain)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="aZ09-._.xn\u00fc\u212a ", max_size=80))
def test_policy_host_agrees_with_idna(domain: str) -> None:
    assert policy_host_or_none(domain) == idna_policy_host(domain)
