"""The status page's one source of truth: the ``/status.json`` document, and the page itself.

``StatusBoard.document()`` reads what the daemon already keeps -- the backends' servers (pool,
admin, health, weight, pair), the health checker's latest probe per server, the metrics
snapshot (requests, in-flight requests and open connections, summed over worker processes by
the same ``SnapshotSource`` a scrape uses), the events timeline and the sticky census -- and
returns one JSON-able dict: per backend, per host, the main and its pair side by side, which
member serves the host's users now (``Backend.select_sticky``, the very rule the proxy
applies), and how many distinct users the census saw on it. ``status.html`` (package data,
no build step, nothing fetched from outside) polls it once a second and redraws. The board
also slides the census windows (``slide_census_forever``, a task of the endpoint).

Cost: building the document reads counters the hot path already bumps and never touches a
connection: 1.4 ms for the demo's 5 servers, census included, 0.015 ms to serialize a cached
one (timeit, shared 2-core box). It is cached for ``CACHE_S``, so ten open tabs cost at most
four builds a second, and the census is estimated at most once per ``CENSUS_CACHE_S``.
Requests per second are the difference of two snapshots at least ``RATE_MIN_S`` apart.

Server addresses are left out: the metrics listener may face a whole network for Prometheus,
and the page does not need them. There is no *queue* column: zdlb queues no request (no
``maxconn``), a request it cannot place is answered at once.

No I/O here but reading the page from the package (``page()``, once per endpoint), no
prometheus-client.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Protocol

from zdlb import __version__
from zdlb.balancer.pool import Backend
from zdlb.balancer.server import Server
from zdlb.census import STANDARD_ERROR, Census
from zdlb.config.model import PoolName
from zdlb.events import Timeline
from zdlb.metrics.collector import SnapshotSource
from zdlb.stats import Snapshot

# Ten tabs polling every second share one build: a build is ~0.1 ms per server.
CACHE_S = 0.25
# A census estimate is ~0.5 ms per host (4,096 registers merged over 5 slices); once a second
# is as fresh as a person can read.
CENSUS_CACHE_S = 1.0
# requests/s over at least this long: shorter would jitter with every poll; a sample is kept
# per build, the oldest beyond RATE_MAX_S dropped.
RATE_MIN_S = 1.0
RATE_MAX_S = 10.0
# The timeline shows the latest events; the ring keeps more (events.DEFAULT_CAPACITY).
EVENTS_SHOWN = 50


class CheckRecord(Protocol):
    """A server's latest probe, as ``health.probes.ProbeResult`` has it."""

    @property
    def passed(self) -> bool: ...

    @property
    def detail(self) -> str: ...

    @property
    def duration_s(self) -> float: ...


class CheckSource(Protocol):
    """Where the latest probe of a server and its time are; ``HealthChecker`` is one."""

    def last_result(self, server: Server) -> CheckRecord | None: ...

    def checked_at(self, server: Server) -> float | None: ...


