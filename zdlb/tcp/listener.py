"""Listening sockets: bound and configured before the event loop serves them.

Binding happens before anything else starts so that a bad or busy address fails the start-up
with a clear error rather than half a daemon. No event loop here.
"""

from __future__ import annotations

import socket

from zdlb.config.model import Address
from zdlb.errors import ListenerError


def bind_listener(address: Address, backlog: int) -> socket.socket:
    """A non-blocking listening TCP socket on ``address``. Raises ListenerError.

    SO_REUSEADDR lets a restarted daemon bind while old connections sit in TIME_WAIT; IPv6
    sockets are v6-only so ``[::]:80`` and ``0.0.0.0:80`` can be configured side by side.
    """
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: the stdlib loop sets TCP_NODELAY on accepted sockets only when
    # sock.proto says TCP; without it a head and body written apart wait ~40 ms for an ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accept()
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenerError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    return sock


def bound_address(sock: socket.socket) -> Address:
    """The address a listening socket actually got (port 0 in the config means any port)."""
    host, port = sock.getsockname()[:2]
    return Address(host, port)
