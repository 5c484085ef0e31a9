"""TCP listeners end to end: a ``TcpRoute`` on a real listening socket, real fixture servers.

Each test starts a route in front of one or more servers, connects raw client sockets to it and
checks what the client gets, what the servers saw, and the state left behind: ``Server``
counters back to 0, no tunnel left, no fd leaked. A sweeper task calls ``route.sweep`` every
``SWEEP_S``, as the daemon's does. Every test runs with the splice and the copy pump, on
asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from tests.net.test_pump import MIB, WAIT_S, Peer, eventually, open_fds, random_bytes, sha
from tests.servers import LOOPBACK, TcpEchoServer, UpstreamServer, refused_address
from zdlb.balancer.pool import Backend
from zdlb.balancer.server import AdminState, Server
from zdlb.config.model import (
    Address,
    BackendConfig,
    Balance,
    CheckConfig,
    ListenerConfig,
    ListenerMode,
    ServerConfig,
)
from zdlb.tcp.listener import bind_listener
from zdlb.tcp.proxy import TcpRoute, TcpSettings

SWEEP_S = 0.005  # the daemon ticks at a tenth of the shortest timeout; tests use tiny ones
SHORT_S = 0.3  # connect_s / tunnel_s where a test waits for one to pass

Observation = tuple[str, bool]


@pytest.fixture(params=["splice", "copy"])
def pump_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class RouteStarter:
    """Starts TCP routes for one test (each with its sweeper) and tears them all down."""

    def __init__(self, splice: bool) -> None:
        self.splice = splice
        self.started: list[tuple[TcpRoute, asyncio.Task[None]]] = []
        self.observed: list[Observation] = []

    async def start(
        self,
        servers: Sequence[tuple[str, tuple[str, int]]],
        *,
        balance: Balance = Balance.ROUNDROBIN,
        log_access: bool = False,
        **settings: Any,
    ) -> tuple[TcpRoute, tuple[str, int]]:
        """A route in front of ``(name, (host, port))`` servers; returns it and its address."""
        check = CheckConfig(observe=True)
        configs = tuple(
            ServerConfig(name, Address(host, port), check=check) for name, (host, port) in servers
        )
        backend = Backend(BackendConfig("app", configs, balance=balance))
        listener = ListenerConfig("tcp", Address(LOOPBACK, 0), "app", mode=ListenerMode.TCP)
        route = TcpRoute(
            listener,
            backend,
            TcpSettings(splice=self.splice, **settings),
            log_access=log_access,
            observe=lambda server, ok: self.observed.append((server.name, ok)),
        )
        sock = bind_listener(listener.bind, 256)
        route.start_accepting(sock)
        self.started.append((route, asyncio.create_task(sweep_forever(route))))
        return route, sock.getsockname()[:2]

    async def aclose(self) -> None:
        for route, sweeper in self.started:
            route.stop_accepting()
            route.abort_all()
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)


async def sweep_forever(route: TcpRoute) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(SWEEP_S)
        route.sweep(loop.time())


@pytest.fixture
async def routes(pump_kind: str) -> AsyncIterator[RouteStarter]:
    starter = RouteStarter(splice=pump_kind == "splice")
    try:
        yield starter
    finally:
        await starter.aclose()


@pytest.fixture
async def echo_servers(bound_socket_factory) -> AsyncIterator[list[TcpEchoServer]]:
    """Three raw echo servers; after the client's half-close each says goodbye with its name."""
    servers = [
        TcpEchoServer(bound_socket_factory(), name=f"e{n}", farewell=f"bye from e{n}".encode())
        for n in range(3)
    ]
    for server in servers:
        await server.start()
    try:
        yield servers
    finally:
        for server in servers:
            await server.aclose()


