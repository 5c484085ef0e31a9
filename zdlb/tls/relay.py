"""The copy path between two transports, for bytes zdlb does not parse when a socket cannot be
handed to the pump (tcp/pump.py): a TLS connection's bytes exist in clear only inside its
``ssl`` transport, so they can be neither spliced nor read from the raw socket.

Used after a ``101`` when either side speaks TLS (http/connection.py), and by TCP listeners
that terminate TLS (tcp/tls_proxy.py). It offers the pump's interface (``start``,
``take_activity``, ``close``, ``abort``, ``bytes_up``, ``bytes_down``, one ``on_end`` call), so
the sweeper and the accounting treat both alike.

Rules:
1. Each side's bytes are written to the other as they arrive; a side whose write buffer is over
   its high-water mark pauses reading on the other (the transports' own flow control).
2. EOF from one side: a plain TCP peer gets ``write_eof`` (half-close, as the pump's
   ``shutdown(SHUT_WR)``) and the relay goes on the other way; a TLS peer cannot half-close,
   so it is closed after its buffered bytes are written.
3. A side lost closes the other (abort if the loss was an error); ``on_end`` runs once, when
   both are gone.
No per-chunk logging or allocation beyond the chunk the transport hands over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Relay:
    """Two transports relaying to each other; ``client`` is downstream (bytes_up from it)."""

    __slots__ = (
        "_client",
        "_on_end",
        "_open",
        "_upstream",
        "active",
        "bytes_down",
        "bytes_up",
        "failed",
    )

    def __init__(
        self,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        on_end: Callable[[Relay], None],
    ) -> None:
        self._client = client
        self._upstream = upstream
        self._on_end: Callable[[Relay], None] | None = on_end
        self._open = 2
        self.active = False  # bytes moved since the last take_activity
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self.failed = ""  # "client" or "upstream": the first side lost with an error

    def __repr__(self) -> str:
        return f"<Relay up={self.bytes_up} down={self.bytes_down} open={self._open}>"

    def start(self, held_up: bytes = b"", held_down: bytes = b"") -> None:
        """Take both transports over (their protocols are replaced; no connection_lost reaches
        the old ones), send what was read before (``held_up`` to the server, ``held_down`` to
        the client), and read both sides."""
        client, upstream = self._client, self._upstream
        client.set_protocol(_Side(self, upstream, True, _is_plain(client)))
        upstream.set_protocol(_Side(self, client, False, _is_plain(upstream)))
        if held_up:
            self.bytes_up += len(held_up)
            upstream.write(held_up)
        if held_down:
            self.bytes_down += len(held_down)
            client.write(held_down)
        for transport in (client, upstream):
            if transport.is_closing():
                self._open -= 1  # lost before the switch: its connection_lost went elsewhere
            else:
                transport.resume_reading()
        if self._open < 2:
            self.close()
            self._check_end()

    @property
    def is_splicing(self) -> bool:
        return False  # never: TLS bytes exist in clear only inside the transports

    def take_activity(self) -> bool:
        active, self.active = self.active, False
        return active

    def close(self) -> None:
        """Close both sides after their buffered bytes (the idle deadline, a shutdown)."""
        for transport in (self._client, self._upstream):
            if not transport.is_closing():
                transport.close()

    def abort(self) -> None:
        self._client.abort()
        self._upstream.abort()

    def side_lost(self, is_client: bool, peer: asyncio.Transport, exc: Exception | None) -> None:
        self._open -= 1
        if exc is not None and not self.failed:
            self.failed = "client" if is_client else "upstream"
        if not peer.is_closing():
            if exc is None:
                peer.close()
            else:
                peer.abort()
        self._check_end()

    def _check_end(self) -> None:
        if self._open <= 0 and self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(self)


class _Side(asyncio.Protocol):
    """One transport's events, applied to its peer."""

    __slots__ = ("_is_client", "_is_plain", "_peer", "_relay")

    def __init__(
        self, relay: Relay, peer: asyncio.Transport, is_client: bool, is_plain: bool
    ) -> None:
        self._relay = relay
        self._peer = peer
        self._is_client = is_client
        self._is_plain = is_plain  # plain TCP on this side: it may stay half-open

    def data_received(self, data: bytes) -> None:
        relay = self._relay
        relay.active = True
        if self._is_client:
            relay.bytes_up += len(data)
        else:
            relay.bytes_down += len(data)
        self._peer.write(data)

    def eof_received(self) -> bool:
        peer = self._peer
        if peer.can_write_eof() and not peer.is_closing():
            peer.write_eof()
            return self._is_plain  # keep reading the peer's answer where TCP allows it
        peer.close()
        return False

    def pause_writing(self) -> None:
        self._peer.pause_reading()

    def resume_writing(self) -> None:
        if not self._peer.is_closing():
            self._peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.side_lost(self._is_client, self._peer, exc)


def _is_plain(transport: asyncio.Transport) -> bool:
    return transport.get_extra_info("ssl_object") is None
