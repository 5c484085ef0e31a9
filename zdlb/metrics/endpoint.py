"""The ``/metrics`` listener: one strict HTTP/1.1 request per connection, answered, closed.

A scraper asks every few seconds, the status page once a second per open tab; this is not the
proxy's hot path and takes no shortcut with the protocol: h11 parses the request (and refuses
what is malformed with 400), only ``GET`` and ``HEAD`` of ``/metrics`` are served -- and, with
a ``StatusBoard``, of ``/`` and ``/status`` (the page, metrics/status.html) and
``/status.json`` (the document it polls) -- 404 for another path, 405 for another method; and
``POST /status/action`` only when write actions are on (metrics/actions.py says who may).
Every answer ends with ``Connection: close``. Each
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
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import cast

import h11
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from zdlb.config.model import Address
from zdlb.metrics.actions import Action, ActionRefused, check_request, parse_action
from zdlb.metrics.status import StatusBoard, page
from zdlb.tcp.listener import bind_listener, bound_address

log = logging.getLogger(__name__)

METRICS_PATH = b"/metrics"
PAGE_PATHS = (b"/", b"/status")
STATUS_JSON_PATH = b"/status.json"
ACTION_PATH = b"/status/action"
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
_JSON = b"application/json"
# Every status answer is live: no cache may keep one.
_NO_STORE = (b"Cache-Control", b"no-store")

# Runs a write action; returns the HTTP status and a JSON-able reply. Must not raise but
# ActionRefused (daemon glue maps control errors to it).
ActionRunner = Callable[[Action], Awaitable[tuple[int, dict[str, object]]]]


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
        status: StatusBoard | None = None,
        run_action: ActionRunner | None = None,
    ) -> None:
        self.registry = registry
        self.status = status
        self.run_action = run_action  # None: write actions are off (404)
        self._page = page() if status is not None else None
        self._actions: set[asyncio.Task[None]] = set()
        self._slider: asyncio.Task[None] | None = None
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
        if self.status is not None:
            self._slider = loop.create_task(self.status.slide_census_forever())
        log.info("metrics_started addr=%s", self.address)

    def close(self) -> None:
        """Stop accepting and abort every open connection (a scrape in progress fails)."""
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self._sock.close()
        for conn in list(self._connections):
            conn.abort()
        for task in self._actions:
            task.cancel()
        if self._slider is not None:
            self._slider.cancel()

    async def wait_closed(self) -> None:
        """Return once ``close()`` took effect and every connection is gone."""
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.gather(*self._actions, return_exceptions=True)
        if self._slider is not None:
            await asyncio.gather(self._slider, return_exceptions=True)
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

    def status_page(self) -> tuple[bytes, bytes] | None:
        """The page and its Content-Security-Policy, or None without a status board."""
        return self._page

    def status_json(self) -> bytes | None:
        """The /status.json body, or None without a status board."""
        if self.status is None:
            return None
        return json.dumps(self.status.document(), separators=(",", ":")).encode()

    def _start_action(self, conn: _MetricsConnection, action: Action) -> None:
        """Run ``action`` in a task this endpoint owns; ``conn`` gets the answer."""
        assert self.run_action is not None
        task = asyncio.get_running_loop().create_task(self._action(conn, action))
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)

    async def _action(self, conn: _MetricsConnection, action: Action) -> None:
        assert self.run_action is not None
        try:
            status, reply = await self.run_action(action)
        except ActionRefused as exc:
            status, reply = exc.status, {"error": exc.reason}
        conn.answer_json(status, reply)


class _MetricsConnection(asyncio.Protocol):
    """One scraper connection: parse one request, answer it, close."""

    def __init__(self, endpoint: MetricsEndpoint, loop: asyncio.AbstractEventLoop) -> None:
        self._endpoint = endpoint
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        self._request: h11.Request | None = None
        self._body = bytearray()  # a POST's body; bounded by MAX_REQUEST_BYTES (data_received)
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
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self._request is not None  # h11 gives a Request first
                self._answer_request(self._request)
                return  # an action's answer comes later, from its task
            elif isinstance(event, h11.ConnectionClosed):
                self._is_answered = True  # closed before sending anything: nobody to answer
                if self._transport is not None:
                    self._transport.close()

    def _answer_request(self, request: h11.Request) -> None:
        path = request.target.partition(b"?")[0]
        endpoint = self._endpoint
        if path == ACTION_PATH and endpoint.run_action is not None:
            self._answer_action(request)
            return
        page = endpoint.status_page()
        is_status = page is not None and (path in PAGE_PATHS or path == STATUS_JSON_PATH)
        if path != METRICS_PATH and not is_status:
            self._answer_error(404)
            return
        if request.method not in _ALLOWED_METHODS:
            self._answer_error(405, [(b"Allow", b", ".join(_ALLOWED_METHODS))])
            return
        if is_status:
            self._answer_status(path, is_head=request.method == b"HEAD")
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

    def _answer_status(self, path: bytes, *, is_head: bool) -> None:
        if path == STATUS_JSON_PATH:
            try:
                body = self._endpoint.status_json()
            except Exception:
                log.exception("status_failed")  # as a scrape: one answer fails, not the daemon
                self._answer_error(500)
                return
            assert body is not None
            self._answer(200, _JSON, body, is_head=is_head, headers=[_NO_STORE])
            return
        page = self._endpoint.status_page()
        assert page is not None
        html, policy = page
        headers = [
            _NO_STORE,
            (b"Content-Security-Policy", policy),
            (b"X-Content-Type-Options", b"nosniff"),
            (b"X-Frame-Options", b"DENY"),
        ]
        self._answer(200, b"text/html; charset=utf-8", html, is_head=is_head, headers=headers)

    def _answer_action(self, request: h11.Request) -> None:
        """POST /status/action: refused unless metrics/actions.py's rules hold, else run."""
        try:
            check_request(request.method, list(request.headers))
            action = parse_action(bytes(self._body))
        except ActionRefused as exc:
            headers = [(b"Allow", b"POST")] if exc.status == 405 else []
            self.answer_json(exc.status, {"error": exc.reason}, headers)
            return
        self._is_answered = True  # nothing more is read; the task answers
        self._endpoint._start_action(self, action)

    def answer_json(
        self,
        status: int,
        reply: dict[str, object],
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer with ``reply`` as JSON (an action's result or refusal)."""
        body = json.dumps(reply).encode()
        self._answer(status, _JSON, body, headers=[_NO_STORE, *(headers or ())])

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
