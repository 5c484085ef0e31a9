"""``zdlb deploy`` across a fleet of three real zdlb processes and a real etcd (issue 16).

The demo hosts of tests/daemon/test_zdlb_deploy.py (front-1, front-2: a main vhost and its
pair each) stand behind three instances sharing one etcd prefix; keep-alive users with cookie
jars load all three while ``zdlb deploy`` runs on lb-1. The deploy's lock and record are etcd
keys, so lb-2 and lb-3 see every step, a second deploy on lb-3 is refused naming the holder,
and ``wait idle`` waits for every instance.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import ZDLB_CMD, StartDaemon
from tests.daemon.fleet_support import Instance, fleet_config, running_etcd, start_instance
from tests.daemon.test_zdlb_deploy import (
    DEPLOY_TIMEOUT_S,
    HOSTS,
    DeployRun,
    User,
    deploy_command,
    report,
)
from tests.servers import LOOPBACK, H11Client
from zdlb.cluster.local import LocalEtcd
from zdlb.daemon.demo_app import DemoVhost, DemoVhostServer, bind_demo_socket

pytestmark = pytest.mark.slow

USERS_PER_INSTANCE = 6
CHECK_AND_STICKY = """retries = 2
[backends.app.check]
kind = "http"
path = "/health"
interval_s = 0.2
fast_interval_s = 0.05
timeout_s = 0.5
rise = 2
fall = 2
[backends.app.sticky]
cookie = "SERVERID"
secret = "fleet-deploy-secret-0123456789"
"""


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[LocalEtcd]:
    with running_etcd(tmp_path / "etcd") as server:
        yield server


@pytest.fixture
async def vhosts() -> AsyncIterator[dict[str, DemoVhostServer]]:
    servers: dict[str, DemoVhostServer] = {}
    for host in HOSTS:
        for vhost, version in (("main", "v1"), ("backup", "v2")):
            sock = bind_demo_socket(LOOPBACK, 0)
            spec = DemoVhost(host, vhost, version, sock.getsockname()[1])
            servers[f"{host}/{vhost}"] = DemoVhostServer(spec, sock, min_stop_s=0.05)
            servers[f"{host}/{vhost}"].start()
    yield servers
    for server in servers.values():
        server.close()
    async with asyncio.timeout(5):
        await asyncio.gather(*(server.wait_closed() for server in servers.values()))


async def deploy(instance: Instance, *args: str) -> DeployRun:
    proc = await asyncio.create_subprocess_exec(
        *ZDLB_CMD, "deploy", "-c", str(instance.config), "app", "--json", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return DeployRun(proc)


async def resynced_after_outage(instance: Instance) -> None:
    lines = instance.daemon.lines
    outage = max(i for i, line in enumerate(lines) if "cluster_unavailable" in line)
    await instance.daemon.wait_line(
        lambda line: "cluster_resynced" in line and lines.index(line) > outage
    )


async def start_deploy_fleet(
    start_daemon: StartDaemon,
    etcd: LocalEtcd,
    tmp_path: Path,
    vhosts: dict[str, DemoVhostServer],
) -> list[Instance]:
    """Three instances in front of the demo hosts, every server up on each."""
    servers: list[tuple[str, str, str, str | None]] = []
    for host in HOSTS:
        main, backup = vhosts[f"{host}/main"].addr, vhosts[f"{host}/backup"].addr
        servers.append((host, f"{main[0]}:{main[1]}", "main", None))
        servers.append((f"{host}-backup", f"{backup[0]}:{backup[1]}", "backup", host))
    fleet = []
    for index in (1, 2, 3):
        text = fleet_config(
            name=f"lb-{index}",
            endpoints=[etcd.url],
            prefix="/test/deploy",
            state_dir=tmp_path,
            servers=servers,
            extra=CHECK_AND_STICKY,
        )
        fleet.append(await start_instance(start_daemon, text, tmp_path, f"lb-{index}"))
    for instance in fleet:
        for name, *_ in servers:
            assert (await instance.control(f"wait app/{name} up 10")).endswith("up")
    return fleet


# How long after a deploy's end every instance must serve the new version (test bound only).
CONVERGE_S = 5.0


async def test_a_rolling_deploy_across_three_instances_fails_no_request(
    start_daemon: StartDaemon,
    etcd: LocalEtcd,
    tmp_path: Path,
    vhosts: dict[str, DemoVhostServer],
) -> None:
    fleet = await start_deploy_fleet(start_daemon, etcd, tmp_path, vhosts)
    lb1, lb2, lb3 = fleet

    users = [User(i) for i in range(USERS_PER_INSTANCE * len(fleet))]
    done = asyncio.Event()

    async def run_deploy() -> DeployRun:
        run = await deploy(lb1, "--run", deploy_command("v3"), "--verify", "/health")
        # Every step is visible from the other instances, and the lock is the fleet's.
        await run.event(lambda e: e.get("event") == "step-started" and e.get("step") == "run")
        shown = json.loads(await lb3.control("json show deploy"))
        assert shown["status"] == "running", shown
        assert shown["current"] in HOSTS, shown
        second = await deploy(lb3, "--run", "true")
        assert await second.wait() != 0
        assert "deploy" in second.stderr and "pid" in second.stderr, second.stderr
        assert await run.wait() == 0, (run.stderr, run.events)
        return run

    async with asyncio.timeout(2 * DEPLOY_TIMEOUT_S), asyncio.TaskGroup() as tasks:
        for user in users:
            tasks.create_task(user.run(fleet[user.index % len(fleet)].addr, done))
        try:
            async with asyncio.timeout(DEPLOY_TIMEOUT_S):
                while not all(u.answers for u in users):  # every user pinned somewhere
                    assert [f for u in users for f in u.failures] == []
                    await asyncio.sleep(0.01)
            run = await run_deploy()
            # The last flip reached every instance's etcd watch; an instance the box starves
            # may apply it a little after the deploy's reply (which waits 1 s at most for it):
            # the users keep going until each got the new version, within a bound.
            async with asyncio.timeout(CONVERGE_S):
                while not all(u.answers[-1][1] == "v3" for u in users):
                    assert [f for u in users for f in u.failures] == []
                    await asyncio.sleep(0.01)
        finally:
            done.set()

    report("rolling deploy of 2 hosts through 3 instances", run)
    assert [f"user {u.index}: {f}" for u in users for f in u.failures] == []
    for user in users:  # every user stayed on its host, on whichever instance it came through
        assert {vhost.split("/")[0] for vhost, _, _ in user.answers} == {user.host}, user
        assert user.answers[-1][1] == "v3", user
    assert [h["status"] for h in run.summary["hosts"]] == ["done", "done"]
    for instance in (lb2, lb3):
        shown = json.loads(await instance.control("json show deploy"))
        assert shown["status"] == "done", shown
    for host in HOSTS:
        async with await H11Client.connect(vhosts[f"{host}/main"].addr) as client:
            assert (await client.request("GET", "/")).header("x-demo-server") == f"{host}/main/v3"


async def test_etcd_killed_mid_deploy_stops_it_clearly_and_resume_works_once_back(
    start_daemon: StartDaemon,
    etcd: LocalEtcd,
    tmp_path: Path,
    vhosts: dict[str, DemoVhostServer],
) -> None:
    fleet = await start_deploy_fleet(start_daemon, etcd, tmp_path, vhosts)
    lb1, lb2, lb3 = fleet
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    run = await deploy(lb1, "--run", f"read line < {gate}")
    await run.event(lambda e: e.get("event") == "step-started" and e.get("step") == "run")
    etcd.kill()
    for instance in fleet:
        await instance.daemon.wait_text("cluster_unavailable")
    answer = await lb2.control("set server app/front-2 state drain")
    assert answer.startswith("error: ") and "nothing changed" in answer, answer
    for instance in fleet:  # serving goes on, front-1's users on its pair
        for _ in range(3):
            async with await H11Client.connect(instance.addr) as client:
                assert (await client.request("GET", "/")).status == 200
    await asyncio.to_thread(gate.write_text, "go\n")  # the run step ends; the next is refused
    assert await run.wait() != 0
    assert "refused: not in step with the fleet's etcd" in run.stderr, (run.stderr, run.events)

    etcd.start()
    etcd.wait_ready()
    for instance in fleet:
        await resynced_after_outage(instance)
    shown = json.loads(await lb2.control("json show deploy"))
    assert shown["status"] == "running", shown  # its holder could not write its end
    # Its holder is gone: once its lease ran out, the deploy reads interrupted everywhere.
    await asyncio.sleep(max(0.0, shown["lease_until"] - time.time()) + 0.1)
    assert json.loads(await lb3.control("json show deploy"))["status"] == "interrupted"
    resumed = await deploy(lb2, "--resume", "--run", "true")
    assert await resumed.wait() == 0, (resumed.stderr, resumed.events)
    for instance in fleet:
        assert json.loads(await instance.control("json show deploy"))["status"] == "done"
        servers = await instance.servers()
        assert servers["app/front-1"]["admin"] == "ready", servers
