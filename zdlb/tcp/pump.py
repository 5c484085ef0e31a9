"""The TCP hot path: bytes both ways between two raw sockets, and nothing else.

A ``Pump`` owns two connected, non-blocking sockets that no asyncio transport owns, and moves
bytes between them in two independent *directions* (downstream -> upstream is ``up``, upstream
-> downstream is ``down``). Each direction either splices socket -> pipe -> socket
(``os.splice`` with SPLICE_F_MOVE | SPLICE_F_NONBLOCK: the payload never enters user space) or,
where splice is unavailable or turned off, copies through a pooled buffer with ``recv_into``
and ``send``.

Rules:

- A direction waits on exactly one readiness event at a time, registered on the loop with
  ``add_reader``/``add_writer``: its source readable while its pipe is empty, its destination
  writable while the pipe holds bytes. Swapping one for the other is the backpressure: a
  destination that does not read stops the reading of the source, so at most one pipe (or
  buffer) of bytes per direction waits in user-visible memory.
- The pipe is filled only when empty, so EAGAIN from the source always means "no data" (a pipe
  full of slots would otherwise look the same), and it is handed back to the pool whenever it
  drains (see pipes.py).
- EOF from a source is propagated as ``shutdown(SHUT_WR)`` of the destination, so a client that
  stops sending still gets the whole answer. When both directions have seen EOF, both sockets
  are closed (FIN already sent both ways).
- A socket whose peer reset or vanished (any OSError but EAGAIN) ends the pump; the *other*
  socket is reset (SO_LINGER 0, close), so its peer learns of the failure rather than of a
  clean end. ``abort()`` resets both; ``close()`` (the idle deadline) closes both.
- Every socket is closed exactly once, in ``_finish``, after its readiness callbacks are removed.
- Per chunk: no logging, no metric call, no allocation of payload memory (the copy pump slices
  a memoryview header per ``send``, never the bytes). Bytes are counted in locals, stored once
  per readiness callback, and reported once, to ``on_end``, when the pump ends.
- Activity for the idle deadline is one boolean store per callback; the owner's sweeper reads
  and clears it (``take_activity``), so no timer is armed or re-armed per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
import struct
from collections.abc import Callable

from zdlb.tcp.pipes import Buffer, BufferPool, Pipe, PipePool

# Where splice exists (Linux, Python >= 3.10); elsewhere every pump copies.
SPLICE_AVAILABLE = hasattr(os, "splice")
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if SPLICE_AVAILABLE else 0
# Fills of the pipe (or buffer) per readiness callback before yielding to other tunnels: with
# 1 MiB pipes, at most 4 MiB (~2 ms at 2 GB/s) per turn; level-triggered readiness brings the
# direction back on the next loop iteration if more is waiting.
MAX_FILLS_PER_EVENT = 4
_LINGER_ZERO = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

# What a direction waits on. Plain ints, compared in the hot path.
_ON_NOTHING = 0
_ON_SOURCE = 1
_ON_DEST = 2

# What one step of a direction ended with.
_WAIT_SOURCE = 0  # the source has no more data now
_WAIT_DEST = 1  # the destination is full and bytes wait in the pipe
_DRAINED = 2  # the pipe was emptied (after waiting on the destination)
_EOF = 3  # the source half-closed and every byte was delivered
_SOURCE_FAILED = 4  # reading the source failed (reset, or any other socket error)
_DEST_FAILED = 5  # writing the destination failed (reset, broken pipe)
_NO_RESOURCES = 6  # no pipe could be made (out of fds)


class PumpEnd(enum.Enum):
    """How a pump ended; ``Pump.end`` holds it once ``on_end`` has been called."""

    EOF = "eof"  # both sides half-closed in turn: a clean end
    DOWNSTREAM_FAILED = "downstream_failed"  # the client reset or vanished; upstream was reset
    UPSTREAM_FAILED = "upstream_failed"  # the server reset or vanished; downstream was reset
    NO_RESOURCES = "no_resources"  # no pipe could be made: both sides reset
    CLOSED = "closed"  # closed by the owner (idle deadline): both sides closed
    ABORTED = "aborted"  # aborted by the owner (shutdown): both sides reset


class Pump:
    """Moves bytes both ways between ``downstream`` and ``upstream`` until it ends.

    Takes ownership of both sockets: from ``start()`` on, only the pump reads, writes or closes
    them. ``pool`` decides the kind: a ``PipePool`` splices, a ``BufferPool`` copies.
    ``on_end(pump)`` is called exactly once, after both sockets are closed; ``end``,
    ``bytes_up`` (downstream -> upstream) and ``bytes_down`` are final by then.
    """

    __slots__ = ("_down", "_up", "bytes_down", "bytes_up", "end", "loop", "on_end", "sockets")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        downstream: socket.socket,
        upstream: socket.socket,
        pool: PipePool | BufferPool,
        on_end: Callable[[Pump], None],
    ) -> None:
        self.loop = loop
        self.sockets: tuple[socket.socket, socket.socket] | None = (downstream, upstream)
        self.on_end = on_end
        self.end: PumpEnd | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        kind = _SpliceDirection if isinstance(pool, PipePool) else _CopyDirection
        self._up: _Direction = kind(self, downstream, upstream, pool)
        self._down: _Direction = kind(self, upstream, downstream, pool)

    def __repr__(self) -> str:
        state = self.end.value if self.end else "running"
        return f"<Pump {state} up={self._up!r} down={self._down!r}>"

    @property
    def is_splicing(self) -> bool:
        return isinstance(self._up, _SpliceDirection)

    @property
    def pending_up(self) -> int:
        """Bytes read from downstream and not yet written upstream (waiting in a pipe)."""
        return self._up.pending

    @property
    def pending_down(self) -> int:
        """Bytes read from upstream and not yet written downstream."""
        return self._down.pending

    @property
    def moved_up(self) -> int:
        """Bytes written upstream so far (updated once per readiness callback)."""
        return self._up.moved

    @property
    def moved_down(self) -> int:
        """Bytes written downstream so far (updated once per readiness callback)."""
        return self._down.moved

    @property
    def is_reading_upstream(self) -> bool:
        """False while the down direction waits for the client to read (or has ended)."""
        return self._down.waiting_on == _ON_SOURCE

    def start(self) -> None:
        """Begin waiting for bytes on both sockets."""
        self._up.wait_on(_ON_SOURCE)
        self._down.wait_on(_ON_SOURCE)

    def take_activity(self) -> bool:
        """True if a readiness callback ran since the last call; clears the mark."""
        up, down = self._up, self._down
        active = up.is_active or down.is_active
        up.is_active = down.is_active = False
        return active

    def close(self) -> None:
        """End now, closing both sockets (FIN, or RST where the kernel still holds unread
        bytes). Bytes waiting in a pipe are dropped. No-op once ended."""
        self._finish(PumpEnd.CLOSED, reset_down=False, reset_up=False)

    def abort(self) -> None:
        """End now, resetting both sockets. No-op once ended."""
        self._finish(PumpEnd.ABORTED, reset_down=True, reset_up=True)

    def direction_ended(self, direction: _Direction, status: int) -> None:
        """Called by a direction that stopped for good with ``status``."""
        is_up = direction is self._up
        if status == _EOF:
            try:
                direction.dst.shutdown(socket.SHUT_WR)
            except OSError:  # the destination is already gone (ENOTCONN after a reset)
                status = _DEST_FAILED
            else:
                other = self._down if is_up else self._up
                if other.is_ended:
                    self._finish(PumpEnd.EOF, reset_down=False, reset_up=False)
                return
        if status == _NO_RESOURCES:
            self._finish(PumpEnd.NO_RESOURCES, reset_down=True, reset_up=True)
        elif (status == _SOURCE_FAILED) == is_up:  # the downstream socket failed
            self._finish(PumpEnd.DOWNSTREAM_FAILED, reset_down=False, reset_up=True)
        else:
            self._finish(PumpEnd.UPSTREAM_FAILED, reset_down=True, reset_up=False)

    def _finish(self, end: PumpEnd, *, reset_down: bool, reset_up: bool) -> None:
        sockets = self.sockets
        if sockets is None:
            return
        self.sockets = None
        self.end = end
        up, down = self._up, self._down
        up.stop()
        down.stop()
        self.bytes_up, self.bytes_down = up.moved, down.moved
        downstream, upstream = sockets
        _close(downstream, reset=reset_down)
        _close(upstream, reset=reset_up)
        on_end, self.on_end = self.on_end, _ended
        on_end(self)


def _ended(pump: Pump) -> None:
    """Stands in for ``on_end`` once it was called, so the pump no longer references its owner."""


def _close(sock: socket.socket, *, reset: bool) -> None:
    if reset:
        # Fails only on a socket that is already dead, which then needs no RST.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    sock.close()


class _Direction:
    """One way of a pump: ``src`` to ``dst``. Subclasses implement ``_move`` and ``_flush``."""

    __slots__ = (
        "dst",
        "dst_fd",
        "is_active",
        "is_ended",
        "loop",
        "moved",
        "pending",
        "pump",
        "src",
        "src_fd",
        "waiting_on",
    )

    def __init__(
        self, pump: Pump, src: socket.socket, dst: socket.socket, pool: PipePool | BufferPool
    ) -> None:
        self.pump: Pump | None = pump  # None once stopped: breaks the pump <-> direction cycle
        self.loop = pump.loop
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.waiting_on = _ON_NOTHING
        self.pending = 0  # bytes read from src, not yet written to dst
        self.moved = 0  # bytes written to dst
        self.is_active = False
        self.is_ended = False

    def __repr__(self) -> str:
        waits = ("nothing", "source", "dest")[self.waiting_on]
        return f"<{type(self).__name__} waits={waits} pending={self.pending} moved={self.moved}>"

    def on_readable(self) -> None:
        self.is_active = True
        self._settle(self._move())

    def on_writable(self) -> None:
        self.is_active = True
        status = self._flush()
        if status == _DRAINED:
            status = self._move()  # the source waited for us: it most likely has bytes now
        self._settle(status)

    def _settle(self, status: int) -> None:
        if status == _WAIT_SOURCE:
            self.wait_on(_ON_SOURCE)
        elif status == _WAIT_DEST:
            self.wait_on(_ON_DEST)
        else:
            self.wait_on(_ON_NOTHING)
            self.is_ended = True
            if self.pump is not None:
                self.pump.direction_ended(self, status)

    def wait_on(self, target: int) -> None:
        """Register for ``target``'s readiness (and drop the previous registration)."""
        current = self.waiting_on
        if current == target:
            return
        loop = self.loop
        if current == _ON_SOURCE:
            loop.remove_reader(self.src_fd)
        elif current == _ON_DEST:
            loop.remove_writer(self.dst_fd)
        if target == _ON_SOURCE:
            loop.add_reader(self.src_fd, self.on_readable)
        elif target == _ON_DEST:
            loop.add_writer(self.dst_fd, self.on_writable)
        self.waiting_on = target

    def stop(self) -> None:
        """Unregister, give back or drop the pipe, and forget the pump. Before any close."""
        self.wait_on(_ON_NOTHING)
        self.is_ended = True
        self._drop_store()
        self.pump = None

    def _move(self) -> int:
        raise NotImplementedError

    def _flush(self) -> int:
        raise NotImplementedError

    def _drop_store(self) -> None:
        raise NotImplementedError


