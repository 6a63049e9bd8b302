"""Each section of the configuration file, checked key by key into its dataclass,
and the entry points that read a file or text."""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from postfix_mtasts import limits
from postfix_mtasts.config.addresses import OCTAL_MODE, parse_listen_address, parse_nameserver, parse_sentinel
from postfix_mtasts.config.model import (
    ALERT_MIN_SESSIONS_MAX,
    ALERT_WINDOW_MIN,
    BRACKETED_NEXT_HOP_MODES,
    CACHE_BACKENDS,
    DEFAULT_ALERT_MIN_SESSIONS,
    DEFAULT_ALERT_RATIO,
    DEFAULT_ALERT_WINDOW,
    DEFAULT_CONTROL_MODE,
    DEFAULT_POSTGRESQL_DSN,
    DEFAULT_POSTGRESQL_SCHEMA,
    DEFAULT_REDIS_KEY_PREFIX,
    DEFAULT_REDIS_URL,
    DEFAULT_REPORTER_SILENCE_DAYS,
    DEFAULT_SENDMAIL_PATH,
    DEFAULT_SOCKETMAP_ADDRESS,
    FIRST_LOOKUP_TIMEOUT_ANSWERS,
    LISTEN_BACKLOG_MAX,
    LOG_LEVELS,
    MEMORY_ENTRIES_MAX,
    POSTFIX_LOOKUP_TIMEOUT,
    PROFILE_NAME_PATTERN,
    REFRESH_CONCURRENCY_MAX,
    SILENCE_DAYS_MAX,
    UNIX_PATH_MAX,
    CacheConfig,
    Config,
    ConfigError,
    ControlConfig,
    DaneConfig,
    HttpConfig,
    ImapConfig,
    ListenAddress,
    ListenConfig,
    LogConfig,
    PolicyConfig,
    PostgresqlConfig,
    Profile,
    RedisConfig,
    ReportsConfig,
    ResolverConfig,
    ServiceConfig,
    builtin_profiles,
)
from postfix_mtasts.config.text import one_line, show
from postfix_mtasts.config.values import ValueReader

_REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://")
_POSTGRESQL_SCHEMES: Final = ("postgresql://", "postgres://")
_SQL_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
#: A system user name as useradd(8) accepts it.
#: One plain mail address (no display name, no list): what sendmail takes as a recipient.
_MAIL_ADDRESS: Final = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~][A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{0,63}@[A-Za-z0-9][A-Za-z0-9.-]{0,252}"
)
_USER_NAME: Final = re.compile(r"[a-z_][a-z0-9_.-]{0,30}\$?")


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
        raise ConfigError(f"{source}: TOML syntax error: {one_line(str(error))}") from None
    except (ValueError, RecursionError) as error:
        # Integers beyond Python's digit limit, absurd nesting: not TOML we accept.
        raise ConfigError(
            f"{source}: cannot parse: {one_line(str(error)) or type(error).__name__}"
        ) from None
    return config_from_mapping(data, source)


def config_from_mapping(data: Mapping[str, object], source: str = "<config>") -> Config:
    """Check already-parsed TOML data (a dict as tomllib returns) and build a Config."""
    return _Sections(source).config(data)


