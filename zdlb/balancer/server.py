"""Runtime state of one backend server: admin state, health, weight, pool and load counters.

A ``Server`` is a small mutable record owned by the event loop thread (no locks: every mutation
happens between awaits). The balancer reads it once per request, so its predicates are plain
attribute comparisons.

State is two orthogonal enums, ``AdminState`` (what the operator asked for) and ``Health``
(what the checks found), each changed in exactly one method that returns the old value. Today
every change is allowed; the table-driven transition machine (health checks, drain, maint,
main/backup pairs) slots into ``set_admin``/``set_health`` without touching callers.

No I/O, no clock reads, no logging here: callers log transitions with the old value returned.
"""

from __future__ import annotations

import enum

from zdlb.config.model import Address, PoolName, ServerConfig


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
        "inflight",
        "is_observed",
        "name",
    )

    # Bumped by every change of pool, admin state, health or weight, in any server: balancers
    # cache what they derive from those (the round-robin schedule) and compare this number.
    generation = 0

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
        # Live traffic reports its errors to the health checker (passive checks).
        self.is_observed = config.check is not None and config.check.observe

    @property
    def pool(self) -> PoolName:
        return self._pool

    @pool.setter
    def pool(self, pool: PoolName) -> None:
        self._pool = pool
        Server.generation += 1

    @property
    def weight(self) -> int:
        return self._weight

    @weight.setter
    def weight(self, weight: int) -> None:
        self._weight = weight
        Server.generation += 1

    @property
    def admin(self) -> AdminState:
        return self._admin

    @admin.setter
    def admin(self, state: AdminState) -> None:
        self._admin = state
        Server.generation += 1

    @property
    def health(self) -> Health:
        return self._health

    @health.setter
    def health(self, health: Health) -> None:
        self._health = health
        Server.generation += 1

    @property
    def is_usable(self) -> bool:
        """True if traffic may be sent here at all: admin READY and health UP."""
        return self.admin is AdminState.READY and self.health is Health.UP

    @property
    def takes_new_traffic(self) -> bool:
        """True if the balancer may pick this server for a new request (usable, weight > 0)."""
        # Inlined rather than calling is_usable: this runs once per server per request.
        return self.admin is AdminState.READY and self.health is Health.UP and self.weight > 0

    def set_admin(self, state: AdminState) -> AdminState:
        """Set the admin state; returns the previous one so the caller can log old -> new."""
        old = self.admin
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
