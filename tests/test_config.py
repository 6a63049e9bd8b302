"""Tests for postfix_mtasts.config: defaults, every key good and bad, addresses, the example file."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import endpoints
from twisted.internet.testing import MemoryReactor

from postfix_mtasts import limits
from postfix_mtasts.config import (
    Config,
    ConfigError,
    ImapConfig,
    ListenAddress,
    Nameserver,
    Profile,
    ReportsConfig,
    config_from_mapping,
    load_config,
    parse_config,
    parse_listen_address,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "conf" / "postfix-mtasts.toml"
SOURCE = "/etc/postfix-mtasts.toml"


def toml_value(value: Any) -> str:
    """Just enough of a TOML writer for the values these tests use."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    return repr(value)


def one_key(dotted: str, value: Any) -> str:
    """A TOML document setting only ``dotted`` (e.g. "cache.redis.url")."""
    table, _, key = dotted.rpartition(".")
    return f"[{table}]\n{key} = {toml_value(value)}\n"


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, SOURCE)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{SOURCE}: ")
    return message


# --- defaults -----------------------------------------------------------------


def test_no_file_means_defaults_from_limits() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.listen.socketmap == (ListenAddress(kind="inet", host="127.0.0.1", port=8461),)
    assert config.listen.tcp_table == ()
    assert config.listen.socketmap_idle_timeout == limits.SOCKETMAP_IDLE_TIMEOUT
    assert config.listen.tcp_table_idle_timeout == limits.TCP_TABLE_IDLE_TIMEOUT
    # 0: the kernel's largest backlog, which the service reads at start.
    assert config.listen.backlog == 0
    assert config.cache.backend == "sqlite"
    assert config.cache.path == ""
    assert config.cache.memory_entries == limits.MEMORY_ENTRIES
    assert config.cache.local_copy is True
    assert config.cache.open_deadline == limits.STORE_OPEN_DEADLINE
    assert config.cache.redis.url == "redis://127.0.0.1:6379/0"
    assert config.cache.redis.key_prefix == "mtasts:"
    assert config.cache.postgresql.schema == "mtasts"
    assert config.resolver.nameservers == ()
    assert config.resolver.ca_file == ""
    assert config.resolver.dns_timeout == limits.DNS_TIMEOUT
    assert config.resolver.fetch_timeout == limits.FETCH_TIMEOUT
    policy = config.policy
    assert policy.recheck_interval == limits.RECHECK_INTERVAL
    assert policy.recheck_deadline == limits.RECHECK_DEADLINE
    assert policy.first_lookup_deadline == limits.FIRST_LOOKUP_DEADLINE
    assert policy.on_first_lookup_timeout == "notfound"
    assert policy.fetch_retry_backoff == limits.FETCH_RETRY_BACKOFF
    assert (policy.negative_ttl_min, policy.negative_ttl_max) == (
        limits.NEGATIVE_TTL_MIN,
        limits.NEGATIVE_TTL_MAX,
    )
    assert policy.refresh_after == limits.REFRESH_AFTER
    assert policy.refresh_concurrency == limits.REFRESH_CONCURRENCY
    assert policy.refresh_jitter == limits.REFRESH_JITTER
    assert policy.refresh_idle_limit == limits.REFRESH_IDLE_LIMIT
    assert policy.bracketed_next_hop == "ignore"
    assert dict(config.profiles) == {
        "postfix": Profile(enforce_testing=False),
        "postfix310": Profile(tlsrpt=True),
    }
    assert (config.log.level, config.log.syslog) == ("info", False)
    assert (config.control.socket, config.control.mode) == ("", 0o660)
    assert config.http.listen is None
    assert config.reports == ReportsConfig()
    assert config.service.user == ""


def test_empty_file_equals_no_file_except_source() -> None:
    assert parse_config("", SOURCE) == dataclasses.replace(Config(), source=SOURCE)


