"""Tests for zdlb.config.load and zdlb.config.summary: TOML in, model or exact issues out.

Every rejected config is asserted on the complete list of issue strings, so a wrong key path, a
missing bad value or an extra duplicate issue fails the test.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from zdlb.config.load import load_config, parse_config, resolve_path
from zdlb.config.model import (
    DEFAULT_SPLICE_MIN_BYTES,
    Address,
    BackendConfig,
    Balance,
    Config,
    Limits,
    ListenerConfig,
    ListenerMode,
    LogFormat,
    LoggingConfig,
    PoolName,
    ServerConfig,
    Timeouts,
)
from zdlb.config.summary import describe
from zdlb.errors import ConfigError

SOURCE = "test.toml"
BASE_DIR = Path("/etc/zdlb")
DELETE = object()

MINIMAL: dict[str, Any] = {
    "listeners": {"web": {"bind": "127.0.0.1:8000", "backend": "app"}},
    "backends": {"app": {"servers": [{"name": "a", "address": "10.0.0.1:8080"}]}},
}

FULL_TOML = """
[defaults.timeouts]
connect_s = 2
server_s = 20.5

[defaults.limits]
max_headers = 50

[logging]
access_log = false
level = "warning"
format = "json"

[listeners.web]
bind = "0.0.0.0:80"
backend = "app"
backlog = 4096
x_forwarded_proto = "https"

[listeners.web.timeouts]
client_s = 5

[listeners.web.limits]
max_line_bytes = 4096

[listeners."db.v6"]
bind = "[::1]:5432"
mode = "http"
backend = "db"

[backends.app]
balance = "leastconn"
retries = 0
all_backups = true

[backends.app.timeouts]
upstream_idle_s = 0.5

[[backends.app.servers]]
name = "main-1"
address = "front-1.internal:8080"
weight = 50
max_idle = 8

[[backends.app.servers]]
name = "backup-1"
address = "10.0.0.1:80"
pool = "backup"

[backends.db]
balance = "source"

