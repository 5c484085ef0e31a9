"""The state journal: runtime changes (admin state, weight, pool) that survive a restart or reload.

The file holds, per server, only what an operator changed, together with the config value it
replaced. At start the changes are replayed onto the servers of the new config, except:
- a server that left the config: its entry is dropped;
- a weight whose config value changed since it was set: the config wins, because the operator
  overrode a value that no longer exists (HAProxy's state file and the config fight over
  exactly this, haproxy/haproxy#953).

The file is small and rewritten whole, atomically (write a temporary file, fsync, rename), so a
crash leaves the old or the new journal, never half of one. A missing file is an empty journal;
an unreadable or corrupt one is reported and ignored rather than stopping the daemon.
Blocking file I/O: callers on the event loop run ``save`` in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zdlb.balancer.server import AdminState, Server
from zdlb.config.model import PoolName
from zdlb.deploy import record as deploy_record

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
# A journal is a few hundred bytes per changed server; anything much larger is not ours.
MAX_JOURNAL_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerChanges:
    """What an operator changed on one server, and the config weight it replaced."""

    admin: AdminState | None = None
    weight: int | None = None
    config_weight: int | None = None
    pool: PoolName | None = None  # after `swap`

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {}
        if self.admin is not None:
            data["admin"] = self.admin.value
        if self.pool is not None:
            data["pool"] = self.pool.value
        if self.weight is not None:
            data["weight"] = self.weight
            data["config_weight"] = self.config_weight
        return data


def changes_of(server: Server) -> ServerChanges | None:
    """The runtime changes of ``server`` against its config, or None if it is as configured."""
    admin = server.admin if server.admin is not AdminState.READY else None
    weight = server.weight if server.weight != server.config.weight else None
    pool = server.pool if server.pool is not server.config.pool else None
    if admin is None and weight is None and pool is None:
        return None
    config_weight = server.config.weight if weight is not None else None
    return ServerChanges(admin, weight, config_weight, pool)


def save(path: Path, servers: Iterable[Server], deploy: Mapping[str, Any] | None = None) -> None:
    """Write the runtime changes of ``servers`` to ``path`` atomically, with the last deploy's
    record (``zdlb deploy``) if there is one. Raises OSError."""
    entries = {
        f"{server.backend}/{server.name}": changes.to_json()
        for server in servers
        if (changes := changes_of(server)) is not None
    }
    data: dict[str, object] = {"version": JOURNAL_VERSION, "servers": entries}
    if deploy is not None:
        data["deploy"] = deploy
    text = json.dumps(data, indent=1, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict[str, ServerChanges]:
    """The journal's entries by "backend/server"; empty if the file is missing or unusable."""
    try:
        if path.stat().st_size > MAX_JOURNAL_BYTES:
            reason = f"larger than {MAX_JOURNAL_BYTES} bytes"
            log.warning("state_journal_ignored file=%s reason=%s", path, reason)
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("state_journal_ignored file=%s reason=%s", path, exc)
        return {}
    try:
        return _parse(data)
    except (TypeError, ValueError, KeyError) as exc:
        log.warning("state_journal_ignored file=%s reason=malformed: %s", path, exc)
        return {}


def load_deploy(path: Path) -> deploy_record.DeployRecord | None:
    """The last deploy's record from the journal; None if there is none or it is unusable.

    A deploy that was running when the daemon stopped reads as interrupted: its lease is in
    the past by now, or ends before anyone could renew it without a token.
    """
    try:
        if path.stat().st_size > MAX_JOURNAL_BYTES:
            return None  # load() reports it
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, Mapping) or "deploy" not in data:
            return None
        return deploy_record.from_json(data["deploy"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("state_journal_deploy_ignored file=%s reason=%s", path, exc)
        return None


def _parse(data: object) -> dict[str, ServerChanges]:
    if not isinstance(data, Mapping) or data.get("version") != JOURNAL_VERSION:
        raise ValueError(f"not a version {JOURNAL_VERSION} journal")
    servers = data["servers"]
    if not isinstance(servers, Mapping):
        raise TypeError("'servers' is not an object")
    entries = {}
    for key, value in servers.items():
        if not isinstance(key, str) or not isinstance(value, Mapping):
            raise TypeError(f"entry {key!r} is not an object")
        admin = AdminState(value["admin"]) if "admin" in value else None
        weight = _optional_int(value.get("weight"))
        config_weight = _optional_int(value.get("config_weight"))
        pool = PoolName(value["pool"]) if "pool" in value else None
        entries[key] = ServerChanges(admin, weight, config_weight, pool)
    return entries


def _optional_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
        raise ValueError(f"{value!r} is not a weight")
    return value


def replay(
    entries: Mapping[str, ServerChanges], servers: Iterable[Server], now: float | None = None
) -> int:
    """Apply journaled changes to the servers they name; returns how many servers changed.

    A drain replayed at ``now`` holds its sticky users for a whole drain_sticky_s again: the
    daemon was down meanwhile, so they had no chance to move.
    """
    by_key = {f"{server.backend}/{server.name}": server for server in servers}
    applied = 0
    for key, changes in entries.items():
        server = by_key.get(key)
        if server is None:
            log.info("state_journal_dropped server=%s reason=not in the config", key)
            continue
        if changes.admin is not None:
            server.set_admin(changes.admin, now)
        if changes.pool is not None:
            server.pool = changes.pool
        if changes.weight is not None:
            if changes.config_weight == server.config.weight:
                server.weight = changes.weight
            else:
                log.info(
                    "state_journal_dropped server=%s reason=config weight changed %s -> %d",
                    key,
                    changes.config_weight,
                    server.config.weight,
                )
        log.info("state_journal_replayed server=%s %s", key, _describe(server))
        applied += 1
    return applied


def _describe(server: Server) -> str:
    return f"pool={server.pool.value} admin={server.admin.value} weight={server.weight}"


class Coalesced:
    """Runs ``write`` (a journal save) in the background on request, one at a time: requests
    made while one runs make exactly one more, so the last state is always the one written.
    For changes that arrive outside any command (a fleet's watch); the task is kept here."""

    def __init__(self, write: Callable[[], Awaitable[None]]) -> None:
        self._write = write
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def run_soon(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="journal")

    async def _loop(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            await self._write()
