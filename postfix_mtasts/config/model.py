"""The configuration's values: frozen dataclasses, their defaults and bounds.

``Config()`` is the built-in configuration; :mod:`postfix_mtasts.config.sections`
builds one from a file. Pure values: no I/O, no Twisted."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

from postfix_mtasts import limits

#: The one address the daemon listens on when nothing is configured.
DEFAULT_SOCKETMAP_ADDRESS: Final = "inet:127.0.0.1:8461"
#: The profile (socketmap NAME) that always exists; main.cf uses it by default.
DEFAULT_PROFILE: Final = "postfix"
#: A second built-in profile, for Postfix 3.10 and later: the default one plus
#: the TLSRPT attributes (tlsrpt = true), whose mx_host_pattern attributes
#: Postfix 3.10.5's smtp_tls_enforce_sts_mx_patterns needs. Chosen in main.cf
#: alone (socketmap:...:postfix310); a [profiles.postfix310] table replaces it.
STS_PROFILE: Final = "postfix310"
#: Postfix gives up on a socketmap/tcp_table lookup after 100 seconds, so our
#: own waits must end well before that.
POSTFIX_LOOKUP_TIMEOUT: Final = 100.0
#: Longest unix socket path the kernel accepts (sun_path is 108 bytes with NUL).
UNIX_PATH_MAX: Final = 107
#: systemd's limit on FileDescriptorName= (systemd.socket(5)).
SYSTEMD_NAME_MAX: Final = 255
#: A socketmap NAME, i.e. a profile name.
PROFILE_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Largest number of seconds any setting accepts; more is surely a typo, and
#: keeps every value within what a float and the reactor's clock handle.
SECONDS_MAX: Final = 10 * 365 * 86_400
#: Upper bounds of the whole-number settings, for the same reason.
MEMORY_ENTRIES_MAX: Final = 100_000_000
REFRESH_CONCURRENCY_MAX: Final = 1_000
#: Largest listen backlog accepted; the kernel caps it at net.core.somaxconn anyway.
LISTEN_BACKLOG_MAX: Final = 65_535
#: Longest rendering of an offending value inside an error message.
SHOWN_VALUE_MAX: Final = 60

CACHE_BACKENDS: Final = ("sqlite", "memory", "redis", "postgresql")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
FIRST_LOOKUP_TIMEOUT_ANSWERS: Final = ("notfound", "temp")
BRACKETED_NEXT_HOP_MODES: Final = ("ignore", "host")

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
DEFAULT_REDIS_KEY_PREFIX: Final = "mtasts:"
DEFAULT_POSTGRESQL_DSN: Final = "postgresql://localhost/postfix_mtasts"
DEFAULT_POSTGRESQL_SCHEMA: Final = "mtasts"
DEFAULT_CONTROL_MODE: Final = 0o660

#: Defaults and bounds of the ``[reports]`` alert keys.
DEFAULT_ALERT_RATIO: Final = 0.05
DEFAULT_ALERT_WINDOW: Final = 3 * 86_400.0
#: Reports cover a day each; a window shorter than an hour would hold none.
ALERT_WINDOW_MIN: Final = 3_600.0
DEFAULT_ALERT_MIN_SESSIONS: Final = 10
ALERT_MIN_SESSIONS_MAX: Final = 1_000_000_000
DEFAULT_REPORTER_SILENCE_DAYS: Final = 7
SILENCE_DAYS_MAX: Final = 3_650
DEFAULT_SENDMAIL_PATH: Final = "/usr/sbin/sendmail"



def quote_endpoint(argument: str) -> str:
    """Escape what Twisted's endpoint-string tokenizer treats specially."""
    return re.sub(r"([\\:=])", r"\\\1", argument)


class ConfigError(Exception):
    """A configuration mistake; ``str(error)`` is one line fit for the admin."""


