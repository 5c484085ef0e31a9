"""Control commands in a fleet (``[cluster]``): a change planned here, committed in etcd.

In a fleet a command does not change the servers itself: it plans the servers' new shared
states (``Change``), the fleet commits them (zdlb/cluster/fleet.py), and the watch applies them
on every instance, this one included, through ``Controller.apply_shared``. The plan mirrors
what the command does alone (commands.py): the same refusals, the same reply. Also ``show
servers --fleet``'s table, this instance's published view, and ``FleetLink``: what the
controller needs of the fleet. No I/O and no clock here (callers pass ``wall_now`` and
``loop_now``; ``view_of`` asks for idle connections to be closed through its callback).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from zdlb.balancer.pool import Backend
from zdlb.balancer.server import AdminState, FlipPlan, Server
from zdlb.cluster import state as shared
from zdlb.cluster.state import LockChange, ServerState
from zdlb.config.model import PoolName
from zdlb.control.deploy_protocol import (
    DeployBegin,
    DeployCommand,
    DeployEnd,
    DeployRenew,
    DeployTakeover,
)
from zdlb.control.protocol import render_table


class FleetLink(Protocol):
    """The fleet's shared state (zdlb/cluster/fleet.py's ``Fleet``), with ``[cluster]``.

    A change is committed there, then applied on every instance (this one included) through
    ``Controller.apply_shared``; ``views`` are every live instance's published views.
    """

    def attach(self, sink: Any) -> None:
        """Start applying the fleet's changes to ``sink`` (this controller)."""
        ...

    async def commit(self, changes: Mapping[tuple[str, str], ServerState], uid: int) -> int:
        """The revision committed. Raises ClusterUnavailable or ClusterConflict; nothing
        changed then."""
        ...

    async def lagging(self, revision: int) -> list[str]:
        """The live instances that did not report ``revision`` applied within a bound."""
        ...

    async def views(self) -> dict[str, dict[str, Any]]: ...

    async def commit_deploy(self, value: bytes, lock: LockChange, holder: str) -> None:
        """The deploy record and lock (``zdlb deploy``); raises as ``commit``."""
        ...

    @property
    def instance(self) -> str:
        """This instance's name in the fleet."""
        ...


@dataclass(frozen=True, slots=True)
class Change:
    """The shared states a command sets, by (backend, server), in the order to apply them;
    ``text``/``data``: its reply once committed."""

    states: dict[tuple[str, str], ServerState]
    text: str
    data: dict[str, object]


def _state(server: Server, wall_now: float, loop_now: float) -> ServerState:
    return shared.state_of(server, wall_now, loop_now)


def set_admin(server: Server, admin: AdminState, wall_now: float, loop_now: float) -> Change:
    before = _state(server, wall_now, loop_now)
    after = shared.with_admin(before, admin, wall_now + server.drain_hold_s)
    name = f"{server.backend}/{server.name}"
    text = f"{name}: admin {before.admin.value} -> {admin.value}\n"
    return Change(
        {(server.backend, server.name): after}, text, {"server": name, "admin": admin.value}
    )


def set_weight(server: Server, weight: int, wall_now: float, loop_now: float) -> Change:
    before = _state(server, wall_now, loop_now)
    name = f"{server.backend}/{server.name}"
    text = f"{name}: weight {before.weight} -> {weight}\n"
    after = replace(before, weight=weight)
    return Change({(server.backend, server.name): after}, text, {"server": name, "weight": weight})


def flip(main: Server, pair: Server, plan: FlipPlan, wall_now: float, loop_now: float) -> Change:
    """Rule 4 of balancer/server.py: the member taking over is written first."""
    order = [(pair, plan.pair), (main, plan.main)]
    if plan.main is AdminState.READY:
        order.reverse()
    states, text = {}, ""
    for member, admin in order:
        before = _state(member, wall_now, loop_now)
        if before.admin is not admin:
            states[(member.backend, member.name)] = shared.with_admin(
                before, admin, wall_now + member.drain_hold_s
            )
            text += f"{member.backend}/{member.name}: admin {before.admin.value} -> {admin.value}\n"
    serving = main if plan.main is AdminState.READY else pair
    text += f"{main.backend}/{serving.name} serves {main.identity}\n"
    data: dict[str, object] = {
        "server": f"{main.backend}/{main.name}",
        "admin": plan.main.value,
        "serving": f"{main.backend}/{serving.name}",
    }
    return Change(states, text, data)


def swap(backend: Backend, wall_now: float, loop_now: float) -> Change:
    states, lines, pools = {}, [], {}
    for server in backend.servers:
        pool = PoolName.BACKUP if server.pool is PoolName.MAIN else PoolName.MAIN
        states[(backend.name, server.name)] = replace(_state(server, wall_now, loop_now), pool=pool)
        lines.append(f"{backend.name}/{server.name}: pool {pool.value}\n")
        pools[f"{backend.name}/{server.name}"] = pool.value
    return Change(states, "".join(lines), {"backend": backend.name, "pools": pools})


def lock_change(command: DeployCommand) -> LockChange:
    """What a ``deploy ...`` command does to the fleet's deploy lock (an etcd lease)."""
    match command:
        case DeployBegin():
            return LockChange.TAKE
        case DeployTakeover():
            return LockChange.TAKE_OVER
        case DeployRenew():
            return LockChange.RENEW
        case DeployEnd():
            return LockChange.RELEASE
        case _:
            return LockChange.KEEP


def render_views(
    views: Mapping[str, Mapping[str, Any]], servers: Iterable[str]
) -> tuple[str, dict[str, object]]:
    """``show servers --fleet``: a row per server, a column per live instance, each cell
    "admin/health w=WEIGHT pool inflight=N" as that instance sees it ("?" if it has no such
    server, e.g. before a reload reached it)."""
    names = sorted(views)
    rows = []
    for server in servers:
        row: list[object] = [server]
        for name in names:
            view = views[name].get("servers", {}).get(server)
            row.append(_cell(view) if isinstance(view, Mapping) else "?")
        rows.append(row)
    text = render_table(("server", *names), rows)
    instances = {
        name: {"synced": views[name].get("synced"), "revision": views[name].get("revision")}
        for name in names
    }
    return text, {"instances": instances, "views": {n: views[n].get("servers") for n in names}}


def _cell(view: Mapping[str, Any]) -> str:
    return (
        f"{view.get('admin')}/{view.get('health')} w={view.get('weight')} {view.get('pool')} "
        f"inflight={view.get('inflight')}"
    )


def view_of(
    backends: Iterable[Backend],
    load: Callable[[Server], tuple[int, int]],
    close_idle: Callable[[Server], None],
) -> dict[str, dict[str, object]]:
    """This instance's view of its servers, by "backend/server", with ``load`` (in flight,
    connections). A server that takes no new traffic here gets its idle pooled connections
    closed again (``close_idle``) each time: one released after a change reached this
    instance would keep a fleet-wide ``wait idle`` waiting for the upstream's idle timeout
    (the local wait does the same in its loop)."""
    view: dict[str, dict[str, object]] = {}
    for backend in backends:
        for server in backend.servers:
            inflight, conns = load(server)
            if conns and not server.takes_new_traffic:
                close_idle(server)
            view[f"{backend.name}/{server.name}"] = {
                "admin": server.admin.value,
                "health": server.health.value,
                "weight": server.weight,
                "pool": server.pool.value,
                "inflight": inflight,
                "conns": conns,
            }
    return view
