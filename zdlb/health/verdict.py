"""Rise/fall logic: a sequence of check results for one server becomes health transitions.

HAProxy's rule: an UP server goes DOWN after ``fall`` consecutive failed checks, a DOWN server
comes UP after ``rise`` consecutive passed ones; any result in the other direction restarts the
streak. Passive observation (errors on live traffic) may force a server DOWN at once, after which
``rise`` passes are needed as usual.

Pure: no I/O, no clock, no logging, no event loop. The scheduler feeds results in and applies
and logs the ``Transition`` it gets back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

from zdlb.balancer.server import Health


@dataclass(frozen=True, slots=True)
class Transition:
    """Health flipped from ``old`` to ``new`` because of ``reason`` (the deciding result)."""

    old: Health
    new: Health
    reason: str


class Verdict:
    """The health verdict for one server, from consecutive check results.

    ``streak`` counts consecutive results pointing away from the current health (failures while
    UP, passes while DOWN); it is reset by a result agreeing with the current health and by every
    flip. ``rise`` and ``fall`` are at least 1 (config validation guarantees it; ``ValueError``
    otherwise, a programming error).
    """

    __slots__ = ("_health", "_streak", "fall", "rise")

    def __init__(self, rise: int, fall: int, health: Health = Health.UP) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be at least 1, got rise={rise} fall={fall}")
        self.rise = rise
        self.fall = fall
        self._health = health
        self._streak = 0

    @property
    def health(self) -> Health:
        return self._health

    @property
    def streak(self) -> int:
        """Consecutive results so far toward the other health (0 when settled)."""
        return self._streak

    @property
    def needed(self) -> int:
        """Results toward the other health that flip it: ``fall`` if UP, ``rise`` if DOWN."""
        match self._health:
            case Health.UP:
                return self.fall
            case Health.DOWN:
                return self.rise
            case _:
                assert_never(self._health)

    @property
    def is_changing(self) -> bool:
        """True while a streak toward the other health has started (check at the fast interval)."""
        return self._streak > 0

    def record(self, passed: bool, reason: str) -> Transition | None:
        """Count one check result; returns the ``Transition`` if health flips now, else ``None``."""
        is_toward_other = passed is (self._health is Health.DOWN)
        if not is_toward_other:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < self.needed:
            return None
        return self._flip(Health.UP if passed else Health.DOWN, reason)

    def force_down(self, reason: str) -> Transition | None:
        """Mark DOWN at once (passive observation); ``None`` if already DOWN.

        Either way a rise in progress restarts: ``rise`` passes from now on bring it back.
        """
        self._streak = 0
        if self._health is Health.DOWN:
            return None
        return self._flip(Health.DOWN, reason)

    def _flip(self, new: Health, reason: str) -> Transition:
        old = self._health
        self._health = new
        self._streak = 0
        return Transition(old, new, reason)

    def __repr__(self) -> str:
        return (
            f"<Verdict {self._health.value} streak={self._streak}/{self.needed}"
            f" rise={self.rise} fall={self.fall}>"
        )
