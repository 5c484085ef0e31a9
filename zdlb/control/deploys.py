"""The daemon's side of ``zdlb deploy``: the deploy lock, the deploy record, ``show deploy``.

``DeployDesk`` applies the ``deploy ...`` control commands to the one ``DeployRecord`` the daemon
keeps (rules in deploy/record.py), logs each step once, and hands the record to the journal so a
deploy interrupted by a crash of either side is still reported after a restart. It moves no
traffic: the deploy client flips and waits through the ordinary commands.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, assert_never

from zdlb.balancer.pool import Backend
from zdlb.config.model import PoolName
from zdlb.control.deploy_protocol import (
    DeployBegin,
    DeployCommand,
    DeployEnd,
    DeployHost,
    DeployRenew,
    DeployStep,
    DeployTakeover,
)
from zdlb.control.protocol import (
    render_table,
)
from zdlb.deploy import record
from zdlb.deploy.plan import Target
from zdlb.deploy.record import DeployRecord
from zdlb.errors import ControlCommandError

log = logging.getLogger(__name__)

# 8 random bytes: a token only has to tell the holder from a client that lost the lock.
TOKEN_BYTES = 8

Clock = Callable[[], float]
# Deploy events kept for a status page: a rolling deploy of 50 hosts makes ~450.
MAX_EVENTS = 500


@dataclass(frozen=True, slots=True)
class PlannedDeploy:
    """A deploy command's outcome before it is adopted: the new record, its events and log
    lines, and the reply (text, data)."""

    record: DeployRecord
    events: tuple[DeployEvent, ...]
    logs: list[tuple[str, str]]
    text: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeployEvent:
    """One line of the deploy's history: ``what`` is "begin", "takeover", a step's name, a
    host's result or "end RESULT"; ``at`` is wall-clock seconds."""

    at: float
    backend: str
    server: str | None
    what: str
    reason: str = ""


class DeployDesk:
    """Keeps the deploy record; ``clock`` is wall-clock seconds (``time.time``)."""

    def __init__(
        self,
        backends: Mapping[str, Backend],
        last: DeployRecord | None = None,
        clock: Clock = time.time,
        on_event: Callable[[DeployEvent], None] | None = None,
    ) -> None:
        self._backends = backends
        self._on_event = on_event  # the status page's timeline sees every step too
        self._clock = clock
        self.record = last
        self.events: deque[DeployEvent] = deque(maxlen=MAX_EVENTS)
        self._logs: list[tuple[str, str]] = []  # a plan's log lines, written when adopted

    def use_backends(self, backends: Mapping[str, Backend]) -> None:
        """A reload replaced the backends: new deploys are checked against these."""
        self._backends = backends

    def __repr__(self) -> str:
        if self.record is None:
            return "<DeployDesk none>"
        status = self.record.effective_status(self._clock()).value
        return f"<DeployDesk {self.record.backend} {status}>"

    def journal_data(self) -> dict[str, Any] | None:
        """The record as the journal stores it, token included: a daemon restarted in the
        middle of a deploy (an upgrade) lets its live client go on. The journal is the
        daemon's own file; ``show deploy`` never shows the token."""
        if self.record is None:
            return None
        return {**self.record.to_json(self._clock()), "token": self.record.token}

    def apply(self, command: DeployCommand, peer_uid: int) -> tuple[str, dict[str, Any]]:
        """Carry out one ``deploy ...`` command: (text, data) of the reply.

        Raises ControlCommandError when the lock refuses it (held, expired, wrong token).
        """
        planned = self.plan(command, peer_uid)
        self.adopt(planned)
        return planned.text, planned.data

    def plan(self, command: DeployCommand, peer_uid: int) -> PlannedDeploy:
        """What ``command`` would make of the record, changing nothing here (a fleet commits
        it in etcd first, then ``adopt``s it). Raises ControlCommandError as ``apply``."""
        scratch = DeployDesk(self._backends, self.record, self._clock)
        text, data = scratch._apply(command, peer_uid)
        assert scratch.record is not None  # every command leaves a record or raises
        return PlannedDeploy(scratch.record, tuple(scratch.events), scratch._logs, text, data)

    def adopt(self, planned: PlannedDeploy) -> None:
        """Make a planned command's record this desk's, with its events and log lines."""
        self.record = planned.record
        for event_name, details in planned.logs:
            log.info("%s backend=%s %s", event_name, planned.record.backend, details)
        for event in planned.events:
            self.events.append(event)
            if self._on_event is not None:
                self._on_event(event)

    def follow(self, new: record.DeployRecord) -> None:
        """Another instance's deploy, as the fleet committed it: take its record, and put the
        steps it made since the last record seen here on this timeline too."""
        old, self.record = self.record, new
        for server, what, reason in record.changes(old, new):
            self._event(server, what, reason)

    def _apply(self, command: DeployCommand, peer_uid: int) -> tuple[str, dict[str, Any]]:
        now = self._clock()
        last = self.record
        match command:
            case DeployBegin(backend_name, to, pid, servers):
                backend = self._backend(backend_name)
                hosts = _hosts(backend, servers)
                token = secrets.token_hex(TOKEN_BYTES)
                begun = record.begin(
                    last, backend=backend_name, to=to, hosts=hosts, token=token, pid=pid,
                    uid=peer_uid, now=now,
                )  # fmt: skip
                _check_serving(backend, hosts, to)  # after the lock: a holder is named first
                self.record = begun
                self._log("deploy_begin", f"hosts={','.join(h for h, _ in hosts)} pid={pid}")
                self._event(None, "begin")
            case DeployTakeover(pid):
                token = secrets.token_hex(TOKEN_BYTES)
                self.record = record.takeover(last, token=token, pid=pid, uid=peer_uid, now=now)
                self._log("deploy_takeover", f"pid={pid} uid={peer_uid}")
                self._event(None, "takeover")
            case DeployRenew(token):
                self.record = record.renew(last, token, now)
                return "renewed\n", {"lease_until": self.record.lease_until}
            case DeployStep(token, server, step):
                self.record = record.host_step(last, token, server, step, now)
                self._log("deploy_step", f"server={server} step={step.value}")
                self._event(server, step.value)
            case DeployHost(token, server, result, reason):
                self.record = record.host_result(last, token, server, result, reason, now)
                self._log("deploy_host", f"server={server} result={result.value} reason={reason}")
                self._event(server, result.value, reason)
            case DeployEnd(token, result, reason):
                self.record = record.end(last, token, result, reason, now)
                self._log("deploy_end", f"result={result.value} reason={reason}")
                self._event(None, f"end {result.value}", reason)
            case _:
                assert_never(command)
        data = self.record.to_json(now)
        if isinstance(command, DeployBegin | DeployTakeover):
            data["token"] = self.record.token  # only its holder ever sees it
        return render_record(data), data

    def show(self) -> tuple[str, dict[str, Any] | None]:
        """``show deploy``: the record's text and data (``None``: no deploy since the journal
        began)."""
        if self.record is None:
            return "no deploy\n", None
        data = self.record.to_json(self._clock())
        return render_record(data), data

    def _backend(self, name: str) -> Backend:
        backend = self._backends.get(name)
        if backend is None:
            known = ", ".join(sorted(self._backends)) or "none"
            raise ControlCommandError(f"no backend {name!r} (backends: {known})")
        return backend

    def _event(self, server: str | None, what: str, reason: str = "") -> None:
        assert self.record is not None
        event = DeployEvent(self._clock(), self.record.backend, server, what, reason)
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    def _log(self, event: str, details: str) -> None:
        assert self.record is not None
        self._logs.append((event, details))


