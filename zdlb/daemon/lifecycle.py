"""The daemon's life: build the runtime from a config, serve, and stop gracefully.

Start: bind every listener first (a busy port fails the start before anything runs), then
serve, with the health checker probing every checked server. Stop (SIGTERM/SIGINT): close the
listeners, close idle keep-alive connections, let busy ones finish their current response
within ``grace_s``, abort what remains, exit 0 -- uvicorn's order. A sweeper task enforces every
connection's deadline (see http/route.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from zdlb.balancer.pool import Backend
from zdlb.balancer.server import Server
from zdlb.balancer.sticky import StickyCookie
from zdlb.config.model import Config, ListenerConfig, ListenerMode
from zdlb.control import journal
from zdlb.control.commands import Controller, DaemonActions, WorkerLoad
from zdlb.control.server import ControlServer
from zdlb.daemon import notify
from zdlb.errors import ZdlbError
from zdlb.health.scheduler import HealthChecker, TransitionHook
from zdlb.http.phase import Phase
from zdlb.http.proxy import ClientConnection
from zdlb.http.route import Route
from zdlb.http.upstream import ServerConnections
from zdlb.metrics.collector import SnapshotSource, new_registry, take_snapshot
from zdlb.metrics.endpoint import MetricsEndpoint
from zdlb.metrics.registry import Stats
from zdlb.tcp.listener import bind_listener, bind_listener_group, bound_address
from zdlb.tcp.proxy import TcpRoute, TcpSettings

log = logging.getLogger(__name__)

# The sweeper ticks at a tenth of the shortest timeout, so a deadline is enforced at most ~10%
# late, but not more often than every 5 ms (tests use tiny timeouts) nor less than every 1 s.
MIN_SWEEP_S = 0.005
MAX_SWEEP_S = 1.0
EXIT_OK = 0
EXIT_FAILURE = 1
# A scraper or two, not a crowd: the endpoint caps its connections anyway.
METRICS_BACKLOG = 64


# The cyclic GC's gen-0 pass runs every 700 net allocations by default: about every 50
# requests here, since each allocates a dozen short-lived objects that refcounting frees anyway.
# Per-request objects form no cycles (only connections do, and there are few), so zdlb collects
# a hundred times less often and freezes what start-up created.
GC_GEN0_THRESHOLD = 70_000


def tune_gc() -> None:
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def raise_open_file_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (each client costs 2 fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class RouteSlot:
    """Where an HTTP listener's new connections find their route: one attribute read per
    accept, and what a reload changes (connections already open move at their next request
    boundary, http/route.py ``Route.retire``)."""

    __slots__ = ("route",)

    def __init__(self, route: Route) -> None:
        self.route = route


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
    http_servers: dict[str, asyncio.Server] = field(default_factory=dict)
    slots: dict[str, RouteSlot] = field(default_factory=dict)
    # Routes a reload replaced or removed that still have connections (daemon/reload.py):
    # swept, counted and drained with the others until their last connection ends.
    retired: list[Route | TcpRoute] = field(default_factory=list)
    health_task: asyncio.Task[None] | None = None

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


def build_runtime(
    config: Config,
    listener_sockets: Sequence[socket.socket] | None = None,
    *,
    on_health: TransitionHook | None = None,
    workers: int = 1,
) -> Runtime:
    """Create backends, pools and routes, and bind every listener. Raises ListenerError.

    A worker process passes the ``listener_sockets`` its master bound (one per listener, in
    config order): nothing is bound, no metrics socket, and the journal is not replayed (the
    master owns the state and sends it). ``on_health`` is the health checker's transition hook.
    A master for ``workers`` > 1 binds one socket per worker and listener (``listener_groups``).
    """
    backends = {b.name: Backend(b) for b in config.backends}
    servers = [server for backend in backends.values() for server in backend.servers]
    state_file = config.control.state_file
    if state_file is not None and listener_sockets is None:
        # Before the first request: a server left in maint must not take traffic at start.
        # Small, one-off blocking I/O at start-up, before anything is served.
        # time.monotonic() is the loop's clock (asyncio's, and uvloop's via libuv).
        journal.replay(journal.load(state_file), servers, time.monotonic())
    health = HealthChecker(servers, on_transition=on_health)
    runtime = Runtime(config, backends, health, Stats.from_config(config), on_health=on_health)
    try:
        for index, listener in enumerate(config.listeners):
            if listener_sockets is not None:
                sock = listener_sockets[index]
            elif workers > 1:
                group = bind_listener_group(listener.bind, listener.backlog, workers)
                runtime.listener_groups.append(group)
                sock = group[0]
            else:
                sock = bind_listener(listener.bind, listener.backlog)
            if listener.mode is ListenerMode.TCP:
                tcp_route = new_tcp_route(runtime, listener)
                runtime.tcp_routes.append(tcp_route)
                runtime.tcp_sockets.append((tcp_route, sock))
            else:
                route = new_http_route(runtime, listener)
                runtime.routes.append(route)
                runtime.sockets.append((route, sock))
        if config.metrics.listen is not None and listener_sockets is None:
            runtime.metrics_socket = bind_listener(config.metrics.listen, METRICS_BACKLOG)
    except BaseException:
        runtime.close_sockets()
        raise
    return runtime


def new_http_route(runtime: Runtime, listener: ListenerConfig) -> Route:
    backend = runtime.backends[listener.backend]
    timeouts = backend.config.timeouts
    stats = runtime.stats
    upstreams = {
        s.name: ServerConnections(
            s, timeouts.connect_s, timeouts.upstream_idle_s, stats.server(backend.name, s.name)
        )
        for s in backend.servers
    }
    sticky = backend.config.sticky
    return Route(
        listener,
        backend,
        upstreams,
        log_access=runtime.config.logging.access_log,
        observe=runtime.health.observe,
        sticky=StickyCookie(sticky, backend.name, backend.identities()) if sticky else None,
        stats=stats.listeners[listener.name],
        backend_stats=stats.backends[backend.name],
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
    )


def sweep_interval_s(config: Config) -> float:
    shortest = min(
        min(t.client_s, t.http_request_s, t.server_s, t.upstream_idle_s, t.connect_s, t.tunnel_s)
        for t in [listener.timeouts for listener in config.listeners]
        + [backend.timeouts for backend in config.backends]
    )
    return max(MIN_SWEEP_S, min(MAX_SWEEP_S, shortest / 10))


async def start_control(
    runtime: Runtime, workers: WorkerLoad | None = None
) -> ControlServer | None:
    """The control socket, if configured; ``workers`` sums load across worker processes.

    Raises ListenerError if it cannot be created, after closing every bound socket.
    """
    control_config = runtime.config.control
    if control_config.socket is None:
        return None
    controller = Controller(
        runtime.backends,
        runtime.all_routes,
        runtime.health,
        control_config.state_file,
        workers=workers,
    )
    control = ControlServer(
        control_config.socket, control_config.group, controller, runtime.stats.control
    )
    try:
        await control.start()
    except BaseException:
        runtime.close_sockets()
        raise
    return control


# What the daemon can do to itself on a control command or a signal (reload, upgrade), built
# once it serves: daemon/reload.py's, given the runtime and its controller (None without one).
ActionsFactory = Callable[[Runtime, Controller | None], DaemonActions]


async def serve(
    runtime: Runtime, stop: asyncio.Event, *, actions: ActionsFactory | None = None
) -> None:
    """Serve until ``stop`` is set, then shut down gracefully. ``actions``: what ``zdlb ctl
    reload``/``upgrade`` and SIGHUP/SIGUSR2 run (none: the commands answer an error).

    Raises ListenerError if the control socket cannot be created (before any listener serves).
    """
    control = await start_control(runtime)
    metrics = await start_metrics(
        runtime, lambda: take_snapshot(runtime.stats, runtime.servers, runtime.health)
    )
    await start_listeners(runtime)
    if actions is not None:
        install_actions(actions(runtime, control.controller if control else None), control)
    tune_gc()
    runtime.start_health()
    notify.ready()
    async with asyncio.TaskGroup() as tasks:
        sweeper = tasks.create_task(sweep_forever(runtime))
        await stop.wait()
        notify.stopping()
        if control is not None:
            await control.close()
        await shutdown(runtime)
        if metrics is not None:
            metrics.close()
            await metrics.wait_closed()
        sweeper.cancel()
        await runtime.stop_health()


def install_actions(actions: DaemonActions, control: ControlServer | None) -> None:
    """``zdlb ctl reload``/``upgrade`` and SIGHUP/SIGUSR2 run ``actions`` from now on."""
    if control is not None:
        control.controller.actions = actions
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[tuple[bool, list[str]]]] = set()  # kept until done (asyncio#91887)

    def on_signal(name: str) -> None:
        action = actions.reload if name == "reload" else actions.upgrade
        task = loop.create_task(action(-1), name=f"{name} (signal)")
        running.add(task)
        task.add_done_callback(running.discard)

    loop.add_signal_handler(signal.SIGHUP, on_signal, "reload")
    loop.add_signal_handler(signal.SIGUSR2, on_signal, "upgrade")


async def start_listeners(runtime: Runtime, *, log_started: bool = True) -> None:
    """Accept on every listener socket of ``runtime``; ``log_started``: one line each."""
    for route, sock in runtime.sockets:
        await accept_http(runtime, route, sock)
        if log_started:
            log_listener_started(route.listener, sock, route.backend)
    for tcp_route, sock in runtime.tcp_sockets:
        tcp_route.start_accepting(sock)
        if log_started:
            log_listener_started(tcp_route.listener, sock, tcp_route.backend)


async def accept_http(runtime: Runtime, route: Route, sock: socket.socket) -> None:
    """Accept on ``sock`` for ``route``'s listener, through its slot (created if new)."""
    name = route.listener.name
    slot = runtime.slots.get(name)
    if slot is None:
        slot = runtime.slots[name] = RouteSlot(route)
    slot.route = route
    runtime.http_servers[name] = await accept_into(slot, sock)


