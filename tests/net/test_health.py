"""Health checks on real loopback sockets: probes against the fixture servers, the scheduler's
transitions and log lines, passive observation, and a clean cancellation.

Intervals are tiny (20 ms, 10 ms while changing; 100 ms probe timeout) so a fall or a rise takes
a fraction of a second. Tests wait for transitions through the checker's ``on_transition`` hook
and for probes through the fixture servers' counters, always under ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.servers import (
    DribbleServer,
    EchoServer,
    GarbageServer,
    SilentServer,
)
from zdlb.balancer.server import Health, Server
from zdlb.config.model import Address, CheckConfig, CheckKind, ServerConfig
from zdlb.health import HealthChecker, ProbeResult, Transition, probe_target, run_probe

LOGGER = "zdlb.health.scheduler"
# Deadline of every awaited expectation; pytest-timeout's 60 s is only the backstop.
WAIT_S = 5.0
FAST_CHECK = CheckConfig(
    kind=CheckKind.HTTP,
    interval_s=0.02,
    fast_interval_s=0.01,
    timeout_s=0.1,
    rise=2,
    fall=3,
    path="/healthz",
)


def make_server(
    addr: tuple[str, int], check: CheckConfig | None = FAST_CHECK, name: str = "web1"
) -> Server:
    return Server(ServerConfig(name, Address(*addr), check=check), "app")


def tcp_check(**changes: Any) -> CheckConfig:
    return dataclasses.replace(FAST_CHECK, kind=CheckKind.TCP, **changes)


def http_check(**changes: Any) -> CheckConfig:
    return dataclasses.replace(FAST_CHECK, **changes)


class Transitions:
    """The checker's ``on_transition`` hook: records (server name, new health), wakes waiters.

    ``accepted_at`` snapshots ``probed.accepted`` at each transition, to count probes exactly.
    """

    def __init__(self, probed: SilentServer | EchoServer | None = None) -> None:
        self.seen: list[tuple[str, Health]] = []
        self.accepted_at: list[int] = []
        self.probed = probed
        self._changed = asyncio.Event()

    def __call__(self, server: Server, transition: Transition) -> None:
        assert server.health is transition.new  # applied before the hook runs
        self.seen.append((server.name, transition.new))
        if self.probed is not None:
            self.accepted_at.append(self.probed.accepted)
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.seen) < count:
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def running(checker: HealthChecker) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``checker.run()`` as a task for the block; cancel it and wait for its end after."""
    task = asyncio.create_task(checker.run())
    try:
        yield task
    finally:
        task.cancel()
        async with asyncio.timeout(WAIT_S):
            await asyncio.wait([task])
    assert task.cancelled()


def health_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == LOGGER and r.getMessage().startswith("server_health ")
    ]


