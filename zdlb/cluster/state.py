"""What the fleet shares about one server, and the etcd keys it lives under. Pure: no I/O.

Layout under the fleet's prefix (``[cluster] prefix``, e.g. ``/zdlb/prod``)::

    PREFIX/deploy/lock              the deploy lock's holder, under the deploy's etcd lease
    PREFIX/deploy/record            the current or last deploy's record (deploy/record.py)
    PREFIX/servers/BACKEND/SERVER   a ServerState as JSON; absent: as configured
    PREFIX/views/NAME               an instance's own view (health, load), under its lease

Every instance watches ``deploy/`` and ``servers/`` (adjacent in key order); ``views/`` sorts
after them, so the views' frequent writes never reach the watch.

Rules:
1. A server key holds the whole runtime state an operator sets (admin, weight, pool, the drain
   hold's deadline), never health: each instance checks from where it stands.
2. Wall-clock seconds cross machines (``drain_until``); each instance turns them into its own
   loop time when it applies them.
3. Decoding is strict: a value zdlb did not write is reported (``ValueError``) and skipped by
   the caller, never applied half.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, replace

from zdlb.balancer.server import AdminState, Server
from zdlb.config.model import MAX_WEIGHT, PoolName

SERVERS = "servers"
VIEWS = "views"
DEPLOY_LOCK = "deploy/lock"
DEPLOY_RECORD = "deploy/record"


class LockChange(enum.Enum):
    """What a deploy command does to the fleet's deploy lock."""

    TAKE = "take"  # begin: the lock must be free
    TAKE_OVER = "take-over"  # takeover: the record says its holder stopped renewing, so the
    # lock may still be there under the dead holder's etcd lease (etcd restarts reset a
    # lease's TTL): it is replaced if it is still that lease
    RENEW = "renew"
    RELEASE = "release"  # end
    KEEP = "keep"  # a step, a host's result


@dataclass(frozen=True, slots=True)
class ServerState:
    """The shared part of one server's state. ``drain_until``: wall-clock end of a drain's
    sticky hold (None: not draining, or held for good)."""

    admin: AdminState
    weight: int
    pool: PoolName
    drain_until: float | None = None
    by: str = ""  # the instance that wrote it, for logs
    uid: int = -1  # the operator's uid there

    def same_as(self, other: ServerState) -> bool:
        """Equal in what the data plane uses (not who wrote it)."""
        return (self.admin, self.weight, self.pool) == (other.admin, other.weight, other.pool)

    def describe(self) -> str:
        return f"admin={self.admin.value} weight={self.weight} pool={self.pool.value}"


def server_key(prefix: str, backend: str, server: str) -> str:
    return f"{prefix}/{SERVERS}/{backend}/{server}"


def view_key(prefix: str, instance: str) -> str:
    return f"{prefix}/{VIEWS}/{instance}"


def parse_server_key(prefix: str, key: str) -> tuple[str, str] | None:
    """(backend, server) of a server key under ``prefix``; None for any other key."""
    head = f"{prefix}/{SERVERS}/"
    if not key.startswith(head):
        return None
    parts = key[len(head) :].split("/")
    if len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]


def state_of(server: Server, wall_now: float, loop_now: float) -> ServerState:
    """``server``'s shared state now; a drain's loop-time deadline becomes wall-clock."""
    until = None
    if server.admin is AdminState.DRAIN and math.isfinite(server.drain_ends):
        until = wall_now + (server.drain_ends - loop_now)
    return ServerState(server.admin, server.weight, server.pool, until)


def configured(server: Server) -> ServerState:
    """The state ``server``'s config gives it (what an absent key means)."""
    return ServerState(AdminState.READY, server.config.weight, server.config.pool)


def with_admin(state: ServerState, admin: AdminState, hold_until: float | None) -> ServerState:
    """``state`` with ``admin``; entering a drain starts a hold until ``hold_until``, and
    draining again keeps the first deadline (as Server.set_admin)."""
    if admin is AdminState.DRAIN:
        until = state.drain_until if state.admin is AdminState.DRAIN else hold_until
        return replace(state, admin=admin, drain_until=until)
    return replace(state, admin=admin, drain_until=None)


def encode(state: ServerState, wall_now: float) -> bytes:
    data: dict[str, object] = {
        "admin": state.admin.value,
        "weight": state.weight,
        "pool": state.pool.value,
        "by": state.by,
        "uid": state.uid,
        "at": round(wall_now, 3),
    }
    if state.drain_until is not None:
        data["drain_until"] = round(state.drain_until, 3)
    return json.dumps(data, sort_keys=True).encode()


def decode(value: bytes) -> ServerState:
    """A ServerState from a key's value. Raises ValueError if zdlb did not write it."""
    try:
        data = json.loads(value)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        weight = data["weight"]
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValueError(f"weight {weight!r} is not an integer")
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight {weight} out of range")
        until = data.get("drain_until")
        if until is not None and (isinstance(until, bool) or not isinstance(until, int | float)):
            raise ValueError(f"drain_until {until!r} is not a time")
        by, uid = data.get("by", ""), data.get("uid", -1)
        return ServerState(
            AdminState(data["admin"]),
            weight,
            PoolName(data["pool"]),
            None if until is None else float(until),
            by if isinstance(by, str) else "",
            uid if isinstance(uid, int) else -1,
        )
    except (KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed server state: {exc!r}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None


def apply(server: Server, state: ServerState, wall_now: float, loop_now: float) -> bool:
    """Make ``server`` match ``state``; True if anything changed. A drain's hold ends when the
    state says (its wall-clock deadline in this instance's loop time)."""
    if state.same_as(state_of(server, wall_now, loop_now)):
        return False
    if state.admin is not server.admin:
        server.set_admin(state.admin, loop_now)
        if state.admin is AdminState.DRAIN:
            until = state.drain_until
            server.drain_ends = math.inf if until is None else loop_now + (until - wall_now)
    if state.weight != server.weight:
        server.weight = state.weight
    if state.pool is not server.pool:
        server.pool = state.pool
    return True
