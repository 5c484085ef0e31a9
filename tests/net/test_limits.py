"""Per-server maxconn and its queue, and the request body's pace, through real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.net.proxy_harness import (
    WAIT_S,
    GatedServer,
    ProxyStarter,
    RawClient,
    RunningProxy,
    eventually,
    proxy_config,
    server_entry,
)
from tests.servers import EchoServer, H11Client, UpstreamServer
from zdlb.config.load import parse_config
from zdlb.control.commands import Controller
from zdlb.control.protocol import ShowBackends, ShowInfo, ShowServers

SLOTS = 2
CLIENTS = 20


@pytest.fixture
async def paced(bound_socket: socket.socket) -> AsyncIterator[GatedServer]:
    async with GatedServer(bound_socket, name="paced", delay_s=0.05) as server:
        yield server


async def start(
    proxies: ProxyStarter, server: UpstreamServer, queue_s: float = 5.0
) -> RunningProxy:
    config = proxy_config(
        [server_entry("paced", server.addr, maxconn=SLOTS)],
        backend_timeouts={"queue_s": queue_s},
    )
    return await proxies.start(config)


async def test_server_never_sees_more_than_maxconn_and_every_request_succeeds(
    paced: GatedServer, proxies: ProxyStarter
):
    proxy = await start(proxies, paced)

    async def one(i: int) -> int:
        async with await H11Client.connect(proxy.addr) as client:
            return (await client.request(target=f"/r{i}")).status

    statuses = await asyncio.gather(*(one(i) for i in range(CLIENTS)))
    assert statuses == [200] * CLIENTS
    assert paced.most_active == SLOTS
    assert proxy.link().stats.queued >= CLIENTS - SLOTS
    assert proxy.link().stats.queue_timeouts == 0
    assert proxy.server("paced").inflight == 0


async def test_queue_s_answers_the_surplus_503_with_retry_after_in_arrival_order(
    paced: GatedServer, proxies: ProxyStarter
):
    queue_s = 0.3
    proxy = await start(proxies, paced, queue_s=queue_s)
    loop = asyncio.get_running_loop()
    stats = proxy.link().stats
    clients = [await RawClient.connect(proxy.addr) for _ in range(8)]
    try:
        for i, client in enumerate(clients):
            await client.send(b"GET /hold%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            if i < SLOTS:
                await paced.wait_until(lambda i=i: paced.active == i + 1)  # type: ignore[misc]
            else:  # one at a time, so the arrival order is known
                await eventually(lambda i=i: stats.queued == i - SLOTS + 1)  # type: ignore[misc]

        async def answer(client: RawClient) -> tuple[float, int, str | None]:
            response = await client.read_response()
            return loop.time(), response.status, response.header("retry-after")

        controller = Controller(proxy.runtime.backends, proxy.runtime.routes, proxy.runtime.health)
        shown = await controller.execute(ShowServers(None), 0)
        assert isinstance(shown.data, list)
        assert (shown.data[0]["inflight"], shown.data[0]["maxconn"]) == (SLOTS, SLOTS)
        backends = await controller.execute(ShowBackends(), 0)
        assert isinstance(backends.data, list)
        assert backends.data[0]["queue"] == len(clients) - SLOTS  # none pinned: the shared one
        info = await controller.execute(ShowInfo(), 0)
        assert isinstance(info.data, dict) and info.data["maxconn"] > 0

        surplus = await asyncio.gather(*(answer(c) for c in clients[SLOTS:]))
        assert [status for _, status, _ in surplus] == [503] * len(surplus)
        assert {retry for _, _, retry in surplus} == {"1"}
        times = [t for t, _, _ in surplus]
        assert times == sorted(times)  # the oldest waiter gave up first
        assert stats.queue_timeouts == len(surplus)
        assert paced.most_active == SLOTS  # none of them reached the server
        paced.release.set()
        held = await asyncio.gather(*(c.read_response() for c in clients[:SLOTS]))
        assert [r.status for r in held] == [200] * SLOTS
    finally:
        for client in clients:
            await client.aclose()
    await eventually(lambda: proxy.server("paced").inflight == 0)


async def test_a_client_that_leaves_the_queue_frees_its_place(
    paced: GatedServer, proxies: ProxyStarter
):
    proxy = await start(proxies, paced)
    stats = proxy.link().stats
    holders = [await RawClient.connect(proxy.addr) for _ in range(SLOTS)]
    for i, holder in enumerate(holders):
        await holder.send(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
        await paced.wait_until(lambda i=i: paced.active == i + 1)  # type: ignore[misc]
    leaver = await RawClient.connect(proxy.addr)
    await leaver.send(b"GET /leave HTTP/1.1\r\nHost: t\r\n\r\n")
    await eventually(lambda: stats.queued == 1)
    # A reset: after a FIN alone the client still expects its answer (a half-close).
    sock = leaver.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await leaver.aclose()
    waiter = await RawClient.connect(proxy.addr)
    await waiter.send(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n")
    await eventually(lambda: stats.queued == 2)
    paced.release.set()
    assert (await waiter.read_response()).status == 200
    assert [r.target for r in paced.requests].count("/leave") == 0
    for client in (*holders, waiter):
        await client.aclose()
    await eventually(lambda: proxy.server("paced").inflight == 0)


# --- the request body's pace (exchange.py, rule 7) ----------------------------------------------


async def body_timeout_proxy(proxies: ProxyStarter, server: EchoServer, rate: int) -> RunningProxy:
    config = proxy_config(
        [server_entry("echo", server.addr)],
        listener_timeouts={"client_body_s": 0.3},
        limits={"min_body_rate": rate},
    )
    return await proxies.start(config)


async def test_a_body_that_stops_gets_408(echo_server: EchoServer, proxies: ProxyStarter):
    proxy = await body_timeout_proxy(proxies, echo_server, rate=500)
    loop = asyncio.get_running_loop()
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        started = loop.time()
        rest, error = await client.read_until_closed()
        waited_s = loop.time() - started
    assert error is None and rest.startswith(b"HTTP/1.1 408 ")
    assert 0.25 <= waited_s < WAIT_S
    await eventually(lambda: not proxy.connections)


async def test_a_body_that_crawls_below_min_body_rate_gets_408(
    echo_server: EchoServer, proxies: ProxyStarter
):
    """A byte every 50 ms never trips the 0.3 s silence rule, but 20 B/s is far below the
    1,000 B/s asked: the rate rule ends it soon after the first client_body_s."""
    proxy = await body_timeout_proxy(proxies, echo_server, rate=1000)
    loop = asyncio.get_running_loop()
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        started = loop.time()
        answer = b""
        for _ in range(200):  # at most 10 s
            try:
                await client.send(b"x")
            except ConnectionError:
                break
            try:
                async with asyncio.timeout(0.05):
                    answer = await client.reader.read(4096)
            except TimeoutError:
                continue
            break
        waited_s = loop.time() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.25 <= waited_s < 2.0


async def test_a_body_at_a_steady_pace_passes(echo_server: EchoServer, proxies: ProxyStarter):
    proxy = await body_timeout_proxy(proxies, echo_server, rate=500)
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 4000\r\n\r\n")
        for _ in range(8):  # 500 bytes every 0.1 s: 5,000 B/s, silent 0.1 s at most
            await client.send(b"x" * 500)
            await asyncio.sleep(0.1)  # the client's pace under test, not a wait for readiness
        response = await client.read_response("POST")
    assert response.status == 200
    assert echo_server.requests[-1].body_bytes == 4000


# --- the connection budget (budget.py) ----------------------------------------------------------


@pytest.mark.parametrize("where", ["listener", "process"])
async def test_at_maxconn_new_clients_wait_in_the_backlog_and_are_served_as_others_leave(
    echo_server: EchoServer, proxies: ProxyStarter, where: str
):
    limit = 3
    data = proxy_config([server_entry("echo", echo_server.addr)])
    if where == "listener":
        listener = dataclasses.replace(data.listeners[0], maxconn=limit)
        config = dataclasses.replace(data, listeners=(listener,))
    else:
        config = dataclasses.replace(data, maxconn=limit)
    proxy = await proxies.start(config)
    held = [await H11Client.connect(proxy.addr) for _ in range(limit)]
    for client in held:  # every one accepted and served
        assert (await client.request()).status == 200
    late = await RawClient.connect(proxy.addr)  # the kernel completes the handshake...
    await late.send(b"GET /late HTTP/1.1\r\nHost: t\r\n\r\n")
    waiting = asyncio.create_task(late.read_response())
    await eventually(lambda: proxy.route.gate.is_paused)
    assert len(proxy.connections) == limit  # ...but zdlb has not taken it: nothing to serve it
    for client in held:  # the ones already accepted keep working
        assert (await client.request()).status == 200
    assert not waiting.done()
    await held.pop().aclose()
    response = await asyncio.wait_for(waiting, WAIT_S)
    assert response.status == 200
    stats = proxy.route.stats if where == "listener" else proxy.runtime.stats.process
    assert stats.limit_hits == 2  # the late client took the freed place: full again
    await late.aclose()
    for client in held:
        await client.aclose()
    await eventually(lambda: not proxy.connections and not proxy.route.gate.is_paused)


async def test_a_routed_backends_queue_holds_only_its_own_requests(
    paced: GatedServer,
    bound_socket_factory: Callable[[], socket.socket],
    proxies: ProxyStarter,
):
    """Two backends behind one listener, routed by Host: the one at its maxconn queues its
    requests; the other's go straight through meanwhile."""
    async with EchoServer(bound_socket_factory(), name="echo") as echo_server:
        await routed_queue_case(paced, echo_server, proxies)