def socket_fds() -> int:
    """Sockets this process holds open (Linux: /proc/self/fd)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


# --- probes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "target"),
    [
        pytest.param(CheckConfig(), Address("10.0.0.1", 80), id="no-override"),
        pytest.param(CheckConfig(port=8081), Address("10.0.0.1", 8081), id="port"),
        pytest.param(
            CheckConfig(address=Address("10.9.9.9", 9000)), Address("10.9.9.9", 9000), id="address"
        ),
    ],
)
def test_probe_target_applies_overrides(check: CheckConfig, target: Address) -> None:
    assert probe_target(Address("10.0.0.1", 80), check) == target


async def test_http_probe_sends_the_check_request_and_passes_on_200(
    echo_server: EchoServer,
) -> None:
    result = await run_probe(http_check(method="HEAD"), Address(*echo_server.addr), "web1.test")
    assert (result.passed, result.detail) == (True, "ok 200")
    assert 0.0 <= result.duration_s < FAST_CHECK.timeout_s
    [request] = echo_server.requests
    assert (request.method, request.target) == ("HEAD", "/healthz")
    assert request.header("host") == "web1.test"
    assert request.header("user-agent") == "zdlb-check"
    assert request.header("connection") == "close"


async def test_http_probe_host_header_from_check(echo_server: EchoServer) -> None:
    check = http_check(host="health.internal")
    assert (await run_probe(check, Address(*echo_server.addr), "web1.test")).passed
    assert echo_server.requests[0].header("host") == "health.internal"


async def test_tcp_probe_passes_on_accept_and_closes(echo_server: EchoServer) -> None:
    result = await run_probe(tcp_check(), Address(*echo_server.addr), "-")
    assert (result.passed, result.detail) == (True, "ok connected")
    async with asyncio.timeout(WAIT_S):
        await echo_server.wait_accepted(1)
    assert echo_server.requests == []


async def test_probe_of_refused_address_fails(refused_addr: tuple[str, int]) -> None:
    for check in (tcp_check(), http_check()):
        result = await run_probe(check, Address(*refused_addr), "-")
        assert (result.passed, result.detail) == (False, "connect refused")


async def test_probe_of_silent_server_times_out(silent_server: SilentServer) -> None:
    result = await run_probe(http_check(), Address(*silent_server.addr), "-")
    assert (result.passed, result.detail) == (False, "timeout after 0.1 s (response)")
    assert result.duration_s >= FAST_CHECK.timeout_s * 0.9  # loop clocks may round


@pytest.mark.parametrize(
    ("check", "detail"),
    [
        pytest.param(
            http_check(expect_status=((204, 204), (300, 399))),
            "status 200 not in 204,300-399",
            id="status",
        ),
        pytest.param(
            http_check(expect_body="no such text"), "body lacks 'no such text'", id="body"
        ),
        pytest.param(http_check(expect_body='"target": "/healthz"'), "ok 200", id="body-found"),
    ],
)
async def test_http_probe_judges_status_and_body(
    echo_server: EchoServer, check: CheckConfig, detail: str
) -> None:
    result = await run_probe(check, Address(*echo_server.addr), "web1.test")
    assert (result.passed, result.detail) == (detail.startswith("ok"), detail)


SERVICE_UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
BIG_BODY = b"x" * 100_000 + b"ready"
BIG_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(BIG_BODY), BIG_BODY)


@pytest.mark.parametrize(
    ("reply", "check", "detail"),
    [
        pytest.param(SERVICE_UNAVAILABLE, http_check(), "status 503 not in 200-399", id="503"),
        pytest.param(
            BIG_RESPONSE,
            http_check(expect_body="ready", timeout_s=WAIT_S),
            "body lacks 'ready' in 65536 bytes",
            id="body-search-bounded",
        ),
        pytest.param(b"", http_check(), "closed before a response", id="closed"),
    ],
)
async def test_http_probe_fails_on_bad_answers(
    bound_socket: socket.socket, reply: bytes, check: CheckConfig, detail: str
) -> None:
    async with GarbageServer(bound_socket, reply=reply) as server:
        result = await run_probe(check, Address(*server.addr), "-")
    assert (result.passed, result.detail) == (False, detail)


async def test_http_probe_fails_on_malformed_status_line(garbage_server: GarbageServer) -> None:
    result = await run_probe(http_check(), Address(*garbage_server.addr), "-")
    assert not result.passed
    assert result.detail.startswith("bad response: ")


async def test_body_match_split_across_reads(bound_socket: socket.socket) -> None:
    check = http_check(expect_body="and st", timeout_s=WAIT_S)
    async with DribbleServer(bound_socket, interval_s=0.0005) as server:
        result = await run_probe(check, Address(*server.addr), "-")
    assert (result.passed, result.detail) == (True, "ok 200")


# --- the scheduler -----------------------------------------------------------------------------


async def test_answering_server_stays_up(
    echo_server: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = make_server(echo_server.addr)
    transitions = Transitions()
    checker = HealthChecker([server], on_transition=transitions)
    async with running(checker):
        async with asyncio.timeout(WAIT_S):
            await echo_server.wait_requests(5)
        assert server.health is Health.UP
        verdict = checker.verdict(server)
        assert verdict is not None and not verdict.is_changing
        result = checker.last_result(server)
        assert isinstance(result, ProbeResult) and result.passed
    assert echo_server.requests[0].header("host") == f"127.0.0.1:{echo_server.port}"
    assert transitions.seen == []
    assert health_lines(caplog) == []


async def test_silent_server_goes_down_after_fall_probes(
    silent_server: SilentServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = make_server(silent_server.addr)
    transitions = Transitions(probed=silent_server)
    checker = HealthChecker([server], on_transition=transitions)
    async with running(checker):
        await transitions.wait_for(1)
        assert server.health is Health.DOWN
        async with asyncio.timeout(WAIT_S):  # a few more failed probes: no more lines
            await silent_server.wait_accepted(FAST_CHECK.fall + 3)
    assert transitions.seen == [("web1", Health.DOWN)]
    assert transitions.accepted_at == [FAST_CHECK.fall]
    assert health_lines(caplog) == [
        (
            logging.WARNING,
            "server_health server=app/web1 old=up new=down reason=timeout after 0.1 s (response)",
        )
    ]


async def test_refused_server_goes_down_once(
    refused_addr: tuple[str, int], echo_server: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    refused = make_server(refused_addr, tcp_check())
    # Checked at the same interval: its probe count shows time passing for the refused one.
    ticker = make_server(echo_server.addr, name="ticker")
    transitions = Transitions()
    checker = HealthChecker([refused, ticker], on_transition=transitions)
    async with running(checker):
        await transitions.wait_for(1)
        async with asyncio.timeout(WAIT_S):
            await echo_server.wait_requests(len(echo_server.requests) + 5)
        assert refused.health is Health.DOWN
        assert ticker.health is Health.UP
        last = checker.last_result(refused)
        assert last is not None and last.detail == "connect refused"
    assert transitions.seen == [("web1", Health.DOWN)]
    assert health_lines(caplog) == [
        (logging.WARNING, "server_health server=app/web1 old=up new=down reason=connect refused")
    ]


async def test_stopped_then_restarted_server_comes_back_after_rise(
    bound_socket: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    """The server process stops (nobody accepts: probes time out) and restarts on the same
    listening socket, which the test keeps open throughout so no other process can take it."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    first = await EchoServer(bound_socket.dup(), name="first").start()
    server = make_server(first.addr, http_check(rise=2, fall=2))
    transitions = Transitions()
    checker = HealthChecker([server], on_transition=transitions)
    async with running(checker):
        async with asyncio.timeout(WAIT_S):
            await first.wait_requests(2)
        await first.aclose()
        await transitions.wait_for(1)
        assert transitions.seen == [("web1", Health.DOWN)]
        async with EchoServer(bound_socket.dup(), name="second") as second:
            await transitions.wait_for(2)
            assert len(second.requests) >= 2  # rise passes (plus requests queued while down)
    assert transitions.seen == [("web1", Health.DOWN), ("web1", Health.UP)]
    assert [line for _, line in health_lines(caplog)] == [
        "server_health server=app/web1 old=up new=down reason=timeout after 0.1 s (response)",
        "server_health server=app/web1 old=down new=up reason=ok 200",
    ]
    assert [level for level, _ in health_lines(caplog)] == [logging.WARNING, logging.INFO]


