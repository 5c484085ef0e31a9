"""Switching protocols: after a ``101`` an HTTP client connection becomes a tunnel. A
``ProtocolSwitch`` waits until neither transport holds a byte, takes both sockets out of them
(``detach_sockets``) and hands them back through its callback: http/switch.py then starts a
pump (``TunnelSettings`` says how) and the connection tracks it as a ``Tunnel``.

An upgrade (WebSocket) is an exchange like any other until the server answers ``101``. From
then on both connections carry another protocol (WebSocket, h2c...) that zdlb does not parse:
reading stops on both sides, the bytes already read past either head are written to the other
side, and once both write buffers are empty the two sockets leave their transports for the same
``Pump`` as TCP listeners (tcp/pump.py): splice or copy, no Python object per chunk, an idle
deadline ``tunnel_s`` enforced by the sweeper (route.py). The client connection stays in
``Route.connections``, and its server keeps counting the request and the connection, until the
pump ends. Any other answer to an upgrade request is an ordinary answer (http/connection.py).

The pump must own raw sockets that no transport reads or writes (pump.py's rule). Neither
asyncio nor uvloop can hand a socket over, so ``detach_sockets`` duplicates the descriptors and
aborts the transports: the kernel sends a FIN only when the last descriptor of a socket is
closed, so closing the transport's copy ends nothing on the wire. It is only correct once the
transport holds no bytes either way: reading paused (nothing more enters Python) and its write
buffer empty (nothing queued is dropped by ``abort``); ``ProtocolSwitch`` makes sure of both
first.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from zdlb.config.model import DEFAULT_PIPE_BYTES, DEFAULT_TUNNEL_S
from zdlb.tcp.pipes import BufferPool, PipePool
from zdlb.tcp.pump import SPLICE_AVAILABLE


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
    """From a ``101`` to two raw sockets: waits until both transports' write buffers are empty,
    then detaches both sockets and calls ``on_ready(client_sock, upstream_sock)`` once, or
    ``on_ready(None)`` if no descriptor was left (both transports untouched).

    The caller has paused reading on both transports, so nothing more enters Python; ``start``
    writes the bytes that were read past the upgrade request to the server, then every ``poll``
    (called a loop iteration after either transport's ``resume_writing``) checks again.
    """

    __slots__ = ("_client", "_on_ready", "_upstream", "is_done")

    def __init__(
        self,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        on_ready: Callable[[tuple[socket.socket, socket.socket] | None], None],
    ) -> None:
        self._client = client
        self._upstream = upstream
        self._on_ready = on_ready
        self.is_done = False

    def __repr__(self) -> str:
        return f"<ProtocolSwitch done={self.is_done}>"

    def start(self, held: bytes) -> None:
        """Send ``held`` (client bytes after the upgrade request) on, then wait for empty
        buffers: a write limit of 0 makes ``resume_writing`` say exactly that."""
        if held:
            self._upstream.write(held)
        self._client.set_write_buffer_limits(high=0)
        self._upstream.set_write_buffer_limits(high=0)
        self.poll()

    def poll(self) -> None:
        """Never from inside ``resume_writing`` itself: the stdlib transport goes on after
        resume_writing returns and, seeing itself closing, runs connection_lost a second time
        (AttributeError in the loop's exception handler, found by
        test_bytes_past_both_heads...[asyncio-4mib]). The caller defers it with call_soon."""
        if self.is_done:
            return
        client, upstream = self._client, self._upstream
        if client.is_closing() or upstream.is_closing():
            return  # lost meanwhile: the connection's connection_lost or upstream_lost ends it
        if client.get_write_buffer_size() or upstream.get_write_buffer_size():
            return
        self.is_done = True
        try:
            sockets = detach_sockets(client, upstream)
        except OSError:  # out of fds: both transports are untouched
            self._on_ready(None)
            return
        self._on_ready(sockets)

    def take_activity(self) -> bool:
        return False  # nothing moves until the pump starts

    def stop(self) -> int:
        self.is_done = True
        return 0


class TunnelPump(Protocol):
    """What a tunnel moves bytes with: a ``Pump`` (raw sockets, splice or copy), or over TLS a
    ``Relay`` between the two transports (tls/relay.py)."""

    bytes_up: int
    bytes_down: int

    @property
    def is_splicing(self) -> bool: ...  # bytes move in the kernel, not through Python

    def take_activity(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class Tunnel:
    """A running tunnel of an HTTP listener: its pump and the idle deadline the sweeper keeps
    (route.py), re-armed whenever the pump reports activity."""

    __slots__ = ("deadline", "pump")

    def __init__(self, pump: TunnelPump, deadline: float) -> None:
        self.pump = pump
        self.deadline = deadline

    def __repr__(self) -> str:
        return f"<Tunnel {self.pump!r}>"
