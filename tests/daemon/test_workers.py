"""``workers = N``: a master and N worker processes behind one listener, as real processes.

Each test starts ``zdlb run --workers 2`` on a generated config with a control socket and a
/metrics endpoint, two upstreams in the test's own loop. Which worker served a request is
read from its access-log line (every worker line ends in ``worker=N``); when a change reached
a worker, from its ``worker_state_applied`` line. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.conftest import (
    HELD_TARGET,
    LINE_TIMEOUT_S,
    START_TIMEOUT_S,
    ZDLB_CMD,
    Daemon,
    HeldServer,
    ServerSpec,
    StartDaemon,
    render_config,
)
from tests.daemon.load import KeepAliveLoad
from tests.daemon.test_control import EXIT_FAILURE, EXIT_OK, SOCKET_NAME, CtlResult, run_zdlb
from tests.servers import LOOPBACK, EchoServer, H11Client, UpstreamServer, refused_address
from zdlb.config.model import Address, Config, ListenerConfig
from zdlb.daemon.runtime import worker_count

WriteConfig = Callable[[str], Path]
WORKERS = 2
# The promise: a control change reaches every worker within this.
PUSH_BOUND_S = 0.1
# Concurrent fresh connections per round: enough that both workers' accepts get some.
FAN_OUT = 12

# Passive checks only, in effect: the active probes need 10 failures (5 s at the fast
# interval) before they could mark a server down, one error on live traffic does it at once.
PASSIVE_CHECK = """
[backends.app.check]
kind = "tcp"
interval_s = 60
fall = 10
observe = true
observe_errors = 1
"""

_WORKER_STARTED_RE = re.compile(r"worker_started worker=(\d+) pid=(\d+)")
_ACCESS_WORKER_RE = re.compile(r"zdlb\.access .* worker=(\d+)$")
_STAMP_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass
class Cluster:
    """A running master with its workers, its config and its upstreams."""

    daemon: Daemon
    config: Path
    addr: tuple[str, int]
    metrics: tuple[str, int]
    upstreams: Sequence[UpstreamServer] = field(default_factory=list)

    async def ctl(self, *words: str) -> CtlResult:
        return await run_zdlb("ctl", "-c", str(self.config), *words)

    def worker_pids(self) -> dict[int, int]:
        """The latest pid of each worker, from the ``worker_started`` lines so far."""
        pids = {}
        for line in self.daemon.lines:
            if (match := _WORKER_STARTED_RE.search(line)) is not None:
                pids[int(match[1])] = int(match[2])
        return pids

    def access_workers(self, since: int = 0) -> list[int]:
        """The worker of each access-log line from line ``since`` on."""
        return [
            int(match[1])
            for line in self.daemon.lines[since:]
            if (match := _ACCESS_WORKER_RE.search(line)) is not None
        ]

    async def wait_access_lines(self, count: int, since: int) -> list[int]:
        if len(self.access_workers(since)) < count:
            await self.daemon.wait_line(lambda _: len(self.access_workers(since)) >= count)
        return self.access_workers(since)

    async def wait_worker_line(self, text: str, index: int) -> str:
        """The first line of worker ``index`` holding ``text``."""

        def matches(line: str) -> bool:
            return text in line and line.endswith(f" worker={index}")

        return await self.daemon.wait_line(matches)

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with await H11Client.connect(self.metrics) as client:
            response = await client.request("GET", "/metrics")
        assert response.status == 200, response
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.body.decode())
            for sample in family.samples
        }


async def start_cluster(
    start_daemon: StartDaemon,
    write_config: WriteConfig,
    specs: Sequence[ServerSpec],
    upstreams: Sequence[UpstreamServer],
    *,
    grace_s: float = 5.0,
    backend_extra: str = "",
    extra: str = "",
) -> Cluster:
    """``extra``: TOML appended as written (more listeners, say)."""
    text = render_config(specs, grace_s=grace_s, backend_extra=backend_extra) + extra
    text += f'\n[control]\nsocket = "{SOCKET_NAME}"\n'
    text += f'\n[metrics]\nlisten = "{LOOPBACK}:0"\n'
    config = write_config(text)
    daemon = await start_daemon("run", "--workers", str(WORKERS), "-c", str(config))
    addr = await daemon.listener_addr("web", timeout_s=START_TIMEOUT_S)
    line = await daemon.wait_text("metrics_started")
    match = re.search(r"addr=(\S+):(\d+)", line)
    assert match is not None, line
    cluster = Cluster(daemon, config, addr, (match[1], int(match[2])), upstreams)
    assert sorted(cluster.worker_pids()) == list(range(WORKERS)), daemon.output
    return cluster


@pytest.fixture
async def upstream_pair(
    bound_socket_factory: Callable[[], socket.socket],
) -> AsyncIterator[tuple[HeldServer, EchoServer]]:
    """``s1`` holds ``/hold`` requests until released (else answers), ``s2`` echoes."""
    async with (
        HeldServer(bound_socket_factory(), name="s1") as s1,
        EchoServer(bound_socket_factory(), name="s2") as s2,
    ):
        yield s1, s2


def specs_of(
    pair: tuple[UpstreamServer, UpstreamServer], *, paired: bool = False
) -> list[ServerSpec]:
    s1, s2 = pair
    if paired:
        return [ServerSpec("s1", s1.addr), ServerSpec("s2", s2.addr, pool="backup", pair="s1")]
    return [ServerSpec("s1", s1.addr), ServerSpec("s2", s2.addr)]


@pytest.fixture
async def cluster(
    upstream_pair: tuple[HeldServer, EchoServer],
    start_daemon: StartDaemon,
    write_config: WriteConfig,
) -> Cluster:
    return await start_cluster(start_daemon, write_config, specs_of(upstream_pair), upstream_pair)


async def fan_out(addr: tuple[str, int], count: int = FAN_OUT, target: str = "/") -> list[str]:
    """``count`` fresh connections at once, one request each: the upstream of each answer."""

    async def one() -> str:
        async with await H11Client.connect(addr) as client:
            response = await client.request("GET", target)
        assert response.status == 200, response
        return response.header("x-echo-server") or "?"

    return list(await asyncio.gather(*(one() for _ in range(count))))


def stamp_s(line: str) -> float:
    match = _STAMP_RE.match(line)
    assert match is not None, line
    when = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
    return when.timestamp()


# --- tests ---------------------------------------------------------------------------------------


def test_worker_count_defaults_to_the_usable_cores() -> None:
    listener = ListenerConfig("web", Address(LOOPBACK, 0), "app")
    config = Config("t.toml", (listener,), ())
    assert worker_count(config) == len(os.sched_getaffinity(0))
    assert worker_count(Config("t.toml", (listener,), (), workers=3)) == 3
    assert worker_count(Config("t.toml", (listener,), (), workers=3), override=1) == 1


async def test_two_workers_share_one_listener_and_one_scrape_sums_them(cluster: Cluster) -> None:
    since = len(cluster.daemon.lines)
    total = 0
    for _ in range(10):  # the kernel picks the accepting worker: fan out until both did
        total += len(await fan_out(cluster.addr))
        workers = await cluster.wait_access_lines(total, since)
        if set(workers) == set(range(WORKERS)):
            break
    assert set(workers) == set(range(WORKERS)), workers
    info = json.loads((await cluster.ctl("--json", "show", "info")).stdout)
    assert (info["pid"], info["workers"], info["client_connections"]) == (
        cluster.daemon.pid,
        WORKERS,
        0,
    )

    key = ("zdlb_listener_connections_total", (("listener", "web"),))
    for _ in range(100):  # workers report every 100 ms
        samples = await cluster.scrape()
        if samples.get(key) == total:
            break
        await asyncio.sleep(0.02)
    assert samples.get(key) == total
    requests = sum(
        samples[("zdlb_server_requests_total", (("backend", "app"), ("server", name)))]
        for name in ("s1", "s2")
    )
    assert requests == total


async def test_a_flip_reaches_both_workers_within_100_ms(
    upstream_pair: tuple[HeldServer, EchoServer],
    start_daemon: StartDaemon,
    write_config: WriteConfig,
) -> None:
    specs = specs_of(upstream_pair, paired=True)
    cluster = await start_cluster(start_daemon, write_config, specs, upstream_pair)
    assert set(await fan_out(cluster.addr)) == {"s1"}

    result = await cluster.ctl("flip", "app/s1")
    assert result.returncode == EXIT_OK, result

    changed = await cluster.daemon.wait_text("server_admin server=app/s1 old=ready new=maint")
    applied = [
        await cluster.wait_worker_line("worker_state_applied servers=app/s1", index)
        for index in range(WORKERS)
    ]
    # Log stamps have millisecond resolution: allow one more.
    for line in applied:
        assert stamp_s(line) - stamp_s(changed) <= PUSH_BOUND_S + 0.001, (changed, line)
    since = len(cluster.daemon.lines)
    assert set(await fan_out(cluster.addr)) == {"s2"}
    rows = json.loads((await cluster.ctl("--json", "show", "servers")).stdout)
    assert [(row["server"], row["admin"]) for row in rows] == [
        ("app/s1", "maint"),
        ("app/s2", "ready"),
    ]
    assert cluster.access_workers(since)


async def test_wait_idle_and_show_servers_count_every_workers_requests(
    cluster: Cluster, upstream_pair: tuple[HeldServer, EchoServer]
) -> None:
    held_server = upstream_pair[0]
    assert (await cluster.ctl("set", "server", "app/s2", "state", "maint")).returncode == EXIT_OK
    await cluster.daemon.wait_text("worker_state_applied servers=app/s2")
    held = FAN_OUT
    since = len(cluster.daemon.lines)
    async with asyncio.TaskGroup() as tasks:
        answers = tasks.create_task(fan_out(cluster.addr, held, HELD_TARGET))
        async with asyncio.timeout(LINE_TIMEOUT_S):
            await held_server.wait_requests(held)

        rows = json.loads((await cluster.ctl("--json", "show", "servers")).stdout)
        assert rows[0]["server"] == "app/s1"
        assert (rows[0]["inflight"], rows[0]["conns"]) == (held, held), rows
        busy = await cluster.ctl("wait", "app/s1", "idle", "0.3")
        assert busy.returncode == EXIT_FAILURE, busy
        assert busy.stderr.startswith(f"error: app/s1: timeout, inflight={held} "), busy
        assert not answers.done()

        held_server.release.set()
    assert set(answers.result()) == {"s1"}
    assert (await cluster.ctl("set", "server", "app/s1", "state", "drain")).returncode == EXIT_OK
    idle = await cluster.ctl("wait", "app/s1", "idle", "5")
    assert idle.returncode == EXIT_OK, idle
    assert idle.stdout == "app/s1: idle\n"
    assert len(cluster.access_workers(since)) == held


async def test_a_server_failing_on_live_traffic_goes_down_in_every_worker(
    bound_socket_factory: Callable[[], socket.socket],
    start_daemon: StartDaemon,
    write_config: WriteConfig,
) -> None:
    refused_sock, refused = refused_address()
    try:
        async with EchoServer(bound_socket_factory(), name="s2") as s2:
            specs = [ServerSpec("s1", refused), ServerSpec("s2", s2.addr)]
            cluster = await start_cluster(
                start_daemon, write_config, specs, [s2], backend_extra=PASSIVE_CHECK
            )
            # A request sent to s1 fails to connect and is redispatched to s2.
            assert set(await fan_out(cluster.addr)) == {"s2"}

            def is_masters_verdict(line: str) -> bool:
                return "server_health server=app/s1 old=up new=down" in line and (
                    "worker=" not in line
                )

            verdict = await cluster.daemon.wait_line(is_masters_verdict)
            assert "1 consecutive errors on live traffic" in verdict
            for index in range(WORKERS):  # it saw the error itself, or the master told it

                def knows(line: str, index: int = index) -> bool:
                    return line.endswith(f" worker={index}") and (
                        "worker_state_applied servers=app/s1" in line
                        or "server_health server=app/s1 old=up new=down" in line
                    )

                await cluster.daemon.wait_line(knows)
            rows = json.loads((await cluster.ctl("--json", "show", "servers")).stdout)
            assert [(row["server"], row["health"]) for row in rows] == [
                ("app/s1", "down"),
                ("app/s2", "up"),
            ]
    finally:
        refused_sock.close()


@dataclass
class LoadCounts:
    ok: int = 0
    resets: int = 0  # an established connection broke (the killed worker's)
    connects_failed: int = 0
    progress: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    async def reach(self, ok: int) -> None:
        async with asyncio.timeout(LINE_TIMEOUT_S):
            while self.ok < ok:
                self.progress.clear()
                await self.progress.wait()


async def keep_alive_load(addr: tuple[str, int], counts: LoadCounts, stop: asyncio.Event) -> None:
    """Requests one after another on a keep-alive connection; a broken one is counted and
    replaced."""
    while not stop.is_set():
        try:
            client = await H11Client.connect(addr)
        except OSError:
            counts.connects_failed += 1
            continue
        try:
            while not stop.is_set():
                response = await client.request("GET", "/load")
                assert response.status == 200, response
                counts.ok += 1
                counts.progress.set()
        except (ConnectionError, h11.RemoteProtocolError):
            counts.resets += 1
        finally:
            with contextlib.suppress(ConnectionError):
                await client.aclose()


async def test_a_worker_killed_under_load_comes_back_and_requests_keep_succeeding(
    cluster: Cluster,
) -> None:
    # A runtime change the restarted worker must get from the master: s2 takes nothing.
    assert (await cluster.ctl("set", "server", "app/s2", "state", "maint")).returncode == EXIT_OK
    for index in range(WORKERS):
        await cluster.wait_worker_line("worker_state_applied servers=app/s2", index)
    clients = 8
    counts = LoadCounts()
    stop = asyncio.Event()
    started = len(cluster.daemon.lines)
    async with asyncio.TaskGroup() as tasks:
        for _ in range(clients):
            tasks.create_task(keep_alive_load(cluster.addr, counts, stop))
        await counts.reach(200)
        # The busiest worker so far: it surely holds some of the clients' connections.
        served = cluster.access_workers(started)
        index = max(range(WORKERS), key=served.count)
        victim = cluster.worker_pids()[index]
        os.kill(victim, signal.SIGKILL)
        await cluster.daemon.wait_text(f"worker_exited worker={index} pid={victim} code=-9")
        before = counts.ok

        def is_restarted(line: str) -> bool:
            return f"worker_started worker={index} " in line and f"pid={victim}" not in line

        await cluster.daemon.wait_line(is_restarted, timeout_s=START_TIMEOUT_S)
        since = len(cluster.daemon.lines)
        await counts.reach(before + 200)
        stop.set()
    print(f"worker SIGKILL under load: {counts}")  # the issue asks for the count
    # Only connections the killed worker held can break: at most one per client.
    assert 0 < counts.resets <= clients, counts
    assert counts.connects_failed == 0, counts
    assert cluster.worker_pids()[index] != victim
    # The new worker serves with the state it was given: nothing to s2.
    for _ in range(10):
        await fan_out(cluster.addr)
        if index in cluster.access_workers(since):
            break
    restarted = [
        line
        for line in cluster.daemon.lines[since:]
        if "zdlb.access" in line and line.endswith(f" worker={index}")
    ]
    assert restarted, cluster.daemon.output
    assert all(" server=s1 " in line for line in restarted), restarted
    rows = json.loads((await cluster.ctl("--json", "show", "servers")).stdout)
    assert [(row["server"], row["admin"]) for row in rows] == [
        ("app/s1", "ready"),
        ("app/s2", "maint"),
    ]


async def test_sigterm_drains_every_worker_within_grace(
    cluster: Cluster, upstream_pair: tuple[HeldServer, EchoServer]
) -> None:
    held_server = upstream_pair[0]
    assert (await cluster.ctl("set", "server", "app/s2", "state", "maint")).returncode == EXIT_OK
    await cluster.daemon.wait_text("worker_state_applied servers=app/s2")
    async with asyncio.TaskGroup() as tasks:
        answers = tasks.create_task(fan_out(cluster.addr, 4, HELD_TARGET))
        async with asyncio.timeout(LINE_TIMEOUT_S):
            await held_server.wait_requests(4)
        cluster.daemon.send_signal(signal.SIGTERM)
        for index in range(WORKERS):
            await cluster.wait_worker_line("shutdown_started", index)
        held_server.release.set()
    assert answers.result() == ["s1"] * 4
    assert await cluster.daemon.wait_exit() == 0
    finished = [line for line in cluster.daemon.lines if "shutdown_finished aborted=0" in line]
    assert len(finished) == WORKERS, cluster.daemon.output
    assert "worker_exited" not in cluster.daemon.output


async def test_workers_exit_when_the_master_is_killed(cluster: Cluster) -> None:
    assert set(await fan_out(cluster.addr, 2)) <= {"s1", "s2"}
    cluster.daemon.send_signal(signal.SIGKILL)
    # The output pipe closes only once every worker (which shares it) has exited too.
    assert await cluster.daemon.wait_exit() == -signal.SIGKILL
    gone = [line for line in cluster.daemon.lines if "worker_master_gone" in line]
    assert len(gone) == WORKERS, cluster.daemon.output


async def test_new_connections_are_spread_over_the_workers(cluster: Cluster) -> None:
    """Each worker accepts on its own SO_REUSEPORT socket: a burst of fresh connections is
    split by the kernel's hash, where a shared accept queue let one worker take nearly all
    (50/0 and 48/2 of wrk's 50 measured). Binomial(60, 1/2) falls under 10 once in ~10^7."""
    since = len(cluster.daemon.lines)
    count = 60
    await fan_out(cluster.addr, count)
    workers = await cluster.wait_access_lines(count, since)
    per_worker = [workers.count(index) for index in range(WORKERS)]
    assert min(per_worker) >= 10, per_worker


async def test_a_second_daemon_on_the_same_port_fails_fast(
    cluster: Cluster, write_config: WriteConfig
) -> None:
    """SO_REUSEPORT would let a second zdlb share the port; the exclusive probe bind refuses
    it, as a single process's bind would."""
    host, port = cluster.addr
    servers = [ServerSpec("s1", (LOOPBACK, 9))]
    path = write_config(render_config(servers, bind=f"{host}:{port}"))
    result = await run_zdlb("run", "--workers", "2", "-c", str(path))
    assert result.returncode == EXIT_FAILURE, result
    assert f"cannot listen on {host}:{port}: Address already in use" in result.stderr
    assert len(await fan_out(cluster.addr)) == FAN_OUT  # the first one still serves


async def test_a_reload_changes_the_number_of_workers_without_failing_or_closing_anything(
    write_config: WriteConfig, echo_server: EchoServer
) -> None:
    """2 -> 3 -> 2 workers under keep-alive clients pausing 0-200 ms (resize.py): the third
    worker serves its share of new connections; retiring it hands its idle connections to the
    other two, so no request fails and no connection is closed."""
    specs = [ServerSpec("s1", echo_server.addr)]
    body = render_config(specs, access_log=True) + f'\n[control]\nsocket = "{SOCKET_NAME}"\n'
    config = write_config("workers = 2\n" + body)
    async with config_counted_daemon(config) as daemon:
        await resize_under_load(daemon, config, body)


@contextlib.asynccontextmanager
async def config_counted_daemon(config: Path) -> AsyncIterator[Daemon]:
    """``zdlb run`` whose worker count comes from its config (``start_daemon`` passes
    ``--workers``, which fixes it); stopped by SIGTERM at the end."""
    proc = await asyncio.create_subprocess_exec(
        *ZDLB_CMD,
        *("run", "-c", str(config)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    daemon = Daemon(proc)
    try:
        yield daemon
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == EXIT_OK


# Clients connecting one after another during a shrink, at once: some land on a retiring
# worker's socket in the moment it closes unless the BPF program steers them away (resize.py).
HAMMERS = 8


async def fresh_clients(addr: tuple[str, int], done: asyncio.Event) -> tuple[int, list[str]]:
    """One fresh connection and request after another until ``done``: (answered, failures)."""
    answered, failures = 0, []
    while not done.is_set():
        try:
            async with await H11Client.connect(addr) as client:
                response = await client.request()
            answered += response.status == 200
        except (OSError, TimeoutError, h11.RemoteProtocolError) as exc:
            failures.append(repr(exc))
    return answered, failures


def rewrite(config: Path, text: str) -> None:
    config.write_text(text, encoding="utf-8")


async def resize_under_load(daemon: Daemon, config: Path, body: str) -> None:
    addr = await daemon.listener_addr("web")
    cluster = Cluster(daemon, config, addr, ("127.0.0.1", 0))
    async with KeepAliveLoad(addr, clients=10) as load:
        await load.wait_requests(30)
        rewrite(config, "workers = 3\n" + body)
        grown = await cluster.ctl("reload")
        assert (grown.returncode, grown.stdout.strip()) == (0, "setting workers changed"), grown
        assert sorted(cluster.worker_pids()) == [0, 1, 2]
        assert json.loads((await cluster.ctl("json", "show", "info")).stdout)["workers"] == 3
        # A listener added now gets a socket for each of the three (runtime.workers followed).
        body += '\n[listeners.api]\nbind = "127.0.0.1:0"\nbackend = "app"\n'
        rewrite(config, "workers = 3\n" + body)
        added = await cluster.ctl("reload")
        assert (added.returncode, added.stdout.strip()) == (0, "listener api added"), added
        api = await daemon.listener_addr("api")
        since = len(daemon.lines)
        for _ in range(FAN_OUT * 2):  # all three workers serve it: 1 - (2/3)**24 likely
            async with await H11Client.connect(api) as client:
                assert (await client.request()).status == 200
        assert set(cluster.access_workers(since)) == {0, 1, 2}
        # Clients connecting now: the new worker takes its share of them (all of them on the
        # other two: a (2/3)**20 chance), so retiring it has connections to hand over.
        since = len(daemon.lines)
        async with KeepAliveLoad(addr, clients=20, seed=3) as later:
            await later.wait_requests(60)
            assert 2 in cluster.access_workers(since)
            rewrite(config, "workers = 2\n" + body)
            done = asyncio.Event()
            hammers = [asyncio.create_task(fresh_clients(addr, done)) for _ in range(HAMMERS)]
            shrunk = await cluster.ctl("reload")  # meanwhile, no fresh client may be reset
            done.set()
            results = await asyncio.gather(*hammers)
            answered = sum(count for count, _ in results)
            failures = [failure for _, failed in results for failure in failed]
            assert (shrunk.returncode, shrunk.stdout.strip()) == (0, "setting workers changed")
            assert failures == [] and answered > 0
            retired = await daemon.wait_text("workers_retiring workers=1")
            assert json.loads((await cluster.ctl("json", "show", "info")).stdout)["workers"] == 2
            since = len(daemon.lines)
            await later.wait_requests(60)
            late_record = await later.stop()
        await load.wait_requests(30)
        record = await load.stop()
    assert set(cluster.access_workers(since)) <= {0, 1}
    assert record.failed == [] and late_record.failed == []
    assert (record.closed, late_record.closed) == (0, 0)
    moved = int(retired.rsplit("connections_moved=", 1)[1].split()[0])
    assert moved > 0, daemon.output
    await daemon.wait_text("worker_retired worker=2")
    assert "Traceback" not in daemon.output
    errors = [line for line in daemon.lines if " ERROR " in line or " WARNING " in line]
    assert errors == [], errors
    print(
        f"workers 2 -> 3 -> 2: 0 failed, 0 closed; {moved} connections moved off worker 2; "
        f"{answered} fresh connections during the shrink, 0 failed"
    )


async def test_workers_fixed_on_the_command_line_are_not_changed_by_a_reload(
    start_daemon: StartDaemon, write_config: WriteConfig, echo_server: EchoServer
) -> None:
    specs = [ServerSpec("s1", echo_server.addr)]
    body = render_config(specs) + f'\n[control]\nsocket = "{SOCKET_NAME}"\n'
    config = write_config("workers = 2\n" + body)
    daemon = await start_daemon("run", "--workers", "2", "-c", str(config))
    await daemon.listener_addr("web")
    config.write_text("workers = 3\n" + body, encoding="utf-8")
    refused = await run_zdlb("ctl", "-c", str(config), "reload")
    assert refused.returncode == EXIT_FAILURE
    assert "workers: fixed at 2 by `zdlb run --workers`" in refused.stderr
    assert "worker_started worker=2" not in daemon.output
