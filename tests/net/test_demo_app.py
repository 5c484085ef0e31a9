"""The demo vhost's failover switch, ``POST /demo/stop``, on real loopback sockets.

A stopped vhost must look like a stopped process to zdlb: connects refused, idle keep-alive
connections closed, and the same address serving again once the stop is over. The vhost sockets
here are bound as the demo binds them (SO_REUSEADDR), since binding the port again depends on it.
Stops last a fraction of a second: the fixture lowers the least ``?seconds=`` a vhost accepts.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from tests.servers import LOOPBACK, H11Client
from zdlb.daemon.demo_app import (
    MIN_STOP_S,
    DemoVhost,
    DemoVhostServer,
    DemoVhostState,
    bind_demo_socket,
)

# Every awaited expectation gets this deadline; the pytest-timeout backstop is far longer.
WAIT_S = 5.0
# The stop the tests ask for, and the least one their vhosts accept.
STOP_S = 0.2
TEST_MIN_STOP_S = 0.05
# Keep-alive idle of the test vhosts: far past WAIT_S, so only a stop can close an idle connection.
LONG_IDLE_S = 60.0
# Margin past a stop's end when proving that nothing happened then; timers fire in deadline
# order, so any margin proves it, this one absorbs uvloop's millisecond timer rounding.
TIMER_MARGIN_S = 0.05
DEMO_LOGGER = "zdlb.daemon.demo_app"

MakeVhost = Callable[..., DemoVhostServer]


@pytest.fixture
async def make_vhost() -> AsyncIterator[MakeVhost]:
    """Start front-1's main vhost on a fresh port-0 socket; every one is closed after the test."""
    servers: list[DemoVhostServer] = []

    def make(*, min_stop_s: float = TEST_MIN_STOP_S) -> DemoVhostServer:
        sock = bind_demo_socket(LOOPBACK, 0)
        spec = DemoVhost("front-1", "main", "v1", sock.getsockname()[1])
        server = DemoVhostServer(spec, sock, idle_s=LONG_IDLE_S, min_stop_s=min_stop_s)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.close()
    async with asyncio.timeout(WAIT_S):
        await asyncio.gather(*(server.wait_closed() for server in servers))


async def post_stop(addr: tuple[str, int], query: str = f"?seconds={STOP_S}") -> tuple[int, str]:
    async with await H11Client.connect(addr) as client:
        response = await client.request("POST", f"/demo/stop{query}")
    return response.status, response.body.decode()


async def assert_refused(addr: tuple[str, int]) -> None:
    with pytest.raises(ConnectionRefusedError):
        async with asyncio.timeout(WAIT_S):
            _, writer = await asyncio.open_connection(*addr)
        writer.close()  # reached only when the test is about to fail
        await writer.wait_closed()


async def test_stop_refuses_connections_then_serves_again_on_the_same_port(
    make_vhost: MakeVhost, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger=DEMO_LOGGER)
    server = make_vhost()
    addr = server.addr
    loop = asyncio.get_running_loop()
    async with await H11Client.connect(addr) as idle_client:
        assert (await idle_client.request()).status == 200  # now an idle keep-alive connection
        stopped_at = loop.time()
        async with await H11Client.connect(addr) as client:
            response = await client.request("POST", f"/demo/stop?seconds={STOP_S}")
            async with asyncio.timeout(WAIT_S):
                assert await client.reader.read() == b""  # the stop's connection ends too
        assert response.status == 202
        assert response.header("connection") == "close"
        assert f"port {addr[1]} refuses connections for {STOP_S:g} s" in response.body.decode()
        assert server.is_stopped
        assert "stopped" in repr(server)
        await assert_refused(addr)
        async with asyncio.timeout(WAIT_S):
            assert await idle_client.reader.read() == b""  # closed by the stop, not by idling

        async with asyncio.timeout(WAIT_S):
            assert await server.wait_restarted() is True
    assert loop.time() - stopped_at >= STOP_S - TIMER_MARGIN_S  # not at once, whatever the clock
    assert (server.state, server.addr) == (DemoVhostState.SERVING, addr)
    async with await H11Client.connect(addr) as client:
        page = await client.request()
        assert page.status == 200
        assert page.header("connection") is None  # keep-alive again
    assert "demo.stopped vhost=front-1/main" in caplog.text
    assert f"demo.restarted vhost=front-1/main port={addr[1]}" in caplog.text


