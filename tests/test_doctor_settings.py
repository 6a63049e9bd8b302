"""doctor's decisions about what Postfix does with the daemon's answers, as
tables: the Postfix release against what a profile sends (servername 3.4,
TLSRPT attributes 3.10), Postfix 3.10.5's smtp_tls_enforce_sts_mx_patterns,
smtp_tls_security_level, DANE settings against a profile's ``dane``, and
Postfix's TLSRPT client against a profile's ``tlsrpt``."""

from __future__ import annotations

import pytest

from postfix_mtasts.check.findings import Finding, Level
from postfix_mtasts.config import Config, Profile, parse_config
from postfix_mtasts.doctor.postfix import PostfixView, Topic, Version, parse_master
from postfix_mtasts.doctor.settings import (
    dane_findings,
    mx_pattern_findings,
    security_level_findings,
    tlsrpt_findings,
    tlsrpt_socket_path,
    version_findings,
)

PLAIN = {"postfix": Profile()}
STS = {"postfix310": Profile(tlsrpt=True)}
FAILURE_ONLY = {"failing": Profile(tlsrpt_policy_failure=True)}
DANE = {"postfix": Profile(dane=True)}
CONFIG: Config = parse_config("", "/etc/postfix-mtasts.toml")
LATEST = Version(3, 10, 5)
SMTP_CHROOTED = "smtp       unix  -       -       y       -       -       smtp"


def view(
    version: Version | None = LATEST, master: str = SMTP_CHROOTED, **parameters: str
) -> PostfixView:
    values = {"queue_directory": "/var/spool/postfix", **parameters}
    return PostfixView("/etc/postfix", version, values, parse_master(master))


def shown(findings: list[Finding]) -> list[tuple[Level, str]]:
    return [(f.level, f.message) for f in findings]


@pytest.mark.parametrize(
    ("version", "profiles", "level", "text"),
    [
        (
            Version(3, 3, 20),
            PLAIN,
            Level.ERROR,
            "Postfix 3.3.20 is older than 3.4, which profile postfix needs",
        ),
        (
            Version(3, 4),
            PLAIN,
            Level.OK,
            "Postfix 3.4 accepts what profile postfix sends (servername=hostname)",
        ),
        (
            Version(3, 7, 11),
            STS,
            Level.ERROR,
            "older than 3.10, which profile postfix310 needs for the TLSRPT",
        ),
        (Version(3, 9, 9), FAILURE_ONLY, Level.ERROR, "which profile failing needs"),
        (Version(3, 10), STS, Level.OK, "Postfix 3.10 accepts what profile postfix310 sends (the TLSRPT"),
    ],
)
def test_version_against_what_the_profile_sends(
    version: Version, profiles: dict[str, Profile], level: Level, text: str
) -> None:
    (finding,) = version_findings(view(version), profiles, CONFIG)
    assert finding.level is level and finding.topic == Topic.VERSION
    assert text in finding.message, finding.message


def test_too_old_for_tlsrpt_names_the_plain_profile_as_a_fix() -> None:
    (finding,) = version_findings(view(Version(3, 7, 11)), STS, CONFIG)
    assert finding.fix.startswith("name profile postfix in main.cf (socketmap:…:postfix)")


def test_unknown_version_is_a_warning() -> None:
    assert [f.level for f in version_findings(view(None), PLAIN, CONFIG)] == [Level.WARNING]


@pytest.mark.parametrize(
    ("version", "setting", "profiles", "expected"),
    [
        # Before 3.10.5 the parameter does not exist: nothing to say.
        (Version(3, 10, 4), "", PLAIN, []),
        (Version(3, 7, 11), "", PLAIN, []),
        # On (the default), without the attributes it needs: ✗.
        (Version(3, 10, 5), "yes", PLAIN, [Level.ERROR]),
        (Version(3, 11), "yes", FAILURE_ONLY, [Level.ERROR]),
        (Version(3, 10, 5), "yes", STS, [Level.OK]),
        (Version(3, 10, 13), "no", STS, [Level.WARNING]),
        (Version(3, 10, 13), "no", PLAIN, [Level.WARNING]),
    ],
)
def test_enforce_sts_mx_patterns_needs_the_tlsrpt_attributes(
    version: Version, setting: str, profiles: dict[str, Profile], expected: list[Level]
) -> None:
    findings = mx_pattern_findings(view(version, smtp_tls_enforce_sts_mx_patterns=setting), profiles, CONFIG)
    assert [f.level for f in findings] == expected
    assert all(f.topic == Topic.MX_PATTERNS for f in findings)


def test_enforce_sts_mx_patterns_without_attributes_says_which_profile_to_choose() -> None:
    (finding,) = mx_pattern_findings(view(smtp_tls_enforce_sts_mx_patterns="yes"), PLAIN, CONFIG)
    assert "profile postfix sends no MTA-STS attributes" in finding.message
    assert "mx_host_pattern" in finding.meaning
    assert finding.fix == (
        "use the built-in profile postfix310 in main.cf (socketmap:…:postfix310), "
        "or set tlsrpt = true in [profiles.postfix] of /etc/postfix-mtasts.toml"
    )


