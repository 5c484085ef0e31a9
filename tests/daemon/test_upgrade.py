"""Seamless upgrade (``zdlb ctl upgrade``, SIGUSR2) on the real daemon.

The new process is a child of the old one, not of the test: its pid comes from the answer,
and the test stops it by that pid. Its output goes to the same pipe as the old one's, so the
``Daemon`` reader sees both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.daemon.conftest import Daemon, ServerSpec, StartDaemon
from tests.daemon.load import KeepAliveLoad
from tests.daemon.test_control import run_zdlb
from tests.daemon.test_reload import config_text
from tests.servers import EchoServer

NEW_PID_RE = re.compile(r"new process pid (\d+) serves")
EXIT_S = 15.0


@pytest.fixture
async def successors() -> AsyncIterator[list[int]]:
    """Pids of upgraded processes the test must stop (they are not its children)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def upgrade(config: Path, successors: list[int]) -> tuple[int, str, str]:
    result = await run_zdlb("ctl", "-c", str(config), "upgrade")
    if (match := NEW_PID_RE.search(result.stdout)) is not None:
        successors.append(int(match[1]))
    return result.returncode, result.stdout, result.stderr


async def old_exits(daemon: Daemon) -> int:
    """The old process's exit code. Not ``proc.wait()``: asyncio waits for the output pipe to
    close too, and the new process keeps writing to it. Polled (bounded): the exit status is
    set by the child watcher, which notifies nobody else."""
    async with asyncio.timeout(EXIT_S):
        while daemon.proc.returncode is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return daemon.proc.returncode


async def info(config: Path) -> dict[str, object]:
    result = await run_zdlb("ctl", "-c", str(config), "json", "show", "info")
    assert result.returncode == 0, result
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "2-workers"])
async def test_an_upgrade_under_keep_alive_load_fails_no_request(
    start_daemon: StartDaemon,
    tmp_path: Path,
    echo_server: EchoServer,
    successors: list[int],
    workers: int,
) -> None:
    config = tmp_path / "zdlb.toml"
    config.write_text(config_text([ServerSpec("s1", echo_server.addr)]), encoding="utf-8")
    daemon = await start_daemon("run", "--workers", str(workers), "-c", str(config))
    addr = await daemon.listener_addr()
    assert (
        await run_zdlb("ctl", "-c", str(config), "set", "server", "app/s1", "weight", "9")
    ).returncode == 0
    async with KeepAliveLoad(addr, clients=10) as load:
        await load.wait_requests(50)
        code, out, err = await upgrade(config, successors)
        assert code == 0, (out, err)
        assert await old_exits(daemon) == 0
        await load.wait_requests(100)
        record = await load.stop()
    new_pid = successors[-1]
    assert (await info(config))["pid"] == new_pid
    servers = await run_zdlb("ctl", "-c", str(config), "json", "show", "servers")
    assert json.loads(servers.stdout)[0]["weight"] == 9  # the runtime state moved over
    assert record.failed == [], daemon.output
    if workers == 1:
        # Every keep-alive connection moved to the new process, at a moment it was idle.
        assert record.closed == 0
        assert "upgrade_connections_adopted count=" in daemon.output
    else:
        # With workers the connections are the old workers': each client is told
        # `Connection: close` once and reconnects to the new process.
        assert record.closed == record.announced <= 10
    print(f"upgrade: {record.requests} requests, 0 failed, {record.announced} announced closes")
    os.kill(new_pid, signal.SIGTERM)
    # The new process logs as zdlb.daemon.cli (run by entry.py), the old one as __main__.
    await daemon.wait_text("INFO zdlb.daemon.cli stopped", timeout_s=EXIT_S)


async def test_sigusr2_upgrades_too(
    start_daemon: StartDaemon, tmp_path: Path, echo_server: EchoServer, successors: list[int]
) -> None:
    config = tmp_path / "zdlb.toml"
    config.write_text(config_text([ServerSpec("s1", echo_server.addr)]), encoding="utf-8")
    daemon = await start_daemon("run", "-c", str(config))
    await daemon.listener_addr()
    daemon.send_signal(signal.SIGUSR2)
    line = await daemon.wait_text("upgrade_done uid=-1", timeout_s=EXIT_S)
    match = NEW_PID_RE.search(line)
    assert match is not None
    successors.append(int(match[1]))
    assert await old_exits(daemon) == 0
    assert (await info(config))["pid"] == int(match[1])


async def test_a_failed_upgrade_keeps_the_old_process_serving_and_says_why(
    start_daemon: StartDaemon,
    tmp_path: Path,
    echo_server: EchoServer,
    successors: list[int],
    busy_port: int,
) -> None:
    config = tmp_path / "zdlb.toml"
    good = config_text([ServerSpec("s1", echo_server.addr)])
    config.write_text(good, encoding="utf-8")
    daemon = await start_daemon("run", "-c", str(config))
    await daemon.listener_addr()

    # An invalid config: refused before anything starts, with its key path.
    config.write_text(good + "\n[backends.app.timeouts]\nconnect_s = -1\n", encoding="utf-8")
    code, out, err = await upgrade(config, successors)
    assert (code, out) == (1, "")
    assert "backends.app.timeouts.connect_s" in err and "this process keeps serving" in err

    # A new process that cannot bind: it says why, exits, the old one serves on.
    extra = f'\n[listeners.api]\nbind = "127.0.0.1:{busy_port}"\nbackend = "app"\n'
    config.write_text(good + extra, encoding="utf-8")
    code, out, err = await upgrade(config, successors)
    assert code == 1, out
    assert "cannot listen on 127.0.0.1:" in err and "this process keeps serving" in err
    assert successors == []
    config.write_text(good, encoding="utf-8")
    assert (await info(config))["pid"] == daemon.pid
    assert "Traceback" not in daemon.output
    daemon.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
