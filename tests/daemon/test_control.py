"""The control socket of the real ``zdlb run`` process, driven by the real ``zdlb ctl``.

Each test starts the daemon on a generated config whose ``[control] socket`` lives in
``tmp_path``, with two upstreams (``s1``, ``s2``) running in the test's own event loop. ``zdlb
ctl`` runs as an asyncio subprocess, so the loop (and the upstreams on it) keeps serving while
the command waits for its answer. Every wait is bounded; nothing sleeps to "let it start".
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.conftest import (
    CLI_TIMEOUT_S,
    HELD_TARGET,
    LINE_TIMEOUT_S,
    ZDLB_CMD,
    Daemon,
    HeldServer,
    ServerSpec,
    StartDaemon,
    render_config,
)
from tests.servers import EchoServer, H11Client, UpstreamServer
from zdlb.config.model import DEFAULT_WEIGHT

WriteConfig = Callable[[str], Path]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
SOCKET_NAME = "ctl.sock"  # relative: load.py resolves it against the config file's directory
# Requests sent through the listener to learn where traffic goes: with round robin over two
# servers of equal weight, six requests reach each usable server three times.
REQUESTS = 6
# The fields an operator can change and the health a check sets; inflight/conns move by themselves.
STATE_KEYS = ("server", "pool", "admin", "health", "weight", "changed")


@dataclass(frozen=True, slots=True)
class CtlResult:
    """What one ``zdlb ctl`` run printed and how it exited."""

    returncode: int
    stdout: str
    stderr: str

    def __repr__(self) -> str:
        return f"<CtlResult rc={self.returncode} stdout={self.stdout!r} stderr={self.stderr!r}>"


async def run_zdlb(*args: str) -> CtlResult:
    """Run ``zdlb *args`` as a subprocess within ``CLI_TIMEOUT_S``; killed if it overruns."""
    proc = await asyncio.create_subprocess_exec(
        *ZDLB_CMD,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CLI_TIMEOUT_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"zdlb {' '.join(args)} still running after {CLI_TIMEOUT_S} s")
    assert proc.returncode is not None
    result = CtlResult(proc.returncode, out.decode(), err.decode())
    for stream in (result.stdout, result.stderr):
        assert "Traceback" not in stream, result
    return result


def control_config(servers: Sequence[ServerSpec], socket_path: str = SOCKET_NAME) -> str:
    return render_config(servers) + f'\n[control]\nsocket = "{socket_path}"\n'


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of a ``render_table`` reply; the last column may hold spaces."""
    header, *rows = text.splitlines()
    names = header.split()
    table = []
    for row in rows:
        cells = row.split(maxsplit=len(names) - 1)
        assert len(cells) == len(names), (header, row)
        table.append(dict(zip(names, cells, strict=True)))
    return table


def assert_usage_error(result: CtlResult, first_line: str, *, has_usage: bool = True) -> None:
    """Exit 1, nothing on stdout, one ``error:`` line then only ``usage:`` lines on stderr."""
    assert result.returncode == EXIT_FAILURE, result
    assert result.stdout == "", result
    first, *rest = result.stderr.splitlines()
    assert first == first_line, result
    assert all(line.startswith("usage: ") for line in rest), result
    if has_usage:
        assert rest, result


@dataclass
class Balancer:
    """A running daemon with a control socket, its config and its two upstreams."""

    daemon: Daemon
    config: Path
    socket: Path
    addr: tuple[str, int]
    s1: UpstreamServer
    s2: UpstreamServer

    async def ctl(self, *words: str) -> CtlResult:
        return await run_zdlb("ctl", "-c", str(self.config), *words)

    async def servers(self) -> dict[str, dict[str, Any]]:
        """``json show servers``, by server name, reduced to the fields in ``STATE_KEYS``."""
        result = await self.ctl("--json", "show", "servers")
        assert result.returncode == EXIT_OK, result
        rows = json.loads(result.stdout)
        assert isinstance(rows, list), rows
        return {row["server"]: {key: row[key] for key in STATE_KEYS} for row in rows}

    async def served_by(self, count: int = REQUESTS) -> list[str]:
        """Which upstream answered each of ``count`` requests on one keep-alive connection."""
        names = []
        async with await H11Client.connect(self.addr) as client:
            for index in range(count):
                response = await client.request("GET", f"/r{index}")
                assert response.status == 200, response
                name = response.header("x-echo-server")
                assert name is not None, response
                names.append(name)
        return names


