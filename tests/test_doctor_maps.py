"""doctor's decisions about the way to the daemon, as tables: whether
smtp_tls_policy_maps (or a master.cf override) names it and in which order,
the profile and proxy_read_maps, how the postmap lookup is planned for a
chrooted or proxied table, and what its outcome means (with the fix)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from postfix_mtasts.check.findings import Finding, Level
from postfix_mtasts.config import Config, parse_config
from postfix_mtasts.doctor.maps import (
    Probe,
    ProbeOutcome,
    daemon_tables,
    plan_probe,
    policy_map_findings,
    probe_finding,
    profiles_in_use,
)
from postfix_mtasts.doctor.postfix import PostfixView, Topic, Version, parse_master, parse_table

QUEUE = "/var/spool/postfix"
DEBIAN_MASTER = "\n".join(
    [
        "smtp       inet  n       -       y       -       -       smtpd",
        "proxymap   unix  -       -       n       -       -       proxymap",
        "smtp       unix  -       -       y       -       -       smtp",
    ]
)
DAEMON = "socketmap:inet:127.0.0.1:8461:postfix"
UNIX_CONFIG = f'[listen]\nsocketmap = ["unix:{QUEUE}/private/mtasts:mode=0666"]\n'


def view(maps: str = "", master: str = DEBIAN_MASTER, **parameters: str) -> PostfixView:
    values = {"smtp_tls_policy_maps": maps, "queue_directory": QUEUE, "mail_owner": "postfix", **parameters}
    return PostfixView("/etc/postfix", Version(3, 7, 11), values, parse_master(master))


def config(text: str = "") -> Config:
    return parse_config(text, "/etc/postfix-mtasts.toml")


@dataclass(frozen=True)
class Expect:
    level: Level
    topic: str
    text: str
    fix: str = ""

    def found_in(self, findings: list[Finding]) -> bool:
        return any(
            f.level is self.level and f.topic == self.topic and self.text in f.message and self.fix in f.fix
            for f in findings
        )


MAP_CASES = [
    pytest.param(
        "",
        "",
        [Expect(Level.ERROR, Topic.POLICY_MAPS, "is empty", f"smtp_tls_policy_maps = {DAEMON}")],
        id="empty",
    ),
    pytest.param(
        "hash:/etc/postfix/tls_policy",
        "",
        [
            Expect(
                Level.ERROR,
                Topic.POLICY_MAPS,
                "names no table of this daemon (it listens on inet:127.0.0.1:8461 per /etc/postfix-mtasts",
                f"smtp_tls_policy_maps = hash:/etc/postfix/tls_policy, {DAEMON}",
            )
        ],
        id="only-other-maps",
    ),
    pytest.param(
        "socketmap:inet:127.0.0.1:9999:postfix",
        "",
        [Expect(Level.ERROR, Topic.POLICY_MAPS, "names no table of this daemon")],
        id="wrong-port",
    ),
    pytest.param(
        DAEMON, "", [Expect(Level.OK, Topic.POLICY_MAPS, "(profile postfix); asked first")], id="alone"
    ),
    pytest.param(
        f"hash:/etc/postfix/tls_policy, {DAEMON}",
        "",
        [
            Expect(
                Level.OK, Topic.POLICY_MAPS, "after hash:/etc/postfix/tls_policy, which win for the domains"
            )
        ],
        id="after-local-overrides",
    ),
    pytest.param(
        f"{DAEMON} hash:/etc/postfix/tls_policy",
        "",
        [
            Expect(
                Level.OK,
                Topic.POLICY_MAPS,
                "hash:/etc/postfix/tls_policy only for domains it answers not found",
            )
        ],
        id="before-other-maps",
    ),
    pytest.param(
        "socketmap:inet:127.0.0.1:8461:nope",
        "",
        [
            Expect(
                Level.ERROR,
                Topic.PROFILE,
                "has no profile 'nope' (configured: postfix, postfix310)",
                "socketmap:inet:127.0.0.1:8461:postfix",
            )
        ],
        id="unknown-profile",
    ),
    pytest.param(
        "socketmap:inet:127.0.0.1:8461:postfix310",
        "",
        [Expect(Level.OK, Topic.POLICY_MAPS, "(profile postfix310)")],
        id="builtin-postfix310",
    ),
    pytest.param(
        "socketmap:inet:localhost:8461:postfix",
        "",
        [
            Expect(Level.OK, Topic.POLICY_MAPS, "names the daemon"),
            Expect(
                Level.WARNING,
                Topic.LOOKUP,
                "'localhost' is resolved inside the chroot of smtp/unix",
                "socketmap:inet:127.0.0.1:8461:postfix",
            ),
        ],
        id="host-name-in-chroot",
    ),
    pytest.param(
        "socketmap:unix:private/mtasts:postfix",
        UNIX_CONFIG,
        [Expect(Level.OK, Topic.POLICY_MAPS, "socketmap:unix:private/mtasts:postfix (profile postfix)")],
        id="unix-relative",
    ),
    pytest.param(
        f"socketmap:unix:{QUEUE}/private/mtasts:postfix",
        UNIX_CONFIG,
        [Expect(Level.OK, Topic.POLICY_MAPS, "names the daemon")],
        id="unix-absolute-still-meant-for-it",
    ),
    pytest.param(
        "hash:/x",
        UNIX_CONFIG,
        [
            Expect(
                Level.ERROR,
                Topic.POLICY_MAPS,
                "names no table",
                "hash:/x, socketmap:unix:private/mtasts:postfix",
            )
        ],
        id="suggests-the-relative-unix-path",
    ),
    pytest.param(
        f"proxy:{DAEMON}",
        "",
        [
            Expect(
                Level.ERROR,
                Topic.PROXY,
                f"proxy_read_maps does not list proxy:{DAEMON}",
                f"proxy_read_maps = $proxy_read_maps proxy:{DAEMON}",
            )
        ],
        id="proxy-not-approved",
    ),
    pytest.param(
        "socketmap:inet:localhost:8461:postfix",
        '[listen]\nsocketmap = ["inet:localhost:8461"]\n',
        [
            Expect(Level.OK, Topic.POLICY_MAPS, "names the daemon"),
            Expect(Level.WARNING, Topic.LOOKUP, "'localhost' is resolved inside the chroot"),
        ],
        id="host-name-on-both-sides",
    ),
    pytest.param(
        "hash:/x",
        '[listen]\nsocketmap = ["inet:[::]:8461"]\n',
        [
            Expect(
                Level.ERROR, Topic.POLICY_MAPS, "names no table", "hash:/x, socketmap:inet:[::1]:8461:postfix"
            )
        ],
        id="suggests-loopback-for-a-wildcard-listener",
    ),
    pytest.param(
        "socketmap:inet:[::1]:8461:postfix",
        '[listen]\nsocketmap = ["inet:[::]:8461"]\n',
        [Expect(Level.OK, Topic.POLICY_MAPS, "names the daemon")],
        id="wildcard-listener",
    ),
    pytest.param(
        "tcp:127.0.0.1:8462",
        '[listen]\ntcp_table = ["inet:127.0.0.1:8462"]\n',
        [Expect(Level.OK, Topic.POLICY_MAPS, "tcp:127.0.0.1:8462 (profile postfix)")],
        id="tcp-table",
    ),
    pytest.param(
        DAEMON,
        '[listen]\nsocketmap = ["systemd:socketmap"]\n',
        [Expect(Level.OK, Topic.POLICY_MAPS, "assumed to be its systemd socket (systemd:socketmap)")],
        id="systemd-socket",
    ),
    pytest.param(
        "hash:/x",
        '[listen]\nsocketmap = ["systemd:socketmap-unix"]\n',
        [
            Expect(
                Level.ERROR,
                Topic.POLICY_MAPS,
                "names no table",
                "hash:/x, socketmap:unix:private/mtasts:postfix",
            )
        ],
        id="suggests-the-unix-socket-unit",
    ),
    pytest.param(
        "socketmap:inet:127.0.0.1:8461",
        "",
        [Expect(Level.ERROR, Topic.POLICY_MAPS, "is not socketmap:inet:HOST:PORT:NAME", f"= {DAEMON}")],
        id="malformed",
    ),
    pytest.param(
        f"{DAEMON}, socketmap:inet:127.0.0.1:8461:postfix310",
        "",
        [
            Expect(Level.OK, Topic.POLICY_MAPS, "asked first"),
            Expect(
                Level.WARNING,
                Topic.POLICY_MAPS,
                "names the daemon again: socketmap:inet:127.0.0.1:8461:postfix310",
            ),
        ],
        id="twice",
    ),
]


@pytest.mark.parametrize(("maps", "daemon_config", "expected"), MAP_CASES)
def test_policy_map_findings(maps: str, daemon_config: str, expected: list[Expect]) -> None:
    findings, _ = policy_map_findings(view(maps), config(daemon_config))
    for expect in expected:
        assert expect.found_in(findings), "\n".join(
            f"{f.level.symbol} {f.message} | {f.fix}" for f in findings
        )
    problems = [f for f in findings if f.level is not Level.OK]
    assert len(problems) == sum(e.level is not Level.OK for e in expected), problems


def test_proxy_read_maps_listing_the_table_is_ok() -> None:
    listed = view(f"proxy:{DAEMON}", proxy_read_maps=f"hash:/etc/aliases proxy:{DAEMON}, static:*")
    findings, ours = policy_map_findings(listed, config())
    assert [f.level for f in findings if f.topic == Topic.PROXY] == [Level.OK]
    assert [d.table.text for d in ours] == [f"proxy:{DAEMON}"]


def test_the_smtp_service_override_is_what_postfix_uses() -> None:
    overridden = DEBIAN_MASTER.replace(
        "y       -       -       smtp", f"y       -       -       smtp -o smtp_tls_policy_maps={DAEMON}"
    )
    findings, ours = policy_map_findings(view("", master=overridden), config())
    assert [d.table.text for d in ours] == [DAEMON]
    assert all(f.level is Level.OK for f in findings)


def test_another_smtp_service_leaving_the_daemon_out_is_a_warning() -> None:
    master = (
        DEBIAN_MASTER
        + "\nrelay      unix  -       -       y       -       -       smtp -o smtp_tls_policy_maps="
    )
    findings, _ = policy_map_findings(view(DAEMON, master=master), config())
    override = [f for f in findings if f.topic == Topic.SERVICE_OVERRIDE]
    assert [f.level for f in override] == [Level.WARNING]
    assert override[0].fix == f"in master.cf: -o smtp_tls_policy_maps={DAEMON} for relay/unix"


def test_profiles_in_use_are_those_the_tables_name_else_the_default() -> None:
    daemon = config("[profiles.strict]\nenforce_testing = true\n")
    ours = daemon_tables([parse_table("socketmap:inet:127.0.0.1:8461:strict")], daemon, view())
    assert list(profiles_in_use(ours, daemon)) == ["strict"]
    assert list(profiles_in_use([], daemon)) == ["postfix"]


# --- the lookup --------------------------------------------------------------------


def probe_for(maps: str, daemon_config: str = "") -> tuple[Probe, Config, PostfixView]:
    v = view(maps)
    c = config(daemon_config)
    (daemon,) = daemon_tables([parse_table(maps)], c, v)
    return plan_probe(v, daemon), c, v


def test_plan_for_a_chrooted_relative_unix_socket_uses_the_queue_directory() -> None:
    probe, _, _ = probe_for("socketmap:unix:private/mtasts:postfix", UNIX_CONFIG)
    assert (probe.postmap_table, probe.socket_path) == (
        f"socketmap:unix:{QUEUE}/private/mtasts:postfix",
        f"{QUEUE}/private/mtasts",
    )
    assert (probe.service, probe.chrooted) == ("smtp/unix", True)


def test_plan_for_a_proxied_table_looks_up_as_proxymap_does() -> None:
    probe, _, _ = probe_for(f"proxy:{DAEMON}")
    assert (probe.postmap_table, probe.service, probe.chrooted) == (DAEMON, "proxymap/unix", False)


OUTCOMES = [
    pytest.param(
        DAEMON,
        "",
        ProbeOutcome(1, user="postfix"),
        Level.OK,
        "the daemon answers (postmap -q '[192.0.2.1]' socketmap:inet:127.0.0.1:8461:postfix, "
        "as postfix would from smtp/unix (chrooted))",
        "",
        id="answered-not-found",
    ),
    pytest.param(
        DAEMON,
        "",
        ProbeOutcome(None, user="postfix", timeout=15.0),
        Level.ERROR,
        "no answer within 15s",
        "journalctl -u postfix-mtasts",
        id="timeout",
    ),
    pytest.param(
        DAEMON,
        "",
        ProbeOutcome(
            1,
            stderr="postmap: warning: connect to 127.0.0.1:8461: Connection refused\n"
            f"postmap: fatal: table {DAEMON}: query error: Connection refused\n",
            user="postfix",
        ),
        Level.ERROR,
        f"lookup failed: table {DAEMON}: query error: Connection refused",
        "start postfix-mtasts (systemctl start postfix-mtasts)",
        id="refused",
    ),
    pytest.param(
        f"socketmap:unix:{QUEUE}/private/mtasts:postfix",
        UNIX_CONFIG,
        ProbeOutcome(1, stderr="postmap: fatal: table x: query error: No such file or directory\n"),
        Level.ERROR,
        "No such file or directory",
        "write the path relative to the queue directory: socketmap:unix:private/mtasts:postfix",
        id="absolute-path-in-chroot",
    ),
    pytest.param(
        "socketmap:unix:private/mtasts:postfix",
        UNIX_CONFIG,
        ProbeOutcome(1, stderr="postmap: fatal: table x: query error: No such file or directory\n"),
        Level.ERROR,
        "No such file or directory",
        f"start postfix-mtasts (systemctl start postfix-mtasts): /etc/postfix-mtasts.toml has it listen on "
        f"unix:{QUEUE}/private/mtasts",
        id="unix-daemon-not-running",
    ),
    pytest.param(
        "socketmap:unix:private/mtasts:postfix",
        UNIX_CONFIG,
        ProbeOutcome(1, stderr="postmap: fatal: table x: query error: Permission denied\n", user="postfix"),
        Level.ERROR,
        "Permission denied",
        f"let postfix connect to {QUEUE}/private/mtasts",
        id="permission",
    ),
    pytest.param(
        DAEMON,
        "",
        ProbeOutcome(
            1,
            stderr="postmap: warning: socketmap server permanent error: unknown map name 'x'; "
            "configured: postfix\npostmap: fatal: table x: query error\n",
        ),
        Level.ERROR,
        "query error",
        "",
        id="other-error",
    ),
]


@pytest.mark.parametrize(("maps", "daemon_config", "outcome", "level", "text", "fix"), OUTCOMES)
def test_probe_finding(
    maps: str, daemon_config: str, outcome: ProbeOutcome, level: Level, text: str, fix: str
) -> None:
    probe, c, v = probe_for(maps, daemon_config)
    finding = probe_finding(probe, outcome, c, v)
    assert (finding.level, finding.topic) == (level, Topic.LOOKUP)
    assert text in finding.message and fix in finding.fix, finding
