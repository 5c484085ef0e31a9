"""Choosing what answers a request, from a listener's routes compiled once (config/routing.py
states the rules; this module applies them to raw heads). Pure: no I/O, no clock, no logging.

How it stays cheap per request (STYLE.md, "The hot path has a budget"):

1. At compile time every host a rule names gets its own ``Choice``: the rules that can apply to
   that host, in config order, cut at the first one with no other condition (which becomes the
   fallback). Wildcards get one ``Choice`` per suffix; other hosts share the hostless rules'.
2. Per request, the Host value *as sent* is looked up in ``learned`` (a dict: no call): a
   known spelling costs nothing more. An unknown one is normalised (lower-case, port and trailing
   dot cut), resolved exact-name first, then the longest wildcard suffix, and learned.
   ``learned`` is cleared when it reaches ``MAX_LEARNED_HOSTS``: a client inventing hosts costs
   itself a normalisation per request and cannot grow memory.
3. Then the ``Choice``'s conditional rules are tried in order, each condition one comparison:
   one ``startswith`` over a tuple of prefixes, a set membership for methods, one regex search
   of the raw head for a header. The first rule whose conditions all hold decides.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Generic, TypeVar

from zdlb.config.routing import HeaderMatch, RouteRule, host_matches
from zdlb.http.head import RequestHead

T = TypeVar("T")
# Distinct Host spellings remembered; a site has a handful, a scanner thousands.
MAX_LEARNED_HOSTS = 4096
# RFC 1035 section 2.3.4: a name is at most 255 bytes (config/routing.py refuses longer ones),
# so a Host longer than that is not walked label by label (32 KiB of dots would cost ~5 ms).
MAX_HOST_BYTES = 255

# One conditional rule: path prefixes, methods, header pattern (None: any), its outcome.
Conditions = tuple[tuple[bytes, ...] | None, frozenset[bytes] | None, re.Pattern[bytes] | None, T]


class Choice(Generic[T]):
    """What decides for the requests of one host: ``rules`` in order, then ``fallback``."""

    __slots__ = ("fallback", "rules")

    def __init__(self, rules: tuple[Conditions[T], ...], fallback: T) -> None:
        self.rules = rules
        self.fallback = fallback

    def __repr__(self) -> str:
        return f"<Choice {len(self.rules)} conditional rules, then {self.fallback!r}>"


def normalise_host(host: bytes) -> bytes:
    """``b"Example.COM.:8080 "`` -> ``b"example.com"`` (config/routing.py, rule 5)."""
    host = host.strip().lower()
    if host.startswith(b"["):  # an IPv6 literal: its colons are not a port
        end = host.find(b"]")
        return host[: end + 1] if end > 0 else host
    name, colon, port = host.rpartition(b":")
    if colon and (port.isdigit() or not port):  # RFC 3986 section 3.2.3: the port may be empty
        host = name
    return host.rstrip(b".") if host != b"." else host


def header_pattern(match: HeaderMatch) -> re.Pattern[bytes]:
    """A field named ``match.name`` (any case) with exactly ``match.value``, if given."""
    name = re.escape(match.name.encode())
    if match.value is None:
        return re.compile(rb"\r\n(?i:%s):" % name)
    return re.compile(rb"\r\n(?i:%s):[ \t]*%s[ \t]*\r\n" % (name, re.escape(match.value.encode())))


class Router(Generic[T]):
    """A listener's routes, compiled (rules 1-3 on top). ``pick`` returns the outcome given
    with the first matching rule, else ``unmatched``."""

    __slots__ = ("_anywhere", "_exact", "_wildcards", "learned")

    def __init__(self, rules: Sequence[tuple[RouteRule, T]], unmatched: T) -> None:
        # Per exact name, only the rules naming it plus those that may match any name are
        # looked at: compiling stays linear in the rules when most name one host each.
        by_name: dict[str, list[int]] = {}
        general = []  # rules without a host, or with a wildcard
        suffixes = set()
        for index, (rule, _) in enumerate(rules):
            for host in dict.fromkeys(rule.hosts):
                if host.startswith("*."):
                    suffixes.add(host[1:])
                else:
                    by_name.setdefault(host, []).append(index)
            if not rule.hosts or any(h.startswith("*.") for h in rule.hosts):
                general.append(index)

        def choice(host: str | None, named: Sequence[int] = ()) -> Choice[T]:
            return _choice([rules[i] for i in sorted({*named, *general})], host, unmatched)

        self._exact = {name.encode(): choice(name, named) for name, named in by_name.items()}
        # A host strictly under a suffix: "*" + suffix stands for every such name.
        self._wildcards = {s.encode(): choice("*" + s) for s in suffixes}
        self._anywhere: Choice[T] = choice(None)
        # Seeded with the names as configured: the spelling most clients send.
        self.learned: dict[bytes, Choice[T]] = dict(self._exact)

    def __repr__(self) -> str:
        return (
            f"<Router hosts={len(self._exact)} wildcards={len(self._wildcards)}"
            f" learned={len(self.learned)}>"
        )

    def pick(self, head: RequestHead) -> T:
        """The outcome for ``head``; 1 call, plus one per condition tried (rule 3)."""
        learned = self.learned
        host = head.host
        choice = learned[host] if host in learned else self._learn(host)
        for prefixes, methods, header, outcome in choice.rules:
            if prefixes is not None and not head.target.startswith(prefixes):
                continue
            if methods is not None and head.method not in methods:
                continue
            if header is not None and header.search(head.raw) is None:
                continue
            return outcome
        return choice.fallback

    def choice_for(self, host: bytes) -> Choice[T]:
        """Rule 2 without learning: what decides for a Host value."""
        name = normalise_host(host)
        choice = self._exact.get(name)
        if choice is not None:
            return choice
        if len(name) > MAX_HOST_BYTES:  # no configured name is this long: no suffix walk
            return self._anywhere
        dot = name.find(b".")
        while dot >= 0:  # longest suffix first: the most specific wildcard
            choice = self._wildcards.get(name[dot:])
            if choice is not None:
                return choice
            dot = name.find(b".", dot + 1)
        return self._anywhere

    def _learn(self, host: bytes) -> Choice[T]:
        choice = self.choice_for(host)
        learned = self.learned
        if len(learned) >= MAX_LEARNED_HOSTS:
            learned.clear()
            learned.update(self._exact)
        learned[host] = choice
        return choice


def _choice(rules: Sequence[tuple[RouteRule, T]], host: str | None, unmatched: T) -> Choice[T]:
    """Rule 1: the rules that may decide for ``host`` (None: a host no rule names)."""
    conditional: list[Conditions[T]] = []
    for rule, outcome in rules:
        if rule.hosts and (host is None or not any(host_matches(p, host) for p in rule.hosts)):
            continue
        if not (rule.paths or rule.methods or rule.header):
            return Choice(tuple(conditional), outcome)
        conditional.append(
            (
                tuple(p.encode() for p in rule.paths) or None,
                frozenset(m.encode() for m in rule.methods) or None,
                header_pattern(rule.header) if rule.header is not None else None,
                outcome,
            )
        )
    return Choice(tuple(conditional), unmatched)
