#!/usr/bin/env bash
# Bulk TCP benchmark: a 256 MiB file from nginx through zdlb's TCP pump (splice on and off,
# three pipe sizes) and HAProxy `mode tcp` with forced splice; see benchmarks/bulk.py.
# Installs haproxy, nginx and strace if missing (run.sh's way), then runs the harness.
#
#   benchmarks/bulk.sh                        # 3 rounds x 4 downloads per target, strace round
#   benchmarks/bulk.sh --rounds 1 --no-strace
#   benchmarks/bulk.sh --results              # also append the section to RESULTS.md
#   benchmarks/bulk.sh --zdlb-cmd 'zdlb run -c {config}'   # once the daemon serves tcp mode
#
# The harness stops everything it started in a finally block; this script forwards INT/TERM/HUP
# to it and waits, so nothing is left running either way.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
[[ -x "$here/../.venv/bin/python" ]] && python="${PYTHON:-$here/../.venv/bin/python}"
apt_wait_s=600  # another engineer may be installing the same packages right now

export PATH="$PATH:/usr/sbin:/sbin"  # haproxy and nginx live in /usr/sbin

missing_tools() {
    local tool
    for tool in haproxy nginx strace taskset; do
        command -v "$tool" >/dev/null 2>&1 || printf '%s ' "$tool"
    done
}

if [[ -n "$(missing_tools)" ]]; then
    sudo=""
    [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
    echo "installing: haproxy nginx strace util-linux" >&2
    DEBIAN_FRONTEND=noninteractive timeout "$apt_wait_s" $sudo apt-get install -y \
        -o DPkg::Lock::Timeout=300 haproxy nginx strace util-linux >&2 || {
        DEBIAN_FRONTEND=noninteractive timeout "$apt_wait_s" $sudo apt-get update >&2
        DEBIAN_FRONTEND=noninteractive timeout "$apt_wait_s" $sudo apt-get install -y \
            -o DPkg::Lock::Timeout=300 haproxy nginx strace util-linux >&2
    }
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
"$python" -m benchmarks.bulk "$@" &
child=$!
set +e
wait "$child"
status=$?
set -e
child=""
exit "$status"
