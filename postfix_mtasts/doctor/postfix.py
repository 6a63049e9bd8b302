"""What ``postfix-mtasts doctor`` reads from Postfix, as values: the output of
``postconf`` (main.cf parameters, master.cf entries, the version) and the
lookup tables named in a map list. Pure: text in, values out, no I/O."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

#: The main.cf parameters doctor reads (``postconf -x``, $names expanded).
PARAMETERS = (
    "smtp_tls_policy_maps",
    "proxy_read_maps",
    "smtp_tls_security_level",
    "smtp_dns_support_level",
    "smtp_host_lookup",
    "smtp_tlsrpt_enable",
    "smtp_tlsrpt_socket_name",
    "smtp_tls_enforce_sts_mx_patterns",
    "queue_directory",
    "mail_owner",
)
#: Postfix's prefix for a table looked up through proxymap(8).
PROXY_PREFIX = "proxy:"
#: The master.cf service whose SMTP client delivers mail (the default transport).
SMTP_SERVICE = ("smtp", "unix")
#: The master.cf service that does ``proxy:`` lookups.
PROXYMAP_SERVICE = ("proxymap", "unix")
#: The program of every Postfix SMTP (and LMTP) client service.
SMTP_CLIENT_COMMAND = "smtp"
#: Fields of a master.cf entry before the command.
MASTER_FIELDS = 7

_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
# Separators of a Postfix map list: blanks and commas, outside { }.
_LIST_TOKEN = re.compile(r"\{[^{}]*\}|[^\s,{}]+(?:\{[^{}]*\}[^\s,{}]*)*")


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """A Postfix release, e.g. 3.10.5; compares by number."""

    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        """``3.7.11``; a ``.0`` release as ``3.10`` (as the docs name them)."""
        return f"{self.major}.{self.minor}" + (f".{self.patch}" if self.patch else "")


def parse_version(text: str) -> Version | None:
    """``3.7.11`` (``mail_version``; a ``-RC1`` or date suffix ignored), or None."""
    match = _VERSION.match(text.strip())
    if match is None:
        return None
    return Version(int(match[1]), int(match[2]), int(match[3] or 0))


def parse_parameters(text: str) -> Mapping[str, str]:
    """``postconf`` output (``name = value`` lines) as a mapping.

    A parameter this Postfix does not know is absent (postconf warns on
    stderr and prints nothing for it).
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" =")
        if sep and name and " " not in name:
            values[name] = value.strip()
    return MappingProxyType(values)


@dataclass(frozen=True, slots=True)
class MasterEntry:
    """One master.cf service, as ``postconf -M`` prints it."""

    service: str
    type: str
    private: str
    unprivileged: str
    chroot: str
    wakeup: str
    process_limit: str
    command: str
    arguments: tuple[str, ...] = ()

    @property
    def chrooted(self) -> bool:
        """``y`` in the chroot column; ``-`` is ``n`` since Postfix 3.0."""
        return self.chroot == "y"

    @property
    def name(self) -> str:
        """``smtp/unix``: how postconf -M names the service."""
        return f"{self.service}/{self.type}"

    def overrides(self) -> Mapping[str, str]:
        """The ``-o name=value`` parameter overrides of this service."""
        found: dict[str, str] = {}
        args = list(self.arguments)
        for index, arg in enumerate(args):
            option = None
            if arg == "-o" and index + 1 < len(args):
                option = args[index + 1]
            elif arg.startswith("-o") and len(arg) > 2:
                option = arg[2:]
            if option is not None:
                name, sep, value = option.partition("=")
                if sep:
                    found[name.strip()] = value.strip()
        return MappingProxyType(found)


