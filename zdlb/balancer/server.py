"""Runtime state of one backend server: admin state, health, weight, pool and load counters.

A ``Server`` is a small mutable record owned by the event loop thread (no locks: every mutation
happens between awaits). The balancer reads it once per request, so its predicates are plain
attribute comparisons.

State is two orthogonal enums, ``AdminState`` (what the operator asked for) and ``Health``
(what the checks found), each changed in exactly one method that returns the old value, plus
the pool (main | backup) and the weight.

Rules, stated once (h11's _state.py style; tests/unit/test_server.py walks every row):

1. A server takes *new* traffic only when READY, UP and of weight > 0.
2. It keeps its *sticky* users when UP and READY (whatever its weight), or UP and DRAIN until
   ``drain_ends``: a drain holds its users for ``drain_sticky_s``, then lets them go, so a
   drain always ends.
3. A paired backup (``pair``) stands in for its main whenever the main is not usable (down,
   maint, or drain once its hold is over), for new and sticky traffic alike, with the main's
   weight. ``slot_route`` below is that rule as a table.
4. ``flip`` toggles whether a pair's main is in maintenance: a main that serves (READY or DRAIN)
   goes to MAINT and its pair becomes READY; a main in MAINT becomes READY again. Flipping to
   a member whose checks fail is refused unless forced (``plan_flip``).

No I/O, no clock reads, no logging here: a caller passes ``now`` and logs transitions with the
old value returned.
"""

from __future__ import annotations

import enum
import math
import sys
from dataclasses import dataclass
from typing import ClassVar, Protocol

from zdlb.config.model import Address, PoolName, ServerConfig

# A server without `maxconn` is never full: one integer comparison per request either way.
UNLIMITED = sys.maxsize


class SlotQueue(Protocol):
    """What a server knows of the request queues of its backend (balancer/queue.py's
    ``WaitQueues``; a Protocol so that this module imports nothing above it)."""

    waiting: int  # live waiters in every queue of the backend

    def state_changed(self) -> None: ...
    def queued(self, server: Server | None) -> int: ...


class AdminState(enum.Enum):
    """What the operator asked for, as HAProxy's ``set server B/S state``."""

    READY = "ready"  # takes new traffic
    DRAIN = "drain"  # takes no new traffic; existing connections and requests finish
    MAINT = "maint"  # takes nothing; existing connections still run to completion


class Health(enum.Enum):
    """What the health checks last concluded (a verdict, not a single probe result)."""

    UP = "up"
    DOWN = "down"