def test_config_is_frozen() -> None:
    config = parse_config("[profiles.strict]\nenforce_testing = true\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log = config.log  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.profiles["x"] = Profile()  # type: ignore[index]


# --- every key, a good value --------------------------------------------------

GOOD: list[tuple[str, Any, Any]] = [
    # (dotted key, TOML value, expected attribute value)
    (
        "listen.socketmap",
        ["inet:[::1]:8461", "unix:/run/m.sock:mode=0600"],
        (
            ListenAddress(kind="inet", host="::1", port=8461),
            ListenAddress(kind="unix", path="/run/m.sock", mode=0o600),
        ),
    ),
    (
        "listen.tcp_table",
        ["inet:127.0.0.1:8462", "systemd:tcptable"],
        (
            ListenAddress(kind="inet", host="127.0.0.1", port=8462),
            ListenAddress(kind="systemd", systemd_name="tcptable"),
        ),
    ),
    ("listen.socketmap_idle_timeout", 30, 30.0),
    ("listen.tcp_table_idle_timeout", 1.5, 1.5),
    ("listen.backlog", 4096, 4096),
    ("cache.backend", "memory", "memory"),
    ("cache.path", "/var/tmp/c.sqlite3", "/var/tmp/c.sqlite3"),
    ("cache.memory_entries", 10, 10),
    ("cache.local_copy", False, False),
    ("cache.open_deadline", 0.5, 0.5),
    ("cache.redis.url", "rediss://cache.example:6380/2", "rediss://cache.example:6380/2"),
    ("cache.redis.key_prefix", "mx1:", "mx1:"),
    ("cache.postgresql.dsn", "host=db dbname=mtasts", "host=db dbname=mtasts"),
    ("cache.postgresql.schema", "mta_sts2", "mta_sts2"),
    (
        "resolver.nameservers",
        ["127.0.0.53", "192.0.2.1:5353", "::1", "[2001:db8::1]:53", "[::1]"],
        (
            Nameserver("127.0.0.53"),
            Nameserver("192.0.2.1", 5353),
            Nameserver("::1"),
            Nameserver("2001:db8::1", 53),
            Nameserver("::1"),
        ),
    ),
    ("resolver.dns_timeout", 0.5, 0.5),
    ("resolver.fetch_timeout", 10, 10.0),
    ("resolver.https_port", 8443, 8443),
    ("policy.recheck_interval", 1, 1.0),
    ("policy.recheck_deadline", 0, 0.0),
    ("policy.first_lookup_deadline", 99.5, 99.5),
    ("policy.on_first_lookup_timeout", "temp", "temp"),
    ("policy.fetch_retry_backoff", 600, 600.0),
    ("policy.negative_ttl_min", 3600, 3600.0),
    ("policy.negative_ttl_max", 300, 300.0),
    ("policy.refresh_after", 43200, 43200.0),
    ("policy.refresh_concurrency", 1, 1),
    ("policy.refresh_jitter", 0, 0.0),
    ("policy.refresh_idle_limit", 86400, 86400.0),
    ("policy.bracketed_next_hop", "host", "host"),
    ("dane.nameservers", ["127.0.0.1:5353", "::1"], (Nameserver("127.0.0.1", 5353), Nameserver("::1"))),
    ("dane.timeout", 2.5, 2.5),
    ("log.level", "debug", "debug"),
    ("log.syslog", True, True),
    ("control.socket", "/run/mtasts/ctl.sock", "/run/mtasts/ctl.sock"),
    ("control.mode", "0600", 0o600),
    ("control.mode", "644", 0o644),
    ("http.listen", "inet:127.0.0.1:9461", ListenAddress(kind="inet", host="127.0.0.1", port=9461)),
    ("reports.alert_ratio", 0.1, 0.1),
    ("reports.alert_ratio", 1, 1.0),
    ("reports.alert_window", 86400, 86400.0),
    ("reports.alert_min_sessions", 1, 1),
    ("reports.sendmail_path", "/usr/local/sbin/sendmail", "/usr/local/sbin/sendmail"),
    ("reports.reporter_silence_days", 0, 0),
    ("service.user", "postfix-mtasts", "postfix-mtasts"),
    ("service.user", "", ""),
    ("reports.path", "/var/lib/tlsrpt/r.sqlite3", "/var/lib/tlsrpt/r.sqlite3"),
    ("reports.dsn", "postgresql://db/tlsrpt", "postgresql://db/tlsrpt"),
    ("reports.schema", "tls_reports", "tls_reports"),
    ("reports.maildir", "/var/mail/tlsrpt", "/var/mail/tlsrpt"),
    ("reports.poll_interval", 5, 5.0),
    (
        "reports.imap",
        {"host": "imap.example", "user": "tlsrpt", "password_file": "/etc/postfix-mtasts/imap.pw"},
        ImapConfig(host="imap.example", user="tlsrpt", password_file="/etc/postfix-mtasts/imap.pw"),
    ),
]


def attribute(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def with_attribute(obj: Any, dotted: str, value: Any) -> Any:
    head, _, rest = dotted.partition(".")
    if rest:
        value = with_attribute(getattr(obj, head), rest, value)
    return dataclasses.replace(obj, **{head: value})


@pytest.mark.parametrize(("key", "value", "expected"), GOOD, ids=[f"{k}={v!r}" for k, v, _ in GOOD])
def test_every_key_accepts_a_good_value(key: str, value: Any, expected: Any) -> None:
    config = parse_config(one_key(key, value), SOURCE)
    assert attribute(config, key) == expected
    # Only that key changed.
    assert config == with_attribute(Config(source=SOURCE), key, expected)


def test_good_values_cover_every_key() -> None:
    """The GOOD and BAD tables name every leaf key of the configuration."""
    leaves = set()

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            dotted = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value) and not isinstance(value, ListenAddress):
                walk(value, dotted + ".")
            elif dotted not in {"profiles", "source"}:
                leaves.add(dotted)

    walk(Config(), "")
    leaves.update({"cache.redis.sentinels", "cache.redis.sentinel_service", "resolver.ca_file"})
    leaves.discard("http.key")  # which name http.listen was set with: not a key of its own
    good = {key for key, _, _ in GOOD} | {"cache.redis.sentinels", "cache.redis.sentinel_service"}
    # these need a real file: tests of their own
    assert leaves - good == {"resolver.ca_file", "reports.alert_mail_to"}
    assert leaves - {key for key, _ in BAD} == set()


def test_http_listen_keeps_its_older_name_metrics_listen() -> None:
    older = parse_config('[metrics]\nlisten = "inet:127.0.0.1:9461"\n', SOURCE)
    newer = parse_config('[http]\nlisten = "inet:127.0.0.1:9461"\n', SOURCE)
    assert older.http.listen == newer.http.listen == ListenAddress(kind="inet", host="127.0.0.1", port=9461)
    assert (older.http.key, newer.http.key) == ("metrics.listen", "http.listen")
    assert error_of('[http]\nlisten = "inet:127.0.0.1:1"\n[metrics]\nlisten = "inet:127.0.0.1:2"\n') == (
        f"{SOURCE}: metrics.listen: is the older name of http.listen; set only http.listen")
    clash = '[listen]\nsocketmap = ["inet:127.0.0.1:9461"]\n[http]\nlisten = "inet:127.0.0.1:9461"\n'
    assert error_of(clash) == (
        f"{SOURCE}: http.listen: inet:127.0.0.1:9461 is already used by listen.socketmap[0]")


def test_alert_mail_needs_an_executable_sendmail(tmp_path: Path) -> None:
    sendmail = tmp_path / "sendmail"
    sendmail.write_text("#!/bin/sh\nexit 0\n")
    text = f'[reports]\nalert_mail_to = "postmaster@example.com"\nsendmail_path = "{sendmail}"\n'
    with pytest.raises(ConfigError, match=r"sendmail_path: .* is not an executable file"):
        parse_config(text, SOURCE)
    sendmail.chmod(0o755)
    config = parse_config(text, SOURCE)
    assert config.reports.alert_mail_to == "postmaster@example.com"
    assert config.reports.sendmail_path == str(sendmail)
    assert error_of(text.replace(str(sendmail), str(tmp_path / "none"))) == (
        f'{SOURCE}: reports.sendmail_path: "{tmp_path}/none" is not an executable file '
        "(needed to mail alerts to postmaster@example.com)")


def test_redis_sentinels_with_service() -> None:
    config = parse_config(
        '[cache.redis]\nsentinels = ["10.0.0.1:26379", "[2001:db8::2]:26379", "s3.example:26379"]\n'
        'sentinel_service = "mymaster"\n'
    )
    assert config.cache.redis.sentinels == ("10.0.0.1:26379", "[2001:db8::2]:26379", "s3.example:26379")
    assert config.cache.redis.sentinel_service == "mymaster"


def test_ca_file_must_exist(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    config = parse_config(one_key("resolver.ca_file", str(bundle)))
    assert config.resolver.ca_file == str(bundle)
    message = error_of(one_key("resolver.ca_file", str(tmp_path / "missing.pem")))
    assert "resolver.ca_file" in message and "does not exist" in message
    message = error_of(one_key("resolver.ca_file", str(tmp_path)))
    assert "resolver.ca_file" in message and "is not a file" in message
    assert "resolver.ca_file" in error_of(one_key("resolver.ca_file", "ca.pem"))


def test_profiles() -> None:
    config = parse_config(
        "[profiles.strict]\nenforce_testing = true\n[profiles.Relaxed-2_x]\n"
        "[profiles.postfix]\nenforce_testing = true\n"
    )
    assert dict(config.profiles) == {
        "postfix": Profile(enforce_testing=True),
        "strict": Profile(enforce_testing=True),
        "Relaxed-2_x": Profile(enforce_testing=False),
        "postfix310": Profile(tlsrpt=True),
    }
    # postfix exists even when only another profile is configured
    config = parse_config("[profiles.other]\n")
    assert set(config.profiles) == {"postfix", "postfix310", "other"}


def test_builtin_postfix310_profile_sends_the_attributes_and_can_be_extended() -> None:
    """postfix310 feeds Postfix 3.10.5's smtp_tls_enforce_sts_mx_patterns with
    no daemon configuration at all; a [profiles.postfix310] table changes
    only the keys it names."""
    assert Config().profiles["postfix310"] == Profile(tlsrpt=True)
    extended = parse_config('[profiles.postfix310]\ndane = true\n[dane]\nnameservers = ["127.0.0.1"]\n')
    assert extended.profiles["postfix310"] == Profile(tlsrpt=True, dane=True)
    switched_off = parse_config("[profiles.postfix310]\ntlsrpt = false\n")
    assert switched_off.profiles["postfix310"] == Profile()


def test_profile_reporting_and_dane_switches() -> None:
    config = parse_config(
        "[profiles.report]\ntlsrpt = true\ntlsrpt_policy_failure = true\n"
        "[profiles.dane]\ndane = true\nenforce_testing = true\n"
        '[dane]\nnameservers = ["127.0.0.1:8053"]\ntimeout = 3\n'
    )
    assert dict(config.profiles) == {
        "postfix": Profile(),
        "report": Profile(tlsrpt=True, tlsrpt_policy_failure=True),
        "dane": Profile(enforce_testing=True, dane=True),
        "postfix310": Profile(tlsrpt=True),
    }
    assert (config.dane.nameservers, config.dane.timeout) == ((Nameserver("127.0.0.1", 8053),), 3.0)


def test_dane_profile_needs_the_validating_resolver() -> None:
    assert error_of("[profiles.b]\ndane = true\n[profiles.a]\ndane = true\n") == (
        f'{SOURCE}: dane.nameservers: must name the DNSSEC-validating resolver, e.g. ["127.0.0.1"], '
        "since profiles.a.dane is true"
    )
    # Named but unused is fine: the section only matters to dane profiles.
    assert parse_config('[dane]\nnameservers = ["127.0.0.1"]\n').profiles["postfix"].dane is False


@pytest.mark.parametrize("name", ["a b", "x" * 65, "é", "a.b", ""])
def test_bad_profile_names(name: str) -> None:
    message = error_of(f'[profiles."{name}"]\n')
    assert "profiles" in message and "socketmap NAME" in message


# --- every key, a bad value ---------------------------------------------------

BAD: list[tuple[str, Any]] = [
    ("listen.socketmap", "inet:127.0.0.1:8461"),  # a string, not a list
    ("listen.socketmap", [8461]),
    ("listen.socketmap", ["tcp:127.0.0.1:8461"]),
    ("listen.tcp_table", ["inet:127.0.0.1:0"]),
    ("listen.tcp_table", ["inet:127.0.0.1"]),
    ("listen.socketmap_idle_timeout", 0),
    ("listen.socketmap_idle_timeout", "300"),
    ("listen.tcp_table_idle_timeout", -1),
    ("listen.tcp_table_idle_timeout", True),
    ("listen.backlog", -1),
    ("listen.backlog", 65_536),
    ("listen.backlog", "4096"),
    ("listen.backlog", 1.5),
    ("listen.backlog", True),
    ("cache.backend", "sqllite"),
    ("cache.backend", 1),
    ("cache.path", "cache.sqlite3"),
    ("cache.path", 5),
    ("cache.memory_entries", 0),
    ("cache.local_copy", "yes"),
    ("cache.open_deadline", 0),
    ("cache.open_deadline", "5s"),
    ("cache.memory_entries", 1.5),
    ("cache.memory_entries", "1000"),
    ("cache.redis.url", "http://127.0.0.1:6379"),
    ("cache.redis.key_prefix", 1),
    ("cache.redis.sentinels", "10.0.0.1:26379"),
    ("cache.redis.sentinels", ["10.0.0.1"]),
    ("cache.redis.sentinel_service", 7),
    ("cache.postgresql.dsn", ""),
    ("cache.postgresql.schema", "mta-sts"),
    ("cache.postgresql.schema", "x; DROP TABLE y"),
    ("resolver.nameservers", ["dns.example"]),
    ("resolver.nameservers", ["192.0.2.1:99999"]),
    ("resolver.nameservers", ["[2001:db8::1]53"]),
    ("resolver.nameservers", "127.0.0.1"),
    ("resolver.ca_file", ["/etc/ssl/certs/ca-certificates.crt"]),
    ("resolver.dns_timeout", 0),
    ("resolver.fetch_timeout", -5),
    ("resolver.https_port", 0),
    ("resolver.https_port", "443"),
    ("policy.recheck_interval", "abc"),
    ("policy.recheck_interval", 0.5),
    ("policy.recheck_deadline", -0.1),
    ("policy.recheck_deadline", 100),
    ("policy.first_lookup_deadline", 100),
    ("policy.first_lookup_deadline", 0),
    ("policy.on_first_lookup_timeout", "tempfail"),
    ("policy.fetch_retry_backoff", 0),
    ("policy.negative_ttl_min", -300),
    ("policy.negative_ttl_max", 299),  # below the default minimum of 300
    ("policy.refresh_after", "daily"),
    ("policy.refresh_concurrency", 0),
    ("policy.refresh_concurrency", 2.0),
    ("policy.refresh_jitter", -1),
    ("policy.refresh_idle_limit", False),
    ("policy.bracketed_next_hop", "yes"),
    ("profiles.postfix.enforce_testing", "true"),
    ("profiles.strict.enforce_testing", 1),
    ("profiles.postfix.tlsrpt", "yes"),
    ("profiles.postfix.tlsrpt_policy_failure", 1),
    ("profiles.postfix.dane", "true"),
    ("dane.nameservers", "127.0.0.1"),
    ("dane.nameservers", ["unbound.local"]),
    ("dane.timeout", 0),
    ("log.level", "warn"),
    ("log.level", "INFO"),
    ("log.syslog", "yes"),
    ("control.socket", "control.sock"),
    ("control.socket", "/" + "s" * 200),
    ("control.mode", 660),
    ("control.mode", "0999"),
    ("control.mode", "rw-rw----"),
    ("metrics.listen", "127.0.0.1:9461"),
    ("metrics.listen", ["inet:127.0.0.1:9461"]),
    ("http.listen", "127.0.0.1:9461"),
    ("reports.alert_ratio", 0),
    ("reports.alert_ratio", 5),
    ("reports.alert_ratio", "5%"),
    ("reports.alert_ratio", float("nan")),
    ("reports.alert_window", 60),
    ("reports.alert_window", "3d"),
    ("reports.alert_min_sessions", 0),
    ("reports.alert_mail_to", "Postmaster <postmaster@example.com>"),
    ("reports.alert_mail_to", "-oQ/tmp@example.com"),
    ("reports.alert_mail_to", "a@example.com, b@example.com"),
    ("reports.sendmail_path", "sendmail"),
    ("reports.reporter_silence_days", -1),
    ("reports.reporter_silence_days", 1.5),
    ("service.user", "Root"),
    ("service.user", "-rf"),
    ("service.user", 0),
    ("reports.path", "reports.sqlite3"),
    ("reports.dsn", "mysql://db/x"),
    ("reports.schema", "a-b"),
    ("reports.maildir", "Maildir"),
    ("reports.poll_interval", 0),
    ("reports.imap", {"host": "imap.example", "user": "tlsrpt"}),
    ("reports.imap", "imap.example"),
]


@pytest.mark.parametrize(("key", "value"), BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_every_key_rejects_a_bad_value(key: str, value: Any) -> None:
    message = error_of(one_key(key, value))
    assert f": {key}" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[policy]\nrecheck_interval = "abc"\n',
            f'{SOURCE}: policy.recheck_interval: must be a number of seconds >= 1, got "abc"',
        ),
        (
            "[policy]\nfirst_lookup_deadline = 120\n",
            f"{SOURCE}: policy.first_lookup_deadline: must be a number of seconds > 0 and < 100, got 120",
        ),
        (
            '[log]\nlevel = "warn"\n',
            f'{SOURCE}: log.level: must be one of "debug", "info", "warning", "error", got "warn"'
            ' (did you mean "warning"?)',
        ),
        (
            "[listen]\nsocketmap = []\n",
            f"{SOURCE}: listen: socketmap and tcp_table are both empty; the daemon would not listen at all",
        ),
        (
            "[policy]\nnegative_ttl_min = 600\nnegative_ttl_max = 500\n",
            f"{SOURCE}: policy.negative_ttl_max: must be >= policy.negative_ttl_min (600), got 500",
        ),
        (
            '[cache.redis]\nsentinels = ["10.0.0.1:26379"]\n',
            f"{SOURCE}: cache.redis.sentinel_service: must name the monitored master when sentinels are set",
        ),
        (
            '[listen]\nsocketmap = ["inet:127.0.0.1:8461", "inet:127.0.0.1:8461"]\n',
            f"{SOURCE}: listen.socketmap[1]: inet:127.0.0.1:8461 is already used by listen.socketmap[0]",
        ),
        (
            '[listen]\ntcp_table = ["unix:/run/a.sock:mode=0600"]\n[metrics]\nlisten = "unix:/run/a.sock"\n',
            f"{SOURCE}: metrics.listen: unix:/run/a.sock is already used by listen.tcp_table[0]",
        ),
        (
            "[policy]\nrecheck_interval = inf\n",
            f"{SOURCE}: policy.recheck_interval: must be at most 315360000 seconds (ten years), got inf",
        ),
        (
            '[listen]\nsocketmap = ["inet:::1:8461"]\n',
            f'{SOURCE}: listen.socketmap[0]: put an IPv6 address in brackets, "inet:[::1]:PORT",'
            ' got "inet:::1:8461"',
        ),
    ],
)
def test_exact_messages(text: str, expected: str) -> None:
    assert error_of(text) == expected


