"""A large body moved with ``os.splice``, bypassing Python buffers: a response's server ->
client, a request's client -> server. ``BodySplice`` moves the bytes; ``BodySplicing``, a mixin
of http/proxy.py's ``ClientConnection`` (which picks the bodies), waits for the moment to start
it and hands the connection back to HTTP after.

Measured with benchmarks/bulk_http.sh (nginx behind, proxy pinned to its own core, medians
of 5 interleaved rounds, RESULTS.md): a 256 MiB download cost 0.30 s of proxy CPU per GiB
spliced against 0.55 s through ``data_received``/``transport.write`` (HAProxy's forced splice:
0.28 s), an upload 0.14 s against 0.53 s (HAProxy 0.14 s). Setting one up costs ~25 us (two
dups, epoll registration), so only a body with at least ``splice_min_bytes`` left after the
first read goes through a ``BodySplice`` (config/model.py gives the crossover).

Unlike a tunnel, the connection goes on as HTTP afterwards, so the transports keep their
sockets: a ``BodySplice`` works on *duplicated* descriptors of both, while the source
transport's reading is paused and the destination's write buffer is empty (``BodySplicing``
waits for that). A response body: both transports paused, the client's write buffer empty
first. A request body: the client's reading paused, the server's write buffer empty first; the
server's reading goes on, which is safe (that transport only reads, the splice only writes) and
lets an early answer through (and, the rest of the body never read, the connection then
closes). The event loop's ``add_reader``/``add_writer`` accept the duplicates, which are other
fd numbers. When exactly ``size`` bytes are written, both duplicates are closed (no FIN: the
transports still hold the sockets) and ``BodySplicing`` resumes the transports. The rules of
tcp/pump.py hold: one readiness registration at a time, the pipe filled only when empty and
handed back when it drains, no allocation or logging per chunk.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from zdlb.errors import DownstreamProtocolError
from zdlb.http.phase import PAUSED_REQUEST_SPLICE, PAUSED_SPLICE
from zdlb.tcp.pipes import Pipe, PipePool
from zdlb.tcp.pump import MAX_FILLS_PER_EVENT, SPLICE_AVAILABLE

if TYPE_CHECKING:
    from zdlb.balancer.server import Server
    from zdlb.http.route import Route
    from zdlb.http.stream import RequestReader
    from zdlb.http.upstream import UpstreamConnection

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if SPLICE_AVAILABLE else 0
_ON_NOTHING = 0
_ON_SOURCE = 1
_ON_DEST = 2


class BodySplice:
    """Moves ``size`` bytes from ``src_fd`` to ``dst_fd``, then calls ``on_end(True)``; on EOF
    or an error of either socket first, ``on_end(False)``. Owns (and closes) both fds, which
    must be duplicates. ``moved`` counts bytes written to ``dst_fd``."""

    __slots__ = (
        "_dst",
        "_loop",
        "_on_end",
        "_pending",
        "_pipe",
        "_pool",
        "_src",
        "_waiting_on",
        "is_active",
        "moved",
        "remaining",
        "source_failed",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src_fd: int,
        dst_fd: int,
        size: int,
        pool: PipePool,
        on_end: Callable[[bool], None],
    ) -> None:
        self._loop = loop
        self._src = src_fd
        self._dst = dst_fd
        self._pool = pool
        self._on_end = on_end
        self._pipe: Pipe | None = None
        self._pending = 0  # bytes in the pipe, not yet written to dst
        self._waiting_on = _ON_NOTHING
        self.remaining = size  # bytes still to read from src
        self.moved = 0
        self.source_failed = False  # it ended early because src closed or failed, not dst
        self.is_active = False  # a readiness callback ran: the owner's deadline check clears it

    def __repr__(self) -> str:
        return f"<BodySplice remaining={self.remaining} pending={self._pending} moved={self.moved}>"

    def start(self) -> None:
        self._wait_on(_ON_SOURCE)

    def take_activity(self) -> bool:
        active, self.is_active = self.is_active, False
        return active

    def stop(self) -> None:
        """Unregister, give back or drop the pipe, close both fds. Idempotent; no callback."""
        if self._src < 0:
            return
        self._wait_on(_ON_NOTHING)
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            if self._pending:
                self._pool.discard(pipe)  # bytes left in it must not reach another body
            else:
                self._pool.release(pipe)
        os.close(self._src)
        os.close(self._dst)
        self._src = self._dst = -1

    def _end(self, ok: bool) -> None:
        self.stop()
        on_end, self._on_end = self._on_end, _ended
        on_end(ok)

    def _wait_on(self, target: int) -> None:
        current = self._waiting_on
        if current == target:
            return
        loop = self._loop
        if current == _ON_SOURCE:
            loop.remove_reader(self._src)
        elif current == _ON_DEST:
            loop.remove_writer(self._dst)
        if target == _ON_SOURCE:
            loop.add_reader(self._src, self._on_readable)
        elif target == _ON_DEST:
            loop.add_writer(self._dst, self._on_writable)
        self._waiting_on = target

    def _on_readable(self) -> None:
        self.is_active = True
        self._run()

    def _on_writable(self) -> None:
        self.is_active = True
        if self._drain():
            self._run()

    def _drain(self) -> bool:
        """Write the pipe's bytes to dst. True once it is empty (and handed back)."""
        pipe = self._pipe
        assert pipe is not None
        pending = before = self._pending
        failed = False
        try:
            while pending:
                pending -= os.splice(pipe[0], self._dst, pending, None, None, _SPLICE_FLAGS)
        except BlockingIOError:
            pass
        except OSError:
            failed = True
        self.moved += before - pending
        self._pending = pending
        if failed:
            self._end(False)
            return False
        if pending:
            self._wait_on(_ON_DEST)
            return False
        self._pipe = None
        self._pool.release(pipe)
        if not self.remaining:
            self._end(True)
            return False
        return True

    def _run(self) -> None:
        # As tcp/pump.py's _SpliceDirection._move, bounded by the body's length: never read a
        # byte of the next response.
        size = self._pool.pipe_bytes
        for _ in range(MAX_FILLS_PER_EVENT):
            try:
                pipe = self._pipe = self._pool.acquire()
            except OSError:
                self._end(False)
                return
            want = min(size, self.remaining)
            try:
                filled = os.splice(self._src, pipe[1], want, None, None, _SPLICE_FLAGS)
            except BlockingIOError:
                filled = -1
            except OSError:
                filled = 0
            if filled <= 0:
                self._pipe = None
                self._pool.release(pipe)
                if filled == 0:  # EOF or a reset before the body ended
                    self.source_failed = True
                    self._end(False)
                else:
                    self._wait_on(_ON_SOURCE)
                return
            self.remaining -= filled
            self._pending = filled
            if not self._drain():
                return  # waiting on dst (registered by _drain), or ended
            if filled < want:
                break  # src gave less than asked: most likely empty, wait for readiness
        self._wait_on(_ON_SOURCE)


