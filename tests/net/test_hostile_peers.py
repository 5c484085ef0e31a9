"""Three holes found by hostile tests, closed, through the real proxy on loopback sockets.

1. A server that answers twice: its stray second answer must never reach another user (the
   ``reuse`` policy keeps a client's first request off pooled connections, and an idle pooled
   connection that receives a byte is closed and counted against its server).
2. A chunked body sent as one-byte chunks: refused once its chunks stop carrying payload
   (chunked.py's budget), and an unrelated client is answered meanwhile.
3. An absolute-form target whose authority is not the Host: refused; a matching one goes to the
   server in origin-form (RFC 9112 section 3.2.2).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from tests.net.proxy_harness import (
    WAIT_S,
    ProxyStarter,
    RawClient,
    RunningProxy,
    disable_nagle,
    eventually,
    proxy_config,
    server_entry,
)
from tests.servers import EchoServer, H11Client, StrayServer, UpstreamServer
from zdlb.http.chunked import FREE_CHUNKS


async def start_for(proxies: ProxyStarter, server: UpstreamServer, **options) -> RunningProxy:
    disable_nagle(server)
    return await proxies.start(proxy_config([server_entry(server.name, server.addr)], **options))


@pytest.fixture
async def stray_server(bound_socket: socket.socket) -> AsyncIterator[StrayServer]:
    async with StrayServer(bound_socket, name="stray") as server:
        yield server


# --- 1. a server's stray answer ----------------------------------------------------------------


async def test_a_stray_answer_never_reaches_another_client(
    stray_server: StrayServer, proxies: ProxyStarter
):
    """The issue's sequence: client A is answered; client B arrives while A's upstream
    connection still owes a stray answer; then the stray comes. Under the default ``safe``
    policy B's first request has a connection of its own, and the stray, arriving on an idle
    pooled connection, is dropped with that connection and counted against the server."""
    proxy = await start_for(proxies, stray_server)
    async with await H11Client.connect(proxy.addr) as a:
        first = await a.request(target="/a")
        async with await H11Client.connect(proxy.addr) as b:
            answer_b = await b.request(target="/b")
            stray_server.send_stray.set()
            await eventually(lambda: proxy.pool("stray").stats.stray_responses == 2)
            again_b = await b.request(target="/b2")
        again_a = await a.request(target="/a2")
    assert first.body == b"first-1"
    assert answer_b.body == b"first-2"  # its own connection: never STRAY-1
    assert again_b.body == b"first-3"  # both pooled connections were closed on their stray
    assert again_a.body.startswith(b"first-")  # (A's is one of them, or B's fresh one)
    assert b"STRAY" not in again_a.body + again_b.body
    assert proxy.server("stray").inflight == 0


async def test_reuse_always_is_the_opt_in_that_shares_first_requests(
    stray_server: StrayServer, proxies: ProxyStarter
):
    """Why ``always`` is opt-in: the same sequence hands B the connection A used, and the
    stray that arrives while B waits is B's answer. (``safe`` above prevents exactly this.)"""
    proxy = await start_for(proxies, stray_server, reuse="always")
    async with await H11Client.connect(proxy.addr) as a:
        await a.request(target="/a")
        async with await H11Client.connect(proxy.addr) as b:
            pending = asyncio.create_task(b.request(target="/b"))
            await stray_server.wait_until(lambda: stray_server.accepted == 1)
            await eventually(lambda: proxy.server("stray").inflight == 1)
            stray_server.send_stray.set()
            async with asyncio.timeout(WAIT_S):
                answer_b = await pending
    assert answer_b.body == b"STRAY-1"


# --- 2. tiny chunks ----------------------------------------------------------------------------


async def test_one_byte_chunks_are_refused_and_do_not_stall_others(
    echo_server: EchoServer, proxies: ProxyStarter
):
    proxy = await start_for(proxies, echo_server)
    chunks = b"1\r\nx\r\n" * (4 * FREE_CHUNKS)  # 4x the free chunks: refused well before the end
    head = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    latencies = []
    loop = asyncio.get_running_loop()
    with socket.create_connection(proxy.addr) as sock:
        sock.setblocking(False)
        await loop.sock_sendall(sock, head)
        for start in range(0, len(chunks), 6 * 512):  # 512 chunks a write
            try:
                async with asyncio.timeout(WAIT_S):
                    await loop.sock_sendall(sock, chunks[start : start + 6 * 512])
            except ConnectionError:
                break  # refused and closed: the rest has nowhere to go
            async with await H11Client.connect(proxy.addr) as other:
                began = time.monotonic()
                assert (await other.request(target="/other")).status == 200
                latencies.append(time.monotonic() - began)
        async with asyncio.timeout(WAIT_S):
            answer = await loop.sock_recv(sock, 65536)  # what was sent before the close
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in answer.lower()
    assert all(r.target == "/other" for r in echo_server.requests)  # /up never completed
    assert latencies and max(latencies) < 1.0  # answered between the attacker's writes


# --- 3. absolute-form targets ------------------------------------------------------------------


async def test_absolute_form_with_another_host_is_refused(
    echo_server: EchoServer, proxies: ProxyStarter
):
    proxy = await start_for(proxies, echo_server)
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(b"GET http://evil.example/p HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await client.read_response()
    assert response.status == 400
    assert echo_server.requests == []


async def test_absolute_form_matching_host_goes_upstream_in_origin_form(
    echo_server: EchoServer, proxies: ProxyStarter
):
    proxy = await start_for(proxies, echo_server)
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(
            b"GET http://Front.Test:8080/p?q=1 HTTP/1.1\r\nHost: front.test:8080\r\n\r\n"
        )
        response = await client.read_response()
    assert response.status == 200
    [received] = echo_server.requests
    assert received.target == "/p?q=1"
    assert received.header("host") == "front.test:8080"


# --- a server that never accepts ---------------------------------------------------------------


async def test_http_connect_timeout_tries_the_pair_then_answers(
    echo_server: EchoServer, proxies: ProxyStarter
):
    """connect_s is the client connection's deadline while it connects (no timer per connect):
    a connect that hangs is a failed connect, retried on another server within `retries`."""
    # A listener with backlog 0 and one connection queued drops further SYNs: a connect to it
    # hangs, like one to a host that went away (as test_tcp_proxy's blackhole).
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        filler.settimeout(WAIT_S)
        filler.connect(blackhole.getsockname())
        disable_nagle(echo_server)
        entries = [
            server_entry("hole", blackhole.getsockname()),
            server_entry("echo", echo_server.addr),
        ]
        config = proxy_config(entries, backend_timeouts={"connect_s": 0.3}, retries=1)
        proxy = await proxies.start(config)
        answers = []
        for _ in range(2):  # round robin: one of the two first tries the hole
            async with await H11Client.connect(proxy.addr) as client:
                began = time.monotonic()
                answers.append(((await client.request()).status, time.monotonic() - began))
    finally:
        filler.close()
        blackhole.close()
    assert [status for status, _ in answers] == [200, 200]
    assert max(elapsed for _, elapsed in answers) >= 0.3  # waited connect_s, no longer than a sweep
    assert max(elapsed for _, elapsed in answers) < 2.0
    assert proxy.pool("hole").stats.connect_errors == 1
    assert proxy.server("hole").inflight == 0
