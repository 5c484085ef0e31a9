"""The fixture servers of tests/servers.py, and the demo app, behave exactly as documented.

Proxy tests trust these servers to misbehave in one precise way each; a fixture that drifted
(a reset that became a clean close, a dribble that became a burst) would make those tests pass
for the wrong reason. Clients here are raw sockets or h11, never zdlb code.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import h11
import pytest
import uvloop

from tests.servers import (
    DEFAULT_GARBAGE_REPLY,
    DribbleServer,
    EchoServer,
    GarbageServer,
    H11Client,
    ResetServer,
    SilentServer,
    StaleKeepAliveServer,
    StaleMode,
    TcpEchoServer,
    TruncatingServer,
    UpstreamServer,
    pattern_bytes,
)
from zdlb.daemon.demo_app import DemoVhost, serve_demo_vhost, start_demo_hosts

# Every awaited expectation gets this deadline; the pytest-timeout backstop is far longer.
WAIT_S = 5.0
# How long "nothing happens" is watched for. Short, since it only has to catch a server that
# answers at once; a late answer would still be caught by the test's later assertions.
QUIET_S = 0.2
# Cap on bytes pushed at a server that never reads: loopback buffers autotune to a few MiB.
MAX_UNREAD_BYTES = 64 * 1024 * 1024


async def raw_connect(addr: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(WAIT_S):
            await asyncio.get_running_loop().sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


async def recv_until_eof(sock: socket.socket) -> tuple[bytes, BaseException | None]:
    """Every byte until EOF or an error; the error (e.g. a reset) is returned, not raised."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 65536)
            except OSError as exc:
                return bytes(received), exc
            if not chunk:
                return bytes(received), None
            received += chunk


