"""Routes and header rules through the real proxy: one listener, three backends, chosen by the
Host a client sends (as ``curl --resolve`` would) and by path; redirects, the unmatched
status, header edits both ways, and a sticky cookie per backend.

Five echo servers: ``app-1``/``app-2`` (backend ``app``, the default, cookie ``APPID``),
``api-1``/``api-2`` (``api``, cookie ``APIID``) and ``static-1`` (``static``, no cookie).
"""

from __future__ import annotations

import copy
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.net.proxy_harness import ProxyStarter, RawClient, RunningProxy, address_of
from tests.servers import ClientResponse, EchoServer, H11Client
from zdlb.config.load import parse_config
from zdlb.control.commands import Controller
from zdlb.control.protocol import parse_command

SERVERS = {"app": ("app-1", "app-2"), "api": ("api-1", "api-2"), "static": ("static-1",)}
STICKY = {"app": "APPID", "api": "APIID"}
ROUTES: list[dict[str, Any]] = [
    {"host": "example.com", "redirect": {"location": "https://www.example.com", "status": 301}},
    {
        "host": "api.example.com",
        "path": ["/v1/", "/v2/"],
        "backend": "api",
        "request_headers": {"set": {"X-Route": "api"}},
        "response_headers": {"set": {"X-Served-By": "api-route"}},
    },
    {
        "host": "*.static.example.com",
        "backend": "static",
        "response_headers": {"remove": ["X-Conn-Seq", "X-Req-Seq"]},
    },
    {"host": "plain.example.com", "redirect": {"location": "http://{host}:8080/", "status": 308}},
    {"method": "DELETE", "header": {"name": "X-Admin", "value": "yes"}, "backend": "api"},
    {"host": "*.to-https.test", "redirect": {"location": "https://{host}", "status": 302}},
]
LISTENER_HEADERS = {
    "request_headers": {"set": {"X-Proxy": "zdlb"}, "remove": ["X-Debug"]},
    "response_headers": {"set": {"X-Frame-Options": "DENY"}},
}


def routed_config(
    addrs: dict[str, tuple[str, int]], *, default: str | None = "app", **listener: Any
) -> Any:
    backends = {
        name: {
            "servers": [{"name": s, "address": address_of(addrs[s])} for s in servers],
            **({"sticky": {"cookie": STICKY[name]}} if name in STICKY else {}),
        }
        for name, servers in SERVERS.items()
    }
    web: dict[str, Any] = {"bind": "127.0.0.1:0", "routes": copy.deepcopy(ROUTES)}
    web.update(copy.deepcopy(LISTENER_HEADERS), **listener)
    if default is not None:
        web["backend"] = default
    data = {"listeners": {"web": web}, "backends": backends}
    return parse_config(data, "test_routing", Path(__file__).parent)


@pytest.fixture
async def servers(
    bound_socket_factory: Callable[[], socket.socket],
) -> AsyncIterator[dict[str, EchoServer]]:
    async with AsyncExitStack() as stack:
        echoes = {}
        for name in [s for group in SERVERS.values() for s in group]:
            echoes[name] = await stack.enter_async_context(
                EchoServer(bound_socket_factory(), name=name)
            )
        yield echoes


@pytest.fixture
async def proxy(servers: dict[str, EchoServer], proxies: ProxyStarter) -> RunningProxy:
    return await proxies.start(routed_config({n: s.addr for n, s in servers.items()}))


async def get(
    client: H11Client, host: str, target: str = "/", *headers: tuple[str, str], method: str = "GET"
) -> ClientResponse:
    return await client.request(method, target, [("host", host), *headers])


def server_of(response: ClientResponse) -> str:
    return response.header("x-echo-server") or ""


def received(response: ClientResponse) -> dict[str, str]:
    """The request headers the echo server saw, names lower-cased (last value wins)."""
    return {name.lower(): value for name, value in response.json()["headers"]}


async def test_host_and_path_choose_the_backend_on_one_connection(proxy: RunningProxy) -> None:
    cases = [
        ("api.example.com", "/v1/users?id=7", "api-"),
        ("API.Example.COM:8080", "/v2/", "api-"),  # case and port do not matter
        ("api.example.com.", "/v1/", "api-"),  # nor a trailing dot
        ("api.example.com", "/v3/", "app-"),  # no path matches: the default
        ("img.static.example.com", "/logo.png", "static-1"),
        ("a.b.static.example.com", "/", "static-1"),
        ("static.example.com", "/", "app-"),  # the wildcard's own name is not under it
        ("www.example.com", "/", "app-"),
        ("unknown.test", "/", "app-"),
    ]
    async with await H11Client.connect(proxy.addr) as client:
        for host, target, server in cases:
            response = await get(client, host, target)
            assert response.status == 200, (host, target)
            assert response.header(
                "x-echo-server",
            ).startswith(server), (host, target)  # type: ignore[union-attr]
            assert response.json()["target"] == target
            assert received(response)["host"] == host  # Host is forwarded as sent
        assert client.is_reusable