class Server:
    """Mutable runtime state of one backend server, identified by ``backend``/``name``.

    ``weight`` is the runtime weight (0..256, starts at ``config.weight``); 0 keeps the server
    usable for traffic already on it but gives it no new picks. ``inflight`` counts requests
    being proxied to it, ``conns`` its open upstream connections (idle pooled ones included).
    Identity is the object: two ``Server`` objects never compare equal, so they hash cheaply as
    dict keys for per-server balancer state.
    """

    __slots__ = (
        "_admin",
        "_health",
        "_pool",
        "_weight",
        "address",
        "backend",
        "config",
        "conns",
        "drain_ends",
        "drain_hold_s",
        "identity",
        "inflight",
        "is_observed",
        "maxconn",
        "name",
        "pair",
        "waitq",
    )

    # Bumped by every change of pool, admin state, health or weight, in any server: balancers
    # cache what they derive from those (the round-robin schedule) and compare this number.
    generation: ClassVar[int] = 0

    def __init__(self, config: ServerConfig, backend: str) -> None:
        self.config = config
        self.name: str = config.name
        self.backend = backend
        self.address: Address = config.address
        self._pool: PoolName = config.pool
        self._weight: int = config.weight
        self._admin = AdminState.READY
        self._health = Health.UP
        self.inflight = 0
        self.conns = 0
        # At most this many requests in flight (this process's share of the config's maxconn,
        # set by Backend); the queues the next ones wait in, when the backend has limits.
        self.maxconn = UNLIMITED
        self.waitq: SlotQueue | None = None
        # Live traffic reports its errors to the health checker (passive checks).
        self.is_observed = config.check is not None and config.check.observe
        # The other version on the same host (set both ways by the Backend), and the name the
        # sticky cookie carries: a main and its pair share it, so users stay on their host.
        self.pair: Server | None = None
        self.identity: str = config.pair or config.name
        # While DRAIN: until when sticky users stay (a monotonic time, like the loop's clock);
        # the backend sets the hold to its sticky drain_sticky_s (0 without a sticky cookie).
        self.drain_ends = math.inf
        self.drain_hold_s = 0.0

    @property
    def pool(self) -> PoolName:
        return self._pool

    @pool.setter
    def pool(self, pool: PoolName) -> None:
        self._pool = pool
        self._changed()

    @property
    def weight(self) -> int:
        return self._weight

    @weight.setter
    def weight(self, weight: int) -> None:
        self._weight = weight
        self._changed()

    @property
    def admin(self) -> AdminState:
        return self._admin

    @admin.setter
    def admin(self, state: AdminState) -> None:
        self._admin = state
        self._changed()

    @property
    def health(self) -> Health:
        return self._health

    @health.setter
    def health(self, health: Health) -> None:
        self._health = health
        self._changed()

    def _changed(self) -> None:
        """Who may serve whom changed: balancers recompute, queued requests are re-placed."""
        Server.generation += 1
        waitq = self.waitq
        if waitq is not None and waitq.waiting:
            waitq.state_changed()

    @property
    def is_usable(self) -> bool:
        """True if traffic may be sent here at all: admin READY and health UP."""
        # The fields, not the properties: a property read is a Python call, and this runs
        # for every sticky request (slot_route).
        return self._admin is AdminState.READY and self._health is Health.UP

    @property
    def takes_new_traffic(self) -> bool:
        """True if the balancer may pick this server for a new request (usable, weight > 0)."""
        # Inlined rather than calling is_usable, and the fields rather than the properties:
        # this runs once per server per request.
        return self._admin is AdminState.READY and self._health is Health.UP and self._weight > 0

    def holds_sticky(self, now: float) -> bool:
        """True if this server keeps its sticky users at ``now`` (rule 2)."""
        if self._health is not Health.UP:
            return False
        admin = self._admin
        return admin is AdminState.READY or (admin is AdminState.DRAIN and now < self.drain_ends)

    def set_admin(self, state: AdminState, now: float | None = None) -> AdminState:
        """Set the admin state; returns the previous one so the caller can log old -> new.

        Entering DRAIN at ``now`` holds sticky users until ``now + drain_hold_s`` (without
        ``now``: for good). Draining a server already draining keeps the first deadline, so
        repeating the command is harmless.
        """
        old = self.admin
        if state is AdminState.DRAIN and old is not AdminState.DRAIN:
            self.drain_ends = math.inf if now is None else now + self.drain_hold_s
        self.admin = state
        return old

    def set_health(self, health: Health) -> Health:
        """Set the health verdict; returns the previous one so the caller can log old -> new."""
        old = self.health
        self.health = health
        return old

    def request_started(self) -> None:
        """Count one more request in flight to this server."""
        self.inflight += 1

    def request_finished(self) -> None:
        """Count one request less in flight; an unmatched call is a bug (AssertionError)."""
        assert self.inflight > 0, f"request_finished without request_started: {self!r}"
        # Clamp too, so a bookkeeping bug under ``python -O`` cannot drive load negative and
        # make least-connections prefer this server forever.
        if self.inflight > 0:
            self.inflight -= 1

    def connection_opened(self) -> None:
        """Count one more open upstream connection to this server."""
        self.conns += 1

    def connection_closed(self) -> None:
        """Count one open upstream connection less; an unmatched call is a bug (AssertionError)."""
        assert self.conns > 0, f"connection_closed without connection_opened: {self!r}"
        if self.conns > 0:
            self.conns -= 1

    def __repr__(self) -> str:
        return (
            f"<Server {self.backend}/{self.name} pool={self.pool.value} admin={self.admin.value}"
            f" health={self.health.value} weight={self.weight} inflight={self.inflight}"
            f" conns={self.conns}>"
        )


class Member(enum.Enum):
    """Which member of a main/pair slot gets traffic."""

    MAIN = "main"
    PAIR = "pair"
    NONE = "none"


def slot_route(main: Server, now: float) -> tuple[Member, Member]:
    """Who serves the slot of pool-main server ``main``: (new traffic, sticky traffic).

    Rule 3 as code. Without a pair the answer is MAIN or NONE; weight only matters to the
    balancer, which gives a stand-in its main's weight.
    """
    new = Member.MAIN if main.takes_new_traffic else Member.NONE
    sticky = Member.MAIN if main.holds_sticky(now) else Member.NONE
    pair = main.pair
    if pair is None or not pair.is_usable:
        return new, sticky
    if sticky is Member.NONE:
        # The main is down, in maint, or its drain hold is over: the pair takes the slot.
        return (Member.PAIR if main._weight > 0 else Member.NONE), Member.PAIR
    return new, sticky


@dataclass(frozen=True, slots=True)
class FlipPlan:
    """What ``flip`` does to a pair: the main's and the pair's new admin states, or why not."""

    main: AdminState
    pair: AdminState
    refusal: str | None = None


def plan_flip(main: Server, pair: Server, force: bool) -> FlipPlan:
    """Rule 4: toggle whether ``main`` is in maintenance; ``pair`` takes over or steps back.

    Refused (unless ``force``) when the member that would take the traffic is down by its
    checks: flipping would leave the host with no working version.
    """
    if main.admin is AdminState.MAINT:
        refusal = None
        if main.health is Health.DOWN and not force:
            refusal = f"{main.name} fails its checks; flipping back needs 'force'"
        return FlipPlan(AdminState.READY, pair.admin, refusal)
    refusal = None
    if pair.health is Health.DOWN and not force:
        refusal = f"{pair.name} fails its checks; flipping to it needs 'force'"
    return FlipPlan(AdminState.MAINT, AdminState.READY, refusal)
