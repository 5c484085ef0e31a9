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
# shellcheck source=benchmarks/lib.sh
source "$here/lib.sh"

ensure_tools "haproxy nginx strace taskset" "haproxy nginx strace util-linux"
run_harness "$python" benchmarks.bulk "$@"
