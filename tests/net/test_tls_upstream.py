"""TLS on the upstream side (issue 14): ``[backends.NAME] tls = true`` with ``verify``,
``ca_file`` and ``sni``, health checks over TLS, and WebSocket tunnels when either side speaks
TLS (relayed between the transports, never spliced). Real servers and clients on loopback, on
asyncio and uvloop; every wait bounded.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from tests.net.proxy_harness import (
    BACKEND,
    LISTENER,
    WAIT_S,
    ProxyStarter,
    RunningProxy,
    eventually,
    server_entry,
)
from tests.servers import H11Client
from tests.tls_certs import CertAuthority, make_ca
from zdlb.config.load import parse_config
from zdlb.config.model import Address, CheckConfig, CheckKind, UpstreamTlsConfig
from zdlb.health import run_probe
from zdlb.tls.context import originate
from zdlb.tls.relay import Relay


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    authority = make_ca(tmp_path_factory.mktemp("ca"))
    authority.issue("up", ["up.test", "IP:127.0.0.1"])
    authority.issue("proxy", ["proxy.test"])
    return authority


def server_context(ca: CertAuthority, name: str, seen: list[str | None]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca.directory / f"{name}.pem", ca.directory / f"{name}.key")
    context.sni_callback = lambda obj, server_name, ctx: seen.append(server_name)
    return context


class TlsHttpServer:
    """A keep-alive HTTP/1.1 server over TLS answering ``sni=NAME conn=N`` to every request."""

    def __init__(self) -> None:
        self.seen_sni: list[str | None] = []
        self.connections = 0
        self.handlers: set[asyncio.Task[Any]] = set()  # awaited at teardown (3.11 has no
        self.writers: set[asyncio.StreamWriter] = set()  # Server.close_clients)

    async def aclose(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.add(writer)
        self.connections += 1
        conn = self.connections
        sni = self.seen_sni[-1] if self.seen_sni else None
        try:
            while (head := await reader.readuntil(b"\r\n\r\n")) != b"":
                body = f"sni={sni} conn={conn} {head.split(b' ')[1].decode()}".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.writers.discard(writer)


@pytest.fixture
async def tls_server(
    ca: CertAuthority, bound_socket: socket.socket
) -> AsyncIterator[tuple[TlsHttpServer, tuple[str, int]]]:
    app = TlsHttpServer()
    context = server_context(ca, "up", app.seen_sni)
    server = await asyncio.start_server(app.handle, sock=bound_socket, ssl=context)
    async with server:
        yield app, bound_socket.getsockname()[:2]
        server.close()
        await app.aclose()


def config_for(
    addr: tuple[str, int],
    ca: CertAuthority,
    *,
    listener_tls: bool = False,
    **backend_tls: Any,
) -> Any:
    listener: dict[str, Any] = {"bind": "127.0.0.1:0", "backend": BACKEND}
    if listener_tls:
        listener["tls"] = {"certificates": [{"cert": "proxy.pem", "key": "proxy.key"}]}
    backend = {"tls": True, "servers": [server_entry("s1", addr)], **backend_tls}
    data = {"listeners": {LISTENER: listener}, "backends": {BACKEND: backend}}
    return parse_config(data, "test_tls_upstream", ca.directory)


async def plain_client(proxy: RunningProxy) -> H11Client:
    return await H11Client.connect(proxy.addr)


async def test_requests_reach_a_tls_server_verified_with_sni(
    tls_server: tuple[TlsHttpServer, tuple[str, int]], ca: CertAuthority
) -> None:
    app, addr = tls_server
    async with ProxyStarter() as proxies:
        proxy = await proxies.start(config_for(addr, ca, ca_file="ca.pem", sni="up.test"))
        assert app.connections == 0
        assert proxy.route.is_tls and proxy.route.splice_min_bytes == float("inf")
        async with await plain_client(proxy) as client:
            for path in ("/one", "/two"):
                response = await client.request("GET", path)
                assert response.status == 200
                assert response.body == f"sni=up.test conn=1 {path}".encode()


async def test_a_server_ip_is_verified_against_its_ip_san(
    tls_server: tuple[TlsHttpServer, tuple[str, int]], ca: CertAuthority
) -> None:
    _, addr = tls_server
    async with ProxyStarter() as proxies:
        proxy = await proxies.start(config_for(addr, ca, ca_file="ca.pem"))
        async with await plain_client(proxy) as client:
            assert (await client.request("GET", "/")).body.startswith(b"sni=None")


@pytest.mark.parametrize(("verify", "status"), [(True, 502), (False, 200)])
async def test_a_certificate_for_another_name(
    tls_server: tuple[TlsHttpServer, tuple[str, int]],
    ca: CertAuthority,
    verify: bool,
    status: int,
) -> None:
    _, addr = tls_server
    options: dict[str, Any] = {"sni": "elsewhere.test", "verify": verify, "retries": 0}
    if verify:
        options["ca_file"] = "ca.pem"
    async with ProxyStarter() as proxies:
        proxy = await proxies.start(config_for(addr, ca, **options))
        async with await plain_client(proxy) as client:
            assert (await client.request("GET", "/")).status == status


@pytest.mark.parametrize("kind", [CheckKind.TCP, CheckKind.HTTP])
async def test_checks_over_tls(
    tls_server: tuple[TlsHttpServer, tuple[str, int]], ca: CertAuthority, kind: CheckKind
) -> None:
    _, addr = tls_server
    target = Address(*addr)
    check = CheckConfig(kind=kind, timeout_s=WAIT_S)
    good = UpstreamTlsConfig(ca_file=ca.cert, sni="up.test")
    result = await run_probe(check, target, "up.test", originate(good, target.host))
    assert result.passed, result.detail
    wrong = UpstreamTlsConfig(ca_file=ca.cert, sni="elsewhere.test")
    result = await run_probe(check, target, "up.test", originate(wrong, target.host))
    assert not result.passed
    assert result.detail.startswith("tls handshake failed: CERTIFICATE_VERIFY_FAILED")


# --- WebSocket over TLS: relayed ----------------------------------------------------------


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


@pytest.mark.parametrize("side", ["listener", "server", "both"])
async def test_websocket_over_tls_is_relayed(
    ca: CertAuthority, bound_socket: socket.socket, side: str
) -> None:
    server_tls = side in ("server", "both")
    seen: list[str | None] = []
    context = server_context(ca, "up", seen) if server_tls else None
    async with serve(echo, sock=bound_socket, ssl=context, ping_interval=None, max_size=None):
        addr = bound_socket.getsockname()[:2]
        listener: dict[str, Any] = {"bind": "127.0.0.1:0", "backend": BACKEND}
        if side in ("listener", "both"):
            listener["tls"] = {"certificates": [{"cert": "proxy.pem", "key": "proxy.key"}]}
        backend: dict[str, Any] = {"servers": [server_entry("ws1", addr)]}
        if server_tls:
            backend.update(tls=True, ca_file="ca.pem", sni="up.test")
        data = {"listeners": {LISTENER: listener}, "backends": {BACKEND: backend}}
        config = parse_config(data, "test_tls_upstream", ca.directory)
        async with ProxyStarter() as proxies:
            proxy = await proxies.start(config)
            fds_before = open_fds()
            scheme = "wss" if "tls" in listener else "ws"
            client_tls = ca.client_context() if scheme == "wss" else None
            async with asyncio.timeout(WAIT_S):
                async with connect(
                    f"{scheme}://{proxy.addr[0]}:{proxy.addr[1]}/chat",
                    ssl=client_tls,
                    server_hostname="proxy.test" if client_tls else None,
                    ping_interval=None,
                    max_size=None,
                ) as ws:
                    big = os.urandom(3 << 20)  # past every write buffer: flow control works
                    await ws.send("hello")
                    assert await ws.recv() == "hello"
                    await ws.send(big)
                    assert await ws.recv() == big
                    conn = proxy.only_connection()
                    assert conn.tunnel is not None and isinstance(conn.tunnel.pump, Relay)
                    server = proxy.server("ws1")
                    assert (server.inflight, server.conns) == (1, 1)
            server = proxy.server("ws1")
            route = proxy.route
            await eventually(
                lambda: server.inflight == 0 and server.conns == 0 and not route.connections
            )
            assert not route.tunnels
            await eventually(lambda: open_fds() <= fds_before)
            assert route.stats.bytes_in > 3 << 20 and route.stats.bytes_out > 3 << 20
    if server_tls:
        assert seen == ["up.test"]
