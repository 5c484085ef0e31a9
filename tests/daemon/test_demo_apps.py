"""``zdlb demo-app``, the app host of docker-compose.yml's containers, as a real process.

It binds the demo's fixed ports (front-1: 8081 main, 8091 backup; front-2: 8082, 8092), the
ones deploy/compose.toml sends traffic to, so each test that starts it is skipped when one of
its ports is taken. The process says where it listens in one ``demo.serving`` line per vhost;
the test waits for those lines, never sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import re
import signal
import socket

import pytest

from tests.daemon.conftest import START_TIMEOUT_S, StartDaemon
from tests.daemon.test_demo import EADDRINUSE_TEXT, parse_page, taken_ports
from tests.servers import LOOPBACK, H11Client
from zdlb.daemon.cli import main

# Every awaited expectation gets this deadline; the pytest-timeout backstop is far longer.
WAIT_S = 5.0
# What README, DEMO_HELP and deploy/compose.toml promise: (vhost, version, port) per host.
HOST_VHOSTS = {
    "front-1": [("main", "v1", 8081), ("backup", "v2", 8091)],
    "front-2": [("main", "v1", 8082), ("backup", "v2", 8092)],
}
_SERVING_RE = re.compile(
    r"demo\.serving vhost=(?P<host>[^/\s]+)/(?P<vhost>\S+) version=(?P<version>\S+) "
    r"addr=(?P<ip>[^\s:]+):(?P<port>\d+)"
)


@pytest.mark.parametrize("host", [*HOST_VHOSTS, None], ids=[*HOST_VHOSTS, "every-host"])
async def test_demo_app_serves_its_hosts_vhosts_and_stops_on_sigterm(
    host: str | None, start_daemon: StartDaemon
) -> None:
    hosts = list(HOST_VHOSTS) if host is None else [host]
    expected = {(h, vhost, version, port) for h in hosts for vhost, version, port in HOST_VHOSTS[h]}
    ports = sorted(port for *_, port in expected)
    if taken := taken_ports(ports):
        pytest.skip(f"zdlb demo-app needs 127.0.0.1 ports {ports}; in use now: {taken}")
    args = ["demo-app", "--bind", LOOPBACK] + ([] if host is None else ["--host", host])
    daemon = await start_daemon(*args)

    serving = []
    for _ in expected:
        line = await daemon.wait_line(
            lambda text: (
                (_SERVING_RE.search(text) is not None and text not in serving)
                or "startup_failed" in text
            ),
            timeout_s=START_TIMEOUT_S,
        )
        if "startup_failed" in line and EADDRINUSE_TEXT in line:
            pytest.skip(f"a demo port was taken between the check and the start: {line}")
        serving.append(line)
    found = [m for line in serving if (m := _SERVING_RE.search(line)) is not None]
    assert {m["ip"] for m in found} == {LOOPBACK}
    assert {(m["host"], m["vhost"], m["version"], int(m["port"])) for m in found} == expected

    for h, vhost, version, port in sorted(expected):
        async with await H11Client.connect((LOOPBACK, port)) as client:
            async with asyncio.timeout(WAIT_S):
                page = await client.request("GET", "/")
                health = await client.request("GET", "/health")
        assert page.status == 200, page
        assert page.header("x-demo-server") == f"{h}/{vhost}/{version}"
        assert {k: v for k, v in parse_page(page.body).items() if k != "x-forwarded-for"} == {
            "host": h,
            "vhost": vhost,
            "version": version,
            "method": "GET",
            "body-bytes": "0",
        }
        assert (health.status, health.body) == (200, b"ok\n")

    daemon.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert f"demo.stopping vhosts={len(expected)}" in daemon.output
    assert "Traceback" not in daemon.output
    assert taken_ports(ports) == [], "demo-app left a port bound after exiting"


async def test_demo_app_on_a_busy_port_exits_1_with_one_clear_line(
    start_daemon: StartDaemon,
) -> None:
    main_port = HOST_VHOSTS["front-1"][0][2]
    with contextlib.ExitStack() as stack:
        squatter = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        # SO_REUSEADDR: bind despite the TIME_WAIT connections an earlier test left. A bind that
        # fails even so means another socket listens there: the port is busy all the same.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            squatter.bind((LOOPBACK, main_port))
            squatter.listen(1)
        daemon = await start_daemon("demo-app", "--host", "front-1", "--bind", LOOPBACK)
        assert await daemon.wait_exit(timeout_s=START_TIMEOUT_S) == 1
    assert f"startup_failed error=[Errno {errno.EADDRINUSE}]" in daemon.output
    assert f"demo server cannot listen on {LOOPBACK}:{main_port}" in daemon.output
    assert "demo.serving" not in daemon.output
    assert "Traceback" not in daemon.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--host", "front-3"], "argument --host: invalid choice: 'front-3'"),
        (["--bind", "localhost"], "argument --bind: 'localhost' is not an IPv4 or IPv6 address"),
        (["-c", "config.toml"], "unrecognized arguments: -c config.toml"),
    ],
    ids=["unknown-host", "bind-name", "no-config"],
)
def test_demo_app_usage_errors_exit_2(args: list[str], fragment: str) -> None:
    err = io.StringIO()
    with pytest.raises(SystemExit) as exc_info, contextlib.redirect_stderr(err):
        main(["demo-app", *args])
    assert exc_info.value.code == 2
    assert "usage: zdlb" in err.getvalue()
    assert fragment in err.getvalue()
