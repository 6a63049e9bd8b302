"""The ``postfix-mtasts`` command: the only module that touches the global reactor.

The reactor is installed here, before anything imports
``twisted.internet.reactor``. With the Redis or PostgreSQL cache it is
Twisted's asyncio reactor, because their clients are asyncio libraries;
otherwise it is Twisted's default (epoll on Linux), on which a bare Twisted
socketmap server serves about a third more lookups per CPU-second than on
the asyncio reactor (bench/README.rst). DNS works on either: dnspython runs on a Twisted I/O
backend (postfix_mtasts.resolver.twisted_backend).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

#: systemd's socket-activation variables, copied before anything imports
#: twisted.internet.endpoints: that import deletes LISTEN_PID and LISTEN_FDS.
SYSTEMD_LISTEN_ENVIRONMENT = {name: value for name, value in os.environ.items() if name.startswith("LISTEN_")}

from postfix_mtasts import __version__, tlsrpt  # noqa: E402
from postfix_mtasts import check as check_command  # noqa: E402
from postfix_mtasts import doctor as doctor_command  # noqa: E402

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_ERROR = 2

log = logging.getLogger("postfix_mtasts")


#: Cache backends whose client libraries need an asyncio event loop.
ASYNCIO_BACKENDS = frozenset({"redis", "postgresql"})


def _install_reactor(asyncio_needed: bool) -> Any:
    """Install the asyncio reactor when ``asyncio_needed``, else Twisted's default."""
    if "twisted.internet.reactor" not in sys.modules:
        if asyncio_needed:
            from twisted.internet import asyncioreactor

            loop = asyncio.new_event_loop()
            # The reactor runs this loop, but does not make it the thread's
            # current one: without this, a store opened from callWhenRunning
            # (before the loop turns) would put its asyncio task on another
            # loop that never runs, and time out.
            asyncio.set_event_loop(loop)
            asyncioreactor.install(loop)  # type: ignore[no-untyped-call]
        else:
            from twisted.internet import default

            default.install()
    from twisted.internet import reactor

    return reactor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postfix-mtasts",
        description="MTA-STS (RFC 8461) TLS policy map for Postfix.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "-c", "--config", metavar="FILE", help="TOML configuration file (default: built-in defaults)"
        )
        sub.add_argument("-v", "--verbose", action="count", default=0, help="more log detail (repeatable)")
        sub.add_argument("-q", "--quiet", action="count", default=0, help="less log detail (repeatable)")

    serve = commands.add_parser(
        "serve",
        help="run the policy daemon",
        description=(
            "Run the policy daemon: answer Postfix's socketmap and tcp_table lookups on the "
            "[listen] addresses of the configuration until SIGTERM or SIGINT; SIGHUP re-reads "
            "the configuration. Logs one line per resolution (to stderr, or syslog with "
            "[log] syslog = true)."
        ),
    )
    common(serve)

    query = commands.add_parser(
        "query",
        help="resolve one domain now, without a daemon, and show every step",
        description=(
            "Resolve DOMAIN now, as the daemon would but without its cache or a running daemon: "
            "print each step (TXT record, policy fetch), the result, and the answer the profile "
            "gives Postfix. Exit status: 0 for a policy answer, 1 for not found, 2 for an error."
        ),
    )
    common(query)
    query.add_argument("domain", help="a next-hop domain as Postfix would send it")
    query.add_argument("--profile", default="postfix", help="socketmap name / profile (default: postfix)")
    check_command.add_check_parser(commands, common)
    doctor_command.add_doctor_parser(commands, common)
    tlsrpt.add_parser(commands)

    ctl = commands.add_parser(
        "ctl", help="talk to the running daemon over its control socket",
        description="Inspect and steer a running daemon. Exit status 0 on success, 2 on any error.",
    )
    ctl.add_argument("-c", "--config", metavar="FILE", help="configuration file naming [control] socket")
    ctl.add_argument("--socket", metavar="PATH", help="control socket (default: from the config, else "
                                                       "/run/postfix-mtasts/control.sock as root)")
    actions = ctl.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="cached domains: mode, policy id, fetched, expires, source")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    show = actions.add_parser(
        "show", help="one cached entry, its policy and the trace of its last resolution"
    )
    show.add_argument("domain")
    show.add_argument("--json", action="store_true", help="JSON instead of text")
    for name, text in (("refresh", "resolve now, fetching the policy even if its id is known"),
                       ("flush", "forget cached entries")):
        sub = actions.add_parser(name, help=text)
        target = sub.add_mutually_exclusive_group(required=True)
        target.add_argument("domain", nargs="?", help="one domain")
        target.add_argument("--all", action="store_true", help="every cached domain")
        sub.add_argument("--json", action="store_true", help="JSON instead of text")
    stats = actions.add_parser("stats", help="lookups, cache hits, fetches and failures, latency, uptime")
    stats.add_argument("--json", action="store_true", help="JSON instead of text")
    actions.add_parser("reload", help="re-read the configuration file (same as SIGHUP)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"] and argv[1:2] and argv[1] in tlsrpt.ACTIONS:
        from postfix_mtasts.tlsrpt import keep  # the report store: its own options

        return keep.run(argv[1], argv[2:])
    args = build_parser().parse_args(argv)
    if args.command == "report":  # plain synchronous Python: no config, no reactor
        return tlsrpt.main(args)
    from postfix_mtasts.config import ConfigError, load_config

    if args.command == "ctl" and args.socket:
        return _ctl(args, args.socket)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"postfix-mtasts: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.command == "doctor":  # runs postconf and postmap: no reactor, no logging set-up
        return doctor_command.run_doctor(config, args)
    if args.command == "ctl":
        from postfix_mtasts.control import client_socket_path

        return _ctl(args, config.control.socket or client_socket_path())
    reactor = _install_reactor(args.command == "serve" and config.cache.backend in ASYNCIO_BACKENDS)
    from postfix_mtasts import logsetup

    verbosity = args.verbose - args.quiet
    level = logsetup.adjust_level(logsetup.LEVELS[config.log.level], verbosity)
    try:
        logsetup.configure(level, syslog=config.log.syslog and args.command == "serve")
    except logsetup.LogSetupError as e:
        print(f"postfix-mtasts: {e}", file=sys.stderr)
        return EXIT_ERROR
    logsetup.route_twisted_logs()
    if args.command == "check":
        return check_command.run_check(reactor, config, args)
    if args.command == "serve":
        return _serve(reactor, config, verbosity)
    return _query(reactor, config, args.domain, args.profile, verbosity)