def test_long_values_are_shortened_in_messages() -> None:
    message = error_of(one_key("log.level", "x" * 5000))
    assert len(message) < 200 and message.endswith("...")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[policy]\nrefresh_concurrency = " + "9" * 40 + "\n", "policy.refresh_concurrency"),
        ("[cache]\nmemory_entries = 100_000_001\n", "cache.memory_entries"),
        ("[policy]\nrefresh_after = " + "9" * 400 + "\n", "policy.refresh_after"),
        ("[policy]\nrefresh_after = 1e300\n", "policy.refresh_after"),
        ("[resolver]\ndns_timeout = nan\n", "resolver.dns_timeout"),
    ],
)
def test_absurdly_large_numbers_are_named(text: str, key: str) -> None:
    message = error_of(text)
    assert message.startswith(f"{SOURCE}: {key}: ")
    assert "9" * 40 not in message


def test_integer_beyond_python_digit_limit_is_one_line() -> None:
    message = error_of("[policy]\nrefresh_after = " + "9" * 5000 + "\n")
    assert len(message) < 200


# --- unknown keys -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[listn]\n", "unknown key listn (did you mean listen?)"),
        ("verbose = true\n", "unknown key verbose"),
        ("[listen]\nsocketmapp = []\n", "unknown key listen.socketmapp (did you mean socketmap?)"),
        ("[cache]\nbakend = 'memory'\n", "unknown key cache.bakend (did you mean backend?)"),
        ("[cache.redis]\nurls = ''\n", "unknown key cache.redis.urls (did you mean url?)"),
        ("[cache.postgresql]\nschemas = ''\n", "unknown key cache.postgresql.schemas (did you mean schema?)"),
        ("[cache.sqlite]\n", "unknown key cache.sqlite"),
        ("[resolver]\nnameserver = []\n", "unknown key resolver.nameserver (did you mean nameservers?)"),
        (
            "[policy]\nrecheck_intervall = 5\n",
            "unknown key policy.recheck_intervall (did you mean recheck_interval?)",
        ),
        (
            "[profiles.strict]\nenforce_test = true\n",
            "unknown key profiles.strict.enforce_test (did you mean enforce_testing?)",
        ),
        ("[profiles.x]\ntls_rpt = true\n", "unknown key profiles.x.tls_rpt (did you mean tlsrpt?)"),
        ("[dane]\nnameserver = []\n", "unknown key dane.nameserver (did you mean nameservers?)"),
        ("[log]\nlevl = 'info'\n", "unknown key log.levl (did you mean level?)"),
        ("[control]\nsocket_mode = '0660'\n", "unknown key control.socket_mode (did you mean socket?)"),
        ("[metrics]\nlistens = ''\n", "unknown key metrics.listens (did you mean listen?)"),
        ('[log]\n"a\\nb" = 1\n', 'unknown key log."a\\nb"'),
    ],
)
def test_unknown_keys(text: str, expected: str) -> None:
    assert error_of(text) == f"{SOURCE}: {expected}"


