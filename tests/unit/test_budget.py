"""budget.py: the connection budget's rules, with acceptors that only record what they were told."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from zdlb.budget import (
    BASE_RESERVED_FDS,
    FDS_PER_LISTENER,
    MIN_MAXCONN,
    ConnectionBudget,
    default_maxconn,
    reserved_fds,
)
from zdlb.config.load import parse_config
from zdlb.config.model import Config
from zdlb.stats import ListenerStats


class Acceptor:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


def config(servers: int, max_idle: int = 64) -> Config:
    data = {
        "listeners": {"web": {"bind": "127.0.0.1:0", "backend": "app"}},
        "backends": {
            "app": {
                "servers": [
                    {"name": f"s{i}", "address": f"10.0.0.{i + 1}:80", "max_idle": max_idle}
                    for i in range(servers)
                ]
            }
        },
    }
    return parse_config(data, "t.toml", Path("."))


def test_rule_4_the_default_leaves_room_for_everything_else() -> None:
    cfg = config(servers=4)
    reserved = BASE_RESERVED_FDS + FDS_PER_LISTENER + 4 * (1 + 64)
    assert reserved_fds(cfg) == reserved
    assert default_maxconn(cfg, 1024) == (1024 - reserved) // 2
    assert default_maxconn(cfg, 100) == MIN_MAXCONN


def test_rules_2_and_3_the_process_limit_pauses_every_listener_and_resumes_below_it() -> None:
    budget = ConnectionBudget(limit=100)
    web, api = budget.gate("web", None, ListenerStats()), budget.gate("api", None, ListenerStats())
    a, b = Acceptor(), Acceptor()
    web.add(a)
    api.add(b)
    for _ in range(60):
        web.opened()
    for _ in range(40):
        api.opened()
    assert a.calls == b.calls == ["pause"] and budget.stats.limit_hits == 1
    web.closed()  # 99 open: not 2% free yet
    assert a.calls == ["pause"]
    web.closed()  # 98: resumed
    assert a.calls == b.calls == ["pause", "resume"]


def test_rule_1_a_listener_limit_pauses_that_listener_only() -> None:
    budget = ConnectionBudget(limit=1000)
    stats = ListenerStats()
    web = budget.gate("web", 3, stats)
    api = budget.gate("api", None, ListenerStats())
    a, b = Acceptor(), Acceptor()
    web.add(a)
    api.add(b)
    for _ in range(3):
        web.opened()
    api.opened()
    assert a.calls == ["pause"] and b.calls == [] and stats.limit_hits == 1
    assert stats.maxconn == 3
    web.closed()
    assert a.calls == ["pause", "resume"]


def test_a_gate_is_kept_by_name_and_an_acceptor_added_while_paused_starts_paused() -> None:
    budget = ConnectionBudget(limit=1)
    gate = budget.gate("web", None, ListenerStats())
    gate.opened()
    assert budget.gate("web", None, ListenerStats()) is gate  # a reload keeps its count
    late = Acceptor()
    gate.add(late)
    assert late.calls == ["pause"]


def test_a_reload_changes_the_limits_through_configure_only() -> None:
    """A reload's routes get the running gates back unchanged (a plan that fails must change
    nothing); the config it switches to sets the limits."""
    budget = ConnectionBudget(limit=100)
    gate = budget.gate("web", 3, ListenerStats())
    assert budget.gate("web", 50, ListenerStats()) is gate and gate.limit == 3
    cfg = config(servers=1)
    listener = dataclasses.replace(cfg.listeners[0], maxconn=7)
    budget.configure(dataclasses.replace(cfg, listeners=(listener,), maxconn=40))
    assert (budget.limit, gate.limit, gate.stats.maxconn, budget.stats.maxconn) == (40, 7, 7, 40)


def test_nothing_resumes_once_stopping() -> None:
    budget = ConnectionBudget(limit=1)
    gate = budget.gate("web", None, ListenerStats())
    acceptor = Acceptor()
    gate.add(acceptor)
    gate.opened()
    budget.stop()
    gate.closed()
    assert acceptor.calls == ["pause"]
