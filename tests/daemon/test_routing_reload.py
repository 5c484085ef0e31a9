"""Routes across reloads on the real daemon: a reload that adds routes (and with them a backend
the listener did not send to) and one that takes them away, while a keep-alive client stays
connected; with one process and with two workers."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.daemon.conftest import ServerSpec, StartDaemon, render_config
from tests.daemon.test_control import SOCKET_NAME, run_zdlb
from tests.servers import EchoServer, H11Client

ROUTES = """
[[listeners.web.routes]]
host = "api.example.com"
backend = "api"
request_headers = {{ set = {{ X-Route = "api" }} }}

[[listeners.web.routes]]
host = "old.example.com"
redirect = {{ location = "https://new.example.com", status = 301 }}

[backends.api]
[[backends.api.servers]]
name = "a1"
address = "{host}:{port}"
"""


def config_text(app: EchoServer, api: EchoServer, *, routed: bool) -> str:
    text = render_config([ServerSpec("s1", app.addr)], access_log=False)
    text += f'\n[control]\nsocket = "{SOCKET_NAME}"\n'
    if routed:
        text += ROUTES.format(host=api.addr[0], port=api.addr[1])
    return text


@pytest.fixture
async def echoes(
    bound_socket_factory: Callable[[], socket.socket],
) -> AsyncIterator[tuple[EchoServer, EchoServer]]:
    app, api = (
        EchoServer(bound_socket_factory(), name="s1"),
        EchoServer(bound_socket_factory(), name="a1"),
    )
    async with app, api:
        yield app, api


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "2-workers"])
async def test_a_reload_adds_and_removes_routes_and_their_backend(
    start_daemon: StartDaemon,
    tmp_path: Path,
    echoes: tuple[EchoServer, EchoServer],
    workers: int,
) -> None:
    app, api = echoes
    config = tmp_path / "zdlb.toml"
    config.write_text(config_text(app, api, routed=False), encoding="utf-8")
    daemon = await start_daemon("run", "--workers", str(workers), "-c", str(config))
    addr = await daemon.listener_addr()
    host = [("host", "api.example.com")]
    async with await H11Client.connect(addr) as kept:
        assert (await kept.request("GET", "/", host)).header("x-echo-server") == "s1"

        config.write_text(config_text(app, api, routed=True), encoding="utf-8")
        result = await run_zdlb("ctl", "-c", str(config), "reload")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["listener web changed: routing", "backend api added"]
        # With workers, each applies the reload on its own: ask until this one has.
        for _ in range(50):
            response = await kept.request("GET", "/", host)
            if response.header("x-echo-server") == "a1":
                break
        assert response.header("x-echo-server") == "a1"
        assert ["X-Route", "api"] in response.json()["headers"]
        moved = await kept.request("GET", "/x", [("host", "old.example.com")])
        assert (moved.status, moved.header("location")) == (301, "https://new.example.com/x")

        config.write_text(config_text(app, api, routed=False), encoding="utf-8")
        result = await run_zdlb("ctl", "-c", str(config), "reload")
        assert result.returncode == 0, result.stderr
        for _ in range(50):
            response = await kept.request("GET", "/", host)
            if response.header("x-echo-server") == "s1":
                break
        assert response.header("x-echo-server") == "s1"
        assert kept.is_reusable
    assert "Traceback" not in daemon.output
