"""Taking an HTTP listener's clients out of its backlog, paused and resumed by the budget.

asyncio's and uvloop's servers cannot stop accepting without closing their socket, and closing
the listening socket would reset every client waiting in its backlog. So to pause (budget.py,
rule 2) an ``HttpAcceptor`` first duplicates its server's socket, then closes the server: the
duplicate keeps the socket and its backlog open, and the kernel goes on queueing clients. To
resume it starts a new server on the duplicate. One ``create_server`` per resume, paid only
when a limit is left, never per connection; while accepting, no extra fd is held.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from typing import Protocol

from zdlb.http.connection import ClientConnection
from zdlb.http.route import Route

log = logging.getLogger(__name__)


class RouteSlot(Protocol):
    """Where new connections find their route (daemon/runtime.py's; a reload swaps it)."""

    route: Route


class HttpAcceptor:
    """Accepts on ``sock`` for ``slot``'s route (the slot a reload updates)."""

    def __init__(
        self,
        slot: RouteSlot,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        *,
        tls_context: ssl.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
    ) -> None:
        self.slot = slot
        self.tls_context = tls_context  # a TLS listener's (tls/listener.py TerminatingContext)
        self.ssl_handshake_timeout = ssl_handshake_timeout
        self.sock = sock  # owned: the server's while it serves, closed by ``close``
        self.loop = loop
        self._server: asyncio.Server | None = None
        self._starting: asyncio.Task[None] | None = None
        self._closed: list[asyncio.Server] = []  # paused servers, for wait_closed
        self.is_paused = False
        self.is_closed = False

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "paused" if self.is_paused else "accepting"
        return f"<HttpAcceptor {self.slot.route.listener.name} {state}>"

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self.sock,)

    async def start(self) -> None:
        """Accept from now on, unless the listener's gate is paused (then on its resume)."""
        self.slot.route.gate.add(self)
        if not self.is_paused:
            await self._serve()

    async def _serve(self) -> None:
        loop = self.loop
        slot = self.slot
        server = await loop.create_server(
            lambda slot=slot: ClientConnection(slot.route, loop),
            sock=self.sock,
            backlog=slot.route.listener.backlog,
            ssl=self.tls_context,
            ssl_handshake_timeout=self.ssl_handshake_timeout,
        )
        self._server = server
        if self.is_paused or self.is_closed:  # paused or closed while it started
            self.pause()

    def pause(self) -> None:
        """Stop taking clients out of the backlog; they wait there (budget.py, rule 2)."""
        self.is_paused = True
        server, self._server = self._server, None
        if server is not None:
            if not self.is_closed:  # the socket outlives its server
                self.sock = socket.socket(fileno=os.dup(self.sock.fileno()))
            server.close()
            self._closed.append(server)

    def resume(self) -> None:
        """Take clients again (budget.py, rule 3)."""
        self.is_paused = False
        if self.is_closed or self._server is not None:
            return
        if self._starting is None or self._starting.done():
            self._starting = self.loop.create_task(self._serve())
            self._starting.add_done_callback(self._resumed)

    def _resumed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Not expected (the socket is listening already); say so, and stay paused.
            log.error("accept_resume_failed listener=%s error=%r", self._name, exc)

    @property
    def _name(self) -> str:
        return self.slot.route.listener.name

    def close(self) -> None:
        """For good: stop accepting and close the listening socket."""
        if self.is_closed:
            return
        self.is_closed = True
        self.slot.route.gate.discard(self)
        if self._server is not None:
            self.pause()  # its server closes the socket
        elif self._starting is None or self._starting.done():
            self.sock.close()

    async def wait_closed(self) -> None:
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)
        for server in self._closed:
            await server.wait_closed()
        self._closed.clear()
