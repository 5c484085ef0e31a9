"""One client sends a chunked upload as one-byte chunks; how much CPU does the proxy spend, and
how long does an unrelated client wait meanwhile?

For zdlb (and HAProxy, and zdlb at ``--baseline REV``), each pinned to CPU1 in front of two
nginx backends on CPU0: an attacker thread writes ``--megabytes`` (12) of ``1\\r\\nx\\r\\n``
chunks as fast as the proxy reads them, on a new connection whenever the proxy refuses one,
for at least a second; meanwhile a second client sends one keep-alive GET every 10 ms and
records each latency. Printed per proxy: its CPU seconds over the attack, the chunks it took
and what it answered, and the unrelated client's p50/p99/max latency. zdlb refuses such a body once
its chunks stop carrying payload (zdlb/http/chunked.py); before that rule, 12 MB cost it 7 s of
CPU and the unrelated request waited 5.9 s.

Run: ``python -m benchmarks.tiny_chunks [--baseline REV] [--megabytes 12]`` (needs nginx and
haproxy, as benchmarks/run.sh installs them). Bounded: each attack stops after ``--max-s``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from multiprocessing import Process, Queue
from pathlib import Path
from typing import Any

from benchmarks import targets as tg
from benchmarks.procs import ProcRegistry, raise_nofile_limit, tree_cpu_s

CHUNK = b"1\r\nx\r\n"
HEAD = b"POST /upload HTTP/1.1\r\nHost: bench\r\nTransfer-Encoding: chunked\r\n\r\n"
PROBE_INTERVAL_S = 0.01


def attack(port: int, megabytes: int, min_s: float, max_s: float, results: Queue[Any]) -> None:
    """Send uploads of ``megabytes`` in one-byte chunks, a new connection whenever the proxy
    closes one, until ``megabytes`` went out in all and at least ``min_s`` passed (a persistent
    attacker), or ``max_s``. Records the chunks sent, connections used and the answers."""
    block = CHUNK * 4096
    total_chunks = megabytes * 1_000_000
    sent = connections = 0
    os.sched_setaffinity(0, {0})
    answers: set[str] = set()
    began = time.monotonic()
    deadline = began + max_s
    while time.monotonic() < deadline and (sent < total_chunks or time.monotonic() - began < min_s):
        connections += 1
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(max_s)
            sent_here = 0
            try:
                sock.sendall(HEAD)
                while time.monotonic() < deadline:
                    sock.sendall(block)
                    sent_here += 4096
                    if sent_here >= total_chunks:
                        sock.sendall(b"0\r\n\r\n")
                        break
            except OSError:
                pass  # refused and closed: the answer says why
            sent += sent_here
            try:
                answers.add(sock.recv(200).split(b"\r\n", 1)[0].decode(errors="replace"))
            except OSError as exc:
                answers.add(f"no answer ({exc.__class__.__name__})")
    results.put({"chunks": sent, "connections": connections, "answers": sorted(answers)})


def probe(port: int, stop: threading.Event, latencies: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        while not stop.is_set():
            began = time.monotonic()
            conn.request("GET", "/", headers={"Host": "bench"})
            conn.getresponse().read()
            latencies.append(time.monotonic() - began)
            stop.wait(PROBE_INTERVAL_S)
    finally:
        conn.close()


def measure(target: tg.Target, megabytes: int, max_s: float) -> str:
    assert target.proc is not None
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(target.port, stop, latencies))
    cpu_before = tree_cpu_s(target.proc.pid)
    began = time.monotonic()
    prober.start()
    # Another process: in this one the attacker's loop would hold the GIL against the prober.
    results: Queue[Any] = Queue()
    attacker = Process(target=attack, args=(target.port, megabytes, 1.0, max_s, results))
    attacker.start()
    outcome: dict[str, Any] = results.get(timeout=max_s + 30)
    attacker.join()
    wall = time.monotonic() - began
    cpu = tree_cpu_s(target.proc.pid) - cpu_before
    stop.set()
    prober.join()
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return (
        f"{target.name:10} CPU {cpu:5.2f} s over {wall:5.2f} s: {outcome['chunks']:,} one-byte"
        f" chunks on {outcome['connections']} connection(s), answers {outcome['answers']};"
        f" the other client: {len(latencies)} requests, p50 {quantiles[49] * 1e3:.1f} ms,"
        f" p99 {quantiles[98] * 1e3:.1f} ms, max {max(latencies, default=0.0) * 1e3:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tiny_chunks")
    parser.add_argument("--megabytes", type=int, default=12)
    parser.add_argument("--max-s", type=float, default=30.0, help="bound on each attack")
    parser.add_argument("--baseline", metavar="REV", help="also zdlb at git revision REV")
    parser.add_argument("--only", default="zdlb,haproxy")
    args = parser.parse_args()
    raise_nofile_limit()
    tmp = Path(tempfile.mkdtemp(prefix="zdlb-tiny-"))
    reg = ProcRegistry()
    try:
        b1 = tg.start_backend(reg, tmp, "backend1", 0)
        b2 = tg.start_backend(reg, tmp, "backend2", 0)
        backends = (b1.port, b2.port)
        started = []
        for name in args.only.split(","):
            if name == "haproxy":
                started.append(tg.start_haproxy(reg, tmp, backends, 1))
            else:
                started.append(
                    tg.start_zdlb(reg, tmp, backends, 1, tg.DEFAULT_ZDLB_CMD, tg.READY_TIMEOUT_S)
                )
        if args.baseline:
            root = tg.checkout(args.baseline, tmp / "baseline")
            started.append(
                tg.start_zdlb(
                    reg,
                    tmp,
                    backends,
                    1,
                    tg.DEFAULT_ZDLB_CMD,
                    tg.READY_TIMEOUT_S,
                    tg.BASELINE_TARGET,
                    template="zdlb",
                    root=root,
                )
            )
        os.sched_setaffinity(0, {0})
        for target in started:
            if target.skip_reason is not None:
                print(f"{target.name:10} skipped: {target.skip_reason}")
                continue
            print(measure(target, args.megabytes, args.max_s), flush=True)
    finally:
        reg.stop_all()
        if args.baseline:
            tg.remove_checkout(tmp / "baseline")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
