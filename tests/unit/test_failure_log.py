"""Failure log lines of a server are rate limited: one per interval, carrying the count."""

from __future__ import annotations

from zdlb.balancer.server import Server
from zdlb.config.model import Address, ServerConfig
from zdlb.http.upstream import FAILURE_LOG_INTERVAL_S, ServerConnections


def make_pool() -> ServerConnections:
    server = Server(ServerConfig("s1", Address("127.0.0.1", 1)), "app")
    return ServerConnections(server, connect_s=1.0, idle_s=1.0)


def test_first_failure_is_logged_then_quiet_then_counted() -> None:
    pool = make_pool()
    assert pool.failures_to_log(100.0) == 1
    assert [pool.failures_to_log(100.0 + i) for i in (0.1, 1.0, 4.9)] == [0, 0, 0]
    # The line after the interval reports the three quiet failures and this one.
    assert pool.failures_to_log(100.0 + FAILURE_LOG_INTERVAL_S) == 4
    assert pool.failures_to_log(100.0 + FAILURE_LOG_INTERVAL_S + 0.1) == 0


def test_failures_of_one_server_do_not_quiet_another() -> None:
    first, second = make_pool(), make_pool()
    assert first.failures_to_log(10.0) == 1
    assert second.failures_to_log(10.0) == 1
