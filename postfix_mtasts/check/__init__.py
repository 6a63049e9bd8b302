"""``postfix-mtasts check DOMAIN``: audit a domain's own MTA-STS set-up as a
sending MTA sees it (TXT record, policy host and policy, MX coverage, STARTTLS
on every MX, TLSRPT), printed as ✓ / ⚠ / ✗ lines or as JSON.

:func:`add_check_parser` registers the subcommand on the CLI's parser and
:func:`run_check` runs it under the reactor that ``cli.main`` installed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from postfix_mtasts.check.audit import CheckSettings

# This module stays light (no Twisted, no TLS): the CLI imports it to build its
# parser for every command; the audit itself is imported when it runs.

#: Exit status for a usage error (bad domain, unusable CA file), as argparse uses.
EXIT_USAGE = 2
#: The SMTP port senders use (RFC 5321 §4.5.4.2); another is for test set-ups only.
SMTP_PORT = 25
#: Seconds one MX host may take, connect to QUIT, before it is reported as hanging.
PROBE_DEADLINE = 10.0
#: Largest --smtp-timeout accepted.
PROBE_DEADLINE_MAX = 3600.0

__all__ = ["add_check_parser", "check_settings", "run_check"]


def add_check_parser(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``check`` to the CLI's subcommands; ``common`` adds -c/-v/-q."""
    check = commands.add_parser(
        "check",
        help="audit a domain's own MTA-STS set-up as a sending MTA sees it",
        description=(
            "Check DOMAIN's _mta-sts TXT record, policy host and policy, its MX hosts against the "
            "policy, STARTTLS and certificates on every MX (port 25), and its TLSRPT record. "
            "Exit status: 0 without errors (warnings allowed), 1 with errors, 2 for usage errors. "
            "DNS servers, CA file and timeouts come from the [resolver] section of the configuration."
        ),
    )
    common(check)
    check.add_argument("domain", help="the mail domain to check, e.g. example.com")
    check.add_argument(
        "--json", action="store_true", help="print the findings as a JSON list, for monitoring"
    )
    check.add_argument(
        "--smtp-timeout",
        type=_positive_seconds,
        default=PROBE_DEADLINE,
        metavar="SECONDS",
        help=f"deadline for each MX host's SMTP probe (default: {PROBE_DEADLINE:g})",
    )
    check.add_argument(
        "--smtp-port",
        type=_port,
        default=SMTP_PORT,
        metavar="PORT",
        help=f"connect to MX hosts on this port instead of {SMTP_PORT}: for test set-ups only",
    )


def check_settings(config: Any, args: argparse.Namespace) -> CheckSettings:
    """The audit's settings from the loaded configuration and the command line."""
    from postfix_mtasts.check.audit import CheckSettings

    resolver = config.resolver
    nameservers = tuple(str(server) for server in resolver.nameservers)
    return CheckSettings(
        nameservers=nameservers,
        ca_file=resolver.ca_file,
        https_port=resolver.https_port,
        smtp_port=args.smtp_port,
        dns_timeout=resolver.dns_timeout,
        fetch_timeout=resolver.fetch_timeout,
        smtp_deadline=args.smtp_timeout,
    )


def run_check(reactor: Any, config: Any, args: argparse.Namespace) -> int:
    """Run the audit under ``reactor`` (already installed, not yet running),
    print it, and return the exit status."""
    from postfix_mtasts.check.audit import Auditor, CheckSetupError, normalise_domain
    from postfix_mtasts.check.findings import Finding, exit_status, render_json, render_text

    try:
        domain = normalise_domain(args.domain)
        auditor = Auditor(reactor, check_settings(config, args))
    except CheckSetupError as error:
        print(f"postfix-mtasts check: {error}", file=sys.stderr)
        return EXIT_USAGE
    outcome: dict[str, Any] = {"findings": None, "error": None}

    async def job() -> None:
        try:
            outcome["findings"] = await auditor.audit(domain)
        except Exception as unexpected:  # a bug: one line, the traceback with -v
            outcome["error"] = unexpected
            logging.getLogger("postfix_mtasts").debug("check failed", exc_info=True)

    def start() -> None:
        from twisted.internet.defer import Deferred

        Deferred.fromCoroutine(job()).addBoth(lambda _: reactor.stop())

    # Started on the loop's first turn, as cli._run does (under the asyncio
    # reactor, callWhenRunning fires before the asyncio loop turns).
    reactor.callWhenRunning(reactor.callLater, 0, start)
    reactor.run()
    findings: list[Finding] | None = outcome["findings"]
    if findings is None:
        print(f"postfix-mtasts check: the audit failed: {outcome['error']}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        sys.stdout.write(render_json(findings))
    else:
        sys.stdout.write(render_text(domain, findings))
    return exit_status(findings)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= PROBE_DEADLINE_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and {PROBE_DEADLINE_MAX:g} seconds")
    return value


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 1 to 65535")
    return int(text)
