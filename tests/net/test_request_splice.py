"""Large request bodies spliced client -> server (http/splice.py), and the connection after.

A Content-Length request body with at least ``splice_min_bytes`` still to come once the head
reached the server goes through a pipe with ``os.splice`` on duplicated fds, while the client
is not read. Nothing may change for either peer: uploads byte-exact (sha256 compared), the
next request on the same connection answered, the upstream connection pooled and reused, an
early answer (413) delivered and the connection closed, a client that stops short answered
400, a server that dies mid-upload answered 502, and afterwards no request in flight and no fd
leaked. Runs on asyncio and uvloop (conftest.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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
from tests.servers import H11Client, pattern_bytes, refused_address
from zdlb.tcp.pipes import PipePool

MIB = 1 << 20
MIN_BYTES = 256 * 1024  # splice_min_bytes here: above one read, far below the large bodies


class UploadServer:
    """Keep-alive server that reads each request's Content-Length body and answers 200 with
    ``<length> <sha256>``. ``/early`` is answered 413 right after its head, body unread, and
    the connection closed; ``/die`` reads 1 MiB of the body, then resets the connection.
    ``Expect: 100-continue`` gets a 100 first. ``accepted`` counts connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self.received: list[int] = []  # body bytes of every request read whole

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                target = head.split(b" ")[1]
                length = 0
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if target == b"/early":
                    writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    return
                if b"expect: 100-continue" in head.lower():
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if target == b"/die":
                    await reader.readexactly(MIB)
                    writer.transport.abort()
                    return
                body = await reader.readexactly(length)
                self.received.append(len(body))
                answer = b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer))
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the proxy closed the connection
        finally:
            writer.close()


@asynccontextmanager
async def upload_server(sock: socket.socket) -> AsyncIterator[UploadServer]:
    upstream = UploadServer()
    async with await asyncio.start_server(upstream.handle, sock=sock):
        yield upstream


async def start_proxy(
    proxies: ProxyStarter, addr: tuple[str, int], min_bytes: int | bool = MIN_BYTES
) -> RunningProxy:
    """Through the config key, as a user sets it."""
    return await proxies.start(proxy_config([server_entry("s1", addr)], splice_min_bytes=min_bytes))


def digest(body: bytes) -> bytes:
    return b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())


def pipes_created(proxy: RunningProxy) -> int:
    pool = proxy.route.tunnel_pool
    assert isinstance(pool, PipePool)
    return pool.created


async def test_uploads_are_exact_and_the_connections_go_on(
    bound_socket: socket.socket, proxies: ProxyStarter
):
    async with upload_server(bound_socket) as upstream:
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2])
        fds_before = open_fds()
        async with await H11Client.connect(proxy.addr, timeout_s=WAIT_S) as client:
            for size in (8 * MIB, 100, 3 * MIB + 7, MIN_BYTES * 2, 0):
                body = pattern_bytes(size)
                response = await client.request("POST", "/up", body=body)
                assert (response.status, response.body) == (200, digest(body)), size
        assert upstream.accepted == 1  # the upstream connection was pooled after each splice
        assert pipes_created(proxy) > 0  # the splice path did run
        assert proxy.route.stats.responses[2] == 5
        assert proxy.route.stats.bytes_in > 11 * MIB  # spliced bytes are counted
        await assert_all_closed(proxy, fds_before)


async def test_pipelined_uploads_come_back_in_order(
    bound_socket: socket.socket, proxies: ProxyStarter
):
    async with upload_server(bound_socket):
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2])
        fds_before = open_fds()
        body = pattern_bytes(2 * MIB + 3)
        head = b"POST /a HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % len(body)
        after = b"POST /b HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\nhi"
        async with await RawClient.connect(proxy.addr) as client:
            await client.send(head + body + after)
            first = await client.read_response()
            second = await client.read_response()
        assert (first.body, second.body) == (digest(body), digest(b"hi"))
        await assert_all_closed(proxy, fds_before)


async def test_expect_100_continue(bound_socket: socket.socket, proxies: ProxyStarter):
    async with upload_server(bound_socket):
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2])
        body = pattern_bytes(4 * MIB)
        async with await H11Client.connect(proxy.addr, timeout_s=WAIT_S) as client:
            response = await client.request(
                "PUT", "/up", headers=[("expect", "100-continue")], body=body
            )
        assert response.body == digest(body)
        assert pipes_created(proxy) > 0


async def test_early_answer_reaches_the_client_and_closes(
    bound_socket: socket.socket, proxies: ProxyStarter
):
    """The server answers 413 without reading the body: the client gets the 413, then the
    connection closes (the rest of the body is never read); nothing is left in flight."""
    async with upload_server(bound_socket):
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2])
        fds_before = open_fds()
        body = pattern_bytes(16 * MIB)
        head = b"POST /early HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % len(body)
        async with await RawClient.connect(proxy.addr) as client:
            client.writer.write(head + body[: MIB // 2])
            response = await client.read_response()
            assert response.status == 413
            assert response.header("connection") == "close"
            _, error = await client.read_until_closed()
            assert error is None or isinstance(error, ConnectionError)
        await assert_all_closed(proxy, fds_before)


async def test_client_that_stops_short_gets_400(bound_socket: socket.socket, proxies: ProxyStarter):
    async with upload_server(bound_socket) as upstream:
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2])
        fds_before = open_fds()
        head = b"POST /up HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % (8 * MIB)
        async with await RawClient.connect(proxy.addr) as client:
            await client.send(head + pattern_bytes(2 * MIB))
            await eventually(lambda: pipes_created(proxy) > 0)  # the splice has started
            client.writer.write_eof()
            response = await client.read_response()
            assert response.status == 400
        assert upstream.received == []  # the server never saw a whole body
        await assert_all_closed(proxy, fds_before)


