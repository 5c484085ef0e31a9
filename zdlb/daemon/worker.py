"""One worker process of a ``workers = N`` daemon: it accepts on the master's listeners and proxies.

Started by the master (daemon/workers.py) as ``python -I`` running ``worker.main`` (isolated:
nothing from the working directory or the PYTHON* variables is importable here), with the
listening sockets and its end of the channel passed as file descriptors and a pickled
``WorkerSpec`` on stdin (a pipe from the master: trusted, and the only way the exact running
config reaches it, even if the file changed on disk since).

Rules:

1. Nothing is served before the master's first ``StateUpdate`` is applied: a restarted worker
   must not send traffic to a server the operator put in maintenance (ipc.py, rule 1).
2. The worker runs no health checks, no control socket, no journal and no metrics endpoint:
   the master does. It only counts and reports (ipc.py, rules 2 and 3).
3. SIGTERM/SIGINT drain it as the single process drains (lifecycle.shutdown, within grace_s).
   The channel closing means the master is gone: the worker drains and exits too, so a killed
   master leaves no orphans behind.
4. Sockets come over the fd channel (fdchannel.py), read by one task: a reload's new
   listeners (kept by ``seq`` until its ``Reload`` takes them) and, in an upgrade's new worker,
   client connections to serve. An old worker told ``HandOver`` sends its idle ones there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import sys
from dataclasses import dataclass
from typing import Any

from zdlb.balancer.server import AdminState, Health, Server
from zdlb.config.model import Config, LogFormat
from zdlb.daemon import ipc
from zdlb.daemon.fdchannel import FdChannel, names_of
from zdlb.daemon.idle_handover import hand_over_idle, send_conns
from zdlb.daemon.lifecycle import (
    adopt_connection,
    install_signal_handlers,
    raise_open_file_limit,
    run_loop,
    shutdown,
    start_listeners,
    sweep_forever,
    tune_gc,
)
from zdlb.daemon.logs import setup_logging
from zdlb.daemon.reload import apply_pushed, socket_sources
from zdlb.daemon.runtime import Runtime, build_runtime
from zdlb.daemon.sibling_shares import SiblingShares
from zdlb.errors import ZdlbError
from zdlb.health.verdict import Transition, Verdict
from zdlb.metrics.collector import take_snapshot

log = logging.getLogger(__name__)

# How often a worker reports its counters unasked: what a /metrics scrape may lag by at most
# (control commands ask for a fresh report instead). An idle worker spends 0.3% of a core on
# 10 reports a second, 0.5% on 20 (measured over 10 s).
REPORT_INTERVAL_S = 0.1
# The master sends the state at once; not getting it means the master is stuck or gone.
FIRST_STATE_TIMEOUT_S = 10.0
# A reload's listener sockets are sent just before its Reload: they are there at once, unless
# the master died in between.
LISTENERS_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How the master was started, as workers inherit it: event loop and logging."""

    loop: str  # "uvloop" or "asyncio"
    log_level: str
    log_format: LogFormat
    access_log: bool
    workers_override: int | None = None  # `zdlb run --workers N`: fixes the count (resize.py)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker needs, from its master. The fds are inherited by this process."""

    config: Config
    index: int
    listener_fds: tuple[int, ...]  # one per config listener, in config order
    channel_fd: int
    options: WorkerOptions
    census_key: int  # the master's census hash key: sketches merge only under one key
    # Every worker's listener fds, by worker index (this one's too): a sibling's are served
    # only while it is down (workers.py, rule 6).
    share_fds: tuple[tuple[int, ...], ...] = ()
    fd_channel: int = -1  # the worker's end of the fd channel (rule 4)


