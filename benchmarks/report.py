"""Summaries of the runs: medians per (workload, target), ratios against HAProxy, and Markdown.

Pure: takes results and machine facts, returns text. Printing and appending to RESULTS.md are
left to bench.py.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from benchmarks.wrkrun import RunResult

BASELINE = "haproxy"  # every ratio is against this target, but for the routing targets:
ROUTES_SUFFIX = "-routes"  # zdlb-routes is compared with haproxy-routes (the same routes)
# Busy time on the proxy core beyond the proxy's own CPU time: interrupt work the kernel charges
# to no process (5-10 points in `close` runs here) or another process. Above this, flag the row.
FOREIGN_BUSY_PCT = 15.0


@dataclass(frozen=True, slots=True)
class Summary:
    """Medians over rounds for one (workload, target)."""

    workload: str
    target: str
    rounds: int
    rps: float
    rps_min: float
    rps_max: float
    p99_ms: float
    cpu_us_per_req: float | None
    cpu_pct: float | None
    core_busy_pct: float | None
    errors: int
    requests: int


@dataclass(frozen=True, slots=True)
class IdleRow:
    target: str
    connections: int
    bytes_per_conn: float | None
    note: str


HEADER = [
    "workload",
    "target",
    "rps (median)",
    "rps range",
    "p99 ms",
    "CPU us/req",
    "proxy CPU %",
    "proxy core busy %",
    "rps vs HAProxy",
    "p99 vs HAProxy",
    "CPU/req vs HAProxy",
    "errors",
]


def _median_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(results: Sequence[RunResult]) -> list[Summary]:
    """Group by (workload, target), in first-seen order, and take medians."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.workload, result.target), []).append(result)
    summaries = []
    for (workload, target), runs in groups.items():
        rps = [r.rps for r in runs]
        summaries.append(
            Summary(
                workload=workload,
                target=target,
                rounds=len(runs),
                rps=statistics.median(rps),
                rps_min=min(rps),
                rps_max=max(rps),
                p99_ms=statistics.median(r.p99_ms for r in runs),
                cpu_us_per_req=_median_or_none(r.cpu_us_per_req for r in runs),
                cpu_pct=_median_or_none(r.cpu_pct for r in runs),
                core_busy_pct=_median_or_none(r.proxy_core_busy_pct for r in runs),
                errors=sum(r.errors for r in runs),
                requests=sum(r.requests for r in runs),
            )
        )
    return summaries


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def _busy_cell(s: Summary) -> str:
    """Proxy core busy %, with (!) when much of it was not the proxy's own CPU time."""
    if s.core_busy_pct is None:
        return "-"
    foreign = s.core_busy_pct - (s.cpu_pct or 0.0)
    return f"{s.core_busy_pct:.0f}" + (" (!)" if foreign > FOREIGN_BUSY_PCT else "")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def baseline_of(target: str) -> str:
    """The target ``target``'s ratios are computed against."""
    return BASELINE + ROUTES_SUFFIX if target.endswith(ROUTES_SUFFIX) else BASELINE


def table_rows(
    summaries: Sequence[Summary], skipped: dict[str, str], workloads: Sequence[str]
) -> list[list[str]]:
    """One row per summary plus one per skipped target and workload."""
    base = {(s.workload, s.target): s for s in summaries}
    rows = []
    for s in summaries:
        b = base.get((s.workload, baseline_of(s.target)))
        errors = f"{s.errors}" if s.errors <= s.requests // 100 else f"{s.errors} (!)"
        rows.append(
            [
                s.workload,
                s.target,
                f"{s.rps:,.0f}",
                f"{s.rps_min:,.0f}-{s.rps_max:,.0f}",
                f"{s.p99_ms:.2f}",
                _fmt(s.cpu_us_per_req, ".1f"),
                _fmt(s.cpu_pct, ".0f"),
                _busy_cell(s),
                _ratio(s.rps, b.rps if b else None),
                _ratio(s.p99_ms, b.p99_ms if b else None),
                _ratio(s.cpu_us_per_req, b.cpu_us_per_req if b else None),
                errors,
            ]
        )
    for target, reason in skipped.items():
        for workload in workloads:
            rows.append([workload, target, "skipped", *[""] * (len(HEADER) - 4), reason])
    return rows


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width text table for the terminal; long last-column notes are cut at 60 chars."""
    cut = [[*row[:-1], row[-1][:60]] for row in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *cut, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cut]
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def idle_rows(rows: Sequence[IdleRow]) -> list[list[str]]:
    return [
        [
            r.target,
            str(r.connections),
            "-" if r.bytes_per_conn is None else f"{r.bytes_per_conn / 1000:.2f}",
            r.note,
        ]
        for r in rows
    ]


IDLE_HEADER = ["target", "idle connections held", "KB per connection (VmRSS delta)", "note"]


def results_section(
    *,
    title: str,
    machine: Sequence[tuple[str, str]],
    command: str,
    rows: Sequence[Sequence[str]],
    idle: Sequence[IdleRow],
) -> str:
    """The dated Markdown section appended to RESULTS.md."""
    parts = [f"## {title}", ""]
    parts += [f"- {key}: {value}" for key, value in machine]
    parts += [f"- command: `{command}`", "", markdown_table(HEADER, rows), ""]
    if idle:
        parts += [markdown_table(IDLE_HEADER, idle_rows(idle)), ""]
    return "\n".join(parts) + "\n"
