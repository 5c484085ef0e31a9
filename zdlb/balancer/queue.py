"""Requests waiting for a server slot: per-server ``maxconn`` and the FIFO queues behind it.

HAProxy's most used protection, with its semantics. The rules, stated once
(tests/unit/test_queue.py walks them):

1. A server with ``maxconn`` has at most that many requests in flight. "In flight" is
   ``Server.inflight``, the same count least-connections balances on, so the two agree.
2. A request whose server is full waits. A *sticky* request (its user is pinned to a host, and
   that host can serve it) waits in that server's own queue; any other waits in the backend's
   shared queue and takes the first server that frees a slot while it takes new traffic.
3. A freed slot goes to the oldest of the two waiters it could serve: the head of the server's
   own queue and the first shared waiter, by arrival order (HAProxy's order). The slot is
   reserved at once (``inflight += 1``), so a request arriving meanwhile cannot overtake the
   queue; the waiter is told synchronously and does its I/O later.
4. A change of admin state, health, weight or pool (flip, drain, a check's verdict) re-places
   every waiter in arrival order, as if it had just arrived: sticky waiters follow their host
   (main or pair), a waiter whose host can no longer serve it goes to the shared queue, and any
   slot that became free is handed out. The re-placing runs after the change is complete (the
   ``defer`` callback: a flip changes two servers, and between them neither serves the host).
5. A waiter leaves after ``queue_s`` (its connection answers 503 with ``Retry-After``) or when
   its client goes away. Leaving is a flag (O(1)); dead entries are skipped when met and
   dropped, so a queue holds at most as many entries as requests that entered it and have not
   been skipped, and every request is one client connection's one exchange: bounded by
   ``maxconn`` of the listeners.

No I/O, no clock reads, no event loop here: ``now`` comes from the caller.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from zdlb.balancer.pool import Backend
from zdlb.balancer.server import UNLIMITED, Server


class Waiter(Protocol):
    """What waits in a queue (a client connection's exchange)."""

    def queue_granted(self, ticket: Ticket, server: Server) -> None:
        """A slot on ``server`` is reserved for this waiter (``server.inflight`` counts it)."""


class Ticket:
    """One waiting request: who waits, for which host, in which arrival order."""

    __slots__ = ("identity", "is_live", "queues", "seq", "server", "waiter")

    def __init__(self, queues: WaitQueues, waiter: Waiter, identity: str | None, seq: int) -> None:
        self.queues = queues
        self.waiter = waiter
        self.identity = identity  # the sticky host it waits for; None: any server
        self.seq = seq
        self.server: Server | None = None  # whose queue it is in; None: the shared one
        self.is_live = True


def _first_live(queue: deque[Ticket]) -> Ticket | None:
    """The oldest live ticket of ``queue``; the dead ones met before it are dropped."""
    while queue:
        ticket = queue[0]
        if ticket.is_live:
            return ticket
        queue.popleft()
    return None


class WaitQueues:
    """The queues of one backend: one per server (sticky waiters) and one shared."""

    __slots__ = (
        "_clock",
        "_defer",
        "_is_replacing",
        "_own",
        "_seq",
        "_shared",
        "backend",
        "waiting",
    )

    def __init__(
        self,
        backend: Backend,
        defer: Callable[[Callable[[], None]], object] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.backend = backend
        self.waiting = 0  # live tickets, in every queue of the backend
        self._seq = 0
        self._shared: deque[Ticket] = deque()
        self._own: dict[Server, deque[Ticket]] = {s: deque() for s in backend.servers}
        # How rule 4 runs after the change that triggered it (the loop's call_soon), and the
        # clock its selections use (the loop's, as the connections'); None: at once, and 0.
        self._defer = defer
        self._clock = clock
        self._is_replacing = False
        for server in backend.servers:
            server.waitq = self

    # --- a request arrives, leaves, or a slot frees ------------------------------------------

    def enqueue(self, waiter: Waiter, identity: str | None, now: float) -> Ticket:
        """A request whose server was full: placed as rule 2 says. A balanced request (no
        ``identity``) is granted at once if another server has a free slot; else it waits."""
        self._seq += 1
        ticket = Ticket(self, waiter, identity, self._seq)
        self.waiting += 1
        self._place(ticket, now)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        """The waiter gave up (queue_s passed, or its client left): rule 5."""
        if ticket.is_live:
            ticket.is_live = False
            self.waiting -= 1

    def slot_freed(self, server: Server, now: float) -> None:
        """``server`` finished a request: hand its free slots to the oldest waiters (rule 3)."""
        if not self.waiting:
            return
        takes_shared = self._takes_shared(server, now)
        own = self._own.get(server)
        while server.inflight < server.maxconn and self.waiting:
            mine = _first_live(own) if own is not None else None
            shared = _first_live(self._shared) if takes_shared else None
            if mine is None and shared is None:
                return
            if shared is None or (mine is not None and mine.seq < shared.seq):
                assert mine is not None
                own.popleft()  # type: ignore[union-attr]  # mine came from own
                self._grant(mine, server)
            else:
                self._shared.popleft()
                self._grant(shared, server)

    def queued(self, server: Server | None) -> int:
        """Live waiters in ``server``'s own queue (None: the shared queue)."""
        queue = self._shared if server is None else self._own.get(server, ())
        return sum(1 for ticket in queue if ticket.is_live)

    # --- rule 4 ------------------------------------------------------------------------------

    def state_changed(self) -> None:
        """A server of this backend changed state: re-place the waiters once it is done."""
        if self._is_replacing:
            return
        self._is_replacing = True
        if self._defer is None:
            self._replace()
        else:
            self._defer(self._replace)

    def _replace(self) -> None:
        self._is_replacing = False
        now = self._clock() if self._clock is not None else 0.0
        tickets = [t for t in self._shared if t.is_live]
        for queue in self._own.values():
            tickets.extend(t for t in queue if t.is_live)
            queue.clear()
        self._shared.clear()
        tickets.sort(key=lambda t: t.seq)
        for ticket in tickets:
            self._place(ticket, now)

    def _place(self, ticket: Ticket, now: float) -> None:
        backend = self.backend
        server = backend.select_sticky(ticket.identity, now) if ticket.identity else None
        if server is None:
            full = [s for s in backend.servers if s.inflight >= s.maxconn]
            server = backend.select(now, None, full) if len(full) < len(backend.servers) else None
            if server is not None and server.inflight < server.maxconn:
                self._grant(ticket, server)
                return
            self._append(ticket, None)
            return
        if server.inflight < server.maxconn:
            self._grant(ticket, server)
        else:
            self._append(ticket, server)

    # --- helpers -----------------------------------------------------------------------------

    def _append(self, ticket: Ticket, server: Server | None) -> None:
        ticket.server = server
        if server is None:
            self._shared.append(ticket)
        else:
            self._own.setdefault(server, deque()).append(ticket)

    def _grant(self, ticket: Ticket, server: Server) -> None:
        ticket.is_live = False
        self.waiting -= 1
        server.inflight += 1  # rule 3: reserved now, so nobody overtakes the queue
        ticket.waiter.queue_granted(ticket, server)

    def _takes_shared(self, server: Server, now: float) -> bool:
        """True if a balanced pick could choose ``server`` now (it takes new traffic, itself
        or standing in for its main)."""
        return self.backend.takes_new_traffic(server, now)


def slot_freed(server: Server, now: float) -> None:
    """``server`` finished a request or a tunnel: its backend's queues, if it has any, hand the
    slot to the oldest waiter (rule 3). One attribute read for a server without queues."""
    waitq = server.waitq
    if waitq is not None:
        cast(WaitQueues, waitq).slot_freed(server, now)


def attach_queues(
    backend: Backend,
    processes: int = 1,
    defer: Callable[[Callable[[], None]], object] | None = None,
    clock: Callable[[], float] | None = None,
) -> WaitQueues | None:
    """Apply each server's ``maxconn`` (this process's share of it when ``processes`` share the
    servers: ``maxconn // processes``, at least 1) and give the backend its queues; None when no
    server of the backend has a limit (nothing ever waits, nothing is checked)."""
    limited = [s for s in backend.servers if s.config.maxconn is not None]
    if not limited:
        for server in backend.servers:
            server.maxconn = UNLIMITED
            server.waitq = None
        return None
    for server in backend.servers:
        limit = server.config.maxconn
        server.maxconn = UNLIMITED if limit is None else max(1, limit // processes)
    return WaitQueues(backend, defer, clock)
