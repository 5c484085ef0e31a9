"""The /metrics listener on real loopback sockets: scrapes, wrong paths and methods, garbage,
oversized and slow requests, too many clients, a failing collector, bind errors and close.

Well-formed requests go through ``H11Client`` (h11 is the oracle for the answers); hostile ones
are raw bytes on a stream. The endpoint is started on the fixture's pre-bound socket, so it
serves as soon as ``start()`` returns: nothing waits for readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from tests.servers import LOOPBACK, H11Client
from zdlb.config.model import Address
from zdlb.errors import ListenerError
from zdlb.metrics import endpoint as endpoint_module
from zdlb.metrics.collector import new_registry
from zdlb.metrics.endpoint import MAX_CLIENTS, MAX_REQUEST_BYTES, MetricsEndpoint
from zdlb.stats import Snapshot, Stats

# Every awaited expectation gets this deadline; pytest-timeout's 60 s is only the backstop.
WAIT_S = 5.0
# How often a test re-checks the endpoint's connection count (accepts notify nobody).
POLL_S = 0.002
# The deadline of the slow-client tests: short, yet far above a loopback round trip.
SHORT_DEADLINE_S = 0.2
PLAIN_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"


def empty_registry() -> CollectorRegistry:
    """Counters of a config with no names: still a full scrape (build info, control)."""
    return new_registry(Stats().snapshot)


@pytest.fixture
async def endpoint(bound_socket: socket.socket) -> AsyncIterator[MetricsEndpoint]:
    metrics = MetricsEndpoint(empty_registry(), bound_socket, deadline_s=WAIT_S)
    await metrics.start()
    yield metrics
    metrics.close()
    async with asyncio.timeout(WAIT_S):
        await metrics.wait_closed()


def addr_of(metrics: MetricsEndpoint) -> tuple[str, int]:
    return (metrics.address.host, metrics.address.port)


async def raw_exchange(metrics: MetricsEndpoint, data: bytes) -> bytes:
    """Send ``data`` as is, then read until the endpoint closes."""
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(*addr_of(metrics))
        try:
            writer.write(data)
            return await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()


def status_of(answer: bytes) -> int:
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), answer
    return int(status_line.split()[1])


async def wait_for(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        # Polling, bounded: accepts and closes notify nobody (see tests/net/proxy_harness.py).
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)


async def test_get_metrics(endpoint: MetricsEndpoint) -> None:
    async with await H11Client.connect(addr_of(endpoint)) as client:
        response = await client.request("GET", "/metrics")
        assert response.status == 200
        assert response.header("content-type") == PLAIN_0_0_4
        assert response.header("connection") == "close"
        assert response.header("content-length") == str(len(response.body))
        names = {f.name for f in text_string_to_metric_families(response.body.decode())}
        assert "zdlb_build_info" in names
        async with asyncio.timeout(WAIT_S):
            assert await client.reader.read() == b""  # closed after the answer


async def test_head_has_the_get_head_and_no_body(endpoint: MetricsEndpoint) -> None:
    async with await H11Client.connect(addr_of(endpoint)) as client:
        got = await client.request("GET", "/metrics")
    async with await H11Client.connect(addr_of(endpoint)) as client:
        head = await client.request("HEAD", "/metrics")
    assert head.status == 200
    assert head.body == b""
    assert head.header("content-type") == PLAIN_0_0_4
    assert head.header("content-length") == str(len(got.body))


async def test_query_string_is_ignored(endpoint: MetricsEndpoint) -> None:
    async with await H11Client.connect(addr_of(endpoint)) as client:
        response = await client.request("GET", "/metrics?module=zdlb")
    assert response.status == 200


async def test_openmetrics_when_accepted(endpoint: MetricsEndpoint) -> None:
    accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4"
    async with await H11Client.connect(addr_of(endpoint)) as client:
        response = await client.request("GET", "/metrics", headers=[("accept", accept)])
    assert response.status == 200
    content_type = response.header("content-type")
    assert content_type is not None
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert response.body.endswith(b"# EOF\n")


@pytest.mark.parametrize("target", ["/", "/metricsx", "/metrics/", "/Metrics", "*"])
async def test_other_paths_are_404(endpoint: MetricsEndpoint, target: str) -> None:
    async with await H11Client.connect(addr_of(endpoint)) as client:
        response = await client.request("GET", target)
    assert response.status == 404
    assert response.header("connection") == "close"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
async def test_other_methods_are_405(endpoint: MetricsEndpoint, method: str) -> None:
    async with await H11Client.connect(addr_of(endpoint)) as client:
        response = await client.request(
            method, "/metrics", body=b"x" if method != "OPTIONS" else None
        )
    assert response.status == 405
    assert response.header("allow") == "GET, HEAD"


GARBAGE = [
    pytest.param(b"HELLO\r\n\r\n", id="no-version"),
    pytest.param(b"GET /metrics HTTP/1.1\r\n\r\n", id="no-host"),
    pytest.param(b"GET /metrics HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n", id="bad-header"),
    pytest.param(
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n", id="tls"
    ),
    pytest.param(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        id="two-lengths",
    ),
    pytest.param(b"GET /metrics HTTP/1.1\r\nHost: x\r\n", id="eof-mid-head"),
]


@pytest.mark.parametrize("data", GARBAGE)
async def test_garbage_is_400(endpoint: MetricsEndpoint, data: bytes) -> None:
    reader, writer = await asyncio.open_connection(*addr_of(endpoint))
    try:
        writer.write(data)
        writer.write_eof()  # so a request cut short is known to be cut
        async with asyncio.timeout(WAIT_S):
            answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    assert status_of(answer) == 400
    assert b"\r\nConnection: close\r\n" in answer


async def test_oversized_head_is_431(endpoint: MetricsEndpoint) -> None:
    filler = b"X-Filler: " + b"a" * MAX_REQUEST_BYTES + b"\r\n"
    answer = await raw_exchange(
        endpoint, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + filler + b"\r\n"
    )
    assert status_of(answer) == 431


async def test_oversized_body_is_413(endpoint: MetricsEndpoint) -> None:
    body = b"a" * MAX_REQUEST_BYTES
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    assert status_of(await raw_exchange(endpoint, head + body)) == 413


async def test_large_declared_body_is_413_before_it_is_sent(endpoint: MetricsEndpoint) -> None:
    head = b"PUT /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (1 << 30)
    assert status_of(await raw_exchange(endpoint, head)) == 413


async def test_pipelined_requests_get_one_answer(endpoint: MetricsEndpoint) -> None:
    one = b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await raw_exchange(endpoint, one + one)
    assert answer.count(b"HTTP/1.1 200 OK") == 1


async def test_client_that_sends_nothing_is_just_closed(endpoint: MetricsEndpoint) -> None:
    reader, writer = await asyncio.open_connection(*addr_of(endpoint))
    writer.write_eof()
    async with asyncio.timeout(WAIT_S):
        assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: endpoint.connection_count == 0)


async def test_slow_request_is_cut_at_the_deadline(bound_socket: socket.socket) -> None:
    metrics = MetricsEndpoint(empty_registry(), bound_socket, deadline_s=SHORT_DEADLINE_S)
    await metrics.start()
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection(*addr_of(metrics))
        started = loop.time()
        writer.write(b"GET /metr")  # and never the rest
        async with asyncio.timeout(WAIT_S):
            answer = await reader.read()
        elapsed = loop.time() - started
        writer.close()
        await writer.wait_closed()
    finally:
        metrics.close()
        async with asyncio.timeout(WAIT_S):
            await metrics.wait_closed()
    assert status_of(answer) == 408
    # uvloop's clock ticks in whole milliseconds: allow one tick early.
    assert SHORT_DEADLINE_S - 0.002 <= elapsed < WAIT_S


async def test_too_many_clients_are_turned_away(endpoint: MetricsEndpoint) -> None:
    held = [await asyncio.open_connection(*addr_of(endpoint)) for _ in range(MAX_CLIENTS)]
    try:
        await wait_for(lambda: endpoint.connection_count == MAX_CLIENTS)
        reader, writer = await asyncio.open_connection(*addr_of(endpoint))
        async with asyncio.timeout(WAIT_S):
            try:
                assert await reader.read() == b""
            except ConnectionResetError:
                pass  # aborted: a reset is as good as a close here
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        assert endpoint.connection_count == MAX_CLIENTS
    finally:
        for _, held_writer in held:
            held_writer.close()
            await held_writer.wait_closed()
    await wait_for(lambda: endpoint.connection_count == 0)
    async with await H11Client.connect(addr_of(endpoint)) as client:
        assert (await client.request("HEAD", "/metrics")).status == 200


async def test_failing_collector_is_500_and_logged(
    bound_socket: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Snapshot:
        raise RuntimeError("source broke")

    metrics = MetricsEndpoint(new_registry(broken), bound_socket, deadline_s=WAIT_S)
    await metrics.start()
    try:
        with caplog.at_level(logging.ERROR, logger=endpoint_module.__name__):
            async with await H11Client.connect(addr_of(metrics)) as client:
                response = await client.request("GET", "/metrics")
    finally:
        metrics.close()
        await metrics.wait_closed()
    assert response.status == 500
    assert [r.message for r in caplog.records] == ["metrics_failed"]


async def test_binds_an_address_with_port_zero() -> None:
    metrics = MetricsEndpoint(empty_registry(), Address(LOOPBACK, 0))
    with pytest.raises(RuntimeError):
        _ = metrics.address  # not bound yet
    await metrics.start()
    try:
        assert metrics.address.port != 0
        assert repr(metrics) == f"<MetricsEndpoint {metrics.address} connections=0>"
        async with await H11Client.connect(addr_of(metrics)) as client:
            assert (await client.request("GET", "/metrics")).status == 200
    finally:
        metrics.close()
        await metrics.wait_closed()


async def test_busy_address_raises_listener_error(bound_socket: socket.socket) -> None:
    host, port = bound_socket.getsockname()[:2]
    metrics = MetricsEndpoint(empty_registry(), Address(host, port))
    with pytest.raises(ListenerError, match="cannot listen on"):
        await metrics.start()
    metrics.close()
    await metrics.wait_closed()


async def test_close_drops_open_connections_and_stops_accepting(
    endpoint: MetricsEndpoint,
) -> None:
    address = addr_of(endpoint)
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"GET /metrics HTTP/1.1\r\n")  # a request in progress
    await wait_for(lambda: endpoint.connection_count == 1)
    endpoint.close()
    async with asyncio.timeout(WAIT_S):
        await endpoint.wait_closed()
        try:
            assert await reader.read() == b""
        except ConnectionResetError:
            pass  # aborted
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    assert endpoint.connection_count == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*address)
