"""The master/worker channel protocol: one JSON object per line over a UNIX socketpair.

Rules, stated once:

1. The master owns the servers' state (pool, admin, health, weight, drain deadline). It sends
   the whole of it (``StateUpdate``) when a worker starts and after every change; a worker
   applies it as it comes and never decides that state itself. Drain deadlines travel as
   ``time.monotonic()`` values: CLOCK_MONOTONIC is one clock for every process of the host.
2. A worker owns its load counters. It sends a ``StatsReport`` (its metrics snapshot, server
   gauges included, and its client connection count) every tick and in answer to a ``Poll``,
   echoing the poll's ``seq`` so the master knows the answer is fresh. The report also carries
   the census registers its connections raised since the last one (census.py: per backend,
   per host, ``[index, rank]`` pairs); the master keeps the max of each register.
3. Passive health: a worker that sees a server fail on live traffic marks it down at once and
   says so (``ObservedDown``); the master's verdict decides from then on (rule 1).
4. ``CloseIdle`` asks a worker to close its idle pooled connections to one server (a ``wait
   ... idle`` on a server taking no new traffic), as the single process does in place.
5. ``Reload`` carries a config the master validated and applied (daemon/reload.py); the worker
   applies it to its own routes in place, answers ``Reloaded`` with the same ``seq`` (and any
   problem), and the master's ``StateUpdate`` that follows is authoritative as always. The
   config travels pickled (base64 in the JSON line): master and worker run the same code, and
   the channel is a socketpair only they hold, as the spec on the worker's stdin is.
   ``listeners`` names the listeners whose sockets (a reload's new binds) were sent just
   before on the worker's fd channel (fdchannel.py); the worker waits for them.
6. ``Adopt`` asks a worker to accept also on the sockets of worker ``index``, which exited (it
   holds every sibling's sockets from its start, unused until then), so that share of the
   SO_REUSEPORT group is served within milliseconds instead of after a restart; ``Release``
   ends it once worker ``index`` serves again.
7. ``HandOver`` (an upgrade, once the new process serves) asks an old worker to stop accepting
   and send its idle keep-alive connections to the master over the fd channel (idle_handover.py).
8. ``Siblings`` (a reload that changed ``workers``, resize.py): every listener's sockets, every
   worker's of each, were sent just before on the fd channel; the worker keeps its siblings'
   as its shares from now on, in place of those it held.
9. A line is at most ``MAX_MESSAGE_BYTES``; anything else is a bug in zdlb, not an attack (both
   ends are zdlb, the socketpair is not reachable from outside): ``decode`` raises ValueError.

Pure: no sockets, no clock, no event loop here; workers.py and worker.py move the lines.
"""

from __future__ import annotations

import base64
import json
import math
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from zdlb.balancer.server import AdminState, Health, Server
from zdlb.config.model import Config, PoolName
from zdlb.stats import Snapshot

# A snapshot is ~300 bytes per server; 16 MiB holds tens of thousands of servers.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerView:
    """What the master decided about one server, keyed ``backend/name``."""

    key: str
    pool: PoolName
    admin: AdminState
    health: Health
    weight: int
    drain_ends: float  # math.inf: no deadline


@dataclass(frozen=True, slots=True)
class StateUpdate:
    servers: tuple[ServerView, ...]


@dataclass(frozen=True, slots=True)
class Poll:
    seq: int


@dataclass(frozen=True, slots=True)
class CloseIdle:
    server: str  # backend/name


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int


@dataclass(frozen=True, slots=True)
class StatsReport:
    seq: int  # the last Poll answered; 0 before any
    connections: int  # client connections open in the worker
    snapshot: Snapshot
    # backend -> host -> [index, rank] pairs (Census.take_registers); only what was raised.
    census: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ObservedDown:
    server: str  # backend/name
    reason: str


@dataclass(frozen=True, slots=True)
class Reload:
    seq: int
    config: Config
    listeners: tuple[str, ...] = ()  # sockets sent on the fd channel first (rule 5)


@dataclass(frozen=True, slots=True)
class Reloaded:
    seq: int
    problems: tuple[str, ...]  # empty: applied


@dataclass(frozen=True, slots=True)
class Adopt:
    index: int  # the worker whose sockets to serve too


@dataclass(frozen=True, slots=True)
class Release:
    index: int


@dataclass(frozen=True, slots=True)
class HandOver:
    pass


@dataclass(frozen=True, slots=True)
class Siblings:
    seq: int
    listeners: tuple[str, ...]  # whose groups the fd channel carries (rule 8)


Message = (
    StateUpdate
    | Poll
    | CloseIdle
    | Ready
    | StatsReport
    | ObservedDown
    | Reload
    | Reloaded
    | Adopt
    | Release
    | HandOver
    | Siblings
)


def server_key(server: Server) -> str:
    return f"{server.backend}/{server.name}"


def views_of(servers: Iterable[Server]) -> StateUpdate:
    """The master's state of ``servers``, to send."""
    return StateUpdate(
        tuple(
            ServerView(server_key(s), s.pool, s.admin, s.health, s.weight, s.drain_ends)
            for s in servers
        )
    )


