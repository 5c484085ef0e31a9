"""Turn a TOML file into the frozen config model, validating all of it before anything starts.

Every problem is collected with its exact key path and the bad value, and all of them are raised
together in one ``ConfigError``; a config is either wholly valid or rejected. ``zdlb check`` and
reload run exactly this code. Untyped TOML data (``Any``) stops at the ``Table`` readers here.
Nothing in this module binds a socket, resolves a DNS name, reads the environment or keeps state
between calls; the only I/O is reading the one file in ``load_config``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zdlb.config.address import bind_clashes, parse_address
from zdlb.config.checks import read_check
from zdlb.config.cluster import CLUSTER_KEYS, read_cluster
from zdlb.config.model import (
    MAX_PIPE_BYTES,
    MAX_WEIGHT,
    MAX_WORKERS,
    MIN_PIPE_BYTES,
    Address,
    BackendConfig,
    Balance,
    CheckConfig,
    Config,
    ControlConfig,
    Limits,
    ListenerConfig,
    ListenerMode,
    LogFormat,
    LoggingConfig,
    MetricsConfig,
    PoolName,
    Reuse,
    ServerConfig,
    Timeouts,
    UpstreamTlsConfig,
)
from zdlb.config.routing import LISTENER_KEYS as _ROUTING_KEYS
from zdlb.config.routing import Routing, read_routing
from zdlb.config.sticky import check_pairs, read_sticky
from zdlb.config.table import NAME_RE, Table, join_path
from zdlb.config.tls import BACKEND_TLS_KEYS, read_backend_tls, read_listener_tls
from zdlb.errors import ConfigError, ConfigIssue

LOG_LEVELS = ("debug", "info", "warning", "error")
FORWARDED_PROTOS = ("http", "https")

_TOP_KEYS = (
    "defaults",
    "logging",
    "control",
    "metrics",
    "listeners",
    "backends",
    "workers",
    "maxconn",
    "cluster",
)
_METRICS_KEYS = ("listen", "admin")
_CONTROL_KEYS = ("socket", "group", "state_file")
# sun_path holds 108 bytes on Linux, NUL included: a longer path cannot be bound.
_MAX_UNIX_PATH_BYTES = 107
_DEFAULTS_KEYS = ("timeouts", "limits")
_LOGGING_KEYS = ("access_log", "level", "format")
_LISTENER_KEYS = (
    "bind",
    "mode",
    "backend",
    "backlog",
    "x_forwarded_proto",
    "splice",
    "pipe_bytes",
    "splice_min_bytes",
    "maxconn",
    "timeouts",
    "limits",
    *_ROUTING_KEYS,
    "tls",
)
_HTTP_ONLY_KEYS = ("x_forwarded_proto", "limits", "splice_min_bytes", *_ROUTING_KEYS)
_BACKEND_KEYS = (
    "balance",
    "retries",
    "all_backups",
    "reuse",
    "timeouts",
    "check",
    "sticky",
    "servers",
    *BACKEND_TLS_KEYS,
)
_SERVER_KEYS = ("name", "address", "weight", "pool", "max_idle", "check", "pair", "maxconn")
_TIMEOUT_KEYS = tuple(f.name for f in dataclasses.fields(Timeouts))
_LIMIT_KEYS = tuple(f.name for f in dataclasses.fields(Limits))

# Model instances holding only defaults, so the model stays the one source of default values.
_NO_ADDRESS = Address("", 0)
_LISTENER_DEFAULTS = ListenerConfig(name="", bind=_NO_ADDRESS, backend="")
_BACKEND_DEFAULTS = BackendConfig(name="", servers=())
_SERVER_DEFAULTS = ServerConfig(name="", address=_NO_ADDRESS)
_LOGGING_DEFAULTS = LoggingConfig()


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
    root = Table(data, "", issues, _TOP_KEYS)
    defaults = root.table("defaults", _DEFAULTS_KEYS)
    default_timeouts = _read_timeouts(defaults, Timeouts())
    default_limits = _read_limits(defaults, Limits())
    logging_config = _read_logging(root.table("logging", _LOGGING_KEYS))
    control = _read_control(root.table("control", _CONTROL_KEYS), base_dir)
    metrics = _read_metrics(root.table("metrics", _METRICS_KEYS))
    workers = root.integer("workers", 1, 1, MAX_WORKERS) if root.has("workers") else None
    maxconn = root.integer("maxconn", 1, minimum=1) if root.has("maxconn") else None
    backends = [
        _read_backend(table, name, default_timeouts, base_dir)
        for name, table in root.named_tables("backends", _BACKEND_KEYS)
    ]
    listener_tables = root.named_tables("listeners", _LISTENER_KEYS)
    if root.data.get("listeners", {}) == {}:
        issues.append(ConfigIssue("listeners", "at least one listener is required"))
    listeners = [
        _read_listener(table, name, default_timeouts, default_limits, base_dir)
        for name, table in listener_tables
    ]
    valid_listeners = tuple(item for item in listeners if item is not None)
    _check_listener_backends(valid_listeners, root.names("backends"), issues)
    _check_binds(valid_listeners, metrics, issues)
    cluster = None
    if root.has("cluster"):  # issue 16: the fleet's shared state (config/cluster.py)
        cluster = read_cluster(root.table("cluster", CLUSTER_KEYS), base_dir)
        if control.socket is None:
            issues.append(ConfigIssue("cluster", "needs [control] socket (changes go through it)"))
    if issues:
        raise ConfigError(source, issues)
    return Config(
        source,
        valid_listeners,
        tuple(backends),
        default_timeouts,
        logging_config,
        control,
        metrics,
        workers,
        maxconn,
        cluster,
    )


def resolve_path(base_dir: Path, value: str | os.PathLike[str]) -> Path:
    """A path from the config file: absolute as written, else relative to ``base_dir``.

    ``base_dir`` is the config file's directory, so a config means the same thing whatever the
    daemon's working directory. No ``~`` or environment expansion, and no filesystem access.
    """
    return base_dir / Path(value)


def _read_control(table: Table, base_dir: Path) -> ControlConfig:
    socket_path: Path | None = None
    if table.has("socket"):
        text = table.required_string("socket")
        if text is not None:
            socket_path = resolve_path(base_dir, text)
            size = len(os.fsencode(socket_path))
            if not text or size > _MAX_UNIX_PATH_BYTES:
                message = f"a UNIX socket path holds 1..{_MAX_UNIX_PATH_BYTES} bytes, got {size}"
                table.fail("socket", message)
                socket_path = None
    group: str | None = None
    if table.has("group"):
        group = table.required_string("group")
        if group is not None and not NAME_RE.fullmatch(group):
            table.fail("group", f"{group!r} must match {NAME_RE.pattern}")
            group = None
        if socket_path is None:
            table.fail("group", "only used with a socket")
    state_file: Path | None = None
    if table.has("state_file"):
        text = table.required_string("state_file")
        if text:
            state_file = resolve_path(base_dir, text)
        elif text is not None:
            table.fail("state_file", "must not be empty")
    return ControlConfig(socket_path, group, state_file)


def _read_metrics(table: Table) -> MetricsConfig:
    admin = table.boolean("admin", False)  # off by default: see metrics/actions.py
    if not table.has("listen"):
        return MetricsConfig(admin=admin)
    listen = _read_address(table, "listen", is_bind=True)
    # Write actions are for someone already on the host: a loopback listener only.
    if admin and listen is not None and not ipaddress.ip_address(listen.host).is_loopback:
        table.fail("admin", f"needs a loopback listen address, not {listen.host}")
    return MetricsConfig(listen, admin)


def _read_timeouts(parent: Table, base: Timeouts) -> Timeouts:
    table = parent.table("timeouts", _TIMEOUT_KEYS)
    changes = {key: table.seconds(key, float(getattr(base, key))) for key in _TIMEOUT_KEYS}
    return dataclasses.replace(base, **changes)


def _read_limits(parent: Table, base: Limits) -> Limits:
    """``base`` overlaid with ``parent.limits``; the line limit must fit in the head limit.

    The pair is checked only where one of them is set, so a bad pair in ``[defaults.limits]`` is
    reported once, there, and not again for every listener inheriting it.
    """
    table = parent.table("limits", _LIMIT_KEYS)
    # min_body_rate may be 0 (no minimum rate); every size limit needs at least one byte.
    changes = {
        key: table.integer(key, int(getattr(base, key)), minimum=int(key != "min_body_rate"))
        for key in _LIMIT_KEYS
    }
    limits = dataclasses.replace(base, **changes)
    is_set = table.has("max_line_bytes") or table.has("max_head_bytes")
    if is_set and limits.max_line_bytes > limits.max_head_bytes:
        message = f"{limits.max_line_bytes} exceeds max_head_bytes {limits.max_head_bytes}"
        table.fail("max_line_bytes", message)
    return limits


def _read_logging(table: Table) -> LoggingConfig:
    return LoggingConfig(
        access_log=table.boolean("access_log", _LOGGING_DEFAULTS.access_log),
        level=table.choice("level", LOG_LEVELS, _LOGGING_DEFAULTS.level),
        format=table.enum_choice("format", LogFormat, _LOGGING_DEFAULTS.format),
    )


def _read_listener(
    table: Table, name: str, default_timeouts: Timeouts, default_limits: Limits, base_dir: Path
) -> ListenerConfig | None:
    bind = _read_address(table, "bind", is_bind=True)
    mode = table.enum_choice("mode", ListenerMode, _LISTENER_DEFAULTS.mode)
    # With routes, the default backend is optional (config/routing.py, rule 3).
    is_routed = mode is ListenerMode.HTTP and bool(table.data.get("routes"))
    backend = "" if is_routed and not table.has("backend") else table.required_string("backend")
    if backend == "" and table.has("backend"):
        table.fail("backend", "must name a backend")
        backend = None
    # splice and pipe_bytes apply to both: tcp tunnels, and HTTP connections upgraded after 101.
    for key in _HTTP_ONLY_KEYS if mode is ListenerMode.TCP else ():
        if table.has(key):
            table.fail(key, f"not used by mode = {mode.value!r} listeners")
    timeouts = _read_timeouts(table, default_timeouts)
    tls = read_listener_tls(table, mode, timeouts.http_request_s, base_dir)
    listener = ListenerConfig(
        name=name,
        bind=bind or _NO_ADDRESS,
        backend=backend or "",
        mode=mode,
        timeouts=timeouts,
        limits=_read_limits(table, default_limits),
        backlog=table.integer("backlog", _LISTENER_DEFAULTS.backlog, minimum=1),
        x_forwarded_proto=table.choice(
            "x_forwarded_proto",
            FORWARDED_PROTOS,
            "https" if tls is not None else _LISTENER_DEFAULTS.x_forwarded_proto,
        ),
        splice=table.boolean("splice", _LISTENER_DEFAULTS.splice),
        pipe_bytes=table.integer(
            "pipe_bytes", _LISTENER_DEFAULTS.pipe_bytes, MIN_PIPE_BYTES, MAX_PIPE_BYTES
        ),
        splice_min_bytes=table.integer_or_false(
            "splice_min_bytes", _LISTENER_DEFAULTS.splice_min_bytes, minimum=0
        ),
        maxconn=table.integer("maxconn", 1, minimum=1) if table.has("maxconn") else None,
        routing=read_routing(table, bool(backend)) if mode is ListenerMode.HTTP else Routing(),
        tls=tls,
    )
    return listener if bind is not None and backend is not None else None


def _read_backend(
    table: Table, name: str, default_timeouts: Timeouts, base_dir: Path
) -> BackendConfig:
    balance = table.enum_choice("balance", Balance, _BACKEND_DEFAULTS.balance)
    retries = table.integer("retries", _BACKEND_DEFAULTS.retries, minimum=0)
    all_backups = table.boolean("all_backups", _BACKEND_DEFAULTS.all_backups)
    reuse = table.enum_choice("reuse", Reuse, _BACKEND_DEFAULTS.reuse)
    timeouts = _read_timeouts(table, default_timeouts)
    if table.data.get("servers", []) == []:
        table.fail("servers", "a backend needs at least one server")
    server_tables = table.array_of_tables("servers", _SERVER_KEYS)
    check = read_check(table, None)
    sticky = read_sticky(table)
    tls = read_backend_tls(table, base_dir)
    servers = [_read_server(server, check, tls) for server in server_tables]
    _check_server_names(server_tables)
    check_pairs([(s, t) for s, t in zip(servers, server_tables, strict=True) if s is not None])
    valid = tuple(server for server in servers if server is not None)
    raw_servers = table.data.get("servers")
    # Judge the pools only once every server parsed: one bad entry must not cause a second issue.
    is_complete = isinstance(raw_servers, list) and len(valid) == len(raw_servers) > 0
    if is_complete and all(server.pool is PoolName.BACKUP for server in valid):
        table.fail("servers", "every server is in the 'backup' pool; at least one must be 'main'")
    return BackendConfig(name, valid, balance, retries, all_backups, timeouts, sticky, reuse, tls)


def _read_server(
    table: Table, backend_check: CheckConfig | None, tls: UpstreamTlsConfig | None
) -> ServerConfig | None:
    name = _read_name(table, "name")
    address = _read_address(table, "address", is_bind=False)
    server = ServerConfig(
        name=name or "",
        address=address or _NO_ADDRESS,
        weight=table.integer("weight", _SERVER_DEFAULTS.weight, minimum=0, maximum=MAX_WEIGHT),
        pool=table.enum_choice("pool", PoolName, _SERVER_DEFAULTS.pool),
        max_idle=table.integer("max_idle", _SERVER_DEFAULTS.max_idle, minimum=0),
        check=read_check(table, backend_check),
        pair=_read_name(table, "pair") if table.has("pair") else None,
        maxconn=table.integer("maxconn", 1, minimum=1) if table.has("maxconn") else None,
        tls=tls,
    )
    return server if name is not None and address is not None else None


def _read_name(table: Table, key: str) -> str | None:
    name = table.required_string(key)
    if name is not None and not NAME_RE.fullmatch(name):
        table.fail(key, f"{name!r} must match {NAME_RE.pattern}")
        return None
    return name


def _check_server_names(tables: Sequence[Table]) -> None:
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


def _read_address(table: Table, key: str, is_bind: bool) -> Address | None:
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
        at = join_path("listeners", listener.name)
        named = [("backend", listener.backend)] if listener.backend else []
        for index, rule in enumerate(listener.routing.rules):
            if rule.backend is not None:
                named.append((f"routes[{index}].backend", rule.backend))
        for key, name in named:
            if name not in backend_names:
                message = f"no backend named {name!r} (backends: {known})"
                issues.append(ConfigIssue(f"{at}.{key}", message))


def _check_binds(
    listeners: Sequence[ListenerConfig], metrics: MetricsConfig, issues: list[ConfigIssue]
) -> None:
    """Two listeners (the metrics endpoint included) may not bind the same port on the same or
    an overlapping (wildcard) IP."""
    binds = {
        join_path(join_path("listeners", listener.name), "bind"): listener.bind
        for listener in listeners
    }
    if metrics.listen is not None:
        binds["metrics.listen"] = metrics.listen
    for path, other_path in bind_clashes(binds.items()):
        message = f"{str(binds[path])!r} clashes with {other_path} {str(binds[other_path])!r}"
        issues.append(ConfigIssue(path, message))
