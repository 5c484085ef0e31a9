"""control/deploys.py: which hosts a `deploy begin` takes, what it refuses, and `show deploy`."""

from __future__ import annotations

from pathlib import Path

import pytest

from zdlb.balancer.pool import Backend
from zdlb.balancer.server import AdminState, Health
from zdlb.config.load import parse_config
from zdlb.control.deploy_protocol import (
    DeployBegin,
    DeployEnd,
    DeployHost,
    DeployRenew,
    DeployStep,
    DeployTakeover,
)
from zdlb.control.deploys import DeployDesk
from zdlb.deploy.plan import Step, Target
from zdlb.deploy.record import DEPLOY_LEASE_S, DeployStatus, HostStatus
from zdlb.errors import ControlCommandError

NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def make_backends() -> dict[str, Backend]:
    servers = [
        {"name": "f1", "address": "127.0.0.1:9001"},
        {"name": "f2", "address": "127.0.0.1:9002"},
        {"name": "solo", "address": "127.0.0.1:9003"},
        {"name": "f1-b", "address": "127.0.0.1:9011", "pool": "backup", "pair": "f1"},
        {"name": "f2-b", "address": "127.0.0.1:9012", "pool": "backup", "pair": "f2"},
    ]
    data = {
        "listeners": {"web": {"bind": "127.0.0.1:0", "backend": "app"}},
        "backends": {
            "app": {"servers": servers},
            "lone": {"servers": [{"name": "x", "address": "127.0.0.1:9004"}]},
        },
    }
    config = parse_config(data, "test_deploy_desk", Path("."))
    return {b.name: Backend(b) for b in config.backends}


@pytest.fixture
def desk() -> tuple[DeployDesk, dict[str, Backend], Clock]:
    backends = make_backends()
    clock = Clock()
    return DeployDesk(backends, None, clock), backends, clock


@pytest.mark.parametrize(
    ("servers", "hosts"),
    [
        pytest.param((), [("f1", "f1-b"), ("f2", "f2-b")], id="every-paired-main"),
        pytest.param(("f2",), [("f2", "f2-b")], id="a-main"),
        pytest.param(("f1-b", "f1"), [("f1", "f1-b")], id="a-pair-and-its-main-once"),
    ],
)
def test_begin_takes_the_named_hosts_in_order(
    desk: tuple[DeployDesk, dict[str, Backend], Clock],
    servers: tuple[str, ...],
    hosts: list[tuple[str, str]],
) -> None:
    deploys, _, _ = desk
    _, data = deploys.apply(DeployBegin("app", Target.MAIN, 7, servers), 1000)
    assert [(h["main"], h["pair"]) for h in data["hosts"]] == hosts
    assert data["token"] and data["holder_uid"] == 1000


@pytest.mark.parametrize(
    ("backend", "servers", "message"),
    [
        pytest.param("nope", (), "no backend 'nope'", id="no-backend"),
        pytest.param("lone", (), "lone has no main server with a pair", id="no-pair-at-all"),
        pytest.param("app", ("solo",), "app/solo has no pair", id="unpaired"),
        pytest.param("app", ("f9",), "no server 'f9' in app", id="unknown-server"),
    ],
)
def test_begin_refuses_what_cannot_be_deployed(
    desk: tuple[DeployDesk, dict[str, Backend], Clock], backend: str, servers: tuple[str, ...],
    message: str,
) -> None:  # fmt: skip
    deploys, _, _ = desk
    with pytest.raises(ControlCommandError, match=message):
        deploys.apply(DeployBegin(backend, Target.MAIN, 7, servers), 0)
    assert deploys.record is None


@pytest.mark.parametrize(
    ("to", "server", "admin", "health"),
    [
        pytest.param(Target.MAIN, "f2-b", AdminState.READY, Health.DOWN, id="main-pair-down"),
        pytest.param(Target.MAIN, "f1-b", AdminState.MAINT, Health.UP, id="main-pair-maint"),
        pytest.param(Target.BACKUP, "f1", AdminState.MAINT, Health.UP, id="backup-main-maint"),
    ],
)
def test_begin_refuses_unless_the_stand_in_serves(
    desk: tuple[DeployDesk, dict[str, Backend], Clock],
    to: Target,
    server: str,
    admin: AdminState,
    health: Health,
) -> None:
    deploys, backends, _ = desk
    stand_in = backends["app"].server(server)
    assert stand_in is not None
    stand_in.set_admin(admin)
    stand_in.set_health(health)
    with pytest.raises(ControlCommandError, match=f"app/{server} is .* must serve"):
        deploys.apply(DeployBegin("app", to, 7), 0)


def test_show_deploy_follows_steps_lease_and_takeover(
    desk: tuple[DeployDesk, dict[str, Backend], Clock],
) -> None:
    deploys, _, clock = desk
    assert deploys.show() == ("no deploy\n", None)
    _, data = deploys.apply(DeployBegin("app", Target.MAIN, 7), 0)
    token = data["token"]
    clock.now += 1
    deploys.apply(DeployStep(token, "f1", Step.WAIT_UP), 0)
    text, shown = deploys.show()
    assert shown is not None and "token" not in shown
    assert text.splitlines()[0].startswith("deploy of app to main: running; started ")
    assert text.splitlines()[2].split()[:4] == ["f1", "f1-b", "running", "wait-up"]
    clock.now += DEPLOY_LEASE_S  # the client died
    _, after = deploys.show()
    assert after is not None and after["status"] == "interrupted"
    with pytest.raises(ControlCommandError, match="lock expired"):
        deploys.apply(DeployEnd(token, DeployStatus.DONE), 0)
    _, taken = deploys.apply(DeployTakeover(8), 0)
    assert taken["token"] != token and taken["holder_pid"] == 8
    journaled = deploys.journal_data()
    assert journaled is not None and journaled["token"] == taken["token"]
    assert [(e.server, e.what) for e in deploys.events] == [
        (None, "begin"),
        ("f1", "wait-up"),
        (None, "takeover"),
    ]


def test_a_follower_puts_another_instances_steps_on_its_timeline(
    desk: tuple[DeployDesk, dict[str, Backend], Clock],
) -> None:
    """A fleet member sees another instance's deploy only as committed records; following
    them records the same events the holder recorded, once each (a renewal is none)."""
    holder, backends, clock = desk
    follower = DeployDesk(backends, None, clock)
    seen: list[tuple[str | None, str]] = []

    def commit() -> None:
        assert holder.record is not None
        follower.follow(holder.record)
        seen.extend((e.server, e.what) for e in follower.events if (e.server, e.what) not in seen)

    _, data = holder.apply(DeployBegin("app", Target.BACKUP, 7), 0)
    token = data["token"]
    commit()
    for step in (Step.FLIP, Step.WAIT_IDLE):
        clock.now += 1
        holder.apply(DeployStep(token, "f1", step), 0)
        commit()
    holder.apply(DeployRenew(token), 0)
    commit()
    holder.apply(DeployHost(token, "f1", HostStatus.DONE, ""), 0)
    commit()
    holder.apply(DeployEnd(token, DeployStatus.DONE), 0)
    commit()
    expected = [(e.server, e.what) for e in holder.events]
    assert [(e.server, e.what) for e in follower.events] == expected
    assert expected == [
        (None, "begin"),
        ("f1", "flip"),
        ("f1", "wait-idle"),
        ("f1", "done"),
        (None, "end done"),
    ]
    assert follower.show() == holder.show()
