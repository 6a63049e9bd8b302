#!/bin/sh
# The benchmark in one command; see bench/README.rst. Run as root (network
# namespace, ports 53 and 443 inside it). Arguments go to bench/bench.py,
# e.g. --quick, --profile, --no-peer. --startup adds bench/startup.py after
# the main run: start-up time and lookups during a shared-store outage, on this
# host's loopback with its Redis and PostgreSQL (--quick: 3 runs of each).
# "bench/run.sh storm ..." runs bench/storm.py instead (connection storms,
# 1000 connections, the soak).
set -eu
cd "$(dirname "$0")/.."

make install >/dev/null

if ! command -v unbound >/dev/null 2>&1 || ! command -v unbound-control >/dev/null 2>&1; then
    echo "bench: installing Debian's unbound (the benchmark's DNS server)" >&2
    apt-get install -y unbound >/dev/null || { apt-get update >/dev/null && apt-get install -y unbound >/dev/null; }
fi

# The peer, postfix-mta-sts-resolver, in a venv of its own (git-ignored).
if [ ! -x bench/.peer-venv/bin/mta-sts-daemon ]; then
    echo "bench: installing postfix-mta-sts-resolver==1.5.1 into bench/.peer-venv" >&2
    python3 -m venv bench/.peer-venv
    bench/.peer-venv/bin/python -m pip install --quiet "postfix-mta-sts-resolver==1.5.1"
fi

# py-spy samples the daemon for --profile.
case " $* " in
    *" --profile "*)
        [ -x .venv/bin/py-spy ] || .venv/bin/python -m pip install --quiet py-spy ;;
esac

if [ "${1:-}" = storm ]; then
    shift
    exec .venv/bin/python bench/storm.py "$@"
fi

startup=""
quick=""
for arg in "$@"; do
    shift
    case "$arg" in
        --startup) startup=1 ;;
        *) [ "$arg" = "--quick" ] && quick="--quick"; set -- "$@" "$arg" ;;
    esac
done

if [ -z "$startup" ]; then
    exec .venv/bin/python bench/bench.py "$@"
fi
.venv/bin/python bench/bench.py "$@"
exec .venv/bin/python bench/startup.py $quick
