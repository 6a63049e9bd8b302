"""Postfix-scale phases: connection storms, closed loops up to 1000 connections, a soak.

What a Postfix site sees after ``postfix reload``, a daemon restart or a
traffic spike: every smtp process (``default_process_limit`` is 100, large
sites run 500-2000) connects at once. One command (as root, for the network
namespace ``mtasts-storm``; see bench/README.rst)::

    bench/run.sh storm                      # storms and closed loops, about 5 minutes
    bench/run.sh storm --soak-minutes 22    # the soak instead

Phases (the daemon with its defaults, a cache filled with the world's policy
domains; the bare Twisted floor ``floor.py epoll`` with the kernel's largest
backlog beside it, in alternating rounds):

* **storm**: 100, 1000 and 2000 clients connect at once, each sends one
  request (a cached policy domain) and waits for its reply: first-reply
  p50/p99/max, counted from each client's own ``connect``.
* **closed loop** at 16, 100 and 1000 connections: p50/p99/p99.9.
* **soak** (``--soak-minutes``): paced mixed load over connections that come
  and go, new policy domains and domains without MTA-STS trickling in each
  minute, policies that expire (``max_age``) and negative entries that expire
  (``negative_ttl_max``) during the run; RSS and open descriptors of the
  daemon sampled each minute, with the slope after the first five minutes.

Figures to stdout and ``bench/results/storm-<time>.json``; nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import loadgen  # noqa: E402
import world as world_module  # noqa: E402

import bench  # noqa: E402

NETNS = "mtasts-storm"
#: The soak's own namespace, so that it may run beside the other phases.
SOAK_NETNS = "mtasts-soak"
FLOOR_PORT = 8464
#: Clients of each storm, and connections of each closed loop.
STORM_SIZES = (100, 1000, 2000)
CLOSED_LOOP_SIZES = (16, 100, 1000)
#: Pause after each storm so the closed connections are gone before the next.
SETTLE = 1.0
#: Connections the cache is filled over.
FILL_CONNECTIONS = 16
#: Where the kernel's cap on listen backlogs is read.
SOMAXCONN = "/proc/sys/net/core/somaxconn"

# --- the soak ----------------------------------------------------------------
#: Paced load: requests a second, over this many connections, each reopened
#: after this many requests (Postfix's smtp processes exit after max_use).
SOAK_RATE = 1500.0
SOAK_CONNECTIONS = 200
SOAK_REUSE = 500
#: Policy domains cached before the soak starts, and new ones asked each minute;
#: domains without MTA-STS asked for the first time each minute.
SOAK_WARM_POLICIES = 1000
SOAK_NEW_POLICIES_PER_MINUTE = 20
SOAK_NEW_PLAIN_PER_MINUTE = 200
#: Policies expire after this long (their max_age), negative entries after
#: negative_ttl_max; both well inside the soak.
SOAK_MAX_AGE = 300
SOAK_NEGATIVE_TTL = 120
#: Minutes left out of the slope: start-up, the cache filling, the allocator settling.
SOAK_WARMUP_MINUTES = 5
SOAK_SAMPLE_SECONDS = 60.0

log = bench.log


def somaxconn() -> int:
    with open(SOMAXCONN) as f:
        return int(f.read())


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_daemon(world: bench.World, work: str, extra: str = "") -> bench.Target:
    """The daemon with its defaults (plus ``extra`` TOML) on bench.DAEMON_PORT."""
    config = bench.ours_config(os.path.join(work, "ours.toml"), world, os.path.join(work, "cache.sqlite3"))
    if extra:
        with open(config, "a") as f:
            f.write(extra)
    process = bench.start_ours(config, os.path.join(bench.RESULTS, "storm-ours.log"))
    target = bench.Target("postfix-mtasts", bench.DAEMON_PORT, process)
    bench.wait_listening(target.port, process)
    return target


def fill(target: bench.Target, keys: list[bytes]) -> None:
    log(f"filling the cache with {len(keys)} policy domains")
    result = loadgen.run_closed_loop(target.port, keys, connections=FILL_CONNECTIONS, total=len(keys))
    log(f"  {result.statuses} in {result.seconds:g}s")


def storms(targets: list[bench.Target], keys: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """Each size, ``rounds`` times per server, servers alternating; rounds pooled by max and median."""
    out: dict[str, Any] = {}
    for clients in args.storms:
        runs: dict[str, list[loadgen.StormResult]] = {t.name: [] for t in targets}
        for number in range(1, args.rounds + 1):
            for target in targets:
                result = loadgen.run_storm(target.port, keys, clients)
                runs[target.name].append(result)
                log(
                    f"  storm {clients} #{number} {target.name}: {result.answered}/{clients} answered, "
                    f"first reply p50 {result.p50_ms} ms, p99 {result.p99_ms} ms, max {result.max_ms} ms"
                    + (f", failed {result.failed}" if result.failed else "")
                )
                time.sleep(SETTLE)
        out[str(clients)] = {name: pool_storms(results) for name, results in runs.items()}
    return out


def pool_storms(results: list[loadgen.StormResult]) -> dict[str, Any]:
    """Rounds side by side: each figure's median over the rounds, and the worst."""

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    failed: dict[str, int] = {}
    for result in results:
        for why, n in result.failed.items():
            failed[why] = failed.get(why, 0) + n
    return {
        "rounds": len(results),
        "answered_all_rounds": all(r.answered == r.clients for r in results),
        "failed": failed,
        "p50_ms": median([r.p50_ms for r in results]),
        "p99_ms": median([r.p99_ms for r in results]),
        "max_ms": median([r.max_ms for r in results]),
        "worst_p99_ms": max(r.p99_ms for r in results),
        "worst_max_ms": max(r.max_ms for r in results),
        "connect_spread_ms": median([r.connect_spread_ms for r in results]),
        "each_round": [r.as_dict() for r in results],
    }


