"""zdlb's reload/upgrade/stop against HAProxy's reload (``-W`` master-worker + SIGUSR2), under
the same keep-alive load: what each loses.

    .venv/bin/python -m benchmarks.reload_compare [--clients 10] [--rounds 3]

Per proxy and round: two echo upstreams (s1, s2, s3 available), 10 keep-alive clients pausing
0-200 ms between requests (tests/daemon/load.py: they record every failed request and every
connection the proxy closed, announced by ``Connection: close`` or not), then five reloads
0.5 s apart -- s3 added, s2 removed, a check changed, an invalid config, a weight by signal --
and for zdlb one upgrade. zdlb reloads with ``zdlb ctl reload`` (SIGHUP for the last) and
upgrades with ``zdlb ctl upgrade``; HAProxy gets SIGUSR2 on its master each time (its reload
is also its upgrade). Prints one line per proxy and round. Bounded: every wait has a timeout,
every process is stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from benchmarks.procs import accepting
from tests.daemon.load import KeepAliveLoad
from tests.servers import EchoServer

START_S = 10.0
STEP_S = 0.5
ZDLB = str(Path(sys.executable).with_name("zdlb"))
HAPROXY_CONFIG = """
global
    master-worker
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend web
    bind 127.0.0.1:{port}
    default_backend app
backend app
    balance roundrobin
{servers}
"""
ZDLB_CONFIG = """
[logging]
access_log = false
[control]
socket = "ctl.sock"
[listeners.web]
bind = "127.0.0.1:{port}"
backend = "app"
[backends.app]
{servers}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def steps(ups: dict[str, EchoServer]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(what, [(server, options)]) for each reload; options are "check", "weight=N"."""
    return [
        ("add s3", [("s1", ""), ("s2", ""), ("s3", "")]),
        ("remove s2", [("s1", ""), ("s3", "")]),
        ("check s1", [("s1", "check"), ("s3", "")]),
        ("invalid", [("s1", "check"), ("s3", "bogus")]),
        ("weight s3", [("s1", "check"), ("s3", "weight=50")]),
    ]


def haproxy_servers(ups: dict[str, EchoServer], servers: list[tuple[str, str]]) -> str:
    lines = []
    for name, option in servers:
        extra = {"check": " check inter 1s", "weight=50": " weight 50", "bogus": " bogus-kw"}
        lines.append(f"    server {name} 127.0.0.1:{ups[name].addr[1]}{extra.get(option, '')}")
    return "\n".join(lines)


def zdlb_servers(ups: dict[str, EchoServer], servers: list[tuple[str, str]]) -> str:
    lines = []
    for name, option in servers:
        lines += ["[[backends.app.servers]]", f'name = "{name}"']
        lines.append(f'address = "127.0.0.1:{ups[name].addr[1]}"')
        if option == "weight=50":
            lines.append("weight = 50")
        if option == "bogus":
            lines.append("bogus = 1")
        if option == "check":
            lines.append('check = { kind = "tcp", interval_s = 1.0 }')
    return "\n".join(lines)


async def run_zdlb(ups: dict[str, EchoServer], clients: int, tmp: Path) -> str:
    port, config = free_port(), tmp / "zdlb.toml"
    config.write_text(
        ZDLB_CONFIG.format(port=port, servers=zdlb_servers(ups, [("s1", ""), ("s2", "")]))
    )
    proc = await asyncio.create_subprocess_exec(
        ZDLB,
        "run",
        "--workers",
        "1",
        "-c",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    pids = [proc.pid]
    try:
        await accepting(port, START_S)
        async with KeepAliveLoad(("127.0.0.1", port), clients) as load:
            await load.wait_requests(50)
            codes = []
            for index, (_, servers) in enumerate(steps(ups)):
                text = ZDLB_CONFIG.format(port=port, servers=zdlb_servers(ups, servers))
                config.write_text(text)
                if index == 4:
                    os.kill(pids[-1], signal.SIGHUP)
                    codes.append("HUP")
                else:
                    ctl = await asyncio.create_subprocess_exec(
                        *(ZDLB, "ctl", "-c", str(config), "reload"),
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                    codes.append(str(await ctl.wait()))
                await asyncio.sleep(STEP_S)
            up = await asyncio.create_subprocess_exec(
                ZDLB, "ctl", "-c", str(config), "upgrade", stdout=asyncio.subprocess.PIPE
            )
            out, _ = await up.communicate()
            if (match := re.search(rb"pid (\d+) serves", out)) is not None:
                pids.append(int(match[1]))
            await asyncio.sleep(STEP_S * 2)
            record = await load.stop()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        await proc.wait()
    name = f"zdlb (reload exits {','.join(codes)}; upgrade {'ok' if len(pids) > 1 else 'FAILED'})"
    return summary(name, record)


async def run_haproxy(ups: dict[str, EchoServer], clients: int, tmp: Path) -> str:
    port, config = free_port(), tmp / "haproxy.cfg"
    config.write_text(
        HAPROXY_CONFIG.format(port=port, servers=haproxy_servers(ups, [("s1", ""), ("s2", "")]))
    )
    proc = await asyncio.create_subprocess_exec(
        "haproxy",
        "-W",
        "-f",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await accepting(port, START_S)
        async with KeepAliveLoad(("127.0.0.1", port), clients) as load:
            await load.wait_requests(50)
            for _, servers in steps(ups):
                config.write_text(
                    HAPROXY_CONFIG.format(port=port, servers=haproxy_servers(ups, servers))
                )
                proc.send_signal(signal.SIGUSR2)
                await asyncio.sleep(STEP_S)
            await asyncio.sleep(STEP_S * 2)
            record = await load.stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    return summary("haproxy -W (5 x SIGUSR2)", record)


def summary(name: str, record: object) -> str:
    r = record
    return (
        f"{name:52} requests {r.requests:5}  failed {len(r.failed):3}  "  # type: ignore[attr-defined]
        f"connections closed {r.closed:3} (announced {r.announced})"  # type: ignore[attr-defined]
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    socks = []
    for _ in range(3):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        socks.append(sock)
    async with (
        EchoServer(socks[0], name="s1") as s1,
        EchoServer(socks[1], name="s2") as s2,
        EchoServer(socks[2], name="s3") as s3,
    ):
        ups = {"s1": s1, "s2": s2, "s3": s3}
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                print(await run_zdlb(ups, args.clients, Path(tmp)), flush=True)
            if shutil.which("haproxy"):
                with tempfile.TemporaryDirectory() as tmp:
                    print(await run_haproxy(ups, args.clients, Path(tmp)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
