"""What every connection of one HTTP listener shares (``Route``): where its requests go (one
``Destination`` per backend and route, chosen by http/routing.py's ``Router`` when the listener
has routes), and the sweeper that enforces their deadlines.

Deadlines are not timer handles: each connection keeps one ``deadline`` and a sweeper task
(``Route.sweep``) closes the ones past it. Re-arming a float costs nothing on the hot path,
where a ``call_later`` per request would cost a heap push and a cancel. Tunnels are swept the
same way, on the activity their pumps mark. The connections themselves are
http/connection.py's, seen here only through ``ListenedConnection``; this module holds no
per-request code.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

from zdlb.balancer.queue import attach_queues
from zdlb.budget import ListenerGate, lone_gate
from zdlb.config.model import ListenerConfig, Reuse
from zdlb.config.routing import HeaderRules, RouteRule, backends_of
from zdlb.http.exchange import Phase, may_reuse
from zdlb.http.head import RequestHead, RequestHeadParser
from zdlb.http.headrules import HeadEdit, Redirection, edit_for
from zdlb.http.routing import Router
from zdlb.http.upgrade import Tunnel, TunnelSettings
from zdlb.http.upstream import ServerConnections
from zdlb.stats import BackendStats, ListenerStats

if TYPE_CHECKING:
    from zdlb.balancer.pool import Backend
    from zdlb.balancer.server import Server
    from zdlb.balancer.sticky import StickyCookie
    from zdlb.census import Census


class ListenedConnection(Protocol):
    """What the listener needs of each of its client connections (http/connection.py)."""

    deadline: float
    tunnel: Tunnel | None
    phase: Phase

    def deadline_passed(self) -> None: ...
    def close_when_idle(self) -> None: ...
    def abort(self) -> None: ...
    def move_to(self, route: Route) -> None: ...
    def detach_idle(self) -> socket.socket | None: ...


def _ignore_observation(server: Server, ok: bool) -> None:
    """The default when no health checker runs: live traffic reports to nobody."""


def _splice_min_bytes(tunnel: TunnelSettings) -> float:
    """The body length from which responses are spliced; infinity: never (no splice)."""
    if tunnel.splice_min_bytes is None or not tunnel.is_splicing:
        return math.inf
    return float(max(1, tunnel.splice_min_bytes))  # 0 bytes left: nothing to splice


def _deadline_of(conn: ListenedConnection) -> float:
    return conn.deadline


def _call_soon(callback: Callable[[], None]) -> None:
    """Run ``callback`` after the current one: a queue re-places its waiters once a state
    change is complete (balancer/queue.py, rule 4)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop (a synchronous caller): nothing else can run meanwhile
        callback()
    else:
        loop.call_soon(callback)


def _attach_queues(backend: Backend) -> None:
    """Give ``backend`` its request queues once, if a server of it has a ``maxconn``."""
    if any(s.waitq is not None for s in backend.servers):
        return  # another listener of the backend did
    attach_queues(backend, backend.processes, _call_soon, time.monotonic)


@dataclass(slots=True)
class BackendLink:
    """What a route needs of one backend it sends to: built by the runtime, shared by every
    route of the listener that names the backend (one pool and sticky cookie per server)."""

    backend: Backend
    upstreams: dict[str, ServerConnections]  # by server name
    sticky: StickyCookie | None = None
    census: Census | None = None  # distinct users per host, fed by pins (http/connection.py)
    stats: BackendStats = field(default_factory=BackendStats)


