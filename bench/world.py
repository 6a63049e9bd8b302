"""The benchmark's loopback "internet", run as its own process.

* DNS: Debian's ``unbound`` on 127.0.0.1 with ``local-data`` for every policy
  domain (``_mta-sts`` TXT and the ``mta-sts`` host's A record) and a static
  zone, so a domain without MTA-STS gets NXDOMAIN with the zone's SOA.
  Queries are counted by ``unbound-control stats_noreset``.
* HTTPS: an asyncio policy host with one certificate per ``mta-sts.<domain>``
  (chosen by SNI), all issued by a CA made at run time with trustme. It counts
  the requests of every host name.

The parent talks to it over stdin/stdout, one JSON line per command:
``stats`` (DNS queries so far, HTTPS fetches per host), ``reset`` (zero the
HTTPS counters), ``quit``. The first line written is ``{"ready": ...}`` with
the CA file and the ports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter

import trustme

#: The zone every benchmark domain lives in (a reserved TLD, RFC 2606).
ZONE = "example"
LOOPBACK = "127.0.0.1"
#: Seconds to wait for unbound to answer its control socket after start.
UNBOUND_START_LIMIT = 10.0
#: Largest HTTP request head the policy host reads.
MAX_REQUEST_HEAD = 8192
#: Negative TTL of the zone (SOA MINIMUM): how long "no MTA-STS" may be cached.
NEGATIVE_TTL = 600
RECORD_TTL = 300
#: max_age of every policy unless --max-age says otherwise (one week).
DEFAULT_MAX_AGE = 604800


def policy_domain(index: int) -> str:
    return f"p{index:06d}.{ZONE}"


def plain_domain(index: int) -> str:
    return f"n{index:06d}.{ZONE}"


def policy_text(domain: str, max_age: int = DEFAULT_MAX_AGE) -> bytes:
    """An enforce policy naming the domain's own MX hosts (each policy differs)."""
    return (
        f"version: STSv1\r\nmode: enforce\r\nmx: mx1.{domain}\r\nmx: *.mx.{domain}\r\nmax_age: {max_age}\r\n"
    ).encode("ascii")


def unbound_config(directory: str, port: int, policies: int) -> str:
    lines = [
        "server:",
        f"  interface: {LOOPBACK}",
        f"  port: {port}",
        "  do-daemonize: no",
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{directory}"',
        '  pidfile: ""',
        "  use-syslog: no",
        '  logfile: ""',
        "  verbosity: 0",
        "  num-threads: 1",
        "  do-ip6: no",
        "  so-reuseport: no",
        f"  access-control: {LOOPBACK}/8 allow",
        f'  local-zone: "{ZONE}." static',
        f'  local-data: "{ZONE}. {NEGATIVE_TTL} IN SOA ns.{ZONE}. admin.{ZONE}. '
        f'1 3600 600 86400 {NEGATIVE_TTL}"',
    ]
    for index in range(policies):
        domain = policy_domain(index)
        lines.append(
            f"  local-data: '_mta-sts.{domain}. {RECORD_TTL} IN TXT \"v=STSv1; id=2024{index:06d};\"'"
        )
        lines.append(f'  local-data: "mta-sts.{domain}. {RECORD_TTL} IN A {LOOPBACK}"')
    lines += [
        "remote-control:",
        "  control-enable: yes",
        f'  control-interface: "{directory}/unbound.ctl"',
        "  control-use-cert: no",
    ]
    return "\n".join(lines) + "\n"


class Unbound:
    """A private unbound process answering the benchmark zone."""

    def __init__(self, directory: str, port: int, policies: int) -> None:
        self.directory = directory
        self.config = os.path.join(directory, "unbound.conf")
        with open(self.config, "w") as f:
            f.write(unbound_config(directory, port, policies))
        self.process = subprocess.Popen(
            ["unbound", "-d", "-c", self.config], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + UNBOUND_START_LIMIT
        while True:
            try:
                self.queries()
                return
            except (subprocess.CalledProcessError, ValueError):
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    raise SystemExit(f"world: unbound exited: {err.strip()}") from None
                if time.monotonic() > deadline:
                    raise SystemExit("world: unbound did not come up") from None
                time.sleep(0.05)

    def queries(self) -> int:
        out = subprocess.run(
            ["unbound-control", "-c", self.config, "stats_noreset"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for line in out.splitlines():
            if line.startswith("total.num.queries="):
                return int(line.split("=", 1)[1])
        raise ValueError("no total.num.queries in unbound-control output")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


class PolicyHost:
    """HTTPS on one port for every ``mta-sts.<domain>``, counting requests per host."""

    def __init__(self, policies: int, max_age: int = DEFAULT_MAX_AGE) -> None:
        self.ca = trustme.CA()
        self.fetches: Counter[str] = Counter()
        self.bodies: dict[str, bytes] = {}
        self.contexts: dict[str, ssl.SSLContext] = {}
        for index in range(policies):
            domain = policy_domain(index)
            host = f"mta-sts.{domain}"
            self.bodies[host] = policy_text(domain, max_age)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ca.issue_cert(host).configure_cert(context)
            self.contexts[host] = context
        self.default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert("no-sni.invalid").configure_cert(self.default)
        self.default.sni_callback = self._pick

    def _pick(self, connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        context = self.contexts.get((name or "").lower())
        if context is not None:
            connection.context = context

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 2 else ""
        host = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "host":
                host = value.strip().lower().rsplit(":", 1)[0] if "]" not in value else value.strip()
        body = self.bodies.get(host) if path == "/.well-known/mta-sts.txt" else None
        self.fetches[host] += 1
        if body is None:
            response = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        else:
            response = (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(body), body)
            )
        writer.write(response)
        try:
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def serve(args: argparse.Namespace) -> None:
    directory = tempfile.mkdtemp(prefix="mtasts-world-")
    unbound = None
    try:
        host = PolicyHost(args.policies, args.max_age)
        ca_file = os.path.join(directory, "ca.pem")
        host.ca.cert_pem.write_to_path(ca_file)
        server = await asyncio.start_server(
            host.handle, LOOPBACK, args.https_port, ssl=host.default, backlog=1024
        )
        https_port = server.sockets[0].getsockname()[1]
        unbound = Unbound(directory, args.dns_port, args.policies)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        def say(doc: object) -> None:
            sys.stdout.write(json.dumps(doc) + "\n")
            sys.stdout.flush()

        say({"ready": True, "ca_file": ca_file, "https_port": https_port, "dns_port": args.dns_port})
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "quit":
                break
            if line == "stats":
                say({"dns_queries": unbound.queries(), "fetches": dict(host.fetches)})
            elif line == "reset":
                host.fetches.clear()
                say({"ok": True})
            else:
                say({"error": f"unknown command {line!r}"})
        server.close()
    finally:
        if unbound is not None:
            unbound.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark world: unbound + HTTPS policy host")
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--dns-port", type=int, default=53)
    parser.add_argument("--https-port", type=int, default=443)
    parser.add_argument("--max-age", type=int, default=DEFAULT_MAX_AGE, help="max_age of every policy")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
