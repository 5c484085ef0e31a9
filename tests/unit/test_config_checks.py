"""``[backends.NAME.check]`` and per-server ``check`` tables, through the real loader."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from zdlb.config.load import parse_config
from zdlb.config.model import Address, CheckConfig, CheckKind
from zdlb.errors import ConfigError


def config_with(check: dict[str, Any] | None, server_check: dict[str, Any] | None = None) -> Any:
    backend: dict[str, Any] = {
        "servers": [
            {"name": "a", "address": "127.0.0.1:8081"},
            {"name": "b", "address": "127.0.0.1:8082"},
        ]
    }
    if check is not None:
        backend["check"] = check
    if server_check is not None:
        backend["servers"][1]["check"] = server_check
    data = {
        "listeners": {"web": {"bind": "127.0.0.1:0", "backend": "app"}},
        "backends": {"app": backend},
    }
    return parse_config(data, "test.toml", Path("."))


def issues_of(check: dict[str, Any], server_check: dict[str, Any] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_with(check, server_check)
    return [str(issue) for issue in info.value.issues]


def test_no_check_table_means_unchecked_servers() -> None:
    servers = config_with(None).backends[0].servers
    assert [server.check for server in servers] == [None, None]


def test_backend_check_applies_to_every_server_and_a_server_overrides_keys() -> None:
    check = {
        "kind": "http",
        "path": "/health",
        "interval_s": 1,
        "rise": 1,
        "expect_status": [200, "300-301"],
        "expect_body": "ok",
        "observe": True,
    }
    first, second = config_with(check, {"port": 9000, "fall": 5}).backends[0].servers
    expected = CheckConfig(
        kind=CheckKind.HTTP,
        interval_s=1.0,
        rise=1,
        path="/health",
        expect_status=((200, 200), (300, 301)),
        expect_body="ok",
        observe=True,
    )
    assert first.check == expected
    assert second.check == dataclasses.replace(expected, port=9000, fall=5)


def test_server_alone_may_define_a_check() -> None:
    first, second = (
        config_with(None, {"kind": "tcp", "address": "10.0.0.1:8888"}).backends[0].servers
    )
    assert first.check is None
    assert second.check == CheckConfig(address=Address("10.0.0.1", 8888))


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        pytest.param(
            {"path": "/x"},
            ["backends.app.check.path: only used by kind = 'http' checks"],
            id="http-key-on-tcp-check",
        ),
        pytest.param(
            {"kind": "http", "method": "get"},
            ["backends.app.check.method: 'get' must match [A-Z]{1,16}"],
            id="lowercase-method",
        ),
        pytest.param(
            {"kind": "http", "path": "health"},
            ["backends.app.check.path: 'health' must match /[\\x21-\\x7e]*"],
            id="path-without-slash",
        ),
        pytest.param(
            {"kind": "http", "expect_status": ["2xx"]},
            [
                "backends.app.check.expect_status: "
                "'2xx' is neither a status (100-599) nor 'LOW-HIGH'"
            ],
            id="status-pattern",
        ),
        pytest.param(
            {"rise": 0},
            ["backends.app.check.rise: must be between 1 and 100, got 0"],
            id="rise-zero",
        ),
        pytest.param(
            {"address": "10.0.0.1:1", "port": 2},
            ["backends.app.check.port: give either address or port, not both"],
            id="address-and-port",
        ),
        pytest.param(
            {"kind": "icmp"},
            ["backends.app.check.kind: expected one of 'tcp', 'http', got 'icmp'"],
            id="kind-enum",
        ),
        pytest.param(
            {"intervall_s": 1},
            ["backends.app.check.intervall_s: unknown key (did you mean 'interval_s'?)"],
            id="unknown-key",
        ),
    ],
)
def test_bad_check_keys_are_reported_with_their_path(
    check: dict[str, Any], expected: list[str]
) -> None:
    assert issues_of(check) == expected


def test_server_check_errors_name_the_server() -> None:
    assert issues_of({}, {"timeout_s": 0}) == [
        "backends.app.servers[1].check.timeout_s: must be a finite number of seconds > 0, got 0"
    ]
