"""What a graceful stop loses: zdlb's SIGTERM against HAProxy's soft stop (SIGUSR1).

    .venv/bin/python -m benchmarks.stop_compare [--rounds 3]

Per proxy and round: one upstream that answers at once, except ``/hold`` requests, held until
released (tests/daemon/conftest.py ``HeldServer``); 20 keep-alive clients pausing 0-200 ms
between requests (tests/daemon/load.py, each stops when the proxy closes its connection);
once 10 ``/hold`` requests are in flight the proxy gets its stop signal, and the held requests
are released 0.2 s later. Lost: a client request that got no answer, or a held request
without its 200. Bounded: every wait has a timeout, every process is stopped in a finally.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from benchmarks.procs import accepting
from tests.daemon.conftest import HELD_TARGET, HeldServer
from tests.daemon.load import KeepAliveLoad
from tests.servers import H11Client

CLIENTS, SLOW = 20, 10
WAIT_S = 15.0
ZDLB = str(Path(sys.executable).with_name("zdlb"))
HAPROXY_CONFIG = """
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend web
    bind 127.0.0.1:{port}
    default_backend app
backend app
    server s1 127.0.0.1:{upstream}
"""
ZDLB_CONFIG = """
[logging]
access_log = false
[defaults.timeouts]
grace_s = 10
[listeners.web]
bind = "127.0.0.1:{port}"
backend = "app"
[backends.app]
[[backends.app.servers]]
name = "s1"
address = "127.0.0.1:{upstream}"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def one_round(
    name: str, argv: list[str], stop: signal.Signals, port: int, held: HeldServer
) -> str:
    held.release.clear()
    holds_before = sum(r.target == HELD_TARGET for r in held.requests)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    slow_clients: list[H11Client] = []
    try:
        await accepting(port, WAIT_S)
        load = KeepAliveLoad(("127.0.0.1", port), CLIENTS, reconnect=False)
        async with load:
            await load.wait_requests(100)
            slow_clients = [
                await H11Client.connect(("127.0.0.1", port), timeout_s=WAIT_S) for _ in range(SLOW)
            ]
            slow = [asyncio.create_task(c.request("GET", HELD_TARGET)) for c in slow_clients]
            async with asyncio.timeout(WAIT_S):
                await held.wait_until(
                    lambda: (
                        sum(r.target == HELD_TARGET for r in held.requests) >= holds_before + SLOW
                    )
                )
            proc.send_signal(stop)
            await asyncio.sleep(0.2)
            held.release.set()
            answers = await asyncio.gather(*slow, return_exceptions=True)
            async with asyncio.timeout(WAIT_S):
                await proc.wait()
            record = await load.stop()
    finally:
        for client in slow_clients:
            await client.aclose()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    slow_lost = sum(1 for a in answers if isinstance(a, BaseException) or a.status != 200)
    return (
        f"{name:34} requests {record.requests:5}  unanswered {len(record.failed) + slow_lost:3} "
        f"(keep-alive {len(record.failed)}, slow {slow_lost})  closes announced "
        f"{record.announced}/{record.closed}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    async with HeldServer(sock, name="s1") as held:
        upstream = held.addr[1]
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                port, config = free_port(), Path(tmp) / "zdlb.toml"
                config.write_text(ZDLB_CONFIG.format(port=port, upstream=upstream))
                argv = [ZDLB, "run", "--workers", "1", "-c", str(config)]
                print(
                    await one_round("zdlb (SIGTERM)", argv, signal.SIGTERM, port, held), flush=True
                )
            if shutil.which("haproxy"):
                with tempfile.TemporaryDirectory() as tmp:
                    port, config = free_port(), Path(tmp) / "haproxy.cfg"
                    config.write_text(HAPROXY_CONFIG.format(port=port, upstream=upstream))
                    argv = ["haproxy", "-db", "-f", str(config)]
                    line = await one_round(
                        "haproxy (SIGUSR1 soft stop)", argv, signal.SIGUSR1, port, held
                    )
                    print(line, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