class Worker:
    """The running worker: applies the master's state, reports its counters."""

    def __init__(
        self,
        runtime: Runtime,
        writer: asyncio.StreamWriter,
        shares: SiblingShares | None = None,
        fds: FdChannel | None = None,
        index: int = 0,
    ) -> None:
        self.runtime = runtime
        self.index = index
        self.shares = shares or SiblingShares(runtime, {})
        self.fds = fds
        self._writer = writer
        self._servers = [s for backend in runtime.backends.values() for s in backend.servers]
        self._by_key = {ipc.server_key(s): s for s in self._servers}
        self._seq = 0
        # Servers a reload replaced whose last requests still run here: reported with the
        # server of the same name, so the master's `wait idle` waits for them too.
        self._predecessors: list[Server] = []
        # Rule 4: a reload's listener sockets by seq, then name (every worker's, by index).
        self._arrived: dict[int, dict[str, list[socket.socket]]] = {}
        self._has_arrived = asyncio.Event()
        self.background: set[asyncio.Task[None]] = set()

    def send(self, message: ipc.Message) -> None:
        if not self._writer.is_closing():
            self._writer.write(ipc.encode(message))

    def observed_down(self, server: Server, transition: Transition) -> None:
        """The health hook: live traffic marked ``server`` down here; the master decides."""
        if transition.new is Health.DOWN:
            self.send(ipc.ObservedDown(ipc.server_key(server), transition.reason))

    def report(self) -> None:
        connections = sum(len(route.connections) for route in self.runtime.all_routes)
        snapshot = take_snapshot(self.runtime.stats, self._servers)
        if self._predecessors:
            self._predecessors = [s for s in self._predecessors if s.inflight or s.conns]
            for old in self._predecessors:
                entry = snapshot["servers"].get(old.backend, {}).get(old.name)
                if entry is not None and entry["state"] is not None:
                    entry["state"]["inflight"] += old.inflight
                    entry["state"]["conns"] += old.conns
        census = {
            name: {host: [list(pair) for pair in pairs] for host, pairs in taken.items()}
            for name, backend_census in self.runtime.census.items()
            if (taken := backend_census.take_registers())
        }
        self.send(ipc.StatsReport(self._seq, connections, snapshot, census))

    def handle(self, message: ipc.Message) -> None:
        match message:
            case ipc.StateUpdate():
                changed = ipc.apply_update(message, self._by_key)
                for server in changed:
                    self._align_verdict(server)
                    if server.admin is not AdminState.READY or server.health is Health.DOWN:
                        self._close_idle(server)
                if changed:
                    keys = ",".join(ipc.server_key(server) for server in changed)
                    log.info("worker_state_applied servers=%s", keys)
            case ipc.Poll(seq=seq):
                self._seq = seq
                self.report()
            case ipc.CloseIdle(server=key):
                if (target := self._by_key.get(key)) is not None:
                    self._close_idle(target)
            case ipc.Release(index=index):
                self.shares.release(index)
            case ipc.HandOver():
                self.hand_over()
            case ipc.Reload() | ipc.Adopt() | ipc.Siblings():
                raise AssertionError("awaited by _read_channel, in channel order")
            case ipc.Ready() | ipc.StatsReport() | ipc.ObservedDown() | ipc.Reloaded():
                log.error("worker_channel_unexpected message=%s", type(message).__name__)

    async def reload(self, message: ipc.Reload) -> None:
        """Apply the config the master pushed (ipc.py, rule 5) and say how it went."""
        old = self._servers
        adopted = self.shares.adopted
        for index in adopted:  # sibling_shares.py, rule 3
            self.shares.release(index)
        try:
            groups = await self._listener_groups(message.seq, message.listeners)
            sources = socket_sources(self.runtime, message.config)
            own = {name: socks[self.index] for name, socks in groups.items()}
            try:
                problems = await apply_pushed(self.runtime, message.config, own)
            except BaseException:
                for socks in groups.values():
                    for sock in socks:
                        sock.close()
                raise
            self.shares.replace(message.config, sources, groups)
        except ZdlbError as exc:  # a bug, or out of fds: the master logs it
            problems = [str(exc)]
        for index in adopted:
            await self.shares.adopt(index)
        self._servers = self.runtime.servers
        self._by_key = {ipc.server_key(s): s for s in self._servers}
        self._predecessors = [s for s in (*self._predecessors, *old) if s.inflight or s.conns]
        self.send(ipc.Reloaded(message.seq, tuple(problems)))

    async def siblings(self, message: ipc.Siblings) -> None:
        """ipc.py rule 8: the siblings' sockets, after the master changed their number."""
        try:
            groups = await self._listener_groups(message.seq, message.listeners)
        except ZdlbError as exc:
            log.error("worker_siblings_failed error=%s", exc)
            return
        for socks in groups.values():
            socks[self.index].close()  # its own: the runtime's copy serves
        self.shares.reset(groups, self.index)

    async def _listener_groups(
        self, seq: int, names: tuple[str, ...]
    ) -> dict[str, list[socket.socket]]:
        """The sockets of listeners ``names``, sent on the fd channel before message ``seq``
        (rule 4). Raises ZdlbError if they do not come within LISTENERS_TIMEOUT_S."""
        wanted = set(names)
        try:
            async with asyncio.timeout(LISTENERS_TIMEOUT_S):
                while not wanted <= self._arrived.get(seq, {}).keys():
                    self._has_arrived.clear()
                    await self._has_arrived.wait()
        except TimeoutError:
            raise ZdlbError(f"listeners {sorted(wanted)}: no sockets from the master") from None
        return self._arrived.pop(seq, {})

    async def read_fds(self) -> None:
        """Rule 4: until the master closes its end."""
        if self.fds is None:
            return
        while True:
            try:
                payload, socks = await self.fds.receive()
            except (ConnectionError, ValueError) as exc:
                log.info("worker_fd_channel_closed reason=%r", exc)
                return
            match payload["t"]:
                case "listeners":
                    self._listeners_arrived(payload, socks)
                case "conns":
                    await self._adopt_connections(payload, socks)
                case kind:
                    log.error("worker_fd_channel_unexpected message=%s", kind)
                    for sock in socks:
                        sock.close()

    def _listeners_arrived(self, payload: dict[str, Any], socks: list[socket.socket]) -> None:
        names, count, seq = payload["names"], int(payload["count"]), int(payload["seq"])
        if len(names) * count != len(socks):
            log.error("worker_fd_channel_malformed names=%s sockets=%d", names, len(socks))
            for sock in socks:
                sock.close()
            return
        arrived = self._arrived.setdefault(seq, {})
        for number, name in enumerate(names):
            arrived[str(name)] = socks[number * count : (number + 1) * count]
        self._has_arrived.set()

    async def _adopt_connections(self, payload: dict[str, Any], socks: list[socket.socket]) -> None:
        """An upgrade's connections, from the new master (idle_handover.py)."""
        try:
            names = names_of(payload, len(socks))
        except ValueError as exc:
            log.error("worker_fd_channel_malformed error=%s", exc)
            names = []
        for number, sock in enumerate(socks):
            slot = self.runtime.slots.get(names[number]) if number < len(names) else None
            if slot is None:
                sock.close()
                continue
            await adopt_connection(slot, sock)
        log.info("worker_connections_adopted count=%d", len(socks))

    def hand_over(self) -> None:
        """ipc.py ``HandOver``: send the idle keep-alive connections to the master (an upgrade),
        in a task: the channel goes on being read meanwhile."""
        task = asyncio.get_running_loop().create_task(self._hand_over())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _hand_over(self) -> None:
        fds = self.fds
        if fds is None:
            return
        count = 0
        try:
            count = await hand_over_idle(self.runtime, lambda batch: send_conns(fds, batch))
        except (OSError, ValueError) as exc:
            log.error("worker_hand_over_failed error=%r", exc)
        finally:
            with contextlib.suppress(OSError):
                await fds.send({"t": "done", "count": count}, [])
        log.info("worker_connections_handed_over count=%d", count)

    def _align_verdict(self, server: Server) -> None:
        """The local passive-check verdict follows the master's health, so the next errors on
        live traffic are judged from where the master stands (ipc.py, rule 3)."""
        verdict: Verdict | None = self.runtime.health.verdict(server)
        if verdict is None or verdict.health is server.health:
            return
        if server.health is Health.DOWN:
            verdict.force_down("master")
            return
        for _ in range(verdict.rise):
            verdict.record(True, "master")

    def _close_idle(self, server: Server) -> None:
        for route in self.runtime.routes:  # HTTP only: a TCP tunnel holds no idle connection
            pool = route.upstreams.get(server)
            if pool is not None and pool.server is server:
                pool.close_idle()


