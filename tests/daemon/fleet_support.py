"""A fleet of real zdlb processes sharing state through a real etcd, for tests and benchmarks.

``Instance`` is one ``zdlb run`` (a ``Daemon``) with its config, control socket and listener
address; ``control`` sends one command line straight to a control socket (no ``zdlb ctl``
process: a convergence measurement must not time interpreter starts). Every instance of one
fleet shares the etcd ``prefix``, so tests on one etcd do not see each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.daemon.conftest import Daemon, StartDaemon
from zdlb.cluster.local import LocalEtcd

# A control answer ends with an empty line (control/protocol.py's framing).
_END = b"\n\n"
CONTROL_TIMEOUT_S = 10.0


@contextlib.contextmanager
def running_etcd(data_dir: Path) -> Iterator[LocalEtcd]:
    """A loopback etcd with its data under ``data_dir``, ready (its /health polled), stopped
    on exit."""
    server = LocalEtcd(data_dir)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def fleet_config(
    *,
    name: str,
    endpoints: Sequence[str],
    prefix: str,
    state_dir: Path,
    servers: Sequence[tuple[str, str, str, str | None]],
    extra: str = "",
) -> str:
    """TOML for one instance: listener ``web`` on an ephemeral port, backend ``app`` with
    ``servers`` (name, address, pool, pair), a control socket and journal in ``state_dir``."""
    quoted = ", ".join(f'"{endpoint}"' for endpoint in endpoints)
    lines = [
        "[logging]",
        "access_log = false",
        "",
        "[control]",
        f'socket = "{state_dir / (name + ".sock")}"',
        f'state_file = "{state_dir / (name + ".state")}"',
        "",
        "[cluster]",
        f"endpoints = [{quoted}]",
        f'prefix = "{prefix}"',
        f'instance = "{name}"',
        "lease_s = 3",
        "timeout_s = 1",
        "",
        "[listeners.web]",
        'bind = "127.0.0.1:0"',
        'backend = "app"',
        "",
        "[backends.app]",
        extra,
    ]
    for server, address, pool, pair in servers:
        lines += ["[[backends.app.servers]]", f'name = "{server}"', f'address = "{address}"']
        lines += [f'pool = "{pool}"'] + ([f'pair = "{pair}"'] if pair else []) + [""]
    return "\n".join(lines) + "\n"


@dataclass
class Instance:
    name: str
    config: Path
    socket: Path
    daemon: Daemon
    addr: tuple[str, int]

    async def control(self, line: str) -> str:
        return await control(self.socket, line)

    async def servers(self) -> dict[str, dict[str, Any]]:
        """``json show servers`` by "backend/server"."""
        rows = json.loads(await self.control("json show servers"))
        return {row["server"]: row for row in rows}


async def control(path: Path, line: str) -> str:
    """Send ``line`` to the control socket at ``path``; the answer without its end mark."""
    async with asyncio.timeout(CONTROL_TIMEOUT_S):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(line.encode() + b"\n")
            answer = await reader.readuntil(_END)
        finally:
            writer.close()
            await writer.wait_closed()
    return answer[: -len(_END)].decode()


async def start_instance(
    start_daemon: StartDaemon, config_text: str, state_dir: Path, name: str, workers: int = 1
) -> Instance:
    """Start ``zdlb run`` on ``config_text``; returns once its listener accepts."""
    config = state_dir / f"{name}.toml"
    config.write_text(config_text, encoding="utf-8")
    daemon = await start_daemon("run", "--workers", str(workers), "-c", str(config))
    addr = await daemon.listener_addr()
    return Instance(name, config, state_dir / f"{name}.sock", daemon, addr)