async def accept_into(slot: RouteSlot, sock: socket.socket) -> asyncio.Server:
    """An asyncio server accepting on ``sock``, its connections served by ``slot``'s route."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda slot=slot: ClientConnection(slot.route, loop),  # type: ignore[misc]
        sock=sock,
        backlog=slot.route.listener.backlog,
    )


async def start_metrics(runtime: Runtime, source: SnapshotSource) -> MetricsEndpoint | None:
    """The /metrics endpoint on the socket build_runtime bound, if [metrics] listen is set."""
    if runtime.metrics_socket is None:
        return None
    endpoint = MetricsEndpoint(new_registry(source), runtime.metrics_socket)
    await endpoint.start()  # logs metrics_started with the bound address
    return endpoint


def log_listener_started(listener: ListenerConfig, sock: socket.socket, backend: Backend) -> None:
    log.info(
        "listener_started listener=%s addr=%s backend=%s mode=%s",
        listener.name,
        bound_address(sock),
        backend.name,
        listener.mode.value,
    )


async def sweep_forever(runtime: Runtime) -> None:
    """Enforce deadlines on every route, retired ones included, and let go of retired routes
    whose last connection ended; the interval follows the running config."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(sweep_interval_s(runtime.config))
        now = loop.time()
        for route in runtime.all_routes:
            route.sweep(now)
        if runtime.retired:
            prune_retired(runtime)