async def run_worker(spec: WorkerSpec) -> None:
    """Serve the inherited listeners until SIGTERM or the master goes away (rule 3)."""
    sockets = [socket.socket(fileno=fd) for fd in spec.listener_fds]
    for sock in sockets:
        sock.setblocking(False)
    channel = socket.socket(fileno=spec.channel_fd)
    reader, writer = await asyncio.open_unix_connection(sock=channel, limit=ipc.MAX_MESSAGE_BYTES)
    hook = _DeferredHook()
    runtime = build_runtime(
        spec.config,
        sockets,
        on_health=hook,
        census_key=spec.census_key,
        share_of=max(1, len(spec.share_fds)),
    )
    names = [listener.name for listener in spec.config.listeners]
    shares = {
        index: {name: socket.socket(fileno=fd) for name, fd in zip(names, fds, strict=True)}
        for index, fds in enumerate(spec.share_fds)
        if index != spec.index
    }
    fds = FdChannel(socket.socket(fileno=spec.fd_channel)) if spec.fd_channel >= 0 else None
    worker = Worker(runtime, writer, SiblingShares(runtime, shares), fds, spec.index)
    hook.target = worker
    stop = asyncio.Event()
    install_signal_handlers(stop)
    try:
        async with asyncio.timeout(FIRST_STATE_TIMEOUT_S):
            first = ipc.decode(await reader.readline())
    except (TimeoutError, ValueError) as exc:
        log.error("worker_no_state worker=%d error=%r", spec.index, exc)
        runtime.close_sockets()
        writer.close()
        return
    worker.handle(first)  # rule 1: the state first, then the listeners
    await start_listeners(runtime, log_started=False)
    worker.send(ipc.Ready(os.getpid()))
    tune_gc()
    async with asyncio.TaskGroup() as tasks:
        sweeper = tasks.create_task(sweep_forever(runtime))
        reporter = tasks.create_task(_report_forever(worker))
        listener = tasks.create_task(_read_channel(reader, worker, stop))
        fd_reader = tasks.create_task(worker.read_fds())
        await stop.wait()
        worker.shares.close()
        await shutdown(runtime)
        worker.report()  # the last counts, so a scrape after a drain adds them up
        for task in (sweeper, reporter, listener, fd_reader, *worker.background):
            task.cancel()
    if fds is not None:
        fds.close()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


