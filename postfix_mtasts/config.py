"""The daemon's configuration: a TOML file read into frozen dataclasses.

Parsing and validation only (no Twisted, no sockets). Every mistake an
administrator can make becomes one :class:`ConfigError` line naming the file,
the dotted key and what is wrong, so a bad file stops start-up with a message
rather than a traceback.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, TypeVar

from postfix_mtasts import limits

#: The one address the daemon listens on when nothing is configured.
DEFAULT_SOCKETMAP_ADDRESS: Final = "inet:127.0.0.1:8461"
#: The profile (socketmap NAME) that always exists; main.cf uses it by default.
DEFAULT_PROFILE: Final = "postfix"
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

_REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://")
_POSTGRESQL_SCHEMES: Final = ("postgresql://", "postgres://")
_SQL_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_OCTAL_MODE: Final = re.compile(r"0?[0-7]{3}")
_HOSTNAME_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
_DECIMAL: Final = re.compile(r"[0-9]{1,5}")
#: A system user name as useradd(8) accepts it.
_USER_NAME: Final = re.compile(r"[a-z_][a-z0-9_.-]{0,30}\$?")

_T = TypeVar("_T")


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
            return f"{prefix}:{self.port}:interface={_quote_endpoint(self.host)}"
        if self.kind == "unix":
            mode = "" if self.mode is None else f":mode={self.mode:o}"
            return f"unix:{_quote_endpoint(self.path)}{mode}"
        if systemd_domain is None:
            raise ValueError(f"{self}: the address family of a systemd socket must be given")
        if self.systemd_name:
            return f"systemd:domain={systemd_domain}:name={_quote_endpoint(self.systemd_name)}"
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
        default_factory=lambda: (parse_listen_address(DEFAULT_SOCKETMAP_ADDRESS),)
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
    #: SQLite file; empty means the store picks its default location.
    path: str = ""
    memory_entries: int = limits.MEMORY_ENTRIES
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
class MetricsConfig:
    #: Where to serve Prometheus metrics; None: no metrics listener.
    listen: ListenAddress | None = None


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    #: Started as root: become this user once listeners and the cache are
    #: open; empty: keep running as the user that started the daemon.
    user: str = ""


def _default_profiles() -> Mapping[str, Profile]:
    return MappingProxyType({DEFAULT_PROFILE: Profile()})


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
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    #: Where this configuration came from, for messages ("<defaults>" if no file).
    source: str = "<defaults>"


# --- entry points -------------------------------------------------------------


def load_config(path: str | None) -> Config:
    """Read and check the file at ``path``; ``None`` means the defaults, no file read."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(f"{path}: cannot read configuration: {reason}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {error.start})") from None
    return parse_config(text, source=path)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse TOML ``text`` and check every key; ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: TOML syntax error: {_one_line(str(error))}") from None
    except (ValueError, RecursionError) as error:
        # Integers beyond Python's digit limit, absurd nesting: not TOML we accept.
        raise ConfigError(
            f"{source}: cannot parse: {_one_line(str(error)) or type(error).__name__}"
        ) from None
    return config_from_mapping(data, source)


def config_from_mapping(data: Mapping[str, object], source: str = "<config>") -> Config:
    """Check already-parsed TOML data (a dict as tomllib returns) and build a Config."""
    return _Reader(source).config(data)


def parse_listen_address(text: str) -> ListenAddress:
    """Parse "inet:HOST:PORT", "unix:/PATH[:mode=0660]" or "systemd:N|NAME".

    Raises ConfigError whose message describes the problem (without a key),
    so the same check serves the file and a reload.
    """
    if not isinstance(text, str):
        raise ConfigError(f"must be a listen address string, got {_show(text)}")
    kind, sep, rest = text.partition(":")
    if sep and kind == "inet":
        return _parse_inet(text, rest)
    if sep and kind == "unix":
        return _parse_unix(text, rest)
    if sep and kind == "systemd":
        return _parse_systemd(text, rest)
    raise ConfigError(f'must be "inet:HOST:PORT", "unix:/PATH" or "systemd:NAME", got {_show(text)}')


