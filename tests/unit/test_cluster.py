"""Tests for [cluster] (config/cluster.py), the shared server state (cluster/state.py), the
fleet's command plans (control/fleet.py) and the etcd gateway's stream parsing (cluster/etcd.py).

Pure: no etcd here (tests/daemon/test_fleet*.py run a real one).
"""

from __future__ import annotations

import asyncio
import copy
import math
from pathlib import Path
from typing import Any

import pytest

from zdlb.balancer.pool import Backend
from zdlb.balancer.server import AdminState, Server, plan_flip
from zdlb.cluster import state as shared
from zdlb.cluster.etcd import _messages, _read_body, _read_head, prefix_end
from zdlb.cluster.state import ServerState
from zdlb.config.cluster import ClusterAuth, ClusterConfig, ClusterTls
from zdlb.config.load import parse_config
from zdlb.config.model import Address, BackendConfig, PoolName, ServerConfig
from zdlb.config.summary import describe
from zdlb.control import fleet
from zdlb.control.protocol import ShowServers, format_command, parse_command
from zdlb.errors import ConfigError

BASE: dict[str, Any] = {
    "control": {"socket": "/run/zdlb.sock"},
    "listeners": {"web": {"bind": "127.0.0.1:8000", "backend": "app"}},
    "backends": {"app": {"servers": [{"name": "a", "address": "10.0.0.1:8080"}]}},
    "cluster": {"endpoints": ["http://127.0.0.1:2379"], "prefix": "/zdlb/prod", "instance": "lb-1"},
}


def _parse(cluster: dict[str, Any] | None, base_dir: Path = Path("/etc/zdlb")) -> Any:
    data = copy.deepcopy(BASE)
    if cluster is None:
        del data["cluster"]
    else:
        data["cluster"] = cluster
    return parse_config(data, "t.toml", base_dir)


def _issues(cluster: dict[str, Any], **top: Any) -> list[str]:
    data = copy.deepcopy(BASE)
    data["cluster"] = cluster
    data.update(top)
    with pytest.raises(ConfigError) as info:
        parse_config(data, "t.toml", Path("/etc/zdlb"))
    return [str(issue) for issue in info.value.issues]


def test_without_cluster_nothing_changes() -> None:
    assert _parse(None).cluster is None


def test_cluster_defaults() -> None:
    config = _parse(BASE["cluster"]).cluster
    assert config == ClusterConfig(("http://127.0.0.1:2379",), "/zdlb/prod", "lb-1", 10, 2.0)


def test_zdlb_check_names_the_fleet() -> None:
    text = describe(_parse(BASE["cluster"]))
    assert "cluster: /zdlb/prod as lb-1 via http://127.0.0.1:2379 (lease 10s)" in text
    assert "cluster:" not in describe(_parse(None))


