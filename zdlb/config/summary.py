"""A one-screen human summary of a validated config, printed by ``zdlb check``.

Pure text formatting of the model: no I/O, no validation (``config.load`` has done it), and
nothing that a program should parse; the format may change between releases.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from zdlb.config.model import (
    BackendConfig,
    CheckConfig,
    CheckKind,
    Config,
    ListenerConfig,
    ListenerMode,
)
from zdlb.config.routing import (
    HeaderRules,
    backends_of,
    catch_all,
    reached_backends,
    shadowed,
)
from zdlb.config.tls import describe_certificates

_INDENT = "  "
_COLUMN_GAP = "  "


def describe(config: Config) -> str:
    """Listeners (name, mode, bind, backend, how bytes move) then backends (balance, retries,
    servers).

    Servers are listed with address, pool, weight, idle-connection cap and health check.
    Returns lines joined by newlines, without a trailing newline.
    """
    lines = [
        f"{config.source}: {_count(config.listeners, 'listener')}, "
        f"{_count(config.backends, 'backend')}",
        "listeners:",
    ]
    listener_rows = _columns([_listener_row(listener) for listener in config.listeners], depth=1)
    for index, row in enumerate(listener_rows):  # one per listener, or "(none)"
        lines.append(row)
        if index < len(config.listeners):
            lines.extend(_INDENT * 2 + line for line in _routing_lines(config.listeners[index]))
    lines.append("backends:")
    listeners = config.listeners
    used = {n for item in listeners for n in backends_of(item.backend, item.routing)}
    reached = set().union(*(reached_backends(item.backend, item.routing) for item in listeners))
    for backend in config.backends:
        line = _backend_line(backend, is_used=backend.name in used)
        if backend.name in used and backend.name not in reached:
            line += " (no route reaches it: see the routes above)"
        lines.append(_INDENT + line)
        rows = [
            (
                s.name,
                str(s.address),
                s.pool.value if s.pair is None else f"backup of {s.pair}",
                f"weight={s.weight}",
                f"max_idle={s.max_idle}" + (f" maxconn={s.maxconn}" if s.maxconn else ""),
                _check_text(s.check),
            )
            for s in backend.servers
        ]
        lines.extend(_columns(rows, depth=2))
    lines.extend(describe_certificates(config.listeners, time.time()))  # TLS: names, expiry
    workers = "one per usable core" if config.workers is None else str(config.workers)
    lines.append(f"workers: {workers}")
    if config.control.socket is not None:
        lines.append(f"control socket: {config.control.socket}")
    if config.metrics.listen is not None:
        lines.append(f"metrics: http://{config.metrics.listen}/metrics")
    cluster = config.cluster
    if cluster is not None:  # a fleet sharing its runtime state in etcd (README, "A fleet")
        secured = ", tls" if cluster.tls is not None else ""
        secured += ", auth" if cluster.auth is not None else ""
        lines.append(
            f"cluster: {cluster.prefix} as {cluster.instance} via {', '.join(cluster.endpoints)}"
            f" (lease {cluster.lease_s}s{secured})"
        )
    return "\n".join(lines)


def _check_text(check: CheckConfig | None) -> str:
    if check is None:
        return ""  # unchecked: always up
    what = check.kind.value
    if check.kind is CheckKind.HTTP:
        what += f" {check.method} {check.path}"
    target = check.address or (f"port {check.port}" if check.port else None)
    where = f" at {target}" if target else ""
    observe = " +observe" if check.observe else ""
    return f"check={what}{where} every {check.interval_s:g}s{observe}"


def _count(items: Sequence[object], noun: str) -> str:
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


def _listener_row(listener: ListenerConfig) -> tuple[str, ...]:
    bind = str(listener.bind)
    if listener.bind.port == 0:
        bind += " (any free port)"
    target = f"-> {listener.backend}" if listener.backend else "-> (routes only)"
    if listener.routing.rules:
        target += f", {_count(listener.routing.rules, 'route')}"
    limit = f"maxconn={listener.maxconn}" if listener.maxconn is not None else ""
    return (listener.name, listener.mode.value, bind, target, _moves(listener), limit)


def _routing_lines(listener: ListenerConfig) -> list[str]:
    """A listener's routes in order, each with what `zdlb check` knows about it: shadowed by
    an earlier one (config/routing.py ``covers``), a default never used; then header rules."""
    routing = listener.routing
    rules = routing.rules
    never = dict(shadowed(rules))
    lines = []
    for index, rule in enumerate(rules):
        note = ""
        if index in never:
            note = f": never matches, routes[{never[index]}] matches every request it would"
        lines.append(f"routes[{index}] {rule.describe()}{note}")
    last = catch_all(rules)
    if rules and last is not None and listener.backend:
        lines.append(
            f"default backend {listener.backend}: never used, routes[{last}] matches every request"
        )
    elif rules and not listener.backend:
        lines.append(f"no route matches: {routing.unmatched_status}")
    for side, edits in (
        ("request", routing.request_headers),
        ("response", routing.response_headers),
    ):
        if not edits.is_empty:
            lines.append(f"{side} headers: {_edits_text(edits)}")
    return lines


def _edits_text(rules: HeaderRules) -> str:
    parts = [f"set {name}" for name, _ in rules.set] + [f"add {name}" for name, _ in rules.add]
    return ", ".join(parts + [f"remove {name}" for name in rules.remove])


def _moves(listener: ListenerConfig) -> str:
    """How bytes that zdlb does not parse move: tunnels, and (http) large bodies."""
    if listener.tls is not None:
        return "TLS (copies: TLS bytes cannot be spliced)"
    if not listener.splice:
        return "copy"
    if listener.mode is ListenerMode.TCP or listener.splice_min_bytes is None:
        return "splice tunnels" if listener.mode is ListenerMode.HTTP else "splice"
    return f"splice tunnels, bodies >= {_size(listener.splice_min_bytes)}"


def _size(size: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def _backend_line(backend: BackendConfig, is_used: bool) -> str:
    parts = [backend.name, f"balance={backend.balance.value}", f"retries={backend.retries}"]
    parts.append(f"reuse={backend.reuse.value}")  # which requests may take pooled connections
    if backend.all_backups:
        parts.append("all_backups")
    if backend.sticky is not None:
        signed = ", signed" if backend.sticky.secret else ""
        parts.append(f"sticky=cookie {backend.sticky.cookie}{signed}")
    if backend.tls is not None:
        parts.append("tls" if backend.tls.verify else "tls (not verified)")
    if not is_used:
        parts.append("(no listener uses it)")
    return " ".join(parts)


def _columns(rows: Sequence[tuple[str, ...]], depth: int) -> list[str]:
    """Rows as left-aligned columns, indented ``depth`` levels, without trailing spaces."""
    if not rows:
        return [_INDENT * depth + "(none)"]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        (
            _INDENT * depth
            + _COLUMN_GAP.join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
