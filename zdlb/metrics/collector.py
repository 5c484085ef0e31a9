"""The Prometheus view of zdlb: a custom collector that turns a stats snapshot into metrics.

``SnapshotCollector`` asks its source for a ``Snapshot`` (zdlb/stats.py) at every scrape
and yields metric families from it; nothing is registered per series, nothing is kept between
scrapes, so the hot path never touches prometheus-client. In one process the source is
``take_snapshot`` over the live ``Stats``, servers and health checker; with several workers it
is ``stats.merge`` of their snapshots, and the output is the same.

Names follow HAProxy's exporter, prefixed ``zdlb_``; states are one-hot gauges with a ``state``
label (``zdlb_server_admin_state{backend,server,state="drain"} 1``). docs/metrics.md lists them
all. The collector is registered on a dedicated ``CollectorRegistry``, never the global one, so
tests and successive runtimes do not collide. No I/O here.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from zdlb import __version__
from zdlb.balancer.server import AdminState, Health, Server
from zdlb.census import STANDARD_ERROR, Census
from zdlb.config.model import PoolName
from zdlb.deploy.plan import Step
from zdlb.deploy.record import DeployRecord, DeployStatus, HostStatus
from zdlb.events import Timeline
from zdlb.metrics.tls import ListenerSource, TlsCollector
from zdlb.stats import (
    RESPONSE_TIME_BOUNDS_S,
    STATUS_CLASSES,
    ServerSnapshot,
    ServerState,
    Snapshot,
    Stats,
)

SnapshotSource = Callable[[], Snapshot]
# The daemon's current or last `zdlb deploy` (control/commands.py Controller.deploy_snapshot).
DeploySource = Callable[[], DeployRecord | None]

_POOLS = [pool.value for pool in PoolName]
_ADMIN_STATES = [state.value for state in AdminState]
_HEALTHS = [health.value for health in Health]
# repr() writes the bounds as prometheus-client does ("0.001", "1.0"), "+Inf" last.
_BUCKET_LABELS = [repr(bound) for bound in RESPONSE_TIME_BOUNDS_S] + ["+Inf"]
_CONTROL_RESULTS = ("ok", "error", "usage")


class CheckRecord(Protocol):
    """What a scrape reads of a server's latest probe; ``health.probes.ProbeResult`` is one."""

    @property
    def passed(self) -> bool: ...

    @property
    def duration_s(self) -> float: ...


class CheckResults(Protocol):
    """Where a scrape finds each server's latest probe; ``HealthChecker`` is one."""

    def last_result(self, server: Server) -> CheckRecord | None: ...


def server_state(server: Server, check: CheckRecord | None) -> ServerState:
    """The live gauges of ``server``, with its latest probe if it has one."""
    return {
        "pool": server.pool.value,
        "admin": server.admin.value,
        "health": server.health.value,
        "weight": server.weight,
        "inflight": server.inflight,
        "maxconn": server.maxconn if server.waitq is not None else None,
        "queue_length": server.waitq.queued(server) if server.waitq is not None else 0,
        "conns": server.conns,
        "check_passed": None if check is None else int(check.passed),
        "check_duration_s": None if check is None else check.duration_s,
    }


def take_snapshot(
    stats: Stats, servers: Iterable[Server], checks: CheckResults | None = None
) -> Snapshot:
    """Snapshot ``stats`` with the live state of ``servers`` (every backend's, in order)."""
    servers = list(servers)
    states = {
        (server.backend, server.name): server_state(
            server, checks.last_result(server) if checks is not None else None
        )
        for server in servers
    }
    snap = stats.snapshot(states)
    shared = {s.backend: s.waitq.queued(None) for s in servers if s.waitq is not None}
    for name, length in shared.items():
        if name in snap["backends"]:
            snap["backends"][name]["queue_length"] = length
    return snap


def build_info() -> dict[str, str]:
    """The labels of ``zdlb_build_info``."""
    return {"version": __version__, "python": platform.python_version()}


