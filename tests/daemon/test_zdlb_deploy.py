"""The proof of issue 12: ``zdlb deploy`` under load, against the real daemon and demo apps.

``zdlb run`` balances two demo hosts (front-1, front-2: a main vhost and its pair each), served
by ``DemoVhostServer``s in the test's loop. Twenty keep-alive clients, each with its own cookie
jar, record every answer (status, vhost, version, seconds) while the real ``zdlb deploy`` runs
as a subprocess whose ``--run`` deploys through the demo's ``POST /demo/deploy``. Every wait is
bounded; nothing sleeps to "let it start".
"""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest

from tests.daemon.conftest import (
    HELD_TARGET,
    ZDLB_CMD,
    Daemon,
    HeldServer,
    ServerSpec,
    StartDaemon,
    render_config,
)
from tests.daemon.test_control import EXIT_OK, run_zdlb
from tests.servers import LOOPBACK, EchoServer, H11Client
from zdlb.daemon.demo_app import DemoVhost, DemoVhostServer, bind_demo_socket
from zdlb.deploy.record import DEPLOY_LEASE_S

WriteConfig = Callable[[str], Path]

HOSTS = ("front-1", "front-2")
CLIENTS = 20
TAIL_REQUESTS = 10  # each client's requests after the deploy ended: the load stops by itself
SLOW_S = 1.0  # the bound: no request slower than this
DEPLOY_TIMEOUT_S = 60.0  # one zdlb deploy run, start to exit
STOP_S = 0.3  # how long a deployed demo vhost refuses connections
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

CONFIG = """
[defaults.timeouts]
grace_s = 2

[logging]
access_log = false

[control]
socket = "ctl.sock"
state_file = "zdlb.state"

[metrics]
listen = "127.0.0.1:0"

[listeners.web]
bind = "127.0.0.1:0"
backend = "app"

[backends.app]
retries = 2

[backends.app.check]
kind = "http"
path = "/health"
interval_s = 0.2
fast_interval_s = 0.05
timeout_s = 0.5
rise = 2
fall = 2
observe = true
observe_errors = 2

[backends.app.sticky]
cookie = "SERVERID"
secret = "deploy-test-secret-0123456789"
"""


def deploy_command(version: str, broken_host: str | None = None, broken: str = "health") -> str:
    """A --run COMMAND: ``zdlb demo-deploy "$ZDLB_ADDRESS" VERSION`` (the demo's POST
    /demo/deploy), coming back ``broken`` on ``broken_host`` only."""
    zdlb = shlex.join(ZDLB_CMD)
    command = f'{zdlb} demo-deploy "$ZDLB_ADDRESS" {version} --seconds {STOP_S} --broken "$b"'
    return f'b=no; if [ "$ZDLB_MAIN" = {broken_host or "-"} ]; then b={broken}; fi; {command}'


