"""TCP listeners: accept a client, pick and connect a server, then hand both sockets to a Pump.

One ``TcpRoute`` per ``mode = "tcp"`` listener holds what its tunnels share (the backend, the
settings, the pipe pool) and offers the daemon the same surface as http/route.py's ``Route``:
``sweep(now)``, ``stop_accepting()``, ``drained``, ``abort_all()``.

Rules:

- Accepting is a reader callback on the listening socket that accepts up to ``ACCEPT_BATCH``
  clients per readiness event; connecting is a non-blocking ``connect`` plus a writer callback.
  Neither creates a future or a task (a name that is not an IP literal is the exception: it is
  resolved in a task). PERFORMANCE.md measured a Task per upstream connect at ~42 us.
- Deadlines are floats checked by ``sweep(now)``, which the daemon's sweeper calls: the connect
  deadline (``connect_s``) and the idle deadline (``tunnel_s``, no byte either way). A pump marks
  activity with one boolean store per readiness callback; no timer exists per tunnel.
- A failed or timed-out connect is reported to ``observe(server, False)`` (servers with
  ``is_observed`` only) and retried on a server not tried yet, up to ``retries`` times.
- When no server is left, the client is reset (RST), not closed with a FIN: a FIN reads as an
  orderly, possibly complete, empty answer (think of a client that only downloads), while a
  reset is unmistakably a failure; and closing with RST leaves no TIME_WAIT socket behind per
  refused client during an outage.
- While a tunnel is connecting it counts as a request in flight on its server
  (``request_started``), so least-connections sees it; once connected, also as an open
  connection (``connection_opened``); both are undone exactly once when it ends.
- ``OSError`` never leaves this module: connect errors become retries, accept errors a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import math
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zdlb.balancer.pool import Backend
from zdlb.balancer.queue import slot_freed
from zdlb.balancer.server import Server
from zdlb.budget import ListenerGate, lone_gate
from zdlb.config.model import (
    DEFAULT_CONNECT_S,
    DEFAULT_PIPE_BYTES,
    DEFAULT_RETRIES,
    DEFAULT_TUNNEL_S,
    Address,
    ListenerConfig,
)
from zdlb.stats import ListenerStats
from zdlb.tcp.pipes import BufferPool, PipePool
from zdlb.tcp.pump import SPLICE_AVAILABLE, Pump
from zdlb.tcp.tls_proxy import TlsPump, tls_sides

log = logging.getLogger(__name__)
access_log = logging.getLogger("zdlb.access")

# Clients accepted per readiness event of a listening socket (asyncio's create_server loops up
# to its backlog, 100). A reader callback that accepts in a loop, rather than a task awaiting
# loop.sock_accept, measured 21 us of CPU per accepted-and-closed connection against 33-38 us
# on uvloop (equal on the stdlib loop): no future, no task wake-up, no epoll_ctl per client.
# Bounding the batch keeps a storm from starving running tunnels: 64 x ~20 us is ~1.3 ms.
ACCEPT_BATCH = 64
# Out of fds (EMFILE) or kernel memory: stop accepting for this long, like asyncio's servers.
ACCEPT_RETRY_S = 1.0
# A down server behind a busy listener fails thousands of connects a second: one log line per
# this interval and server, with the count (http/upstream.py does the same).
FAILURE_LOG_INTERVAL_S = 5.0
_LINGER_ZERO = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class TcpSettings:
    """What a TCP listener's tunnels need from the config. Seconds, and bytes per pipe."""

    connect_s: float = DEFAULT_CONNECT_S  # per connect attempt
    tunnel_s: float = DEFAULT_TUNNEL_S  # idle: no byte either way for this long closes it
    retries: int = DEFAULT_RETRIES  # connect failures retried on another server
    splice: bool = True  # False, or no os.splice: copy through a buffer instead
    pipe_bytes: int = DEFAULT_PIPE_BYTES  # per pipe (splice) or buffer (copy)


class Phase(enum.Enum):
    CONNECTING = "connecting"  # a server is being picked or connected: deadline connect_s
    PUMPING = "pumping"  # bytes flow: deadline tunnel_s of inactivity
    CLOSED = "closed"


def _ignore_observation(server: Server, ok: bool) -> None:
    """The default when no health checker runs: live traffic reports to nobody."""


