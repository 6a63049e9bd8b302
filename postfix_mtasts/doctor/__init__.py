"""``postfix-mtasts doctor``: check that the live Postfix configuration uses
this daemon, can reach it (a real lookup through ``postmap``, as the chrooted
smtp or proxymap service would make it), and accepts what its profile sends;
printed as ✓ / ⚠ / ✗ lines, each ⚠ and ✗ with the line to change, or as JSON.

:func:`add_doctor_parser` registers the subcommand; :func:`run_doctor` runs it
(no reactor: it only runs postconf and postmap).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

#: Exit status when doctor cannot read the Postfix configuration at all.
EXIT_USAGE = 2

__all__ = ["add_doctor_parser", "run_doctor"]


def add_doctor_parser(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``doctor`` to the CLI's subcommands; ``common`` adds -c/-v/-q."""
    doctor = commands.add_parser(
        "doctor",
        help="check that Postfix asks this daemon, reaches it, and accepts its answers",
        description=(
            "Read the live Postfix configuration (postconf) and check that smtp_tls_policy_maps "
            "names this daemon, that a lookup through postmap reaches it as the smtp (or, for "
            "proxy:, the proxymap) service would, chroot included, and that the Postfix version, "
            "smtp_tls_security_level, DANE, TLSRPT and smtp_tls_enforce_sts_mx_patterns settings "
            "fit the profile in use. Each problem comes with the line to change. Exit status: 0 "
            "without errors (warnings allowed), 1 with errors, 2 if postconf cannot be run."
        ),
    )
    common(doctor)
    doctor.add_argument(
        "--postfix-dir",
        metavar="DIR",
        help="Postfix configuration directory, as postconf -c (default: Postfix's own, /etc/postfix)",
    )
    doctor.add_argument(
        "--json", action="store_true", help="print the findings as a JSON list, for monitoring"
    )


def run_doctor(config: Any, args: argparse.Namespace) -> int:
    """Diagnose, print, and return the exit status."""
    from postfix_mtasts.check.findings import exit_status, render_json, render_text
    from postfix_mtasts.doctor.run import DoctorSetupError, diagnose

    try:
        label, findings = diagnose(config, args.postfix_dir)
    except DoctorSetupError as error:
        print(f"postfix-mtasts doctor: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        sys.stdout.write(render_json(findings))
    else:
        sys.stdout.write(render_text(f"Postfix in {label}", findings))
    return exit_status(findings)