class Destination:
    """One backend as a request chosen for it sees it: the backend's pools and settings, read
    per request, and the header edits of the route that chose it (None: no rule)."""

    __slots__ = (
        "backend",
        "backend_stats",
        "census",
        "queue_s",
        "request_edit",
        "response_edit",
        "retries",
        "retry_after",
        "reuse",
        "reuse_first",
        "reuse_later",
        "server_s",
        "sticky",
        "upstreams",
    )
    is_local: ClassVar[Literal[False]] = False  # see LocalAnswer

    def __init__(
        self, link: BackendLink, request_edit: HeadEdit | None, response_edit: HeadEdit | None
    ) -> None:
        backend = link.backend
        self.backend = backend
        self.upstreams = link.upstreams
        self.sticky = link.sticky
        self.census = link.census
        self.backend_stats = link.stats  # plain counters the hot path adds to (metrics/)
        self.server_s = backend.config.timeouts.server_s
        # A request queued for a server at its maxconn waits queue_s, then gets 503 with a
        # Retry-After of as long, rounded up: the queue was full that long (balancer/queue.py).
        self.queue_s = backend.config.timeouts.queue_s
        self.retry_after = max(1, math.ceil(self.queue_s))
        _attach_queues(backend)
        self.retries = backend.config.retries
        self.reuse: Reuse = backend.config.reuse
        # exchange.py's rule 3 for this backend's policy, resolved once: read per request.
        self.reuse_first = may_reuse(self.reuse, is_first_request=True, is_upgrade=False)
        self.reuse_later = may_reuse(self.reuse, is_first_request=False, is_upgrade=False)
        self.request_edit = request_edit
        self.response_edit = response_edit

    def __repr__(self) -> str:
        edits = "" if self.request_edit is None and self.response_edit is None else " +edits"
        return f"<Destination {self.backend.name}{edits}>"


class LocalAnswer:
    """A route that zdlb answers itself: a redirect, or no route matched (``status``)."""

    __slots__ = ("redirect", "status")
    is_local: ClassVar[Literal[True]] = True  # the connection tells the two kinds apart by it

    def __init__(self, status: int, redirect: Redirection | None = None) -> None:
        self.status = status
        self.redirect = redirect

    def __repr__(self) -> str:
        return f"<LocalAnswer {self.status if self.redirect is None else self.redirect}>"

    def answer(self, head: RequestHead) -> tuple[int, bytes | None]:
        """The status and Location to answer ``head`` with (400: no host to redirect to)."""
        redirect = self.redirect
        if redirect is None:
            return self.status, None
        location = redirect.location_for(head)
        return (400, None) if location is None else (redirect.status, location)


def _outcome(
    rule: RouteRule, links: dict[str, BackendLink], request: HeaderRules, response: HeaderRules
) -> Destination | LocalAnswer:
    if rule.redirect is not None:
        return LocalAnswer(rule.redirect.status, Redirection(rule.redirect))
    assert rule.backend is not None  # config/routing.py: a backend or a redirect
    return Destination(
        links[rule.backend],
        edit_for(request, rule.request_headers),
        edit_for(response, rule.response_headers),
    )


def _hsts_line(listener: ListenerConfig) -> bytes:
    """The Strict-Transport-Security field a TLS listener adds to answers (RFC 6797), or b""."""
    tls = listener.tls
    if tls is None or tls.hsts_max_age is None:
        return b""
    return b"Strict-Transport-Security: max-age=%d\r\n" % tls.hsts_max_age


