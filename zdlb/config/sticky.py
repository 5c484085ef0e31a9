"""``[backends.NAME.sticky]`` -> ``StickyConfig``, and the ``pair`` links between servers. No I/O.

Cookie attributes are checked against RFC 6265's grammar here, so nothing zdlb later writes into
a ``Set-Cookie`` line can split it or smuggle another attribute in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from zdlb.config.model import PoolName, SameSite, ServerConfig, StickyConfig
from zdlb.config.table import Table

STICKY_KEYS = (
    "cookie",
    "secret",
    "path",
    "domain",
    "secure",
    "httponly",
    "samesite",
    "max_age",
    "nocache",
    "drain_sticky_s",
)
# RFC 6265 4.1.1: cookie-name is an RFC 7230 token.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")
# path-value: any CHAR except CTLs and ";"; zdlb also wants it to start with "/" and have no
# spaces (a space would need quoting in every tool that reads the header back).
_PATH_RE = re.compile(r"/[\x21-\x3a\x3c-\x7e]{0,255}")
_DOMAIN_RE = re.compile(r"\.?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9-]{1,63}")
# An HMAC key shorter than this is guessable offline from one signed cookie.
MIN_SECRET_CHARS = 16
_MAX_AGE_S = 10 * 365 * 24 * 3600  # ten years: anything longer is a typo
_DEFAULTS = StickyConfig(cookie="")


def read_sticky(parent: Table) -> StickyConfig | None:
    """``parent.sticky`` as a StickyConfig; None when the table is absent."""
    if not parent.has("sticky"):
        return None
    table = parent.table("sticky", STICKY_KEYS)
    cookie = table.required_string("cookie")
    if cookie is not None and not _TOKEN_RE.fullmatch(cookie):
        table.fail("cookie", f"{cookie!r} is not a cookie name (letters, digits, !#$%&'*+-.^_`|~)")
        cookie = None
    samesite = table.enum_choice("samesite", SameSite, _DEFAULTS.samesite)
    secure = table.boolean("secure", _DEFAULTS.secure)
    if samesite is SameSite.NONE and not secure:
        table.fail("samesite", "'none' needs secure = true (browsers drop the cookie otherwise)")
    return StickyConfig(
        cookie=cookie or "SERVERID",
        secret=_read_secret(table),
        path=_read_pattern(table, "path", _PATH_RE, "a path starting with '/'") or "/",
        domain=_read_pattern(table, "domain", _DOMAIN_RE, "a domain name"),
        secure=secure,
        httponly=table.boolean("httponly", _DEFAULTS.httponly),
        samesite=samesite,
        max_age=_read_max_age(table),
        nocache=table.boolean("nocache", _DEFAULTS.nocache),
        drain_sticky_s=table.seconds("drain_sticky_s", _DEFAULTS.drain_sticky_s),
    )


def _read_secret(table: Table) -> str | None:
    if not table.has("secret"):
        return None
    secret = table.required_string("secret")
    if secret is not None and len(secret) < MIN_SECRET_CHARS:
        table.fail("secret", f"must be at least {MIN_SECRET_CHARS} characters")
        return None
    return secret


def _read_pattern(table: Table, key: str, pattern: re.Pattern[str], what: str) -> str | None:
    if not table.has(key):
        return None
    value = table.required_string(key)
    if value is not None and not pattern.fullmatch(value):
        table.fail(key, f"expected {what} without spaces or ';', got {value!r}")
        return None
    return value


def _read_max_age(table: Table) -> int | None:
    if not table.has("max_age"):
        return None
    return table.integer("max_age", 0, minimum=0, maximum=_MAX_AGE_S)


def check_pairs(servers: Sequence[tuple[ServerConfig, Table]]) -> None:
    """Each ``pair`` sits on a backup and names a main of the same backend, at most once.

    Each server comes with the table it was read from, so issues carry ``servers[i].pair``.
    """
    by_name = {server.name: server for server, _ in servers}
    paired_by: dict[str, str] = {}
    for server, table in servers:
        if server.pair is None:
            continue
        main = by_name.get(server.pair)
        if server.pool is not PoolName.BACKUP:
            table.fail("pair", "only a backup server names a pair (its main)")
        elif main is None:
            table.fail("pair", f"no server named {server.pair!r} in this backend")
        elif main.pool is not PoolName.MAIN:
            table.fail("pair", f"{server.pair!r} is a backup; a pair must be a main server")
        elif server.pair in paired_by:
            other = paired_by[server.pair]
            table.fail("pair", f"{server.pair!r} already pairs with {other!r}")
        else:
            paired_by[server.pair] = server.name
