"""The real daemon at its open-file limit: 1,500 clients against 1,024 descriptors.

Before the connection budget (zdlb/budget.py), zdlb accepted clients it then had no descriptor
left to serve: 90 of 300 requests on connections it had already accepted got 502, and 592
clients were closed without a word. Now it holds what the limit allows and leaves the rest in
the listen backlog until others leave: every client is served, none gets an error.
"""

from __future__ import annotations

import asyncio
import resource
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon.conftest import ServerSpec, StartDaemon, render_config
from tests.servers import EchoServer

NOFILE = 1024
CLIENTS = 1500
REQUESTS_PER_CLIENT = 2
# Each client holds its connection this long between its requests (its think time): the load
# must keep far more connections open at once than the limit allows.
THINK_S = 0.3
CLIENT_DEADLINE_S = 90.0


def _limit_nofile() -> None:
    """In the daemon's child before exec: the open-file limit of a default Debian shell."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def _room_for_clients() -> None:
    """The test's own process holds 1,500 client sockets and the echo server's: raise its soft
    limit to the hard one, or skip where even that is too small."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = CLIENTS + NOFILE + 256
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} needed by the test itself")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def one_client(addr: tuple[str, int], index: int) -> str:
    """Two requests on one connection with a pause between; "ok", or what went wrong."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(CLIENT_DEADLINE_S):
            reader, writer = await asyncio.open_connection(*addr)
            for n in range(REQUESTS_PER_CLIENT):
                writer.write(b"GET /c%d/%d HTTP/1.1\r\nHost: fd.test\r\n\r\n" % (index, n))
                head = await reader.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1]
                if status != b"200":
                    return f"status {status.decode()}"
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                if n + 1 < REQUESTS_PER_CLIENT:
                    await asyncio.sleep(THINK_S)  # the client's think time, part of the load
        return "ok"
    except (OSError, asyncio.IncompleteReadError, TimeoutError, StopIteration) as exc:
        return type(exc).__name__
    finally:
        if writer is not None:
            writer.close()


async def test_at_the_open_file_limit_every_client_is_served_and_none_gets_an_error(
    start_daemon: StartDaemon, write_config: Callable[[str], Path], echo_server: EchoServer
):
    _room_for_clients()
    config = render_config(
        [ServerSpec("s1", echo_server.addr)],
        access_log=False,
        listener_extra="backlog = 2048",
    )
    daemon = await start_daemon("run", "-c", str(write_config(config)), preexec_fn=_limit_nofile)
    addr = await daemon.listener_addr()
    results = await asyncio.gather(*(one_client(addr, i) for i in range(CLIENTS)))
    assert Counter(results) == {"ok": CLIENTS}
    await daemon.wait_text("maxconn_reached")  # the budget was spent, and accepting paused
    assert "accept_paused" not in daemon.output  # never out of descriptors
    assert "upstream_connect_failed" not in daemon.output
    assert len(echo_server.requests) == CLIENTS * REQUESTS_PER_CLIENT
