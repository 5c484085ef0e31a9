"""Switching protocols: after a ``101`` an HTTP client connection becomes a tunnel
(``ProtocolSwitch``), both its sockets taken out of their transports (``detach_sockets``) for a
pump (``TunnelSettings``).

An upgrade (WebSocket) is an exchange like any other until the server answers ``101``. From
then on both connections carry another protocol (WebSocket, h2c...) that zdlb does not parse:
reading stops on both sides, the bytes already read past either head are written to the other
side, and once both write buffers are empty the two sockets leave their transports for the same
``Pump`` as TCP listeners (tcp/pump.py): splice or copy, no Python object per chunk, an idle
deadline ``tunnel_s`` enforced by the sweeper (route.py). The client connection stays in
``Route.connections``, and its server keeps counting the request and the connection, until the
pump ends. Any other answer to an upgrade request is http/proxy.py's, as for any request.

The pump must own raw sockets that no transport reads or writes (pump.py's rule). Neither
asyncio nor uvloop can hand a socket over, so ``detach_sockets`` duplicates the descriptors and
aborts the transports: the kernel sends a FIN only when the last descriptor of a socket is
closed, so closing the transport's copy ends nothing on the wire. It is only correct once the
transport holds no bytes either way: reading paused (nothing more enters Python) and its write
buffer empty (nothing queued is dropped by ``abort``); ``ProtocolSwitch`` makes sure of both
first. The one event logged here is a switch that failed for want of descriptors.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from zdlb.config.model import DEFAULT_PIPE_BYTES, DEFAULT_TUNNEL_S
from zdlb.http import rewrite
from zdlb.http.phase import Phase
from zdlb.tcp.pipes import BufferPool, PipePool
from zdlb.tcp.pump import SPLICE_AVAILABLE, Pump

if TYPE_CHECKING:
    from zdlb.balancer.server import Server
    from zdlb.http.head import ResponseHead
    from zdlb.http.proxy import ClientConnection
    from zdlb.http.route import Route
    from zdlb.http.stream import RequestReader
    from zdlb.http.upstream import UpstreamConnection

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TunnelSettings:
    """What an HTTP listener's upgraded connections need: the TCP listeners' tunnel knobs."""

    tunnel_s: float = DEFAULT_TUNNEL_S  # idle: no byte either way for this long closes it
    splice: bool = True  # False, or no os.splice: copy through a buffer instead
    pipe_bytes: int = DEFAULT_PIPE_BYTES  # per pipe (splice) or buffer (copy)
    # Bodies with at least this many Content-Length bytes left after the first read are
    # spliced (http/splice.py); None: never. Tests that build a Route by hand get None.
    splice_min_bytes: int | None = None

    @property
    def is_splicing(self) -> bool:
        return self.splice and SPLICE_AVAILABLE

    def new_pool(self) -> PipePool | BufferPool:
        """The pipes or buffers every tunnel of one listener shares."""
        if self.is_splicing:
            return PipePool(self.pipe_bytes)
        return BufferPool(self.pipe_bytes)


def detach_sockets(
    downstream: asyncio.Transport, upstream: asyncio.Transport
) -> tuple[socket.socket, socket.socket]:
    """Sockets for the connections two transports carried; both transports are aborted.

    The caller guarantees that both have reading paused and an empty write buffer. Raises
    OSError (EMFILE) if no descriptor is left, in which case both transports are untouched.
    """
    down = _dup_socket(downstream)
    try:
        up = _dup_socket(upstream)
    except OSError:
        down.close()  # the transport still holds the socket: this sends nothing
        raise
    # Closes the transports' descriptors only; connection_lost follows on a later iteration.
    downstream.abort()
    upstream.abort()
    return down, up


def _dup_socket(transport: asyncio.Transport) -> socket.socket:
    # asyncio gives a TransportSocket, uvloop a PseudoSocket: both only wrap the fd.
    fd = transport.get_extra_info("socket").fileno()
    sock = socket.socket(fileno=os.dup(fd))
    sock.setblocking(False)  # already: the flag belongs to the shared open file
    return sock


class ProtocolSwitch:
    """The events of a ``ClientConnection`` (http/proxy.py) from a ``101`` to its tunnel's end.

    A mixin (proxy.py says why): what it uses of the connection is declared below, for mypy.
    """

    if not TYPE_CHECKING:  # mypy would take the fields declared below for missing slots
        __slots__ = ()  # ClientConnection holds the fields

    if TYPE_CHECKING:
        route: Route
        loop: asyncio.AbstractEventLoop
        transport: asyncio.Transport | None
        client_ip: bytes
        reader: RequestReader
        phase: Phase
        deadline: float
        pump: Pump | None
        tunnel_deadline: float
        server: Server | None
        upstream: UpstreamConnection | None
        _wbuf: list[bytes]
        _switching: bool
        _detached: bool
        _response_started: bool
        _keep_alive_down: bool
        _status: int
        _bytes_out: int
        _set_cookie: bytes

        def _flush_client(self) -> None: ...
        def _finish_exchange(self) -> None: ...
        def abort(self) -> None: ...

    def _switch_protocols(self, head: ResponseHead) -> None:
        """A 101: stop reading the server; bytes after the head arrive as response_body."""
        upstream = self.upstream
        assert upstream is not None
        server = self.server
        if server is not None and server.is_observed:
            self.route.observe(server, True)
        self._switching = True
        self._response_started = True
        self._status = 101
        upstream.pause_reading()  # the client's reading is already paused (PAUSED_UPGRADE)
        self._wbuf.append(rewrite.build_switch_head(head, self._set_cookie))

    def _prepare_switch(self) -> None:
        """Write what was read past either head to the other side, then wait for both write
        buffers to empty: a write limit of 0 makes resume_writing say exactly that."""
        upstream, transport = self.upstream, self.transport
        if upstream is None or upstream.transport is None or transport is None:
            return  # lost meanwhile: connection_lost or upstream_lost ends the exchange
        self._flush_client()
        held = self.reader.held
        if held:
            upstream.pool.stats.bytes_in += len(held)
            upstream.write(bytes(held))
            held.clear()
        transport.set_write_buffer_limits(high=0)
        upstream.transport.set_write_buffer_limits(high=0)
        self._try_switch()

    def _try_switch(self) -> None:
        """Start the tunnel if both write buffers are empty. Called back a loop iteration after
        resume_writing, never inside it: the stdlib transport goes on after resume_writing
        returns, and, seeing itself closing, runs connection_lost a second time (AttributeError
        in the loop's exception handler, found by test_bytes_past_both_heads...[asyncio-4mib])."""
        upstream, transport = self.upstream, self.transport
        if not self._switching or transport is None or upstream is None:
            return  # switched already, or lost meanwhile (connection_lost cleans up)
        if upstream.transport is None:
            return
        if transport.get_write_buffer_size() or upstream.transport.get_write_buffer_size():
            return  # resume_writing or resume_upstream_writes calls again once empty
        self._start_tunnel(transport, upstream)

    def _start_tunnel(self, transport: asyncio.Transport, upstream: UpstreamConnection) -> None:
        """Hand both sockets to a pump. The server keeps counting this request and, for the
        aborted upstream transport, one connection, until the pump ends (``_tunnel_ended``)."""
        server = self.server
        assert server is not None and upstream.transport is not None
        self.upstream = None
        upstream.owner = None  # its connection_lost (after the abort) only leaves the pool
        try:
            client_sock, upstream_sock = detach_sockets(transport, upstream.transport)
        except OSError as exc:  # out of fds: both transports are untouched
            log.warning("tunnel_failed client=%s error=%s", self.client_ip.decode(), exc)
            upstream.abort()
            self.abort()
            return
        server.connection_opened()
        self._switching = False
        self._detached = True
        self.transport = None
        route = self.route
        self.phase = Phase.TUNNEL
        self.deadline = math.inf  # route.sweep checks tunnel_deadline instead
        self.tunnel_deadline = self.loop.time() + route.tunnel.tunnel_s
        self.pump = Pump(
            self.loop, client_sock, upstream_sock, route.tunnel_pool, self._tunnel_ended
        )
        route.tunnels.add(self)
        self.pump.start()

    def _tunnel_ended(self, pump: Pump) -> None:
        """Called once by the pump, both sockets closed: account the exchange and the client
        connection as ended, as connection_lost does for any other."""
        route = self.route
        route.tunnels.discard(self)
        self.pump = None
        server = self.server
        if server is not None:
            server.connection_closed()
            route.upstreams[server.name].stats.bytes_in += pump.bytes_up
        route.stats.bytes_in += pump.bytes_up
        route.stats.bytes_out += pump.bytes_down
        self._bytes_out += pump.bytes_down
        self._keep_alive_down = False
        self._finish_exchange()  # request_finished, response counters, access log
        self.phase = Phase.CLOSING
        route.forget(cast("ClientConnection", self))  # the one class this is mixed into
        route.stats.connections_open -= 1
        self.reader.detach()
