"""The events timeline: bounded, newest first, counts that survive eviction."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from zdlb.events import MAX_DETAIL_CHARS, EventKind, Timeline


def _clock() -> Callable[[], float]:
    ticks = itertools.count(1000)
    return lambda: float(next(ticks))


def test_newest_first_with_times_and_sequence():
    timeline = Timeline(clock=_clock())
    timeline.record(EventKind.ADMIN, "app/front-1", "ready -> maint")
    timeline.record(EventKind.FLIP, "app/front-1", "front-1-backup serves front-1")
    events = timeline.newest_first()
    assert [(e.seq, e.at, e.kind) for e in events] == [
        (2, 1001.0, EventKind.FLIP),
        (1, 1000.0, EventKind.ADMIN),
    ]
    assert events[0].as_json() == {
        "seq": 2,
        "at": 1001.0,
        "kind": "flip",
        "server": "app/front-1",
        "detail": "front-1-backup serves front-1",
    }


def test_ring_is_bounded_and_counts_survive_eviction():
    timeline = Timeline(capacity=3, clock=_clock())
    for i in range(10):
        timeline.record(EventKind.HEALTH, f"app/s{i}", "up -> down")
    assert len(timeline) == 3
    assert [e.server for e in timeline.newest_first()] == ["app/s9", "app/s8", "app/s7"]
    assert dict(timeline.counts())[EventKind.HEALTH] == 10
    assert timeline.last_seq == 10


@pytest.mark.parametrize(
    ("limit", "after_seq", "expected"),
    [(None, 0, [5, 4, 3, 2, 1]), (2, 0, [5, 4]), (None, 3, [5, 4]), (1, 3, [5]), (None, 5, [])],
    ids=["all", "limit", "after", "limit-and-after", "nothing-new"],
)
def test_limit_and_after(limit, after_seq, expected):
    timeline = Timeline(clock=_clock())
    for _ in range(5):
        timeline.record(EventKind.WEIGHT, "app/a", "100 -> 50")
    assert [e.seq for e in timeline.newest_first(limit, after_seq)] == expected


def test_long_detail_is_cut():
    timeline = Timeline()
    event = timeline.record(EventKind.HEALTH, "app/a", "x" * 1000)
    assert len(event.detail) == MAX_DETAIL_CHARS and event.detail.endswith("...")


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        Timeline(capacity=0)
