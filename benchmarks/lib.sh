# Shared by benchmarks/run.sh and benchmarks/bulk.sh (sourced, not run): install the Debian
# packages a harness needs, then run the harness in the foreground with signals forwarded.

export PATH="$PATH:/usr/sbin:/sbin"  # haproxy and nginx live in /usr/sbin
apt_wait_s=600  # another engineer may be installing the same packages right now

# missing_tools TOOL...: the TOOLs not on PATH, space-separated.
missing_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || printf '%s ' "$tool"
    done
}

# ensure_tools "TOOL..." "PACKAGE...": apt-get install the PACKAGEs unless every TOOL is there;
# exits 2 if a TOOL is still missing afterwards.
ensure_tools() {
    local tools=($1) packages=($2) sudo="" deadline
    if [[ -n "$(missing_tools "${tools[@]}")" ]]; then
        # Another apt-get may hold the dpkg lock: wait for it, bounded, instead of failing on it.
        deadline=$((SECONDS + apt_wait_s))
        while [[ -f /tmp/apt.log ]] && [[ "$(tail -c 5 /tmp/apt.log)" != *done* ]] \
            && ((SECONDS < deadline)); do
            echo "waiting for the apt-get run logging to /tmp/apt.log ..." >&2
            sleep 5
        done
    fi
    if [[ -n "$(missing_tools "${tools[@]}")" ]]; then
        [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
        echo "installing: ${packages[*]}" >&2
        DEBIAN_FRONTEND=noninteractive timeout "$apt_wait_s" $sudo apt-get install -y \
            -o DPkg::Lock::Timeout=300 "${packages[@]}" >&2 || {
            DEBIAN_FRONTEND=noninteractive timeout "$apt_wait_s" $sudo apt-get update >&2
            DEBIAN_FRONTEND=noninteractive timeout "$apt_wait_s" $sudo apt-get install -y \
                -o DPkg::Lock::Timeout=300 "${packages[@]}" >&2
        }
        # Debian starts the packaged nginx/haproxy services; where that worked, they only
        # listen on :80 and do not disturb the loopback ports the harnesses choose.
    fi
    local still_missing
    still_missing="$(missing_tools "${tools[@]}")"
    if [[ -n "$still_missing" ]]; then
        echo "still missing after install: $still_missing" >&2
        exit 2
    fi
}

# run_harness PYTHON MODULE ARGS...: run `PYTHON -m MODULE ARGS` from the repo root, forwarding
# INT/TERM/HUP to it; the harness stops everything it started in a finally block.
run_harness() {
    local python=$1 module=$2 status
    shift 2
    child=""
    trap 'if [[ -n "$child" ]]; then kill -TERM "$child" 2>/dev/null || true;
          wait "$child" 2>/dev/null || true; fi; exit 130' INT TERM HUP
    cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the harnesses are the package `benchmarks`
    "$python" -m "$module" "$@" &
    child=$!
    set +e
    wait "$child"
    status=$?
    set -e
    child=""
    return "$status"
}