@dataclass
class User:
    """One keep-alive client with a cookie jar; every answer it got, as (vhost, version, s)."""

    index: int
    cookie: str | None = None
    answers: list[tuple[str, str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.answers[0][0].split("/")[0] if self.answers else "?"

    async def run(self, addr: tuple[str, int], done: asyncio.Event) -> None:
        tail = 0
        async with await H11Client.connect(addr) as conn:
            while tail < TAIL_REQUESTS and not self.failures:
                tail += done.is_set()
                await self.one(conn)

    async def one(self, conn: H11Client) -> None:
        headers = [("cookie", self.cookie)] if self.cookie else []
        started = time.monotonic()
        try:
            response = await conn.request("GET", f"/?u={self.index}", headers)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            self.failures.append(repr(exc))
            return
        seconds = time.monotonic() - started
        host, vhost, version = (response.header("x-demo-server") or "?/?/?").split("/")
        self.answers.append((f"{host}/{vhost}", version, seconds))
        if response.status != 200:
            self.failures.append(f"{response.status} from {host}/{vhost}/{version}")
        if set_cookie := response.header("set-cookie"):
            self.cookie = set_cookie.split(";")[0]
        if not conn.is_reusable:
            self.failures.append("zdlb closed a keep-alive connection")


@dataclass
class DeployRun:
    """A running ``zdlb deploy --json``: its events as they come, and its end."""

    proc: asyncio.subprocess.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""

    async def event(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event for which ``predicate`` holds (read from stdout as it comes)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(DEPLOY_TIMEOUT_S):
            for event in self.events:
                if predicate(event):
                    return event
            while line := await self.proc.stdout.readline():
                self.events.append(json.loads(line))
                if predicate(self.events[-1]):
                    return self.events[-1]
        pytest.fail(f"zdlb deploy ended without such an event: {self.events}")

    async def wait(self) -> int:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        try:
            async with asyncio.timeout(DEPLOY_TIMEOUT_S):
                out, err = await self.proc.communicate()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            pytest.fail(f"zdlb deploy still running after {DEPLOY_TIMEOUT_S} s: {self.events}")
        self.events += [json.loads(line) for line in out.decode().splitlines()]
        self.stderr = err.decode()
        assert self.proc.returncode is not None
        return self.proc.returncode

    @property
    def summary(self) -> dict[str, Any]:
        return next(e for e in self.events if e["event"] == "summary")


@dataclass
class Site:
    """The daemon, its config, the demo vhosts by "host/vhost", and the users."""

    config: Path
    addr: tuple[str, int]
    vhosts: dict[str, DemoVhostServer]
    daemon: Daemon
    start_daemon: StartDaemon
    workers: int = 1
    users: list[User] = field(default_factory=list)

    async def restart_daemon(self) -> None:
        """Stop the daemon (SIGTERM) and start it again on the same config and state file."""
        self.daemon.send_signal(signal.SIGTERM)
        assert await self.daemon.wait_exit() == 0
        self.daemon = await self.start_daemon(
            "run", "--workers", str(self.workers), "-c", str(self.config)
        )
        self.addr = await self.daemon.listener_addr()
        await self.daemon.wait_text("control_started")

    async def deploy(self, *args: str, servers: tuple[str, ...] = ()) -> DeployRun:
        """``zdlb deploy -c CONFIG app [SERVER...] --json ARGS``, started."""
        proc = await asyncio.create_subprocess_exec(
            *ZDLB_CMD,
            "deploy",
            "-c",
            str(self.config),
            "app",
            *servers,
            "--json",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return DeployRun(proc)

    async def ctl_json(self, *words: str) -> Any:
        result = await run_zdlb("ctl", "-c", str(self.config), "--json", *words)
        assert result.returncode == EXIT_OK, result
        return json.loads(result.stdout)

    async def servers(self) -> dict[str, dict[str, Any]]:
        rows = await self.ctl_json("show", "servers")
        return {row["server"].split("/")[1]: row for row in rows}

    async def under_load(self, script: Callable[[], Any]) -> Any:
        """Run ``script()`` while every user sends requests; the users' tail follows."""
        self.users = [User(index) for index in range(CLIENTS)]
        done = asyncio.Event()
        async with asyncio.timeout(2 * DEPLOY_TIMEOUT_S), asyncio.TaskGroup() as tasks:
            for user in self.users:
                tasks.create_task(user.run(self.addr, done))
            try:
                await self.until(lambda: all(u.answers for u in self.users))
                return await script()
            finally:
                done.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEPLOY_TIMEOUT_S):
            while not predicate():
                assert [f for u in self.users for f in u.failures] == []
                await asyncio.sleep(0.01)

    def assert_no_failure_nor_slow_request_and_users_kept(self) -> None:
        assert [f"user {u.index}: {f}" for u in self.users for f in u.failures] == []
        slow = [(u.index, a) for u in self.users for a in u.answers if a[2] > SLOW_S]
        assert slow == []
        assert Counter(u.host for u in self.users).keys() == set(HOSTS)
        for user in self.users:
            assert {vhost.split("/")[0] for vhost, _, _ in user.answers} == {user.host}, user

    async def metrics(self) -> str:
        line = await self.daemon.wait_text("metrics_started")
        host, port = line.rsplit("addr=", 1)[1].rsplit(":", 1)
        async with await H11Client.connect((host, int(port))) as client:
            return (await client.request("GET", "/metrics")).body.decode()

    async def version_of(self, vhost: str) -> str:
        async with await H11Client.connect(self.vhosts[vhost].addr) as client:
            return (await client.request("GET", "/")).header("x-demo-server") or ""


@pytest.fixture
async def site(
    start_daemon: StartDaemon, write_config: WriteConfig, request: pytest.FixtureRequest
) -> AsyncIterator[Site]:
    """The site; ``indirect`` parametrization gives the daemon's worker count (default 1)."""
    workers = getattr(request, "param", 1)
    vhosts: dict[str, DemoVhostServer] = {}
    text = CONFIG
    for host in HOSTS:
        for vhost, version in (("main", "v1"), ("backup", "v2")):
            sock = bind_demo_socket(LOOPBACK, 0)
            spec = DemoVhost(host, vhost, version, sock.getsockname()[1])
            server = DemoVhostServer(spec, sock, min_stop_s=0.05)
            server.start()
            vhosts[f"{host}/{vhost}"] = server
            name = host if vhost == "main" else f"{host}-backup"
            text += f'\n[[backends.app.servers]]\nname = "{name}"\n'
            text += f'address = "{LOOPBACK}:{spec.port}"\n'
            if vhost == "backup":
                text += f'pool = "backup"\npair = "{host}"\n'
    config = write_config(text)
    try:
        daemon = await start_daemon("run", "--workers", str(workers), "-c", str(config))
        addr = await daemon.listener_addr()
        site = Site(config, addr, vhosts, daemon, start_daemon, workers)
        await daemon.wait_text("control_started")
        names = [name for host in HOSTS for name in (host, f"{host}-backup")]
        # Every server passed its checks (`wait ... up` is part of what is tested here too).
        await asyncio.gather(*(site.ctl_json("wait", f"app/{n}", "up", "10") for n in names))
        yield site
    finally:
        for server in vhosts.values():
            server.close()
        async with asyncio.timeout(5):
            await asyncio.gather(*(server.wait_closed() for server in vhosts.values()))


def report(title: str, run: DeployRun) -> None:
    """Print the wall time per host and per step (pytest -s shows it; the report quotes it)."""
    print(f"\n{title}")
    for host in run.summary["hosts"]:
        steps = " ".join(f"{k}={v:.2f}" for k, v in host["steps_s"].items())
        print(f"  {host['host']}: {host['status']} in {host['elapsed_s']:.2f} s ({steps})")


@pytest.mark.parametrize("site", [1, 2], indirect=True, ids=["1-process", "2-workers"])
async def test_a_rolling_deploy_under_load_fails_no_request_and_leaves_every_main_new(
    site: Site,
) -> None:
    async def deploy() -> DeployRun:
        run = await site.deploy("--run", deploy_command("v3"), "--verify", "/health")
        assert await run.wait() == EXIT_OK, (run.stderr, run.events)
        return run

    run = await site.under_load(deploy)
    site.assert_no_failure_nor_slow_request_and_users_kept()
    report(f"rolling deploy of 2 hosts ({site.workers} worker process(es))", run)
    assert [h["status"] for h in run.summary["hosts"]] == ["done", "done"]
    for host in HOSTS:
        assert await site.version_of(f"{host}/main") == f"{host}/main/v3"
        users = [u for u in site.users if u.host == host]
        # The host's users met its pair (v2) during the deploy, and its new main (v3) after it.
        assert all(u.answers[-1][1] == "v3" for u in users), host
        assert any(version == "v2" for u in users for _, version, _ in u.answers), host
    servers = await site.servers()
    assert all(servers[h]["admin"] == "ready" for h in HOSTS)
    shown = await site.ctl_json("show", "deploy")
    assert shown["status"] == "done" and [h["status"] for h in shown["hosts"]] == ["done"] * 2
    metrics = await site.metrics()
    assert 'zdlb_deploy_status{backend="app",status="done"} 1.0' in metrics
    assert 'zdlb_deploy_hosts{backend="app",status="done"} 2.0' in metrics
    steps = [e["step"] for e in run.events if e["event"] == "step-done" and e["host"] == "front-1"]
    assert steps == [
        "check",
        "flip",
        "wait-idle",
        "run",
        "wait-up",
        "verify",
        "flip-back",
        "confirm",
    ]


async def test_a_host_back_broken_stays_on_its_pair_and_a_resume_after_the_fix_completes(
    site: Site,
) -> None:
    async def deploy() -> DeployRun:
        run = await site.deploy(
            "--run", deploy_command("v3", broken_host="front-2"), "--up-timeout", "3"
        )
        assert await run.wait() == EXIT_FAILED, (run.stderr, run.events)
        return run

    run = await site.under_load(deploy)
    site.assert_no_failure_nor_slow_request_and_users_kept()
    report("deploy whose second host comes back failing its checks", run)
    assert "front-2 failed at step wait-up: timeout" in run.stderr
    assert [h["status"] for h in run.summary["hosts"]] == ["done", "failed"]
    served = {(vhost, version) for u in site.users for vhost, version, _ in u.answers}
    assert ("front-2/main", "v3") not in served  # no user ever saw the broken version
    servers = await site.servers()
    assert (servers["front-2"]["admin"], servers["front-2-backup"]["admin"]) == ("maint", "ready")
    assert servers["front-1"]["admin"] == "ready"
    shown = await site.ctl_json("show", "deploy")
    assert shown["status"] == "failed" and shown["current"] == "front-2"
    # A new deploy is refused until the failed one is resumed or rolled back.
    refused = await site.deploy("--run", deploy_command("v4"))
    assert await refused.wait() == EXIT_FAILED
    assert "resume it (zdlb deploy --resume)" in refused.stderr

    async def resume() -> DeployRun:
        run = await site.deploy("--run", deploy_command("v4"), "--resume", "--verify", "/")
        assert await run.wait() == EXIT_OK, (run.stderr, run.events)
        return run

    resumed = await site.under_load(resume)
    site.assert_no_failure_nor_slow_request_and_users_kept()
    report("resume after the fix", resumed)
    assert [h["status"] for h in resumed.summary["hosts"]] == ["done", "done"]
    assert await site.version_of("front-2/main") == "front-2/main/v4"
    assert await site.version_of("front-1/main") == "front-1/main/v3"  # done hosts stay done
    assert (await site.ctl_json("show", "deploy"))["status"] == "done"


async def test_an_interrupted_deploy_under_load_is_shown_then_resumed_or_rolled_back(
    site: Site,
) -> None:
    await site.under_load(lambda: interrupt_resume_and_roll_back(site))
    site.assert_no_failure_nor_slow_request_and_users_kept()


async def interrupt_resume_and_roll_back(site: Site) -> None:
    slow = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)'"
    run = await site.deploy("--run", slow)
    await run.event(lambda e: e["event"] == "step-started" and e["step"] == "run")
    run.proc.send_signal(signal.SIGINT)
    assert await run.wait() == EXIT_INTERRUPTED
    shown = await site.ctl_json("show", "deploy")
    assert shown["status"] == "interrupted"
    assert (shown["current"], shown["hosts"][0]["step"]) == ("front-1", "run")
    assert (await site.servers())["front-1"]["admin"] == "maint"  # its users stay on the pair
    text = await run_zdlb("ctl", "-c", str(site.config), "show", "deploy")
    assert "deploy of app to main: interrupted" in text.stdout

    resumed = await site.deploy("--run", deploy_command("v3"), "--resume")
    assert await resumed.wait() == EXIT_OK, resumed.stderr
    report("resume of a deploy interrupted in its run step", resumed)
    assert await site.version_of("front-1/main") == "front-1/main/v3"
    assert (await site.ctl_json("show", "deploy"))["status"] == "done"

    # Interrupted again on its second host, after front-1 was done: a roll-back puts both
    # hosts' users on their pairs (the version before this deploy).
    slow_second = f'if [ "$ZDLB_MAIN" = front-2 ]; then {slow}; else {deploy_command("v4")}; fi'
    run = await site.deploy("--run", slow_second)
    await run.event(lambda e: e["event"] == "step-started" and e.get("host") == "front-2"
                    and e["step"] == "run")  # fmt: skip
    run.proc.send_signal(signal.SIGINT)
    assert await run.wait() == EXIT_INTERRUPTED
    rolled = await site.deploy("--rollback")
    assert await rolled.wait() == EXIT_OK, rolled.stderr
    servers = await site.servers()
    assert [servers[h]["admin"] for h in HOSTS] == ["maint", "maint"]
    assert [servers[f"{h}-backup"]["admin"] for h in HOSTS] == ["ready", "ready"]
    shown = await site.ctl_json("show", "deploy")
    assert shown["status"] == "rolled-back"
    assert [h["status"] for h in shown["hosts"]] == ["rolled-back", "rolled-back"]


async def test_a_second_deploy_while_one_runs_is_refused_naming_the_holder(site: Site) -> None:
    slow = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)'"
    first = await site.deploy("--run", slow)
    await first.event(lambda e: e["event"] == "step-started" and e["step"] == "run")
    second = await site.deploy("--run", deploy_command("v3"))
    assert await second.wait() == EXIT_FAILED
    assert (
        f"a deploy of app is in progress (host front-1, step run), held by pid {first.proc.pid}"
        in second.stderr
    )
    rollback = await site.deploy("--rollback")
    assert await rollback.wait() == EXIT_FAILED  # nor can anyone take it over while it runs
    first.proc.send_signal(signal.SIGINT)
    assert await first.wait() == EXIT_INTERRUPTED


async def test_a_deploy_interrupted_then_a_daemon_restart_is_still_shown_and_resumed(
    site: Site,
) -> None:
    slow = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)'"
    run = await site.deploy("--run", slow)
    await run.event(lambda e: e["event"] == "step-started" and e["step"] == "run")
    run.proc.send_signal(signal.SIGINT)
    assert await run.wait() == EXIT_INTERRUPTED
    await site.restart_daemon()
    shown = await site.ctl_json("show", "deploy")  # read back from the state file
    assert (shown["status"], shown["current"], shown["hosts"][0]["step"]) == (
        "interrupted",
        "front-1",
        "run",
    )
    assert (await site.servers())["front-1"]["admin"] == "maint"  # the journal kept the flip
    resumed = await site.deploy("--run", deploy_command("v3"), "--resume")
    assert await resumed.wait() == EXIT_OK, resumed.stderr
    assert (await site.ctl_json("show", "deploy"))["status"] == "done"