def get_request(target: str = "/", extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nhost: upstream.test\r\n{extra}\r\n".encode()


# --- loops and the loop-error guard -----------------------------------------------------------


async def test_net_tests_run_on_the_loop_named_in_their_id(request: pytest.FixtureRequest):
    is_uvloop = isinstance(asyncio.get_running_loop(), uvloop.Loop)
    assert request.node.name.endswith("[uvloop]" if is_uvloop else "[asyncio]")


async def test_loop_exception_handler_calls_are_recorded(loop_errors):
    asyncio.get_running_loop().call_exception_handler({"message": "provoked on purpose"})
    assert [ctx["message"] for ctx in loop_errors] == ["provoked on purpose"]
    loop_errors.clear()  # expected: keep the guard from failing this test


# --- echo server ------------------------------------------------------------------------------


async def test_echo_describes_the_request(echo_server: EchoServer):
    async with await H11Client.connect(echo_server.addr) as client:
        response = await client.request(
            "POST", "/path?q=1", headers=[("X-Mixed-Case", "yes")], body=b"12345"
        )
    assert response.status == 200
    assert response.header("content-type") == "application/json"
    echoed = response.json()
    assert echoed["method"] == "POST"
    assert echoed["target"] == "/path?q=1"
    assert ["X-Mixed-Case", "yes"] in echoed["headers"]
    assert echoed["body_bytes"] == 5
    assert (echoed["server"], echoed["conn_seq"], echoed["req_seq"]) == ("echo", 1, 1)
    assert echo_server.requests[0].header("x-mixed-case") == "yes"
    assert echo_server.requests[0].body_bytes == 5


async def test_echo_keeps_the_connection_alive_and_counts(echo_server: EchoServer):
    async with await H11Client.connect(echo_server.addr) as client:
        first = await client.request()
        second = await client.request()
    assert [first.header("x-req-seq"), second.header("x-req-seq")] == ["1", "2"]
    assert first.header("x-conn-seq") == second.header("x-conn-seq") == "1"
    assert echo_server.accepted == 1
    assert len(echo_server.requests) == 2


async def test_echo_reads_a_chunked_request_body(echo_server: EchoServer):
    async with await H11Client.connect(echo_server.addr) as client:
        response = await client.request(
            "PUT", headers=[("transfer-encoding", "chunked")], body=b"x" * 3000
        )
    assert response.json()["body_bytes"] == 3000


async def test_echo_answers_chunked_in_several_chunks(echo_server: EchoServer):
    sock = await raw_connect(echo_server.addr)
    with sock:
        extra = "x-respond-chunked: 1\r\nx-respond-bytes: 10\r\nconnection: close\r\n"
        await asyncio.get_running_loop().sock_sendall(sock, get_request(extra=extra))
        raw, error = await recv_until_eof(sock)
    assert error is None
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\r\ntransfer-encoding: chunked" in head.lower()
    assert b"content-length" not in head.lower()
    expected = pattern_bytes(10)
    assert body == b"5\r\n" + expected[:5] + b"\r\n5\r\n" + expected[5:] + b"\r\n0\r\n\r\n"


async def test_echo_sends_the_requested_number_of_bytes(echo_server: EchoServer):
    size = 300_000  # several drains and several 16 KiB writes
    async with await H11Client.connect(echo_server.addr) as client:
        plain = await client.request(headers=[("x-respond-bytes", str(size))])
        chunked = await client.request(
            headers=[("x-respond-bytes", str(size)), ("x-respond-chunked", "1")]
        )
    assert plain.header("content-length") == str(size)
    assert plain.body == chunked.body == pattern_bytes(size)


@pytest.mark.parametrize(
    "request_headers",
    [[("connection", "close")], [("x-respond-close", "1")]],
    ids=["client-asks", "server-decides"],
)
async def test_echo_closes_after_a_connection_close_answer(
    echo_server: EchoServer, request_headers: list[tuple[str, str]]
):
    async with await H11Client.connect(echo_server.addr) as client:
        response = await client.request(headers=request_headers)
        assert response.header("connection") == "close"
        assert not client.is_reusable
        async with asyncio.timeout(WAIT_S):
            assert await client.reader.read() == b""


async def test_echo_head_has_get_headers_and_no_body(echo_server: EchoServer):
    async with await H11Client.connect(echo_server.addr) as client:
        head = await client.request("HEAD", headers=[("x-respond-bytes", "1000")])
        after = await client.request()  # a stray body would corrupt this response
    assert head.header("content-length") == "1000"
    assert head.body == b""
    assert after.status == 200
    assert after.json()["req_seq"] == 2


async def test_echo_204_has_no_body_and_no_framing(echo_server: EchoServer):
    async with await H11Client.connect(echo_server.addr) as client:
        response = await client.request(headers=[("x-respond-status", "204")])
        again = await client.request(headers=[("x-respond-status", "503")])
    assert response.status == 204
    assert response.body == b""
    assert response.header("content-length") is None
    assert response.header("transfer-encoding") is None
    assert again.status == 503


async def test_echo_answers_100_continue(echo_server: EchoServer):
    sock = await raw_connect(echo_server.addr)
    loop = asyncio.get_running_loop()
    with sock:
        head = (
            b"POST / HTTP/1.1\r\nhost: upstream.test\r\ncontent-length: 4\r\n"
            b"expect: 100-continue\r\nconnection: close\r\n\r\n"
        )
        await loop.sock_sendall(sock, head)
        async with asyncio.timeout(WAIT_S):
            interim = await loop.sock_recv(sock, 65536)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await loop.sock_sendall(sock, b"body")
        raw, _ = await recv_until_eof(sock)
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["body_bytes"] == 4


async def test_echo_rejects_a_malformed_request_with_400(echo_server: EchoServer):
    sock = await raw_connect(echo_server.addr)
    with sock:
        await asyncio.get_running_loop().sock_sendall(sock, b"NOT HTTP AT ALL\r\n\r\n")
        raw, error = await recv_until_eof(sock)
    assert error is None
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert echo_server.protocol_errors == 1
    assert echo_server.requests == []


async def test_aclose_raises_what_a_handler_raised(bound_socket: socket.socket):
    class BrokenServer(UpstreamServer):
        async def handle(self, reader, writer, conn_seq):
            raise ValueError("fixture bug")

    server = await BrokenServer(bound_socket).start()
    sock = await raw_connect(server.addr)
    with sock:
        _, error = await recv_until_eof(sock)
    assert error is None  # the connection was closed, not left hanging
    with pytest.raises(ExceptionGroup) as caught:
        await server.aclose()
    assert caught.group_contains(ValueError, match="fixture bug")


# --- refused, backlog-only, silent ------------------------------------------------------------


async def test_refused_addr_refuses(refused_addr: tuple[str, int]):
    with pytest.raises(ConnectionRefusedError):
        async with asyncio.timeout(WAIT_S):
            await asyncio.open_connection(*refused_addr)


async def test_bound_socket_alone_completes_the_handshake_then_says_nothing(
    bound_socket: socket.socket,
):
    sock = await raw_connect(bound_socket.getsockname())
    with sock:
        await asyncio.get_running_loop().sock_sendall(sock, get_request())
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(QUIET_S):
                await asyncio.get_running_loop().sock_recv(sock, 1)


async def test_silent_server_accepts_but_never_reads_or_answers(silent_server: SilentServer):
    sock = await raw_connect(silent_server.addr)
    with sock:
        async with asyncio.timeout(WAIT_S):
            await silent_server.wait_accepted(1)
        # Push bytes without waiting until the kernel refuses more: only a server that never
        # reads lets both socket buffers fill up.
        chunk = b"x" * 65536
        sent = 0
        with pytest.raises(BlockingIOError):
            while sent < MAX_UNREAD_BYTES:
                sent += sock.send(chunk)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(QUIET_S):
                await asyncio.get_running_loop().sock_recv(sock, 1)
        await silent_server.aclose()
        _, error = await recv_until_eof(sock)  # closing the server ends the connection
    assert isinstance(error, ConnectionResetError | None)
    assert silent_server.requests == []


# --- garbage, reset, truncated ----------------------------------------------------------------


async def test_garbage_server_answers_a_malformed_status_line_then_closes(
    garbage_server: GarbageServer,
):
    sock = await raw_connect(garbage_server.addr)
    with sock:
        await asyncio.get_running_loop().sock_sendall(sock, get_request())
        raw, error = await recv_until_eof(sock)
    assert (raw, error) == (DEFAULT_GARBAGE_REPLY, None)
    async with await H11Client.connect(garbage_server.addr) as client:
        with pytest.raises(h11.RemoteProtocolError):
            await client.request()
    assert len(garbage_server.requests) == 2


async def test_reset_server_sends_half_the_body_then_resets(reset_server: ResetServer):
    sock = await raw_connect(reset_server.addr)
    with sock:
        await asyncio.get_running_loop().sock_sendall(sock, get_request())
        raw, error = await recv_until_eof(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert f"content-length: {reset_server.declared_body_bytes}".encode() in head
    assert body == pattern_bytes(reset_server.sent_body_bytes)
    assert isinstance(error, ConnectionResetError)


async def test_truncating_server_sends_half_the_body_then_closes_cleanly(
    truncating_server: TruncatingServer,
):
    sock = await raw_connect(truncating_server.addr)
    with sock:
        await asyncio.get_running_loop().sock_sendall(sock, get_request())
        raw, error = await recv_until_eof(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert f"content-length: {truncating_server.declared_body_bytes}".encode() in head
    assert body == pattern_bytes(truncating_server.sent_body_bytes)
    assert error is None
    async with await H11Client.connect(truncating_server.addr) as client:
        with pytest.raises(h11.RemoteProtocolError, match="complete message body"):
            await client.request()


# --- stale keep-alive -------------------------------------------------------------------------


async def test_stale_server_closes_right_after_promising_keep_alive(
    stale_server: StaleKeepAliveServer,
):
    async with await H11Client.connect(stale_server.addr) as client:
        response = await client.request()
        assert response.status == 200
        assert response.header("connection") == "keep-alive"
        assert client.is_reusable  # h11 agrees the server promised another round
        async with asyncio.timeout(WAIT_S):
            assert await client.reader.read() == b""
    async with await H11Client.connect(stale_server.addr) as client:
        assert (await client.request()).status == 200
    assert (stale_server.accepted, stale_server.answered) == (2, 2)


async def test_stale_server_on_next_request_drops_it_unanswered(bound_socket: socket.socket):
    async with (
        StaleKeepAliveServer(bound_socket, mode=StaleMode.ON_NEXT_REQUEST) as server,
        await H11Client.connect(server.addr) as client,
    ):
        assert (await client.request()).status == 200
        with pytest.raises(TimeoutError):  # still open while idle: it looks poolable
            async with asyncio.timeout(QUIET_S):
                await client.reader.read(1)
        with pytest.raises(h11.RemoteProtocolError):
            await client.request()
        async with asyncio.timeout(WAIT_S):
            await server.wait_until(lambda: server.dropped == 1)
        assert (server.accepted, server.answered, len(server.requests)) == (1, 1, 2)


# --- dribble ----------------------------------------------------------------------------------


async def test_dribble_server_sends_one_byte_per_interval(bound_socket: socket.socket):
    interval_s = 0.005
    async with DribbleServer(bound_socket, interval_s=interval_s, body=b"drip") as server:
        sock = await raw_connect(server.addr)
        with sock:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, get_request())
            started = time.monotonic()
            reads = 0
            received = bytearray()
            async with asyncio.timeout(WAIT_S):
                while chunk := await loop.sock_recv(sock, 65536):
                    reads += 1
                    received += chunk
            elapsed_s = time.monotonic() - started
    assert bytes(received) == server.response
    assert elapsed_s >= (len(server.response) - 1) * interval_s * 0.9  # timer slack
    # Bytes only merge when this loop falls behind; most reads must still see a single byte.
    assert reads > len(server.response) // 2


async def test_dribbled_response_is_valid_http(dribble_server: DribbleServer):
    async with await H11Client.connect(dribble_server.addr) as client:
        response = await client.request()
    assert (response.status, response.body) == (200, dribble_server.body)


# --- tcp echo ---------------------------------------------------------------------------------


async def test_tcp_echo_answers_a_half_close_with_farewell_and_its_own(
    bound_socket: socket.socket,
):
    async with TcpEchoServer(bound_socket, farewell=b"bye") as server:
        sock = await raw_connect(server.addr)
        with sock:
            await asyncio.get_running_loop().sock_sendall(sock, b"ping" * 1000)
            sock.shutdown(socket.SHUT_WR)
            raw, error = await recv_until_eof(sock)
        async with asyncio.timeout(WAIT_S):
            await server.wait_until(lambda: server.eofs == 1)
    assert (raw, error) == (b"ping" * 1000 + b"bye", None)
    assert server.echoed_bytes == 4000


# --- demo app ---------------------------------------------------------------------------------


async def test_demo_vhost_page_health_and_not_found(bound_socket: socket.socket):
    server = await serve_demo_vhost("front-1", "main", "v1", bound_socket)
    try:
        async with await H11Client.connect(server.addr) as client:
            page = await client.request(headers=[("x-forwarded-for", "192.0.2.7")])
            posted = await client.request("POST", body=b"abc")
            head = await client.request("HEAD")
            health = await client.request("GET", "/health")
            missing = await client.request("GET", "/nope")
            deleted = await client.request("DELETE")
    finally:
        server.close()
        await server.wait_closed()
    assert page.status == 200
    lines = page.body.decode().splitlines()
    assert lines[:3] == ["host: front-1", "vhost: main", "version: v1"]
    assert "x-forwarded-for: 192.0.2.7" in lines
    assert page.header("x-demo-server") == "front-1/main/v1"
    assert "body-bytes: 3" in posted.body.decode().splitlines()
    assert head.body == b""
    assert head.header("content-length") is not None
    assert (health.status, health.body) == (200, b"ok\n")
    assert missing.status == 404
    assert (deleted.status, deleted.header("allow")) == (405, "GET, HEAD, POST, PUT")
    assert server.requests == 6


async def test_demo_vhost_close_ends_idle_keep_alive_connections(bound_socket: socket.socket):
    server = await serve_demo_vhost("front-2", "backup", "v2", bound_socket)
    async with await H11Client.connect(server.addr) as client:
        assert (await client.request()).status == 200
        server.close()
        async with asyncio.timeout(WAIT_S):
            await server.wait_closed()
            assert await client.reader.read() == b""
    assert bound_socket.fileno() == -1


async def test_start_demo_hosts_serves_each_vhost_under_its_name():
    specs = [DemoVhost("front-1", "main", "v1", 0), DemoVhost("front-1", "backup", "v2", 0)]
    hosts = await start_demo_hosts("127.0.0.1", specs)
    try:
        served = []
        for server in hosts.servers:
            async with await H11Client.connect(server.addr) as client:
                served.append((await client.request()).header("x-demo-server"))
    finally:
        hosts.close()
        await hosts.wait_closed()
    assert served == ["front-1/main/v1", "front-1/backup/v2"]
    assert all(server.spec.port == server.addr[1] != 0 for server in hosts.servers)
