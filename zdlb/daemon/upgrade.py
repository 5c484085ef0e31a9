"""Seamless upgrade: ``zdlb ctl upgrade`` or SIGUSR2 starts a new zdlb from the installed code
and hands it the listening sockets; this process then drains and exits.

The old process (``Upgrader``):

1. starts ``python -I`` with the package root this process runs from (the code on disk now,
   so an upgraded install runs the new code) as ``zdlb run`` with the same config file and
   options, its end of a socketpair passed as ``ZDLB_UPGRADE_FD``;
2. sends one message over the socketpair: a JSON header (each listener's name, bind and
   number of sockets, the control socket's path, the metrics address, the servers' state as
   ipc.py's ``StateUpdate``) with every listening socket, the control socket and the metrics
   socket attached as SCM_RIGHTS descriptors (``socket.send_fds``);
3. waits, within ``READY_TIMEOUT_S``, for the new process to answer ``ready`` (it serves every
   listener and the control socket) or ``error`` (why it cannot), or to exit. On anything
   but ``ready`` the old process kills the new one, keeps serving, and answers why;
4. on ``ready``: stops accepting (the new one accepts on the same queues) and hands over its
   keep-alive client connections, each at a moment it is idle (idle_handover.py), the sockets
   going over the channel as ``{"conns": [listener names]}`` lines with the fds. With workers
   the connections are the old workers': the master asks each (ipc.py ``HandOver``) and
   passes on what they send; the new master deals them out to its workers;
5. answers the command, then stops as on SIGTERM (what is left drains within ``grace_s``),
   except that the control socket file is the new process's and systemd hears MAINPID from
   the new one.

The new process (``receive_takeover`` at start; ``report`` and ``receive_connections`` once it
serves): build_runtime uses the sockets that match its config (daemon/runtime.py
``Inherited``) and binds the rest, so both processes accept on the same queues for a moment
and no client is refused; handed-over connections join their listener's route through
``loop.connect_accepted_socket`` (a listener the new config lacks: closed), or, in a master,
go on to its workers (``Runtime.deliver_connections``). Listeners are matched by name and bind;
``workers`` must not change (the sockets are one per worker).

Under 10 keep-alive clients pausing 0-200 ms, an upgrade failed 0 requests and closed 0
connections, with one process and with 2 workers (tests/daemon/test_upgrade.py,
benchmarks/reload_compare.py). Must not: block the loop (socket I/O runs in a thread) or leave
the new process running after a failed upgrade.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zdlb.config.address import parse_address
from zdlb.config.load import load_config
from zdlb.config.model import Address
from zdlb.control import journal
from zdlb.daemon import ipc, spawn
from zdlb.daemon.idle_handover import Batch, close_all, hand_over_idle
from zdlb.daemon.lifecycle import adopt_connection
from zdlb.daemon.runtime import Inherited, Runtime
from zdlb.errors import ConfigError, ZdlbError

log = logging.getLogger(__name__)

UPGRADE_FD_ENV = "ZDLB_UPGRADE_FD"
# The new process imports zdlb and uvloop and binds (~0.3 s here; workers add their own start):
# a loaded box gets many times that before the upgrade is called failed.
READY_TIMEOUT_S = 20.0
# The header and the answers are a few KiB (the state is ~100 bytes per server).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_FDS = 4096  # listeners x workers + 2; far more than any config has


@dataclass(frozen=True, slots=True)
class Launch:
    """How this process was started, to start its successor the same way."""

    config: Path
    options: list[str]  # e.g. ["--workers", "2", "--loop", "uvloop"]


# --- the old process -------------------------------------------------------------------------


class Upgrader:
    """``zdlb ctl upgrade`` and SIGUSR2 for one running daemon."""

    def __init__(self, runtime: Runtime, launch: Launch, stop: asyncio.Event) -> None:
        self._runtime = runtime
        self._launch = launch
        self._stop = stop
        self._lock = asyncio.Lock()
        self.control_socket: Callable[[], socket.socket | None] = lambda: None

    async def upgrade(self, peer_uid: int) -> tuple[bool, list[str]]:
        if self._lock.locked() or self._runtime.handed_over:
            return False, ["an upgrade is already in progress"]
        async with self._lock:
            ok, lines = await self._upgrade()
        if ok:
            log.info("upgrade_done uid=%d %s", peer_uid, "; ".join(lines))
            self._runtime.handed_over = True
            asyncio.get_running_loop().call_soon(self._stop.set)  # after the answer is queued
        else:
            log.error("upgrade_failed uid=%d error=%s", peer_uid, "; ".join(lines))
        return ok, lines

    async def _upgrade(self) -> tuple[bool, list[str]]:
        runtime = self._runtime
        try:  # the new process would refuse it too, later and less clearly
            await asyncio.to_thread(load_config, self._launch.config)
        except ConfigError as exc:
            return False, [*(str(issue) for issue in exc.issues), "this process keeps serving"]
        header, fds = self._handover()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = {**spawn.child_environment(), UPGRADE_FD_ENV: str(theirs.fileno())}
            if "NOTIFY_SOCKET" in os.environ:  # the new process becomes the service's main
                env["NOTIFY_SOCKET"] = os.environ["NOTIFY_SOCKET"]
            argv = spawn.zdlb_argv("run", "-c", str(self._launch.config), *self._launch.options)
            proc = await asyncio.create_subprocess_exec(*argv, env=env, pass_fds=(theirs.fileno(),))
        except OSError as exc:
            ours.close()
            return False, [f"cannot start the new process: {exc}"]
        finally:
            theirs.close()
        try:
            answer = await self._exchange(ours, proc, header, fds)
            if answer.get("ready") == proc.pid and answer.get("connections"):
                await self._hand_over_idle(ours)
        finally:
            ours.close()
        if answer.get("ready") != proc.pid:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            reason = answer.get("error") or f"exited with code {proc.returncode} before serving"
            return False, [f"new process pid {proc.pid}: {reason}", "this process keeps serving"]
        if not answer.get("control") and runtime.config.control.socket is not None:
            runtime.handed_over = False  # not taken: this process removes its socket file
        return True, [
            f"new process pid {proc.pid} serves",
            f"this process (pid {os.getpid()}) drains its connections and exits",
        ]

    async def _hand_over_idle(self, ours: socket.socket) -> None:
        """Give the new process the keep-alive connections (idle_handover.py): this process's,
        or with workers (``Runtime.collect_idle``) its workers'."""
        runtime = self._runtime

        async def send(batch: Batch) -> None:
            line = json.dumps({"conns": [name for name, _ in batch]}).encode() + b"\n"
            fds = [sock.fileno() for _, sock in batch]
            await asyncio.to_thread(socket.send_fds, ours, [line], fds)

        count = 0
        try:
            if runtime.collect_idle is not None:
                count = await runtime.collect_idle(send)
            else:
                count = await hand_over_idle(runtime, send)
        except OSError as exc:
            log.error("upgrade_connections_failed error=%s", exc)
        log.info("upgrade_connections_handed_over count=%d", count)

    def _handover(self) -> tuple[bytes, list[int]]:
        """The header and the descriptors to send (the state saved to the journal too)."""
        runtime = self._runtime
        fds: list[int] = []
        listeners = []
        served = {route.listener.name: sock for route, sock in runtime.sockets}
        served.update((route.listener.name, sock) for route, sock in runtime.tcp_sockets)
        groups = runtime.listener_groups
        for index, listener in enumerate(runtime.config.listeners):
            socks = groups[index] if groups else [served[listener.name]]
            count = len(socks)
            listeners.append({"name": listener.name, "bind": str(listener.bind), "count": count})
            fds += [sock.fileno() for sock in socks]
        control = self.control_socket()
        metrics = runtime.metrics_socket
        state = json.loads(ipc.encode(ipc.views_of(runtime.servers)))
        header = {
            "listeners": listeners,
            "control": str(runtime.config.control.socket) if control is not None else None,
            "metrics": str(runtime.config.metrics.listen) if metrics is not None else None,
            "state": state,
        }
        fds += [sock.fileno() for sock in (control, metrics) if sock is not None]
        if (state_file := runtime.config.control.state_file) is not None:
            try:
                journal.save(state_file, runtime.servers)  # small; the state also travels
            except OSError as exc:
                log.error("state_journal_write_failed file=%s error=%s", state_file, exc)
        return json.dumps(header).encode(), fds

    async def _exchange(
        self,
        ours: socket.socket,
        proc: asyncio.subprocess.Process,
        header: bytes,
        fds: list[int],
    ) -> dict[str, object]:
        """Send the sockets, then the new process's answer ({} if it exited first)."""
        ours.settimeout(READY_TIMEOUT_S)
        try:
            await asyncio.to_thread(socket.send_fds, ours, [header], fds)
            reply = asyncio.ensure_future(asyncio.to_thread(_read_line, ours))
            exited = asyncio.ensure_future(proc.wait())
            done, _ = await asyncio.wait(
                (reply, exited), timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            if reply in done:
                exited.cancel()
                return _answer(reply.result())
            if not done:
                return {"error": f"not serving within {READY_TIMEOUT_S} s"}
            ours.shutdown(socket.SHUT_RDWR)  # ends the reading thread at once
            return {}
        except OSError as exc:
            return {"error": f"handing over the sockets failed: {exc}"}


def _read_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n") and len(data) < MAX_MESSAGE_BYTES:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _answer(line: bytes) -> dict[str, object]:
    try:
        value = json.loads(line) if line else {}
    except ValueError:
        return {"error": "garbled answer from the new process"}
    return value if isinstance(value, dict) else {"error": "garbled answer from the new process"}


# --- the new process -------------------------------------------------------------------------


def receive_takeover(fd: int) -> tuple[Inherited, socket.socket]:
    """Read what the old process hands over; the channel stays open for the answer.

    Raises ZdlbError if the message is not one (nothing is then taken: the fds are closed).
    """
    channel = socket.socket(fileno=fd)
    channel.settimeout(READY_TIMEOUT_S)
    try:
        data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE_BYTES, MAX_FDS)
    except OSError as exc:
        channel.close()
        raise ZdlbError(f"upgrade: nothing received from the old process: {exc}") from None
    socks = [socket.socket(fileno=fd) for fd in fds]
    try:
        return _inherited(json.loads(data), socks), channel
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        for sock in socks:
            sock.close()
        channel.close()
        raise ZdlbError(f"upgrade: malformed hand-over: {exc!r}") from None


