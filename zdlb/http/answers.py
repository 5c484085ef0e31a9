"""Answers zdlb writes itself, and the access log line of every exchange.

An answer comes from zdlb rather than a server when no server can give one: a redirect or no
matching route (http/routing.py), no usable server (503), a server that failed before its answer
began (502, 504: exchange.py, rule 6), or a client that broke the protocol (its own status:
400, 408, 414, 431, 501, 505). The rules:

1. ``fail`` answers an exchange whose answer has not started: the keep-alive decision is
   ``keeps_alive`` (exchange.py, rule 2), so the client connection goes on when it may.
2. ``reject`` answers a protocol error and always closes: the client's bytes can no longer be
   framed. If the server's answer had already started, the client learns it by the close.
3. Each ends the exchange through the connection's ``finish_exchange``, which counts the
   status, logs the access line and frees the server slot: nothing is counted here.

The functions take the client connection (``Answering``, the part of http/connection.py's
``ClientConnection`` they use) as an explicit argument; they run only off the hot path, except
``log_access``, which runs once per exchange when the access log is on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

from zdlb.http import rewrite
from zdlb.http.exchange import keeps_alive

if TYPE_CHECKING:
    from zdlb.errors import DownstreamProtocolError
    from zdlb.http.exchange import Exchange
    from zdlb.http.route import Route
    from zdlb.http.stream import RequestReader

log = logging.getLogger(__name__)
access_log = logging.getLogger("zdlb.access")


class Answering(Protocol):
    """What answering needs of a client connection."""

    route: Route
    reader: RequestReader
    client_ip: bytes
    client_done: bool
    exchange: Exchange | None
    wbuf: list[bytes]

    def finish_exchange(self, exchange: Exchange) -> None: ...
    def drop_upstream(self, exchange: Exchange) -> None: ...
    def close_when_written(self) -> None: ...
    def flush_client(self) -> None: ...


def fail(conn: Answering, exchange: Exchange, status: int, location: bytes | None = None) -> None:
    """Answer ``status`` (a redirect to ``location``) to an exchange whose answer has not
    started, and end it (rule 1)."""
    request = exchange.request
    keep_alive = exchange.keep_alive = keeps_alive(
        request,
        exchange.request_done,
        False,
        conn.route.is_stopping,
        conn.client_done,
        request.upgrade is not None and bool(conn.reader.held),
    )
    exchange.status = status
    conn.wbuf.append(rewrite.error_response(status, close=not keep_alive, location=location))
    conn.finish_exchange(exchange)


def reject(conn: Answering, exc: DownstreamProtocolError) -> None:
    """The client broke the protocol: answer ``exc.status`` if no answer started, and close
    (rule 2)."""
    log.info("bad_request client=%s status=%d error=%s", conn.client_ip.decode(), exc.status, exc)
    exchange = conn.exchange
    if exchange is None:  # refused before any head was accepted
        route = conn.route
        conn.wbuf.append(rewrite.error_response(exc.status))
        route.stats.responses[exc.status // 100] += 1
        if route.log_access:
            log_access(conn.client_ip, None, exc.status)
        conn.close_when_written()
        conn.flush_client()
    else:
        conn.drop_upstream(exchange)
        if not exchange.response_started:
            conn.wbuf.append(rewrite.error_response(exc.status))
        exchange.status = exc.status
        exchange.keep_alive = False
        conn.finish_exchange(exchange)


def log_access(client_ip: bytes, exchange: Exchange | None, status: int) -> None:
    """One ``zdlb.access`` line for an exchange (None: a request refused before its head was
    whole). Sizes in bytes, times in milliseconds."""
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
        client_ip.decode(),
        method,
        target,
        status,
        size,
        server.name if server else "-",
        server.pool.value if server else "-",
        elapsed_ms,
    )