class _SpliceDirection(_Direction):
    """src -> pipe -> dst with ``os.splice``: the kernel moves page references, not bytes."""

    __slots__ = ("pipe", "pool")

    def __init__(
        self, pump: Pump, src: socket.socket, dst: socket.socket, pool: PipePool | BufferPool
    ) -> None:
        super().__init__(pump, src, dst, pool)
        assert isinstance(pool, PipePool)
        self.pool: PipePool = pool
        self.pipe: Pipe | None = None

    def _move(self) -> int:
        # The hot loop: fill the empty pipe from src, drain it into dst, repeat. Long on purpose,
        # with everything it touches in locals: this is the per-chunk cost of a tunnel.
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = self.pool.acquire()
            except OSError:
                return _NO_RESOURCES
        read_fd, write_fd = pipe
        src_fd, dst_fd = self.src_fd, self.dst_fd
        size = self.pool.pipe_bytes
        splice, flags = os.splice, _SPLICE_FLAGS
        status = _WAIT_SOURCE
        moved = pending = 0
        fills = MAX_FILLS_PER_EVENT
        while fills:
            fills -= 1
            try:
                filled = splice(src_fd, write_fd, size, None, None, flags)
            except BlockingIOError:
                break
            except OSError:
                status = _SOURCE_FAILED
                break
            if filled == 0:
                status = _EOF
                break
            pending = filled
            try:
                while pending:
                    pending -= splice(read_fd, dst_fd, pending, None, None, flags)
            except BlockingIOError:
                status = _WAIT_DEST
            except OSError:
                status = _DEST_FAILED
            moved += filled - pending
            if pending or filled < size:
                # Bytes wait for dst, or dst failed; or src gave less than asked, so it is
                # most likely empty: wait for readiness rather than pay a splice for EAGAIN.
                break
        self.moved += moved
        self.pending = pending
        if not pending:
            self.pipe = None
            self.pool.release(pipe)
        return status

    def _flush(self) -> int:
        pipe = self.pipe
        assert pipe is not None
        read_fd, dst_fd = pipe[0], self.dst_fd
        splice, flags = os.splice, _SPLICE_FLAGS
        pending = before = self.pending
        status = _DRAINED
        try:
            while pending:
                pending -= splice(read_fd, dst_fd, pending, None, None, flags)
        except BlockingIOError:
            status = _WAIT_DEST
        except OSError:
            status = _DEST_FAILED
        self.moved += before - pending
        self.pending = pending
        if not pending:
            self.pipe = None
            self.pool.release(pipe)
        return status

    def _drop_store(self) -> None:
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return
        if self.pending:
            self.pool.discard(pipe)  # bytes left in it must not reach the next tunnel
        else:
            self.pool.release(pipe)


