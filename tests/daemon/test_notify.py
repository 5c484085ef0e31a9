"""systemd's notify protocol (daemon/notify.py) from the real daemon, to a datagram socket
the test binds as systemd would: READY=1 once serving, RELOADING=1 then READY=1 around a
reload, STOPPING=1 at stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import START_TIMEOUT_S, Daemon, ServerSpec
from tests.daemon.test_control import SOCKET_NAME, control_config, run_zdlb
from tests.servers import EchoServer
from zdlb.daemon import notify


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


async def next_message(sock: socket.socket) -> dict[str, str]:
    async with asyncio.timeout(START_TIMEOUT_S):
        data = await asyncio.get_running_loop().sock_recv(sock, 4096)
    return dict(line.split("=", 1) for line in data.decode().splitlines())


def test_notify_without_the_variable_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False


def test_notify_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"zdlb-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.stopping() is True
        assert sock.recv(4096).decode().splitlines()[0] == "STOPPING=1"


def test_a_missing_socket_is_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify.ready() is False


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "2-workers"])
async def test_the_daemon_reports_ready_reloading_and_stopping(
    notify_socket: socket.socket, tmp_path: Path, echo_server: EchoServer, workers: int
) -> None:
    config = tmp_path / "zdlb.toml"
    config.write_text(control_config([ServerSpec("s1", echo_server.addr)]), encoding="utf-8")
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname()}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "zdlb", "run", "--workers", str(workers), "-c", str(config)),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    daemon = Daemon(proc)
    try:
        ready = await next_message(notify_socket)
        assert ready["READY"] == "1"
        assert (tmp_path / SOCKET_NAME).exists()  # the control socket is up by then
        assert (await run_zdlb("ctl", "-c", str(config), "reload")).returncode == 0
        reloading = await next_message(notify_socket)
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert (await next_message(notify_socket))["READY"] == "1"
        daemon.send_signal(signal.SIGTERM)
        assert (await next_message(notify_socket))["STOPPING"] == "1"
        assert await daemon.wait_exit() == 0
        with pytest.raises(BlockingIOError):
            notify_socket.recv(4096)  # nothing from the workers: their environment lacks it
    finally:
        await daemon.aclose()
