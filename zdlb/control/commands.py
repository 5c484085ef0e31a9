"""What control commands do to the running daemon: read its state, change servers, wait.

The parsing is control/protocol.py's, the socket control/server.py's; this module holds the
effects. Every change is logged once with the peer's uid, the old and the new value.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, assert_never, cast

from zdlb import __version__
from zdlb.balancer.pool import Backend
from zdlb.balancer.server import AdminState, FlipPlan, Health, Server, plan_flip
from zdlb.cluster import state as shared
from zdlb.cluster.state import ServerState
from zdlb.config.model import PoolName
from zdlb.control import fleet, journal
from zdlb.control.deploy_protocol import (
    DeployBegin,
    DeployCommand,
    DeployEnd,
    DeployHost,
    DeployRenew,
    DeployStep,
    DeployTakeover,
)
from zdlb.control.deploys import DeployDesk, DeployEvent
from zdlb.control.fleet import FleetLink
from zdlb.control.protocol import (
    Command,
    Flip,
    Help,
    Reload,
    SetServerState,
    SetServerWeight,
    ShowBackends,
    ShowDeploy,
    ShowInfo,
    ShowServers,
    ShowStatus,
    Swap,
    Upgrade,
    WaitIdle,
    WaitUp,
    help_text,
    render_json,
    render_table,
)
from zdlb.control.waits import wait_fleet_idle, wait_up
from zdlb.deploy import record as deploy_record
from zdlb.deploy.record import DeployRecord
from zdlb.errors import ClusterConflict, ClusterUnavailable, ControlCommandError
from zdlb.events import EventKind, Timeline
from zdlb.health.scheduler import HealthChecker
from zdlb.http.route import Route
from zdlb.tcp.proxy import TcpRoute
from zdlb.tls.expiry import info_fields as tls_info

log = logging.getLogger(__name__)

# `wait ... idle` looks at the server's counters this often. Counters change in callbacks that
# notify nobody (an event per counter would cost every request); 10 ms is far below any drain.
WAIT_POLL_S = 0.01
# A fleet-wide `wait idle` reads the instances' published views this often: each is written
# within cluster/fleet.py's PUBLISH_POLL_S (50 ms) of a change, so polling faster gains nothing.
FLEET_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Reply:
    """A command's answer: text for people, ``data`` for ``json``; ``is_error`` sets the exit."""

    text: str
    data: object
    is_error: bool = False

    def render(self, as_json: bool) -> str:
        """The reply's text; an error's starts with "error:" (JSON: has an "error" key), which
        is how ``zdlb ctl`` chooses its exit status."""
        if as_json:
            return render_json(self.data)
        return f"error: {self.text}" if self.is_error else self.text


class WorkerLoad(Protocol):
    """The load of worker processes, as a master sees it (daemon/workers.py is one).

    With workers the master's own ``Server`` counters stay 0: the proxying happens elsewhere.
    """

    def server_load(self, server: Server) -> tuple[int, int]:
        """(inflight, conns) of ``server`` summed over the workers' latest reports."""
        ...

    def client_connections(self) -> int: ...

    def server_queue(self, server: Server) -> tuple[int, int | None]:
        """(requests queued for ``server`` now, its maxconn) summed over the workers; the
        maxconn is None when the server has none."""
        ...

    def connection_limits(self) -> tuple[int, int]:
        """(the connection budget's maxconn, times it was reached), summed over the workers."""
        ...

    def shared_queue(self, backend: str) -> int:
        """Requests waiting in ``backend``'s shared queue, summed over the workers."""
        ...

    def workers_serving(self) -> int:
        """Worker processes serving now (a restarting one does not count)."""
        ...

    async def refresh(self) -> None:
        """Return once every live worker has reported after this call (bounded)."""
        ...

    def close_idle(self, server: Server) -> None:
        """Ask every worker to close its idle pooled connections to ``server``."""
        ...


class DaemonActions(Protocol):
    """What only the daemon can do to itself: daemon/reload.py and daemon/upgrade.py.

    Each returns ``(ok, lines)``: what changed, or every error (then nothing changed).
    """

    async def reload(self, peer_uid: int) -> tuple[bool, list[str]]: ...

    async def upgrade(self, peer_uid: int) -> tuple[bool, list[str]]: ...


