"""``[[listeners.NAME.routes]]`` and the header rules -> ``Routing``, and what ``zdlb check``
says about it. No I/O.

The rules, as a user reads them:

1. An HTTP listener's routes are tried in order; the first whose every condition holds decides.
   Conditions: ``host`` (exact names, or ``*.example.com`` for any name under example.com, not
   example.com itself), ``path`` (prefixes of the request target, as HAProxy's ``path_beg``),
   ``method`` and ``header`` (a field present, or with exactly that value). A list means "any
   of"; an absent condition holds for every request. A route with no condition matches all.
2. A route sends the request to a ``backend``, or answers a ``redirect`` itself (never both).
3. No route matched: the listener's ``backend`` if it has one, else ``unmatched_status`` (404).
4. Header rules (``request_headers``, ``response_headers``: ``set``, ``add``, ``remove``) of the
   listener apply to every request it sends to a backend, then the route's. Fields that frame
   the message or that zdlb itself writes (hop-by-hop, Content-Length, X-Forwarded-*) cannot be
   edited: a rule must never make the framing ambiguous.
5. Hosts are compared lower-cased, without a port and a trailing dot, on both sides.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus

from zdlb.config.table import Table

ROUTE_KEYS = (
    "host",
    "path",
    "method",
    "header",
    "backend",
    "redirect",
    "request_headers",
    "response_headers",
)
# The listener's own keys this module reads.
LISTENER_KEYS = ("routes", "unmatched_status", "request_headers", "response_headers")
_HEADER_MATCH_KEYS = ("name", "value")
_REDIRECT_KEYS = ("location", "status", "keep_path")
_HEADER_RULE_KEYS = ("set", "add", "remove")
# A listener's rules are compiled into per-host tables at load (http/routing.py), in time and
# memory proportional to hosts x rules: 1,000 is far past any hand-written config (HAProxy's
# own examples route a few dozen hosts) and keeps a pathological one loading in well under 1 s.
MAX_ROUTES = 1000
MAX_LIST_ITEMS = 100  # hosts, paths or methods of one route
MAX_HOST_CHARS = 255  # RFC 1035 section 2.3.4; http/routing.py relies on it
DEFAULT_UNMATCHED_STATUS = 404  # nginx's and HAProxy's answer when no server block/backend fits
DEFAULT_REDIRECT_STATUS = 302  # HAProxy's `redirect` default
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
HOST_PLACEHOLDER = "{host}"

_HOST_RE = re.compile(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]")
_PATH_RE = re.compile(r"/[\x21-\x7e]*")
_METHOD_RE = re.compile(r"[A-Z]{1,20}")
_FIELD_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_FIELD_VALUE_RE = re.compile(r"([\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?)?")
_LOCATION_RE = re.compile(r"(https?://|/)[\x21-\x7e]*")
# Never edited by a rule (rule 4): framing and hop-by-hop fields (RFC 9110 section 7.6.1).
_FRAMING_FIELDS = frozenset(
    {
        "connection",
        "content-length",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_ONLY_ZDLB = frozenset({"expect", "x-forwarded-for", "x-forwarded-proto"})


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """``header = { name = "X-Canary", value = "1" }``; no value: the field is present."""

    name: str  # lower-cased
    value: str | None = None


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """Field edits: ``remove`` every field of those names, ``set`` (replace or create) one,
    ``add`` one more, in that order. Names keep the spelling given."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.set or self.add or self.remove)

    def then(self, other: HeaderRules) -> HeaderRules:
        """These rules, then ``other``'s (a route's after its listener's)."""
        names = {name.lower() for name, _ in other.set}
        kept = tuple((name, value) for name, value in self.set if name.lower() not in names)
        return HeaderRules(kept + other.set, self.add + other.add, self.remove + other.remove)


@dataclass(frozen=True, slots=True)
class Redirect:
    """Answer ``status`` with ``Location: location``; ``{host}`` in it is the request's host
    (rule 5's form); ``keep_path`` appends the request target (path and query)."""

    location: str
    status: int = DEFAULT_REDIRECT_STATUS
    keep_path: bool = True


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One ``[[listeners.NAME.routes]]`` entry; empty condition tuples hold for every request."""

    hosts: tuple[str, ...] = ()  # lower-cased, no trailing dot; "*.example.com" wildcards
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    header: HeaderMatch | None = None
    backend: str | None = None  # exactly one of backend and redirect is set
    redirect: Redirect | None = None
    request_headers: HeaderRules = field(default_factory=HeaderRules)
    response_headers: HeaderRules = field(default_factory=HeaderRules)

    def describe(self) -> str:
        """``host=a,b path=/v1/ -> api``: one line for ``zdlb check``."""
        parts = [f"host={','.join(self.hosts)}"] if self.hosts else []
        if self.paths:
            parts.append(f"path={','.join(self.paths)}")
        if self.methods:
            parts.append(f"method={','.join(self.methods)}")
        if self.header is not None:
            value = "" if self.header.value is None else f"={self.header.value}"
            parts.append(f"header={self.header.name}{value}")
        if self.redirect is not None:
            where = self.redirect.location + (" (+path)" if self.redirect.keep_path else "")
            target = f"redirect {self.redirect.status} {where}"
        else:
            target = f"-> {self.backend}"
        return " ".join([*(parts or ["(every request)"]), target])


@dataclass(frozen=True, slots=True)
class Routing:
    """An HTTP listener's routes and header rules (rules 1-4 on top)."""

    rules: tuple[RouteRule, ...] = ()
    unmatched_status: int = DEFAULT_UNMATCHED_STATUS
    request_headers: HeaderRules = field(default_factory=HeaderRules)
    response_headers: HeaderRules = field(default_factory=HeaderRules)


