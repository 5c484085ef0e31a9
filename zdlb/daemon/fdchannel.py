"""Sockets between a master and one of its workers: a SOCK_SEQPACKET socketpair beside the line
channel (ipc.py), each message a small JSON object with descriptors attached (SCM_RIGHTS).

Why a second socketpair: the line channel is an asyncio stream, whose reads drop ancillary
data (the kernel closes the descriptors), and sending descriptors through a transport's socket
would race its write buffer. SOCK_SEQPACKET keeps each message whole with its descriptors, so
no framing is needed. What travels here (``kind`` is the message's ``"t"``):

- ``listeners`` (master -> worker): the sockets of listeners a reload added or moved, every
  worker's of each (``names`` in order, ``count`` sockets per name, by worker index), sent
  just before the ``Reload`` that needs them (``seq``).
- ``conns`` (both ways): client connections of an upgrade, ``names`` giving each one's
  listener: an old worker's idle ones to its master, the new master's to a new worker.
- ``done`` (worker -> master): an old worker handed over every connection it will.

Both ends are zdlb's own processes and the socketpair is theirs alone: a malformed message is a
bug, raised as ValueError (its descriptors are closed). Non-blocking; waits go through the
loop's readiness callbacks, so nothing blocks the loop and a stop cancels a wait at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

# The kernel attaches at most 253 descriptors to one message (SCM_MAX_FD).
MAX_FDS = 253
# Payloads are lists of listener names: a few KiB at most.
MAX_PAYLOAD_BYTES = 256 * 1024


def socketpair() -> tuple[socket.socket, socket.socket]:
    """The master's end and the worker's end (inheritable: passed to the worker)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.set_inheritable(True)
    return ours, theirs


class FdChannel:
    """One end of the socketpair; ``send`` and ``receive`` one message at a time."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    def __repr__(self) -> str:
        return f"<FdChannel fd={self.sock.fileno()}>"

    def close(self) -> None:
        self.sock.close()

    async def send(self, payload: dict[str, Any], socks: list[socket.socket]) -> None:
        """Send ``payload`` with ``socks`` attached (the caller keeps and closes its own).
        Raises OSError (the peer is gone) or ValueError (more than MAX_FDS)."""
        if len(socks) > MAX_FDS:
            raise ValueError(f"{len(socks)} descriptors in one message, at most {MAX_FDS}")
        data = json.dumps(payload, separators=(",", ":")).encode()
        fds = [sock.fileno() for sock in socks]
        while True:
            try:
                socket.send_fds(self.sock, [data], fds)
                return
            except BlockingIOError:
                await self._ready(write=True)

    async def receive(self) -> tuple[dict[str, Any], list[socket.socket]]:
        """The next message and its sockets (the caller owns them). Raises ConnectionError when
        the peer closed its end, ValueError on a malformed message."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, MAX_PAYLOAD_BYTES, MAX_FDS)
                break
            except BlockingIOError:
                await self._ready(write=False)
        socks = [socket.socket(fileno=fd) for fd in fds]
        if not data and not socks:
            raise ConnectionError("fd channel closed by the peer")
        try:
            payload = json.loads(data)
            if not isinstance(payload, dict) or not isinstance(payload.get("t"), str):
                raise ValueError(f"not a message: {data[:80]!r}")
        except ValueError:
            for sock in socks:
                sock.close()
            raise
        return payload, socks

    async def _ready(self, *, write: bool) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if write:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)


def names_of(payload: dict[str, Any], count: int) -> list[str]:
    """The ``names`` of a ``listeners`` or ``conns`` payload, checked. Raises ValueError."""
    names = payload.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"names is not a list of strings: {names!r}")
    if len(names) != count:
        raise ValueError(f"{len(names)} names for {count} sockets")
    return names
