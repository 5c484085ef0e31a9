"""The deploy record the daemon keeps: which hosts, which step, since when, who holds the lock.

One deploy at a time per daemon. ``begin`` takes the lock for a client (its pid, the uid the
control socket saw) and returns a record carrying a random ``token`` that every later update
must present; the lock is a *lease* the holder renews (``DEPLOY_LEASE_S``), so a deploy whose
client died (SIGKILL, a lost machine) reads as ``interrupted`` once the lease ran out, and
``takeover`` (``zdlb deploy --resume`` / ``--rollback``) may take it. Times are wall-clock
seconds (``time.time()``): the record is journaled and read again after a restart.

Rules:
1. ``begin`` is refused while a deploy holds a live lease (the refusal names the holder), and
   while the last deploy is unfinished (interrupted or failed): it is resumed or rolled back
   first, so a host left on its pair is never forgotten.
2. ``takeover`` is refused while the lease is live, and when there is nothing unfinished.
3. Updates (``host_step``, ``host_result``, ``renew``, ``end``) need the live token.

Pure: no I/O, no clock (callers pass ``now``), no logging.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from zdlb.deploy.plan import Step, Target
from zdlb.errors import ControlCommandError

# The holder renews every DEPLOY_LEASE_S / 5 (3 s): a deploy client that stopped renewing is
# taken for dead after 15 s, long past any stall of a live one (a `zdlb ctl` start is 0.45 s).
DEPLOY_LEASE_S = 15.0


class HostStatus(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"


class DeployStatus(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    ROLLED_BACK = "rolled-back"


# How a deploy may end (`deploy end TOKEN RESULT`): every status but running.
END_RESULTS = tuple(status for status in DeployStatus if status is not DeployStatus.RUNNING)
# How a host may end (`deploy host TOKEN SERVER RESULT`).
HOST_RESULTS = (HostStatus.DONE, HostStatus.FAILED, HostStatus.ROLLED_BACK)


@dataclass(frozen=True, slots=True)
class HostRecord:
    """One host of a deploy: its main's name, its pair's, its status and its current step."""

    main: str
    pair: str
    status: HostStatus = HostStatus.PENDING
    step: Step | None = None
    since: float | None = None  # when ``step`` (or the final status) began, wall clock
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DeployRecord:
    """A deploy as the daemon knows it: the snapshot ``show deploy`` and the metrics read."""

    backend: str
    to: Target
    hosts: tuple[HostRecord, ...]
    token: str
    holder_pid: int
    holder_uid: int
    started_at: float
    lease_until: float
    status: DeployStatus = DeployStatus.RUNNING
    reason: str = ""

    def effective_status(self, now: float) -> DeployStatus:
        """``RUNNING`` turns ``INTERRUPTED`` once its holder stopped renewing the lease."""
        if self.status is DeployStatus.RUNNING and now >= self.lease_until:
            return DeployStatus.INTERRUPTED
        return self.status

    def is_unfinished(self, now: float) -> bool:
        """Interrupted or failed: some host may be left on its other member."""
        return self.effective_status(now) in (DeployStatus.INTERRUPTED, DeployStatus.FAILED)

    def current(self) -> HostRecord | None:
        """The host being deployed (or where the deploy stopped), if any."""
        for host in self.hosts:
            if host.status in (HostStatus.RUNNING, HostStatus.FAILED):
                return host
        return None

    def holder(self) -> str:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at))
        return f"pid {self.holder_pid} (uid {self.holder_uid}), started {started}"

    def host(self, main: str) -> HostRecord:
        for host in self.hosts:
            if main in (host.main, host.pair):
                return host
        raise ControlCommandError(f"{main!r} is not a host of the deploy of {self.backend}")

    def to_json(self, now: float) -> dict[str, Any]:
        """The record for ``json show deploy`` (no token: only its holder may know it)."""
        current = self.current()
        return {
            "backend": self.backend,
            "to": self.to.value,
            "status": self.effective_status(now).value,
            "reason": self.reason,
            "holder_pid": self.holder_pid,
            "holder_uid": self.holder_uid,
            "started_at": self.started_at,
            "lease_until": self.lease_until,
            "current": current.main if current else None,
            "hosts": [
                {
                    "main": h.main,
                    "pair": h.pair,
                    "status": h.status.value,
                    "step": h.step.value if h.step else None,
                    "since": h.since,
                    "reason": h.reason,
                }
                for h in self.hosts
            ],
        }


def from_json(data: Mapping[str, Any]) -> DeployRecord:
    """A record read back from the journal. Raises KeyError, TypeError or ValueError."""
    hosts = tuple(
        HostRecord(
            main=str(h["main"]),
            pair=str(h["pair"]),
            status=HostStatus(h["status"]),
            step=Step(h["step"]) if h["step"] is not None else None,
            since=float(h["since"]) if h["since"] is not None else None,
            reason=str(h["reason"]),
        )
        for h in data["hosts"]
    )
    return DeployRecord(
        backend=str(data["backend"]),
        to=Target(data["to"]),
        hosts=hosts,
        token=str(data.get("token", "")),  # the journal keeps it; `show deploy` does not
        holder_pid=int(data["holder_pid"]),
        holder_uid=int(data["holder_uid"]),
        started_at=float(data["started_at"]),
        lease_until=float(data["lease_until"]),
        status=DeployStatus(data["status"]),
        reason=str(data["reason"]),
    )


def begin(
    last: DeployRecord | None,
    *,
    backend: str,
    to: Target,
    hosts: Sequence[tuple[str, str]],
    token: str,
    pid: int,
    uid: int,
    now: float,
) -> DeployRecord:
    """Rule 1: a new deploy of ``hosts`` ((main, pair) pairs) or ControlCommandError."""
    if last is not None:
        _refuse_if_live(last, now)
        if last.is_unfinished(now):
            status = last.effective_status(now).value
            where = _where(last)
            raise ControlCommandError(
                f"the last deploy of {last.backend} is {status}{where}: resume it "
                "(zdlb deploy --resume) or roll it back (zdlb deploy --rollback) first"
            )
    if not hosts:
        raise ControlCommandError(f"no host to deploy in {backend}")
    return DeployRecord(
        backend=backend,
        to=to,
        hosts=tuple(HostRecord(main, pair) for main, pair in hosts),
        token=token,
        holder_pid=pid,
        holder_uid=uid,
        started_at=now,
        lease_until=now + DEPLOY_LEASE_S,
    )


def takeover(
    last: DeployRecord | None, *, token: str, pid: int, uid: int, now: float
) -> DeployRecord:
    """Rule 2: the unfinished deploy, now held by a new client, or ControlCommandError."""
    if last is None:
        raise ControlCommandError("no deploy to resume or roll back")
    _refuse_if_live(last, now)
    if not last.is_unfinished(now):
        status = last.effective_status(now).value
        raise ControlCommandError(
            f"the last deploy of {last.backend} is {status}: nothing to resume"
        )
    return replace(
        last,
        token=token,
        holder_pid=pid,
        holder_uid=uid,
        lease_until=now + DEPLOY_LEASE_S,
        status=DeployStatus.RUNNING,
        reason="",
    )


def renew(record: DeployRecord | None, token: str, now: float) -> DeployRecord:
    """Rule 3: the lease extended, or ControlCommandError if ``token`` does not hold it."""
    held = _held(record, token, now)
    return replace(held, lease_until=now + DEPLOY_LEASE_S)


def host_step(
    record: DeployRecord | None, token: str, server: str, step: Step, now: float
) -> DeployRecord:
    """The host of ``server`` starts ``step`` (and the lease is renewed)."""
    held = renew(record, token, now)
    target = held.host(server)
    new = replace(target, status=HostStatus.RUNNING, step=step, since=now, reason="")
    return replace(held, hosts=_replaced(held.hosts, target, new))


def host_result(
    record: DeployRecord | None,
    token: str,
    server: str,
    result: HostStatus,
    reason: str,
    now: float,
) -> DeployRecord:
    """The host of ``server`` ends as ``result`` (done, failed, rolled back); its step stays."""
    held = renew(record, token, now)
    target = held.host(server)
    new = replace(target, status=result, since=now, reason=reason)
    return replace(held, hosts=_replaced(held.hosts, target, new))


def end(
    record: DeployRecord | None, token: str, result: DeployStatus, reason: str, now: float
) -> DeployRecord:
    """The deploy ends as ``result``; the lock is released (the lease ends now)."""
    held = _held(record, token, now)
    return replace(held, status=result, reason=reason, lease_until=now, token="")


def changes(old: DeployRecord | None, new: DeployRecord) -> list[tuple[str | None, str, str]]:
    """What happened between two records of a deploy, as (server, what, reason) in the words
    its holder's events use: "begin" (another deploy), "takeover" (a new holder), each host's
    new step or result (by its main's name), "end RESULT". Another instance's deploy reaches a
    fleet member only as records (cluster/fleet.py): this is how its steps get on the member's
    timeline too. A renewed lease is no event."""
    events: list[tuple[str | None, str, str]] = []
    same = old is not None and (old.backend, old.started_at) == (new.backend, new.started_at)
    if old is None or not same:
        events.append((None, "begin", ""))
    elif old.token and new.token and old.token != new.token:
        events.append((None, "takeover", ""))
    before = {host.main: host for host in old.hosts} if old is not None and same else {}
    for host in new.hosts:
        was = before.get(host.main)
        if was is not None and (was.status, was.step) == (host.status, host.step):
            continue
        if host.status is HostStatus.RUNNING and host.step is not None:
            events.append((host.main, host.step.value, ""))
        elif host.status in HOST_RESULTS:
            events.append((host.main, host.status.value, host.reason))
    ended = new.status is not DeployStatus.RUNNING
    if ended and (old is None or not same or old.status is not new.status):
        events.append((None, f"end {new.status.value}", new.reason))
    return events


def _held(record: DeployRecord | None, token: str, now: float) -> DeployRecord:
    if record is None or not record.token or record.token != token:
        raise ControlCommandError("this client does not hold the deploy lock")
    if record.effective_status(now) is not DeployStatus.RUNNING:
        raise ControlCommandError("the deploy lock expired: the deploy is interrupted")
    return record


def _refuse_if_live(last: DeployRecord, now: float) -> None:
    if last.effective_status(now) is DeployStatus.RUNNING:
        raise ControlCommandError(
            f"a deploy of {last.backend} is in progress{_where(last)}, held by {last.holder()}"
        )


def _where(record: DeployRecord) -> str:
    current = record.current()
    if current is None or current.step is None:
        return ""
    return f" (host {current.main}, step {current.step.value})"


def _replaced(
    hosts: tuple[HostRecord, ...], old: HostRecord, new: HostRecord
) -> tuple[HostRecord, ...]:
    return tuple(new if host is old else host for host in hosts)