class Route:
    """What every connection of one HTTP listener shares: where requests go, pools, settings.

    ``destination`` serves every request of a listener without routes (no call to choose);
    with routes it is None and ``router.pick`` chooses per request.
    """

    def __init__(
        self,
        listener: ListenerConfig,
        links: Sequence[BackendLink],
        *,
        log_access: bool,
        observe: Callable[[Server, bool], None] = _ignore_observation,
        stats: ListenerStats | None = None,
        tunnel: TunnelSettings | None = None,
        gate: ListenerGate | None = None,
    ) -> None:
        """``links``: one per backend of ``backends_of(listener)``, in that order."""
        self.listener = listener
        # Metrics: plain counters the hot path adds to (a scrape reads them; metrics/).
        self.stats = stats if stats is not None else ListenerStats()
        # The listener's share of the connection budget (budget.py), kept across reloads.
        self.gate = gate if gate is not None else lone_gate(listener, self.stats)
        self.observe = observe  # passive health: called for servers with is_observed only
        by_name = {link.backend.name: link for link in links}
        assert tuple(by_name) == backends_of(listener.backend, listener.routing), by_name
        routing = listener.routing
        request, response = routing.request_headers, routing.response_headers
        default: Destination | LocalAnswer = LocalAnswer(routing.unmatched_status)
        if listener.backend:
            default = Destination(by_name[listener.backend], edit_for(request), edit_for(response))
        self.router: Router[Destination | LocalAnswer] = Router(
            [(rule, _outcome(rule, by_name, request, response)) for rule in routing.rules],
            default,
        )
        self.destination: Destination | None = None
        if not routing.rules and not default.is_local:
            self.destination = default
        # The default backend, else the first a route names; None: every route redirects.
        self.backend = links[0].backend if links else None
        self.links = tuple(links)
        # Every pool of every backend, by server (a name may repeat across backends).
        self.upstreams = {p.server: p for link in links for p in link.upstreams.values()}
        self.log_access = log_access
        self.timeouts = listener.timeouts
        self.proto = listener.x_forwarded_proto.encode()
        self.head_parser = RequestHeadParser(listener.limits)  # one for all its connections
        self.connections: set[ListenedConnection] = set()
        # Connections in Phase.TUNNEL: the sweeper needs their tunnel only.
        self.tunnels: set[ListenedConnection] = set()
        if tunnel is None:
            tunnel = TunnelSettings(
                listener.timeouts.tunnel_s,
                listener.splice,
                listener.pipe_bytes,
                listener.splice_min_bytes,
            )
        self.tunnel = tunnel
        self.tunnel_pool = tunnel.new_pool()
        # TLS (issue 14): TLS on either side keeps bytes in the ssl transports: no body splice,
        # 101 tunnels relayed between transports (tls/relay.py), no idle handoff; HSTS added.
        self.is_tls = listener.tls is not None or any(
            link.backend.config.tls is not None for link in links
        )
        self.hsts = _hsts_line(listener)
        self.splice_min_bytes = math.inf if self.is_tls else _splice_min_bytes(tunnel)
        self.is_stopping = False
        self.drained = asyncio.Event()  # set once stopping and the last connection closed
        # Set by a reload (daemon/reload.py): connections move to it between requests.
        self.successor: Route | None = None

    def __repr__(self) -> str:
        names = ",".join(link.backend.name for link in self.links) or "-"
        return (
            f"<Route {self.listener.name} -> {names} conns={len(self.connections)}"
            f" tunnels={len(self.tunnels)}>"
        )

    def configure_tunnels(self, tunnel: TunnelSettings) -> None:
        """Use ``tunnel`` for connections upgraded from now on (running tunnels keep theirs)."""
        self.tunnel = tunnel
        self.tunnel_pool.close()
        self.tunnel_pool = tunnel.new_pool()
        self.splice_min_bytes = math.inf if self.is_tls else _splice_min_bytes(tunnel)

    def sweep(self, now: float) -> None:
        """Enforce every connection's deadline and expire idle upstream connections."""
        expired = [c for c in self.connections if c.deadline <= now]
        if len(expired) > 1:  # oldest first: queued requests give up in arrival order
            expired.sort(key=_deadline_of)
        for conn in expired:
            conn.deadline_passed()
        for pool in self.upstreams.values():
            pool.close_expired(now)
        if self.tunnels:
            self._sweep_tunnels(now)

    def _sweep_tunnels(self, now: float) -> None:
        """Close tunnels idle for ``tunnel_s``: pumps mark activity, no timer per tunnel (as
        tcp/proxy.py's TcpRoute.sweep)."""
        tunnel_s = self.tunnel.tunnel_s
        expired = []
        for conn in self.tunnels:
            tunnel = conn.tunnel
            if tunnel is None:
                continue
            if tunnel.pump.take_activity():
                tunnel.deadline = now + tunnel_s
            elif tunnel.deadline <= now:
                expired.append(tunnel.pump)
        for pump in expired:
            pump.close()

    def retire(self, successor: Route) -> None:
        """A reload replaced this route: idle connections move to ``successor`` now, busy ones
        when their exchange ends (connection.py ``finish_exchange``); none is closed."""
        self.successor = successor
        for conn in list(self.connections):
            if conn.phase is Phase.IDLE:
                conn.move_to(successor)

    def stop_accepting(self) -> None:
        """Shutdown, step 1: every connection closes after its next answer (which says
        ``Connection: close``). An idle one is not closed now: its client may have a request
        on the wire already, which would be lost; ``close_idle`` closes what is left at the
        end of ``grace_s``."""
        self.is_stopping = True
        if not self.connections:
            self.drained.set()

    def close_idle(self) -> None:
        """Shutdown, at the end of ``grace_s``: close the connections waiting for a request."""
        for conn in list(self.connections):
            conn.close_when_idle()

    def forget(self, conn: ListenedConnection) -> None:
        self.connections.discard(conn)
        if self.is_stopping and not self.connections:
            self.drained.set()

    def abort_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()
        self.tunnel_pool.close()
