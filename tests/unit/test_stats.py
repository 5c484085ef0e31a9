"""Counter sets: status classes, histogram buckets at their bounds, snapshots, merge, reload."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zdlb.config.load import parse_config
from zdlb.config.model import Config
from zdlb.stats import (
    RESPONSE_TIME_BOUNDS_S,
    SNAPSHOT_VERSION,
    STATUS_CLASSES,
    STATUS_SLOTS,
    BackendStats,
    ListenerStats,
    ServerState,
    Snapshot,
    Stats,
    fold_statuses,
    merge,
    status_class,
)


def make_config(servers: dict[str, list[str]], listeners: dict[str, str] | None = None) -> Config:
    """Backends ``{name: [server names]}``; listeners ``{name: backend}`` (default: one each)."""
    backends = {
        backend: {
            "servers": [
                {"name": name, "address": f"127.0.0.1:{9000 + i}"} for i, name in enumerate(names)
            ]
        }
        for backend, names in servers.items()
    }
    listeners = listeners if listeners is not None else {f"l-{b}": b for b in servers}
    listener_tables = {name: {"bind": "127.0.0.1:0", "backend": b} for name, b in listeners.items()}
    data = {"listeners": listener_tables, "backends": backends}
    return parse_config(data, "test_stats", Path("."))


def state(**changes: Any) -> ServerState:
    base: ServerState = {
        "pool": "main",
        "admin": "ready",
        "health": "up",
        "weight": 100,
        "inflight": 0,
        "maxconn": None,
        "queue_length": 0,
        "conns": 0,
        "check_passed": None,
        "check_duration_s": None,
    }
    return {**base, **changes}  # type: ignore[typeddict-item]  # keys are ServerState's


# --- status classes -------------------------------------------------------------------------

STATUSES = [
    (100, "1xx"),
    (101, "1xx"),
    (199, "1xx"),
    (200, "2xx"),
    (204, "2xx"),
    (299, "2xx"),
    (304, "3xx"),
    (400, "4xx"),
    (499, "4xx"),
    (500, "5xx"),
    (503, "5xx"),
    (599, "5xx"),
    (0, "other"),  # the client left before any answer was decided
    (99, "other"),
    (600, "other"),
    (999, "other"),
]


@pytest.mark.parametrize(("status", "label"), STATUSES, ids=[str(s) for s, _ in STATUSES])
def test_hot_path_bump_folds_into_status_class(status: int, label: str) -> None:
    listener = ListenerStats()
    listener.responses[status // 100] += 1  # exactly what the proxy does
    assert status_class(status) == label
    counts = listener.snapshot()["responses"]
    assert counts == [1 if c == label else 0 for c in STATUS_CLASSES]


def test_fold_statuses_sums_every_slot() -> None:
    slots = list(range(1, STATUS_SLOTS + 1))  # 1..10
    assert fold_statuses(slots) == [2, 3, 4, 5, 6, 1 + 7 + 8 + 9 + 10]
    assert sum(fold_statuses(slots)) == sum(slots)


# --- response-time histogram ----------------------------------------------------------------

INF = len(RESPONSE_TIME_BOUNDS_S)
BUCKET_CASES = [
    pytest.param(0.0, 0, id="zero"),
    pytest.param(0.0005, 0, id="under-first"),
    pytest.param(0.001, 0, id="first-bound-is-le"),
    pytest.param(0.0010001, 1, id="just-over-first"),
    pytest.param(0.0025, 1, id="second-bound"),
    pytest.param(0.3, 8, id="mid"),
    pytest.param(1.0, 9, id="one-second"),
    pytest.param(10.0, INF - 1, id="last-bound"),
    pytest.param(10.000001, INF, id="just-over-last"),
    pytest.param(3600.0, INF, id="an-hour"),
]


@pytest.mark.parametrize(("seconds", "bucket"), BUCKET_CASES)
def test_response_time_lands_in_its_bucket(seconds: float, bucket: int) -> None:
    backend = BackendStats()
    backend.observe_response_s(seconds)
    buckets = backend.snapshot()["response_time_buckets"]
    assert len(buckets) == len(RESPONSE_TIME_BOUNDS_S) + 1
    assert buckets == [1 if i == bucket else 0 for i in range(len(buckets))]
    if bucket < INF:
        assert seconds <= RESPONSE_TIME_BOUNDS_S[bucket]
    if bucket > 0:
        assert seconds > RESPONSE_TIME_BOUNDS_S[bucket - 1]


def test_response_time_sum_and_count() -> None:
    backend = BackendStats()
    for seconds in (0.002, 0.02, 0.2, 20.0):
        backend.observe_response_s(seconds)
    snap = backend.snapshot()
    assert sum(snap["response_time_buckets"]) == 4  # the count is derived, not stored
    assert snap["response_time_sum_s"] == pytest.approx(20.222)


def test_bounds_are_sorted_and_span_1ms_to_10s() -> None:
    assert list(RESPONSE_TIME_BOUNDS_S) == sorted(set(RESPONSE_TIME_BOUNDS_S))
    assert (RESPONSE_TIME_BOUNDS_S[0], RESPONSE_TIME_BOUNDS_S[-1]) == (0.001, 10.0)


# --- Stats from a config, and across a reload -----------------------------------------------


def test_from_config_has_a_set_per_name() -> None:
    stats = Stats.from_config(make_config({"app": ["s1", "s2"], "api": ["a1"]}))
    assert sorted(stats.listeners) == ["l-api", "l-app"]
    assert sorted(stats.backends) == ["api", "app"]
    assert sorted(stats.servers) == [("api", "a1"), ("app", "s1"), ("app", "s2")]
    assert stats.server("app", "s2") is stats.servers[("app", "s2")]
    with pytest.raises(KeyError):
        stats.server("app", "nope")
    assert repr(stats) == "<Stats listeners=2 backends=2 servers=3>"


def test_reload_keeps_counts_of_names_that_remain() -> None:
    old = Stats.from_config(make_config({"app": ["s1", "s2"], "gone": ["g1"]}))
    old.listeners["l-app"].connections_open = 3
    old.server("app", "s1").requests = 7
    old.control.ok = 2
    new = Stats.from_config(make_config({"app": ["s1", "s3"]}), previous=old)
    assert new.listeners["l-app"] is old.listeners["l-app"]
    assert new.backends["app"] is old.backends["app"]
    assert new.server("app", "s1").requests == 7
    assert new.server("app", "s3").requests == 0
    assert ("app", "s2") not in new.servers
    assert "gone" not in new.backends and "l-gone" not in new.listeners
    assert new.control is old.control


# --- snapshots ------------------------------------------------------------------------------


def busy_stats(scale: int = 1) -> Stats:
    stats = Stats.from_config(make_config({"app": ["s1", "s2"]}))
    listener = stats.listeners["l-app"]
    listener.connections_open += 2 * scale
    listener.connections_total += 5 * scale
    listener.responses[2] += 10 * scale
    listener.responses[5] += scale
    listener.bytes_in += 1000 * scale
    listener.bytes_out += 9000 * scale
    backend = stats.backends["app"]
    backend.retries += scale
    backend.redispatches += 2 * scale
    backend.sticky_repins += 3 * scale
    for _ in range(scale):
        backend.observe_response_s(0.5)
    server = stats.server("app", "s1")
    server.requests += 11 * scale
    server.responses[2] += 10 * scale
    server.connect_errors += scale
    server.bytes_in += 700 * scale
    server.bytes_out += 8000 * scale
    stats.control.ok += scale
    stats.control.usage += 2 * scale
    return stats


def test_snapshot_is_a_copy() -> None:
    stats = busy_stats()
    snap = stats.snapshot()
    before = copy.deepcopy(snap)
    stats.listeners["l-app"].responses[2] += 1
    stats.backends["app"].observe_response_s(0.01)
    stats.server("app", "s1").responses[4] += 1
    assert snap == before


def test_snapshot_round_trips_through_json_and_pickle() -> None:
    snap = busy_stats().snapshot({("app", "s1"): state(check_passed=1, check_duration_s=0.01)})
    assert json.loads(json.dumps(snap)) == snap
    assert pickle.loads(pickle.dumps(snap)) == snap


def test_snapshot_contents() -> None:
    snap = busy_stats().snapshot({("app", "s1"): state(admin="drain")})
    assert snap["version"] == SNAPSHOT_VERSION
    assert snap["listeners"]["l-app"]["responses"] == [0, 10, 0, 0, 1, 0]
    assert snap["servers"]["app"]["s1"]["state"] == state(admin="drain")
    assert snap["servers"]["app"]["s2"]["state"] is None  # no live state given for it
    assert snap["control"] == {"ok": 1, "error": 0, "usage": 2}


# --- merge ----------------------------------------------------------------------------------


def test_merge_of_nothing_is_empty() -> None:
    assert merge([]) == Stats().snapshot()


def test_merge_of_one_is_itself_and_does_not_alias_it() -> None:
    snap = busy_stats().snapshot({("app", "s1"): state()})
    merged = merge([snap])
    assert merged == snap
    merged["listeners"]["l-app"]["responses"][1] += 1
    assert snap["listeners"]["l-app"]["responses"][1] == 10


def test_merge_sums_counters() -> None:
    a, b = busy_stats(1).snapshot(), busy_stats(2).snapshot()
    inputs = copy.deepcopy([a, b])
    merged = merge([a, b])
    assert merged == busy_stats(3).snapshot()
    assert [a, b] == inputs  # inputs untouched


def test_merge_counts_names_only_some_workers_have() -> None:
    a = busy_stats().snapshot()
    b = Stats.from_config(make_config({"new": ["n1"]})).snapshot()
    merged = merge([a, b])
    assert sorted(merged["listeners"]) == ["l-app", "l-new"]
    assert sorted(merged["servers"]) == ["app", "new"]
    assert merged["servers"]["app"] == a["servers"]["app"]


def test_merge_refuses_another_version() -> None:
    snap = busy_stats().snapshot()
    snap["version"] = SNAPSHOT_VERSION + 1
    with pytest.raises(ValueError, match="version"):
        merge([snap])


def test_merge_refuses_other_bucket_bounds() -> None:
    a, b = busy_stats().snapshot(), busy_stats().snapshot()
    b["backends"]["app"]["response_time_buckets"].append(0)
    with pytest.raises(ValueError, match="buckets"):
        merge([a, b])


STATE_MERGES = [
    pytest.param(state(admin="drain"), state(admin="maint"), {"admin": "maint"}, id="maint-wins"),
    pytest.param(state(admin="drain"), state(), {"admin": "drain"}, id="drain-over-ready"),
    pytest.param(state(health="down"), state(), {"health": "down"}, id="down-wins"),
    pytest.param(state(weight=0), state(weight=50), {"weight": 0}, id="lowest-weight"),
    pytest.param(
        state(inflight=2, conns=3),
        state(inflight=1, conns=4),
        {"inflight": 3, "conns": 7},
        id="load-adds",
    ),
    pytest.param(state(pool="backup"), state(), {"pool": "backup"}, id="first-pool"),
    pytest.param(
        state(check_passed=1), state(check_passed=0), {"check_passed": 0}, id="failed-check-wins"
    ),
    pytest.param(state(check_passed=1), state(), {"check_passed": 1}, id="unchecked-ignored"),
    pytest.param(
        state(check_duration_s=0.2),
        state(check_duration_s=0.1),
        {"check_duration_s": 0.2},
        id="longest-check",
    ),
]


@pytest.mark.parametrize(("first", "second", "expected"), STATE_MERGES)
def test_merge_server_states(
    first: ServerState, second: ServerState, expected: dict[str, Any]
) -> None:
    snaps = [busy_stats().snapshot({("app", "s1"): s}) for s in (first, second)]
    merged_state = merge(snaps)["servers"]["app"]["s1"]["state"]
    assert merged_state is not None
    assert {key: merged_state[key] for key in expected} == expected  # type: ignore[literal-required]


def test_merge_state_with_a_stateless_snapshot() -> None:
    with_state = busy_stats().snapshot({("app", "s1"): state(admin="drain")})
    without = busy_stats().snapshot()
    for order in ([with_state, without], [without, with_state]):
        assert merge(order)["servers"]["app"]["s1"]["state"] == state(admin="drain")


# One worker's traffic: (status, response seconds, bytes out) per request.
REQUESTS = st.lists(
    st.tuples(
        st.sampled_from([0, 101, 200, 204, 301, 404, 499, 500, 503]),
        st.sampled_from([0.0, 0.001, 0.004, 0.25, 1.0, 10.0, 11.0]),
        st.integers(min_value=0, max_value=1 << 20),
    ),
    max_size=30,
)


def count(stats: Stats, requests: list[tuple[int, float, int]]) -> None:
    listener, backend = stats.listeners["l-app"], stats.backends["app"]
    server = stats.server("app", "s1")
    for status, seconds, size in requests:
        listener.responses[status // 100] += 1
        listener.bytes_out += size
        server.responses[status // 100] += 1
        backend.observe_response_s(seconds)


@given(st.lists(REQUESTS, min_size=1, max_size=4))
def test_merged_workers_equal_one_process_counting_everything(
    workers: list[list[tuple[int, float, int]]],
) -> None:
    config = make_config({"app": ["s1"]})
    whole = Stats.from_config(config)
    snapshots: list[Snapshot] = []
    for requests in workers:
        worker = Stats.from_config(config)
        count(worker, requests)
        count(whole, requests)
        snapshots.append(worker.snapshot())
    merged, expected = merge(snapshots), whole.snapshot()
    merged_app, expected_app = merged["backends"]["app"], expected["backends"]["app"]
    # The same float additions in another order: equal up to rounding.
    assert merged_app["response_time_sum_s"] == pytest.approx(expected_app["response_time_sum_s"])
    merged_app["response_time_sum_s"] = expected_app["response_time_sum_s"] = 0.0
    assert merged == expected
