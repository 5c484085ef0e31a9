"""exchange.py's decisions as tables, and the hot path's inlined copies checked against them.

The connection (http/connection.py) inlines the keep-alive decision where it answers a server's
head, and skips ``build_response_head`` when a head needs no change: both are compared here
with the pure functions over every combination of their inputs, no socket involved.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

from zdlb.balancer.pool import Backend
from zdlb.balancer.server import AdminState, Server
from zdlb.config.load import parse_config
from zdlb.config.model import Address, Reuse, ServerConfig
from zdlb.errors import (
    DownstreamProtocolError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from zdlb.http import rewrite
from zdlb.http.connection import ClientConnection
from zdlb.http.exchange import (
    Exchange,
    Replay,
    body_deadline,
    keeps_alive,
    may_reuse,
    replay_after_loss,
    retry_target,
    status_for_upstream_failure,
)
from zdlb.http.head import (
    Framing,
    RequestHead,
    RequestHeadParser,
    ResponseHead,
    new_response_parser,
    parse_response_head,
)
from zdlb.http.route import BackendLink, Route
from zdlb.http.upstream import ServerConnections, UpstreamConnection

# --- rule 2: keep-alive --------------------------------------------------------------------


def request(raw: bytes) -> RequestHead:
    config = parse_config(
        {"listeners": {"web": {"bind": "127.0.0.1:0", "backend": "app"}}, "backends": APP},
        "test",
        Path("."),
    )
    return RequestHeadParser(config.listeners[0].limits).parse(raw, len(raw))


APP = {"app": {"servers": [{"name": "s1", "address": "127.0.0.1:1"}]}}
REQUESTS = {
    "keep-alive": b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "close": b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    "http10": b"GET / HTTP/1.0\r\n\r\n",
    "http10-keep-alive": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "upgrade": (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"),
}
PERSISTENT = {"keep-alive", "http10-keep-alive", "upgrade"}


@pytest.mark.parametrize("name", list(REQUESTS))
@pytest.mark.parametrize(
    ("done", "closes", "stopping", "client_done", "held_after_upgrade"),
    list(itertools.product([True, False], repeat=5)),
)
def test_keeps_alive_table(
    name: str,
    done: bool,
    closes: bool,
    stopping: bool,
    client_done: bool,
    held_after_upgrade: bool,
) -> None:
    """Rule 2: persistent request, read whole, not close-delimited, not stopping, no
    half-close, no byte after an unswitched upgrade: all six, or the connection closes."""
    expected = (
        name in PERSISTENT
        and done
        and not closes
        and not stopping
        and not client_done
        and not held_after_upgrade
    )
    head = request(REQUESTS[name])
    got = keeps_alive(head, done, closes, stopping, client_done, held_after_upgrade)
    assert got is expected


# --- rule 3: reuse ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "first", "upgrade", "expected"),
    [
        (Reuse.SAFE, True, False, False),
        (Reuse.SAFE, False, False, True),
        (Reuse.SAFE, False, True, False),
        (Reuse.ALWAYS, True, False, True),
        (Reuse.ALWAYS, False, False, True),
        (Reuse.ALWAYS, True, True, False),
        (Reuse.NEVER, True, False, False),
        (Reuse.NEVER, False, False, False),
    ],
)
def test_may_reuse_table(policy: Reuse, first: bool, upgrade: bool, expected: bool) -> None:
    assert may_reuse(policy, first, upgrade) is expected


# --- rule 4: replay ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("got_data", "held", "reused", "retried_stale", "expected"),
    [
        (True, True, True, False, Replay.NO),  # an answer began: never replayed
        (False, False, True, False, Replay.NO),  # not idempotent, or no longer held
        (False, True, True, False, Replay.SAME_SERVER),  # a stale pooled connection
        (False, True, True, True, Replay.NO),  # ...only once
        (False, True, False, False, Replay.OTHER_SERVER),  # a fresh one died: another server
        (False, True, False, True, Replay.OTHER_SERVER),
    ],
)
def test_replay_after_loss_table(
    got_data: bool, held: bool, reused: bool, retried_stale: bool, expected: Replay
) -> None:
    assert replay_after_loss(got_data, held, reused, retried_stale) is expected


# --- rule 5: retry target ---------------------------------------------------------------------


def servers() -> tuple[Server, Server, Server]:
    main = Server(ServerConfig("a", Address("10.0.0.1", 80)), "app")
    pair = Server(ServerConfig("a-backup", Address("10.0.0.1", 81), pair="a"), "app")
    other = Server(ServerConfig("b", Address("10.0.0.2", 80)), "app")
    main.pair, pair.pair = pair, main
    return main, pair, other


def test_retry_goes_to_the_pair_first() -> None:
    main, pair, other = servers()
    assert retry_target(main, [main], 2, lambda exclude: other) is pair


def test_retry_balances_when_the_pair_cannot_serve_or_was_tried() -> None:
    main, pair, other = servers()
    pair.set_admin(AdminState.MAINT)
    assert retry_target(main, [main], 2, lambda exclude: other) is other
    pair.set_admin(AdminState.READY)
    seen: list[list[Server]] = []

    def select(exclude: Collection[Server]) -> Server:
        seen.append(list(exclude))
        return other

    assert retry_target(main, [pair, main], 2, select) is other
    assert seen == [[pair, main]]  # the balanced pick excludes every server tried


def test_retries_stop_at_the_configured_count() -> None:
    main, _, other = servers()
    assert retry_target(main, [main], 0, lambda exclude: other) is None
    assert retry_target(main, [other, main], 1, lambda exclude: other) is None


# --- rule 6: statuses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "answering", "status"),
    [
        (UpstreamTimeout("slow"), True, 504),
        (UpstreamTimeout("connect"), False, 502),
        (UpstreamConnectError("refused"), False, 502),
        (UpstreamReset("reset"), True, 502),
        (UpstreamProtocolError("garbage"), True, 502),
        (None, True, 502),
        (DownstreamProtocolError("bad", 400), True, 502),  # not a 5xx: never the server's
        (ValueError("other"), False, 502),
    ],
    ids=["timeout", "connect-timeout", "refused", "reset", "garbage", "none", "4xx", "other"],
)
def test_status_for_upstream_failure_table(
    exc: Exception | None, answering: bool, status: int
) -> None:
    assert status_for_upstream_failure(exc, answering) == status


# --- rule 7: the body's pace --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "received", "rate", "expected"),
    [
        (0.0, 0, 0, 10.0),  # no minimum rate: silence alone
        (0.0, 0, 100, 10.0),  # the first client_body_s: the base
        (5.0, 2000, 100, 15.0),  # ahead of the rate: silence wins
        (5.0, 100, 100, 11.0),  # behind it: the pace wins
    ],
)
def test_body_deadline(now: float, received: int, rate: int, expected: float) -> None:
    exchange = Exchange(request(REQUESTS["keep-alive"]), 0.0)
    exchange.body_deadline_base = 10.0
    exchange.body_bytes_base = 0
    assert body_deadline(exchange, now, received, 10.0, rate) == pytest.approx(expected)


# --- the inlined copies in http/connection.py --------------------------------------------------

RESPONSES = {
    "plain": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
    "keep-alive": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n",
    "close-delimited": b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    "http10": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
    "closes": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
}


def response(raw: bytes) -> ResponseHead:
    return parse_response_head(raw, len(raw), new_response_parser(), False)


RESPONSE_RULES = {"set": {"X-Frame-Options": "DENY"}, "remove": ["Server"]}


@pytest.fixture(scope="module", params=[False, True], ids=["no-rules", "header-rules"])
def connection(request: pytest.FixtureRequest) -> Iterator[ClientConnection]:
    """A client connection with no transport (_answer_head does no I/O), with or without
    response header rules."""
    listener: dict[str, object] = {"bind": "127.0.0.1:0", "backend": "app"}
    if request.param:
        listener["response_headers"] = RESPONSE_RULES
    config = parse_config({"listeners": {"web": listener}, "backends": APP}, "test", Path("."))
    backend = Backend(config.backends[0])
    upstreams = {s.name: ServerConnections(s, 1.0, 60.0) for s in backend.servers}
    route = Route(config.listeners[0], [BackendLink(backend, upstreams)], log_access=False)
    loop = asyncio.new_event_loop()
    conn = ClientConnection(route, loop)
    assert route.destination is not None
    conn.dest = route.destination
    yield conn
    loop.close()


@pytest.mark.parametrize("req", list(REQUESTS))
@pytest.mark.parametrize("resp", list(RESPONSES))
@pytest.mark.parametrize("cookie", [b"", b"Set-Cookie: SRV=s1; Path=/\r\n"], ids=["-", "cookie"])
def test_answer_head_decides_as_the_pure_functions(
    connection: ClientConnection, req: str, resp: str, cookie: bytes
) -> None:
    """Every combination of rule 2's inputs: exchange.keep_alive is keeps_alive's answer and
    the head sent is build_response_head's bytes."""
    edit = connection.dest.response_edit
    added = cookie if edit is None else cookie + edit.lines  # the rules' lines follow
    for done, stopping, client_done, held in itertools.product([True, False], repeat=4):
        head = response(RESPONSES[resp])
        exchange = Exchange(request(REQUESTS[req]), 0.0)
        exchange.request_done = done
        exchange.set_cookie = cookie
        connection.route.is_stopping = stopping
        connection.client_done = client_done
        connection.reader.held = b"x" if held else b""
        sent = connection._answer_head(exchange, head)  # rules edit head.raw in place
        minor = exchange.request.http_minor
        framing = rewrite.downstream_framing(head, minor)
        expected = keeps_alive(
            exchange.request,
            done,
            framing is Framing.CLOSE,
            stopping,
            client_done,
            exchange.request.upgrade is not None and held,
        )
        assert exchange.keep_alive is expected
        assert sent == rewrite.build_response_head(head, framing, expected, minor, added)
    connection.route.is_stopping = False
    connection.client_done = False
    connection.reader.held = b""


