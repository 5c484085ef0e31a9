"""Where tunnel bytes wait between two sockets: pooled pipes (splice) and pooled buffers (copy).

A pump direction holds a pipe or a buffer only while bytes sit in it (the destination was
full); otherwise it gives it back before returning to the loop, as HAProxy does with its pipes.
So an idle tunnel holds two sockets and nothing else, and a busy process needs about as many
pipes as it has backpressured directions, not two per tunnel.

Rules:

- ``acquire`` hands out an *empty* pipe or buffer; ``release`` takes back only empty ones, and
  the caller says so. A pipe that still holds bytes goes to ``discard``, which closes it: bytes
  left in a reused pipe would be spliced into the next tunnel.
- At most ``max_idle`` idle entries are kept; the rest are closed (pipes) or dropped (buffers).
- No event loop, no logging. Only ``acquire`` makes system calls (pipe2, fcntl), and only when
  no idle pipe is left.
"""

from __future__ import annotations

import fcntl
import os

# Measured with benchmarks/bulk.sh (256 MiB downloads through one tunnel, proxy pinned to one
# core, two runs; benchmarks/RESULTS.md, "TCP bulk"): CPU seconds per GiB were 0.42-0.47 with
# 64 KiB pipes, 0.36-0.37 with 256 KiB and 0.32-0.33 with 1 MiB, 24-30% less than 64 KiB
# (HAProxy, forced splice, 1 MiB pipes: 0.31-0.36). Each splice moves up to a pipe's worth, so
# a bigger pipe means fewer splices and loop wake-ups per GiB. 1 MiB is also the default
# /proc/sys/fs/pipe-max-size, the most an unprivileged process may ask for; the kernel rounds
# a size up to a power of two pages. The default is
# zdlb.config.model.DEFAULT_PIPE_BYTES (the `pipe_bytes` listener key).
# Idle pipes kept for reuse. An idle pipe costs two fds and a ~10 KiB slot ring, but for an
# unprivileged user its full size counts against /proc/sys/fs/pipe-user-pages-soft (64 MiB by
# default), past which new pipes are capped at two pages: 16 idle 1 MiB pipes use a quarter.
DEFAULT_MAX_IDLE_PIPES = 16
# Idle copy buffers kept for reuse (the fallback pump): memory only, pipe_bytes each.
DEFAULT_MAX_IDLE_BUFFERS = 16

Pipe = tuple[int, int]  # (read end, write end)
Buffer = tuple[bytearray, memoryview]  # a buffer and a view of it, made once


class PipePool:
    """Non-blocking pipes of ``pipe_bytes`` each, reused while empty.

    ``created`` counts pipes ever made and ``undersized`` those the kernel refused to grow
    (``F_SETPIPE_SZ`` fails with EPERM past the per-user limit): they still work, with the
    default 64 KiB, at a higher CPU cost per byte.
    """

    __slots__ = ("_idle", "created", "max_idle", "pipe_bytes", "undersized")

    def __init__(self, pipe_bytes: int, max_idle: int = DEFAULT_MAX_IDLE_PIPES) -> None:
        self.pipe_bytes = pipe_bytes
        self.max_idle = max_idle
        self._idle: list[Pipe] = []
        self.created = 0
        self.undersized = 0

    def __repr__(self) -> str:
        return (
            f"<PipePool pipe_bytes={self.pipe_bytes} idle={len(self._idle)} created={self.created}>"
        )

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def acquire(self) -> Pipe:
        """An empty pipe. Raises OSError (EMFILE, ENFILE) when no fd is left for a new one."""
        if self._idle:
            return self._idle.pop()
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.created += 1
        try:
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, self.pipe_bytes)
        except OSError:
            self.undersized += 1
        return read_fd, write_fd

    def release(self, pipe: Pipe) -> None:
        """Take back a pipe the caller knows to be empty."""
        if len(self._idle) < self.max_idle:
            self._idle.append(pipe)
        else:
            _close_pipe(pipe)

    def discard(self, pipe: Pipe) -> None:
        """Close a pipe that may still hold bytes."""
        _close_pipe(pipe)

    def close(self) -> None:
        """Close every idle pipe; the pool stays usable and makes new ones on demand."""
        idle, self._idle = self._idle, []
        for pipe in idle:
            _close_pipe(pipe)


class BufferPool:
    """Buffers of ``buffer_bytes`` for the copy pump, each with a memoryview made once."""

    __slots__ = ("_idle", "buffer_bytes", "created", "max_idle")

    def __init__(self, buffer_bytes: int, max_idle: int = DEFAULT_MAX_IDLE_BUFFERS) -> None:
        self.buffer_bytes = buffer_bytes
        self.max_idle = max_idle
        self._idle: list[Buffer] = []
        self.created = 0

    def __repr__(self) -> str:
        return (
            f"<BufferPool buffer_bytes={self.buffer_bytes} idle={len(self._idle)}"
            f" created={self.created}>"
        )

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def acquire(self) -> Buffer:
        """A buffer whose contents do not matter (the caller overwrites before it reads)."""
        if self._idle:
            return self._idle.pop()
        self.created += 1
        buf = bytearray(self.buffer_bytes)
        return buf, memoryview(buf)

    def release(self, buffer: Buffer) -> None:
        if len(self._idle) < self.max_idle:
            self._idle.append(buffer)

    def discard(self, buffer: Buffer) -> None:
        """Drop a buffer; unlike a pipe there is nothing to close."""

    def close(self) -> None:
        self._idle = []


def _close_pipe(pipe: Pipe) -> None:
    os.close(pipe[0])
    os.close(pipe[1])
