"""The real ``zdlb run`` process: proxying, logging, graceful stop on signals, resource limits.

Each test starts the daemon on a generated config whose listener binds port 0, learns the port
from the ``listener_started`` log line, talks to it with ``H11Client`` and stops it with a
signal. Upstream servers run in the test's event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import resource
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon.conftest import (
    EXIT_TIMEOUT_S,
    HELD_TARGET,
    LINE_TIMEOUT_S,
    Daemon,
    HeldServer,
    ServerSpec,
    StartDaemon,
    render_config,
)
from tests.servers import EchoServer, H11Client

WriteConfig = Callable[[str], Path]

_ACCESS_RE = re.compile(
    r"request client=(?P<client>\S+) method=(?P<method>\S+) target=(?P<target>\S+)"
    r" status=(?P<status>\d+) bytes=(?P<bytes>\d+) server=(?P<server>\S+) pool=(?P<pool>\S+)"
    r" ms=(?P<ms>[0-9.]+)"
)


async def stop(daemon: Daemon, signum: signal.Signals = signal.SIGTERM) -> int:
    """Signal the daemon and return its exit code once it exited and its output was read."""
    daemon.send_signal(signum)
    return await daemon.wait_exit()


def access_lines(daemon: Daemon) -> list[re.Match[str]]:
    return [m for line in daemon.lines if (m := _ACCESS_RE.search(line)) is not None]


def assert_no_traceback(daemon: Daemon) -> None:
    assert "Traceback" not in daemon.output, daemon.output


def echo_config(
    write_config: WriteConfig, server: EchoServer, *, grace_s: float = 5.0, access_log: bool = True
) -> Path:
    servers = [ServerSpec("echo-1", server.addr)]
    return write_config(render_config(servers, grace_s=grace_s, access_log=access_log))


# --- proxying and logging ------------------------------------------------------------------


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
async def test_run_proxies_a_request(
    loop_name: str, echo_server: EchoServer, start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    path = echo_config(write_config, echo_server)
    # At debug level the stdlib loop logs which selector it uses; uvloop logs nothing of it.
    daemon = await start_daemon("run", "-c", str(path), "--loop", loop_name, "--log-level", "debug")
    addr = await daemon.listener_addr()

    async with await H11Client.connect(addr) as client:
        response = await client.request("GET", "/hello?x=1", headers=[("host", "app.test")])
        again = await client.request("POST", "/form", body=b"a=1")

    assert response.status == 200
    echoed = response.json()
    assert echoed["server"] == "echo"
    assert echoed["target"] == "/hello?x=1"
    received = {(name.lower(), value) for name, value in echoed["headers"]}
    assert ("host", "app.test") in received
    assert ("x-forwarded-for", "127.0.0.1") in received
    assert again.status == 200
    assert again.json()["body_bytes"] == 3
    assert [(r.method, r.target) for r in echo_server.requests] == [
        ("GET", "/hello?x=1"),
        ("POST", "/form"),
    ]
    assert await stop(daemon) == 0
    assert ("Using selector" in daemon.output) == (loop_name == "asyncio"), daemon.output
    assert_no_traceback(daemon)


async def test_access_log_has_one_line_per_request(
    echo_server: EchoServer, start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    daemon = await start_daemon("run", "-c", str(echo_config(write_config, echo_server)))
    addr = await daemon.listener_addr()

    async with await H11Client.connect(addr) as client:
        ok = await client.request("GET", "/a?b=1", headers=[("x-respond-bytes", "1234")])
        missing = await client.request("DELETE", "/gone", headers=[("x-respond-status", "404")])
    assert (ok.status, len(ok.body), missing.status) == (200, 1234, 404)
    assert await stop(daemon) == 0

    lines = access_lines(daemon)
    assert [m.group("method", "target", "status", "bytes") for m in lines] == [
        ("GET", "/a?b=1", "200", "1234"),
        ("DELETE", "/gone", "404", str(len(missing.body))),
    ]
    for match in lines:
        assert match.group("client", "server", "pool") == ("127.0.0.1", "echo-1", "main")
        assert float(match["ms"]) >= 0.0
        assert " zdlb.access request " in match.string


@pytest.mark.parametrize("how", ["config", "flag"])
async def test_access_log_can_be_turned_off(
    how: str, echo_server: EchoServer, start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    path = echo_config(write_config, echo_server, access_log=how == "flag")
    extra = ["--no-access-log"] if how == "flag" else []
    daemon = await start_daemon("run", "-c", str(path), *extra)
    addr = await daemon.listener_addr()

    async with await H11Client.connect(addr) as client:
        assert (await client.request("GET", "/quiet")).status == 200
    assert await stop(daemon) == 0

    # The output is complete (the process exited): other events are logged, requests are not.
    assert "shutdown_finished" in daemon.output
    assert access_lines(daemon) == []
    assert "zdlb.access" not in daemon.output


async def test_log_format_json_writes_one_object_per_line(
    echo_server: EchoServer, start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    path = echo_config(write_config, echo_server)
    daemon = await start_daemon("run", "-c", str(path), "--log-format", "json")
    addr = await daemon.listener_addr()

    async with await H11Client.connect(addr) as client:
        assert (await client.request("GET", "/j")).status == 200
    assert await stop(daemon) == 0

    entries = [json.loads(line) for line in daemon.lines]  # every line must be JSON
    assert entries
    for entry in entries:
        assert set(entry) >= {"ts", "level", "logger", "msg"}, entry
        assert isinstance(entry["ts"], float)
    messages = [(e["level"], e["logger"], e["msg"].split(" ", 1)[0]) for e in entries]
    assert ("info", "zdlb.daemon.lifecycle", "listener_started") in messages
    assert ("info", "zdlb.daemon.lifecycle", "shutdown_finished") in messages
    access = [e for e in entries if e["logger"] == "zdlb.access"]
    assert len(access) == 1
    match = _ACCESS_RE.fullmatch(access[0]["msg"])
    assert match is not None, access[0]
    assert match.group("method", "target", "status", "server") == ("GET", "/j", "200", "echo-1")


# --- graceful stop -----------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_lets_inflight_request_finish(
    signum: signal.Signals,
    held_server: HeldServer,
    start_daemon: StartDaemon,
    write_config: WriteConfig,
) -> None:
    grace_s = 5.0
    servers = [ServerSpec("held-1", held_server.addr)]
    daemon = await start_daemon(
        "run", "-c", str(write_config(render_config(servers, grace_s=grace_s)))
    )
    addr = await daemon.listener_addr()
    loop = asyncio.get_running_loop()

    async with (
        await H11Client.connect(addr) as idle,
        await H11Client.connect(addr) as busy,
        asyncio.TaskGroup() as tasks,
    ):
        first = await idle.request("GET", "/")
        assert (first.status, first.body, idle.is_reusable) == (200, b"held\n", True)
        slow = tasks.create_task(busy.request("GET", HELD_TARGET))
        async with asyncio.timeout(LINE_TIMEOUT_S):
            await held_server.wait_requests(2)  # the slow request reached the server

        signalled_at = loop.time()
        daemon.send_signal(signum)
        await daemon.wait_text("shutdown_started connections=2")

        # Issue 11: the idle one is not closed under a request it may be writing; its next
        # request is answered with `Connection: close`, then it is closed.
        last = await idle.request("GET", "/")
        assert (last.status, last.header("connection")) == (200, "close")
        async with asyncio.timeout(LINE_TIMEOUT_S):
            assert await idle.reader.read(1) == b"", "idle keep-alive client not closed"
        with pytest.raises(ConnectionRefusedError):
            async with asyncio.timeout(LINE_TIMEOUT_S):
                await asyncio.open_connection(*addr)  # the listener is closed
        assert not slow.done()

        held_server.release.set()
        response = await slow
        assert (response.status, response.body) == (200, b"done\n")
        assert response.header("connection") == "close"
        async with asyncio.timeout(LINE_TIMEOUT_S):
            assert await busy.reader.read(1) == b""

    assert await daemon.wait_exit(timeout_s=grace_s) == 0
    assert loop.time() - signalled_at < grace_s
    assert "shutdown_finished aborted=0" in daemon.output
    assert_no_traceback(daemon)


async def test_stop_with_nothing_in_flight_is_prompt(
    echo_server: EchoServer, start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    # A grace period far longer than EXIT_TIMEOUT_S: exiting in time proves it was not waited.
    path = echo_config(write_config, echo_server, grace_s=600.0)
    daemon = await start_daemon("run", "-c", str(path))
    addr = await daemon.listener_addr()

    async with await H11Client.connect(addr) as idle:
        assert (await idle.request("GET", "/")).status == 200
        daemon.send_signal(signal.SIGTERM)
        await daemon.wait_text("shutdown_started")
        # Its next request is answered and closes it: then nothing is left to wait for.
        assert (await idle.request("GET", "/")).header("connection") == "close"
        async with asyncio.timeout(LINE_TIMEOUT_S):
            assert await idle.reader.read(1) == b""
        assert await daemon.wait_exit(timeout_s=EXIT_TIMEOUT_S) == 0

    assert "shutdown_started connections=1" in daemon.output
    assert "shutdown_finished aborted=0" in daemon.output


async def test_stop_aborts_what_outlives_the_grace_period(
    held_server: HeldServer, start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    grace_s = 0.5
    servers = [ServerSpec("held-1", held_server.addr)]
    daemon = await start_daemon(
        "run", "-c", str(write_config(render_config(servers, grace_s=grace_s)))
    )
    addr = await daemon.listener_addr()
    loop = asyncio.get_running_loop()

    async with await H11Client.connect(addr) as busy:
        busy.writer.write(b"GET /hold HTTP/1.1\r\nHost: app.test\r\n\r\n")
        async with asyncio.timeout(LINE_TIMEOUT_S):
            await held_server.wait_requests(1)
        signalled_at = loop.time()
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit(timeout_s=grace_s + EXIT_TIMEOUT_S) == 0
        elapsed_s = loop.time() - signalled_at
        async with asyncio.timeout(LINE_TIMEOUT_S):
            try:
                leftover = await busy.reader.read()
            except ConnectionResetError:
                leftover = b""

    assert leftover == b"", "the never-answered request got bytes"
    assert elapsed_s >= grace_s * 0.9, "exited before the grace period"
    assert "shutdown_finished aborted=1" in daemon.output


async def test_listener_grace_period_override_is_used(
    held_server: HeldServer, start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    listener_grace_s = 0.2
    text = render_config(
        [ServerSpec("held-1", held_server.addr)],
        grace_s=60.0,
        listener_extra=f"timeouts = {{ grace_s = {listener_grace_s} }}",
    )
    daemon = await start_daemon("run", "-c", str(write_config(text)))
    addr = await daemon.listener_addr()

    async with await H11Client.connect(addr) as busy:
        busy.writer.write(b"GET /hold HTTP/1.1\r\nHost: app.test\r\n\r\n")
        async with asyncio.timeout(LINE_TIMEOUT_S):
            await held_server.wait_requests(1)
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit(timeout_s=listener_grace_s + 2.0) == 0


# --- process resources -------------------------------------------------------------------------


def read_nofile_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) "Max open files" of process ``pid``, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits", encoding="ascii") as file:
        for line in file:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' line in /proc/{pid}/limits")


async def test_open_file_soft_limit_is_raised_to_the_hard_limit(
    echo_server: EchoServer, start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} leaves no room for a lower soft limit")
    lowered = min(256, hard // 2)
    # Start the daemon with a soft limit below the hard one, so there is something to raise.
    lower = functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, (lowered, hard))
    daemon = await start_daemon(
        "run", "-c", str(echo_config(write_config, echo_server)), preexec_fn=lower
    )
    await daemon.listener_addr()

    assert read_nofile_limits(daemon.pid) == (hard, hard)
    assert await stop(daemon) == 0