class _CopyDirection(_Direction):
    """src -> buffer -> dst with ``recv_into`` and ``send``: the fallback without splice."""

    __slots__ = ("buffer", "pool", "sent")

    def __init__(
        self, pump: Pump, src: socket.socket, dst: socket.socket, pool: PipePool | BufferPool
    ) -> None:
        super().__init__(pump, src, dst, pool)
        assert isinstance(pool, BufferPool)
        self.pool: BufferPool = pool
        self.buffer: Buffer | None = None
        self.sent = 0  # offset in the buffer of the first byte not yet sent

    def _move(self) -> int:
        buffer = self.buffer
        if buffer is None:
            buffer = self.buffer = self.pool.acquire()
        buf, view = buffer
        recv_into, send = self.src.recv_into, self.dst.send
        size = len(buf)
        status = _WAIT_SOURCE
        moved = pending = sent = 0
        fills = MAX_FILLS_PER_EVENT
        while fills:
            fills -= 1
            try:
                filled = recv_into(buf)
            except BlockingIOError:
                break
            except OSError:
                status = _SOURCE_FAILED
                break
            if filled == 0:
                status = _EOF
                break
            sent = 0
            try:
                while sent < filled:
                    sent += send(view[sent:filled])
            except BlockingIOError:
                status = _WAIT_DEST
            except OSError:
                status = _DEST_FAILED
            moved += sent
            pending = filled - sent
            if pending or filled < size:
                break  # as in _SpliceDirection._move
        self.moved += moved
        return self._keep(buffer, sent, pending, status)

    def _flush(self) -> int:
        buffer = self.buffer
        assert buffer is not None
        view, send = buffer[1], self.dst.send
        sent = start = self.sent
        end = sent + self.pending
        status = _DRAINED
        try:
            while sent < end:
                sent += send(view[sent:end])
        except BlockingIOError:
            status = _WAIT_DEST
        except OSError:
            status = _DEST_FAILED
        self.moved += sent - start
        return self._keep(buffer, sent, end - sent, status)

    def _keep(self, buffer: Buffer, sent: int, pending: int, status: int) -> int:
        """Remember what is left to send; give the buffer back if nothing is."""
        self.sent = sent
        self.pending = pending
        if not pending:
            self.buffer = None
            self.pool.release(buffer)
        return status

    def _drop_store(self) -> None:
        buffer, self.buffer = self.buffer, None
        if buffer is not None:
            self.pool.release(buffer)  # a buffer's stale bytes are overwritten before use