# --- values -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where one listener accepts connections: TCP, a unix socket or a socket from systemd."""

    kind: Literal["inet", "unix", "systemd"]
    host: str = ""
    port: int = 0
    path: str = ""
    #: Permission bits of a unix socket; None keeps Twisted's default (0666).
    mode: int | None = None
    #: Position among the sockets systemd passed (LISTEN_FDS), for "systemd:N".
    systemd_index: int | None = None
    #: FileDescriptorName= of the socket systemd passed, for "systemd:NAME".
    systemd_name: str = ""

    def __str__(self) -> str:
        if self.kind == "inet":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"inet:{host}:{self.port}"
        if self.kind == "unix":
            mode = "" if self.mode is None else f":mode={self.mode:04o}"
            return f"unix:{self.path}{mode}"
        return f"systemd:{self.systemd_name or self.systemd_index}"

    def endpoint_description(self, systemd_domain: str | None = None) -> str:
        """A Twisted ``serverFromString`` description of this address.

        A systemd socket's address family is only known once the descriptor is
        inherited, so the service passes it as ``systemd_domain`` ("INET",
        "INET6" or "UNIX"); without it a systemd address raises ValueError.
        """
        if self.kind == "inet":
            prefix = "tcp6" if ":" in self.host else "tcp"
            return f"{prefix}:{self.port}:interface={quote_endpoint(self.host)}"
        if self.kind == "unix":
            mode = "" if self.mode is None else f":mode={self.mode:o}"
            return f"unix:{quote_endpoint(self.path)}{mode}"
        if systemd_domain is None:
            raise ValueError(f"{self}: the address family of a systemd socket must be given")
        if self.systemd_name:
            return f"systemd:domain={systemd_domain}:name={quote_endpoint(self.systemd_name)}"
        return f"systemd:domain={systemd_domain}:index={self.systemd_index}"


@dataclass(frozen=True, slots=True)
class Nameserver:
    """One DNS server to query instead of those in /etc/resolv.conf."""

    address: str
    port: int = 53

    def __str__(self) -> str:
        """``IP:PORT``, with an IPv6 address in brackets."""
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenConfig:
    socketmap: tuple[ListenAddress, ...] = field(
        default_factory=lambda: (ListenAddress(kind="inet", host="127.0.0.1", port=8461),)
    )
    tcp_table: tuple[ListenAddress, ...] = ()
    socketmap_idle_timeout: float = limits.SOCKETMAP_IDLE_TIMEOUT
    tcp_table_idle_timeout: float = limits.TCP_TABLE_IDLE_TIMEOUT
    #: Connections the kernel queues on each listener before the daemon accepts
    #: them; 0: as many as it allows (net.core.somaxconn).
    backlog: int = 0


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = DEFAULT_REDIS_URL
    key_prefix: str = DEFAULT_REDIS_KEY_PREFIX
    #: "host:port" of each Redis Sentinel; empty: connect to ``url`` directly.
    sentinels: tuple[str, ...] = ()
    sentinel_service: str = ""


@dataclass(frozen=True, slots=True)
class PostgresqlConfig:
    dsn: str = DEFAULT_POSTGRESQL_DSN
    schema: str = DEFAULT_POSTGRESQL_SCHEMA


@dataclass(frozen=True, slots=True)
class CacheConfig:
    backend: Literal["sqlite", "memory", "redis", "postgresql"] = "sqlite"
    #: SQLite file; empty means the store picks its default location. With a
    #: shared backend it holds the daemon's local copy.
    path: str = ""
    memory_entries: int = limits.MEMORY_ENTRIES
    #: With a shared backend: keep a local durable copy (cache.layered) under it.
    local_copy: bool = True
    #: With a shared backend: how long start-up waits for it to open.
    open_deadline: float = limits.STORE_OPEN_DEADLINE
    redis: RedisConfig = field(default_factory=RedisConfig)
    postgresql: PostgresqlConfig = field(default_factory=PostgresqlConfig)


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    #: Empty: use /etc/resolv.conf.
    nameservers: tuple[Nameserver, ...] = ()
    #: PEM bundle for policy fetches; empty: the system trust store.
    ca_file: str = ""
    dns_timeout: float = limits.DNS_TIMEOUT
    fetch_timeout: float = limits.FETCH_TIMEOUT
    #: RFC 8461 fixes 443; another port exists for test set-ups only.
    https_port: int = 443


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    recheck_interval: float = limits.RECHECK_INTERVAL
    recheck_deadline: float = limits.RECHECK_DEADLINE
    first_lookup_deadline: float = limits.FIRST_LOOKUP_DEADLINE
    on_first_lookup_timeout: Literal["notfound", "temp"] = "notfound"
    fetch_retry_backoff: float = limits.FETCH_RETRY_BACKOFF
    negative_ttl_min: float = limits.NEGATIVE_TTL_MIN
    negative_ttl_max: float = limits.NEGATIVE_TTL_MAX
    refresh_after: float = limits.REFRESH_AFTER
    refresh_concurrency: int = limits.REFRESH_CONCURRENCY
    refresh_jitter: float = limits.REFRESH_JITTER
    refresh_idle_limit: float = limits.REFRESH_IDLE_LIMIT
    bracketed_next_hop: Literal["ignore", "host"] = "ignore"


