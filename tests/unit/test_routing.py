"""Routes and header rules: config/routing.py (reading, what `zdlb check` reports),
http/routing.py (the compiled router) and http/headrules.py (edits, redirects), on real heads
parsed by head.py. Pure: no sockets."""

from __future__ import annotations

import copy
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zdlb.config.load import parse_config
from zdlb.config.model import Config, Limits
from zdlb.config.routing import (
    MAX_ROUTES,
    HeaderMatch,
    HeaderRules,
    Redirect,
    RouteRule,
    Routing,
    backends_of,
    host_matches,
    normalise_host,
    shadowed,
)
from zdlb.config.summary import describe
from zdlb.errors import ConfigError
from zdlb.http.head import (
    RequestHead,
    RequestHeadParser,
    new_response_parser,
    parse_response_head,
)
from zdlb.http.headrules import HeadEdit, Redirection, edit_for
from zdlb.http.routing import MAX_LEARNED_HOSTS, Router

BASE: dict[str, Any] = {
    "listeners": {"web": {"bind": "127.0.0.1:8000", "backend": "app"}},
    "backends": {
        name: {"servers": [{"name": "a", "address": "10.0.0.1:8080"}]}
        for name in ("app", "api", "static")
    },
}


def config(routes: list[dict[str, Any]], **listener: Any) -> Config:
    data = copy.deepcopy(BASE)
    data["listeners"]["web"].update(listener, routes=routes)
    return parse_config(data, "test.toml", Path("/etc/zdlb"))