def _hosts(backend: Backend, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """(main, pair) of every named server's host in order, or of every paired main."""
    if not names:
        hosts = [
            (s.name, s.pair.name)
            for s in backend.servers
            if s.pool is PoolName.MAIN and s.pair is not None
        ]
        if not hosts:
            raise ControlCommandError(f"{backend.name} has no main server with a pair to deploy")
        return hosts
    hosts = []
    for name in names:
        server = backend.server(name)
        if server is None:
            known = ", ".join(s.name for s in backend.servers)
            raise ControlCommandError(f"no server {name!r} in {backend.name} ({known})")
        if server.pair is None:
            raise ControlCommandError(
                f"{backend.name}/{name} has no pair: zdlb deploy moves a host's users to its "
                "other version, so each host needs a backup declaring pair = its main"
            )
        main, pair = (
            (server, server.pair) if server.pool is PoolName.MAIN else (server.pair, server)
        )
        if (main.name, pair.name) not in hosts:
            hosts.append((main.name, pair.name))
    return hosts


def _check_serving(backend: Backend, hosts: list[tuple[str, str]], to: Target) -> None:
    """Refuse to start unless every host's member that serves during the deploy (the one not
    getting the new version) is usable: admin ready, health up."""
    for main_name, pair_name in hosts:
        main, pair = backend.server(main_name), backend.server(pair_name)
        assert main is not None and pair is not None  # _hosts found them
        stand_in = pair if to is Target.MAIN else main
        if not stand_in.is_usable:
            raise ControlCommandError(
                f"{backend.name}/{stand_in.name} is {stand_in.health.value} "
                f"({stand_in.admin.value}): it must serve {main.name}'s users during the deploy"
            )


def render_record(data: Mapping[str, Any]) -> str:
    """``show deploy`` as text: one line for the deploy, a table of its hosts."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(data["started_at"]))
    head = (
        f"deploy of {data['backend']} to {data['to']}: {data['status']}"
        f"{' (' + data['reason'] + ')' if data['reason'] else ''}; started {started} by pid "
        f"{data['holder_pid']} (uid {data['holder_uid']})\n"
    )
    rows = []
    for host in data["hosts"]:
        since = host["since"]
        when = "-" if since is None else time.strftime("%H:%M:%S", time.gmtime(since))
        rows.append(
            (host["main"], host["pair"], host["status"], host["step"], when, host["reason"] or "-")
        )
    return head + render_table(("host", "pair", "status", "step", "since", "reason"), rows)
