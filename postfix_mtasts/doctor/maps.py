"""``postfix-mtasts doctor``'s decisions about the way to the daemon: does
smtp_tls_policy_maps name it (and in which order), may proxymap open it, and
what the lookup doctor runs through ``postmap`` means. Pure: the shell
(doctor.run) gathers the values and runs the lookups planned here; every ⚠
and ✗ says the exact line to change."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from postfix_mtasts.check.findings import Finding
from postfix_mtasts.config import DEFAULT_PROFILE, DEFAULT_SOCKETMAP_ADDRESS, Config, ListenAddress, Profile
from postfix_mtasts.doctor.postfix import (
    SMTP_CLIENT_COMMAND,
    SMTP_SERVICE,
    PostfixView,
    TableRef,
    Topic,
    client_socket_path,
    parse_table,
    split_map_list,
    table_with_path,
)

#: The key doctor looks up: an IP literal, which the daemon answers "not
#: found" without any DNS query, so the lookup proves the path, not the network.
PROBE_KEY = "[192.0.2.1]"
#: The profile a tcp_table lookup uses (the protocol has no map name).
TCP_TABLE_PROFILE = DEFAULT_PROFILE
#: Addresses a listener on every interface answers at.
_WILDCARD_HOSTS = ("0.0.0.0", "::")
_LOOPBACK_NAMES = {"localhost": ("127.0.0.1", "::1")}
#: Where the shipped .socket units (systemd/) listen, by FileDescriptorName=, as
#: main.cf names them: postfix-mtasts.socket, and postfix-mtasts-unix.socket in
#: the queue directory (a path relative to it).
SHIPPED_SOCKET_UNITS = {"socketmap": DEFAULT_SOCKETMAP_ADDRESS, "socketmap-unix": "unix:private/mtasts"}
#: Where a client on this host reaches a listener on every interface.
_WILDCARD_CLIENT = {"0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True, slots=True)
class DaemonTable:
    """A table of smtp_tls_policy_maps that reaches this daemon; ``assumed``
    when the daemon's socket comes from systemd and its address is not in
    the configuration."""

    table: TableRef
    position: int
    assumed: bool = False

    @property
    def profile(self) -> str:
        return self.table.name if self.table.kind == "socketmap" else TCP_TABLE_PROFILE


@dataclass(frozen=True, slots=True)
class Probe:
    """One ``postmap -q PROBE_KEY`` to run, as the looking-up service would."""

    table: TableRef
    #: The table as postmap on this host must be given it (a chrooted
    #: service's unix socket path made absolute).
    postmap_table: str
    #: The unix socket on this host ("" for TCP), which must exist.
    socket_path: str
    service: str
    chrooted: bool


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    """What the probe did: postmap's exit ``code`` (None: it timed out) and output."""

    code: int | None
    stdout: str = ""
    stderr: str = ""
    #: The user postmap ran as.
    user: str = ""
    timeout: float = 0.0


# --- smtp_tls_policy_maps ---------------------------------------------------------


def listens_at(table: TableRef, address: ListenAddress, view: PostfixView) -> bool:
    """True if ``table`` (socketmap or tcp) reaches a listener on ``address``."""
    if address.kind != table.transport:
        return False
    if table.transport == "unix":
        looker = view.looker(table)
        seen = client_socket_path(table.path, view.queue_directory, bool(looker and looker.chrooted))
        # The path as written counts too: meant for the daemon, even if a
        # chroot moves it (the lookup then shows where Postfix looks).
        written = os.path.normpath(os.path.join(view.queue_directory, table.path))
        return os.path.normpath(address.path) in (seen, written)
    if table.port != address.port:
        return False
    hosts = (table.host, *_LOOPBACK_NAMES.get(table.host.lower(), ()))
    return address.host in _WILDCARD_HOSTS or any(_same_host(host, address.host) for host in hosts)


def _same_host(one: str, other: str) -> bool:
    try:
        return ipaddress.ip_address(one) == ipaddress.ip_address(other)
    except ValueError:
        return one.lower() == other.lower()


