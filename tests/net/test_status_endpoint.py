"""The status page, /status.json and the write actions on the real metrics listener.

The board reads the daemon's own objects (tests/status_fixtures.py); actions run through the
real ``Controller``, as the control socket's commands do. Requests are h11's (H11Client).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest

from tests.servers import H11Client
from tests.status_fixtures import DemoState, demo_state
from zdlb.balancer.server import AdminState
from zdlb.control.commands import Controller
from zdlb.daemon.page_actions import action_runner
from zdlb.metrics.collector import new_registry
from zdlb.metrics.endpoint import MetricsEndpoint
from zdlb.metrics.status import StatusBoard

WAIT_S = 5.0


async def _endpoint(sock: socket.socket, state: DemoState, *, admin: bool) -> MetricsEndpoint:
    board = StatusBoard(
        state.backends, state.health, state.events, state.snapshot, state.census, is_admin=admin
    )
    controller = Controller(state.backends, [], state.health, events=state.events)
    metrics = MetricsEndpoint(
        new_registry(state.snapshot, state.events, state.census),
        sock,
        deadline_s=WAIT_S,
        status=board,
        run_action=action_runner(controller) if admin else None,
    )
    await metrics.start()
    return metrics


@pytest.fixture
async def served(bound_socket: socket.socket) -> AsyncIterator[tuple[MetricsEndpoint, DemoState]]:
    state = demo_state()
    metrics = await _endpoint(bound_socket, state, admin=False)
    yield metrics, state
    metrics.close()
    async with asyncio.timeout(WAIT_S):
        await metrics.wait_closed()


@pytest.fixture
async def admin(bound_socket: socket.socket) -> AsyncIterator[tuple[MetricsEndpoint, DemoState]]:
    state = demo_state()
    metrics = await _endpoint(bound_socket, state, admin=True)
    yield metrics, state
    metrics.close()
    async with asyncio.timeout(WAIT_S):
        await metrics.wait_closed()


def _addr(metrics: MetricsEndpoint) -> tuple[str, int]:
    return (metrics.address.host, metrics.address.port)


async def _get(metrics: MetricsEndpoint, target: str, method: str = "GET"):
    async with await H11Client.connect(_addr(metrics)) as client:
        return await client.request(method, target)


@pytest.mark.parametrize("target", ["/", "/status", "/status?x=1"])
async def test_page(served: tuple[MetricsEndpoint, DemoState], target: str) -> None:
    metrics, _ = served
    response = await _get(metrics, target)
    assert response.status == 200
    assert response.header("content-type") == "text/html; charset=utf-8"
    assert b"<title>zdlb status</title>" in response.body
    policy = response.header("content-security-policy") or ""
    assert "script-src 'sha256-" in policy and "frame-ancestors 'none'" in policy
    assert response.header("x-frame-options") == "DENY"
    assert response.header("cache-control") == "no-store"
    head = await _get(metrics, target, "HEAD")
    assert head.status == 200 and head.body == b""


async def test_status_json(served: tuple[MetricsEndpoint, DemoState]) -> None:
    metrics, state = served
    state.server("front-1").set_admin(AdminState.MAINT, 0.0)
    response = await _get(metrics, "/status.json")
    assert response.status == 200
    assert response.header("content-type") == "application/json"
    doc = json.loads(response.body)
    hosts = {host["host"]: host for host in doc["backends"][0]["hosts"]}
    assert hosts["front-1"]["serving"] == "front-1-backup"
    assert hosts["front-2"]["serving"] == "front-2"
    assert doc["is_admin"] is False


async def test_actions_are_404_unless_admin(served: tuple[MetricsEndpoint, DemoState]) -> None:
    metrics, state = served
    async with await H11Client.connect(_addr(metrics)) as client:
        response = await client.request(
            "POST",
            "/status/action",
            headers=_action_headers(metrics),
            body=b'{"action": "flip", "server": "app/front-1"}',
        )
    assert response.status == 404
    assert state.server("front-1").admin is AdminState.READY


async def test_metrics_count_events_and_users(served: tuple[MetricsEndpoint, DemoState]) -> None:
    metrics, state = served
    state.census["app"].observe("front-1", b"0123456789abcdef")
    text = (await _get(metrics, "/metrics")).body.decode()
    assert 'zdlb_events_total{kind="flip"} 0.0' in text
    assert 'zdlb_sticky_users{backend="app",host="front-1"} 1.0' in text
    assert 'zdlb_sticky_users{backend="app",host="front-2"} 0.0' in text


def _action_headers(metrics: MetricsEndpoint, **changes: str) -> list[tuple[str, str]]:
    host = f"{metrics.address.host}:{metrics.address.port}"
    headers = {
        "host": host,
        "origin": f"http://{host}",
        "x-zdlb-action": "1",
        "content-type": "application/json",
    }
    headers.update(changes)
    return [(name, value) for name, value in headers.items() if value]


async def _post(metrics: MetricsEndpoint, body: bytes, **changes: str):
    async with await H11Client.connect(_addr(metrics)) as client:
        return await client.request(
            "POST", "/status/action", headers=_action_headers(metrics, **changes), body=body
        )


FLIP = b'{"action": "flip", "server": "app/front-1"}'


async def test_flip_from_the_page(admin: tuple[MetricsEndpoint, DemoState]) -> None:
    metrics, state = admin
    response = await _post(metrics, FLIP)
    assert response.status == 200, response
    assert json.loads(response.body)["ok"] is True
    assert state.server("front-1").admin is AdminState.MAINT
    assert state.events.newest_first(1)[0].kind.value == "flip"
    drain = b'{"action": "drain", "server": "app/front-2"}'
    assert (await _post(metrics, drain)).status == 200
    assert state.server("front-2").admin is AdminState.DRAIN
    ready = b'{"action": "ready", "server": "app/front-2"}'
    assert (await _post(metrics, ready)).status == 200
    assert state.server("front-2").admin is AdminState.READY


@pytest.mark.parametrize(
    ("changes", "body", "status"),
    [
        ({"x-zdlb-action": ""}, FLIP, 403),
        ({"origin": "http://evil.example"}, FLIP, 403),
        ({"host": "evil.example:9100", "origin": ""}, FLIP, 403),
        ({"content-type": "application/x-www-form-urlencoded"}, FLIP, 415),
        ({}, b"action=flip&server=app/front-1", 400),
        ({}, b'{"action": "flip", "server": "app/nobody"}', 409),
        ({}, b'{"action": "flip", "server": "app/spare"}', 409),
    ],
    ids=["no-header", "cross-origin", "rebinding", "form", "not-json", "unknown", "no-pair"],
)
async def test_refused_actions_change_nothing(
    admin: tuple[MetricsEndpoint, DemoState], changes: dict[str, str], body: bytes, status: int
) -> None:
    metrics, state = admin
    response = await _post(metrics, body, **changes)
    assert response.status == status, response
    assert "error" in json.loads(response.body)
    assert all(server.admin is AdminState.READY for server in state.servers)
    assert state.events.last_seq == 0


async def test_get_on_the_action_path_is_405(admin: tuple[MetricsEndpoint, DemoState]) -> None:
    metrics, _ = admin
    response = await _get(metrics, "/status/action")
    assert response.status == 405
    assert response.header("allow") == "POST"
