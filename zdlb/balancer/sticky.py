"""The sticky cookie: encode a host identity into a cookie value, find and strip it in requests.

Insert mode, as HAProxy's ``cookie NAME insert``: zdlb adds ``Set-Cookie`` to a response when the
client carried no valid cookie or was moved to another host, and removes its own cookie from
the request before it goes upstream (other cookies are left as they were).

The value is a host identity (the main server's name: a main and its pair share it), never an
address. With a secret it is followed by ``.`` and an HMAC-SHA256 tag truncated to 96 bits,
URL-safe base64: a client cannot forge another host's value, and 2^96 guesses are out of reach.
Every valid value is known when the backend is built (one per identity), so decoding is one
dict lookup: no parsing, no HMAC per request, and a forged or garbage value simply is not found.
The Set-Cookie lines are built once per identity too.

Malformed Cookie headers, several Cookie headers, unknown or forged values never raise: the
client is treated as carrying no cookie. No I/O, no clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable

from zdlb.census import split_value, with_token
from zdlb.config.model import StickyConfig

# 12 bytes of HMAC-SHA256 -> 16 characters of base64: 96 bits against forgery.
# Cookie lines whose outcome extract() remembers: a line is ~100 bytes, so at most ~1 MiB; past
# it the memory is emptied and refills with the users who come back.
MAX_SEEN_LINES = 8192
_TAG_BYTES = 12
# A Cookie field line of a raw head, with the CRLF before it (header names are
# case-insensitive; cookie names are not, RFC 6265 section 5.4).
_COOKIE_LINE = re.compile(rb"\r\ncookie:[ \t]*([^\r]*)", re.IGNORECASE)


class StickyCookie:
    """The sticky cookie of one backend: its values, Set-Cookie lines and request stripping."""

    __slots__ = ("_by_value", "_seen", "config", "lines", "marker", "name", "token_lines")

    def __init__(self, config: StickyConfig, backend: str, identities: Iterable[str]) -> None:
        self.config = config
        self.name = config.cookie.encode()
        # A cheap pre-check (``in``, no call): most heads do not carry it.
        self.marker = self.name + b"="
        self._by_value: dict[bytes, str] = {}
        # Cookie line -> extract()'s outcome for it (identity, line without ours, token), and
        # how many times the line holds the cookie's name.
        self._seen: dict[bytes, tuple[str | None, bytes | None, bytes | None, int]] = {}
        # identity -> its Set-Cookie lines: read once per pinned answer, a dict lookup.
        self.lines: dict[str, bytes] = {}
        # identity -> its lines cut where census.with_token puts a user token, separator kept:
        # ``before + token + after`` pins with a token by two concatenations instead of a
        # function call and a bytes.replace per new user.
        self.token_lines: dict[str, tuple[bytes, bytes]] = {}
        for identity in identities:
            value = encode_value(identity, backend, config.secret)
            self._by_value[value] = identity
            lines = self.lines[identity] = set_cookie_lines(config, value)
            before, after = with_token(lines, b"\0").split(b"\0", 1)
            self.token_lines[identity] = (before, after)

    def set_cookie(self, identity: str) -> bytes:
        """The response lines (CRLF-terminated) that pin a client to ``identity``."""
        return self.lines[identity]

    def extract(self, raw_head: bytes) -> tuple[str | None, bytes | None, bytes | None]:
        """(identity the request carries, the head without zdlb's cookie, the user token the
        cookie carries) from a raw head.

        The identity is None when there is no valid cookie, or several that disagree. The
        head is None when it carried no zdlb cookie at all, so the caller keeps the original.
        The token (census.py: ``VALUE~TOKEN``) is None when the cookie had none or was not
        valid; it is only a counting aid and never changes where the request goes.
        """
        if self.marker not in raw_head:  # ~50 ns: the common no-cookie case stops here
            return None, None, None
        # The common case, a browser's one "Cookie: " line holding every occurrence of our
        # cookie's name: that line's outcome is remembered (the same user sends the same line
        # on every request), with how often the name occurs in it, so a returning user costs
        # 3 bytes searches and a dict lookup (`in` and `[]`: no call) instead of a regex pass
        # with a Python callback per Cookie line.
        start = raw_head.find(b"\r\nCookie: ")
        if start >= 0:
            end = raw_head.find(b"\r\n", start + 2)
            line = raw_head[start:end]
            seen = self._seen
            if line in seen:
                outcome = seen[line]
            else:
                if len(seen) >= MAX_SEEN_LINES:
                    seen.clear()  # bounded memory; the next requests refill it
                outcome = seen[line] = (
                    *self._outcome(*self._strip(line[10:])),
                    line.count(self.marker),
                )
            identity, kept_line, token, markers = outcome
            if raw_head.count(self.marker) == markers:  # the name occurs in this line only
                if kept_line is None:
                    return None, None, None  # the name only appeared inside another cookie
                return identity, raw_head[:start] + kept_line + raw_head[end:], token
        return self._extract_anywhere(raw_head)

    def _extract_anywhere(self, raw_head: bytes) -> tuple[str | None, bytes | None, bytes | None]:
        """``extract`` for any head: every Cookie line, whatever its spelling and number."""
        found: set[str | None] = set()
        tokens: list[bytes | None] = []

        def strip(match: re.Match[bytes]) -> bytes:
            line_found, line_tokens, kept_line = self._strip(match.group(1))
            if kept_line is None:
                return match.group(0)  # a Cookie line without ours stays byte for byte
            found.update(line_found)
            tokens.extend(line_tokens)
            return kept_line

        head_end = raw_head.rfind(b"\r\n\r\n")
        stripped = _COOKIE_LINE.sub(strip, raw_head[:head_end]) + raw_head[head_end:]
        if not tokens:
            return None, None, None  # the name only appeared elsewhere (a URL, another header)
        return self._outcome(found, tokens, stripped)

    def _strip(self, value: bytes) -> tuple[set[str | None], list[bytes | None], bytes | None]:
        """One Cookie field value: the identities and tokens our cookie pairs carry, and the
        field line without them (``None`` if it holds none of ours: keep it as it is)."""
        found: set[str | None] = set()
        tokens: list[bytes | None] = []
        kept = []
        for pair in value.split(b";"):
            name, eq, pair_value = pair.strip().partition(b"=")
            if eq and name == self.name:
                host_value, token = split_value(pair_value.strip(b'"'))
                found.add(self._by_value.get(host_value))
                tokens.append(token)
            elif pair.strip():
                kept.append(pair.strip())
        if not tokens:
            return found, tokens, None
        return found, tokens, b"\r\nCookie: " + b"; ".join(kept) if kept else b""

    @staticmethod
    def _outcome(
        found: set[str | None], tokens: list[bytes | None], kept: bytes | None
    ) -> tuple[str | None, bytes | None, bytes | None]:
        """(identity, kept, token): the identity when every pair of ours agrees, else None;
        the token only with a valid identity and a single pair."""
        if kept is None:
            return None, None, None
        identity = next(iter(found)) if len(found) == 1 else None
        token = tokens[0] if identity is not None and len(tokens) == 1 else None
        return identity, kept, token


def encode_value(identity: str, backend: str, secret: str | None) -> bytes:
    """The cookie value for ``identity``: itself, plus an HMAC tag when there is a secret.

    The backend's name is part of the signed message, so a value minted for one backend is
    not valid in another that shares the secret.
    """
    value = identity.encode()
    if secret is None:
        return value
    message = backend.encode() + b"\0" + value
    tag = hmac.new(secret.encode(), message, hashlib.sha256).digest()[:_TAG_BYTES]
    return value + b"." + base64.urlsafe_b64encode(tag).rstrip(b"=")


def set_cookie_lines(config: StickyConfig, value: bytes) -> bytes:
    """``Set-Cookie`` (and with ``nocache``, ``Cache-Control: private``) for ``value``.

    Every attribute was validated by config/sticky.py, so nothing here can split the line.
    """
    parts = [b"Set-Cookie: %s=%s; Path=%s" % (config.cookie.encode(), value, config.path.encode())]
    if config.domain is not None:
        parts.append(b"; Domain=" + config.domain.encode())
    if config.max_age is not None:
        parts.append(b"; Max-Age=%d" % config.max_age)
    if config.secure:
        parts.append(b"; Secure")
    if config.httponly:
        parts.append(b"; HttpOnly")
    parts.append(b"; SameSite=" + config.samesite.value.capitalize().encode())
    parts.append(b"\r\n")
    if config.nocache:
        # A shared cache must not hand one client's pin to another (HAProxy's `nocache`).
        parts.append(b"Cache-Control: private\r\n")
    return b"".join(parts)
