"""When a client connection splices a body, and how it goes on afterwards.

splice.py's ``BodyDetour`` moves the bytes; this module decides when to start one and applies
its outcome, for a client connection (``Splicing``) it takes explicitly. The rules:

1. A response body is spliced when at least ``splice_min_bytes`` of it are left once its head
   and the request are handled (most of a body that came with its head goes the plain way).
   Both transports stop reading; the client's write buffer empties first.
2. A request body is spliced when its Content-Length is at least ``splice_min_bytes`` and as
   much is still unread once the head reached the server. The client's reading stays paused;
   the server's goes on, so an early answer still ends the exchange. The request can no longer
   be replayed: its body is not held.
3. A body moved whole ends its message as if the reader had seen it; the transports resume.
4. No descriptor to splice with, before any byte moved: the plain path takes the body.
   A response source that failed, or a cut: the answer is cut, both sides are reset. A client
   that stopped short: 400 and a close. A server that failed: the plain path meets the failure
   the usual way (``upstream_lost``, 502).
5. Spliced bytes are counted as the reader would have counted them, once the splice ends.

``Detour`` is what the connection keeps of a body splice or a ``ProtocolSwitch`` (upgrade.py)
while either holds its sockets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from zdlb.errors import DownstreamProtocolError
from zdlb.http.answers import Answering, reject
from zdlb.http.exchange import PAUSED_DETOUR
from zdlb.http.splice import BodyDetour
from zdlb.tcp.pipes import PipePool

if TYPE_CHECKING:
    import asyncio

    from zdlb.http.exchange import Exchange
    from zdlb.http.route import Destination
    from zdlb.http.upstream import UpstreamConnection


class Detour(Protocol):
    """What the connection needs of a ``BodyDetour`` or a ``ProtocolSwitch``: ``poll()`` when
    a write buffer may have emptied, ``stop()`` (the bytes moved), ``take_activity()``."""

    def poll(self) -> None: ...
    def stop(self) -> int: ...
    def take_activity(self) -> bool: ...


class Splicing(Answering, Protocol):
    """What splicing needs of a client connection, beyond answering."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport | None
    dest: Destination
    detour: Detour | None

    def pause(self, reason: int) -> None: ...
    def resume(self, reason: int) -> None: ...
    def abort(self) -> None: ...


def splice_response(conn: Splicing, exchange: Exchange) -> None:
    """Splice the rest of a long response body, if enough is left (rule 1)."""
    exchange.splice_response = False
    upstream, transport = exchange.upstream, conn.transport
    route = conn.route
    if (
        upstream is None
        or upstream.transport is None
        or transport is None
        or upstream.reader.remaining_body < route.splice_min_bytes
    ):
        return
    upstream.pause_reading()
    conn.pause(PAUSED_DETOUR)
    pool = route.tunnel_pool
    assert isinstance(pool, PipePool)  # splice_min_bytes is infinite otherwise
    size = upstream.reader.take_body()
    ending = _ResponseEnd(conn, exchange)
    detour = BodyDetour(conn.loop, pool, upstream.transport, transport, size, ending.moved)
    conn.detour = detour
    detour.poll()


def splice_request(conn: Splicing, exchange: Exchange, upstream: UpstreamConnection) -> None:
    """Splice the rest of a long request body to the server, if enough is left (rule 2)."""
    transport = conn.transport
    if transport is None or upstream.transport is None:
        return
    exchange.splice_request = False
    size = conn.reader.remaining_body
    route = conn.route
    if size < route.splice_min_bytes:
        conn.resume(PAUSED_DETOUR)  # most of it came with the head
        return
    pool = route.tunnel_pool
    assert isinstance(pool, PipePool)
    exchange.replay = None
    ending = _RequestEnd(conn)
    detour = BodyDetour(conn.loop, pool, transport, upstream.transport, size, ending.moved)
    conn.detour = detour
    detour.poll()


def count_request_splice(conn: Splicing, exchange: Exchange, moved: int) -> None:
    """Count ``moved`` request bytes that went by splice (rule 5)."""
    conn.route.stats.bytes_in += moved
    if exchange.server is not None:
        conn.dest.upstreams[exchange.server.name].stats.bytes_in += moved


class _ResponseEnd:
    """The outcome of one response body's splice, applied to its connection."""

    __slots__ = ("conn", "exchange")

    def __init__(self, conn: Splicing, exchange: Exchange) -> None:
        self.conn = conn
        self.exchange = exchange

    def moved(self, ok: bool, moved: int, source_failed: bool) -> None:
        """Called once by the ``BodyDetour`` (rules 3-5)."""
        conn, exchange = self.conn, self.exchange
        conn.detour = None
        exchange.bytes_out += moved
        conn.route.stats.bytes_out += moved
        upstream = exchange.upstream
        if not ok and not moved and not source_failed and upstream is not None:
            upstream.resume_reading()  # no descriptor to splice with: the reader takes it
            conn.resume(PAUSED_DETOUR)
            return
        if not ok or upstream is None:
            conn.drop_upstream(exchange)
            exchange.keep_alive = False  # the answer is cut: a close says so
            conn.finish_exchange(exchange)
            conn.abort()
            return
        upstream.resume_reading()
        conn.resume(PAUSED_DETOUR)
        upstream.reader.body_moved(moved)  # response_end: pool the upstream, finish
        conn.flush_client()


class _RequestEnd:
    """The outcome of one request body's splice, applied to its connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: Splicing) -> None:
        self.conn = conn

    def moved(self, ok: bool, moved: int, source_failed: bool) -> None:
        """Called once by the ``BodyDetour`` (rules 3-5)."""
        conn = self.conn
        conn.detour = None
        exchange = conn.exchange
        if exchange is None:  # answered and ended before the body was all spliced
            return
        count_request_splice(conn, exchange, moved)
        if not ok and source_failed:
            reject(conn, DownstreamProtocolError("request body cut short", 400))
            return
        conn.resume(PAUSED_DETOUR)
        if moved:
            conn.reader.body_moved(moved)  # at the body's end: request_end
