"""The daemon's life: serve a runtime (daemon/runtime.py), and stop gracefully.

Start: every listener is bound before this runs (a busy port fails the start before anything
serves); then the control socket, /metrics, the listeners, the health checks, and systemd is
told READY=1. Stop (SIGTERM/SIGINT): stop accepting, let every connection end after its next
answer (``Connection: close``) within ``grace_s`` -- an idle keep-alive connection is not
closed under a request its client may be writing, only when ``grace_s`` ends -- then abort
what remains, exit 0: uvicorn's order. A sweeper task enforces every connection's deadline
(see http/route.py), on routes a reload retired too. SIGHUP and SIGUSR2 run the daemon's
reload and upgrade once it serves (``install_actions``), and are ignored before.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from zdlb.balancer.pool import Backend
from zdlb.config.model import Config, ListenerConfig
from zdlb.control.commands import Controller, DaemonActions, WorkerLoad
from zdlb.control.server import ControlServer
from zdlb.daemon import notify
from zdlb.daemon.acceptor import HttpAcceptor
from zdlb.daemon.page_actions import action_runner
from zdlb.daemon.runtime import RouteSlot, Runtime
from zdlb.errors import ZdlbError
from zdlb.http.connection import ClientConnection
from zdlb.http.exchange import Phase
from zdlb.http.route import Route
from zdlb.metrics.collector import SnapshotSource, new_registry, take_snapshot
from zdlb.metrics.endpoint import MetricsEndpoint
from zdlb.metrics.status import StatusBoard
from zdlb.tcp.listener import bound_address
from zdlb.tcp.proxy import TcpRoute
from zdlb.tls.listener import TerminatingContext

log = logging.getLogger(__name__)

# The sweeper ticks at a tenth of the shortest timeout, so a deadline is enforced at most ~10%
# late, but not more often than every 5 ms (tests use tiny timeouts) nor less than every 1 s.
MIN_SWEEP_S = 0.005
MAX_SWEEP_S = 1.0
EXIT_OK = 0
EXIT_FAILURE = 1


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
    controller = new_controller(runtime, workers)
    control = ControlServer(
        control_config.socket, control_config.group, controller, runtime.stats.control
    )
    inherited = runtime.inherited
    sock = inherited.take_control(str(control_config.socket)) if inherited is not None else None
    try:
        await control.start(sock)
    except BaseException:
        runtime.close_sockets()
        raise
    return control


# What the daemon can do to itself on a control command or a signal (reload, upgrade), built
# once it serves: daemon/reload.py's, given the runtime and its controller (None without one).
ActionsFactory = Callable[[Runtime, ControlServer | None, asyncio.Event], DaemonActions]


async def serve(
    runtime: Runtime, stop: asyncio.Event, *, actions: ActionsFactory | None = None
) -> None:
    """Serve until ``stop`` is set, then shut down gracefully. ``actions``: what ``zdlb ctl
    reload``/``upgrade`` and SIGHUP/SIGUSR2 run (none: the commands answer an error).

    Raises ListenerError if the control socket cannot be created (before any listener serves).
    """
    control = await start_control(runtime)
    metrics = await start_metrics(
        runtime,
        lambda: take_snapshot(runtime.stats, runtime.servers, runtime.health),
        control=control,
    )
    await start_listeners(runtime)
    if actions is not None:
        install_actions(actions(runtime, control, stop), control)
    tune_gc()
    runtime.start_health()
    announce_ready(runtime)
    async with asyncio.TaskGroup() as tasks:
        sweeper = tasks.create_task(sweep_forever(runtime))
        await stop.wait()
        if not runtime.handed_over:
            notify.stopping()
        if control is not None:
            await control.close(unlink=not runtime.handed_over)
        await shutdown(runtime)
        if metrics is not None:
            metrics.close()
            await metrics.wait_closed()
        sweeper.cancel()
        await runtime.stop_health()


def announce_ready(runtime: Runtime) -> None:
    """Everything serves: tell systemd (the service's main process now, after an upgrade)
    and whoever waits (an upgrading predecessor)."""
    if runtime.inherited is not None:
        notify.main_pid(os.getpid())
    else:
        notify.ready()
    for hook in runtime.on_ready:
        hook()


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


async def accept_into(slot: RouteSlot, sock: socket.socket) -> HttpAcceptor:
    """Accept on ``sock`` (owned from now on), the connections served by ``slot``'s route and
    the accepting paused and resumed by the connection budget (budget.py).

    A TLS listener's server gets a ``TerminatingContext`` reading the route's TLS config at
    every handshake (tls/listener.py: a reload or a renewed file needs no re-listen), and a
    handshake deadline: ClientConnection's own deadlines start only once it is done. Raises
    CertificateError if a certificate cannot be loaded (config/tls.py checked them before).
    """
    tls = slot.route.listener.tls
    context = None
    if tls is not None:
        context = TerminatingContext(slot.route.listener.name, lambda: slot.route.listener.tls)
    acceptor = HttpAcceptor(
        slot,
        sock,
        asyncio.get_running_loop(),
        tls_context=context,
        ssl_handshake_timeout=tls.handshake_s if tls is not None else None,
    )
    await acceptor.start()
    return acceptor


async def adopt_connection(slot: RouteSlot, sock: socket.socket) -> None:
    """Serve a client connection another process accepted (an upgrade's idle ones; never a
    TLS one: its session state cannot leave the process, ClientConnection.detach_idle)."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.connect_accepted_socket(
        lambda: ClientConnection(slot.route, loop),
        sock=sock,
    )
    conn.continue_keep_alive()


def new_controller(runtime: Runtime, workers: WorkerLoad | None = None) -> Controller:
    """The control commands over ``runtime`` (the socket's, and the status page's actions)."""
    return Controller(
        runtime.backends,
        runtime.all_routes,
        runtime.health,
        runtime.config.control.state_file,
        workers=workers,
        events=runtime.events,
        fleet_link=runtime.fleet,  # [cluster] (issue 16)
    )


async def start_metrics(
    runtime: Runtime,
    source: SnapshotSource,
    workers: WorkerLoad | None = None,
    control: ControlServer | None = None,
) -> MetricsEndpoint | None:
    """The /metrics endpoint and status page on the socket build_runtime bound, if [metrics]
    listen is set; with ``control``, the deploy metrics too, and with ``admin = true`` the
    page's write actions (through the control socket's commands when there is one)."""
    if runtime.metrics_socket is None:
        return None
    admin = runtime.config.metrics.admin
    board = runtime.status_board = StatusBoard(
        runtime.backends, runtime.health, runtime.events, source, runtime.census, is_admin=admin
    )
    deploys = control.controller.deploy_snapshot if control is not None else None
    if control is not None:
        control.controller.status = board.document
    controller = control.controller if control is not None else new_controller(runtime, workers)
    endpoint = MetricsEndpoint(
        new_registry(
            source, runtime.events, runtime.census, deploys, lambda: runtime.config.listeners
        ),
        runtime.metrics_socket,
        status=board,
        run_action=action_runner(controller) if admin else None,
    )
    await endpoint.start()  # logs metrics_started with the bound address
    return endpoint


def log_listener_started(
    listener: ListenerConfig, sock: socket.socket, backend: Backend | None
) -> None:
    log.info(
        "listener_started listener=%s addr=%s backend=%s mode=%s",
        listener.name,
        bound_address(sock),
        backend.name if backend is not None else "-",  # None: a listener that only redirects
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
    runtime.budget.stop()  # nothing resumes accepting now
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
