"""The HTTP/1.1 hot path: one protocol object per client connection, applying what the pure
modules decide.

Bytes from the client go through ``RequestReader`` (stream.py), are rewritten by rewrite.py and
written to an ``UpstreamConnection`` (upstream.py); the answer comes back the same way. The
request and its answer are one ``Exchange`` (exchange.py, whose rules are stated on top of it):
this module holds at most one, moves bytes, keeps deadlines and counts. The reader stops at
every message boundary, so a pipelined request waits in it as bytes until the exchange before
it has ended: there is no queue of events here.

Only what a keep-alive request runs through lives here. Each rarer path is a module of its own
with its rules on top, called at one point, taking this connection as an explicit argument
typed by a Protocol that lists what it uses (the public methods below and the slots):
pinning.py (the sticky cookie), waiting.py (a server at its maxconn), recovery.py (connects,
retries, replays, timeouts), answers.py (zdlb's own answers, the access log), splicing.py (a
body spliced: a ``BodyDetour``) and switch.py (a ``101``: a ``ProtocolSwitch``, then a pump).
None imports this module. A detour holds the sockets for a while (``Detour``: ``poll()`` when a
write buffer may have emptied, ``stop()``, ``take_activity()``) and calls back once.

Why protocols and callbacks, not streams and a coroutine per request: through a proxy every
request already costs ~15 us of kernel time on loopback, and a Task plus coroutine per upstream
connect measured ~42 us on its own (PERFORMANCE.md). Writes are coalesced: each readiness event
produces at most one ``transport.write`` per direction. The hot path has a budget of ~30 Python
calls per keep-alive request, builtins included (benchmarks/opcodes.py counts its instructions):
the decisions are called once per exchange, counters are attribute increments. Deadlines are
not timer handles: one ``deadline`` per connection, enforced by ``Route.sweep`` (route.py).
"""

from __future__ import annotations

import asyncio
import socket
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, cast

from zdlb.balancer.queue import slot_freed
from zdlb.errors import DownstreamProtocolError
from zdlb.http import handover, rewrite
from zdlb.http.answers import fail, log_access, reject
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
    Exchange,
    body_deadline,
)
from zdlb.http.head import BY_CLOSE, BY_LENGTH, CHUNKED, NO_BODY, Headers, RequestHead, ResponseHead
from zdlb.http.pinning import pin, select_sticky
from zdlb.http.recovery import connect, deadline_passed, upstream_lost
from zdlb.http.splicing import Detour, count_request_splice, splice_request, splice_response
from zdlb.http.stream import RequestReader
from zdlb.http.switch import start_switch, switch_protocols
from zdlb.http.upgrade import Tunnel
from zdlb.http.waiting import leave_queue, slot_granted, wait_for_slot
from zdlb.stats import RESPONSE_TIME_BOUNDS_S

if TYPE_CHECKING:
    from zdlb.balancer.queue import Ticket
    from zdlb.balancer.server import Server
    from zdlb.http.route import Destination, Route
    from zdlb.http.upstream import ServerConnections, UpstreamConnection

_NO_TRAILERS: Headers = []  # never appended to: response_end only reads trailers
_FIRST_BOUND_S = RESPONSE_TIME_BOUNDS_S[0]