def prune_retired(runtime: Runtime) -> None:
    """Close what retired routes without connections still hold (idle upstream connections to
    servers of the old config, tunnel pipes) and forget them."""
    busy: list[Route | TcpRoute] = []
    for route in runtime.retired:
        if route.connections:
            busy.append(route)
            continue
        route.abort_all()  # no connection left: closes its pipe pool only
        if isinstance(route, Route):
            for pool in route.upstreams.values():
                pool.close_idle()
    runtime.retired = busy


async def shutdown(runtime: Runtime) -> None:
    """Stop accepting, let in-flight requests finish within grace_s, then abort the rest.

    HTTP connections end after their next answer (``Connection: close``); those still idle
    when grace_s ends are closed then, never before: a client may have written a request
    we have not read yet. TCP tunnels have no request boundary, so they run until they end by
    themselves or grace_s is over.
    """
    for server in runtime.http_servers.values():
        server.close()
    routes = runtime.all_routes
    for route in routes:
        route.stop_accepting()
    # Each listener may set its own grace_s; the longest one bounds the whole drain.
    grace_s = max((route.timeouts.grace_s for route in routes), default=0.0)
    busy = sum(len(route.connections) for route in routes)
    log.info("shutdown_started connections=%d grace_s=%s", busy, grace_s)
    try:
        async with asyncio.timeout(grace_s):
            for route in routes:
                await route.drained.wait()
    except TimeoutError:
        pass
    idle = 0
    for route in routes:
        if isinstance(route, Route):
            idle += sum(1 for conn in route.connections if conn.phase is Phase.IDLE)
            route.close_idle()
    left = sum(len(route.connections) for route in routes)
    for route in routes:
        route.abort_all()
        if isinstance(route, Route):
            for pool in route.upstreams.values():
                pool.close_idle()
    for server in runtime.http_servers.values():
        await server.wait_closed()
    log.info("shutdown_finished aborted=%d closed_idle=%d", left - idle, idle)


def run_loop(loop: str, main: Coroutine[Any, Any, None]) -> int:
    """Run ``main`` on a new ``loop`` ("uvloop" or "asyncio"); the exit status (0, or 1 after
    a ZdlbError such as a busy port, logged once as ``startup_failed``)."""
    try:
        if loop == "uvloop":
            import uvloop

            uvloop.run(main)
        else:
            asyncio.run(main)
    except ZdlbError as exc:
        log.error("startup_failed error=%s", exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return EXIT_FAILURE
    return EXIT_OK


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT stop; SIGHUP and SIGUSR2 are logged and ignored until ``install_actions``
    (a reload or upgrade before the daemon serves, or in a worker, must not kill it)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    for signum in (signal.SIGHUP, signal.SIGUSR2):
        loop.add_signal_handler(signum, _ignored, signum)


def _ignored(signum: signal.Signals) -> None:
    log.warning("signal_ignored signal=%s reason=not serving yet, or a worker", signum.name)