def issues(routes: list[dict[str, Any]], **listener: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(routes, **listener)
    return [str(issue) for issue in info.value.issues]


def request(
    host: bytes | None = b"example.com",
    target: bytes = b"/",
    method: bytes = b"GET",
    extra: bytes = b"",
    minor: int = 1,
) -> RequestHead:
    raw = b"%s %s HTTP/1.%d\r\n" % (method, target, minor)
    if host is not None:
        raw += b"Host: %s\r\n" % host
    raw += extra + b"\r\n"
    return RequestHeadParser(Limits()).parse(raw, len(raw))


# --- reading ---------------------------------------------------------------------------------


def test_routes_read_into_the_model() -> None:
    routing = (
        config(
            [
                {"host": "API.Example.com.", "path": "/v1/", "backend": "api"},
                {"host": ["*.static.example.com", "cdn.example.com:8080"], "backend": "static"},
                {
                    "method": ["POST", "PUT"],
                    "header": {"name": "X-Canary", "value": "1"},
                    "backend": "api",
                },
                {
                    "host": "example.com",
                    "redirect": {"location": "https://www.example.com", "status": 301},
                },
            ],
            request_headers={"set": {"X-Route": "web"}, "remove": ["X-Debug"]},
        )
        .listeners[0]
        .routing
    )
    assert routing.rules[0] == RouteRule(hosts=("api.example.com",), paths=("/v1/",), backend="api")
    assert routing.rules[1].hosts == ("*.static.example.com", "cdn.example.com")
    assert routing.rules[2].methods == ("POST", "PUT")
    assert routing.rules[2].header is not None and routing.rules[2].header.name == "x-canary"
    assert routing.rules[3].redirect == Redirect("https://www.example.com", 301, True)
    assert routing.request_headers == HeaderRules(set=(("X-Route", "web"),), remove=("X-Debug",))


def test_the_one_backend_form_is_unchanged() -> None:
    listener = parse_config(copy.deepcopy(BASE), "t", Path("/")).listeners[0]
    assert listener.routing == Routing()
    assert backends_of(listener.backend, listener.routing) == ("app",)


def test_a_routed_listener_needs_no_default_backend() -> None:
    data = copy.deepcopy(BASE)
    del data["listeners"]["web"]["backend"]
    data["listeners"]["web"]["routes"] = [{"path": "/v1/", "backend": "api"}]
    listener = parse_config(data, "t", Path("/")).listeners[0]
    assert listener.backend == ""
    assert backends_of(listener.backend, listener.routing) == ("api",)


W = "listeners.web"


@pytest.mark.parametrize(
    ("routes", "listener", "expected"),
    [
        pytest.param(
            [{"path": "/x"}],
            {},
            [f"{W}.routes[0].backend: a route needs either `backend` or `redirect` (one of them)"],
            id="neither-backend-nor-redirect",
        ),
        pytest.param(
            [{"backend": "api", "redirect": {"location": "/"}}],
            {},
            [f"{W}.routes[0].backend: a route needs either `backend` or `redirect` (one of them)"],
            id="both",
        ),
        pytest.param(
            [{"backend": "nope"}],
            {},
            [f"{W}.routes[0].backend: no backend named 'nope' (backends: 'app', 'api', 'static')"],
            id="unknown-backend",
        ),
        pytest.param(
            [{"host": "a b", "backend": "api"}],
            {},
            [f"{W}.routes[0].host: 'a b' is not a host name, '*.name' or an IP literal"],
            id="bad-host",
        ),
        pytest.param(
            [{"host": "a.*.com", "backend": "api"}],
            {},
            [f"{W}.routes[0].host: 'a.*.com' is not a host name, '*.name' or an IP literal"],
            id="wildcard-not-first",
        ),
        pytest.param(
            [{"host": [], "backend": "api"}],
            {},
            [f"{W}.routes[0].host: expected a string or a non-empty list of strings"],
            id="empty-host-list",
        ),
        pytest.param(
            [{"path": "v1", "backend": "api"}],
            {},
            [f"{W}.routes[0].path: 'v1' must start with '/' and hold no space or control"],
            id="relative-path",
        ),
        pytest.param(
            [{"method": "get", "backend": "api"}],
            {},
            [f"{W}.routes[0].method: 'get' must be an upper-case method such as 'GET'"],
            id="lower-case-method",
        ),
        pytest.param(
            [{"header": {"value": "1"}, "backend": "api"}],
            {},
            [f"{W}.routes[0].header.name: required key is missing"],
            id="header-without-name",
        ),
        pytest.param(
            [{"redirect": {"location": "https://{hots}/"}}],
            {},
            [
                f"{W}.routes[0].redirect.location: expected 'https://host...', 'http://...' or "
                "'/path', with {host} at most, got 'https://{hots}/'"
            ],
            id="redirect-bad-placeholder",
        ),
        pytest.param(
            [{"redirect": {"location": "/", "status": 304}}],
            {},
            [f"{W}.routes[0].redirect.status: must be one of 301, 302, 303, 307, 308"],
            id="redirect-not-a-redirect-status",
        ),
        pytest.param(
            [{"backend": "api", "colour": "red"}],
            {},
            [
                f"{W}.routes[0].colour: unknown key (expected one of: host, path, method, header, "
                "backend, redirect, request_headers, response_headers)"
            ],
            id="unknown-key",
        ),
        pytest.param(
            [{"backend": "api"}],
            {"unmatched_status": 404},
            [f"{W}.unmatched_status: never used: unmatched requests go to `backend`"],
            id="unmatched-status-with-default",
        ),
        pytest.param(
            [],
            {"request_headers": {"set": {"Content-Length": "0"}}},
            [
                f"{W}.request_headers.set.Content-Length: 'Content-Length' frames the message or "
                "is written by zdlb: not editable"
            ],
            id="edit-framing-field",
        ),
        pytest.param(
            [],
            {"request_headers": {"remove": ["X-Forwarded-For"]}},
            [
                f"{W}.request_headers.remove: 'X-Forwarded-For' frames the message or is written "
                "by zdlb: not editable"
            ],
            id="edit-zdlb-field",
        ),
        pytest.param(
            [],
            {"request_headers": {"add": {"Host": "x"}}},
            [f"{W}.request_headers.add.Host: Host can only be `set` (a request has exactly one)"],
            id="add-host",
        ),
        pytest.param(
            [],
            {"response_headers": {"set": {"X-A": "a\nb"}}},
            [
                f"{W}.response_headers.set.X-A: expected a printable string without outer spaces, "
                "got 'a\\nb'"
            ],
            id="value-with-newline",
        ),
        pytest.param(
            [],
            {"response_headers": {"set": {"X A": "1"}}},
            [f"{W}.response_headers.set.\"X A\": 'X A' is not a header field name"],
            id="bad-field-name",
        ),
        pytest.param(
            [],
            {"response_headers": {"rename": {}}},
            [f"{W}.response_headers.rename: unknown key (did you mean 'remove'?)"],
            id="unknown-rule-kind",
        ),
    ],
)
def test_bad_routes_are_refused_with_key_paths(
    routes: list[dict[str, Any]], listener: dict[str, Any], expected: list[str]
) -> None:
    assert issues(routes, **listener) == expected


def test_a_tcp_listener_has_no_routes() -> None:
    data = copy.deepcopy(BASE)
    data["listeners"]["web"].update(mode="tcp", routes=[{"backend": "api"}])
    with pytest.raises(ConfigError) as info:
        parse_config(data, "t", Path("/"))
    assert [str(i) for i in info.value.issues] == [
        "listeners.web.routes: not used by mode = 'tcp' listeners"
    ]


def test_absurdly_many_routes_are_refused_and_the_limit_loads_fast() -> None:
    many = [{"host": f"h{i}.example.com", "backend": "api"} for i in range(MAX_ROUTES + 1)]
    assert issues(many) == [
        f"{W}.routes: {MAX_ROUTES + 1} routes; at most {MAX_ROUTES} per listener"
    ]
    started = time.perf_counter()
    routing = config(many[:MAX_ROUTES]).listeners[0].routing
    router = Router([(rule, i) for i, rule in enumerate(routing.rules)], -1)
    assert time.perf_counter() - started < 2.0
    assert router.pick(request(b"h999.example.com")) == 999
    assert router.pick(request(b"elsewhere")) == -1


# --- hosts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("example.com:8080", "example.com"),
        ("EXAMPLE.com.:443", "example.com"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("example.com:", "example.com"),  # an empty port is no port
        ("", ""),
    ],
)
def test_hosts_are_normalised(given: str, normalised: str) -> None:
    assert normalise_host(given) == normalised