def backends_of(default: str, routing: Routing) -> tuple[str, ...]:
    """Every backend a listener may send to, its default (``""``: none) first, no repeats."""
    names = [default] if default else []
    for rule in routing.rules:
        if rule.backend is not None and rule.backend not in names:
            names.append(rule.backend)
    return tuple(names)


def normalise_host(host: str) -> str:
    """Rule 5: ``Example.COM.:8080`` -> ``example.com``; an IPv6 literal keeps its brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    name, colon, port = host.rpartition(":")
    if colon and (port.isdigit() or not port):  # RFC 3986 section 3.2.3: the port may be empty
        host = name
    return host.rstrip(".") if host != "." else host


# --- reading -----------------------------------------------------------------------------------


def read_routing(table: Table, has_default: bool) -> Routing:
    """The listener ``table``'s routing keys. ``has_default``: it names a ``backend``."""
    rules = tuple(_read_rule(rule) for rule in table.array_of_tables("routes", ROUTE_KEYS))
    if len(rules) > MAX_ROUTES:
        table.fail("routes", f"{len(rules)} routes; at most {MAX_ROUTES} per listener")
        rules = ()
    status = table.integer("unmatched_status", DEFAULT_UNMATCHED_STATUS, 400, 599)
    if table.has("unmatched_status") and has_default:
        table.fail("unmatched_status", "never used: unmatched requests go to `backend`")
    if status not in HTTPStatus.__members__.values():
        table.fail("unmatched_status", f"{status} is not a known HTTP status")
        status = DEFAULT_UNMATCHED_STATUS
    return Routing(
        rules,
        status,
        read_header_rules(table, "request_headers", is_request=True),
        read_header_rules(table, "response_headers", is_request=False),
    )


def _read_rule(table: Table) -> RouteRule:
    hosts = tuple(normalise_host(h) for h in _strings(table, "host"))
    for host in hosts:
        if not _HOST_RE.fullmatch(host) or len(host) > MAX_HOST_CHARS:
            table.fail("host", f"{host!r} is not a host name, '*.name' or an IP literal")
    paths = _strings(table, "path")
    for path in paths:
        if not _PATH_RE.fullmatch(path):
            table.fail("path", f"{path!r} must start with '/' and hold no space or control")
    methods = _strings(table, "method")
    for method in methods:
        if not _METHOD_RE.fullmatch(method):
            table.fail("method", f"{method!r} must be an upper-case method such as 'GET'")
    header = _read_header_match(table) if table.has("header") else None
    backend = table.required_string("backend") if table.has("backend") else None
    redirect = _read_redirect(table) if table.has("redirect") else None
    if table.has("backend") == table.has("redirect"):
        table.fail("backend", "a route needs either `backend` or `redirect` (one of them)")
    return RouteRule(
        hosts,
        paths,
        methods,
        header,
        backend,
        redirect,
        read_header_rules(table, "request_headers", is_request=True),
        read_header_rules(table, "response_headers", is_request=False),
    )


def _strings(table: Table, key: str) -> tuple[str, ...]:
    """A string or a non-empty list of strings (rule 1: "any of")."""
    if not table.has(key):
        return ()
    value = table.data[key]
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) for item in items):
        table.fail(key, "expected a string or a non-empty list of strings")
        return ()
    if len(items) > MAX_LIST_ITEMS:
        table.fail(key, f"{len(items)} entries; at most {MAX_LIST_ITEMS}")
        return ()
    return tuple(str(item) for item in items)


def _read_header_match(table: Table) -> HeaderMatch | None:
    sub = table.table("header", _HEADER_MATCH_KEYS)
    name = sub.required_string("name")
    value = sub.data.get("value")
    if name is None:
        return None
    if not _FIELD_NAME_RE.fullmatch(name):
        sub.fail("name", f"{name!r} is not a header field name")
        return None
    if value is not None and (not isinstance(value, str) or not _FIELD_VALUE_RE.fullmatch(value)):
        sub.fail("value", f"expected a printable string without outer spaces, got {value!r}")
        return None
    return HeaderMatch(name.lower(), value)


