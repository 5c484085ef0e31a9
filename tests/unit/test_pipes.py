"""The pipe and buffer pools: sizes, reuse, the idle bound, and closing what may hold bytes.

Pipes are real kernel pipes (no mock of ``os``); every test closes what it made, which the fd
count before and after checks.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest

from zdlb.tcp.pipes import BufferPool, PipePool

KIB = 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    assert open_fds() == before


@pytest.mark.parametrize("size", [64 * KIB, 256 * KIB, 1024 * KIB], ids=["64KiB", "256KiB", "1MiB"])
def test_pipes_get_the_asked_size_and_are_non_blocking(size: int) -> None:
    pool = PipePool(size)
    read_fd, write_fd = pool.acquire()
    try:
        assert fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ) == size
        assert os.get_blocking(read_fd) is False and os.get_blocking(write_fd) is False
        assert pool.undersized == 0
    finally:
        pool.discard((read_fd, write_fd))


def test_released_pipe_is_reused_lifo() -> None:
    pool = PipePool(64 * KIB)
    first, second = pool.acquire(), pool.acquire()
    pool.release(first)
    pool.release(second)
    assert pool.acquire() == second and pool.acquire() == first
    assert pool.created == 2
    pool.discard(first)
    pool.discard(second)


def test_idle_pipes_beyond_the_bound_are_closed() -> None:
    pool = PipePool(64 * KIB, max_idle=2)
    pipes = [pool.acquire() for _ in range(4)]
    for pipe in pipes:
        pool.release(pipe)
    assert pool.idle_count == 2
    with pytest.raises(OSError):
        os.fstat(pipes[3][0])  # the fourth found the pool full and was closed
    pool.close()
    assert pool.idle_count == 0


def test_a_pipe_that_holds_bytes_is_discarded_not_reused() -> None:
    pool = PipePool(64 * KIB)
    pipe = pool.acquire()
    os.write(pipe[1], b"left over")
    pool.discard(pipe)
    fresh = pool.acquire()
    try:
        with pytest.raises(BlockingIOError):
            os.read(fresh[0], 16)  # empty: nothing of the last tunnel reaches the next
    finally:
        pool.discard(fresh)


def test_buffers_are_reused_with_their_view() -> None:
    pool = BufferPool(64 * KIB, max_idle=1)
    buf, view = pool.acquire()
    assert len(buf) == 64 * KIB and view.obj is buf
    pool.release((buf, view))
    pool.release(pool.acquire())
    assert pool.acquire()[0] is buf and pool.created == 1
    pool.release(BufferPool(16).acquire())
    pool.release(BufferPool(16).acquire())
    assert pool.idle_count == 1
