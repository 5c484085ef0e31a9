"""Typed reading of one TOML table with exact key paths: the building block of config/load.py.

Each getter validates one key and, on a bad value, records a ``ConfigIssue`` naming the key
path and the value, then returns the default so that reading goes on and every problem is
reported together. Untyped TOML data (``Any``) stops here. No I/O.
"""

from __future__ import annotations

import difflib
import enum
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from zdlb.errors import ConfigIssue

# Listener, backend and server names appear in logs, metrics labels and control commands, so
# they stay free of spaces, quotes and separators those formats would have to escape.
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")  # TOML bare keys; anything else is quoted in paths
_MAX_SHOWN_CHARS = 60  # bad values are echoed in messages; a huge string must not flood them
_MISSING = object()
_E = TypeVar("_E", bound=enum.Enum)


class Table:
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
        return join_path(self.path, key)

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

    def integer_or_false(self, key: str, default: int | None, minimum: int) -> int | None:
        """An integer >= ``minimum``, or false (None): a limit that can be turned off."""
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return default
        if value is False:
            return None
        if value is True or not isinstance(value, int):
            self._expect(key, "an integer or false", value)
            return default
        return self.integer(key, 0, minimum)

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

    def table(self, key: str, keys: Sequence[str]) -> Table:
        """The sub-table ``key``; empty when absent, or when not a table (reported)."""
        value = self.data.get(key, _MISSING)
        if value is not _MISSING and not isinstance(value, Mapping):
            self._expect(key, "a table", value)
        data = value if isinstance(value, Mapping) else {}
        return Table(data, self.at(key), self.issues, keys)

    def names(self, key: str) -> list[str]:
        value = self.data.get(key)
        return [str(name) for name in value] if isinstance(value, Mapping) else []

    def named_tables(self, key: str, keys: Sequence[str]) -> list[tuple[str, Table]]:
        """The tables under ``[key.NAME]``, each NAME checked against ``NAME_RE``."""
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            self._expect(key, "a table", value)
            return []
        children: list[tuple[str, Table]] = []
        for name, child in value.items():
            path = join_path(self.at(key), name)
            if not NAME_RE.fullmatch(name):
                self.issues.append(ConfigIssue(path, f"name must match {NAME_RE.pattern}"))
            if isinstance(child, Mapping):
                children.append((name, Table(child, path, self.issues, keys)))
            else:
                self.issues.append(ConfigIssue(path, f"expected a table, got {_show(child)}"))
        return children

    def array_of_tables(self, key: str, keys: Sequence[str]) -> list[Table]:
        """The tables of ``[[key]]``: empty when absent; non-tables are reported and skipped."""
        value = self.data.get(key, [])
        if not isinstance(value, list):
            self._expect(key, f"an array of tables ([[{self.at(key)}]])", value)
            return []
        tables: list[Table] = []
        for index, item in enumerate(value):
            path = f"{self.at(key)}[{index}]"
            if isinstance(item, Mapping):
                tables.append(Table(item, path, self.issues, keys))
            else:
                self.issues.append(ConfigIssue(path, f"expected a table, got {_show(item)}"))
        return tables


def _suggest(key: str, keys: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=1)
    return f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(keys)}"


def join_path(path: str, key: str) -> str:
    shown = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key)
    return f"{path}.{shown}" if path else shown


def _show(value: object) -> str:
    if isinstance(value, Mapping):
        return "a table"
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "..."
