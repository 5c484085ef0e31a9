"""Real upstream servers for network tests: one well-behaved echo server and the misbehaving ones.

Every server takes a TCP socket already bound to 127.0.0.1 port 0 and listening (the
``bound_socket`` fixture), so its port is known and held before any client can race for it, and
runs on the running test's event loop with an accept callback and connection tasks it owns.
``aclose()`` (or leaving ``async with``) cancels them all and closes every socket, so nothing
outlives the test and no ``ResourceWarning`` escapes. Counters and ``wait_*`` methods let tests
wait on what the server saw instead of sleeping; callers bound those waits with
``asyncio.timeout``.

The failure catalogue, and what a client (the proxy) sees:

- ``EchoServer``: well-behaved HTTP/1.1 via h11; answers 200 with JSON describing the request.
- refused: ``refused_address()``: a socket bound but never listening. The kernel answers a SYN
  to it with RST (``ECONNREFUSED``), and since the socket keeps the port bound nobody else can
  take it meanwhile. (Binding, closing, then connecting would race with any other process.)
- backlog-only: a ``bound_socket`` nobody accepts on: the TCP handshake completes in the
  kernel's backlog, then nothing is read or answered.
- ``SilentServer``: accepts, then never reads and never answers.
- ``GarbageServer``: reads the request, answers a malformed status line, closes.
- ``ResetServer``: sends the head and half the declared body, then resets (SO_LINGER 0).
- ``StaleKeepAliveServer``: answers keep-alive, then closes the connection anyway, either right
  after the answer or when the next request on it arrives (the pooled-connection race).
- ``DribbleServer``: sends a valid response one byte per interval.
- ``TruncatingServer``: sends the head and half the declared body, then closes cleanly (FIN).
- ``TcpEchoServer``: raw bytes echoed back; answers the peer's half-close with its own.

This module must not sleep to wait for readiness, mock a socket or the loop, or leave a task or a
socket behind after ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, assert_never

import h11

LOOPBACK = "127.0.0.1"
READ_CHUNK_BYTES = 65536
# Body pieces written per drain; also the largest chunk of a chunked response.
MAX_CHUNK_BYTES = 16384
# Connections accepted per readiness callback, like asyncio's own backlog-sized batches.
ACCEPT_BATCH = 16
# A connection idle this long (no request, or a stalled one) is closed by the server. Tests finish
# far sooner; the bound only keeps a forgotten client from pinning a task until the backstop.
DEFAULT_IDLE_S = 10.0
# The reset and truncating servers declare this much body and send half of it. Small enough that
# the half sits whole in the client's receive buffer before the RST, so the client reliably reads
# those bytes and then the reset (Linux keeps queued data readable ahead of the error).
DEFAULT_DECLARED_BODY_BYTES = 2048
# Byte-by-byte pace of the dribbling server: slow enough to be visible, fast enough that a
# 100-byte response takes a second.
DEFAULT_DRIBBLE_INTERVAL_S = 0.01
# A malformed status line: the protocol name is wrong and the status is not three digits.
DEFAULT_GARBAGE_REPLY = b"HTPT/1.1 two-hundred OK\r\ncontent-length: 0\r\n\r\n"
# Cap on x-respond-bytes so a typo cannot make the fixture allocate gigabytes.
MAX_RESPOND_BYTES = 64 * 1024 * 1024
_PATTERN = bytes(range(251))  # a prime length, so an offset error never lines up by accident


def pattern_bytes(size: int) -> bytes:
    """The body ``EchoServer`` sends for ``x-respond-bytes: size``: bytes 0..250, repeated."""
    return (_PATTERN * (size // len(_PATTERN) + 1))[:size]


def refused_address() -> tuple[socket.socket, tuple[str, int]]:
    """A loopback address where connections are refused, and the socket holding its port.

    The socket is bound but not listening, so a SYN gets RST. Close the socket when done.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    host, port = sock.getsockname()[:2]
    return sock, (host, port)


def set_linger_zero(writer: asyncio.StreamWriter) -> None:
    """Make the next close of this connection send RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """What a server read: headers as sent (original case), body length, which connection."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body_bytes: int
    conn_seq: int  # 1 for the server's first accepted connection

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)