def parse_master(text: str) -> tuple[MasterEntry, ...]:
    """``postconf -M`` output (one entry per line) as entries; other lines are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) <= MASTER_FIELDS or line[:1].isspace() or line.startswith("#"):
            continue
        service, kind, private, unprivileged, chroot, wakeup, limit = fields[:MASTER_FIELDS]
        entries.append(
            MasterEntry(
                service, kind, private, unprivileged, chroot, wakeup, limit,
                command=fields[MASTER_FIELDS], arguments=tuple(fields[MASTER_FIELDS + 1 :]),
            )
        )
    return tuple(entries)


def find_service(entries: Iterable[MasterEntry], service: str, kind: str) -> MasterEntry | None:
    """The master.cf entry ``service/kind``, or None."""
    for entry in entries:
        if entry.service == service and entry.type == kind:
            return entry
    return None


def split_map_list(text: str) -> tuple[str, ...]:
    """A Postfix map list (``a, b c``) as its tables; braces group (inline maps)."""
    return tuple(_LIST_TOKEN.findall(text))


@dataclass(frozen=True, slots=True)
class TableRef:
    """One table of a map list. ``kind`` is ``socketmap`` or ``tcp`` for the
    two protocols the daemon speaks, ``other`` for anything else; ``proxied``
    when written behind ``proxy:``, then ``inner`` is the table proxymap opens."""

    text: str
    kind: Literal["socketmap", "tcp", "other"]
    proxied: bool = False
    inner: str = ""
    #: "inet" or "unix" for socketmap; "inet" for tcp.
    transport: str = ""
    host: str = ""
    port: int | None = None
    #: The unix socket path as written (relative paths are relative to the
    #: queue directory, where every Postfix daemon runs).
    path: str = ""
    #: The socketmap NAME (a profile); the daemon's tcp_table uses "postfix".
    name: str = ""
    problem: str = field(default="", compare=False)


def parse_table(text: str) -> TableRef:
    """``proxy:socketmap:inet:127.0.0.1:8461:postfix`` and the like, taken apart."""
    proxied = text.startswith(PROXY_PREFIX)
    inner = text[len(PROXY_PREFIX):] if proxied else text
    kind, _, rest = inner.partition(":")
    if kind == "socketmap":
        transport, _, address = rest.partition(":")
        where, colon, name = address.rpartition(":")
        if transport == "unix" and colon and where and name:
            return TableRef(text, "socketmap", proxied, inner, "unix", path=where, name=name)
        if transport == "inet" and colon and name:
            host, port = _host_port(where)
            if host and port is not None:
                return TableRef(text, "socketmap", proxied, inner, "inet", host, port, name=name)
        return TableRef(text, "socketmap", proxied, inner, problem="not socketmap:inet:HOST:PORT:NAME "
                        "or socketmap:unix:PATH:NAME")
    if kind == "tcp":
        host, port = _host_port(rest)
        if host and port is not None:
            return TableRef(text, "tcp", proxied, inner, "inet", host, port)
        return TableRef(text, "tcp", proxied, inner, problem="not tcp:HOST:PORT")
    return TableRef(text, "other", proxied, inner)


def _host_port(text: str) -> tuple[str, int | None]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return "", None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def client_socket_path(path: str, queue_directory: str, chrooted: bool) -> str:
    """Where, on this host, a Postfix daemon finds the unix socket ``path``.

    Every Postfix daemon runs in the queue directory, so a relative path is
    relative to it; a chrooted one also sees an absolute path under it.
    """
    if chrooted:
        return os.path.normpath(os.path.join(queue_directory, path.lstrip("/")))
    return os.path.normpath(os.path.join(queue_directory, path))


def table_with_path(table: TableRef, path: str) -> str:
    """``table`` (a unix socketmap) naming ``path`` instead, as postmap on the host must."""
    return f"socketmap:unix:{path}:{table.name}"


def is_yes(value: str | None) -> bool:
    """Postfix's boolean ``yes`` (case-insensitive); ``no``, empty or unknown are False."""
    return (value or "").strip().lower() == "yes"


class Topic:
    """The stable names of what a doctor finding is about, for monitoring."""

    VERSION = "postfix-version"
    POLICY_MAPS = "policy-maps"
    SERVICE_OVERRIDE = "service-override"
    PROFILE = "profile"
    LOOKUP = "lookup"
    PROXY = "proxy-read-maps"
    SECURITY_LEVEL = "security-level"
    DANE = "dane"
    TLSRPT = "tlsrpt"
    MX_PATTERNS = "mx-patterns"


@dataclass(frozen=True, slots=True)
class PostfixView:
    """What postconf said about one Postfix configuration directory."""

    directory: str
    version: Version | None
    parameters: Mapping[str, str]
    master: tuple[MasterEntry, ...] = ()

    def parameter(self, name: str) -> str:
        """The value the SMTP client uses: its master.cf ``-o`` override, else main.cf."""
        smtp = find_service(self.master, *SMTP_SERVICE)
        if smtp is not None and name in smtp.overrides():
            return smtp.overrides()[name]
        return self.parameters.get(name, "")

    @property
    def queue_directory(self) -> str:
        return self.parameters.get("queue_directory", "") or "/var/spool/postfix"

    def looker(self, table: TableRef) -> MasterEntry | None:
        """The service that opens ``table``: proxymap for ``proxy:``, else the SMTP client."""
        return find_service(self.master, *(PROXYMAP_SERVICE if table.proxied else SMTP_SERVICE))