def _ctl(args: argparse.Namespace, path: str) -> int:
    """One request to the daemon's control socket; the answer printed as text or JSON."""
    import json

    from postfix_mtasts import control

    action = args.action
    request: dict[str, object] = {"command": action}
    if getattr(args, "all", False):
        request["all"] = True
    elif getattr(args, "domain", None) is not None:
        request["domain"] = args.domain
    try:
        reply = control.call(path, request)
    except control.ControlUnavailable as e:
        print(f"postfix-mtasts: {e}", file=sys.stderr)
        return EXIT_ERROR
    if not reply.get("ok"):
        print(f"postfix-mtasts: {reply.get('error', 'the daemon refused the request')}", file=sys.stderr)
        return EXIT_ERROR
    result = reply.get("result")
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, sort_keys=True))
    elif action == "list":
        print(control.format_list(result))  # type: ignore[arg-type]
    elif action == "show":
        print(control.format_show(result))  # type: ignore[arg-type]
    elif action == "stats":
        print(control.format_stats(result))  # type: ignore[arg-type]
    elif action == "refresh":
        print(control.format_results(result))  # type: ignore[arg-type]
    elif action == "flush":
        count = result["flushed"] if isinstance(result, dict) else 0
        print(f"flushed {args.domain}" if args.domain else f"flushed {count} entries")
    else:
        print(result)
    return EXIT_OK


def _run(reactor: Any, job: Any) -> int:
    """Run the coroutine function ``job`` under the reactor; its int is the exit code."""
    from twisted.internet.defer import Deferred

    outcome = {"code": EXIT_ERROR}

    def start() -> None:
        d = Deferred.fromCoroutine(job())

        def done(code: Any) -> None:
            outcome["code"] = code
            reactor.stop()

        def failed(failure: Any) -> None:
            log.error("%s", failure.getErrorMessage(),
                      exc_info=(failure.type, failure.value, failure.getTracebackObject()))
            reactor.stop()

        d.addCallbacks(done, failed)

    # Started on the loop's first turn: under the asyncio reactor,
    # callWhenRunning fires before the asyncio loop itself runs.
    reactor.callWhenRunning(reactor.callLater, 0, start)
    reactor.run()
    return int(outcome["code"])