async def start_balancer(
    start_daemon: StartDaemon, write_config: WriteConfig, s1: UpstreamServer, s2: UpstreamServer
) -> Balancer:
    specs = [ServerSpec("s1", s1.addr), ServerSpec("s2", s2.addr)]
    config = write_config(control_config(specs))
    daemon = await start_daemon("run", "-c", str(config))
    addr = await daemon.listener_addr()  # the control socket is bound before any listener
    return Balancer(daemon, config, config.parent / SOCKET_NAME, addr, s1, s2)


@pytest.fixture
async def echo_pair(
    bound_socket_factory: Callable[[], socket.socket],
) -> AsyncIterator[tuple[EchoServer, EchoServer]]:
    async with (
        EchoServer(bound_socket_factory(), name="s1") as s1,
        EchoServer(bound_socket_factory(), name="s2") as s2,
    ):
        yield s1, s2


@pytest.fixture
async def held_pair(
    bound_socket_factory: Callable[[], socket.socket],
) -> AsyncIterator[tuple[HeldServer, EchoServer]]:
    """``s1`` holds ``/hold`` requests until released; ``s2`` echoes."""
    async with (
        HeldServer(bound_socket_factory(), name="s1") as s1,
        EchoServer(bound_socket_factory(), name="s2") as s2,
    ):
        yield s1, s2


@pytest.fixture
async def lb(
    echo_pair: tuple[EchoServer, EchoServer], start_daemon: StartDaemon, write_config: WriteConfig
) -> Balancer:
    return await start_balancer(start_daemon, write_config, *echo_pair)


# --- show -----------------------------------------------------------------------------------------


async def test_show_servers_lists_both_ready_and_up(lb: Balancer) -> None:
    result = await lb.ctl("show", "servers")

    assert result.returncode == EXIT_OK, result
    assert result.stderr == ""
    assert result.stdout.endswith("\n") and not result.stdout.endswith("\n\n"), result
    rows = parse_table(result.stdout)
    assert [row["server"] for row in rows] == ["app/s1", "app/s2"]
    for row in rows:
        assert (row["pool"], row["admin"], row["health"], row["weight"]) == (
            "main",
            "ready",
            "up",
            str(DEFAULT_WEIGHT),
        ), row
        assert row["changed"] == "-", row


async def test_show_servers_json_is_a_list_of_rows(lb: Balancer) -> None:
    result = await lb.ctl("--json", "show", "servers")

    assert result.returncode == EXIT_OK, result
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    assert [row["server"] for row in rows] == ["app/s1", "app/s2"]
    assert all(row["admin"] == "ready" and row["health"] == "up" for row in rows), rows
    assert all(row["weight"] == DEFAULT_WEIGHT and row["inflight"] == 0 for row in rows), rows


async def test_show_info_through_socket_option(lb: Balancer) -> None:
    result = await run_zdlb("ctl", "-s", str(lb.socket), "show", "info")

    assert result.returncode == EXIT_OK, result
    info = {row["info"]: row["value"] for row in parse_table(result.stdout)}
    assert info["pid"] == str(lb.daemon.pid)
    assert (info["listeners"], info["backends"]) == ("1", "1")

    as_json = await run_zdlb("ctl", "-s", str(lb.socket), "--json", "show", "info")
    assert as_json.returncode == EXIT_OK, as_json
    assert json.loads(as_json.stdout)["pid"] == lb.daemon.pid


# --- changing servers -----------------------------------------------------------------------------


