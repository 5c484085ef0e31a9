"""Connecting to a server, and what an exchange does when its server fails or a wait runs out.

The decisions are exchange.py's (replay: rule 4, retry target: rule 5, statuses: rule 6, waits:
rule 7); this module applies them for a client connection (``Recovering``), which it takes as
an explicit argument. The rules of application:

1. A connect runs as a task under ``connect_s``; meanwhile the client is read until
   ``MAX_PENDING_BYTES`` are held (then ``PAUSED_CONNECTING``). A connect that completes for an
   exchange that is gone, or went elsewhere, leaves its connection in the pool, warm.
2. A failed connect, or a connect past ``connect_s``, counts against the server (its
   ``connect_errors``, its health observation) and the request goes to the retry target, else
   502.
3. An upstream connection lost before any byte of answer: the request is replayed if
   exchange.py's rule 4 allows (on the same server for a stale pooled connection, else
   elsewhere as a failed connect), else answered 502 (or an upstream protocol error's
   status). Lost during the answer: the client learns it by a close, unless the body was
   close-delimited (then that was its end).
4. A passed deadline is judged by the phase (exchange.py, rule 7): an idle keep-alive
   connection closes quietly, a new one or an incomplete head gets 408. A timed-out exchange
   by whose turn it was: the queue's (503 with Retry-After), the client's body (408), a
   splice still moving bytes (re-armed), the server's (504, or a close once the answer
   began).
5. Failures are logged once per burst per server (``ServerConnections.failures_to_log``).

Nothing here runs on the keep-alive path: only for a new upstream connection, a failure, or a
passed deadline.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from zdlb.errors import (
    DownstreamProtocolError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from zdlb.http import rewrite
from zdlb.http.answers import Answering, fail, reject
from zdlb.http.exchange import (
    MAX_PENDING_BYTES,
    PAUSED_CONNECTING,
    Phase,
    Replay,
    replay_after_loss,
    retry_target,
    status_for_upstream_failure,
)
from zdlb.http.pinning import pin
from zdlb.http.waiting import leave_queue

if TYPE_CHECKING:
    import asyncio

    from zdlb.balancer.server import Server
    from zdlb.http.exchange import Exchange
    from zdlb.http.route import Destination
    from zdlb.http.splicing import Detour
    from zdlb.http.upstream import ServerConnections, UpstreamConnection

log = logging.getLogger(__name__)


class Recovering(Answering, Protocol):
    """What connecting and failing need of a client connection, beyond answering."""

    loop: asyncio.AbstractEventLoop
    dest: Destination
    user_token: bytes
    deadline: float
    paused: int
    detour: Detour | None
    phase: Phase
    answered: int

    def pause(self, reason: int) -> None: ...
    def abort(self) -> None: ...
    def close_now(self) -> None: ...
    def arm_exchange_deadline(self, exchange: Exchange) -> None: ...
    def attach(self, exchange: Exchange, upstream: UpstreamConnection) -> None: ...
    def use_server(self, exchange: Exchange, server: Server, pool: ServerConnections) -> None: ...
    def end_server_request(self, exchange: Exchange) -> None: ...
    def flush_upstream(self, exchange: Exchange) -> None: ...


def connect(conn: Recovering, exchange: Exchange, pool: ServerConnections) -> None:
    """Open a new connection to ``pool``'s server for ``exchange`` (rule 1)."""
    if exchange.ubuf_bytes > MAX_PENDING_BYTES:
        conn.pause(PAUSED_CONNECTING)
    # The connect's own deadline (connect_s), enforced by the sweep: exchange_timed_out.
    conn.deadline = conn.loop.time() + pool.connect_s
    exchange.connect_task = conn.loop.create_task(_open(conn, exchange, pool))


async def _open(conn: Recovering, exchange: Exchange, pool: ServerConnections) -> None:
    try:
        upstream = await pool.connect(conn.loop)
    except UpstreamError as exc:
        exchange.connect_task = None
        connect_failed(conn, exchange, pool.server, exc)
        return
    exchange.connect_task = None
    if conn.exchange is not exchange or exchange.server is not pool.server:
        pool.release(upstream, conn.loop.time())  # rule 1: the client left meanwhile
        return
    conn.arm_exchange_deadline(exchange)
    conn.attach(exchange, upstream)
    conn.flush_upstream(exchange)


def connect_failed(
    conn: Recovering, exchange: Exchange, server: Server, exc: UpstreamError
) -> None:
    """Count a failed connect against ``server`` and retry elsewhere (rule 2)."""
    pool = conn.dest.upstreams[server.name]
    pool.stats.connect_errors += 1
    if server.is_observed:
        conn.route.observe(server, False)
    if count := pool.failures_to_log(conn.loop.time()):
        log.warning(
            "upstream_connect_failed server=%s failures=%d error=%s", server.name, count, exc
        )
    retry_elsewhere(conn, exchange, server, exc)