def daemon_tables(tables: Sequence[TableRef], config: Config, view: PostfixView) -> list[DaemonTable]:
    """The tables that reach this daemon, by address; with a systemd socket
    (address unknown here) every socketmap or tcp table may."""
    found = []
    for position, table in enumerate(tables):
        if table.problem:
            continue
        listeners = config.listen.socketmap if table.kind == "socketmap" else (
            config.listen.tcp_table if table.kind == "tcp" else ()
        )
        if any(listens_at(table, address, view) for address in listeners):
            found.append(DaemonTable(table, position))
        elif any(address.kind == "systemd" for address in listeners):
            found.append(DaemonTable(table, position, assumed=True))
    return found


def suggested_table(config: Config, view: PostfixView) -> str:
    """The table main.cf should name for this daemon's first listener."""
    for address in config.listen.socketmap:
        if address.kind == "systemd" and address.systemd_name in SHIPPED_SOCKET_UNITS:
            return f"socketmap:{SHIPPED_SOCKET_UNITS[address.systemd_name]}:{DEFAULT_PROFILE}"
        if address.kind == "inet":
            return f"socketmap:inet:{_client_host(address.host)}:{address.port}:{DEFAULT_PROFILE}"
        if address.kind == "unix":
            queue = view.queue_directory.rstrip("/") + "/"
            path = address.path[len(queue):] if address.path.startswith(queue) else address.path
            return f"socketmap:unix:{path}:{DEFAULT_PROFILE}"
    for address in config.listen.tcp_table:
        if address.kind == "inet":
            return f"tcp:{_client_host(address.host)}:{address.port}"
    # A systemd socket: the shipped .socket unit listens where the default does.
    return f"socketmap:{DEFAULT_SOCKETMAP_ADDRESS}:{DEFAULT_PROFILE}"


def _client_host(host: str) -> str:
    """How a client names ``host``: a wildcard as loopback, IPv6 in brackets."""
    host = _WILDCARD_CLIENT.get(host, host)
    return f"[{host}]" if ":" in host else host


def _per(config: Config) -> str:
    """Where the listen addresses come from; the defaults may mean --config was forgotten."""
    if config.source == "<defaults>":
        return " by default; give doctor the daemon's --config if it has one"
    return f" per {config.source}"


def listening_at(config: Config) -> str:
    addresses = [*config.listen.socketmap, *config.listen.tcp_table]
    return ", ".join(str(address) for address in addresses)


def policy_map_findings(view: PostfixView, config: Config) -> tuple[list[Finding], list[DaemonTable]]:
    """Does smtp_tls_policy_maps name this daemon, in which order, and can
    each such table be used (a configured profile, proxy_read_maps)."""
    value = view.parameter("smtp_tls_policy_maps")
    tables = [parse_table(text) for text in split_map_list(value)]
    ours = daemon_tables(tables, config, view)
    suggestion = suggested_table(config, view)
    findings: list[Finding] = []
    for table in tables:
        if table.problem:
            findings.append(
                Finding.error(
                    Topic.POLICY_MAPS,
                    f"smtp_tls_policy_maps: {table.text} is {table.problem}",
                    "Postfix cannot open this table, and defers mail whose TLS policy it cannot look up",
                    f"in main.cf: smtp_tls_policy_maps = {_replace(tables, table, suggestion)}",
                )
            )
    if not tables:
        findings.append(
            Finding.error(
                Topic.POLICY_MAPS,
                "smtp_tls_policy_maps is empty: Postfix never asks the daemon",
                "no MTA-STS policy is enforced; mail goes out at smtp_tls_security_level",
                f"in main.cf: smtp_tls_policy_maps = {suggestion} (then: postfix reload)",
            )
        )
    elif not ours and not any(table.problem for table in tables):  # else the ✗ above has the fix
        findings.append(
            Finding.error(
                Topic.POLICY_MAPS,
                f"smtp_tls_policy_maps = {value}: names no table of this daemon "
                f"(it listens on {listening_at(config)}{_per(config)})",
                "no MTA-STS policy is enforced; mail goes out at smtp_tls_security_level",
                f"in main.cf: smtp_tls_policy_maps = {', '.join([value, suggestion])} "
                "(your maps first: the first match wins)",
            )
        )
    for index, daemon in enumerate(ours):
        findings.append(_order_finding(tables, daemon, config) if index == 0 else _shadowed(ours[0], daemon))
        findings.extend(_table_findings(view, config, daemon))
    findings.extend(_override_findings(view, config))
    return findings, ours


def _replace(tables: Sequence[TableRef], old: TableRef, new: str) -> str:
    return ", ".join(new if table is old else table.text for table in tables)


