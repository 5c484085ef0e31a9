"""The pump on real loopback sockets: bytes, half-closes, resets, backpressure, fds.

Each test builds two real TCP connections on 127.0.0.1 (client <-> downstream socket, upstream
socket <-> server), hands the middle two to a ``Pump`` and drives the outer two as raw
non-blocking sockets through the loop's ``sock_*`` methods. Every test runs with the splice pump
and the copy pump (``pump_kind``), on asyncio and on uvloop (conftest.py). Waits are bounded by
``asyncio.timeout``; the only fixed-length wait (``QUIET_S``) watches for progress that must
*not* happen.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest
import uvloop

from zdlb.tcp.pipes import BufferPool, PipePool
from zdlb.tcp.pump import Pump, PumpEnd

WAIT_S = 10.0  # every awaited expectation; loopback moves 64 MiB in well under a second
POLL_S = 0.002  # how often pump state (no change notification) is re-checked
QUIET_S = 0.2  # how long "no more progress" is watched for
PIPE_BYTES = 1 << 20
READ_BYTES = 1 << 20
MIB = 1 << 20


# --- helpers -----------------------------------------------------------------------------


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def eventually(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Return once ``predicate()`` holds. Pump state has no change notification (an event per
    chunk would cost the hot path), so this re-checks it every POLL_S, under a deadline."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)


async def until_still(value: Callable[[], int]) -> int:
    """Wait until ``value()`` stops changing for QUIET_S; return it."""
    async with asyncio.timeout(WAIT_S):
        last = value()
        while True:
            await asyncio.sleep(QUIET_S)  # watching for progress that must stop, not for readiness
            now = value()
            if now == last:
                return now
            last = now


class Peer:
    """One outer end (the client or the server) as a raw non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.sent = 0  # bytes accepted by the kernel so far

    async def send(self, data: bytes, chunk: int = MIB) -> None:
        view = memoryview(data)
        async with asyncio.timeout(WAIT_S):
            for offset in range(0, len(data), chunk):
                piece = view[offset : offset + chunk]
                await self.loop.sock_sendall(self.sock, piece)
                self.sent += len(piece)

    async def read_to_eof(self) -> tuple[bytearray, BaseException | None]:
        """Every byte until EOF or an error (returned, not raised)."""
        received = bytearray()
        buf = bytearray(READ_BYTES)
        async with asyncio.timeout(WAIT_S):
            while True:
                try:
                    n = await self.loop.sock_recv_into(self.sock, buf)
                except ConnectionError as exc:
                    return received, exc
                if n == 0:
                    return received, None
                received += buf[:n]

    def shutdown(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


@dataclass
class Rig:
    """A running pump between a client and a server peer."""

    client: Peer
    server: Peer
    pump: Pump
    pool: PipePool | BufferPool
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_ended(self) -> PumpEnd:
        async with asyncio.timeout(WAIT_S):
            await self.ended.wait()
        assert self.pump.end is not None
        return self.pump.end


async def tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (connecting end, accepted end), both non-blocking."""
    loop = asyncio.get_running_loop()
    outer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    outer.setblocking(False)
    try:
        async with asyncio.timeout(WAIT_S):
            await loop.sock_connect(outer, listener.getsockname())
            inner, _ = await loop.sock_accept(listener)
    except BaseException:
        outer.close()
        raise
    inner.setblocking(False)
    return outer, inner


@pytest.fixture(params=["splice", "copy"])
def pump_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_pool(kind: str) -> PipePool | BufferPool:
    return PipePool(PIPE_BYTES) if kind == "splice" else BufferPool(PIPE_BYTES)


@pytest.fixture
def fd_guard() -> Iterator[None]:
    """Fail a test that leaves an fd open (sockets, pipes). Set up before the rig."""
    before = open_fds()
    yield
    assert open_fds() == before, "an fd leaked"


async def start_rig(
    listener: socket.socket, pool: PipePool | BufferPool, closers: list[socket.socket]
) -> Rig:
    client_sock, down = await tcp_pair(listener)
    up, server_sock = await tcp_pair(listener)
    closers += [client_sock, server_sock]
    ended = asyncio.Event()
    pump = Pump(asyncio.get_running_loop(), down, up, pool, lambda _: ended.set())
    pump.start()
    return Rig(Peer(client_sock), Peer(server_sock), pump, pool, ended)


@pytest.fixture
async def rig_factory(
    fd_guard: None, bound_socket: socket.socket, pump_kind: str
) -> AsyncIterator[Callable[..., object]]:
    """Start rigs on one pool; at teardown abort what still runs, close the outer sockets,
    and close the pool's idle pipes (so ``fd_guard`` sees every fd closed)."""
    pool = make_pool(pump_kind)
    rigs: list[Rig] = []
    outer: list[socket.socket] = []

    async def make() -> Rig:
        rig = await start_rig(bound_socket, pool, outer)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.pump.abort()
    for sock in outer:
        sock.close()
    pool.close()
    bound_socket.close()


async def exchange(rig: Rig, up_data: bytes, down_data: bytes) -> None:
    """Send both payloads at once, half-close both ways, check both arrive whole. Each peer
    reads while it writes: a peer that wrote everything first would deadlock both once the
    bounded buffers between them filled, as any real client would."""

    async def send_then_shutdown(peer: Peer, data: bytes) -> None:
        await peer.send(data)
        peer.shutdown()

    async with asyncio.TaskGroup() as tasks:
        at_client = tasks.create_task(rig.client.read_to_eof())
        at_server = tasks.create_task(rig.server.read_to_eof())
        tasks.create_task(send_then_shutdown(rig.client, up_data))
        tasks.create_task(send_then_shutdown(rig.server, down_data))
    (got_down, down_error), (got_up, up_error) = at_client.result(), at_server.result()
    assert down_error is None and up_error is None
    assert (len(got_up), sha(got_up)) == (len(up_data), sha(up_data))
    assert (len(got_down), sha(got_down)) == (len(down_data), sha(down_data))


# --- bytes --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 64 * 1024, MIB], ids=["0B", "1B", "64KiB", "1MiB"])
async def test_moves_random_bytes_exactly_both_ways(rig_factory, size: int) -> None:
    rig = await rig_factory()
    await exchange(rig, random_bytes(size, seed=1), random_bytes(size, seed=2))
    assert await rig.wait_ended() is PumpEnd.EOF
    assert (rig.pump.bytes_up, rig.pump.bytes_down) == (size, size)


@pytest.mark.slow
async def test_moves_64_mib_both_ways(fd_guard: None, bound_socket: socket.socket) -> None:
    """The big transfer, twice in all rather than four times: the splice pump on uvloop (the
    production pairing), the copy pump on the stdlib loop."""
    is_uvloop = isinstance(asyncio.get_running_loop(), uvloop.Loop)
    pool = make_pool("splice" if is_uvloop else "copy")
    outer: list[socket.socket] = []
    try:
        rig = await start_rig(bound_socket, pool, outer)
        size = 64 * MIB
        await exchange(rig, random_bytes(size, seed=3), random_bytes(size, seed=4))
        assert await rig.wait_ended() is PumpEnd.EOF
        assert (rig.pump.bytes_up, rig.pump.bytes_down) == (size, size)
        assert rig.pump.is_splicing is is_uvloop
    finally:
        for sock in outer:
            sock.close()
        pool.close()


async def test_many_pumps_at_once(rig_factory) -> None:
    rigs = [await rig_factory() for _ in range(50)]
    async with asyncio.TaskGroup() as tasks:
        for n, rig in enumerate(rigs):
            tasks.create_task(exchange(rig, random_bytes(10_000 + n, n), random_bytes(n, -n)))
    for rig in rigs:
        assert await rig.wait_ended() is PumpEnd.EOF


# --- half-close ---------------------------------------------------------------------------


async def test_client_half_close_still_gets_the_whole_answer(rig_factory) -> None:
    rig = await rig_factory()
    request, answer = random_bytes(1000, 5), random_bytes(3 * MIB, 6)
    await rig.client.send(request)
    rig.client.shutdown()
    got_request, error = await rig.server.read_to_eof()  # EOF reached the server
    assert (got_request, error) == (request, None)
    async with asyncio.TaskGroup() as tasks:
        reading = tasks.create_task(rig.client.read_to_eof())
        await rig.server.send(answer)
        rig.server.shutdown()
    got_answer, error = reading.result()
    assert error is None and sha(got_answer) == sha(answer)
    assert await rig.wait_ended() is PumpEnd.EOF


async def test_server_closes_first_client_gets_every_byte_then_eof(rig_factory) -> None:
    rig = await rig_factory()
    answer, late = random_bytes(2 * MIB, 7), random_bytes(5000, 8)
    async with asyncio.TaskGroup() as tasks:
        reading = tasks.create_task(rig.client.read_to_eof())
        await rig.server.send(answer)
        rig.server.shutdown()
    got, error = reading.result()
    assert error is None and sha(got) == sha(answer)
    assert rig.pump.end is None  # the other way is still open: the client may still talk
    await rig.client.send(late)
    rig.client.shutdown()
    got_late, error = await rig.server.read_to_eof()
    assert (got_late, error) == (late, None)
    assert await rig.wait_ended() is PumpEnd.EOF


# --- resets and failures -----------------------------------------------------------------


async def test_client_reset_mid_transfer_resets_the_server(rig_factory) -> None:
    rig = await rig_factory()
    await rig.client.send(random_bytes(MIB, 9))
    await eventually(lambda: rig.pump.moved_up > 0)
    rig.client.reset()
    _, error = await rig.server.read_to_eof()
    assert isinstance(error, ConnectionResetError)
    assert await rig.wait_ended() is PumpEnd.DOWNSTREAM_FAILED


async def test_server_reset_mid_transfer_resets_the_client(rig_factory) -> None:
    rig = await rig_factory()
    answer = random_bytes(MIB, 10)
    await rig.server.send(answer)
    await eventually(lambda: rig.pump.moved_down > 0)
    rig.server.reset()
    got, error = await rig.client.read_to_eof()
    assert isinstance(error, ConnectionResetError)
    assert answer.startswith(got)
    assert await rig.wait_ended() is PumpEnd.UPSTREAM_FAILED


async def test_server_that_dies_mid_answer_leaves_a_truncated_stream(rig_factory) -> None:
    """A server process that exits closes its socket: the client gets a prefix, then EOF
    (whether the answer was complete is the protocol's business), then may close too."""
    rig = await rig_factory()
    answer = random_bytes(MIB, 11)
    await rig.server.send(answer[: MIB // 2])
    rig.server.sock.close()
    got, error = await rig.client.read_to_eof()
    assert error is None and got == answer[: MIB // 2]
    rig.client.shutdown()
    end = await rig.wait_ended()
    # The half-close reaches a socket whose peer is gone: that answers with RST, or the FIN
    # crossed the server's close; both are legitimate ends here.
    assert end in (PumpEnd.EOF, PumpEnd.UPSTREAM_FAILED)


async def test_abort_resets_both_sides(rig_factory) -> None:
    rig = await rig_factory()
    await rig.client.send(b"hello")
    await eventually(lambda: rig.pump.moved_up == 5)
    rig.pump.abort()
    for peer in (rig.client, rig.server):
        _, error = await peer.read_to_eof()
        assert isinstance(error, ConnectionResetError)
    assert rig.pump.end is PumpEnd.ABORTED


async def test_close_sends_eof_both_ways(rig_factory) -> None:
    rig = await rig_factory()
    rig.pump.close()
    for peer in (rig.client, rig.server):
        assert await peer.read_to_eof() == (bytearray(), None)
    assert rig.pump.end is PumpEnd.CLOSED
    rig.pump.close()  # idempotent
    rig.pump.abort()
    assert rig.pump.end is PumpEnd.CLOSED


# --- backpressure and pooling ---------------------------------------------------------------


async def test_reader_that_stops_reading_stops_the_source(rig_factory) -> None:
    """A client that never reads: the pump stops reading the server once its one pipe (or
    buffer) is full, so the server's writes stall at a bound set by kernel socket buffers,
    while the proxy holds at most PIPE_BYTES; then every byte still arrives, in order."""
    rig = await rig_factory()
    # Small buffers on the outer ends, so what the server manages to push is dominated by
    # the pump's own sockets (autotuned: up to tcp_rmem's max, 32 MiB here) and its pipe.
    rig.client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    rig.server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    chunk = random_bytes(MIB, 12)
    total_mib = 32  # measured: the server manages 4-7 MiB before it stalls
    stream = chunk * total_mib

    async def serve() -> None:
        await rig.server.send(stream)
        rig.server.shutdown()

    async with asyncio.TaskGroup() as tasks:
        serving = tasks.create_task(serve())
        await eventually(lambda: not rig.pump.is_reading_upstream)
        pushed = await until_still(lambda: rig.server.sent)
        assert not serving.done()
        assert pushed < total_mib * MIB // 2, "the server was never made to wait"
        assert 0 < rig.pump.pending_down <= PIPE_BYTES
        got, error = await rig.client.read_to_eof()
    assert error is None and len(got) == len(stream) and sha(got) == sha(stream)
    rig.client.shutdown()
    assert await rig.wait_ended() is PumpEnd.EOF


async def test_pipes_are_reused_and_a_full_one_is_closed(rig_factory, pump_kind: str) -> None:
    first = await rig_factory()
    await exchange(first, random_bytes(MIB, 13), random_bytes(MIB, 14))
    await first.wait_ended()
    pool = first.pool
    assert 1 <= pool.created <= 2 and pool.idle_count == pool.created  # handed back, kept
    second = await rig_factory()
    await exchange(second, random_bytes(MIB, 15), random_bytes(MIB, 16))
    assert pool.created <= 2  # four directions, at most two at a time: reused

    stuck = await rig_factory()
    stuck.client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    async with asyncio.TaskGroup() as tasks:
        serving = tasks.create_task(stuck.server.send(random_bytes(64 * MIB, 17)))
        await eventually(lambda: stuck.pump.pending_down > 0 and not serving.done())
        idle_before = pool.idle_count
        stuck.pump.close()  # the idle deadline, say: bytes still in the pipe
        serving.cancel()
    assert stuck.pump.end is PumpEnd.CLOSED
    if pump_kind == "splice":
        assert pool.idle_count == idle_before  # the pipe holding bytes was closed, not pooled
    else:
        assert pool.idle_count == idle_before + 1  # a buffer is overwritten before reuse


async def test_activity_is_marked_per_callback_and_cleared_when_taken(rig_factory) -> None:
    rig = await rig_factory()
    assert rig.pump.take_activity() is False
    await rig.client.send(b"x")
    await eventually(lambda: rig.pump.moved_up == 1)
    assert rig.pump.take_activity() is True
    assert rig.pump.take_activity() is False