[[backends.db.servers]]
name = "pg"
address = "[fe80::1]:5432"
weight = 0
"""


def _config(*changes: tuple[str | tuple[str | int, ...], object]) -> dict[str, Any]:
    """MINIMAL with each (path, value) applied; a str path is dotted, digits index a list."""
    data = copy.deepcopy(MINIMAL)
    for path, value in changes:
        keys = (
            tuple(int(k) if k.isdigit() else k for k in path.split("."))
            if isinstance(path, str)
            else path
        )
        node: Any = data
        for key in keys[:-1]:
            node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return data


def _issues(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, SOURCE, BASE_DIR)
    assert info.value.source == SOURCE
    return [str(issue) for issue in info.value.issues]


def _servers(*servers: object) -> tuple[str, object]:
    return ("backends.app.servers", list(servers))


REJECTED = [
    pytest.param(
        [("maxconn", 0), ("listeners.web.maxconn", "many")],
        [
            "maxconn: must be >= 1, got 0",
            "listeners.web.maxconn: expected an integer, got 'many'",
        ],
        id="maxconn-process-and-listener",
    ),
    pytest.param(
        [_servers({"name": "a", "address": "10.0.0.1:80", "maxconn": -2})],
        ["backends.app.servers[0].maxconn: must be >= 1, got -2"],
        id="server-maxconn-negative",
    ),
    pytest.param(
        [
            ("defaults.timeouts.queue_s", 0),
            ("listeners.web.timeouts.client_body_s", "20s"),
            ("listeners.web.limits.min_body_rate", -1),
        ],
        [
            "defaults.timeouts.queue_s: must be a finite number of seconds > 0, got 0",
            "listeners.web.timeouts.client_body_s: expected a number of seconds, got '20s'",
            "listeners.web.limits.min_body_rate: must be >= 0, got -1",
        ],
        id="queue-and-body-timeouts",
    ),
    pytest.param(
        [_servers({"name": "a", "address": "10.0.0.1:80"}, {"name": "b", "address": "nonsense"})],
        ["backends.app.servers[1].address: 'nonsense' is not host:port"],
        id="server-address-not-host-port",
    ),
    pytest.param(
        [("listeners.web.bakend", "app")],
        ["listeners.web.bakend: unknown key (did you mean 'backend'?)"],
        id="unknown-listener-key-did-you-mean",
    ),
    pytest.param(
        [("listeners.web.backend", DELETE), ("listeners.web.bakend", "app")],
        [
            "listeners.web.bakend: unknown key (did you mean 'backend'?)",
            "listeners.web.backend: required key is missing",
        ],
        id="misspelt-required-key",
    ),
    pytest.param(
        [(("listeners", "web", "bad key"), 1)],
        [
            'listeners.web."bad key": unknown key (expected one of: bind, mode, backend, '
            "backlog, x_forwarded_proto, splice, pipe_bytes, splice_min_bytes, maxconn, "
            "timeouts, limits, routes, unmatched_status, request_headers, response_headers, tls)"
        ],
        id="unknown-key-quoted-in-path",
    ),
    pytest.param(
        [("listener", {})],
        ["listener: unknown key (did you mean 'listeners'?)"],
        id="unknown-top-level-did-you-mean",
    ),
    pytest.param(
        [("stats", {"listen": "127.0.0.1:9100"})],
        [
            "stats: unknown key (expected one of: defaults, logging, control, metrics, "
            "listeners, backends, workers, maxconn, cluster)"
        ],
        id="unknown-top-level-section",
    ),
    pytest.param(
        [("metrics", {"listen": "127.0.0.1:8000"})],
        ["metrics.listen: '127.0.0.1:8000' clashes with listeners.web.bind '127.0.0.1:8000'"],
        id="metrics-clashes-with-a-listener",
    ),
    pytest.param(
        [("metrics", {"listen": "localhost:9100"})],
        [
            "metrics.listen: 'localhost:9100': host must be an IPv4 or [IPv6] literal, "
            "got 'localhost'"
        ],
        id="metrics-bind-needs-an-ip",
    ),
    pytest.param(
        [("listeners.web.mode", "tcp"), ("listeners.web.x_forwarded_proto", "https")],
        ["listeners.web.x_forwarded_proto: not used by mode = 'tcp' listeners"],
        id="http-key-on-tcp",
    ),
    pytest.param(
        [("listeners.web.mode", "tcp"), ("listeners.web.pipe_bytes", 100)],
        ["listeners.web.pipe_bytes: must be between 4096 and 1048576, got 100"],
        id="pipe-bytes-range",
    ),
    pytest.param(
        [("listeners.web.splice_min_bytes", True)],
        ["listeners.web.splice_min_bytes: expected an integer or false, got True"],
        id="splice-min-bytes-true",
    ),
    pytest.param(
        [("listeners.web.splice_min_bytes", -1)],
        ["listeners.web.splice_min_bytes: must be >= 0, got -1"],
        id="splice-min-bytes-negative",
    ),
    pytest.param(
        [("listeners.web.splice_min_bytes", "1m")],
        ["listeners.web.splice_min_bytes: expected an integer or false, got '1m'"],
        id="splice-min-bytes-string",
    ),
    pytest.param(
        [("listeners.web.mode", "tcp"), ("listeners.web.splice_min_bytes", 65536)],
        ["listeners.web.splice_min_bytes: not used by mode = 'tcp' listeners"],
        id="splice-min-bytes-on-tcp",
    ),
    pytest.param(
        [("control", {"socket": "x" * 200})],
        ["control.socket: a UNIX socket path holds 1..107 bytes, got 210"],  # /etc/zdlb/ + 200
        id="control-socket-too-long",
    ),
    pytest.param(
        [("control", {"group": "ops"})],
        ["control.group: only used with a socket"],
        id="control-group-without-socket",
    ),
    pytest.param(
        [("defaults.timeouts.conect_s", 1)],
        ["defaults.timeouts.conect_s: unknown key (did you mean 'connect_s'?)"],
        id="unknown-timeout-key",
    ),
    pytest.param(
        [("backends.app.servers.0.adress", "h:1")],
        ["backends.app.servers[0].adress: unknown key (did you mean 'address'?)"],
        id="unknown-server-key",
    ),
    pytest.param(
        [("defaults.timeout", {})],
        ["defaults.timeout: unknown key (did you mean 'timeouts'?)"],
        id="unknown-defaults-key",
    ),
    pytest.param(
        [("backends.app.retries", "two")],
        ["backends.app.retries: expected an integer, got 'two'"],
        id="retries-string",
    ),
    pytest.param(
        [("backends.app.retries", True)],
        ["backends.app.retries: expected an integer, got True"],
        id="retries-bool-is-not-int",
    ),
    pytest.param(
        [("backends.app.retries", 1.0)],
        ["backends.app.retries: expected an integer, got 1.0"],
        id="retries-float",
    ),
    pytest.param(
        [("backends.app.retries", -1)],
        ["backends.app.retries: must be >= 0, got -1"],
        id="retries-negative",
    ),
    pytest.param(
        [("backends.app.servers.0.weight", 257)],
        ["backends.app.servers[0].weight: must be between 0 and 256, got 257"],
        id="weight-too-big",
    ),
    pytest.param(
        [("backends.app.servers.0.max_idle", -1)],
        ["backends.app.servers[0].max_idle: must be >= 0, got -1"],
        id="max-idle-negative",
    ),
    pytest.param(
        [("listeners.web.backlog", 0)],
        ["listeners.web.backlog: must be >= 1, got 0"],
        id="backlog-zero",
    ),
    pytest.param(
        [("logging.access_log", "yes")],
        ["logging.access_log: expected true or false, got 'yes'"],
        id="access-log-not-bool",
    ),
    pytest.param(
        [("listeners.web.mode", "udp")],
        ["listeners.web.mode: expected one of 'http', 'tcp', got 'udp'"],
        id="mode-enum",
    ),
    pytest.param(
        [("backends.app.balance", "RoundRobin")],
        [
            "backends.app.balance: expected one of 'roundrobin', 'leastconn', 'random', "
            "'source', got 'RoundRobin'"
        ],
        id="balance-enum-case-sensitive",
    ),
    pytest.param(
        [("backends.app.servers.0.pool", 1)],
        ["backends.app.servers[0].pool: expected one of 'main', 'backup', got 1"],
        id="pool-enum-wrong-type",
    ),
    pytest.param(
        [("logging.level", "trace")],
        ["logging.level: expected one of 'debug', 'info', 'warning', 'error', got 'trace'"],
        id="log-level-enum",
    ),
    pytest.param(
        [("logging.format", "xml")],
        ["logging.format: expected one of 'text', 'json', got 'xml'"],
        id="log-format-enum",
    ),
    pytest.param(
        [("listeners.web.x_forwarded_proto", "ftp")],
        ["listeners.web.x_forwarded_proto: expected one of 'http', 'https', got 'ftp'"],
        id="forwarded-proto-enum",
    ),
    pytest.param(
        [("defaults.timeouts.connect_s", 0)],
        ["defaults.timeouts.connect_s: must be a finite number of seconds > 0, got 0"],
        id="timeout-zero",
    ),
    pytest.param(
        [("listeners.web.timeouts.client_s", float("inf"))],
        ["listeners.web.timeouts.client_s: must be a finite number of seconds > 0, got inf"],
        id="timeout-inf",
    ),
    pytest.param(
        [("backends.app.timeouts.server_s", float("nan"))],
        ["backends.app.timeouts.server_s: must be a finite number of seconds > 0, got nan"],
        id="timeout-nan",
    ),
    pytest.param(
        [("backends.app.timeouts.server_s", "30s")],
        ["backends.app.timeouts.server_s: expected a number of seconds, got '30s'"],
        id="timeout-string",
    ),
    pytest.param(
        [("defaults.timeouts", 5)],
        ["defaults.timeouts: expected a table, got 5"],
        id="timeouts-not-table",
    ),
    pytest.param(
        [("defaults.limits.max_headers", 0)],
        ["defaults.limits.max_headers: must be >= 1, got 0"],
        id="limit-zero",
    ),
    pytest.param(
        [("defaults.limits.max_line_bytes", 40000)],
        ["defaults.limits.max_line_bytes: 40000 exceeds max_head_bytes 32768"],
        id="default-line-limit-over-head-limit",
    ),
    pytest.param(
        [("listeners.web.limits.max_head_bytes", 1024)],
        ["listeners.web.limits.max_line_bytes: 8192 exceeds max_head_bytes 1024"],
        id="listener-head-limit-under-line-limit",
    ),
    pytest.param(
        [_servers({"name": "a", "address": "h1:80"}, {"name": "a", "address": "h2:80"})],
        ["backends.app.servers[1].name: duplicate server name 'a' (also servers[0])"],
        id="duplicate-server-name",
    ),
    pytest.param(
        [("backends.app.servers.0.name", "a b")],
        ["backends.app.servers[0].name: 'a b' must match [A-Za-z0-9._-]+"],
        id="bad-server-name",
    ),
    pytest.param(
        [("backends.app.servers.0.name", DELETE), ("backends.app.servers.0.address", DELETE)],
        [
            "backends.app.servers[0].name: required key is missing",
            "backends.app.servers[0].address: required key is missing",
        ],
        id="server-required-keys",
    ),
    pytest.param(
        [("listeners.web.backend", "api")],
        ["listeners.web.backend: no backend named 'api' (backends: 'app')"],
        id="listener-names-missing-backend",
    ),
    pytest.param(
        [("backends", DELETE)],
        ["listeners.web.backend: no backend named 'app' (backends: none are defined)"],
        id="no-backends-at-all",
    ),
    pytest.param(
        [("listeners.api", {"bind": "127.0.0.1:8000", "backend": "app"})],
        ["listeners.api.bind: '127.0.0.1:8000' clashes with listeners.web.bind '127.0.0.1:8000'"],
        id="same-bind-twice",
    ),
    pytest.param(
        [("listeners.api", {"bind": "0.0.0.0:8000", "backend": "app"})],
        ["listeners.api.bind: '0.0.0.0:8000' clashes with listeners.web.bind '127.0.0.1:8000'"],
        id="wildcard-bind-overlaps",
    ),
    pytest.param(
        [("listeners.web.bind", "localhost:8000")],
        [
            "listeners.web.bind: 'localhost:8000': host must be an IPv4 or [IPv6] literal, "
            "got 'localhost'"
        ],
        id="bind-host-is-name",
    ),
    pytest.param(
        [("listeners.web.bind", "127.0.0.1:65536")],
        ["listeners.web.bind: '127.0.0.1:65536': port must be between 0 and 65535"],
        id="bind-port-too-big",
    ),
    pytest.param(
        [("listeners.web.bind", "::1:8000")],
        ["listeners.web.bind: '::1:8000' is not host:port"],
        id="bind-ipv6-without-brackets",
    ),
    pytest.param(
        [("listeners.web.bind", "[127.0.0.1]:8000")],
        ["listeners.web.bind: '[127.0.0.1]:8000': '127.0.0.1' is not an IPv6 address"],
        id="bind-ipv4-in-brackets",
    ),
    pytest.param(
        [("listeners.web.bind", 8000)],
        ["listeners.web.bind: expected a string, got 8000"],
        id="bind-not-string",
    ),
    pytest.param(
        [("backends.app.servers.0.address", "10.0.0.1:0")],
        ["backends.app.servers[0].address: '10.0.0.1:0': port must be between 1 and 65535"],
        id="server-port-zero",
    ),
    pytest.param(
        [("backends.app.servers.0.address", "10.0.0.999:80")],
        [
            "backends.app.servers[0].address: '10.0.0.999:80': '10.0.0.999' is neither an "
            "IPv4 address nor a DNS name"
        ],
        id="server-bad-ipv4",
    ),
    pytest.param(
        [("backends.app.servers.0.address", "-bad-.example:80")],
        [
            "backends.app.servers[0].address: '-bad-.example:80': '-bad-.example' is neither "
            "an IPv4 address nor a DNS name"
        ],
        id="server-bad-dns-label",
    ),
    pytest.param(
        [("backends.app.servers", [])],
        ["backends.app.servers: a backend needs at least one server"],
        id="backend-empty-servers",
    ),
    pytest.param(
        [("backends.app.servers", DELETE)],
        ["backends.app.servers: a backend needs at least one server"],
        id="backend-without-servers-key",
    ),
    pytest.param(
        [("backends.app.servers", {"name": "a", "address": "h:80"})],
        [
            "backends.app.servers: expected an array of tables ([[backends.app.servers]]), "
            "got a table"
        ],
        id="servers-is-a-table",
    ),
    pytest.param(
        [_servers({"name": "a", "address": "h:80"}, "b")],
        ["backends.app.servers[1]: expected a table, got 'b'"],
        id="server-entry-not-table",
    ),
    pytest.param(
        [("backends.app.servers.0.pool", "backup")],
        ["backends.app.servers: every server is in the 'backup' pool; at least one must be 'main'"],
        id="only-backup-servers",
    ),
    pytest.param(
        [_servers({"name": "b", "address": "h:80", "pool": "backup"}, {"name": "a"})],
        ["backends.app.servers[1].address: required key is missing"],
        id="bad-server-does-not-also-trigger-only-backup",
    ),
    pytest.param(
        [("defaults.timeouts.grace_s", True)],
        ["defaults.timeouts.grace_s: expected a number of seconds, got True"],
        id="timeout-bool",
    ),
    pytest.param(
        [("listeners", DELETE)],
        ["listeners: at least one listener is required"],
        id="no-listeners-key",
    ),
    pytest.param(
        [("listeners", {})],
        ["listeners: at least one listener is required"],
        id="empty-listeners-table",
    ),
    pytest.param(
        [("listeners", 3)],
        ["listeners: expected a table, got 3"],
        id="listeners-not-table",
    ),
    pytest.param(
        [("listeners.web", "x")],
        ["listeners.web: expected a table, got 'x'"],
        id="listener-not-table",
    ),
    pytest.param(
        [(("listeners", "a b"), {"bind": "127.0.0.1:9000", "backend": "app"})],
        ['listeners."a b": name must match [A-Za-z0-9._-]+'],
        id="bad-listener-name",
    ),
    pytest.param(
        [("backends.app.retries", "x" * 100)],
        [f"backends.app.retries: expected an integer, got '{'x' * 56}..."],
        id="long-bad-value-truncated",
    ),
]


REJECTED_WORKERS = [
    pytest.param(0, "workers: must be between 1 and 256, got 0", id="zero"),
    pytest.param(257, "workers: must be between 1 and 256, got 257", id="too-many"),
    pytest.param("2", "workers: expected an integer, got '2'", id="string"),
    pytest.param(True, "workers: expected an integer, got True", id="bool"),
]


@pytest.mark.parametrize(("value", "expected"), REJECTED_WORKERS)
def test_rejects_workers(value: object, expected: str) -> None:
    assert _issues(_config(("workers", value))) == [expected]


@pytest.mark.parametrize(("value", "expected"), [(None, None), (1, 1), (4, 4), (256, 256)])
def test_workers(value: int | None, expected: int | None) -> None:
    changes = [] if value is None else [("workers", value)]
    assert parse_config(_config(*changes), SOURCE, BASE_DIR).workers == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, DEFAULT_SPLICE_MIN_BYTES), (False, None), (0, 0), (1 << 20, 1 << 20)],
)
def test_splice_min_bytes(value: int | bool | None, expected: int | None) -> None:
    changes = [] if value is None else [("listeners.web.splice_min_bytes", value)]
    config = parse_config(_config(*changes), SOURCE, BASE_DIR)
    assert config.listeners[0].splice_min_bytes == expected


@pytest.mark.parametrize(("changes", "expected"), REJECTED)
def test_rejects_with_exact_issues(
    changes: list[tuple[str | tuple[str | int, ...], object]], expected: list[str]
) -> None:
    assert _issues(_config(*changes)) == expected


def test_reports_every_issue_together() -> None:
    data = _config(
        ("bogus", 1),
        ("logging.level", "loud"),
        ("backends.app.retries", "two"),
        ("backends.app.servers.0.address", "nonsense"),
        ("listeners.web.bakend", "app"),
        ("listeners.web.bind", "localhost:1"),
    )
    assert _issues(data) == [
        "bogus: unknown key (expected one of: defaults, logging, control, metrics, listeners, "
        "backends, workers, maxconn, cluster)",
        "logging.level: expected one of 'debug', 'info', 'warning', 'error', got 'loud'",
        "backends.app.retries: expected an integer, got 'two'",
        "backends.app.servers[0].address: 'nonsense' is not host:port",
        "listeners.web.bakend: unknown key (did you mean 'backend'?)",
        "listeners.web.bind: 'localhost:1': host must be an IPv4 or [IPv6] literal, "
        "got 'localhost'",
    ]


def test_config_error_message_names_source_and_count() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(("listeners", DELETE), ("x", 1)), SOURCE, BASE_DIR)
    assert str(info.value) == (
        "test.toml: 2 error(s)\n"
        "  x: unknown key (expected one of: defaults, logging, control, metrics, listeners, "
        "backends, workers, maxconn, cluster)\n"
        "  listeners: at least one listener is required"
    )


ACCEPTED = [
    pytest.param([], id="minimal"),
    pytest.param(
        [
            ("listeners.api", {"bind": "127.0.0.1:0", "backend": "app"}),
            ("listeners.web.bind", "127.0.0.1:0"),
        ],
        id="port-zero-twice-does-not-clash",
    ),
    pytest.param(
        [
            ("listeners.v6", {"bind": "[::]:8000", "backend": "app"}),
            ("listeners.web.bind", "0.0.0.0:8000"),
        ],
        id="ipv4-and-ipv6-wildcards-coexist",
    ),
    pytest.param(
        [("listeners.api", {"bind": "127.0.0.2:8000", "backend": "app"})],
        id="same-port-other-ip",
    ),
    pytest.param([("backends.app.servers.0.address", "app_1.svc.local.:80")], id="dns-name"),
    pytest.param([("backends.app.servers.0.address", "[2001:db8::1]:443")], id="ipv6-server"),
    pytest.param([("backends.app.servers.0.weight", 0)], id="weight-zero"),
    pytest.param(
        [("backends.unused", {"servers": [{"name": "x", "address": "h:1"}]})], id="unused-backend"
    ),
]


@pytest.mark.parametrize("changes", ACCEPTED)
def test_accepts(changes: list[tuple[str, object]]) -> None:
    config = parse_config(_config(*changes), SOURCE, BASE_DIR)
    assert config.source == SOURCE


def test_full_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "zdlb.toml"
    path.write_text(FULL_TOML, encoding="utf-8")
    defaults = Timeouts(connect_s=2.0, server_s=20.5)
    expected = Config(
        source=str(path),
        listeners=(
            ListenerConfig(
                name="web",
                bind=Address("0.0.0.0", 80),
                backend="app",
                timeouts=Timeouts(connect_s=2.0, server_s=20.5, client_s=5.0),
                limits=Limits(max_headers=50, max_line_bytes=4096),
                backlog=4096,
                x_forwarded_proto="https",
            ),
            ListenerConfig(
                name="db.v6",
                bind=Address("::1", 5432),
                backend="db",
                mode=ListenerMode.HTTP,
                timeouts=defaults,
                limits=Limits(max_headers=50),
            ),
        ),
        backends=(
            BackendConfig(
                name="app",
                servers=(
                    ServerConfig(
                        "main-1", Address("front-1.internal", 8080), weight=50, max_idle=8
                    ),
                    ServerConfig("backup-1", Address("10.0.0.1", 80), pool=PoolName.BACKUP),
                ),
                balance=Balance.LEASTCONN,
                retries=0,
                all_backups=True,
                timeouts=Timeouts(connect_s=2.0, server_s=20.5, upstream_idle_s=0.5),
            ),
            BackendConfig(
                name="db",
                servers=(ServerConfig("pg", Address("fe80::1", 5432), weight=0),),
                balance=Balance.SOURCE,
                timeouts=defaults,
            ),
        ),
        defaults=defaults,
        logging=LoggingConfig(access_log=False, level="warning", format=LogFormat.JSON),
    )
    config = load_config(path)
    assert config == expected
    assert isinstance(config.defaults.connect_s, float)
    assert config.backend("db") is config.backends[1]


def test_describe_summarises_listeners_backends_and_servers(tmp_path: Path) -> None:
    path = tmp_path / "zdlb.toml"
    path.write_text(FULL_TOML, encoding="utf-8")
    assert describe(load_config(path)) == "\n".join(
        [
            f"{path}: 2 listeners, 2 backends",
            "listeners:",
            "  web    http  0.0.0.0:80  -> app  splice tunnels, bodies >= 1 MiB",
            "  db.v6  http  [::1]:5432  -> db   splice tunnels, bodies >= 1 MiB",
            "backends:",
            "  app balance=leastconn retries=0 reuse=safe all_backups",
            "    main-1    front-1.internal:8080  main    weight=50   max_idle=8",
            "    backup-1  10.0.0.1:80            backup  weight=100  max_idle=64",
            "  db balance=source retries=2 reuse=safe",
            "    pg  [fe80::1]:5432  main  weight=0  max_idle=64",
            "workers: one per usable core",
        ]
    )


def test_describe_marks_free_port_and_unused_backend() -> None:
    data = _config(
        ("listeners.web.bind", "127.0.0.1:0"),
        ("backends.spare", {"servers": [{"name": "s", "address": "h:1"}]}),
    )
    text = describe(parse_config(data, SOURCE, BASE_DIR))
    assert (
        "  web  http  127.0.0.1:0 (any free port)  -> app  splice tunnels, bodies >= 1 MiB"
        in text.splitlines()
    )
    spare = "  spare balance=roundrobin retries=2 reuse=safe (no listener uses it)"
    assert spare in text.splitlines()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ([("listeners.web.splice_min_bytes", 300_000)], "splice tunnels, bodies >= 300000 B"),
        ([("listeners.web.splice_min_bytes", 65536)], "splice tunnels, bodies >= 64 KiB"),
        ([("listeners.web.splice_min_bytes", False)], "splice tunnels"),
        ([("listeners.web.splice", False)], "copy"),
        ([("listeners.web.mode", "tcp")], "splice"),
    ],
)
def test_describe_says_how_bytes_move(changes: list[tuple[str, object]], expected: str) -> None:
    text = describe(parse_config(_config(*changes), SOURCE, BASE_DIR))
    [row] = [line for line in text.splitlines() if line.startswith("  web ")]
    assert row.endswith(f"-> app  {expected}"), row


def test_describe_empty_sections() -> None:
    text = describe(Config(source="x.toml", listeners=(), backends=()))
    assert text == (
        "x.toml: 0 listeners, 0 backends\nlisteners:\n  (none)\nbackends:\n"
        "workers: one per usable core"
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("[listeners.web]\nbind = \n", "(at line 2, column 8)", id="missing-value"),
        pytest.param("[a]\n[a]\n", "(at line 2, column", id="duplicate-table"),
        pytest.param("x = 1\nx = 2\n", "(at line 2, column", id="duplicate-key"),
    ],
)
def test_toml_syntax_error_is_one_issue_with_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    [issue] = info.value.issues
    assert issue.key_path == ""
    assert issue.message.startswith("TOML syntax error: ")
    assert fragment in issue.message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("missing.toml", "cannot read file: No such file or directory", id="missing"),
        pytest.param(".", "cannot read file: Is a directory", id="directory"),
    ],
)
def test_unreadable_file_is_one_issue(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / name)
    assert [str(issue) for issue in info.value.issues] == [expected]


def test_invalid_utf8_is_one_issue(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'x = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [issue] = info.value.issues
    assert issue.message.startswith("file is not valid UTF-8: ")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("zdlb.sock", Path("/etc/zdlb/zdlb.sock"), id="bare-name"),
        pytest.param("run/zdlb.sock", Path("/etc/zdlb/run/zdlb.sock"), id="relative-dir"),
        pytest.param("../state.json", Path("/etc/zdlb/../state.json"), id="parent-dir"),
        pytest.param("/run/zdlb.sock", Path("/run/zdlb.sock"), id="absolute-kept"),
        pytest.param("~/x", Path("/etc/zdlb/~/x"), id="no-home-expansion"),
        pytest.param(Path("state.json"), Path("/etc/zdlb/state.json"), id="pathlike"),
    ],
)
def test_resolve_path(value: str | Path, expected: Path) -> None:
    assert resolve_path(BASE_DIR, value) == expected
