"""Header rules and redirects applied to raw heads (config/routing.py, rules 2 and 4). Pure.

An edit is compiled once into one regex (every field line to drop: the removed names and the
names ``set`` replaces) and the bytes of the lines to append (``set`` and ``add``), so editing
a head costs one ``sub`` and one concatenation, whatever the number of rules. Field lines are
appended at the end of the head, after the client's or the server's: order between fields of
different names carries no meaning (RFC 9110 section 5.3). Config validation guarantees no
rule touches a framing or hop-by-hop field, so the head's parsed flags stay true after an edit.
A listener without rules holds no edit: nothing here runs for it.
"""

from __future__ import annotations

import re

from zdlb.config.routing import HOST_PLACEHOLDER, HeaderRules, Redirect
from zdlb.http.head import RequestHead, ResponseHead
from zdlb.http.routing import normalise_host

# What a Host value may be to stand in a Location: a name, IPv4 or bracketed IPv6 literal.
_LOCATION_HOST = re.compile(rb"[a-z0-9._-]+|\[[0-9a-f:.]+\]")


class HeadEdit:
    """One set of header rules, ready for raw heads."""

    __slots__ = ("drop", "lines", "sets_host")

    def __init__(self, rules: HeaderRules) -> None:
        names = [name for name, _ in rules.set] + list(rules.remove)
        alternatives = b"|".join(re.escape(name.lower().encode()) for name in dict.fromkeys(names))
        self.drop = re.compile(rb"\r\n(?i:%s):[^\r]*" % alternatives) if names else None
        fields = rules.set + rules.add
        self.lines = b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in fields)
        self.sets_host = any(name.lower() == "host" for name, _ in rules.set)

    def __repr__(self) -> str:
        return f"<HeadEdit drop={self.drop.pattern if self.drop else None!r} lines={self.lines!r}>"

    def edit(self, raw: bytes) -> bytes:
        """``raw`` (a whole head, final CRLF CRLF included) with the rules applied."""
        drop = self.drop
        kept = drop.sub(b"", raw[:-2]) if drop is not None else raw[:-2]
        return b"%s%s\r\n" % (kept, self.lines)

    def apply_request(self, head: RequestHead) -> None:
        """``edit``, in place on ``head`` (inlined: 2 calls per request, not 4); a set Host is
        the one Host (``has_host``)."""
        drop = self.drop
        raw = head.raw[:-2]
        head.raw = b"%s%s\r\n" % (drop.sub(b"", raw) if drop is not None else raw, self.lines)
        if self.sets_host:
            head.has_host = True

    def apply_response(self, head: ResponseHead, added: bytes) -> bytes:
        """Drop ``head``'s edited fields in place; return ``added`` (lines zdlb inserts after
        the status line, the sticky cookie) with the set and added lines."""
        if self.drop is not None:
            head.raw = self.drop.sub(b"", head.raw)
        return added + self.lines


def edit_for(*rules: HeaderRules) -> HeadEdit | None:
    """The edit of ``rules`` applied in order (a listener's, then a route's); None: no rule."""
    merged = HeaderRules()
    for each in rules:
        merged = merged.then(each)
    return None if merged.is_empty else HeadEdit(merged)


class Redirection:
    """A redirect rule, ready to answer: ``location_for(head)`` is the Location value."""

    __slots__ = ("keep_path", "parts", "status")

    def __init__(self, redirect: Redirect) -> None:
        self.status = redirect.status
        self.keep_path = redirect.keep_path
        # The location split at each {host}: joined with the request's host per request.
        self.parts = tuple(part.encode() for part in redirect.location.split(HOST_PLACEHOLDER))

    def __repr__(self) -> str:
        return f"<Redirection {self.status} {HOST_PLACEHOLDER.encode().join(self.parts)!r}>"

    def location_for(self, head: RequestHead) -> bytes | None:
        """The Location for ``head``; None when it needs a host the request lacks or that is
        not a plain host name (it is refused with 400 rather than echoed)."""
        location = self.parts[0]
        if len(self.parts) > 1:
            host = normalise_host(head.host)
            if not _LOCATION_HOST.fullmatch(host):
                return None
            location = host.join(self.parts)
        if not self.keep_path:
            return location
        target = head.target  # llhttp admits no space or control character in it
        if target[:1] != b"/":  # OPTIONS *: no path to keep
            return location
        if location.endswith(b"/"):
            target = target[1:]
        return location + target