class _Sections(ValueReader):
    """Walks the parsed TOML, section by section, building the dataclasses."""

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
            "http",
            "metrics",
            "service",
            "reports",
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
            http=self.http(self.subtable(data, "http", ""), self.subtable(data, "metrics", "")),
            service=self.service(self.subtable(data, "service", "")),
            reports=self.reports(self.subtable(data, "reports", "")),
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
                data, "socketmap_idle_timeout", prefix, defaults.socketmap_idle_timeout, 1
            ),
            tcp_table_idle_timeout=self.seconds(
                data, "tcp_table_idle_timeout", prefix, defaults.tcp_table_idle_timeout, 1
            ),
            backlog=self.integer(data, "backlog", prefix, defaults.backlog, 0, LISTEN_BACKLOG_MAX),
        )

    def cache(self, data: Mapping[str, object]) -> CacheConfig:
        prefix = "cache"
        defaults = CacheConfig()
        self.table(data, prefix, ("backend", "path", "memory_entries", "local_copy", "open_deadline",
                                  "redis", "postgresql"))
        backend = self.choice(data, "backend", prefix, CACHE_BACKENDS, "sqlite")
        return CacheConfig(
            backend=backend,  # type: ignore[arg-type]  # checked against CACHE_BACKENDS
            path=self.path(data, "path", prefix),
            memory_entries=self.integer(
                data,
                "memory_entries",
                prefix,
                defaults.memory_entries,
                1,
                MEMORY_ENTRIES_MAX,
            ),
            local_copy=self.boolean(data, "local_copy", prefix, True),
            open_deadline=self.seconds(
                data, "open_deadline", prefix, defaults.open_deadline, 0, above=True
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
                f"must start with {', '.join(_REDIS_SCHEMES)}, got {show(url)}",
            )
        sentinels = self.items(data, "sentinels", prefix, parse_sentinel, "10.0.0.1:26379")
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
                f"must be a plain SQL name (letters, digits, _), got {show(schema)}",
            )
        return PostgresqlConfig(dsn=dsn, schema=schema)

    def resolver(self, data: Mapping[str, object]) -> ResolverConfig:
        prefix = "resolver"
        defaults = ResolverConfig()
        self.table(data, prefix, ("nameservers", "ca_file", "dns_timeout", "fetch_timeout", "https_port"))
        ca_file = self.path(data, "ca_file", prefix)
        if ca_file and not os.path.isfile(ca_file):
            problem = "is not a file" if os.path.exists(ca_file) else "does not exist"
            raise self.fail(f"{prefix}.ca_file", f"{json.dumps(ca_file)} {problem}")
        return ResolverConfig(
            nameservers=self.items(data, "nameservers", prefix, parse_nameserver, "127.0.0.1"),
            ca_file=ca_file,
            dns_timeout=self.seconds(data, "dns_timeout", prefix, defaults.dns_timeout, 0, above=True),
            fetch_timeout=self.seconds(data, "fetch_timeout", prefix, defaults.fetch_timeout, 0, above=True),
            https_port=self.integer(data, "https_port", prefix, 443, 1, 65535),
        )

    def policy(self, data: Mapping[str, object]) -> PolicyConfig:
        prefix = "policy"
        defaults = PolicyConfig()
        keys = tuple(PolicyConfig.__dataclass_fields__)
        self.table(data, prefix, keys)
        negative_ttl_min = self.seconds(data, "negative_ttl_min", prefix, defaults.negative_ttl_min, 1)
        negative_ttl_max = self.seconds(data, "negative_ttl_max", prefix, defaults.negative_ttl_max, 1)
        if negative_ttl_max < negative_ttl_min:
            raise self.fail(
                f"{prefix}.negative_ttl_max",
                f"must be >= policy.negative_ttl_min ({negative_ttl_min:g}), got {negative_ttl_max:g}",
            )
        return PolicyConfig(
            recheck_interval=self.seconds(data, "recheck_interval", prefix, defaults.recheck_interval, 1),
            recheck_deadline=self.seconds(
                data,
                "recheck_deadline",
                prefix,
                defaults.recheck_deadline,
                0,
                below=POSTFIX_LOOKUP_TIMEOUT,
            ),
            first_lookup_deadline=self.seconds(
                data,
                "first_lookup_deadline",
                prefix,
                defaults.first_lookup_deadline,
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
                data, "fetch_retry_backoff", prefix, defaults.fetch_retry_backoff, 1
            ),
            negative_ttl_min=negative_ttl_min,
            negative_ttl_max=negative_ttl_max,
            refresh_after=self.seconds(data, "refresh_after", prefix, defaults.refresh_after, 1),
            refresh_concurrency=self.integer(
                data,
                "refresh_concurrency",
                prefix,
                defaults.refresh_concurrency,
                1,
                REFRESH_CONCURRENCY_MAX,
            ),
            refresh_jitter=self.seconds(data, "refresh_jitter", prefix, defaults.refresh_jitter, 0),
            refresh_idle_limit=self.seconds(
                data, "refresh_idle_limit", prefix, defaults.refresh_idle_limit, 1
            ),
            bracketed_next_hop=self.choice(  # type: ignore[arg-type]  # checked against the options
                data, "bracketed_next_hop", prefix, BRACKETED_NEXT_HOP_MODES, "ignore"
            ),
        )

    def profiles(self, data: Mapping[str, object]) -> Mapping[str, Profile]:
        profiles = builtin_profiles()
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
            # A built-in profile's table changes only the keys it names.
            base = profiles.get(name, Profile())
            profiles[name] = Profile(
                enforce_testing=self.boolean(section, "enforce_testing", prefix, base.enforce_testing),
                tlsrpt=self.boolean(section, "tlsrpt", prefix, base.tlsrpt),
                tlsrpt_policy_failure=self.boolean(
                    section, "tlsrpt_policy_failure", prefix, base.tlsrpt_policy_failure
                ),
                dane=self.boolean(section, "dane", prefix, base.dane),
            )
        return MappingProxyType(profiles)

    def dane(self, data: Mapping[str, object]) -> DaneConfig:
        prefix = "dane"
        defaults = DaneConfig()
        self.table(data, prefix, ("nameservers", "timeout"))
        return DaneConfig(
            nameservers=self.items(data, "nameservers", prefix, parse_nameserver, "127.0.0.1"),
            timeout=self.seconds(data, "timeout", prefix, defaults.timeout, 0, above=True),
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
                f"is longer than {UNIX_PATH_MAX} bytes, got {show(socket_path)}",
            )
        mode = data.get("mode", f"{DEFAULT_CONTROL_MODE:04o}")
        if not isinstance(mode, str) or not OCTAL_MODE.fullmatch(mode):
            raise self.fail(
                f"{prefix}.mode",
                f'must be octal permission bits in quotes, e.g. "0660", got {show(mode)}',
            )
        return ControlConfig(socket=socket_path, mode=int(mode, 8))

    def http(self, data: Mapping[str, object], old: Mapping[str, object]) -> HttpConfig:
        """``[http] listen``, or ``[metrics] listen``, its name from before the dashboard."""
        self.table(data, "http", ("listen",))
        self.table(old, "metrics", ("listen",))
        if "listen" in data and "listen" in old:
            raise self.fail("metrics.listen", "is the older name of http.listen; set only http.listen")
        prefix = "metrics" if "listen" in old else "http"
        text = self.string(old if prefix == "metrics" else data, "listen", prefix, "")
        key = f"{prefix}.listen"
        if not text:
            return HttpConfig(key=key)
        try:
            return HttpConfig(listen=parse_listen_address(text), key=key)
        except ConfigError as error:
            raise self.fail(key, str(error)) from None

    def report_alerts(self, data: Mapping[str, object]) -> dict[str, object]:
        """The alert keys of ``[reports]``, as ReportsConfig arguments."""
        prefix = "reports"
        ratio = data.get("alert_ratio", DEFAULT_ALERT_RATIO)
        if (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio)
                or not 0 < ratio <= 1):
            raise self.fail(
                f"{prefix}.alert_ratio",
                f"must be a share of sessions above 0 and at most 1 (0.05 is 5 %), got {show(ratio)}",
            )
        mail_to = self.string(data, "alert_mail_to", prefix, "")
        if mail_to and not _MAIL_ADDRESS.fullmatch(mail_to):
            raise self.fail(
                f"{prefix}.alert_mail_to",
                f'must be one mail address like "postmaster@example.com", got {show(mail_to)}',
            )
        sendmail = self.string(data, "sendmail_path", prefix, DEFAULT_SENDMAIL_PATH)
        if not sendmail.startswith("/"):
            raise self.fail(f"{prefix}.sendmail_path", f"must be an absolute path, got {show(sendmail)}")
        if mail_to and not (os.path.isfile(sendmail) and os.access(sendmail, os.X_OK)):
            raise self.fail(
                f"{prefix}.sendmail_path",
                f"{json.dumps(sendmail)} is not an executable file (needed to mail alerts to {mail_to})",
            )
        return dict(
            alert_ratio=float(ratio),
            alert_window=self.seconds(data, "alert_window", prefix, DEFAULT_ALERT_WINDOW, ALERT_WINDOW_MIN),
            alert_min_sessions=self.integer(
                data, "alert_min_sessions", prefix, DEFAULT_ALERT_MIN_SESSIONS, 1, ALERT_MIN_SESSIONS_MAX
            ),
            alert_mail_to=mail_to,
            sendmail_path=sendmail,
            reporter_silence_days=self.integer(
                data, "reporter_silence_days", prefix, DEFAULT_REPORTER_SILENCE_DAYS, 0, SILENCE_DAYS_MAX
            ),
        )

    def service(self, data: Mapping[str, object]) -> ServiceConfig:
        prefix = "service"
        self.table(data, prefix, ("user",))
        user = self.string(data, "user", prefix, "")
        if user and not _USER_NAME.fullmatch(user):
            raise self.fail(
                f"{prefix}.user",
                f"must be a user name like \"postfix-mtasts\" or empty, got {show(user)}",
            )
        return ServiceConfig(user=user)

    def reports(self, data: Mapping[str, object]) -> ReportsConfig:
        prefix = "reports"
        self.table(data, prefix, tuple(ReportsConfig.__dataclass_fields__))
        dsn = self.string(data, "dsn", prefix, "")
        if dsn and not dsn.startswith(_POSTGRESQL_SCHEMES):
            raise self.fail(
                f"{prefix}.dsn", f"must start with {', '.join(_POSTGRESQL_SCHEMES)}, got {show(dsn)}"
            )
        schema = self.string(data, "schema", prefix, DEFAULT_POSTGRESQL_SCHEMA)
        if not _SQL_IDENTIFIER.fullmatch(schema):
            raise self.fail(
                f"{prefix}.schema", f"must be a plain SQL name (letters, digits, _), got {show(schema)}"
            )
        imap = None
        if "imap" in data:
            imap = self.imap(self.subtable(data, "imap", prefix))
        return ReportsConfig(
            path=self.path(data, "path", prefix),
            dsn=dsn,
            schema=schema,
            maildir=self.path(data, "maildir", prefix),
            imap=imap,
            poll_interval=self.seconds(
                data, "poll_interval", prefix, limits.REPORTS_POLL_INTERVAL, 1
            ),
            **self.report_alerts(data),  # type: ignore[arg-type]  # each value checked there
        )

    def imap(self, data: Mapping[str, object]) -> ImapConfig:
        prefix = "reports.imap"
        self.table(data, prefix, tuple(ImapConfig.__dataclass_fields__))
        required = {}
        for key in ("host", "user", "password_file"):
            if key == "password_file":
                value = self.path(data, key, prefix)
            else:
                value = self.string(data, key, prefix, "")
            if not value.strip():
                raise self.fail(f"{prefix}.{key}", "must be set when [reports.imap] is present")
            required[key] = value
        tls = self.boolean(data, "tls", prefix, True)
        ca_file = self.path(data, "ca_file", prefix)
        if ca_file and not os.path.isfile(ca_file):
            problem = "is not a file" if os.path.exists(ca_file) else "does not exist"
            raise self.fail(f"{prefix}.ca_file", f"{json.dumps(ca_file)} {problem}")
        folder = self.string(data, "folder", prefix, "INBOX")
        if not folder.strip():
            raise self.fail(f"{prefix}.folder", 'must name a folder, e.g. "INBOX"')
        return ImapConfig(
            host=required["host"],
            user=required["user"],
            password_file=required["password_file"],
            port=self.integer(data, "port", prefix, 993 if tls else 143, 1, 65535),
            tls=tls,
            ca_file=ca_file,
            folder=folder,
            done_folder=self.string(data, "done_folder", prefix, ""),
        )

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
        if config.http.listen is not None:
            named.append((config.http.key, config.http.listen))
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
