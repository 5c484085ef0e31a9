"""Reload (SIGHUP and ``zdlb ctl reload``) on the real daemon, under keep-alive load.

The proof of issue 11: reloads that add a server, remove one, change a check, and one invalid
reload, while keep-alive clients pausing 0-200 ms send requests: no request fails, zdlb closes
no client connection, the added server takes traffic, the removed one gets none after its
drain, and the refused reload changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.daemon.conftest import (
    HELD_TARGET,
    Daemon,
    HeldServer,
    ServerSpec,
    StartDaemon,
    render_config,
)
from tests.daemon.load import KeepAliveLoad
from tests.daemon.test_control import SOCKET_NAME, run_zdlb
from tests.servers import EchoServer, H11Client

CHECK = """
[backends.app.servers.check]
kind = "tcp"
interval_s = {interval}
"""


def config_text(servers: list[ServerSpec], *, check_s1: float | None = None) -> str:
    text = render_config(servers, access_log=False)
    text += f'\n[control]\nsocket = "{SOCKET_NAME}"\nstate_file = "state.json"\n'
    if check_s1 is not None:
        # The first server's table is the first [[backends.app.servers]]: put its check there.
        head, sep, rest = text.partition('name = "s1"\n')
        line_end = rest.index("\n", rest.index("pool")) + 1
        text = head + sep + rest[:line_end] + CHECK.format(interval=check_s1) + rest[line_end:]
    return text


@pytest.fixture
async def echoes(
    bound_socket_factory: Callable[[], socket.socket],
) -> AsyncIterator[dict[str, EchoServer]]:
    servers = {name: EchoServer(bound_socket_factory(), name=name) for name in ("s1", "s2", "s3")}
    for server in servers.values():
        await server.start()
    try:
        yield servers
    finally:
        for server in servers.values():
            await server.aclose()


def specs(echoes: dict[str, EchoServer], *names: str) -> list[ServerSpec]:
    return [ServerSpec(name, echoes[name].addr) for name in names]


async def reload(config: Path) -> tuple[int, str, str]:
    result = await run_zdlb("ctl", "-c", str(config), "reload")
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "2-workers"])
async def test_five_reloads_under_keep_alive_load_fail_nothing_and_close_nothing(
    start_daemon: StartDaemon, tmp_path: Path, echoes: dict[str, EchoServer], workers: int
) -> None:
    config = tmp_path / "zdlb.toml"
    config.write_text(config_text(specs(echoes, "s1", "s2")), encoding="utf-8")
    daemon = await start_daemon("run", "--workers", str(workers), "-c", str(config))
    addr = await daemon.listener_addr()
    async with KeepAliveLoad(addr, clients=10) as load:
        await load.wait_requests(50)

        # 1. add s3: it takes traffic
        config.write_text(config_text(specs(echoes, "s1", "s2", "s3")), encoding="utf-8")
        code, out, err = await reload(config)
        assert (code, out.strip()) == (0, "server app/s3 added"), err
        before = load.record.by_server["s3"]
        await load.wait_requests(60)
        assert load.record.by_server["s3"] > before

        # 2. remove s2: after its in-flight requests, it gets none
        config.write_text(config_text(specs(echoes, "s1", "s3")), encoding="utf-8")
        code, out, err = await reload(config)
        assert (code, out.strip()) == (0, "server app/s2 removed"), err
        await load.wait_requests(10)  # anything in flight at the reload has finished
        served_by_s2 = len(echoes["s2"].requests)
        await load.wait_requests(60)
        assert len(echoes["s2"].requests) == served_by_s2

        # 3. change a check (s1 gets one)
        config.write_text(config_text(specs(echoes, "s1", "s3"), check_s1=0.5), encoding="utf-8")
        code, out, err = await reload(config)
        assert (code, out.strip()) == (0, "server app/s1 changed: check"), err

        # 4. an invalid config: refused with its key path, nothing changes
        good = config.read_text(encoding="utf-8")
        config.write_text(good + "\n[backends.app.timeouts]\nconnect_s = -1\n", encoding="utf-8")
        code, out, err = await reload(config)
        assert code == 1 and out == "", err
        assert "reload refused, nothing changed" in err
        assert "backends.app.timeouts.connect_s" in err
        config.write_text(good, encoding="utf-8")

        # 5. SIGHUP: the same reload by signal (a weight)
        config.write_text(
            good.replace('name = "s3"\n', 'name = "s3"\nweight = 50\n'), encoding="utf-8"
        )
        daemon.send_signal(signal.SIGHUP)
        await daemon.wait_text("reload_done uid=-1 changes=server app/s3 changed: weight")
        await load.wait_requests(40)
        record = await load.stop()

    assert record.failed == []
    assert record.closed == 0
    assert record.requests > 200
    servers = (await run_zdlb("ctl", "-c", str(config), "show", "servers")).stdout
    assert "app/s2" not in servers and "app/s3" in servers
    assert "Traceback" not in daemon.output


async def test_runtime_state_survives_a_reload_and_the_journal_agrees(
    start_daemon: StartDaemon, tmp_path: Path, echoes: dict[str, EchoServer]
) -> None:
    config = tmp_path / "zdlb.toml"
    config.write_text(config_text(specs(echoes, "s1", "s2", "s3")), encoding="utf-8")
    daemon = await start_daemon("run", "-c", str(config))
    await daemon.listener_addr()
    ctl = ("ctl", "-c", str(config))
    assert (await run_zdlb(*ctl, "set", "server", "app/s1", "state", "maint")).returncode == 0
    assert (await run_zdlb(*ctl, "set", "server", "app/s2", "weight", "7")).returncode == 0
    assert (await run_zdlb(*ctl, "set", "server", "app/s3", "state", "drain")).returncode == 0
    # s1 gets a check, s3 goes away: s1 stays in maint, s2 keeps its runtime weight.
    config.write_text(config_text(specs(echoes, "s1", "s2"), check_s1=1.0), encoding="utf-8")
    code, out, err = await reload(config)
    assert code == 0, err
    assert out.splitlines() == ["server app/s3 removed", "server app/s1 changed: check"]
    shown = (await run_zdlb(*ctl, "json", "show", "servers")).stdout
    rows = {row["server"]: row for row in json.loads(shown)}
    assert sorted(rows) == ["app/s1", "app/s2"]
    assert (rows["app/s1"]["admin"], rows["app/s2"]["weight"]) == ("maint", 7)
    journal = json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))
    assert journal["servers"] == {
        "app/s1": {"admin": "maint"},
        "app/s2": {"config_weight": 100, "weight": 7},
    }
    await assert_clean(daemon)


async def test_a_reload_that_changes_the_control_socket_is_refused(
    start_daemon: StartDaemon, tmp_path: Path, echoes: dict[str, EchoServer]
) -> None:
    config = tmp_path / "zdlb.toml"
    config.write_text(config_text(specs(echoes, "s1")), encoding="utf-8")
    daemon = await start_daemon("run", "-c", str(config))
    await daemon.listener_addr()
    text = config.read_text(encoding="utf-8")
    config.write_text(text + '\n[metrics]\nlisten = "127.0.0.1:0"\n', encoding="utf-8")
    code, _, err = await reload(config)
    assert code == 1
    assert "metrics.listen: " in err and "restart" in err
    await assert_clean(daemon)


async def assert_clean(daemon: Daemon) -> None:
    assert "Traceback" not in daemon.output
    daemon.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


API_LISTENER = """
[listeners.api]
bind = "127.0.0.1:0"
backend = "app"
"""


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "2-workers"])
async def test_listeners_added_moved_and_removed_without_closing_a_connection(
    start_daemon: StartDaemon, tmp_path: Path, echoes: dict[str, EchoServer], workers: int
) -> None:
    config = tmp_path / "zdlb.toml"
    base = config_text(specs(echoes, "s1"))
    config.write_text(base, encoding="utf-8")
    daemon = await start_daemon("run", "--workers", str(workers), "-c", str(config))
    web = await daemon.listener_addr("web")
    async with await H11Client.connect(web) as kept:
        assert (await kept.request()).status == 200

        # Added: it binds and serves.
        config.write_text(base + API_LISTENER, encoding="utf-8")
        code, out, err = await reload(config)
        assert (code, out.strip()) == (0, "listener api added"), err
        api = await daemon.listener_addr("api")
        async with await H11Client.connect(api) as api_client:
            assert (await api_client.request()).status == 200

            # Moved: `web` gets a new port; the connection open on the old one still serves
            # (now by the new route), the old port takes no new connection.
            moved = base.replace('bind = "127.0.0.1:0"', 'bind = "127.0.0.2:0"', 1)
            config.write_text(moved + API_LISTENER, encoding="utf-8")
            code, out, err = await reload(config)
            assert (code, out.strip()) == (0, "listener web changed: bind"), err
            new_web = await daemon.wait_line(lambda line: "addr=127.0.0.2:" in line)
            assert "listener=web" in new_web
            response = await kept.request()
            assert (response.status, response.header("connection")) == (200, None)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*web)

            # Removed: its idle connection is answered once more, with `Connection: close`.
            config.write_text(moved, encoding="utf-8")
            code, out, err = await reload(config)
            assert (code, out.strip()) == (0, "listener api removed"), err
            last = await api_client.request()
            assert (last.status, last.header("connection")) == (200, "close")
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*api)
        assert kept.is_reusable
    await assert_clean(daemon)


async def test_with_workers_a_listener_added_serves_on_every_worker_and_show_info_agrees(
    start_daemon: StartDaemon, tmp_path: Path, echoes: dict[str, EchoServer]
) -> None:
    """The master binds the new listener (one socket per worker) and each worker accepts on
    its own: fresh connections are answered by both workers, and a worker restarted after the
    reload serves the new listener too."""
    config = tmp_path / "zdlb.toml"
    base = config_text(specs(echoes, "s1")).replace("access_log = false", "access_log = true")
    config.write_text(base, encoding="utf-8")
    daemon = await start_daemon("run", "--workers", "2", "-c", str(config))
    await daemon.listener_addr("web")
    config.write_text(base + API_LISTENER + TCP_LISTENER, encoding="utf-8")
    code, out, err = await reload(config)
    assert (code, out.splitlines()) == (0, ["listener api added", "listener raw added"]), err
    api, raw = await daemon.listener_addr("api"), await daemon.listener_addr("raw")
    shown = await run_zdlb("ctl", "-c", str(config), "json", "show", "info")
    assert json.loads(shown.stdout)["listeners"] == 3
    since = len(daemon.lines)
    for _ in range(FRESH):  # SO_REUSEPORT spreads them: both workers get some
        async with await H11Client.connect(api) as client:
            assert (await client.request()).status == 200
    access = [line for line in daemon.lines[since:] if "zdlb.access" in line]
    assert len(access) == FRESH
    served_by = {line.rsplit("worker=", 1)[1] for line in access}
    assert served_by == {"0", "1"}, daemon.output[-2000:]
    # A worker started after the reload gets the new listeners' sockets too.
    worker_pid = int(
        (await daemon.wait_text("worker_started worker=0")).rsplit("pid=", 1)[1].split()[0]
    )
    os.kill(worker_pid, signal.SIGKILL)
    await daemon.wait_line(
        lambda line: "worker_started worker=0" in line and f"pid={worker_pid}" not in line
    )
    for addr in (api, raw):
        for _ in range(FRESH):
            async with await H11Client.connect(addr) as client:
                assert (await client.request()).status == 200
    await assert_clean(daemon)


# Fresh connections per listener: the chance that all land on one worker is 2**-FRESH.
FRESH = 16


TCP_LISTENER = """
[listeners.raw]
bind = "127.0.0.1:0"
mode = "tcp"
backend = "app"
"""


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "2-workers"])
async def test_a_tcp_listener_keeps_accepting_and_its_tunnels_run_across_reloads(
    start_daemon: StartDaemon, tmp_path: Path, echoes: dict[str, EchoServer], workers: int
) -> None:
    config = tmp_path / "zdlb.toml"
    config.write_text(config_text(specs(echoes, "s1")) + TCP_LISTENER, encoding="utf-8")
    daemon = await start_daemon("run", "--workers", str(workers), "-c", str(config))
    raw = await daemon.listener_addr("raw")
    async with await H11Client.connect(raw) as tunnel:  # a tunnel open across both reloads
        assert (await tunnel.request()).header("x-echo-server") == "s1"
        for names in (("s2",), ("s3",)):  # twice: the second reload takes over a duplicate
            config.write_text(config_text(specs(echoes, *names)) + TCP_LISTENER, "utf-8")
            code, _, err = await reload(config)
            assert code == 0, err
            async with await H11Client.connect(raw) as fresh:
                assert (await fresh.request()).header("x-echo-server") == names[0]
            assert (await tunnel.request()).header("x-echo-server") == "s1"  # where it was
    await assert_clean(daemon)


async def test_wait_idle_counts_a_request_still_in_flight_on_the_replaced_server(
    start_daemon: StartDaemon, tmp_path: Path, held_server: HeldServer
) -> None:
    config = tmp_path / "zdlb.toml"
    config.write_text(config_text([ServerSpec("s1", held_server.addr)]), encoding="utf-8")
    daemon = await start_daemon("run", "-c", str(config))
    addr = await daemon.listener_addr()
    async with await H11Client.connect(addr) as client:
        slow = asyncio.create_task(client.request("GET", HELD_TARGET))
        async with asyncio.timeout(5):
            await held_server.wait_requests(1)
        # s1 gets a check: a new Server object; the held request runs on the old one.
        spec = [ServerSpec("s1", held_server.addr)]
        config.write_text(config_text(spec, check_s1=60.0), encoding="utf-8")
        assert (await reload(config))[0] == 0
        waited = await run_zdlb("ctl", "-c", str(config), "wait", "app/s1", "idle", "0.3")
        assert waited.returncode == 1 and "inflight=1" in waited.stderr, waited
        held_server.release.set()
        assert (await slow).status == 200
        waited = await run_zdlb("ctl", "-c", str(config), "wait", "app/s1", "idle", "5")
        assert waited.returncode == 0, waited
    await assert_clean(daemon)


async def test_sighup_to_a_worker_is_ignored(
    start_daemon: StartDaemon, tmp_path: Path, echoes: dict[str, EchoServer]
) -> None:
    config = tmp_path / "zdlb.toml"
    config.write_text(config_text(specs(echoes, "s1")), encoding="utf-8")
    daemon = await start_daemon("run", "--workers", "2", "-c", str(config))
    line = await daemon.wait_text("worker_started worker=0")
    worker_pid = int(line.rsplit("pid=", 1)[1].split()[0])
    os.kill(worker_pid, signal.SIGHUP)
    await daemon.wait_text("signal_ignored signal=SIGHUP")
    assert "worker_exited" not in daemon.output
    await assert_clean(daemon)


async def test_the_connection_budget_holds_across_a_reload_that_changes_it(
    start_daemon: StartDaemon, tmp_path: Path, echoes: dict[str, EchoServer]
) -> None:
    """A reload keeps the process's one connection budget (its listeners' gates and counts)
    and applies the new `maxconn`: at 3 open connections the fourth client waits in the
    backlog, and is served once one of the three leaves."""
    config = tmp_path / "zdlb.toml"
    base = config_text(specs(echoes, "s1"))
    config.write_text("maxconn = 2\n" + base, encoding="utf-8")
    daemon = await start_daemon("run", "-c", str(config))
    addr = await daemon.listener_addr()
    config.write_text("maxconn = 3\n" + base, encoding="utf-8")
    code, out, err = await reload(config)
    assert (code, out.strip()) == (0, "setting maxconn changed"), err
    held = [await H11Client.connect(addr) for _ in range(3)]
    for client in held:
        assert (await client.request("GET", "/")).status == 200
    await daemon.wait_text("maxconn_reached open=3 limit=3")
    late = await H11Client.connect(addr)  # the kernel completes its handshake...
    waiting = asyncio.create_task(late.request("GET", "/late"))
    info = await run_zdlb("ctl", "-c", str(config), "json", "show", "info")
    assert json.loads(info.stdout)["client_connections"] == 3  # ...zdlb has not taken it
    assert not waiting.done()
    await held.pop().aclose()
    assert (await waiting).status == 200
    for client in (*held, late):
        await client.aclose()
    await assert_clean(daemon)
