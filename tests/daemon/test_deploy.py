"""The proof of issue 3: deploys under load lose no request and keep users on their host.

The real ``zdlb run`` process sits in front of four echo servers playing two hosts (front-1
and front-2, each with a paired backup: the same host's other version) that run in the test's
event loop, next to bounded keep-alive clients, each with its own cookie jar. Operators' steps
go through the real ``zdlb ctl``. Every wait is bounded; nothing sleeps to "let it start".
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest

from tests.daemon.conftest import ServerSpec, StartDaemon, render_config
from tests.daemon.test_control import EXIT_OK, SOCKET_NAME, CtlResult, run_zdlb
from tests.servers import EchoServer, H11Client

WriteConfig = Callable[[str], Path]

HOSTS = ("front-1", "front-2")
CLIENTS = 20
# Every client keeps going until the operator's script is done and it made this many more
# requests: the whole load is bounded in count, and in time by LOAD_TIMEOUT_S.
TAIL_REQUESTS = 10
LOAD_TIMEOUT_S = 40.0
# A flip is proven only once the pair answered this many requests of the flipped host's users.
PAIR_REQUESTS = 100
# The drain test's drain_sticky_s: long enough to see users stay, short enough for a quick test.
HOLD_S = 1.5
CHECK = """
[backends.app.check]
kind = "http"
path = "/health"
interval_s = 0.2
fast_interval_s = 0.05
timeout_s = 0.5
rise = 1
fall = 2
observe = true
observe_errors = 2
"""
STICKY = """
[backends.app.sticky]
cookie = "SERVERID"
secret = "deploy-test-secret-0123456789"
drain_sticky_s = {hold}
"""


@dataclass
class LoadClient:
    """One user: a keep-alive connection, a cookie jar, and what answered it."""

    index: int
    cookie: str | None = None
    host: str | None = None  # the host of its first answer: it must never change
    served: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    requests: int = 0

    async def run(self, addr: tuple[str, int], done: asyncio.Event) -> None:
        tail = 0
        async with await H11Client.connect(addr) as conn:
            while tail < TAIL_REQUESTS:
                tail += done.is_set()
                if not await self.one(conn):
                    return

    async def one(self, conn: H11Client) -> bool:
        headers = [("cookie", self.cookie)] if self.cookie else []
        self.requests += 1
        try:
            response = await conn.request("GET", f"/u{self.index}/{self.requests}", headers)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            self.failures.append(f"request {self.requests}: {exc!r}")
            return False
        name = response.header("x-echo-server") or "?"
        if response.status != 200:
            self.failures.append(f"request {self.requests}: {response.status} from {name}")
            return True
        self.served[name] += 1
        host = name.removesuffix("-backup")
        if self.host is None:
            self.host = host
        elif host != self.host:
            self.failures.append(f"request {self.requests}: moved from {self.host} to {name}")
        if set_cookie := response.header("set-cookie"):
            self.cookie = set_cookie.split(";")[0]
        return conn.is_reusable or self.reconnect_failed()

    def reconnect_failed(self) -> bool:
        self.failures.append(f"request {self.requests}: zdlb closed a keep-alive connection")
        return False


@dataclass
class Deploy:
    """A daemon in front of two paired hosts, the echo servers, and the clients' load."""

    config: Path
    addr: tuple[str, int]
    servers: dict[str, EchoServer]
    clients: list[LoadClient]

    async def ctl(self, *words: str) -> CtlResult:
        result = await run_zdlb("ctl", "-c", str(self.config), *words)
        assert result.returncode == EXIT_OK, result
        return result

    async def show(self) -> dict[str, dict[str, object]]:
        rows = json.loads((await self.ctl("--json", "show", "servers")).stdout)
        return {row["server"].split("/")[1]: row for row in rows}

    def served(self, name: str) -> int:
        return sum(client.served[name] for client in self.clients)

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Let the load run until ``predicate`` holds (polled between the clients' requests)."""
        async with asyncio.timeout(LOAD_TIMEOUT_S / 2):
            while not predicate():
                failures = [f for c in self.clients for f in c.failures]
                assert failures == [], what
                await asyncio.sleep(0.01)

    async def until_served(self, name: str, count: int) -> None:
        await self.until(lambda: self.served(name) >= count, f"{name} served {count}")

    async def run_load(self, script: Callable[[], object]) -> None:
        """Run every client while ``script()`` (a coroutine) runs, then a bounded tail."""
        done = asyncio.Event()
        async with asyncio.timeout(LOAD_TIMEOUT_S), asyncio.TaskGroup() as tasks:
            for client in self.clients:
                tasks.create_task(client.run(self.addr, done))
            try:
                await script()  # type: ignore[misc]
            finally:
                done.set()

    def assert_no_failure_and_hosts_kept(self) -> None:
        failures = [f"client {c.index}: {f}" for c in self.clients for f in c.failures]
        assert failures == []
        hosts = Counter(c.host for c in self.clients)
        assert set(hosts) == set(HOSTS), hosts  # both hosts had users
        for client in self.clients:
            assert set(client.served) <= {client.host, f"{client.host}-backup"}, client


async def start_lb(
    stack: AsyncExitStack,
    make_socket: Callable[[], socket.socket],
    start_daemon: StartDaemon,
    write_config: WriteConfig,
    members: list[tuple[str, str, str | None]],
    backend_extra: str,
    clients: int,
) -> Deploy:
    """The daemon with a control socket in front of one echo server per (name, pool, pair)."""
    servers: dict[str, EchoServer] = {}
    specs = []
    for name, pool, pair in members:
        echo = EchoServer(make_socket(), name=name)
        servers[name] = await stack.enter_async_context(echo)
        specs.append(ServerSpec(name, echo.addr, pool=pool, pair=pair))
    text = render_config(specs, access_log=False, backend_extra=backend_extra)
    config = write_config(text + f'\n[control]\nsocket = "{SOCKET_NAME}"\n')
    daemon = await start_daemon("run", "-c", str(config))
    addr = await daemon.listener_addr()
    return Deploy(config, addr, servers, [LoadClient(index) for index in range(clients)])


@pytest.fixture
async def deploy(
    bound_socket_factory: Callable[[], socket.socket],
    start_daemon: StartDaemon,
    write_config: WriteConfig,
) -> AsyncIterator[Deploy]:
    members: list[tuple[str, str, str | None]] = [
        member
        for host in HOSTS
        for member in ((host, "main", None), (f"{host}-backup", "backup", host))
    ]
    extra = CHECK + STICKY.format(hold=300)
    async with AsyncExitStack() as stack:
        yield await start_lb(
            stack, bound_socket_factory, start_daemon, write_config, members, extra, CLIENTS
        )


async def test_a_rolling_flip_under_load_fails_no_request_and_keeps_every_user_home(
    deploy: Deploy,
) -> None:
    async def operator() -> None:
        await deploy.until(lambda: all(c.host for c in deploy.clients), "every client pinned")
        for host in HOSTS:
            backup = f"{host}-backup"
            before = deploy.served(backup)
            result = await deploy.ctl("flip", f"app/{host}")
            assert f"app/{backup} serves {host}" in result.stdout
            await deploy.until_served(backup, before + PAIR_REQUESTS)
            assert (await deploy.ctl("wait", f"app/{host}", "idle", "10")).stdout == (
                f"app/{host}: idle\n"
            )
            row = (await deploy.show())[host]
            assert (row["admin"], row["inflight"], row["conns"]) == ("maint", 0, 0)
            served = deploy.served(host)
            await deploy.until_served(backup, before + 2 * PAIR_REQUESTS)
            assert deploy.served(host) == served  # nothing reached the main meanwhile
            await deploy.ctl("flip", f"app/{host}")
            await deploy.until_served(host, served + PAIR_REQUESTS)

    await deploy.run_load(operator)
    deploy.assert_no_failure_and_hosts_kept()
    assert all(deploy.served(f"{host}-backup") >= 2 * PAIR_REQUESTS for host in HOSTS)


async def test_a_main_killed_under_load_loses_no_idempotent_request(deploy: Deploy) -> None:
    async def kill() -> None:
        await deploy.until(lambda: all(c.host for c in deploy.clients), "every client pinned")
        await deploy.servers["front-1"].aclose()  # its connections and its listener, at once
        await deploy.until_served("front-1-backup", PAIR_REQUESTS)
        assert (await deploy.show())["front-1"]["health"] == "down"

    await deploy.run_load(kill)
    deploy.assert_no_failure_and_hosts_kept()
    pinned = [c for c in deploy.clients if c.host == "front-1"]
    assert pinned and all(c.served["front-1-backup"] > 0 for c in pinned)


@pytest.fixture
async def drain_lb(
    bound_socket_factory: Callable[[], socket.socket],
    start_daemon: StartDaemon,
    write_config: WriteConfig,
) -> AsyncIterator[Deploy]:
    members: list[tuple[str, str, str | None]] = [("s1", "main", None), ("s2", "main", None)]
    extra = STICKY.format(hold=HOLD_S)
    async with AsyncExitStack() as stack:
        yield await start_lb(
            stack, bound_socket_factory, start_daemon, write_config, members, extra, 0
        )


async def test_a_drained_server_keeps_its_users_for_the_hold_then_lets_them_go(
    drain_lb: Deploy,
) -> None:
    users = [LoadClient(index) for index in range(4)]
    conns = [await H11Client.connect(drain_lb.addr) for _ in users]
    try:
        for user, conn in zip(users, conns, strict=True):
            assert await user.one(conn)
        pinned = [(u, c) for u, c in zip(users, conns, strict=True) if u.host == "s1"]
        assert pinned, [u.host for u in users]
        await drain_lb.ctl("set", "server", "app/s1", "state", "drain")
        drained_at = time.monotonic()
        # New users never land on it.
        for index in range(6):
            newcomer = LoadClient(100 + index)
            async with await H11Client.connect(drain_lb.addr) as conn:
                assert await newcomer.one(conn)
            assert newcomer.host == "s2"
        # Its users stay while the hold lasts, then move with a new cookie.
        user, conn = pinned[0]
        while time.monotonic() < drained_at + HOLD_S / 2:
            assert await user.one(conn)
            assert user.served["s2"] == 0, user
        async with asyncio.timeout(HOLD_S + 10):
            while not user.served["s2"]:
                await user.one(conn)
        assert time.monotonic() >= drained_at + HOLD_S / 2
        assert user.cookie is not None and user.cookie.startswith("SERVERID=s2.")
        assert [f for f in user.failures if "moved" not in f] == []
        result = await drain_lb.ctl("wait", "app/s1", "idle", "5")
        assert result.stdout == "app/s1: idle\n"
    finally:
        for conn in conns:
            await conn.aclose()