async def routed_queue_case(
    paced: GatedServer, echo_server: EchoServer, proxies: ProxyStarter
) -> None:
    data = {
        "listeners": {
            "web": {
                "bind": "127.0.0.1:0",
                "backend": "fast",
                "routes": [{"host": "slow.test", "backend": "slow"}],
            }
        },
        "backends": {
            "slow": {"servers": [server_entry("paced", paced.addr, maxconn=1)]},
            "fast": {"servers": [server_entry("echo", echo_server.addr)]},
        },
    }
    proxy = await proxies.start(parse_config(data, "test_limits", Path(".")))
    slow_stats = proxy.link("slow").stats
    holder, waiter = await RawClient.connect(proxy.addr), await RawClient.connect(proxy.addr)
    try:
        await holder.send(b"GET /hold HTTP/1.1\r\nHost: slow.test\r\n\r\n")
        await paced.wait_until(lambda: paced.active == 1)
        await waiter.send(b"GET /hold2 HTTP/1.1\r\nHost: slow.test\r\n\r\n")
        await eventually(lambda: slow_stats.queued == 1)
        async with await H11Client.connect(proxy.addr) as fast:
            for _ in range(3):
                response = await fast.request("GET", "/", [("host", "fast.test")])
                assert response.header("x-echo-server") == "echo"
        assert paced.most_active == 1
        paced.release.set()
        assert (await holder.read_response()).status == 200
        assert (await waiter.read_response()).status == 200
        assert proxy.link("fast").stats.queued == 0
    finally:
        await holder.aclose()
        await waiter.aclose()
