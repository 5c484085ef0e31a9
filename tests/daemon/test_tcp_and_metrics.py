"""The real daemon's TCP listener and /metrics endpoint, next to its HTTP listener.

One ``zdlb run`` serves an HTTP listener and a TCP listener in front of the same two echo
servers (``s1`` main, ``s2`` its pair), plus ``[metrics]`` on a free port. Everything is
driven as an operator would: raw bytes through the TCP listener, ``zdlb ctl`` for flips and
waits, and an HTTP GET of /metrics parsed by prometheus-client's own parser.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.conftest import Daemon, ServerSpec, StartDaemon, render_config
from tests.daemon.test_control import EXIT_FAILURE, EXIT_OK, SOCKET_NAME, CtlResult, run_zdlb
from tests.servers import LOOPBACK, EchoServer, H11Client

WriteConfig = Callable[[str], Path]
READ_TIMEOUT_S = 5.0


@dataclass
class Daemons:
    daemon: Daemon
    config: Path
    http: tuple[str, int]
    tcp: tuple[str, int]
    metrics: tuple[str, int]

    async def ctl(self, *words: str) -> CtlResult:
        return await run_zdlb("ctl", "-c", str(self.config), *words)

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with await H11Client.connect(self.metrics) as client:
            response = await client.request("GET", "/metrics")
        assert response.status == 200, response
        assert (response.header("content-type") or "").startswith("text/plain; version=0.0.4")
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.body.decode())
            for sample in family.samples
        }


async def tcp_exchange(addr: tuple[str, int], path: str) -> bytes:
    """One HTTP/1.0 request as raw bytes through the TCP listener; the whole answer."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: t\r\n\r\n".encode())
        async with asyncio.timeout(READ_TIMEOUT_S):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.fixture
async def lb(
    bound_socket_factory: Callable[[], socket.socket],
    start_daemon: StartDaemon,
    write_config: WriteConfig,
) -> AsyncIterator[Daemons]:
    async with (
        EchoServer(bound_socket_factory(), name="s1") as s1,
        EchoServer(bound_socket_factory(), name="s2") as s2,
    ):
        specs = [ServerSpec("s1", s1.addr), ServerSpec("s2", s2.addr, pool="backup", pair="s1")]
        text = render_config(specs, backend_extra='[backends.app.sticky]\ncookie = "SERVERID"\n')
        text += f'\n[listeners.raw]\nbind = "{LOOPBACK}:0"\nmode = "tcp"\nbackend = "app"\n'
        text += f'\n[control]\nsocket = "{SOCKET_NAME}"\n'
        text += f'\n[metrics]\nlisten = "{LOOPBACK}:0"\n'  # the kernel picks: no race
        config = write_config(text)
        daemon = await start_daemon("run", "-c", str(config))
        http = await daemon.listener_addr("web")
        tcp = await daemon.listener_addr("raw")
        line = await daemon.wait_text("metrics_started")
        match = re.search(r"addr=(\S+):(\d+)", line)
        assert match is not None, line
        yield Daemons(daemon, config, http, tcp, (match[1], int(match[2])))


async def test_the_tcp_listener_follows_flips_and_wait_idle_counts_its_tunnels(
    lb: Daemons,
) -> None:
    answer = await tcp_exchange(lb.tcp, "/one")
    assert answer.startswith(b"HTTP/1.1 200") and b'"server": "s1"' in answer
    assert b"SERVERID" not in answer  # bytes pass untouched: no cookie at layer 4
    assert (await lb.ctl("flip", "app/s1")).returncode == EXIT_OK
    assert b'"server": "s2"' in await tcp_exchange(lb.tcp, "/two")
    # An open tunnel to s2 keeps it busy: wait idle times out, then returns once it closes.
    reader, writer = await asyncio.open_connection(*lb.tcp)
    writer.write(b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n")
    async with asyncio.timeout(READ_TIMEOUT_S):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    busy = await lb.ctl("wait", "app/s2", "idle", "0.3")
    assert busy.returncode == EXIT_FAILURE and "timeout" in busy.stderr, busy
    writer.close()
    await writer.wait_closed()
    assert (await lb.ctl("wait", "app/s2", "idle", "5")).stdout == "app/s2: idle\n"


async def test_one_scrape_shows_traffic_state_and_control_commands(lb: Daemons) -> None:
    async with await H11Client.connect(lb.http) as client:
        for index in range(5):
            assert (await client.request("GET", f"/r{index}")).status == 200
    await tcp_exchange(lb.tcp, "/t")
    assert (await lb.ctl("set", "server", "app/s1", "weight", "7")).returncode == EXIT_OK
    assert (await lb.ctl("flip", "app/nope")).returncode == EXIT_FAILURE
    assert (await lb.ctl("frobnicate")).returncode == EXIT_FAILURE

    samples = await lb.scrape()

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    web = {"listener": "web"}
    assert value("zdlb_listener_connections_total", **web) >= 1
    assert value("zdlb_listener_http_responses_total", **web, code="2xx") == 5
    assert value("zdlb_listener_bytes_in_total", **web) > 0
    assert value("zdlb_listener_connections_total", listener="raw") == 1
    assert value("zdlb_listener_bytes_out_total", listener="raw") > 0
    s1 = {"backend": "app", "server": "s1"}
    assert value("zdlb_server_requests_total", **s1) == 5
    assert value("zdlb_server_weight", **s1) == 7
    assert value("zdlb_server_pool", **s1, state="main") == 1
    assert value("zdlb_server_pool", backend="app", server="s2", state="backup") == 1
    assert value("zdlb_server_admin_state", **s1, state="ready") == 1
    assert value("zdlb_backend_response_time_seconds_count", backend="app") == 5
    assert value("zdlb_control_commands_total", result="ok") == 1
    assert value("zdlb_control_commands_total", result="error") == 1
    assert value("zdlb_control_commands_total", result="usage") == 1
    assert any(name == "zdlb_build_info" for name, _ in samples)
