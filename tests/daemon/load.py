"""Bounded keep-alive load for zero-downtime proofs: clients that pause 0-200 ms between
requests and record every request, every failure and every connection they had to reopen.

A client reuses its connection while zdlb keeps it open; any close (announced with
``Connection: close`` or not) counts in ``closed``, any request without a 200 answer in
``failed``. Each client stops at ``stop`` or after ``max_requests``; every read has a timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from dataclasses import dataclass, field

import h11

from tests.servers import H11Client

PAUSE_MAX_S = 0.2  # the clients: idle 0-200 ms between requests
MAX_REQUESTS = 5_000  # per client: the bound if a test forgets to stop them
READ_TIMEOUT_S = 5.0


@dataclass
class LoadRecord:
    requests: int = 0
    failed: list[str] = field(default_factory=list)
    closed: int = 0  # connections zdlb closed under a client, announced or not
    announced: int = 0  # of those, closed after an answer saying `Connection: close`
    by_server: collections.Counter[str] = field(default_factory=collections.Counter)


class KeepAliveLoad:
    """``clients`` keep-alive clients against ``addr``; ``async with`` runs them, ``stop()``
    ends them (each finishes its current request first)."""

    def __init__(
        self, addr: tuple[str, int], clients: int, *, seed: int = 11, reconnect: bool = True
    ) -> None:
        self.addr = addr
        self.reconnect = reconnect  # False: a client ends when zdlb closes its connection
        self.record = LoadRecord()
        self._count = clients
        self._rng = random.Random(seed)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> KeepAliveLoad:
        for index in range(self._count):
            self._tasks.append(asyncio.create_task(self._client(index)))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> LoadRecord:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.record

    async def wait_requests(self, count: int, timeout_s: float = 10.0) -> None:
        """Until ``count`` more requests were answered (polled: the clients have no events)."""
        target = self.record.requests + count
        async with asyncio.timeout(timeout_s):
            while self.record.requests < target:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def _client(self, index: int) -> None:
        record = self.record
        client: H11Client | None = None
        sent = 0
        try:
            while not self._stop.is_set() and sent < MAX_REQUESTS:
                if client is None:
                    client = await H11Client.connect(self.addr, timeout_s=READ_TIMEOUT_S)
                sent += 1
                try:
                    response = await client.request("GET", f"/c{index}/{sent}")
                except (h11.RemoteProtocolError, ConnectionError, TimeoutError) as exc:
                    record.failed.append(f"client {index} request {sent}: {exc!r}")
                    record.closed += 1
                    await client.aclose()
                    client = None
                    if not self.reconnect:
                        return
                    continue
                record.requests += 1
                record.by_server[response.header("x-echo-server") or "?"] += 1
                if response.status != 200:
                    record.failed.append(f"client {index} request {sent}: {response.status}")
                if not client.is_reusable or response.header("connection") == "close":
                    record.closed += 1
                    record.announced += 1
                    await client.aclose()
                    client = None
                    if not self.reconnect:
                        return
                await asyncio.sleep(self._rng.uniform(0.0, PAUSE_MAX_S))
        finally:
            if client is not None:
                with contextlib.suppress(ConnectionError):
                    await client.aclose()
