"""Upgrade (issue 4) in the pure modules: which requests switch, what is forwarded, what is held.

head.py decides whether an Upgrade is honoured, stream.py keeps the bytes after an upgrade
request (and after a 101) out of the HTTP parser, rewrite.py keeps Upgrade and says
``Connection: Upgrade`` on both heads. Every input is fed whole and byte by byte.
"""

from __future__ import annotations

import pytest

from zdlb.config.model import Limits
from zdlb.errors import DownstreamProtocolError, UpstreamProtocolError
from zdlb.http import rewrite
from zdlb.http.head import Framing, Headers, RequestHead, ResponseHead
from zdlb.http.stream import RequestReader, ResponseReader

LIMITS = Limits()
WS = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n"


class Sink:
    def __init__(self) -> None:
        self.heads: list[RequestHead | ResponseHead] = []
        self.body = bytearray()
        self.ends = 0

    def request_head(self, head: RequestHead) -> None:
        self.heads.append(head)
        if head.framing is Framing.NONE:  # the whole request: the reader sends no end
            self.ends += 1

    def request_body(self, data: bytes) -> None:
        self.body += data

    def request_end(self, trailers: Headers) -> None:
        self.ends += 1

    def response_head(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def response_body(self, data: bytes) -> None:
        self.body += data

    def response_end(self, trailers: Headers, keep_alive: bool) -> None:
        self.ends += 1

    def response_complete(self, head: ResponseHead, body: bytes) -> None:
        self.heads.append(head)
        self.body += body
        self.ends += 1


def read_requests(data: bytes, bytewise: bool) -> tuple[Sink, RequestReader]:
    sink = Sink()
    reader = RequestReader(sink, LIMITS)
    for piece in [data[i : i + 1] for i in range(len(data))] if bytewise else [data]:
        reader.feed(piece)
    return sink, reader


FEEDS = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])


@FEEDS
@pytest.mark.parametrize(
    ("data", "upgrade"),
    [
        pytest.param(b"GET /ws HTTP/1.1\r\nHost: a\r\n" + WS + b"\r\n", b"websocket", id="ws"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, upgrade\r\n"
            b"Upgrade: h2c\r\nUpgrade: websocket\r\n\r\n",
            b"h2c, websocket",
            id="token-in-list-two-fields",
        ),
        pytest.param(b"GET / HTTP/1.0\r\nHost: a\r\n" + WS + b"\r\n", None, id="http10-ignored"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: a\r\n" + WS + b"Content-Length: 3\r\n\r\nabc",
            None,
            id="with-body-stripped",
        ),
        pytest.param(b"OPTIONS / HTTP/1.1\r\nHost: a\r\n" + WS + b"\r\n", None, id="not-get"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", None, id="no-token"
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n", None, id="no-field"
        ),
    ],
)
def test_which_upgrades_are_honoured(data: bytes, upgrade: bytes | None, bytewise: bool) -> None:
    sink, reader = read_requests(data, bytewise)
    [head] = sink.heads
    assert isinstance(head, RequestHead)
    assert (head.upgrade, sink.ends) == (upgrade, 1)
    assert not reader.held


@FEEDS
def test_bytes_after_an_upgrade_request_are_held_until_the_answer(bytewise: bool) -> None:
    frame = b"\x81\x05hello GET /x HTTP/1.1\r\n\r\n"
    sink, reader = read_requests(b"GET / HTTP/1.1\r\nHost: a\r\n" + WS + b"\r\n" + frame, bytewise)
    assert len(sink.heads) == 1
    assert bytes(reader.held) == frame


def test_a_refused_upgrade_goes_back_to_http() -> None:
    sink, reader = read_requests(b"GET / HTTP/1.1\r\nHost: a\r\n" + WS + b"\r\n", False)
    assert reader.is_paused and not reader.held  # nothing followed: HTTP may go on
    reader.resume()
    reader.feed(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [h.target for h in sink.heads if isinstance(h, RequestHead)] == [b"/", b"/next"]


def test_connect_is_still_refused() -> None:
    with pytest.raises(DownstreamProtocolError) as info:
        read_requests(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", False)
    assert info.value.status == 501


def test_upgrade_request_is_forwarded_with_connection_upgrade_only() -> None:
    data = (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, x-secret\r\nX-Secret: s\r\n"
        b"Keep-Alive: 5\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    [head] = read_requests(data, False)[0].heads
    assert isinstance(head, RequestHead)
    out = rewrite.build_request_head(head, b"192.0.2.1", b"http", b"s:1")
    lines = out.split(b"\r\n")
    assert lines[0] == b"GET /ws HTTP/1.1"
    assert b"Connection: Upgrade" in lines and b"Upgrade: websocket" in lines
    assert b"Sec-WebSocket-Version: 13" in lines
    lowered = out.lower()
    assert b"x-secret" not in lowered and b"keep-alive" not in lowered
    assert lowered.count(b"connection:") == 1 and out.endswith(b"\r\n\r\n")


def read_response(data: bytes, is_upgrade: bool, bytewise: bool) -> Sink:
    sink = Sink()
    reader = ResponseReader(sink)
    reader.expect_response(is_head=False, is_upgrade=is_upgrade)
    for piece in [data[i : i + 1] for i in range(len(data))] if bytewise else [data]:
        reader.feed(piece)
    return sink


SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Keep-Alive: 5\r\nSec-WebSocket-Accept: abc\r\n\r\n"
)


@FEEDS
def test_101_to_an_upgrade_request_passes_what_follows_unparsed(bytewise: bool) -> None:
    frame = b"\x81\x02hi HTTP/1.1 200 OK\r\n\r\n"
    sink = read_response(SWITCH + frame, True, bytewise)
    [head] = sink.heads
    assert isinstance(head, ResponseHead) and head.status == 101
    assert (bytes(sink.body), sink.ends) == (frame, 0)
    out = rewrite.build_switch_head(head)
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Upgrade: websocket\r\n" in out and b"Sec-WebSocket-Accept: abc\r\n" in out
    assert b"keep-alive" not in out.lower() and out.endswith(b"Connection: Upgrade\r\n\r\n")


def test_101_without_an_upgrade_request_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        read_response(SWITCH, False, False)


@FEEDS
def test_non_101_answer_to_an_upgrade_request_is_plain_http(bytewise: bool) -> None:
    sink = read_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno", True, bytewise)
    [head] = sink.heads
    assert isinstance(head, ResponseHead)
    assert (head.status, bytes(sink.body), sink.ends) == (200, b"no", 1)
