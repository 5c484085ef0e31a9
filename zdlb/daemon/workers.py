"""The master of a ``workers = N`` daemon (N > 1): it binds, supervises workers and owns the state
(daemon/master.py runs it; ``Supervisor`` here starts, feeds, watches, resizes and stops them).

``workers = 1`` never comes here: one process does everything (lifecycle.serve). With more:

1. The master binds every listener (and the metrics socket) before anything else, as the
   single process does, replays the state journal, then starts N worker processes
   (daemon/worker.py, in Python's isolated mode: daemon/spawn.py), each accepting on its own
   socket of every listener: SO_REUSEPORT spreads new connections over the workers, where one
   shared accept queue let a burst land on one of them (tcp/listener.py has the figures). The
   master keeps every socket open, so connections queued for a worker that died are not
   reset; a sibling serves them (rule 6).
2. The master never proxies. It runs the control socket, the health checks, the journal and the
   /metrics endpoint. Every change of a server's state (a command, a health verdict) is sent to
   every worker within ``PUSH_POLL_S`` (ipc.py, rule 1); their counters come back in reports.
3. ``show servers``, ``wait idle`` and ``show info`` read load summed over the workers' reports,
   asked fresh (a ``Poll``) before answering; a scrape merges the latest reports
   (``stats.merge``), plus what exited workers counted, so counters never go backwards.
4. A worker that exits while the master runs is logged (``worker_exited``) and started again with
   the current state; a worker that keeps dying is restarted with a growing delay.
5. SIGTERM/SIGINT: close the control socket, close the master's copies of the listeners, pass
   SIGTERM on, let the workers drain within the longest ``grace_s`` (plus ``STOP_MARGIN_S``),
   kill what remains, exit 0.
6. Every worker also holds its siblings' sockets, unused. When one exits, the master at once
   asks a live worker to accept on the exited one's sockets too (``ipc.Adopt``), so clients
   the kernel queued there are served within milliseconds, not after the restart; the
   adopter lets go (``ipc.Release``) when the new worker serves. After a kill -9, fresh clients
   were all answered 18-19 ms after the kill, where without adoption they waited 249-275 ms
   for the replacement (tests/daemon/test_worker_kill.py, 3 runs each). TCP listeners too
   (sibling_shares.py).
7. Reload: the master applies the config, binds what it adds or moves, and pushes both to the
   workers (reload.py, handoff.py ``ConfigPush``); a worker started later gets the new config
   and sockets. Upgrade: the old workers' idle connections go through both masters to the new
   workers (idle_handover.py, handoff.py ``collect_idle`` and ``Dealer``).
8. A reload that changes ``workers`` starts or retires workers (resize.py has the rules), so
   no client is queued for a worker not yet serving nor reset by a socket that closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import signal
import socket
import time
from collections.abc import Iterable, Mapping

from zdlb.balancer.server import Health, Server
from zdlb.config.model import Config
from zdlb.daemon import fdchannel, ipc, resize, spawn
from zdlb.daemon.fdchannel import FdChannel
from zdlb.daemon.handoff import ConfigPush, Dealer, Shares, collect_idle
from zdlb.daemon.runtime import Runtime, SendConnections, worker_count
from zdlb.daemon.slot import WorkerSlot, ready_or_exited
from zdlb.daemon.worker import WorkerOptions, WorkerSpec
from zdlb.errors import ZdlbError
from zdlb.events import EventKind
from zdlb.metrics.collector import take_snapshot
from zdlb.stats import Snapshot, merge

log = logging.getLogger(__name__)

# How often the master looks for a state change to send (Server.generation moved): a change
# reaches every worker in about this plus a pipe hop, well within the 100 ms an operator may
# wait. Polling catches every source of change (commands, checks, passive verdicts) in one
# place; an idle master costs 0.6% of a core (1.3% polling every 5 ms; measured, 10 s).
PUSH_POLL_S = 0.02
# A fresh report asked of every worker (show servers, wait idle) is waited for this long; a
# worker that does not answer (stuck, or restarting) is counted by its latest report.
REFRESH_TIMEOUT_S = 0.5
# A starting worker imports zdlb and uvloop (~0.3 s here); a loaded box gets many times that.
READY_TIMEOUT_S = 15.0
# After grace_s, workers that still run get this long to finish the drain they are in.
STOP_MARGIN_S = 2.0
# Restart delays: a worker that ran at least STABLE_S is restarted after RESTART_MIN_S; one
# that dies sooner (or cannot be started) waits twice as long as last time, up to RESTART_MAX_S.
STABLE_S = 5.0
RESTART_MIN_S = 0.1
RESTART_MAX_S = 5.0


class Supervisor:
    """Starts, feeds, watches and stops the workers; the controller's ``WorkerLoad``."""

    def __init__(self, runtime: Runtime, count: int, options: WorkerOptions) -> None:
        self.runtime = runtime
        self.slots = [WorkerSlot(index) for index in range(count)]
        self._options = options
        self._servers = [s for backend in runtime.backends.values() for s in backend.servers]
        self._by_key = {ipc.server_key(s): s for s in self._servers}
        self._retired: Snapshot | None = None  # what exited workers counted
        self._seq = 0
        self._reported = asyncio.Event()
        self._is_stopping = False
        self._pushed_generation = Server.generation
        self.shares = Shares()  # rule 6
        self._push = ConfigPush()  # reload.py
        self.dealer = Dealer(self.slots)
        self.retiring: list[WorkerSlot] = []  # retired by a reload, still draining
        self._tasks: asyncio.TaskGroup | None = None  # run()'s, watching every worker
        assert all(len(group) == count for group in runtime.listener_groups), "workers=count"

    @property
    def _worker_socks(self) -> list[list[socket.socket]]:
        """Worker i accepts on the i-th socket of every listener's group (build_runtime), in
        config order; a reload changes the groups (reload.py)."""
        groups = self.runtime.listener_groups
        return [[group[i] for group in groups] for i in range(len(self.slots))]

    # --- WorkerLoad (control/commands.py) ---------------------------------------------------

    def server_load(self, server: Server) -> tuple[int, int]:
        inflight = conns = 0
        for report in self._reports():
            state = report.snapshot["servers"].get(server.backend, {}).get(server.name)
            if state is not None and state["state"] is not None:
                inflight += state["state"]["inflight"]
                conns += state["state"]["conns"]
        return inflight, conns

    def client_connections(self) -> int:
        return sum(report.connections for report in self._reports())

    def server_queue(self, server: Server) -> tuple[int, int | None]:
        queued, maxconn = 0, None
        for report in self._reports():
            state = report.snapshot["servers"].get(server.backend, {}).get(server.name)
            if state is not None and state["state"] is not None:
                queued += state["state"]["queue_length"]
                if state["state"]["maxconn"] is not None:
                    maxconn = (maxconn or 0) + state["state"]["maxconn"]
        return queued, maxconn

    def shared_queue(self, backend: str) -> int:
        return sum(
            report.snapshot["backends"][backend]["queue_length"]
            for report in self._reports()
            if backend in report.snapshot["backends"]
        )

    def connection_limits(self) -> tuple[int, int]:
        limit = hits = 0
        for report in self._reports():
            limit += report.snapshot["process"]["maxconn"]
            hits += report.snapshot["process"]["limit_hits"]
        return limit, hits

    def workers_serving(self) -> int:
        return sum(1 for slot in self.slots if slot.ready.is_set())

    async def refresh(self) -> None:
        self._seq += 1
        seq = self._seq
        for slot in self.slots:
            slot.send(ipc.Poll(seq))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REFRESH_TIMEOUT_S):
                while not all(
                    slot.report is not None and slot.report.seq >= seq
                    for slot in self.slots
                    if slot.ready.is_set()
                ):
                    self._reported.clear()
                    await self._reported.wait()

    def close_idle(self, server: Server) -> None:
        for slot in self.slots:
            slot.send(ipc.CloseIdle(ipc.server_key(server)))

    # --- reload (daemon/reload.py) --------------------------------------------------------

    async def push_config(
        self, config: Config, groups: Mapping[str, list[socket.socket]]
    ) -> list[str]:
        """Send the config the master just applied to every serving worker, with the sockets
        of its new listeners, then the state; returns the problems (handoff.py)."""
        self._servers = self.runtime.servers
        self._by_key = {ipc.server_key(s): s for s in self._servers}
        self._seq += 1
        self._pushed_generation = Server.generation
        state = ipc.views_of(self._servers)
        return await self._push.push(self._seq, config, state, self.slots, groups)

    async def collect_idle(self, send: SendConnections) -> int:
        """An upgrade: the workers' idle keep-alive connections, passed on to ``send``."""
        return await collect_idle(self.slots, send)

    # --- a reload that changes `workers` (resize.py) --------------------------------------

    def check_resize(self, config: Config) -> list[str]:
        """What stands in the way of running ``config``'s number of workers (nothing changed)."""
        target = worker_count(config, self._options.workers_override)
        problems = resize.check(self._options.workers_override)
        if not problems and target < len(self.slots):  # shrinking needs the BPF program
            problems = resize.steer(self.runtime.listener_groups, len(self.slots))
        return problems

    async def resize(self, config: Config) -> list[str]:
        """Start or retire workers to run ``config``'s number (resize.py, rules 1-3); the
        problems met (the change is made as far as it can be)."""
        running = len(self.slots)
        target = worker_count(config, self._options.workers_override)
        if target == running:
            return []
        if target > running:
            problems = await resize.grow_workers(self, target)
        else:
            problems = await resize.shrink_workers(self, target)
        self.runtime.workers = len(self.slots)  # a listener added later binds as many
        self._seq += 1
        groups = self.runtime.listener_groups
        await resize.send_siblings(self.slots, self._seq, config.listeners, groups)
        log.info("workers_resized old=%d new=%d", running, len(self.slots))
        return problems

    # --- metrics ----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The master's own counts and server states merged with every worker's (rule 3)."""
        own = take_snapshot(self.runtime.stats, self._servers, self.runtime.health)
        reports = [report.snapshot for report in self._reports()]
        retired = [self._retired] if self._retired is not None else []
        return merge([own, *reports, *retired])

    def _reports(self) -> Iterable[ipc.StatsReport]:
        slots = [*self.slots, *self.retiring]
        return (slot.report for slot in slots if slot.report is not None)

    @property
    def is_stopping(self) -> bool:
        return self._is_stopping

    # --- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each serves. Raises ZdlbError if one does not
        get ready within READY_TIMEOUT_S."""
        for slot in self.slots:
            await self._spawn(slot)
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                for slot in self.slots:
                    await ready_or_exited(slot)
        except TimeoutError:
            late = [slot.index for slot in self.slots if not slot.ready.is_set()]
            raise ZdlbError(f"workers {late} not serving after {READY_TIMEOUT_S} s") from None

    async def run(self) -> None:
        """Push state changes, restart workers that exit; until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            for slot in self.slots:
                tasks.create_task(self._watch(slot), name=f"worker {slot.index}")
            tasks.create_task(self._push_forever(), name="state push")

    async def stop(self, grace_s: float) -> None:
        """Rule 5, after the control socket is closed. Returns once every worker is gone."""
        self._is_stopping = True
        for socks in self._worker_socks:
            for sock in socks:
                sock.close()  # else the kernel keeps queueing connections nobody will accept
        slots = [*self.slots, *self.retiring]
        procs = [slot.proc for slot in slots if slot.proc is not None]
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        log.info("workers_stopping workers=%d grace_s=%s", len(procs), grace_s)
        try:
            async with asyncio.timeout(grace_s + STOP_MARGIN_S):
                await asyncio.gather(*(proc.wait() for proc in procs))
        except TimeoutError:
            for proc in procs:
                if proc.returncode is None:
                    log.warning("worker_killed pid=%d reason=drain overran", proc.pid)
                    proc.kill()
            await asyncio.gather(*(proc.wait() for proc in procs))
        for slot in slots:
            if slot.writer is not None:
                slot.writer.close()
            if slot.fds is not None:
                slot.fds.close()
                slot.fds = None

    async def add(self, slot: WorkerSlot) -> None:
        """Start a worker in a new ``slot`` (resize.py) and watch it as the others."""
        await self._spawn(slot)
        if self._tasks is not None:
            self._tasks.create_task(self._watch(slot), name=f"worker {slot.index}")

    async def _spawn(self, slot: WorkerSlot) -> None:
        master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds_ours, fds_theirs = fdchannel.socketpair()
        try:
            fds = tuple(sock.fileno() for sock in self._worker_socks[slot.index])
            shares = tuple(tuple(sock.fileno() for sock in socks) for socks in self._worker_socks)
            spec = WorkerSpec(
                self.runtime.config,
                slot.index,
                fds,
                worker_end.fileno(),
                self._options,
                self.runtime.census_key,
                shares,
                fds_theirs.fileno(),
            )
            passed = (worker_end.fileno(), fds_theirs.fileno())
            proc = await asyncio.create_subprocess_exec(
                *spawn.worker_argv(),
                stdin=asyncio.subprocess.PIPE,
                env=spawn.child_environment(),
                pass_fds=(*(fd for share in shares for fd in share), *passed),
            )
        except BaseException:
            master_end.close()
            fds_ours.close()
            raise
        finally:
            worker_end.close()
            fds_theirs.close()
        if slot.fds is not None:
            slot.fds.close()
        slot.fds = FdChannel(fds_ours)
        slot.proc, slot.report, slot.started_at = proc, None, time.monotonic()
        slot.config = self.runtime.config
        slot.ready.clear()
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(spec))
        with contextlib.suppress(ConnectionError):  # it died at once: _watch will say so
            await proc.stdin.drain()
        proc.stdin.close()
        reader, slot.writer = await asyncio.open_unix_connection(
            sock=master_end, limit=ipc.MAX_MESSAGE_BYTES
        )
        slot.send(ipc.views_of(self._servers))  # worker.py, rule 1
        slot.reader = asyncio.get_running_loop().create_task(self._read(slot, reader))

    async def _watch(self, slot: WorkerSlot) -> None:
        """Rule 4: wait for the worker's exit, log it, start it again."""
        delay_s = RESTART_MIN_S
        while True:
            proc = slot.proc
            assert proc is not None
            code = await proc.wait()
            slot.ready.clear()  # refresh() no longer waits for it, show info counts it out
            if not self._is_stopping and not slot.is_retiring:
                self.shares.hand_over(slot.index, self.slots)  # first: its clients wait
            if slot.reader is not None:
                await slot.reader  # its last report, if it sent one
            if slot.is_retiring:
                log.info("worker_retired worker=%d pid=%d code=%d", slot.index, proc.pid, code)
                self._retire(slot)
                self.retiring.remove(slot)
                return
            if self._is_stopping:
                log.info("worker_stopped worker=%d pid=%d code=%d", slot.index, proc.pid, code)
                return
            log.warning("worker_exited worker=%d pid=%d code=%d", slot.index, proc.pid, code)
            self._retire(slot)
            if time.monotonic() - slot.started_at >= STABLE_S:
                delay_s = RESTART_MIN_S
            while True:
                await asyncio.sleep(delay_s)
                delay_s = min(RESTART_MAX_S, delay_s * 2)
                if self.is_stopping:  # SIGTERM during the delay
                    return
                try:
                    await self._spawn(slot)
                    break
                except OSError as exc:  # out of fds or processes: try again later
                    log.error("worker_start_failed worker=%d error=%s", slot.index, exc)

    def _retire(self, slot: WorkerSlot) -> None:
        """Keep the counters of a worker that exited; its gauges went with it."""
        report, slot.report = slot.report, None
        if slot.writer is not None:
            slot.writer.close()
            slot.writer = None
        if report is None:
            return
        snapshot = report.snapshot
        for listener in snapshot["listeners"].values():
            listener["connections_open"] = 0
        for by_name in snapshot["servers"].values():
            for server in by_name.values():
                server["state"] = None
        self._retired = merge([snapshot] if self._retired is None else [self._retired, snapshot])

    async def _read(self, slot: WorkerSlot, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                self._handle(slot, ipc.decode(line))
        except (ConnectionError, ValueError) as exc:
            log.error("worker_channel_failed worker=%d error=%r", slot.index, exc)

    def _handle(self, slot: WorkerSlot, message: ipc.Message) -> None:
        match message:
            case ipc.StatsReport():
                slot.report = message
                self._reported.set()
                for backend, taken in message.census.items():
                    if (census := self.runtime.census.get(backend)) is not None:
                        census.merge_registers(taken)
            case ipc.Ready(pid=pid):
                slot.ready.set()
                log.info("worker_started worker=%d pid=%d", slot.index, pid)
                self.shares.give_back(slot.index, self.slots)
                if slot.config is not self.runtime.config and slot.proc is not None:
                    # Started just before a reload it missed: its restart takes the new one.
                    log.warning("worker_config_stale worker=%d pid=%d", slot.index, pid)
                    slot.proc.send_signal(signal.SIGTERM)
            case ipc.ObservedDown(server=key, reason=reason):
                self._observed_down(key, reason)
            case ipc.Reloaded():
                self._push.answered(slot.index, message)
            case (
                ipc.StateUpdate()
                | ipc.Poll()
                | ipc.CloseIdle()
                | ipc.Reload()
                | ipc.Adopt()
                | ipc.Release()
                | ipc.HandOver()
                | ipc.Siblings()
            ):
                log.error("worker_channel_unexpected message=%s", type(message).__name__)

    def _observed_down(self, key: str, reason: str) -> None:
        """A worker saw a server fail on live traffic: the master's verdict takes it down."""
        server = self._by_key.get(key)
        verdict = self.runtime.health.verdict(server) if server is not None else None
        if server is None or verdict is None:
            return
        transition = verdict.force_down(reason)
        if transition is not None:
            server.set_health(Health.DOWN)
            log.warning(
                "server_health server=%s old=%s new=%s reason=%s",
                key,
                transition.old.value,
                transition.new.value,
                reason,
            )
            self.runtime.events.record(EventKind.HEALTH, key, f"up -> down: {reason}")

    async def _push_forever(self) -> None:
        while True:
            await asyncio.sleep(PUSH_POLL_S)
            if Server.generation != self._pushed_generation:
                self._pushed_generation = Server.generation
                update = ipc.views_of(self._servers)
                for slot in self.slots:
                    slot.send(update)