class TcpRoute:
    """Everything one TCP listener's tunnels share, and its accept loop."""

    def __init__(
        self,
        listener: ListenerConfig,
        backend: Backend,
        settings: TcpSettings,
        *,
        log_access: bool = False,
        observe: Callable[[Server, bool], None] = _ignore_observation,
        stats: ListenerStats | None = None,
        gate: ListenerGate | None = None,
    ) -> None:
        self.listener = listener
        self.stats = stats if stats is not None else ListenerStats()  # metrics
        # The listener's share of the connection budget (budget.py): pause/resume below.
        self.gate = gate if gate is not None else lone_gate(listener, self.stats)
        self._is_paused = False
        self.backend = backend
        self.settings = settings
        self.timeouts = listener.timeouts  # grace_s, for the daemon's shutdown
        self.log_access = log_access
        self.observe = observe  # passive health: called for servers with is_observed only
        self.is_splicing = settings.splice and SPLICE_AVAILABLE
        self.pool: PipePool | BufferPool = (
            PipePool(settings.pipe_bytes) if self.is_splicing else BufferPool(settings.pipe_bytes)
        )
        # TLS on either side (issue 14): tunnels copy between transports (tcp/tls_proxy.py).
        self.tls = tls_sides(listener, backend.config)
        self.tunnels: set[Tunnel] = set()
        self.is_stopping = False
        self.drained = asyncio.Event()  # set once stopping and the last tunnel ended
        self.bytes_up = 0  # totals of ended tunnels: client -> server
        self.bytes_down = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._adopted: list[socket.socket] = []  # sibling workers' shares (adopt_socket)
        self._resume_handle: asyncio.TimerHandle | None = None
        self._sockaddrs: dict[Address, tuple[int, tuple[Any, ...]] | None] = {}
        self._failures: dict[Server, tuple[int, float]] = {}

    def __repr__(self) -> str:
        kind = "splice" if self.is_splicing else "copy"
        return (
            f"<TcpRoute {self.listener.name} -> {self.backend.name} {kind}"
            f" tunnels={len(self.tunnels)}>"
        )

    @property
    def connections(self) -> set[Tunnel]:
        """The live tunnels, under the name http/route.py's Route uses (shutdown counts them)."""
        return self.tunnels

    # --- accepting -----------------------------------------------------------------------

    def start_accepting(self, sock: socket.socket) -> None:
        """Serve ``sock`` (listening, non-blocking) on the running loop; the route owns it now
        and ``stop_accepting`` closes it."""
        self.loop = asyncio.get_running_loop()
        self._sock = sock
        self.loop.add_reader(sock.fileno(), self._accept_ready, sock)
        self.gate.add(self)

    def pause(self) -> None:
        """The connection budget is spent (budget.py, rule 2): leave clients in the backlog."""
        self._is_paused = True
        if self.loop is not None and self._resume_handle is None:
            for sock in self._listening():
                self.loop.remove_reader(sock.fileno())

    def resume(self) -> None:
        self._is_paused = False
        if self._resume_handle is None:  # else resumed by _resume_accepting
            self._resume_accepting()

    def adopt_socket(self, sock: socket.socket) -> None:
        """Accept on ``sock`` too (a dead sibling worker's share of the SO_REUSEPORT group,
        daemon/worker.py), until ``release_socket``; the route owns it until then."""
        if self.is_stopping:
            sock.close()
            return
        self.loop = asyncio.get_running_loop()
        self._adopted.append(sock)
        if self._resume_handle is None and not self._is_paused:  # else resumed with the others
            self.loop.add_reader(sock.fileno(), self._accept_ready, sock)

    def release_socket(self, sock: socket.socket) -> None:
        """Stop accepting on an adopted ``sock`` and close it; tunnels carry on."""
        if sock in self._adopted:
            self._adopted.remove(sock)
            self._close_listening(sock)

    def stop_accepting(self) -> None:
        """Shutdown, step 1: close the listening socket. Tunnels run on until they end (there
        is no request boundary at which to stop them); ``drained`` is set when the last ends."""
        self.is_stopping = True
        self.gate.discard(self)
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        sock, self._sock = self._sock, None
        adopted, self._adopted = self._adopted, []
        for listening in (sock, *adopted):
            if listening is not None:
                self._close_listening(listening)
        if not self.tunnels:
            self.drained.set()

    def _close_listening(self, sock: socket.socket) -> None:
        if self.loop is not None and sock.fileno() != -1:
            self.loop.remove_reader(sock.fileno())
        sock.close()

    def abort_all(self) -> None:
        """Shutdown, last step: reset every tunnel still open, close the idle pipes."""
        for tunnel in list(self.tunnels):
            tunnel.abort()
        self.pool.close()

    def _accept_ready(self, sock: socket.socket) -> None:
        loop = self.loop
        assert loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                client, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client reset before we accepted it
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: every socket pauses
                log.warning(
                    "accept_paused listener=%s error=%s retry_s=%s",
                    self.listener.name,
                    exc,
                    ACCEPT_RETRY_S,
                )
                for listening in self._listening():
                    loop.remove_reader(listening.fileno())
                self._resume_handle = loop.call_later(ACCEPT_RETRY_S, self._resume_accepting)
                return
            client.setblocking(False)
            self.stats.connections_open += 1
            self.stats.connections_total += 1
            self.gate.opened()
            tunnel = Tunnel(self, loop, client, str(addr[0]).encode())
            self.tunnels.add(tunnel)
            tunnel.start()
            if self._is_paused:  # that was the last one the budget allows
                return

    def _listening(self) -> list[socket.socket]:
        return [sock for sock in (self._sock, *self._adopted) if sock is not None]

    def _resume_accepting(self) -> None:
        self._resume_handle = None
        if self.loop is not None and not self._is_paused:
            for sock in self._listening():
                self.loop.add_reader(sock.fileno(), self._accept_ready, sock)

    # --- shared by tunnels ---------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Enforce connect deadlines and close tunnels idle for ``tunnel_s``."""
        tunnel_s = self.settings.tunnel_s
        expired = []
        for tunnel in self.tunnels:
            pump = tunnel.pump
            if pump is None:
                if tunnel.deadline <= now:
                    expired.append(tunnel)
            elif pump.take_activity():
                tunnel.deadline = now + tunnel_s
            elif tunnel.deadline <= now:
                expired.append(tunnel)
        for tunnel in expired:
            tunnel.deadline_passed()

    def sockaddr(self, address: Address) -> tuple[int, tuple[Any, ...]] | None:
        """(family, sockaddr) for an IP literal, cached; None for a name to resolve."""
        try:
            return self._sockaddrs[address]
        except KeyError:
            pass
        found: tuple[int, tuple[Any, ...]] | None = None
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.inet_pton(family, address.host)
            except OSError:
                continue
            found = (family, (address.host, address.port))
        self._sockaddrs[address] = found
        return found

    def failures_to_log(self, server: Server, now: float) -> int:
        """Count one failure of ``server``; how many to report in a log line now, or 0."""
        count, logged_at = self._failures.get(server, (0, -math.inf))
        count += 1
        if now - logged_at < FAILURE_LOG_INTERVAL_S:
            self._failures[server] = (count, logged_at)
            return 0
        self._failures[server] = (0, now)
        return count

    def forget(self, tunnel: Tunnel) -> None:
        """Called once by every tunnel as it ends."""
        self.tunnels.discard(tunnel)
        self.bytes_up += tunnel.bytes_up
        self.bytes_down += tunnel.bytes_down
        stats = self.stats
        stats.connections_open -= 1
        self.gate.closed()
        stats.bytes_in += tunnel.bytes_up  # published when the tunnel ends, not per chunk
        stats.bytes_out += tunnel.bytes_down
        if self.log_access:
            tunnel.log_access()
        if self.is_stopping and not self.tunnels:
            self.drained.set()


