"""``[cluster]``: a fleet of zdlb instances sharing their runtime state through etcd.

Without ``[cluster]`` nothing changes: the state journal is the only store. With it, every
instance names the same etcd ``endpoints`` and ``prefix`` (the fleet's name) and its own
``instance`` name; zdlb/cluster/ does the rest. Validation only, like the rest of config/: the
one I/O here is checking that the TLS and password files named exist, so a typo is a config
error before the daemon starts, not a failed handshake later.

    [cluster]
    endpoints = ["http://127.0.0.1:2379"]   # etcd's client URLs, tried in order
    prefix = "/zdlb/prod"                    # every key of this fleet lives under it
    instance = "lb-1"                        # default: the host name
    lease_s = 10                             # a dead instance's keys expire after this
    timeout_s = 2                            # each etcd request
    [cluster.tls]                            # only with https:// endpoints
    ca = "etcd-ca.pem"                       # verify etcd's certificate with this CA
    cert = "zdlb.pem"                        # client certificate (with key)
    key = "zdlb-key.pem"
    [cluster.auth]                           # etcd's user/password authentication
    user = "zdlb"
    password_file = "etcd-password"          # the file's first line is the password
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from zdlb.config.table import NAME_RE, Table

CLUSTER_KEYS = ("endpoints", "prefix", "instance", "lease_s", "timeout_s", "tls", "auth")
_TLS_KEYS = ("ca", "cert", "key")
_AUTH_KEYS = ("user", "password_file")
# etcd's own default request timeout is 5 s; a control command waits for one round trip, and
# an operator should hear "etcd unreachable" well before that.
DEFAULT_TIMEOUT_S = 2.0
# A lease of 10 s (Kubernetes' leader election uses 15 s): a crashed instance leaves `show
# servers --fleet` and `wait idle` within that, and a keep-alive every lease_s / 3 costs one
# small request per ~3 s.
DEFAULT_LEASE_S = 10
MIN_LEASE_S = 2  # etcd refuses TTLs below its minimum (heartbeat-based, ~1.5 s by default)
MAX_LEASE_S = 3600
# A prefix is a path of names: "/" then NAME_RE parts, so keys stay readable in etcdctl.
PREFIX_RE = re.compile(r"(/[A-Za-z0-9._-]+)+")
# scheme://host:port, host a name, an IPv4 or a bracketed IPv6 address. A regex rather than
# urllib.parse: `zdlb ctl -c` loads the config, and its start-up is measured in milliseconds.
_ENDPOINT_RE = re.compile(
    r"(?P<scheme>[a-z]+)://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:(?P<port>[0-9]{1,5}))?"
    r"(?P<rest>.*)"
)


@dataclass(frozen=True, slots=True)
class ClusterTls:
    """Files for TLS to etcd; ``ca`` None: the system's CAs. ``cert``/``key`` together."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class ClusterAuth:
    """etcd user authentication: the password is read from ``password_file`` at start."""

    user: str
    password_file: Path


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``[cluster]``: where the fleet's shared state lives, and who this instance is."""

    endpoints: tuple[str, ...]
    prefix: str
    instance: str
    lease_s: int = DEFAULT_LEASE_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    tls: ClusterTls | None = None
    auth: ClusterAuth | None = None


def read_cluster(table: Table, base_dir: Path) -> ClusterConfig | None:
    """``[cluster]`` from ``table`` (its issues recorded there); None when any key is bad."""
    endpoints = _read_endpoints(table)
    prefix = table.required_string("prefix")
    if prefix is not None and not PREFIX_RE.fullmatch(prefix):
        table.fail("prefix", f"{prefix!r} must look like /name or /name/name ({NAME_RE.pattern})")
        prefix = None
    instance: str | None = os.uname().nodename
    if table.has("instance"):
        instance = table.required_string("instance")
    if instance is not None and not NAME_RE.fullmatch(instance):
        table.fail("instance", f"{instance!r} must match {NAME_RE.pattern}")
        instance = None
    lease_s = table.integer("lease_s", DEFAULT_LEASE_S, MIN_LEASE_S, MAX_LEASE_S)
    timeout_s = table.seconds("timeout_s", DEFAULT_TIMEOUT_S)
    tls = _read_tls(table.table("tls", _TLS_KEYS), base_dir) if table.has("tls") else None
    if tls is not None and endpoints and not all(e.startswith("https://") for e in endpoints):
        table.fail("tls", "TLS needs https:// endpoints")
    auth = _read_auth(table.table("auth", _AUTH_KEYS), base_dir) if table.has("auth") else None
    if endpoints is None or prefix is None or instance is None:
        return None
    return ClusterConfig(endpoints, prefix, instance, lease_s, timeout_s, tls, auth)


def _read_endpoints(table: Table) -> tuple[str, ...] | None:
    value = table.data.get("endpoints")
    if value is None:
        table.fail("endpoints", "required key is missing")
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        table.fail("endpoints", 'expected a list of URLs, e.g. ["http://127.0.0.1:2379"]')
        return None
    endpoints = []
    for text in value:
        problem = endpoint_problem(text)
        if problem is not None:
            table.fail("endpoints", f"{text!r}: {problem}")
            return None
        endpoints.append(text.rstrip("/"))
    return tuple(endpoints)


def endpoint_problem(text: str) -> str | None:
    """Why ``text`` is not an etcd client URL (``http(s)://host:port``), or None."""
    match = _ENDPOINT_RE.fullmatch(text)
    if match is None:
        return (
            "the scheme must be http or https"
            if "://" not in text
            else "expected scheme://host:port"
        )
    if match["scheme"] not in ("http", "https"):
        return "the scheme must be http or https"
    if match["port"] is None or not 0 < int(match["port"]) < 65536:
        return "expected scheme://host:port"
    if match["rest"] not in ("", "/"):
        return "no path, query or fragment: etcd's API paths are fixed"
    return None


def _read_tls(table: Table, base_dir: Path) -> ClusterTls:
    files = {key: _existing_file(table, key, base_dir) for key in _TLS_KEYS if table.has(key)}
    if ("cert" in files) != ("key" in files):
        table.fail("cert" if "cert" not in files else "key", "cert and key go together")
    return ClusterTls(files.get("ca"), files.get("cert"), files.get("key"))


def _read_auth(table: Table, base_dir: Path) -> ClusterAuth | None:
    user = table.required_string("user")
    if not table.has("password_file"):
        table.fail("password_file", "required key is missing")
        return None
    password_file = _existing_file(table, "password_file", base_dir)
    if user is None or password_file is None:
        return None
    if not user:
        table.fail("user", "must not be empty")
        return None
    return ClusterAuth(user, password_file)


def _existing_file(table: Table, key: str, base_dir: Path) -> Path | None:
    text = table.required_string(key)
    if text is None:
        return None
    if not text:
        table.fail(key, "must not be empty")
        return None
    path = base_dir / Path(text)
    if not os.path.isfile(path):
        table.fail(key, f"file not found: {path}")
        return None
    return path