class BlobServer(UpstreamServer):
    """Sends ``blob`` as soon as a client connects, then closes; with ``reset_after`` set,
    sends that many bytes of it and resets instead (a server that dies mid-answer)."""

    def __init__(self, sock: socket.socket, blob: bytes, reset_after: int | None = None) -> None:
        super().__init__(sock, name="blob")
        self.blob = blob
        self.reset_after = reset_after

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        if self.reset_after is None:
            await self.send(writer, self.blob)
            return
        await self.send(writer, self.blob[: self.reset_after])
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


def addr_of(server: UpstreamServer) -> tuple[str, tuple[str, int]]:
    return server.name, server.addr


async def expect_reset(addr: tuple[str, int]) -> None:
    """Connect and read: the proxy must reset the connection, not close it with a FIN. The RST
    may come so soon that the connect itself reports it."""
    try:
        peer = await connect(addr)
    except ConnectionResetError:
        return
    got, error = await peer.read_to_eof()
    peer.sock.close()
    assert got == b"" and isinstance(error, ConnectionResetError)


async def connect(addr: tuple[str, int]) -> Peer:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(WAIT_S):
            await asyncio.get_running_loop().sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return Peer(sock)


async def echo_round_trip(addr: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` through an echo tunnel, half-close, return what came back (echo and
    farewell); the client socket is closed after."""
    peer = await connect(addr)
    try:
        async with asyncio.TaskGroup() as tasks:
            reading = tasks.create_task(peer.read_to_eof())
            await peer.send(data)
            peer.shutdown()
        got, error = reading.result()
        assert error is None
        return bytes(got)
    finally:
        peer.sock.close()


def settled(route: TcpRoute, *servers: Server) -> bool:
    """No tunnel left, and no request or connection counted on any server."""
    return not route.tunnels and all(s.inflight == 0 and s.conns == 0 for s in servers)


# --- bytes and counters ---------------------------------------------------------------------


async def test_echo_through_a_tunnel_counts_it_on_the_server(routes, echo_servers) -> None:
    route, addr = await routes.start([addr_of(echo_servers[0])])
    server = route.backend.servers[0]
    data = random_bytes(MIB, 1)
    peer = await connect(addr)
    async with asyncio.TaskGroup() as tasks:
        reading = tasks.create_task(peer.read_to_eof())
        await peer.send(data)
        await eventually(lambda: server.conns == 1)
        assert server.inflight == 1  # what `wait idle` looks at
        peer.shutdown()
    got, error = reading.result()
    peer.sock.close()
    assert error is None and sha(got) == sha(data + b"bye from e0")
    await eventually(lambda: settled(route, server))
    assert (route.bytes_up, route.bytes_down) == (len(data), len(got))
    assert routes.observed == [("e0", True)]


@pytest.mark.parametrize("size", [0, 1, 64 * 1024, MIB], ids=["0B", "1B", "64KiB", "1MiB"])
async def test_download_arrives_exactly(routes, bound_socket, size: int) -> None:
    blob = random_bytes(size, 2)
    async with BlobServer(bound_socket, blob) as blob_server:
        route, addr = await routes.start([addr_of(blob_server)])
        peer = await connect(addr)
        got, error = await peer.read_to_eof()  # the server's close reaches the client as EOF
        assert error is None and sha(got) == sha(blob)
        peer.sock.close()
        await eventually(lambda: settled(route, *route.backend.servers))


async def test_200_concurrent_tunnels(routes, echo_servers) -> None:
    route, addr = await routes.start([addr_of(s) for s in echo_servers])
    await echo_round_trip(addr, b"warm-up")  # uvloop opens its resolver's fd on first use
    await eventually(lambda: settled(route, *route.backend.servers))
    route.pool.close()
    fds_before = open_fds()
    payloads = [random_bytes(64 * 1024, n) for n in range(200)]
    async with asyncio.TaskGroup() as tasks:
        answers = [tasks.create_task(echo_round_trip(addr, p)) for p in payloads]
    for payload, answer in zip(payloads, answers, strict=True):
        assert answer.result().startswith(payload)
    await eventually(lambda: settled(route, *route.backend.servers))
    assert sum(s.echoed_bytes for s in echo_servers) == 200 * 64 * 1024 + len(b"warm-up")
    route.pool.close()  # idle pipes are the only fds a quiet route may keep
    await eventually(lambda: open_fds() == fds_before)


# --- failures -------------------------------------------------------------------------------


async def test_server_reset_mid_transfer_resets_the_client(routes, bound_socket, caplog) -> None:
    blob = random_bytes(MIB, 3)
    async with BlobServer(bound_socket, blob, reset_after=100_000) as blob_server:
        route, addr = await routes.start([addr_of(blob_server)], log_access=True)
        peer = await connect(addr)
        with caplog.at_level(logging.INFO, logger="zdlb.access"):
            got, error = await peer.read_to_eof()
            await eventually(lambda: settled(route, *route.backend.servers))
        peer.sock.close()
    assert isinstance(error, ConnectionResetError)
    assert blob.startswith(got)
    assert "end=upstream_failed" in caplog.text and "server=blob" in caplog.text


async def test_client_reset_resets_the_server(routes, echo_servers, caplog) -> None:
    route, addr = await routes.start([addr_of(echo_servers[0])], log_access=True)
    peer = await connect(addr)
    await peer.send(b"hello")
    await echo_servers[0].wait_until(lambda: echo_servers[0].echoed_bytes == 5)
    with caplog.at_level(logging.INFO, logger="zdlb.access"):
        peer.reset()
        await eventually(lambda: settled(route, *route.backend.servers))
    assert "end=downstream_failed" in caplog.text


async def test_connect_failure_retries_on_another_server(routes, echo_servers) -> None:
    refused_sock, refused = refused_address()
    try:
        route, addr = await routes.start([("down", refused), addr_of(echo_servers[0])])
        answer = await echo_round_trip(addr, b"ping")
    finally:
        refused_sock.close()
    assert answer == b"ping" + b"bye from e0"
    assert routes.observed == [("down", False), ("e0", True)]
    await eventually(lambda: settled(route, *route.backend.servers))


async def test_every_connect_failing_resets_the_client(routes) -> None:
    held = [refused_address() for _ in range(3)]
    try:
        route, addr = await routes.start([(f"r{n}", a) for n, (_, a) in enumerate(held)], retries=1)
        await expect_reset(addr)
    finally:
        for sock, _ in held:
            sock.close()
    assert [ok for _, ok in routes.observed] == [False, False]  # one try and one retry
    await eventually(lambda: settled(route, *route.backend.servers))


async def test_no_usable_server_resets_the_client(routes, echo_servers) -> None:
    route, addr = await routes.start([addr_of(echo_servers[0])])
    route.backend.servers[0].set_admin(AdminState.MAINT)
    await expect_reset(addr)
    assert echo_servers[0].accepted == 0 and routes.observed == []


async def test_connect_timeout_tries_the_next_server(routes, echo_servers) -> None:
    # A listener with backlog 0 and one connection queued drops further SYNs: a connect to it
    # hangs (the SYN is retried after 1 s, 3 s...), like one to a host that went away.
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blackhole.bind((LOOPBACK, 0))
        blackhole.listen(0)
        filler.settimeout(WAIT_S)
        filler.connect(blackhole.getsockname())
        servers = [("hole", blackhole.getsockname()), addr_of(echo_servers[0])]
        route, addr = await routes.start(servers, connect_s=SHORT_S)
        started = time.monotonic()
        answer = await echo_round_trip(addr, b"ping")
        elapsed = time.monotonic() - started
    finally:
        filler.close()
        blackhole.close()
    assert answer == b"ping" + b"bye from e0"
    assert elapsed >= SHORT_S
    assert routes.observed == [("hole", False), ("e0", True)]
    await eventually(lambda: settled(route, *route.backend.servers))


# --- deadlines, balance, shutdown -------------------------------------------------------------


async def test_idle_tunnel_is_closed_after_tunnel_s(routes, bound_socket, caplog) -> None:
    # No farewell: written after the proxy closed, it would draw an RST, and the fixture's
    # write_eof would then fail with ENOTCONN.
    async with TcpEchoServer(bound_socket, name="quiet") as server:
        route, addr = await routes.start([addr_of(server)], tunnel_s=SHORT_S, log_access=True)
        peer = await connect(addr)
        await peer.send(b"hello")
        with caplog.at_level(logging.INFO, logger="zdlb.access"):
            started = time.monotonic()
            got, error = await peer.read_to_eof()
            idle_s = time.monotonic() - started
            await eventually(lambda: settled(route, *route.backend.servers))
        peer.sock.close()
    assert (bytes(got), error) == (b"hello", None)
    assert SHORT_S * 0.9 <= idle_s < WAIT_S
    assert "end=idle" in caplog.text


async def test_busy_tunnel_outlives_tunnel_s(routes, echo_servers) -> None:
    route, addr = await routes.start([addr_of(echo_servers[0])], tunnel_s=SHORT_S)
    peer = await connect(addr)
    for _ in range(6):  # 6 x SHORT_S / 3: twice tunnel_s in all, never idle for tunnel_s
        await peer.send(b"tick")
        await asyncio.sleep(SHORT_S / 3)  # the pace is the behaviour under test
    assert len(route.tunnels) == 1
    peer.shutdown()
    got, error = await peer.read_to_eof()
    peer.sock.close()
    assert (bytes(got), error) == (b"tick" * 6 + b"bye from e0", None)


async def test_source_balance_keeps_a_client_on_one_server(routes, echo_servers) -> None:
    route, addr = await routes.start([addr_of(s) for s in echo_servers], balance=Balance.SOURCE)
    answers = {await echo_round_trip(addr, b"") for _ in range(6)}
    assert len(answers) == 1  # every farewell names the same server
    assert sorted(s.accepted for s in echo_servers) == [0, 0, 6]
    await eventually(lambda: settled(route, *route.backend.servers))


async def test_name_is_resolved(routes, echo_servers) -> None:
    found = await asyncio.get_running_loop().getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)
    if found[0][4][0] != LOOPBACK:
        pytest.skip("localhost does not resolve to 127.0.0.1 first here")
    route, addr = await routes.start([("named", ("localhost", echo_servers[0].port))])
    assert await echo_round_trip(addr, b"hi") == b"hi" + b"bye from e0"
    await eventually(lambda: settled(route, *route.backend.servers))


async def test_stop_accepting_lets_tunnels_finish(routes, echo_servers) -> None:
    route, addr = await routes.start([addr_of(echo_servers[0])])
    peer = await connect(addr)
    await peer.send(b"before")
    await echo_servers[0].wait_until(lambda: echo_servers[0].echoed_bytes == 6)
    route.stop_accepting()
    with pytest.raises(ConnectionRefusedError):
        await connect(addr)
    assert not route.drained.is_set()
    await peer.send(b"after")
    peer.shutdown()
    got, error = await peer.read_to_eof()
    peer.sock.close()
    assert (bytes(got), error) == (b"beforeafter" + b"bye from e0", None)
    async with asyncio.timeout(WAIT_S):
        await route.drained.wait()


async def test_abort_all_resets_open_tunnels(routes, echo_servers) -> None:
    route, addr = await routes.start([addr_of(echo_servers[0])])
    peers = [await connect(addr) for _ in range(3)]
    await eventually(lambda: route.backend.servers[0].conns == 3)
    route.abort_all()
    for peer in peers:
        _, error = await peer.read_to_eof()
        peer.sock.close()
        assert isinstance(error, ConnectionResetError)
    assert settled(route, *route.backend.servers)