class SnapshotCollector:
    """A prometheus-client collector reading one ``Snapshot`` from ``source`` per scrape.

    ``source`` runs on the scraping thread (the event loop for ``metrics.endpoint``); it must
    not block. Whatever it raises propagates out of ``collect`` (the endpoint answers 500).
    """

    def __init__(
        self,
        source: SnapshotSource,
        events: Timeline | None = None,
        census: Mapping[str, Census] | None = None,
    ) -> None:
        self._source = source
        self._build_info = build_info()
        self._events = events
        self._census = census or {}

    def collect(self) -> Iterator[Metric]:
        snap = self._source()
        yield from _listener_metrics(snap)
        yield from _backend_metrics(snap)
        yield from _server_counters(snap)
        yield from _server_gauges(snap)
        yield from _control_metrics(snap)
        yield from _status_metrics(self._events, self._census)
        info = InfoMetricFamily("zdlb_build", "zdlb's version and the Python running it.")
        info.add_metric([], self._build_info)
        yield info


class DeployCollector:
    """The ``zdlb_deploy_*`` metrics, from the deploy record at each scrape (no record: none).

    ``clock`` is wall-clock seconds: a deploy whose client stopped renewing its lease reads as
    interrupted, as in ``show deploy``.
    """

    def __init__(self, source: DeploySource, clock: Callable[[], float] = time.time) -> None:
        self._source = source
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        deploy = self._source()
        if deploy is None:
            return
        yield from deploy_metrics(deploy, self._clock())


def deploy_metrics(deploy: DeployRecord, now: float) -> Iterator[Metric]:
    """In progress (0/1), the current host's step (one-hot) and since when, the last result
    (one-hot over every deploy status) and the hosts by status."""
    backend = [deploy.backend]
    status = deploy.effective_status(now)
    running = _gauge("zdlb_deploy_in_progress", "1 while a zdlb deploy runs.", ["backend"])
    running.add_metric(backend, 1 if status is DeployStatus.RUNNING else 0)
    result = _gauge(
        "zdlb_deploy_status",
        "1 for the status of the current or last deploy.",
        ["backend", "status"],
    )
    for value in DeployStatus:
        result.add_metric([*backend, value.value], 1 if value is status else 0)
    hosts = _gauge("zdlb_deploy_hosts", "Hosts of the deploy, by status.", ["backend", "status"])
    for host_status in HostStatus:
        count = sum(1 for host in deploy.hosts if host.status is host_status)
        hosts.add_metric([*backend, host_status.value], count)
    names = ["backend", "server"]
    step = _gauge(
        "zdlb_deploy_step", "1 for the step of the deploy's current host.", [*names, "step"]
    )
    since = _gauge(
        "zdlb_deploy_step_started_timestamp_seconds", "When the current host's step began.", names
    )
    current = deploy.current()
    if current is not None and current.step is not None:
        for name in Step:
            step.add_metric([*backend, current.main, name.value], 1 if name is current.step else 0)
        if current.since is not None:
            since.add_metric([*backend, current.main], current.since)
    yield from (running, result, hosts, step, since)


