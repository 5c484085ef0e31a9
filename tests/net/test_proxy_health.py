"""Health checks steering the proxy: a server failing its checks, or observed failing live
traffic, takes no new requests while another server is up."""

from __future__ import annotations

import socket
from collections.abc import Callable

from tests.net.proxy_harness import ProxyStarter, eventually, proxy_config, server_entry
from tests.servers import EchoServer, GarbageServer, H11Client, SilentServer
from zdlb.balancer.server import Health

# Fast active checks for the tests: a probe every 20 ms, judged within 100 ms.
FAST_CHECK = {"kind": "http", "path": "/health", "interval_s": 0.02, "timeout_s": 0.1}


async def answers(addr: tuple[str, int], count: int) -> list[tuple[int, str | None]]:
    """Status and answering echo server of ``count`` requests on one connection."""
    results = []
    async with await H11Client.connect(addr) as client:
        for _ in range(count):
            response = await client.request("GET", "/")
            results.append((response.status, response.header("x-echo-server")))
    return results


async def test_server_failing_its_checks_takes_no_new_requests(
    bound_socket_factory: Callable[[], socket.socket],
) -> None:
    async with (
        EchoServer(bound_socket_factory(), name="echo") as echo,
        SilentServer(bound_socket_factory(), name="silent") as silent,
        ProxyStarter() as proxies,
    ):
        config = proxy_config(
            [server_entry("echo", echo.addr), server_entry("silent", silent.addr)],
            check={**FAST_CHECK, "fall": 2, "rise": 1},
        )
        proxy = await proxies.start(config)
        await eventually(lambda: proxy.server("silent").health is Health.DOWN)
        assert proxy.server("echo").health is Health.UP
        assert await answers(proxy.addr, 6) == [(200, "echo")] * 6
        assert proxy.server("silent").inflight == 0


async def test_observed_errors_mark_a_server_down_at_once(
    bound_socket_factory: Callable[[], socket.socket],
) -> None:
    async with (
        EchoServer(bound_socket_factory(), name="echo") as echo,
        GarbageServer(bound_socket_factory(), name="garbage") as garbage,
        ProxyStarter() as proxies,
    ):
        # Active TCP checks would pass on the garbage server; a long interval and a high rise
        # keep them from bringing it back while the test runs.
        check = {"kind": "tcp", "interval_s": 60, "rise": 5, "observe": True, "observe_errors": 2}
        config = proxy_config(
            [server_entry("garbage", garbage.addr), server_entry("echo", echo.addr)], check=check
        )
        proxy = await proxies.start(config)
        statuses: list[int] = []
        async with await H11Client.connect(proxy.addr) as client:
            while proxy.server("garbage").health is Health.UP:
                assert len(statuses) < 10, statuses  # two garbage answers must suffice
                statuses.append((await client.request("GET", "/")).status)
        # Round robin alternates: exactly two 502s from the garbage server, the rest from echo.
        assert statuses.count(502) == 2
        assert set(statuses) <= {200, 502}
        assert await answers(proxy.addr, 6) == [(200, "echo")] * 6