# --- listen addresses ---------------------------------------------------------


def _parse_inet(text: str, rest: str) -> ListenAddress:
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise ConfigError(f'must be "inet:[IPv6]:PORT", got {_show(text)}')
        port_text = tail[1:]
        if not _is_ipv6(host):
            raise ConfigError(f"{_show(host)} in brackets is not an IPv6 address, got {_show(text)}")
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon or not host:
            raise ConfigError(f'must be "inet:HOST:PORT", got {_show(text)}')
        if ":" in host:
            raise ConfigError(f'put an IPv6 address in brackets, "inet:[::1]:PORT", got {_show(text)}')
        if not (_is_ipv4(host) or _is_hostname(host)):
            raise ConfigError(f"{_show(host)} is not an IP address or host name, got {_show(text)}")
    return ListenAddress(kind="inet", host=host, port=_port(port_text, text))


def _parse_unix(text: str, rest: str) -> ListenAddress:
    path, mode_text = rest, None
    match = re.fullmatch(r"(.*):mode=([^:]*)", rest, flags=re.DOTALL)
    if match:
        path, mode_text = match.group(1), match.group(2)
    if not path.startswith("/"):
        raise ConfigError(f'the socket path must be absolute, "unix:/PATH", got {_show(text)}')
    if "\0" in path:
        raise ConfigError(f"the socket path contains a NUL character, got {_show(text)}")
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ConfigError(f"the socket path is longer than {UNIX_PATH_MAX} bytes, got {_show(text)}")
    mode = None
    if mode_text is not None:
        if not _OCTAL_MODE.fullmatch(mode_text):
            raise ConfigError(f'mode must be octal permission bits like "0660", got {_show(text)}')
        mode = int(mode_text, 8)
    return ListenAddress(kind="unix", path=path, mode=mode)


def _parse_systemd(text: str, rest: str) -> ListenAddress:
    if re.fullmatch(r"[0-9]{1,4}", rest):
        return ListenAddress(kind="systemd", systemd_index=int(rest))
    if (
        rest
        and len(rest) <= SYSTEMD_NAME_MAX
        and ":" not in rest
        and all(" " < char < "\x7f" for char in rest)
    ):
        return ListenAddress(kind="systemd", systemd_name=rest)
    raise ConfigError(
        'must be "systemd:N" (index) or "systemd:NAME" (FileDescriptorName=, printable ASCII,'
        f" no colon), got {_show(text)}"
    )


def _port(port_text: str, text: str) -> int:
    if _DECIMAL.fullmatch(port_text) and 1 <= int(port_text) <= 65535:
        return int(port_text)
    raise ConfigError(f"the port must be a number from 1 to 65535, got {_show(text)}")


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _is_hostname(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    if len(text) > 253 or all(label.isdigit() for label in labels):
        return False
    return all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)


def _quote_endpoint(argument: str) -> str:
    """Escape what Twisted's endpoint-string tokenizer treats specially."""
    return re.sub(r"([\\:=])", r"\\\1", argument)


def _parse_nameserver(text: str) -> Nameserver:
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if bracket and _is_ipv6(host) and (not tail or tail.startswith(":")):
            return Nameserver(host, _port(tail[1:], text) if tail else 53)
    elif _is_ipv4(text) or _is_ipv6(text):
        return Nameserver(text)
    else:
        host, _, port_text = text.rpartition(":")
        if _is_ipv4(host):
            return Nameserver(host, _port(port_text, text))
    raise ConfigError(f'must be "IP", "IP:PORT" or "[IPv6]:PORT", got {_show(text)}')