async def test_server_dying_mid_upload_gives_502(
    bound_socket: socket.socket, proxies: ProxyStarter
):
    async with upload_server(bound_socket):
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2])
        fds_before = open_fds()
        body = pattern_bytes(8 * MIB)
        head = b"POST /die HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % len(body)
        async with await RawClient.connect(proxy.addr) as client:
            client.writer.write(head + body)
            response = await client.read_response()
            assert response.status == 502
        await assert_all_closed(proxy, fds_before)


async def test_slow_server_gets_the_whole_body(bound_socket: socket.socket, proxies: ProxyStarter):
    """A server with a 4 KiB receive buffer reading 4 KiB at a time: the splice waits on the
    server (backpressure) and the client is not read meanwhile."""
    received = bytearray()
    # Set on the listening socket, so accepted ones start with it: shrinking it after the
    # handshake leaves the sender probing a closed window on its persist timer.
    bound_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(received) < length:
            received.extend(await reader.read(4096))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()

    async with await asyncio.start_server(handle, sock=bound_socket):
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2])
        body = pattern_bytes(3 * MIB)
        async with await H11Client.connect(proxy.addr, timeout_s=WAIT_S) as client:
            response = await client.request("POST", "/", body=body)
        assert response.status == 204
        assert received == body
        assert pipes_created(proxy) > 0


async def test_off_with_false(bound_socket: socket.socket, proxies: ProxyStarter):
    async with upload_server(bound_socket):
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2], min_bytes=False)
        body = pattern_bytes(4 * MIB)
        async with await H11Client.connect(proxy.addr, timeout_s=WAIT_S) as client:
            response = await client.request("POST", "/up", body=body)
        assert response.body == digest(body)
        assert pipes_created(proxy) == 0


async def test_below_the_threshold_stays_on_the_plain_path(
    bound_socket: socket.socket, proxies: ProxyStarter
):
    async with upload_server(bound_socket):
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2], min_bytes=8 * MIB)
        body = pattern_bytes(4 * MIB)
        async with await H11Client.connect(proxy.addr, timeout_s=WAIT_S) as client:
            response = await client.request("POST", "/up", body=body)
        assert response.body == digest(body)
        assert pipes_created(proxy) == 0


async def test_retried_connect_then_spliced_upload(
    bound_socket: socket.socket, proxies: ProxyStarter
):
    """The first server refuses the connection: the head and what was read with it go to the
    other one (retries), and only then does the rest of the body go by splice."""
    refused_sock, refused = refused_address()
    try:
        async with upload_server(bound_socket) as upstream:
            config = proxy_config(
                [server_entry("dead", refused), server_entry("s1", bound_socket.getsockname()[:2])],
                retries=1,
                splice_min_bytes=MIN_BYTES,
            )
            proxy = await proxies.start(config)
            body = pattern_bytes(4 * MIB + 1)
            async with await H11Client.connect(proxy.addr, timeout_s=WAIT_S) as client:
                for _ in range(2):  # round robin: one of the two starts on the dead server
                    response = await client.request("POST", "/up", body=body)
                    assert response.body == digest(body)
            assert upstream.received == [len(body)] * 2
            assert pipes_created(proxy) > 0
    finally:
        refused_sock.close()


@pytest.mark.parametrize("seed", range(4))
async def test_random_uploads_in_random_pieces_stay_exact(
    bound_socket: socket.socket, proxies: ProxyStarter, seed: int
):
    """Pipelined POSTs of random sizes around the threshold (empty ones too), written in pieces
    of random sizes, so the first read of a body ends anywhere and later ones queue behind the
    first: every answer is the digest of exactly its own body, in order, on one connection."""
    rng = random.Random(seed)
    min_bytes = 64 * 1024
    async with upload_server(bound_socket) as upstream:
        proxy = await start_proxy(proxies, bound_socket.getsockname()[:2], min_bytes=min_bytes)
        bodies = [
            pattern_bytes(rng.choice([0, 10, min_bytes - 1, min_bytes, 300_000, 2 * MIB + 3]))
            for _ in range(6)
        ]
        stream = b"".join(
            b"POST /%d HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n%s" % (i, len(b), b)
            for i, b in enumerate(bodies)
        )
        async with await RawClient.connect(proxy.addr) as client:
            sender = asyncio.create_task(send_in_pieces(client, stream, rng))
            for body in bodies:
                response = await client.read_response()
                assert response.body == digest(body)
            await sender
        assert upstream.accepted == 1
        assert upstream.received == [len(b) for b in bodies]


async def send_in_pieces(client: RawClient, data: bytes, rng: random.Random) -> None:
    view = memoryview(data)
    while view:
        size = rng.choice([1, 7, 4096, 65_536, 300_000])
        await client.send(bytes(view[:size]))
        view = view[size:]
