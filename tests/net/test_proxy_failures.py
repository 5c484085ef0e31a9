"""The HTTP proxy when a client or a server misbehaves, on real loopback sockets.

Each test injects one failure through a real peer (a raw client sending bad bytes, or one of
the misbehaving servers of ``tests/servers.py``) and asserts both what the client gets (status,
``Connection: close``, a close or a truncated body, never a hang) and the state left behind:
what the server received, ``Server.inflight`` back to 0, ``Server.conns`` and the idle pool.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.net.proxy_harness import (
    WAIT_S,
    GatedServer,
    ProxyStarter,
    RawClient,
    RunningProxy,
    address_of,
    disable_nagle,
    eventually,
    proxy_config,
    server_entry,
)
from tests.servers import (
    DEFAULT_DECLARED_BODY_BYTES,
    DribbleServer,
    EchoServer,
    GarbageServer,
    H11Client,
    ResetServer,
    SilentServer,
    StaleKeepAliveServer,
    StaleMode,
    TruncatingServer,
    UpstreamServer,
    pattern_bytes,
    refused_address,
)

# Deadlines the tests configure: long enough that a loaded box does not trip them by accident,
# short enough that waiting for them keeps the suite fast. The sweeper enforces them within
# a tenth of the shortest one.
SHORT_S = 0.3
# Read deadline where a failure would be a hang: loopback answers take milliseconds, so
# this is generous.
HANG_S = 2.0
GOOD_REQUEST = b"GET /good HTTP/1.1\r\nHost: front.test\r\n\r\n"


async def start_for(
    proxies: ProxyStarter, *servers: UpstreamServer | tuple[str, tuple[str, int]], **options
) -> RunningProxy:
    """A proxy in front of fixture servers (their names) or ``(name, address)`` pairs."""
    entries = []
    for server in servers:
        if isinstance(server, UpstreamServer):
            disable_nagle(server)
            entries.append(server_entry(server.name, server.addr))
        else:
            entries.append(server_entry(*server))
    return await proxies.start(proxy_config(entries, **options))


async def wait_settled(proxy: RunningProxy, name: str, conns: int) -> None:
    """Wait until ``name`` has no request in flight and ``conns`` open upstream connections."""
    server = proxy.server(name)
    await eventually(lambda: server.inflight == 0 and server.conns == conns)


@pytest.fixture
def second_refused_addr() -> Iterator[tuple[str, int]]:
    sock, addr = refused_address()
    try:
        yield addr
    finally:
        sock.close()


async def assert_rejected(proxy: RunningProxy, data: bytes, status: int) -> None:
    """``data`` is answered ``status`` with ``Connection: close``, then the proxy closes."""
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(data)
        response = await client.read_response()
        rest, _ = await client.read_until_closed()  # EOF, or a reset if bytes were left unread
    assert response.status == status, response
    assert response.header("connection") == "close"
    assert rest == b""


async def assert_only_good_request_forwarded(proxy: RunningProxy, echo: EchoServer) -> None:
    """Send a good request on a new connection: it must be the first thing the server sees.

    A rejected request that leaked through would have reached the server first (the same
    loop, an earlier connection), so this turns "nothing forwarded" into a check that fails.
    """
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(GOOD_REQUEST)
        assert (await client.read_response()).status == 200
    assert [r.target for r in echo.requests] == ["/good"]
    assert echo.protocol_errors == 0
    await wait_settled(proxy, echo.name, conns=1)


# --- bad requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: front.test\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: front.test\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET /a b HTTP/1.1\r\nHost: front.test\r\n\r\n", 400),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: front.test\r\n\r\n", 505),
        (b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n", 501),
    ],
    ids=[
        "no-colon",
        "nul-in-value",
        "space-in-target",
        "tls-hello",
        "no-host",
        "two-hosts",
        "http2",
        "connect",
    ],
)
async def test_malformed_request_is_answered_and_closed(
    echo_server: EchoServer, proxies: ProxyStarter, data: bytes, status: int
):
    proxy = await start_for(proxies, echo_server)
    await assert_rejected(proxy, data, status)
    await eventually(lambda: not proxy.connections)
    await assert_only_good_request_forwarded(proxy, echo_server)


async def test_malformed_pipelined_request_does_not_steal_the_previous_answer(
    echo_server: EchoServer, proxies: ProxyStarter
):
    proxy = await start_for(proxies, echo_server)
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(GOOD_REQUEST + b"BAD REQUEST\r\n\r\n")
        first = await client.read_response()
        second = await client.read_response()
        rest, _ = await client.read_until_closed()
    assert (first.status, second.status, rest) == (200, 400, b"")
    assert first.json()["target"] == "/good"


async def test_bad_request_is_logged_with_the_client_address_as_text(
    echo_server: EchoServer, proxies: ProxyStarter, caplog: pytest.LogCaptureFixture
):
    proxy = await start_for(proxies, echo_server)
    with caplog.at_level(logging.INFO, logger="zdlb.http.answers"):
        await assert_rejected(proxy, b"BAD REQUEST\r\n\r\n", 400)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bad_request")]
    assert "client=127.0.0.1 " in line, line


async def test_request_line_too_long_gets_414(echo_server: EchoServer, proxies: ProxyStarter):
    proxy = await start_for(proxies, echo_server, limits={"max_line_bytes": 1024})
    target = b"/" + b"a" * 1100
    await assert_rejected(proxy, b"GET %s HTTP/1.1\r\nHost: front.test\r\n\r\n" % target, 414)
    await assert_only_good_request_forwarded(proxy, echo_server)


async def test_request_line_within_the_limit_is_forwarded(
    echo_server: EchoServer, proxies: ProxyStarter
):
    proxy = await start_for(proxies, echo_server, limits={"max_line_bytes": 1024})
    target = "/" + "a" * 1000
    async with await H11Client.connect(proxy.addr) as client:
        response = await client.request(target=target)
    assert response.status == 200
    assert echo_server.requests[0].target == target


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: front.test\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(101))
        + b"\r\n",
        b"GET / HTTP/1.1\r\nHost: front.test\r\nX-Big: " + b"v" * 40_000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: front.test\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 500) for i in range(80))
        + b"\r\n",
    ],
    ids=["101-headers", "one-40k-header", "80-headers-of-500b"],
)
async def test_oversized_head_gets_431(echo_server: EchoServer, proxies: ProxyStarter, head: bytes):
    proxy = await start_for(proxies, echo_server)
    await assert_rejected(proxy, head, 431)
    await assert_only_good_request_forwarded(proxy, echo_server)


async def test_head_that_never_completes_gets_408(echo_server: EchoServer, proxies: ProxyStarter):
    proxy = await start_for(proxies, echo_server, listener_timeouts={"http_request_s": SHORT_S})
    loop = asyncio.get_running_loop()
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(b"GET /slow HTTP/1.1\r\nHost: fro")
        sent_at = loop.time()
        response = await client.read_response()
        elapsed_s = loop.time() - sent_at
        rest, _ = await client.read_until_closed()
    assert response.status == 408
    assert response.header("connection") == "close"
    assert rest == b""
    assert elapsed_s >= SHORT_S * 0.9
    await assert_only_good_request_forwarded(proxy, echo_server)


async def test_head_dribbled_byte_by_byte_still_gets_408(
    echo_server: EchoServer, proxies: ProxyStarter
):
    """Slowloris: each byte arrives well within the deadline, the head as a whole does not."""
    proxy = await start_for(proxies, echo_server, listener_timeouts={"http_request_s": SHORT_S})
    async with await RawClient.connect(proxy.addr) as client:

        async def dribble() -> None:
            head = b"GET /slow HTTP/1.1\r\nHost: front.test\r\n" + b"X-Pad: " + b"p" * 1000
            for byte in head:
                client.writer.write(bytes([byte]))
                await asyncio.sleep(SHORT_S / 10)  # the pace is the attack

        dribbling = asyncio.create_task(dribble())
        try:
            response = await client.read_response()
        finally:
            dribbling.cancel()
            await asyncio.gather(dribbling, return_exceptions=True)
    assert response.status == 408
    assert response.header("connection") == "close"
    await assert_only_good_request_forwarded(proxy, echo_server)


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: front.test\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (
            b"POST / HTTP/1.1\r\nHost: f\r\nContent-Length: 6\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: f\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 6\r\n\r\n0\r\n\r\n" + SMUGGLED,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: f\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\n"
            b"hello" + SMUGGLED,
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: f\r\nContent-Length: 5, 40\r\n\r\nhello" + SMUGGLED, 400),
        (
            b"POST / HTTP/1.1\r\nHost: f\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"
            + SMUGGLED,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: f\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"
            + SMUGGLED,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: f\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0x5\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: f\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\nhello\n0\n\n" + SMUGGLED,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: f\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"0\r\n\r\n" + SMUGGLED,
            501,
        ),
    ],
    ids=[
        "cl-then-te",
        "te-then-cl",
        "two-different-cl",
        "cl-list",
        "space-before-colon",
        "obs-fold-te",
        "hex-prefix-chunk-size",
        "bare-lf-chunk-lines",
        "te-not-only-chunked",
    ],
)
async def test_ambiguous_framing_is_refused_and_nothing_is_forwarded(
    echo_server: EchoServer, proxies: ProxyStarter, data: bytes, status: int
):
    proxy = await start_for(proxies, echo_server)
    await assert_rejected(proxy, data, status)
    await assert_only_good_request_forwarded(proxy, echo_server)
    assert "/smuggled" not in [r.target for r in echo_server.requests]


# --- no server, refused servers, retries ------------------------------------------------------


async def test_no_usable_server_gets_503(echo_server: EchoServer, proxies: ProxyStarter):
    entries = [server_entry("echo", echo_server.addr, weight=0)]
    proxy = await proxies.start(proxy_config(entries))
    async with await H11Client.connect(proxy.addr) as client:
        response = await client.request()
    assert response.status == 503
    assert response.body == b"503 Service Unavailable\n"
    assert echo_server.accepted == 0  # nothing was even connected: answered before any I/O
    assert proxy.server("echo").inflight == 0
    assert proxy.server("echo").conns == 0


async def test_all_servers_refusing_gets_502_after_trying_each(
    refused_addr: tuple[str, int],
    second_refused_addr: tuple[str, int],
    proxies: ProxyStarter,
    caplog: pytest.LogCaptureFixture,
):
    proxy = await start_for(proxies, ("one", refused_addr), ("two", second_refused_addr))
    with caplog.at_level(logging.WARNING, logger="zdlb.http.recovery"):
        async with await H11Client.connect(proxy.addr) as client:
            response = await client.request()
    assert response.status == 502
    messages = [record.getMessage() for record in caplog.records]
    failed = [m for m in messages if m.startswith("upstream_connect_failed")]
    assert [m.split()[1] for m in failed] == ["server=one", "server=two"]
    for name in ("one", "two"):
        assert proxy.server(name).inflight == 0
        assert proxy.server(name).conns == 0


async def test_a_refused_server_is_retried_on_the_next_one(
    refused_addr: tuple[str, int], echo_server: EchoServer, proxies: ProxyStarter
):
    # Round robin starts with the first server in config order: the refused one.
    proxy = await start_for(proxies, ("dead", refused_addr), echo_server)
    async with await H11Client.connect(proxy.addr) as client:
        responses = [await client.request(target=f"/r{i}") for i in range(4)]
    assert [r.status for r in responses] == [200] * 4
    assert [r.target for r in echo_server.requests] == ["/r0", "/r1", "/r2", "/r3"]
    assert proxy.server("dead").inflight == proxy.server("dead").conns == 0
    await wait_settled(proxy, "echo", conns=1)


async def test_retries_zero_means_a_refused_server_gets_502(
    refused_addr: tuple[str, int], echo_server: EchoServer, proxies: ProxyStarter
):
    proxy = await start_for(proxies, ("dead", refused_addr), echo_server, retries=0)
    async with await H11Client.connect(proxy.addr) as client:
        response = await client.request()
    assert response.status == 502
    assert echo_server.accepted == 0
    assert proxy.server("dead").inflight == 0
    assert proxy.server("echo").inflight == 0


async def test_a_refused_main_server_falls_back_to_the_backup(
    refused_addr: tuple[str, int], echo_server: EchoServer, proxies: ProxyStarter
):
    disable_nagle(echo_server)
    entries = [
        server_entry("main", refused_addr),
        server_entry("echo", echo_server.addr, pool="backup"),
    ]
    proxy = await proxies.start(proxy_config(entries))
    async with await H11Client.connect(proxy.addr) as client:
        response = await client.request()
    assert response.status == 200
    assert response.header("x-echo-server") == "echo"
    await wait_settled(proxy, "echo", conns=1)


async def test_retried_http10_request_names_the_server_it_reached(
    refused_addr: tuple[str, int], echo_server: EchoServer, proxies: ProxyStarter
):
    proxy = await start_for(proxies, ("dead", refused_addr), echo_server)
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(b"GET / HTTP/1.0\r\n\r\n")
        response = await client.read_response()
    assert response.status == 200
    assert echo_server.requests[0].header("host") == address_of(echo_server.addr)


# --- servers that fail after accepting ----------------------------------------------------------


async def test_silent_server_gets_504_after_server_s(
    silent_server: SilentServer, proxies: ProxyStarter
):
    proxy = await start_for(proxies, silent_server, backend_timeouts={"server_s": SHORT_S})
    loop = asyncio.get_running_loop()
    async with await H11Client.connect(proxy.addr) as client:
        sent_at = loop.time()
        response = await client.request()
        elapsed_s = loop.time() - sent_at
        async with asyncio.timeout(WAIT_S):
            assert await client.reader.read() == b""
    assert response.status == 504
    assert response.header("connection") == "close"
    assert elapsed_s >= SHORT_S * 0.9
    assert silent_server.accepted == 1
    await wait_settled(proxy, "silent", conns=0)  # the stuck connection is not pooled
    assert proxy.pool("silent").idle_count == 0


async def test_garbage_status_line_gets_502(garbage_server: GarbageServer, proxies: ProxyStarter):
    proxy = await start_for(proxies, garbage_server)
    async with await H11Client.connect(proxy.addr) as client:
        first = await client.request(target="/one")
        second = await client.request(target="/two")  # the client connection survives
    assert [first.status, second.status] == [502, 502]
    assert first.body == b"502 Bad Gateway\n"
    assert [r.target for r in garbage_server.requests] == ["/one", "/two"]
    assert garbage_server.accepted == 2  # the broken connection was never reused
    await wait_settled(proxy, "garbage", conns=0)
    assert proxy.pool("garbage").idle_count == 0


@pytest.mark.parametrize("server_type", [ResetServer, TruncatingServer], ids=["reset", "fin"])
async def test_server_dying_mid_body_closes_the_client_with_a_short_body(
    bound_socket: socket.socket,
    proxies: ProxyStarter,
    server_type: type[ResetServer] | type[TruncatingServer],
):
    async with server_type(bound_socket, name="dying") as server:
        proxy = await start_for(proxies, server)
        async with await RawClient.connect(proxy.addr) as client:
            await client.send(GOOD_REQUEST)
            raw, error = await client.read_until_closed()
        await wait_settled(proxy, "dying", conns=0)
    assert error is None  # the proxy closes cleanly; the short body is what tells the client
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\ncontent-length: %d\r\n" % DEFAULT_DECLARED_BODY_BYTES in head.lower() + b"\r\n"
    assert body == pattern_bytes(server.sent_body_bytes)
    assert proxy.pool("dying").idle_count == 0
    assert not proxy.connections


async def test_client_leaving_mid_response_releases_the_server(
    bound_socket: socket.socket, proxies: ProxyStarter
):
    body = b"x" * 400
    async with DribbleServer(bound_socket, interval_s=0.005, body=body, name="dribble") as server:
        proxy = await start_for(proxies, server)
        async with await RawClient.connect(proxy.addr) as client:
            await client.send(GOOD_REQUEST)
            async with asyncio.timeout(WAIT_S):
                await client.reader.readuntil(b"\r\n\r\n")
        await wait_settled(proxy, "dribble", conns=0)
        await eventually(lambda: not proxy.connections)
    assert server.sent_bytes < len(server.response)  # it was cut off, not finished


# --- stale pooled connections -------------------------------------------------------------------


@pytest.fixture
async def stale_on_next(bound_socket: socket.socket) -> AsyncIterator[StaleKeepAliveServer]:
    async with StaleKeepAliveServer(
        bound_socket, mode=StaleMode.ON_NEXT_REQUEST, name="stale"
    ) as server:
        yield server


async def test_stale_pooled_connection_is_retried_for_an_idempotent_get(
    stale_on_next: StaleKeepAliveServer, proxies: ProxyStarter
):
    proxy = await start_for(proxies, stale_on_next)
    async with await H11Client.connect(proxy.addr) as client:
        first = await client.request(target="/one")
        second = await client.request(target="/two")
    assert [first.status, second.status] == [200, 200]
    assert second.body == b"stale soon\n"
    # The reused connection took /two and closed; /two was replayed once on a fresh one.
    assert [r.target for r in stale_on_next.requests] == ["/one", "/two", "/two"]
    assert (stale_on_next.answered, stale_on_next.dropped, stale_on_next.accepted) == (2, 1, 2)
    await wait_settled(proxy, "stale", conns=1)


async def test_stale_pooled_connection_is_not_replayed_for_a_post(
    stale_on_next: StaleKeepAliveServer, proxies: ProxyStarter
):
    """A POST may have had its effect before the server closed: it is answered 502, not resent.

    (Retry-once applies only to idempotent requests or when nothing was sent; here the whole
    POST reached the server, which read it and closed without answering.)
    """
    proxy = await start_for(proxies, stale_on_next)
    async with await H11Client.connect(proxy.addr) as client:
        first = await client.request(target="/one")
        second = await client.request("POST", "/two", body=b"pay once")
        assert client.is_reusable  # zdlb's 502 keeps the client connection
    assert [first.status, second.status] == [200, 502]
    assert [r.target for r in stale_on_next.requests] == ["/one", "/two"]
    assert stale_on_next.requests[1].body_bytes == len(b"pay once")
    assert (stale_on_next.answered, stale_on_next.dropped, stale_on_next.accepted) == (1, 1, 1)
    await wait_settled(proxy, "stale", conns=0)


async def test_connection_closed_after_each_answer_is_not_reused(
    stale_server: StaleKeepAliveServer, proxies: ProxyStarter
):
    proxy = await start_for(proxies, stale_server)
    async with await H11Client.connect(proxy.addr) as client:
        responses = [await client.request(target=f"/r{i}") for i in range(3)]
    assert [r.status for r in responses] == [200] * 3
    assert [r.target for r in stale_server.requests] == ["/r0", "/r1", "/r2"]
    assert stale_server.accepted == 3
    await wait_settled(proxy, "stale", conns=0)
    assert proxy.pool("stale").idle_count == 0


# --- idle clients and idle upstream connections ------------------------------------------------


async def test_idle_client_is_closed_after_client_s(echo_server: EchoServer, proxies: ProxyStarter):
    """Between requests a keep-alive client is closed without a word (exchange.py, rule 7):
    it may be about to send, and an unasked 408 could be read as the next request's answer."""
    proxy = await start_for(proxies, echo_server, listener_timeouts={"client_s": SHORT_S})
    loop = asyncio.get_running_loop()
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(GOOD_REQUEST)
        assert (await client.read_response()).status == 200
        idle_since = loop.time()
        rest, error = await client.read_until_closed()
        idle_s = loop.time() - idle_since
    assert (rest, error) == (b"", None)
    assert idle_s >= SHORT_S * 0.9
    await eventually(lambda: not proxy.connections)
    await wait_settled(proxy, "echo", conns=1)  # the upstream side stays pooled


