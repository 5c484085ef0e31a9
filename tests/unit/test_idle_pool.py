"""The idle pool of one server never holds more than ``max_idle`` connections, whatever the
order of acquire, release, discard and expiry (upstream.py keeps the room left as a count)."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from zdlb.balancer.server import Server
from zdlb.config.model import Address, ServerConfig
from zdlb.http.upstream import ServerConnections, UpstreamConnection


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _Owner:
    def response_head(self, head: object) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_end(self, trailers: object, keep_alive: bool) -> None: ...
    def response_complete(self, head: object, body: bytes) -> None: ...


def make_pool(max_idle: int) -> ServerConnections:
    server = Server(ServerConfig("s1", Address("127.0.0.1", 1), max_idle=max_idle), "app")
    return ServerConnections(server, connect_s=1.0, idle_s=10.0)


def new_connection(pool: ServerConnections) -> UpstreamConnection:
    conn = UpstreamConnection(pool)
    conn.connection_made(_Transport())
    return conn


@given(
    max_idle=st.integers(0, 4),
    steps=st.lists(st.sampled_from(["new", "acquire", "discard", "expire", "close_idle"])),
)
def test_the_pool_never_holds_more_than_max_idle(max_idle: int, steps: list[str]) -> None:
    pool = make_pool(max_idle)
    busy: list[UpstreamConnection] = []
    released: list[UpstreamConnection] = []
    now = 0.0
    for step in steps:
        now += 1.0
        if step == "new":
            busy.append(new_connection(pool))
        elif step == "acquire":
            conn = pool.acquire(_Owner(), is_head=False)  # type: ignore[arg-type]
            if conn is not None:
                busy.append(conn)
        elif step == "discard" and released:
            pool.discard(released.pop())  # idle, or taken again meanwhile (then a no-op)
        elif step == "expire":
            pool.close_expired(now - 5.0)
        elif step == "close_idle":
            pool.close_idle()
        while busy:  # every answer ended: back to the pool, or closed when it is full
            conn = busy.pop()
            pool.release(conn, now)
            released.append(conn)
        assert pool.idle_count <= max_idle
    # Room left and connections held always add up to max_idle.
    for _ in range(max_idle + 1):
        pool.release(new_connection(pool), now)
    assert pool.idle_count == max_idle