def closed_loops(targets: list[bench.Target], keys: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for connections in args.closed:
        label = f"closed_{connections}"
        served: dict[str, list[tuple[int | None, int | None, float | None]]] = {}
        for number in range(1, args.rounds + 1):
            for target in targets:
                log(f"closed loop {connections} #{number}")
                run = measure_warm(target, label, keys, connections, args.seconds / args.rounds)
                target.record(label, run)
                served.setdefault(target.name, []).append(
                    (run[0].fewest_per_connection, run[0].most_per_connection, run[0].warmup_ms)
                )
        out[str(connections)] = {t.name: t.phases()[label] for t in targets}
        for name, pairs in served.items():
            out[str(connections)][name]["fewest_most_per_connection_warmup_ms_each_round"] = pairs
    return out


def measure_warm(
    target: bench.Target, label: str, keys: list[bytes], connections: int, seconds: float
) -> tuple[loadgen.PhaseResult, int, float]:
    """A closed loop whose clock starts once every connection was answered once
    (long-lived connections, as Postfix keeps); (result, DNS queries, server CPU s)."""
    before = bench.cpu_seconds(target.process.pid)
    result = loadgen.run_closed_loop(target.port, keys, connections=connections, seconds=seconds, warmup=True)
    cpu = bench.cpu_seconds(target.process.pid) - before
    log(
        f"  {target.name} {label}: {result.lookups_per_s:,.0f} lookups/s, p50 {result.p50_ms} ms, "
        f"p99 {result.p99_ms} ms, p99.9 {result.p999_ms} ms, max {result.max_ms} ms, replies per "
        f"connection {result.fewest_per_connection}-{result.most_per_connection}, "
        f"warm-up {result.warmup_ms} ms, {result.statuses}"
    )
    return result, 0, cpu


def run_phases(args: argparse.Namespace, world: bench.World, work: str) -> dict[str, Any]:
    backlog = somaxconn()
    daemon = start_daemon(world, work)
    floor_process = bench.start_floor(
        "epoll", FLOOR_PORT, os.path.join(bench.RESULTS, "storm-floor.log"), backlog
    )
    floor = bench.Target("floor", FLOOR_PORT, floor_process)
    try:
        bench.wait_listening(floor.port, floor_process)
        keys = bench.keyset([world_module.policy_domain(i) for i in range(args.policies)])
        fill(daemon, keys)
        targets = [daemon, floor]
        return {
            "somaxconn": backlog,
            "storm": storms(targets, keys, args) if args.storms else {},
            "closed_loop": closed_loops(targets, keys, args) if args.closed else {},
            "daemon_rss_kib": bench.rss_kib(daemon.process.pid),
        }
    finally:
        bench.stop_process(daemon.process)
        bench.stop_process(floor_process)


# --- the soak ----------------------------------------------------------------


def soak_keys(minute: int, args: argparse.Namespace) -> tuple[list[bytes], list[str]]:
    """Minute ``minute``'s keys: the warm policies, the policy domains and the
    domains without MTA-STS that trickled in so far, each minute's newcomers
    first; and the newcomers' names."""
    first_new = SOAK_WARM_POLICIES + minute * SOAK_NEW_POLICIES_PER_MINUTE
    new_policies = [world_module.policy_domain(first_new + i) for i in range(SOAK_NEW_POLICIES_PER_MINUTE)]
    new_plain = [
        world_module.plain_domain(minute * SOAK_NEW_PLAIN_PER_MINUTE + i)
        for i in range(SOAK_NEW_PLAIN_PER_MINUTE)
    ]
    known_policies = [world_module.policy_domain(i) for i in range(first_new)]
    known_plain = [world_module.plain_domain(i) for i in range(minute * SOAK_NEW_PLAIN_PER_MINUTE)]
    # bench.py's mix: one policy domain to four without MTA-STS.
    mixed = bench.mix_keys(bench.keyset(known_policies), bench.keyset(known_plain or new_plain))
    return bench.keyset(new_policies + new_plain) + mixed, new_policies + new_plain


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(x, y)`` points (y per x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0


def run_soak(args: argparse.Namespace, world: bench.World, work: str) -> dict[str, Any]:
    extra = f"[policy]\nnegative_ttl_min = {SOAK_NEGATIVE_TTL // 2}\nnegative_ttl_max = {SOAK_NEGATIVE_TTL}\n"
    daemon = start_daemon(world, work, extra)
    pid = daemon.process.pid
    samples: list[dict[str, Any]] = []
    try:
        fill(daemon, bench.keyset([world_module.policy_domain(i) for i in range(SOAK_WARM_POLICIES)]))
        started = time.monotonic()
        for minute in range(args.soak_minutes):
            keys, newcomers = soak_keys(minute, args)
            result = loadgen.run_paced(
                daemon.port,
                keys,
                connections=SOAK_CONNECTIONS,
                rate=SOAK_RATE,
                seconds=SOAK_SAMPLE_SECONDS,
                reuse=SOAK_REUSE,
            )
            # The load's connections were just closed: let the daemon see them go.
            time.sleep(SETTLE)
            sample = {
                "minute": minute + 1,
                "elapsed_s": round(time.monotonic() - started, 1),
                "rss_kib": bench.rss_kib(pid)["VmRSS"],
                "open_descriptors": open_descriptors(pid),
                "cpu_s": round(bench.cpu_seconds(pid), 2),
                "lookups": result.lookups,
                "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms,
                "p999_ms": result.p999_ms,
                "statuses": result.statuses,
                "new_domains": len(newcomers),
            }
            samples.append(sample)
            log(
                f"  soak minute {minute + 1}: RSS {sample['rss_kib']} KiB, {sample['open_descriptors']} fds, "
                f"{result.lookups} lookups, p50 {result.p50_ms} ms, p99 {result.p99_ms} ms, {result.statuses}"
            )
    finally:
        bench.stop_process(daemon.process)
    settled = [s for s in samples if s["minute"] >= SOAK_WARMUP_MINUTES]
    out: dict[str, Any] = {"samples": samples, "minutes": args.soak_minutes, "somaxconn": somaxconn()}
    if len(settled) >= 2:
        first, last = settled[0], settled[-1]
        out["after_minute"] = SOAK_WARMUP_MINUTES
        out["rss_slope_kib_per_minute"] = round(slope([(s["minute"], s["rss_kib"]) for s in settled]), 2)
        out["rss_growth_percent"] = round(100 * (last["rss_kib"] - first["rss_kib"]) / first["rss_kib"], 2)
        out["fd_slope_per_minute"] = round(slope([(s["minute"], s["open_descriptors"]) for s in settled]), 3)
        out["fd_range"] = [
            min(s["open_descriptors"] for s in settled),
            max(s["open_descriptors"] for s in settled),
        ]
    return out


# --- report and main -----------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    lines = [
        f"postfix-mtasts at Postfix scale; {results['machine']['nproc']} CPUs (shared), "
        f"somaxconn {results.get('somaxconn') or results.get('soak', {}).get('somaxconn', '?')}"
    ]
    for clients, by_server in results.get("storm", {}).items():
        for name, doc in by_server.items():
            lines.append(
                f"storm {clients:>5} {name:15} first reply p50 {doc['p50_ms']:9.1f} ms  "
                f"p99 {doc['p99_ms']:9.1f} ms  max {doc['max_ms']:9.1f} ms  "
                f"(worst round p99 {doc['worst_p99_ms']:.1f}, "
                f"max {doc['worst_max_ms']:.1f}) all answered: {doc['answered_all_rounds']}"
            )
    for connections, by_server in results.get("closed_loop", {}).items():
        for name, doc in by_server.items():
            lines.append(
                f"closed {connections:>4} {name:15} {doc['lookups_per_s']:9,.0f} lookups/s  "
                f"p50 {doc['p50_ms']:7.2f} ms  p99 {doc['p99_ms']:7.2f} ms  "
                f"p99.9 {doc['p999_ms']:7.2f} ms  max {doc['max_ms']:7.1f} ms"
            )
    soak = results.get("soak")
    if soak:
        for s in soak["samples"]:
            lines.append(
                f"soak minute {s['minute']:>3}: RSS {s['rss_kib']:>7} KiB  fds {s['open_descriptors']:>4}  "
                f"{s['lookups']:>6} lookups  p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms"
            )
        if "rss_slope_kib_per_minute" in soak:
            lines.append(
                f"soak after minute {soak['after_minute']}: "
                f"RSS slope {soak['rss_slope_kib_per_minute']} KiB/min, "
                f"growth {soak['rss_growth_percent']}%; descriptors slope {soak['fd_slope_per_minute']}/min, "
                f"range {soak['fd_range']}"
            )
    return "\n".join(lines)


def inside(args: argparse.Namespace) -> int:
    os.makedirs(bench.RESULTS, exist_ok=True)
    bench.pin(0, bench.CLIENT_CPU)
    loadgen.raise_descriptor_limit(max([*args.storms, *args.closed, SOAK_CONNECTIONS]))
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": bench.machine(),
        "netns": args.netns,
    }
    work = tempfile.mkdtemp(prefix="mtasts-storm-")
    dns_port, https_port = (53, 443) if args.netns else (15353, 18443)
    soaking = args.soak_minutes > 0
    policies = (
        SOAK_WARM_POLICIES + (args.soak_minutes + 1) * SOAK_NEW_POLICIES_PER_MINUTE
        if soaking
        else args.policies
    )
    max_age = SOAK_MAX_AGE if soaking else world_module.DEFAULT_MAX_AGE
    world = bench.World(
        policies, dns_port, https_port, os.path.join(bench.RESULTS, "storm-world.log"), max_age
    )
    try:
        if soaking:
            results["soak"] = run_soak(args, world, work)
        else:
            results.update(run_phases(args, world, work))
    finally:
        world.stop()
        shutil.rmtree(work, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(bench.RESULTS, f"{'soak' if soaking else 'storm'}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(report(results))
    print(f"\nfull figures: {os.path.relpath(path, bench.ROOT)}")
    return 0


def sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="postfix-mtasts at Postfix scale (see bench/README.rst)")
    parser.add_argument("--storms", type=sizes, default=list(STORM_SIZES), help="clients of each storm")
    parser.add_argument("--closed", type=sizes, default=list(CLOSED_LOOP_SIZES), help="closed-loop sizes")
    parser.add_argument("--seconds", type=float, default=9.0, help="each closed loop, all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", type=int, default=1000, help="policy domains cached and asked")
    parser.add_argument("--soak-minutes", type=int, default=0, help="run the soak instead, this long")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.netns = args.inside
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.inside:
        return inside(args)
    netns = SOAK_NETNS if args.soak_minutes > 0 else NETNS
    return bench.outside(args, argv, script=__file__, netns=netns, run_inside=inside)


if __name__ == "__main__":
    sys.exit(main())
