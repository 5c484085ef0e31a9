"""The configuration model: frozen, slotted dataclasses, built once by ``config.load``.

Components receive only their slice of this model as constructor arguments; nothing here reads
a file, the environment or a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from zdlb.config.cluster import ClusterConfig
from zdlb.config.routing import Routing

# Timeout defaults follow HAProxy's recommended values (`timeout connect 5s`, `client 30s`,
# `server 30s`, `http-request 10s`).
DEFAULT_CONNECT_S = 5.0
DEFAULT_CLIENT_S = 30.0
DEFAULT_HTTP_REQUEST_S = 10.0
DEFAULT_SERVER_S = 30.0
DEFAULT_GRACE_S = 10.0
# A request waiting for a slot on a server at its `maxconn` waits this long, then gets 503:
# HAProxy's `timeout queue` defaults to `timeout connect`, whose recommended value is 5 s.
DEFAULT_QUEUE_S = 5.0
# A request body must keep arriving: no byte for this long, or an average below
# DEFAULT_MIN_BODY_RATE after it, gets 408. Apache's mod_reqtimeout defaults (body=20,
# MinRate=500): a phone on a bad 2G link (~2 KB/s) passes, a body trickled to hold a
# connection does not. nginx's client_body_timeout is 60 s between two reads, with no rate.
DEFAULT_CLIENT_BODY_S = 20.0
DEFAULT_MIN_BODY_RATE = 500  # bytes per second, averaged from the start of the body
# Idle pooled upstream connections are closed after this long. It must stay below the servers'
# own keep-alive timeout so zdlb, not the server, closes them: gunicorn defaults to 2 s, uvicorn
# to 5 s, Apache to 5 s, nginx to 75 s. A race is still possible, hence the retry-once rule.
DEFAULT_UPSTREAM_IDLE_S = 1.5

# Head limits. nginx rejects a request line over 8 KiB (large_client_header_buffers 4 8k) with
# 414; h11 refuses heads over 16 KiB; we allow 32 KiB of head in total and 100 header fields
# (Apache's LimitRequestFields default) before answering 431.
DEFAULT_MAX_LINE_BYTES = 8192
DEFAULT_MAX_HEAD_BYTES = 32768
DEFAULT_MAX_HEADERS = 100

# Idle keep-alive connections kept per server. Enough for a busy client pool on one process
# without letting a burst leave thousands of sockets open on the server.
DEFAULT_MAX_IDLE_PER_SERVER = 64
DEFAULT_WEIGHT = 100
MAX_WEIGHT = 256  # HAProxy's range for `weight`
DEFAULT_RETRIES = 2
# An idle TCP tunnel (tcp listener, or an upgraded HTTP connection) closes after this: HAProxy's
# recommended `timeout tunnel 1h`, long enough for a quiet WebSocket with pings every minute.
DEFAULT_TUNNEL_S = 3600.0
# Splice pipes: 1 MiB cost 24-30% less CPU per GiB than 64 KiB (benchmarks/bulk.sh; the
# figures are in tcp/pipes.py).
DEFAULT_PIPE_BYTES = 1 << 20
# HTTP bodies with at least this many Content-Length bytes left after the first read are
# spliced (http/splice.py). benchmarks/bulk_http.sh, CPU per GiB spliced vs not: downloads
# 0.60-0.72x from 768 KiB bodies, even at 384-512 KiB, 1.13-1.16x at 256-320 KiB (a few KB left
# after the first 256,000-byte read: ~25 us of setup for nothing); uploads 0.86-1.12x at 1 MiB,
# 0.86x at 16 MiB, 0.27x at 256 MiB. At 1 MiB no size measured loses.
DEFAULT_SPLICE_MIN_BYTES = 1 << 20
MIN_PIPE_BYTES = 4096  # one page: the kernel's smallest pipe
MAX_PIPE_BYTES = 1 << 20  # /proc/sys/fs/pipe-max-size's default for unprivileged processes
# Sticky users of a drained server stay on it this long (5 minutes: most web sessions make
# a request well within that), then move, so a drain always ends.
DEFAULT_DRAIN_STICKY_S = 300.0


# `workers` above this is a typo, not a machine: each worker is a process with its own memory.
MAX_WORKERS = 256


class ListenerMode(enum.Enum):
    HTTP = "http"
    TCP = "tcp"


class Balance(enum.Enum):
    ROUNDROBIN = "roundrobin"  # smooth weighted round robin (nginx's algorithm)
    LEASTCONN = "leastconn"  # fewest in-flight requests per unit of weight
    RANDOM = "random"  # weighted power of two random choices
    SOURCE = "source"  # hash of the client address: L4 stickiness


class Reuse(enum.Enum):
    """Which requests may go on an idle pooled upstream connection (HAProxy's ``http-reuse``).

    A pooled connection served another client before; if its server sends a stray answer, the
    next request on it receives that answer. ``safe`` keeps each client connection's first
    request on a connection of its own, so a stray can only reach the client that caused it.
    """

    SAFE = "safe"  # HAProxy's default: a client's later requests only
    ALWAYS = "always"  # any request, the first included: cheaper for Connection: close clients
    NEVER = "never"  # every request on a new connection; nothing is pooled


class PoolName(enum.Enum):
    MAIN = "main"
    BACKUP = "backup"


class CheckKind(enum.Enum):
    TCP = "tcp"  # the server accepts a TCP connection
    HTTP = "http"  # the server answers an HTTP request as expected


# Active check defaults are HAProxy's: `inter 2s`, `fastinter` (here 0.5 s, used while a server
# is between states), `rise 2`, `fall 3`; a probe must answer within 1 s.
DEFAULT_CHECK_INTERVAL_S = 2.0
DEFAULT_CHECK_FAST_INTERVAL_S = 0.5
DEFAULT_CHECK_TIMEOUT_S = 1.0
DEFAULT_CHECK_RISE = 2
DEFAULT_CHECK_FALL = 3
# Passive observation: this many consecutive connect failures or 5xx answers on live traffic
# mark a server down at once (HAProxy's `observe layer7` + `error-limit` defaults to 10; a
# deploy wants a faster reaction).
DEFAULT_OBSERVE_ERRORS = 3


class TlsVersion(enum.Enum):
    """The oldest protocol a TLS listener accepts. 1.0 and 1.1 are not offered: RFC 8996
    deprecated them, and every client of the last decade speaks 1.2."""

    TLS1_2 = "1.2"
    TLS1_3 = "1.3"


# Mozilla's "intermediate" TLS 1.2 suites (ssl-config.mozilla.org, v5.7): forward secret AEAD
# only. TLS 1.3 suites are OpenSSL's defaults (all AEAD); Python's ssl cannot set them.
DEFAULT_TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# Certificate files are checked for a new mtime this often (tls/listener.py): a renewal tool
# (certbot, acme.sh) replacing them is picked up within a minute, at one stat() per file.
DEFAULT_TLS_WATCH_S = 60.0
# An expiring certificate is logged, shown in `show info` and flagged in metrics below this.
TLS_EXPIRY_WARNING_S = 14 * 86400.0


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines in seconds. Any listener or backend may override any of them."""

    connect_s: float = DEFAULT_CONNECT_S
    client_s: float = DEFAULT_CLIENT_S  # idle between requests on a client keep-alive connection
    http_request_s: float = DEFAULT_HTTP_REQUEST_S  # the whole request head must arrive in this
    server_s: float = DEFAULT_SERVER_S  # response head, and each read or write of a body
    grace_s: float = DEFAULT_GRACE_S  # on shutdown, how long in-flight requests may finish
    upstream_idle_s: float = DEFAULT_UPSTREAM_IDLE_S  # pooled idle upstream connection lifetime
    tunnel_s: float = DEFAULT_TUNNEL_S  # a TCP tunnel with no bytes either way closes after this
    queue_s: float = DEFAULT_QUEUE_S  # a request waits this long for a server under maxconn
    client_body_s: float = DEFAULT_CLIENT_BODY_S  # a request body silent this long gets 408


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request head limits enforced before anything is forwarded."""

    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES  # request line; over it: 414
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES  # whole head; over it: 431
    max_headers: int = DEFAULT_MAX_HEADERS  # header fields; over it: 431
    # A request body must average this many bytes per second after its first client_body_s
    # (0: no minimum rate); slower gets 408.
    min_body_rate: int = DEFAULT_MIN_BODY_RATE


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint. ``host`` is an IP literal or a name; IPv6 without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class CheckConfig:
    """How a server's health is checked. Statuses are inclusive ranges: (200, 399) by default."""

    kind: CheckKind = CheckKind.TCP
    interval_s: float = DEFAULT_CHECK_INTERVAL_S
    fast_interval_s: float = DEFAULT_CHECK_FAST_INTERVAL_S  # while rising or falling
    timeout_s: float = DEFAULT_CHECK_TIMEOUT_S
    rise: int = DEFAULT_CHECK_RISE  # consecutive passes that bring a down server up
    fall: int = DEFAULT_CHECK_FALL  # consecutive failures that take an up server down
    method: str = "GET"  # http only
    path: str = "/"  # http only
    host: str | None = None  # http only: Host header; the server's address when unset
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)  # http only
    expect_body: str | None = None  # http only: a substring the body must contain
    address: Address | None = None  # probe this endpoint instead of the server's address
    port: int | None = None  # probe the server's host on this port
    observe: bool = False  # passive: live-traffic errors also count
    observe_errors: int = DEFAULT_OBSERVE_ERRORS  # consecutive ones that mark it down at once


