"""Reload: apply a new config to the running daemon without closing anything.

On SIGHUP or ``zdlb ctl reload`` (one at a time):

1. Read and validate the config file in a thread (``config/load.py``, off the loop). Any error,
   or a change only a restart can apply (``config/diff.py``), answers every problem with its
   key path and changes nothing.
2. Build the whole new configuration beside the running one: backends and servers (their
   runtime state carried over by backend/name: ``carry_state``), the health checker, the
   counters (kept per name, so they never go backwards), one route per listener, and the
   sockets: a listener keeps its socket when its bind is unchanged (matched by name, then by
   address), else a new one is bound *now*, so a port in use fails the reload before anything
   changed.
3. Switch, with no await in between that could serve from a half-switched state: new binds
   accept first, each HTTP listener's slot takes its new route (new connections), the old
   route is retired (``Route.retire``: idle connections move to the new route now, busy ones
   after their exchange: in-flight requests finish on the old Route, Backend and Server
   objects), removed listeners stop accepting and drain, the health checks restart on the new
   servers, the control commands answer from the new state, and the journal is rewritten.

Old routes stay in ``Runtime.retired`` (swept, counted by ``show info``, drained at stop) until
their last connection ends; ``wait idle`` also counts a server's predecessors.

With workers (``Role.MASTER``) the master does steps 1-2 for its own state and pushes the
validated config to every worker, which applies it as ``Role.WORKER`` in place (ipc.py
``Reload``): the workers keep their processes, connections and pooled upstream connections,
where replacing them one by one would close every keep-alive client of each (or hand each over,
an upgrade's cost per reload). The master owns the sockets, so a listener added or moved is
bound by the master (one SO_REUSEPORT socket per worker), sent to every worker over its fd
channel (fdchannel.py) just before the ``Reload`` that serves it, and accepted on there; the
master closes its copies of a removed listener's sockets once every worker applied the reload
(each stopped accepting on its own and drains that listener's connections as above).

Must not: read the file on the loop, close a client connection, or leave anything half-applied.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from zdlb.balancer.pool import Backend
from zdlb.balancer.server import AdminState, Server
from zdlb.config.diff import ConfigDiff, diff_configs
from zdlb.config.load import load_config
from zdlb.config.model import Config, ListenerConfig
from zdlb.control import journal
from zdlb.control.commands import Controller
from zdlb.control.server import ControlServer
from zdlb.daemon import notify
from zdlb.daemon.acceptor import HttpAcceptor
from zdlb.daemon.lifecycle import accept_http, log_listener_started
from zdlb.daemon.runtime import Runtime, add_route, new_census
from zdlb.errors import ConfigError, ListenerError
from zdlb.events import EventKind
from zdlb.health.scheduler import HealthChecker
from zdlb.http.route import Route
from zdlb.stats import Stats
from zdlb.tcp.listener import bind_listener, bind_listener_group
from zdlb.tcp.proxy import TcpRoute

log = logging.getLogger(__name__)


class Role(enum.Enum):
    SINGLE = "single"  # one process serves everything
    MASTER = "master"  # binds, owns the state, serves nothing itself
    WORKER = "worker"  # serves the master's sockets


def carry_state(old: Server, new: Server) -> None:
    """What the operator and the checks decided about ``old`` holds for ``new`` (same backend
    and name): admin state and drain deadline, a runtime weight or pool (one that differs from
    ``old``'s config; else the new config's value stands), and the health verdict, unless the
    server moved to another address or is no longer checked (then the checks start afresh)."""
    if old.admin is not AdminState.READY:
        new.admin = old.admin
        new.drain_ends = old.drain_ends
    if old.weight != old.config.weight:
        new.weight = old.weight
    if old.pool is not old.config.pool:
        new.pool = old.pool
    if new.config.check is not None and old.config.address == new.config.address:
        new.health = old.health


@dataclass
class Plan:
    """Everything built for ``config`` before anything running is touched."""

    config: Config
    diff: ConfigDiff
    runtime: Runtime  # the new objects (the running one is updated from it)
    sources: dict[str, str]  # new listener name -> old listener whose socket it keeps
    bound: dict[str, socket.socket] = field(default_factory=dict)  # newly bound, by listener
    # A master's new binds: one socket per worker, by listener; and the groups of listeners
    # removed or moved, closed once the workers applied the reload.
    groups: dict[str, list[socket.socket]] = field(default_factory=dict)
    dropped: list[list[socket.socket]] = field(default_factory=list)

    def close_bound(self) -> None:
        for sock in self.bound.values():
            sock.close()
        for group in self.groups.values():
            for sock in group:
                sock.close()


def build_plan(
    running: Runtime,
    config: Config,
    diff: ConfigDiff,
    role: Role,
    received: Mapping[str, socket.socket] | None = None,
) -> Plan:
    """Step 2. Raises ListenerError (a new bind failed; nothing bound is left open).
    ``received``: a worker's sockets for the listeners its master bound for this reload."""
    backends = {b.name: Backend(b, processes=running.share_of) for b in config.backends}
    old_servers = {(s.backend, s.name): s for s in running.servers}
    for backend in backends.values():
        for server in backend.servers:
            if (old := old_servers.get((server.backend, server.name))) is not None:
                carry_state(old, server)
    servers = [server for backend in backends.values() for server in backend.servers]
    is_worker = role is Role.WORKER  # the master's verdicts are the timeline's
    health = HealthChecker(
        servers, on_transition=running.on_health, events=None if is_worker else running.events
    )
    stats = Stats.from_config(config, running.stats)
    new = Runtime(config, backends, health, stats, on_health=running.on_health)
    new.events, new.census_key = running.events, running.census_key
    new.budget = running.budget  # one per process: its listeners' gates and counts go on
    new.census = new_census(backends, running.census_key, running.census)
    plan = Plan(config, diff, new, socket_sources(running, config))
    old_sockets = _sockets_by_name(running)
    try:
        for listener in config.listeners:
            source, name = plan.sources.get(listener.name), listener.name
            if source is not None:
                sock = old_sockets[source]
            elif role is Role.SINGLE:
                sock = plan.bound[name] = bind_listener(listener.bind, listener.backlog)
            elif role is Role.MASTER:
                group = bind_listener_group(listener.bind, listener.backlog, running.workers)
                plan.groups[name] = group
                sock = group[0]
            elif received is not None and name in received:
                sock = plan.bound[name] = received[name]
            else:  # the master sends every socket a worker needs: a bug
                raise ListenerError(0, f"listener {name}: no socket from the master")
            add_route(new, listener, sock)
    except BaseException:
        plan.close_bound()
        raise
    return plan