class _DeferredHook:
    """The health hook, built before the ``Worker`` it calls (the runtime comes first)."""

    target: Worker | None = None

    def __call__(self, server: Server, transition: Transition) -> None:
        if self.target is not None:
            self.target.observed_down(server, transition)


async def _report_forever(worker: Worker) -> None:
    while True:
        await asyncio.sleep(REPORT_INTERVAL_S)
        worker.report()


async def _read_channel(reader: asyncio.StreamReader, worker: Worker, stop: asyncio.Event) -> None:
    try:
        while line := await reader.readline():
            message = ipc.decode(line)
            if isinstance(message, ipc.Reload):
                await worker.reload(message)  # before the next message: the state follows it
            elif isinstance(message, ipc.Adopt):
                await worker.shares.adopt(message.index)
            elif isinstance(message, ipc.Siblings):
                await worker.siblings(message)
            else:
                worker.handle(message)
    except (ConnectionError, ValueError) as exc:
        log.error("worker_channel_failed error=%r", exc)
    if not stop.is_set():
        log.warning("worker_master_gone pid=%d", os.getpid())
        stop.set()


def main() -> int:
    spec = pickle.load(sys.stdin.buffer)
    sys.stdin.close()
    if not isinstance(spec, WorkerSpec):
        print("zdlb worker: no worker spec on stdin (started by hand?)", file=sys.stderr)
        return 2
    options = spec.options
    setup_logging(
        options.log_level,
        options.log_format,
        access_log=options.access_log,
        worker=spec.index,
    )
    raise_open_file_limit()
    return run_loop(options.loop, run_worker(spec))


if __name__ == "__main__":
    # Run as the module itself, not __main__: the pickled WorkerSpec names
    # zdlb.daemon.worker.WorkerSpec, and isinstance must see that very class.
    from zdlb.daemon import worker

    sys.exit(worker.main())