class Tunnel:
    """One client of a TCP listener: picking and connecting a server, then a ``Pump``.

    Owns the client socket until the pump starts, and the upstream socket while it connects;
    after that the pump owns both. ``end`` says how it ended (a ``PumpEnd`` value, or
    ``no_server``, ``idle``).
    """

    __slots__ = (
        "_resolving",
        "bytes_down",
        "bytes_up",
        "client",
        "client_ip",
        "deadline",
        "end",
        "loop",
        "phase",
        "pump",
        "route",
        "server",
        "server_name",
        "started_at",
        "tried",
        "upstream",
    )

    def __init__(
        self,
        route: TcpRoute,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        client_ip: bytes,
    ) -> None:
        self.route = route
        self.loop = loop
        self.client: socket.socket | None = client
        self.client_ip = client_ip
        self.phase = Phase.CONNECTING
        self.deadline = math.inf
        self.server: Server | None = None  # set while counted on it (request_started)
        self.server_name = "-"  # the last server picked, for the access log
        self.upstream: socket.socket | None = None
        self.tried: list[Server] = []
        self.pump: Pump | TlsPump | None = None
        self._resolving: asyncio.Task[None] | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.end = ""
        self.started_at = time.monotonic() if route.log_access else 0.0

    def __repr__(self) -> str:
        server = self.server.name if self.server else "-"
        return f"<Tunnel {self.client_ip.decode()} {self.phase.value} server={server}>"

    def start(self) -> None:
        self._try_next()

    # --- connecting ----------------------------------------------------------------------

    def _try_next(self) -> None:
        """Connect to a server not tried yet, or reset the client if none is left."""
        route = self.route
        tried = self.tried
        server = None
        if len(tried) <= route.settings.retries:
            server = route.backend.select(self.loop.time(), self.client_ip, tried)
            if server is not None and server.inflight >= server.maxconn:
                # At its maxconn: another server with a free slot, else none (a tunnel has
                # no request to queue; balancer/queue.py queues HTTP requests only).
                full = [*tried, *(s for s in route.backend.servers if s.inflight >= s.maxconn)]
                server = route.backend.select(self.loop.time(), self.client_ip, full)
        if server is None:
            self._give_up("no_server")
            return
        self.server = server
        self.server_name = server.name
        server.request_started()
        self.deadline = self.loop.time() + route.settings.connect_s
        target = route.sockaddr(server.address)
        if target is None:
            self._resolving = self.loop.create_task(self._resolve(server.address))
        else:
            self._connect(*target)

    async def _resolve(self, address: Address) -> None:
        try:
            infos = await self.loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self._resolving = None
            self._connect_failed(f"cannot resolve {address.host}: {exc}")
            return
        self._resolving = None
        family, _, _, _, sockaddr = infos[0]
        self._connect(family, sockaddr)

    def _connect(self, family: int, sockaddr: tuple[Any, ...]) -> None:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        except OSError as exc:  # out of fds: not the server's fault, so not observed
            log.warning("tunnel_socket_failed listener=%s error=%s", self.route.listener.name, exc)
            self._end_server_request()
            self._give_up("no_resources")
            return
        self.upstream = sock
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(sockaddr)
        if code == errno.EINPROGRESS:
            self.loop.add_writer(sock.fileno(), self._connect_ready)
        elif code == 0:
            self._connected()
        else:
            self._connect_failed(f"connect to {sockaddr[0]}:{sockaddr[1]}: {errno.errorcode[code]}")

    def _connect_ready(self) -> None:
        sock = self.upstream
        assert sock is not None
        self.loop.remove_writer(sock.fileno())
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._connect_failed(f"connect failed: {errno.errorcode.get(code, code)}")
        else:
            self._connected()

    def _connect_failed(self, reason: str) -> None:
        route, server = self.route, self.server
        assert server is not None
        self._drop_upstream()
        if server.is_observed:
            route.observe(server, False)
        if count := route.failures_to_log(server, self.loop.time()):
            log.warning(
                "upstream_connect_failed listener=%s server=%s failures=%d error=%s",
                route.listener.name,
                server.name,
                count,
                reason,
            )
        self._end_server_request()
        self.tried.append(server)
        self._try_next()

    def _connected(self) -> None:
        route, server = self.route, self.server
        client, upstream = self.client, self.upstream
        assert server is not None and client is not None and upstream is not None
        self.client = self.upstream = None
        if server.is_observed:
            route.observe(server, True)
        server.connection_opened()
        self.phase = Phase.PUMPING
        self.deadline = self.loop.time() + route.settings.tunnel_s
        if route.tls is not None:  # TLS: no splice, a copy between transports (issue 14)
            host = server.address.host
            self.pump = TlsPump(self.loop, client, upstream, route.tls, host, self._pump_ended)
        else:
            self.pump = Pump(self.loop, client, upstream, route.pool, self._pump_ended)
        self.pump.start()

    def _drop_upstream(self) -> None:
        if self._resolving is not None:
            self._resolving.cancel()
            self._resolving = None
        sock, self.upstream = self.upstream, None
        if sock is not None:
            self.loop.remove_writer(sock.fileno())
            sock.close()

    def _end_server_request(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.request_finished()
            slot_freed(server, self.loop.time())

    def _give_up(self, end: str) -> None:
        """No server could be connected: reset the client (see the module docstring)."""
        client, self.client = self.client, None
        assert client is not None
        with contextlib.suppress(OSError):  # fails only if the client already reset: no RST due
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        client.close()
        self._closed(end)

    # --- pumping and ending --------------------------------------------------------------

    def _pump_ended(self, pump: Pump | TlsPump) -> None:
        server, self.server = self.server, None
        assert server is not None and pump.end is not None
        server.connection_closed()
        server.request_finished()
        slot_freed(server, self.loop.time())
        self.bytes_up, self.bytes_down = pump.bytes_up, pump.bytes_down
        self._closed(self.end or pump.end.value)

    def _closed(self, end: str) -> None:
        self.phase = Phase.CLOSED
        self.end = end
        self.pump = None
        self.route.forget(self)

    def deadline_passed(self) -> None:
        """Called by ``TcpRoute.sweep``: the connect took too long, or the tunnel idled."""
        if self.phase is Phase.CONNECTING:
            self._connect_failed("connect timed out")
        elif self.pump is not None:
            self.end = "idle"
            self.pump.close()

    def abort(self) -> None:
        """Reset the client (and the server, if connected) now."""
        if self.pump is not None:
            self.pump.abort()
        elif self.phase is Phase.CONNECTING:
            self._drop_upstream()
            self._end_server_request()
            self._give_up("aborted")

    def log_access(self) -> None:
        access_log.info(
            "tunnel client=%s listener=%s server=%s end=%s bytes_up=%d bytes_down=%d ms=%.1f",
            self.client_ip.decode(),
            self.route.listener.name,
            self.server_name,
            self.end,
            self.bytes_up,
            self.bytes_down,
            (time.monotonic() - self.started_at) * 1000.0,
        )