def _sockets_by_name(runtime: Runtime) -> dict[str, socket.socket]:
    socks = {route.listener.name: sock for route, sock in runtime.sockets}
    socks.update((route.listener.name, sock) for route, sock in runtime.tcp_sockets)
    return socks


def socket_sources(running: Runtime, config: Config) -> dict[str, str]:
    """Which old listener's socket each new listener keeps: the same name and bind first, then
    the same bind and mode (a renamed listener), else none (a new bind)."""
    old = {r.listener.name: r.listener for r in _routes(running)}
    sources: dict[str, str] = {}
    for listener in config.listeners:
        previous = old.get(listener.name)
        if previous is not None and _same_socket(previous, listener):
            sources[listener.name] = listener.name
    taken = set(sources.values())
    for listener in config.listeners:
        if listener.name in sources:
            continue
        for name, previous in old.items():
            if name not in taken and _same_socket(previous, listener):
                sources[listener.name] = name
                taken.add(name)
                break
    return sources


def _same_socket(old: ListenerConfig, new: ListenerConfig) -> bool:
    return old.bind == new.bind and old.mode is new.mode and old.backlog == new.backlog


async def switch(running: Runtime, plan: Plan, role: Role) -> list[Server]:
    """Step 3: make ``running`` serve ``plan``; returns the servers replaced (predecessors)."""
    new = plan.runtime
    old_routes = {r.listener.name: r for r in _routes(running)}
    old_servers = dict(running.http_servers)  # a moved listener's new server takes its name
    kept = set(plan.sources.values())
    if role is Role.MASTER:
        _switch_groups(running, plan, kept)
    else:
        await _accept_new_binds(running, plan)
    for route, _ in new.sockets:
        name = route.listener.name
        source = plan.sources.get(name)
        if role is not Role.MASTER and source is not None:
            running.slots[name] = slot = running.slots.pop(source)
            running.http_servers[name] = running.http_servers.pop(source)
            slot.route = route
    for index, (tcp_route, sock) in enumerate(new.tcp_sockets):
        if role is not Role.MASTER and plan.sources.get(tcp_route.listener.name) is not None:
            # The old route closes its descriptor when it stops accepting; a duplicate keeps
            # the listening socket (and its queue) open for the new route.
            kept_sock = sock.dup()
            new.tcp_sockets[index] = (tcp_route, kept_sock)
            tcp_route.start_accepting(kept_sock)
    for name, old_route in old_routes.items():
        if role is Role.MASTER:
            break  # its routes serve nothing (the workers' do); its sockets stay the workers'
        successor = _successor(new, plan.sources, name)
        if isinstance(old_route, Route) and isinstance(successor, Route):
            old_route.retire(successor)
        if name not in kept:
            _stop_old_listener(running, old_route, old_servers.get(name))
        elif isinstance(old_route, TcpRoute):
            old_route.stop_accepting()  # closes only its duplicate (above)
        running.retired.append(old_route)
    predecessors = running.servers
    running.config, running.backends, running.health = plan.config, new.backends, new.health
    running.stats = new.stats
    running.census = new.census
    running.routes, running.sockets = new.routes, new.sockets
    running.tcp_routes, running.tcp_sockets = new.tcp_routes, new.tcp_sockets
    running.budget.configure(plan.config)
    if role is not Role.WORKER:
        running.start_health()
    return predecessors