def dup_fds(src: asyncio.Transport, dst: asyncio.Transport) -> tuple[int, int]:
    """Duplicates of the descriptors of two transports' sockets, for a ``BodySplice``. Raises
    OSError (EMFILE) with nothing left open."""
    # asyncio gives a TransportSocket, uvloop a PseudoSocket: both only wrap the fd.
    src_fd = os.dup(src.get_extra_info("socket").fileno())
    try:
        return src_fd, os.dup(dst.get_extra_info("socket").fileno())
    except OSError:
        os.close(src_fd)
        raise


def _ended(ok: bool) -> None:
    """Stands in for ``on_end`` once it was called."""


class BodySplicing:
    """The events of a ``ClientConnection`` (http/proxy.py) while a body goes by ``BodySplice``.

    A mixin of that class, which sets every field named below: they are declared for mypy only.
    """

    if not TYPE_CHECKING:  # mypy would take the fields declared below for missing slots
        __slots__ = ()  # ClientConnection holds the fields

    if TYPE_CHECKING:
        route: Route
        loop: asyncio.AbstractEventLoop
        transport: asyncio.Transport | None
        reader: RequestReader
        server: Server | None
        upstream: UpstreamConnection | None
        _paused: int
        _replay: list[bytes] | None
        _bytes_out: int
        _splice_body: bool
        _splicer: BodySplice | None

        def _pause_reading(self, reason: int) -> None: ...
        def _resume_reading(self, reason: int) -> None: ...
        def _flush_client(self) -> None: ...
        def _abort_exchange(self) -> None: ...
        def _reject(self, exc: DownstreamProtocolError) -> None: ...
        def upstream_flushed(self) -> None: ...
        def abort(self) -> None: ...

    # --- a long response body -------------------------------------------------------------

    def _prepare_splice(self) -> None:
        """Stop both transports reading, wait for the client's write buffer to empty (a limit
        of 0 makes resume_writing say so), then splice the rest of the body."""
        self._splice_body = False
        upstream, transport = self.upstream, self.transport
        if (
            upstream is None
            or transport is None
            or upstream.reader.remaining_body < self.route.splice_min_bytes
        ):
            self.upstream_flushed()  # most of the body came with the head: the plain path
            return
        self._flush_client()
        upstream.pause_reading()
        self._pause_reading(PAUSED_SPLICE)
        transport.set_write_buffer_limits(high=0)
        self._try_splice()

    def _try_splice(self) -> None:
        upstream, transport = self.upstream, self.transport
        if not self._paused & PAUSED_SPLICE or self._splicer is not None:
            return
        if transport is None or upstream is None or upstream.transport is None:
            return  # lost meanwhile: connection_lost or upstream_lost ends the exchange
        if transport.get_write_buffer_size():
            return  # resume_writing calls again once empty
        transport.set_write_buffer_limits()  # back to the defaults for the rest of the life
        size = upstream.reader.take_body()  # (its llhttp parser is then not reused: harmless)
        if not self._start_splicer(upstream.transport, transport, size, self._splice_ended):
            upstream.resume_reading()  # out of fds: the reader takes the body, as for a short one
            self._resume_reading(PAUSED_SPLICE)

    def _splice_ended(self, ok: bool) -> None:
        """The body was moved whole (``ok``): resume both transports and end the response
        as if the reader had seen it; else the answer is cut and both sides are reset."""
        splicer, self._splicer = self._splicer, None
        moved = splicer.moved if splicer is not None else 0
        self._bytes_out += moved
        self.route.stats.bytes_out += moved
        upstream = self.upstream
        if not ok or upstream is None:
            if upstream is not None:
                self.upstream = None
                upstream.owner = None
                upstream.abort()
            self._abort_exchange()
            self.abort()
            return
        upstream.resume_reading()
        self._resume_reading(PAUSED_SPLICE)
        upstream.reader.body_moved(moved)  # response_end: pool the upstream, finish
        self._flush_client()

    # --- a long request body --------------------------------------------------------------

    def _try_splice_request(self) -> None:
        """Splice the rest of the request body to the server once everything read before it
        was written there (a write limit of 0 makes resume_upstream_writes say so). The
        client's reading stays paused meanwhile; the server's goes on, so an early answer
        (413, 401...) still reaches the client and ends the exchange (_finish_exchange)."""
        upstream, transport = self.upstream, self.transport
        if self._splicer is not None or transport is None or upstream is None:
            return  # splicing already, lost, or still connecting (_open flushes again)
        upstream_transport = upstream.transport
        if upstream_transport is None:
            return
        if self.reader.remaining_body < self.route.splice_min_bytes:
            self._resume_reading(PAUSED_REQUEST_SPLICE)  # most of it came with the head
            return
        if upstream_transport.get_write_buffer_size():
            upstream_transport.set_write_buffer_limits(high=0)
            return  # resume_upstream_writes calls again once empty
        upstream_transport.set_write_buffer_limits()  # the pooled connection's defaults
        size = self.reader.remaining_body
        if not self._start_splicer(transport, upstream_transport, size, self._request_splice_ended):
            self._resume_reading(PAUSED_REQUEST_SPLICE)  # out of fds: the plain path takes it
            return
        self._replay = None  # the body is not held: the request can no longer be replayed

    def _start_splicer(
        self,
        src: asyncio.Transport,
        dst: asyncio.Transport,
        size: int,
        on_end: Callable[[bool], None],
    ) -> bool:
        """Start moving ``size`` bytes from ``src``'s socket to ``dst``'s; False if no
        descriptor was left to duplicate them (nothing started)."""
        try:
            src_fd, dst_fd = dup_fds(src, dst)
        except OSError:
            return False
        pool = self.route.tunnel_pool
        assert isinstance(pool, PipePool)  # splice_min_bytes is infinite otherwise
        self._splicer = BodySplice(self.loop, src_fd, dst_fd, size, pool, on_end)
        self._splicer.start()
        return True

    def _request_splice_ended(self, ok: bool) -> None:
        """The body reached the server whole (``ok``): the reader ends the request and the
        client is read again. A client that stopped short is answered 400 and closed. Any
        other failure (the server's socket, no pipe) hands the rest of the body back to the
        plain path, which meets the same end the usual way (upstream_lost, 502)."""
        splicer, self._splicer = self._splicer, None
        if splicer is None:
            return
        self._account_request_splice(splicer.moved)
        if not ok and splicer.source_failed:
            self._reject(DownstreamProtocolError("request body cut short", 400))
            return
        self._resume_reading(PAUSED_REQUEST_SPLICE)
        if splicer.moved:
            self.reader.body_moved(splicer.moved)  # at the body's end: request_end

    def _stop_request_splice(self) -> None:
        """The exchange ended while the body was being spliced: what is left is never read,
        so the connection closes after the answer (``_request_done`` stays False)."""
        splicer, self._splicer = self._splicer, None
        if splicer is not None:
            splicer.stop()
            self._account_request_splice(splicer.moved)

    def _account_request_splice(self, moved: int) -> None:
        self.route.stats.bytes_in += moved
        if self.server is not None:
            self.route.upstreams[self.server.name].stats.bytes_in += moved