def _read_redirect(table: Table) -> Redirect | None:
    sub = table.table("redirect", _REDIRECT_KEYS)
    location = sub.required_string("location")
    status = sub.integer("status", DEFAULT_REDIRECT_STATUS, 301, 308)
    if status not in REDIRECT_STATUSES:
        sub.fail("status", f"must be one of {', '.join(map(str, REDIRECT_STATUSES))}")
    keep_path = sub.boolean("keep_path", True)
    if location is None:
        return None
    rest = location.replace(HOST_PLACEHOLDER, "h")
    if not _LOCATION_RE.fullmatch(rest) or "{" in rest or "}" in rest:
        message = "expected 'https://host...', 'http://...' or '/path', with {host} at most"
        sub.fail("location", f"{message}, got {location!r}")
        return None
    return Redirect(location, status, keep_path)


def read_header_rules(parent: Table, key: str, *, is_request: bool) -> HeaderRules:
    """``parent.key = { set = {...}, add = {...}, remove = [...] }`` (rule 4)."""
    if not parent.has(key):
        return HeaderRules()
    table = parent.table(key, _HEADER_RULE_KEYS)
    sets = _read_fields(table, "set", is_request)
    adds = _read_fields(table, "add", is_request)
    removes = tuple(_strings(table, "remove"))
    for name in removes:
        _check_name(table, "remove", name, is_request, is_removal=True)
    return HeaderRules(sets, adds, removes)


def _read_fields(table: Table, key: str, is_request: bool) -> tuple[tuple[str, str], ...]:
    """``{ Name = "value", ... }``: any key is a field name, so each is checked here."""
    value = table.data.get(key, {})
    if not isinstance(value, Mapping):
        table.fail(key, "expected a table of field names and values")
        return ()
    sub = Table(value, table.at(key), table.issues, tuple(value))
    fields: list[tuple[str, str]] = []
    for name, text in value.items():
        if not isinstance(text, str) or not _FIELD_VALUE_RE.fullmatch(text):
            sub.fail(name, f"expected a printable string without outer spaces, got {text!r}")
            continue
        if _check_name(sub, name, name, is_request, is_removal=False, is_add=key == "add"):
            fields.append((name, text))
    return tuple(fields)


def _check_name(
    table: Table,
    key: str,
    name: str,
    is_request: bool,
    *,
    is_removal: bool,
    is_add: bool = False,
) -> bool:
    lname = name.lower()
    if not _FIELD_NAME_RE.fullmatch(name):
        table.fail(key, f"{name!r} is not a header field name")
        return False
    if lname in _FRAMING_FIELDS or (is_request and lname in _REQUEST_ONLY_ZDLB):
        table.fail(key, f"{name!r} frames the message or is written by zdlb: not editable")
        return False
    if is_request and lname == "host" and (is_removal or is_add):
        table.fail(key, "Host can only be `set` (a request has exactly one)")
        return False
    return True


# --- what `zdlb check` reports -----------------------------------------------------------------


def covers(first: RouteRule, later: RouteRule) -> bool:
    """Every request ``later`` matches, ``first`` matches too (so ``later`` never decides).
    Conservative: only one earlier rule is compared at a time."""
    return (
        _hosts_cover(first.hosts, later.hosts)
        and _paths_cover(first.paths, later.paths)
        and (
            not first.methods or (bool(later.methods) and set(later.methods) <= set(first.methods))
        )
        and (first.header is None or first.header == later.header or _value_free(first, later))
    )


def _paths_cover(first: tuple[str, ...], later: tuple[str, ...]) -> bool:
    if not first:
        return True
    return bool(later) and all(any(p.startswith(q) for q in first) for p in later)


def _value_free(first: RouteRule, later: RouteRule) -> bool:
    """``first`` only asks for the field ``later`` asks a value of."""
    return (
        first.header is not None
        and later.header is not None
        and first.header.value is None
        and first.header.name == later.header.name
    )


def _hosts_cover(first: tuple[str, ...], later: tuple[str, ...]) -> bool:
    if not first:
        return True
    if not later:
        return False
    return all(any(host_matches(pattern, host) for pattern in first) for host in later)


def host_matches(pattern: str, host: str) -> bool:
    """Rule 1 on normalised names; a wildcard ``host`` stands for the names under it."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return pattern == host


def shadowed(rules: Sequence[RouteRule]) -> Iterator[tuple[int, int]]:
    """``(later, first)`` for each rule that an earlier one covers, by index."""
    for index, rule in enumerate(rules):
        for earlier in range(index):
            if covers(rules[earlier], rule):
                yield index, earlier
                break


def catch_all(rules: Sequence[RouteRule]) -> int | None:
    """The index of the first rule without any condition: what follows it never decides."""
    for index, rule in enumerate(rules):
        if not (rule.hosts or rule.paths or rule.methods or rule.header):
            return index
    return None


def reached_backends(default: str, routing: Routing) -> set[str]:
    """The backends some request can reach: those of rules no earlier rule shadows, and the
    default unless a rule before it matches everything."""
    rules = routing.rules
    never = dict(shadowed(rules))
    names = {r.backend for i, r in enumerate(rules) if r.backend is not None and i not in never}
    if default and catch_all(rules) is None:
        names.add(default)
    return names
