"""The deploy procedure as a table: its steps per direction, and what a failure or a resume does.

A host is a main server and its pair (the same host's other version). ``--to main`` (the
default) deploys the new version to the main while its pair serves the host's users, then gives
them back to the main; ``--to backup`` deploys to the pair while the main serves, then moves the
users onto the pair (blue/green, one host at a time). The member receiving the new version is the
*target*, the other one the *other*: the last good version.

Rules (tests/unit/test_deploy_plan.py walks every row):

1. Steps run in ``procedure(to)`` order; the host is done after the last one.
2. A step that fails decides who serves the host afterwards (``serve_after_failure``): nobody
   is moved before traffic was touched; a drain that does not end gives the traffic back to the
   untouched target ("abort and flip back"); from the deploy command on, the other member keeps
   (or gets back) the traffic, because the target may hold a broken version.
3. ``resume_from``: an interrupted host restarts at its step's *restart point*: before the new
   version was installed, from the check (the command runs again); once it ran, from waiting
   for the target to come up. A failed host restarts from the check, so a fixed command runs.
4. A roll-back makes every host the deploy touched serve its other member again.

Flips here are *ensure* operations (make member X serve; nothing if it already does), so
replaying a step after a crash is harmless. Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
from typing import assert_never


class Target(enum.Enum):
    """Which member of each pair gets the new version (``zdlb deploy --to``)."""

    MAIN = "main"
    BACKUP = "backup"


class Step(enum.Enum):
    """One step of one host's procedure."""

    CHECK = "check"  # the member that will serve meanwhile is up
    FLIP = "flip"  # users move to the other member (to main) / to the target (to backup)
    WAIT_IDLE = "wait-idle"  # the target finishes what it serves
    RUN = "run"  # the user's command installs the new version on the target
    WAIT_UP = "wait-up"  # the target passes its checks
    VERIFY = "verify"  # an optional request sent to the target directly
    FLIP_BACK = "flip-back"  # users move back to the target (to main only)
    CONFIRM = "confirm"  # the target serves: admin ready, health up (and verify again)


class Role(enum.Enum):
    """A member of a host, relative to the deploy."""

    TARGET = "target"  # gets the new version
    OTHER = "other"  # keeps the last good version


_PROCEDURES: dict[Target, tuple[Step, ...]] = {
    Target.MAIN: (
        Step.CHECK,
        Step.FLIP,
        Step.WAIT_IDLE,
        Step.RUN,
        Step.WAIT_UP,
        Step.VERIFY,
        Step.FLIP_BACK,
        Step.CONFIRM,
    ),
    Target.BACKUP: (
        Step.CHECK,
        Step.WAIT_IDLE,
        Step.RUN,
        Step.WAIT_UP,
        Step.VERIFY,
        Step.FLIP,
        Step.CONFIRM,
    ),
}


def procedure(to: Target) -> tuple[Step, ...]:
    """Every step of one host's deploy toward ``to``, in order (rule 1)."""
    return _PROCEDURES[to]


def next_step(to: Target, step: Step) -> Step | None:
    """The step after ``step``, or ``None`` once the host is done. ValueError: not a step of
    ``to``'s procedure."""
    steps = _PROCEDURES[to]
    index = steps.index(step)
    return steps[index + 1] if index + 1 < len(steps) else None


def serving_during(to: Target, step: Step) -> Role:
    """Who serves the host's users while ``step`` runs (and the one CHECK requires up)."""
    match to:
        case Target.MAIN:
            before = step in (Step.CHECK, Step.FLIP)
            after = step is Step.CONFIRM
            return Role.TARGET if before or after else Role.OTHER
        case Target.BACKUP:
            return Role.TARGET if step is Step.CONFIRM else Role.OTHER
        case _:
            assert_never(to)


def serve_after_failure(to: Target, step: Step) -> Role | None:
    """Rule 2: who must serve the host after ``step`` failed; ``None``: leave traffic as it is
    (nothing was moved yet)."""
    if step is Step.CHECK:
        return None
    if to is Target.MAIN and step is Step.FLIP:
        return None  # a refused flip moved nobody
    if to is Target.MAIN and step is Step.WAIT_IDLE:
        return Role.TARGET  # the target still runs the old version: abort, flip back
    return Role.OTHER


def resume_from(to: Target, step: Step, failed: bool) -> Step:
    """Rule 3: where an interrupted (or failed, ``failed``) host restarts."""
    if failed:
        return Step.CHECK
    steps = _PROCEDURES[to]
    if steps.index(step) <= steps.index(Step.RUN):
        return Step.CHECK
    return Step.WAIT_UP


def rollback_role(to: Target) -> Role:
    """Rule 4: the member a touched host serves from after a roll-back."""
    del to  # the same for both directions: the other member holds the last good version
    return Role.OTHER
