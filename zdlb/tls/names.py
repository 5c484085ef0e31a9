"""Which certificate answers a TLS client's SNI name: pure lookups, no I/O, no ssl.

Rules (RFC 6125 section 6.4.3, as browsers apply them):
1. A name is compared case-insensitively, a trailing dot ignored.
2. An exact name beats a wildcard: ``api.example.com`` picks the certificate naming it even if
   another names ``*.example.com``.
3. A wildcard ``*.example.com`` covers exactly one label: ``a.example.com``, not
   ``example.com`` nor ``a.b.example.com``.
4. Among certificates naming the same name, the first in the config wins.
5. No match, or no SNI at all (an IP address, an old client): the default, the first
   certificate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class NameTable(Generic[T]):
    """Names (exact and ``*.`` wildcards) to values; ``pick`` applies the rules above."""

    __slots__ = ("_default", "_exact", "_wildcard")

    def __init__(self, entries: Sequence[tuple[Sequence[str], T]]) -> None:
        """``entries``: (names, value) in config order; the first value is the default.
        Raises ValueError when there is none."""
        if not entries:
            raise ValueError("a name table needs at least one entry")
        self._default = entries[0][1]
        self._exact: dict[str, T] = {}
        self._wildcard: dict[str, T] = {}  # by the part after "*."
        for names, value in entries:
            for name in names:
                name = normalize(name)
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], value)
                else:
                    self._exact.setdefault(name, value)

    @property
    def default(self) -> T:
        return self._default

    def pick(self, server_name: str | None) -> T:
        """The value for ``server_name`` (None: the client sent no SNI)."""
        if not server_name:
            return self._default
        name = normalize(server_name)
        value = self._exact.get(name)
        if value is not None:
            return value
        _, dot, parent = name.partition(".")
        if dot:
            value = self._wildcard.get(parent)
            if value is not None:
                return value
        return self._default


def normalize(name: str) -> str:
    return name.lower().rstrip(".")
