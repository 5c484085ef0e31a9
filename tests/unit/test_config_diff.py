"""config/diff.py: what a reload changes, as tables of (edit, expected changes, refusals)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from zdlb.config.cluster import ClusterConfig
from zdlb.config.diff import Change, ChangeKind, diff_configs
from zdlb.config.model import (
    Address,
    BackendConfig,
    CheckConfig,
    Config,
    ControlConfig,
    ListenerConfig,
    ListenerMode,
    LogFormat,
    LoggingConfig,
    MetricsConfig,
    ServerConfig,
    StickyConfig,
    Timeouts,
)

ADDED, REMOVED, CHANGED = ChangeKind.ADDED, ChangeKind.REMOVED, ChangeKind.CHANGED
S1 = ServerConfig("s1", Address("127.0.0.1", 8001))
S2 = ServerConfig("s2", Address("127.0.0.1", 8002))
APP = BackendConfig("app", (S1, S2))
WEB = ListenerConfig("web", Address("127.0.0.1", 8000), "app")
BASE = Config("a.toml", (WEB,), (APP,))


def with_servers(*servers: ServerConfig) -> Config:
    return dataclasses.replace(BASE, backends=(dataclasses.replace(APP, servers=servers),))


def with_backend(timeouts: Timeouts, sticky: StickyConfig) -> Config:
    backend = dataclasses.replace(APP, timeouts=timeouts, sticky=sticky)
    return dataclasses.replace(BASE, backends=(backend,))


def with_listeners(*listeners: ListenerConfig) -> Config:
    return dataclasses.replace(BASE, listeners=listeners)


Edit = Callable[[], Config]
CASES: list[tuple[str, Edit, list[Change], int]] = [
    ("nothing", lambda: dataclasses.replace(BASE, source="b.toml"), [], 0),
    (
        "a server added",
        lambda: with_servers(S1, S2, ServerConfig("s3", Address("127.0.0.1", 8003))),
        [Change(ADDED, "server", "app/s3")],
        0,
    ),
    ("a server removed", lambda: with_servers(S1), [Change(REMOVED, "server", "app/s2")], 0),
    (
        "a check changed",
        lambda: with_servers(dataclasses.replace(S1, check=CheckConfig(interval_s=1.0)), S2),
        [Change(CHANGED, "server", "app/s1", ("check",))],
        0,
    ),
    (
        "weight and address",
        lambda: with_servers(
            dataclasses.replace(S1, weight=5, address=Address("127.0.0.1", 9001)), S2
        ),
        [Change(CHANGED, "server", "app/s1", ("address", "weight"))],
        0,
    ),
    (
        "backend timeouts and sticky",
        lambda: with_backend(timeouts=Timeouts(server_s=2.0), sticky=StickyConfig("SRV")),
        [Change(CHANGED, "backend", "app", ("timeouts", "sticky"))],
        0,
    ),
    (
        "a listener moved and one added",
        lambda: with_listeners(
            dataclasses.replace(WEB, bind=Address("127.0.0.1", 8100)),
            ListenerConfig("api", Address("127.0.0.1", 8200), "app"),
        ),
        [Change(CHANGED, "listener", "web", ("bind",)), Change(ADDED, "listener", "api")],
        0,
    ),
    ("the listener removed", lambda: with_listeners(), [Change(REMOVED, "listener", "web")], 0),
    (
        "a listener's mode",
        lambda: with_listeners(dataclasses.replace(WEB, mode=ListenerMode.TCP)),
        [Change(CHANGED, "listener", "web", ("mode",))],
        1,
    ),
    (
        "log level reloads, format does not",
        lambda: dataclasses.replace(
            BASE, logging=LoggingConfig(level="debug", format=LogFormat.JSON)
        ),
        [Change(CHANGED, "setting", "logging.level")],
        1,
    ),
    (
        "control socket and metrics refused, workers a change (resize.py)",
        lambda: dataclasses.replace(
            BASE,
            control=ControlConfig(socket=Path("/run/x.sock")),
            metrics=MetricsConfig(Address("127.0.0.1", 9100)),
            workers=4,
        ),
        [Change(CHANGED, "setting", "workers")],
        2,
    ),
    (
        "the process maxconn reloads (budget.py); the fleet is joined at start",
        lambda: dataclasses.replace(
            BASE,
            maxconn=500,
            cluster=ClusterConfig(("http://127.0.0.1:2379",), "/zdlb/prod", "lb-1"),
        ),
        [Change(CHANGED, "setting", "maxconn")],
        1,
    ),
]


@pytest.mark.parametrize(
    ("edit", "changes", "refusals"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_diff(edit: Edit, changes: list[Change], refusals: int) -> None:
    diff = diff_configs(BASE, edit())
    assert list(diff.changes) == changes
    assert len(diff.refused) == refusals
    assert diff.is_empty == (not changes and not refusals)


def test_refusals_name_the_key_path() -> None:
    new = dataclasses.replace(BASE, metrics=MetricsConfig(Address("127.0.0.1", 9100)))
    (line,) = diff_configs(BASE, new).refused
    assert line.startswith("metrics.listen: ") and "restart" in line


def test_a_change_reads_as_one_line() -> None:
    assert str(Change(CHANGED, "server", "app/s1", ("check", "weight"))) == (
        "server app/s1 changed: check, weight"
    )
    assert str(Change(ADDED, "listener", "api")) == "listener api added"