def _order_finding(tables: Sequence[TableRef], daemon: DaemonTable, config: Config) -> Finding:
    before = [table.text for table in tables[: daemon.position]]
    after = [table.text for table in tables[daemon.position + 1 :]]
    words = [f"smtp_tls_policy_maps names the daemon: {daemon.table.text} (profile {daemon.profile})"]
    if daemon.assumed:
        words.append(f"assumed to be its systemd socket ({listening_at(config)})")
    if before:
        words.append(f"after {', '.join(before)}, which win for the domains they list (first match wins)")
    else:
        words.append("asked first")
    if after:
        words.append(f"{', '.join(after)} only for domains it answers not found")
    return Finding.ok(Topic.POLICY_MAPS, "; ".join(words))


def _shadowed(first: DaemonTable, again: DaemonTable) -> Finding:
    return Finding.warning(
        Topic.POLICY_MAPS,
        f"smtp_tls_policy_maps names the daemon again: {again.table.text}",
        f"it is asked only for domains {first.table.text} answers not found; it changes something "
        "only if its profile enforces what the first leaves out (enforce_testing)",
        f"in main.cf: remove {again.table.text} from smtp_tls_policy_maps, unless that is the point",
    )


def _table_findings(view: PostfixView, config: Config, daemon: DaemonTable) -> list[Finding]:
    table = daemon.table
    findings: list[Finding] = []
    if daemon.profile not in config.profiles:
        names = ", ".join(sorted(config.profiles))
        findings.append(
            Finding.error(
                Topic.PROFILE,
                f"{table.text}: the daemon has no profile {daemon.profile!r} (configured: {names})",
                "the daemon refuses every lookup (PERM); Postfix defers all mail with a TLS policy "
                "lookup error",
                f"name a configured profile, e.g. {table.text.rsplit(':', 1)[0]}:{DEFAULT_PROFILE}, or add "
                f"[profiles.{daemon.profile}] to {config.source}",
            )
        )
    looker = view.looker(table)
    if table.transport == "inet" and looker is not None and looker.chrooted and not _is_ip(table.host):
        findings.append(
            Finding.warning(
                Topic.LOOKUP,
                f"{table.text}: host name {table.host!r} is resolved inside the chroot of {looker.name}",
                "the chroot's copy of /etc/hosts and resolv.conf decides where it connects",
                f"write the address instead: {table.text.replace(table.host, '127.0.0.1', 1)}",
            )
        )
    if table.proxied:
        findings.append(proxy_finding(view, table))
    return findings


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def proxy_finding(view: PostfixView, table: TableRef) -> Finding:
    """proxymap(8) opens only tables listed, with ``proxy:``, in proxy_read_maps."""
    listed = split_map_list(view.parameters.get("proxy_read_maps", ""))
    if table.text in listed:
        return Finding.ok(Topic.PROXY, f"proxy_read_maps lists {table.text}: proxymap may open it")
    return Finding.error(
        Topic.PROXY,
        f"proxy_read_maps does not list {table.text}",
        "proxymap refuses the table ('unapproved table'); Postfix defers mail with a TLS policy lookup error",
        f"in main.cf: proxy_read_maps = $proxy_read_maps {table.text}",
    )


def _override_findings(view: PostfixView, config: Config) -> list[Finding]:
    """SMTP client services of master.cf whose ``-o smtp_tls_policy_maps`` leaves the daemon out."""
    findings = []
    for entry in view.master:
        value = entry.overrides().get("smtp_tls_policy_maps")
        is_default = (entry.service, entry.type) == SMTP_SERVICE
        if entry.command != SMTP_CLIENT_COMMAND or value is None or is_default:
            continue
        tables = [parse_table(text) for text in split_map_list(value)]
        if not daemon_tables(tables, config, view):
            findings.append(
                Finding.warning(
                    Topic.SERVICE_OVERRIDE,
                    f"master.cf {entry.name}: -o smtp_tls_policy_maps={value} names no table of the daemon",
                    f"mail delivered through {entry.service} gets no MTA-STS policy",
                    f"in master.cf: -o smtp_tls_policy_maps={suggested_table(config, view)} for {entry.name}",
                )
            )
    return findings


# --- the lookup --------------------------------------------------------------------


