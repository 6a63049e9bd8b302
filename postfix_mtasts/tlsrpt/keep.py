"""``postfix-mtasts report ingest`` and ``report show``: the report store from the shell.

``ingest`` stores the reports found in files, mail, mailboxes or standard
input, and is also the command Postfix's pipe(8) runs for mail to the rua
address: it exits 0 when every input was dealt with (unreadable ones are
logged and counted, never retried) and 75 (EX_TEMPFAIL) when the store or the
configuration cannot be used, so Postfix keeps the message queued and tries
again. ``show`` adds up stored reports, with the same outputs as ``report``.
Plain synchronous Python: no reactor.
"""

from __future__ import annotations

import argparse
import email.policy
import logging
import logging.handlers
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from typing import BinaryIO, TextIO

from postfix_mtasts.tlsrpt.ingest import ingest
from postfix_mtasts.tlsrpt.render import render_csv, render_html, render_json, render_text
from postfix_mtasts.tlsrpt.sources import (
    MAX_INPUT_BYTES,
    Broken,
    Collected,
    Found,
    Item,
    content_kind,
    read_bytes,
    read_inputs,
    read_limited,
)
from postfix_mtasts.tlsrpt.store import IReportStore, ReportStoreError, open_store
from postfix_mtasts.tlsrpt.summary import summarize

#: Exit status: done (unreadable inputs are logged and counted, not retried).
EXIT_OK = 0
#: Exit status of ``show`` for a store or configuration that cannot be used.
EXIT_ERROR = 2
#: Exit status of ``ingest`` when the store or the configuration cannot be used:
#: sysexits' EX_TEMPFAIL, on which Postfix's pipe(8) defers the message.
EX_TEMPFAIL = 75
#: Bytes of a piped message searched for its Message-ID header.
MAX_HEADER_BYTES = 64 * 1024
#: Largest ``--since`` accepted, in days (about a century).
MAX_SINCE_DAYS = 36_500

log = logging.getLogger("postfix_mtasts.tlsrpt")


def build_parser(action: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"postfix-mtasts report {action}")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="TOML configuration file naming the store ([reports] path or dsn)")
    if action == "ingest":
        parser.description = (
            "Store the TLS reports found in files (.json, .gz, .zip), mail messages, mbox files, "
            "Maildirs, directories or standard input. Each report is kept once. Exit status 0 when "
            "all input was dealt with, 75 when the store cannot be written (try again later)."
        )
        parser.add_argument("paths", nargs="+", metavar="PATH", help="what to read; '-' is standard input")
        return parser
    parser.description = "Add up the stored TLS reports and explain each kind of failure."
    parser.add_argument("--since", metavar="DAYS", type=_days,
                        help="only reports whose date range ends in the last DAYS days")
    parser.add_argument("--domain", metavar="D", help="only the policies of policy domain D")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the summary as JSON")
    output.add_argument("--csv", action="store_true", help="print one CSV row per policy result and failure")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page to FILE")
    return parser


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not 0 < days <= MAX_SINCE_DAYS:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {MAX_SINCE_DAYS} days, got {text}")
    return days


def run(action: str, argv: list[str], stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run ``report ACTION`` with the rest of the command line ``argv``."""
    args = build_parser(action).parse_args(argv)
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    failure = EX_TEMPFAIL if action == "ingest" else EXIT_ERROR
    from postfix_mtasts.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"postfix-mtasts report {action}: {e}", file=err)
        return failure
    level = logging.getLogger().level
    handlers = _log_handlers(action, err, config.log.syslog)
    try:
        try:
            store = open_store(config.reports)
        except ReportStoreError as e:
            log.error("%s", e)
            return failure
        try:
            if action == "ingest":
                return _ingest(store, args.paths, out)
            return _show(store, args, out)
        finally:
            store.close()
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()
        logging.getLogger().setLevel(level)


def _ingest(store: IReportStore, paths: list[str], out: TextIO) -> int:
    if "-" in paths and sys.stdin.isatty():
        log.warning("reading a report from standard input (end with Ctrl-D)")
    try:
        tally = ingest(store, _inputs(paths, sys.stdin.buffer))
    except ReportStoreError as e:
        log.error("%s; stopped, nothing more stored: run again later", e)
        return EX_TEMPFAIL
    print(tally.line(), file=out)
    return EXIT_OK


def _inputs(paths: list[str], stdin: BinaryIO) -> Iterator[Item]:
    """What ``report`` reads, but a message on standard input (pipe(8)) is
    named by its Message-ID, so the store says which mail brought a report."""
    for path in paths:
        if path != "-":
            yield from read_inputs([path], stdin)
            continue
        data = read_limited(stdin, MAX_INPUT_BYTES)
        if data is None:
            yield Broken("standard input", f"larger than {MAX_INPUT_BYTES} bytes")
        else:
            yield from read_bytes(_stdin_name(data), data)


def _stdin_name(data: bytes) -> str:
    if content_kind(data) != "message":
        return "standard input"
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(data[:MAX_HEADER_BYTES])
    message_id = " ".join(str(headers.get("Message-ID", "")).split())
    return f"message {message_id}" if message_id else "standard input"


def _show(store: IReportStore, args: argparse.Namespace, out: TextIO) -> int:
    since = datetime.now(UTC) - timedelta(days=args.since) if args.since else None
    reports = store.reports(since=since, domain=args.domain)
    collected = Collected([Found(str(store.location), report) for report in reports], [], [], [])
    summary = summarize(reports)
    if args.json:
        out.write(render_json(summary, collected))
    elif args.csv:
        out.write(render_csv(collected))
    elif not reports:
        print("no reports stored" + (" for that selection" if since or args.domain else ""), file=out)
    else:
        out.write(render_text(summary, collected))
    if args.html:
        try:
            with open(args.html, "w", encoding="utf-8") as page:
                page.write(render_html(summary, collected))
        except OSError as e:
            log.error("cannot write %s: %s", args.html, e.strerror or e)
            return EXIT_ERROR
    return EXIT_OK


def _log_handlers(action: str, err: TextIO, syslog: bool) -> list[logging.Handler]:
    """One line per problem on standard error and, with ``[log] syslog``, in
    the mail log too (under pipe(8) standard error is only kept on failure)."""
    from postfix_mtasts.logsetup import SYSLOG_SOCKET

    prefix = f"postfix-mtasts report {action}"
    handlers: list[logging.Handler] = []
    stream = logging.StreamHandler(err)
    stream.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    stream.setLevel(logging.WARNING)
    handlers.append(stream)
    if syslog:
        try:
            mail_log = logging.handlers.SysLogHandler(
                address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL
            )
        except OSError as e:
            print(f"{prefix}: cannot log to {SYSLOG_SOCKET} ({e.strerror}); logging to standard error only",
                  file=err)
        else:
            tag = f"postfix-mtasts[{os.getpid()}]: report {action}"
            mail_log.setFormatter(logging.Formatter(f"{tag}: %(message)s"))
            mail_log.setLevel(logging.INFO)
            handlers.append(mail_log)
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handlers