async def test_flip_wait_waits_for_a_main_that_is_down_to_pass_its_checks(site: Site) -> None:
    config = str(site.config)
    assert (await run_zdlb("ctl", "-c", config, "flip", "app/front-1")).returncode == EXIT_OK
    main = site.vhosts["front-1/main"]
    main.stop(1.0)  # the deploy's restart: refused for 1 s
    assert (await site.ctl_json("wait", "app/front-1", "idle", "5"))["idle"] is True
    await site.daemon.wait_text("server_health server=app/front-1 old=up new=down", timeout_s=10)
    refused = await run_zdlb("ctl", "-c", config, "flip", "app/front-1")
    assert refused.returncode == EXIT_FAILED
    assert "front-1 fails its checks; flipping back needs 'force'" in refused.stderr
    began = time.monotonic()
    flipped = await run_zdlb("ctl", "-c", config, "flip", "app/front-1", "wait", "10")
    assert flipped.returncode == EXIT_OK, flipped
    assert flipped.stdout.endswith("app/front-1 serves front-1\n")
    assert main.state.value == "serving" and time.monotonic() - began < 10
    assert (await site.servers())["front-1"]["admin"] == "ready"


async def test_a_deploy_to_backup_that_fails_verify_leaves_the_main_serving_and_runs_on_failure(
    site: Site, tmp_path: Path
) -> None:
    record = tmp_path / "on-failure.txt"
    on_failure = f'echo "$ZDLB_SERVER $ZDLB_FAILED_STEP $ZDLB_REASON" > {shlex.quote(str(record))}'

    async def deploy() -> DeployRun:
        run = await site.deploy(
            "--to",
            "backup",
            "--run",
            deploy_command("v3", broken_host="front-1", broken="500"),
            "--verify",
            "/",
            "--on-failure",
            on_failure,
            servers=("front-1",),
        )
        assert await run.wait() == EXIT_FAILED, (run.stderr, run.events)
        return run

    run = await site.under_load(deploy)
    site.assert_no_failure_nor_slow_request_and_users_kept()
    assert "front-1 failed at step verify: GET http://" in run.stderr
    assert "answered 500" in run.stderr
    assert [h["host"] for h in run.summary["hosts"]] == ["front-1"]  # only the host named
    written = await asyncio.to_thread(record.read_text)
    assert written.startswith("front-1-backup verify GET http://")
    servers = await site.servers()
    assert (servers["front-1"]["admin"], servers["front-1-backup"]["admin"]) == ("ready", "ready")
    assert await site.version_of("front-1/backup") == "front-1/backup/v3"
    assert all(version != "v3" for u in site.users for _, version, _ in u.answers)


