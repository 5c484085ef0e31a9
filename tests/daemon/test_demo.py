"""``zdlb demo`` as a person runs it, and the demo's main/backup fallback on a config of our own.

The demo binds fixed ports (127.0.0.1:8000, demo hosts on 8081/8082/8091/8092), so its test is
skipped when any of them is taken; it takes the mains down with ``POST /demo/stop`` as its help
text says. The fallback rules in detail (first backup only vs all_backups, traffic returning to
a main) are shown with ``zdlb run`` on a demo-like config whose main and backup vhosts are
``DemoVhostServer``s in the test's loop, each on a port reserved for the whole test so it can be
stopped (connections refused) and started again on the same address.
"""

from __future__ import annotations

import errno
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import pytest

from tests.daemon.conftest import (
    START_TIMEOUT_S,
    Daemon,
    ServerSpec,
    StartDaemon,
    render_config,
)
from tests.servers import LOOPBACK, H11Client
from zdlb.daemon.demo_app import DemoVhostServer, serve_demo_vhost

WriteConfig = Callable[[str], Path]

DEMO_LB_PORT = 8000
DEMO_HOST_PORTS = (8081, 8082, 8091, 8092)
# Requests per phase of the fallback test: enough for round robin to show every candidate.
REQUESTS_PER_PHASE = 4
EADDRINUSE_TEXT = f"[Errno {errno.EADDRINUSE}]"
_ACCESS_SERVER_RE = re.compile(
    r" zdlb\.access request .* server=(?P<server>\S+) pool=(?P<pool>\S+) "
)


def taken_ports(ports: Iterable[int]) -> list[int]:
    """The ports of ``ports`` that 127.0.0.1 cannot bind now (as the demo binds: SO_REUSEADDR)."""
    taken = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                taken.append(port)
    return taken


def parse_page(body: bytes) -> dict[str, str]:
    """The demo page's ``key: value`` lines."""
    pairs = (line.split(": ", 1) for line in body.decode().splitlines())
    return {key: value for key, value in pairs}


async def fetch_pages(addr: tuple[str, int], count: int) -> list[dict[str, str]]:
    pages = []
    async with await H11Client.connect(addr) as client:
        for _ in range(count):
            response = await client.request("GET", "/")
            assert response.status == 200, response
            pages.append(parse_page(response.body))
    return pages


async def stop_demo_vhost(port: int) -> None:
    """Take one demo vhost down for a minute, as DEMO_HELP tells a person to."""
    async with await H11Client.connect((LOOPBACK, port)) as client:
        response = await client.request("POST", "/demo/stop?seconds=60")
    assert response.status == 202, response


def answered_by(pages: list[dict[str, str]]) -> set[tuple[str, str, str]]:
    return {(page["host"], page["vhost"], page["version"]) for page in pages}


async def test_demo_serves_both_hosts_and_stops_on_sigint(start_daemon: StartDaemon) -> None:
    ports = (DEMO_LB_PORT, *DEMO_HOST_PORTS)
    if taken := taken_ports(ports):
        pytest.skip(f"zdlb demo needs 127.0.0.1 ports {ports}; in use now: {taken}")
    daemon = await start_daemon("demo")
    first = await daemon.wait_line(
        lambda line: "listener_started" in line or "startup_failed" in line,
        timeout_s=START_TIMEOUT_S,
    )
    if "startup_failed" in first and EADDRINUSE_TEXT in first:
        pytest.skip(f"a demo port was taken between the check and the start: {first}")
    addr = await daemon.listener_addr()
    assert addr == (LOOPBACK, DEMO_LB_PORT)
    assert "zdlb demo: load balancer on http://127.0.0.1:8000" in daemon.output

    pages = await fetch_pages(addr, REQUESTS_PER_PHASE)

    # Round robin over the two main vhosts; the backups stay idle while the mains answer.
    assert answered_by(pages) == {("front-1", "main", "v1"), ("front-2", "main", "v1")}
    assert [page["host"] for page in pages[:2]] in (["front-1", "front-2"], ["front-2", "front-1"])
    assert all(page["x-forwarded-for"] == LOOPBACK for page in pages)

    # The crash DEMO_HELP tells: front-1's main stops; its pair, front-1's v2, stands in (a
    # refused connect is retried on the pair first, then the checks mark the main down).
    await stop_demo_vhost(DEMO_HOST_PORTS[0])
    assert answered_by(await fetch_pages(addr, REQUESTS_PER_PHASE)) == {
        ("front-1", "backup", "v2"),
        ("front-2", "main", "v1"),
    }
    await stop_demo_vhost(DEMO_HOST_PORTS[1])
    assert answered_by(await fetch_pages(addr, REQUESTS_PER_PHASE)) == {
        ("front-1", "backup", "v2"),
        ("front-2", "backup", "v2"),
    }

    daemon.send_signal(signal.SIGINT)
    assert await daemon.wait_exit() == 0
    assert "shutdown_finished" in daemon.output
    assert "Traceback" not in daemon.output
    assert taken_ports(ports) == [], "the demo left a port bound after exiting"