@pytest.mark.parametrize(
    "text",
    [
        "listen = 1\n",
        "cache = []\n",
        "[cache]\nredis = 'x'\n",
        "profiles = 'strict'\n",
        "[profiles]\nstrict = true\n",
    ],
)
def test_sections_must_be_tables(text: str) -> None:
    assert "must be a table" in error_of(text)


# --- syntax and files ---------------------------------------------------------


def test_toml_syntax_error_is_one_line_with_position() -> None:
    message = error_of("[policy]\nrecheck_interval = 60\nrefresh_after = \n")
    assert message.startswith(f"{SOURCE}: TOML syntax error: ")
    assert re.search(r"line 3, column \d+", message)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read configuration: No such file or directory"


def test_directory_and_non_utf8_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read configuration: Is a directory$"):
        load_config(str(tmp_path))
    binary = tmp_path / "latin1.toml"
    binary.write_bytes(b'[log]\nlevel = "\xe9"\n')
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(bad byte at offset 15\)$"):
        load_config(str(binary))


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[log]\nlevel = "error"\n')
    config = load_config(str(path))
    assert config.log.level == "error" and config.source == str(path)
    path.write_text('[log]\nlevel = "loud"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: log\.level: "):
        load_config(str(path))


# --- the shipped example ------------------------------------------------------


def test_example_file_parses_to_the_defaults() -> None:
    config = load_config(str(EXAMPLE))
    assert dataclasses.replace(config, source="<defaults>") == Config()


def test_example_file_uncommented_gives_the_defaults() -> None:
    text = EXAMPLE.read_text()
    settings_lines = re.findall(r"^#([a-z_]+ = .*)$", text, flags=re.MULTILINE)
    uncommented, count = re.subn(r"^#([a-z_]+ = )", r"\1", text, flags=re.MULTILINE)
    assert count == len(settings_lines)
    config = parse_config(uncommented, "example")
    assert dataclasses.replace(config, source="<defaults>") == Config()
    # Every key the configuration knows is shown in the example.
    shown = {line.split(" = ")[0] for line in settings_lines}
    expected = {
        f.name
        for section in (
            Config().listen,
            Config().cache,
            Config().cache.redis,
            Config().cache.postgresql,
            Config().resolver,
            Config().policy,
            Profile(),
            Config().dane,
            Config().log,
            Config().control,
            Config().http,
            Config().service,
            Config().reports,
        )
        for f in dataclasses.fields(section)
        if f.name not in {"redis", "postgresql", "imap", "key"}
    }
    # The keys of what the daemon watches in the stored reports.
    expected |= {"alert_ratio", "alert_window", "alert_min_sessions", "alert_mail_to", "sendmail_path",
                 "reporter_silence_days"}
    assert expected - shown == set()


def test_example_file_names_every_default_cache_location() -> None:
    """The cache.path comment lists, in order, where sqlite.default_path looks."""
    comment = EXAMPLE.read_text().split("[cache]", 1)[1].split("#path", 1)[0]
    places = ("$STATE_DIRECTORY/cache.sqlite3", "/var/lib/postfix-mtasts/cache.sqlite3",
              "$XDG_STATE_HOME/postfix-mtasts/cache.sqlite3")
    positions = [comment.find(place) for place in places]
    assert -1 not in positions and positions == sorted(positions), comment


def test_example_file_documents_main_cf() -> None:
    assert "smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8461:postfix" in EXAMPLE.read_text()


# --- listen addresses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "endpoint"),
    [
        (
            "inet:127.0.0.1:8461",
            ListenAddress("inet", host="127.0.0.1", port=8461),
            "tcp:8461:interface=127.0.0.1",
        ),
        ("inet:0.0.0.0:1", ListenAddress("inet", host="0.0.0.0", port=1), "tcp:1:interface=0.0.0.0"),
        (
            "inet:localhost:65535",
            ListenAddress("inet", host="localhost", port=65535),
            "tcp:65535:interface=localhost",
        ),
        ("inet:[::1]:8461", ListenAddress("inet", host="::1", port=8461), r"tcp6:8461:interface=\:\:1"),
        ("inet:[::]:25", ListenAddress("inet", host="::", port=25), r"tcp6:25:interface=\:\:"),
        ("unix:/run/mtasts.sock", ListenAddress("unix", path="/run/mtasts.sock"), "unix:/run/mtasts.sock"),
        (
            "unix:/run/mtasts.sock:mode=0660",
            ListenAddress("unix", path="/run/mtasts.sock", mode=0o660),
            "unix:/run/mtasts.sock:mode=660",
        ),
        ("unix:/run/a:b=c.sock", ListenAddress("unix", path="/run/a:b=c.sock"), r"unix:/run/a\:b\=c.sock"),
    ],
)
def test_listen_address_forms(text: str, expected: ListenAddress, endpoint: str) -> None:
    address = parse_listen_address(text)
    assert address == expected
    assert address.endpoint_description() == endpoint
    # What we print parses back to the same address.
    assert parse_listen_address(str(address)) == address


