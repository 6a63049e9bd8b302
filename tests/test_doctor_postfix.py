"""doctor's reading of Postfix: postconf output (parameters, master.cf
entries, the version), map lists and the tables in them, and where a
(chrooted) Postfix daemon finds a unix socket. Pure parsing, table-driven."""

from __future__ import annotations

import pytest

from postfix_mtasts.doctor.postfix import (
    MasterEntry,
    TableRef,
    Version,
    client_socket_path,
    find_service,
    is_yes,
    parse_master,
    parse_parameters,
    parse_table,
    parse_version,
    split_map_list,
)

#: What Debian 12's `postconf -M` prints for part of its master.cf (one line per entry).
MASTER = "\n".join(
    [
        "smtp       inet  n       -       y       -       -       smtpd",
        "proxymap   unix  -       -       n       -       -       proxymap",
        "smtp       unix  -       -       y       -       -       smtp",
        "relay      unix  -       -       y       -       -       smtp -o syslog_name=postfix/$service_name",
        "strict     unix  -       -       -       -       -       smtp"
        " -o smtp_tls_policy_maps=socketmap:inet:127.0.0.1:8461:strict",
        "maildrop   unix  -       n       n       -       -       pipe"
        " flags=DRXhu user=vmail argv=/usr/bin/maildrop -d ${recipient}",
    ]
)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("3.7.11", Version(3, 7, 11)),
        ("3.10.5\n", Version(3, 10, 5)),
        ("3.10", Version(3, 10, 0)),
        ("3.11-20250418", Version(3, 11, 0)),
        ("", None),
        ("unknown", None),
    ],
)
def test_parse_version(text: str, version: Version | None) -> None:
    assert parse_version(text) == version


def test_versions_compare_by_number_and_print_as_postfix_names_them() -> None:
    assert Version(3, 10, 5) > Version(3, 9, 12) > Version(3, 4)
    assert Version(3, 10, 4) < Version(3, 10, 5)
    assert (str(Version(3, 10)), str(Version(3, 7, 11))) == ("3.10", "3.7.11")


def test_parse_parameters_keeps_values_whole_and_skips_noise() -> None:
    text = (
        "smtp_tls_policy_maps = hash:/etc/postfix/x, socketmap:inet:127.0.0.1:8461:postfix\n"
        "smtp_tls_security_level =\n"
        "postconf: warning: smtp_tlsrpt_enable: unknown parameter\n"
        "queue_directory = /var/spool/postfix\n"
    )
    assert dict(parse_parameters(text)) == {
        "smtp_tls_policy_maps": "hash:/etc/postfix/x, socketmap:inet:127.0.0.1:8461:postfix",
        "smtp_tls_security_level": "",
        "queue_directory": "/var/spool/postfix",
    }


def test_parse_master_reads_columns_command_and_overrides() -> None:
    entries = parse_master(MASTER)
    assert [entry.name for entry in entries] == [
        "smtp/inet",
        "proxymap/unix",
        "smtp/unix",
        "relay/unix",
        "strict/unix",
        "maildrop/unix",
    ]
    smtp = find_service(entries, "smtp", "unix")
    assert smtp is not None and smtp.command == "smtp" and smtp.chrooted
    proxymap = find_service(entries, "proxymap", "unix")
    assert proxymap is not None and not proxymap.chrooted
    strict = find_service(entries, "strict", "unix")
    assert strict is not None and not strict.chrooted  # "-" is "n" since Postfix 3.0
    assert dict(strict.overrides()) == {"smtp_tls_policy_maps": "socketmap:inet:127.0.0.1:8461:strict"}
    assert find_service(entries, "smtp", "fifo") is None


def test_overrides_in_both_spellings() -> None:
    entry = MasterEntry("x", "unix", "-", "-", "n", "-", "-", "smtp", ("-o", "a=1", "-ob=2", "-o", "c"))
    assert dict(entry.overrides()) == {"a": "1", "b": "2"}


@pytest.mark.parametrize(
    ("text", "tables"),
    [
        ("", ()),
        ("hash:/etc/postfix/tls_policy", ("hash:/etc/postfix/tls_policy",)),
        ("a:x, b:y c:z,d:w", ("a:x", "b:y", "c:z", "d:w")),
        ("inline:{ a=b, c=d }, tcp:127.0.0.1:1", ("inline:{ a=b, c=d }", "tcp:127.0.0.1:1")),
    ],
)
def test_split_map_list(text: str, tables: tuple[str, ...]) -> None:
    assert split_map_list(text) == tables


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "socketmap:inet:127.0.0.1:8461:postfix",
            TableRef(
                "socketmap:inet:127.0.0.1:8461:postfix",
                "socketmap",
                False,
                "socketmap:inet:127.0.0.1:8461:postfix",
                "inet",
                "127.0.0.1",
                8461,
                name="postfix",
            ),
        ),
        (
            "proxy:socketmap:inet:[::1]:8461:strict",
            TableRef(
                "proxy:socketmap:inet:[::1]:8461:strict",
                "socketmap",
                True,
                "socketmap:inet:[::1]:8461:strict",
                "inet",
                "::1",
                8461,
                name="strict",
            ),
        ),
        (
            "socketmap:unix:private/mtasts:postfix",
            TableRef(
                "socketmap:unix:private/mtasts:postfix",
                "socketmap",
                False,
                "socketmap:unix:private/mtasts:postfix",
                "unix",
                path="private/mtasts",
                name="postfix",
            ),
        ),
        (
            "tcp:localhost:8462",
            TableRef("tcp:localhost:8462", "tcp", False, "tcp:localhost:8462", "inet", "localhost", 8462),
        ),
        (
            "hash:/etc/postfix/tls_policy",
            TableRef("hash:/etc/postfix/tls_policy", "other", False, "hash:/etc/postfix/tls_policy"),
        ),
    ],
)
def test_parse_table(text: str, expected: TableRef) -> None:
    table = parse_table(text)
    assert table == expected
    assert table.problem == ""


@pytest.mark.parametrize(
    "text",
    [
        "socketmap:inet:127.0.0.1:8461",
        "socketmap:inet:127.0.0.1:99999:x",
        "socketmap:udp:x:1:y",
        "tcp:127.0.0.1",
        "socketmap:unix:/x",
    ],
)
def test_malformed_daemon_tables_carry_a_problem(text: str) -> None:
    assert parse_table(text).problem


@pytest.mark.parametrize(
    ("path", "chrooted", "seen"),
    [
        ("private/mtasts", True, "/var/spool/postfix/private/mtasts"),
        ("private/mtasts", False, "/var/spool/postfix/private/mtasts"),
        ("/run/mtasts.sock", False, "/run/mtasts.sock"),
        # The classic mistake: an absolute path inside the chroot is looked up under it.
        ("/var/spool/postfix/private/mtasts", True, "/var/spool/postfix/var/spool/postfix/private/mtasts"),
        ("/run/mtasts.sock", True, "/var/spool/postfix/run/mtasts.sock"),
    ],
)
def test_client_socket_path(path: str, chrooted: bool, seen: str) -> None:
    assert client_socket_path(path, "/var/spool/postfix", chrooted) == seen


@pytest.mark.parametrize(
    ("value", "yes"), [("yes", True), ("YES", True), ("no", False), ("", False), (None, False)]
)
def test_is_yes(value: str | None, yes: bool) -> None:
    assert is_yes(value) is yes