async def test_method_and_header_conditions(proxy: RunningProxy) -> None:
    async with await H11Client.connect(proxy.addr) as client:
        admin = await get(client, "any.test", "/x", ("X-Admin", "yes"), method="DELETE")
        assert server_of(admin).startswith("api-")
        other = await get(client, "any.test", "/x", ("X-Admin", "no"), method="DELETE")
        assert server_of(other).startswith("app-")
        wrong_method = await get(client, "any.test", "/x", ("X-Admin", "yes"))
        assert server_of(wrong_method).startswith("app-")


async def test_redirects_keep_the_path_and_the_connection(proxy: RunningProxy) -> None:
    async with await H11Client.connect(proxy.addr) as client:
        moved = await get(client, "Example.com:80", "/a/b?c=1&d")
        assert moved.status == 301
        assert moved.header("location") == "https://www.example.com/a/b?c=1&d"
        canonical = await get(client, "plain.example.com", "/x")
        assert canonical.status == 308
        assert canonical.header("location") == "http://plain.example.com:8080/x"
        after = await get(client, "www.example.com")  # the same connection goes on
        assert after.status == 200
        assert client.is_reusable


async def test_header_rules_apply_both_ways(proxy: RunningProxy) -> None:
    async with await H11Client.connect(proxy.addr) as client:
        api = await get(client, "api.example.com", "/v1/", ("X-Debug", "1"), ("X-Route", "forged"))
        seen = received(api)
        assert seen["x-route"] == "api"  # set replaces the client's
        assert [n for n, _ in api.json()["headers"] if n.lower() == "x-route"] == ["X-Route"]
        assert seen["x-proxy"] == "zdlb"  # the listener's rule
        assert "x-debug" not in seen
        assert api.header("x-served-by") == "api-route"
        assert api.header("x-frame-options") == "DENY"
        static = await get(client, "img.static.example.com")
        assert static.header("x-conn-seq") is None and static.header("x-req-seq") is None
        assert static.header("x-echo-server") == "static-1"  # the rest is untouched
        assert static.header("x-frame-options") == "DENY"
        app = await get(client, "www.example.com", "/", ("X-Debug", "1"))
        assert "x-route" not in received(app)  # the api route's rule only
        assert received(app)["x-proxy"] == "zdlb"
        assert "x-debug" not in received(app)


async def test_sticky_cookies_per_backend(proxy: RunningProxy) -> None:
    """Each backend pins with its own cookie; one client holding both stays on both hosts,
    and neither server sees zdlb's cookies."""
    async with await H11Client.connect(proxy.addr) as client:
        app = await get(client, "www.example.com")
        api = await get(client, "api.example.com", "/v1/")
        app_cookie = (app.header("set-cookie") or "").split(";")[0]
        api_cookie = (api.header("set-cookie") or "").split(";")[0]
        assert app_cookie.startswith("APPID=app-") and api_cookie.startswith("APIID=api-")
        jar = f"{app_cookie}; {api_cookie}; theme=dark"
        app_host, api_host = app.header("x-echo-server"), api.header("x-echo-server")
        for _ in range(4):  # round robin alone would alternate hosts
            again = await get(client, "www.example.com", "/", ("cookie", jar))
            assert again.header("x-echo-server") == app_host
            assert again.header("set-cookie") is None
            assert "APPID" not in received(again)["cookie"]
            again = await get(client, "api.example.com", "/v2/", ("cookie", jar))
            assert again.header("x-echo-server") == api_host
            assert again.header("set-cookie") is None
            assert "APIID" not in received(again)["cookie"]
            assert "theme=dark" in received(again)["cookie"]


async def test_unmatched_requests_get_the_configured_status(
    servers: dict[str, EchoServer], proxies: ProxyStarter
) -> None:
    addrs = {n: s.addr for n, s in servers.items()}
    for config, status in (
        (routed_config(addrs, default=None), 404),
        (routed_config(addrs, default=None, unmatched_status=421), 421),
    ):
        proxy = await proxies.start(config)
        async with await H11Client.connect(proxy.addr) as client:
            miss = await get(client, "www.example.com")
            assert miss.status == status
            assert client.is_reusable
            hit = await get(client, "api.example.com", "/v1/")
            assert hit.status == 200
        assert proxy.link("api").backend.name == "api"


