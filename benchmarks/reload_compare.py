"""zdlb's reload/upgrade/stop against HAProxy's reload (``-W`` master-worker + SIGUSR2), under
the same keep-alive load: what each loses.

    .venv/bin/python -m benchmarks.reload_compare [--clients 10] [--rounds 3] [--workers 1]

Per proxy and round: two echo upstreams (s1, s2, s3 available), 10 keep-alive clients pausing
0-200 ms between requests (tests/daemon/load.py: they record every failed request and every
connection the proxy closed, announced by ``Connection: close`` or not), then seven reloads
0.5 s apart -- s3 added, s2 removed, a check changed, a listener ``api`` added, ``api``
removed, an invalid config, a weight by signal -- and for zdlb one upgrade. zdlb reloads with
``zdlb ctl reload`` (SIGHUP for the last) and upgrades with ``zdlb ctl upgrade``; HAProxy gets
SIGUSR2 on its master each time (its reload is also its upgrade). ``--workers N``: zdlb runs N
worker processes, HAProxy N threads (``nbthread``). The load runs on the kept listener; the
added one is asked once (``api served``) and, once removed, must refuse (``then refused``).
Prints one line per proxy and round. Bounded: every wait has a timeout, every process is
stopped in a ``finally``.
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

import h11

from benchmarks.procs import accepting
from tests.daemon.load import KeepAliveLoad, LoadRecord
from tests.servers import EchoServer, H11Client

START_S = 10.0
STEP_S = 0.5
ZDLB = str(Path(sys.executable).with_name("zdlb"))
HAPROXY_CONFIG = """
global
    master-worker
    nbthread {workers}
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
{api}"""
HAPROXY_API = """
frontend api
    bind 127.0.0.1:{port}
    default_backend app
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
{api}"""
ZDLB_API = """
[listeners.api]
bind = "127.0.0.1:{port}"
backend = "app"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Step = tuple[str, list[tuple[str, str]], bool]
SIGNAL_STEP = 6  # zdlb: by SIGHUP, not ctl


def steps() -> list[Step]:
    """(what, [(server, options)], api listener?) for each reload; options are "check",
    "weight=N", "bogus"."""
    checked = [("s1", "check"), ("s3", "")]
    return [
        ("add s3", [("s1", ""), ("s2", ""), ("s3", "")], False),
        ("remove s2", [("s1", ""), ("s3", "")], False),
        ("check s1", checked, False),
        ("add listener api", checked, True),
        ("remove listener api", checked, False),
        ("invalid", [("s1", "check"), ("s3", "bogus")], False),
        ("weight s3", [("s1", "check"), ("s3", "weight=50")], False),
    ]


async def api_answers(port: int) -> bool:
    """One request on the added listener: answered 200?"""
    try:
        async with asyncio.timeout(2.0), await H11Client.connect(("127.0.0.1", port)) as client:
            return (await client.request()).status == 200
    except (OSError, TimeoutError, h11.RemoteProtocolError):
        return False


async def listener_report(port: int, index: int, checks: list[str]) -> None:
    """After the add and the remove steps: the added listener serves, then refuses."""
    if index == 3:
        checks.append("api served" if await api_answers(port) else "api NOT served")
    elif index == 4:
        checks.append("then accepted" if await api_answers(port) else "then refused")


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


async def run_zdlb(ups: dict[str, EchoServer], clients: int, tmp: Path, workers: int) -> str:
    port, api_port, config = free_port(), free_port(), tmp / "zdlb.toml"
    config.write_text(
        ZDLB_CONFIG.format(port=port, servers=zdlb_servers(ups, [("s1", ""), ("s2", "")]), api="")
    )
    proc = await asyncio.create_subprocess_exec(
        ZDLB,
        "run",
        "--workers",
        str(workers),
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
            codes: list[str] = []
            checks: list[str] = []
            for index, (_, servers, has_api) in enumerate(steps()):
                api = ZDLB_API.format(port=api_port) if has_api else ""
                text = ZDLB_CONFIG.format(port=port, servers=zdlb_servers(ups, servers), api=api)
                config.write_text(text)
                if index == SIGNAL_STEP:
                    os.kill(pids[-1], signal.SIGHUP)
                    codes.append("HUP")
                else:
                    ctl = await asyncio.create_subprocess_exec(
                        *(ZDLB, "ctl", "-c", str(config), "reload"),
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                    codes.append(str(await ctl.wait()))
                await listener_report(api_port, index, checks)
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
    upgraded = "ok" if len(pids) > 1 else "FAILED"
    name = f"zdlb -w{workers} (reloads {','.join(codes)}; upgrade {upgraded})"
    return summary(name, record, checks)


async def run_haproxy(ups: dict[str, EchoServer], clients: int, tmp: Path, workers: int) -> str:
    port, api_port, config = free_port(), free_port(), tmp / "haproxy.cfg"

    def text(servers: list[tuple[str, str]], has_api: bool) -> str:
        api = HAPROXY_API.format(port=api_port) if has_api else ""
        return HAPROXY_CONFIG.format(
            port=port, servers=haproxy_servers(ups, servers), api=api, workers=workers
        )

    config.write_text(text([("s1", ""), ("s2", "")], False))
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
            checks: list[str] = []
            for index, (_, servers, has_api) in enumerate(steps()):
                config.write_text(text(servers, has_api))
                proc.send_signal(signal.SIGUSR2)
                await asyncio.sleep(STEP_S / 2)  # SIGUSR2 says nothing of when it is done
                await listener_report(api_port, index, checks)
                await asyncio.sleep(STEP_S / 2)
            await asyncio.sleep(STEP_S * 2)
            record = await load.stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    return summary(f"haproxy -W nbthread {workers} (7 x SIGUSR2)", record, checks)


def summary(name: str, record: LoadRecord, checks: list[str]) -> str:
    return (
        f"{name:44} requests {record.requests:5}  failed {len(record.failed):3}  "
        f"connections closed {record.closed:3} (announced {record.announced:3})  "
        f"{', '.join(checks)}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="zdlb workers, HAProxy threads")
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
                print(await run_zdlb(ups, args.clients, Path(tmp), args.workers), flush=True)
            if shutil.which("haproxy"):
                with tempfile.TemporaryDirectory() as tmp:
                    result = await run_haproxy(ups, args.clients, Path(tmp), args.workers)
                    print(result, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
