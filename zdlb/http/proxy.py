"""The HTTP/1.1 hot path: one protocol object per client connection, glue and nothing else.

Bytes from the client go through ``RequestReader`` (head.py), are rewritten by rewrite.py and
written to a pooled ``UpstreamConnection``; the response comes back the same way. Decisions
live in the pure modules; this module moves bytes, keeps deadlines and accounts.

Why protocols and callbacks, not streams and a coroutine per request: through a proxy every
request already costs ~15 us of kernel time on loopback, and a Task plus coroutine per upstream
connect measured ~42 us on its own (PERFORMANCE.md). Writes are coalesced: each readiness
event produces at most one ``transport.write`` per direction.

``ClientConnection`` is one class built from three modules: this one holds the exchange
(request in, server chosen and connected, answer out, flow control, deadlines); its mixins
hold two detours of it, each entered from here and handing the exchange back to it. A ``101``
turns the exchange into a tunnel (tunnel.py's ``ProtocolSwitch``); any other answer to an
upgrade request ends the exchange normally, and the connection stays keep-alive unless the
client sent bytes after its upgrade request (they are never parsed as HTTP: they may be the new
protocol's). A body with at least ``splice_min_bytes`` of Content-Length left after the first
read is moved by splice (splice.py's ``BodySplicing``), then the connection goes on as HTTP.

Deadlines are not timer handles: each connection keeps one ``deadline`` that ``Route.sweep``
(route.py) enforces, so re-arming one here is a float store.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from typing import TYPE_CHECKING, cast

from zdlb.errors import (
    DownstreamProtocolError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
)
from zdlb.http import rewrite
from zdlb.http.head import IDEMPOTENT_METHODS, Framing, Headers, RequestHead, ResponseHead
from zdlb.http.phase import (
    PAUSED_BACKLOG,
    PAUSED_CONNECTING,
    PAUSED_REQUEST_SPLICE,
    PAUSED_SPLICE,
    PAUSED_UPGRADE,
    PAUSED_UPSTREAM_FULL,
    Phase,
)
from zdlb.http.splice import BodySplicing
from zdlb.http.stream import RequestReader
from zdlb.http.tunnel import ProtocolSwitch
from zdlb.http.upstream import ServerConnections, UpstreamConnection

if TYPE_CHECKING:
    from zdlb.balancer.server import Server
    from zdlb.balancer.sticky import StickyCookie
    from zdlb.http.route import Route
    from zdlb.http.splice import BodySplice
    from zdlb.tcp.pump import Pump

log = logging.getLogger(__name__)
access_log = logging.getLogger("zdlb.access")

# Request bytes held while the upstream connection is being opened, before the client is
# paused: a whole typical request fits, a large upload waits for the connect.
MAX_PENDING_BYTES = 65536
# A request is replayed on a fresh connection only if all its bytes are still held.
MAX_REPLAY_BYTES = 65536
# Pipelined requests queued behind the one in flight before the client is paused: RFC 9112
# section 9.3.2 allows pipelining; bounding it keeps memory per connection bounded.
MAX_BACKLOG_EVENTS = 64


class ClientConnection(ProtocolSwitch, BodySplicing, asyncio.Protocol):
    """One client (downstream) connection: reads requests, forwards them, relays answers.

    A long class on purpose: it is the connection task of STYLE.md, and every method is one
    event from one side. The request being forwarded is the *exchange*; its fields are reset by
    ``_reset_exchange``. The events of switching protocols and of splicing a body are those of
    its mixins (tunnel.py, splice.py), not of helper objects: each is one event of this state
    machine and touches many of its fields, which a helper would reach into anyway. Those fields
    are set here with the others; each mixin declares the ones it uses, for mypy.
    """

    # Slots, not a __dict__: the dict of ~40 fields was 1.5 KB of the ~3.7 KB of Python objects
    # an idle keep-alive connection holds (tracemalloc); the mixins declare empty slots.
    __slots__ = (
        "_backlog",
        "_bytes_out",
        "_chunked_down",
        "_chunked_up",
        "_client_done",
        "_close_after_write",
        "_connect_task",
        "_detached",
        "_identity",
        "_keep_alive_down",
        "_paused",
        "_replay",
        "_replay_bytes",
        "_request_done",
        "_response_started",
        "_retried_stale",
        "_set_cookie",
        "_splice_body",
        "_splicer",
        "_started_at",
        "_status",
        "_switching",
        "_tried",
        "_ubuf",
        "_ubuf_bytes",
        "_wbuf",
        "_writes_paused",
        "client_ip",
        "deadline",
        "head",
        "loop",
        "phase",
        "pump",
        "reader",
        "route",
        "server",
        "transport",
        "tunnel_deadline",
        "upstream",
    )

    def __init__(self, route: Route, loop: asyncio.AbstractEventLoop) -> None:
        self.route = route
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.client_ip = b"-"
        self.reader = RequestReader(self, route.listener.limits, route.head_parser)
        self.phase = Phase.IDLE
        self.deadline = 0.0
        self._paused = 0
        self._writes_paused = False
        # A list, not a deque: a deque allocates a 64-slot block (~600 bytes) for every idle
        # connection, and this queue holds at most MAX_BACKLOG_EVENTS, so pop(0) stays cheap.
        self._backlog: list[tuple[int, object]] = []
        self._client_done = False  # the client half-closed: no request follows
        self._wbuf: list[bytes] = []  # bytes for the client, written once per event
        self._close_after_write = False
        self._switching = False  # a 101 arrived: waiting for both write buffers to empty
        self._detached = False  # the transport was aborted and its socket given to a pump
        self.pump: Pump | None = None
        self.tunnel_deadline = math.inf
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.head: RequestHead | None = None
        self.server: Server | None = None
        self.upstream: UpstreamConnection | None = None
        self._ubuf: list[bytes] = []  # bytes for the server not yet written
        self._ubuf_bytes = 0
        self._replay: list[bytes] | None = None
        self._replay_bytes = 0
        self._tried: list[Server] = []
        self._connect_task: asyncio.Task[None] | None = None
        self._request_done = False
        self._chunked_up = False  # the request body is chunked: re-encode what is forwarded
        self._response_started = False
        self._chunked_down = False
        self._keep_alive_down = False
        self._status = 0
        self._bytes_out = 0
        self._started_at = 0.0
        self._retried_stale = False
        self._identity: str | None = None  # the host the client's sticky cookie named
        self._splice_body = False  # the body is long enough: splice what the read left
        self._splicer: BodySplice | None = None
        self._set_cookie = b""  # Set-Cookie lines for the answer: the client is (re-)pinned

    def __repr__(self) -> str:
        server = self.server.name if self.server else "-"
        return f"<ClientConnection {self.client_ip.decode()} {self.phase.value} server={server}>"

    # --- client side: asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
        route = self.route
        route.connections.add(self)
        route.stats.connections_open += 1
        route.stats.connections_total += 1
        self.deadline = self.loop.time() + route.timeouts.client_s

    def data_received(self, data: bytes) -> None:
        self.route.stats.bytes_in += len(data)
        phase = self.phase
        if phase is Phase.IDLE:
            self.phase = Phase.HEAD
            self.deadline = self.loop.time() + self.route.timeouts.http_request_s
        elif phase is Phase.EXCHANGE:
            self.deadline = self.loop.time() + self.route.server_s
        elif phase is Phase.CLOSING:
            return  # the answer that closes this connection is already decided
        try:
            self.reader.feed(data)
        except DownstreamProtocolError as exc:
            if self.head is not None and self._request_done:
                # A bad request pipelined behind one still being answered: that answer goes
                # out first, then the error, then the close (RFC 9112 section 9.3.2: in order).
                self._queue(3, exc)
                self._pause_reading(PAUSED_BACKLOG)
            else:
                self._reject(exc)
            return
        if self._ubuf:
            self._flush_upstream()
        if self._wbuf or self._close_after_write:
            self._flush_client()

    def eof_received(self) -> bool:
        # A client that half-closes after a complete request still gets its answer.
        if self.phase is Phase.EXCHANGE and self._request_done:
            self._client_done = True  # the answer is its last: Connection: close
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._detached:  # the transport let go of a socket the pump owns: not an end
            self.transport = None
            return
        if self._splicer is not None:
            self._splicer.stop()
            self._splicer = None
        self.route.forget(self)
        self.route.stats.connections_open -= 1
        self.phase = Phase.CLOSING
        if self._connect_task is not None:
            self._connect_task.cancel()
        upstream = self.upstream
        if upstream is not None:  # an answer was still coming: that connection is unusable
            self.upstream = None
            upstream.owner = None
            upstream.abort()
        self._end_server_request()
        # Break the reference cycles (transport <-> protocol, reader -> sink) so refcounting
        # frees this connection at once: left to the cyclic GC, closed connections cost 12% of
        # the CPU of a Connection: close workload and full collections stalled requests ~80 ms.
        self.transport = None
        self.reader.detach()

    def pause_writing(self) -> None:
        # The client reads slower than the server sends: stop reading the server.
        self._writes_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self._writes_paused = False
        if self._switching:
            self.loop.call_soon(self._try_switch)  # see _try_switch (tunnel.py)
            return
        if self._paused & PAUSED_SPLICE:
            self.loop.call_soon(self._try_splice)  # as _try_switch
            return
        if self.upstream is not None:
            self.upstream.resume_reading()

    # --- requests from the client: RequestSink ---------------------------------------------

    def request_head(self, head: RequestHead) -> None:
        if head.upgrade is not None:
            self._pause_reading(PAUSED_UPGRADE)  # until the answer says which protocol follows
        if self.head is not None or self._backlog:
            self._queue(0, head)
            return
        self._begin(head)

    def request_body(self, data: bytes) -> None:
        if self._backlog:
            self._queue(1, data)
            return
        self._forward_body(data)

    def request_end(self, trailers: Headers) -> None:
        if self._backlog:
            self._queue(2, trailers)
            return
        self._forward_end(trailers)

    def _forward_body(self, data: bytes) -> None:
        self._send_upstream(rewrite.encode_chunk(data) if self._chunked_up else data)

    def _forward_end(self, trailers: Headers) -> None:
        if self._chunked_up:
            self._send_upstream(rewrite.encode_last_chunk(trailers))
        self._request_done = True
        if self.upstream is not None:
            self._flush_upstream()  # before a pooled connection can be released

    def _queue(self, kind: int, item: object) -> None:
        self._backlog.append((kind, item))
        if len(self._backlog) >= MAX_BACKLOG_EVENTS:
            self._pause_reading(PAUSED_BACKLOG)

    def _drain_backlog(self) -> None:
        backlog = self._backlog
        while backlog and self.phase is not Phase.CLOSING:
            kind, item = backlog[0]
            if kind == 0 and self.head is not None:
                break  # the next request waits for the current answer
            del backlog[0]
            # The item types follow the kinds written by _queue.
            if kind == 0:
                self._begin(item)  # type: ignore[arg-type]
            elif kind == 1:
                self._forward_body(item)  # type: ignore[arg-type]
            elif kind == 2:
                self._forward_end(item)  # type: ignore[arg-type]
            else:
                self._reject(item)  # type: ignore[arg-type]
                return
        self._flush_upstream()
        if len(backlog) < MAX_BACKLOG_EVENTS:
            self._resume_reading(PAUSED_BACKLOG)

    # --- choosing a server and connecting ----------------------------------------------------

    def _begin(self, head: RequestHead) -> None:
        route = self.route
        self.head = head
        self.phase = Phase.EXCHANGE
        self.deadline = self.loop.time() + route.server_s
        self._started_at = time.monotonic()  # uvloop's loop.time() ticks in whole ms
        if route.sticky is None:
            server = route.backend.select(self.loop.time(), self.client_ip)
        else:
            server = self._select_sticky(head, route.sticky)
        if server is None:
            self._fail(503)
            return
        pool = route.upstreams[server.name]
        data = rewrite.build_request_head(head, self.client_ip, route.proto, pool.host_header)
        self._ubuf.append(data)
        self._ubuf_bytes = len(data)
        self._chunked_up = head.framing is Framing.CHUNKED
        if head.method in IDEMPOTENT_METHODS:
            self._replay = []
        if (
            head.framing is Framing.LENGTH
            and (head.content_length or 0) >= route.splice_min_bytes
            and not self._backlog  # no body bytes wait in it: the reader's are the next ones
        ):
            # Read no more of the body: once the head and what came with it reach the server,
            # the rest goes by splice (_try_splice_request).
            self._pause_reading(PAUSED_REQUEST_SPLICE)
        self._use_server(server, pool)

    def _select_sticky(self, head: RequestHead, sticky: StickyCookie) -> Server | None:
        """The client's pinned host if it can serve, else a balanced pick to pin it to."""
        identity, stripped = sticky.extract(head.raw)
        if stripped is not None:
            head.replace_raw(stripped)  # the server never sees zdlb's cookie
        backend = self.route.backend
        now = self.loop.time()
        server = backend.select_sticky(identity, now) if identity is not None else None
        if server is None:
            server = backend.select(now, self.client_ip)
            if identity is not None and server is not None:
                self.route.backend_stats.sticky_repins += 1
        self._identity = identity
        self._pin(server)
        return server

    def _pin(self, server: Server | None) -> None:
        """Answer with a cookie for ``server``'s host unless the client already carries it."""
        sticky = self.route.sticky
        if sticky is not None and server is not None and server.identity != self._identity:
            self._set_cookie = sticky.set_cookie(server.identity)
        else:
            self._set_cookie = b""

    def _use_server(self, server: Server, pool: ServerConnections) -> None:
        self.server = server
        server.inflight += 1  # Server.request_started(), inlined: once per request
        pool.stats.requests += 1
        head = self.head
        # An upgrade gets a fresh connection: it leaves the pool for good if the server
        # switches, and no request can then follow it on a connection another client shared.
        upstream = pool.acquire() if head is None or head.upgrade is None else None
        if upstream is not None:
            self._attach(upstream)
        else:
            self._connect(pool)

    def _connect(self, pool: ServerConnections) -> None:
        if self._ubuf_bytes > MAX_PENDING_BYTES:
            self._pause_reading(PAUSED_CONNECTING)
        self._connect_task = self.loop.create_task(self._open(pool))

    async def _open(self, pool: ServerConnections) -> None:
        try:
            upstream = await pool.connect(self.loop)
        except UpstreamError as exc:
            self._connect_task = None
            self._connect_failed(pool.server, exc)
            return
        self._connect_task = None
        if self.phase is Phase.CLOSING or self.server is not pool.server:
            pool.release(upstream, self.loop.time())  # the client left meanwhile: keep it warm
            return
        self._attach(upstream)
        self._flush_upstream()

    def _connect_failed(self, server: Server, exc: UpstreamError) -> None:
        self.route.upstreams[server.name].stats.connect_errors += 1
        if server.is_observed:
            self.route.observe(server, False)
        if count := self.route.upstreams[server.name].failures_to_log(self.loop.time()):
            log.warning(
                "upstream_connect_failed server=%s failures=%d error=%s", server.name, count, exc
            )
        self._retry_elsewhere(server, exc)

    def _retry_elsewhere(self, server: Server, exc: UpstreamError) -> None:
        """Send the request to another server, the failed one's pair first, or answer 502/504.

        The pair is the same host's other version: a sticky user stays on its host, and a
        main that crashed mid-deploy is replaced by the version meant to stand in for it.
        """
        self._end_server_request()
        self._tried.append(server)
        if len(self._tried) <= self.route.retries:
            retry = server.pair
            if retry is None or not retry.is_usable or retry in self._tried:
                retry = self.route.backend.select(self.loop.time(), self.client_ip, self._tried)
            if retry is not None:
                self.route.backend_stats.redispatches += 1
                head = self.head
                pool = self.route.upstreams[retry.name]
                if head is not None and not head.has_host:  # the stand-in Host names the server
                    route = self.route
                    self._ubuf[0] = rewrite.build_request_head(
                        head, self.client_ip, route.proto, pool.host_header
                    )
                self._pin(retry)
                self._use_server(retry, pool)
                self._flush_upstream()  # a pooled connection is attached at once: send now
                return
        self._fail(exc.status if exc.status != 504 else 502)

    def _attach(self, upstream: UpstreamConnection) -> None:
        head = self.head
        assert head is not None
        self.upstream = upstream
        upstream.attach(self, head.method == b"HEAD", head.upgrade is not None)
        if self._writes_paused:
            upstream.pause_reading()
        if self._paused & PAUSED_CONNECTING:
            self._resume_reading(PAUSED_CONNECTING)

    def _send_upstream(self, data: bytes) -> None:
        self._ubuf.append(data)
        self._ubuf_bytes += len(data)
        if self.upstream is None and self._ubuf_bytes > MAX_PENDING_BYTES:
            self._pause_reading(PAUSED_CONNECTING)

    def _flush_upstream(self) -> None:
        upstream = self.upstream
        if upstream is None or not self._ubuf:
            return
        data = b"".join(self._ubuf) if len(self._ubuf) > 1 else self._ubuf[0]
        self._ubuf.clear()
        self._ubuf_bytes = 0
        replay = self._replay
        if replay is not None:
            self._replay_bytes += len(data)
            if self._replay_bytes <= MAX_REPLAY_BYTES:
                replay.append(data)
            else:
                self._replay = None
        upstream.pool.stats.bytes_in += len(data)
        upstream.write(data)
        if self._paused & PAUSED_REQUEST_SPLICE:
            self._try_splice_request()

    # --- the server's answer: ResponseSink and UpstreamOwner ------------------------------

    def response_head(self, head: ResponseHead) -> None:
        request = self.head
        assert request is not None
        if head.status == 101:  # head.py lets it through only to an upgrade request
            self._switch_protocols(head)
            return
        if head.status < 200:  # 1xx
            if request.http_minor == 1:  # RFC 9110 section 15.2: never 1xx to HTTP/1.0
                self._wbuf.append(rewrite.build_response_head(head, Framing.NONE, True, 1))
            return
        framing = head.framing
        if framing is Framing.CHUNKED and request.http_minor == 0:
            framing = rewrite.downstream_framing(head, 0)
        keep_alive = (
            request.keep_alive
            and self._request_done
            and framing is not Framing.CLOSE
            and not self.route.is_stopping
            and not self._client_done
            and not (request.upgrade is not None and self.reader.held)
        )
        server = self.server
        if server is not None and server.is_observed:
            self.route.observe(server, head.status < 500)
        self._response_started = True
        self._keep_alive_down = keep_alive
        self._chunked_down = framing is Framing.CHUNKED
        # Only once the request is sent whole: the client's reading stops during the splice.
        self._splice_body = (
            framing is Framing.LENGTH
            and (head.content_length or 0) >= self.route.splice_min_bytes
            and self._request_done
        )
        self._status = head.status
        self._wbuf.append(
            rewrite.build_response_head(
                head, framing, keep_alive, request.http_minor, self._set_cookie
            )
        )

    def response_body(self, data: bytes) -> None:
        self._bytes_out += len(data)
        self._wbuf.append(rewrite.encode_chunk(data) if self._chunked_down else data)

    def response_end(self, trailers: Headers, keep_alive: bool) -> None:
        if self._chunked_down:
            self._wbuf.append(rewrite.encode_last_chunk(trailers))
        upstream = self.upstream
        server = self.server
        self.upstream = None
        if upstream is not None and server is not None:
            head = self.head
            if (
                keep_alive
                and self._request_done
                and not upstream.is_closed
                and (head is None or head.upgrade is None)  # see _use_server
            ):
                upstream.pool.release(upstream, self.loop.time())
            else:
                upstream.owner = None
                upstream.close()
        self._finish_exchange()

    def upstream_flushed(self) -> None:
        if self._switching:
            self._prepare_switch()
            return
        if self._splice_body:
            self._prepare_splice()
            return
        if self.phase is Phase.EXCHANGE:
            self.deadline = self.loop.time() + self.route.server_s
        self._flush_client()

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        if conn is not self.upstream:
            return
        if self._response_started:
            if not conn.reader.feed_eof():  # not a close-delimited body: the answer is cut
                self.upstream = None
                self._status = self._status or 502
                self._abort_exchange()
            self._flush_client()
            return
        self.upstream = None
        replay = self._replay
        server = self.server
        if not conn.got_data and replay is not None and not (conn.reused and self._retried_stale):
            # Nothing was answered, and the request is idempotent and held whole: replay it
            # (RFC 9110 section 9.2.2). On a pooled connection the server most likely closed
            # it idle as we reused it: once, a new connection to the same server. On a fresh
            # one the server took the request and died: another server, its pair first, as
            # many times as `retries` allows.
            self._retried_stale = self._retried_stale or conn.reused
            self._ubuf[:0] = replay
            self._ubuf_bytes = sum(len(b) for b in self._ubuf)
            self._replay, self._replay_bytes = [], 0
            assert server is not None
            if conn.reused:
                self.route.backend_stats.retries += 1
                self._connect(self.route.upstreams[server.name])
            else:
                self._connect_failed(server, UpstreamReset("closed without an answer"))
            return
        status = exc.status if isinstance(exc, UpstreamProtocolError) else 502
        if server is not None:
            if server.is_observed:
                self.route.observe(server, False)
            if count := self.route.upstreams[server.name].failures_to_log(self.loop.time()):
                log.warning(
                    "upstream_failed server=%s failures=%d status=%d error=%s",
                    server.name,
                    count,
                    status,
                    exc,
                )
        self._fail(status)

    def pause_upstream_writes(self) -> None:
        self._pause_reading(PAUSED_UPSTREAM_FULL)

    def resume_upstream_writes(self) -> None:
        if self._switching:
            self.loop.call_soon(self._try_switch)  # see _try_switch (tunnel.py)
            return
        if self._paused & PAUSED_REQUEST_SPLICE:
            self.loop.call_soon(self._try_splice_request)  # as _try_switch
        self._resume_reading(PAUSED_UPSTREAM_FULL)

    # --- ending an exchange ------------------------------------------------------------------

    def _finish_exchange(self) -> None:
        route = self.route
        if self._splicer is not None:  # answered before the request body was all sent
            self._stop_request_splice()
        status = self._status
        route.stats.responses[status // 100] += 1
        server = self.server
        if server is not None and self._response_started:
            server_stats = route.upstreams[server.name].stats
            server_stats.responses[status // 100] += 1
            server_stats.bytes_out += self._bytes_out
            route.backend_stats.observe_response_s(time.monotonic() - self._started_at)
        if route.log_access:
            self._log_access()
        self._end_server_request()
        # Not `or route.is_stopping`: an answer whose head promised keep-alive before the stop
        # began must not be followed by a close the client cannot expect (its next request
        # would be lost); the connection idles, its next answer says close (issue 11).
        if not self._keep_alive_down:
            self.phase = Phase.CLOSING
            self._close_after_write = True
            # transport.close() still flushes: bound how long a client that does not read may
            # hold the socket.
            self.deadline = self.loop.time() + self.route.timeouts.client_s
            return
        if self.head is not None and self.head.upgrade is not None:  # not upgraded after all
            self.reader.end_upgrade()
            self._resume_reading(PAUSED_UPGRADE)
        self._reset_exchange()
        if route.successor is not None:  # a reload replaced the route: the next request uses it
            self.move_to(route.successor)
        timeouts = self.route.timeouts
        if self.reader.pending_head:  # the next request's head has begun
            self.phase = Phase.HEAD
            self.deadline = self.loop.time() + timeouts.http_request_s
        else:
            self.phase = Phase.IDLE
            self.deadline = self.loop.time() + timeouts.client_s
        if self._backlog:
            self.loop.call_soon(self._drain_backlog)

    def _end_server_request(self) -> None:
        server = self.server
        if server is not None:
            self.server = None
            server.inflight -= 1  # Server.request_finished(), inlined: once per request

    def _fail(self, status: int) -> None:
        """Answer an error zdlb generated (no byte of a server answer was sent yet)."""
        head = self.head
        keep_alive = (
            head is not None and head.keep_alive and self._request_done and not self._backlog
        )
        keep_alive = keep_alive and not self.route.is_stopping
        if head is not None and head.upgrade is not None and self.reader.held:
            keep_alive = False  # bytes followed the upgrade request: never parsed as HTTP
        self._status = status
        self._keep_alive_down = keep_alive
        self._wbuf.append(rewrite.error_response(status, close=not keep_alive))
        self._finish_exchange()
        self._flush_client()

    def _abort_exchange(self) -> None:
        """The answer was cut after it started: the client can only learn it by a close."""
        self._keep_alive_down = False
        self._finish_exchange()

    def _reject(self, exc: DownstreamProtocolError) -> None:
        """The client broke the protocol: answer ``exc.status`` if no answer started, close."""
        log.info(
            "bad_request client=%s status=%d error=%s", self.client_ip.decode(), exc.status, exc
        )
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.owner = None
            upstream.abort()
        if not self._response_started:
            self._wbuf.append(rewrite.error_response(exc.status))
        self._status = exc.status
        self._keep_alive_down = False
        self._backlog.clear()
        self._finish_exchange()
        self._flush_client()

    def _log_access(self) -> None:
        head = self.head
        server = self.server_name_for_log
        elapsed_ms = (time.monotonic() - self._started_at) * 1000.0 if self._started_at else 0.0
        access_log.info(
            "request client=%s method=%s target=%s status=%d bytes=%d server=%s pool=%s ms=%.1f",
            self.client_ip.decode(),
            head.method.decode("latin-1") if head else "-",
            head.target.decode("latin-1") if head else "-",
            self._status,
            self._bytes_out,
            server[0],
            server[1],
            elapsed_ms,
        )

    @property
    def server_name_for_log(self) -> tuple[str, str]:
        tried = self._tried[-1] if self._tried else None
        server = self.server or tried
        return (server.name, server.pool.value) if server else ("-", "-")

    def _flush_client(self) -> None:
        transport = self.transport
        if transport is None:
            return
        wbuf = self._wbuf
        if wbuf:
            data = b"".join(wbuf) if len(wbuf) > 1 else wbuf[0]
            self.route.stats.bytes_out += len(data)
            transport.write(data)
            wbuf.clear()
        if self._close_after_write:
            transport.close()

    # --- flow control, deadlines, shutdown -------------------------------------------------

    def _pause_reading(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume_reading(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and self.phase is not Phase.CLOSING:
            self.transport.resume_reading()

    def deadline_passed(self) -> None:
        """Called by ``Route.sweep``: the current wait took longer than its timeout."""
        match self.phase:
            case Phase.IDLE | Phase.CLOSING:
                self.abort() if self.phase is Phase.CLOSING else self._close_now()
            case Phase.TUNNEL:
                pass  # its deadline is tunnel_deadline, enforced by Route.sweep
            case Phase.HEAD:
                self._reject(DownstreamProtocolError("request head timed out", 408))
            case Phase.EXCHANGE:
                splicer = self._splicer
                if splicer is not None and splicer.take_activity():
                    self.deadline = self.loop.time() + self.route.server_s  # bytes still move
                    return
                if self._response_started or self.server is None:
                    self._abort_exchange()
                    self._flush_client()
                    self.abort()
                    return
                server = self.server
                if server.is_observed:
                    self.route.observe(server, False)
                if count := self.route.upstreams[server.name].failures_to_log(self.loop.time()):
                    log.warning("upstream_timeout server=%s failures=%d", server.name, count)
                upstream, self.upstream = self.upstream, None
                if upstream is not None:
                    upstream.owner = None
                    upstream.abort()
                if self._connect_task is not None:
                    self._connect_task.cancel()
                    self._connect_task = None
                self._keep_alive_down = False
                self._request_done = False  # the client may still be sending: close after
                self._fail(504)

    def move_to(self, route: Route) -> None:
        """Between exchanges: serve the next requests by ``route`` (the newest of a chain of
        reloads), counted there; nothing is closed."""
        while route.successor is not None:
            route = route.successor
        old = self.route
        old.forget(self)
        old.stats.connections_open -= 1
        self.route = route
        route.connections.add(self)
        route.stats.connections_open += 1

    def detach_idle(self) -> socket.socket | None:
        """An upgrade (daemon/upgrade.py): between requests, with nothing buffered either way,
        give up the client's socket (a duplicate, for another process) and forget it here
        without a FIN; None when it is not idle so (it then stays here)."""
        transport = self.transport
        if (
            self.phase is not Phase.IDLE
            or transport is None
            or self.reader.pending_head
            or self._backlog
            or self._wbuf
            or transport.get_write_buffer_size()
        ):
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        kept = socket.socket(fileno=os.dup(sock.fileno()))  # the socket outlives the abort
        self.phase = Phase.CLOSING
        transport.abort()  # closes this process's descriptor only: no FIN, no reset
        return kept

    def close_when_idle(self) -> None:
        if self.phase is Phase.IDLE:
            self._close_now()

    def _close_now(self) -> None:
        self.phase = Phase.CLOSING
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.pump is not None:
            self.pump.abort()
            return
        if self._splicer is not None:  # its fds first: the transport closes the socket
            self._splicer.stop()
            self._splicer = None
        if self.transport is not None:
            self.transport.abort()
