"""``[backends.X.sticky]`` and ``pair``: defaults, every key, and errors with their key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from zdlb.config.load import parse_config
from zdlb.config.model import Config, SameSite, StickyConfig
from zdlb.errors import ConfigError


def config_with(
    sticky: dict[str, Any] | None = None, backup: dict[str, Any] | None = None
) -> Config:
    servers: list[dict[str, Any]] = [
        {"name": "a", "address": "127.0.0.1:8081"},
        {"name": "b", "address": "127.0.0.1:8082"},
    ]
    if backup is not None:
        servers.append({"name": "a-backup", "address": "127.0.0.1:8091", **backup})
    backend: dict[str, Any] = {"servers": servers}
    if sticky is not None:
        backend["sticky"] = sticky
    data = {
        "listeners": {"web": {"bind": "127.0.0.1:0", "backend": "app"}},
        "backends": {"app": backend},
    }
    return parse_config(data, "test.toml", Path("."))


def issues_of(
    sticky: dict[str, Any] | None = None, backup: dict[str, Any] | None = None
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_with(sticky, backup)
    return [str(issue) for issue in info.value.issues]


def test_no_sticky_table_means_no_cookie() -> None:
    assert config_with().backends[0].sticky is None


def test_sticky_defaults() -> None:
    assert config_with({"cookie": "SERVERID"}).backends[0].sticky == StickyConfig("SERVERID")


def test_every_sticky_key() -> None:
    sticky = {
        "cookie": "sid",
        "secret": "x" * 16,
        "path": "/app",
        "domain": ".example.com",
        "secure": True,
        "httponly": False,
        "samesite": "none",
        "max_age": 60,
        "nocache": True,
        "drain_sticky_s": 30,
    }
    assert config_with(sticky).backends[0].sticky == StickyConfig(
        "sid", "x" * 16, "/app", ".example.com", True, False, SameSite.NONE, 60, True, 30.0
    )


BAD = [
    ({}, "backends.app.sticky.cookie: required key is missing"),
    ({"cookie": "a b"}, "backends.app.sticky.cookie: 'a b' is not a cookie name"),
    ({"cookie": "a;b"}, "backends.app.sticky.cookie: 'a;b' is not a cookie name"),
    ({"cookie": "s", "secret": "short"}, "backends.app.sticky.secret: must be at least 16"),
    ({"cookie": "s", "path": "app"}, "backends.app.sticky.path: expected a path"),
    ({"cookie": "s", "path": "/a;Secure"}, "backends.app.sticky.path: expected a path"),
    ({"cookie": "s", "domain": "a b"}, "backends.app.sticky.domain: expected a domain"),
    ({"cookie": "s", "samesite": "none"}, "backends.app.sticky.samesite: 'none' needs secure"),
    ({"cookie": "s", "samesite": "loose"}, "backends.app.sticky.samesite: expected one of"),
    ({"cookie": "s", "max_age": -1}, "backends.app.sticky.max_age: must be between 0"),
    ({"cookie": "s", "drain_sticky_s": 0}, "backends.app.sticky.drain_sticky_s: must be a"),
    ({"cookie": "s", "expires": 1}, "backends.app.sticky.expires: unknown key"),
]


@pytest.mark.parametrize(("sticky", "expected"), BAD)
def test_bad_sticky_keys_name_their_path(sticky: dict[str, Any], expected: str) -> None:
    issues = issues_of(sticky)
    assert len(issues) == 1 and issues[0].startswith(expected), issues


def test_a_backup_pairs_with_a_main() -> None:
    servers = config_with(backup={"pool": "backup", "pair": "a"}).backends[0].servers
    assert [s.pair for s in servers] == [None, None, "a"]


BAD_PAIRS = [
    ({"pair": "a"}, "only a backup server names a pair"),
    ({"pool": "backup", "pair": "nobody"}, "no server named 'nobody' in this backend"),
    ({"pool": "backup", "pair": "a-backup"}, "'a-backup' is a backup"),
    ({"pool": "backup", "pair": 1}, "expected a string, got 1"),
    ({"pool": "backup", "pair": "a b"}, "'a b' must match"),
]


@pytest.mark.parametrize(("backup", "expected"), BAD_PAIRS)
def test_bad_pairs_name_their_path(backup: dict[str, Any], expected: str) -> None:
    issues = issues_of(backup=backup)
    assert len(issues) == 1, issues
    assert issues[0].startswith("backends.app.servers[2].pair: ") and expected in issues[0]


def test_a_main_pairs_with_one_backup_only() -> None:
    data = {
        "listeners": {"web": {"bind": "127.0.0.1:0", "backend": "app"}},
        "backends": {
            "app": {
                "servers": [
                    {"name": "a", "address": "127.0.0.1:1"},
                    {"name": "x", "address": "127.0.0.1:2", "pool": "backup", "pair": "a"},
                    {"name": "y", "address": "127.0.0.1:3", "pool": "backup", "pair": "a"},
                ]
            }
        },
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.toml", Path("."))
    assert [str(i) for i in info.value.issues] == [
        "backends.app.servers[2].pair: 'a' already pairs with 'x'"
    ]