RULES = [
    RouteRule(hosts=("api.example.com",), paths=("/v1/",), backend="api"),
    RouteRule(hosts=("*.static.example.com",), backend="static"),
    RouteRule(hosts=("*.example.com",), methods=("POST",), backend="writes"),
    RouteRule(paths=("/admin/", "/ops/"), backend="admin"),
    RouteRule(hosts=("canary.example.com",), backend="canary"),
]
ROUTER = Router([(rule, rule.backend) for rule in RULES], "default")


@pytest.mark.parametrize(
    ("host", "target", "method", "expected"),
    [
        (b"api.example.com", b"/v1/users?id=1", b"GET", "api"),
        (b"API.Example.COM:8443", b"/v1/", b"GET", "api"),  # case, port
        (b"api.example.com.", b"/v1/", b"GET", "api"),  # trailing dot
        (b"api.example.com", b"/v2/", b"GET", "default"),  # the path does not match
        (b"api.example.com", b"/v2/", b"POST", "writes"),  # *.example.com covers api.
        (b"img.static.example.com", b"/a.png", b"GET", "static"),
        (b"a.b.static.example.com", b"/", b"GET", "static"),  # any depth under the suffix
        (b"static.example.com", b"/", b"GET", "default"),  # the suffix itself is not under it
        (b"www.example.com", b"/", b"POST", "writes"),
        (b"example.com", b"/", b"POST", "default"),
        (b"elsewhere.org", b"/admin/x", b"GET", "admin"),
        (b"elsewhere.org", b"/ops/", b"GET", "admin"),
        (b"api.example.com", b"/admin/", b"GET", "admin"),  # hostless rules apply to all
        (b"canary.example.com", b"/", b"GET", "canary"),
        (None, b"/admin/", b"GET", "admin"),  # HTTP/1.0 without Host: hostless rules only
        (None, b"/", b"GET", "default"),
    ],
)
def test_the_first_matching_rule_decides(
    host: bytes | None, target: bytes, method: bytes, expected: str
) -> None:
    head = request(host, target, method, minor=0 if host is None else 1)
    assert ROUTER.pick(head) == expected
    assert ROUTER.pick(head) == expected  # learned: the same answer