def _serve(reactor: Any, config: Any, verbosity: int = 0) -> int:
    """Run the service until SIGTERM/SIGINT; SIGHUP reloads the configuration."""
    import signal

    from twisted.internet.defer import Deferred

    from postfix_mtasts.errors import ReloadRefused, StartupError
    from postfix_mtasts.service import Service
    from postfix_mtasts.sysmem import tune_collector

    tune_collector()
    service = Service(reactor, config, verbosity=verbosity, listen_environment=SYSTEMD_LISTEN_ENVIRONMENT)
    outcome = {"code": EXIT_OK}
    reload_wanted = {"pending": False}

    def reload_now() -> None:
        if not service.started or service.stopping:
            reload_wanted["pending"] = not service.stopping  # once start-up is over
            return

        async def run() -> None:
            try:
                await service.reload()
            except ReloadRefused:
                pass  # logged, one line, by the service

        Deferred.fromCoroutine(run()).addErrback(
            lambda failure: log.error("reload failed: %s", failure.getErrorMessage())
        )

    # Installed before the reactor runs: SIGHUP's default action would kill us.
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload_now))

    async def start() -> None:
        try:
            await service.start()
        except StartupError as e:
            log.error("cannot start: %s", e)
            outcome["code"] = 1
            reactor.stop()
            return
        reactor.addSystemEventTrigger("before", "shutdown", lambda: Deferred.fromCoroutine(service.stop()))
        if reload_wanted["pending"]:
            reload_now()

    def begin() -> None:
        d = Deferred.fromCoroutine(start())

        def crashed(failure: Any) -> None:
            log.error("start-up failed: %s", failure.getErrorMessage(),
                      exc_info=(failure.type, failure.value, failure.getTracebackObject()))
            outcome["code"] = 1
            reactor.stop()

        d.addErrback(crashed)

    log.debug("running on %s", type(reactor).__name__)
    reactor.callWhenRunning(begin)
    reactor.run()
    return outcome["code"]


def _query(reactor: Any, config: Any, domain_text: str, profile_name: str, verbosity: int = 0) -> int:
    from postfix_mtasts.answers import entry_answer
    from postfix_mtasts.cache.memory import MemoryStore
    from postfix_mtasts.lookup import RESULT_LOGGER
    from postfix_mtasts.policy.model import AnswerKind
    from postfix_mtasts.policy.nexthop import BracketedNextHop, Resolve, classify_key
    from postfix_mtasts.policy.tlsrpt import AnswerOptions
    from postfix_mtasts.service import build_lookup

    profile = config.profiles.get(profile_name)
    if profile is None:
        print(f"postfix-mtasts: unknown profile {profile_name!r}; configured: "
              f"{', '.join(sorted(config.profiles))}", file=sys.stderr)
        return EXIT_ERROR
    key = domain_text.encode("utf-8", "surrogateescape")
    decision = classify_key(key, BracketedNextHop(config.policy.bracketed_next_hop))
    if not isinstance(decision, Resolve):
        print(f"key {domain_text!r}: {decision.reason}")
        print("answer: NOTFOUND (no lookup needed)")
        return EXIT_NOT_FOUND
    domain = decision.domain
    print(f"key {domain_text!r}: policy domain {domain}")
    if verbosity <= 0:
        # Its one log line per resolution would land amid the steps printed
        # below, saying what the "result:" line says; -v shows it again.
        logging.getLogger(RESULT_LOGGER).setLevel(logging.WARNING)

    async def job() -> int:
        store = MemoryStore()
        await store.open()
        lookup = build_lookup(reactor, config, store)
        resolution = await lookup.refresh(domain)
        for step in resolution.trace:
            print(f"  {step}")
        print(f"result: {resolution.why}")
        answer = entry_answer(resolution.entry, AnswerOptions.of(profile))
        shown = answer.data if answer.kind is AnswerKind.OK else ""
        print(f"answer ({profile_name}): {answer.kind.value} {shown}".rstrip())
        return EXIT_OK if answer.kind is AnswerKind.OK else EXIT_NOT_FOUND

    return _run(reactor, job)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