def _switch_groups(running: Runtime, plan: Plan, kept: set[str]) -> None:
    """A master: each listener's group of sockets, in the new config order; the groups no
    listener keeps are closed after the push (``Reloader._apply``)."""
    names = [listener.name for listener in running.config.listeners]
    old = dict(zip(names, running.listener_groups, strict=True))
    running.listener_groups = [
        old[source] if (source := plan.sources.get(listener.name)) else plan.groups[listener.name]
        for listener in plan.config.listeners
    ]
    plan.dropped = [group for name, group in old.items() if name not in kept]


async def _accept_new_binds(running: Runtime, plan: Plan) -> None:
    new = plan.runtime
    for route, sock in new.sockets:
        if route.listener.name in plan.bound:
            await accept_http(running, route, sock)
            log_listener_started(route.listener, sock, route.backend)
    for tcp_route, sock in new.tcp_sockets:
        if tcp_route.listener.name in plan.bound:
            tcp_route.start_accepting(sock)
            log_listener_started(tcp_route.listener, sock, tcp_route.backend)


def _routes(runtime: Runtime) -> list[Route | TcpRoute]:
    return [*runtime.routes, *runtime.tcp_routes]


def _successor(new: Runtime, sources: dict[str, str], old_name: str) -> Route | TcpRoute | None:
    """The new route for the connections of old listener ``old_name``: the one of the same
    name, else the one that took over its socket (a renamed listener), else none (removed)."""
    routes = _routes(new)
    for route in routes:
        if route.listener.name == old_name:
            return route
    for route in routes:
        if sources.get(route.listener.name) == old_name:
            return route
    return None


def _stop_old_listener(
    running: Runtime, route: Route | TcpRoute, server: HttpAcceptor | None
) -> None:
    """A listener removed or moved: stop accepting on its old socket. A removed HTTP
    listener's connections drain (closed after their next answer); a moved one's already
    moved to the new route."""
    if isinstance(route, TcpRoute):
        route.stop_accepting()
        return
    if server is not None:
        server.close()
    if route.successor is None:
        route.stop_accepting()
    name = route.listener.name
    if server is not None and running.http_servers.get(name) is server:
        del running.http_servers[name]
        running.slots.pop(name, None)


# --- the action ------------------------------------------------------------------------------


class WorkerResize(Protocol):
    """A master's workers, for a reload that changes ``workers`` (workers.py ``Supervisor``)."""

    def check_resize(self, config: Config) -> list[str]: ...

    async def resize(self, config: Config) -> list[str]: ...


# A master's: send the config to the workers with the new listeners' socket groups; problems.
Pusher = Callable[[Config, Mapping[str, list[socket.socket]]], Awaitable[list[str]]]


