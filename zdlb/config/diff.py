"""What a reload changes: two validated configs in, the list of differences out.

A reload (daemon/reload.py) applies listeners, backends, servers, checks, sticky cookies,
limits and timeouts in place; the settings in ``RESTART_ONLY`` belong to sockets or processes
that only a restart (or ``zdlb ctl upgrade``) recreates, so a reload that changes one is
refused with the key path, and nothing is applied. Servers are matched by backend and name,
listeners and backends by name: that is what runtime state (admin state, weight, pool, health)
carries over by.

Pure: no I/O, no clock, no logging here.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from zdlb.config.model import BackendConfig, Config, ListenerConfig, ServerConfig

# Settings a reload cannot apply, with the reason the refusal gives. The control socket and
# the metrics endpoint are bound once at start; log handlers are installed once (their level
# and the access log flag do reload). `workers` reloads where there is a master to start and
# retire workers (daemon/resize.py decides; one process refuses it).
RESTART_ONLY: Mapping[str, str] = {
    "control.socket": "the control socket is bound once",
    "control.group": "the control socket is bound once",
    "control.state_file": "the journal is read once, at start",
    "metrics.listen": "the /metrics endpoint is bound once",
    "logging.format": "log handlers are installed once",
    "cluster": "the fleet is joined once, at start",
}
RESTART_HINT = "needs a restart or `zdlb ctl upgrade`"


class ChangeKind(enum.Enum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


@dataclass(frozen=True, slots=True)
class Change:
    """One difference: ``what`` ("listener", "backend", "server", "setting") ``name`` (a key
    path or ``backend/server``), and for a change, the fields that differ."""

    kind: ChangeKind
    what: str
    name: str
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"{self.what} {self.name} {self.kind.value}"
        return f"{text}: {', '.join(self.fields)}" if self.fields else text


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """Every change, in config order; ``refused``: "key.path: reason" lines, one per setting a
    reload cannot apply (non-empty: the reload must apply nothing)."""

    changes: tuple[Change, ...]
    refused: tuple[str, ...]

    @property
    def is_empty(self) -> bool:
        return not self.changes and not self.refused

    def of(self, what: str, kind: ChangeKind | None = None) -> list[Change]:
        return [c for c in self.changes if c.what == what and (kind is None or c.kind is kind)]


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """The differences from ``old`` to ``new`` (both validated by config/load.py)."""
    changes: list[Change] = []
    refused: list[str] = []
    settings: dict[str, tuple[object, object]] = {
        "control.socket": (old.control.socket, new.control.socket),
        "control.group": (old.control.group, new.control.group),
        "control.state_file": (old.control.state_file, new.control.state_file),
        "metrics.listen": (old.metrics.listen, new.metrics.listen),
        "workers": (old.workers, new.workers),
        "maxconn": (old.maxconn, new.maxconn),
        "cluster": (old.cluster, new.cluster),
        "logging.format": (old.logging.format, new.logging.format),
        "logging.level": (old.logging.level, new.logging.level),
        "logging.access_log": (old.logging.access_log, new.logging.access_log),
    }
    for key, (before, after) in settings.items():
        if before == after:
            continue
        if key in RESTART_ONLY:
            refused.append(f"{key}: {RESTART_ONLY[key]}; changing it {RESTART_HINT}")
        else:
            changes.append(Change(ChangeKind.CHANGED, "setting", key))
    changes += _diff_named("listener", old.listeners, new.listeners)
    for name in _changed_modes(old.listeners, new.listeners):
        refused.append(
            f"listeners.{name}.mode: a listener's mode is fixed at bind; "
            f"changing it {RESTART_HINT} (or a new listener name)"
        )
    for name in _toggled_tls(old.listeners, new.listeners):  # TLS (issue 14)
        refused.append(
            f"listeners.{name}.tls: TLS is turned on or off when the listener starts; "
            f"changing that {RESTART_HINT} (certificates and settings do reload)"
        )
    changes += _diff_named("backend", old.backends, new.backends, skip=("servers",))
    old_backends = _by_name(old.backends)
    for backend in new.backends:
        if (previous := old_backends.get(backend.name)) is not None:
            changes += _diff_named("server", previous.servers, backend.servers, prefix=backend.name)
    return ConfigDiff(tuple(changes), tuple(refused))


_Named = TypeVar("_Named", ListenerConfig, BackendConfig, ServerConfig)


def _by_name(items: Iterable[_Named]) -> dict[str, _Named]:
    return {item.name: item for item in items}


def _diff_named(
    what: str,
    old: Iterable[_Named],
    new: Iterable[_Named],
    *,
    prefix: str = "",
    skip: tuple[str, ...] = (),
) -> list[Change]:
    """Added, removed and changed items of one kind, matched by name, in config order."""
    before, after = _by_name(old), _by_name(new)
    label = (lambda name: f"{prefix}/{name}") if prefix else (lambda name: name)
    changes = [
        Change(ChangeKind.REMOVED, what, label(name)) for name in before if name not in after
    ]
    for name, item in after.items():
        previous = before.get(name)
        if previous is None:
            changes.append(Change(ChangeKind.ADDED, what, label(name)))
        elif fields := changed_fields(previous, item, skip):
            changes.append(Change(ChangeKind.CHANGED, what, label(name), fields))
    return changes


def changed_fields(old: Any, new: Any, skip: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The names of the dataclass fields that differ between ``old`` and ``new``."""
    return tuple(
        field.name
        for field in dataclasses.fields(old)
        if field.name not in skip and getattr(old, field.name) != getattr(new, field.name)
    )


def _changed_modes(old: Iterable[ListenerConfig], new: Iterable[ListenerConfig]) -> list[str]:
    before = _by_name(old)
    return [
        listener.name
        for listener in new
        if listener.name in before and before[listener.name].mode is not listener.mode
    ]


def _toggled_tls(old: Iterable[ListenerConfig], new: Iterable[ListenerConfig]) -> list[str]:
    """Listeners whose ``[tls]`` table appeared or went: their asyncio listener was created
    with or without TLS (daemon/lifecycle.py ``accept_into``)."""
    before = _by_name(old)
    return [
        listener.name
        for listener in new
        if listener.name in before and (before[listener.name].tls is None) != (listener.tls is None)
    ]
