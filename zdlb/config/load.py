"""Turn a TOML file into the frozen config model, validating all of it before anything starts.

Every problem is collected with its exact key path and the bad value, and all of them are raised
together in one ``ConfigError``; a config is either wholly valid or rejected. ``zdlb check`` and
reload run exactly this code. Untyped TOML data (``Any``) stops at the ``_Table`` readers here.
Nothing in this module binds a socket, resolves a DNS name, reads the environment or keeps state
between calls; the only I/O is reading the one file in ``load_config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from zdlb.config.address import bind_clashes, parse_address
from zdlb.config.model import (
    MAX_WEIGHT,
    Address,
    BackendConfig,
    Balance,
    Config,
    Limits,
    ListenerConfig,
    ListenerMode,
    LogFormat,
    LoggingConfig,
    PoolName,
    ServerConfig,
    Timeouts,
)
from zdlb.errors import ConfigError, ConfigIssue

# Listener, backend and server names appear in logs, metrics labels and control commands, so
# they stay free of spaces, quotes and separators those formats would have to escape.
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
LOG_LEVELS = ("debug", "info", "warning", "error")
FORWARDED_PROTOS = ("http", "https")

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")  # TOML bare keys; anything else is quoted in paths
_MAX_SHOWN_CHARS = 60  # bad values are echoed in messages; a huge string must not flood them

_TOP_KEYS = ("defaults", "logging", "listeners", "backends")
_DEFAULTS_KEYS = ("timeouts", "limits")
_LOGGING_KEYS = ("access_log", "level", "format")
_LISTENER_KEYS = ("bind", "mode", "backend", "backlog", "x_forwarded_proto", "timeouts", "limits")
_BACKEND_KEYS = ("balance", "retries", "all_backups", "timeouts", "servers")
_SERVER_KEYS = ("name", "address", "weight", "pool", "max_idle")
_TIMEOUT_KEYS = tuple(f.name for f in dataclasses.fields(Timeouts))
_LIMIT_KEYS = tuple(f.name for f in dataclasses.fields(Limits))

# Model instances holding only defaults, so the model stays the one source of default values.
_NO_ADDRESS = Address("", 0)
_LISTENER_DEFAULTS = ListenerConfig(name="", bind=_NO_ADDRESS, backend="")
_BACKEND_DEFAULTS = BackendConfig(name="", servers=())
_SERVER_DEFAULTS = ServerConfig(name="", address=_NO_ADDRESS)
_LOGGING_DEFAULTS = LoggingConfig()

_MISSING = object()
_E = TypeVar("_E", bound=enum.Enum)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at ``path``.

    Raises ``ConfigError`` listing every problem; an unreadable file, invalid UTF-8 or a TOML
    syntax error is reported as a single issue (tomllib's message carries line and column).
    Relative paths inside the file are resolved against the file's own directory.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(source, [ConfigIssue("", f"cannot read file: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [ConfigIssue("", f"file is not valid UTF-8: {exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [ConfigIssue("", f"TOML syntax error: {exc}")]) from exc
    return parse_config(data, source, Path(os.path.abspath(source)).parent)


def parse_config(data: Mapping[str, Any], source: str, base_dir: Path) -> Config:
    """Validate already-parsed TOML ``data`` and build the model.

    ``source`` names the file in messages; ``base_dir`` anchors relative paths (see
    ``resolve_path``). Raises ``ConfigError(source, issues)`` with every issue found.
    """
    issues: list[ConfigIssue] = []
    root = _Table(data, "", issues, _TOP_KEYS)
    defaults = root.table("defaults", _DEFAULTS_KEYS)
    default_timeouts = _read_timeouts(defaults, Timeouts())
    default_limits = _read_limits(defaults, Limits())
    logging_config = _read_logging(root.table("logging", _LOGGING_KEYS))
    backends = [
        _read_backend(table, name, default_timeouts)
        for name, table in root.named_tables("backends", _BACKEND_KEYS)
    ]
    listener_tables = root.named_tables("listeners", _LISTENER_KEYS)
    if root.data.get("listeners", {}) == {}:
        issues.append(ConfigIssue("listeners", "at least one listener is required"))
    listeners = [
        _read_listener(table, name, default_timeouts, default_limits)
        for name, table in listener_tables
    ]
    valid_listeners = tuple(item for item in listeners if item is not None)
    _check_listener_backends(valid_listeners, root.names("backends"), issues)
    _check_binds(valid_listeners, issues)
    if issues:
        raise ConfigError(source, issues)
    return Config(source, valid_listeners, tuple(backends), default_timeouts, logging_config)


def resolve_path(base_dir: Path, value: str | os.PathLike[str]) -> Path:
    """A path from the config file: absolute as written, else relative to ``base_dir``.

    ``base_dir`` is the config file's directory, so a config means the same thing whatever the
    daemon's working directory. No ``~`` or environment expansion, and no filesystem access.
    """
    return base_dir / Path(value)


class _Table:
    """One TOML table being read: typed getters that record an issue and fall back on error.

    Unknown keys are reported (with a did-you-mean) as soon as the table is wrapped.
    """

    def __init__(
        self, data: Mapping[str, object], path: str, issues: list[ConfigIssue], keys: Sequence[str]
    ) -> None:
        self.data = data
        self.path = path
        self.issues = issues
        for key in data:
            if key not in keys:
                self.fail(key, f"unknown key ({_suggest(key, keys)})")

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def fail(self, key: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.at(key), message))

    def has(self, key: str) -> bool:
        return key in self.data

    def _expect(self, key: str, what: str, value: object) -> None:
        self.fail(key, f"expected {what}, got {_show(value)}")

    def integer(self, key: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self._expect(key, "an integer", value)
            return default
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            self.fail(key, f"must be {bound}, got {value}")
            return default
        return value

    def seconds(self, key: str, default: float) -> float:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._expect(key, "a number of seconds", value)
            return default
        if not math.isfinite(value) or value <= 0:
            self.fail(key, f"must be a finite number of seconds > 0, got {value!r}")
            return default
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self._expect(key, "true or false", value)
            return default
        return value

    def required_string(self, key: str) -> str | None:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            self.fail(key, "required key is missing")
            return None
        if not isinstance(value, str):
            self._expect(key, "a string", value)
            return None
        return value

    def choice(self, key: str, choices: Sequence[str], default: str) -> str:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, str) or value not in choices:
            self._expect(key, "one of " + ", ".join(repr(c) for c in choices), value)
            return default
        return value

    def enum_choice(self, key: str, enum_type: type[_E], default: _E) -> _E:
        values = [str(member.value) for member in enum_type]
        return enum_type(self.choice(key, values, str(default.value)))

    def table(self, key: str, keys: Sequence[str]) -> _Table:
        """The sub-table ``key``; empty when absent, or when not a table (reported)."""
        value = self.data.get(key, _MISSING)
        if value is not _MISSING and not isinstance(value, Mapping):
            self._expect(key, "a table", value)
        data = value if isinstance(value, Mapping) else {}
        return _Table(data, self.at(key), self.issues, keys)

    def names(self, key: str) -> list[str]:
        value = self.data.get(key)
        return [str(name) for name in value] if isinstance(value, Mapping) else []

    def named_tables(self, key: str, keys: Sequence[str]) -> list[tuple[str, _Table]]:
        """The tables under ``[key.NAME]``, each NAME checked against ``NAME_RE``."""
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            self._expect(key, "a table", value)
            return []
        children: list[tuple[str, _Table]] = []
        for name, child in value.items():
            path = _join(self.at(key), name)
            if not NAME_RE.fullmatch(name):
                self.issues.append(ConfigIssue(path, f"name must match {NAME_RE.pattern}"))
            if isinstance(child, Mapping):
                children.append((name, _Table(child, path, self.issues, keys)))
            else:
                self.issues.append(ConfigIssue(path, f"expected a table, got {_show(child)}"))
        return children

    def array_of_tables(self, key: str, keys: Sequence[str]) -> list[_Table]:
        """The tables of ``[[key]]``: empty when absent; non-tables are reported and skipped."""
        value = self.data.get(key, [])
        if not isinstance(value, list):
            self._expect(key, f"an array of tables ([[{self.at(key)}]])", value)
            return []
        tables: list[_Table] = []
        for index, item in enumerate(value):
            path = f"{self.at(key)}[{index}]"
            if isinstance(item, Mapping):
                tables.append(_Table(item, path, self.issues, keys))
            else:
                self.issues.append(ConfigIssue(path, f"expected a table, got {_show(item)}"))
        return tables


def _suggest(key: str, keys: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=1)
    return f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(keys)}"


def _join(path: str, key: str) -> str:
    shown = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key)
    return f"{path}.{shown}" if path else shown


def _show(value: object) -> str:
    if isinstance(value, Mapping):
        return "a table"
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "..."


def _read_timeouts(parent: _Table, base: Timeouts) -> Timeouts:
    table = parent.table("timeouts", _TIMEOUT_KEYS)
    changes = {key: table.seconds(key, float(getattr(base, key))) for key in _TIMEOUT_KEYS}
    return dataclasses.replace(base, **changes)


def _read_limits(parent: _Table, base: Limits) -> Limits:
    """``base`` overlaid with ``parent.limits``; the line limit must fit in the head limit.

    The pair is checked only where one of them is set, so a bad pair in ``[defaults.limits]`` is
    reported once, there, and not again for every listener inheriting it.
    """
    table = parent.table("limits", _LIMIT_KEYS)
    changes = {key: table.integer(key, int(getattr(base, key)), minimum=1) for key in _LIMIT_KEYS}
    limits = dataclasses.replace(base, **changes)
    is_set = table.has("max_line_bytes") or table.has("max_head_bytes")
    if is_set and limits.max_line_bytes > limits.max_head_bytes:
        message = f"{limits.max_line_bytes} exceeds max_head_bytes {limits.max_head_bytes}"
        table.fail("max_line_bytes", message)
    return limits


def _read_logging(table: _Table) -> LoggingConfig:
    return LoggingConfig(
        access_log=table.boolean("access_log", _LOGGING_DEFAULTS.access_log),
        level=table.choice("level", LOG_LEVELS, _LOGGING_DEFAULTS.level),
        format=table.enum_choice("format", LogFormat, _LOGGING_DEFAULTS.format),
    )


def _read_listener(
    table: _Table, name: str, default_timeouts: Timeouts, default_limits: Limits
) -> ListenerConfig | None:
    bind = _read_address(table, "bind", is_bind=True)
    backend = table.required_string("backend")
    mode = table.enum_choice("mode", ListenerMode, _LISTENER_DEFAULTS.mode)
    if mode is ListenerMode.TCP:
        # TODO(issue 4): TCP listeners and the splice pump. Refused here, not at bind time, so
        # `zdlb check` and `zdlb run` agree.
        table.fail("mode", "'tcp' listeners are not implemented yet; use 'http'")
    listener = ListenerConfig(
        name=name,
        bind=bind or _NO_ADDRESS,
        backend=backend or "",
        mode=mode,
        timeouts=_read_timeouts(table, default_timeouts),
        limits=_read_limits(table, default_limits),
        backlog=table.integer("backlog", _LISTENER_DEFAULTS.backlog, minimum=1),
        x_forwarded_proto=table.choice(
            "x_forwarded_proto", FORWARDED_PROTOS, _LISTENER_DEFAULTS.x_forwarded_proto
        ),
    )
    return listener if bind is not None and backend is not None else None


def _read_backend(table: _Table, name: str, default_timeouts: Timeouts) -> BackendConfig:
    balance = table.enum_choice("balance", Balance, _BACKEND_DEFAULTS.balance)
    retries = table.integer("retries", _BACKEND_DEFAULTS.retries, minimum=0)
    all_backups = table.boolean("all_backups", _BACKEND_DEFAULTS.all_backups)
    timeouts = _read_timeouts(table, default_timeouts)
    if table.data.get("servers", []) == []:
        table.fail("servers", "a backend needs at least one server")
    server_tables = table.array_of_tables("servers", _SERVER_KEYS)
    servers = [_read_server(server) for server in server_tables]
    _check_server_names(server_tables)
    valid = tuple(server for server in servers if server is not None)
    raw_servers = table.data.get("servers")
    # Judge the pools only once every server parsed: one bad entry must not cause a second issue.
    is_complete = isinstance(raw_servers, list) and len(valid) == len(raw_servers) > 0
    if is_complete and all(server.pool is PoolName.BACKUP for server in valid):
        table.fail("servers", "every server is in the 'backup' pool; at least one must be 'main'")
    return BackendConfig(name, valid, balance, retries, all_backups, timeouts)


def _read_server(table: _Table) -> ServerConfig | None:
    name = table.required_string("name")
    if name is not None and not NAME_RE.fullmatch(name):
        table.fail("name", f"{name!r} must match {NAME_RE.pattern}")
        name = None
    address = _read_address(table, "address", is_bind=False)
    server = ServerConfig(
        name=name or "",
        address=address or _NO_ADDRESS,
        weight=table.integer("weight", _SERVER_DEFAULTS.weight, minimum=0, maximum=MAX_WEIGHT),
        pool=table.enum_choice("pool", PoolName, _SERVER_DEFAULTS.pool),
        max_idle=table.integer("max_idle", _SERVER_DEFAULTS.max_idle, minimum=0),
    )
    return server if name is not None and address is not None else None


def _check_server_names(tables: Sequence[_Table]) -> None:
    """Report each repeated server name at the second and later ``servers[i].name``."""
    first_index: dict[str, int] = {}
    for index, table in enumerate(tables):
        name = table.data.get("name")
        if not isinstance(name, str):
            continue
        if name in first_index:
            message = f"duplicate server name {name!r} (also servers[{first_index[name]}])"
            table.fail("name", message)
        else:
            first_index[name] = index


def _read_address(table: _Table, key: str, is_bind: bool) -> Address | None:
    text = table.required_string(key)
    if text is None:
        return None
    try:
        return parse_address(text, is_bind)
    except ValueError as exc:
        table.fail(key, str(exc))
        return None


def _check_listener_backends(
    listeners: Sequence[ListenerConfig], backend_names: Sequence[str], issues: list[ConfigIssue]
) -> None:
    known = ", ".join(repr(name) for name in backend_names) or "none are defined"
    for listener in listeners:
        if listener.backend not in backend_names:
            path = _join(_join("listeners", listener.name), "backend")
            message = f"no backend named {listener.backend!r} (backends: {known})"
            issues.append(ConfigIssue(path, message))


def _check_binds(listeners: Sequence[ListenerConfig], issues: list[ConfigIssue]) -> None:
    """Two listeners may not bind the same port on the same or an overlapping (wildcard) IP."""
    by_name = {listener.name: listener for listener in listeners}
    for name, other_name in bind_clashes((listener.name, listener.bind) for listener in listeners):
        path = _join(_join("listeners", name), "bind")
        other_path = _join(_join("listeners", other_name), "bind")
        bind, other = by_name[name].bind, by_name[other_name].bind
        message = f"{str(bind)!r} clashes with {other_path} {str(other)!r}"
        issues.append(ConfigIssue(path, message))
