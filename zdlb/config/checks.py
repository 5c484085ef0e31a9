"""``[backends.NAME.check]`` and a server's own ``check`` table -> ``CheckConfig``. No I/O.

A backend's check applies to each of its servers; a server's ``check`` table overrides single
keys of it (or defines a check for that server alone). Keys that only mean something for HTTP
probes are refused on a TCP check, so a typo'd ``kind`` cannot silently disable them.
"""

from __future__ import annotations

import dataclasses
import re

from zdlb.config.address import MAX_PORT, parse_address
from zdlb.config.model import Address, CheckConfig, CheckKind
from zdlb.config.table import Table

CHECK_KEYS = (
    "kind",
    "interval_s",
    "fast_interval_s",
    "timeout_s",
    "rise",
    "fall",
    "method",
    "path",
    "host",
    "expect_status",
    "expect_body",
    "address",
    "port",
    "observe",
    "observe_errors",
)
_HTTP_ONLY_KEYS = ("method", "path", "host", "expect_status", "expect_body")
_METHOD_RE = re.compile(r"[A-Z]{1,16}")
_PATH_RE = re.compile(r"/[\x21-\x7e]*")  # origin-form: no spaces or control characters
_HOST_RE = re.compile(r"[\x21-\x7e]+")
_STATUS_RANGE_RE = re.compile(r"([1-5][0-9][0-9])-([1-5][0-9][0-9])")
_MAX_COUNT = 100  # rise, fall, observe_errors: beyond this a server would never change state
_NO_CHECK = CheckConfig()


def read_check(parent: Table, base: CheckConfig | None) -> CheckConfig | None:
    """``base`` overlaid with ``parent.check`` (absent: ``base`` unchanged)."""
    if not parent.has("check"):
        return base
    table = parent.table("check", CHECK_KEYS)
    start = base or _NO_CHECK
    kind = table.enum_choice("kind", CheckKind, start.kind)
    if kind is CheckKind.TCP:
        for key in _HTTP_ONLY_KEYS:
            if table.has(key):
                table.fail(key, "only used by kind = 'http' checks")
    check = dataclasses.replace(
        start,
        kind=kind,
        interval_s=table.seconds("interval_s", start.interval_s),
        fast_interval_s=table.seconds("fast_interval_s", start.fast_interval_s),
        timeout_s=table.seconds("timeout_s", start.timeout_s),
        rise=table.integer("rise", start.rise, minimum=1, maximum=_MAX_COUNT),
        fall=table.integer("fall", start.fall, minimum=1, maximum=_MAX_COUNT),
        method=_pattern(table, "method", _METHOD_RE, start.method),
        path=_pattern(table, "path", _PATH_RE, start.path),
        host=_optional_pattern(table, "host", _HOST_RE, start.host),
        expect_status=_read_statuses(table, start.expect_status),
        expect_body=_optional_string(table, "expect_body", start.expect_body),
        observe=table.boolean("observe", start.observe),
        observe_errors=table.integer(
            "observe_errors", start.observe_errors, minimum=1, maximum=_MAX_COUNT
        ),
    )
    address, port = check.address, check.port
    if table.has("address"):
        address = _read_probe_address(table)
    if table.has("port"):
        port = table.integer("port", 0, minimum=1, maximum=MAX_PORT) or None
    if address is not None and port is not None:
        table.fail("port", "give either address or port, not both")
    return dataclasses.replace(check, address=address, port=port)


def _read_probe_address(table: Table) -> Address | None:
    text = _optional_string(table, "address", None)
    if text is None:
        return None
    try:
        return parse_address(text, is_bind=False)
    except ValueError as exc:
        table.fail("address", str(exc))
        return None


def _pattern(table: Table, key: str, pattern: re.Pattern[str], default: str) -> str:
    value = _optional_pattern(table, key, pattern, default)
    return default if value is None else value


def _optional_pattern(
    table: Table, key: str, pattern: re.Pattern[str], default: str | None
) -> str | None:
    value = _optional_string(table, key, default)
    if value is not None and value is not default and not pattern.fullmatch(value):
        table.fail(key, f"{value!r} must match {pattern.pattern}")
        return default
    return value


def _optional_string(table: Table, key: str, default: str | None) -> str | None:
    if not table.has(key):
        return default
    value = table.data[key]
    if not isinstance(value, str):
        table.fail(key, f"expected a string, got {value!r}")
        return default
    return value


def _read_statuses(
    table: Table, default: tuple[tuple[int, int], ...]
) -> tuple[tuple[int, int], ...]:
    """``[200, "300-399"]``: statuses and inclusive ranges, all within 100..599."""
    if not table.has("expect_status"):
        return default
    value = table.data["expect_status"]
    items = value if isinstance(value, list) else [value]
    ranges: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
            ranges.append((item, item))
            continue
        match = _STATUS_RANGE_RE.fullmatch(item) if isinstance(item, str) else None
        if match is None or int(match[1]) > int(match[2]):
            table.fail("expect_status", f"{item!r} is neither a status (100-599) nor 'LOW-HIGH'")
            return default
        ranges.append((int(match[1]), int(match[2])))
    if not ranges:
        table.fail("expect_status", "needs at least one status or range")
        return default
    return tuple(ranges)
