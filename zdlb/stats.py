"""zdlb's own counters: plain integers the hot path bumps, and their snapshots.

The proxy holds a reference to the one ``ListenerStats``, ``BackendStats`` and ``ServerStats``
it works for and adds to their attributes directly (``stats.bytes_out += n``): no method call,
no lock, no label lookup, nothing allocated. prometheus-client only ever sees these numbers at
scrape time, through ``metrics/collector.py``.

Every set exports a ``snapshot()`` of plain ints, floats, short strings and lists (picklable
and JSON-able, copied so later bumps do not change it), and ``merge`` sums snapshots: several
worker processes each count, one process merges and serves the scrape.

Costs per bump, measured with ``timeit`` on the 2-core benchmark box (CPython 3.11, best of 5
runs of 2 million, the 7 ns of an empty loop subtracted):

- an attribute (``stats.connections_total += 1``, ``stats.bytes_in += n``): 15-17 ns;
- a status class (``stats.responses[status // 100] += 1``): 31 ns, against 59 ns (2xx) to
  83 ns (5xx) for an if/elif chain choosing among six attributes, hence the list;
- a response time (``backend_stats.observe_response_s(seconds)``): 105-145 ns, most of it the
  call and a bisect over the 13 bounds; the count is not stored (it is the sum of the buckets).

The eight bumps of one keep-alive request (listener status and bytes, server request, status
and bytes, backend response time) measured together: 0.31 us, against ~17 us of CPU per request
(PERFORMANCE.md): under 2%. Timing the response needs two ``time.monotonic()`` reads in the
proxy (43 ns each; uvloop's ``loop.time()`` ticks in whole milliseconds, too coarse for the
1 ms bucket). No I/O, no clock, no prometheus-client import here.
"""

from __future__ import annotations

import copy
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import TypedDict, TypeVar

from zdlb.balancer.server import AdminState, Health
from zdlb.config.model import Config

_N = TypeVar("_N", int, float)

# Bumped when a snapshot's layout changes; ``merge`` refuses to mix versions.
SNAPSHOT_VERSION = 2  # 2: queues, connection limits

# Exported status classes, in the order of every folded ``responses`` list. "other" holds what
# is not 1xx-5xx: status 0 (the client left before any answer was decided).
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
# Hot-path lists are indexed by ``status // 100`` with no branch and no clamp: an HTTP status
# has three digits (RFC 9110 section 15; httptools and h11 refuse others), so 0..9 is every
# index; 0 and 6..9 fold into "other".
STATUS_SLOTS = 10

# Response-time histogram bounds in seconds ("le"). Prometheus's default buckets (5 ms .. 10 s)
# plus 1 ms and 2.5 ms, because a LAN backend answers in about a millisecond and the default
# would put every healthy response in its first bucket. Fixed, so worker histograms add up.
RESPONSE_TIME_BOUNDS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Merging server states: the most restrictive value wins (these orders), so a server that any
# worker has stopped sending to shows as stopped.
_ADMIN_SEVERITY = [state.value for state in AdminState]  # ready < drain < maint
_HEALTH_SEVERITY = [health.value for health in Health]  # up < down


def fold_statuses(slots: list[int]) -> list[int]:
    """Fold ``STATUS_SLOTS`` hot-path counts into ``STATUS_CLASSES`` order (1xx..5xx, other)."""
    return [slots[1], slots[2], slots[3], slots[4], slots[5], slots[0] + sum(slots[6:])]


def status_class(status: int) -> str:
    """The ``STATUS_CLASSES`` label a status is counted under: 404 -> "4xx", 0 -> "other"."""
    index = status // 100
    return STATUS_CLASSES[index - 1] if 1 <= index <= 5 else "other"


class ListenerSnapshot(TypedDict):
    connections_open: int
    connections_total: int
    responses: list[int]  # STATUS_CLASSES order
    bytes_in: int
    bytes_out: int
    maxconn: int  # the listener's own limit (summed over workers); 0: none
    limit_hits: int  # times it reached that limit and stopped accepting


class ProcessSnapshot(TypedDict):
    maxconn: int  # client connections the process may hold (summed over workers)
    limit_hits: int  # times the process limit was reached and every listener paused


class BackendSnapshot(TypedDict):
    retries: int
    redispatches: int
    sticky_repins: int
    queued: int  # requests that found their server at its maxconn
    queue_timeouts: int  # of those, answered 503 at queue_s
    queue_wait_s: float  # seconds the granted ones waited, summed
    queue_length: int  # waiting now in the backend's shared queue (a gauge, set at snapshot)
    response_time_buckets: list[int]  # per bucket, not cumulative; the last one is +Inf
    response_time_sum_s: float


