"""How fast a state change made on one zdlb instance reaches every instance of a fleet (issue 16).

Starts a throwaway etcd (zdlb/cluster/local.py) and ``--instances`` zdlb processes sharing one
prefix, then makes ``--changes`` weight changes, each on a random instance to a random server
(a new value every time). A change's convergence time runs from the moment its command is sent
until every instance's ``show servers`` (the master's servers, which in a one-process instance
are the data plane's) shows it; the command itself answers once the change is committed in
etcd and applied on its own instance. With worker processes add up to PUSH_POLL_S (20 ms).
Every instance is polled through its control socket every POLL_S.

    .venv/bin/python -m benchmarks.fleet_convergence [--changes 100] [--instances 3]

tests/daemon/test_fleet_convergence.py runs ``measure`` on a test fleet and checks p99 < 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.daemon.fleet_support import control
from zdlb.cluster.local import LocalEtcd

POLL_S = 0.002
CHANGE_TIMEOUT_S = 5.0
_LISTENING_RE = re.compile(r"listener_started listener=web addr=\S+:(\d+)")


async def _until_weight(path: Path, server: str, weight: int) -> float:
    loop = asyncio.get_running_loop()
    while True:
        rows = json.loads(await control(path, "json show servers"))
        if any(row["server"] == server and row["weight"] == weight for row in rows):
            return loop.time()
        await asyncio.sleep(POLL_S)


async def measure(
    sockets: Sequence[Path], servers: Sequence[str], count: int, seed: int = 16
) -> list[float]:
    """Convergence times in seconds of ``count`` weight changes from random instances."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    times = []
    weights = {server: -1 for server in servers}
    for _ in range(count):
        server = rng.choice(servers)
        weight = rng.choice([w for w in range(1, 101) if w != weights[server]])
        weights[server] = weight
        origin = rng.choice(sockets)
        began = loop.time()
        async with asyncio.timeout(CHANGE_TIMEOUT_S):
            command = asyncio.ensure_future(control(origin, f"set server {server} weight {weight}"))
            seen = await asyncio.gather(*(_until_weight(p, server, weight) for p in sockets))
            answer = await command
        if answer.startswith("error:"):
            raise RuntimeError(f"change refused: {answer}")
        times.append(max(seen) - began)
    return times


def summary(times: Sequence[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return (
        f"changes={len(ms)} min={ms[0]:.1f}ms median={statistics.median(ms):.1f}ms "
        f"p90={cuts[89]:.1f}ms p99={cuts[98]:.1f}ms max={ms[-1]:.1f}ms"
    )


def p99(times: Sequence[float]) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[98]


def instance_config(name: str, etcd_url: str, state_dir: Path, servers: Sequence[str]) -> str:
    lines = [
        "[logging]\naccess_log = false\n",
        f'[control]\nsocket = "{state_dir / (name + ".sock")}"\n',
        f'[cluster]\nendpoints = ["{etcd_url}"]\nprefix = "/bench"\ninstance = "{name}"\n',
        '[listeners.web]\nbind = "127.0.0.1:0"\nbackend = "app"\n',
        "[backends.app]",
    ]
    for server in servers:
        lines.append(f'[[backends.app.servers]]\nname = "{server}"\naddress = "127.0.0.1:9"\n')
    return "\n".join(lines)


async def _start(name: str, config: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zdlb.daemon.cli", "run", "--workers", "1", "-c", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        while line := await proc.stdout.readline():
            if _LISTENING_RE.search(line.decode()):
                # Keep draining its output so the pipe never fills and blocks it.
                asyncio.get_running_loop().create_task(_drain(proc.stdout))
                return proc
    raise RuntimeError(f"{name} exited before serving")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def _main(changes: int, count: int) -> None:
    servers = [f"s{index}" for index in range(1, 5)]
    with tempfile.TemporaryDirectory(prefix="zdlb-fleet-bench-") as folder:
        state_dir = Path(folder)
        etcd = LocalEtcd(state_dir / "etcd")
        etcd.start()
        procs = []
        try:
            etcd.wait_ready()
            for index in range(1, count + 1):
                config = state_dir / f"lb-{index}.toml"
                text = instance_config(f"lb-{index}", etcd.url, state_dir, servers)
                config.write_text(text, encoding="utf-8")
                procs.append(await _start(f"lb-{index}", config))
            sockets = [state_dir / f"lb-{index}.sock" for index in range(1, count + 1)]
            times = await measure(sockets, [f"app/{s}" for s in servers], changes)
            print(f"instances={count} {summary(times)}")
        finally:
            for proc in procs:
                proc.terminate()
                await proc.wait()
            etcd.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--instances", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(_main(args.changes, args.instances))


if __name__ == "__main__":
    main()