class RecordingTransport(asyncio.Transport):
    """Keeps what is written to it: the bytes the peer would receive (as hotpath_micro's)."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


FORWARDED = {
    "plain": b"GET /p?q=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
    "lower-host": b"GET / HTTP/1.1\r\nhost: a\r\n\r\n",
    "http10": b"GET / HTTP/1.0\r\n\r\n",
    "http10-host": b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    "close": b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    "forwarded": b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.9\r\n\r\n",
    "length": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
    "chunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("raw", list(FORWARDED.values()), ids=list(FORWARDED))
def test_request_head_forwards_what_build_request_head_builds(raw: bytes) -> None:
    """request_head's inlined first case of build_request_head: what a pooled server
    connection is sent starts with build_request_head's bytes for that head."""
    config = parse_config(
        {
            "listeners": {"web": {"bind": "127.0.0.1:0", "backend": "app"}},
            "backends": {"app": {**APP["app"], "reuse": "always"}},
        },
        "test",
        Path("."),
    )
    backend = Backend(config.backends[0])
    pool = ServerConnections(backend.servers[0], 1.0, 60.0)
    route = Route(config.listeners[0], [BackendLink(backend, {"s1": pool})], log_access=False)
    upstream = UpstreamConnection(pool)
    to_server = RecordingTransport()
    upstream.connection_made(to_server)
    pool.release(upstream, 0.0)
    loop = asyncio.new_event_loop()
    try:
        client = ClientConnection(route, loop)
        client.connection_made(RecordingTransport())
        client.data_received(raw)
        head_end = raw.index(b"\r\n\r\n") + 4
        parsed = RequestHeadParser(config.listeners[0].limits).parse(raw[:head_end], head_end)
        expected = rewrite.build_request_head(parsed, b"127.0.0.1", b"http", pool.host_header)
        assert bytes(to_server.data[: len(expected)]) == expected
        assert len(to_server.data) > len(expected) or parsed.framing is Framing.NONE
    finally:
        loop.close()
