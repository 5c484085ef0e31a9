"""Large response bodies spliced server -> client (http/splice.py), and the connection after.

With ``TunnelSettings.splice_min_bytes`` set, a Content-Length body with that much left after
the first read moves through a pipe with ``os.splice`` on duplicated fds while both transports
are paused. What matters is that nothing changes for either peer: bodies byte-exact, the next
request on the same client connection answered, the upstream connection pooled and reused,
a body cut short still seen as cut short, counters back to 0, no fd leaked. Runs on asyncio
and uvloop (conftest.py); the copy pump has no splice, so there the feature stays off.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import pytest

from tests.net.proxy_harness import (
    WAIT_S,
    ProxyStarter,
    RawClient,
    RunningProxy,
    assert_all_closed,
    eventually,
    open_fds,
    proxy_config,
    server_entry,
)
from tests.servers import H11Client, TruncatingServer, pattern_bytes
from zdlb.http.splice import BodySplice
from zdlb.http.upgrade import TunnelSettings
from zdlb.tcp.pipes import PipePool

MIB = 1 << 20
MIN_BYTES = 256 * 1024  # splice_min_bytes in these tests: above one read, far below the bodies


class SizedServer:
    """Keep-alive server: ``GET /<n>`` is answered with ``pattern_bytes(n)``, Content-Length.
    ``accepted`` counts connections, so a test sees whether the proxy reused one."""

    def __init__(self) -> None:
        self.accepted = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                size = int(head.split(b" ")[1][1:])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                writer.write(pattern_bytes(size))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the proxy closed its pooled connection
        finally:
            writer.close()


@asynccontextmanager
async def sized_server(sock: socket.socket) -> AsyncIterator[SizedServer]:
    upstream = SizedServer()
    async with await asyncio.start_server(upstream.handle, sock=sock):
        yield upstream


async def start_proxy(
    proxies: ProxyStarter, addr: tuple[str, int], min_bytes: int | None = MIN_BYTES
) -> RunningProxy:
    proxy = await proxies.start(proxy_config([server_entry("s1", addr)]))
    proxy.route.configure_tunnels(TunnelSettings(splice_min_bytes=min_bytes))
    return proxy


async def test_large_bodies_are_exact_and_the_connections_go_on(
    bound_socket: socket.socket, proxies: ProxyStarter
):
    async with sized_server(bound_socket) as upstream:
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2])
        fds_before = open_fds()
        async with await H11Client.connect(proxy.addr, timeout_s=WAIT_S) as client:
            for size in (8 * MIB, 100, 3 * MIB + 7, MIN_BYTES * 2, 5):
                response = await client.request(target=f"/{size}")
                assert response.status == 200
                assert response.body == pattern_bytes(size), size
        assert upstream.accepted == 1  # the upstream connection was pooled after each splice
        pool = proxy.route.tunnel_pool
        assert isinstance(pool, PipePool) and pool.created > 0  # the splice path did run
        assert proxy.route.stats.responses[2] == 5
        await assert_all_closed(proxy, fds_before)


async def test_pipelined_large_bodies_come_back_in_order(
    bound_socket: socket.socket, proxies: ProxyStarter
):
    async with sized_server(bound_socket):
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2])
        fds_before = open_fds()
        sizes = [2 * MIB, 10, 4 * MIB + 1]
        async with await RawClient.connect(proxy.addr) as client:
            await client.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: p\r\n\r\n" % n for n in sizes))
            for size in sizes:
                response = await client.read_response()
                assert response.body == pattern_bytes(size), size
        await assert_all_closed(proxy, fds_before)


async def test_body_cut_short_during_the_splice_is_seen_as_cut(
    bound_socket: socket.socket, proxies: ProxyStarter
):
    async with TruncatingServer(bound_socket, declared_body_bytes=8 * MIB) as upstream:
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2])
        fds_before = open_fds()
        async with await H11Client.connect(proxy.addr, timeout_s=WAIT_S) as client:
            with pytest.raises((h11.RemoteProtocolError, ConnectionError)):
                await client.request(target="/cut")
        assert upstream.sent_body_bytes == 4 * MIB
        pool = proxy.route.tunnel_pool
        assert isinstance(pool, PipePool) and pool.created > 0  # cut during the splice
        await assert_all_closed(proxy, fds_before)


async def test_slow_client_gets_the_whole_body(bound_socket: socket.socket, proxies: ProxyStarter):
    """A client with a 4 KiB receive buffer: the splice waits on the client (backpressure)."""
    async with sized_server(bound_socket):
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2])
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        async with asyncio.timeout(WAIT_S):
            await loop.sock_connect(sock, proxy.addr)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /%d HTTP/1.1\r\nHost: p\r\n\r\n" % (2 * MIB))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            body = bytearray()
            while len(body) < 2 * MIB:
                body += await reader.read(4096)
            assert body == pattern_bytes(2 * MIB)
            writer.close()
            await writer.wait_closed()
        await eventually(lambda: proxy.server("s1").inflight == 0)


async def test_off_without_a_threshold(bound_socket: socket.socket, proxies: ProxyStarter):
    async with sized_server(bound_socket):
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2], min_bytes=None)
        async with await H11Client.connect(proxy.addr, timeout_s=WAIT_S) as client:
            response = await client.request(target=f"/{4 * MIB}")
        assert response.body == pattern_bytes(4 * MIB)
        pool = proxy.route.tunnel_pool
        assert isinstance(pool, PipePool) and pool.created == 0


async def test_body_arriving_in_bursts_to_a_slow_client(
    bound_socket: socket.socket, proxies: ProxyStarter
):
    """The splice waits on the client, then finds less than a pipe's worth from the server,
    then waits on the server: every readiness change of splice.py in one body."""
    first, second = MIB + 100_000, MIB
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = pattern_bytes(first + second)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body[:first])
        await release.wait()
        writer.write(body[first:])
        await writer.drain()
        writer.close()

    async with await asyncio.start_server(handle, sock=bound_socket):
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2])
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        async with asyncio.timeout(WAIT_S):
            await loop.sock_connect(sock, proxy.addr)
            reader, writer = await asyncio.open_connection(sock=sock)
            await eventually(lambda: bool(proxy.connections))
            transport = proxy.only_connection().transport
            assert transport is not None  # a small send buffer: the splice must wait on it
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            writer.write(b"GET / HTTP/1.1\r\nHost: p\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            conn = proxy.only_connection()
            await eventually(lambda: "pending=0" not in repr(conn.detour))  # waits on dst
            # Now room for all: the pipe drains, the next fill is partial and drains at once.
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MIB
            )
            body = bytearray(await reader.readexactly(first))
            release.set()
            body += await reader.readexactly(second)
            assert body == pattern_bytes(first + second)
            writer.close()
            await writer.wait_closed()
        await eventually(lambda: proxy.server("s1").inflight == 0)


async def test_splice_waits_on_each_side_in_turn():
    """BodySplice alone on socket pairs, driven step by step: a partial fill that drains at
    once right after a wait on the destination must go back to waiting on the source."""
    loop = asyncio.get_running_loop()
    src_peer, src = socket.socketpair()
    dst, dst_peer = socket.socketpair()
    pool = PipePool(MIB)
    ended: list[bool] = []
    try:
        for sock in (src_peer, src, dst, dst_peer):
            sock.setblocking(False)
        junk = 0
        try:
            while True:  # fill dst: the first drain has to wait
                junk += dst.send(b"j" * 65536)
        except BlockingIOError:
            pass
        splicer = BodySplice(
            loop, os.dup(src.fileno()), os.dup(dst.fileno()), 200, pool, ended.append
        )
        src_peer.send(b"a" * 100)
        splicer.start()
        await eventually(lambda: "pending=100" in repr(splicer))  # waits on dst
        src_peer.send(b"b" * 50)
        received = bytearray()
        while len(received) < junk:  # room in dst: drain, then a partial fill of 50
            received += await loop.sock_recv(dst_peer, 65536)
        await eventually(lambda: splicer.remaining == 50 and "pending=0" in repr(splicer))
        src_peer.send(b"c" * 50)
        await eventually(lambda: bool(ended))
        while len(received) < junk + 200:
            received += await loop.sock_recv(dst_peer, 65536)
        assert (ended, bytes(received[junk:])) == ([True], b"a" * 100 + b"b" * 50 + b"c" * 50)
        assert splicer.moved == 200
    finally:
        splicer.stop()
        pool.close()
        for sock in (src_peer, src, dst, dst_peer):
            sock.close()
