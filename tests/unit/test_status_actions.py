"""Who may run a status-page action (CSRF and DNS-rebinding rules) and what a body may ask."""

from __future__ import annotations

import pytest

from zdlb.metrics.actions import (
    Action,
    ActionKind,
    ActionRefused,
    check_request,
    parse_action,
)

GOOD = [
    (b"host", b"127.0.0.1:9100"),
    (b"x-zdlb-action", b"1"),
    (b"content-type", b"application/json"),
    (b"origin", b"http://127.0.0.1:9100"),
]


def _without(name: bytes) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in GOOD if n != name]


def _with(name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    return [*_without(name), (name, value)]


def test_a_same_origin_request_passes() -> None:
    check_request(b"POST", GOOD)
    check_request(b"POST", _without(b"origin"))  # curl sends no Origin


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        (b"GET", GOOD, 405),
        (b"POST", _without(b"x-zdlb-action"), 403),
        (b"POST", _with(b"x-zdlb-action", b"0"), 403),
        (b"POST", _with(b"origin", b"http://evil.example"), 403),
        (b"POST", _with(b"origin", b"null"), 403),
        (b"POST", _with(b"host", b"evil.example:9100"), 403),
        (b"POST", _with(b"host", b"localhost:9100"), 403),
        (b"POST", _with(b"host", b"10.0.0.1:9100"), 403),
        (b"POST", _without(b"host"), 403),
        (b"POST", [*GOOD, (b"host", b"127.0.0.1:9100")], 400),
        (b"POST", _with(b"content-type", b"text/plain"), 415),
        (b"POST", _without(b"content-type"), 415),
    ],
    ids=[
        "get",
        "no-header",
        "header-not-1",
        "cross-origin",
        "null-origin",
        "rebinding-host",
        "name-host",
        "remote-host",
        "no-host",
        "two-hosts",
        "form-type",
        "no-type",
    ],
)
def test_refused(method: bytes, headers: list[tuple[bytes, bytes]], status: int) -> None:
    with pytest.raises(ActionRefused) as refused:
        check_request(method, headers)
    assert refused.value.status == status


def test_ipv6_host_and_its_origin() -> None:
    headers = [*_without(b"host"), (b"host", b"[::1]:9100")]
    with pytest.raises(ActionRefused):
        check_request(b"POST", headers)  # Origin still names 127.0.0.1
    check_request(b"POST", [*_without(b"origin"), (b"origin", b"http://127.0.0.1:9100")])
    same = [(n, v) for n, v in headers if n != b"origin"] + [(b"origin", b"http://[::1]:9100")]
    check_request(b"POST", same)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"action": "flip", "server": "app/front-1"}', Action(ActionKind.FLIP, "app", "front-1")),
        (b'{"server": "a/b", "action": "drain"}', Action(ActionKind.DRAIN, "a", "b")),
        (b'{"action": "ready", "server": "a/b"}', Action(ActionKind.READY, "a", "b")),
    ],
    ids=["flip", "drain", "ready"],
)
def test_parse_action(body: bytes, expected: Action) -> None:
    assert parse_action(body) == expected


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"", 400),
        (b"not json", 400),
        (b"\xff\xfe", 400),
        (b"[]", 400),
        (b'{"action": "flip"}', 400),
        (b'{"action": "flip", "server": "a/b", "force": true}', 400),
        (b'{"action": "maint", "server": "a/b"}', 400),
        (b'{"action": 1, "server": "a/b"}', 400),
        (b'{"action": "flip", "server": "ab"}', 400),
        (b'{"action": "flip", "server": "a/b/c"}', 400),
        (b'{"action": "flip", "server": "/b"}', 400),
        (b'{"action": "flip", "server": 5}', 400),
        (b'{"action": "flip", "server": "' + b"a" * 2000 + b'/b"}', 413),
    ],
    ids=[
        "empty",
        "text",
        "binary",
        "list",
        "no-server",
        "extra-key",
        "unknown-action",
        "action-not-str",
        "no-slash",
        "two-slashes",
        "empty-backend",
        "server-not-str",
        "too-long",
    ],
)
def test_parse_refuses(body: bytes, status: int) -> None:
    with pytest.raises(ActionRefused) as refused:
        parse_action(body)
    assert refused.value.status == status
