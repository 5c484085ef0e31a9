"""Runs a deploy: each host through deploy/plan.py's procedure, over the control socket.

``Deployer.run()`` takes the daemon's deploy lock, then for each host in turn reports every step
to the daemon (which journals it), carries it out, and on a failure puts the host's traffic where
plan.py says, runs ``--on-failure``, and stops. ``resume()`` takes over an interrupted or failed
deploy and continues where plan.py says; ``rollback()`` makes every host the deploy touched serve
its last good version again. A task renews the lock's lease while any of them runs.

The steps are control commands (``flip``, ``wait ... idle|up``, ``show servers``) plus the
user's command and the verify request (actions.py). Decisions live in plan.py, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from zdlb.config.model import Address
from zdlb.deploy.actions import StepFailed, run_command, verify
from zdlb.deploy.client import ControlClient, ControlUnreachable, DeployCommandRefused
from zdlb.deploy.plan import (
    Role,
    Step,
    Target,
    procedure,
    resume_from,
    rollback_role,
    serve_after_failure,
    serving_during,
)
from zdlb.deploy.progress import Event, EventKind, HostSummary, Progress
from zdlb.deploy.record import DEPLOY_LEASE_S
from zdlb.errors import ZdlbError

# Renew the lease five times per lease: two lost renewals still leave it held.
RENEW_EVERY_S = DEPLOY_LEASE_S / 5
# A reason sent to the daemon (and shown by `show deploy`) is cut here: a command line is at
# most 4096 bytes, and a screenful of a failed command's output belongs in the log.
MAX_REASON_CHARS = 300
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class DeployOptions:
    """What the command line asked for. Timeouts in seconds."""

    backend: str
    servers: tuple[str, ...] = ()
    to: Target = Target.MAIN
    run: str | None = None
    verify_path: str | None = None
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)
    on_failure: str | None = None
    idle_timeout_s: float = 30.0
    run_timeout_s: float = 300.0
    up_timeout_s: float = 60.0
    verify_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Host:
    """One host of the deploy: its main, its pair, and which one gets the new version."""

    main: str
    pair: str
    to: Target

    @property
    def target(self) -> str:
        return self.main if self.to is Target.MAIN else self.pair

    @property
    def other(self) -> str:
        return self.pair if self.to is Target.MAIN else self.main

    def member(self, role: Role) -> str:
        return self.target if role is Role.TARGET else self.other


class DeployFailed(ZdlbError):
    """The deploy stopped: the message names the host, the step and the reason."""


class Deployer:
    """One ``zdlb deploy`` run. ``addresses``: each server's address, from the config file."""

    def __init__(
        self,
        client: ControlClient,
        options: DeployOptions,
        progress: Progress,
        addresses: Mapping[str, Address],
    ) -> None:
        self._client = client
        self._options = options
        self._progress = progress
        self._addresses = addresses
        self._token = ""
        self.hosts: dict[str, HostSummary] = {}

    def __repr__(self) -> str:
        return f"<Deployer {self._options.backend} to={self._options.to.value}>"

    async def run(self) -> None:
        """A new deploy. Raises DeployFailed, DeployCommandRefused, ControlUnreachable."""
        o = self._options
        line = f"deploy begin {o.backend} to {o.to.value} pid {os.getpid()}"
        record = await self._client.call(" ".join((line, *o.servers)))
        await self._with_lease(record, self._deploy_hosts(record, resume=False))

    async def resume(self) -> None:
        """Continue an interrupted or failed deploy."""
        record = await self._takeover()
        await self._with_lease(record, self._deploy_hosts(record, resume=True))

    async def rollback(self) -> None:
        """Every host an unfinished deploy touched serves its last good version again."""
        record = await self._takeover()
        await self._with_lease(record, self._roll_back(record))

    async def _takeover(self) -> Any:
        record = await self._client.call(f"deploy takeover pid {os.getpid()}")
        if record["backend"] != self._options.backend:
            await self._end(record["token"], "interrupted", "taken over for another backend")
            raise DeployFailed(f"the unfinished deploy is of backend {record['backend']!r}")
        if record["to"] != self._options.to.value:
            self._options = replace(self._options, to=Target(record["to"]))
        return record

    async def _with_lease(self, record: Any, work: Awaitable[None]) -> None:
        self._token = record["token"]
        self.hosts = {
            h["main"]: HostSummary(h["main"], status=h["status"]) for h in record["hosts"]
        }
        started = Event(EventKind.DEPLOY_STARTED, text=record["status"], hosts=tuple(self.hosts))
        self._progress.emit(started)
        renewer = asyncio.create_task(self._renew_forever())
        try:
            await work
        except asyncio.CancelledError:
            await asyncio.shield(self._end(self._token, "interrupted", "the client stopped"))
            raise
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            # A lost renewal is retried; a lost lock makes the next step fail and say why.
            with contextlib.suppress(ControlUnreachable, DeployCommandRefused):
                await self._client.call(f"deploy renew {self._token}")

    async def _end(self, token: str, result: str, reason: str) -> None:
        with contextlib.suppress(ControlUnreachable, DeployCommandRefused):
            await self._client.call(f"deploy end {token} {result} {reason}".rstrip())
        self._progress.emit(Event(EventKind.DEPLOY_ENDED, text=result))

    async def _deploy_hosts(self, record: Any, *, resume: bool) -> None:
        to = self._options.to
        for entry in record["hosts"]:
            status, step = entry["status"], entry["step"]
            if status in ("done", "rolled-back"):
                continue
            first = Step.CHECK
            if resume and status in ("running", "failed") and step is not None:
                first = resume_from(to, Step(step), failed=status == "failed")
            host = Host(entry["main"], entry["pair"], to)
            try:
                await self._deploy_host(host, first)
            except DeployFailed:
                await self._end(self._token, "failed", f"{host.main} failed")
                raise
        await self._end(self._token, "done", "")

    async def _deploy_host(self, host: Host, first: Step) -> None:
        summary = self.hosts[host.main]
        summary.status = "running"
        began = time.monotonic()
        steps = procedure(host.to)
        for step in steps[steps.index(first) :]:
            summary.step = step
            await self._client.call(f"deploy step {self._token} {host.main} {step.value}")
            self._progress.emit(Event(EventKind.STEP_STARTED, host.main, step))
            started = time.monotonic()
            try:
                await self._do(step, host)
            except (StepFailed, DeployCommandRefused, ControlUnreachable) as exc:
                summary.steps_s[step] = time.monotonic() - started
                summary.elapsed_s = time.monotonic() - began
                await self._fail(host, step, str(exc), summary)
            elapsed = time.monotonic() - started
            summary.steps_s[step] = elapsed
            self._progress.emit(Event(EventKind.STEP_DONE, host.main, step, elapsed))
        summary.status, summary.elapsed_s = "done", time.monotonic() - began
        await self._client.call(f"deploy host {self._token} {host.main} done")
        self._progress.emit(Event(EventKind.HOST_DONE, host.main, None, summary.elapsed_s))

    async def _fail(self, host: Host, step: Step, reason: str, summary: HostSummary) -> None:
        """Rule 2 of plan.py, --on-failure, then DeployFailed naming the step and reason."""
        self._progress.emit(Event(EventKind.STEP_FAILED, host.main, step, text=reason))
        role = serve_after_failure(host.to, step)
        if role is not None:
            member = host.member(role)
            try:
                await self._ensure_serving(host, member, wait_s=0.0)
                self._progress.emit(Event(EventKind.NOTE, host.main, text=f"{member} serves"))
            except (DeployCommandRefused, ControlUnreachable) as exc:
                reason += f"; and {member} could not take the traffic back: {exc}"
        if self._options.on_failure:
            await self._on_failure(host, step, reason)
        reason = _clean(reason)
        summary.status, summary.reason = "failed", f"{step.value}: {reason}"
        with contextlib.suppress(DeployCommandRefused, ControlUnreachable):
            line = f"deploy host {self._token} {host.main} failed {step.value}: {reason}"
            await self._client.call(line)
        self._progress.emit(Event(EventKind.HOST_FAILED, host.main, step, text=reason))
        raise DeployFailed(f"{host.main} failed at step {step.value}: {reason}")

    async def _on_failure(self, host: Host, step: Step, reason: str) -> None:
        assert self._options.on_failure is not None
        try:
            env = {**self._env(host), "ZDLB_FAILED_STEP": step.value, "ZDLB_REASON": reason}
            await run_command(
                self._options.on_failure, env, self._options.run_timeout_s, self._output(host)
            )
            self._progress.emit(Event(EventKind.NOTE, host.main, text="--on-failure ran"))
        except StepFailed as exc:
            self._progress.emit(Event(EventKind.NOTE, host.main, text=f"--on-failure: {exc}"))

    async def _do(self, step: Step, host: Host) -> None:
        o, b = self._options, self._options.backend
        match step:
            case Step.CHECK:
                await self._check(host)
            case Step.FLIP:
                await self._ensure_serving(host, host.pair, wait_s=0.0)
            case Step.WAIT_IDLE:
                line = f"wait {b}/{host.target} idle {o.idle_timeout_s!r}"
                await self._client.call(line, o.idle_timeout_s)
            case Step.RUN:
                if o.run is not None:
                    await run_command(o.run, self._env(host), o.run_timeout_s, self._output(host))
            case Step.WAIT_UP:
                await self._client.call(
                    f"wait {b}/{host.target} up {o.up_timeout_s!r}", o.up_timeout_s
                )
            case Step.VERIFY:
                await self._verify(host)
            case Step.FLIP_BACK:
                await self._ensure_serving(host, host.main, wait_s=o.up_timeout_s)
            case Step.CONFIRM:
                row = (await self._rows())[host.target]
                if (row["admin"], row["health"]) != ("ready", "up"):
                    raise StepFailed(f"{host.target} is {row['health']} ({row['admin']})")
                await self._verify(host)

    async def _check(self, host: Host) -> None:
        stand_in = host.member(serving_during(host.to, Step.RUN))
        rows = await self._rows()
        if rows[host.target]["check"] == "-" and self._options.verify_path is None:
            # Unchecked servers are always up: wait-up returns at once and cannot tell.
            note = f"{host.target} has no health check: only --verify could catch a bad version"
            self._progress.emit(Event(EventKind.NOTE, host.main, text=note))
        row = rows[stand_in]
        if (row["admin"], row["health"]) != ("ready", "up"):
            raise StepFailed(
                f"{stand_in} is {row['health']} ({row['admin']}): it must serve "
                f"{host.main}'s users meanwhile"
            )

    async def _rows(self) -> dict[str, Any]:
        rows = await self._client.call(f"show servers {self._options.backend}")
        return {row["server"].split("/", 1)[1]: row for row in rows}

    async def _ensure_serving(self, host: Host, member: str, wait_s: float) -> None:
        """Make ``member`` serve ``host`` (a flip unless it already does)."""
        main = (await self._rows())[host.main]
        main_serves = main["admin"] != "maint"
        if main_serves == (member == host.main):
            return
        b = self._options.backend
        line = f"flip {b}/{host.main}" + (f" wait {wait_s!r}" if wait_s > 0 else "")
        await self._client.call(line, wait_s)

    async def _verify(self, host: Host) -> None:
        o = self._options
        if o.verify_path is not None:
            address = self._address(host.target)
            await verify(address, o.verify_path, o.expect_status, o.verify_timeout_s)

    def _address(self, server: str) -> Address:
        """``server``'s address in the config file zdlb deploy read (the daemon's may differ
        if it was not restarted since: then the step fails and says so)."""
        address = self._addresses.get(server)
        if address is None:
            raise StepFailed(f"{server} is not in this config file's backend; is it the daemon's?")
        return address

    def _env(self, host: Host) -> dict[str, str]:
        return {
            "ZDLB_BACKEND": self._options.backend,
            "ZDLB_SERVER": host.target,
            "ZDLB_ADDRESS": str(self._address(host.target)),
            "ZDLB_PAIR": host.other,
            "ZDLB_PAIR_ADDRESS": str(self._address(host.other)),
            "ZDLB_MAIN": host.main,
            "ZDLB_TO": host.to.value,
        }

    def _output(self, host: Host) -> Callable[[str], None]:
        def emit(line: str) -> None:
            self._progress.emit(Event(EventKind.OUTPUT, host.main, Step.RUN, text=line))

        return emit

    async def _roll_back(self, record: Any) -> None:
        role = rollback_role(self._options.to)
        for entry in record["hosts"]:
            if entry["status"] == "pending":
                continue
            host = Host(entry["main"], entry["pair"], self._options.to)
            member = host.member(role)
            await self._ensure_serving(host, member, wait_s=self._options.up_timeout_s)
            await self._client.call(f"deploy host {self._token} {host.main} rolled-back")
            self.hosts[host.main].status = "rolled-back"
            self._progress.emit(
                Event(EventKind.HOST_ROLLED_BACK, host.main, text=f"{member} serves")
            )
        await self._end(self._token, "rolled-back", "")


def _clean(reason: str) -> str:
    """A reason fit for a control command line: no control characters, bounded."""
    text = _CONTROL_RE.sub("?", reason)
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."