@dataclass(frozen=True, slots=True)
class Profile:
    """How answers are shaped for one socketmap NAME (main.cf picks it)."""

    #: Answer policies in testing mode as if they were in enforce mode.
    enforce_testing: bool = False
    #: Postfix 3.10+: add the TLSRPT attributes (policy_type, policy_domain,
    #: mx_host_pattern, policy_string) to MTA-STS answers.
    tlsrpt: bool = False
    #: Postfix 3.10+: answer a domain whose promised policy cannot be fetched
    #: or validated with policy_failure=... (Postfix defers its mail and
    #: reports the failure) instead of "not found" (delivery without MTA-STS).
    tlsrpt_policy_failure: bool = False
    #: For a Postfix doing DANE (smtp_dns_support_level = dnssec): TLSA
    #: records proven by DNSSEC take precedence over an MTA-STS answer.
    dane: bool = False


@dataclass(frozen=True, slots=True)
class DaneConfig:
    """The validating resolver behind the profiles' ``dane = true``."""

    #: DNSSEC-validating resolvers trusted to set the AD bit; required when a
    #: profile sets ``dane = true``.
    nameservers: tuple[Nameserver, ...] = ()
    timeout: float = limits.DNS_TIMEOUT


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: Log to syslog's mail facility instead of stderr.
    syslog: bool = False


@dataclass(frozen=True, slots=True)
class ControlConfig:
    #: Unix socket for ``postfix-mtasts ctl``; empty: resolved by the service.
    socket: str = ""
    mode: int = DEFAULT_CONTROL_MODE


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The HTTP listener: Prometheus metrics at /metrics, the TLS report dashboard at /reports."""

    #: Where to listen; None: no HTTP listener.
    listen: ListenAddress | None = None
    #: The key it was set with, for messages: "http.listen" or its older name "metrics.listen".
    key: str = "http.listen"


@dataclass(frozen=True, slots=True)
class ImapConfig:
    """An IMAP folder the daemon reads TLS reports from (``[reports.imap]``)."""

    host: str
    user: str
    #: File holding the password (its first line); kept out of the config file.
    password_file: str
    #: 993 with TLS, 143 without, unless set.
    port: int = 993
    #: TLS from the first byte (IMAPS); false: plain IMAP, for a loopback server only.
    tls: bool = True
    #: PEM bundle to verify the server; empty: the system trust store.
    ca_file: str = ""
    folder: str = "INBOX"
    #: Where read messages are moved; empty: they stay in ``folder``, marked read.
    done_folder: str = ""


@dataclass(frozen=True, slots=True)
class ReportsConfig:
    """The TLS report store (``[reports]``), the mailboxes the daemon reads into it, and what it
    watches in the stored reports."""

    #: SQLite file; empty: reports.sqlite3 beside the policy cache.
    path: str = ""
    #: PostgreSQL connection string; set: reports are kept there instead of ``path``.
    dsn: str = ""
    schema: str = DEFAULT_POSTGRESQL_SCHEMA
    #: A Maildir whose new mail the daemon ingests; empty: none.
    maildir: str = ""
    imap: ImapConfig | None = None
    #: Seconds between two looks at the Maildir and the IMAP folder.
    poll_interval: float = limits.REPORTS_POLL_INTERVAL
    #: A policy domain alerts when this share of its sessions failed over ``alert_window``.
    alert_ratio: float = DEFAULT_ALERT_RATIO
    #: Seconds of reports (by the end of their date range) the ratio is taken over.
    alert_window: float = DEFAULT_ALERT_WINDOW
    #: Fewer sessions than this in the window neither raise nor clear an alert.
    alert_min_sessions: int = DEFAULT_ALERT_MIN_SESSIONS
    #: Mail alerts to this address through sendmail; empty: log and metrics only.
    alert_mail_to: str = ""
    sendmail_path: str = DEFAULT_SENDMAIL_PATH
    #: Warn about a reporter with no report for more than this many days; 0: never.
    reporter_silence_days: int = DEFAULT_REPORTER_SILENCE_DAYS


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    #: Started as root: become this user once listeners and the cache are
    #: open; empty: keep running as the user that started the daemon.
    user: str = ""


def builtin_profiles() -> dict[str, Profile]:
    """The profiles that exist without a [profiles] table."""
    return {DEFAULT_PROFILE: Profile(), STS_PROFILE: Profile(tlsrpt=True)}


def _default_profiles() -> Mapping[str, Profile]:
    return MappingProxyType(builtin_profiles())


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; ``Config()`` is the built-in defaults."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    profiles: Mapping[str, Profile] = field(default_factory=_default_profiles)
    dane: DaneConfig = field(default_factory=DaneConfig)
    log: LogConfig = field(default_factory=LogConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    reports: ReportsConfig = field(default_factory=ReportsConfig)
    #: Where this configuration came from, for messages ("<defaults>" if no file).
    source: str = "<defaults>"