async def test_maint_moves_traffic_off_and_ready_brings_it_back(lb: Balancer) -> None:
    assert sorted(set(await lb.served_by())) == ["s1", "s2"]

    result = await lb.ctl("set", "server", "app/s1", "state", "maint")
    assert result.returncode == EXIT_OK, result
    assert result.stdout == "app/s1: admin ready -> maint\n"

    assert await lb.served_by() == ["s2"] * REQUESTS
    rows = parse_table((await lb.ctl("show", "servers")).stdout)
    s1 = next(row for row in rows if row["server"] == "app/s1")
    assert (s1["admin"], s1["changed"]) == ("maint", "admin=maint"), rows
    await lb.daemon.wait_text(f"server_admin server=app/s1 old=ready new=maint uid={os.getuid()}")

    result = await lb.ctl("set", "server", "app/s1", "state", "ready")
    assert result.returncode == EXIT_OK, result
    assert sorted(set(await lb.served_by())) == ["s1", "s2"]
    assert (await lb.servers())["app/s1"]["changed"] == "-"
    await lb.daemon.wait_text(f"server_admin server=app/s1 old=maint new=ready uid={os.getuid()}")


async def test_drain_takes_no_new_traffic(lb: Balancer) -> None:
    result = await lb.ctl("set", "server", "app/s2", "state", "drain")

    assert result.returncode == EXIT_OK, result
    assert await lb.served_by() == ["s1"] * REQUESTS
    assert (await lb.servers())["app/s2"]["admin"] == "drain"


async def test_weight_zero_stops_new_traffic(lb: Balancer) -> None:
    result = await lb.ctl("set", "server", "app/s1", "weight", "0")
    assert result.returncode == EXIT_OK, result
    assert result.stdout == f"app/s1: weight {DEFAULT_WEIGHT} -> 0\n"

    assert await lb.served_by() == ["s2"] * REQUESTS
    s1 = (await lb.servers())["app/s1"]
    assert (s1["admin"], s1["weight"], s1["changed"]) == ("ready", 0, f"weight={DEFAULT_WEIGHT}->0")
    await lb.daemon.wait_text(
        f"server_weight server=app/s1 old={DEFAULT_WEIGHT} new=0 uid={os.getuid()}"
    )

    restored = await lb.ctl("set", "server", "app/s1", "weight", str(DEFAULT_WEIGHT))
    assert restored.returncode == EXIT_OK, restored
    assert sorted(set(await lb.served_by())) == ["s1", "s2"]
    assert (await lb.servers())["app/s1"]["changed"] == "-"


async def test_json_set_answers_json(lb: Balancer) -> None:
    result = await lb.ctl("--json", "set", "server", "app/s2", "state", "maint")

    assert result.returncode == EXIT_OK, result
    assert json.loads(result.stdout) == {"server": "app/s2", "admin": "maint"}
    assert (await lb.servers())["app/s2"]["admin"] == "maint"


# --- wait -----------------------------------------------------------------------------------------


