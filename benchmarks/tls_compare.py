"""zdlb's TLS termination against HAProxy's, same ECDSA P-256 certificate, each proxy pinned to
one core (issue 14): full handshakes/s, resumed handshakes/s, keep-alive requests/s over TLS,
memory per idle TLS connection. One run; prints each figure and zdlb/HAProxy ratios.

    .venv/bin/python -m benchmarks.tls_compare [--seconds 5] [--cpu 1] [--idle 1000]

Two nginx backends (benchmarks/targets.py) serve a 100-byte page. Handshakes: ``openssl
s_time`` (C, so the client is not the bottleneck), ``--clients`` of them in parallel, each
connecting and closing for ``--seconds``: ``-new``, a full TLS 1.3 handshake (X25519, ECDSA
P-256) every time; ``-reuse`` with TLS 1.2, the first session resumed by id or ticket (s_time
cannot resume TLS 1.3: it reads nothing, so never sees the ticket sent after the handshake;
tests/net/test_tls.py proves zdlb resumes 1.3). s_time verifies the server's signature on
every full handshake, which costs it about what signing costs the proxy, so on a small box the
clients bound the rate: the proxy's CPU per handshake (its process tree's utime + stime over
the phase) is the figure to compare. Keep-alive: ``wrk`` over https, 1 thread, 50
connections. Memory: ``--idle`` TLS connections, one request each, then held open; the proxy's
RSS before and after. Every process is stopped in a ``finally``; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.procs import (
    ProcRegistry,
    free_port,
    raise_nofile_limit,
    tree_cpu_s,
    tree_rss_bytes,
    wait_port,
)
from benchmarks.targets import start_backend, taskset

READY_S = 15.0
HAPROXY = """
global
    nbthread 1
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-bind-ciphers ECDHE+AESGCM:ECDHE+CHACHA20
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend web
    bind 127.0.0.1:{port} ssl crt {dir}/site.pem alpn http/1.1
    default_backend app
backend app
    balance roundrobin
    server s1 127.0.0.1:{b1}
    server s2 127.0.0.1:{b2}