def test_header_conditions_match_name_in_any_case_and_the_exact_value() -> None:
    rules = [
        RouteRule(
            header=config([{"header": {"name": "X-Canary", "value": "on"}, "backend": "api"}])
            .listeners[0]
            .routing.rules[0]
            .header,
            backend="api",
        ),
        RouteRule(
            header=config([{"header": {"name": "X-Beta"}, "backend": "api"}])
            .listeners[0]
            .routing.rules[0]
            .header,
            backend="static",
        ),
    ]
    router = Router([(rule, rule.backend) for rule in rules], "app")
    assert router.pick(request(extra=b"x-canary: on\r\n")) == "api"
    assert router.pick(request(extra=b"X-CANARY:on  \r\n")) == "api"
    assert router.pick(request(extra=b"X-Canary: off\r\n")) == "app"
    assert router.pick(request(extra=b"X-Canary: on-and-on\r\n")) == "app"
    assert router.pick(request(extra=b"X-Beta: anything\r\n")) == "static"
    assert router.pick(request(extra=b"X-Betamax: 1\r\n")) == "app"


def test_a_huge_host_is_not_walked_label_by_label() -> None:
    host = b"a." * 8000 + b"static.example.com"
    started = time.perf_counter()
    for _ in range(20):
        assert ROUTER.choice_for(host) is ROUTER.choice_for(b"unknown.test")
    assert time.perf_counter() - started < 0.05


def test_learned_hosts_stay_bounded() -> None:
    router = Router([(RULES[0], "api")], "app")
    for i in range(MAX_LEARNED_HOSTS * 2 + 5):
        assert router.pick(request(b"h%d.example.org" % i)) == "app"
        assert len(router.learned) <= MAX_LEARNED_HOSTS
    assert router.pick(request(b"api.example.com", b"/v1/")) == "api"


def test_a_rule_list_stops_at_the_first_unconditional_rule() -> None:
    rules = [RouteRule(hosts=("a.example",), backend="x"), RouteRule(paths=("/",), backend="y")]
    router = Router([(rule, rule.backend) for rule in rules], "z")
    assert router.choice_for(b"a.example").rules == ()  # decided without a comparison
    assert router.choice_for(b"a.example").fallback == "x"
    assert len(router.choice_for(b"b.example").rules) == 1


# A differential test: the compiled router against rule 1 read literally (every rule in order,
# every condition checked), over small alphabets so that hosts, wildcards and prefixes collide.
_LABELS = st.sampled_from(["a", "b", "c"])
_NAMES = st.lists(_LABELS, min_size=1, max_size=3).map(".".join)
_PATTERNS = st.one_of(_NAMES, _NAMES.map(lambda name: "*." + name))
_PATHS = st.sampled_from(["/", "/a", "/a/", "/ab", "/b"])
_METHODS = st.sampled_from(["GET", "POST"])
_HEADERS = st.sampled_from([None, HeaderMatch("x-k"), HeaderMatch("x-k", "1")])
_RULES = st.builds(
    RouteRule,
    hosts=st.lists(_PATTERNS, max_size=2).map(tuple),
    paths=st.lists(_PATHS, max_size=2).map(tuple),
    methods=st.lists(_METHODS, max_size=1).map(tuple),
    header=_HEADERS,
)
_SPELLINGS = st.tuples(_NAMES, st.sampled_from(["", ".", ":80", ".:8080"]), st.booleans())


def _literal(rules: list[RouteRule], host: str, path: str, method: str, field: str) -> int:
    for index, rule in enumerate(rules):
        header = rule.header
        if (
            (not rule.hosts or any(host_matches(p, host) for p in rule.hosts))
            and (not rule.paths or any(path.startswith(p) for p in rule.paths))
            and (not rule.methods or method in rule.methods)
            and (header is None or field in ("x-k: 1", "x-k: 2")[: 1 if header.value else 2])
        ):
            return index
    return -1


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_RULES, max_size=6),
    _SPELLINGS,
    _PATHS.map(lambda path: path + "x"),
    _METHODS,
    st.sampled_from(["", "x-k: 1", "x-k: 2"]),
)
def test_the_compiled_router_agrees_with_the_rules_read_literally(
    rules: list[RouteRule],
    spelling: tuple[str, str, bool],
    path: str,
    method: str,
    field: str,
) -> None:
    name, suffix, upper = spelling
    sent = (name.upper() if upper else name) + suffix
    router = Router([(rule, index) for index, rule in enumerate(rules)], -1)
    extra = f"{field}\r\n".encode() if field else b""
    head = request(sent.encode(), path.encode(), method.encode(), extra)
    expected = _literal(rules, name, path, method, field)
    assert router.pick(head) == expected
    assert router.pick(head) == expected  # learned


