"""Fixtures for tests of the real ``zdlb`` process: start it, read its log lines, stop it.

The daemon runs as ``python -m zdlb.daemon.cli`` with stdout and stderr merged into one pipe
that a task owned by ``Daemon`` reads line by line, so a test waits for a log line (the
listener's port, the start of a shutdown) instead of sleeping. Upstream servers run in the
test's own event loop (``tests/servers.py``, ``HeldServer`` below): the loop keeps running
while the test awaits the daemon, so they answer it.

Every process started here is killed by its pid at teardown if the test did not end it, and
every wait is bounded.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import h11
import pytest

from tests.servers import LOOPBACK, UpstreamServer

REPO_ROOT = Path(__file__).resolve().parents[2]
ZDLB_CMD = (sys.executable, "-m", "zdlb.daemon.cli")
# Interpreter start plus uvloop import is ~0.3 s here; a loaded CI box gets 30 times that.
START_TIMEOUT_S = 10.0
# How long a test waits for one expected log line once the daemon is up.
LINE_TIMEOUT_S = 5.0
# How long a stopped daemon may take to exit when no grace period is involved.
EXIT_TIMEOUT_S = 5.0
# Sync CLI runs (`zdlb check`, failing starts): the whole process, start to exit.
CLI_TIMEOUT_S = 15.0

_LISTENER_RE = re.compile(
    r"listener_started listener=(?P<name>\S+) addr=(?P<host>\S+):(?P<port>\d+)"
)


class Daemon:
    """One running ``zdlb`` process and every line it printed so far (``lines``)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.lines: list[str] = []
        self.is_eof = False
        self._new_output = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read_output())

    def __repr__(self) -> str:
        return f"<Daemon pid={self.pid} returncode={self.proc.returncode} lines={len(self.lines)}>"

    @classmethod
    async def start(cls, *args: str, preexec_fn: Callable[[], None] | None = None) -> Daemon:
        """``zdlb *args``; ``run`` and ``demo`` get ``--workers 1`` unless ``args`` say otherwise
        (the default is one worker per core: tests of one process must not depend on the box).
        """
        if (
            args
            and args[0] in ("run", "demo")
            and not any(arg.startswith("--workers") for arg in args)
        ):
            args = (args[0], "--workers", "1", *args[1:])
        proc = await asyncio.create_subprocess_exec(
            *ZDLB_CMD,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
        return cls(proc)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def _read_output(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        while line := await stream.readline():
            self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))
            self._new_output.set()
        self.is_eof = True
        self._new_output.set()

    async def wait_line(
        self, predicate: Callable[[str], bool], *, timeout_s: float = LINE_TIMEOUT_S
    ) -> str:
        """The first line (printed so far or later) for which ``predicate`` holds.

        Fails the test if the output ends or ``timeout_s`` passes first.
        """
        checked = 0
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    for line in self.lines[checked:]:
                        if predicate(line):
                            return line
                    checked = len(self.lines)
                    if self.is_eof:
                        break
                    self._new_output.clear()
                    await self._new_output.wait()
        except TimeoutError:
            pytest.fail(f"no such line within {timeout_s} s; output:\n{self.output}")
        pytest.fail(f"output ended (rc={self.proc.returncode}) before such line:\n{self.output}")

    async def wait_text(self, text: str, *, timeout_s: float = LINE_TIMEOUT_S) -> str:
        return await self.wait_line(lambda line: text in line, timeout_s=timeout_s)

    async def listener_addr(
        self, name: str = "web", *, timeout_s: float = START_TIMEOUT_S
    ) -> tuple[str, int]:
        """The address listener ``name`` got, from its ``listener_started`` line."""
        line = await self.wait_line(
            lambda text: (m := _LISTENER_RE.search(text)) is not None and m["name"] == name,
            timeout_s=timeout_s,
        )
        match = _LISTENER_RE.search(line)
        assert match is not None
        return match["host"], int(match["port"])

    def send_signal(self, signum: signal.Signals) -> None:
        assert self.proc.returncode is None, f"{self!r} already exited:\n{self.output}"
        self.proc.send_signal(signum)

    async def wait_exit(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """The exit code, once the process ended and its output was read whole."""
        try:
            async with asyncio.timeout(timeout_s):
                returncode = await self.proc.wait()
                await self._reader
        except TimeoutError:
            pytest.fail(f"{self!r} still running after {timeout_s} s; output:\n{self.output}")
        return returncode

    async def aclose(self) -> None:
        """Kill the process if it still runs, reap it and finish reading its output."""
        if self.proc.returncode is None:
            self.proc.kill()
        async with asyncio.timeout(EXIT_TIMEOUT_S):
            await self.proc.wait()
            await self._reader


class StartDaemon(Protocol):
    """The ``start_daemon`` fixture: start ``zdlb *args`` as a ``Daemon``."""

    async def __call__(
        self, *args: str, preexec_fn: Callable[[], None] | None = None
    ) -> Daemon: ...


@pytest.fixture
async def start_daemon() -> AsyncIterator[StartDaemon]:
    """``await start_daemon(*cli_args, preexec_fn=None)``; every daemon is reaped at teardown."""
    daemons: list[Daemon] = []

    async def start(*args: str, preexec_fn: Callable[[], None] | None = None) -> Daemon:
        daemon = await Daemon.start(*args, preexec_fn=preexec_fn)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        await daemon.aclose()


# --- configs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """One ``[[backends.app.servers]]`` entry of a generated config."""

    name: str
    addr: tuple[str, int]
    pool: str = "main"
    max_idle: int | None = None  # None: zdlb's default
    pair: str | None = None  # a backup's main


def render_config(
    servers: Sequence[ServerSpec],
    *,
    bind: str = f"{LOOPBACK}:0",
    grace_s: float = 5.0,
    retries: int = 2,
    all_backups: bool = False,
    access_log: bool = True,
    listener_extra: str = "",
    backend_extra: str = "",
) -> str:
    """A one-listener (``web``), one-backend (``app``) config as TOML text.

    ``listener_extra`` and ``backend_extra`` are TOML lines added to those tables as written.
    """
    lines = [
        "[defaults.timeouts]",
        f"grace_s = {grace_s}",
        "",
        "[logging]",
        f"access_log = {str(access_log).lower()}",
        "",
        "[listeners.web]",
        f'bind = "{bind}"',
        'backend = "app"',
        listener_extra,
        "",
        "[backends.app]",
        f"retries = {retries}",
        f"all_backups = {str(all_backups).lower()}",
        backend_extra,
    ]
    for server in servers:
        lines += [
            "",
            "[[backends.app.servers]]",
            f'name = "{server.name}"',
            f'address = "{server.addr[0]}:{server.addr[1]}"',
            f'pool = "{server.pool}"',
        ]
        if server.max_idle is not None:
            lines.append(f"max_idle = {server.max_idle}")
        if server.pair is not None:
            lines.append(f'pair = "{server.pair}"')
    return "\n".join(lines) + "\n"


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write TOML text to a fresh file under ``tmp_path`` and return its path."""
    count = 0

    def write(text: str) -> Path:
        nonlocal count
        count += 1
        path = tmp_path / f"zdlb-{count}.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


# --- sockets and upstreams -------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A 127.0.0.1 port with a listening socket on it (nobody accepts) for the whole test."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(1)
        yield sock.getsockname()[1]
    finally:
        sock.close()


HELD_TARGET = "/hold"


class HeldServer(UpstreamServer):
    """Keep-alive HTTP/1.1 server answering ``200 held\\n``, or ``200 done\\n`` for ``/hold``.

    A ``/hold`` request is read whole, then answered only once ``release`` is set: a slow
    request that is in flight for exactly as long as the test wants.
    """

    def __init__(self, sock: socket.socket, *, name: str = "held") -> None:
        super().__init__(sock, name=name)
        self.release = asyncio.Event()

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_seq: int
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request = await self.read_request(conn, reader, writer, conn_seq)
            if request is None:
                return
            body = b"held\n"
            if request.target == HELD_TARGET.encode():
                await self.release.wait()
                body = b"done\n"
            headers = [("content-length", str(len(body))), ("x-echo-server", self.name)]
            response = h11.Response(status_code=200, headers=headers, reason=b"OK")
            await self.send(
                writer,
                conn.send(response)
                + conn.send(h11.Data(data=body))
                + conn.send(h11.EndOfMessage()),
            )
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()


@pytest.fixture
async def held_server(bound_socket: socket.socket) -> AsyncIterator[HeldServer]:
    async with HeldServer(bound_socket) as server:
        yield server