class UpstreamServer:
    """Base of every fixture server: an owned accept callback and one tracked task per connection.

    Accepting happens synchronously in a reader callback, and each accepted socket is tracked
    until a connection task takes it over, so ``aclose()`` can never lose one in flight.
    Subclasses implement ``handle()``. ``accepted`` counts connections; ``requests`` lists what
    the servers that read requests have read; ``errors`` collects exceptions a handler raised
    other than a peer leaving, and ``aclose()`` re-raises them so a broken fixture fails its test.
    """

    def __init__(
        self, sock: socket.socket, *, name: str = "", idle_s: float = DEFAULT_IDLE_S
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.addr: tuple[str, int] = sock.getsockname()[:2]
        self.name = name or f"{type(self).__name__}:{self.addr[1]}"
        self.idle_s = idle_s
        self.accepted = 0
        self.requests: list[ReceivedRequest] = []
        self.errors: list[Exception] = []
        self._is_serving = False
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._unowned_socks: set[socket.socket] = set()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name} {self.addr[0]}:{self.addr[1]}"
            f" accepted={self.accepted} open={len(self._conn_tasks)}"
            f" requests={len(self.requests)}>"
        )

    @property
    def port(self) -> int:
        return self.addr[1]

    async def start(self) -> Self:
        """Start accepting on the running loop."""
        if not self._is_serving:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept_ready)
            self._is_serving = True
        return self

    async def aclose(self) -> None:
        """Stop accepting, cancel every connection task, and close every socket.

        Raises ``ExceptionGroup`` of ``errors`` if any handler failed.
        """
        if self._is_serving:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._is_serving = False
        tasks = [*self._conn_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in self._unowned_socks:
            sock.close()  # accepted, but its task was cancelled before it started
        self._unowned_socks.clear()
        self._sock.close()
        if self.errors:
            raise ExceptionGroup(f"{self.name} handler failed", self.errors)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def wait_accepted(self, count: int) -> None:
        """Return once at least ``count`` connections were accepted. Bound it with a timeout."""
        await self.wait_until(lambda: self.accepted >= count)

    async def wait_requests(self, count: int) -> None:
        """Return once at least ``count`` requests were read whole. Bound it with a timeout."""
        await self.wait_until(lambda: len(self.requests) >= count)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; re-checked whenever a counter changes."""
        if predicate():
            return
        waiter = (predicate, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter[1]
        finally:
            self._waiters.remove(waiter)

    def changed(self) -> None:
        """Wake the waiters whose predicate now holds; call after changing a counter."""
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)

    def _accept_ready(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                conn_sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                break
            conn_sock.setblocking(False)
            self.accepted += 1
            self._unowned_socks.add(conn_sock)
            task = loop.create_task(self._run_connection(conn_sock, self.accepted))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)
        self.changed()

    async def _run_connection(self, conn_sock: socket.socket, conn_seq: int) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn_sock)
            self._unowned_socks.discard(conn_sock)  # the transport owns it now
            await self.handle(reader, writer, conn_seq)
        except (ConnectionError, TimeoutError, h11.RemoteProtocolError):
            pass  # the peer left, idled out or sent garbage: nobody to tell but the peer
        except Exception as exc:
            self.errors.append(exc)
        finally:
            if writer is None:
                self._unowned_socks.discard(conn_sock)
                conn_sock.close()
            else:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        """Serve one connection; returning closes it. Overridden by every concrete server."""
        raise NotImplementedError

    async def read_request(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn_seq: int,
    ) -> h11.Request | None:
        """Read one whole request (body counted and discarded) and record it.

        Returns ``None`` if the peer closed cleanly before a request began; raises
        ``h11.RemoteProtocolError`` on a malformed one and ``TimeoutError`` after ``idle_s``
        without a byte.
        """
        request: h11.Request | None = None
        body_bytes = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                async with asyncio.timeout(self.idle_s):
                    data = await reader.read(READ_CHUNK_BYTES)
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body_bytes += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None  # h11 emits Request before EndOfMessage
                self.requests.append(_received(request, body_bytes, conn_seq))
                self.changed()
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write ``data`` and wait until the transport buffer drains, within ``idle_s``."""
        writer.write(data)
        async with asyncio.timeout(self.idle_s):
            await writer.drain()


def _received(request: h11.Request, body_bytes: int, conn_seq: int) -> ReceivedRequest:
    return ReceivedRequest(
        method=request.method.decode("ascii"),
        target=request.target.decode("latin-1"),
        headers=_text_pairs(request.headers.raw_items()),
        body_bytes=body_bytes,
        conn_seq=conn_seq,
    )


def _text_pairs(pairs: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
    return tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in pairs)


def _ok_head(headers: list[tuple[str, str]]) -> bytes:
    lines = ["HTTP/1.1 200 OK", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class EchoServer(UpstreamServer):
    """Well-behaved keep-alive HTTP/1.1 server answering with a description of each request.

    The default body is JSON: ``server``, ``method``, ``target``, ``headers`` (``[name, value]``
    pairs as received, original case), ``body_bytes``, ``conn_seq``, ``req_seq``. Request headers
    steer it:

    - ``x-respond-status: N``: answer status N, 200..599 (no body for 204 and 304).
    - ``x-respond-bytes: N``: the body is ``pattern_bytes(N)`` instead of JSON.
    - ``x-respond-chunked: 1``: chunked transfer coding, in two chunks or more, instead of
      Content-Length.
    - ``x-respond-close: 1``: answer with ``Connection: close``, then close.

    A request with ``Connection: close`` (or HTTP/1.0) is answered, then the connection closes.
    Every response carries ``x-echo-server``, ``x-conn-seq`` and ``x-req-seq``. HEAD gets the
    GET headers and no body. ``Expect: 100-continue`` gets a 100 before the body is read. A
    malformed request gets a 400 and a close, and counts in ``protocol_errors``.
    """

    def __init__(
        self, sock: socket.socket, *, name: str = "", idle_s: float = DEFAULT_IDLE_S
    ) -> None:
        super().__init__(sock, name=name, idle_s=idle_s)
        self.protocol_errors = 0

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        req_seq = 0
        while True:
            try:
                request = await self.read_request(conn, reader, writer, conn_seq)
            except h11.RemoteProtocolError:
                self.protocol_errors += 1
                self.changed()
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    reply = h11.Response(status_code=400, headers=[("content-length", "0")])
                    await self.send(writer, conn.send(reply) + conn.send(h11.EndOfMessage()))
                return
            if request is None:
                return
            req_seq += 1
            await self._respond(conn, writer, request, conn_seq, req_seq)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # h11 decided the connection must close
            conn.start_next_cycle()

    async def _respond(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        conn_seq: int,
        req_seq: int,
    ) -> None:
        asks = {name: value for name, value in request.headers if name.startswith(b"x-respond-")}
        status = int(asks.get(b"x-respond-status", b"200"))
        headers = [
            ("x-echo-server", self.name),
            ("x-conn-seq", str(conn_seq)),
            ("x-req-seq", str(req_seq)),
        ]
        if asks.get(b"x-respond-close") == b"1":
            headers.append(("connection", "close"))
        if b"x-respond-bytes" in asks:
            body = pattern_bytes(min(int(asks[b"x-respond-bytes"]), MAX_RESPOND_BYTES))
            headers.append(("content-type", "application/octet-stream"))
        else:
            body = self._describe(self.requests[-1], req_seq)
            headers.append(("content-type", "application/json"))
        is_chunked = asks.get(b"x-respond-chunked") == b"1"
        chunk_bytes = MAX_CHUNK_BYTES
        if status in (204, 304):
            body = b""  # RFC 9110 15.3.5, 15.4.5: never a body, nor framing headers
        elif is_chunked:
            headers.append(("transfer-encoding", "chunked"))
            chunk_bytes = max(1, min(MAX_CHUNK_BYTES, (len(body) + 1) // 2))
        else:
            headers.append(("content-length", str(len(body))))
        if request.method == b"HEAD":
            body = b""
        response = h11.Response(status_code=status, headers=headers, reason=b"Echo")
        await self.send(writer, conn.send(response))
        for offset in range(0, len(body), chunk_bytes):
            await self.send(writer, conn.send(h11.Data(data=body[offset : offset + chunk_bytes])))
        await self.send(writer, conn.send(h11.EndOfMessage()))

    def _describe(self, received: ReceivedRequest, req_seq: int) -> bytes:
        return json.dumps(
            {
                "server": self.name,
                "method": received.method,
                "target": received.target,
                "headers": [list(pair) for pair in received.headers],
                "body_bytes": received.body_bytes,
                "conn_seq": received.conn_seq,
                "req_seq": req_seq,
            }
        ).encode()


class SilentServer(UpstreamServer):
    """Accepts, then never reads and never answers; the connection stays open until aclose()."""

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        await asyncio.get_running_loop().create_future()  # only cancellation ends this


class GarbageServer(UpstreamServer):
    """Reads one request, answers ``reply`` (a malformed status line by default), then closes."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        reply: bytes = DEFAULT_GARBAGE_REPLY,
        name: str = "",
        idle_s: float = DEFAULT_IDLE_S,
    ) -> None:
        super().__init__(sock, name=name, idle_s=idle_s)
        self.reply = reply

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        if await self.read_request(h11.Connection(h11.SERVER), reader, writer, conn_seq) is None:
            return
        await self.send(writer, self.reply)


class _HalfBodyServer(UpstreamServer):
    """Reads one request, sends a head declaring ``declared_body_bytes`` and half the body."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        declared_body_bytes: int = DEFAULT_DECLARED_BODY_BYTES,
        name: str = "",
        idle_s: float = DEFAULT_IDLE_S,
    ) -> None:
        super().__init__(sock, name=name, idle_s=idle_s)
        self.declared_body_bytes = declared_body_bytes

    @property
    def sent_body_bytes(self) -> int:
        return self.declared_body_bytes // 2

    async def send_half(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> bool:
        """Read a request and send the head and half the body; ``False`` if no request came."""
        if await self.read_request(h11.Connection(h11.SERVER), reader, writer, conn_seq) is None:
            return False
        head = _ok_head([("content-length", str(self.declared_body_bytes))])
        await self.send(writer, head + pattern_bytes(self.sent_body_bytes))
        return True


class ResetServer(_HalfBodyServer):
    """Sends the head and half the declared body, then resets the connection (SO_LINGER 0)."""

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        if await self.send_half(reader, writer, conn_seq):
            set_linger_zero(writer)  # the close in _run_connection now sends RST


class TruncatingServer(_HalfBodyServer):
    """Sends the head and half the declared body, then closes cleanly (FIN): a short body."""

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        await self.send_half(reader, writer, conn_seq)


class StaleMode(enum.Enum):
    """When ``StaleKeepAliveServer`` closes a connection it promised to keep alive."""

    AFTER_RESPONSE = "after-response"  # FIN right after each answer
    ON_NEXT_REQUEST = "on-next-request"  # read the next request whole, then FIN, no answer


class StaleKeepAliveServer(UpstreamServer):
    """Answers 200 with ``Connection: keep-alive``, then closes the connection anyway.

    ``answered`` counts answers; ``dropped`` counts requests read and never answered (only in
    ``StaleMode.ON_NEXT_REQUEST``: the race a reused pooled upstream connection loses).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        mode: StaleMode = StaleMode.AFTER_RESPONSE,
        name: str = "",
        idle_s: float = DEFAULT_IDLE_S,
    ) -> None:
        super().__init__(sock, name=name, idle_s=idle_s)
        self.mode = mode
        self.answered = 0
        self.dropped = 0

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        if await self.read_request(conn, reader, writer, conn_seq) is None:
            return
        body = b"stale soon\n"
        headers = [
            ("connection", "keep-alive"),
            ("content-length", str(len(body))),
            ("x-echo-server", self.name),
        ]
        response = h11.Response(status_code=200, headers=headers, reason=b"OK")
        data = conn.send(response) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        await self.send(writer, data)
        self.answered += 1
        self.changed()
        match self.mode:
            case StaleMode.AFTER_RESPONSE:
                return
            case StaleMode.ON_NEXT_REQUEST:
                conn.start_next_cycle()
                if await self.read_request(conn, reader, writer, conn_seq) is not None:
                    self.dropped += 1
                    self.changed()
            case _:
                assert_never(self.mode)


class StrayServer(UpstreamServer):
    """Answers each connection's first request with ``first-<conn>``, then, before reading the
    next one, waits for ``send_stray`` and sends an unsolicited second answer ``STRAY-<conn>``:
    a server that answers twice. Later requests on the connection get ``later-<conn>``."""

    def __init__(self, sock: socket.socket, *, name: str = "", idle_s: float = DEFAULT_IDLE_S):
        super().__init__(sock, name=name, idle_s=idle_s)
        self.send_stray = asyncio.Event()
        self.strays_sent = 0

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        if await self.read_request(conn, reader, writer, conn_seq) is None:
            return
        await self.send(writer, _small_answer(b"first-%d" % conn_seq))
        async with asyncio.timeout(self.idle_s):
            await self.send_stray.wait()
        await self.send(writer, _small_answer(b"STRAY-%d" % conn_seq))
        self.strays_sent += 1
        self.changed()
        while True:  # answers are written raw, so h11 sees each request on a fresh state
            conn = h11.Connection(h11.SERVER)
            if await self.read_request(conn, reader, writer, conn_seq) is None:
                return
            await self.send(writer, _small_answer(b"later-%d" % conn_seq))


def _small_answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class DribbleServer(UpstreamServer):
    """Reads one request, then sends a valid response one byte every ``interval_s``; closes."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        interval_s: float = DEFAULT_DRIBBLE_INTERVAL_S,
        body: bytes = b"slow and steady\n",
        name: str = "",
        idle_s: float = DEFAULT_IDLE_S,
    ) -> None:
        super().__init__(sock, name=name, idle_s=idle_s)
        self.interval_s = interval_s
        self.body = body
        self.response = _ok_head([("content-length", str(len(body)))]) + body
        self.sent_bytes = 0

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        if await self.read_request(h11.Connection(h11.SERVER), reader, writer, conn_seq) is None:
            return
        for index in range(len(self.response)):
            if index:
                await asyncio.sleep(self.interval_s)  # the pace is the behaviour under test
            await self.send(writer, self.response[index : index + 1])
            self.sent_bytes += 1
            self.changed()


class TcpEchoServer(UpstreamServer):
    """Echoes raw bytes; after the peer's half-close, sends ``farewell`` and half-closes too.

    ``echoed_bytes`` counts bytes echoed; ``eofs`` counts connections whose peer sent FIN.
    A non-empty ``farewell`` proves data still flows towards a peer that half-closed.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        farewell: bytes = b"",
        name: str = "",
        idle_s: float = DEFAULT_IDLE_S,
    ) -> None:
        super().__init__(sock, name=name, idle_s=idle_s)
        self.farewell = farewell
        self.echoed_bytes = 0
        self.eofs = 0

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        while True:
            async with asyncio.timeout(self.idle_s):
                data = await reader.read(READ_CHUNK_BYTES)
            if not data:
                break
            await self.send(writer, data)
            self.echoed_bytes += len(data)
            self.changed()
        self.eofs += 1
        self.changed()
        await self.send(writer, self.farewell)
        writer.write_eof()


# --- the oracle client -----------------------------------------------------------------------

# Per-read deadline of H11Client: generous for a loaded CI box, far below the 60 s backstop.
DEFAULT_CLIENT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class ClientResponse:
    """A whole response as ``H11Client`` read it."""

    status: int
    headers: tuple[tuple[str, str], ...]  # names lowercased by h11
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        lname = name.lower()
        return next((v for k, v in self.headers if k == lname), None)

    def json(self) -> Any:
        return json.loads(self.body)


class StreamClient:
    """A client connection over asyncio streams: connect under a deadline, close on exit."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout_s = timeout_s  # per read

    @classmethod
    async def connect(
        cls, addr: tuple[str, int], *, timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S
    ) -> Self:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(*addr)
        return cls(reader, writer, timeout_s=timeout_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class H11Client(StreamClient):
    """One HTTP/1.1 client connection with h11 as the oracle; every read under ``timeout_s``.

    ``request()`` raises ``h11.RemoteProtocolError`` for anything h11 would not accept
    (including a connection closed mid-response), ``ConnectionError`` for a reset, and
    ``TimeoutError`` when a read takes longer than ``timeout_s``.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S,
    ) -> None:
        super().__init__(reader, writer, timeout_s=timeout_s)
        self.conn = h11.Connection(h11.CLIENT)

    @property
    def is_reusable(self) -> bool:
        """True when h11 says another request may follow on this connection."""
        return self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE

    async def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> ClientResponse:
        """Send one request and read its whole response.

        A ``host`` header is added when missing, and ``content-length`` when ``body`` is given
        without any framing header.
        """
        names = {name.lower() for name, _ in headers}
        all_headers = list(headers)
        if "host" not in names:
            all_headers.append(("host", "upstream.test"))
        if body is not None and not names & {"content-length", "transfer-encoding"}:
            all_headers.append(("content-length", str(len(body))))
        out = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            out += self.conn.send(h11.Data(data=body))
        out += self.conn.send(h11.EndOfMessage())
        self.writer.write(out)
        async with asyncio.timeout(self.timeout_s):
            await self.writer.drain()
        return await self._read_response()

    async def _read_response(self) -> ClientResponse:
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(self.timeout_s):
                    data = await self.reader.read(READ_CHUNK_BYTES)
                self.conn.receive_data(data)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                headers = _text_pairs(response.headers)
                return ClientResponse(response.status_code, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("connection closed before a response", 502)
