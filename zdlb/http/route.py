"""What every connection of one HTTP listener shares (``Route``), and the sweeper that enforces
their deadlines.

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from zdlb.config.model import ListenerConfig
from zdlb.http.exchange import Phase, may_reuse
from zdlb.http.head import RequestHeadParser
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


def _hsts_line(listener: ListenerConfig) -> bytes:
    """The Strict-Transport-Security field a TLS listener adds to answers (RFC 6797), or b""."""
    tls = listener.tls
    if tls is None or tls.hsts_max_age is None:
        return b""
    return b"Strict-Transport-Security: max-age=%d\r\n" % tls.hsts_max_age


class Route:
    """What every connection of one HTTP listener shares: its backend, pools and settings."""

    def __init__(
        self,
        listener: ListenerConfig,
        backend: Backend,
        upstreams: dict[str, ServerConnections],
        *,
        log_access: bool,
        observe: Callable[[Server, bool], None] = _ignore_observation,
        sticky: StickyCookie | None = None,
        stats: ListenerStats | None = None,
        backend_stats: BackendStats | None = None,
        tunnel: TunnelSettings | None = None,
        census: Census | None = None,
    ) -> None:
        self.listener = listener
        # Metrics: plain counters the hot path adds to (a scrape reads them; metrics/).
        self.stats = stats if stats is not None else ListenerStats()
        self.backend_stats = backend_stats if backend_stats is not None else BackendStats()
        self.observe = observe  # passive health: called for servers with is_observed only
        self.backend = backend
        self.sticky = sticky
        self.census = census  # distinct users per host, fed by pins (http/connection.py)
        self.upstreams = upstreams
        self.log_access = log_access
        self.timeouts = listener.timeouts
        self.server_s = backend.config.timeouts.server_s
        self.retries = backend.config.retries
        self.reuse = backend.config.reuse
        # exchange.py's rule 3 for this backend's policy, resolved once: read per request.
        self.reuse_first = may_reuse(self.reuse, is_first_request=True, is_upgrade=False)
        self.reuse_later = may_reuse(self.reuse, is_first_request=False, is_upgrade=False)
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
        self.is_tls = listener.tls is not None or backend.config.tls is not None
        self.hsts = _hsts_line(listener)
        self.splice_min_bytes = math.inf if self.is_tls else _splice_min_bytes(tunnel)
        self.is_stopping = False
        self.drained = asyncio.Event()  # set once stopping and the last connection closed
        # Set by a reload (daemon/reload.py): connections move to it between requests.
        self.successor: Route | None = None

    def __repr__(self) -> str:
        return (
            f"<Route {self.listener.name} -> {self.backend.name} conns={len(self.connections)}"
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
        for conn in [c for c in self.connections if c.deadline <= now]:
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
        when their exchange ends (connection.py ``_finish_exchange``); none is closed."""
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