def test_a_master_cf_override_of_the_smtp_service_wins_over_main_cf() -> None:
    master = SMTP_CHROOTED + " -o smtp_tls_enforce_sts_mx_patterns=no"
    findings = mx_pattern_findings(view(master=master, smtp_tls_enforce_sts_mx_patterns="yes"), PLAIN, CONFIG)
    assert [f.level for f in findings] == [Level.WARNING]


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("", Level.WARNING),
        ("none", Level.WARNING),
        ("may", Level.OK),
        ("encrypt", Level.OK),
        ("dane", Level.OK),
    ],
)
def test_security_level(level: str, expected: Level) -> None:
    (finding,) = security_level_findings(view(smtp_tls_security_level=level))
    assert finding.level is expected and finding.topic == Topic.SECURITY_LEVEL
    if expected is Level.WARNING:
        assert finding.fix == "in main.cf: smtp_tls_security_level = may"


@pytest.mark.parametrize(
    ("profiles", "parameters", "expected", "fix"),
    [
        (PLAIN, {}, [], ""),
        (DANE, {"smtp_dns_support_level": ""}, [Level.ERROR], "smtp_dns_support_level = dnssec"),
        (
            DANE,
            {"smtp_dns_support_level": "dnssec", "smtp_host_lookup": "native"},
            [Level.ERROR],
            "smtp_host_lookup = dns",
        ),
        (DANE, {"smtp_dns_support_level": "dnssec", "smtp_host_lookup": "dns, native"}, [Level.OK], ""),
        (
            PLAIN,
            {"smtp_dns_support_level": "dnssec", "smtp_tls_security_level": "dane"},
            [Level.WARNING],
            "set dane = true in [profiles.postfix]",
        ),
        (PLAIN, {"smtp_dns_support_level": "dnssec", "smtp_tls_security_level": "may"}, [], ""),
    ],
)
def test_dane_settings_against_the_profile(
    profiles: dict[str, Profile], parameters: dict[str, str], expected: list[Level], fix: str
) -> None:
    findings = dane_findings(view(**parameters), profiles, CONFIG)
    assert [f.level for f in findings] == expected, shown(findings)
    assert all(fix in f.fix for f in findings)


@pytest.mark.parametrize(
    ("version", "profiles", "parameters", "socket_exists", "expected"),
    [
        (Version(3, 7, 11), STS, {}, None, []),  # no TLSRPT client before 3.10
        (Version(3, 10), PLAIN, {"smtp_tlsrpt_enable": "no"}, None, []),
        (
            Version(3, 10),
            STS,
            {"smtp_tlsrpt_enable": "no"},
            None,
            [(Level.WARNING, "smtp_tlsrpt_enable = no")],
        ),
        (
            Version(3, 10),
            STS,
            {"smtp_tlsrpt_enable": "yes", "smtp_tlsrpt_socket_name": ""},
            None,
            [(Level.ERROR, "smtp_tlsrpt_socket_name is empty")],
        ),
        (
            Version(3, 10),
            STS,
            {"smtp_tlsrpt_enable": "yes", "smtp_tlsrpt_socket_name": "run/tlsrpt.sock"},
            False,
            [(Level.WARNING, "run/tlsrpt.sock: no such socket")],
        ),
        (
            Version(3, 10),
            STS,
            {"smtp_tlsrpt_enable": "yes", "smtp_tlsrpt_socket_name": "run/tlsrpt.sock"},
            True,
            [(Level.OK, "reports TLS results to run/tlsrpt.sock")],
        ),
        (
            Version(3, 10),
            PLAIN,
            {"smtp_tlsrpt_enable": "yes", "smtp_tlsrpt_socket_name": "run/tlsrpt.sock"},
            True,
            [(Level.WARNING, "profile postfix sends no TLSRPT attributes")],
        ),
    ],
)
def test_tlsrpt_client_against_the_profile(
    version: Version,
    profiles: dict[str, Profile],
    parameters: dict[str, str],
    socket_exists: bool | None,
    expected: list[tuple[Level, str]],
) -> None:
    findings = tlsrpt_findings(view(version, **parameters), profiles, socket_exists)
    assert len(findings) == len(expected), shown(findings)
    for finding, (level, text) in zip(findings, expected, strict=True):
        assert finding.level is level and text in finding.message and finding.topic == Topic.TLSRPT


def test_tlsrpt_socket_is_looked_for_where_the_chrooted_smtp_client_sees_it() -> None:
    assert (
        tlsrpt_socket_path(view(smtp_tlsrpt_socket_name="run/tlsrpt.sock"))
        == "/var/spool/postfix/run/tlsrpt.sock"
    )
    assert tlsrpt_socket_path(view(smtp_tlsrpt_socket_name="")) == ""
