#!/usr/bin/env bash
# HTTP bulk benchmark: downloads and uploads of several body sizes from/to nginx, through HAProxy
# `mode http` with forced splice and zdlb's HTTP listener with body splicing on and off
# (splice_min_bytes); see benchmarks/bulk_http.py. Installs haproxy, nginx and strace if
# missing (run.sh's way), then runs the harness.
#
#   benchmarks/bulk_http.sh                       # 3 rounds, 64k..256m, strace round: ~5 min
#   benchmarks/bulk_http.sh --rounds 1 --count 2 --sizes 1m --no-strace      # quick: < 1 min
#   benchmarks/bulk_http.sh --sizes 128k,192k,256k,384k,512k --no-strace    # the crossover
#   benchmarks/bulk_http.sh --results             # also append the section to RESULTS.md
#
# The harness stops everything it started in a finally block; this script forwards INT/TERM/HUP
# to it and waits, so nothing is left running either way.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
[[ -x "$here/../.venv/bin/python" ]] && python="${PYTHON:-$here/../.venv/bin/python}"
# shellcheck source=benchmarks/lib.sh
source "$here/lib.sh"

ensure_tools "haproxy nginx strace taskset" "haproxy nginx strace util-linux"
run_harness "$python" benchmarks.bulk_http "$@"