async def test_wait_idle_times_out_while_a_request_is_in_flight(
    held_pair: tuple[HeldServer, EchoServer], start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    held_server = held_pair[0]
    lb = await start_balancer(start_daemon, write_config, *held_pair)

    idle = await lb.ctl("wait", "app/s1", "idle", "5")
    assert idle.returncode == EXIT_OK, idle
    assert idle.stdout == "app/s1: idle\n"

    # s2 out of the way, so the held request can only go to s1.
    assert (await lb.ctl("set", "server", "app/s2", "state", "maint")).returncode == EXIT_OK
    async with await H11Client.connect(lb.addr) as client, asyncio.TaskGroup() as tasks:
        held = tasks.create_task(client.request("GET", HELD_TARGET))
        async with asyncio.timeout(LINE_TIMEOUT_S):
            await held_server.wait_requests(1)

        busy = await lb.ctl("wait", "app/s1", "idle", "0.3")
        assert busy.returncode == EXIT_FAILURE, busy
        assert busy.stdout == ""
        assert busy.stderr.startswith("error: app/s1: timeout, inflight=1"), busy
        assert not held.done()

        held_server.release.set()
        response = await held
        assert (response.status, response.body) == (200, b"done\n")

    again = await lb.ctl("wait", "app/s1", "idle", "5")
    assert again.returncode == EXIT_OK, again
    assert again.stdout == "app/s1: idle\n"


async def test_wait_json_timeout_is_an_error(
    held_pair: tuple[HeldServer, EchoServer], start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    held_server = held_pair[0]
    lb = await start_balancer(start_daemon, write_config, *held_pair)
    assert (await lb.ctl("set", "server", "app/s2", "state", "maint")).returncode == EXIT_OK
    async with await H11Client.connect(lb.addr) as client, asyncio.TaskGroup() as tasks:
        held = tasks.create_task(client.request("GET", HELD_TARGET))
        async with asyncio.timeout(LINE_TIMEOUT_S):
            await held_server.wait_requests(1)
        # Drain is how an operator removes a server: no new requests, then wait for idle.
        assert (await lb.ctl("set", "server", "app/s1", "state", "drain")).returncode == EXIT_OK

        busy = await lb.ctl("--json", "wait", "app/s1", "idle", "0.3")
        assert busy.returncode == EXIT_FAILURE, busy
        answer = json.loads(busy.stderr)
        assert (answer["error"], answer["idle"], answer["inflight"]) == ("timeout", False, 1)

        held_server.release.set()
        assert (await held).status == 200

    # Draining, so the pooled upstream connection is closed at once rather than idling out.
    drained = await lb.ctl("--json", "wait", "app/s1", "idle", "5")
    assert drained.returncode == EXIT_OK, drained
    assert json.loads(drained.stdout) == {"server": "app/s1", "idle": True}


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "first_line"),
    [
        (["frobnicate"], "error: unknown command 'frobnicate'"),
        (["show", "everything"], "error: unknown command 'show everything'"),
        (
            ["set", "server", "app/s1", "state", "sideways"],
            "error: unknown state 'sideways': expected ready, drain, maint",
        ),
        (["set", "server", "app/s1", "weight", "999"], "error: weight 999 is out of range 0..256"),
        (["set", "server", "app/s1", "weight", "-1"], "error: weight -1 is out of range 0..256"),
        (["set", "server", "app/s1", "weight", "heavy"], "error: weight 'heavy' is not an integer"),
        (["set", "server", "app/s1"], "error: missing 'state' or 'weight'"),
        (["set", "server", "s1", "state", "maint"], "error: expected BACKEND/SERVER, got 's1'"),
        (
            ["set", "server", "app/s1", "state", "maint", "now"],
            "error: unexpected 'now' after 'set server app/s1 state maint'",
        ),
        (
            ["wait", "app/s1", "idle", "0"],
            "error: timeout 0 must be > 0 and <= 3600 seconds",
        ),
    ],
    ids=[
        "unknown-command",
        "unknown-show",
        "bad-state",
        "weight-too-big",
        "weight-negative",
        "weight-not-int",
        "set-incomplete",
        "no-slash",
        "trailing-word",
        "wait-zero",
    ],
)
async def test_usage_error_exits_1_and_changes_nothing(
    lb: Balancer, words: list[str], first_line: str
) -> None:
    before = await lb.servers()

    result = await lb.ctl(*words)

    assert_usage_error(result, first_line)
    assert await lb.servers() == before


@pytest.mark.parametrize(
    ("words", "first_line"),
    [
        (["set", "server", "web/s1", "state", "maint"], "error: no backend 'web' (backends: app)"),
        (["set", "server", "app/s9", "weight", "0"], "error: no server 's9' in app (s1, s2)"),
        (["wait", "app/s9", "idle", "1"], "error: no server 's9' in app (s1, s2)"),
        (["show", "servers", "web"], "error: no backend 'web' (backends: app)"),
    ],
    ids=["unknown-backend", "unknown-server", "wait-unknown-server", "show-unknown-backend"],
)
async def test_unknown_target_exits_1_and_changes_nothing(
    lb: Balancer, words: list[str], first_line: str
) -> None:
    before = await lb.servers()

    result = await lb.ctl(*words)

    # The message names what exists instead of repeating the usage (which the words matched).
    assert_usage_error(result, first_line, has_usage=False)
    assert await lb.servers() == before


