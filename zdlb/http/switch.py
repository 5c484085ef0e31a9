"""A ``101 Switching Protocols`` on a client connection: from an HTTP exchange to a tunnel.

upgrade.py's ``ProtocolSwitch`` takes the sockets out of their transports and tcp/pump.py's
``Pump`` moves the bytes (tls/relay.py's ``Relay`` over TLS); this module is the glue between
them and a client connection (``Switching``), which it takes explicitly. The rules:

1. On a ``101`` both sides stop reading: the server's at once (bytes after the head in the same
   read still reach the client, as body), the client's with ``PAUSED_DETOUR``.
2. Once the 101 and what followed it are written, the client's bytes held past its upgrade
   request go to the server, and both write buffers must empty before the sockets leave.
3. Over TLS the sockets cannot leave their transports (issue 14): a ``Relay`` joins them.
4. While the tunnel runs, the client connection stays in ``Route.connections`` (and in
   ``Route.tunnels``, whose sweep enforces ``tunnel_s``), and its server counts the request and
   one connection (the aborted upstream transport's), until the pump or relay ends.
5. When it ends, the exchange is finished as any other (counters, access log, the server's
   slot) and the client connection is accounted as closed, as ``connection_lost`` does.
6. Out of descriptors to duplicate: both sides are aborted.
"""

from __future__ import annotations

import logging
import math
import socket
from typing import TYPE_CHECKING, Protocol

from zdlb.http import rewrite
from zdlb.http.answers import Answering
from zdlb.http.exchange import CLOSING, PAUSED_DETOUR, TUNNEL
from zdlb.http.route import ListenedConnection
from zdlb.http.upgrade import ProtocolSwitch, Tunnel, TunnelPump
from zdlb.tcp.pump import Pump
from zdlb.tls.relay import Relay

if TYPE_CHECKING:
    import asyncio

    from zdlb.http.exchange import Exchange
    from zdlb.http.head import ResponseHead
    from zdlb.http.route import Destination
    from zdlb.http.splicing import Detour
    from zdlb.http.upstream import UpstreamConnection

log = logging.getLogger(__name__)


class Switching(Answering, ListenedConnection, Protocol):
    """What switching needs of a client connection, beyond answering and what the route
    tracks of it."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport | None
    dest: Destination
    detour: Detour | None
    tunnel: Tunnel | None
    deadline: float

    def pause(self, reason: int) -> None: ...


def switch_protocols(conn: Switching, exchange: Exchange, head: ResponseHead) -> None:
    """A 101 answers ``exchange``: stop reading both sides, queue the head (rule 1)."""
    upstream = exchange.upstream
    assert upstream is not None and upstream.transport is not None
    assert conn.transport is not None
    server = exchange.server
    if server is not None and server.is_observed:
        conn.route.observe(server, True)
    exchange.response_started = True
    exchange.status = 101
    upstream.pause_reading()  # bytes after the head in this read arrive as response_body
    conn.pause(PAUSED_DETOUR)
    conn.wbuf.append(rewrite.build_switch_head(head, exchange.set_cookie))


def start_switch(conn: Switching, exchange: Exchange) -> None:
    """The 101 and what followed it are written: hand the sockets over (rules 2, 3)."""
    upstream = exchange.upstream
    if upstream is None or upstream.transport is None or conn.transport is None:
        return  # lost meanwhile: connection_lost or upstream_lost ends the exchange
    data = conn.reader.take_held()
    upstream.pool.stats.bytes_in += len(data)
    switching = _Switch(conn, exchange)
    if conn.route.is_tls:
        switching.relay(upstream, data)
        return
    switch = ProtocolSwitch(conn.transport, upstream.transport, switching.ready)
    conn.detour = switch
    switch.start(data)


class _Switch:
    """One exchange's switch, from its sockets' handover to the tunnel's end."""

    __slots__ = ("conn", "exchange")

    def __init__(self, conn: Switching, exchange: Exchange) -> None:
        self.conn = conn
        self.exchange = exchange

    def ready(self, sockets: tuple[socket.socket, socket.socket] | None) -> None:
        """Called once by the ``ProtocolSwitch``: hand both sockets to a pump (rules 4, 6)."""
        conn, exchange = self.conn, self.exchange
        conn.detour = None
        assert exchange.server is not None
        upstream = exchange.upstream
        exchange.upstream = None
        if upstream is not None:
            upstream.owner = None  # its connection_lost (after the abort) only leaves the pool
        if sockets is None:  # out of fds: both transports are untouched
            log.warning("tunnel_failed client=%s error=no descriptor", conn.client_ip.decode())
            if upstream is not None:
                upstream.abort()
            conn.abort()
            return
        exchange.server.connection_opened()
        route = conn.route
        pump = Pump(conn.loop, sockets[0], sockets[1], route.tunnel_pool, self.ended)
        self._run(Tunnel(pump, conn.loop.time() + route.tunnel.tunnel_s))
        pump.start()

    def relay(self, upstream: UpstreamConnection, held: bytes) -> None:
        """Over TLS (rule 3): both transports go to a ``Relay``. The upstream connection's
        protocol is replaced, so its connection_lost never comes: the server counts the
        connection until ``ended``, as for a pump."""
        conn, exchange = self.conn, self.exchange
        assert conn.transport is not None and upstream.transport is not None
        exchange.upstream = None
        upstream.owner = None
        relay = Relay(conn.transport, upstream.transport, self.ended)
        upstream.is_closed, upstream.transport = True, None
        self._run(Tunnel(relay, conn.loop.time() + conn.route.tunnel.tunnel_s))
        relay.start(held)

    def _run(self, tunnel: Tunnel) -> None:
        conn = self.conn
        conn.tunnel = tunnel
        conn.transport = None
        conn.phase = TUNNEL
        conn.deadline = math.inf  # route.sweep checks the tunnel's deadline instead
        conn.route.tunnels.add(conn)

    def ended(self, pump: TunnelPump) -> None:
        """Called once by the pump or relay, both sockets closed (rule 5)."""
        conn, exchange = self.conn, self.exchange
        route = conn.route
        route.tunnels.discard(conn)
        server = exchange.server
        if server is not None:
            server.connection_closed()
            conn.dest.upstreams[server.name].stats.bytes_in += pump.bytes_up
        route.stats.bytes_in += pump.bytes_up
        route.stats.bytes_out += pump.bytes_down
        exchange.bytes_out += pump.bytes_down
        exchange.keep_alive = False
        conn.finish_exchange(exchange)  # request_finished, response counters, access log
        conn.tunnel = None
        conn.phase = CLOSING
        route.forget(conn)
        route.stats.connections_open -= 1
        conn.reader.detach()
