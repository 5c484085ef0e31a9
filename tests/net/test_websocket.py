"""WebSocket through an HTTP listener (issue 4): the Upgrade handshake, then a pump tunnel.

A real WebSocket server and client (the ``websockets`` library) talk through a zdlb proxy run
in-process by ``proxy_harness``. Each test also checks what is left behind: ``Server.inflight``
and ``Server.conns`` back to 0, no connection or tunnel left on the route, no fd leaked. A raw
server and client prove the one delicate step, the hand-over from the transports to the pump:
bytes sent in the same segment as the 101 head, or right behind the upgrade request, must not
be lost. Every test runs on asyncio and uvloop (conftest.py) and with the splice and the copy
pump. No sleep waits for readiness; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

from tests.net.proxy_harness import (
    WAIT_S,
    ProxyStarter,
    RawClient,
    RunningProxy,
    eventually,
    proxy_config,
    server_entry,
)
from zdlb.http.upgrade import TunnelSettings
from zdlb.tcp.pipes import BufferPool, PipePool

MIB = 1 << 20
SHORT_S = 0.3  # tunnel_s where a test waits for the idle deadline


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(params=["splice", "copy"])
def splice(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "splice")


async def echo(ws: ServerConnection) -> None:
    """Echo every message; ``close:<code>`` closes from the server, ``die`` vanishes (no close
    frame, no FIN handshake: the transport is aborted)."""
    async for message in ws:
        if message == "die":
            ws.transport.abort()
            return
        if isinstance(message, str) and message.startswith("close:"):
            await ws.close(int(message[6:]), "server says bye")
            return
        await ws.send(message)


def refuse_forbidden(ws: ServerConnection, request: Request) -> Response | None:
    if request.path == "/forbidden":
        return ws.respond(HTTPStatus.FORBIDDEN, "no\n")
    return None


@pytest.fixture
async def ws_server(bound_socket: socket.socket) -> AsyncIterator[tuple[str, int]]:
    async with serve(
        echo, sock=bound_socket, max_size=None, ping_interval=None, process_request=refuse_forbidden
    ):
        yield bound_socket.getsockname()[:2]


async def start_proxy(
    proxies: ProxyStarter, addr: tuple[str, int], splice: bool, tunnel_s: float = 60.0
) -> RunningProxy:
    config = proxy_config(
        [server_entry("ws1", addr)], listener_timeouts={"tunnel_s": tunnel_s}, grace_s=0.5
    )
    proxy = await proxies.start(config)
    proxy.route.configure_tunnels(TunnelSettings(tunnel_s=tunnel_s, splice=splice))
    kind = PipePool if splice else BufferPool
    assert isinstance(proxy.route.tunnel_pool, kind)
    return proxy


def url(proxy: RunningProxy, path: str = "/chat") -> str:
    return f"ws://{proxy.addr[0]}:{proxy.addr[1]}{path}"


def ws_connect(proxy: RunningProxy, path: str = "/chat") -> connect:
    """A websockets client of ``proxy``: no keep-alive pings (they would defeat the idle
    test), no 1 MiB message limit (the large-message test sends 4 MiB)."""
    return connect(url(proxy, path), max_size=None, ping_interval=None, open_timeout=WAIT_S)


async def assert_all_closed(proxy: RunningProxy, fds_before: int | None = None) -> None:
    server = proxy.server("ws1")
    route = proxy.route
    await eventually(lambda: server.inflight == 0 and server.conns == 0 and not route.connections)
    assert not route.tunnels
    if fds_before is not None:  # aborted transports close their fd on a later loop iteration
        pool = route.tunnel_pool
        pipe_fds = 2 * pool.idle_count if isinstance(pool, PipePool) else 0  # kept for reuse
        await eventually(lambda: open_fds() <= fds_before + pipe_fds)


async def test_text_and_binary_messages_echo(ws_server, proxies: ProxyStarter, splice: bool):
    proxy = await start_proxy(proxies, ws_server, splice)
    fds_before = open_fds()
    async with asyncio.timeout(WAIT_S):
        async with ws_connect(proxy) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\x01binary\xff")
            assert await ws.recv() == b"\x00\x01binary\xff"
            server = proxy.server("ws1")
            assert (server.inflight, server.conns) == (1, 1)  # the tunnel counts on its server
            conn = proxy.only_connection()
            assert conn.tunnel is not None and conn.tunnel.pump.is_splicing is splice
    await assert_all_closed(proxy, fds_before)
    assert proxy.route.stats.responses[1] == 1  # the 101, counted once the tunnel ended


async def test_large_messages_are_byte_exact(ws_server, proxies: ProxyStarter, splice: bool):
    proxy = await start_proxy(proxies, ws_server, splice)
    payload = os.urandom(4 * MIB)
    async with asyncio.timeout(WAIT_S):
        async with ws_connect(proxy) as ws:
            for size in (4 * MIB, MIB + 1, 3):
                await ws.send(payload[:size])
                assert await ws.recv() == payload[:size]
    await assert_all_closed(proxy)


async def test_ping_gets_its_pong(ws_server, proxies: ProxyStarter, splice: bool):
    proxy = await start_proxy(proxies, ws_server, splice)
    async with asyncio.timeout(WAIT_S):
        async with ws_connect(proxy) as ws:
            pong = await ws.ping(b"are you there")
            await pong
    await assert_all_closed(proxy)


async def test_close_handshake_from_the_client(ws_server, proxies: ProxyStarter, splice: bool):
    proxy = await start_proxy(proxies, ws_server, splice)
    async with asyncio.timeout(WAIT_S):
        ws = await ws_connect(proxy)
        await ws.close(1000, "client says bye")
    assert (ws.close_code, ws.close_reason) == (1000, "client says bye")
    assert ws.protocol.close_rcvd is not None  # the server's close frame came back through
    await assert_all_closed(proxy)


async def test_close_handshake_from_the_server(ws_server, proxies: ProxyStarter, splice: bool):
    proxy = await start_proxy(proxies, ws_server, splice)
    async with asyncio.timeout(WAIT_S):
        async with ws_connect(proxy) as ws:
            await ws.send("close:4001")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
    assert (ws.close_code, ws.close_reason) == (4001, "server says bye")
    await assert_all_closed(proxy)


async def test_server_dying_mid_connection_ends_the_tunnel(
    ws_server, proxies: ProxyStarter, splice: bool
):
    proxy = await start_proxy(proxies, ws_server, splice)
    async with asyncio.timeout(WAIT_S):
        ws = await ws_connect(proxy)
        await ws.send("die")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        await ws.close()
    assert ws.protocol.close_rcvd is None  # no close frame: the client saw the connection drop
    await assert_all_closed(proxy)


async def test_idle_tunnel_is_closed_at_tunnel_s(ws_server, proxies: ProxyStarter, splice: bool):
    proxy = await start_proxy(proxies, ws_server, splice, tunnel_s=SHORT_S)
    async with asyncio.timeout(WAIT_S):
        ws = await ws_connect(proxy)
        await ws.send("still here")
        assert await ws.recv() == "still here"
        idle_from = time.monotonic()
        await ws.wait_closed()
    idle_s = time.monotonic() - idle_from
    # The sweeper ticks at a tenth of the shortest timeout: the deadline is at most ~10% late.
    assert SHORT_S * 0.9 <= idle_s < SHORT_S * 3, idle_s
    await assert_all_closed(proxy)


async def test_fifty_concurrent_websockets(ws_server, proxies: ProxyStarter, splice: bool):
    proxy = await start_proxy(proxies, ws_server, splice)
    fds_before = open_fds()
    count = 50
    async with asyncio.timeout(WAIT_S):
        sockets: list[ClientConnection] = await asyncio.gather(
            *(ws_connect(proxy, f"/n{i}") for i in range(count))
        )
        try:
            await asyncio.gather(*(ws.send(f"msg {i}") for i, ws in enumerate(sockets)))
            answers = await asyncio.gather(*(ws.recv() for ws in sockets))
            assert answers == [f"msg {i}" for i in range(count)]
            server = proxy.server("ws1")
            assert (server.inflight, server.conns) == (count, count)
            assert len(proxy.route.tunnels) == count
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
    await assert_all_closed(proxy, fds_before)


async def test_non_101_answer_is_proxied_and_the_connection_stays_http(
    ws_server, proxies: ProxyStarter, splice: bool
):
    proxy = await start_proxy(proxies, ws_server, splice)
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(InvalidStatus) as info:
            await ws_connect(proxy, "/forbidden")
    assert info.value.response.status_code == 403
    upgrade = (
        b"GET /forbidden HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(upgrade)
        refused = await client.read_response()
        assert (refused.status, refused.body) == (403, b"no\n")
        await client.send(b"GET /plain HTTP/1.1\r\nHost: ws\r\n\r\n")  # same connection
        plain = await client.read_response()
        assert plain.status == 426  # websockets' answer to a request without an upgrade
    assert not proxy.route.tunnels
    await assert_all_closed(proxy)


async def test_graceful_shutdown_waits_grace_s_then_aborts_the_tunnel(
    ws_server, proxies: ProxyStarter, splice: bool
):
    proxy = await start_proxy(proxies, ws_server, splice)
    async with asyncio.timeout(WAIT_S):
        async with ws_connect(proxy) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            started = time.monotonic()
            await proxy.aclose()
            assert time.monotonic() - started >= 0.5 * 0.9  # grace_s: the tunnel was waited for
            with pytest.raises(ConnectionClosed):
                await ws.recv()
    assert proxy.server("ws1").inflight == 0


# --- the hand-over: bytes read past either head ---------------------------------------------

SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: Upgrade\r\n\r\n"


class RawUpgradeServer:
    """Answers an upgrade with the 101 head and ``early`` in one write, then echoes bytes
    (upper-cased, so an echo cannot be mistaken for a reflection by the proxy). A request
    without ``Upgrade: raw`` gets a keep-alive 200 whose body says whether any Upgrade or
    Connection field reached the server; ``heads`` records every request head."""

    def __init__(self, early: bytes = b"") -> None:
        self.early = early
        self.heads: list[bytes] = []
        self.after_head = bytearray()  # what the server read after the upgrade request head

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.heads.append(head)
                if b"\r\nUpgrade: raw\r\n" in head:
                    assert b"\r\nConnection: Upgrade\r\n" in head
                    writer.write(SWITCH + self.early)
                    await self._echo(reader, writer)
                    return
                lowered = head.lower()
                body = b"upgrade" if b"upgrade" in lowered else b"plain"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except asyncio.IncompleteReadError:
            pass  # the proxy closed a pooled connection
        finally:
            writer.close()

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.after_head += data
            writer.write(data.upper())


@asynccontextmanager
async def raw_upgrade_server(
    sock: socket.socket, early: bytes = b""
) -> AsyncIterator[RawUpgradeServer]:
    upstream = RawUpgradeServer(early)
    async with await asyncio.start_server(upstream.handle, sock=sock):
        yield upstream


@pytest.mark.parametrize("early_bytes", [17, 4 * MIB], ids=["small", "4mib"])
async def test_bytes_past_both_heads_reach_the_other_side(
    bound_socket: socket.socket, proxies: ProxyStarter, splice: bool, early_bytes: int
):
    """The server writes the 101 and ``early_bytes`` at once; the client sends bytes right
    behind its request and, with a small receive buffer, reads nothing until it has sent them.
    With 4 MiB the proxy's write buffer to the client is not empty when the 101 arrives, so
    the hand-over has to wait for it to drain (resume_writing) before the pump starts."""
    early = os.urandom(early_bytes)
    async with raw_upgrade_server(bound_socket, early) as upstream:
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2], splice)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        async with asyncio.timeout(WAIT_S):
            await loop.sock_connect(sock, proxy.addr)
            reader, writer = await asyncio.open_connection(sock=sock, limit=8 * MIB)
            await eventually(lambda: bool(proxy.connections))
            transport = proxy.only_connection().transport
            assert transport is not None  # a small send buffer: the proxy's writes stay queued
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            request = b"GET /raw HTTP/1.1\r\nHost: r\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n"
            writer.write(request + b"early-from-client")  # one segment, before any answer
            await writer.drain()
            await eventually(lambda: len(upstream.after_head) >= 17)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ") and b"\r\nUpgrade: raw\r\n" in head
            assert await reader.readexactly(early_bytes) == early
            assert await reader.readexactly(17) == b"EARLY-FROM-CLIENT"
            writer.write(b"then more")
            assert await reader.readexactly(9) == b"THEN MORE"
            writer.write_eof()  # half-close: the server sees EOF and closes; so does the pump
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
        assert bytes(upstream.after_head) == b"early-from-clientthen more"
        await assert_all_closed(proxy)


async def test_upgrade_pipelined_behind_a_request_switches_after_its_answer(
    bound_socket: socket.socket, proxies: ProxyStarter, splice: bool
):
    """RFC 9112 section 9.3.2: answers in order; the upgrade is forwarded once the request
    before it is answered, and the bytes behind it wait for the 101."""
    async with raw_upgrade_server(bound_socket) as upstream:
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2], splice)
        async with asyncio.timeout(WAIT_S):
            reader, writer = await asyncio.open_connection(*proxy.addr)
            writer.write(
                b"GET /first HTTP/1.1\r\nHost: r\r\n\r\n"
                b"GET /raw HTTP/1.1\r\nHost: r\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n"
                b"behind"
            )
            first = await reader.readuntil(b"\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 200 ")
            assert await reader.readexactly(5) == b"plain"
            switch = await reader.readuntil(b"\r\n\r\n")
            assert switch.startswith(b"HTTP/1.1 101 ")
            assert await reader.readexactly(6) == b"BEHIND"
            writer.close()
            await writer.wait_closed()
        assert [h.split(b" ")[1] for h in upstream.heads] == [b"/first", b"/raw"]
        pool = proxy.pool("ws1")
        assert pool.idle_count == 1  # /first's connection; the upgraded one never is pooled
        pool.close_idle()
        await assert_all_closed(proxy)


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET / HTTP/1.0\r\nHost: r\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: r\r\nConnection: upgrade\r\nUpgrade: raw\r\n"
        b"Content-Length: 2\r\n\r\nhi",
    ],
    ids=["http10", "with-body"],
)
async def test_upgrade_not_honoured_is_stripped_and_proxied_as_http(
    bound_socket: socket.socket, proxies: ProxyStarter, splice: bool, request_head: bytes
):
    async with raw_upgrade_server(bound_socket) as upstream:
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2], splice)
        async with await RawClient.connect(proxy.addr) as client:
            await client.send(request_head)
            response = await client.read_response()
        assert (response.status, response.body) == (200, b"plain")
        assert b"pgrade" not in upstream.heads[0]
        assert not proxy.route.tunnels
        proxy.pool("ws1").close_idle()  # a plain exchange: its connection was pooled
        await assert_all_closed(proxy)
