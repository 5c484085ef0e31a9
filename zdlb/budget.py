"""The connection budget: how many client connections one process holds at once.

A connection zdlb accepts and then cannot serve is worse than one it leaves in the kernel's
backlog: at the open-file limit zdlb used to accept clients and answer them 502 (it had no fd
left for their server connection). So the budget is spent *before* accepting. The rules:

1. **Limits.** The process may hold ``maxconn`` client connections over every listener
   together (the config's top-level key, or ``default_maxconn`` from the open-file limit), and
   a listener with its own ``maxconn`` at most that many. They count per process, as nginx's
   ``worker_connections``: each worker has its own file descriptors.
2. **At a limit, stop accepting.** The listener (or every listener, for the process limit)
   stops taking clients out of its backlog; they wait there, and the kernel answers nothing
   until they are taken. Connections already accepted keep being served. Each stop counts as
   one hit (``show info``, metrics).
3. **Resume below it**, once ``RESUME_MARGIN`` of the limit is free again (at least one
   connection): under churn at the limit, accepting is not switched on and off for every
   close.
4. **The default leaves room** (``default_maxconn``): each client may need a second fd for its
   server connection; idle pooled server connections, checks, splice pipes, listeners, the
   control socket and its clients, logs and the metrics endpoint get a reserve first.

Counting is two attribute additions per connection (``ListenerGate.opened``/``closed``); only
reaching or leaving a limit calls out, to the acceptors' ``pause``/``resume``.
"""

from __future__ import annotations

import logging
import resource
from typing import Protocol

from zdlb.config.model import Config, ListenerConfig
from zdlb.stats import ListenerStats, ProcessStats

log = logging.getLogger(__name__)

# Rule 3: accepting resumes once 2% of the limit (at least one connection) is free again.
RESUME_MARGIN = 0.02
# Rule 4. File descriptors a client connection may need: itself and its server connection.
FDS_PER_CLIENT = 2
# Reserved whatever the config: stdio, the epoll fd, log files, the control socket with its 64
# clients (control/server.py MAX_CLIENTS), the metrics listener and a few of its scrapers,
# a worker's pipe to its master, and some slack for the imports and DNS of a reload.
BASE_RESERVED_FDS = 128
# Per listener: its socket (one per worker in a master), and its idle splice pipes (16 pipes
# of two fds each, tcp/pipes.py DEFAULT_MAX_IDLE_PIPES).
FDS_PER_LISTENER = 1 + 2 * 16
# Per server: one health probe at a time.
FDS_PER_SERVER = 1
# Never below this, however small the open-file limit: a handful of clients still get served.
MIN_MAXCONN = 16
# Unlimited, for a listener without its own maxconn: one integer comparison either way.
NO_LIMIT = 1 << 62


class Acceptor(Protocol):
    """Something that takes clients out of a listening socket's backlog."""

    def pause(self) -> None: ...
    def resume(self) -> None: ...