async def test_silent_new_connection_gets_408_at_http_request_s(
    echo_server: EchoServer, proxies: ProxyStarter
):
    """A connection that never sends a byte is answered 408 at http_request_s (HAProxy's
    `timeout http-request`), not held for client_s."""
    proxy = await start_for(
        proxies, echo_server, listener_timeouts={"client_s": 30.0, "http_request_s": SHORT_S}
    )
    loop = asyncio.get_running_loop()
    async with await RawClient.connect(proxy.addr) as client:
        opened = loop.time()
        rest, error = await client.read_until_closed()
        waited_s = loop.time() - opened
    assert error is None
    assert rest.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in rest
    assert SHORT_S * 0.9 <= waited_s < 5.0
    await eventually(lambda: not proxy.connections)
    assert echo_server.accepted == 0


async def test_idle_upstream_connection_is_closed_after_upstream_idle_s(
    echo_server: EchoServer, proxies: ProxyStarter
):
    proxy = await start_for(proxies, echo_server, backend_timeouts={"upstream_idle_s": SHORT_S})
    async with await H11Client.connect(proxy.addr) as client:
        first = await client.request()
        await wait_settled(proxy, "echo", conns=0)  # closed by zdlb, not by the server
        second = await client.request()
    assert [first.header("x-conn-seq"), second.header("x-conn-seq")] == ["1", "2"]
    assert echo_server.accepted == 2


