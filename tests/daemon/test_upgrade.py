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
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.daemon.conftest import Daemon, ServerSpec, StartDaemon
from tests.daemon.load import KeepAliveLoad
from tests.daemon.test_control import run_zdlb
from tests.daemon.test_reload import config_text, reload, specs
from tests.servers import EchoServer, H11Client

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
    # Every keep-alive connection moved to the new process, at a moment it was idle (with
    # workers: old worker -> old master -> new master -> new worker).
    assert record.closed == 0
    assert "upgrade_connections_adopted count=" in daemon.output
    if workers > 1:
        assert "worker_connections_adopted count=" in daemon.output
    print(f"upgrade: {record.requests} requests, 0 failed, 0 closed")
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


@pytest.fixture
async def echoes(
    bound_socket_factory: Callable[[], socket.socket],
) -> AsyncIterator[dict[str, EchoServer]]:
    async with (
        EchoServer(bound_socket_factory(), name="s1") as s1,
        EchoServer(bound_socket_factory(), name="s2") as s2,
        EchoServer(bound_socket_factory(), name="s3") as s3,
    ):
        yield {"s1": s1, "s2": s2, "s3": s3}


def proxied(server: EchoServer) -> int:
    """Requests ``server`` got through an HTTP listener (a tunnel adds no X-Forwarded-For)."""
    return sum(1 for r in server.requests if any(n == "X-Forwarded-For" for n, _ in r.headers))


RAW = '\n[listeners.raw]\nbind = "127.0.0.1:0"\nmode = "tcp"\nbackend = "app"\n'
ADDED = (
    '\n[listeners.api]\nbind = "127.0.0.1:0"\nbackend = "app"\n'
    '\n[listeners.raw2]\nbind = "127.0.0.1:0"\nmode = "tcp"\nbackend = "app"\n'
)


async def test_workers_five_reloads_and_an_upgrade_fail_nothing_and_close_nothing(
    start_daemon: StartDaemon,
    tmp_path: Path,
    echoes: dict[str, EchoServer],
    successors: list[int],
) -> None:
    """Issue 11's proof with ``workers = 2``: reloads adding a server, removing one, changing a
    check, adding two listeners (HTTP and TCP), removing them, an invalid one, then an upgrade,
    under keep-alive clients pausing 0-200 ms on the kept HTTP listener (and, until the
    upgrade, through the kept TCP listener): no request fails and zdlb closes no connection."""
    config = tmp_path / "zdlb.toml"

    def write(*names: str, check_s1: float | None = None, extra: str = "") -> None:
        text = config_text(specs(echoes, *names), check_s1=check_s1) + RAW + extra
        config.write_text(text, encoding="utf-8")

    async def reloaded(*expected: str) -> None:
        code, out, err = await reload(config)
        assert (code, out.splitlines()) == (0, list(expected)), (err, daemon.output[-3000:])

    write("s1", "s2")
    daemon = await start_daemon("run", "--workers", "2", "-c", str(config))
    web, raw = await daemon.listener_addr("web"), await daemon.listener_addr("raw")
    ctl = ("ctl", "-c", str(config))
    assert (await run_zdlb(*ctl, "set", "server", "app/s1", "weight", "9")).returncode == 0
    async with KeepAliveLoad(web, clients=10) as load, KeepAliveLoad(raw, 4, seed=5) as tunnels:
        await load.wait_requests(50)
        write("s1", "s2", "s3")
        await reloaded("server app/s3 added")
        before = load.record.by_server["s3"]
        await load.wait_requests(60)
        assert load.record.by_server["s3"] > before

        write("s1", "s3")
        await reloaded("server app/s2 removed")
        await load.wait_requests(20)  # what was in flight on s2 has finished
        served_by_s2 = proxied(echoes["s2"])

        write("s1", "s3", check_s1=0.5)
        await reloaded("server app/s1 changed: check")

        # Two listeners added: bound by the master, served by the workers.
        write("s1", "s3", check_s1=0.5, extra=ADDED)
        await reloaded("listener api added", "listener raw2 added")
        api, raw2 = await daemon.listener_addr("api"), await daemon.listener_addr("raw2")
        api_client = await H11Client.connect(api)
        tunnel = await H11Client.connect(raw2)
        assert (await api_client.request()).status == 200
        assert (await tunnel.request()).status == 200
        await load.wait_requests(20)

        # ... and removed: they stop accepting; the open connections drain.
        write("s1", "s3", check_s1=0.5)
        await reloaded("listener api removed", "listener raw2 removed")
        for addr in (api, raw2):
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*addr)
        last = await api_client.request()
        assert (last.status, last.header("connection")) == (200, "close")
        assert (await tunnel.request()).status == 200  # a tunnel runs until it ends
        await tunnel.aclose()
        await api_client.aclose()

        good = config.read_text(encoding="utf-8")
        config.write_text(good + "\n[backends.app.timeouts]\nconnect_s = -1\n", encoding="utf-8")
        code, out, err = await reload(config)
        assert code == 1 and out == "" and "backends.app.timeouts.connect_s" in err
        config.write_text(good, encoding="utf-8")
        await load.wait_requests(40)
        tunnel_record = await tunnels.stop()  # a tunnel has no request boundary to move at

        code, out, err = await upgrade(config, successors)
        assert code == 0, (out, err)
        assert await old_exits(daemon) == 0
        await load.wait_requests(100)
        record = await load.stop()

    assert record.failed == [] and tunnel_record.failed == []
    assert (record.closed, tunnel_record.closed) == (0, 0)
    assert proxied(echoes["s2"]) == served_by_s2  # tunnels to it ran on
    shown = await info(config)
    assert (shown["pid"], shown["listeners"]) == (successors[-1], 2)
    rows = json.loads((await run_zdlb(*ctl, "json", "show", "servers")).stdout)
    assert [(row["server"], row["weight"]) for row in rows] == [("app/s1", 9), ("app/s3", 100)]
    journal = json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))
    assert journal["servers"] == {"app/s1": {"config_weight": 100, "weight": 9}}
    handed = re.search(r"upgrade_connections_handed_over count=(\d+)", daemon.output)
    assert handed is not None and int(handed[1]) > 0, daemon.output
    assert "worker_connections_adopted" in daemon.output
    assert "Traceback" not in daemon.output
    errors = [line for line in daemon.lines if " ERROR " in line or " WARNING " in line]
    assert [line for line in errors if "reload_refused" not in line] == [], errors
    print(
        f"workers=2: {record.requests} requests, 0 failed, 0 closed; "
        f"{handed[1]} idle connections moved to the new workers"
    )
    os.kill(successors[-1], signal.SIGTERM)
    await daemon.wait_text("INFO zdlb.daemon.cli stopped", timeout_s=EXIT_S)