def retry_elsewhere(
    conn: Recovering, exchange: Exchange, server: Server, exc: UpstreamError
) -> None:
    """Send the request to another server (exchange.py, rule 5), or answer 502/504."""
    dest = conn.dest
    conn.end_server_request(exchange)
    exchange.tried += (server,)
    now = conn.loop.time()
    retry = retry_target(
        server,
        exchange.tried,
        dest.retries,
        lambda exclude: dest.backend.select(now, conn.client_ip, exclude),
    )
    if retry is None:
        fail(conn, exchange, status_for_upstream_failure(exc, answering=False))
        return
    dest.backend_stats.redispatches += 1
    head = exchange.request
    pool = dest.upstreams[retry.name]
    if not head.has_host:  # the stand-in Host names the server
        exchange.ubuf[0] = rewrite.build_request_head(
            head, conn.client_ip, conn.route.proto, pool.host_header
        )
    sticky = dest.sticky
    if sticky is not None and retry.identity != exchange.identity:
        exchange.set_cookie = pin(conn, sticky, retry.identity, None)
    conn.use_server(exchange, retry, pool)
    conn.flush_upstream(exchange)  # a pooled connection is attached at once: send now


def upstream_lost(
    conn: Recovering, exchange: Exchange, upstream: UpstreamConnection, exc: Exception | None
) -> None:
    """``exchange``'s upstream connection closed or failed (rule 3)."""
    if exchange.response_started:
        if not upstream.reader.feed_eof():  # not a close-delimited body: the answer is cut
            exchange.upstream = None
            exchange.status = exchange.status or 502
            exchange.keep_alive = False
            conn.finish_exchange(exchange)
        conn.flush_client()
        return
    exchange.upstream = None
    server = exchange.server
    assert server is not None
    replay = exchange.replay
    match replay_after_loss(
        upstream.got_data, replay is not None, upstream.reused, exchange.retried_stale
    ):
        case Replay.SAME_SERVER | Replay.OTHER_SERVER as how:
            assert replay is not None
            exchange.retried_stale = exchange.retried_stale or upstream.reused
            exchange.ubuf[:0] = replay
            exchange.ubuf_bytes = sum(len(b) for b in exchange.ubuf)
            exchange.replay, exchange.replay_bytes = [], 0
            if how is Replay.SAME_SERVER:
                conn.dest.backend_stats.retries += 1
                connect(conn, exchange, conn.dest.upstreams[server.name])
            else:
                connect_failed(conn, exchange, server, UpstreamReset("closed without an answer"))
            return
        case Replay.NO:
            pass
    status = exc.status if isinstance(exc, UpstreamProtocolError) else 502
    if server.is_observed:
        conn.route.observe(server, False)
    if count := conn.dest.upstreams[server.name].failures_to_log(conn.loop.time()):
        log.warning(
            "upstream_failed server=%s failures=%d status=%d error=%s",
            server.name,
            count,
            status,
            exc,
        )
    fail(conn, exchange, status)


def deadline_passed(conn: Recovering) -> None:
    """The connection's current wait passed its deadline (exchange.py, rule 7)."""
    match conn.phase:
        case Phase.IDLE if conn.answered or conn.route.is_stopping:
            conn.close_now()  # keep-alive: a quiet close
        case Phase.IDLE:
            reject(conn, DownstreamProtocolError("no request", 408))
        case Phase.CLOSING:
            conn.abort()
        case Phase.TUNNEL:
            pass  # its deadline is the tunnel's, enforced by Route.sweep
        case Phase.HEAD:
            reject(conn, DownstreamProtocolError("request head timed out", 408))
        case Phase.EXCHANGE:
            assert conn.exchange is not None
            _exchange_timed_out(conn, conn.exchange)


def _exchange_timed_out(conn: Recovering, exchange: Exchange) -> None:
    """An exchange's wait passed its deadline: whose turn it was decides (rule 4)."""
    if exchange.ticket is not None:  # queue_s passed (exchange.py, rule 7)
        leave_queue(exchange)
        dest = conn.dest
        dest.backend_stats.queue_timeouts += 1
        exchange.request_done = False  # the body may still be coming: close after
        exchange.status = 503
        conn.wbuf.append(rewrite.error_response(503, retry_after=dest.retry_after))
        exchange.keep_alive = False
        conn.finish_exchange(exchange)
        return
    detour = conn.detour
    if detour is not None and detour.take_activity():
        conn.deadline = conn.loop.time() + conn.dest.server_s  # bytes still move
        return
    server = exchange.server
    task = exchange.connect_task
    if task is None and not exchange.request_done and not conn.paused:
        # The client's body stalled or crawled (rule 7): its fault, not the server's.
        reject(conn, DownstreamProtocolError("request body timed out", 408))
        return
    if exchange.response_started or server is None:
        exchange.keep_alive = False  # the answer was cut after it started: a close says so
        conn.finish_exchange(exchange)
        conn.abort()
        return
    if task is not None:  # the connect took longer than connect_s: as a failed connect
        exchange.connect_task = None
        task.cancel()
        address = server.address
        connect_failed(conn, exchange, server, UpstreamTimeout(f"connect to {address} timed out"))
        return
    if server.is_observed:
        conn.route.observe(server, False)
    if count := conn.dest.upstreams[server.name].failures_to_log(conn.loop.time()):
        log.warning("upstream_timeout server=%s failures=%d", server.name, count)
    conn.drop_upstream(exchange)
    exchange.request_done = False  # the client may still be sending: close after
    fail(conn, exchange, 504)
