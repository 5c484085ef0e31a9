"""The /status.json document: hosts with main and pair side by side, who serves them, load,
rates, census and timeline; cached briefly. Real daemon objects, pinned clocks."""

from __future__ import annotations

from typing import Any

from tests.status_fixtures import DemoState, demo_state
from zdlb.balancer.server import AdminState, Health
from zdlb.census import mint_token
from zdlb.events import EventKind
from zdlb.metrics.status import CACHE_S, StatusBoard, page


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def board(state: DemoState, clock: Clock) -> StatusBoard:
    return StatusBoard(
        state.backends,
        state.health,
        state.events,
        state.snapshot,
        state.census,
        clock=lambda: 1_700_000_000.0 + clock.now,
        monotonic=clock,
    )


def hosts(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {host["host"]: host for host in doc["backends"][0]["hosts"]}


def test_hosts_show_main_and_pair_and_who_serves() -> None:
    state, clock = demo_state(), Clock()
    doc: dict[str, Any] = board(state, clock).document()
    by_host = hosts(doc)
    assert list(by_host) == ["front-1", "front-2", "spare"]
    front1 = by_host["front-1"]
    assert [(m["name"], m["role"], m["pool"]) for m in front1["members"]] == [
        ("front-1", "main", "main"),
        ("front-1-backup", "pair", "backup"),
    ]
    assert front1["serving"] == "front-1"
    # An unpaired backup is its own host: users pinned to it stay while it is usable.
    assert by_host["spare"]["serving"] == "spare"
    assert [m["role"] for m in by_host["spare"]["members"]] == ["backup"]
    assert doc["backends"][0]["sticky_cookie"] == "SERVERID"
    assert doc["backends"][0]["census_window_s"] == 300.0


def test_flip_and_health_change_who_serves() -> None:
    state, clock = demo_state(), Clock()
    status = board(state, clock)
    state.server("front-1").set_admin(AdminState.MAINT, clock.now)
    state.server("front-2").set_health(Health.DOWN)
    clock.now += CACHE_S
    by_host = hosts(status.document())
    assert by_host["front-1"]["serving"] == "front-1-backup"
    assert by_host["front-1"]["members"][0]["admin"] == "maint"
    assert by_host["front-2"]["serving"] == "front-2-backup"
    assert by_host["front-2"]["members"][0]["health"] == "down"


def test_document_is_cached_briefly() -> None:
    state, clock = demo_state(), Clock()
    status = board(state, clock)
    first = status.document()
    state.server("front-1").set_admin(AdminState.MAINT, clock.now)
    assert status.document() is first  # ten tabs polling share one build
    clock.now += CACHE_S
    assert hosts(status.document())["front-1"]["serving"] == "front-1-backup"


def test_requests_per_second_and_load() -> None:
    state, clock = demo_state(), Clock()
    status = board(state, clock)
    server_stats = state.stats.server("app", "front-1")
    front1 = state.server("front-1")
    assert hosts(status.document())["front-1"]["members"][0]["requests_per_s"] is None
    clock.now += 2.0
    server_stats.requests += 50
    front1.inflight, front1.conns = 3, 5
    member = hosts(status.document())["front-1"]["members"][0]
    assert member["requests_per_s"] == 25.0
    assert (member["requests"], member["inflight"], member["conns"]) == (50, 3, 5)


def test_census_and_events_are_in_the_document() -> None:
    state, clock = demo_state(), Clock()
    for _ in range(40):
        state.census["app"].observe("front-1", mint_token())
    state.events.record(EventKind.FLIP, "app/front-1", "front-1-backup serves front-1")
    doc: dict[str, Any] = board(state, clock).document()
    assert abs(hosts(doc)["front-1"]["users"] - 40) <= 2
    assert hosts(doc)["front-2"]["users"] == 0
    assert doc["events"][0]["kind"] == "flip"
    assert doc["is_admin"] is False


def test_page_has_its_script_hash_in_the_policy() -> None:
    html, policy = page()
    assert html.startswith(b"<!doctype html>")
    assert b"script-src 'sha256-" in policy and b"frame-ancestors 'none'" in policy
    assert b"http" not in html.split(b"<script>")[1]  # nothing fetched from elsewhere
