"""``wait BACKEND/SERVER up``: until a server passes its checks again, for the control socket;
and a fleet's ``wait ... idle``: until no other instance serves it either.

"Up" means health UP *and* ``rise`` passes of probes that started after the wait began: right
after a restart a server can still read UP (its checks have not failed ``fall`` times yet), and
a probe in flight when the wait began may have reached the version being replaced. An unchecked
server is always up: the answer comes at once. The answer's text and data are the control
reply's; this module neither parses commands nor changes any state.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from zdlb.balancer.server import Health, Server
from zdlb.errors import ClusterUnavailable, ControlCommandError
from zdlb.health.scheduler import HealthChecker


class FleetViews(Protocol):
    """The fleet's published views (cluster/fleet.py's ``Fleet``), and this instance's name."""

    @property
    def instance(self) -> str: ...

    async def views(self) -> dict[str, dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class UpAnswer:
    """What ``wait ... up`` answers: text, JSON data, whether it is an error (timeout, stop)."""

    text: str
    data: dict[str, object]
    is_error: bool = False


async def wait_up(
    server: Server,
    health: HealthChecker,
    stopping: asyncio.Event,
    timeout_s: float,
    poll_s: float,
) -> UpAnswer:
    """Poll every ``poll_s`` until ``server`` is up (see the module), ``timeout_s`` passed, or
    ``stopping`` is set (the daemon shuts down)."""
    name = f"{server.backend}/{server.name}"
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + timeout_s
    verdict = health.verdict(server)
    rise = verdict.rise if verdict is not None else 0
    while True:
        passes = health.passes_since(server, began)
        if server.health is Health.UP and (passes is None or passes >= rise):
            waited_s = round(loop.time() - began, 3)
            data = {"server": name, "up": True, "passes": passes, "waited_s": waited_s}
            return UpAnswer(f"{name}: up\n", data)
        if stopping.is_set():
            return UpAnswer(f"{name}: the daemon is stopping\n", {"error": "stopping"}, True)
        if loop.time() >= deadline:
            result = health.last_result(server)
            check = result.detail if result is not None else "no probe yet"
            data = {
                "error": "timeout",
                "server": name,
                "up": False,
                "health": server.health.value,
                "passes": passes,
                "check": check,
            }
            text = f"{name}: timeout, health={server.health.value} check={check}\n"
            return UpAnswer(text, data, is_error=True)
        await asyncio.sleep(poll_s)


async def wait_fleet_idle(
    fleet: FleetViews, name: str, stopping: asyncio.Event, deadline: float, poll_s: float
) -> UpAnswer:
    """``wait B/S idle`` in a fleet, once idle here: until every other live instance publishes
    no request in flight and no connection to ``name`` ("backend/server"), or ``deadline``
    (loop time). An instance's view lives under its lease, so a dead one stops counting.
    Raises ControlCommandError when etcd does not answer."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            views = await fleet.views()
        except ClusterUnavailable as exc:
            raise ControlCommandError(f"{name}: cannot see the fleet's load: {exc}") from None
        busy = {
            instance: (load.get("inflight", 0), load.get("conns", 0))
            for instance, view in views.items()
            if instance != fleet.instance
            and isinstance(load := view.get("servers", {}).get(name), dict)
            and (load.get("inflight") or load.get("conns"))
        }
        if not busy:
            data: dict[str, object] = {"server": name, "idle": True, "instances": sorted(views)}
            return UpAnswer(f"{name}: idle on {len(views)} instances\n", data)
        if stopping.is_set():
            return UpAnswer(f"{name}: the daemon is stopping\n", {"error": "stopping"}, True)
        if loop.time() >= deadline:
            where = ", ".join(f"{i} inflight={n} conns={c}" for i, (n, c) in sorted(busy.items()))
            data = {"error": "timeout", "server": name, "idle": False, "busy": sorted(busy)}
            return UpAnswer(f"{name}: timeout, busy on {where}\n", data, is_error=True)
        await asyncio.sleep(poll_s)
