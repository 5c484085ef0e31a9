"""The ``/metrics`` listener: one strict HTTP/1.1 request per connection, answered, closed.

A scraper asks every few seconds; nobody else should be talking here, so this is not the proxy's
hot path and takes no shortcut with the protocol: h11 parses the request (and refuses what is
malformed with 400), only ``GET`` and ``HEAD`` of ``/metrics`` are served (404 for another
path, 405 for another method), and every answer ends with ``Connection: close``. Each
connection lives under one deadline: a client that has not sent a whole request by then gets
408 and is closed, one that does not read its answer is aborted. Requests are bounded in bytes
and clients in number, so a port scan or a slowloris costs a few buffers, not the daemon.

The body is ``prometheus_client``'s text format, or OpenMetrics when the ``Accept`` header asks
for it (prometheus-client's own ``choose_encoder`` decides). It is generated on the event loop,
because a thread would read the live counters while the loop changes them. Measured on the
benchmark box: 0.65 ms for one listener and 4 servers (164 lines), 12 ms for 10 listeners, 10
backends and 100 servers (2,354 lines), four fifths of it in prometheus-client's text
rendering; once per scrape interval, that is a pause, not a load.
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
from typing import cast

import h11
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from zdlb.config.model import Address
from zdlb.tcp.listener import bind_listener, bound_address

log = logging.getLogger(__name__)

METRICS_PATH = b"/metrics"
# The whole exchange (request in, answer out) must finish within this. Prometheus's default
# scrape_timeout is 10 s; a scrape answered after 5 s is already a problem worth seeing as one.
DEFAULT_DEADLINE_S = 5.0
# A scraper's request is a request line and a few headers, well under 1 KiB; 8 KiB is nginx's
# request-line buffer (large_client_header_buffers 4 8k). Anything beyond is not a scraper.
MAX_REQUEST_BYTES = 8192
# Scrapers are a handful of Prometheus servers; more connections at once is a scan or a flood,
# and each one costs a buffer holding a whole scrape.
MAX_CLIENTS = 16
DEFAULT_BACKLOG = 64
_ALLOWED_METHODS = (b"GET", b"HEAD")


class MetricsEndpoint:
    """Serves ``registry`` at ``/metrics`` on ``listen``: an address to bind, or a socket that
    is already bound and listening (then the endpoint owns it and closes it).

    ``start()`` binds and serves; ``close()`` stops accepting and drops open connections;
    ``wait_closed()`` returns once they are gone.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        listen: Address | socket.socket,
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        self.registry = registry
        self.deadline_s = deadline_s
        self._listen = listen
        self._backlog = backlog
        self._sock: socket.socket | None = listen if isinstance(listen, socket.socket) else None
        self._server: asyncio.Server | None = None
        self._connections: set[_MetricsConnection] = set()
        self._no_connections = asyncio.Event()
        self._no_connections.set()

    def __repr__(self) -> str:
        where = self.address if self._sock is not None else self._listen
        return f"<MetricsEndpoint {where} connections={len(self._connections)}>"

    @property
    def address(self) -> Address:
        """The bound address (the real port when the config said 0). Only once started."""
        if self._sock is None:
            raise RuntimeError("the metrics endpoint is not started")
        return bound_address(self._sock)

    @property
    def connection_count(self) -> int:
        """Connections open now (accepted and not yet closed)."""
        return len(self._connections)

    async def start(self) -> None:
        """Bind (unless given a socket) and serve. Raises ListenerError if binding fails."""
        if self._sock is None:
            assert isinstance(self._listen, Address)
            self._sock = bind_listener(self._listen, self._backlog)
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _MetricsConnection(self, loop), sock=self._sock
            )
        except BaseException:
            self._sock.close()
            raise
        log.info("metrics_started addr=%s", self.address)

    def close(self) -> None:
        """Stop accepting and abort every open connection (a scrape in progress fails)."""
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self._sock.close()
        for conn in list(self._connections):
            conn.abort()

    async def wait_closed(self) -> None:
        """Return once ``close()`` took effect and every connection is gone."""
        if self._server is not None:
            await self._server.wait_closed()
        await self._no_connections.wait()

    def _opened(self, conn: _MetricsConnection) -> bool:
        if len(self._connections) >= MAX_CLIENTS:
            return False
        self._connections.add(conn)
        self._no_connections.clear()
        return True

    def _closed(self, conn: _MetricsConnection) -> None:
        self._connections.discard(conn)
        if not self._connections:
            self._no_connections.set()

    def render(self, accept: str) -> tuple[bytes, str]:
        """The scrape body and its Content-Type for an ``Accept`` header value."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _MetricsConnection(asyncio.Protocol):
    """One scraper connection: parse one request, answer it, close."""

    def __init__(self, endpoint: MetricsEndpoint, loop: asyncio.AbstractEventLoop) -> None:
        self._endpoint = endpoint
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        self._request: h11.Request | None = None
        self._received = 0
        self._is_answered = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        if not self._endpoint._opened(self):
            self._is_answered = True
            self._transport.abort()
            return
        self._timer = self._loop.call_later(self._endpoint.deadline_s, self._deadline_passed)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None
        self._endpoint._closed(self)

    def data_received(self, data: bytes) -> None:
        if self._is_answered:
            return  # a pipelined second request, or a body we will not read: dropped
        # h11 only bounds an incomplete head; a whole oversized request arriving in one read
        # would pass. So it is fed no more than the limit, and over it, it answers 431/413.
        room = MAX_REQUEST_BYTES - self._received
        self._received += len(data)
        if room > 0:  # never feed b"": h11 reads that as the end of the stream
            self._parser.receive_data(data if len(data) <= room else data[:room])
        self._process()

    def eof_received(self) -> bool:
        if not self._is_answered:
            self._parser.receive_data(b"")
            self._process()
        return False  # close once what was written is sent

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _process(self) -> None:
        while not self._is_answered:
            try:
                event = self._parser.next_event()
            except h11.RemoteProtocolError as exc:
                self._answer_error(exc.error_status_hint)
                return
            if event is h11.NEED_DATA:
                if self._received > MAX_REQUEST_BYTES:
                    self._answer_error(431 if self._request is None else 413)
                return
            if isinstance(event, h11.Request):
                self._request = event
                if _declared_length(event) > MAX_REQUEST_BYTES:
                    self._answer_error(413)  # refused before its body is read
            elif isinstance(event, h11.EndOfMessage):
                assert self._request is not None  # h11 gives a Request first
                self._answer_request(self._request)
            elif isinstance(event, h11.ConnectionClosed):
                self._is_answered = True  # closed before sending anything: nobody to answer
                if self._transport is not None:
                    self._transport.close()

    def _answer_request(self, request: h11.Request) -> None:
        path = request.target.partition(b"?")[0]
        if path != METRICS_PATH:
            self._answer_error(404)
            return
        if request.method not in _ALLOWED_METHODS:
            self._answer_error(405, [(b"Allow", b", ".join(_ALLOWED_METHODS))])
            return
        accept = b", ".join(value for name, value in request.headers if name == b"accept")
        try:
            body, content_type = self._endpoint.render(accept.decode("latin-1"))
        except Exception:
            # A bug in a collector or its source: one scrape fails, the daemon goes on.
            log.exception("metrics_failed")
            self._answer_error(500)
            return
        self._answer(200, content_type.encode(), body, is_head=request.method == b"HEAD")

    def _answer_error(self, status: int, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        phrase = http.HTTPStatus(status).phrase
        self._answer(status, b"text/plain; charset=utf-8", f"{phrase}\n".encode(), headers=headers)

    def _answer(
        self,
        status: int,
        content_type: bytes,
        body: bytes,
        *,
        is_head: bool = False,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self._is_answered = True
        transport = self._transport
        if transport is None:
            return
        phrase = http.HTTPStatus(status).phrase.encode()
        lines = [
            b"HTTP/1.1 %d %s" % (status, phrase),
            b"Content-Type: " + content_type,
            b"Content-Length: %d" % len(body),
            b"Connection: close",
            *(name + b": " + value for name, value in headers or ()),
        ]
        # HEAD: the same head as GET, Content-Length included, and no body (RFC 9110 9.3.2).
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if is_head else body))
        transport.close()

    def _deadline_passed(self) -> None:
        if self._is_answered:
            self.abort()  # the answer was not read in time
            return
        self._answer_error(408)
        # The 408 still has to be flushed; a client that does not read it is aborted later.
        self._timer = self._loop.call_later(self._endpoint.deadline_s, self.abort)


def _declared_length(request: h11.Request) -> int:
    """The request's Content-Length; 0 without one (h11 has already refused a bad one)."""
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return 0