@dataclass(frozen=True, slots=True)
class CertificateConfig:
    """One certificate of a TLS listener: a PEM chain (leaf first) and its key, and what
    config/tls.py read from the leaf when it validated the pair."""

    cert_file: Path
    key_file: Path  # the cert file itself when the key is in it
    names: tuple[str, ...]  # DNS names it serves (subjectAltName, else the CN), lower case
    not_after: float  # expiry, seconds since the epoch
    # (mtime_ns, size) of the cert and key files when read: a reload after a renewal is a
    # change of config (the listener's contexts are rebuilt), as is the watcher's look.
    files: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class ListenerTlsConfig:
    """``[listeners.NAME.tls]``: TLS termination. The first certificate is the default, served
    to clients whose SNI name matches no other (or who send none)."""

    certificates: tuple[CertificateConfig, ...]
    min_version: TlsVersion = TlsVersion.TLS1_2
    ciphers: str = DEFAULT_TLS_CIPHERS  # TLS 1.2 suites, OpenSSL syntax
    alpn: tuple[str, ...] = ("http/1.1",)  # offered protocols; () for none (tcp listeners)
    session_tickets: bool = True  # resumption by tickets (and by session id for TLS 1.2)
    hsts_max_age: int | None = None  # http only: Strict-Transport-Security max-age; None: off
    handshake_s: float = DEFAULT_HTTP_REQUEST_S  # a handshake not done within this is closed
    watch_s: float = DEFAULT_TLS_WATCH_S  # certificate files' mtime checked this often


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    """``[backends.NAME] tls = true``: connect to the servers over TLS (checks too)."""

    verify: bool = True  # the server's certificate must chain to ca_file and name sni
    ca_file: Path | None = None  # None: the system's trust store
    sni: str | None = None  # server name sent and verified; None: each server's host


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    address: Address
    weight: int = DEFAULT_WEIGHT  # 0..256; 0 takes no new requests
    pool: PoolName = PoolName.MAIN
    max_idle: int = DEFAULT_MAX_IDLE_PER_SERVER  # idle keep-alive connections kept to it
    check: CheckConfig | None = None  # None: never checked, always up (unless observed down)
    # On a backup server only: the main server it pairs with, the same host's other version.
    # It stands in for that main whenever the main is not usable, and shares its cookie.
    pair: str | None = None
    # At most this many requests in flight to it at once (per process: workers share it out);
    # the next ones wait in a queue for up to queue_s (balancer/queue.py). None: no limit.
    maxconn: int | None = None
    tls: UpstreamTlsConfig | None = None  # its backend's: connections and checks use TLS