def _inherited(header: dict[str, object], socks: list[socket.socket]) -> Inherited:
    inherited = Inherited()
    position = 0
    for item in header["listeners"]:  # type: ignore[attr-defined]  # checked by the except
        count = int(item["count"])
        group = socks[position : position + count]
        position += count
        inherited.listeners[str(item["name"])] = (_address(str(item["bind"])), group)
    if header["control"] is not None:
        inherited.control, inherited.control_path = socks[position], str(header["control"])
        position += 1
    if header["metrics"] is not None:
        inherited.metrics = (_address(str(header["metrics"])), socks[position])
        position += 1
    if position != len(socks):
        raise ValueError(f"{len(socks)} descriptors for {position} sockets")
    state = ipc.decode(json.dumps(header["state"]).encode())
    if not isinstance(state, ipc.StateUpdate):
        raise TypeError("state is not a StateUpdate")
    inherited.state = state
    return inherited


def _address(text: str) -> Address:
    return parse_address(text, True)


def ready_message(runtime: Runtime, takes_connections: bool) -> dict[str, object]:
    inherited = runtime.inherited
    return {
        "ready": os.getpid(),
        "control": inherited is not None and inherited.is_control_taken,
        "connections": takes_connections,
    }


def report(channel: socket.socket, message: dict[str, object], *, close: bool = True) -> None:
    """Answer the old process (``ready`` or ``error``), then close the channel (unless idle
    connections are to follow: ``receive_connections``)."""
    try:
        channel.sendall(json.dumps(message).encode() + b"\n")
    except OSError as exc:
        log.error("upgrade_report_failed error=%s", exc)
        close = True
    finally:
        if close:
            channel.close()


async def receive_connections(channel: socket.socket, runtime: Runtime) -> None:
    """Serve the idle connections the old process hands over, until it closes the channel
    (or READY_TIMEOUT_S passes). A connection whose listener is gone is closed."""
    adopted = 0
    try:
        while True:
            data, fds, _, _ = await asyncio.to_thread(
                socket.recv_fds, channel, MAX_MESSAGE_BYTES, MAX_FDS
            )
            if not data and not fds:
                break
            socks = [socket.socket(fileno=fd) for fd in fds]
            names = [n for line in data.splitlines() for n in json.loads(line)["conns"]]
            batch = list(zip(names, socks, strict=False))
            for extra in socks[len(names) :]:  # unnamed: a bug, closed
                extra.close()
            if runtime.deliver_connections is not None:  # a master: to its workers
                try:
                    await runtime.deliver_connections(batch)
                finally:
                    close_all(batch)
            else:
                for name, sock in batch:
                    slot = runtime.slots.get(name)
                    if slot is None:
                        sock.close()
                        continue
                    await adopt_connection(slot, sock)
            adopted += len(batch)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("upgrade_connections_failed error=%r", exc)
    finally:
        channel.close()
        log.info("upgrade_connections_adopted count=%d", adopted)