def apply_update(update: StateUpdate, servers: Mapping[str, Server]) -> list[Server]:
    """Make ``servers`` (by key) match ``update``; returns the servers that changed.

    Only changed fields are written (each write invalidates the balancers' cached schedules).
    A key this worker does not know is skipped: master and worker run one config, so it
    cannot happen short of a bug, and a bug must not stop the traffic.
    """
    changed = []
    for view in update.servers:
        server = servers.get(view.key)
        if server is None:
            continue
        is_changed = False
        if server.pool is not view.pool:
            server.pool, is_changed = view.pool, True
        if server.admin is not view.admin:
            server.admin, is_changed = view.admin, True
        if server.health is not view.health:
            server.health, is_changed = view.health, True
        if server.weight != view.weight:
            server.weight, is_changed = view.weight, True
        if server.drain_ends != view.drain_ends:
            server.drain_ends, is_changed = view.drain_ends, True
        if is_changed:
            changed.append(server)
    return changed


def encode(message: Message) -> bytes:
    """One line: the message as compact JSON and ``\\n``."""
    data: dict[str, object]
    match message:
        case StateUpdate(servers=views):
            data = {"t": "state", "servers": [_view_json(view) for view in views]}
        case Poll(seq=seq):
            data = {"t": "poll", "seq": seq}
        case CloseIdle(server=server):
            data = {"t": "close_idle", "server": server}
        case Ready(pid=pid):
            data = {"t": "ready", "pid": pid}
        case StatsReport(seq=seq, connections=connections, snapshot=snapshot, census=census):
            data = {"t": "stats", "seq": seq, "connections": connections, "snapshot": snapshot}
            if census:
                data["census"] = census
        case ObservedDown(server=server, reason=reason):
            data = {"t": "down", "server": server, "reason": reason}
        case Reload(seq=seq, config=config, listeners=listeners):
            blob = base64.b64encode(pickle.dumps(config)).decode("ascii")
            data = {"t": "reload", "seq": seq, "config": blob, "listeners": list(listeners)}
        case Reloaded(seq=seq, problems=problems):
            data = {"t": "reloaded", "seq": seq, "problems": list(problems)}
        case Adopt(index=index):
            data = {"t": "adopt", "index": index}
        case Release(index=index):
            data = {"t": "release", "index": index}
        case HandOver():
            data = {"t": "hand_over"}
        case Siblings(seq=seq, listeners=listeners):
            data = {"t": "siblings", "seq": seq, "listeners": list(listeners)}
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message:
    """The message on one line (its ``\\n`` optional). Raises ValueError if it is not one."""
    if len(line) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(line)} bytes, at most {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(line)
        kind = data["t"]
        match kind:
            case "state":
                return StateUpdate(tuple(_view(item) for item in data["servers"]))
            case "poll":
                return Poll(_int(data["seq"]))
            case "close_idle":
                return CloseIdle(_str(data["server"]))
            case "ready":
                return Ready(_int(data["pid"]))
            case "stats":
                snapshot = data["snapshot"]
                if not isinstance(snapshot, dict):
                    raise TypeError("snapshot is not an object")
                census = data.get("census", {})
                if not isinstance(census, dict):
                    raise TypeError("census is not an object")
                return StatsReport(
                    _int(data["seq"]),
                    _int(data["connections"]),
                    cast(Snapshot, snapshot),
                    census,  # each value checked where it is merged (Census.merge_registers)
                )
            case "down":
                return ObservedDown(_str(data["server"]), _str(data["reason"]))
            case "reload":
                listeners = tuple(_str(name) for name in data.get("listeners", []))
                return Reload(_int(data["seq"]), _config(_str(data["config"])), listeners)
            case "reloaded":
                return Reloaded(_int(data["seq"]), tuple(_str(p) for p in data["problems"]))
            case "adopt":
                return Adopt(_int(data["index"]))
            case "release":
                return Release(_int(data["index"]))
            case "hand_over":
                return HandOver()
            case "siblings":
                names = tuple(_str(name) for name in data["listeners"])
                return Siblings(_int(data["seq"]), names)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed message: {exc!r}") from None
    raise ValueError(f"unknown message type {kind!r}")


def _view_json(view: ServerView) -> dict[str, object]:
    return {
        "key": view.key,
        "pool": view.pool.value,
        "admin": view.admin.value,
        "health": view.health.value,
        "weight": view.weight,
        # JSON has no infinity; null stands for "no deadline".
        "drain_ends": None if math.isinf(view.drain_ends) else view.drain_ends,
    }


def _view(item: Any) -> ServerView:
    drain_ends = item["drain_ends"]
    if drain_ends is not None and (
        isinstance(drain_ends, bool) or not isinstance(drain_ends, int | float)
    ):
        raise TypeError(f"drain_ends {drain_ends!r} is not a number")
    return ServerView(
        _str(item["key"]),
        PoolName(item["pool"]),
        AdminState(item["admin"]),
        Health(item["health"]),
        _int(item["weight"]),
        math.inf if drain_ends is None else float(drain_ends),
    )


def _config(blob: str) -> Config:
    try:
        config = pickle.loads(base64.b64decode(blob, validate=True))
    except (ValueError, pickle.UnpicklingError, EOFError) as exc:
        raise TypeError(f"config does not unpickle: {exc!r}") from None
    if not isinstance(config, Config):
        raise TypeError(f"{type(config).__name__} is not a Config")
    return config


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value
