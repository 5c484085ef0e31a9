"""A stop that loses no written request (issue 11), on the real daemon.

20 keep-alive clients pausing 0-200 ms between requests and 10 slow requests in flight when
SIGTERM arrives: every request written gets its answer; each keep-alive client learns of the
stop from a ``Connection: close`` on an answer, never from a close under a request; the
daemon exits 0 well within ``grace_s``.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.daemon.conftest import (
    HELD_TARGET,
    HeldServer,
    ServerSpec,
    StartDaemon,
    render_config,
)
from tests.daemon.load import KeepAliveLoad
from tests.servers import H11Client

ACTIVE_CLIENTS = 20
SLOW_REQUESTS = 10
GRACE_S = 5.0


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "2-workers"])
async def test_sigterm_with_active_clients_and_slow_requests_loses_nothing(
    held_server: HeldServer, start_daemon: StartDaemon, write_config, workers: int
) -> None:
    config = write_config(
        render_config([ServerSpec("s1", held_server.addr)], grace_s=GRACE_S, access_log=False)
    )
    daemon = await start_daemon("run", "--workers", str(workers), "-c", str(config))
    addr = await daemon.listener_addr()
    if workers > 1:
        await daemon.wait_text(f"workers_started workers={workers}")
    slow_clients = [await H11Client.connect(addr, timeout_s=GRACE_S * 2) for _ in range(10)]
    try:
        load = KeepAliveLoad(addr, ACTIVE_CLIENTS, reconnect=False)
        async with load:
            await load.wait_requests(100)
            slow = [asyncio.create_task(c.request("GET", HELD_TARGET)) for c in slow_clients]
            async with asyncio.timeout(GRACE_S):
                await held_server.wait_until(
                    lambda: (
                        sum(r.target == HELD_TARGET for r in held_server.requests) >= SLOW_REQUESTS
                    )
                )
            loop = asyncio.get_running_loop()
            stopped_at = loop.time()
            daemon.send_signal(signal.SIGTERM)
            # Every process serving has begun its drain (a worker each, or the one process).
            await daemon.wait_line(lambda _: daemon.output.count("shutdown_started") >= workers)
            held_server.release.set()
            answers = await asyncio.gather(*slow)
            assert await daemon.wait_exit(timeout_s=GRACE_S + 5) == 0
            elapsed_s = loop.time() - stopped_at
            record = await load.stop()
    finally:
        for client in slow_clients:
            await client.aclose()

    assert [(a.status, a.body, a.header("connection")) for a in answers] == [
        (200, b"done\n", "close")
    ] * SLOW_REQUESTS
    assert record.failed == []
    assert (record.closed, record.announced) == (ACTIVE_CLIENTS, ACTIVE_CLIENTS)
    assert elapsed_s < GRACE_S
    print(f"stop: {record.requests} requests, 0 lost, exit after {elapsed_s:.2f} s")
