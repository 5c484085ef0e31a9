"""A client connection changing hands between exchanges: to a reloaded route, to another
process (an upgrade), or from one.

The rules:

1. Only between exchanges: a reload's new route serves a connection from its next request on
   (``move_to``, called when an exchange ends or by ``Route``); nothing is closed, and the
   connection is counted by the route that serves it. A chain of reloads goes to the newest.
2. An upgrade (daemon/upgrade.py) takes only idle connections: no exchange, nothing held by the
   reader, nothing buffered for the client. It gets a duplicate of the socket, and this
   process forgets its own without a FIN (``abort`` closes one descriptor: no FIN, no reset).
3. Never a TLS connection: its session lives in this process (issue 14); it ends here.
4. An adopted connection is an idle keep-alive one, not a new one: it waits ``client_s`` and
   ends quietly (exchange.py, rule 7), never with a 408.

The functions take the client connection (``Handed``) explicitly; none runs per request.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Protocol

from zdlb.http.exchange import CLOSING, IDLE
from zdlb.http.route import ListenedConnection

if TYPE_CHECKING:
    import asyncio

    from zdlb.http.route import Route
    from zdlb.http.stream import RequestReader


class Handed(ListenedConnection, Protocol):
    """What changing hands needs of a client connection, beyond what a ``Route`` tracks."""

    loop: asyncio.AbstractEventLoop
    route: Route
    transport: asyncio.Transport | None
    reader: RequestReader
    wbuf: list[bytes]
    answered: int


def move_to(conn: Handed, route: Route) -> None:
    """Serve ``conn``'s next requests by ``route``, the newest of its successors (rule 1)."""
    while route.successor is not None:
        route = route.successor
    old = conn.route
    old.forget(conn)
    old.stats.connections_open -= 1
    conn.route = route
    route.connections.add(conn)
    route.stats.connections_open += 1
    if route.gate is not old.gate:  # another listener's (an upgrade's adoption)
        old.gate.closed()
        route.gate.opened()


def detach_idle(conn: Handed) -> socket.socket | None:
    """Give up an idle connection's socket (a duplicate, for another process) and forget it
    here without a FIN; None when it is not idle so, or TLS (it then stays here: rules 2, 3)."""
    transport = conn.transport
    if (
        conn.phase is not IDLE
        or transport is None
        or not conn.reader.is_idle
        or conn.wbuf
        or transport.get_write_buffer_size()
    ):
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("ssl_object") is not None:
        return None
    kept = socket.socket(fileno=os.dup(sock.fileno()))  # the socket outlives the abort
    conn.phase = CLOSING
    transport.abort()
    return kept


def continue_keep_alive(conn: Handed) -> None:
    """``conn`` was adopted from another process (rule 4)."""
    conn.answered = max(1, conn.answered)
    if conn.phase is IDLE:
        conn.deadline = conn.loop.time() + conn.route.timeouts.client_s
