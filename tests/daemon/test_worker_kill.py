"""kill -9 of a worker: its share of the SO_REUSEPORT group is served again at once, by a
sibling (workers.py, rule 6), long before its replacement is ready: HTTP and TCP listeners.

Clients connect right after the worker is dead; the kernel hashes about half of them to the
dead worker's socket, where they would wait for the restart. Each records when it was
answered (wall clock, to compare with the daemon's log stamps).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.daemon.conftest import StartDaemon
from tests.daemon.test_workers import Cluster, WriteConfig, specs_of, stamp_s, start_cluster
from tests.servers import EchoServer, H11Client

FRESH_CLIENTS = 24  # all on the live worker's socket: a 2**-24 chance
DEAD_WAIT_S = 2.0


def is_dead(pid: int) -> bool:
    """Killed, even if not reaped yet (a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def answered_at(cluster: Cluster, addr: tuple[str, int] | None = None) -> float:
    async with await H11Client.connect(addr or cluster.addr) as client:
        response = await client.request("GET", "/")
    assert response.status == 200, response
    return time.time()


@pytest.fixture
async def echo_pair(bound_socket_factory) -> AsyncIterator[tuple[EchoServer, EchoServer]]:
    async with (
        EchoServer(bound_socket_factory(), name="s1") as s1,
        EchoServer(bound_socket_factory(), name="s2") as s2,
    ):
        yield s1, s2


async def test_a_killed_workers_share_is_served_before_its_replacement_is_ready(
    echo_pair: tuple[EchoServer, EchoServer], start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    cluster = await start_cluster(start_daemon, write_config, specs_of(echo_pair), echo_pair)
    victim = cluster.worker_pids()[0]
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    async with asyncio.timeout(DEAD_WAIT_S):
        while not is_dead(victim):  # noqa: ASYNC110 -- a pid has no event to wait on
            await asyncio.sleep(0.001)
    answers = await asyncio.gather(*(answered_at(cluster) for _ in range(FRESH_CLIENTS)))
    line = await cluster.daemon.wait_line(
        lambda text: "worker_started worker=0" in text and f"pid={victim}" not in text
    )
    ready_again_s = stamp_s(line) - killed_at
    served_s = max(answers) - killed_at
    assert "worker_share_adopted share=0 by=1" in cluster.daemon.output
    # Log stamps have millisecond resolution: a margin of 2 ms.
    assert served_s < ready_again_s - 0.002, (served_s, ready_again_s)
    await cluster.daemon.wait_text("worker_share_released share=0 by=1")
    print(
        f"kill -9: every client answered {served_s * 1000:.0f} ms after the kill; "
        f"the replacement was ready after {ready_again_s * 1000:.0f} ms"
    )


RAW = '\n[listeners.raw]\nbind = "127.0.0.1:0"\nmode = "tcp"\nbackend = "app"\n'
# The bound: a killed worker's share answers again within this.
SHARE_BOUND_S = 0.1


async def test_a_killed_workers_tcp_share_answers_again_within_100_ms(
    echo_pair: tuple[EchoServer, EchoServer], start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    cluster = await start_cluster(
        start_daemon, write_config, specs_of(echo_pair), echo_pair, extra=RAW
    )
    raw = await cluster.daemon.listener_addr("raw")
    victim = cluster.worker_pids()[1]
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    async with asyncio.timeout(DEAD_WAIT_S):
        while not is_dead(victim):  # noqa: ASYNC110 -- a pid has no event to wait on
            await asyncio.sleep(0.001)
    # Half of these land on the dead worker's socket: each is answered only once a sibling
    # accepts there (or, without adoption, once the replacement is ready).
    answers = await asyncio.gather(*(answered_at(cluster, raw) for _ in range(FRESH_CLIENTS)))
    line = await cluster.daemon.wait_line(
        lambda text: "worker_started worker=1" in text and f"pid={victim}" not in text
    )
    ready_again_s = stamp_s(line) - killed_at
    served_s = max(answers) - killed_at
    assert "worker_share_adopted share=1 by=0" in cluster.daemon.output
    assert served_s < SHARE_BOUND_S, (served_s, ready_again_s)
    assert served_s < ready_again_s - 0.002, (served_s, ready_again_s)
    await cluster.daemon.wait_text("worker_share_released share=1 by=0")
    print(
        f"kill -9, TCP listener: every client answered {served_s * 1000:.0f} ms after the "
        f"kill; the replacement was ready after {ready_again_s * 1000:.0f} ms"
    )