async def test_a_main_that_never_goes_idle_gets_its_traffic_back_and_the_deploy_stops(
    bound_socket_factory: Callable[[], socket.socket],
    start_daemon: StartDaemon,
    write_config: WriteConfig,
    tmp_path: Path,
) -> None:
    """A request held in flight on the main past --idle-timeout: abort, flip back, exit 1,
    and COMMAND never ran."""
    async with (
        HeldServer(bound_socket_factory(), name="s1") as main,
        EchoServer(bound_socket_factory(), name="s1-backup") as pair,
    ):
        specs = [
            ServerSpec("s1", main.addr),
            ServerSpec("s1-backup", pair.addr, pool="backup", pair="s1"),
        ]
        text = render_config(specs, access_log=False) + '\n[control]\nsocket = "ctl.sock"\n'
        config = write_config(text)
        daemon = await start_daemon("run", "-c", str(config))
        addr = await daemon.listener_addr()
        await daemon.wait_text("control_started")
        ran = tmp_path / "ran"
        async with await H11Client.connect(addr) as client, asyncio.TaskGroup() as tasks:
            held = tasks.create_task(client.request("GET", HELD_TARGET))
            async with asyncio.timeout(DEPLOY_TIMEOUT_S):
                await main.wait_requests(1)
            site = Site(config, addr, {}, daemon, start_daemon)
            run = await site.deploy(
                "--run", f"touch {shlex.quote(str(ran))}", "--idle-timeout", "0.5"
            )
            assert await run.wait() == EXIT_FAILED
            assert "s1 failed at step wait-idle: timeout (conns=1, idle=False, inflight=1" in (
                run.stderr
            )
            assert not held.done()
            main.release.set()
            assert (await held).status == 200
        servers = await site.servers()
        assert (servers["s1"]["admin"], servers["s1-backup"]["admin"]) == ("ready", "ready")
        assert not await asyncio.to_thread(ran.exists)
        notes = [e["text"] for e in run.events if e["event"] == "note"]
        assert notes == [
            "s1 has no health check: only --verify could catch a bad version",
            "s1 serves",  # the abort: the main takes its users back
        ]