async def test_a_request_in_flight_at_the_stop_is_answered_then_its_connection_closed(
    make_vhost: MakeVhost,
):
    server = make_vhost()
    # Accepted before the stop's connection (accept is FIFO), so the stop cannot reset it; and a
    # connection on its first request is never idle, whether or not its head was read yet.
    reader, writer = await asyncio.open_connection(*server.addr)
    try:
        writer.write(b"POST / HTTP/1.1\r\nhost: demo.test\r\ncontent-length: 4\r\n\r\nab")
        await writer.drain()
        assert (await post_stop(server.addr))[0] == 202
        writer.write(b"cd")
        await writer.drain()
        async with asyncio.timeout(WAIT_S):
            answer = await reader.read()  # all of it, up to the vhost's close
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: close" in head.lower()
    assert b"body-bytes: 4\n" in body


async def test_a_second_stop_on_a_connection_accepted_before_the_first_is_409(
    make_vhost: MakeVhost,
):
    server = make_vhost()
    # Accepted before the stop's connection (accept is FIFO), so it outlives the listening socket.
    async with await H11Client.connect(server.addr) as early_client:
        assert (await post_stop(server.addr))[0] == 202
        response = await early_client.request("POST", "/demo/stop?seconds=5")
    assert (response.status, response.body) == (409, b"already stopped\n")
    assert response.header("connection") == "close"
    assert server.is_stopped


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", "/demo/stop", 405),
        ("HEAD", "/demo/stop", 405),
        ("PUT", "/demo/stop?seconds=5", 405),
        ("DELETE", "/demo/other", 405),
        ("POST", "/demo/other", 404),
    ],
    ids=["get-stop", "head-stop", "put-stop", "delete-other", "post-other"],
)
async def test_demo_paths_take_only_post_stop(
    make_vhost: MakeVhost, method: str, target: str, status: int
):
    server = make_vhost()
    async with await H11Client.connect(server.addr) as client:
        response = await client.request(method, target)
        page = await client.request()  # same connection: the vhost still serves
    assert response.status == status
    if status == 405:
        assert response.header("allow") == "POST"
    assert page.status == 200
    assert not server.is_stopped


@pytest.mark.parametrize(
    "query",
    [
        "?seconds=0",
        "?seconds=0.5",
        "?seconds=601",
        "?seconds=600.5",
        "?seconds=-5",
        "?seconds=abc",
        "?seconds=",
        "?seconds=inf",
        "?seconds=nan",
        "?seconds=1e2",
        "?seconds=1_0",
        "?seconds=%2030",
        "?seconds=5&seconds=6",
    ],
)
async def test_stop_with_seconds_out_of_bounds_is_400(make_vhost: MakeVhost, query: str):
    server = make_vhost(min_stop_s=MIN_STOP_S)  # the demo's own bounds, 1..600
    status, text = await post_stop(server.addr, query)
    assert (status, text) == (400, "seconds must be a number from 1 to 600\n")
    assert server.state is DemoVhostState.SERVING
    async with await H11Client.connect(server.addr) as client:
        assert (await client.request()).status == 200


@pytest.mark.parametrize(
    ("query", "shown"),
    [("", "30 s"), ("?seconds=1", "1 s"), ("?seconds=600", "600 s"), ("?seconds=7.5", "7.5 s")],
    ids=["default", "least", "most", "decimal"],
)
async def test_close_while_stopped_leaves_no_timer_and_no_socket(
    make_vhost: MakeVhost, query: str, shown: str
):
    server = make_vhost(min_stop_s=MIN_STOP_S)
    addr = server.addr
    status, text = await post_stop(addr, query)
    assert (status, server.is_stopped) == (202, True)
    assert f" for {shown}, then" in text
    waiter = asyncio.create_task(server.wait_restarted())

    server.close()
    async with asyncio.timeout(WAIT_S):
        await server.wait_closed()
        assert await waiter is False  # close() ends the stop for its waiters too
    assert server.state is DemoVhostState.CLOSED
    await assert_refused(addr)  # no task or timer left behind to bind it again


