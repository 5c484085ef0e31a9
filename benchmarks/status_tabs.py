"""What an open status page costs the proxy: keep-alive requests/s with 0 and 10 tabs polling.

    python -m benchmarks.status_tabs [--rounds 3] [--seconds 10] [--tabs 10]

Two nginx backends and zdlb (templates/zdlb-status.toml: the benchmark's zdlb config plus a
metrics listener) start as in bench.py, zdlb pinned to CPU1, wrk and the backends to CPU0.
Each round runs wrk twice, alternating: alone, then while ``--tabs`` simulated tabs poll
``/status.json`` once a second each -- exactly what the page's script does (a fresh
connection per poll: the endpoint closes after each answer). The tabs run in their own process
on CPU0, so their own CPU is not zdlb's. It prints the median rps of each side and the ratio.
On a shared machine the figure is indicative: run it on an idle one to quote it.

Every process is stopped from a ``finally``; every loop is bounded by ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.procs import ProcRegistry, free_port
from benchmarks.targets import (
    READY_TIMEOUT_S,
    REPO_ROOT,
    Target,
    _ready,
    render,
    start_backend,
    taskset,
)
from benchmarks.wrkrun import WORKLOADS, WrkParams, run_wrk

POLL_INTERVAL_S = 1.0  # status.html's POLL_MS
POLL_TIMEOUT_S = 5.0  # one poll's deadline; the endpoint's own is 5 s


async def _tab(port: int, until: float) -> int:
    """One simulated tab: GET /status.json every POLL_INTERVAL_S until ``until``."""
    loop = asyncio.get_running_loop()
    polls = 0
    request = f"GET /status.json HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    while (now := loop.time()) < until:
        async with asyncio.timeout(POLL_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            answer = await reader.read()  # the endpoint closes after the answer
            writer.close()
            await writer.wait_closed()
        if answer.startswith(b"HTTP/1.1 200"):
            polls += 1
        await asyncio.sleep(max(0.0, POLL_INTERVAL_S - (loop.time() - now)))
    return polls


async def _tabs(port: int, tabs: int, seconds: float) -> int:
    until = asyncio.get_running_loop().time() + seconds
    return sum(await asyncio.gather(*(_tab(port, until) for _ in range(tabs))))


def run_tabs(port: int, tabs: int, seconds: float) -> int:
    """Entry of the pollers' process: the number of 200 answers."""
    return asyncio.run(_tabs(port, tabs, seconds))


def measure(args: argparse.Namespace, tmp: Path, reg: ProcRegistry) -> dict[int, list[float]]:
    backends = (start_backend(reg, tmp, "b1", 0).port, start_backend(reg, tmp, "b2", 0).port)
    port, metrics = free_port(), free_port()
    conf = render(
        "zdlb-status.toml",
        tmp / "zdlb.toml",
        port=port,
        metrics=metrics,
        backend1=backends[0],
        backend2=backends[1],
        dir=tmp,
    )
    argv = [sys.executable, "-m", "zdlb.daemon.cli", "run", "-c", str(conf), "--workers", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = reg.spawn("zdlb", taskset(1, [*argv, "--log-level", "warning"]), tmp, REPO_ROOT, env)
    target = _ready(Target("zdlb", port, proc), READY_TIMEOUT_S)
    if target.skip_reason is not None:
        raise RuntimeError(f"zdlb did not start: {target.skip_reason}")
    params = WrkParams(threads=1, connections=50, cpu=0, proxy_cpu=1, log_dir=tmp)
    run_wrk(target, WORKLOADS["keepalive"], params, round_no=0, duration_s=2)  # warm-up
    rps: dict[int, list[float]] = {0: [], args.tabs: []}
    for round_no in range(1, args.rounds + 1):
        for tabs in (0, args.tabs):
            pollers = None
            if tabs:
                code = f"from benchmarks.status_tabs import run_tabs; print(run_tabs({metrics}, "
                code += f"{tabs}, {args.seconds + 1}))"
                pollers = subprocess.Popen(
                    taskset(0, [sys.executable, "-c", code]),
                    stdout=subprocess.PIPE,
                    cwd=REPO_ROOT,
                    env=env,
                )
            result = run_wrk(
                target, WORKLOADS["keepalive"], params, round_no=round_no, duration_s=args.seconds
            )
            polls = "-"
            if pollers is not None:
                out, _ = pollers.communicate(timeout=args.seconds + 30)
                polls = out.decode().strip()
            rps[tabs].append(result.rps)
            print(f"round {round_no} tabs={tabs:2d}: {result.rps:9.0f} rps, polls answered {polls}")
    return rps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--tabs", type=int, default=10)
    args = parser.parse_args(argv)
    reg = ProcRegistry()
    with tempfile.TemporaryDirectory(prefix="zdlb-status-bench-") as tmp:
        try:
            started = time.monotonic()
            rps = measure(args, Path(tmp), reg)
        finally:
            reg.stop_all()
    alone, polled = statistics.median(rps[0]), statistics.median(rps[args.tabs])
    print(
        f"median rps: alone {alone:.0f}, with {args.tabs} tabs {polled:.0f}: "
        f"{polled / alone:.3f}x ({time.monotonic() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