async def test_a_crashed_deploy_reads_interrupted_once_its_lease_ran_out(site: Site) -> None:
    """SIGKILL: nobody says goodbye. The lock holds until the lease (15 s) runs out, then the
    deploy reads as interrupted and can be rolled back."""
    sleeper = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep({DEPLOY_LEASE_S + 5})'"
    run = await site.deploy("--run", sleeper)
    await run.event(lambda e: e["event"] == "step-started" and e["step"] == "run")
    run.proc.kill()
    await run.proc.wait()
    shown = await site.ctl_json("show", "deploy")
    assert (shown["status"], shown["holder_pid"]) == ("running", run.proc.pid)
    assert shown["lease_until"] - time.time() <= DEPLOY_LEASE_S
    await asyncio.sleep(max(0.0, shown["lease_until"] - time.time()))  # a deadline, not a guess
    shown = await site.ctl_json("show", "deploy")
    assert (shown["status"], shown["current"]) == ("interrupted", "front-1")
    rolled = await site.deploy("--rollback")
    assert await rolled.wait() == EXIT_OK, rolled.stderr
    assert (await site.servers())["front-1"]["admin"] == "maint"  # on its pair, as before


async def test_a_deploy_goes_on_across_a_daemon_restart_during_its_run_step(
    site: Site, tmp_path: Path
) -> None:
    """The journal keeps the lock (token and lease): the restarted daemon knows its holder."""
    flag = shlex.quote(str(tmp_path / "restarted"))
    command = f"while [ ! -e {flag} ]; do sleep 0.05; done; {deploy_command('v3')}"
    run = await site.deploy("--run", command, servers=("front-1",))
    await run.event(lambda e: e["event"] == "step-started" and e["step"] == "run")
    await site.restart_daemon()
    await asyncio.to_thread((tmp_path / "restarted").touch)
    assert await run.wait() == EXIT_OK, run.stderr
    assert await site.version_of("front-1/main") == "front-1/main/v3"
    shown = await site.ctl_json("show", "deploy")
    assert (shown["status"], shown["holder_pid"]) == ("done", run.proc.pid)
