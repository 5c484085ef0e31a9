#!/usr/bin/env bash
# Same-run before/after for a hot-path change: two zdlb builds side by side, interleaved.
#
#   benchmarks/ab.sh REV [ROUNDS] [SECONDS] [PATCH]
#
# REV (e.g. 8c6fafd) is "before", the working tree "after". With PATCH, "before" is REV with
# that patch applied: a feature on vs off in one tree, e.g. what the metrics counters cost:
#
#   benchmarks/ab.sh HEAD 7 5 benchmarks/patches/no-hot-path-counters.patch
#
# Both builds run pinned to CPU1 and proxy to the same two nginx backends on CPU0; they are
# loaded one at a time, alternating, ROUNDS times, with `wrk -t1 -c50` keep-alive and
# `Connection: close` (also on CPU0). Prints, per build and workload, the median rps and the
# proxy's CPU microseconds per request (utime+stime from /proc).
set -euo pipefail
rev=${1:?usage: benchmarks/ab.sh REV [ROUNDS] [SECONDS] [PATCH]}
rounds=${2:-3}
seconds=${3:-5}
[[ -z ${4:-} || -f $4 ]] || { echo "ab.sh: no such patch: $4" >&2; exit 2; }
patch=${4:+$(realpath "$4")}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    git -C "$here" worktree remove --force "$tmp/before" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
command -v wrk nginx >/dev/null || { echo "needs wrk and nginx (apt-get install wrk nginx)" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

b1=$(free_port); b2=$(free_port)
cat > "$tmp/nginx.conf" <<CONF
daemon off; worker_processes 1; pid $tmp/nginx.pid; error_log $tmp/nginx.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 100000000;
  server { listen 127.0.0.1:$b1; location / { return 200 "$(printf '%.0s.' {1..100})"; } }
  server { listen 127.0.0.1:$b2; location / { return 200 "$(printf '%.0s.' {1..100})"; } } }
CONF
taskset -c 0 nginx -c "$tmp/nginx.conf" & pids+=($!)

git -C "$here" worktree add -q --detach "$tmp/before" "$rev"
[[ -n $patch ]] && git -C "$tmp/before" apply "$patch"
declare -A port pid
for build in before after; do
    port[$build]=$(free_port)
    cat > "$tmp/$build.toml" <<CONF
[logging]
access_log = false
level = "warning"
[listeners.web]
bind = "127.0.0.1:${port[$build]}"
backend = "app"
[backends.app]
[[backends.app.servers]]
name = "s1"
address = "127.0.0.1:$b1"
[[backends.app.servers]]
name = "s2"
address = "127.0.0.1:$b2"
CONF
    src=$here; [[ $build == before ]] && src=$tmp/before
    (cd "$src" && exec taskset -c 1 python3 -m zdlb.daemon.cli run -c "$tmp/$build.toml") &
    pid[$build]=$!; pids+=("${pid[$build]}")
done
for build in before after; do  # wait for each port, bounded
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:${port[$build]}/" && break; sleep 0.1; done
done

cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
: > "$tmp/results"
for round in $(seq "$rounds"); do
    # Alternate which build goes first, so neither always follows the other's close workload
    # (50,000 sockets left in TIME_WAIT) or always runs first.
    order=(before after); (( round % 2 == 0 )) && order=(after before)
    for build in "${order[@]}"; do
        for workload in keepalive close; do
            header=(); [[ $workload == close ]] && header=(-H "Connection: close")
            a=$(cpu "${pid[$build]}")
            out=$(taskset -c 0 wrk -t1 -c50 -d"${seconds}s" "${header[@]}" "http://127.0.0.1:${port[$build]}/")
            b=$(cpu "${pid[$build]}")
            requests=$(awk '/requests in/ {print $1}' <<<"$out")
            echo "$build $workload $requests $((b - a))" >> "$tmp/results"
        done
    done
done
python3 - "$tmp/results" "$seconds" "$rev" ${patch:+"$patch"} <<'PY'
import statistics, sys
ticks_per_s = 100
rows = [line.split() for line in open(sys.argv[1])]
seconds, rev = float(sys.argv[2]), sys.argv[3]
for workload in ("keepalive", "close"):
    medians = {}
    for build in ("before", "after"):
        runs = [(int(r), int(t)) for b, w, r, t in rows if b == build and w == workload]
        rps = statistics.median(r / seconds for r, _ in runs)
        us = statistics.median(t / ticks_per_s * 1e6 / r for r, t in runs)
        medians[build] = rps
        name = rev + (" + patch" if len(sys.argv) > 4 else "") if build == "before" else "working tree"
        print(f"{workload:9s} {build:6s} ({name}): {rps:8.0f} rps  {us:6.1f} us/req")
    print(f"{workload:9s} after/before rps: {medians['after'] / medians['before']:.2f}x")
PY
