"""Connections to servers: one protocol object per TCP connection, a LIFO idle pool per server.
A backend with ``tls = true`` opens them through the loop's TLS (tls/context.py).

A pooled connection is reused for the requests that the backend's ``reuse`` policy allows
(exchange.py, rule 3): a new upstream connection costs ~70 us of CPU here (PERFORMANCE.md)
against ~2 us for a pop. LIFO keeps the hottest connection in use and lets the coldest reach
``upstream_idle_s`` and be closed by us, before the server's own keep-alive timeout closes it
under a request. A server that sends bytes on an idle connection (a stray second answer) gets
that connection closed at once and the stray counted against it, so it never reaches the next
request. The pool decides synchronously; closing happens after (httpcore's pattern).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from zdlb.balancer.server import Server
from zdlb.errors import UpstreamConnectError, UpstreamProtocolError
from zdlb.http.stream import ResponseReader, ResponseSink
from zdlb.stats import ServerStats
from zdlb.tls.context import originate

if TYPE_CHECKING:
    from zdlb.http.head import Headers, ResponseHead

log = logging.getLogger(__name__)

# A down server behind a busy listener fails every request routed to it, thousands a second:
# its failures are logged as one line per this interval, with their count.
FAILURE_LOG_INTERVAL_S = 5.0


class UpstreamOwner(ResponseSink, Protocol):
    """What an upstream connection reports to the client connection it currently serves."""

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None: ...
    def upstream_flushed(self) -> None: ...
    def pause_upstream_writes(self) -> None: ...
    def resume_upstream_writes(self) -> None: ...


class _IdleSink:
    """Sink for a connection in the idle pool: a server talking out of turn is an error."""

    def response_head(self, head: ResponseHead) -> None:
        raise UpstreamProtocolError("bytes after the end of a response")

    def response_body(self, data: bytes) -> None:
        raise UpstreamProtocolError("bytes after the end of a response")

    def response_end(self, trailers: Headers, keep_alive: bool) -> None:
        raise UpstreamProtocolError("bytes after the end of a response")

    def response_complete(self, head: ResponseHead, body: bytes) -> None:
        raise UpstreamProtocolError("bytes after the end of a response")


_IDLE_SINK = _IdleSink()


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive TCP connection to a server; serves one request at a time."""

    __slots__ = (
        "got_data",
        "idle_deadline",
        "is_closed",
        "owner",
        "pool",
        "reader",
        "reused",
        "transport",
    )

    def __init__(self, pool: ServerConnections) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.owner: UpstreamOwner | None = None
        self.reader = ResponseReader(_IDLE_SINK)
        self.reused = False  # served a request before: the server may have closed it meanwhile
        self.got_data = False  # any byte of the current response arrived
        self.is_closed = False
        self.idle_deadline = 0.0

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else ("busy" if self.owner else "idle")
        return f"<UpstreamConnection {self.pool.server.name} {state} reused={self.reused}>"

    def attach(self, owner: UpstreamOwner, is_head: bool, is_upgrade: bool = False) -> None:
        """Dedicate this connection to ``owner``'s next request."""
        self.owner = owner
        self.got_data = False
        self.reader.sink = owner
        self.reader.expect_response(is_head, is_upgrade)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.is_closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.is_closed:
            self.transport.abort()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.pool.server.connection_opened()

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:  # bytes on an idle pooled connection: a stray answer
            pool = self.pool
            pool.stats.stray_responses += 1
            pool.discard(self)
            self.abort()
            if count := pool.failures_to_log(time.monotonic()):
                log.warning("upstream_stray_bytes server=%s failures=%d", pool.server.name, count)
            return
        self.got_data = True
        try:
            self.reader.feed(data)
        except UpstreamProtocolError as exc:
            self.abort()
            if self.owner is owner:
                self.owner = None
                owner.upstream_lost(self, exc)
            else:  # garbage after a complete response: the connection was already released
                self.pool.discard(self)
                return
        if self.owner is owner:  # an answer ended with this read flushed itself already
            owner.upstream_flushed()

    def eof_received(self) -> bool:
        return False  # close our side too; a close-delimited body ends in connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        self.pool.server.connection_closed()
        owner = self.owner
        self.owner = None
        if owner is None:
            self.pool.discard(self)
        else:
            owner.upstream_lost(self, exc)
        self.reader.sink = _IDLE_SINK  # break the cycles, as ClientConnection.connection_lost
        self.transport = None

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.pause_upstream_writes()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.resume_upstream_writes()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.is_closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.is_closed:
            self.transport.resume_reading()