# --- what zdlb check says --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "later", "is_shadowed"),
    [
        (RouteRule(backend="a"), RouteRule(hosts=("x.com",), backend="b"), True),
        (
            RouteRule(hosts=("*.x.com",), backend="a"),
            RouteRule(hosts=("a.x.com",), backend="b"),
            True,
        ),
        (
            RouteRule(hosts=("*.x.com",), backend="a"),
            RouteRule(hosts=("x.com",), backend="b"),
            False,
        ),
        (
            RouteRule(hosts=("*.x.com",), backend="a"),
            RouteRule(hosts=("*.a.x.com",), backend="b"),
            True,
        ),
        (RouteRule(paths=("/v1",), backend="a"), RouteRule(paths=("/v1/x",), backend="b"), True),
        (RouteRule(paths=("/v1/x",), backend="a"), RouteRule(paths=("/v1",), backend="b"), False),
        (RouteRule(paths=("/v1",), backend="a"), RouteRule(backend="b"), False),
        (
            RouteRule(methods=("GET", "HEAD"), backend="a"),
            RouteRule(methods=("GET",), backend="b"),
            True,
        ),
        (RouteRule(methods=("GET",), backend="a"), RouteRule(backend="b"), False),
        (
            RouteRule(hosts=("x.com",), backend="a"),
            RouteRule(hosts=("x.com",), paths=("/p",), backend="b"),
            True,
        ),
    ],
)
def test_shadowed_rules(first: RouteRule, later: RouteRule, is_shadowed: bool) -> None:
    assert list(shadowed([first, later])) == ([(1, 0)] if is_shadowed else [])


def test_check_reports_shadowed_rules_and_unreached_backends() -> None:
    data = copy.deepcopy(BASE)
    data["listeners"]["web"]["routes"] = [
        {"host": "*.example.com", "backend": "api"},
        {"host": "www.example.com", "path": "/v1/", "backend": "static"},
        {"backend": "api"},
    ]
    data["backends"]["unused"] = copy.deepcopy(data["backends"]["app"])
    text = describe(parse_config(data, "t.toml", Path("/")))
    assert "routes[1] host=www.example.com path=/v1/ -> static: never matches, routes[0]" in text
    assert "routes[2] (every request) -> api" in text
    assert "default backend app: never used, routes[2] matches every request" in text
    assert "unused balance=roundrobin retries=2 reuse=safe (no listener uses it)" in text
    assert "static balance=roundrobin retries=2 reuse=safe (no route reaches it" in text
    assert "app balance=roundrobin retries=2 reuse=safe (no route reaches it" in text
    assert "api balance=roundrobin retries=2 reuse=safe\n" in text


# --- header rules and redirects --------------------------------------------------------------


def test_request_edits_remove_set_and_add_on_the_raw_head() -> None:
    edit = HeadEdit(
        HeaderRules(
            set=(("X-Route", "web"), ("Host", "backend.internal")),
            add=(("X-Tag", "1"),),
            remove=("x-debug",),
        )
    )
    head = request(b"example.com", extra=b"X-Debug: 1\r\nx-route: client\r\nX-DEBUG: 2\r\nA: b\r\n")
    edit.apply_request(head)
    assert head.raw == (
        b"GET / HTTP/1.1\r\nA: b\r\nX-Route: web\r\nHost: backend.internal\r\nX-Tag: 1\r\n\r\n"
    )
    assert head.headers == [
        (b"A", b"b"),
        (b"X-Route", b"web"),
        (b"Host", b"backend.internal"),
        (b"X-Tag", b"1"),
    ]


def test_setting_host_on_an_http10_request_without_one_makes_it_the_host() -> None:
    head = request(None, minor=0)
    assert not head.has_host
    HeadEdit(HeaderRules(set=(("Host", "app.internal"),))).apply_request(head)
    assert head.has_host


