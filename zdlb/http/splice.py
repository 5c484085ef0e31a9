"""A large body moved with ``os.splice``, bypassing Python buffers: a response's server ->
client, a request's client -> server. ``BodySplice`` moves the bytes; ``BodyDetour`` waits for
the moment to start it. http/connection.py's ``ClientConnection`` picks the bodies, pauses
its transports, hands them to a ``BodyDetour`` and is called back once with the outcome; it
then goes on as HTTP.

Measured with benchmarks/bulk_http.sh (nginx behind, proxy pinned to its own core, medians
of 5 interleaved rounds, RESULTS.md): a 256 MiB download cost 0.30 s of proxy CPU per GiB
spliced against 0.55 s through ``data_received``/``transport.write`` (HAProxy's forced splice:
0.28 s), an upload 0.14 s against 0.53 s (HAProxy 0.14 s). Setting one up costs ~25 us (two
dups, epoll registration), so only a body with at least ``splice_min_bytes`` left after the
first read goes through a ``BodySplice`` (config/model.py gives the crossover).

Unlike a tunnel, the connection goes on as HTTP afterwards, so the transports keep their
sockets: a ``BodySplice`` works on *duplicated* descriptors of both, while the source
transport's reading is paused and the destination's write buffer is empty (``BodyDetour``
waits for that). A response body: both transports paused, the client's write buffer empty
first. A request body: the client's reading paused, the server's write buffer empty first; the
server's reading goes on, which is safe (that transport only reads, the splice only writes) and
lets an early answer through (and, the rest of the body never read, the connection then
closes). The event loop's ``add_reader``/``add_writer`` accept the duplicates, which are other
fd numbers. When exactly ``size`` bytes are written, both duplicates are closed (no FIN: the
transports still hold the sockets) and the connection resumes the transports. The rules of
tcp/pump.py hold: one readiness registration at a time, the pipe filled only when empty and
handed back when it drains, no allocation or logging per chunk.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from zdlb.tcp.pipes import Pipe, PipePool
from zdlb.tcp.pump import MAX_FILLS_PER_EVENT, SPLICE_AVAILABLE

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


class BodyDetour:
    """Splices ``size`` bytes from ``src``'s socket to ``dst``'s once ``dst`` has written all it
    holds, then calls ``on_end(ok, moved, source_failed)`` once.

    The caller has paused ``src``'s reading (nothing more of the body enters Python) and calls
    ``poll`` whenever ``dst`` may have emptied its buffer (its ``resume_writing``, on a later
    loop iteration: see http/upgrade.py for why). Until the splice starts, ``dst`` runs with a
    write limit of 0, so that ``resume_writing`` says exactly "empty". If no descriptor is left
    to duplicate, ``on_end(False, 0, False)`` comes at once and nothing was moved: the caller
    lets the body take the plain path.
    """

    __slots__ = ("_dst", "_loop", "_on_end", "_pool", "_size", "_src", "splice")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: PipePool,
        src: asyncio.Transport,
        dst: asyncio.Transport,
        size: int,
        on_end: Callable[[bool, int, bool], None],
    ) -> None:
        self._loop = loop
        self._pool = pool
        self._src = src
        self._dst = dst
        self._size = size
        self._on_end = on_end
        self.splice: BodySplice | None = None

    def __repr__(self) -> str:
        return f"<BodyDetour size={self._size} {self.splice!r}>"

    @property
    def is_started(self) -> bool:
        return self.splice is not None

    def poll(self) -> None:
        """Start splicing if ``dst``'s buffer is empty; otherwise wait for the next ``poll``."""
        if self.splice is not None:
            return
        dst = self._dst
        if dst.get_write_buffer_size():
            dst.set_write_buffer_limits(high=0)
            return
        dst.set_write_buffer_limits()  # back to the defaults for the rest of its life
        try:
            src_fd, dst_fd = dup_fds(self._src, dst)
        except OSError:
            self._finish(False)
            return
        self.splice = BodySplice(self._loop, src_fd, dst_fd, self._size, self._pool, self._finish)
        self.splice.start()

    def take_activity(self) -> bool:
        """True if bytes moved since the last call (the connection's deadline check)."""
        return self.splice is not None and self.splice.take_activity()

    def stop(self) -> int:
        """Stop without calling back (the exchange ended otherwise); returns bytes moved."""
        self._on_end = _ended_detour
        splice, self.splice = self.splice, None
        if splice is None:
            return 0
        splice.stop()
        return splice.moved

    def _finish(self, ok: bool) -> None:
        splice = self.splice
        moved = splice.moved if splice is not None else 0
        failed = splice.source_failed if splice is not None else False
        on_end, self._on_end = self._on_end, _ended_detour
        on_end(ok, moved, failed)


def _ended_detour(ok: bool, moved: int, source_failed: bool) -> None:
    """Stands in for a ``BodyDetour``'s ``on_end`` once it was called or the detour stopped."""