def endpoint_for(text: str) -> object:
    """What Twisted builds from our description of ``text`` (nothing listens)."""
    description = parse_listen_address(text).endpoint_description()
    return endpoints.serverFromString(MemoryReactor(), description)  # type: ignore[no-untyped-call]


def test_endpoint_descriptions_are_understood_by_twisted() -> None:
    tcp6 = endpoint_for("inet:[::1]:8461")
    assert isinstance(tcp6, endpoints.TCP6ServerEndpoint)
    assert (tcp6._port, tcp6._interface) == (8461, "::1")
    tcp = endpoint_for("inet:127.0.0.1:8462")
    assert isinstance(tcp, endpoints.TCP4ServerEndpoint)
    assert (tcp._port, tcp._interface) == (8462, "127.0.0.1")
    unix = endpoint_for("unix:/run/a:b=c.sock:mode=0640")
    assert isinstance(unix, endpoints.UNIXServerEndpoint)
    assert (unix._address, unix._mode) == ("/run/a:b=c.sock", 0o640)


def test_systemd_addresses_need_the_domain_from_the_service() -> None:
    by_index = parse_listen_address("systemd:0")
    assert (by_index.kind, by_index.systemd_index, by_index.systemd_name) == ("systemd", 0, "")
    by_name = parse_listen_address("systemd:socketmap")
    assert (by_name.kind, by_name.systemd_index, by_name.systemd_name) == ("systemd", None, "socketmap")
    with pytest.raises(ValueError, match="address family"):
        by_index.endpoint_description()
    assert by_index.endpoint_description("UNIX") == "systemd:domain=UNIX:index=0"
    assert by_name.endpoint_description("INET6") == "systemd:domain=INET6:name=socketmap"
    assert str(by_name) == "systemd:socketmap" and str(by_index) == "systemd:0"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "inet",
        "tcp:127.0.0.1:8461",
        "inet:127.0.0.1",
        "inet:127.0.0.1:",
        "inet::8461",
        "inet:127.0.0.1:0",
        "inet:127.0.0.1:65536",
        "inet:127.0.0.1:+80",
        "inet:127.0.0.1:८०",  # non-ASCII digits
        "inet:[::1]8461",
        "inet:[127.0.0.1]:8461",
        "inet:[::1:8461",
        "inet:::1:8461",
        "inet:bad_host:8461",
        "inet:-a.example:8461",
        "inet:999.1.1.1:8461",
        "unix:",
        "unix:relative.sock",
        "unix:/run/x.sock:mode=",
        "unix:/run/x.sock:mode=rw",
        "unix:/run/x.sock:mode=01777",
        "unix:/" + "p" * 107,
        "systemd:",
        "systemd:a:b",
        "systemd:has space",
        "systemd:" + "n" * 256,
    ],
)
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_listen_address(text)
    assert "\n" not in str(caught.value)