async def test_json_error_goes_to_stderr(lb: Balancer) -> None:
    result = await lb.ctl("--json", "set", "server", "app/s1", "state", "sideways")

    assert result.returncode == EXIT_FAILURE, result
    assert result.stdout == ""
    answer = json.loads(result.stderr)
    assert answer["error"].startswith("unknown state 'sideways'")
    assert answer["usage"].startswith("usage: set server BACKEND/SERVER state")


async def test_ctl_without_control_section_exits_2(
    echo_server: EchoServer, write_config: WriteConfig
) -> None:
    config = write_config(render_config([ServerSpec("s1", echo_server.addr)]))

    result = await run_zdlb("ctl", "-c", str(config), "show", "info")

    assert result.returncode == EXIT_CONFIG, result
    assert result.stdout == ""
    assert result.stderr == f"zdlb: {config} configures no [control] socket\n"


async def test_ctl_to_missing_socket_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"

    result = await run_zdlb("ctl", "-s", str(path), "show", "info")

    assert result.returncode == EXIT_FAILURE, result
    assert result.stdout == ""
    assert result.stderr == f"zdlb ctl: cannot talk to {path}: No such file or directory\n"


async def test_ctl_to_socket_nobody_listens_on_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # closed without unlink: the file stays, nobody listens

    result = await run_zdlb("ctl", "-s", str(path), "show", "info")

    assert result.returncode == EXIT_FAILURE, result
    assert result.stdout == ""
    assert result.stderr == f"zdlb ctl: cannot talk to {path}: Connection refused\n"


# --- the socket file ------------------------------------------------------------------------------


async def test_socket_is_0600_and_removed_on_sigterm(lb: Balancer) -> None:
    mode = lb.socket.lstat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600, oct(mode)

    lb.daemon.send_signal(signal.SIGTERM)

    assert await lb.daemon.wait_exit() == EXIT_OK
    assert not lb.socket.exists()
    assert "Traceback" not in lb.daemon.output


async def test_stale_socket_file_is_replaced(
    echo_pair: tuple[EchoServer, EchoServer],
    start_daemon: StartDaemon,
    write_config: WriteConfig,
    tmp_path: Path,
) -> None:
    path = tmp_path / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # what a daemon killed with SIGKILL leaves behind
    assert stat.S_ISSOCK(path.lstat().st_mode)

    lb = await start_balancer(start_daemon, write_config, *echo_pair)

    await lb.daemon.wait_text(f"control_stale_socket_removed socket={path}")
    assert (await lb.ctl("show", "info")).returncode == EXIT_OK
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600


