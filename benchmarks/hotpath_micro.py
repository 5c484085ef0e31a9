"""Python cost of one keep-alive request through zdlb's hot path, without the kernel.

A ClientConnection and a pooled UpstreamConnection are wired to transports that only count
writes, and fed a ``wrk``-like request and an nginx-like response, so what is timed is zdlb's
own Python per request (parsing, rewriting, balancing, bookkeeping) on the uvloop loop clock.
Prints the best and the median of 5 batches, without and with the sticky cookie (inserted, as
for wrk, whose requests carry none: the benchmark's setup). Run:
``python -m benchmarks.hotpath_micro``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

from zdlb.balancer.pool import Backend
from zdlb.config.load import parse_config
from zdlb.http.connection import ClientConnection
from zdlb.http.route import BackendLink, Route
from zdlb.http.upstream import ServerConnections, UpstreamConnection

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 15:45:10 GMT\r\n"
    b"Content-Type: text/html\r\nContent-Length: 97\r\nConnection: keep-alive\r\n\r\n" + b"x" * 97
)
BATCHES = 5
REQUESTS_PER_BATCH = 20_000


class CountingTransport(asyncio.Transport):
    """Takes writes and drops them: the kernel's share is not what is measured here."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def build(sticky: bool) -> tuple[asyncio.AbstractEventLoop, Callable[[], None]]:
    """A client connection with a pooled upstream connection per server, and a function that
    runs one keep-alive request and its answer through them (benchmarks/opcodes.py uses it
    too)."""
    data: dict[str, object] = {
        "logging": {"access_log": False},
        "listeners": {"web": {"bind": "127.0.0.1:0", "backend": "app"}},
        "backends": {
            "app": {
                # Every request on the pooled connections (the first included): what is timed
                # is the keep-alive path, not a connect.
                "reuse": "always",
                "servers": [
                    {"name": "s1", "address": "127.0.0.1:1"},
                    {"name": "s2", "address": "127.0.0.1:2"},
                ],
            }
        },
    }
    if sticky:
        data["backends"]["app"]["sticky"] = {"cookie": "SRV", "nocache": True}  # type: ignore[index]
    config = parse_config(data, "hotpath_micro", Path("."))
    loop = uvloop.new_event_loop()
    backend = Backend(config.backends[0])
    upstreams = {s.name: ServerConnections(s, 1.0, 3600.0) for s in backend.servers}
    route = Route(config.listeners[0], [BackendLink(backend, upstreams)], log_access=False)
    for pool in upstreams.values():
        upstream = UpstreamConnection(pool)
        upstream.connection_made(CountingTransport())
        pool.release(upstream, 0.0)
    client = ClientConnection(route, loop)
    client.connection_made(CountingTransport())

    def one_request() -> None:
        client.data_received(REQUEST)
        exchange = client.exchange
        assert exchange is not None and exchange.upstream is not None
        exchange.upstream.data_received(RESPONSE)

    return loop, one_request


def measure(sticky: bool) -> list[float]:
    """Seconds per request (in us) of ``BATCHES`` batches through one client connection."""
    loop, one_request = build(sticky)
    for _ in range(1000):  # warm up caches and the round-robin schedule
        one_request()
    batches = []
    for _ in range(BATCHES):
        start = time.perf_counter()
        for _ in range(REQUESTS_PER_BATCH):
            one_request()
        batches.append((time.perf_counter() - start) / REQUESTS_PER_BATCH * 1e6)
    loop.close()
    return batches


def main() -> None:
    for sticky in (False, True):
        batches = measure(sticky)
        label = "sticky cookie" if sticky else "no cookie    "
        print(
            f"{label} us per request: best {min(batches):.2f},"
            f" median {statistics.median(batches):.2f}"
        )


if __name__ == "__main__":
    main()
