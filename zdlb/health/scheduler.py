"""Health check scheduling: one jittered probe loop per checked server, and passive observation.

``HealthChecker.run()`` owns one task per server whose config has a check, in a ``TaskGroup``.
Each task waits a random fraction of its interval first, so the probes of many servers spread
out instead of hitting the network (and the servers) in one burst after a start or a reload;
then it probes, feeds the result to the server's ``Verdict`` and, when health flips, sets
``Server.health`` and logs one line. It checks at ``fast_interval_s`` while a streak toward the
other health is running, so a change is confirmed (or dismissed) quickly.

``observe()`` is the passive side, called by the proxy once per request: a plain dict lookup
and a counter, with no logging unless health flips.

This module must not judge a probe (``probes.py``) nor count rise/fall (``verdict.py``), and
runs no task that ``run()`` does not own.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable

from zdlb.balancer.server import Health, Server
from zdlb.config.model import Address, CheckConfig
from zdlb.events import EventKind, Timeline
from zdlb.health.probes import ProbeResult, probe_target, run_probe
from zdlb.health.verdict import Transition, Verdict
from zdlb.tls.context import originate

log = logging.getLogger(__name__)

# Called after a transition was applied to the server and logged (metrics, control socket).
TransitionHook = Callable[[Server, Transition], None]


class _ServerCheck:
    """Everything the checker keeps for one checked server."""

    __slots__ = (
        "check",
        "checked_at",
        "errors",
        "host_header",
        "last_result",
        "recent",
        "server",
        "target",
        "tls",
        "verdict",
    )

    def __init__(self, server: Server, check: CheckConfig) -> None:
        self.server = server
        self.check = check
        self.verdict = Verdict(check.rise, check.fall, server.health)
        self.target: Address = probe_target(server.address, check)
        # The Host a proxied request without one gets (see http/upstream.py): the server's
        # own address, even when the probe goes to an override.
        self.host_header = str(server.address)
        self.tls = originate(server.config.tls, server.address.host)  # checks over TLS too
        self.last_result: ProbeResult | None = None
        self.checked_at = 0.0  # wall clock (time.time()) of last_result, for people to read
        self.errors = 0  # consecutive errors seen on live traffic
        # (loop time the probe started, passed) of the last `rise` probes: `wait ... up` asks
        # for `rise` passes of probes that started after it began (passes_since).
        self.recent: deque[tuple[float, bool]] = deque(maxlen=check.rise)


class HealthChecker:
    """Active and passive health checks of a set of servers; sets ``Server.health``.

    Only servers whose ``config.check`` is not ``None`` are checked; others are ignored by every
    method. ``rng`` draws the start jitter (pass a seeded one for reproducible tests).
    ``on_transition`` is called after each health change is applied and logged; it must not
    block or raise. ``events``: the timeline every transition is recorded in.
    """

    def __init__(
        self,
        servers: Iterable[Server],
        rng: random.Random | None = None,
        *,
        on_transition: TransitionHook | None = None,
        events: Timeline | None = None,
    ) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._events = events
        self._on_transition = on_transition
        self._checks: dict[Server, _ServerCheck] = {}
        for server in servers:
            if (check := server.config.check) is not None:
                self._checks[server] = _ServerCheck(server, check)

    def __repr__(self) -> str:
        down = sum(1 for c in self._checks.values() if c.verdict.health is Health.DOWN)
        return f"<HealthChecker servers={len(self._checks)} down={down}>"

    async def run(self) -> None:
        """Check every checked server until cancelled; returns only by raising CancelledError.

        Cancelling it cancels every probe and waits for their sockets to close.
        """
        async with asyncio.TaskGroup() as group:
            for entry in self._checks.values():
                delay_s = self._rng.uniform(0.0, entry.check.interval_s)
                name = f"health {entry.server.backend}/{entry.server.name}"
                group.create_task(self._check_forever(entry, delay_s), name=name)
            # The group's tasks never end on their own; this keeps run() alive (until it is
            # cancelled) even when no server is checked at all.
            await asyncio.get_running_loop().create_future()

    def observe(self, server: Server, ok: bool) -> None:
        """Count one live-traffic outcome (connect failure or 5xx: not ``ok``) for ``server``.

        ``check.observe_errors`` consecutive errors mark it DOWN at once; any ``ok`` resets the
        count. Ignored for servers not checked or without ``check.observe``. Called per request,
        hence nothing but a dict lookup and a counter on the common path.
        """
        entry = self._checks.get(server)
        if entry is None:
            return
        if ok:
            entry.errors = 0
            return
        if not entry.check.observe:
            return
        entry.errors += 1
        if entry.errors < entry.check.observe_errors:
            return
        count, entry.errors = entry.errors, 0
        transition = entry.verdict.force_down(f"{count} consecutive errors on live traffic")
        if transition is not None:
            self._apply(entry, transition)

    def verdict(self, server: Server) -> Verdict | None:
        """The server's verdict, or ``None`` if it is not checked."""
        entry = self._checks.get(server)
        return entry.verdict if entry is not None else None

    def last_result(self, server: Server) -> ProbeResult | None:
        """The server's latest probe result; ``None`` if not checked or not probed yet."""
        entry = self._checks.get(server)
        return entry.last_result if entry is not None else None

    def checked_at(self, server: Server) -> float | None:
        """When (``time.time()``) the latest probe of ``server`` ended; ``None`` if none."""
        entry = self._checks.get(server)
        return entry.checked_at if entry is not None and entry.last_result is not None else None

    def passes_since(self, server: Server, since: float) -> int | None:
        """Consecutive passes, latest first, of probes that started at or after ``since`` (loop
        time), counting at most ``rise``; ``None`` if the server is not checked.

        A probe already running at ``since`` may have reached the version a deploy just
        replaced, so it does not count.
        """
        entry = self._checks.get(server)
        if entry is None:
            return None
        count = 0
        for started_at, passed in reversed(entry.recent):
            if started_at < since or not passed:
                break
            count += 1
        return count

    async def _check_forever(self, entry: _ServerCheck, delay_s: float) -> None:
        check = entry.check
        loop = asyncio.get_running_loop()
        await asyncio.sleep(delay_s)
        while True:
            started_at = loop.time()
            result = await run_probe(check, entry.target, entry.host_header, entry.tls)
            entry.last_result, entry.checked_at = result, time.time()
            entry.recent.append((started_at, result.passed))
            transition = entry.verdict.record(result.passed, result.detail)
            if transition is not None:
                self._apply(entry, transition)
            await asyncio.sleep(
                check.fast_interval_s if entry.verdict.is_changing else check.interval_s
            )

    def _apply(self, entry: _ServerCheck, transition: Transition) -> None:
        server = entry.server
        server.set_health(transition.new)
        log.log(
            logging.WARNING if transition.new is Health.DOWN else logging.INFO,
            "server_health server=%s/%s old=%s new=%s reason=%s",
            server.backend,
            server.name,
            transition.old.value,
            transition.new.value,
            transition.reason,
        )
        if self._events is not None:
            detail = f"{transition.old.value} -> {transition.new.value}: {transition.reason}"
            self._events.record(EventKind.HEALTH, f"{server.backend}/{server.name}", detail)
        if self._on_transition is not None:
            self._on_transition(server, transition)