class SameSite(enum.Enum):
    LAX = "lax"
    STRICT = "strict"
    NONE = "none"  # browsers accept it only with `secure`; load.py enforces that


@dataclass(frozen=True, slots=True)
class StickyConfig:
    """``[backends.X.sticky]``: pin each client to a server with a cookie zdlb inserts."""

    cookie: str  # the cookie's name, e.g. "SERVERID"
    secret: str | None = None  # signs values (HMAC-SHA256) so a client cannot forge another id
    path: str = "/"
    domain: str | None = None
    secure: bool = False
    httponly: bool = True
    samesite: SameSite = SameSite.LAX
    max_age: int | None = None  # None: a session cookie, gone when the browser closes
    nocache: bool = False  # add `Cache-Control: private` to responses that set the cookie
    drain_sticky_s: float = DEFAULT_DRAIN_STICKY_S  # a drained server keeps its users this long


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    servers: tuple[ServerConfig, ...]
    balance: Balance = Balance.ROUNDROBIN
    retries: int = DEFAULT_RETRIES  # connect failures retried on another server
    all_backups: bool = False  # False: only the first usable backup serves (HAProxy's default)
    timeouts: Timeouts = field(default_factory=Timeouts)
    sticky: StickyConfig | None = None  # None: no sticky cookie
    reuse: Reuse = Reuse.SAFE  # which requests may use idle pooled upstream connections
    tls: UpstreamTlsConfig | None = None  # None: plain TCP to the servers


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    bind: Address
    backend: str  # the default backend; "" only for an http listener whose routes all decide
    mode: ListenerMode = ListenerMode.HTTP
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    backlog: int = 1024
    x_forwarded_proto: str = "http"  # the scheme clients used; "https" behind a TLS terminator
    # Tunnels (tcp listeners, and HTTP connections upgraded by a 101, e.g. WebSocket): move
    # bytes with os.splice (false: recv/send copies), through pipes of pipe_bytes.
    splice: bool = True
    pipe_bytes: int = DEFAULT_PIPE_BYTES
    # HTTP request and response bodies with at least this many Content-Length bytes left after
    # the first read are spliced too (needs splice); None: never.
    splice_min_bytes: int | None = DEFAULT_SPLICE_MIN_BYTES
    # Client connections open at once on this listener, per process; at the limit it stops
    # accepting (the kernel's backlog holds new clients) until one closes. None: no own limit.
    maxconn: int | None = None
    # http only: routes choosing a backend per request, and header rules (config/routing.py).
    routing: Routing = field(default_factory=Routing)
    tls: ListenerTlsConfig | None = None  # None: plain TCP; else TLS is terminated here


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The control socket. ``socket`` None: no control socket."""

    socket: Path | None = None  # a UNIX stream socket, relative to the config file
    group: str | None = None  # None: mode 0600, owner only; a group: 0660 and that group
    state_file: Path | None = None  # runtime changes journaled here survive restarts


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint and status page. ``listen`` None: no endpoint.
    ``admin``: the status page may flip, drain and ready servers (loopback ``listen`` only)."""

    listen: Address | None = None
    admin: bool = False


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    access_log: bool = True  # one line per request on the `zdlb.access` logger
    level: str = "info"
    format: LogFormat = LogFormat.TEXT


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration. ``source`` is the file it came from, for messages."""

    source: str
    listeners: tuple[ListenerConfig, ...]
    backends: tuple[BackendConfig, ...]
    defaults: Timeouts = field(default_factory=Timeouts)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # Worker processes accepting on the listeners (1: one process does everything). None: one
    # per core this process may run on, decided at start (daemon/workers.py), not here.
    workers: int | None = None
    # Client connections open at once in one process, all listeners together (nginx's
    # worker_connections). None: derived from the open-file limit at start (zdlb/budget.py).
    maxconn: int | None = None
    cluster: ClusterConfig | None = None  # [cluster]: a fleet sharing state in etcd (issue 16)

    def backend(self, name: str) -> BackendConfig:
        """The backend called ``name``; load.py guarantees every listener's backend exists."""
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)