class Controller:
    """Carries out control commands against one running configuration.

    ``workers``: the master of worker processes reads load there instead of in ``routes``.
    """

    def __init__(
        self,
        backends: dict[str, Backend],
        routes: Sequence[Route | TcpRoute],
        health: HealthChecker,
        state_file: Path | None = None,
        workers: WorkerLoad | None = None,
        events: Timeline | None = None,
        fleet_link: FleetLink | None = None,
    ) -> None:
        self.events = events if events is not None else Timeline()  # what changed, when
        self._backends = backends
        self._routes = routes
        self._health = health
        self._state_file = state_file
        self._workers = workers
        self._started_at = time.monotonic()
        self._stopping = asyncio.Event()  # set at shutdown: waits answer at once
        self.actions: DaemonActions | None = None  # the daemon sets it once it serves
        # The status page's document (metrics/status.py), when [metrics] serves one: `show
        # status` answers with it, so the page and `zdlb ctl --json` never disagree.
        self.status: Callable[[], Mapping[str, object]] | None = None
        # Servers a reload replaced, whose in-flight requests finish on the old objects: `wait
        # idle` counts them with the server of the same backend/name (daemon/reload.py).
        self._predecessors: list[Server] = []
        # zdlb deploy's lock and record; the last one is read back from the journal.
        last_deploy = journal.load_deploy(state_file) if state_file is not None else None
        self._deploys = DeployDesk(backends, last_deploy, on_event=self._deploy_event)
        # [cluster]: changes go through etcd (control/fleet.py); journal writes of changes
        # that came from the fleet run here, one at a time.
        self._fleet = fleet_link
        self._later = journal.Coalesced(self._journal)
        if fleet_link is not None:
            fleet_link.attach(self)

    def replace(
        self,
        backends: dict[str, Backend],
        routes: Sequence[Route | TcpRoute],
        health: HealthChecker,
        predecessors: Sequence[Server] = (),
    ) -> None:
        """A reload switched the running configuration: answer from the new one from now on."""
        self._backends = backends
        self._routes = routes
        self._health = health
        busy = [s for s in (*self._predecessors, *predecessors) if s.inflight or s.conns]
        self._predecessors = busy
        self._deploys.use_backends(backends)  # a deploy names backends of the config in force

    def _deploy_event(self, event: DeployEvent) -> None:
        what = f"{event.what}: {event.reason}" if event.reason else event.what
        self.events.record(EventKind.DEPLOY, f"{event.backend}/{event.server or '-'}", what)

    def deploy_snapshot(self) -> DeployRecord | None:
        """The current or last deploy (frozen; ``effective_status(time.time())`` says whether
        it still runs): for a status page or metrics, never None-checked twice."""
        return self._deploys.record

    def deploy_events(self) -> tuple[DeployEvent, ...]:
        """The latest deploy events (begin, each host's steps and result, end), oldest first,
        since this daemon started (at most ``deploys.MAX_EVENTS``)."""
        return tuple(self._deploys.events)

    def stop_waiting(self) -> None:
        """Shutdown: every `wait` in progress answers now (with an error) instead of later."""
        self._stopping.set()

    async def execute(self, command: Command, peer_uid: int) -> Reply:
        """Run ``command``. Raises ControlCommandError (unknown backend or server)."""
        match command:
            case Reload() | Upgrade():
                return await self._act(command, peer_uid)
            case Help():
                return Reply(help_text(), {"commands": help_text().splitlines()})
            case ShowInfo():
                await self._refresh()
                return self._show_info()
            case ShowBackends():
                await self._refresh()
                return self._show_backends()
            case ShowServers(backend=name, fleet=True):
                backends = [self._backend(name)] if name else list(self._backends.values())
                return await self._show_fleet(backends)
            case ShowServers(backend=name):
                backends = [self._backend(name)] if name else list(self._backends.values())
                await self._refresh()
                return self._show_servers(backends)
            case SetServerState() | SetServerWeight() | Flip() | Swap() if self._fleet:
                return await self._change_fleet(command, peer_uid)
            case SetServerState():
                reply = self._set_state(command, peer_uid)
                await self._journal()
                return reply
            case SetServerWeight():
                reply = self._set_weight(command, peer_uid)
                await self._journal()
                return reply
            case Flip():
                reply = await self._flip_when_up(command, peer_uid)
                await self._journal()
                return reply
            case Swap(backend=name):
                reply = self._swap(self._backend(name), peer_uid)
                await self._journal()
                return reply
            case WaitIdle():
                return await self._wait_idle(command)
            case WaitUp():
                return await self._wait_up(command)
            case ShowDeploy():
                text, data = self._deploys.show()
                return Reply(text, data)
            case ShowStatus():
                return self._show_status()
            case (
                DeployBegin()
                | DeployTakeover()
                | DeployRenew()
                | DeployStep()
                | DeployHost()
                | DeployEnd()
            ):
                if self._fleet:
                    return await self._deploy_fleet(command, peer_uid)
                text, data = self._deploys.apply(command, peer_uid)
                # Renewals too (one small fsync'ed write per 3 s): a daemon restarted during a
                # long step finds the lease still held, and its live client goes on.
                await self._journal()
                return Reply(text, data)
            case _:
                assert_never(command)

    def _backend(self, name: str) -> Backend:
        backend = self._backends.get(name)
        if backend is None:
            known = ", ".join(sorted(self._backends)) or "none"
            raise ControlCommandError(f"no backend {name!r} (backends: {known})")
        return backend

    def _server(self, backend_name: str, server_name: str) -> Server:
        backend = self._backend(backend_name)
        server = backend.server(server_name)
        if server is None:
            known = ", ".join(s.name for s in backend.servers)
            raise ControlCommandError(f"no server {server_name!r} in {backend_name} ({known})")
        return server

    async def _act(self, command: Reload | Upgrade, peer_uid: int) -> Reply:
        name = "reload" if isinstance(command, Reload) else "upgrade"
        if self.actions is None:
            raise ControlCommandError(f"{name} is not available in this process")
        if isinstance(command, Reload):
            ok, lines = await self.actions.reload(peer_uid)
        else:
            ok, lines = await self.actions.upgrade(peer_uid)
        if ok:
            return Reply("".join(f"{line}\n" for line in lines), {name: "done", "changes": lines})
        text = f"{name} refused, nothing changed:\n" + "".join(f"  {line}\n" for line in lines)
        return Reply(text, {"error": f"{name} refused", "errors": lines}, is_error=True)

    async def _refresh(self) -> None:
        if self._workers is not None:
            await self._workers.refresh()

    def _load(self, server: Server) -> tuple[int, int]:
        """(inflight, conns) of ``server``, in this process or summed over the workers."""
        if self._workers is not None:
            return self._workers.server_load(server)
        inflight, conns = server.inflight, server.conns
        for old in self._predecessors:
            if old.name == server.name and old.backend == server.backend:
                inflight, conns = inflight + old.inflight, conns + old.conns
        return inflight, conns

    def _queue(self, server: Server) -> tuple[int, int | None]:
        """(requests queued for ``server``, its maxconn or None), here or over the workers."""
        if self._workers is not None:
            return self._workers.server_queue(server)
        waitq = server.waitq
        if waitq is None:
            return 0, None
        return waitq.queued(server), server.maxconn

    def _connection_limits(self) -> tuple[int, int]:
        """(maxconn, times reached) of this process's connection budget (budget.py)."""
        if self._workers is not None:
            return self._workers.connection_limits()
        for route in self._routes:
            budget = route.gate.budget
            return budget.stats.maxconn, budget.stats.limit_hits
        return 0, 0

    def _show_status(self) -> Reply:
        """The status page's own document (one source of truth), and a table of its hosts."""
        if self.status is None:
            raise ControlCommandError("no status page: [metrics] listen is not set")
        document = self.status()
        # The document's shape is metrics/status.py's (the /status.json the page reads).
        backends = cast("list[dict[str, Any]]", document.get("backends", []))
        rows = []
        for backend in backends:
            for host in backend["hosts"]:
                members = ", ".join(
                    f"{m['name']} {m['pool']} {m['admin']} {m['health']}" for m in host["members"]
                )
                rows.append(
                    (backend["name"], host["host"], host["serving"], host["users"], members)
                )
        text = render_table(("backend", "host", "serving", "users", "members"), rows)
        return Reply(text, document)

    def _show_info(self) -> Reply:
        if self._workers is not None:
            connections = self._workers.client_connections()
        else:
            connections = sum(len(route.connections) for route in self._routes)
        data = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "listeners": len(self._routes),
            "backends": len(self._backends),
            "client_connections": connections,
        }
        data["maxconn"], data["maxconn_reached"] = self._connection_limits()
        if self._workers is not None:
            data["workers"] = self._workers.workers_serving()
        data.update(tls_info((route.listener for route in self._routes), time.time()))
        rows = [(key, value) for key, value in data.items()]
        return Reply(render_table(("info", "value"), rows), data)

    def _show_backends(self) -> Reply:
        rows = []
        for backend in self._backends.values():
            servers = backend.servers
            usable = [s for s in servers if s.takes_new_traffic]
            rows.append(
                {
                    "backend": backend.name,
                    "balance": backend.balance.value,
                    "servers": len(servers),
                    "usable": len(usable),
                    "inflight": sum(self._load(s)[0] for s in servers),
                    "queue": self._shared_queue(backend),
                }
            )
        columns = ("backend", "balance", "servers", "usable", "inflight", "queue")
        return _table_reply(rows, columns)

    def _shared_queue(self, backend: Backend) -> int:
        """Requests waiting for any server of ``backend`` (balancer/queue.py, rule 2)."""
        if self._workers is not None:
            return self._workers.shared_queue(backend.name)
        waitq = backend.servers[0].waitq if backend.servers else None
        return waitq.queued(None) if waitq is not None else 0

    def _show_servers(self, backends: Sequence[Backend]) -> Reply:
        rows = []
        for backend in backends:
            for server in backend.servers:
                result = self._health.last_result(server)
                inflight, conns = self._load(server)
                queued, maxconn = self._queue(server)
                rows.append(
                    {
                        "server": f"{backend.name}/{server.name}",
                        "pool": server.pool.value,
                        "admin": server.admin.value,
                        "health": server.health.value,
                        "weight": server.weight,
                        "pair": server.pair.name if server.pair else "-",
                        "inflight": inflight,
                        "maxconn": maxconn if maxconn is not None else "-",
                        "queue": queued,
                        "conns": conns,
                        "check": result.detail if result else "-",
                        "changed": _changes(server) or "-",
                    }
                )
        columns = (
            "server",
            "pool",
            "admin",
            "health",
            "weight",
            "pair",
            "inflight",
            "maxconn",
            "queue",
            "conns",
        )
        return _table_reply(rows, (*columns, "check", "changed"))

    def _set_state(self, command: SetServerState, peer_uid: int) -> Reply:
        server = self._server(command.backend, command.server)
        text = self._set_admin(server, command.state, peer_uid)
        return Reply(
            text, {"server": f"{server.backend}/{server.name}", "admin": command.state.value}
        )

    def _set_admin(self, server: Server, state: AdminState, peer_uid: int) -> str:
        """Change one server's admin state, log it, and describe it in one line."""
        old = server.set_admin(state, asyncio.get_running_loop().time())
        log.info(
            "server_admin server=%s/%s old=%s new=%s uid=%d",
            server.backend,
            server.name,
            old.value,
            state.value,
            peer_uid,
        )
        self.events.record(EventKind.ADMIN, _key(server), f"{old.value} -> {state.value}")
        if state is not AdminState.READY:
            self._close_idle(server)  # pooled connections must not keep it from going idle
        return f"{server.backend}/{server.name}: admin {old.value} -> {state.value}\n"

    def _flip_plan(self, command: Flip) -> tuple[Server, Server, FlipPlan]:
        """(main, pair, plan) of a flip; ControlCommandError if it is refused."""
        server = self._server(command.backend, command.server)
        pair = server.pair
        if pair is None:
            raise ControlCommandError(
                f"{command.backend}/{server.name} has no pair (a backup declaring "
                f"pair = {server.name!r}); use 'set server ... state' instead"
            )
        main, pair = (server, pair) if server.pool is PoolName.MAIN else (pair, server)
        plan = plan_flip(main, pair, command.force)
        if plan.refusal is not None:
            raise ControlCommandError(plan.refusal)
        return main, pair, plan

    def _flip(self, command: Flip, peer_uid: int) -> Reply:
        """The host's other version takes the traffic, or gives it back (server.py, rule 4)."""
        main, pair, plan = self._flip_plan(command)
        # The one taking over first, so at no instant is neither of them usable.
        first, second = ((pair, plan.pair), (main, plan.main))
        if plan.main is AdminState.READY:
            first, second = second, first
        text = ""
        for member, state in (first, second):
            if member.admin is not state:
                text += self._set_admin(member, state, peer_uid)
        serving = main if plan.main is AdminState.READY else pair
        text += f"{command.backend}/{serving.name} serves {main.identity}\n"
        self.events.record(EventKind.FLIP, _key(main), f"{serving.name} serves {main.identity}")
        data = {
            "server": f"{command.backend}/{main.name}",
            "admin": plan.main.value,
            "serving": f"{command.backend}/{serving.name}",
        }
        return Reply(text, data)

    async def _flip_when_up(self, command: Flip, peer_uid: int) -> Reply:
        """``flip``; with ``wait T``, a refusal because the member taking over fails its checks
        becomes a wait (up to T s) for it to pass them, then the flip."""
        refused = await self._wait_to_flip(command)
        return refused if refused is not None else self._flip(command, peer_uid)

    async def _wait_to_flip(self, command: Flip) -> Reply | None:
        """``flip ... wait T``: wait for the member taking over to pass its checks; the error
        reply if it does not in time, None when the flip may go on."""
        if command.wait_s is None:
            return None
        server = self._server(command.backend, command.server)
        pair = server.pair
        if pair is not None:
            main = server if server.pool is PoolName.MAIN else pair
            taking_over = main if main.admin is AdminState.MAINT else main.pair
            assert taking_over is not None  # a pair's members point at each other
            if taking_over.health is Health.DOWN:
                up = await self._wait_up(WaitUp(command.backend, taking_over.name, command.wait_s))
                if up.is_error:
                    text = f"{up.text.rstrip()}; {command.backend}/{server.name} not flipped\n"
                    return Reply(text, up.data, is_error=True)
        return None

    async def _change_fleet(
        self, command: SetServerState | SetServerWeight | Flip | Swap, peer_uid: int
    ) -> Reply:
        """[cluster]: plan the change, commit it in etcd; the watch applies it everywhere."""
        assert self._fleet is not None
        wall_now, loop_now = time.time(), asyncio.get_running_loop().time()
        match command:
            case SetServerState(backend, name, state):
                change = fleet.set_admin(self._server(backend, name), state, wall_now, loop_now)
            case SetServerWeight(backend, name, weight):
                change = fleet.set_weight(self._server(backend, name), weight, wall_now, loop_now)
            case Flip():
                refused = await self._wait_to_flip(command)
                if refused is not None:
                    return refused
                main, pair, plan = self._flip_plan(command)
                wall_now, loop_now = time.time(), asyncio.get_running_loop().time()
                change = fleet.flip(main, pair, plan, wall_now, loop_now)
            case Swap(backend=name):
                change = fleet.swap(self._backend(name), wall_now, loop_now)
            case _:
                assert_never(command)
        if not change.states:
            return Reply(change.text, change.data)
        try:
            revision = await self._fleet.commit(change.states, peer_uid)
        except ClusterConflict as exc:
            raise ControlCommandError(f"conflict: {exc}") from None
        except ClusterUnavailable as exc:
            raise ControlCommandError(str(exc)) from None
        # Answered once every live instance applied it, so `show servers` anywhere agrees.
        lagging = await self._fleet.lagging(revision)
        text = change.text
        if lagging:
            text += f"committed, not yet applied on: {', '.join(lagging)}\n"
        return Reply(text, {**change.data, "revision": revision, "lagging": lagging})

    def apply_shared(self, backend_name: str, server_name: str, state: ServerState) -> bool:
        """A change committed in the fleet (by any instance): apply it here, log it once,
        journal it (this instance's copy for a start without etcd). True if it changed."""
        backend = self._backends.get(backend_name)
        server = backend.server(server_name) if backend is not None else None
        if server is None:
            log.info("cluster_server_unknown server=%s/%s", backend_name, server_name)
            return False
        old_admin, old_weight, old_pool = server.admin, server.weight, server.pool
        if not shared.apply(server, state, time.time(), asyncio.get_running_loop().time()):
            return False
        log.info(
            "server_shared server=%s/%s old=%s/%d/%s new=%s by=%s uid=%d",
            server.backend,
            server.name,
            old_admin.value,
            old_weight,
            old_pool.value,
            state.describe(),
            state.by,
            state.uid,
        )
        if old_admin is not state.admin:
            self.events.record(
                EventKind.ADMIN, _key(server), f"{old_admin.value} -> {state.admin.value}"
            )
        if old_weight != state.weight:
            self.events.record(EventKind.WEIGHT, _key(server), f"{old_weight} -> {state.weight}")
        if old_pool is not state.pool:
            self.events.record(EventKind.SWAP, _key(server), f"pool {state.pool.value}")
        if state.admin is not AdminState.READY or state.pool is PoolName.BACKUP:
            self._close_idle(server)
        self._later.run_soon()
        return True

    async def _deploy_fleet(self, command: DeployCommand, peer_uid: int) -> Reply:
        """[cluster]: the deploy's lock is an etcd lease and its record a key every instance
        follows, so ``show deploy`` and the metrics tell the same story everywhere."""
        assert self._fleet is not None
        planned = self._deploys.plan(command, peer_uid)
        record = planned.record
        value = json.dumps({**record.to_json(time.time()), "token": record.token}).encode()
        try:
            await self._fleet.commit_deploy(value, fleet.lock_change(command), record.holder())
        except ClusterConflict as exc:
            raise ControlCommandError(f"deploy refused: {exc}") from None
        except ClusterUnavailable as exc:
            raise ControlCommandError(str(exc)) from None
        self._deploys.adopt(planned)
        await self._journal()
        return Reply(planned.text, planned.data)

    def apply_deploy(self, value: bytes) -> None:
        """The deploy record as committed in the fleet (any instance's ``zdlb deploy``)."""
        try:
            data = json.loads(value)
            record = deploy_record.from_json(data)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("cluster_deploy_record_ignored reason=%s", exc)
            return
        if record != self._deploys.record:
            self._deploys.follow(record)  # its steps reach this status page's timeline too
            self._later.run_soon()

    def fleet_view(self) -> dict[str, dict[str, object]]:
        """This instance's view of its servers, which it publishes to the fleet (every
        PUBLISH_POLL_S; control/fleet.py's ``view_of``)."""
        return fleet.view_of(self._backends.values(), self._load, self._close_idle)

    async def _show_fleet(self, backends: Sequence[Backend]) -> Reply:
        if self._fleet is None:
            raise ControlCommandError("no fleet: [cluster] is not configured")
        try:
            views = await self._fleet.views()
        except ClusterUnavailable as exc:
            raise ControlCommandError(str(exc)) from None
        servers = [_key(server) for backend in backends for server in backend.servers]
        text, data = fleet.render_views(views, servers)
        return Reply(text, data)

    async def _wait_up(self, command: WaitUp) -> Reply:
        """Until the server passes its checks again (control/waits.py), or the timeout."""
        server = self._server(command.backend, command.server)
        answer = await wait_up(server, self._health, self._stopping, command.timeout_s, WAIT_POLL_S)
        return Reply(answer.text, answer.data, answer.is_error)

    def _swap(self, backend: Backend, peer_uid: int) -> Reply:
        """Blue/green: exchange the pools. In-flight requests finish where they are."""
        backend.swap_pools()
        lines = []
        for server in backend.servers:
            lines.append(f"{backend.name}/{server.name}: pool {server.pool.value}\n")
            if server.pool is PoolName.BACKUP:
                self._close_idle(server)
        log.info(
            "backend_swapped backend=%s main=%s uid=%d",
            backend.name,
            ",".join(s.name for s in backend.servers if s.pool is PoolName.MAIN),
            peer_uid,
        )
        pools = {f"{backend.name}/{s.name}": s.pool.value for s in backend.servers}
        self.events.record(EventKind.SWAP, backend.name, lines[0].strip() + ", ...")
        return Reply("".join(lines), {"backend": backend.name, "pools": pools})

    def _set_weight(self, command: SetServerWeight, peer_uid: int) -> Reply:
        server = self._server(command.backend, command.server)
        old = server.weight
        server.weight = command.weight
        log.info(
            "server_weight server=%s/%s old=%d new=%d uid=%d",
            server.backend,
            server.name,
            old,
            command.weight,
            peer_uid,
        )
        text = f"{server.backend}/{server.name}: weight {old} -> {command.weight}\n"
        self.events.record(EventKind.WEIGHT, _key(server), f"{old} -> {command.weight}")
        return Reply(text, {"server": f"{server.backend}/{server.name}", "weight": command.weight})

    async def _wait_idle(self, command: WaitIdle) -> Reply:
        """Until the server has no request in flight and no open connection, or the timeout."""
        server = self._server(command.backend, command.server)
        if server.admin is not AdminState.READY or server.health is Health.DOWN:
            self._close_idle(server)
        name = f"{server.backend}/{server.name}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + command.timeout_s
        await self._refresh()
        while any(inflight_conns := self._load(server)):
            inflight, conns = inflight_conns
            if self._stopping.is_set():
                return Reply(f"{name}: the daemon is stopping\n", {"error": "stopping"}, True)
            if loop.time() >= deadline:
                data = {
                    "error": "timeout",
                    "server": name,
                    "idle": False,
                    "inflight": inflight,
                    "conns": conns,
                }
                text = f"{name}: timeout, inflight={inflight} conns={conns}\n"
                return Reply(text, data, is_error=True)
            await asyncio.sleep(WAIT_POLL_S)
            if server.admin is not AdminState.READY:
                self._close_idle(server)  # connections released since the last look
            await self._refresh()
        if self._fleet is not None:
            answer = await wait_fleet_idle(
                self._fleet, name, self._stopping, deadline, FLEET_POLL_S
            )
            return Reply(answer.text, answer.data, answer.is_error)
        return Reply(f"{name}: idle\n", {"server": name, "idle": True})

    async def _journal(self) -> None:
        """Record the runtime changes so a restart keeps them (in a thread: it fsyncs)."""
        if self._state_file is None:
            return
        servers = [server for backend in self._backends.values() for server in backend.servers]
        try:
            deploy = self._deploys.journal_data()
            await asyncio.to_thread(journal.save, self._state_file, servers, deploy)
        except OSError as exc:
            # The change is made; only its survival across a restart failed: say so loudly.
            log.error("state_journal_write_failed file=%s error=%s", self._state_file, exc)

    def _close_idle(self, server: Server) -> None:
        if self._workers is not None:
            self._workers.close_idle(server)
            return
        for route in self._routes:
            if not isinstance(route, Route):
                continue  # a TCP tunnel holds no idle connection: it ends with its client
            pool = route.upstreams.get(server)
            if pool is not None and pool.server is server:
                pool.close_idle()


def _key(server: Server) -> str:
    return f"{server.backend}/{server.name}"


def _changes(server: Server) -> str:
    """What differs from the config: the runtime changes an operator made."""
    changes = []
    if server.admin is not AdminState.READY:
        changes.append(f"admin={server.admin.value}")
    if server.weight != server.config.weight:
        changes.append(f"weight={server.config.weight}->{server.weight}")
    if server.pool is not server.config.pool:
        changes.append(f"pool={server.config.pool.value}->{server.pool.value}")
    return " ".join(changes)


def _table_reply(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> Reply:
    table = render_table(columns, [[row[c] for c in columns] for row in rows])
    return Reply(table, rows)
