"""An upgrade's keep-alive client connections, handed to the new process each at a moment it is
idle (daemon/upgrade.py): detached from the old process, carried as descriptors, adopted there.

Rules:

1. A connection is detached only between requests with nothing buffered either way
   (``ClientConnection.detach_idle``), and every idle one is detached in one synchronous pass,
   so no request can start in between; its descriptor here closes without a FIN.
2. The process handing over stops accepting first (the new one accepts on the same queues),
   then looks again every ``HANDOVER_POLL_S`` for connections whose exchange ended, for at most
   ``HANDOVER_S``; one still busy then is told ``Connection: close`` by the drain that follows.
3. With workers the path is old worker -> old master -> new master -> new worker: each hop is a
   channel that already exists (the fd channel of each master-worker pair, fdchannel.py, and
   the upgrade's socketpair between the masters), the masters know which workers serve, and a
   hop costs a ``sendmsg``: tens of microseconds per batch of up to ``FDS_PER_MESSAGE``. A
   direct old worker -> new worker path would need a rendezvous of its own (a socket per new
   worker, made known to the old ones through the masters anyway) for a one-off move.
4. Every socket sent is closed here once sent (the receiver has its own descriptor); a batch
   that cannot be sent is closed, which the client sees as a close, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence

from zdlb.daemon.fdchannel import FdChannel, names_of
from zdlb.daemon.runtime import Runtime, SendConnections
from zdlb.http.route import Route

log = logging.getLogger(__name__)

# Busy keep-alive connections are handed over when their exchange ends: looked for this often,
# for at most this long (most exchanges end in milliseconds; a longer one is drained here).
HANDOVER_POLL_S = 0.005
HANDOVER_S = 1.0
# Client connections per message: the kernel passes at most 253 descriptors in one (SCM_MAX_FD).
FDS_PER_MESSAGE = 200

# (listener name, the connection's socket), as detached or received.
Batch = list[tuple[str, socket.socket]]
Send = SendConnections


def detach_idle(runtime: Runtime) -> Batch:
    """Rule 1: every HTTP connection idle now, detached, with its listener's name."""
    return [
        (route.listener.name, sock)
        for route in runtime.all_routes
        if isinstance(route, Route)
        for conn in list(route.connections)
        if (sock := conn.detach_idle()) is not None
    ]


async def hand_over_idle(runtime: Runtime, send: Send) -> int:
    """Rules 2 and 4: stop accepting, then send the idle connections as they become idle.
    Returns how many were handed over. Raises OSError if ``send`` does (the rest drain here)."""
    for server in runtime.http_servers.values():
        server.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANDOVER_S
    count = 0
    while True:
        batch = detach_idle(runtime)
        try:
            for start in range(0, len(batch), FDS_PER_MESSAGE):
                await send(batch[start : start + FDS_PER_MESSAGE])
        finally:
            close_all(batch)
        count += len(batch)
        busy = sum(len(r.connections) for r in runtime.all_routes if isinstance(r, Route))
        if not busy or loop.time() >= deadline:
            return count
        await asyncio.sleep(HANDOVER_POLL_S)


def close_all(batch: Batch) -> None:
    for _, sock in batch:
        sock.close()


async def send_conns(channel: FdChannel, batch: Batch) -> None:
    """A batch over an fd channel, ``FDS_PER_MESSAGE`` at a time (the caller closes it)."""
    for start in range(0, len(batch), FDS_PER_MESSAGE):
        part = batch[start : start + FDS_PER_MESSAGE]
        names = [name for name, _ in part]
        await channel.send({"t": "conns", "names": names}, [sock for _, sock in part])


async def collect_from_worker(channel: FdChannel, send: Send) -> int:
    """An old master: pass on what one old worker hands over until it says ``done``.
    Raises OSError/ConnectionError (the worker is gone) or ValueError (a bug)."""
    count = 0
    while True:
        payload, socks = await channel.receive()
        if payload["t"] == "done":
            close_all([("", sock) for sock in socks])
            return count
        try:
            batch = list(zip(names_of(payload, len(socks)), socks, strict=True))
        except ValueError:
            close_all([("", sock) for sock in socks])
            raise
        try:
            await send(batch)
        finally:
            close_all(batch)
        count += len(batch)


async def deal(batch: Batch, channels: Sequence[FdChannel], offset: int) -> None:
    """A new master: share ``batch`` out over its serving workers' channels, round robin by
    connection from ``offset`` (the number dealt so far), so they end up even."""
    if not channels:
        log.error("upgrade_connections_dropped count=%d reason=no worker serves", len(batch))
        return
    shares: list[Batch] = [[] for _ in channels]
    for number, item in enumerate(batch, start=offset):
        shares[number % len(channels)].append(item)
    for channel, share in zip(channels, shares, strict=True):
        if share:
            await send_conns(channel, share)
