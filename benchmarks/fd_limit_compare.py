"""At the open-file limit: zdlb and HAProxy with 1,024 descriptors, 1,500 clients at once.

    .venv/bin/python -m benchmarks.fd_limit_compare [--rounds 3] [--clients 1500]

Per proxy and round: each proxy runs with RLIMIT_NOFILE 1024 (soft and hard, a default Debian
shell's), in front of one upstream in this process (tests/servers.py ``EchoServer``). 1,500
clients start at once; each opens a connection, sends a request, pauses 0.3 s, sends a second,
and closes (tests/daemon/test_fd_limit.py ``one_client``). Reported: clients served whole,
502/503 answers, connections cut, and the time until the last client was done. Neither proxy
gets a ``maxconn``: each picks its own from the limit (HAProxy's "maxconn" global, derived from
ulimit-n; zdlb's connection budget, zdlb/budget.py). Bounded: every client has a deadline,
every process is killed in a finally.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks.procs import accepting, free_port, raise_nofile_limit
from tests.daemon.test_fd_limit import NOFILE, one_client
from tests.servers import EchoServer

WAIT_S = 15.0
ZDLB = str(Path(sys.executable).with_name("zdlb"))
HAPROXY_CONFIG = """
global
    log stdout format raw local0 notice
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
frontend web
    bind 127.0.0.1:{port} backlog 2048
    default_backend app
backend app
    server s1 127.0.0.1:{upstream}
"""
ZDLB_CONFIG = """
[logging]
access_log = false
[listeners.web]
bind = "127.0.0.1:{port}"
backend = "app"
backlog = 2048
[backends.app]
[[backends.app.servers]]
name = "s1"
address = "127.0.0.1:{upstream}"
"""


def limit_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


async def one_round(name: str, argv: list[str], port: int, clients: int) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=limit_nofile,
    )
    try:
        await accepting(port, WAIT_S)
        started = time.monotonic()
        results = await asyncio.gather(
            *(one_client(("127.0.0.1", port), i) for i in range(clients))
        )
        elapsed = time.monotonic() - started
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    counts = Counter(results)
    ok = counts.pop("ok", 0)
    statuses = sum(n for what, n in counts.items() if what.startswith("status"))
    cut = sum(counts.values()) - statuses
    return (
        f"{name:8} served {ok:5}/{clients}  error answers {statuses:4}  cut {cut:4}"
        f"  done in {elapsed:5.2f} s  {dict(counts) or ''}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1500)
    args = parser.parse_args()
    raise_nofile_limit()  # this process holds every client socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    async with EchoServer(sock, name="s1") as upstream:
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                port, config = free_port(), Path(tmp) / "zdlb.toml"
                config.write_text(ZDLB_CONFIG.format(port=port, upstream=upstream.port))
                argv = [ZDLB, "run", "--workers", "1", "-c", str(config)]
                print(await one_round("zdlb", argv, port, args.clients), flush=True)
            if shutil.which("haproxy"):
                with tempfile.TemporaryDirectory() as tmp:
                    port, config = free_port(), Path(tmp) / "haproxy.cfg"
                    config.write_text(HAPROXY_CONFIG.format(port=port, upstream=upstream.port))
                    argv = ["haproxy", "-db", "-f", str(config)]
                    print(await one_round("haproxy", argv, port, args.clients), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