def test_response_edits_drop_fields_and_return_the_lines_to_add() -> None:
    raw = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\nX-Powered-By: php\r\n\r\n"
    head = parse_response_head(raw, len(raw), new_response_parser(), False)
    edit = HeadEdit(
        HeaderRules(set=(("X-Frame-Options", "DENY"),), remove=("Server", "X-Powered-By"))
    )
    added = edit.apply_response(head, b"Set-Cookie: SRV=a\r\n")
    assert head.raw == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    assert added == b"Set-Cookie: SRV=a\r\nX-Frame-Options: DENY\r\n"


def test_route_rules_follow_listener_rules() -> None:
    listener = HeaderRules(set=(("X-A", "listener"), ("X-B", "listener")), remove=("X-C",))
    route = HeaderRules(set=(("x-a", "route"),), add=(("X-D", "1"),))
    edit = edit_for(listener, route)
    assert edit is not None
    assert edit.lines == b"X-B: listener\r\nx-a: route\r\nX-D: 1\r\n"
    assert edit_for(HeaderRules(), HeaderRules()) is None  # no rule: nothing runs


@pytest.mark.parametrize(
    ("location", "keep_path", "host", "target", "expected"),
    [
        ("https://{host}", True, b"Example.com:80", b"/a?b=1", b"https://example.com/a?b=1"),
        ("https://{host}/", True, b"example.com", b"/a", b"https://example.com/a"),
        ("https://www.example.com", True, b"example.com", b"/x", b"https://www.example.com/x"),
        (
            "https://www.example.com/moved",
            False,
            b"example.com",
            b"/x",
            b"https://www.example.com/moved",
        ),
        ("/new", False, b"example.com", b"/old", b"/new"),
        ("https://{host}", True, b"[::1]:8443", b"/", b"https://[::1]/"),
        ("https://{host}", True, None, b"/", None),  # no Host to redirect to: 400
        ("https://{host}", True, b'evil.com"<x>', b"/", None),  # not echoed
    ],
)
def test_redirect_locations(
    location: str, keep_path: bool, host: bytes | None, target: bytes, expected: bytes | None
) -> None:
    redirection = Redirection(Redirect(location, 301, keep_path))
    head = request(host, target, minor=0 if host is None else 1)
    assert redirection.location_for(head) == expected


def test_the_readme_routing_example_is_valid() -> None:
    """README.md's TOML block under *Routing and header rules*, with its backends defined."""
    text = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    start = text.index("### Routing and header rules")
    block = text[
        text.index("```toml\n", start) + 8 : text.index("```", text.index("```toml\n", start) + 8)
    ]
    data = tomllib.loads(block)
    data["backends"] = {
        name: {"servers": [{"name": "a", "address": "10.0.0.1:8080"}]}
        for name in ("app", "api", "static", "canary")
    }
    listener = parse_config(data, "README.md", Path("/")).listeners[0]
    assert len(listener.routing.rules) == 4
    router = Router([(rule, rule.backend or "redirect") for rule in listener.routing.rules], "app")
    assert router.pick(request(b"www.example.com", b"/x")) == "redirect"
    assert router.pick(request(b"api.example.com", b"/v2/a")) == "api"
    assert router.pick(request(b"img.static.example.com")) == "static"
    assert router.pick(request(b"x.test", method=b"PUT", extra=b"X-Canary: 1\r\n")) == "canary"
    assert router.pick(request(b"x.test", method=b"PUT")) == "app"


def test_the_commented_routing_example_in_config_toml_is_valid() -> None:
    """config.toml's commented routes, uncommented, load (with an `api` backend added)."""
    text = (Path(__file__).parents[2] / "config.toml").read_text(encoding="utf-8")
    start, end = text.index("# unmatched_status"), text.index("# [listeners.web.tls]")
    lines = text[start:end].splitlines()
    example = "\n".join(line.removeprefix("# ") for line in lines[1:] if line.startswith("# "))
    data = tomllib.loads('[listeners.web]\nbind = "127.0.0.1:0"\nbackend = "app"\n' + example)
    data["backends"] = {
        name: {"servers": [{"name": "a", "address": "10.0.0.1:8080"}]} for name in ("app", "api")
    }
    routing = parse_config(data, "config.toml", Path("/")).listeners[0].routing
    assert [rule.backend for rule in routing.rules] == [None, "api"]
    assert routing.rules[0].redirect == Redirect("https://www.example.com", 301, True)
    assert routing.response_headers.remove == ("Server",)