async def test_second_daemon_on_the_same_socket_fails_and_first_keeps_working(
    lb: Balancer, start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    specs = [ServerSpec("s1", lb.s1.addr), ServerSpec("s2", lb.s2.addr)]
    second_config = write_config(control_config(specs))
    assert second_config.parent / SOCKET_NAME == lb.socket

    second = await start_daemon("run", "-c", str(second_config))

    assert await second.wait_exit(timeout_s=CLI_TIMEOUT_S) == EXIT_FAILURE
    assert f"control socket {lb.socket} is in use by another zdlb" in second.output
    assert "Traceback" not in second.output
    assert "listener_started" not in second.output
    assert stat.S_ISSOCK(lb.socket.lstat().st_mode)
    result = await lb.ctl("show", "info")
    assert result.returncode == EXIT_OK, result
    info = {row["info"]: row["value"] for row in parse_table(result.stdout)}
    assert info["pid"] == str(lb.daemon.pid)
    assert sorted(set(await lb.served_by())) == ["s1", "s2"]


async def test_regular_file_at_socket_path_is_kept(
    echo_server: EchoServer, start_daemon: StartDaemon, write_config: WriteConfig, tmp_path: Path
) -> None:
    path = tmp_path / SOCKET_NAME
    path.write_text("precious\n", encoding="utf-8")
    config = write_config(control_config([ServerSpec("s1", echo_server.addr)]))

    daemon = await start_daemon("run", "-c", str(config))

    assert await daemon.wait_exit(timeout_s=CLI_TIMEOUT_S) == EXIT_FAILURE
    assert f"{path} exists and is not a socket; not replacing it" in daemon.output
    assert "Traceback" not in daemon.output
    assert path.read_text(encoding="utf-8") == "precious\n"


# --- the state journal --------------------------------------------------------------------------


async def test_runtime_changes_survive_a_restart_with_a_state_file(
    echo_pair: tuple[EchoServer, EchoServer], start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    s1, s2 = echo_pair
    specs = [ServerSpec("s1", s1.addr), ServerSpec("s2", s2.addr)]
    text = control_config(specs) + 'state_file = "state.json"\n'
    config = write_config(text)
    first = await start_daemon("run", "-c", str(config))
    await first.listener_addr()
    lb = Balancer(first, config, config.parent / SOCKET_NAME, await first.listener_addr(), s1, s2)
    assert (await lb.ctl("set", "server", "app/s1", "state", "maint")).returncode == EXIT_OK
    assert (await lb.ctl("set", "server", "app/s2", "weight", "7")).returncode == EXIT_OK
    first.send_signal(signal.SIGTERM)
    assert await first.wait_exit() == 0

    second = await start_daemon("run", "-c", str(config))
    lb = Balancer(second, config, lb.socket, await second.listener_addr(), s1, s2)
    servers = await lb.servers()
    assert (servers["app/s1"]["admin"], servers["app/s2"]["weight"]) == ("maint", 7)
    assert set(await lb.served_by()) == {"s2"}  # s1 stayed out of service across the restart
    assert "state_journal_replayed server=app/s1" in second.output


async def test_flip_and_swap_through_zdlb_ctl_survive_a_restart(
    echo_pair: tuple[EchoServer, EchoServer], start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    s1, s2 = echo_pair  # s2 is s1's pair: the same host's other version
    specs = [ServerSpec("s1", s1.addr), ServerSpec("s2", s2.addr, pool="backup", pair="s1")]
    config = write_config(control_config(specs) + 'state_file = "state.json"\n')
    first = await start_daemon("run", "-c", str(config))
    lb = Balancer(first, config, config.parent / SOCKET_NAME, await first.listener_addr(), s1, s2)
    assert set(await lb.served_by()) == {"s1"}
    result = await lb.ctl("flip", "app/s1")
    assert result.stdout == "app/s1: admin ready -> maint\napp/s2 serves s1\n", result
    assert set(await lb.served_by()) == {"s2"}
    assert_usage_error(
        await lb.ctl("flip", "app/s1", "now"),
        "error: unknown option 'now': expected 'force' or 'wait'",
    )
    result = await lb.ctl("flip", "app/s1")
    assert result.stdout == "app/s1: admin maint -> ready\napp/s1 serves s1\n", result
    result = await lb.ctl("swap", "app")
    assert result.stdout == "app/s1: pool backup\napp/s2: pool main\n", result
    assert set(await lb.served_by()) == {"s2"}
    first.send_signal(signal.SIGTERM)
    assert await first.wait_exit() == 0

    second = await start_daemon("run", "-c", str(config))
    lb = Balancer(second, config, lb.socket, await second.listener_addr(), s1, s2)
    servers = await lb.servers()
    assert (servers["app/s1"]["pool"], servers["app/s2"]["pool"]) == ("backup", "main")
    assert servers["app/s2"]["changed"] == "pool=backup->main"
    assert set(await lb.served_by()) == {"s2"}
