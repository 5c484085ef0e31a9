"""TLS on a TCP listener (TLS in, plain TCP out) or to a TCP backend's servers: the copy path.

A TLS connection's bytes exist in clear only inside its ``ssl`` transport, so the splice pump
(pump.py) cannot move them and kTLS is out of reach from Python's ``ssl``. A ``TlsPump`` takes
the two sockets tcp/proxy.py's ``Tunnel`` has (the client's, accepted; the server's, connected),
turns them into loop transports -- the client's with a TLS handshake under ``handshake_s``, the
server's with TLS when the backend has ``tls = true`` -- and relays between them
(tls/relay.py). It offers the ``Pump`` surface the tunnel and the sweeper use: ``start``,
``take_activity``, ``close``, ``abort``, ``bytes_up``, ``bytes_down``, ``end`` and one
``on_end(pump)`` call.

Rules:
1. The server is connected first, as for plain TCP (tcp/proxy.py picks it); a client whose
   handshake fails or stalls then costs that connection for at most ``handshake_s``.
2. A handshake failure ends the tunnel as ``downstream_failed`` (the client's) or
   ``upstream_failed`` (the server's: its certificate did not verify), without a log line per
   client: the access log says it.
3. The opening runs in one task the pump owns; ``abort``/``close`` cancel it, and every socket
   or transport made so far is closed before ``on_end``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass

from zdlb.config.model import BackendConfig, ListenerConfig
from zdlb.errors import CertificateError, ListenerError
from zdlb.tcp.pump import PumpEnd
from zdlb.tls.context import Origination, originate
from zdlb.tls.listener import TerminatingContext
from zdlb.tls.relay import Relay


@dataclass(frozen=True, slots=True)
class TlsSides:
    """Which sides of a TCP listener's tunnels speak TLS, and how."""

    terminate: TerminatingContext | None  # the listener's, None: plain TCP from clients
    handshake_s: float
    backend: BackendConfig  # its ``tls``: TLS to the servers


def tls_sides(listener: ListenerConfig, backend: BackendConfig) -> TlsSides | None:
    """None when neither side speaks TLS (the splice pump serves). Raises ListenerError when a
    certificate no longer loads (it did when the config was validated): a start fails, a
    reload is refused and changes nothing."""
    if listener.tls is None and backend.tls is None:
        return None
    terminate = None
    handshake_s = listener.timeouts.http_request_s
    if listener.tls is not None:
        tls = listener.tls
        try:
            terminate = TerminatingContext(listener.name, lambda: tls)
        except CertificateError as exc:
            raise ListenerError(0, f"listener {listener.name}: {exc}") from exc
        handshake_s = tls.handshake_s
    return TlsSides(terminate, handshake_s, backend)


class _Waiting(asyncio.Protocol):
    """A transport's protocol until the relay takes it: what arrives meanwhile is held (uvloop
    starts reading a plain accepted socket after connection_made, so pausing there is not
    enough) and reading pauses; the relay sends it on first."""

    __slots__ = ("held", "transport")

    def __init__(self) -> None:
        self.held: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a Transport
        transport.pause_reading()  # type: ignore[attr-defined]  # a ReadTransport

    def data_received(self, data: bytes) -> None:
        self.held.append(data)
        if self.transport is not None:
            self.transport.pause_reading()


class TlsPump:
    """Both sockets as transports, then a ``Relay`` (rules on top)."""

    __slots__ = (
        "_client",
        "_loop",
        "_on_end",
        "_origination",
        "_relay",
        "_sides",
        "_task",
        "_upstream",
        "bytes_down",
        "bytes_up",
        "end",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        upstream: socket.socket,
        sides: TlsSides,
        server_host: str,
        on_end: Callable[[TlsPump], None],
    ) -> None:
        self._loop = loop
        self._client: socket.socket | None = client
        self._upstream: socket.socket | None = upstream
        self._sides = sides
        self._origination: Origination | None = originate(sides.backend.tls, server_host)
        self._on_end: Callable[[TlsPump], None] | None = on_end
        self._relay: Relay | None = None
        self._task: asyncio.Task[None] | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.end: PumpEnd | None = None

    def __repr__(self) -> str:
        state = self.end.value if self.end else ("relaying" if self._relay else "opening")
        return f"<TlsPump {state} up={self.bytes_up} down={self.bytes_down}>"

    @property
    def is_splicing(self) -> bool:
        return False

    def start(self) -> None:
        self._task = self._loop.create_task(self._open(), name="tls tunnel opening")

    def take_activity(self) -> bool:
        return self._relay.take_activity() if self._relay is not None else False

    def close(self) -> None:
        if self._relay is not None:
            self.end = PumpEnd.CLOSED
            self._relay.close()
        elif self._task is not None:
            self.end = PumpEnd.CLOSED
            self._task.cancel()

    def abort(self) -> None:
        if self._relay is not None:
            self.end = PumpEnd.ABORTED
            self._relay.abort()
        elif self._task is not None:
            self.end = PumpEnd.ABORTED
            self._task.cancel()

    async def _open(self) -> None:
        loop, sides, origination = self._loop, self._sides, self._origination
        client_transport: asyncio.Transport | None = None
        # Made here: with ssl, uvloop returns its own SSLProtocol, not the one it was given.
        client_waiting, upstream_waiting = _Waiting(), _Waiting()
        failed = PumpEnd.DOWNSTREAM_FAILED
        try:
            # Each socket stays ours (closed by _fail) until its transport exists: closing a
            # socket object a transport already closed is a no-op.
            assert self._client is not None and self._upstream is not None
            transport, _ = await loop.connect_accepted_socket(
                lambda: client_waiting,
                sock=self._client,
                ssl=sides.terminate,
                ssl_handshake_timeout=sides.handshake_s if sides.terminate else None,
            )
            client_transport, self._client = transport, None
            failed = PumpEnd.UPSTREAM_FAILED
            if origination is None:
                upstream_transport, _ = await loop.create_connection(
                    lambda: upstream_waiting, sock=self._upstream
                )
            else:
                upstream_transport, _ = await loop.create_connection(
                    lambda: upstream_waiting,
                    sock=self._upstream,
                    ssl=origination.context,
                    server_hostname=origination.server_hostname,
                    ssl_handshake_timeout=sides.handshake_s,
                )
            self._upstream = None
        except (OSError, TimeoutError):
            self._fail(client_transport, failed)
            return
        except BaseException:  # cancelled by close/abort: the end is already set
            self._fail(client_transport, self.end or PumpEnd.ABORTED)
            raise
        self._task = None
        relay = self._relay = Relay(client_transport, upstream_transport, self._relayed)
        relay.start(b"".join(client_waiting.held), b"".join(upstream_waiting.held))

    def _fail(self, client_transport: asyncio.Transport | None, end: PumpEnd) -> None:
        self._task = None
        if client_transport is not None:
            client_transport.abort()
        for sock in (self._client, self._upstream):
            if sock is not None:
                sock.close()
        self._client = self._upstream = None
        self._finish(end)

    def _relayed(self, relay: Relay) -> None:
        self.bytes_up, self.bytes_down = relay.bytes_up, relay.bytes_down
        if self.end is None:
            match relay.failed:
                case "client":
                    self.end = PumpEnd.DOWNSTREAM_FAILED
                case "upstream":
                    self.end = PumpEnd.UPSTREAM_FAILED
                case _:
                    self.end = PumpEnd.EOF
        self._finish(self.end)

    def _finish(self, end: PumpEnd) -> None:
        self.end = end
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(self)