class ServerConnections:
    """The idle keep-alive connections to one server, most recently used last."""

    __slots__ = (
        "_failure_logged_at",
        "_failures",
        "_idle",
        "_idle_s",
        "_max_idle",
        "_room",
        "connect_s",
        "host_header",
        "server",
        "stats",
        "tls",
    )

    def __init__(
        self,
        server: Server,
        connect_s: float,
        idle_s: float,
        stats: ServerStats | None = None,
    ) -> None:
        self.server = server
        self.stats = stats if stats is not None else ServerStats()  # metrics: plain counters
        # Host for an HTTP/1.0 request that had none (HTTP/1.1 to the server requires one).
        self.host_header = str(server.address).encode()
        self.connect_s = connect_s  # enforced by whoever awaits connect()
        self._idle_s = idle_s
        self._max_idle = server.config.max_idle
        self._idle: list[UpstreamConnection] = []
        # max_idle - len(_idle), kept: release() tests it for every pooled request, and a
        # len() there was one of a keep-alive request's ~30 Python calls.
        self._room = self._max_idle
        self._failures = 0  # failures since the last one logged
        self._failure_logged_at = -math.inf
        # The backend's TLS to this server (its context shared by the backend), or None.
        self.tls = originate(server.config.tls, server.address.host)

    def __repr__(self) -> str:
        return f"<ServerConnections {self.server.name} idle={len(self._idle)}>"

    def failures_to_log(self, now: float) -> int:
        """Count one failure of this server; return how many to report in a log line now, or 0
        to stay quiet (at most one line per FAILURE_LOG_INTERVAL_S)."""
        self._failures += 1
        if now - self._failure_logged_at < FAILURE_LOG_INTERVAL_S:
            return 0
        count, self._failures = self._failures, 0
        self._failure_logged_at = now
        return count

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def acquire(self, owner: UpstreamOwner, is_head: bool) -> UpstreamConnection | None:
        """The most recently used idle connection, attached to ``owner`` for a request that is
        not an upgrade (as ``UpstreamConnection.attach`` does), or None if a new one is needed."""
        idle = self._idle
        while idle:
            conn = idle[-1]
            del idle[-1]  # list.pop() without its call: this runs for every pooled request
            self._room += 1
            if not conn.is_closed:
                conn.owner = owner  # attach(), inlined for the same reason
                conn.got_data = False
                reader = conn.reader
                reader.sink = owner
                reader.expect_response(is_head)
                return conn
        return None

    def release(self, conn: UpstreamConnection, now: float) -> None:
        """Return a connection whose response ended cleanly and that may be kept alive."""
        conn.owner = None
        conn.reader.sink = _IDLE_SINK
        if conn.is_closed:
            return
        if self._room <= 0:
            conn.close()
            return
        conn.reused = True
        conn.idle_deadline = now + self._idle_s
        self._idle.append(conn)
        self._room -= 1

    def discard(self, conn: UpstreamConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            return
        self._room += 1

    def close_expired(self, now: float) -> int:
        """Close idle connections past their deadline (oldest first); returns how many."""
        idle = self._idle
        count = 0
        while idle and idle[0].idle_deadline <= now:
            idle.pop(0).close()
            count += 1
        self._room += count
        return count

    def close_idle(self) -> None:
        idle, self._idle = self._idle, []
        self._room = self._max_idle
        for conn in idle:
            conn.close()

    async def connect(self, loop: asyncio.AbstractEventLoop) -> UpstreamConnection:
        """Open a new connection. Raises UpstreamConnectError.

        No deadline here: the caller enforces ``connect_s`` (the client connection's sweep,
        http/connection.py), because an ``asyncio.timeout`` per connect measured ~12 us of CPU
        (a timer handle armed and cancelled), and every first request of a client connection
        connects under ``reuse = "safe"``.
        """
        factory: Callable[[], UpstreamConnection] = lambda: UpstreamConnection(self)  # noqa: E731
        address = self.server.address
        tls = self.tls
        try:
            if tls is None:
                _, conn = await loop.create_connection(factory, address.host, address.port)
            else:  # ssl.SSLError (a certificate not verified...) is an OSError too
                _, conn = await loop.create_connection(
                    factory,
                    address.host,
                    address.port,
                    ssl=tls.context,
                    server_hostname=tls.server_hostname,
                    ssl_handshake_timeout=self.connect_s,
                )
        except OSError as exc:
            raise UpstreamConnectError(f"connect to {address} failed: {exc}") from exc
        return conn
