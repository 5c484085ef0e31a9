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
# shellcheck source=benchmarks/lib.sh
source "$here/lib.sh"

ensure_tools "haproxy nginx wrk taskset" "haproxy nginx wrk util-linux"
run_harness "$python" benchmarks.bench "$@"
