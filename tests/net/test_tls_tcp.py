"""TCP listeners and backends speaking TLS (issue 14): TLS in and plain TCP out, plain in and
TLS out, both; handshakes that fail or stall; what is left behind. The daemon's own
``build_runtime`` and ``serve`` run in-process; clients and servers are real, on loopback, on
asyncio and uvloop. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from tests.net.proxy_harness import WAIT_S, eventually, server_entry
from tests.servers import TcpEchoServer
from tests.tls_certs import CertAuthority, make_ca
from zdlb.config.load import parse_config
from zdlb.daemon.lifecycle import serve
from zdlb.daemon.runtime import build_runtime
from zdlb.tcp.listener import bound_address
from zdlb.tcp.proxy import TcpRoute
from zdlb.tcp.tls_proxy import TlsPump


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    authority = make_ca(tmp_path_factory.mktemp("ca"))
    authority.issue("front", ["front.test"])
    authority.issue("up", ["up.test"])
    return authority


@asynccontextmanager
async def tcp_proxy(
    ca: CertAuthority, addr: tuple[str, int], *, front: bool, up: bool, **tls: Any
) -> AsyncIterator[tuple[TcpRoute, tuple[str, int]]]:
    """zdlb with one TCP listener in front of ``addr``: TLS from clients if ``front``, to
    the server if ``up``."""
    listener: dict[str, Any] = {"bind": "127.0.0.1:0", "backend": "app", "mode": "tcp"}
    listener["timeouts"] = {"grace_s": 0.5}
    if front:
        listener["tls"] = {"certificates": [{"cert": "front.pem", "key": "front.key"}], **tls}
    backend: dict[str, Any] = {"servers": [server_entry("s1", addr)]}
    if up:
        backend.update(tls=True, ca_file="ca.pem", sni="up.test")
    data = {"listeners": {"tcp": listener}, "backends": {"app": backend}}
    runtime = build_runtime(parse_config(data, "test_tls_tcp", ca.directory))
    stop = asyncio.Event()
    task = asyncio.create_task(serve(runtime, stop))
    route, sock = runtime.tcp_sockets[0]
    bound = bound_address(sock)
    try:
        yield route, (bound.host, bound.port)
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await task


async def tls_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def tls_echo_server(
    ca: CertAuthority, bound_socket_factory: Callable[[], socket.socket]
) -> AsyncIterator[tuple[str, int]]:
    bound_socket = bound_socket_factory()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca.directory / "up.pem", ca.directory / "up.key")
    server = await asyncio.start_server(tls_echo, sock=bound_socket, ssl=context)
    async with server:
        yield bound_socket.getsockname()[:2]


@pytest.fixture
async def plain_echo_server(
    bound_socket_factory: Callable[[], socket.socket],
) -> AsyncIterator[tuple[str, int]]:
    bound_socket = bound_socket_factory()
    async with TcpEchoServer(bound_socket, name="echo") as server:
        yield server.addr


async def echo_through(addr: tuple[str, int], context: ssl.SSLContext | None) -> bytes:
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(
            *addr, ssl=context, server_hostname="front.test" if context else None
        )
        payload = os.urandom(1 << 20)
        writer.write(payload)
        got = await reader.readexactly(len(payload))
        writer.close()
        await writer.wait_closed()
    return got if got == payload else b"mismatch"


@pytest.mark.parametrize(("front", "up"), [(True, False), (False, True), (True, True)])
async def test_bytes_cross_tls_both_ways(
    ca: CertAuthority,
    plain_echo_server: tuple[str, int],
    tls_echo_server: tuple[str, int],
    front: bool,
    up: bool,
) -> None:
    server = tls_echo_server if up else plain_echo_server
    async with tcp_proxy(ca, server, front=front, up=up) as (route, addr):
        fds = open_fds()
        assert await echo_through(addr, ca.client_context() if front else None) != b"mismatch"
        await eventually(lambda: not route.tunnels)
        assert route.bytes_up == route.bytes_down == 1 << 20
        await eventually(lambda: open_fds() <= fds)
        server_state = route.backend.servers[0]
        assert (server_state.inflight, server_state.conns) == (0, 0)


async def test_tunnel_uses_the_tls_pump(
    ca: CertAuthority, plain_echo_server: tuple[str, int]
) -> None:
    async with tcp_proxy(ca, plain_echo_server, front=True, up=False) as (route, addr):
        async with asyncio.timeout(WAIT_S):
            reader, writer = await asyncio.open_connection(
                *addr, ssl=ca.client_context(), server_hostname="front.test"
            )
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            (tunnel,) = route.tunnels
            assert isinstance(tunnel.pump, TlsPump) and not tunnel.pump.is_splicing
            writer.close()
            await writer.wait_closed()


async def test_half_close_from_a_plain_server_reaches_a_tls_client(
    ca: CertAuthority, bound_socket: socket.socket
) -> None:
    """A plain server's answer after the client's EOF: TLS cannot half-close, so the client
    sees what was sent before its own close_notify went out, then the end."""
    async with TcpEchoServer(bound_socket, name="echo", farewell=b"bye") as server:
        async with tcp_proxy(ca, server.addr, front=True, up=False) as (route, addr):
            async with asyncio.timeout(WAIT_S):
                reader, writer = await asyncio.open_connection(
                    *addr, ssl=ca.client_context(), server_hostname="front.test"
                )
                writer.write(b"hello")
                assert await reader.readexactly(5) == b"hello"
                writer.close()
                await writer.wait_closed()
            await eventually(lambda: not route.tunnels)


async def bad_handshake(route: TcpRoute, addr: tuple[str, int], sent: bytes) -> None:
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(sent)
    async with asyncio.timeout(WAIT_S):
        assert not (await reader.read()).startswith(b"GET")
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: not route.tunnels)


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\n\r\n"], ids=["stall", "plaintext"])
async def test_bad_handshakes_end_the_tunnel(
    ca: CertAuthority, plain_echo_server: tuple[str, int], sent: bytes
) -> None:
    """Each ends the tunnel and its server connection; 20 of them leave no fd behind (counted
    after a first one: uvloop opens one descriptor for good on its first handshake timeout)."""
    async with tcp_proxy(ca, plain_echo_server, front=True, up=False, handshake_s=0.2) as (
        route,
        addr,
    ):
        await bad_handshake(route, addr, sent)
        server_state = route.backend.servers[0]
        await eventually(lambda: (server_state.inflight, server_state.conns) == (0, 0))
        fds = open_fds()
        await asyncio.gather(*(bad_handshake(route, addr, sent) for _ in range(20)))
        await eventually(lambda: (server_state.inflight, server_state.conns) == (0, 0))
        await eventually(lambda: open_fds() <= fds)


async def test_a_server_certificate_that_does_not_verify(
    ca: CertAuthority, tls_echo_server: tuple[str, int], tmp_path: Any
) -> None:
    other = make_ca(tmp_path / "other")
    other_cert = (tmp_path / "other" / "ca.pem").read_bytes()
    (ca.directory / "wrong-ca.pem").write_bytes(other_cert)
    listener: dict[str, Any] = {"bind": "127.0.0.1:0", "backend": "app", "mode": "tcp"}
    backend = {
        "servers": [server_entry("s1", tls_echo_server)],
        "tls": True,
        "ca_file": "wrong-ca.pem",
        "sni": "up.test",
    }
    data = {"listeners": {"tcp": listener}, "backends": {"app": backend}}
    runtime = build_runtime(parse_config(data, "test_tls_tcp", ca.directory))
    stop = asyncio.Event()
    task = asyncio.create_task(serve(runtime, stop))
    route, sock = runtime.tcp_sockets[0]
    try:
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        writer.write(b"hello")
        async with asyncio.timeout(WAIT_S):  # ended (upstream_failed): the client is reset
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
        writer.close()
        await eventually(lambda: not route.tunnels)
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await task
    assert other is not None
