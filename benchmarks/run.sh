#!/usr/bin/env bash
# One command for the whole benchmark: installs haproxy, nginx and wrk if missing, then runs
# `python -m benchmarks.bench` with any arguments given (see benchmarks/README.md).
#
#   benchmarks/run.sh                                   # 3 rounds x 10 s, all targets
#   benchmarks/run.sh --only zdlb,haproxy --rounds 1 --duration 5 --idle-conns 0
#
# The Python harness stops everything it started in a finally block; this script forwards
# INT/TERM/HUP to it and waits, so nothing is left running either way.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
apt_wait_s=600  # the lead may be installing the same packages right now

export PATH="$PATH:/usr/sbin:/sbin"  # haproxy and nginx live in /usr/sbin

missing_tools() {
    local tool
    for tool in haproxy nginx wrk taskset; do
        command -v "$tool" >/dev/null 2>&1 || printf '%s ' "$tool"
    done
}

if [[ -n "$(missing_tools)" ]]; then
    # Another apt-get may hold the dpkg lock: wait for it, bounded, instead of failing on it.
    deadline=$((SECONDS + apt_wait_s))
    while [[ -f /tmp/apt.log ]] && [[ "$(tail -c 5 /tmp/apt.log)" != *done* ]] \
        && ((SECONDS < deadline)); do
        echo "waiting for the apt-get run logging to /tmp/apt.log ..." >&2
        sleep 5
    done
fi
if [[ -n "$(missing_tools)" ]]; then
    sudo=""
    [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
    echo "installing: haproxy nginx wrk util-linux" >&2
    DEBIAN_FRONTEND=noninteractive timeout "$apt_wait_s" $sudo apt-get install -y \
        -o DPkg::Lock::Timeout=300 haproxy nginx wrk util-linux >&2 || {
        DEBIAN_FRONTEND=noninteractive timeout "$apt_wait_s" $sudo apt-get update >&2
        DEBIAN_FRONTEND=noninteractive timeout "$apt_wait_s" $sudo apt-get install -y \
            -o DPkg::Lock::Timeout=300 haproxy nginx wrk util-linux >&2
    }
    # Debian starts the packaged nginx/haproxy services; where that worked, they only listen on
    # :80 and do not disturb loopback ports chosen here, so they are left alone.
fi
still_missing="$(missing_tools)"
if [[ -n "$still_missing" ]]; then
    echo "still missing after install: $still_missing" >&2
    exit 2
fi

child=""
forward() {
    if [[ -n "$child" ]]; then
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    exit 130
}
trap forward INT TERM HUP

cd "$here/.."  # the harness is the package `benchmarks`, run from the repo root
"$python" -m benchmarks.bench "$@" &
child=$!
set +e
wait "$child"
status=$?
set -e
child=""
exit "$status"
