"""Server runtime state: construction, usability table, transitions, load counters, repr."""

from __future__ import annotations

import pytest

from zdlb.balancer.server import AdminState, Health, Server
from zdlb.config.model import Address, PoolName, ServerConfig


def make_server(weight: int = 100, pool: PoolName = PoolName.MAIN) -> Server:
    config = ServerConfig("web1", Address("10.0.0.1", 8080), weight=weight, pool=pool)
    return Server(config, "app")


def test_new_server_mirrors_its_config_and_starts_ready_up_idle() -> None:
    server = make_server(weight=42, pool=PoolName.BACKUP)
    assert server.name == "web1"
    assert server.backend == "app"
    assert server.address == Address("10.0.0.1", 8080)
    assert server.pool is PoolName.BACKUP
    assert server.weight == 42
    assert server.admin is AdminState.READY
    assert server.health is Health.UP
    assert (server.inflight, server.conns) == (0, 0)


def test_enum_values_match_the_control_socket_words() -> None:
    assert [s.value for s in AdminState] == ["ready", "drain", "maint"]
    assert [h.value for h in Health] == ["up", "down"]


USABILITY = [
    # admin, health, weight, is_usable, takes_new_traffic
    pytest.param(AdminState.READY, Health.UP, 100, True, True, id="ready-up"),
    pytest.param(AdminState.READY, Health.UP, 0, True, False, id="ready-up-weight0"),
    pytest.param(AdminState.READY, Health.DOWN, 100, False, False, id="ready-down"),
    pytest.param(AdminState.DRAIN, Health.UP, 100, False, False, id="drain-up"),
    pytest.param(AdminState.DRAIN, Health.DOWN, 100, False, False, id="drain-down"),
    pytest.param(AdminState.MAINT, Health.UP, 100, False, False, id="maint-up"),
    pytest.param(AdminState.MAINT, Health.DOWN, 0, False, False, id="maint-down-weight0"),
]


@pytest.mark.parametrize(("admin", "health", "weight", "usable", "takes_new"), USABILITY)
def test_usability_table(
    admin: AdminState, health: Health, weight: int, usable: bool, takes_new: bool
) -> None:
    server = make_server(weight=weight)
    server.set_admin(admin)
    server.set_health(health)
    assert server.is_usable is usable
    assert server.takes_new_traffic is takes_new


def test_runtime_weight_change_affects_new_traffic_only() -> None:
    server = make_server()
    server.weight = 0
    assert server.is_usable
    assert not server.takes_new_traffic
    assert server.config.weight == 100


@pytest.mark.parametrize("old", list(AdminState), ids=lambda s: f"from-{s.value}")
@pytest.mark.parametrize("new", list(AdminState), ids=lambda s: f"to-{s.value}")
def test_set_admin_returns_previous_state(old: AdminState, new: AdminState) -> None:
    server = make_server()
    server.set_admin(old)
    assert server.set_admin(new) is old
    assert server.admin is new
    assert server.health is Health.UP


@pytest.mark.parametrize("old", list(Health), ids=lambda h: f"from-{h.value}")
@pytest.mark.parametrize("new", list(Health), ids=lambda h: f"to-{h.value}")
def test_set_health_returns_previous_health(old: Health, new: Health) -> None:
    server = make_server()
    server.set_health(old)
    assert server.set_health(new) is old
    assert server.health is new
    assert server.admin is AdminState.READY


def test_request_counters_go_up_and_down() -> None:
    server = make_server()
    for _ in range(3):
        server.request_started()
    assert server.inflight == 3
    server.request_finished()
    server.request_finished()
    assert server.inflight == 1
    assert server.conns == 0


def test_connection_counters_go_up_and_down() -> None:
    server = make_server()
    server.connection_opened()
    server.connection_opened()
    server.connection_closed()
    assert server.conns == 1
    assert server.inflight == 0


@pytest.mark.skipif(not __debug__, reason="assertions are disabled under python -O")
@pytest.mark.parametrize(
    ("method", "counter"),
    [
        pytest.param("request_finished", "inflight", id="request"),
        pytest.param("connection_closed", "conns", id="connection"),
    ],
)
def test_unmatched_finish_is_a_bug_and_never_goes_negative(method: str, counter: str) -> None:
    server = make_server()
    with pytest.raises(AssertionError, match="without"):
        getattr(server, method)()
    assert getattr(server, counter) == 0


def test_repr_shows_identity_and_state() -> None:
    server = make_server(weight=7)
    server.set_admin(AdminState.DRAIN)
    server.set_health(Health.DOWN)
    server.request_started()
    server.connection_opened()
    server.connection_opened()
    assert repr(server) == (
        "<Server app/web1 pool=main admin=drain health=down weight=7 inflight=1 conns=2>"
    )


def test_servers_are_distinct_by_identity() -> None:
    first, second = make_server(), make_server()
    assert first != second
    assert len({first, second}) == 2
