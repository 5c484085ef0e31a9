"""The HTTP/1.1 hot path: one protocol object per client connection, applying what the pure
modules decide.

Bytes from the client go through ``RequestReader`` (stream.py), are rewritten by rewrite.py and
written to an ``UpstreamConnection`` (upstream.py); the answer comes back the same way. The
request and its answer are one ``Exchange`` (exchange.py, whose rules are stated on top of it):
this module holds at most one, moves bytes, keeps deadlines and counts. The reader stops at
every message boundary, so a pipelined request waits in it as bytes until the exchange before
it has ended: there is no queue of events here.

Two detours take the sockets away from the transports for a while: a ``101`` hands both to a
``ProtocolSwitch`` and then a pump (upgrade.py), and a body with at least ``splice_min_bytes``
left goes through a ``BodyDetour`` (splice.py). Each is an object with a narrow interface:
``poll()`` when a write buffer may have emptied, ``stop()``, ``take_activity()``; it calls back
once.

Why protocols and callbacks, not streams and a coroutine per request: through a proxy every
request already costs ~15 us of kernel time on loopback, and a Task plus coroutine per upstream
connect measured ~42 us on its own (PERFORMANCE.md). Writes are coalesced: each readiness event
produces at most one ``transport.write`` per direction. The hot path has a budget of ~30 Python
calls per keep-alive request, builtins included (benchmarks/calls_per_request.sh prints the
count): the decisions are called once per exchange, counters are attribute increments.

Deadlines are not timer handles: each connection keeps one ``deadline`` that ``Route.sweep``
(route.py) enforces, so re-arming one is a float store. A long class on purpose: every method
is one event from one side, and splitting it would only hide the state they share.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Protocol, cast

from zdlb.balancer.queue import slot_freed
from zdlb.census import mint_token
from zdlb.errors import (
    DownstreamProtocolError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from zdlb.http import rewrite
from zdlb.http.exchange import (
    CLOSING,
    IDLE,
    IN_EXCHANGE,
    IN_HEAD,
    MAX_PENDING_BYTES,
    MAX_REPLAY_BYTES,
    PAUSED_CONNECTING,
    PAUSED_DETOUR,
    PAUSED_NEXT_REQUEST,
    PAUSED_UPSTREAM_FULL,
    TUNNEL,
    Exchange,
    Phase,
    Replay,
    body_deadline,
    keeps_alive,
    replay_after_loss,
    retry_target,
    status_for_upstream_failure,
)
from zdlb.http.head import BY_CLOSE, BY_LENGTH, CHUNKED, NO_BODY, Headers, RequestHead, ResponseHead
from zdlb.http.splice import BodyDetour
from zdlb.http.stream import RequestReader
from zdlb.http.upgrade import ProtocolSwitch, Tunnel, TunnelPump
from zdlb.stats import RESPONSE_TIME_BOUNDS_S
from zdlb.tcp.pipes import PipePool
from zdlb.tcp.pump import Pump
from zdlb.tls.relay import Relay

if TYPE_CHECKING:
    from zdlb.balancer.queue import Ticket, WaitQueues
    from zdlb.balancer.server import Server
    from zdlb.balancer.sticky import StickyCookie
    from zdlb.http.route import Destination, Route
    from zdlb.http.upstream import ServerConnections, UpstreamConnection

log = logging.getLogger(__name__)
access_log = logging.getLogger("zdlb.access")

_NO_TRAILERS: Headers = []  # never appended to: response_end only reads trailers
_FIRST_BOUND_S = RESPONSE_TIME_BOUNDS_S[0]


class Detour(Protocol):
    """What the connection needs of a ``BodyDetour`` or a ``ProtocolSwitch``."""

    def poll(self) -> None: ...
    def stop(self) -> int: ...
    def take_activity(self) -> bool: ...


class ClientConnection(asyncio.Protocol):
    """One client (downstream) connection: reads requests, forwards them, relays answers."""

    # Slots, not a __dict__: an idle keep-alive connection holds only these and its reader.
    __slots__ = (
        "answered",
        "client_done",
        "client_ip",
        "close_after_write",
        "deadline",
        "dest",
        "detour",
        "exchange",
        "loop",
        "paused",
        "phase",
        "reader",
        "route",
        "transport",
        "tunnel",
        "user_token",
        "wbuf",
        "writes_paused",
    )
    # Where the current request goes (route.py): unset until the first request sent to a
    # backend; only code running for such a request reads it (a local answer reads none).
    dest: Destination

    def __init__(self, route: Route, loop: asyncio.AbstractEventLoop) -> None:
        self.route = route
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.client_ip = b"-"
        self.reader = RequestReader(self, route.listener.limits, route.head_parser)
        self.phase = IDLE
        self.deadline = 0.0
        self.paused = 0  # PAUSED_* bits
        self.writes_paused = False
        self.exchange: Exchange | None = None
        self.answered = 0  # exchanges finished on this connection (exchange.py, rule 3)
        self.client_done = False  # the client half-closed: its answer is the last
        self.wbuf: list[bytes] = []  # bytes for the client, written once per event
        self.close_after_write = False
        self.detour: Detour | None = None
        self.tunnel: Tunnel | None = None
        self.user_token = b""  # the sticky census token of this connection's user, once known

    def __repr__(self) -> str:
        ex = self.exchange
        server = ex.server.name if ex is not None and ex.server is not None else "-"
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
        route.gate.opened()  # at a limit, accepting pauses (budget.py)
        # Its first request within http_request_s, or 408 (exchange.py, rule 7).
        self.deadline = self.loop.time() + route.timeouts.http_request_s

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is IDLE:
            self.phase = IN_HEAD
        elif phase is CLOSING:
            return  # the answer that closes this connection is already decided
        reader = self.reader
        try:
            # IDLE: the last exchange ended with nothing held, and the reader was left paused
            # (_finish_exchange): this read resumes it.
            reader.feed(data, phase is IDLE)
        except DownstreamProtocolError as exc:
            self._reject(exc)
            return
        if phase is IDLE and self.phase is IN_HEAD:  # a head began, and is not whole
            # Its deadline, armed after the read: a whole head sets the exchange's own (one
            # clock read less per request).
            self.deadline = self.loop.time() + self.route.timeouts.http_request_s
        if phase is IN_EXCHANGE:  # body bytes: the client's pace (exchange.py, rule 7)
            exchange = self.exchange
            if exchange is not None:
                self._arm_exchange_deadline(exchange)
        if reader.held:  # bytes past a request still being answered: stop reading more
            self._pause(PAUSED_NEXT_REQUEST)
        # _flush_both, inlined: once per read.
        exchange = self.exchange
        if exchange is not None and exchange.ubuf:
            self._flush_upstream(exchange)
        if self.wbuf or self.close_after_write:
            self._flush_client()

    def eof_received(self) -> bool:
        # A client that half-closes after a complete request still gets its answer.
        exchange = self.exchange
        if exchange is not None and exchange.request_done:
            self.client_done = True  # the answer is its last: Connection: close
            # TLS (issue 14): a close_notify ends the ssl transport whatever we answer, and
            # True would only make asyncio and uvloop log a warning.
            return self.route.listener.tls is None
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel is not None:  # the transport let go of a socket the pump owns
            self.transport = None
            return
        detour, self.detour = self.detour, None
        if detour is not None:
            detour.stop()
        route = self.route
        route.forget(self)
        route.stats.connections_open -= 1
        route.gate.closed()
        route.stats.bytes_in += self.reader.bytes_read
        self.reader.bytes_read = 0
        self.phase = CLOSING
        exchange = self.exchange
        if exchange is not None:
            if exchange.connect_task is not None:
                exchange.connect_task.cancel()
            self._drop_upstream(exchange)  # an answer was still coming: unusable
            self._end_server_request(exchange)
        # Break the reference cycles (transport <-> protocol, reader -> sink) so refcounting
        # frees this connection at once: left to the cyclic GC, closed connections cost 12% of
        # the CPU of a Connection: close workload and full collections stalled requests ~80 ms.
        self.transport = None
        self.reader.detach()

    def pause_writing(self) -> None:
        # The client reads slower than the server sends: stop reading the server.
        self.writes_paused = True
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.writes_paused = False
        if self.detour is not None:
            self.loop.call_soon(self._poll_detour)  # see ProtocolSwitch.poll
            return
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.resume_reading()

    # --- requests from the client: RequestSink ---------------------------------------------

    def request_head(self, head: RequestHead) -> None:
        """A request to forward; the reader emits none while an exchange is in flight."""
        route = self.route
        exchange = self.exchange = Exchange(head, time.monotonic())
        self.phase = IN_EXCHANGE
        dest = route.destination
        if dest is None:  # the listener routes (http/routing.py): one call, and its conditions
            picked = route.router.pick(head)
            if picked.is_local:  # a redirect, or no route matched
                exchange.request_done = head.framing is NO_BODY
                self._fail(exchange, *picked.answer(head))
                return
            dest = picked
        self.dest = dest
        now = self.loop.time()
        self.deadline = now + dest.server_s
        sticky = dest.sticky  # choosing the server, inlined: a method costs a call per request
        if sticky is not None and sticky.marker in head.raw:  # the client names its host
            server = self._select_sticky(exchange, sticky, now)
        else:
            server = dest.backend.select(now, self.client_ip)
            if sticky is not None and server is not None:
                exchange.set_cookie = self._pin(sticky, server.identity, None)
        if server is None:
            self._fail(exchange, 503)
            return
        pool = dest.upstreams[server.name]
        if dest.request_edit is not None:
            dest.request_edit.apply_request(head)
        if head.is_plain and head.http_minor == 1:  # build_request_head's first case, inlined
            data = rewrite.FORWARDED_LINES % (head.raw[:-2], self.client_ip, route.proto)
        else:
            data = rewrite.build_request_head(head, self.client_ip, route.proto, pool.host_header)
        exchange.ubuf = [data]
        exchange.ubuf_bytes = len(data)
        framing = head.framing
        if framing is NO_BODY:
            exchange.request_done = True  # the head is the whole request (stream.py)
        else:
            self._start_body(exchange, now)
            if framing is CHUNKED:
                exchange.is_chunked_up = True
            elif (head.content_length or 0) >= route.splice_min_bytes:
                # Read no more of the body: once the head and what came with it reach the
                # server, the rest goes by splice (_start_request_detour).
                exchange.splice_request = True
                self._pause(PAUSED_DETOUR)
        if server.inflight >= server.maxconn:  # at its maxconn: wait (balancer/queue.py)
            self._wait_for_slot(exchange, server, now)
            return
        self._use_server(exchange, server, pool)
        upstream = exchange.upstream
        if framing is NO_BODY and upstream is not None and upstream.transport is not None:
            # The whole request, on a pooled connection: written now. _flush_upstream's work
            # without its join and its call (2 of a keep-alive GET's ~30); the list is kept
            # for a replay (exchange.py, rule 4).
            sent = exchange.ubuf
            exchange.ubuf = []
            if exchange.replay is not None:
                exchange.replay = sent
                exchange.replay_bytes = exchange.ubuf_bytes
            pool.stats.bytes_in += exchange.ubuf_bytes
            exchange.ubuf_bytes = 0
            upstream.transport.write(data)

    def _start_body(self, exchange: Exchange, now: float) -> None:
        """A request with a body: its pace is judged from here (exchange.py, rule 7)."""
        timeouts = self.route.timeouts
        exchange.body_deadline_base = now + timeouts.client_body_s
        exchange.body_bytes_base = self.reader.bytes_read
        self.deadline = exchange.body_deadline_base

    def _arm_exchange_deadline(self, exchange: Exchange) -> None:
        """Re-arm the exchange's wait: the client's body pace while zdlb reads its body, else
        (all read, or reading paused: a splice, a full server) the server's ``server_s``. A
        connect or a queue keeps its own deadline."""
        if exchange.connect_task is not None or exchange.ticket is not None:
            return
        route = self.route
        now = self.loop.time()
        if exchange.request_done or self.paused:  # the server's turn, or its pace
            self.deadline = now + self.dest.server_s
        else:
            timeouts = route.timeouts
            self.deadline = body_deadline(
                exchange,
                now,
                self.reader.bytes_read,
                timeouts.client_body_s,
                route.listener.limits.min_body_rate,
            )

    # --- waiting for a server slot (balancer/queue.py) ----------------------------------------

    def _wait_for_slot(self, exchange: Exchange, server: Server, now: float) -> None:
        """``server`` is at its maxconn: queue (its own queue for a user pinned to it, else the
        backend's) until a slot is granted or ``queue_s`` passes (exchange.py, rule 7)."""
        # A server with a maxconn belongs to a backend with queues (route.py attached them).
        waitq = cast("WaitQueues", server.waitq)
        sticky = exchange.identity is not None and exchange.identity == server.identity
        exchange.ticket = waitq.enqueue(self, server.identity if sticky else None, now)
        self.dest.backend_stats.queued += 1
        if exchange.ticket.is_live:  # not granted at once
            self.deadline = now + self.dest.queue_s

    def queue_granted(self, ticket: Ticket, server: Server) -> None:
        """The queue reserved a slot on ``server`` for this connection (its I/O comes later:
        this runs inside another connection's callback)."""
        self.loop.call_soon(self._slot_granted, ticket, server)

    def _slot_granted(self, ticket: Ticket, server: Server) -> None:
        exchange = self.exchange
        server.inflight -= 1  # the reservation; _use_server counts the request again
        if exchange is None or exchange.ticket is not ticket or self.phase is not IN_EXCHANGE:
            slot_freed(
                server, self.loop.time()
            )  # the client left meanwhile: the next waiter gets it
            return
        exchange.ticket = None
        dest = self.dest
        dest.backend_stats.queue_wait_s += time.monotonic() - exchange.started_at
        pool = dest.upstreams[server.name]
        head = exchange.request
        if not head.has_host and exchange.ubuf:  # the stand-in Host names the server
            exchange.ubuf[0] = rewrite.build_request_head(
                head, self.client_ip, self.route.proto, pool.host_header
            )
        sticky = dest.sticky
        if sticky is not None and server.identity != exchange.identity:
            exchange.set_cookie = self._pin(sticky, server.identity, None)
        self._arm_exchange_deadline(exchange)
        self._use_server(exchange, server, pool)
        self._flush_upstream(exchange)

    def _leave_queue(self, exchange: Exchange) -> None:
        ticket = exchange.ticket
        if ticket is not None:
            exchange.ticket = None
            ticket.queues.leave(ticket)

    def request_body(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            self._send_upstream(
                exchange, rewrite.encode_chunk(data) if exchange.is_chunked_up else data
            )

    def request_end(self, trailers: Headers) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.is_chunked_up:
            self._send_upstream(exchange, rewrite.encode_last_chunk(trailers))
        exchange.request_done = True
        self._arm_exchange_deadline(exchange)  # now the server's turn
        if exchange.upstream is not None:
            self._flush_upstream(exchange)  # before a pooled connection can be released

    # --- choosing a server and connecting ----------------------------------------------------

    def _select_sticky(self, exchange: Exchange, sticky: StickyCookie, now: float) -> Server | None:
        """The client's pinned host if it can serve, else a balanced pick to pin it to (or
        none at all: a cookie that only looked like ours leaves the head as it was)."""
        head = exchange.request
        identity, stripped, token = sticky.extract(head.raw)
        if stripped is not None:
            head.raw = stripped  # the server never sees zdlb's cookie
        dest = self.dest
        backend = dest.backend
        server = backend.select_sticky(identity, now) if identity is not None else None
        if server is None:
            server = backend.select(now, self.client_ip)
            if identity is not None and server is not None:
                dest.backend_stats.sticky_repins += 1
        exchange.identity = identity
        if server is None:
            return None
        if server.identity != identity or token is None:  # (re-)pin, the user's token kept
            exchange.set_cookie = self._pin(sticky, server.identity, token)
        elif token != self.user_token:  # a returning user: counted once per connection
            self.user_token = token
            census = dest.census
            if census is not None:
                census.observe(identity, token)
        return server

    def _pin(self, sticky: StickyCookie, identity: str, token: bytes | None) -> bytes:
        """The Set-Cookie lines that pin this client to ``identity``, with its user token
        (census.py): the one its cookie carried, else this connection's, else a new one."""
        token = token or self.user_token or mint_token()
        census = self.dest.census
        if census is not None and token != self.user_token:
            census.observe(identity, token)
        self.user_token = token
        before, after = sticky.token_lines[identity]  # census.with_token's bytes, no call
        return before + token + after

    def _use_server(self, exchange: Exchange, server: Server, pool: ServerConnections) -> None:
        exchange.server = server
        server.inflight += 1  # Server.request_started(), inlined: once per request
        pool.stats.requests += 1
        head = exchange.request
        dest = self.dest
        # may_reuse (exchange.py, rule 3), resolved for this backend once by the route.
        if (dest.reuse_later if self.answered else dest.reuse_first) and head.upgrade is None:
            upstream = pool.acquire(self, head.method == b"HEAD")
            if upstream is not None:  # _attach's rest, inlined: nothing paused for a connect
                exchange.upstream = upstream
                if self.writes_paused:
                    upstream.pause_reading()
                return
        self._connect(exchange, pool)

    def _connect(self, exchange: Exchange, pool: ServerConnections) -> None:
        if exchange.ubuf_bytes > MAX_PENDING_BYTES:
            self._pause(PAUSED_CONNECTING)
        # The connect's own deadline (connect_s), enforced by the sweep: _exchange_timed_out.
        self.deadline = self.loop.time() + pool.connect_s
        exchange.connect_task = self.loop.create_task(self._open(exchange, pool))

    async def _open(self, exchange: Exchange, pool: ServerConnections) -> None:
        try:
            upstream = await pool.connect(self.loop)
        except UpstreamError as exc:
            exchange.connect_task = None
            self._connect_failed(exchange, pool.server, exc)
            return
        exchange.connect_task = None
        if self.exchange is not exchange or exchange.server is not pool.server:
            pool.release(upstream, self.loop.time())  # the client left meanwhile: keep it warm
            return
        self._arm_exchange_deadline(exchange)
        self._attach(exchange, upstream)
        self._flush_upstream(exchange)

    def _connect_failed(self, exchange: Exchange, server: Server, exc: UpstreamError) -> None:
        pool = self.dest.upstreams[server.name]
        pool.stats.connect_errors += 1
        if server.is_observed:
            self.route.observe(server, False)
        if count := pool.failures_to_log(self.loop.time()):
            log.warning(
                "upstream_connect_failed server=%s failures=%d error=%s", server.name, count, exc
            )
        self._retry_elsewhere(exchange, server, exc)

    def _retry_elsewhere(self, exchange: Exchange, server: Server, exc: UpstreamError) -> None:
        """Send the request to another server (exchange.py, rule 5), or answer 502/504."""
        dest = self.dest
        self._end_server_request(exchange)
        exchange.tried += (server,)
        now = self.loop.time()
        retry = retry_target(
            server,
            exchange.tried,
            dest.retries,
            lambda exclude: dest.backend.select(now, self.client_ip, exclude),
        )
        if retry is None:
            self._fail(exchange, status_for_upstream_failure(exc, answering=False))
            return
        dest.backend_stats.redispatches += 1
        head = exchange.request
        pool = dest.upstreams[retry.name]
        if not head.has_host:  # the stand-in Host names the server
            exchange.ubuf[0] = rewrite.build_request_head(
                head, self.client_ip, self.route.proto, pool.host_header
            )
        sticky = dest.sticky
        if sticky is not None and retry.identity != exchange.identity:
            exchange.set_cookie = self._pin(sticky, retry.identity, None)
        self._use_server(exchange, retry, pool)
        self._flush_upstream(exchange)  # a pooled connection is attached at once: send now

    def _attach(self, exchange: Exchange, upstream: UpstreamConnection) -> None:
        head = exchange.request
        exchange.upstream = upstream
        upstream.attach(self, head.method == b"HEAD", head.upgrade is not None)
        if self.writes_paused:
            upstream.pause_reading()
        if self.paused & PAUSED_CONNECTING:
            self._resume(PAUSED_CONNECTING)

    def _send_upstream(self, exchange: Exchange, data: bytes) -> None:
        exchange.ubuf.append(data)
        exchange.ubuf_bytes += len(data)
        if exchange.upstream is None and exchange.ubuf_bytes > MAX_PENDING_BYTES:
            self._pause(PAUSED_CONNECTING)

    def _flush_upstream(self, exchange: Exchange) -> None:
        upstream = exchange.upstream
        ubuf = exchange.ubuf
        if upstream is None or upstream.transport is None or not ubuf:
            return
        data = b"".join(ubuf)  # one piece: that piece itself, no copy
        exchange.ubuf = []
        size = exchange.ubuf_bytes
        exchange.ubuf_bytes = 0
        replay = exchange.replay
        if replay is not None:
            exchange.replay_bytes += size
            if exchange.replay_bytes > MAX_REPLAY_BYTES:
                exchange.replay = None
            elif replay:
                replay.append(data)
            else:  # the first write: keep the pieces just sent (no copy, no call)
                exchange.replay = ubuf
        upstream.pool.stats.bytes_in += size
        upstream.transport.write(data)
        if exchange.splice_request and self.detour is None:
            self._start_request_detour(exchange, upstream)

    # --- the server's answer: ResponseSink and UpstreamOwner ------------------------------

    def response_head(self, head: ResponseHead) -> None:
        exchange = self.exchange
        assert exchange is not None
        request = exchange.request
        if head.status == 101:  # head.py lets it through only to an upgrade request
            self._switch_protocols(exchange, head)
            return
        if head.status < 200:  # 1xx
            if request.http_minor == 1:  # RFC 9110 section 15.2: never 1xx to HTTP/1.0
                self.wbuf.append(rewrite.build_response_head(head, NO_BODY, True, 1))
            return
        self.wbuf.append(self._answer_head(exchange, head))

    def _answer_head(self, exchange: Exchange, head: ResponseHead) -> bytes:
        """Decide how a final answer goes to the client (exchange.py, rule 2) and serialise
        its head for it."""
        request = exchange.request
        framing = head.framing
        if framing is CHUNKED and request.http_minor == 0:
            framing = rewrite.downstream_framing(head, 0)
        # keeps_alive (exchange.py, rule 2), inlined: a call less per answer. Its other caller,
        # _fail, calls it; tests/unit/test_exchange.py checks that the two agree.
        keep_alive = exchange.keep_alive = (
            request.keep_alive
            and exchange.request_done
            and framing is not BY_CLOSE
            and not self.route.is_stopping
            and not self.client_done
            and not (request.upgrade is not None and self.reader.held)
        )
        server = exchange.server
        if server is not None and server.is_observed:
            self.route.observe(server, head.status < 500)
        exchange.response_started = True
        exchange.is_chunked_down = framing is CHUNKED
        # Only once the request is sent whole: the client's reading stops during the splice.
        exchange.splice_response = (
            framing is BY_LENGTH
            and (head.content_length or 0) >= self.route.splice_min_bytes
            and exchange.request_done
        )
        exchange.status = head.status
        added = exchange.set_cookie + self.route.hsts  # hsts: b"" unless a TLS listener asks
        if self.dest.response_edit is not None:
            added = self.dest.response_edit.apply_response(head, added)
        if head.is_plain and keep_alive and head.http_minor == request.http_minor == 1:
            # build_response_head's first case without its call: the head as it came, with the
            # cookie (if any) after the status line (tests/unit/test_exchange.py).
            if not added:
                return head.raw
            cut = head.raw.find(b"\r\n") + 2  # after the status line
            return head.raw[:cut] + added + head.raw[cut:]
        return rewrite.build_response_head(head, framing, keep_alive, request.http_minor, added)

    def response_complete(self, head: ResponseHead, body: bytes) -> None:
        """A whole final response in one read: its head, its entire body, its end. The common
        answer, so response_end and _flush_client are inlined: written at once, its upstream
        connection pooled, the exchange finished (4 calls instead of 7)."""
        exchange = self.exchange
        assert exchange is not None
        out = self._answer_head(exchange, head)
        if body:
            exchange.bytes_out += head.content_length or 0
            out += body
        transport = self.transport
        if self.wbuf or transport is None:  # a 1xx went first: keep the order
            self.wbuf.append(out)
        else:
            self.route.stats.bytes_out += len(out)
            transport.write(out)
        upstream = exchange.upstream
        exchange.upstream = None
        if upstream is not None:
            if (
                head.keep_alive
                and exchange.request_done
                and not upstream.is_closed
                and exchange.request.upgrade is None  # exchange.py, rule 3
                and self.dest.reuse_later  # reuse is not "never"
            ):
                upstream.pool.release(upstream, self.loop.time())
            else:
                upstream.owner = None
                upstream.close()
        self._finish_exchange(exchange)

    def response_body(self, data: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.bytes_out += len(data)
        self.wbuf.append(rewrite.encode_chunk(data) if exchange.is_chunked_down else data)

    def response_end(self, trailers: Headers, keep_alive: bool) -> None:
        exchange = self.exchange
        assert exchange is not None
        if exchange.is_chunked_down:
            self.wbuf.append(rewrite.encode_last_chunk(trailers))
        upstream = exchange.upstream
        exchange.upstream = None
        if upstream is not None:
            if (
                keep_alive
                and exchange.request_done
                and not upstream.is_closed
                and exchange.request.upgrade is None  # exchange.py, rule 3
                and self.dest.reuse_later  # reuse is not "never"
            ):
                upstream.pool.release(upstream, self.loop.time())
            else:
                upstream.owner = None
                upstream.close()
        self._finish_exchange(exchange)

    def upstream_flushed(self) -> None:
        """The server's bytes of one read were all handled: write the client's share."""
        exchange = self.exchange
        if self.phase is IN_EXCHANGE:
            self.deadline = self.loop.time() + self.dest.server_s
        self._flush_client()
        if exchange is None or self.detour is not None or self.tunnel is not None:
            return
        if exchange.status == 101:
            self._start_switch(exchange)
        elif exchange.splice_response:
            self._start_response_detour(exchange)

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        exchange = self.exchange
        if exchange is None or conn is not exchange.upstream:
            return
        if exchange.response_started:
            if not conn.reader.feed_eof():  # not a close-delimited body: the answer is cut
                exchange.upstream = None
                exchange.status = exchange.status or 502
                self._abort_exchange(exchange)
            self._flush_client()
            return
        exchange.upstream = None
        server = exchange.server
        assert server is not None
        replay = exchange.replay
        match replay_after_loss(
            conn.got_data, replay is not None, conn.reused, exchange.retried_stale
        ):
            case Replay.SAME_SERVER | Replay.OTHER_SERVER as how:
                assert replay is not None
                exchange.retried_stale = exchange.retried_stale or conn.reused
                exchange.ubuf[:0] = replay
                exchange.ubuf_bytes = sum(len(b) for b in exchange.ubuf)
                exchange.replay, exchange.replay_bytes = [], 0
                if how is Replay.SAME_SERVER:
                    self.dest.backend_stats.retries += 1
                    self._connect(exchange, self.dest.upstreams[server.name])
                else:
                    self._connect_failed(
                        exchange, server, UpstreamReset("closed without an answer")
                    )
                return
            case Replay.NO:
                pass
        status = exc.status if isinstance(exc, UpstreamProtocolError) else 502
        if server.is_observed:
            self.route.observe(server, False)
        if count := self.dest.upstreams[server.name].failures_to_log(self.loop.time()):
            log.warning(
                "upstream_failed server=%s failures=%d status=%d error=%s",
                server.name,
                count,
                status,
                exc,
            )
        self._fail(exchange, status)

    def pause_upstream_writes(self) -> None:
        self._pause(PAUSED_UPSTREAM_FULL)
        exchange = self.exchange
        if exchange is not None:
            self._arm_exchange_deadline(exchange)  # the server is slow, not the client

    def resume_upstream_writes(self) -> None:
        if self.detour is not None:
            self.loop.call_soon(self._poll_detour)  # see ProtocolSwitch.poll
        self._resume(PAUSED_UPSTREAM_FULL)
        exchange = self.exchange
        if exchange is not None:
            self._arm_exchange_deadline(exchange)

    # --- detours: a switch to a tunnel, a spliced body -------------------------------------

    def _poll_detour(self) -> None:
        if self.detour is not None:
            self.detour.poll()

    def _switch_protocols(self, exchange: Exchange, head: ResponseHead) -> None:
        """A 101: stop reading the server; once the client has the head and both buffers are
        empty, both sockets go to a pump (``_tunnel_ready``)."""
        upstream = exchange.upstream
        assert upstream is not None and upstream.transport is not None
        assert self.transport is not None
        server = exchange.server
        if server is not None and server.is_observed:
            self.route.observe(server, True)
        exchange.response_started = True
        exchange.status = 101
        upstream.pause_reading()  # bytes after the head in this read arrive as response_body
        self._pause(PAUSED_DETOUR)
        self.wbuf.append(rewrite.build_switch_head(head, exchange.set_cookie))

    def _start_switch(self, exchange: Exchange) -> None:
        """The 101 and what followed it are written: send the client's bytes held past its
        upgrade request on, and wait until both write buffers are empty."""
        upstream = exchange.upstream
        if upstream is None or upstream.transport is None or self.transport is None:
            return  # lost meanwhile: connection_lost or upstream_lost ends the exchange
        data = self.reader.take_held()
        upstream.pool.stats.bytes_in += len(data)
        if self.route.is_tls:  # TLS: the sockets cannot leave their transports (issue 14)
            self._start_relay(exchange, upstream, data)
            return
        switch = ProtocolSwitch(self.transport, upstream.transport, self._tunnel_ready)
        self.detour = switch
        switch.start(data)

    def _tunnel_ready(self, sockets: tuple[socket.socket, socket.socket] | None) -> None:
        """Hand both sockets to a pump. The server keeps counting this request and, for the
        aborted upstream transport, one connection, until the pump ends (``_tunnel_ended``)."""
        self.detour = None
        exchange = self.exchange
        assert exchange is not None and exchange.server is not None
        upstream = exchange.upstream
        exchange.upstream = None
        if upstream is not None:
            upstream.owner = None  # its connection_lost (after the abort) only leaves the pool
        if sockets is None:  # out of fds: both transports are untouched
            log.warning("tunnel_failed client=%s error=no descriptor", self.client_ip.decode())
            if upstream is not None:
                upstream.abort()
            self.abort()
            return
        exchange.server.connection_opened()
        route = self.route
        pool = route.tunnel_pool
        pump = Pump(self.loop, sockets[0], sockets[1], pool, self._tunnel_ended)
        self.tunnel = Tunnel(pump, self.loop.time() + route.tunnel.tunnel_s)
        self.transport = None
        self.phase = TUNNEL
        self.deadline = math.inf  # route.sweep checks the tunnel's deadline instead
        route.tunnels.add(self)
        pump.start()

    def _start_relay(self, exchange: Exchange, upstream: UpstreamConnection, held: bytes) -> None:
        """A 101 over TLS: both transports go to a ``Relay`` (tls/relay.py) instead of a pump.
        The upstream connection's protocol is replaced, so its connection_lost never comes:
        the server counts the connection until ``_tunnel_ended``, as for a pump."""
        assert self.transport is not None and upstream.transport is not None
        exchange.upstream = None
        upstream.owner = None
        relay = Relay(self.transport, upstream.transport, self._tunnel_ended)
        upstream.is_closed, upstream.transport = True, None
        route = self.route
        self.tunnel = Tunnel(relay, self.loop.time() + route.tunnel.tunnel_s)
        self.transport = None
        self.phase = TUNNEL
        self.deadline = math.inf
        route.tunnels.add(self)
        relay.start(held)

    def _tunnel_ended(self, pump: TunnelPump) -> None:
        """Called once by the pump, both sockets closed: account the exchange and the client
        connection as ended, as connection_lost does for any other."""
        route = self.route
        route.tunnels.discard(self)
        exchange = self.exchange
        assert exchange is not None
        server = exchange.server
        if server is not None:
            server.connection_closed()
            self.dest.upstreams[server.name].stats.bytes_in += pump.bytes_up
        route.stats.bytes_in += pump.bytes_up
        route.stats.bytes_out += pump.bytes_down
        exchange.bytes_out += pump.bytes_down
        exchange.keep_alive = False
        self._finish_exchange(exchange)  # request_finished, response counters, access log
        self.tunnel = None
        self.phase = CLOSING
        route.forget(self)
        route.stats.connections_open -= 1
        self.reader.detach()

    def _start_response_detour(self, exchange: Exchange) -> None:
        """Splice the rest of a long response body: stop both transports reading first."""
        exchange.splice_response = False
        upstream, transport = exchange.upstream, self.transport
        if (
            upstream is None
            or upstream.transport is None
            or transport is None
            or upstream.reader.remaining_body < self.route.splice_min_bytes
        ):
            return  # most of the body came with the head: the plain path
        upstream.pause_reading()
        self._pause(PAUSED_DETOUR)
        pool = self.route.tunnel_pool
        assert isinstance(pool, PipePool)  # splice_min_bytes is infinite otherwise
        size = upstream.reader.take_body()
        detour = BodyDetour(
            self.loop, pool, upstream.transport, transport, size, self._response_moved
        )
        self.detour = detour
        detour.poll()

    def _response_moved(self, ok: bool, moved: int, source_failed: bool) -> None:
        """The body was moved whole (``ok``): resume both transports and end the response as
        if the reader had seen it. Out of fds before any byte: the plain path takes the body.
        Else the answer is cut and both sides are reset."""
        self.detour = None
        exchange = self.exchange
        assert exchange is not None
        exchange.bytes_out += moved
        self.route.stats.bytes_out += moved
        upstream = exchange.upstream
        if not ok and not moved and not source_failed and upstream is not None:
            upstream.resume_reading()  # no descriptor to splice with: the reader takes it
            self._resume(PAUSED_DETOUR)
            return
        if not ok or upstream is None:
            self._drop_upstream(exchange)
            self._abort_exchange(exchange)
            self.abort()
            return
        upstream.resume_reading()
        self._resume(PAUSED_DETOUR)
        upstream.reader.body_moved(moved)  # response_end: pool the upstream, finish
        self._flush_client()

    def _start_request_detour(self, exchange: Exchange, upstream: UpstreamConnection) -> None:
        """Splice the rest of a long request body to the server. The client's reading stays
        paused; the server's goes on, so an early answer (413, 401...) still reaches the client
        and ends the exchange (``_finish_exchange``)."""
        transport = self.transport
        if transport is None or upstream.transport is None:
            return
        exchange.splice_request = False
        size = self.reader.remaining_body
        if size < self.route.splice_min_bytes:
            self._resume(PAUSED_DETOUR)  # most of it came with the head
            return
        pool = self.route.tunnel_pool
        assert isinstance(pool, PipePool)
        exchange.replay = None  # the body is not held: the request can no longer be replayed
        detour = BodyDetour(
            self.loop, pool, transport, upstream.transport, size, self._request_moved
        )
        self.detour = detour
        detour.poll()

    def _request_moved(self, ok: bool, moved: int, source_failed: bool) -> None:
        """The body reached the server whole (``ok``): the reader ends the request and the
        client is read again. A client that stopped short is answered 400 and closed. Any other
        failure (the server's socket, no pipe) hands the rest of the body back to the plain
        path, which meets the same end the usual way (upstream_lost, 502)."""
        self.detour = None
        exchange = self.exchange
        if exchange is None:
            return
        self._count_request_splice(exchange, moved)
        if not ok and source_failed:
            self._reject(DownstreamProtocolError("request body cut short", 400))
            return
        self._resume(PAUSED_DETOUR)
        if moved:
            self.reader.body_moved(moved)  # at the body's end: request_end

    def _count_request_splice(self, exchange: Exchange, moved: int) -> None:
        self.route.stats.bytes_in += moved
        if exchange.server is not None:
            self.dest.upstreams[exchange.server.name].stats.bytes_in += moved

    # --- ending an exchange ------------------------------------------------------------------

    def _finish_exchange(self, exchange: Exchange) -> None:
        route = self.route
        detour = self.detour
        if detour is not None:  # answered before the request body was all spliced
            self.detour = None
            self._count_request_splice(exchange, detour.stop())
        status = exchange.status
        route.stats.responses[status // 100] += 1
        server = exchange.server
        if server is not None and exchange.response_started:
            dest = self.dest
            server_stats = dest.upstreams[server.name].stats
            server_stats.responses[status // 100] += 1
            server_stats.bytes_out += exchange.bytes_out
            seconds = time.monotonic() - exchange.started_at
            backend_stats = dest.backend_stats
            # BackendStats.observe_response_s, inlined: once per request (stats.py); a LAN
            # answer under the first bound (1 ms) needs no bisect.
            buckets = backend_stats.response_time_buckets
            if seconds <= _FIRST_BOUND_S:
                buckets[0] += 1
            else:
                buckets[bisect_left(RESPONSE_TIME_BOUNDS_S, seconds)] += 1
            backend_stats.response_time_sum_s += seconds
        if route.log_access:
            self._log_access(exchange, status)
        if server is not None:
            exchange.server = None
            server.inflight -= 1  # Server.request_finished(), inlined: once per request
            if server.waitq is not None:
                slot_freed(server, self.loop.time())
        elif exchange.ticket is not None:
            self._leave_queue(exchange)
        self.answered += 1
        reader = self.reader
        route.stats.bytes_in += reader.bytes_read  # counted by the reader, published here
        reader.bytes_read = 0
        # Not `or route.is_stopping`: an answer whose head promised keep-alive before a stop
        # began must not be followed by a close its client cannot expect (the next request
        # would be lost); the connection idles, and its next answer says close.
        if not exchange.keep_alive:
            self._close_after_write()
            self._flush_client()
            return
        if route.successor is not None:  # a reload replaced the route: the next request uses it
            self.move_to(route.successor)
            route = self.route
        if reader.held:  # a pipelined request: parse it on the next iteration, not deeper
            self.exchange = None
            self.phase = IN_HEAD
            self.deadline = self.loop.time() + route.timeouts.http_request_s
            self.loop.call_soon(self._next_request)
        else:  # the reader stays paused until the next read resumes it (data_received)
            self.exchange = None
            self.phase = IDLE
            self.deadline = self.loop.time() + route.timeouts.client_s
        if self.wbuf:
            self._flush_client()

    def _next_request(self) -> None:
        """Parse what the reader held past the last request (data_received's work)."""
        if self.phase is CLOSING or self.exchange is not None:
            return
        reader = self.reader
        try:
            reader.resume()
        except DownstreamProtocolError as exc:
            self._reject(exc)
            return
        if not reader.held:
            self._resume(PAUSED_NEXT_REQUEST)
        self._flush_both()

    def _flush_both(self) -> None:
        """Write what parsing the client's bytes queued for the server and for the client."""
        exchange = self.exchange
        if exchange is not None and exchange.ubuf:
            self._flush_upstream(exchange)
        if self.wbuf or self.close_after_write:
            self._flush_client()

    def _end_server_request(self, exchange: Exchange) -> None:
        server = exchange.server
        if server is not None:
            exchange.server = None
            server.inflight -= 1  # Server.request_finished(), inlined: once per request
            if server.waitq is not None:
                slot_freed(server, self.loop.time())
        elif exchange.ticket is not None:
            self._leave_queue(exchange)

    def _drop_upstream(self, exchange: Exchange) -> None:
        upstream = exchange.upstream
        if upstream is not None:
            exchange.upstream = None
            upstream.owner = None
            upstream.abort()

    def _fail(self, exchange: Exchange, status: int, location: bytes | None = None) -> None:
        """Answer an error or a redirect (to ``location``) zdlb generated (no byte of a server
        answer was sent yet)."""
        request = exchange.request
        keep_alive = exchange.keep_alive = keeps_alive(
            request,
            exchange.request_done,
            False,
            self.route.is_stopping,
            self.client_done,
            request.upgrade is not None and bool(self.reader.held),
        )
        exchange.status = status
        self.wbuf.append(rewrite.error_response(status, close=not keep_alive, location=location))
        self._finish_exchange(exchange)

    def _abort_exchange(self, exchange: Exchange) -> None:
        """The answer was cut after it started: the client can only learn it by a close."""
        exchange.keep_alive = False
        self._finish_exchange(exchange)

    def _reject(self, exc: DownstreamProtocolError) -> None:
        """The client broke the protocol: answer ``exc.status`` if no answer started, close."""
        log.info(
            "bad_request client=%s status=%d error=%s", self.client_ip.decode(), exc.status, exc
        )
        exchange = self.exchange
        if exchange is None:  # refused before any head was accepted
            route = self.route
            self.wbuf.append(rewrite.error_response(exc.status))
            route.stats.responses[exc.status // 100] += 1
            if route.log_access:
                self._log_access(None, exc.status)
            self._close_after_write()
            self._flush_client()
        else:
            self._drop_upstream(exchange)
            if not exchange.response_started:
                self.wbuf.append(rewrite.error_response(exc.status))
            exchange.status = exc.status
            exchange.keep_alive = False
            self._finish_exchange(exchange)

    def _close_after_write(self) -> None:
        self.phase = CLOSING
        self.close_after_write = True
        # transport.close() still flushes: bound how long a client that does not read may hold
        # the socket.
        self.deadline = self.loop.time() + self.route.timeouts.client_s

    def _log_access(self, exchange: Exchange | None, status: int) -> None:
        if exchange is None:
            method = target = "-"
            server = None
            size = 0
            elapsed_ms = 0.0
        else:
            method = exchange.request.method.decode("latin-1")
            target = exchange.request.target.decode("latin-1")
            server = exchange.server or (exchange.tried[-1] if exchange.tried else None)
            size = exchange.bytes_out
            elapsed_ms = (time.monotonic() - exchange.started_at) * 1000.0
        access_log.info(
            "request client=%s method=%s target=%s status=%d bytes=%d server=%s pool=%s ms=%.1f",
            self.client_ip.decode(),
            method,
            target,
            status,
            size,
            server.name if server else "-",
            server.pool.value if server else "-",
            elapsed_ms,
        )

    def _flush_client(self) -> None:
        transport = self.transport
        if transport is None:
            return
        wbuf = self.wbuf
        if wbuf:
            data = b"".join(wbuf)  # one piece: that piece itself, no copy
            self.wbuf = []
            self.route.stats.bytes_out += len(data)
            transport.write(data)
        if self.close_after_write:
            transport.close()

    # --- flow control, deadlines, shutdown -------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and self.phase is not CLOSING:
            self.transport.resume_reading()

    def deadline_passed(self) -> None:
        """Called by ``Route.sweep``: the current wait took longer than its timeout."""
        match self.phase:
            case Phase.IDLE if self.answered or self.route.is_stopping:
                self._close_now()  # keep-alive: a quiet close (exchange.py, rule 7)
            case Phase.IDLE:
                self._reject(DownstreamProtocolError("no request", 408))
            case Phase.CLOSING:
                self.abort()
            case Phase.TUNNEL:
                pass  # its deadline is the tunnel's, enforced by Route.sweep
            case Phase.HEAD:
                self._reject(DownstreamProtocolError("request head timed out", 408))
            case Phase.EXCHANGE:
                self._exchange_timed_out()

    def _exchange_timed_out(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        if exchange.ticket is not None:  # queue_s passed (exchange.py, rule 7)
            self._leave_queue(exchange)
            dest = self.dest
            dest.backend_stats.queue_timeouts += 1
            exchange.request_done = False  # the body may still be coming: close after
            exchange.status = 503
            self.wbuf.append(rewrite.error_response(503, retry_after=dest.retry_after))
            exchange.keep_alive = False
            self._finish_exchange(exchange)
            return
        detour = self.detour
        if detour is not None and detour.take_activity():
            self.deadline = self.loop.time() + self.dest.server_s  # bytes still move
            return
        server = exchange.server
        task = exchange.connect_task
        if task is None and not exchange.request_done and not self.paused:
            # The client's body stalled or crawled (rule 7): its fault, not the server's.
            self._reject(DownstreamProtocolError("request body timed out", 408))
            return
        if exchange.response_started or server is None:
            self._abort_exchange(exchange)
            self.abort()
            return
        if task is not None:  # the connect took longer than connect_s: as a failed connect
            exchange.connect_task = None
            task.cancel()
            address = server.address
            self._connect_failed(
                exchange, server, UpstreamTimeout(f"connect to {address} timed out")
            )
            return
        if server.is_observed:
            self.route.observe(server, False)
        if count := self.dest.upstreams[server.name].failures_to_log(self.loop.time()):
            log.warning("upstream_timeout server=%s failures=%d", server.name, count)
        self._drop_upstream(exchange)
        exchange.request_done = False  # the client may still be sending: close after
        self._fail(exchange, 504)

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
        if route.gate is not old.gate:  # another listener's (an upgrade's adoption)
            old.gate.closed()
            route.gate.opened()

    def detach_idle(self) -> socket.socket | None:
        """An upgrade (daemon/upgrade.py): between requests, with nothing buffered either way,
        give up the client's socket (a duplicate, for another process) and forget it here
        without a FIN; None when it is not idle so (it then stays here)."""
        transport = self.transport
        if (
            self.phase is not IDLE
            or transport is None
            or not self.reader.is_idle
            or self.wbuf
            or transport.get_write_buffer_size()
        ):
            return None
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_extra_info("ssl_object") is not None:
            return None  # TLS: the session lives in this process; it ends here (issue 14)
        kept = socket.socket(fileno=os.dup(sock.fileno()))  # the socket outlives the abort
        self.phase = CLOSING
        transport.abort()  # closes this process's descriptor only: no FIN, no reset
        return kept

    def continue_keep_alive(self) -> None:
        """An idle keep-alive connection another process served (an upgrade's): between
        requests, not new, so it waits ``client_s`` and ends quietly (exchange.py, rule 7)."""
        self.answered = max(1, self.answered)
        if self.phase is IDLE:
            self.deadline = self.loop.time() + self.route.timeouts.client_s

    def close_when_idle(self) -> None:
        if self.phase is IDLE:
            self._close_now()

    def _close_now(self) -> None:
        self.phase = CLOSING
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.pump.abort()
            return
        detour, self.detour = self.detour, None
        if detour is not None:  # its fds first: the transport closes the socket
            detour.stop()
        if self.transport is not None:
            self.transport.abort()