async def test_close_before_a_short_stop_ends_never_binds_again(make_vhost: MakeVhost):
    server = make_vhost()
    addr = server.addr
    assert (await post_stop(addr))[0] == 202
    server.close()
    async with asyncio.timeout(WAIT_S):
        await server.wait_closed()
        # Later than the re-bind timer's deadline: had close() not cancelled it, it has fired.
        await asyncio.sleep(STOP_S + TIMER_MARGIN_S)
    await assert_refused(addr)
    assert server.state is DemoVhostState.CLOSED


async def test_a_port_taken_during_the_stop_keeps_the_vhost_stopped(
    make_vhost: MakeVhost, caplog: pytest.LogCaptureFixture
):
    server = make_vhost()
    addr = server.addr
    assert (await post_stop(addr))[0] == 202
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(addr)
        squatter.listen(1)
        async with asyncio.timeout(WAIT_S):
            assert await server.wait_restarted() is False
        assert server.is_stopped
    assert f"demo.restart_failed vhost=front-1/main port={addr[1]}" in caplog.text
    assert await server.wait_restarted() is False  # still stopped, still answers at once


# --- POST /demo/deploy ---------------------------------------------------------------------------


async def post_deploy(addr: tuple[str, int], query: str) -> tuple[int, str]:
    async with await H11Client.connect(addr) as client:
        response = await client.request("POST", f"/demo/deploy{query}")
    return response.status, response.body.decode()


async def pages_after_restart(server: DemoVhostServer) -> tuple[int, int, str]:
    """(status of /health, status of /, version header of /) once the deploy's stop is over."""
    async with asyncio.timeout(WAIT_S):
        assert await server.wait_restarted() is True
    async with await H11Client.connect(server.addr) as client:
        health = await client.request("GET", "/health")
        page = await client.request("GET", "/")
    return health.status, page.status, page.header("x-demo-server") or ""


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        pytest.param("", (200, 200), id="healthy"),
        pytest.param("&broken=no", (200, 200), id="broken-no"),
        pytest.param("&broken=health", (503, 200), id="failing-health"),
        pytest.param("&broken=500", (200, 500), id="answering-500"),
    ],
)
async def test_deploy_stops_then_serves_the_new_version(
    make_vhost: MakeVhost, broken: str, expected: tuple[int, int]
):
    server = make_vhost()
    status, text = await post_deploy(server.addr, f"?version=v3&seconds={STOP_S}{broken}")
    assert status == 202, text
    assert "deploying v3" in text
    await assert_refused(server.addr)
    health, page, served_by = await pages_after_restart(server)
    assert (health, page) == expected
    assert served_by == "front-1/main/v3"
    assert server.spec.version == "v3"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        pytest.param("", "version must be", id="no-version"),
        pytest.param("?version=", "version must be", id="empty-version"),
        pytest.param("?version=v%0d%0a", "version must be", id="crlf-version"),
        pytest.param("?version=v1&version=v2", "version must be", id="two-versions"),
        pytest.param("?version=v3&broken=maybe", "broken must be", id="bad-broken"),
        pytest.param("?version=v3&seconds=0", "seconds must be", id="seconds-zero"),
    ],
)
async def test_deploy_with_bad_parameters_is_400_and_changes_nothing(
    make_vhost: MakeVhost, query: str, message: str
):
    server = make_vhost()
    status, text = await post_deploy(server.addr, query)
    assert status == 400 and text.startswith(message), text
    assert server.state is DemoVhostState.SERVING and server.spec.version == "v1"