async def test_hostile_hosts(servers: dict[str, EchoServer], proxies: ProxyStarter) -> None:
    addrs = {n: s.addr for n, s in servers.items()}
    proxy = await proxies.start(routed_config(addrs, default=None))
    async with await RawClient.connect(proxy.addr) as client:
        # HTTP/1.0 without Host: only rules without a host can match; none here does.
        await client.send(b"GET /v1/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert (await client.read_response()).status == 404
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: api.example.com\r\n\r\n")
        assert (await client.read_response()).status == 400
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(b"GET /v1/ HTTP/1.1\r\n\r\n")  # HTTP/1.1 requires Host
        assert (await client.read_response()).status == 400
    async with await RawClient.connect(proxy.addr) as client:
        await client.send(b"GET /p?q HTTP/1.1\r\nHost: WWW.To-Https.TEST.:80\r\n\r\n")
        response = await client.read_response()
        assert (response.status, response.header("location")) == (
            302,
            "https://www.to-https.test/p?q",
        )
        # A Host that cannot stand in a Location is not echoed into one.
        await client.send(b'GET / HTTP/1.1\r\nHost: x"<y>.to-https.test\r\n\r\n')
        response = await client.read_response()
        assert (response.status, response.header("location")) == (400, None)


async def test_operator_commands_act_per_backend(proxy: RunningProxy) -> None:
    """maint on api/api-1: the api route's requests all go to api-2, the app backend's are not
    touched; `wait idle` answers for a server of a routed backend."""
    runtime = proxy.runtime
    controller = Controller(runtime.backends, runtime.routes, runtime.health)

    async def ctl(line: str) -> str:
        command, _ = parse_command(line.encode())
        return (await controller.execute(command, peer_uid=0)).text

    assert await ctl("set server api/api-1 state maint") == "api/api-1: admin ready -> maint\n"
    async with await H11Client.connect(proxy.addr) as client:
        api = {server_of(await get(client, "api.example.com", "/v1/")) for _ in range(4)}
        app = {server_of(await get(client, "www.example.com", "/")) for _ in range(4)}
    assert api == {"api-2"}
    assert app == {"app-1", "app-2"}
    assert await ctl("wait api/api-2 idle 5") == "api/api-2: idle\n"


async def test_a_failed_connect_is_retried_within_the_routed_backend(
    servers: dict[str, EchoServer], proxies: ProxyStarter, refused_addr: tuple[str, int]
) -> None:
    addrs = {n: s.addr for n, s in servers.items()}
    addrs["api-1"] = refused_addr
    proxy = await proxies.start(routed_config(addrs))
    async with await H11Client.connect(proxy.addr) as client:
        for _ in range(4):
            response = await get(client, "api.example.com", "/v1/")
            assert (response.status, server_of(response)) == (200, "api-2")
    assert proxy.link("api").stats.redispatches >= 1
    assert proxy.link("app").stats.redispatches == 0


async def test_header_rules_on_a_listener_without_routes(
    servers: dict[str, EchoServer], proxies: ProxyStarter
) -> None:
    proxy = await proxies.start(routed_config({n: s.addr for n, s in servers.items()}, routes=[]))
    assert proxy.route.destination is not None  # no router consulted per request
    async with await H11Client.connect(proxy.addr) as client:
        response = await get(client, "api.example.com", "/v1/", ("X-Debug", "1"))
    assert server_of(response).startswith("app-")
    assert received(response)["x-proxy"] == "zdlb" and "x-debug" not in received(response)
    assert response.header("x-frame-options") == "DENY"


async def test_a_listener_that_only_redirects(proxies: ProxyStarter) -> None:
    """http -> https for every host, no backend at all: nothing is pooled or checked."""
    data = {
        "listeners": {
            "http": {
                "bind": "127.0.0.1:0",
                "routes": [{"redirect": {"location": "https://{host}", "status": 308}}],
            }
        },
    }
    proxy = await proxies.start(parse_config(data, "test_routing", Path(__file__).parent))
    assert (proxy.route.backend, proxy.route.upstreams) == (None, {})
    async with await H11Client.connect(proxy.addr) as client:
        for host, target in (("Example.com:80", "/a?b"), ("shop.example.org.", "/")):
            response = await get(client, host, target)
            expected = f"https://{host.lower().split(':')[0].rstrip('.')}{target}"
            assert (response.status, response.header("location")) == (308, expected)
        assert client.is_reusable
