"""``postfix-mtasts report``: read RFC 8460 TLS aggregate reports and explain them.

Plain synchronous Python (no reactor): reports are files or mail on disk, read
once, added up and printed.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from postfix_mtasts.tlsrpt.render import render_csv, render_html, render_json, render_text
from postfix_mtasts.tlsrpt.sources import Collected, collect, read_inputs
from postfix_mtasts.tlsrpt.summary import summarize

#: ``report ingest`` and ``report show`` (postfix_mtasts.tlsrpt.keep): the report store.
ACTIONS = ("ingest", "show")
#: Exit status: at least one report read and none broken.
EXIT_OK = 0
#: Exit status: some input was broken (the rest was still counted).
EXIT_BROKEN = 1
#: Exit status: no report could be read at all (or the output could not be written).
EXIT_NOTHING = 2

PROG = "postfix-mtasts report"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register the ``report`` subcommand and its options on the CLI's subparsers."""
    report = commands.add_parser(
        "report",
        help="read RFC 8460 TLS reports (JSON, .json.gz, mail, mbox, Maildir) and explain them",
        description="Add up SMTP TLS reports (RFC 8460) that senders mailed to your tlsrpt address, "
        "and explain each kind of failure with its usual fix. Inputs are recognised by content.",
        epilog="To keep reports: 'postfix-mtasts report ingest PATH...|-' stores them (once each) "
        "in the report store, 'postfix-mtasts report show' adds up what is stored; see --help of each.",
    )
    add_arguments(report)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="*", metavar="PATH",
        help="report files (.json, .json.gz, .zip), mail messages, mbox files, Maildirs or directories "
        "of them; '-' or none reads standard input",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the summary as JSON")
    output.add_argument("--csv", action="store_true", help="print one CSV row per policy result and failure")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page to FILE")


def main(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the report command for parsed ``args``; returns the exit status."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    paths = list(args.paths)
    if (not paths or "-" in paths) and sys.stdin.isatty():
        print(f"{PROG}: reading a report from standard input (end with Ctrl-D)", file=err)
    collected = collect(read_inputs(paths, sys.stdin.buffer))
    _tell_problems(collected, err)
    summary = summarize(collected.reports)
    if not collected.found:
        print(f"{PROG}: no TLS report could be read", file=err)
        if args.json:  # a program reading the output gets the reasons too, not nothing
            out.write(render_json(summary, collected))
        return EXIT_NOTHING
    if args.json:
        out.write(render_json(summary, collected))
    elif args.csv:
        out.write(render_csv(collected))
    else:
        out.write(render_text(summary, collected))
    if args.html:
        try:
            with open(args.html, "w", encoding="utf-8") as page:
                page.write(render_html(summary, collected))
        except OSError as e:
            print(f"{PROG}: cannot write {args.html}: {e.strerror or e}", file=err)
            return EXIT_NOTHING
    return EXIT_BROKEN if collected.broken else EXIT_OK


def _tell_problems(collected: Collected, err: TextIO) -> None:
    for broken in collected.broken:
        print(f"{PROG}: {broken.source}: {broken.reason}; skipped", file=err)
    for ignored in collected.ignored:
        print(f"{PROG}: {ignored.source}: {ignored.reason}; skipped", file=err)
    for duplicate in collected.duplicates:
        outcome = "; counted once"
        if duplicate.conflict:
            outcome = " with different content; the first copy is counted"
        print(
            f"{PROG}: {duplicate.source}: report {duplicate.report.report_id!r} of "
            f"{duplicate.report.organization_name} was already read from {duplicate.first_source}{outcome}",
            file=err,
        )
    for warning in collected.warnings:
        print(f"{PROG}: {warning.source}: warning: {warning.text}", file=err)


def run(argv: list[str] | None = None) -> int:
    """Entry point without the rest of the CLI: ``python -m postfix_mtasts.tlsrpt``."""
    parser = argparse.ArgumentParser(prog=PROG)
    add_arguments(parser)
    return main(parser.parse_args(argv))