# --- rendering ----------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _show(value: object) -> str:
    """A value as the admin wrote it (TOML-like), short and on one line."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, str):
        shown = json.dumps(value)
    elif isinstance(value, int):
        shown = str(value) if abs(value) < 10**30 else "a very large integer"
    elif isinstance(value, float):
        shown = repr(value)
    elif isinstance(value, Mapping):
        shown = "a table"
    elif isinstance(value, list):
        shown = "[" + ", ".join(_show(item) for item in value[:5]) + (", ...]" if len(value) > 5 else "]")
    else:
        shown = _one_line(str(value))
    if len(shown) > SHOWN_VALUE_MAX:
        shown = shown[: SHOWN_VALUE_MAX - 3] + "..."
    return shown


def _show_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _choices(options: tuple[str, ...]) -> str:
    return ", ".join(json.dumps(option) for option in options)


# --- the reader ---------------------------------------------------------------


class _Reader:
    """Walks the parsed TOML, checking each key and building the dataclasses."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> ConfigError:
        where = f"{key}: " if key else ""
        return ConfigError(f"{self.source}: {where}{problem}")

    def table(self, data: Mapping[str, object], prefix: str, known: tuple[str, ...]) -> Mapping[str, object]:
        """Reject keys of ``data`` not in ``known``, suggesting the closest one."""
        for key in data:
            if key not in known:
                dotted = f"{prefix}.{_show_key(key)}" if prefix else _show_key(key)
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise self.fail("", f"unknown key {dotted}{hint}")
        return data

    def subtable(self, data: Mapping[str, object], key: str, prefix: str) -> Mapping[str, object]:
        value = data.get(key, {})
        dotted = f"{prefix}.{key}" if prefix else key
        if not isinstance(value, Mapping):
            raise self.fail(dotted, f"must be a table ([{dotted}]), got {_show(value)}")
        return value

    def seconds(
        self,
        data: Mapping[str, object],
        key: str,
        prefix: str,
        default: float,
        minimum: float,
        *,
        above: bool = False,
        below: float | None = None,
    ) -> float:
        """A finite number of seconds >= ``minimum`` (> if ``above``), < ``below``."""
        value = data.get(key, default)
        bound = f"> {minimum:g}" if above else f">= {minimum:g}"
        if below is not None:
            bound += f" and < {below:g}"
        dotted = f"{prefix}.{key}"
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and math.isnan(value))
            or (value <= minimum if above else value < minimum)
            or (below is not None and value >= below)
        ):
            raise self.fail(dotted, f"must be a number of seconds {bound}, got {_show(value)}")
        if value > SECONDS_MAX:
            raise self.fail(dotted, f"must be at most {SECONDS_MAX} seconds (ten years), got {_show(value)}")
        return float(value)

    def integer(
        self,
        data: Mapping[str, object],
        key: str,
        prefix: str,
        default: int,
        minimum: int,
        maximum: int,
    ) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self.fail(
                f"{prefix}.{key}",
                f"must be a whole number from {minimum} to {maximum}, got {_show(value)}",
            )
        return value

    def boolean(self, data: Mapping[str, object], key: str, prefix: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(
                f"{prefix}.{key}",
                f"must be true or false (no quotes), got {_show(value)}",
            )
        return value

    def string(self, data: Mapping[str, object], key: str, prefix: str, default: str) -> str:
        value = data.get(key, default)
        if not isinstance(value, str):
            raise self.fail(f"{prefix}.{key}", f"must be a string, got {_show(value)}")
        if "\0" in value:
            raise self.fail(
                f"{prefix}.{key}",
                f"must not contain a NUL character, got {_show(value)}",
            )
        return value

    def choice(
        self,
        data: Mapping[str, object],
        key: str,
        prefix: str,
        options: tuple[str, ...],
        default: str,
    ) -> str:
        value = data.get(key, default)
        if value not in options or not isinstance(value, str):
            close = difflib.get_close_matches(value, options, n=1) if isinstance(value, str) else []
            hint = f" (did you mean {json.dumps(close[0])}?)" if close else ""
            raise self.fail(
                f"{prefix}.{key}",
                f"must be one of {_choices(options)}, got {_show(value)}{hint}",
            )
        return value

    def path(self, data: Mapping[str, object], key: str, prefix: str) -> str:
        """An absolute path, or empty for "the built-in default"."""
        value = self.string(data, key, prefix, "")
        if value and not value.startswith("/"):
            raise self.fail(
                f"{prefix}.{key}",
                f"must be an absolute path or empty, got {_show(value)}",
            )
        return value

    def items(
        self,
        data: Mapping[str, object],
        key: str,
        prefix: str,
        parse: Callable[[str], _T],
        example: str,
    ) -> tuple[_T, ...]:
        """A list of strings, each turned into a value by ``parse``."""
        value = data.get(key, [])
        dotted = f"{prefix}.{key}"
        if not isinstance(value, list):
            raise self.fail(
                dotted,
                f"must be a list, e.g. [{json.dumps(example)}], got {_show(value)}",
            )
        result = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(f"{dotted}[{index}]", f"must be a string, got {_show(item)}")
            try:
                result.append(parse(item))
            except ConfigError as error:
                raise self.fail(f"{dotted}[{index}]", str(error)) from None
        return tuple(result)

    # -- sections --

    def config(self, data: Mapping[str, object]) -> Config:
        known = (
            "listen",
            "cache",
            "resolver",
            "policy",
            "profiles",
            "dane",
            "log",
            "control",
            "metrics",
            "service",
        )
        self.table(data, "", known)
        config = Config(
            listen=self.listen(self.subtable(data, "listen", "")),
            cache=self.cache(self.subtable(data, "cache", "")),
            resolver=self.resolver(self.subtable(data, "resolver", "")),
            policy=self.policy(self.subtable(data, "policy", "")),
            profiles=self.profiles(self.subtable(data, "profiles", "")),
            dane=self.dane(self.subtable(data, "dane", "")),
            log=self.log(self.subtable(data, "log", "")),
            control=self.control(self.subtable(data, "control", "")),
            metrics=self.metrics(self.subtable(data, "metrics", "")),
            service=self.service(self.subtable(data, "service", "")),
            source=self.source,
        )
        self.check_distinct_addresses(config)
        self.check_dane_resolver(config)
        return config

    def listen(self, data: Mapping[str, object]) -> ListenConfig:
        prefix = "listen"
        self.table(
            data,
            prefix,
            (
                "socketmap",
                "tcp_table",
                "socketmap_idle_timeout",
                "tcp_table_idle_timeout",
                "backlog",
            ),
        )
        defaults = ListenConfig()
        socketmap = (
            self.items(
                data,
                "socketmap",
                prefix,
                parse_listen_address,
                DEFAULT_SOCKETMAP_ADDRESS,
            )
            if "socketmap" in data
            else defaults.socketmap
        )
        tcp_table = self.items(data, "tcp_table", prefix, parse_listen_address, "inet:127.0.0.1:8462")
        if not socketmap and not tcp_table:
            raise self.fail(
                prefix,
                "socketmap and tcp_table are both empty; the daemon would not listen at all",
            )
        return ListenConfig(
            socketmap=socketmap,
            tcp_table=tcp_table,
            socketmap_idle_timeout=self.seconds(
                data, "socketmap_idle_timeout", prefix, limits.SOCKETMAP_IDLE_TIMEOUT, 1
            ),
            tcp_table_idle_timeout=self.seconds(
                data, "tcp_table_idle_timeout", prefix, limits.TCP_TABLE_IDLE_TIMEOUT, 1
            ),
            backlog=self.integer(data, "backlog", prefix, 0, 0, LISTEN_BACKLOG_MAX),
        )

    def cache(self, data: Mapping[str, object]) -> CacheConfig:
        prefix = "cache"
        self.table(data, prefix, ("backend", "path", "memory_entries", "redis", "postgresql"))
        backend = self.choice(data, "backend", prefix, CACHE_BACKENDS, "sqlite")
        return CacheConfig(
            backend=backend,  # type: ignore[arg-type]  # checked against CACHE_BACKENDS
            path=self.path(data, "path", prefix),
            memory_entries=self.integer(
                data,
                "memory_entries",
                prefix,
                limits.MEMORY_ENTRIES,
                1,
                MEMORY_ENTRIES_MAX,
            ),
            redis=self.redis(self.subtable(data, "redis", prefix)),
            postgresql=self.postgresql(self.subtable(data, "postgresql", prefix)),
        )

    def redis(self, data: Mapping[str, object]) -> RedisConfig:
        prefix = "cache.redis"
        self.table(data, prefix, ("url", "key_prefix", "sentinels", "sentinel_service"))
        url = self.string(data, "url", prefix, DEFAULT_REDIS_URL)
        if not url.startswith(_REDIS_SCHEMES):
            raise self.fail(
                f"{prefix}.url",
                f"must start with {', '.join(_REDIS_SCHEMES)}, got {_show(url)}",
            )
        sentinels = self.items(data, "sentinels", prefix, _parse_sentinel, "10.0.0.1:26379")
        service = self.string(data, "sentinel_service", prefix, "")
        if sentinels and not service:
            raise self.fail(
                f"{prefix}.sentinel_service",
                "must name the monitored master when sentinels are set",
            )
        return RedisConfig(
            url=url,
            key_prefix=self.string(data, "key_prefix", prefix, DEFAULT_REDIS_KEY_PREFIX),
            sentinels=sentinels,
            sentinel_service=service,
        )

    def postgresql(self, data: Mapping[str, object]) -> PostgresqlConfig:
        prefix = "cache.postgresql"
        self.table(data, prefix, ("dsn", "schema"))
        dsn = self.string(data, "dsn", prefix, DEFAULT_POSTGRESQL_DSN)
        if not dsn.strip():
            raise self.fail(
                f"{prefix}.dsn",
                'must not be empty, e.g. "postgresql://localhost/postfix_mtasts"',
            )
        schema = self.string(data, "schema", prefix, DEFAULT_POSTGRESQL_SCHEMA)
        if not _SQL_IDENTIFIER.fullmatch(schema):
            raise self.fail(
                f"{prefix}.schema",
                f"must be a plain SQL name (letters, digits, _), got {_show(schema)}",
            )
        return PostgresqlConfig(dsn=dsn, schema=schema)

    def resolver(self, data: Mapping[str, object]) -> ResolverConfig:
        prefix = "resolver"
        self.table(data, prefix, ("nameservers", "ca_file", "dns_timeout", "fetch_timeout", "https_port"))
        ca_file = self.path(data, "ca_file", prefix)
        if ca_file and not os.path.isfile(ca_file):
            problem = "is not a file" if os.path.exists(ca_file) else "does not exist"
            raise self.fail(f"{prefix}.ca_file", f"{json.dumps(ca_file)} {problem}")
        return ResolverConfig(
            nameservers=self.items(data, "nameservers", prefix, _parse_nameserver, "127.0.0.1"),
            ca_file=ca_file,
            dns_timeout=self.seconds(data, "dns_timeout", prefix, limits.DNS_TIMEOUT, 0, above=True),
            fetch_timeout=self.seconds(data, "fetch_timeout", prefix, limits.FETCH_TIMEOUT, 0, above=True),
            https_port=self.integer(data, "https_port", prefix, 443, 1, 65535),
        )

    def policy(self, data: Mapping[str, object]) -> PolicyConfig:
        prefix = "policy"
        keys = tuple(PolicyConfig.__dataclass_fields__)
        self.table(data, prefix, keys)
        negative_ttl_min = self.seconds(data, "negative_ttl_min", prefix, limits.NEGATIVE_TTL_MIN, 1)
        negative_ttl_max = self.seconds(data, "negative_ttl_max", prefix, limits.NEGATIVE_TTL_MAX, 1)
        if negative_ttl_max < negative_ttl_min:
            raise self.fail(
                f"{prefix}.negative_ttl_max",
                f"must be >= policy.negative_ttl_min ({negative_ttl_min:g}), got {negative_ttl_max:g}",
            )
        return PolicyConfig(
            recheck_interval=self.seconds(data, "recheck_interval", prefix, limits.RECHECK_INTERVAL, 1),
            recheck_deadline=self.seconds(
                data,
                "recheck_deadline",
                prefix,
                limits.RECHECK_DEADLINE,
                0,
                below=POSTFIX_LOOKUP_TIMEOUT,
            ),
            first_lookup_deadline=self.seconds(
                data,
                "first_lookup_deadline",
                prefix,
                limits.FIRST_LOOKUP_DEADLINE,
                0,
                above=True,
                below=POSTFIX_LOOKUP_TIMEOUT,
            ),
            on_first_lookup_timeout=self.choice(  # type: ignore[arg-type]  # checked against the options
                data,
                "on_first_lookup_timeout",
                prefix,
                FIRST_LOOKUP_TIMEOUT_ANSWERS,
                "notfound",
            ),
            fetch_retry_backoff=self.seconds(
                data, "fetch_retry_backoff", prefix, limits.FETCH_RETRY_BACKOFF, 1
            ),
            negative_ttl_min=negative_ttl_min,
            negative_ttl_max=negative_ttl_max,
            refresh_after=self.seconds(data, "refresh_after", prefix, limits.REFRESH_AFTER, 1),
            refresh_concurrency=self.integer(
                data,
                "refresh_concurrency",
                prefix,
                limits.REFRESH_CONCURRENCY,
                1,
                REFRESH_CONCURRENCY_MAX,
            ),
            refresh_jitter=self.seconds(data, "refresh_jitter", prefix, limits.REFRESH_JITTER, 0),
            refresh_idle_limit=self.seconds(data, "refresh_idle_limit", prefix, limits.REFRESH_IDLE_LIMIT, 1),
            bracketed_next_hop=self.choice(  # type: ignore[arg-type]  # checked against the options
                data, "bracketed_next_hop", prefix, BRACKETED_NEXT_HOP_MODES, "ignore"
            ),
        )

    def profiles(self, data: Mapping[str, object]) -> Mapping[str, Profile]:
        profiles = {DEFAULT_PROFILE: Profile()}
        for name in data:
            if not PROFILE_NAME_PATTERN.fullmatch(name):
                raise self.fail(
                    "profiles",
                    f"profile name {json.dumps(name)} must be 1-64 letters, digits, _ or -"
                    " (it is a socketmap NAME)",
                )
            prefix = f"profiles.{name}"
            section = self.subtable(data, name, "profiles")
            self.table(section, prefix, tuple(Profile.__dataclass_fields__))
            profiles[name] = Profile(
                enforce_testing=self.boolean(section, "enforce_testing", prefix, False),
                tlsrpt=self.boolean(section, "tlsrpt", prefix, False),
                tlsrpt_policy_failure=self.boolean(section, "tlsrpt_policy_failure", prefix, False),
                dane=self.boolean(section, "dane", prefix, False),
            )
        return MappingProxyType(profiles)

    def dane(self, data: Mapping[str, object]) -> DaneConfig:
        prefix = "dane"
        self.table(data, prefix, ("nameservers", "timeout"))
        return DaneConfig(
            nameservers=self.items(data, "nameservers", prefix, _parse_nameserver, "127.0.0.1"),
            timeout=self.seconds(data, "timeout", prefix, limits.DNS_TIMEOUT, 0, above=True),
        )

    def log(self, data: Mapping[str, object]) -> LogConfig:
        prefix = "log"
        self.table(data, prefix, ("level", "syslog"))
        level = self.choice(data, "level", prefix, LOG_LEVELS, "info")
        return LogConfig(
            level=level,  # type: ignore[arg-type]  # checked against LOG_LEVELS
            syslog=self.boolean(data, "syslog", prefix, False),
        )

    def control(self, data: Mapping[str, object]) -> ControlConfig:
        prefix = "control"
        self.table(data, prefix, ("socket", "mode"))
        socket_path = self.path(data, "socket", prefix)
        if len(os.fsencode(socket_path)) > UNIX_PATH_MAX:
            raise self.fail(
                f"{prefix}.socket",
                f"is longer than {UNIX_PATH_MAX} bytes, got {_show(socket_path)}",
            )
        mode = data.get("mode", f"{DEFAULT_CONTROL_MODE:04o}")
        if not isinstance(mode, str) or not _OCTAL_MODE.fullmatch(mode):
            raise self.fail(
                f"{prefix}.mode",
                f'must be octal permission bits in quotes, e.g. "0660", got {_show(mode)}',
            )
        return ControlConfig(socket=socket_path, mode=int(mode, 8))

    def metrics(self, data: Mapping[str, object]) -> MetricsConfig:
        prefix = "metrics"
        self.table(data, prefix, ("listen",))
        text = self.string(data, "listen", prefix, "")
        if not text:
            return MetricsConfig()
        try:
            return MetricsConfig(listen=parse_listen_address(text))
        except ConfigError as error:
            raise self.fail(f"{prefix}.listen", str(error)) from None

    def service(self, data: Mapping[str, object]) -> ServiceConfig:
        prefix = "service"
        self.table(data, prefix, ("user",))
        user = self.string(data, "user", prefix, "")
        if user and not _USER_NAME.fullmatch(user):
            raise self.fail(
                f"{prefix}.user",
                f"must be a user name like \"postfix-mtasts\" or empty, got {_show(user)}",
            )
        return ServiceConfig(user=user)

    def check_dane_resolver(self, config: Config) -> None:
        """DANE answers are only as good as the resolver that validates them:
        never fall back to an unnamed (resolv.conf) one."""
        users = sorted(name for name, profile in config.profiles.items() if profile.dane)
        if users and not config.dane.nameservers:
            raise self.fail(
                "dane.nameservers",
                f"must name the DNSSEC-validating resolver, e.g. [\"127.0.0.1\"], "
                f"since profiles.{users[0]}.dane is true",
            )

    def check_distinct_addresses(self, config: Config) -> None:
        """Two listeners on one address would fail at bind time with a worse message."""
        seen: dict[ListenAddress, str] = {}
        named = [
            *((f"listen.socketmap[{i}]", a) for i, a in enumerate(config.listen.socketmap)),
            *((f"listen.tcp_table[{i}]", a) for i, a in enumerate(config.listen.tcp_table)),
        ]
        if config.metrics.listen is not None:
            named.append(("metrics.listen", config.metrics.listen))
        for key, address in named:
            identity = ListenAddress(
                kind=address.kind,
                host=address.host,
                port=address.port,
                path=address.path,
                systemd_index=address.systemd_index,
                systemd_name=address.systemd_name,
            )
            if identity in seen:
                raise self.fail(key, f"{address} is already used by {seen[identity]}")
            seen[identity] = key


def _parse_sentinel(text: str) -> str:
    """A Sentinel as "host:port" (IPv6 in brackets); kept as text for the Redis backend."""
    host, colon, port_text = text.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if colon and (_is_ipv4(bare) or _is_ipv6(bare) or _is_hostname(bare)):
        _port(port_text, text)
        return text
    raise ConfigError(f'must be "HOST:PORT", got {_show(text)}')
