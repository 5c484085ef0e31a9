"""Run a zdlb HTTP proxy in-process on the test's loop, plus the clients and servers its tests use.

``ProxyStarter.start`` builds a ``Config`` with ``parse_config`` (so tests go through the same
validation as a config file), binds it with ``build_runtime`` (listener on 127.0.0.1 port 0:
the kernel picks the port, nothing races for it) and runs ``serve(runtime, stop)`` as a task on
the running loop. ``aclose`` sets the stop event and awaits the task, so a test leaks no task,
no socket and no connection. The bound port is read back from ``runtime.sockets``.

Also here, because the fixtures of ``tests/servers.py`` do not cover them:

- ``RawClient``: a client that writes any bytes it is given (pipelined, malformed, HTTP/1.0)
  and still reads answers through an h11 oracle.
- ``BodyEchoServer``: records every request body and trailer it reads and answers with the
  body itself, so a test can prove request *and* response bytes arrived intact.
- ``StreamingServer``: answers one request with a large body and counts the bytes it managed
  to hand to its socket, so backpressure is observable from the server's side.
- ``GatedServer``: holds requests whose target starts with ``/hold`` until the test releases
  them, for in-flight requests during a graceful shutdown.

Proxy state (``Server.inflight``, ``Server.conns``, open client connections) changes inside
protocol callbacks with no notification to wait on, so ``eventually`` re-checks a predicate every
few milliseconds under a deadline. That waits on state; it never sleeps to "let it start".
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import h11

from tests.servers import (
    DEFAULT_CLIENT_TIMEOUT_S,
    MAX_CHUNK_BYTES,
    READ_CHUNK_BYTES,
    ClientResponse,
    ReceivedRequest,
    StreamClient,
    UpstreamServer,
    pattern_bytes,
)
from zdlb.balancer.server import Server
from zdlb.config.load import parse_config
from zdlb.config.model import Config
from zdlb.daemon.lifecycle import serve
from zdlb.daemon.runtime import Runtime, build_runtime
from zdlb.http.connection import ClientConnection
from zdlb.http.route import BackendLink, Route
from zdlb.http.upstream import ServerConnections
from zdlb.tcp.listener import bound_address
from zdlb.tcp.pipes import PipePool

# Every awaited expectation gets this deadline; pytest-timeout's 60 s is only the backstop.
WAIT_S = DEFAULT_CLIENT_TIMEOUT_S
# How often ``eventually`` re-checks proxy state. Callbacks settle within a loop iteration or
# two, so this only has to be short against WAIT_S.
POLL_S = 0.002
BACKEND = "app"
LISTENER = "web"


def address_of(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def server_entry(name: str, addr: tuple[str, int], **options: Any) -> dict[str, Any]:
    """One ``[[backends.app.servers]]`` table for a fixture server at ``addr``."""
    return {"name": name, "address": address_of(addr), **options}


def proxy_config(
    servers: Sequence[dict[str, Any]],
    *,
    balance: str = "roundrobin",
    retries: int | None = None,
    listener_timeouts: dict[str, float] | None = None,
    backend_timeouts: dict[str, float] | None = None,
    limits: dict[str, int] | None = None,
    grace_s: float | None = None,
    x_forwarded_proto: str | None = None,
    check: dict[str, Any] | None = None,
    sticky: dict[str, Any] | None = None,
    splice_min_bytes: int | bool | None = None,
    reuse: str | None = None,
) -> Config:
    """A one-listener, one-backend config, validated by ``parse_config`` like a file would be.

    Listener timeouts hold ``client_s``, ``http_request_s`` and ``grace_s`` (also settable
    with ``grace_s=``); backend timeouts ``connect_s``, ``server_s`` and ``upstream_idle_s``.
    """
    listener: dict[str, Any] = {"bind": "127.0.0.1:0", "backend": BACKEND}
    timeouts = dict(listener_timeouts or {})
    if grace_s is not None:
        timeouts["grace_s"] = grace_s
    if timeouts:
        listener["timeouts"] = timeouts
    if limits:
        listener["limits"] = dict(limits)
    if x_forwarded_proto is not None:
        listener["x_forwarded_proto"] = x_forwarded_proto
    if splice_min_bytes is not None:
        listener["splice_min_bytes"] = splice_min_bytes
    backend: dict[str, Any] = {"balance": balance, "servers": [dict(s) for s in servers]}
    if retries is not None:
        backend["retries"] = retries
    if reuse is not None:
        backend["reuse"] = reuse
    if backend_timeouts:
        backend["timeouts"] = dict(backend_timeouts)
    if check is not None:
        backend["check"] = dict(check)
    if sticky is not None:
        backend["sticky"] = dict(sticky)
    data: dict[str, Any] = {"listeners": {LISTENER: listener}, "backends": {BACKEND: backend}}
    return parse_config(data, "proxy_harness", Path(__file__).parent)


class RunningProxy:
    """One started runtime: its address, its state, and how to stop it."""

    def __init__(self, runtime: Runtime, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        self.runtime = runtime
        self.stop = stop
        self.task = task
        route, sock = runtime.sockets[0]
        self.route: Route = route
        bound = bound_address(sock)
        self.addr: tuple[str, int] = (bound.host, bound.port)

    def __repr__(self) -> str:
        return f"<RunningProxy {address_of(self.addr)} {self.route!r} done={self.task.done()}>"

    def server(self, name: str, backend: str = BACKEND) -> Server:
        server = self.link(backend).backend.server(name)
        assert server is not None, f"no server {name!r} in {backend!r}"
        return server

    def pool(self, name: str, backend: str = BACKEND) -> ServerConnections:
        return self.link(backend).upstreams[name]

    def link(self, backend: str = BACKEND) -> BackendLink:
        for link in self.route.links:
            if link.backend.name == backend:
                return link
        raise AssertionError(f"{self.route!r} does not send to {backend!r}")

    @property
    def connections(self) -> list[ClientConnection]:
        # The only kind of connection an HTTP route holds; it sees them through a Protocol.
        return [cast(ClientConnection, conn) for conn in self.route.connections]

    def only_connection(self) -> ClientConnection:
        conns = self.connections
        assert len(conns) == 1, conns
        return conns[0]

    async def aclose(self) -> None:
        """Set the stop event and wait for ``serve`` to return (graceful shutdown included)."""
        self.stop.set()
        limit_s = self.route.timeouts.grace_s + WAIT_S  # shutdown waits at most grace_s
        async with asyncio.timeout(limit_s):
            await self.task


class ProxyStarter:
    """Starts proxies for one test and stops every one of them at teardown."""

    def __init__(self) -> None:
        self.running: list[RunningProxy] = []

    async def start(self, config: Config) -> RunningProxy:
        runtime = build_runtime(config)
        stop = asyncio.Event()
        task = asyncio.create_task(serve(runtime, stop))
        proxy = RunningProxy(runtime, stop, task)
        self.running.append(proxy)
        # No wait: build_runtime already listens, so the kernel queues a client's connection
        # until serve's create_server accepts it. A serve that failed fails at aclose.
        return proxy

    async def aclose(self) -> None:
        for proxy in self.running:
            if not proxy.task.done():
                await proxy.aclose()
            else:
                await proxy.task

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def eventually(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Return once ``predicate()`` holds; fail with ``TimeoutError`` after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        # Polling, bounded: zdlb's connection and server state has no change notification
        # (an asyncio.Event per counter would cost the hot path); see the module docstring.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)


def disable_nagle(server: UpstreamServer) -> None:
    """Set TCP_NODELAY on a fixture server's listening socket; accepted sockets inherit it.

    The fixture servers write a head and a body in separate writes. asyncio sets TCP_NODELAY
    only on sockets whose ``proto`` is IPPROTO_TCP, and a socket made with
    ``socket.socket(AF_INET, SOCK_STREAM)`` has proto 0, so on the stdlib loop the body waits
    for the ACK of the head: ~40 ms (delayed ACK) per keep-alive request after the first.
    """
    sock: socket.socket = server._sock  # the fixture API has no accessor for it
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- a client that can send anything -----------------------------------------------------------


class RawClient(StreamClient):
    """Writes raw bytes; reads answers with an h11 client connection as the oracle.

    h11 only parses a response after it sent a request, so ``read_response`` first feeds it a
    stand-in request with the same method (HEAD changes how the answer is framed).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout_s: float = WAIT_S,
    ) -> None:
        super().__init__(reader, writer, timeout_s=timeout_s)
        self.conn = h11.Connection(h11.CLIENT)
        self.informational: list[int] = []

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(WAIT_S):
            await self.writer.drain()

    async def read_response(self, method: str = "GET") -> ClientResponse:
        """The next whole response; h11 errors (and a close mid-response) propagate."""
        if self.conn.our_state is h11.IDLE:
            stand_in = h11.Request(method=method, target="/", headers=[("host", "stand-in")])
            self.conn.send(stand_in)
            self.conn.send(h11.EndOfMessage())
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = await self.next_event()
            if isinstance(event, h11.InformationalResponse):
                self.informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                headers = tuple(
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers
                )
                return ClientResponse(response.status_code, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("connection closed before a response", 502)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(self.timeout_s):
                data = await self.reader.read(READ_CHUNK_BYTES)
            self.conn.receive_data(data)

    async def read_until_closed(self) -> tuple[bytes, BaseException | None]:
        """Raw bytes until EOF or a reset (returned, not raised), within ``timeout_s``."""
        received = bytearray()
        async with asyncio.timeout(self.timeout_s):
            while True:
                try:
                    chunk = await self.reader.read(READ_CHUNK_BYTES)
                except ConnectionError as exc:
                    return bytes(received), exc
                if not chunk:
                    return bytes(received), None
                received += chunk


# --- servers the shared fixtures do not provide -------------------------------------------------


class BodyEchoServer(UpstreamServer):
    """Keep-alive HTTP/1.1 server that answers each request with its own body (200).

    ``bodies`` and ``trailers`` hold, per request, exactly what h11 decoded. A response carries
    ``x-conn-seq`` like ``EchoServer``. ``Expect: 100-continue`` gets a 100 first.
    """

    def __init__(self, sock: socket.socket, *, name: str = "body-echo") -> None:
        super().__init__(sock, name=name)
        self.bodies: list[bytes] = []
        self.trailers: list[list[tuple[str, str]]] = []

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request: h11.Request | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if conn.they_are_waiting_for_100_continue:
                        continue_100 = h11.InformationalResponse(status_code=100, headers=[])
                        writer.write(conn.send(continue_100))
                    async with asyncio.timeout(self.idle_s):
                        data = await reader.read(READ_CHUNK_BYTES)
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            assert request is not None
            self.bodies.append(bytes(body))
            self.trailers.append(
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
            )
            self.requests.append(_record(request, len(body), conn_seq))
            self.changed()
            headers = [("content-length", str(len(body))), ("x-conn-seq", str(conn_seq))]
            out = conn.send(h11.Response(status_code=200, headers=headers))
            out += conn.send(h11.Data(data=bytes(body))) if body else b""
            await self.send(writer, out + conn.send(h11.EndOfMessage()))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()


def _record(request: h11.Request, body_bytes: int, conn_seq: int) -> ReceivedRequest:
    return ReceivedRequest(
        method=request.method.decode("ascii"),
        target=request.target.decode("latin-1"),
        headers=tuple(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw_items()
        ),
        body_bytes=body_bytes,
        conn_seq=conn_seq,
    )


class StreamingServer(UpstreamServer):
    """Answers one request with ``pattern_bytes(body_bytes)``, counting what it handed over.

    ``sent_bytes`` counts body bytes whose write drained into the socket; it stalls once the
    peer stops reading. ``finished`` is set when the whole body went out.
    """

    def __init__(self, sock: socket.socket, body_bytes: int, *, name: str = "stream") -> None:
        super().__init__(sock, name=name, idle_s=30.0)
        self.body_bytes = body_bytes
        self.sent_bytes = 0
        self.finished = asyncio.Event()

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        if await self.read_request(h11.Connection(h11.SERVER), reader, writer, conn_seq) is None:
            return
        head = f"HTTP/1.1 200 OK\r\ncontent-length: {self.body_bytes}\r\n\r\n".encode()
        await self.send(writer, head)
        body = pattern_bytes(self.body_bytes)
        view = memoryview(body)
        step = MAX_CHUNK_BYTES * 4
        for offset in range(0, self.body_bytes, step):
            await self.send(writer, bytes(view[offset : offset + step]))
            self.sent_bytes = min(self.body_bytes, offset + step)
            self.changed()
        self.finished.set()


class GatedServer(UpstreamServer):
    """Keep-alive server: answers ``/hold...`` targets only after ``release`` is set, others
    after ``delay_s`` (the server's own work, 0 by default).

    ``held`` counts requests that waited at the gate; ``active`` the requests being worked on
    now and ``most_active`` the most at once. Answers are 200 with body ``ok <target>``.
    """

    def __init__(self, sock: socket.socket, *, name: str = "gated", delay_s: float = 0.0) -> None:
        super().__init__(sock, name=name)
        self.release = asyncio.Event()
        self.delay_s = delay_s
        self.held = 0
        self.active = 0
        self.most_active = 0

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request = await self.read_request(conn, reader, writer, conn_seq)
            if request is None:
                return
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            try:
                if request.target.startswith(b"/hold"):
                    self.held += 1
                    self.changed()
                    await self.release.wait()
                elif self.delay_s:
                    self.changed()
                    await asyncio.sleep(self.delay_s)  # the work; nothing here waits on zdlb
            finally:
                self.active -= 1
            body = b"ok " + request.target
            headers = [("content-length", str(len(body)))]
            out = conn.send(h11.Response(status_code=200, headers=headers))
            out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            await self.send(writer, out)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_fds() -> int:
    """Sockets and pipes open in this process. (uvloop opens /dev/null once per loop, at its
    first connect: not a leak, and it may happen in the middle of a test.)"""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the fd listdir itself used, closed since
            continue
        count += target.startswith(("socket:", "pipe:"))
    return count


async def assert_all_closed(proxy: RunningProxy, fds_before: int) -> None:
    """Server ``s1`` idle, no client connection, pooled ones closed, and no fd left beyond
    ``fds_before`` and the pipes the pool keeps for reuse."""
    server = proxy.server("s1")
    await eventually(lambda: server.inflight == 0 and not proxy.route.connections)
    proxy.pool("s1").close_idle()
    await eventually(lambda: server.conns == 0)
    pool = proxy.route.tunnel_pool
    pipe_fds = 2 * pool.idle_count if isinstance(pool, PipePool) else 0  # kept for reuse
    await eventually(lambda: open_fds() <= fds_before + pipe_fds)