"""
ZDLB = """
workers = 1
[logging]
access_log = false
[listeners.web]
bind = "127.0.0.1:{port}"
backend = "app"
[listeners.web.tls]
certificates = [{{ cert = "site.pem", key = "site.key" }}]
[backends.app]
[[backends.app.servers]]
name = "s1"
address = "127.0.0.1:{b1}"
[[backends.app.servers]]
name = "s2"
address = "127.0.0.1:{b2}"
"""


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def make_certificate(directory: Path) -> None:
    """A P-256 CA, and a leaf for "bench.test" it signs: site.pem (leaf + key for HAProxy's
    crt, which wants both), site.key, ca.pem."""
    d = str(directory)
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{d}/ca.key")
    openssl("req", "-x509", "-new", "-key", f"{d}/ca.key", "-subj", "/CN=bench CA",
            "-days", "2", "-out", f"{d}/ca.pem")  # fmt: skip
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{d}/site.key")
    openssl("req", "-new", "-key", f"{d}/site.key", "-subj", "/CN=bench.test",
            "-out", f"{d}/site.csr")  # fmt: skip
    (directory / "ext").write_text("subjectAltName=DNS:bench.test,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", f"{d}/site.csr", "-CA", f"{d}/ca.pem", "-CAkey",
            f"{d}/ca.key", "-CAcreateserial", "-days", "2", "-extfile", f"{d}/ext",
            "-out", f"{d}/leaf.pem")  # fmt: skip
    leaf = (directory / "leaf.pem").read_bytes()
    (directory / "site.pem").write_bytes(leaf + (directory / "site.key").read_bytes())


def s_time(
    port: int, seconds: int, clients: int, mode: str, tls12: bool, cpu: int | None
) -> tuple[float, float]:
    """Handshakes per second over ``clients`` parallel ``openssl s_time`` runs pinned to
    ``cpu``, and the share of them that resumed a session (s_time prints "r" for each)."""
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", mode, "-time", str(seconds)]
    if tls12:
        argv.append("-tls1_2")
    procs = [
        subprocess.Popen(
            taskset(cpu, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(clients)
    ]
    total, connections, reused = 0.0, 0, 0
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 30)
        match = re.search(r"(\d+) connections in (\d+) real seconds", out)
        if match is None:
            raise RuntimeError(f"s_time said: {out[-300:]}")
        total += int(match[1]) / float(match[2])
        connections += int(match[1])
        reused += sum(line.count("r") for line in out.splitlines() if set(line) <= set("*r"))
    return total, reused / max(1, connections)


def wrk_rps(port: int, seconds: int, cpu: int | None) -> float:
    argv = ["wrk", "-t1", "-c50", f"-d{seconds}s", f"https://127.0.0.1:{port}/"]
    out = subprocess.run(
        taskset(cpu, argv), capture_output=True, text=True, timeout=seconds + 30, check=True
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"wrk said: {out[-300:]}")
    return float(match[1])


async def idle_bytes(port: int, pid: int, count: int, ca: Path) -> float:
    """RSS growth per TLS connection held idle after one request."""
    context = ssl.create_default_context(cafile=ca)
    before = tree_rss_bytes(pid)
    held = []
    gate = asyncio.Semaphore(100)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="bench.test"
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
            await reader.readexactly(length)
            held.append(writer)

    async with asyncio.timeout(120):
        await asyncio.gather(*(one() for _ in range(count)))
        await asyncio.sleep(1.0)  # the proxy finishes its per-request cleanup
    after = tree_rss_bytes(pid)
    for writer in held:
        writer.close()
    return (after - before) / count


def measure(name: str, port: int, pid: int, args: argparse.Namespace, ca: Path) -> dict[str, float]:
    seconds, clients, cpu = args.seconds, args.clients, args.client_cpu
    cpu_s = tree_cpu_s(pid)
    full, _ = s_time(port, seconds, clients, "-new", False, cpu)
    full_cpu_s, cpu_s = tree_cpu_s(pid) - cpu_s, tree_cpu_s(pid)
    resumed, share = s_time(port, seconds, clients, "-reuse", True, cpu)
    resumed_cpu_s, cpu_s = tree_cpu_s(pid) - cpu_s, tree_cpu_s(pid)
    rps = wrk_rps(port, seconds, args.client_cpu)
    rps_cpu_s = tree_cpu_s(pid) - cpu_s
    print(f"{name}: TLS 1.2 sessions resumed by s_time -reuse: {share:.0%}")
    figures = {
        "full_hs_per_s": full,
        "proxy_cpu_us_per_full_hs": full_cpu_s * 1e6 / (full * seconds),
        "resumed_hs_per_s": resumed,
        "proxy_cpu_us_per_resumed_hs": resumed_cpu_s * 1e6 / (resumed * seconds),
        "keepalive_rps": rps,
        "proxy_cpu_us_per_request": rps_cpu_s * 1e6 / (rps * seconds),
        "idle_bytes_per_conn": asyncio.run(idle_bytes(port, pid, args.idle, ca)),
    }
    print(name, " ".join(f"{k}={v:.1f}" for k, v in figures.items()), flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=2, help="parallel s_time runs")
    parser.add_argument("--cpu", type=int, default=1, help="the proxies' core")
    parser.add_argument("--client-cpu", type=int, default=0, help="wrk's and nginx's core")
    parser.add_argument("--idle", type=int, default=1000)
    args = parser.parse_args()
    raise_nofile_limit()
    registry = ProcRegistry()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="zdlb-tls-bench-") as tmp_name:
        tmp = Path(tmp_name)
        make_certificate(tmp)
        try:
            b1 = start_backend(registry, tmp, "b1", args.client_cpu).port
            b2 = start_backend(registry, tmp, "b2", args.client_cpu).port
            for name in ("zdlb", "haproxy"):
                port = free_port()
                if name == "haproxy":
                    conf = tmp / "haproxy.cfg"
                    conf.write_text(HAPROXY.format(port=port, dir=tmp, b1=b1, b2=b2))
                    argv = ["haproxy", "-db", "-f", str(conf)]
                else:
                    conf = tmp / "zdlb.toml"
                    conf.write_text(ZDLB.format(port=port, b1=b1, b2=b2))
                    argv = [sys.executable, "-m", "zdlb.daemon.cli", "run", "-c", str(conf),
                            "--log-level", "warning"]  # fmt: skip
                proc = registry.spawn(name, taskset(args.cpu, argv), tmp)
                if not wait_port(port, READY_S, proc):
                    print(f"{name}: not accepting: {proc.log_tail(5)}", file=sys.stderr)
                    return 1
                results[name] = measure(name, port, proc.pid, args, tmp / "ca.pem")
                proc.stop()
        finally:
            registry.stop_all()
    zdlb, haproxy = results["zdlb"], results["haproxy"]
    print("ratios zdlb/haproxy:", " ".join(f"{k}={zdlb[k] / haproxy[k]:.2f}" for k in zdlb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