class Reloader:
    """``zdlb ctl reload`` and SIGHUP for one running daemon (control/commands.py's
    ``DaemonActions``). ``push``: a master's, sends the new config to its workers and returns
    the problems it met (empty: every worker applied it)."""

    def __init__(
        self,
        runtime: Runtime,
        controller: Controller | None,
        role: Role = Role.SINGLE,
        push: Pusher | None = None,
    ) -> None:
        self._runtime = runtime
        self._controller = controller
        self._role = role
        self.push = push
        self.workers: WorkerResize | None = None  # a master's (resize.py)
        self._lock = asyncio.Lock()  # one reload at a time; a second waits for the first
        self.upgrade_action: Callable[[int], Awaitable[tuple[bool, list[str]]]] | None = None

    async def reload(self, peer_uid: int) -> tuple[bool, list[str]]:
        if self._runtime.handed_over:  # draining after an upgrade: the new process serves
            return False, ["this process is draining after an upgrade; reload the new one"]
        async with self._lock:
            notify.reloading()
            try:
                ok, lines = await self._reload()
            finally:
                notify.ready()  # reloaded or not, the daemon serves
        if ok:
            log.info("reload_done uid=%d changes=%s", peer_uid, "; ".join(lines))
        else:
            log.error("reload_refused uid=%d errors=%s", peer_uid, "; ".join(lines))
        return ok, lines

    async def upgrade(self, peer_uid: int) -> tuple[bool, list[str]]:
        if self.upgrade_action is None:
            return False, ["upgrade is not available in this process"]
        return await self.upgrade_action(peer_uid)

    async def _reload(self) -> tuple[bool, list[str]]:
        running = self._runtime
        try:
            config = await asyncio.to_thread(load_config, Path(running.config.source))
        except ConfigError as exc:
            return False, [str(issue) for issue in exc.issues]
        diff = diff_configs(running.config, config)
        if diff.refused:
            return False, list(diff.refused)
        if not diff.changes:
            return True, ["no change"]
        resizing = any(change.name == "workers" for change in diff.of("setting"))
        if resizing and (problems := self._check_workers(config)):
            return False, problems
        try:
            plan = build_plan(running, config, diff, self._role)
        except ListenerError as exc:
            return False, [f"listeners: {exc}"]
        await self._apply(plan)
        lines = [str(change) for change in diff.changes]
        if resizing and self.workers is not None:
            lines += [f"warning: {problem}" for problem in await self.workers.resize(config)]
        return True, lines

    def _check_workers(self, config: Config) -> list[str]:
        if self.workers is None:
            return ["workers: one process (workers = 1) gets worker processes only by a restart"]
        return self.workers.check_resize(config)

    async def _apply(self, plan: Plan) -> None:
        running = self._runtime
        predecessors = await switch(running, plan, self._role)
        _apply_logging(plan.config, plan.diff)
        if self._controller is not None:
            self._controller.replace(
                running.backends, running.all_routes, running.health, predecessors
            )
        if running.status_board is not None:
            running.status_board.replace(running.backends, running.health, running.census)
        if self._role is not Role.WORKER:
            changes = ", ".join(str(change) for change in plan.diff.changes) or "no change"
            running.events.record(EventKind.RELOAD, "-", changes)
        if self.push is not None:
            for problem in await self.push(plan.config, plan.groups):
                log.error("reload_worker_failed %s", problem)
            _close_groups(plan.dropped)  # every worker let go of its own copy, or is gone
            for route, sock in running.sockets:
                if route.listener.name in plan.groups:
                    log_listener_started(route.listener, sock, route.backend)
            for tcp_route, sock in running.tcp_sockets:
                if tcp_route.listener.name in plan.groups:
                    log_listener_started(tcp_route.listener, sock, tcp_route.backend)
        state_file = plan.config.control.state_file
        if state_file is not None and self._role is not Role.WORKER:
            try:
                await asyncio.to_thread(journal.save, state_file, running.servers)
            except OSError as exc:
                log.error("state_journal_write_failed file=%s error=%s", state_file, exc)


def _apply_logging(config: Config, diff: ConfigDiff) -> None:
    """A changed ``[logging] level`` (format: restart only; access_log: per route)."""
    if any(change.name == "logging.level" for change in diff.of("setting")):
        logging.getLogger().setLevel(config.logging.level.upper())


def _close_groups(groups: list[list[socket.socket]]) -> None:
    for group in groups:
        for sock in group:
            sock.close()


async def apply_pushed(
    runtime: Runtime, config: Config, received: Mapping[str, socket.socket]
) -> list[str]:
    """A worker applies the config its master validated and sent (ipc.py ``Reload``), with
    the sockets of the listeners the master bound for it. Raises ListenerError (a bug)."""
    diff = diff_configs(runtime.config, config)
    plan = build_plan(runtime, config, diff, Role.WORKER, received)
    await switch(runtime, plan, Role.WORKER)
    _apply_logging(config, diff)
    return []


def single_actions(
    runtime: Runtime, control: ControlServer | None, stop: asyncio.Event
) -> Reloader:
    """lifecycle.serve's ``actions`` for one process (no upgrade)."""
    return Reloader(runtime, control.controller if control else None, Role.SINGLE)
