"""A request waiting for a slot on a server at its ``maxconn`` (balancer/queue.py).

The rules:

1. A request whose server is at its maxconn waits: in that server's own queue if its user is
   pinned to it (sticky), else in its backend's queue, for at most ``queue_s``; then 503 with
   ``Retry-After`` (exchange.py, rule 7; http/recovery.py answers it).
2. A granted slot is taken in a callback of its own (``slot_granted``, scheduled by the
   connection's ``queue_granted``): the grant runs inside another connection's callback,
   whose state change must complete first.
3. A slot granted to a client that left meanwhile goes to the next waiter at once.
4. The request goes to the granted server as it would have gone first: its stand-in ``Host``
   names that server, and a user not pinned to it is pinned to it.

The functions take the client connection (``Waiting``) explicitly; none runs on the hot path.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol, cast

from zdlb.balancer.queue import slot_freed
from zdlb.http import rewrite
from zdlb.http.exchange import IN_EXCHANGE
from zdlb.http.pinning import pin

if TYPE_CHECKING:
    import asyncio

    from zdlb.balancer.queue import Ticket, WaitQueues
    from zdlb.balancer.server import Server
    from zdlb.http.exchange import Exchange, Phase
    from zdlb.http.route import Destination, Route
    from zdlb.http.upstream import ServerConnections


class Waiting(Protocol):
    """What waiting needs of a client connection, a ``Waiter`` of balancer/queue.py."""

    loop: asyncio.AbstractEventLoop
    route: Route
    dest: Destination
    client_ip: bytes
    user_token: bytes
    exchange: Exchange | None
    phase: Phase
    deadline: float

    def queue_granted(self, ticket: Ticket, server: Server) -> None: ...
    def arm_exchange_deadline(self, exchange: Exchange) -> None: ...
    def use_server(self, exchange: Exchange, server: Server, pool: ServerConnections) -> None: ...
    def flush_upstream(self, exchange: Exchange) -> None: ...


def wait_for_slot(conn: Waiting, exchange: Exchange, server: Server, now: float) -> None:
    """``server`` is at its maxconn: queue until a slot is granted or ``queue_s`` passes
    (rule 1)."""
    # A server with a maxconn belongs to a backend with queues (route.py attached them).
    waitq = cast("WaitQueues", server.waitq)
    sticky = exchange.identity is not None and exchange.identity == server.identity
    exchange.ticket = waitq.enqueue(conn, server.identity if sticky else None, now)
    conn.dest.backend_stats.queued += 1
    if exchange.ticket.is_live:  # not granted at once
        conn.deadline = now + conn.dest.queue_s


def slot_granted(conn: Waiting, ticket: Ticket, server: Server) -> None:
    """Send the waiting request to ``server``, whose slot ``ticket`` reserved (rules 2-4)."""
    exchange = conn.exchange
    server.inflight -= 1  # the reservation; use_server counts the request again
    if exchange is None or exchange.ticket is not ticket or conn.phase is not IN_EXCHANGE:
        slot_freed(server, conn.loop.time())  # rule 3
        return
    exchange.ticket = None
    dest = conn.dest
    dest.backend_stats.queue_wait_s += time.monotonic() - exchange.started_at
    pool = dest.upstreams[server.name]
    head = exchange.request
    if not head.has_host and exchange.ubuf:  # the stand-in Host names the server
        exchange.ubuf[0] = rewrite.build_request_head(
            head, conn.client_ip, conn.route.proto, pool.host_header
        )
    sticky = dest.sticky
    if sticky is not None and server.identity != exchange.identity:
        exchange.set_cookie = pin(conn, sticky, server.identity, None)
    conn.arm_exchange_deadline(exchange)
    conn.use_server(exchange, server, pool)
    conn.flush_upstream(exchange)


def leave_queue(exchange: Exchange) -> None:
    """The exchange ended or timed out while waiting: give up its place."""
    ticket = exchange.ticket
    if ticket is not None:
        exchange.ticket = None
        ticket.queues.leave(ticket)
