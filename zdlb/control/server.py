"""The control socket: a UNIX stream socket that moves command lines and replies, nothing else.

Parsing is control/protocol.py's, effects control/commands.py's. Every input is hostile until
parsed: a line is bounded (MAX_LINE_BYTES), a client idle too long is dropped, a reply that
is not read in time is abandoned, and at most MAX_CLIENTS talk at once. When that many are
connected, a new client takes the place of the one that has been idle longest (not one whose
command is running): clients that connect and say nothing cannot lock an operator out. The
socket file is created 0600 (0660 with a group); a stale file from a crashed daemon is
replaced, a live daemon's socket is never stolen.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import stat
import struct
from pathlib import Path

from zdlb.control.commands import Controller
from zdlb.control.protocol import (
    MAX_LINE_BYTES,
    frame,
    parse_command,
    render_error,
    render_json_error,
    wants_json,
)
from zdlb.errors import ControlCommandError, ControlUsageError, ListenerError
from zdlb.stats import ControlStats

log = logging.getLogger(__name__)

# A person or a deploy script talks here, not a crowd: more clients at once than this is a
# bug or an attack, and each one costs a task and a buffer.
MAX_CLIENTS = 64
# A connected client that sends no complete line for this long is dropped.
CLIENT_IDLE_S = 60.0
# A reply (at most a few KiB of table) that the client does not read within this is dropped.
REPLY_WRITE_S = 10.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlServer:
    """Serves one control socket. ``start()`` binds it; ``close()`` removes it."""

    def __init__(
        self,
        path: Path,
        group: str | None,
        controller: Controller,
        stats: ControlStats | None = None,
    ) -> None:
        self._path = path
        self._stats = stats if stats is not None else ControlStats()  # commands by result
        self._group = group
        self._controller = controller
        self._server: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        # Connected clients, each with when it last sent a command (loop time): the one idle
        # longest makes room for a new client at MAX_CLIENTS.
        self._clients: dict[asyncio.StreamWriter, float] = {}
        # The client handlers, owned here so close() can wait for them; `_busy` are the clients
        # whose command is being carried out (their answer is still to be written).
        self._handlers: set[asyncio.Task[None]] = set()
        self._busy: set[asyncio.StreamWriter] = set()
        self._is_closing = False

    @property
    def controller(self) -> Controller:
        return self._controller

    def __repr__(self) -> str:
        return f"<ControlServer {self._path} clients={len(self._clients)} busy={len(self._busy)}>"

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind the socket, or serve ``sock``: the listening control socket a predecessor
        handed over in an upgrade (daemon/upgrade.py). Raises ListenerError if it is in use
        or cannot be created."""
        if sock is None:
            sock = _bind_unix(self._path, self._group)
        sock.setblocking(False)
        self._sock = sock
        self._server = await asyncio.start_unix_server(
            self._serve_client, sock=sock, limit=MAX_LINE_BYTES + 2
        )
        log.info("control_started socket=%s", self._path)

    @property
    def listening_socket(self) -> socket.socket | None:
        """What an upgrade hands the new process (it keeps the same file and queue)."""
        return self._sock

    async def close(self, *, unlink: bool = True) -> None:
        """Stop accepting, drop connected clients, remove the socket file (``unlink``; not
        after an upgrade handed the socket on: it is the new process's now)."""
        self._is_closing = True
        if self._server is not None:
            self._server.close()
        # A command in progress (a long `wait`) is answered at once, then its client dropped;
        # idle clients are dropped now. The handlers are asyncio's tasks, which report errors
        # to the loop, so they are let finish rather than cancelled.
        self._controller.stop_waiting()
        for writer in self._clients.keys() - self._busy:
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        if len(self._clients) >= MAX_CLIENTS and not self._make_room():
            writer.close()  # every slot has a command running: this one must wait its turn
            return
        self._clients[writer] = loop.time()
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        uid = _peer_uid(writer)
        try:
            while not self._is_closing:
                try:
                    async with asyncio.timeout(CLIENT_IDLE_S):
                        line = await reader.readuntil(b"\n")
                except (asyncio.IncompleteReadError, TimeoutError):
                    return  # gone, or idle too long; a half-written command changes nothing
                except asyncio.LimitOverrunError:
                    message = f"line longer than {MAX_LINE_BYTES} bytes"
                    await self._send(writer, frame(render_error(message, "usage: help")))
                    return  # the rest of that line cannot be told from the next command
                self._clients[writer] = loop.time()
                self._busy.add(writer)
                try:
                    await self._send(writer, await self._answer(line, uid))
                finally:
                    self._busy.discard(writer)
        except (ConnectionError, TimeoutError):
            return
        finally:
            self._clients.pop(writer, None)
            if handler is not None:
                self._handlers.discard(handler)
            writer.close()

    def _make_room(self) -> bool:
        """Drop the client idle the longest (not one whose command runs); False if all run."""
        idle = [(at, writer) for writer, at in self._clients.items() if writer not in self._busy]
        if not idle:
            return False
        _, oldest = min(idle, key=lambda entry: entry[0])
        del self._clients[oldest]
        oldest.close()  # its handler sees EOF and ends
        return True

    async def _send(self, writer: asyncio.StreamWriter, reply: bytes) -> None:
        if writer.is_closing():  # gone (or dropped) meanwhile: uvloop would raise RuntimeError
            raise ConnectionResetError("control client went away")
        writer.write(reply)
        async with asyncio.timeout(REPLY_WRITE_S):
            await writer.drain()

    async def _answer(self, line: bytes, uid: int) -> bytes:
        as_json = wants_json(line)  # even a bad command is answered in the format asked for
        try:
            command, as_json = parse_command(line)
            reply = await self._controller.execute(command, uid)
        except ControlUsageError as exc:
            self._stats.usage += 1
            log.info("control_usage_error uid=%d error=%s", uid, exc)
            if as_json:
                return frame(render_json_error(str(exc), exc.usage))
            return frame(render_error(str(exc), exc.usage))
        except ControlCommandError as exc:
            self._stats.error += 1
            if as_json:
                return frame(render_json_error(str(exc), ""))
            return frame(render_error(str(exc), ""))
        if reply.is_error:
            self._stats.error += 1
        else:
            self._stats.ok += 1
        return frame(reply.render(as_json))


def _bind_unix(path: Path, group: str | None) -> socket.socket:
    """A listening UNIX socket at ``path``, replacing a stale one, never a live one."""
    _remove_stale(path)
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ListenerError(0, f"control socket group {group!r} does not exist") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: no window where others could connect
    try:
        sock.bind(os.fspath(path))
        if gid != -1:
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
        sock.listen(MAX_CLIENTS)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenerError(exc.errno, f"cannot create control socket {path}: {exc}") from None
    finally:
        os.umask(old_umask)
    return sock


def _remove_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenerError(0, f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left by a daemon that died: nobody listens
        log.info("control_stale_socket_removed socket=%s", path)
        return
    except OSError as exc:
        raise ListenerError(exc.errno, f"cannot check control socket {path}: {exc}") from None
    finally:
        probe.close()
    raise ListenerError(0, f"control socket {path} is in use by another zdlb")


def _peer_uid(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return -1
    try:
        _, uid, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except OSError:
        return -1
    return int(uid)
