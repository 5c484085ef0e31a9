"""The master/worker channel protocol (daemon/ipc.py): every message round-trips, state applies."""

from __future__ import annotations

import math

import pytest

from zdlb.balancer.server import AdminState, Health, Server
from zdlb.config.model import Address, Config, ListenerConfig, PoolName, ServerConfig
from zdlb.daemon import ipc
from zdlb.stats import Snapshot, Stats


def make_servers() -> list[Server]:
    return [
        Server(ServerConfig(name, Address("10.0.0.1", port)), "app")
        for name, port in (("s1", 8001), ("s2", 8002))
    ]


def a_snapshot() -> Snapshot:
    config = Config(
        "test.toml",
        (ListenerConfig("web", Address("127.0.0.1", 0), "app"),),
        (),
    )
    stats = Stats.from_config(config)
    stats.listeners["web"].connections_total = 7
    return stats.snapshot()


MESSAGES = [
    pytest.param(ipc.views_of(make_servers()), id="state"),
    pytest.param(
        ipc.StateUpdate(
            (ipc.ServerView("app/s1", PoolName.BACKUP, AdminState.DRAIN, Health.DOWN, 0, 12.5),)
        ),
        id="state-changed",
    ),
    pytest.param(ipc.StateUpdate(()), id="state-empty"),
    pytest.param(ipc.Poll(3), id="poll"),
    pytest.param(ipc.CloseIdle("app/s1"), id="close-idle"),
    pytest.param(ipc.Ready(1234), id="ready"),
    pytest.param(ipc.StatsReport(5, 2, a_snapshot()), id="stats"),
    pytest.param(
        ipc.StatsReport(5, 2, a_snapshot(), {"app": {"front-1": [[3, 2], [4095, 1]]}}),
        id="stats-census",
    ),
    pytest.param(ipc.ObservedDown("app/s2", "3 consecutive errors"), id="down"),
    pytest.param(
        ipc.Reload(7, Config("z.toml", (ListenerConfig("web", Address("127.0.0.1", 0), "a"),), ())),
        id="reload",
    ),
    pytest.param(
        ipc.Reload(
            8,
            Config("z.toml", (ListenerConfig("web", Address("127.0.0.1", 0), "a"),), ()),
            ("api", "raw"),
        ),
        id="reload-with-listeners",
    ),
    pytest.param(ipc.Reloaded(7, ()), id="reloaded"),
    pytest.param(ipc.HandOver(), id="hand-over"),
    pytest.param(ipc.Siblings(9, ("web", "raw")), id="siblings"),
    pytest.param(ipc.Adopt(1), id="adopt"),
    pytest.param(ipc.Release(1), id="release"),
    pytest.param(ipc.Reloaded(8, ("worker 1: out of fds",)), id="reloaded-problem"),
]


@pytest.mark.parametrize("message", MESSAGES)
def test_round_trip(message: ipc.Message) -> None:
    line = ipc.encode(message)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert ipc.decode(line) == message
    assert ipc.decode(line.rstrip(b"\n")) == message


def test_infinite_drain_deadline_travels_as_null() -> None:
    servers = make_servers()
    assert servers[0].drain_ends == math.inf
    line = ipc.encode(ipc.views_of(servers))
    assert b'"drain_ends":null' in line
    assert b"Infinity" not in line
    decoded = ipc.decode(line)
    assert isinstance(decoded, ipc.StateUpdate)
    assert decoded.servers[0].drain_ends == math.inf


REJECTED = [
    pytest.param(b"not json\n", id="not-json"),
    pytest.param(b"[1]\n", id="not-object"),
    pytest.param(b'{"t":"nope"}\n', id="unknown-type"),
    pytest.param(b'{"seq":1}\n', id="no-type"),
    pytest.param(b'{"t":"poll"}\n', id="missing-field"),
    pytest.param(b'{"t":"poll","seq":"1"}\n', id="seq-not-int"),
    pytest.param(b'{"t":"poll","seq":true}\n', id="seq-bool"),
    pytest.param(b'{"t":"close_idle","server":1}\n', id="server-not-str"),
    pytest.param(b'{"t":"stats","seq":1,"connections":0,"snapshot":[]}\n', id="bad-snapshot"),
    pytest.param(
        b'{"t":"stats","seq":1,"connections":0,"snapshot":{},"census":[]}\n', id="bad-census"
    ),
    pytest.param(
        b'{"t":"state","servers":[{"key":"a/b","pool":"side","admin":"ready","health":"up",'
        b'"weight":1,"drain_ends":null}]}\n',
        id="bad-pool",
    ),
    pytest.param(
        b'{"t":"state","servers":[{"key":"a/b","pool":"main","admin":"ready","health":"up",'
        b'"weight":1,"drain_ends":"soon"}]}\n',
        id="bad-drain-ends",
    ),
    pytest.param(b'{"t":"reload","seq":1,"config":"bm90IGEgcGlja2xl"}\n', id="config-garbage"),
    pytest.param(b'{"t":"reload","seq":1,"config":"gAVLAS4="}\n', id="config-not-config"),
    pytest.param(b'{"t":"reload","seq":1,"config":"%%%"}\n', id="config-not-base64"),
    pytest.param(b'{"t":"reloaded","seq":1,"problems":[1]}\n', id="problem-not-str"),
]


@pytest.mark.parametrize("line", REJECTED)
def test_decode_rejects(line: bytes) -> None:
    with pytest.raises(ValueError):
        ipc.decode(line)


def test_decode_rejects_oversized_line() -> None:
    with pytest.raises(ValueError, match="at most"):
        ipc.decode(b" " * (ipc.MAX_MESSAGE_BYTES + 1))


def test_apply_update_copies_the_masters_state_and_returns_what_changed() -> None:
    master, worker = make_servers(), make_servers()
    master[0].set_admin(AdminState.DRAIN, now=100.0)
    master[0].drain_hold_s = 0.0
    master[1].weight = 7
    master[1].pool = PoolName.BACKUP
    master[1].set_health(Health.DOWN)
    by_key = {ipc.server_key(s): s for s in worker}

    update = ipc.decode(ipc.encode(ipc.views_of(master)))
    assert isinstance(update, ipc.StateUpdate)
    changed = ipc.apply_update(update, by_key)

    assert changed == worker
    for mine, theirs in zip(worker, master, strict=True):
        assert (mine.pool, mine.admin, mine.health, mine.weight, mine.drain_ends) == (
            theirs.pool,
            theirs.admin,
            theirs.health,
            theirs.weight,
            theirs.drain_ends,
        )


def test_apply_update_writes_nothing_when_nothing_changed() -> None:
    master, worker = make_servers(), make_servers()
    generation = Server.generation
    assert ipc.apply_update(ipc.views_of(master), {ipc.server_key(s): s for s in worker}) == []
    assert Server.generation == generation  # balancers keep their cached schedules


def test_apply_update_skips_unknown_servers() -> None:
    view = ipc.ServerView("app/gone", PoolName.MAIN, AdminState.MAINT, Health.UP, 1, math.inf)
    worker = make_servers()
    assert ipc.apply_update(ipc.StateUpdate((view,)), {ipc.server_key(s): s for s in worker}) == []
    assert all(s.admin is AdminState.READY for s in worker)