# --- robustness ---------------------------------------------------------------


@settings(max_examples=300)
@given(st.text())
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        parse_config(text)
    except ConfigError as error:
        assert "\n" not in str(error)


KEYS = [
    "listen",
    "cache",
    "resolver",
    "policy",
    "profiles",
    "log",
    "control",
    "metrics",
    "service",
    "redis",
    "postgresql",
]
LEAVES = [key for key, _ in BAD]
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(["inet:127.0.0.1:1", "unix:/x", "systemd:0", "0660", "memory", "/tmp", "host"]),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
names = st.sampled_from(KEYS + [leaf.rsplit(".", 1)[1] for leaf in LEAVES] + ["postfix", "strict"]) | st.text(
    max_size=8
)
documents = st.recursive(
    st.dictionaries(names, toml_values, max_size=4),
    lambda inner: st.dictionaries(names, inner | toml_values, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(documents)
def test_arbitrary_tables_raise_only_config_error(data: dict[str, Any]) -> None:
    try:
        config = config_from_mapping(data, SOURCE)
    except ConfigError as error:
        assert "\n" not in str(error) and str(error).startswith(f"{SOURCE}: ")
    else:
        assert "postfix" in config.profiles and config.listen.socketmap + config.listen.tcp_table


@settings(max_examples=200)
@given(st.sampled_from(LEAVES), toml_scalars)
def test_any_scalar_for_any_key_is_accepted_or_named(key: str, value: Any) -> None:
    table, _, leaf = key.rpartition(".")
    data: dict[str, Any] = {}
    node = data
    for part in table.split("."):
        node = node.setdefault(part, {})
    node[leaf] = value
    try:
        config_from_mapping(data, SOURCE)
    except ConfigError as error:
        # A range error between two keys (negative_ttl_min > max) names both.
        assert str(error).startswith(f"{SOURCE}: ") and key in str(error)


def test_reports_imap_keys() -> None:
    base = '[reports.imap]\nhost = "127.0.0.1"\nuser = "u"\npassword_file = "/pw"\n'
    imap = parse_config(base + "tls = false\n", SOURCE).reports.imap
    assert imap is not None
    assert (imap.tls, imap.port, imap.folder, imap.done_folder) == (False, 143, "INBOX", "")
    imap = parse_config(base + 'port = 1993\nfolder = "TLS"\ndone_folder = "TLS/done"\n', SOURCE).reports.imap
    assert imap is not None
    assert (imap.tls, imap.port, imap.folder, imap.done_folder) == (True, 1993, "TLS", "TLS/done")
    assert "reports.imap.pasword_file" in error_of(base + 'pasword_file = "/x"\n')
    assert "reports.imap.ca_file" in error_of(base + 'ca_file = "/nonexistent/ca.pem"\n')
    assert "reports.imap.folder" in error_of(base + 'folder = ""\n')
    assert "reports.imap.password_file" in error_of('[reports.imap]\nhost = "h"\nuser = "u"\n')


def test_example_file_shows_every_imap_key() -> None:
    text = EXAMPLE.read_text()
    block = text[text.index("# [reports.imap]"):]
    shown = set(re.findall(r"^# ([a-z_]+) = ", block, flags=re.MULTILINE))
    assert shown == {f.name for f in dataclasses.fields(ImapConfig)}
    uncommented = "[reports.imap]\n" + "\n".join(
        line[2:].split("  #")[0] for line in block.splitlines()[1:] if re.match(r"^# [a-z_]+ = ", line)
    )
    imap = parse_config(uncommented.replace('ca_file = ""', ""), "example").reports.imap
    assert imap is not None and imap.host == "imap.example.com" and imap.port == 993


def test_the_built_in_listener_is_the_documented_default_address() -> None:
    """The model spells the default listener out (it cannot parse without a
    cycle); it must stay the address DEFAULT_SOCKETMAP_ADDRESS documents."""
    from postfix_mtasts.config import DEFAULT_SOCKETMAP_ADDRESS

    assert Config().listen.socketmap == (parse_listen_address(DEFAULT_SOCKETMAP_ADDRESS),)