def plan_probe(view: PostfixView, daemon: DaemonTable) -> Probe:
    """How to look ``daemon``'s table up on this host as its service would."""
    table = daemon.table
    looker = view.looker(table)
    chrooted = bool(looker and looker.chrooted)
    service = looker.name if looker is not None else ("proxymap" if table.proxied else "smtp")
    if table.transport == "unix":
        path = client_socket_path(table.path, view.queue_directory, chrooted)
        return Probe(table, table_with_path(table, path), path, service, chrooted)
    return Probe(table, table.inner, "", service, chrooted)


def probe_finding(probe: Probe, outcome: ProbeOutcome, config: Config, view: PostfixView) -> Finding:
    """The lookup's result: the daemon answered, or why Postfix cannot reach it."""
    table = probe.table
    seen_by = f"as {outcome.user} would from {probe.service}" + (" (chrooted)" if probe.chrooted else "")
    command = f"postmap -q '{PROBE_KEY}' {probe.postmap_table}"
    if outcome.code is None:
        return Finding.error(
            Topic.LOOKUP,
            f"{table.text}: no answer within {outcome.timeout:g}s ({command}, {seen_by})",
            "Postfix waits, then defers mail with a TLS policy lookup error",
            f"check that postfix-mtasts answers there (journalctl -u postfix-mtasts); "
            f"it listens on {listening_at(config)}",
        )
    errors = [line for line in outcome.stderr.splitlines() if line.strip()]
    if outcome.code in (0, 1) and not errors:
        return Finding.ok(Topic.LOOKUP, f"{table.text}: the daemon answers ({command}, {seen_by})")
    reason = _reason(errors) or f"postmap exited with status {outcome.code}"
    return Finding.error(
        Topic.LOOKUP,
        f"{table.text}: lookup failed: {reason} ({command}, {seen_by})",
        "Postfix cannot ask the daemon: it defers mail with a TLS policy lookup error",
        _lookup_fix(probe, reason, config, view, outcome.user),
    )


def _reason(errors: Sequence[str]) -> str:
    """The most telling line of postmap's complaints, without its prefix."""
    last = errors[-1] if errors else ""
    for prefix in ("postmap: fatal: ", "postmap: warning: ", "postmap: "):
        last = last.removeprefix(prefix)
    return last


def _lookup_fix(probe: Probe, reason: str, config: Config, view: PostfixView, user: str) -> str:
    table = probe.table
    queue = view.queue_directory.rstrip("/")
    if "unknown map name" in reason:
        return f"name a configured profile ({', '.join(sorted(config.profiles))}) in {table.text}"
    if table.transport == "unix":
        if "Permission denied" in reason:
            return (
                f"let {user or 'Postfix'} connect to {probe.socket_path}: e.g. listen on "
                f"unix:{probe.socket_path}:mode=0666 in {config.source} (listen.socketmap), with every "
                "directory above it searchable"
            )
        if probe.chrooted and table.path.startswith(queue + "/"):
            relative = table.path[len(queue) + 1 :]
            return (
                f"{probe.service} is chrooted to {queue}, so it looks for {probe.socket_path}; "
                f"write the path relative to the queue directory: socketmap:unix:{relative}:{table.name}"
            )
        if any(address.kind == "unix" and os.path.normpath(address.path) == probe.socket_path
               for address in config.listen.socketmap):
            return (
                f"start postfix-mtasts (systemctl start postfix-mtasts): {config.source} has it "
                f"listen on unix:{probe.socket_path}"
            )
        if probe.chrooted:
            return (
                f"{probe.service} is chrooted to {queue}: make the daemon listen on "
                f"unix:{probe.socket_path} ({config.source}, listen.socketmap), or use "
                f"{suggested_table(config, view)}"
            )
        return (
            f"make the daemon listen on unix:{probe.socket_path} ({config.source}, listen.socketmap), "
            "or point the table at where it listens"
        )
    return (
        f"start postfix-mtasts (systemctl start postfix-mtasts) and make it listen on "
        f"inet:{table.host}:{table.port}, or point the table at where it listens ({listening_at(config)})"
    )


def profiles_in_use(ours: Sequence[DaemonTable], config: Config) -> Mapping[str, Profile]:
    """The configured profiles main.cf's tables name (the default one if none)."""
    names = {daemon.profile for daemon in ours} or {DEFAULT_PROFILE}
    return {name: config.profiles[name] for name in sorted(names) if name in config.profiles}
