"""Wall time of ``zdlb ctl show info`` against a running daemon, start of the client to exit.

    .venv/bin/python -m benchmarks.ctl_latency [--runs 20]

Starts ``zdlb run --workers 1`` on a throwaway config with a control socket (an upstream that
refuses is fine: ``show info`` needs none), then times the console command (daemon/entry.py's
fast path) and, for comparison, the same command through ``python -m zdlb.daemon.cli`` (which
imports the whole daemon first). Prints min / median / max per path. Bounded: every run has a
10 s timeout, the daemon is stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """
[listeners.web]
bind = "127.0.0.1:0"
backend = "app"
[backends.app]
[[backends.app.servers]]
name = "s1"
address = "127.0.0.1:9"
[control]
socket = "ctl.sock"
"""
RUN_TIMEOUT_S = 10.0


def time_runs(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=RUN_TIMEOUT_S)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    zdlb = str(Path(sys.executable).with_name("zdlb"))
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "zdlb.toml"
        config.write_text(CONFIG, encoding="utf-8")
        daemon = subprocess.Popen(
            [zdlb, "run", "--workers", "1", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not (Path(tmp) / "ctl.sock").exists():
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit("the daemon did not start")
                time.sleep(0.01)
            paths = {
                "zdlb ctl (entry.py)": [zdlb, "ctl", "-c", str(config), "show", "info"],
                "python -m zdlb.daemon.cli ctl": [
                    sys.executable,
                    "-m",
                    "zdlb.daemon.cli",
                    "ctl",
                    "-c",
                    str(config),
                    "show",
                    "info",
                ],
            }
            for name, argv in paths.items():
                times = time_runs(argv, args.runs)
                print(
                    f"{name:32} min {min(times) * 1000:.0f} ms  median "
                    f"{statistics.median(times) * 1000:.0f} ms  max {max(times) * 1000:.0f} ms"
                )
        finally:
            daemon.terminate()
            daemon.wait(timeout=RUN_TIMEOUT_S)


if __name__ == "__main__":
    main()