class ServerState(TypedDict):
    """Gauges read from the live ``Server`` and its health checks at snapshot time."""

    pool: str  # PoolName value
    admin: str  # AdminState value
    health: str  # Health value
    weight: int
    inflight: int
    maxconn: int | None  # this process's share of the server's maxconn; None: no limit
    queue_length: int  # sticky requests waiting for a slot on this server now
    conns: int
    check_passed: int | None  # 1 or 0 for the latest probe; None: not checked or not yet
    check_duration_s: float | None


class ServerSnapshot(TypedDict):
    requests: int
    responses: list[int]  # STATUS_CLASSES order
    connect_errors: int
    stray_responses: int
    bytes_in: int
    bytes_out: int
    state: ServerState | None  # None: the snapshot was taken without the live servers


class ControlSnapshot(TypedDict):
    ok: int
    error: int
    usage: int


class Snapshot(TypedDict):
    version: int
    listeners: dict[str, ListenerSnapshot]
    backends: dict[str, BackendSnapshot]
    servers: dict[str, dict[str, ServerSnapshot]]  # backend -> server -> counts
    control: ControlSnapshot
    process: ProcessSnapshot


class ListenerStats:
    """One listener's counters. Bytes are counted on the client side: ``bytes_in`` received
    from clients, ``bytes_out`` sent to them (HAProxy's frontend convention)."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "connections_open",
        "connections_total",
        "limit_hits",
        "maxconn",
        "responses",
    )

    def __init__(self) -> None:
        self.connections_open = 0  # +1 in connection_made, -1 in connection_lost
        self.connections_total = 0  # +1 in connection_made
        self.responses = [0] * STATUS_SLOTS  # responses[status // 100] += 1, once per answer
        self.bytes_in = 0
        self.bytes_out = 0
        self.maxconn = 0  # the listener's own limit (budget.py); 0: none
        self.limit_hits = 0

    def snapshot(self) -> ListenerSnapshot:
        return {
            "connections_open": self.connections_open,
            "connections_total": self.connections_total,
            "responses": fold_statuses(self.responses),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "maxconn": self.maxconn,
            "limit_hits": self.limit_hits,
        }


class ProcessStats:
    """The connection budget's figures (budget.py): its limit and how often it was reached."""

    __slots__ = ("limit_hits", "maxconn")

    def __init__(self) -> None:
        self.maxconn = 0
        self.limit_hits = 0

    def snapshot(self) -> ProcessSnapshot:
        return {"maxconn": self.maxconn, "limit_hits": self.limit_hits}


class BackendStats:
    """One backend's counters: retries (a request sent again to the same server, e.g. after a
    pooled connection turned out dead), redispatches (sent to another server after a connect
    failure), sticky re-pins (a cookie's server could not take the request, another was pinned)
    and the response-time histogram (request head in to response end, seconds)."""

    __slots__ = (
        "queue_timeouts",
        "queue_wait_s",
        "queued",
        "redispatches",
        "response_time_buckets",
        "response_time_sum_s",
        "retries",
        "sticky_repins",
    )

    def __init__(self) -> None:
        self.retries = 0
        self.redispatches = 0
        self.sticky_repins = 0
        # Requests that found their server at its maxconn and queued; of those, how many gave
        # up at queue_s (503); and the seconds the granted ones waited, summed.
        self.queued = 0
        self.queue_timeouts = 0
        self.queue_wait_s = 0.0
        self.response_time_buckets = [0] * (len(RESPONSE_TIME_BOUNDS_S) + 1)
        self.response_time_sum_s = 0.0

    def observe_response_s(self, seconds: float) -> None:
        """Count one response that took ``seconds``. A value equal to a bound falls in that
        bound's bucket (Prometheus's ``le``); over the last bound, in +Inf."""
        self.response_time_buckets[bisect_left(RESPONSE_TIME_BOUNDS_S, seconds)] += 1
        self.response_time_sum_s += seconds

    def snapshot(self) -> BackendSnapshot:
        return {
            "retries": self.retries,
            "redispatches": self.redispatches,
            "sticky_repins": self.sticky_repins,
            "queued": self.queued,
            "queue_timeouts": self.queue_timeouts,
            "queue_wait_s": self.queue_wait_s,
            "queue_length": 0,
            "response_time_buckets": list(self.response_time_buckets),
            "response_time_sum_s": self.response_time_sum_s,
        }


