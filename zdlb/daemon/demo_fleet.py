"""``zdlb demo --fleet N``: etcd, the demo hosts and N zdlb instances sharing their state.

Everything on loopback: etcd on 127.0.0.1:2379 (its data in a fresh temporary folder), the
demo's hosts on their usual ports (front-1 8081/8091, front-2 8082/8092), and instance lb-K on
port 8100 + K with its config and control socket in FLEET_DIR (``zdlb ctl -c
/tmp/zdlb-fleet-demo/lb-2.toml ...``). Each instance is a ``zdlb run`` process of its own,
exactly as in production; their log lines come out prefixed with their name. Ctrl-C stops them,
then etcd, and removes etcd's data.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from zdlb.cluster.local import LocalEtcd, die_with_parent
from zdlb.config.model import LogFormat, LoggingConfig
from zdlb.daemon.demo_app import start_demo_hosts
from zdlb.daemon.lifecycle import install_signal_handlers, run_loop
from zdlb.daemon.logs import setup_logging
from zdlb.errors import ClusterUnavailable, ZdlbError

log = logging.getLogger(__name__)

FLEET_DIR = Path(tempfile.gettempdir()) / "zdlb-fleet-demo"
ETCD_CLIENT_PORT = 2379  # etcd's registered ports: the demo looks like a real setup
ETCD_PEER_PORT = 2380
FIRST_PORT = 8100  # lb-K listens on FIRST_PORT + K
MAX_INSTANCES = 9
START_TIMEOUT_S = 30.0  # three interpreters starting on a loaded 2-core box

CONFIG = """\
# zdlb demo --fleet: instance {name} of {count} (written by the demo, rewritten at each start)
[logging]
access_log = false

[control]
socket = "{dir}/{name}.sock"
state_file = "{dir}/{name}.state"

[cluster]
endpoints = ["http://127.0.0.1:{etcd_port}"]
prefix = "/zdlb/demo"
instance = "{name}"

[listeners.web]
bind = "127.0.0.1:{port}"
backend = "app"

[backends.app.check]
kind = "http"
path = "/health"
interval_s = 1
fast_interval_s = 0.2
rise = 2
fall = 2

[backends.app.sticky]
cookie = "SERVERID"
secret = "zdlb-fleet-demo-secret"   # shared by every instance: a cookie works on any of them

[[backends.app.servers]]
name = "front-1"
address = "127.0.0.1:8081"

[[backends.app.servers]]
name = "front-2"
address = "127.0.0.1:8082"

[[backends.app.servers]]
name = "front-1-backup"
address = "127.0.0.1:8091"
pool = "backup"
pair = "front-1"

[[backends.app.servers]]
name = "front-2-backup"
address = "127.0.0.1:8092"
pool = "backup"
pair = "front-2"
"""

HELP = """\
zdlb demo --fleet {count}: {count} load balancers sharing their state through etcd
  etcd: http://127.0.0.1:{etcd_port} (data in {etcd_dir}, removed at exit)
{instances}
  demo hosts: front-1 main (v1) 127.0.0.1:8081, backup (v2) :8091; front-2 :8082, :8092.
A flip made on one instance reaches the others (another terminal):
  {program} ctl -c {dir}/lb-1.toml flip app/front-1
  {program} ctl -c {dir}/lb-2.toml show servers
  {program} ctl -c {dir}/lb-1.toml show servers --fleet
Stop with Ctrl-C."""


def fleet_count(text: str) -> int:
    """``--fleet N``: 1..MAX_INSTANCES, or argparse's usage error."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_INSTANCES:
        raise argparse.ArgumentTypeError(f"expected 1..{MAX_INSTANCES}, got {text!r}")
    return count


def run_fleet_demo_command(args: argparse.Namespace) -> int:
    """``zdlb demo --fleet N``: logging as the options say, then the demo; the exit status."""
    defaults = LoggingConfig()
    log_format = LogFormat(args.log_format) if args.log_format else defaults.format
    setup_logging(args.log_level or defaults.level, log_format)
    # The command as the user can type it: `make demo` runs .venv/bin/zdlb, not on PATH.
    program = sys.argv[0] if Path(sys.argv[0]).name == "zdlb" else "zdlb"
    return run_loop(args.loop, run_fleet_demo(args.fleet, program))


async def run_fleet_demo(count: int, program: str) -> None:
    """Run the fleet demo until SIGINT/SIGTERM. Raises ZdlbError if a part cannot start."""
    FLEET_DIR.mkdir(parents=True, exist_ok=True)
    etcd_dir = Path(tempfile.mkdtemp(prefix="zdlb-fleet-etcd-"))
    etcd = LocalEtcd(etcd_dir, ETCD_CLIENT_PORT, ETCD_PEER_PORT)
    procs: list[asyncio.subprocess.Process] = []
    hosts = None
    try:
        if not await asyncio.to_thread(_port_free, ETCD_CLIENT_PORT):
            raise ClusterUnavailable(f"127.0.0.1:{ETCD_CLIENT_PORT} is taken: is an etcd running?")
        etcd.start()
        await asyncio.to_thread(etcd.wait_ready)
        hosts = await start_demo_hosts()
        stop = asyncio.Event()
        install_signal_handlers(stop)
        async with asyncio.TaskGroup() as tasks:
            for index in range(1, count + 1):
                proc = await _start_instance(index, count, tasks)
                procs.append(proc)
            lines = [
                f"  lb-{i}: http://127.0.0.1:{FIRST_PORT + i} (config {FLEET_DIR}/lb-{i}.toml)"
                for i in range(1, count + 1)
            ]
            help_text = HELP.format(
                count=count,
                etcd_port=ETCD_CLIENT_PORT,
                etcd_dir=etcd_dir,
                instances="\n".join(lines),
                program=program,
                dir=FLEET_DIR,
            )
            print(help_text, file=sys.stderr, flush=True)
            log.info("fleet_demo_ready instances=%d", count)
            await stop.wait()
            await _stop_all(procs)
    finally:
        await _stop_all(procs)
        if hosts is not None:
            hosts.close()
            await hosts.wait_closed()
        await asyncio.to_thread(etcd.stop)
        shutil.rmtree(etcd_dir, ignore_errors=True)


async def _start_instance(
    index: int, count: int, tasks: asyncio.TaskGroup
) -> asyncio.subprocess.Process:
    name = f"lb-{index}"
    config = FLEET_DIR / f"{name}.toml"
    text = CONFIG.format(
        name=name, count=count, dir=FLEET_DIR, etcd_port=ETCD_CLIENT_PORT, port=FIRST_PORT + index
    )
    config.write_text(text, encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zdlb.daemon.cli", "run", "--workers", "1", "-c", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=die_with_parent,
    )  # fmt: skip
    assert proc.stdout is not None
    ready = asyncio.Event()
    tasks.create_task(_forward(name, proc.stdout, ready))
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            await ready.wait()
    except TimeoutError:
        raise ZdlbError(f"{name} did not start within {START_TIMEOUT_S} s") from None
    if proc.returncode is not None:
        raise ZdlbError(f"{name} exited with code {proc.returncode} before serving")
    return proc


async def _forward(name: str, stream: asyncio.StreamReader, ready: asyncio.Event) -> None:
    """Copy an instance's log lines to stderr, prefixed; ``ready`` once it serves (or ends)."""
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip("\n")
        print(f"[{name}] {text}", file=sys.stderr, flush=True)
        if "listener_started" in text:
            ready.set()
    ready.set()


async def _stop_all(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
    for proc in procs:
        await proc.wait()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0
