#!/usr/bin/env bash
# How many Python calls one keep-alive request costs through zdlb, and who makes them.
#
# cProfile counts every call, builtins included: a noise-free figure on a noisy machine, and the
# one STYLE.md budgets (~30 per request; the issue that set it measured 104 before the HTTP
# rebuild). Setup as in ../shared/hooks/calls_per_request.sh: two nginx backends, one zdlb
# process with the sticky cookie (insert, as for a client without one) and HTTP checks on, wrk
# -t1 -c10 against it under cProfile; then the count per request, every function called at
# least MIN_PER_REQUEST times a request, and the callers of the builtins among them.
# Usage: benchmarks/calls_per_request.sh [MIN_PER_REQUEST]   (default 0.5)
# COOKIE='SRV=s1' in the environment sends that Cookie header with every request: a returning
# user, pinned, instead of a new one (zdlb then strips the cookie instead of setting it).
# ROUTES=1: the listener routes (three rules, backends api, static and app on the same two
# nginx) and has header rules on both sides; requests carry `Host: www.example.com` and reach
# the default backend after the one rule that can apply to that host was tried.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/lib.sh
ensure_tools "nginx wrk curl" "nginx wrk curl"
min=${1:-0.5}
py=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && py=.venv/bin/python
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
b1=$(port); b2=$(port); lb=$(port)
for b in $b1 $b2; do
    mkdir -p "$work/n$b"
    cat >"$work/n$b/n.conf" <<NGINX
worker_processes 1; daemon off; pid $work/n$b/pid; error_log $work/n$b/err warn;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $work/n$b; proxy_temp_path $work/n$b;
  fastcgi_temp_path $work/n$b; uwsgi_temp_path $work/n$b; scgi_temp_path $work/n$b;
  server { listen 127.0.0.1:$b; location / { return 200 "ok-small-response-0123456789abcdef\n"; } } }
NGINX
    nginx -p "$work/n$b/" -c "$work/n$b/n.conf" >/dev/null 2>&1 & pids+=($!)
done
cat >"$work/z.toml" <<TOML
workers = 1
[logging]
access_log = false
level = "warning"
[listeners.web]
bind = "127.0.0.1:$lb"
backend = "app"
TOML
if [[ -n "${ROUTES:-}" ]]; then
    cat >>"$work/z.toml" <<TOML
[[listeners.web.routes]]
host = "api.example.com"
path = "/v1/"
backend = "api"
[[listeners.web.routes]]
host = "*.static.example.com"
backend = "static"
[[listeners.web.routes]]
path = "/admin/"
backend = "api"
[listeners.web.request_headers]
set = { X-Route = "web" }
remove = ["X-Debug"]
[listeners.web.response_headers]
set = { X-Frame-Options = "DENY" }
remove = ["Server"]
TOML
    for b in api static; do
        cat >>"$work/z.toml" <<TOML
[[backends.$b.servers]]
name = "s1"
address = "127.0.0.1:$b1"
[[backends.$b.servers]]
name = "s2"
address = "127.0.0.1:$b2"
TOML
    done
fi
cat >>"$work/z.toml" <<TOML
[backends.app.sticky]
cookie = "SRV"
[backends.app.check]
kind = "http"
path = "/"
interval_s = 2
[[backends.app.servers]]
name = "s1"
address = "127.0.0.1:$b1"
[[backends.app.servers]]
name = "s2"
address = "127.0.0.1:$b2"
TOML
# Two runs, 2 s and 6 s of load: the difference cancels start-up and shutdown (imports, config,
# the first checks), which a single short run spreads over its requests.
profile() {  # profile SECONDS: writes $work/prof-SECONDS, prints the requests served
    "$py" -m cProfile -o "$work/prof-$1" -m zdlb.daemon.cli run -c "$work/z.toml" 2>"$work/z.log" &
    local zdlb=$! served
    pids+=($zdlb)
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$lb/" && break; sleep 0.1; done
    local header=()
    [[ -n "${COOKIE:-}" ]] && header=(-H "Cookie: a=1; $COOKIE")
    [[ -n "${ROUTES:-}" ]] && header+=(-H "Host: www.example.com")
    served=$(timeout 30 wrk -t1 -c10 -d"$1"s "${header[@]}" "http://127.0.0.1:$lb/" | awk '/requests in/ {print $1}')
    kill -INT "$zdlb"
    wait "$zdlb" || true
    [[ -s "$work/prof-$1" && -n "$served" ]] || { cat "$work/z.log" >&2; exit 1; }
    echo "$served"
}
short=$(profile 2)
long=$(profile 6)
"$py" - "$work/prof-2" "$short" "$work/prof-6" "$long" "$min" <<'PY'
import pstats
import sys

short, short_requests = pstats.Stats(sys.argv[1]), int(sys.argv[2])
long, long_requests = pstats.Stats(sys.argv[3]), int(sys.argv[4])
minimum = float(sys.argv[5])
requests = long_requests - short_requests


def calls(stats: pstats.Stats) -> dict[tuple[str, int, str], int]:
    return {key: value[1] for key, value in stats.stats.items()}  # type: ignore[attr-defined]


before, after = calls(short), calls(long)
total = sum(after.values()) - sum(before.values())
print(
    f"{total / requests:.1f} Python calls per keep-alive request, builtins included"
    f" ({requests} requests between a {short_requests}- and a {long_requests}-request run;"
    f" budget ~30). One run alone: {sum(after.values()) / long_requests:.1f}."
)
marginal = {key: (n - before.get(key, 0)) / requests for key, n in after.items()}
callers = long.stats  # type: ignore[attr-defined]
for key, per_request in sorted(marginal.items(), key=lambda kv: -kv[1]):
    if per_request < minimum:
        break
    path, line, name = key
    where = "builtin" if path == "~" else f"{path.rsplit('/', 1)[-1]}:{line}"
    print(f"  {per_request:5.1f}/req  {name}  ({where})")
    if path == "~":  # a builtin: say who calls it (whole long run)
        for (cpath, cline, cname), counts in sorted(callers[key][4].items(), key=lambda kv: -kv[1][0]):
            if counts[0] / long_requests >= minimum:
                print(f"        {counts[0] / long_requests:5.1f} from {cname} ({cpath.rsplit('/', 1)[-1]}:{cline})")
PY
