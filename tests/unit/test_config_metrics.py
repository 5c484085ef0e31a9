"""``[metrics] admin``: off by default, a boolean, and only with a loopback listener."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from zdlb.config.load import parse_config
from zdlb.config.model import Address
from zdlb.errors import ConfigError

MINIMAL: dict[str, Any] = {
    "listeners": {"web": {"bind": "127.0.0.1:8000", "backend": "app"}},
    "backends": {"app": {"servers": [{"name": "a", "address": "10.0.0.1:8080"}]}},
}


def _parse(metrics: dict[str, object]) -> Any:
    data = copy.deepcopy(MINIMAL)
    data["metrics"] = metrics
    return parse_config(data, "test.toml", Path("/etc/zdlb")).metrics


@pytest.mark.parametrize(
    ("metrics", "listen", "admin"),
    [
        ({"listen": "127.0.0.1:9100"}, Address("127.0.0.1", 9100), False),
        ({"listen": "127.0.0.1:9100", "admin": True}, Address("127.0.0.1", 9100), True),
        ({"listen": "[::1]:9100", "admin": True}, Address("::1", 9100), True),
        ({"listen": "0.0.0.0:9100", "admin": False}, Address("0.0.0.0", 9100), False),
        ({}, None, False),
    ],
    ids=["default-off", "loopback", "ipv6-loopback", "public-without-admin", "no-listen"],
)
def test_admin(metrics: dict[str, object], listen: Address | None, admin: bool) -> None:
    parsed = _parse(metrics)
    assert (parsed.listen, parsed.admin) == (listen, admin)


@pytest.mark.parametrize(
    ("metrics", "issue"),
    [
        (
            {"listen": "0.0.0.0:9100", "admin": True},
            "metrics.admin: needs a loopback listen address, not 0.0.0.0",
        ),
        (
            {"listen": "10.1.2.3:9100", "admin": True},
            "metrics.admin: needs a loopback listen address, not 10.1.2.3",
        ),
        ({"listen": "127.0.0.1:9100", "admin": "yes"}, "metrics.admin"),
        ({"admin": 1}, "metrics.admin"),
        ({"listen": "127.0.0.1:9100", "admn": True}, "metrics.admn: unknown key"),
    ],
    ids=["wildcard", "public", "string", "int-without-listen", "typo"],
)
def test_admin_rejected(metrics: dict[str, object], issue: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(metrics)
    issues = [str(found) for found in info.value.issues]
    assert len(issues) == 1 and issues[0].startswith(issue), issues