def page() -> tuple[bytes, bytes]:
    """The status page (``status.html``, package data) and its Content-Security-Policy.

    The policy allows the page's one inline script by its SHA-256 and nothing else from
    anywhere: no other script, no frame around it (clickjacking the admin buttons), requests
    to its own origin only.
    """
    html = resources.files("zdlb.metrics").joinpath("status.html").read_bytes()
    script = html.split(b"<script>", 1)[1].split(b"</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script).digest())
    policy = (
        b"default-src 'none'; script-src 'sha256-%s'; style-src 'unsafe-inline'; "
        b"connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'" % digest
    )
    return html, policy


class StatusBoard:
    """Builds the status document of one running daemon (``document``), cached briefly.

    ``clock`` is the wall clock for people (event and check times); ``monotonic`` is the
    loop's clock, which drain deadlines and rates use. ``is_admin``: the page may offer
    write actions (the endpoint enforces it; the page only shows the buttons).
    """

    def __init__(
        self,
        backends: Mapping[str, Backend],
        checks: CheckSource,
        events: Timeline,
        snapshot: SnapshotSource,
        census: Mapping[str, Census] | None = None,
        *,
        is_admin: bool = False,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backends = backends
        self._checks = checks
        self._events = events
        self._snapshot = snapshot
        self._census = census or {}
        self.is_admin = is_admin
        self._clock = clock
        self._monotonic = monotonic
        self._started_at = monotonic()
        self._samples: deque[tuple[float, dict[str, int]]] = deque()
        self._cached: tuple[float, dict[str, object]] | None = None
        self._users: tuple[float, dict[str, dict[str, int]]] | None = None

    def replace(
        self, backends: Mapping[str, Backend], checks: CheckSource, census: Mapping[str, Census]
    ) -> None:
        """A reload switched the running configuration: show the new one from now on."""
        self._backends = backends
        self._checks = checks
        self._census = census
        self._cached = self._users = None

    def document(self) -> dict[str, object]:
        """The /status.json document (a fresh dict only every ``CACHE_S``)."""
        now = self._monotonic()
        if self._cached is not None and now - self._cached[0] < CACHE_S:
            return self._cached[1]
        snap = self._snapshot()
        rates = self._rates(now, snap)
        users = self._user_counts(now)
        doc: dict[str, object] = {
            "version": __version__,
            "generated_at": round(self._clock(), 3),
            "uptime_s": round(now - self._started_at, 1),
            "is_admin": self.is_admin,
            "census_error": round(STANDARD_ERROR, 4),
            "backends": [
                self._backend(backend, snap, rates, users.get(name), now)
                for name, backend in self._backends.items()
            ],
            "listeners": [
                {"name": name, "connections_open": listener["connections_open"]}
                for name, listener in snap["listeners"].items()
            ],
            "events": [event.as_json() for event in self._events.newest_first(EVENTS_SHOWN)],
        }
        self._cached = (now, doc)
        return doc

    async def slide_census_forever(self) -> None:
        """Slide every census window on time (``Census.tick``), until cancelled; the
        endpoint serving this board runs it. Ticks 4 times a slice: a slice ends at most a
        quarter slice late."""
        if not self._census:
            return
        interval_s = min(census.slice_s for census in self._census.values()) / 4
        while True:
            now = self._monotonic()
            for census in self._census.values():
                census.tick(now)
            await asyncio.sleep(interval_s)

    def _backend(
        self,
        backend: Backend,
        snap: Snapshot,
        rates: Mapping[str, float | None],
        users: Mapping[str, int] | None,
        now: float,
    ) -> dict[str, object]:
        census = self._census.get(backend.name)
        counts = snap["servers"].get(backend.name, {})
        hosts = []
        for identity, members in _hosts(backend):
            serving = backend.select_sticky(identity, now)
            rows = [
                self._server(server, counts.get(server.name), rates.get(_key(server)))
                for server in members
            ]
            hosts.append(
                {
                    "host": identity,
                    "serving": serving.name if serving is not None else None,
                    "users": users.get(identity, 0) if users is not None else None,
                    "members": rows,
                }
            )
        sticky = backend.config.sticky
        return {
            "name": backend.name,
            "balance": backend.balance.value,
            "sticky_cookie": sticky.cookie if sticky is not None else None,
            "census_window_s": census.window_s if census is not None else None,
            "hosts": hosts,
        }

    def _server(
        self, server: Server, counts: Mapping[str, object] | None, rate: float | None
    ) -> dict[str, object]:
        state = counts.get("state") if counts is not None else None
        inflight, conns = (0, 0)
        if isinstance(state, dict):
            inflight, conns = state["inflight"], state["conns"]
        result = self._checks.last_result(server)
        check = None
        if result is not None:
            check = {
                "passed": result.passed,
                "detail": result.detail,
                "duration_ms": round(result.duration_s * 1000, 1),
                "at": self._checks.checked_at(server),
            }
        return {
            "name": server.name,
            "role": _role(server),
            "pool": server.pool.value,
            "admin": server.admin.value,
            "health": server.health.value,
            "weight": server.weight,
            "check": check,
            "requests": counts.get("requests", 0) if counts is not None else 0,
            "requests_per_s": None if rate is None else round(rate, 1),
            "inflight": inflight,
            "conns": conns,
        }

    def _rates(self, now: float, snap: Snapshot) -> dict[str, float | None]:
        """requests/s per ``backend/server`` since the newest sample at least RATE_MIN_S old."""
        totals = {
            f"{backend}/{name}": server["requests"]
            for backend, servers in snap["servers"].items()
            for name, server in servers.items()
        }
        samples = self._samples
        while samples and now - samples[0][0] > RATE_MAX_S:
            samples.popleft()
        base = None
        for at, old in reversed(samples):
            if now - at >= RATE_MIN_S:
                base = (at, old)
                break
        if not samples or now - samples[-1][0] >= CACHE_S:
            samples.append((now, totals))
        if base is None:
            return dict.fromkeys(totals)
        elapsed = now - base[0]
        return {key: max(0, count - base[1].get(key, 0)) / elapsed for key, count in totals.items()}

    def _user_counts(self, now: float) -> dict[str, dict[str, int]]:
        if self._users is None or now - self._users[0] >= CENSUS_CACHE_S:
            self._users = (now, {name: census.counts() for name, census in self._census.items()})
        return self._users[1]


def _hosts(backend: Backend) -> list[tuple[str, Sequence[Server]]]:
    """Each host (sticky identity) with its members, the configured main first."""
    hosts: dict[str, list[Server]] = {}
    for server in backend.servers:
        members = hosts.setdefault(server.identity, [])
        if server.config.pair is None:
            members.insert(0, server)
        else:
            members.append(server)
    return list(hosts.items())


def _role(server: Server) -> str:
    """ "main" (configured main), "pair" (a paired backup) or "backup" (an unpaired one)."""
    if server.config.pair is not None:
        return "pair"
    return "main" if server.config.pool is PoolName.MAIN else "backup"


def _key(server: Server) -> str:
    return f"{server.backend}/{server.name}"