class ServerStats:
    """One server's counters. ``requests`` counts every request assigned to it (retries and
    redispatches included); ``bytes_in`` is request bytes sent to it, ``bytes_out`` response
    bytes received from it (HAProxy's server convention). In-flight requests and open
    connections are not here: ``Server.inflight``/``Server.conns`` already count them.
    ``stray_responses`` counts idle pooled connections that received bytes nobody asked for
    (closed at once: exchange.py, rule 3)."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "connect_errors",
        "requests",
        "responses",
        "stray_responses",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.responses = [0] * STATUS_SLOTS  # responses[status // 100] += 1
        self.connect_errors = 0
        self.stray_responses = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def snapshot(self, state: ServerState | None = None) -> ServerSnapshot:
        return {
            "requests": self.requests,
            "responses": fold_statuses(self.responses),
            "connect_errors": self.connect_errors,
            "stray_responses": self.stray_responses,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "state": None if state is None else ServerState(**state),
        }


class ControlStats:
    """Control commands by result: ``ok``, ``error`` (well-formed, could not be carried out),
    ``usage`` (unknown or malformed)."""

    __slots__ = ("error", "ok", "usage")

    def __init__(self) -> None:
        self.ok = 0
        self.error = 0
        self.usage = 0

    def snapshot(self) -> ControlSnapshot:
        return {"ok": self.ok, "error": self.error, "usage": self.usage}


class Stats:
    """Every counter set of one process, by name: what the proxy bumps and a scrape reads."""

    __slots__ = ("backends", "control", "listeners", "process", "servers")

    def __init__(self) -> None:
        self.listeners: dict[str, ListenerStats] = {}
        self.backends: dict[str, BackendStats] = {}
        self.servers: dict[tuple[str, str], ServerStats] = {}  # (backend, server)
        self.control = ControlStats()
        self.process = ProcessStats()

    def __repr__(self) -> str:
        return (
            f"<Stats listeners={len(self.listeners)} backends={len(self.backends)}"
            f" servers={len(self.servers)}>"
        )

    @classmethod
    def from_config(cls, config: Config, previous: Stats | None = None) -> Stats:
        """A set for every listener, backend and server of ``config``.

        On reload pass the running ``previous``: names that remain keep their objects (and
        counts), so counters do not reset and connections still open keep counting into the
        set a scrape reads. Names that are gone are dropped with their series.
        """
        stats = cls()
        old = previous if previous is not None else cls()
        stats.control = old.control
        stats.process = old.process
        for listener in config.listeners:
            stats.listeners[listener.name] = old.listeners.get(listener.name) or ListenerStats()
        for backend in config.backends:
            stats.backends[backend.name] = old.backends.get(backend.name) or BackendStats()
            for server in backend.servers:
                key = (backend.name, server.name)
                stats.servers[key] = old.servers.get(key) or ServerStats()
        return stats

    def server(self, backend: str, name: str) -> ServerStats:
        """The set of server ``backend/name``; KeyError if the config has no such server."""
        return self.servers[(backend, name)]

    def snapshot(self, states: Mapping[tuple[str, str], ServerState] | None = None) -> Snapshot:
        """Copy every count; ``states`` adds each server's live gauges, keyed (backend, name)."""
        states = states or {}
        servers: dict[str, dict[str, ServerSnapshot]] = {b: {} for b in self.backends}
        for (backend, name), server in self.servers.items():
            servers.setdefault(backend, {})[name] = server.snapshot(states.get((backend, name)))
        return {
            "version": SNAPSHOT_VERSION,
            "listeners": {name: s.snapshot() for name, s in self.listeners.items()},
            "backends": {name: s.snapshot() for name, s in self.backends.items()},
            "servers": servers,
            "control": self.control.snapshot(),
            "process": self.process.snapshot(),
        }


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Sum snapshots (one per worker) into one. Raises ValueError on a version mismatch.

    Counters, histograms, ``inflight`` and ``conns`` add up. A name present in only some
    snapshots (a worker mid-reload) counts what those have. Server states take the most
    restrictive value: admin maint > drain > ready, health down > up, the lowest weight, a
    failed check over a passed one and the longest check; the pool is the first snapshot's.
    """
    merged = Stats().snapshot()
    listeners, backends, servers = merged["listeners"], merged["backends"], merged["servers"]
    for snap in snapshots:
        if snap["version"] != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {snap['version']}, expected {SNAPSHOT_VERSION}")
        for name, listener in snap["listeners"].items():
            old_l = listeners.get(name)
            listeners[name] = (
                copy.deepcopy(listener) if old_l is None else _add_listener(old_l, listener)
            )
        for name, backend in snap["backends"].items():
            old_b = backends.get(name)
            backends[name] = (
                copy.deepcopy(backend) if old_b is None else _add_backend(old_b, backend)
            )
        for backend_name, by_name in snap["servers"].items():
            into = servers.setdefault(backend_name, {})
            for name, server in by_name.items():
                old_s = into.get(name)
                into[name] = copy.deepcopy(server) if old_s is None else _add_server(old_s, server)
        control = snap["control"]
        merged["control"] = {
            "ok": merged["control"]["ok"] + control["ok"],
            "error": merged["control"]["error"] + control["error"],
            "usage": merged["control"]["usage"] + control["usage"],
        }
        process = snap["process"]
        merged["process"] = {
            "maxconn": merged["process"]["maxconn"] + process["maxconn"],
            "limit_hits": merged["process"]["limit_hits"] + process["limit_hits"],
        }
    return merged


def _add_lists(a: list[int], b: list[int]) -> list[int]:
    if len(a) != len(b):  # zip(strict=True) would say less
        raise ValueError(f"cannot add counts of {len(a)} and {len(b)} buckets")
    return [x + y for x, y in zip(a, b, strict=True)]


def _add_listener(a: ListenerSnapshot, b: ListenerSnapshot) -> ListenerSnapshot:
    return {
        "connections_open": a["connections_open"] + b["connections_open"],
        "connections_total": a["connections_total"] + b["connections_total"],
        "responses": _add_lists(a["responses"], b["responses"]),
        "bytes_in": a["bytes_in"] + b["bytes_in"],
        "bytes_out": a["bytes_out"] + b["bytes_out"],
        "maxconn": a["maxconn"] + b["maxconn"],
        "limit_hits": a["limit_hits"] + b["limit_hits"],
    }


def _add_backend(a: BackendSnapshot, b: BackendSnapshot) -> BackendSnapshot:
    return {
        "retries": a["retries"] + b["retries"],
        "redispatches": a["redispatches"] + b["redispatches"],
        "sticky_repins": a["sticky_repins"] + b["sticky_repins"],
        "queued": a["queued"] + b["queued"],
        "queue_timeouts": a["queue_timeouts"] + b["queue_timeouts"],
        "queue_wait_s": a["queue_wait_s"] + b["queue_wait_s"],
        "queue_length": a["queue_length"] + b["queue_length"],
        "response_time_buckets": _add_lists(a["response_time_buckets"], b["response_time_buckets"]),
        "response_time_sum_s": a["response_time_sum_s"] + b["response_time_sum_s"],
    }


def _add_server(a: ServerSnapshot, b: ServerSnapshot) -> ServerSnapshot:
    state_a, state_b = a["state"], b["state"]
    if state_a is None or state_b is None:
        state = copy.deepcopy(state_a if state_b is None else state_b)
    else:
        state = _merge_states(state_a, state_b)
    return {
        "requests": a["requests"] + b["requests"],
        "responses": _add_lists(a["responses"], b["responses"]),
        "connect_errors": a["connect_errors"] + b["connect_errors"],
        "stray_responses": a["stray_responses"] + b["stray_responses"],
        "bytes_in": a["bytes_in"] + b["bytes_in"],
        "bytes_out": a["bytes_out"] + b["bytes_out"],
        "state": state,
    }


def _merge_states(a: ServerState, b: ServerState) -> ServerState:
    return {
        "pool": a["pool"],
        "admin": max(a["admin"], b["admin"], key=_ADMIN_SEVERITY.index),
        "health": max(a["health"], b["health"], key=_HEALTH_SEVERITY.index),
        "weight": min(a["weight"], b["weight"]),
        "inflight": a["inflight"] + b["inflight"],
        "maxconn": None if a["maxconn"] is None else a["maxconn"] + (b["maxconn"] or 0),
        "queue_length": a["queue_length"] + b["queue_length"],
        "conns": a["conns"] + b["conns"],
        "check_passed": _worst(a["check_passed"], b["check_passed"], min),
        "check_duration_s": _worst(a["check_duration_s"], b["check_duration_s"], max),
    }


def _worst(a: _N | None, b: _N | None, pick: Callable[[_N, _N], _N]) -> _N | None:
    """``pick`` of the two, ignoring a missing one."""
    if a is None or b is None:
        return b if a is None else a
    return pick(a, b)