async def test_refused_server_rises_once_it_listens() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound, not listening: refused, and the port stays ours
    server = make_server(sock.getsockname())
    transitions = Transitions()
    checker = HealthChecker([server], on_transition=transitions)
    try:
        async with running(checker):
            await transitions.wait_for(1)
            sock.listen()
            async with EchoServer(sock) as echo:
                await transitions.wait_for(2)
                assert len(echo.requests) == FAST_CHECK.rise
    finally:
        sock.close()
    assert transitions.seen == [("web1", Health.DOWN), ("web1", Health.UP)]


@pytest.mark.parametrize("override", ["port", "address"])
async def test_check_override_probes_the_other_endpoint(
    refused_addr: tuple[str, int], echo_server: EchoServer, override: str
) -> None:
    if override == "port":
        check = http_check(port=echo_server.port)
    else:
        check = http_check(address=Address(*echo_server.addr))
    server = make_server(refused_addr, check)  # its own address refuses
    transitions = Transitions()
    async with running(HealthChecker([server], on_transition=transitions)):
        async with asyncio.timeout(WAIT_S):
            await echo_server.wait_requests(FAST_CHECK.fall + 2)
    assert server.health is Health.UP
    assert transitions.seen == []
    # The Host header still names the server, not the probed endpoint.
    assert echo_server.requests[0].header("host") == f"127.0.0.1:{refused_addr[1]}"


async def test_observe_marks_down_at_once_then_checks_bring_it_back(
    echo_server: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = make_server(echo_server.addr, http_check(observe=True, observe_errors=3))
    transitions = Transitions()
    checker = HealthChecker([server], on_transition=transitions)
    for ok in (False, False, True, False, False):  # an ok resets the count
        checker.observe(server, ok)
    assert transitions.seen == []
    checker.observe(server, False)
    assert server.health is Health.DOWN
    assert transitions.seen == [("web1", Health.DOWN)]
    assert health_lines(caplog) == [
        (
            logging.WARNING,
            "server_health server=app/web1 old=up new=down"
            " reason=3 consecutive errors on live traffic",
        )
    ]
    async with running(checker):
        await transitions.wait_for(2)
    assert transitions.seen == [("web1", Health.DOWN), ("web1", Health.UP)]
    assert len(echo_server.requests) == FAST_CHECK.rise


async def test_observe_ignores_servers_without_observe_or_check(
    refused_addr: tuple[str, int],
) -> None:
    not_observed = make_server(refused_addr, http_check(observe_errors=1))
    unchecked = make_server(refused_addr, check=None, name="unchecked")
    checker = HealthChecker([not_observed, unchecked])
    for _ in range(5):
        checker.observe(not_observed, False)
        checker.observe(unchecked, False)
    assert not_observed.health is Health.UP
    assert unchecked.health is Health.UP
    assert checker.verdict(unchecked) is None
    assert checker.last_result(unchecked) is None
    assert checker.last_result(not_observed) is None  # not probed yet
    assert repr(checker) == "<HealthChecker servers=1 down=0>"


async def test_run_without_checked_servers_waits_for_cancel(
    refused_addr: tuple[str, int],
) -> None:
    checker = HealthChecker([make_server(refused_addr, check=None)])
    async with running(checker) as task:
        await asyncio.sleep(0)  # let it start: it must still be running, not return
        assert not task.done()


async def test_cancelling_run_leaves_no_task_and_no_socket(silent_server: SilentServer) -> None:
    # A long probe timeout: the cancel lands while a probe waits for its answer.
    server = make_server(silent_server.addr, http_check(timeout_s=WAIT_S * 2))
    before = socket_fds()
    async with running(HealthChecker([server])):
        async with asyncio.timeout(WAIT_S):
            await silent_server.wait_accepted(1)
        assert socket_fds() == before + 2  # the probe's socket and the accepted one
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("health ")] == []
    assert socket_fds() == before + silent_server.accepted  # only the server's side is left
    assert server.health is Health.UP