def test_tls_and_auth_files(tmp_path: Path) -> None:
    for name in ("ca.pem", "c.pem", "k.pem", "pw"):
        (tmp_path / name).write_text("x")
    cluster = {
        "endpoints": ["https://etcd-1:2379", "https://etcd-2:2379/"],
        "prefix": "/fleet",
        "instance": "lb.2",
        "lease_s": 5,
        "timeout_s": 0.5,
        "tls": {"ca": "ca.pem", "cert": "c.pem", "key": "k.pem"},
        "auth": {"user": "zdlb", "password_file": "pw"},
    }
    config = _parse(cluster, tmp_path).cluster
    assert config.endpoints == ("https://etcd-1:2379", "https://etcd-2:2379")
    assert config.tls == ClusterTls(tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem")
    assert config.auth == ClusterAuth("zdlb", tmp_path / "pw")
    assert (config.lease_s, config.timeout_s) == (5, 0.5)


NAME_RULE = "[A-Za-z0-9._-]+"
PREFIX_RULE = f"must look like /name or /name/name ({NAME_RULE})"
REJECTED: list[tuple[str, dict[str, Any], list[str]]] = [
    ("no-endpoints", {"endpoints": None}, ["cluster.endpoints: required key is missing"]),
    (
        "empty-endpoints",
        {"endpoints": []},
        ['cluster.endpoints: expected a list of URLs, e.g. ["http://127.0.0.1:2379"]'],
    ),
    (
        "no-scheme",
        {"endpoints": ["etcd:2379"]},
        ["cluster.endpoints: 'etcd:2379': the scheme must be http or https"],
    ),
    (
        "no-port",
        {"endpoints": ["http://etcd"]},
        ["cluster.endpoints: 'http://etcd': expected scheme://host:port"],
    ),
    (
        "path",
        {"endpoints": ["http://e:1/v3"]},
        [
            "cluster.endpoints: 'http://e:1/v3': "
            "no path, query or fragment: etcd's API paths are fixed"
        ],
    ),
    ("prefix-relative", {"prefix": "zdlb"}, [f"cluster.prefix: 'zdlb' {PREFIX_RULE}"]),
    ("prefix-slash", {"prefix": "/a/"}, [f"cluster.prefix: '/a/' {PREFIX_RULE}"]),
    ("instance", {"instance": "a b"}, [f"cluster.instance: 'a b' must match {NAME_RULE}"]),
    ("lease", {"lease_s": 1}, ["cluster.lease_s: must be between 2 and 3600, got 1"]),
    (
        "tls",
        {"tls": {"ca": "/nope.pem"}},
        ["cluster.tls.ca: file not found: /nope.pem", "cluster.tls: TLS needs https:// endpoints"],
    ),
    ("auth", {"auth": {"user": "u"}}, ["cluster.auth.password_file: required key is missing"]),
    ("unknown", {"prefx": 3}, ["cluster.prefx: unknown key (did you mean 'prefix'?)"]),
]


@pytest.mark.parametrize(
    ("changes", "expected"), [pytest.param(c, e, id=i) for i, c, e in REJECTED]
)
def test_rejects(changes: dict[str, Any], expected: list[str]) -> None:
    cluster = {**BASE["cluster"], **changes}
    assert _issues({k: v for k, v in cluster.items() if v is not None}) == expected


def test_cluster_needs_a_control_socket() -> None:
    assert _issues(BASE["cluster"], control={}) == [
        "cluster: needs [control] socket (changes go through it)"
    ]


# --- the shared state -------------------------------------------------------------------------


def _servers() -> tuple[Backend, Server, Server]:
    main = ServerConfig("front-1", Address("10.0.0.1", 80))
    pair = ServerConfig("front-1b", Address("10.0.0.2", 80), pool=PoolName.BACKUP, pair="front-1")
    backend = Backend(BackendConfig("app", (main, pair)))
    first, second = backend.servers
    return backend, first, second


def test_encode_decode_round_trip() -> None:
    state = ServerState(AdminState.DRAIN, 7, PoolName.BACKUP, 1000.5, "lb-1", 1000)
    assert shared.decode(shared.encode(state, 999.0)) == state


@pytest.mark.parametrize(
    "value",
    [b"", b"[]", b"{}", b'{"admin": "off", "weight": 1, "pool": "main"}',
     b'{"admin": "ready", "weight": 300, "pool": "main"}',
     b'{"admin": "ready", "weight": true, "pool": "main"}',
     b'{"admin": "ready", "weight": 1, "pool": "main", "drain_until": "soon"}', b"\xff"],
)  # fmt: skip
def test_decode_rejects_what_zdlb_did_not_write(value: bytes) -> None:
    with pytest.raises(ValueError):
        shared.decode(value)


def test_keys() -> None:
    key = shared.server_key("/zdlb/prod", "app", "front-1")
    assert key == "/zdlb/prod/servers/app/front-1"
    assert shared.parse_server_key("/zdlb/prod", key) == ("app", "front-1")
    assert shared.parse_server_key("/zdlb/prod", "/zdlb/prod/servers/app") is None
    assert shared.parse_server_key("/zdlb/prod", "/zdlb/prodx/servers/a/b") is None
    assert prefix_end("/zdlb/") == "L3pkbGIw"  # "/zdlb0": every key under "/zdlb/" sorts before


def test_apply_turns_a_wall_clock_drain_into_loop_time() -> None:
    _, server, _ = _servers()
    server.drain_hold_s = 300.0
    state = ServerState(AdminState.DRAIN, 3, PoolName.MAIN, drain_until=1060.0)
    assert shared.apply(server, state, wall_now=1000.0, loop_now=5.0)
    assert (server.admin, server.weight, server.drain_ends) == (AdminState.DRAIN, 3, 65.0)
    assert not shared.apply(server, state, wall_now=1001.0, loop_now=6.0)  # already so
    assert shared.state_of(server, 1000.0, 5.0) == ServerState(
        AdminState.DRAIN, 3, PoolName.MAIN, 1060.0
    )
    held = ServerState(AdminState.DRAIN, 3, PoolName.MAIN, None)
    _, other, _ = _servers()
    shared.apply(other, held, 1000.0, 5.0)
    assert other.drain_ends == math.inf


def test_draining_again_keeps_the_first_deadline() -> None:
    draining = ServerState(AdminState.DRAIN, 1, PoolName.MAIN, 50.0)
    assert shared.with_admin(draining, AdminState.DRAIN, 90.0).drain_until == 50.0
    ready = ServerState(AdminState.READY, 1, PoolName.MAIN)
    assert shared.with_admin(ready, AdminState.DRAIN, 90.0).drain_until == 90.0
    assert shared.with_admin(draining, AdminState.MAINT, 90.0).drain_until is None


# --- plans ------------------------------------------------------------------------------------


def test_flip_plan_writes_the_member_taking_over_first() -> None:
    _, main, pair = _servers()
    pair.admin = AdminState.MAINT
    change = fleet.flip(main, pair, plan_flip(main, pair, False), 0.0, 0.0)
    assert list(change.states) == [("app", "front-1b"), ("app", "front-1")]
    assert [s.admin for s in change.states.values()] == [AdminState.READY, AdminState.MAINT]
    assert change.text == (
        "app/front-1b: admin maint -> ready\n"
        "app/front-1: admin ready -> maint\n"
        "app/front-1b serves front-1\n"
    )
    assert main.admin is AdminState.READY  # a plan changes nothing


def test_swap_plan() -> None:
    backend, _, _ = _servers()
    change = fleet.swap(backend, 0.0, 0.0)
    assert [s.pool for s in change.states.values()] == [PoolName.BACKUP, PoolName.MAIN]
    assert change.data == {
        "backend": "app",
        "pools": {"app/front-1": "backup", "app/front-1b": "main"},
    }


def test_render_views() -> None:
    view = {"admin": "ready", "health": "up", "weight": 1, "pool": "main", "inflight": 2}
    views: dict[str, Any] = {"lb-2": {"servers": {"app/a": view}}, "lb-1": {"servers": {}}}
    text, _ = fleet.render_views(views, ["app/a"])
    assert text.splitlines()[0].split() == ["server", "lb-1", "lb-2"]
    assert text.splitlines()[1].split() == ["app/a", "?", "ready/up", "w=1", "main", "inflight=2"]


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"show servers --fleet", ShowServers(None, True)),
        (b"show servers app --fleet", ShowServers("app", True)),
        (b"show servers --fleet app", ShowServers("app", True)),
        (b"show servers app", ShowServers("app", False)),
    ],
)
def test_show_servers_fleet_parses(line: bytes, command: ShowServers) -> None:
    assert parse_command(line) == (command, False)
    assert parse_command(format_command(command).encode()) == (command, False)


# --- the gateway's wire format ------------------------------------------------------------------


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_a_watch_stream_split_anywhere_gives_the_same_messages() -> None:
    messages = b'{"result":{"created":true}}\n{"result":{"events":[{"kv":{"key":"YQ=="}}]}}\n'
    for cut in range(1, len(messages)):
        parts = [messages[:cut], messages[cut:]]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        reader = _reader(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        status, headers = await _read_head(reader)
        got = [m async for m in _messages(reader, headers)]
        assert status == 200
        assert got == [
            {"result": {"created": True}},
            {"result": {"events": [{"kv": {"key": "YQ=="}}]}},
        ]


async def test_a_plain_answer() -> None:
    reader = _reader(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    status, headers = await _read_head(reader)
    assert (status, await _read_body(reader, headers)) == (200, b"{}")


async def test_not_http_is_refused() -> None:
    with pytest.raises(ValueError):
        await _read_head(_reader(b"SSH-2.0-OpenSSH\r\n\r\n"))
