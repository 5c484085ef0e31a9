"""Turning an upgraded HTTP connection into a tunnel: sockets out of transports, pump settings.

After ``101 Switching Protocols`` both connections carry another protocol (WebSocket, h2c...)
that zdlb does not parse, so they go to the same ``Pump`` as TCP listeners (tcp/pump.py): splice
or copy, no Python object per chunk, an idle deadline ``tunnel_s`` enforced by the sweeper.

The pump must own raw sockets that no transport reads or writes (pump.py's rule). Neither
asyncio nor uvloop can hand a socket over, so ``detach_socket`` duplicates the descriptor and
aborts the transport: the kernel sends a FIN only when the last descriptor of a socket is
closed, so closing the transport's copy ends nothing on the wire. It is only correct once the
transport holds no bytes either way: reading paused (nothing more enters Python) and its write
buffer empty (nothing queued is dropped by ``abort``); http/proxy.py makes sure of both first.
No logging here.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass

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