async def test_max_idle_zero_keeps_no_upstream_connection(
    echo_server: EchoServer, proxies: ProxyStarter
):
    disable_nagle(echo_server)
    entries = [server_entry("echo", echo_server.addr, max_idle=0)]
    proxy = await proxies.start(proxy_config(entries))
    async with await H11Client.connect(proxy.addr) as client:
        responses = [await client.request() for _ in range(3)]
        assert client.is_reusable  # the client side stays keep-alive
    assert [r.header("x-conn-seq") for r in responses] == ["1", "2", "3"]
    await wait_settled(proxy, "echo", conns=0)


async def test_client_half_close_after_a_request_gets_the_answer_then_a_close(
    bound_socket: socket.socket, proxies: ProxyStarter
):
    async with GatedServer(bound_socket) as server:
        proxy = await start_for(proxies, server)
        async with await RawClient.connect(proxy.addr, timeout_s=HANG_S) as client:
            await client.send(b"GET /hold HTTP/1.1\r\nHost: front.test\r\n\r\n")
            client.writer.write_eof()
            async with asyncio.timeout(WAIT_S):
                await server.wait_until(lambda: server.held == 1)
            server.release.set()  # by now the proxy has long read the client's FIN
            response = await client.read_response()
            assert response.status == 200
            assert response.body == b"ok /hold"
            rest, error = await client.read_until_closed()
        assert (rest, error) == (b"", None)
        await wait_settled(proxy, "gated", conns=1)


async def test_client_half_close_mid_head_closes_without_forwarding(
    echo_server: EchoServer, proxies: ProxyStarter
):
    proxy = await start_for(proxies, echo_server)
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(b"GET /cut HTTP/1.1\r\nHost: fr")
        client.writer.write_eof()
        rest, error = await client.read_until_closed()
    assert (rest, error) == (b"", None)
    await eventually(lambda: not proxy.connections)
    await assert_only_good_request_forwarded(proxy, echo_server)