# --- fallback, on a demo-like config of our own ------------------------------------------------


class RestartableVhost:
    """A demo vhost on a port reserved for the whole test; ``stop()`` makes it refuse.

    The reservation is a socket bound with SO_REUSEADDR and never listening: while it holds the
    port a connection is refused (RST) and no other process can bind it, yet a new listening
    socket with SO_REUSEADDR can bind the same address to start the vhost again.
    """

    def __init__(self, host: str, vhost: str, version: str) -> None:
        self.host = host
        self.vhost = vhost
        self.version = version
        self._reservation = _reuseaddr_socket()
        self._reservation.bind((LOOPBACK, 0))
        self.addr: tuple[str, int] = self._reservation.getsockname()[:2]
        self._server: DemoVhostServer | None = None

    def __repr__(self) -> str:
        return f"<RestartableVhost {self.host}/{self.vhost} {self.addr} server={self._server!r}>"

    async def start(self) -> None:
        assert self._server is None
        sock = _reuseaddr_socket()
        try:
            sock.bind(self.addr)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        self._server = await serve_demo_vhost(self.host, self.vhost, self.version, sock)

    async def stop(self) -> None:
        """Close the listening socket and every connection; the port then refuses."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def aclose(self) -> None:
        await self.stop()
        self._reservation.close()


def _reuseaddr_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


@pytest.fixture
async def vhosts() -> AsyncIterator[dict[str, RestartableVhost]]:
    """The demo's layout: front-1 and front-2, each a main (v1) and a backup (v2) vhost."""
    made: dict[str, RestartableVhost] = {}
    try:
        for host in ("front-1", "front-2"):
            made[host] = RestartableVhost(host, "main", "v1")
            made[f"{host}-backup"] = RestartableVhost(host, "backup", "v2")
        for vhost in made.values():
            await vhost.start()
        yield made
    finally:
        for vhost in made.values():
            await vhost.aclose()


def demo_like_servers(
    vhosts: dict[str, RestartableVhost], max_idle: int | None = None
) -> list[ServerSpec]:
    return [
        ServerSpec(name, vhost.addr, "backup" if vhost.vhost == "backup" else "main", max_idle)
        for name, vhost in vhosts.items()
    ]


@pytest.mark.parametrize("all_backups", [False, True], ids=["first-backup", "all-backups"])
async def test_backup_pool_answers_while_every_main_is_down(
    all_backups: bool,
    vhosts: dict[str, RestartableVhost],
    start_daemon: StartDaemon,
    write_config: WriteConfig,
) -> None:
    # No health checks yet: a down main is skipped by retrying the next server after the
    # refused connect, so retries must cover both mains; retries land on pooled connections.
    servers = demo_like_servers(vhosts)
    text = render_config(servers, retries=2, all_backups=all_backups)
    daemon: Daemon = await start_daemon("run", "-c", str(write_config(text)))
    addr = await daemon.listener_addr()

    assert answered_by(await fetch_pages(addr, REQUESTS_PER_PHASE)) == {
        ("front-1", "main", "v1"),
        ("front-2", "main", "v1"),
    }

    await vhosts["front-1"].stop()
    await vhosts["front-2"].stop()
    backup_pages = await fetch_pages(addr, REQUESTS_PER_PHASE)
    expected_backups = {("front-1", "backup", "v2")}
    if all_backups:
        expected_backups.add(("front-2", "backup", "v2"))
    assert answered_by(backup_pages) == expected_backups

    await vhosts["front-2"].start()
    assert answered_by(await fetch_pages(addr, REQUESTS_PER_PHASE)) == {("front-2", "main", "v1")}

    daemon.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    # The access log names the server and pool that answered each request, in order.
    logged = [
        (match["server"], match["pool"])
        for line in daemon.lines
        if (match := _ACCESS_SERVER_RE.search(line)) is not None
    ]
    assert len(logged) == 3 * REQUESTS_PER_PHASE, daemon.output
    phases = [
        set(logged[i : i + REQUESTS_PER_PHASE]) for i in range(0, len(logged), REQUESTS_PER_PHASE)
    ]
    assert phases[0] == {("front-1", "main"), ("front-2", "main")}
    assert phases[1] == {(f"{host}-backup", "backup") for host, _, _ in expected_backups}
    assert phases[2] == {("front-2", "main")}
    assert "upstream_connect_failed server=front-1 " in daemon.output


async def test_retry_onto_a_pooled_backup_connection_sends_the_request(
    vhosts: dict[str, RestartableVhost], start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    await vhosts["front-1"].stop()
    await vhosts["front-2"].stop()
    # Default max_idle: the backup's connection is pooled after the first answer. A short
    # server_s turns the hang into a prompt 504.
    text = render_config(
        demo_like_servers(vhosts), retries=2, backend_extra="timeouts = { server_s = 1 }"
    )
    daemon = await start_daemon("run", "-c", str(write_config(text)))
    addr = await daemon.listener_addr()

    pages = await fetch_pages(addr, 2)  # the second reuses the pooled backup connection

    assert answered_by(pages) == {("front-1", "backup", "v2")}