def new_registry(
    source: SnapshotSource,
    events: Timeline | None = None,
    census: Mapping[str, Census] | None = None,
    deploy_source: DeploySource | None = None,
    tls_listeners: ListenerSource = tuple,
) -> CollectorRegistry:
    """A dedicated registry holding one ``SnapshotCollector`` over ``source`` (and the events
    timeline and sticky census, when given), and the deploy metrics over ``deploy_source`` (the
    daemon with a control socket has one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source, events, census))
    if deploy_source is not None:
        registry.register(DeployCollector(deploy_source))
    registry.register(TlsCollector(tls_listeners))  # certificate expiry (issue 14)
    return registry


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _listener_metrics(snap: Snapshot) -> Iterator[Metric]:
    names = ["listener"]
    conns_open = _gauge("zdlb_listener_connections_open", "Client connections open now.", names)
    conns = _counter("zdlb_listener_connections", "Client connections accepted.", names)
    responses = _counter(
        "zdlb_listener_http_responses",
        "Responses sent to clients, by status class (other: none decided).",
        [*names, "code"],
    )
    bytes_in = _counter("zdlb_listener_bytes_in", "Bytes received from clients.", names)
    bytes_out = _counter("zdlb_listener_bytes_out", "Bytes sent to clients.", names)
    limit = _gauge("zdlb_listener_connections_limit", "The listener's own maxconn.", names)
    hits = _counter(
        "zdlb_listener_connections_limit_hits", "Times it reached maxconn and paused.", names
    )
    for name, listener in snap["listeners"].items():
        if listener["maxconn"]:
            limit.add_metric([name], listener["maxconn"])
        hits.add_metric([name], listener["limit_hits"])
        conns_open.add_metric([name], listener["connections_open"])
        conns.add_metric([name], listener["connections_total"])
        for code, count in zip(STATUS_CLASSES, listener["responses"], strict=True):
            responses.add_metric([name, code], count)
        bytes_in.add_metric([name], listener["bytes_in"])
        bytes_out.add_metric([name], listener["bytes_out"])
    yield from (conns_open, conns, responses, bytes_in, bytes_out, limit, hits)
    process = snap["process"]
    process_limit = _gauge(
        "zdlb_connections_limit", "Client connections the process may hold (maxconn).", []
    )
    process_limit.add_metric([], process["maxconn"])
    process_hits = _counter(
        "zdlb_connections_limit_hits", "Times the process maxconn was reached.", []
    )
    process_hits.add_metric([], process["limit_hits"])
    yield from (process_limit, process_hits)


def _backend_metrics(snap: Snapshot) -> Iterator[Metric]:
    names = ["backend"]
    connect_errors = _counter(
        "zdlb_backend_connect_errors", "Failed connects to the backend's servers.", names
    )
    retries = _counter(
        "zdlb_backend_retries", "Requests sent again to the same server (dead pooled conn).", names
    )
    redispatches = _counter(
        "zdlb_backend_redispatches", "Requests moved to another server after a failure.", names
    )
    repins = _counter("zdlb_backend_sticky_repins", "Sticky clients pinned to a new server.", names)
    queued = _counter(
        "zdlb_backend_queued_requests", "Requests that waited for a server at its maxconn.", names
    )
    queue_timeouts = _counter(
        "zdlb_backend_queue_timeouts", "Queued requests answered 503 at queue_s.", names
    )
    queue_wait = _counter(
        "zdlb_backend_queue_wait_seconds", "Seconds queued requests waited, summed.", names
    )
    queue_length = _gauge(
        "zdlb_backend_queue_length", "Requests waiting in the backend's shared queue.", names
    )
    response_time = HistogramMetricFamily(
        "zdlb_backend_response_time_seconds",
        "Time from request head to response end.",
        labels=names,
    )
    for name, backend in snap["backends"].items():
        servers = snap["servers"].get(name, {}).values()
        connect_errors.add_metric([name], sum(s["connect_errors"] for s in servers))
        retries.add_metric([name], backend["retries"])
        redispatches.add_metric([name], backend["redispatches"])
        repins.add_metric([name], backend["sticky_repins"])
        queued.add_metric([name], backend["queued"])
        queue_timeouts.add_metric([name], backend["queue_timeouts"])
        queue_wait.add_metric([name], backend["queue_wait_s"])
        queue_length.add_metric([name], backend["queue_length"])
        cumulative, buckets = 0, []
        for label, count in zip(_BUCKET_LABELS, backend["response_time_buckets"], strict=True):
            cumulative += count
            buckets.append((label, float(cumulative)))
        response_time.add_metric([name], buckets, backend["response_time_sum_s"])
    yield from (connect_errors, retries, redispatches, repins, response_time)
    yield from (queued, queue_timeouts, queue_wait, queue_length)


def _servers(snap: Snapshot) -> Iterator[tuple[list[str], ServerSnapshot]]:
    for backend, servers in snap["servers"].items():
        for name, server in servers.items():
            yield [backend, name], server


def _server_counters(snap: Snapshot) -> Iterator[Metric]:
    names = ["backend", "server"]
    requests = _counter("zdlb_server_requests", "Requests assigned to the server.", names)
    responses = _counter(
        "zdlb_server_http_responses",
        "Responses from the server, by status class.",
        [*names, "code"],
    )
    errors = _counter("zdlb_server_connect_errors", "Failed connects to the server.", names)
    strays = _counter(
        "zdlb_server_stray_responses",
        "Idle pooled connections closed because the server sent unrequested bytes.",
        names,
    )
    bytes_in = _counter("zdlb_server_bytes_in", "Request bytes sent to the server.", names)
    bytes_out = _counter("zdlb_server_bytes_out", "Response bytes from the server.", names)
    for labels, server in _servers(snap):
        requests.add_metric(labels, server["requests"])
        for code, count in zip(STATUS_CLASSES, server["responses"], strict=True):
            responses.add_metric([*labels, code], count)
        errors.add_metric(labels, server["connect_errors"])
        strays.add_metric(labels, server["stray_responses"])
        bytes_in.add_metric(labels, server["bytes_in"])
        bytes_out.add_metric(labels, server["bytes_out"])
    yield from (requests, responses, errors, strays, bytes_in, bytes_out)


def _server_gauges(snap: Snapshot) -> Iterator[Metric]:
    names = ["backend", "server"]
    one_hot = [*names, "state"]
    pool = _gauge("zdlb_server_pool", "1 for the pool the server is in.", one_hot)
    admin = _gauge("zdlb_server_admin_state", "1 for the server's admin state.", one_hot)
    health = _gauge("zdlb_server_health_state", "1 for the server's health verdict.", one_hot)
    weight = _gauge("zdlb_server_weight", "Runtime weight (0..256).", names)
    inflight = _gauge("zdlb_server_inflight_requests", "Requests being proxied to it.", names)
    maxconn = _gauge("zdlb_server_maxconn", "Most requests in flight at once (if limited).", names)
    queue_length = _gauge(
        "zdlb_server_queue_length", "Sticky requests waiting for a slot on it.", names
    )
    conns = _gauge("zdlb_server_connections_open", "Open upstream connections (idle too).", names)
    passed = _gauge("zdlb_server_check_passed", "1 if the latest probe passed, else 0.", names)
    duration = _gauge(
        "zdlb_server_check_duration_seconds", "How long the latest probe took.", names
    )
    for labels, server in _servers(snap):
        state = server["state"]
        if state is None:
            continue
        for family, values, current in (
            (pool, _POOLS, state["pool"]),
            (admin, _ADMIN_STATES, state["admin"]),
            (health, _HEALTHS, state["health"]),
        ):
            for value in values:
                family.add_metric([*labels, value], 1 if value == current else 0)
        weight.add_metric(labels, state["weight"])
        inflight.add_metric(labels, state["inflight"])
        queue_length.add_metric(labels, state["queue_length"])
        if state["maxconn"] is not None:
            maxconn.add_metric(labels, state["maxconn"])
        conns.add_metric(labels, state["conns"])
        if state["check_passed"] is not None:
            passed.add_metric(labels, state["check_passed"])
        if state["check_duration_s"] is not None:
            duration.add_metric(labels, state["check_duration_s"])
    yield from (pool, admin, health, weight, inflight, maxconn, queue_length, conns, passed)
    yield duration


def _control_metrics(snap: Snapshot) -> Iterator[Metric]:
    commands = _counter("zdlb_control_commands", "Control socket commands, by result.", ["result"])
    control = snap["control"]
    for result, count in zip(
        _CONTROL_RESULTS, (control["ok"], control["error"], control["usage"]), strict=True
    ):
        commands.add_metric([result], count)
    yield commands


def _status_metrics(events: Timeline | None, census: Mapping[str, Census]) -> Iterator[Metric]:
    """Events by kind (a fixed set) and users per host (the configured hosts): both label
    sets are bounded by the code and the config, never by traffic."""
    if events is not None:
        counts = _counter("zdlb_events", "Timeline events recorded, by kind.", ["kind"])
        for kind, count in events.counts():
            counts.add_metric([kind.value], count)
        yield counts
    if census:
        users = _gauge(
            "zdlb_sticky_users",
            "Distinct sticky users seen per host over the census window (HyperLogLog, "
            f"{STANDARD_ERROR:.1%} standard error).",
            ["backend", "host"],
        )
        for backend, backend_census in census.items():
            for host, count in backend_census.counts().items():
                users.add_metric([backend, host], count)
        yield users
