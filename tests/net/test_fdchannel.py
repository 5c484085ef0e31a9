"""The master/worker fd channel (daemon/fdchannel.py) on a real SOCK_SEQPACKET socketpair: each
message arrives whole with its sockets, the sockets work on the other side, a full channel
waits instead of failing, and a closed peer or a malformed message is an error, not a hang."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest

from zdlb.daemon.fdchannel import MAX_FDS, FdChannel, names_of, socketpair

RECEIVE_TIMEOUT_S = 5.0


@pytest.fixture
async def channels() -> AsyncIterator[tuple[FdChannel, FdChannel]]:
    ours, theirs = socketpair()
    left, right = FdChannel(ours), FdChannel(theirs)
    yield left, right
    left.close()
    right.close()


async def receive(channel: FdChannel) -> tuple[dict[str, object], list[socket.socket]]:
    async with asyncio.timeout(RECEIVE_TIMEOUT_S):
        return await channel.receive()


async def test_messages_keep_their_bounds_and_their_sockets_work(
    channels: tuple[FdChannel, FdChannel],
) -> None:
    left, right = channels
    a, b = socket.socketpair()
    with a, b:
        await left.send({"t": "conns", "names": ["web"]}, [a])
        await left.send({"t": "done", "count": 1}, [])
        payload, socks = await receive(right)
        assert (payload, len(socks)) == ({"t": "conns", "names": ["web"]}, 1)
        assert names_of(payload, len(socks)) == ["web"]
        with socks[0] as received:
            received.sendall(b"ping")  # the received descriptor is the same socket as a
            assert b.recv(4) == b"ping"
        assert await receive(right) == ({"t": "done", "count": 1}, [])


async def test_a_full_channel_waits_for_the_reader(channels: tuple[FdChannel, FdChannel]) -> None:
    left, right = channels
    a, b = socket.socketpair()
    with a, b:
        count = 2_000  # far more than the socket buffer holds at once
        sending = asyncio.create_task(_send_many(left, a, count))
        for number in range(count):
            payload, socks = await receive(right)
            assert payload["n"] == number and len(socks) == 1
            socks[0].close()
        await sending


async def _send_many(channel: FdChannel, sock: socket.socket, count: int) -> None:
    for number in range(count):
        await channel.send({"t": "conns", "n": number, "names": ["x" * 200]}, [sock])


async def test_a_closed_peer_is_a_connection_error(channels: tuple[FdChannel, FdChannel]) -> None:
    left, right = channels
    left.close()
    with pytest.raises(ConnectionError):
        await receive(right)


async def test_a_malformed_message_is_a_value_error_and_its_sockets_are_closed(
    channels: tuple[FdChannel, FdChannel],
) -> None:
    left, right = channels
    a, b = socket.socketpair()
    with a, b:
        socket.send_fds(left.sock, [json.dumps(["not", "an", "object"]).encode()], [a.fileno()])
        with pytest.raises(ValueError, match="not a message"):
            await receive(right)
        a.close()
        assert b.recv(1) == b""  # every copy of a is closed: the peer sees EOF


async def test_too_many_sockets_and_names_that_do_not_match_are_refused(
    channels: tuple[FdChannel, FdChannel],
) -> None:
    left, _ = channels
    with pytest.raises(ValueError, match="at most"):
        await left.send({"t": "conns"}, [left.sock] * (MAX_FDS + 1))
    with pytest.raises(ValueError, match="2 names for 1 sockets"):
        names_of({"t": "conns", "names": ["a", "b"]}, 1)