def open_file_limit() -> int:
    """This process's soft RLIMIT_NOFILE (the one that fails ``accept`` and ``connect``)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def reserved_fds(config: Config) -> int:
    """Rule 4: the fds kept back from clients for everything else ``config`` opens."""
    servers = [server for backend in config.backends for server in backend.servers]
    idle = sum(server.max_idle for server in servers)
    return (
        BASE_RESERVED_FDS
        + FDS_PER_LISTENER * len(config.listeners)
        + FDS_PER_SERVER * len(servers)
        + idle
    )


def default_maxconn(config: Config, nofile: int) -> int:
    """Rule 4: the process limit when the config sets none, for an open-file limit ``nofile``."""
    return max(MIN_MAXCONN, (nofile - reserved_fds(config)) // FDS_PER_CLIENT)


def _resume_at(limit: int) -> int:
    return limit - max(1, int(limit * RESUME_MARGIN))


class ConnectionBudget:
    """The process limit (rule 1) and the listeners' gates; owned by the event loop."""

    __slots__ = ("_resume_at", "gates", "is_stopped", "limit", "open", "paused", "stats")

    def __init__(self, limit: int = NO_LIMIT, stats: ProcessStats | None = None) -> None:
        self.stats = stats if stats is not None else ProcessStats()
        self.limit = limit
        self.open = 0
        self._resume_at = _resume_at(limit)
        self.gates: dict[str, ListenerGate] = {}
        self.paused = False  # the process limit stopped every listener
        self.is_stopped = False  # shutting down: nothing resumes
        self.stats.maxconn = limit if limit != NO_LIMIT else 0

    def __repr__(self) -> str:
        return f"<ConnectionBudget open={self.open}/{self.limit} paused={self.paused}>"

    @classmethod
    def for_config(cls, config: Config, stats: ProcessStats | None = None) -> ConnectionBudget:
        """The budget ``config`` asks for, or the one the open-file limit allows (rule 4)."""
        nofile = open_file_limit()
        fitting = default_maxconn(config, nofile)
        limit = config.maxconn if config.maxconn is not None else fitting
        if limit > fitting:
            log.warning(
                "maxconn_above_open_file_limit maxconn=%d fits=%d nofile=%d reserved=%d",
                limit,
                fitting,
                nofile,
                reserved_fds(config),
            )
        return cls(limit, stats)

    def configure(self, config: Config) -> None:
        """A reload switched to ``config``: its process and listener limits apply from the next
        accept (daemon/reload.py ``switch``; until then the running config's stay)."""
        fresh = ConnectionBudget.for_config(config)
        self.limit, self._resume_at = fresh.limit, fresh._resume_at
        self.stats.maxconn = self.limit
        for listener in config.listeners:
            if listener.name in self.gates:
                self.gates[listener.name].set_limit(listener.maxconn)
        self.rebalance()

    def gate(self, name: str, limit: int | None, stats: ListenerStats) -> ListenerGate:
        """The gate of listener ``name``, made with ``limit`` the first time; a reload's routes
        get the same one, so its count stays right (``configure`` changes its limit)."""
        gate = self.gates.get(name)
        if gate is None:
            gate = self.gates[name] = ListenerGate(self, name, stats)
            gate.set_limit(limit)
        return gate

    def reached(self, gate: ListenerGate) -> None:
        """A limit was reached at ``gate``'s last accept (rule 2)."""
        if self.open >= self.limit and not self.paused:
            self.paused = True
            self.stats.limit_hits += 1
            log.warning("maxconn_reached open=%d limit=%d: accepting paused", self.open, self.limit)
            for each in self.gates.values():
                each.pause()
        if gate.open >= gate.limit and not gate.is_paused:
            gate.stats.limit_hits += 1
            gate.pause()

    def rebalance(self) -> None:
        """Resume what may accept again (rule 3); called when a connection closed."""
        if self.is_stopped:
            return
        if self.paused and self.open <= self._resume_at:
            self.paused = False
            log.info("maxconn_below open=%d limit=%d: accepting resumed", self.open, self.limit)
        if self.paused:
            return
        for gate in self.gates.values():
            if gate.is_paused and gate.open <= gate.resume_at:
                gate.resume()

    def stop(self) -> None:
        """Shutdown: nothing resumes accepting any more."""
        self.is_stopped = True


def lone_gate(listener: ListenerConfig, stats: ListenerStats) -> ListenerGate:
    """A gate with a budget of its own and no process limit: for a route built without a
    runtime (tests, benchmarks); the daemon's routes share the runtime's budget."""
    return ConnectionBudget().gate(listener.name, listener.maxconn, stats)


class ListenerGate:
    """One listener's count and limit, and the acceptors that take its clients."""

    __slots__ = ("acceptors", "budget", "is_paused", "limit", "name", "open", "resume_at", "stats")

    def __init__(self, budget: ConnectionBudget, name: str, stats: ListenerStats) -> None:
        self.budget = budget
        self.name = name
        self.stats = stats
        self.open = 0
        self.limit = NO_LIMIT
        self.resume_at = NO_LIMIT
        self.is_paused = False
        self.acceptors: set[Acceptor] = set()

    def __repr__(self) -> str:
        return f"<ListenerGate {self.name} open={self.open}/{self.limit} paused={self.is_paused}>"

    def set_limit(self, limit: int | None) -> None:
        self.limit = NO_LIMIT if limit is None else limit
        self.resume_at = _resume_at(self.limit) if limit is not None else NO_LIMIT
        self.stats.maxconn = limit or 0

    def opened(self) -> None:
        """A client connection was accepted (connection_made): count it; at a limit, pause."""
        self.open += 1
        budget = self.budget
        budget.open += 1
        if self.open >= self.limit or budget.open >= budget.limit:
            budget.reached(self)

    def closed(self) -> None:
        """A client connection ended: count it; below the limits again, resume."""
        self.open -= 1
        budget = self.budget
        budget.open -= 1
        if budget.paused or self.is_paused:
            budget.rebalance()

    def pause(self) -> None:
        if not self.is_paused:
            self.is_paused = True
            for acceptor in self.acceptors:
                acceptor.pause()

    def resume(self) -> None:
        if self.is_paused and not self.budget.paused:
            self.is_paused = False
            for acceptor in self.acceptors:
                acceptor.resume()

    def add(self, acceptor: Acceptor) -> None:
        """An acceptor for this listener started: it obeys the gate from now on."""
        self.acceptors.add(acceptor)
        if self.is_paused:
            acceptor.pause()

    def discard(self, acceptor: Acceptor) -> None:
        self.acceptors.discard(acceptor)
