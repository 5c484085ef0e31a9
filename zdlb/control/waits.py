"""``wait BACKEND/SERVER up``: until a server passes its checks again, for the control socket.

"Up" means health UP *and* ``rise`` passes of probes that started after the wait began: right
after a restart a server can still read UP (its checks have not failed ``fall`` times yet), and
a probe in flight when the wait began may have reached the version being replaced. An unchecked
server is always up: the answer comes at once. The answer's text and data are the control
reply's; this module neither parses commands nor changes any state.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from zdlb.balancer.server import Health, Server
from zdlb.health.scheduler import HealthChecker


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
