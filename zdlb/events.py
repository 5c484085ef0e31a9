"""The timeline of recent events: flips, drains, admin and weight changes, health transitions,
pool swaps, reloads and deploy steps, each with its wall-clock time, newest kept.

Whatever changes a server's state (control/commands.py, health/scheduler.py) records one
``Event`` here, next to the log line it already writes; the status page (metrics/status.py)
shows them newest first and /metrics counts them by kind. The ring is bounded
(``DEFAULT_CAPACITY``), so a flapping server costs a fixed amount of memory, never more: the
oldest event falls out. Each event has a sequence number that only grows, so a reader can ask
for what happened since the last one it saw, and counts per kind survive eviction.

With worker processes the master owns checks and control, so the master's ring is the whole
story; workers record nothing. Pure: no I/O, no logging, no event loop; the clock is passed in
(``time.time`` by default) so tests pin it.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# An operator looks at the last few minutes of a deploy: 4 servers flipped twice is ~16 events,
# a health flap ~2 a minute per server. 256 keeps an hour of a busy day for ~60 KB of memory.
DEFAULT_CAPACITY = 256
# A detail is a short reason ("3 consecutive errors", "admin ready -> maint"); a probe's error
# text could be long, and the page shows one line.
MAX_DETAIL_CHARS = 200


class EventKind(enum.Enum):
    """What happened. The set is fixed: it is a Prometheus label (bounded cardinality)."""

    ADMIN = "admin"  # set server ... state ready|drain|maint
    WEIGHT = "weight"  # set server ... weight N
    FLIP = "flip"  # a pair's traffic moved to the other member
    SWAP = "swap"  # blue/green: the pools exchanged
    HEALTH = "health"  # a check verdict changed (up <-> down)
    RELOAD = "reload"  # a new configuration was applied
    DEPLOY = "deploy"  # a step of a scripted deploy


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened. ``server`` is ``backend/name`` (or the backend alone for a
    swap, "" for a daemon-wide event); ``at`` is seconds since the epoch."""

    seq: int
    at: float
    kind: EventKind
    server: str
    detail: str

    def as_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "at": round(self.at, 3),
            "kind": self.kind.value,
            "server": self.server,
            "detail": self.detail,
        }


class Timeline:
    """A bounded ring of the latest ``capacity`` events and a count of every event by kind."""

    __slots__ = ("_clock", "_counts", "_events", "_seq")

    def __init__(
        self, capacity: int = DEFAULT_CAPACITY, clock: Callable[[], float] = time.time
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self._events: deque[Event] = deque(maxlen=capacity)
        self._clock = clock
        self._seq = 0
        self._counts = dict.fromkeys(EventKind, 0)

    def __repr__(self) -> str:
        return f"<Timeline events={len(self._events)} seq={self._seq}>"

    def __len__(self) -> int:
        return len(self._events)

    def record(self, kind: EventKind, server: str, detail: str) -> Event:
        """Add one event, now; the oldest is dropped when the ring is full."""
        self._seq += 1
        if len(detail) > MAX_DETAIL_CHARS:
            detail = detail[: MAX_DETAIL_CHARS - 3] + "..."
        event = Event(self._seq, self._clock(), kind, server, detail)
        self._events.append(event)
        self._counts[kind] += 1
        return event

    def newest_first(self, limit: int | None = None, after_seq: int = 0) -> list[Event]:
        """Up to ``limit`` events (all kept without one) with ``seq > after_seq``, newest
        first."""
        found: list[Event] = []
        for event in reversed(self._events):
            if event.seq <= after_seq or (limit is not None and len(found) >= limit):
                break
            found.append(event)
        return found

    def counts(self) -> Iterator[tuple[EventKind, int]]:
        """Every kind with how many events of it were ever recorded (evicted ones too)."""
        return iter(self._counts.items())

    @property
    def last_seq(self) -> int:
        """The sequence number of the latest event; 0 before any."""
        return self._seq
