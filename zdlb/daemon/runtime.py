"""What one running configuration owns (``Runtime``), and building it from a config.

``build_runtime`` creates backends, pools and routes and binds every listener (or takes the
sockets a master or an upgraded predecessor hands over) before anything serves, so a busy port
fails the start with one clear error. Serving, reloading and stopping are lifecycle.py's,
reload.py's and upgrade.py's: nothing here runs on the event loop but the health task.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zdlb.balancer.pool import Backend
from zdlb.balancer.server import Server
from zdlb.balancer.sticky import StickyCookie
from zdlb.budget import ConnectionBudget
from zdlb.census import Census
from zdlb.config.model import Address, Config, ListenerConfig, ListenerMode
from zdlb.config.routing import backends_of
from zdlb.control import journal
from zdlb.control.fleet import FleetLink
from zdlb.daemon import ipc
from zdlb.errors import ListenerError
from zdlb.events import Timeline
from zdlb.health.scheduler import HealthChecker, TransitionHook
from zdlb.http.route import BackendLink, Route
from zdlb.http.upstream import ServerConnections
from zdlb.metrics.status import StatusBoard
from zdlb.stats import Stats
from zdlb.tcp.listener import bind_listener, bind_listener_group
from zdlb.tcp.proxy import TcpRoute, TcpSettings

if TYPE_CHECKING:
    from zdlb.daemon.acceptor import HttpAcceptor
# (listener name, client socket) pairs, and what takes them (daemon/idle_handover.py).
SendConnections = Callable[[list[tuple[str, socket.socket]]], Awaitable[None]]

# A scraper or two, not a crowd: the endpoint caps its connections anyway.
METRICS_BACKLOG = 64


class RouteSlot:
    """Where an HTTP listener's new connections find their route: one attribute read per
    accept, and what a reload changes (connections already open move at their next request
    boundary, http/route.py ``Route.retire``)."""

    __slots__ = ("route",)

    def __init__(self, route: Route) -> None:
        self.route = route


@dataclass
class Inherited:
    """What a running zdlb handed this process in an upgrade (daemon/upgrade.py): listening
    sockets by listener name with the bind they were made for, the control and metrics
    sockets, and the servers' state. ``build_runtime`` takes what matches the config and
    ``close_unused`` closes the rest."""

    listeners: dict[str, tuple[Address, list[socket.socket]]] = field(default_factory=dict)
    control: socket.socket | None = None
    control_path: str | None = None
    is_control_taken: bool = False
    metrics: tuple[Address, socket.socket] | None = None
    state: ipc.StateUpdate | None = None

    def take_listener(self, listener: ListenerConfig, count: int) -> list[socket.socket] | None:
        """The sockets handed over for ``listener`` if made for its bind, ``count`` of them.
        Raises ListenerError when the count differs (workers are fixed while sockets live)."""
        entry = self.listeners.get(listener.name)
        if entry is None or entry[0] != listener.bind:
            return None
        del self.listeners[listener.name]
        if len(entry[1]) != count:
            for sock in entry[1]:
                sock.close()
            raise ListenerError(
                0,
                f"listener {listener.name}: {len(entry[1])} sockets handed over, {count} "
                "needed: an upgrade keeps the listening sockets, so `workers` must stay the "
                "same (restart to change it)",
            )
        return entry[1]

    def take_metrics(self, address: Address) -> socket.socket | None:
        if self.metrics is None or self.metrics[0] != address:
            return None
        sock, self.metrics = self.metrics[1], None
        return sock

    def take_control(self, path: str) -> socket.socket | None:
        """The control socket handed over, if it is the one at ``path`` (else it is closed:
        the old process then removes its file)."""
        sock, self.control = self.control, None
        if sock is not None and self.control_path == path:
            self.is_control_taken = True
            return sock
        if sock is not None:
            sock.close()
        return None

    def close_unused(self) -> None:
        """Sockets of listeners the new config no longer has (the old process stops too)."""
        for _, socks in self.listeners.values():
            for sock in socks:
                sock.close()
        self.listeners.clear()
        if self.metrics is not None:
            self.metrics[1].close()
            self.metrics = None


@dataclass
class Runtime:
    """Everything one running configuration owns."""

    config: Config
    backends: dict[str, Backend]
    health: HealthChecker
    stats: Stats
    routes: list[Route] = field(default_factory=list)
    sockets: list[tuple[Route, socket.socket]] = field(default_factory=list)
    tcp_routes: list[TcpRoute] = field(default_factory=list)
    tcp_sockets: list[tuple[TcpRoute, socket.socket]] = field(default_factory=list)
    metrics_socket: socket.socket | None = None
    # A master's listening sockets, per listener in config order: one per worker (the first is
    # also in sockets/tcp_sockets). Empty in a single process or a worker.
    listener_groups: list[list[socket.socket]] = field(default_factory=list)
    on_health: TransitionHook | None = None  # the health checker's hook, again after a reload
    # HTTP listeners being served, by name: the asyncio server accepting, and the slot its new
    # connections take their route from (a reload swaps the route in the slot).
    http_servers: dict[str, HttpAcceptor] = field(default_factory=dict)
    slots: dict[str, RouteSlot] = field(default_factory=dict)
    # Routes a reload replaced or removed that still have connections (daemon/reload.py):
    # swept, counted and drained with the others until their last connection ends.
    retired: list[Route | TcpRoute] = field(default_factory=list)
    health_task: asyncio.Task[None] | None = None
    inherited: Inherited | None = None  # from an upgrade: the control socket is taken from it
    handed_over: bool = False  # an upgrade handed the sockets on: stop without unlinking
    on_ready: list[Callable[[], None]] = field(default_factory=list)  # once everything serves
    background: set[asyncio.Task[None]] = field(default_factory=set)  # kept until done
    # What changed and when (commands, health verdicts, reloads, deploy steps); recorded by the
    # process owning them, and kept across reloads.
    events: Timeline = field(default_factory=Timeline)
    # Per sticky backend: distinct users per host (census.py), fed by the HTTP connections,
    # all hashed with census_key (a worker gets its master's, so their sketches merge).
    census: dict[str, Census] = field(default_factory=dict)
    census_key: int = 0
    # The status page (metrics/status.py) when [metrics] serves one: a reload points it at the
    # new backends and checks.
    status_board: StatusBoard | None = None
    # Client connections this process may hold (budget.py), with each listener's gate.
    budget: ConnectionBudget = field(default_factory=ConnectionBudget)
    # Processes sharing the servers (workers): each keeps its share of a server's maxconn.
    share_of: int = 1
    # [cluster] (issue 16): the fleet's shared state; the controller commits changes there.
    fleet: FleetLink | None = None
    workers: int = 1  # worker processes (a master binds this many sockets per listener)
    # A master's part in an upgrade (daemon/idle_handover.py), set by workers.py: collect the old
    # workers' idle connections into a send, and deal received ones out to the new workers.
    collect_idle: Callable[[SendConnections], Awaitable[int]] | None = None
    deliver_connections: SendConnections | None = None

    @property
    def all_routes(self) -> list[Route | TcpRoute]:
        return [*self.routes, *self.tcp_routes, *self.retired]

    @property
    def servers(self) -> list[Server]:
        """Every server of the running configuration, in config order."""
        return [server for backend in self.backends.values() for server in backend.servers]

    def start_health(self) -> None:
        """Run the health checks (again, after a reload replaced the checker)."""
        if self.health_task is not None:
            self.health_task.cancel()
        self.health_task = asyncio.get_running_loop().create_task(
            self.health.run(), name="health checks"
        )

    async def stop_health(self) -> None:
        task, self.health_task = self.health_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def close_sockets(self) -> None:
        """Close every bound socket not yet served (a start that failed half-way)."""
        for _, sock in [*self.sockets, *self.tcp_sockets]:
            sock.close()
        for group in self.listener_groups:
            for sock in group:
                sock.close()
        if self.metrics_socket is not None:
            self.metrics_socket.close()


def worker_count(config: Config, override: int | None = None) -> int:
    """Workers to run: ``override`` (the command line), ``workers`` in the config, or one per
    core this process may run on (``taskset -c 1 zdlb run`` gets one)."""
    if override is not None:
        return override
    if config.workers is not None:
        return config.workers
    return max(1, len(os.sched_getaffinity(0)))


def build_runtime(
    config: Config,
    listener_sockets: Sequence[socket.socket] | None = None,
    *,
    on_health: TransitionHook | None = None,
    workers: int = 1,
    inherited: Inherited | None = None,
    census_key: int | None = None,
    share_of: int = 1,
) -> Runtime:
    """Create backends, pools and routes, and bind every listener. Raises ListenerError.

    A worker process passes the ``listener_sockets`` its master bound (one per listener, in
    config order): nothing is bound, no metrics socket, and the journal is not replayed (the
    master owns the state and sends it). ``on_health`` is the health checker's transition hook.
    A master for ``workers`` > 1 binds one socket per worker and listener (``listener_groups``).
    ``inherited``: an upgrade's sockets are used where they match, and its state replaces the
    journal's (it is newer).
    """
    backends = {b.name: Backend(b, processes=share_of) for b in config.backends}
    servers = [server for backend in backends.values() for server in backend.servers]
    state_file = config.control.state_file
    if inherited is not None and inherited.state is not None:
        ipc.apply_update(inherited.state, {ipc.server_key(s): s for s in servers})
    elif state_file is not None and listener_sockets is None:
        # Before the first request: a server left in maint must not take traffic at start.
        # Small, one-off blocking I/O at start-up, before anything is served.
        # time.monotonic() is the loop's clock (asyncio's, and uvloop's via libuv).
        journal.replay(journal.load(state_file), servers, time.monotonic())
    # A worker's checker only judges live traffic; the master's verdicts are the timeline's.
    events = Timeline()
    is_worker = listener_sockets is not None
    health = HealthChecker(servers, on_transition=on_health, events=None if is_worker else events)
    runtime = Runtime(
        config, backends, health, Stats.from_config(config), on_health=on_health, events=events
    )
    runtime.inherited, runtime.workers = inherited, workers
    runtime.share_of = share_of
    runtime.budget = ConnectionBudget.for_config(config, runtime.stats.process)
    runtime.census_key = secrets.randbits(64) if census_key is None else census_key
    runtime.census = new_census(backends, runtime.census_key)
    try:
        for index, listener in enumerate(config.listeners):
            if listener_sockets is not None:
                sock = listener_sockets[index]
            else:
                sock = _listener_socket(runtime, listener, workers, inherited)
            add_route(runtime, listener, sock)
        metrics = config.metrics.listen
        if metrics is not None and listener_sockets is None:
            taken = inherited.take_metrics(metrics) if inherited is not None else None
            runtime.metrics_socket = taken or bind_listener(metrics, METRICS_BACKLOG)
    except BaseException:
        runtime.close_sockets()
        raise
    finally:
        if inherited is not None:
            inherited.close_unused()
    return runtime


def _listener_socket(
    runtime: Runtime, listener: ListenerConfig, workers: int, inherited: Inherited | None
) -> socket.socket:
    """The socket serving ``listener`` (the first of its group with workers): handed over by
    an upgrade when made for the same bind, else bound now."""
    group = inherited.take_listener(listener, workers) if inherited is not None else None
    if workers > 1:
        if group is None:
            group = bind_listener_group(listener.bind, listener.backlog, workers)
        runtime.listener_groups.append(group)
        return group[0]
    if group is not None:
        return group[0]
    return bind_listener(listener.bind, listener.backlog)


def add_route(runtime: Runtime, listener: ListenerConfig, sock: socket.socket) -> None:
    """Give ``runtime`` the route of ``listener``, to serve on ``sock``."""
    if listener.mode is ListenerMode.TCP:
        tcp_route = new_tcp_route(runtime, listener)
        runtime.tcp_routes.append(tcp_route)
        runtime.tcp_sockets.append((tcp_route, sock))
    else:
        route = new_http_route(runtime, listener)
        runtime.routes.append(route)
        runtime.sockets.append((route, sock))


def new_census(
    backends: dict[str, Backend], key: int, running: dict[str, Census] | None = None
) -> dict[str, Census]:
    """A census per sticky backend; on a reload (``running``), a backend whose hosts did not
    change keeps its own, so its counts go on (another starts from zero)."""
    running = running or {}
    census = {}
    for name, backend in backends.items():
        if backend.config.sticky is None:
            continue
        old = running.get(name)
        same = old is not None and sorted(old.hosts) == sorted(backend.identities())
        census[name] = old if same and old is not None else Census(backend.identities(), key=key)
    return census


def new_http_route(runtime: Runtime, listener: ListenerConfig) -> Route:
    links = [
        new_backend_link(runtime, runtime.backends[name])
        for name in backends_of(listener.backend, listener.routing)
    ]
    return Route(
        listener,
        links,
        log_access=runtime.config.logging.access_log,
        observe=runtime.health.observe,
        stats=runtime.stats.listeners[listener.name],
        gate=runtime.budget.gate(
            listener.name, listener.maxconn, runtime.stats.listeners[listener.name]
        ),
    )


def new_backend_link(runtime: Runtime, backend: Backend) -> BackendLink:
    """What an HTTP route needs of ``backend``: its pools, sticky cookie, census and stats."""
    timeouts = backend.config.timeouts
    stats = runtime.stats
    upstreams = {
        s.name: ServerConnections(
            s, timeouts.connect_s, timeouts.upstream_idle_s, stats.server(backend.name, s.name)
        )
        for s in backend.servers
    }
    sticky = backend.config.sticky
    return BackendLink(
        backend,
        upstreams,
        sticky=StickyCookie(sticky, backend.name, backend.identities()) if sticky else None,
        census=runtime.census.get(backend.name),
        stats=stats.backends[backend.name],
    )


def new_tcp_route(runtime: Runtime, listener: ListenerConfig) -> TcpRoute:
    backend = runtime.backends[listener.backend]
    timeouts = backend.config.timeouts
    settings = TcpSettings(
        connect_s=timeouts.connect_s,
        tunnel_s=listener.timeouts.tunnel_s,
        retries=backend.config.retries,
        splice=listener.splice,
        pipe_bytes=listener.pipe_bytes,
    )
    return TcpRoute(
        listener,
        backend,
        settings,
        log_access=runtime.config.logging.access_log,
        observe=runtime.health.observe,
        stats=runtime.stats.listeners[listener.name],
        gate=runtime.budget.gate(
            listener.name, listener.maxconn, runtime.stats.listeners[listener.name]
        ),
    )
