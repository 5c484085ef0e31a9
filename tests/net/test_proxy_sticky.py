"""Sticky cookies and paired backups through the real proxy: pinning, stripping, flips.

Four echo servers play two hosts: front-1 and front-2 (mains), each with a paired backup. The
control commands go through the daemon's own ``Controller``, as ``zdlb ctl`` would send them.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest

from tests.net.proxy_harness import (
    WAIT_S,
    ProxyStarter,
    RunningProxy,
    eventually,
    proxy_config,
    server_entry,
)
from tests.servers import ClientResponse, EchoServer, H11Client
from zdlb.balancer.server import AdminState, Health
from zdlb.control.commands import Controller, Reply
from zdlb.control.protocol import parse_command
from zdlb.errors import ControlCommandError

HOSTS = ("front-1", "front-2", "front-1-backup", "front-2-backup")
STICKY = {"cookie": "SERVERID", "secret": "a-test-secret-of-24chars"}


@pytest.fixture
async def proxy(bound_socket_factory: Callable[[], socket.socket]) -> AsyncIterator[RunningProxy]:
    async with AsyncExitStack() as stack:
        entries = []
        for name in HOSTS:
            echo = await stack.enter_async_context(EchoServer(bound_socket_factory(), name=name))
            options = {}
            if name.endswith("-backup"):
                options = {"pool": "backup", "pair": name.removesuffix("-backup")}
            entries.append(server_entry(name, echo.addr, **options))
        proxies = await stack.enter_async_context(ProxyStarter())
        yield await proxies.start(proxy_config(entries, sticky=STICKY))


async def ctl(proxy: RunningProxy, line: str) -> Reply:
    runtime = proxy.runtime
    controller = Controller(runtime.backends, runtime.routes, runtime.health)
    command, _ = parse_command(line.encode())
    return await controller.execute(command, peer_uid=0)


def set_cookie(response: ClientResponse) -> str | None:
    value = response.header("set-cookie")
    return value.split(";")[0] if value else None


async def get(client: H11Client, cookie: str | None, *extra: tuple[str, str]) -> ClientResponse:
    headers = [("cookie", cookie)] if cookie else []
    response = await client.request("GET", "/", [*headers, *extra])
    assert response.status == 200
    return response


async def test_first_answer_pins_and_later_ones_stay_without_a_new_cookie(
    proxy: RunningProxy,
) -> None:
    async with await H11Client.connect(proxy.addr) as client:
        first = await get(client, None)
        cookie = set_cookie(first)
        assert cookie is not None and cookie.startswith("SERVERID=front-")
        host = first.header("x-echo-server")
        assert cookie.split("=")[1].split(".")[0] == host
        for _ in range(10):  # round robin alone would alternate hosts
            response = await get(client, cookie)
            assert response.header("x-echo-server") == host
            assert response.header("set-cookie") is None


async def test_the_cookie_is_cut_from_the_request_and_other_cookies_pass(
    proxy: RunningProxy,
) -> None:
    async with await H11Client.connect(proxy.addr) as client:
        cookie = set_cookie(await get(client, None))
        assert cookie is not None
        response = await get(client, f"theme=dark; {cookie}; lang=fr")
        seen = [v for k, v in response.json()["headers"] if k.lower() == "cookie"]
        assert seen == ["theme=dark; lang=fr"]
        response = await get(client, cookie)
        assert [k for k, _ in response.json()["headers"] if k.lower() == "cookie"] == []


@pytest.mark.parametrize(
    "cookie",
    [
        "SERVERID=front-1",  # unsigned while the backend signs
        "SERVERID=front-1.AAAAAAAAAAAAAAAAAAAAAA",
        "SERVERID=127.0.0.1:1",
        "SERVERID",
        ";;;=;",
    ],
)
async def test_forged_or_malformed_cookies_are_ignored_and_replaced(
    proxy: RunningProxy, cookie: str
) -> None:
    async with await H11Client.connect(proxy.addr) as client:
        response = await get(client, cookie)
        assert set_cookie(response) is not None


async def test_flip_moves_pinned_users_to_the_pair_and_back(proxy: RunningProxy) -> None:
    async with await H11Client.connect(proxy.addr) as client:
        cookie = "SERVERID=front-1"
        first = await get(client, None)
        cookie = set_cookie(first) or ""
        host = first.header("x-echo-server")
        assert host in ("front-1", "front-2")
        reply = await ctl(proxy, f"flip app/{host}")
        assert f"app/{host}-backup serves {host}" in reply.text
        assert proxy.server(host).admin is AdminState.MAINT
        for _ in range(4):
            response = await get(client, cookie)
            assert response.header("x-echo-server") == f"{host}-backup"
            assert response.header("set-cookie") is None  # same host: the pin holds
        # A new user never lands on the main in maintenance.
        async with await H11Client.connect(proxy.addr) as fresh:
            served = {(await get(fresh, None)).header("x-echo-server") for _ in range(6)}
        assert host not in served
        await ctl(proxy, f"flip app/{host}-backup")  # either member names the pair
        assert proxy.server(host).admin is AdminState.READY
        assert (await get(client, cookie)).header("x-echo-server") == host


async def test_a_host_with_no_usable_version_re_pins_its_users(proxy: RunningProxy) -> None:
    async with await H11Client.connect(proxy.addr) as client:
        cookie = set_cookie(await get(client, "SERVERID=x")) or ""
        host = cookie.split("=")[1].split(".")[0]
        other = "front-2" if host == "front-1" else "front-1"
        await ctl(proxy, f"set server app/{host} state maint")
        await ctl(proxy, f"set server app/{host}-backup state maint")
        response = await get(client, cookie)
        assert response.header("x-echo-server") == other
        new_cookie = set_cookie(response)
        assert new_cookie is not None and new_cookie.startswith(f"SERVERID={other}.")
        assert (await get(client, new_cookie)).header("set-cookie") is None


async def test_flip_refuses_a_pair_failing_its_checks_unless_forced(proxy: RunningProxy) -> None:
    proxy.server("front-1-backup").set_health(Health.DOWN)
    with pytest.raises(ControlCommandError, match="fails its checks"):
        await ctl(proxy, "flip app/front-1")
    assert proxy.server("front-1").admin is AdminState.READY
    await ctl(proxy, "flip app/front-1 force")
    assert proxy.server("front-1").admin is AdminState.MAINT


async def test_flip_needs_a_pair_and_swap_exchanges_pools(proxy: RunningProxy) -> None:
    await ctl(proxy, "set server app/front-1-backup state ready")
    with pytest.raises(ControlCommandError, match="no server 'spare'"):
        await ctl(proxy, "flip app/spare")
    reply = await ctl(proxy, "swap app")
    assert "app/front-1-backup: pool main" in reply.text
    async with await H11Client.connect(proxy.addr) as client:
        served = {(await get(client, None)).header("x-echo-server") for _ in range(6)}
    assert served == {"front-1-backup", "front-2-backup"}


async def test_wait_idle_after_a_flip_returns_once_the_main_has_nothing_open(
    proxy: RunningProxy,
) -> None:
    async with await H11Client.connect(proxy.addr) as client:
        cookie = "SERVERID=front-1." + "x"
        for _ in range(4):
            await get(client, cookie)  # leaves pooled keep-alive connections to both mains
        await eventually(lambda: proxy.server("front-1").conns > 0)
        await ctl(proxy, "flip app/front-1")
        reply = await ctl(proxy, "wait app/front-1 idle 5")
        assert reply.text == "app/front-1: idle\n"
        assert (proxy.server("front-1").inflight, proxy.server("front-1").conns) == (0, 0)


async def test_census_counts_distinct_cookie_jars_per_host(proxy: RunningProxy) -> None:
    """Issue 15's census through the real proxy: 1,000 users, each its own cookie jar (a new
    connection, pinned by its first answer, back once with its cookie), over two hosts; each
    host's estimate is within 5% (3 standard errors of census.py's sketch) of the truth."""
    census = proxy.link().census
    assert census is not None
    pinned = {"front-1": 0, "front-2": 0}
    cookies = set()

    async def user() -> None:
        async with await H11Client.connect(proxy.addr) as client:
            cookie = set_cookie(await get(client, None))
            assert cookie is not None
            pinned[cookie.removeprefix("SERVERID=").split(".", 1)[0]] += 1
            cookies.add(cookie)
            again = await get(client, cookie)
            assert set_cookie(again) is None  # the token is kept: no re-pin

    for _ in range(20):  # 20 rounds of 50 users at once
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*(user() for _ in range(50)))
    assert len(cookies) == 1000  # every user got a token of its own
    counts = census.counts()
    for host, truth in pinned.items():
        assert abs(counts[host] - truth) <= 0.05 * truth, (counts, pinned)


async def test_a_returning_user_keeps_its_token_across_a_flip(proxy: RunningProxy) -> None:
    async with await H11Client.connect(proxy.addr) as client:
        cookie = set_cookie(await get(client, None)) or ""
        host = cookie.removeprefix("SERVERID=").split(".", 1)[0]
        await ctl(proxy, f"flip app/{host}")
        response = await get(client, cookie)
    assert response.header("x-echo-server") == f"{host}-backup"
    assert set_cookie(response) is None  # the pair serves the same host: no new cookie


async def test_show_status_without_a_status_page_is_a_clear_error(proxy: RunningProxy) -> None:
    """`show status` answers the status page's document; with no [metrics] listener there is
    none, and the operator is told why instead of getting an empty answer."""
    with pytest.raises(ControlCommandError, match=r"no status page: \[metrics\] listen"):
        await ctl(proxy, "show status")