class ClientConnection(asyncio.Protocol):
    """One client (downstream) connection: reads requests, forwards them, relays answers.

    Its callbacks are the ones asyncio (``asyncio.Protocol``), its reader (``RequestSink``), its
    upstream connection (``UpstreamOwner``), its route (``ListenedConnection``) and a queue
    (``Waiter``) call. The helper modules use its slots and its public methods; the Protocol
    on top of each (``Answering``, ``Pinned``, ``Waiting``, ``Recovering``, ``Splicing``,
    ``Switching``, ``Handed``) lists what it uses, and mypy checks that this class fits them.
    """

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
            # (finish_exchange): this read resumes it.
            reader.feed(data, phase is IDLE)
        except DownstreamProtocolError as exc:
            reject(self, exc)
            return
        if phase is IDLE and self.phase is IN_HEAD:  # a head began, and is not whole
            # Its deadline, armed after the read: a whole head sets the exchange's own (one
            # clock read less per request).
            self.deadline = self.loop.time() + self.route.timeouts.http_request_s
        if phase is IN_EXCHANGE:  # body bytes: the client's pace (exchange.py, rule 7)
            exchange = self.exchange
            if exchange is not None:
                self.arm_exchange_deadline(exchange)
        if reader.held:  # bytes past a request still being answered: stop reading more
            self.pause(PAUSED_NEXT_REQUEST)
        # _flush_both, inlined: once per read.
        exchange = self.exchange
        if exchange is not None and exchange.ubuf:
            self.flush_upstream(exchange)
        if self.wbuf or self.close_after_write:
            self.flush_client()

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
            self.drop_upstream(exchange)  # an answer was still coming: unusable
            self.end_server_request(exchange)
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
                fail(self, exchange, *picked.answer(head))
                return
            dest = picked
        self.dest = dest
        now = self.loop.time()
        self.deadline = now + dest.server_s
        sticky = dest.sticky  # choosing the server, inlined: a method costs a call per request
        if sticky is not None and sticky.marker in head.raw:  # the client names its host
            server = select_sticky(self, exchange, sticky, now)
        else:
            server = dest.backend.select(now, self.client_ip)
            if sticky is not None and server is not None:
                token = self.user_token
                if token:  # pin()'s common case, inlined: this connection's user is known
                    before, after = sticky.token_lines[server.identity]
                    exchange.set_cookie = before + token + after
                else:
                    exchange.set_cookie = pin(self, sticky, server.identity, None)
        if server is None:
            fail(self, exchange, 503)
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
                # server, the rest goes by splice (splicing.py, rule 2).
                exchange.splice_request = True
                self.pause(PAUSED_DETOUR)
        if server.inflight >= server.maxconn:  # at its maxconn: wait (balancer/queue.py)
            wait_for_slot(self, exchange, server, now)
            return
        self.use_server(exchange, server, pool)
        upstream = exchange.upstream
        if framing is NO_BODY and upstream is not None and upstream.transport is not None:
            # The whole request, on a pooled connection: written now. flush_upstream's work
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

    def arm_exchange_deadline(self, exchange: Exchange) -> None:
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
        self.arm_exchange_deadline(exchange)  # now the server's turn
        if exchange.upstream is not None:
            self.flush_upstream(exchange)  # before a pooled connection can be released

    # --- choosing a server and connecting ----------------------------------------------------

    def queue_granted(self, ticket: Ticket, server: Server) -> None:
        """balancer/queue.py reserved a slot on ``server`` for this connection: take it in a
        callback of its own (waiting.py, rule 2)."""
        self.loop.call_soon(slot_granted, self, ticket, server)

    def use_server(self, exchange: Exchange, server: Server, pool: ServerConnections) -> None:
        """Send ``exchange`` to ``server``: an idle pooled connection if reuse allows, else a
        new one (recovery.py)."""
        exchange.server = server
        server.inflight += 1  # Server.request_started(), inlined: once per request
        pool.stats.requests += 1
        head = exchange.request
        dest = self.dest
        # may_reuse (exchange.py, rule 3), resolved for this backend once by the route.
        if (dest.reuse_later if self.answered else dest.reuse_first) and head.upgrade is None:
            upstream = pool.acquire(self, head.method == b"HEAD")
            if upstream is not None:  # attach's rest, inlined: nothing paused for a connect
                exchange.upstream = upstream
                if self.writes_paused:
                    upstream.pause_reading()
                return
        connect(self, exchange, pool)

    def attach(self, exchange: Exchange, upstream: UpstreamConnection) -> None:
        """``upstream``, newly connected, carries ``exchange``."""
        head = exchange.request
        exchange.upstream = upstream
        upstream.attach(self, head.method == b"HEAD", head.upgrade is not None)
        if self.writes_paused:
            upstream.pause_reading()
        if self.paused & PAUSED_CONNECTING:
            self.resume(PAUSED_CONNECTING)

    def _send_upstream(self, exchange: Exchange, data: bytes) -> None:
        exchange.ubuf.append(data)
        exchange.ubuf_bytes += len(data)
        if exchange.upstream is None and exchange.ubuf_bytes > MAX_PENDING_BYTES:
            self.pause(PAUSED_CONNECTING)

    def flush_upstream(self, exchange: Exchange) -> None:
        """Write what ``exchange`` holds for its server, kept for a replay (exchange.py, rule 4)."""
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
            splice_request(self, exchange, upstream)

    # --- the server's answer: ResponseSink and UpstreamOwner ------------------------------

    def response_head(self, head: ResponseHead) -> None:
        exchange = self.exchange
        assert exchange is not None
        request = exchange.request
        if head.status == 101:  # head.py lets it through only to an upgrade request
            switch_protocols(self, exchange, head)
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
        # answers.fail, calls it; tests/unit/test_exchange.py checks that the two agree.
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
        answer, so response_end and flush_client are inlined: written at once, its upstream
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
        # response_end's pooling, repeated rather than called: a call here is one of a request's
        # ~30 and ~0.2 us of CPU under load (README, Performance). Keep the two in step.
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
        self.finish_exchange(exchange)

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
        self.finish_exchange(exchange)

    def upstream_flushed(self) -> None:
        """The server's bytes of one read were all handled: write the client's share."""
        exchange = self.exchange
        if self.phase is IN_EXCHANGE:
            self.deadline = self.loop.time() + self.dest.server_s
        self.flush_client()
        if exchange is None or self.detour is not None or self.tunnel is not None:
            return
        if exchange.status == 101:
            start_switch(self, exchange)
        elif exchange.splice_response:
            splice_response(self, exchange)

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        exchange = self.exchange
        if exchange is not None and conn is exchange.upstream:
            upstream_lost(self, exchange, conn, exc)  # recovery.py, rule 3

    def pause_upstream_writes(self) -> None:
        self.pause(PAUSED_UPSTREAM_FULL)
        exchange = self.exchange
        if exchange is not None:
            self.arm_exchange_deadline(exchange)  # the server is slow, not the client

    def resume_upstream_writes(self) -> None:
        if self.detour is not None:
            self.loop.call_soon(self._poll_detour)  # see ProtocolSwitch.poll
        self.resume(PAUSED_UPSTREAM_FULL)
        exchange = self.exchange
        if exchange is not None:
            self.arm_exchange_deadline(exchange)

    # --- ending an exchange ------------------------------------------------------------------

    def finish_exchange(self, exchange: Exchange) -> None:
        """``exchange`` is answered (or cut): count it, free its server, and go on to the next
        request, idle, or close (its ``keep_alive``)."""
        route = self.route
        detour = self.detour
        if detour is not None:  # answered before the request body was all spliced
            self.detour = None
            count_request_splice(self, exchange, detour.stop())
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
            log_access(self.client_ip, exchange, status)
        if server is not None:
            exchange.server = None
            server.inflight -= 1  # Server.request_finished(), inlined: once per request
            if server.waitq is not None:
                slot_freed(server, self.loop.time())
        elif exchange.ticket is not None:
            leave_queue(exchange)
        self.answered += 1
        reader = self.reader
        route.stats.bytes_in += reader.bytes_read  # counted by the reader, published here
        reader.bytes_read = 0
        # Not `or route.is_stopping`: an answer whose head promised keep-alive before a stop
        # began must not be followed by a close its client cannot expect (the next request
        # would be lost); the connection idles, and its next answer says close.
        if not exchange.keep_alive:
            self.close_when_written()
            self.flush_client()
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
            self.flush_client()

    def _next_request(self) -> None:
        """Parse what the reader held past the last request (data_received's work)."""
        if self.phase is CLOSING or self.exchange is not None:
            return
        reader = self.reader
        try:
            reader.resume()
        except DownstreamProtocolError as exc:
            reject(self, exc)
            return
        if not reader.held:
            self.resume(PAUSED_NEXT_REQUEST)
        self._flush_both()

    def _flush_both(self) -> None:
        """Write what parsing the client's bytes queued for the server and for the client."""
        exchange = self.exchange
        if exchange is not None and exchange.ubuf:
            self.flush_upstream(exchange)
        if self.wbuf or self.close_after_write:
            self.flush_client()

    def end_server_request(self, exchange: Exchange) -> None:
        """Give back ``exchange``'s server slot (or its place in a queue)."""
        server = exchange.server
        if server is not None:
            exchange.server = None
            server.inflight -= 1  # Server.request_finished(), inlined: once per request
            if server.waitq is not None:
                slot_freed(server, self.loop.time())
        elif exchange.ticket is not None:
            leave_queue(exchange)

    def drop_upstream(self, exchange: Exchange) -> None:
        """Abort ``exchange``'s upstream connection: what it carried is unusable."""
        upstream = exchange.upstream
        if upstream is not None:
            exchange.upstream = None
            upstream.owner = None
            upstream.abort()

    def close_when_written(self) -> None:
        """The connection's last answer is decided: close once it is written."""
        self.phase = CLOSING
        self.close_after_write = True
        # transport.close() still flushes: bound how long a client that does not read may hold
        # the socket.
        self.deadline = self.loop.time() + self.route.timeouts.client_s

    def flush_client(self) -> None:
        """Write what is queued for the client in one piece (then close, if decided)."""
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

    def _poll_detour(self) -> None:
        if self.detour is not None:
            self.detour.poll()

    def pause(self, reason: int) -> None:
        """Stop reading the client for ``reason`` (a ``PAUSED_*`` bit)."""
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        """``reason`` is gone: read the client again if no other reason is left."""
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and self.phase is not CLOSING:
            self.transport.resume_reading()

    def deadline_passed(self) -> None:
        """Called by ``Route.sweep``: the current wait took longer than its timeout."""
        deadline_passed(self)  # recovery.py, rule 4

    # --- changing hands (handover.py): Route's and the daemon's calls -------------------------

    def move_to(self, route: Route) -> None:
        handover.move_to(self, route)

    def detach_idle(self) -> socket.socket | None:
        return handover.detach_idle(self)

    def continue_keep_alive(self) -> None:
        handover.continue_keep_alive(self)

    def close_when_idle(self) -> None:
        if self.phase is IDLE:
            self.close_now()

    def close_now(self) -> None:
        """Close, flushing what the transport holds."""
        self.phase = CLOSING
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Reset the client connection (or its tunnel), now."""
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.pump.abort()
            return
        detour, self.detour = self.detour, None
        if detour is not None:  # its fds first: the transport closes the socket
            detour.stop()
        if self.transport is not None:
            self.transport.abort()
