"""One wrk run against one target, with the proxy's CPU time sampled around it.

wrk prints its usual report (kept in the run's temp dir) and, through templates/wrk-report.lua,
one `ZDLB_BENCH {json}` line that is parsed here instead of scraping the human text.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import busy_pct, cpu_times, tree_cpu_s
from benchmarks.targets import TEMPLATES, Target, taskset

REPORT_PREFIX = "ZDLB_BENCH "
# wrk exits on its own after -d; this is only the backstop against a wedged run.
WRK_GRACE_S = 30.0


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    headers: tuple[str, ...]


WORKLOADS = {
    "keepalive": Workload("keepalive", ()),
    "close": Workload("close", ("Connection: close",)),
}


@dataclass(frozen=True, slots=True)
class RunResult:
    """One measured run. cpu_us_per_req and cpu_pct are None for `direct` (no proxy)."""

    target: str
    workload: str
    round_no: int
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    status_errors: int
    cpu_us_per_req: float | None
    cpu_pct: float | None
    proxy_core_busy_pct: float | None  # the whole proxy CPU, any process: a noise gauge


@dataclass(frozen=True, slots=True)
class WrkParams:
    """What stays the same across runs: wrk's shape, its CPU, where its output is kept."""

    threads: int
    connections: int
    cpu: int | None
    proxy_cpu: int | None
    log_dir: Path


class WrkError(RuntimeError):
    """wrk failed or printed no report line; the message carries its output tail."""


def _wrk_argv(
    target: Target, workload: Workload, threads: int, connections: int, duration_s: int
) -> list[str]:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    for header in workload.headers:
        argv += ["-H", header]
    argv += ["-s", str(TEMPLATES / "wrk-report.lua"), f"http://127.0.0.1:{target.port}/"]
    return argv


def run_wrk(
    target: Target,
    workload: Workload,
    params: WrkParams,
    *,
    round_no: int,
    duration_s: int,
) -> RunResult:
    """Run wrk once (pinned to cpu) and measure the target's CPU around it.

    Raises WrkError if wrk fails, times out or prints no report line.
    """
    argv = taskset(
        params.cpu,
        _wrk_argv(target, workload, params.threads, params.connections, duration_s),
    )
    pid = target.proc.pid if target.proc is not None else None
    core_before = cpu_times(params.proxy_cpu) if params.proxy_cpu is not None else None
    cpu_before = tree_cpu_s(pid) if pid is not None else 0.0
    wall_before = time.monotonic()
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + WRK_GRACE_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish within {duration_s + WRK_GRACE_S:.0f} s") from exc
    wall_s = time.monotonic() - wall_before
    cpu_s = tree_cpu_s(pid) - cpu_before if pid is not None else 0.0
    core_busy = None
    if core_before is not None and params.proxy_cpu is not None:
        core_busy = busy_pct(core_before, cpu_times(params.proxy_cpu))
    log = params.log_dir / f"wrk-{target.name}-{workload.name}-r{round_no}.txt"
    log.write_text(f"$ {' '.join(argv)}\n{done.stdout}\n{done.stderr}")
    report = _parse_report(done.stdout)
    if done.returncode != 0 or report is None:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise WrkError(f"wrk exited {done.returncode}: {' | '.join(tail)}")
    requests = int(report["requests"])
    duration = report["duration_us"] / 1e6
    errors = sum(
        int(report[key])
        for key in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return RunResult(
        target=target.name,
        workload=workload.name,
        round_no=round_no,
        requests=requests,
        duration_s=duration,
        rps=requests / duration if duration > 0 else 0.0,
        p50_ms=report["p50_us"] / 1000,
        p99_ms=report["p99_us"] / 1000,
        errors=errors,
        status_errors=int(report["status_errors"]),
        cpu_us_per_req=cpu_s * 1e6 / requests if pid is not None and requests else None,
        cpu_pct=100 * cpu_s / wall_s if pid is not None else None,
        proxy_core_busy_pct=core_busy,
    )


def _parse_report(stdout: str) -> dict[str, float] | None:
    for line in stdout.splitlines():
        if line.startswith(REPORT_PREFIX):
            parsed: dict[str, float] = json.loads(line[len(REPORT_PREFIX) :])
            return parsed
    return None
