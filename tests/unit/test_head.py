"""The sans-IO readers of ``zdlb/http/head.py``: events, framing, limits, and refusals.

Every valid input is fed whole, byte by byte, split at every offset, and followed by a second
pipelined message; each way must give the same events (body events are merged, since how a body
is cut into events depends on the reads). Refusals are checked the same ways, for the status and
for what the sink saw before the error: a head that is refused must never reach the sink,
because the proxy forwards a head as soon as it gets it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

import pytest

from zdlb.config.model import Limits
from zdlb.errors import DownstreamProtocolError, UpstreamProtocolError
from zdlb.http.chunked import FREE_CHUNKS, MIN_AVERAGE_CHUNK_BYTES
from zdlb.http.head import (
    DEFAULT_MAX_RESPONSE_HEAD_BYTES,
    Framing,
    Headers,
    RequestHead,
    RequestHeadParser,
    ResponseHead,
)
from zdlb.http.stream import RequestReader, ResponseReader

LIMITS = Limits()
# A head comfortably under every default limit: the second message of the "trailing" feeds.
NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: example.com\r\n\r\n"
NEXT_RESPONSE = b"HTTP/1.1 204 No Content\r\n\r\n"

Event = tuple[object, ...]


class Recorder:
    """A list sink for both readers; each event is a plain tuple so that lists compare."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.heads: list[RequestHead | ResponseHead] = []

    def request_head(self, head: RequestHead) -> None:
        self.heads.append(head)
        self.events.append(("head", *request_summary(head)))
        if head.framing is Framing.NONE:  # the whole request: the reader sends no end
            self.events.append(("end", ()))

    def request_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def request_end(self, trailers: Headers) -> None:
        self.events.append(("end", tuple(trailers)))

    def response_head(self, head: ResponseHead) -> None:
        self.heads.append(head)
        self.events.append(("head", *response_summary(head)))

    def response_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def response_end(self, trailers: Headers, keep_alive: bool) -> None:
        self.events.append(("end", tuple(trailers), keep_alive))

    def response_complete(self, head: ResponseHead, body: bytes) -> None:
        self.response_head(head)
        self.response_body(body)
        self.response_end([], head.keep_alive)

    def merged(self) -> list[Event]:
        """Events with adjacent body pieces joined and empty ones dropped."""
        out: list[Event] = []
        for event in self.events:
            if event[0] == "body":
                data = event[1]
                assert isinstance(data, bytes)
                if not data:
                    continue
                if out and out[-1][0] == "body":
                    previous = out[-1][1]
                    assert isinstance(previous, bytes)
                    out[-1] = ("body", previous + data)
                    continue
            out.append(event)
        return out


def request_summary(head: RequestHead) -> tuple[object, ...]:
    return (
        head.method,
        head.target,
        head.http_minor,
        tuple(head.headers),
        head.framing,
        head.content_length,
        head.keep_alive,
        head.expects_continue,
        head.has_host,
    )


def response_summary(head: ResponseHead) -> tuple[object, ...]:
    return (
        head.status,
        head.reason,
        head.http_minor,
        tuple(head.headers),
        head.framing,
        head.content_length,
    )


def req_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    minor: int = 1,
    framing: Framing = Framing.NONE,
    length: int | None = None,
    keep_alive: bool = True,
    expects_continue: bool = False,
    has_host: bool = True,
) -> Event:
    return (
        "head",
        method,
        target,
        minor,
        tuple(headers),
        framing,
        length,
        keep_alive,
        expects_continue,
        has_host,
    )


def resp_head(
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    minor: int = 1,
    framing: Framing = Framing.NONE,
    length: int | None = None,
) -> Event:
    return ("head", status, reason, minor, tuple(headers), framing, length)


class Feed(enum.Enum):
    WHOLE = "whole"
    BYTEWISE = "bytewise"
    TRAILING = "trailing"  # followed, in the same read, by a second message


def pieces(data: bytes, feed: Feed, trailing: bytes) -> Iterator[bytes]:
    match feed:
        case Feed.WHOLE:
            yield data
        case Feed.BYTEWISE:
            for i in range(len(data)):
                yield data[i : i + 1]
        case Feed.TRAILING:
            yield data + trailing


def feed_and_answer(reader: RequestReader, data: bytes) -> None:
    """Feed ``data`` as a connection that answers every request at once would: the reader
    pauses after each request's end, holding what follows, until ``resume``."""
    reader.feed(data)
    while reader.is_paused:
        reader.resume()


def run_requests(
    data: bytes, feed: Feed = Feed.WHOLE, limits: Limits = LIMITS
) -> tuple[Recorder, RequestReader]:
    sink = Recorder()
    reader = RequestReader(sink, limits)
    for piece in pieces(data, feed, NEXT_REQUEST):
        feed_and_answer(reader, piece)
    return sink, reader


def request_error(
    data: bytes, feed: Feed = Feed.WHOLE, limits: Limits = LIMITS
) -> tuple[DownstreamProtocolError, Recorder]:
    sink = Recorder()
    reader = RequestReader(sink, limits)
    with pytest.raises(DownstreamProtocolError) as info:
        for piece in pieces(data, feed, NEXT_REQUEST):
            feed_and_answer(reader, piece)
    return info.value, sink


def next_request_events() -> list[Event]:
    sink, _ = run_requests(NEXT_REQUEST)
    return sink.merged()


ALL_FEEDS = [pytest.param(f, id=f.value) for f in Feed]
HOST = (b"Host", b"example.com")

# --- valid requests ---------------------------------------------------------------------------

VALID_REQUESTS = [
    pytest.param(
        b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\n\r\n",
        [req_head(b"GET", b"/a?b=c", [HOST]), ("end", ())],
        id="get",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nhost: example.com\r\nX-Mixed-Case: KeepMe \r\n\r\n",
        [
            # RFC 9110 section 5.5: surrounding whitespace is not part of a field value.
            req_head(b"GET", b"/", [(b"host", b"example.com"), (b"X-Mixed-Case", b"KeepMe")]),
            ("end", ()),
        ],
        id="header-case-and-value-kept-raw",
    ),
    pytest.param(
        b"POST /f HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nhello",
        [
            req_head(
                b"POST",
                b"/f",
                [HOST, (b"Content-Length", b"5")],
                framing=Framing.LENGTH,
                length=5,
            ),
            ("body", b"hello"),
            ("end", ()),
        ],
        id="content-length",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 007\r\n\r\nabcdefg",
        [
            req_head(
                b"POST",
                b"/",
                [HOST, (b"Content-Length", b"007")],
                framing=Framing.LENGTH,
                length=7,
            ),
            ("body", b"abcdefg"),
            ("end", ()),
        ],
        id="content-length-leading-zeros",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\n\r\n",
        [
            req_head(b"POST", b"/", [HOST, (b"Content-Length", b"0")], length=0),
            ("end", ()),
        ],
        id="content-length-zero",
    ),
    pytest.param(
        b"POST /up HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5;name=value\r\nhello\r\n6;flag;q="a;b"\r\n world\r\n'
        b"0;last\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n",
        [
            req_head(
                b"POST",
                b"/up",
                [HOST, (b"Transfer-Encoding", b"chunked")],
                framing=Framing.CHUNKED,
            ),
            ("body", b"hello world"),
            ("end", ((b"X-Checksum", b"abc"), (b"X-Other", b"1"))),
        ],
        id="chunked-extensions-trailers",
    ),
    pytest.param(
        b"PUT / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: Chunked\r\n\r\n"
        b"A\r\n0123456789\r\n00\r\n\r\n",
        [
            req_head(
                b"PUT",
                b"/",
                [HOST, (b"Transfer-Encoding", b"Chunked")],
                framing=Framing.CHUNKED,
            ),
            ("body", b"0123456789"),
            ("end", ()),
        ],
        id="chunked-case-insensitive-hex",
    ),
    pytest.param(
        b"GET / HTTP/1.0\r\n\r\n",
        [req_head(b"GET", b"/", [], minor=0, keep_alive=False, has_host=False), ("end", ())],
        id="http10-close",
    ),
    pytest.param(
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        [
            req_head(
                b"GET",
                b"/",
                [(b"Connection", b"keep-alive")],
                minor=0,
                keep_alive=True,
                has_host=False,
            ),
            ("end", ()),
        ],
        id="http10-keep-alive",
    ),
    pytest.param(
        b"POST / HTTP/1.0\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi",
        [
            req_head(
                b"POST",
                b"/",
                [(b"Host", b"h"), (b"Content-Length", b"2")],
                minor=0,
                framing=Framing.LENGTH,
                length=2,
                keep_alive=False,
            ),
            ("body", b"hi"),
            ("end", ()),
        ],
        id="http10-with-host-and-body",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
        [req_head(b"GET", b"/", [HOST, (b"Connection", b"close")], keep_alive=False), ("end", ())],
        id="http11-connection-close",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: example.com\r\nExpect: 100-Continue\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        [
            req_head(
                b"POST",
                b"/",
                [HOST, (b"Expect", b"100-Continue"), (b"Content-Length", b"3")],
                framing=Framing.LENGTH,
                length=3,
                expects_continue=True,
            ),
            ("body", b"abc"),
            ("end", ()),
        ],
        id="expect-100-continue",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: example.com\r\nExpect: something-else\r\n\r\n",
        [req_head(b"GET", b"/", [HOST, (b"Expect", b"something-else")]), ("end", ())],
        id="expect-other-is-not-continue",
    ),
    pytest.param(
        b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n",
        [req_head(b"OPTIONS", b"*", [HOST]), ("end", ())],
        id="asterisk-form",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: example.com\r\nUpgrade: h2c\r\n\r\n",
        # Upgrade without "Connection: upgrade" is no upgrade (RFC 9110 section 7.8); the
        # rewriter drops the field as hop-by-hop.
        [req_head(b"GET", b"/", [HOST, (b"Upgrade", b"h2c")]), ("end", ())],
        id="upgrade-field-without-connection-token",
    ),
    pytest.param(
        b"\r\nGET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        # RFC 9112 section 2.2: a server SHOULD ignore an empty line before the request line.
        [req_head(b"GET", b"/", [HOST]), ("end", ())],
        id="leading-empty-line",
    ),
]


def split_everywhere(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    for i in range(len(data) + 1):
        yield data[:i], data[i:]


@pytest.mark.parametrize("feed", ALL_FEEDS)
@pytest.mark.parametrize(("data", "expected"), VALID_REQUESTS)
def test_request_events(data: bytes, expected: list[Event], feed: Feed) -> None:
    sink, reader = run_requests(data, feed)
    if feed is Feed.TRAILING and expected[0][7]:  # keep-alive: the next request is parsed
        expected = expected + next_request_events()
    assert sink.merged() == expected
    assert reader.is_idle


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.0\r\n\r\n", id="http10"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", id="close"),
    ],
)
@pytest.mark.parametrize(
    "after",
    [
        pytest.param(NEXT_REQUEST, id="request"),
        pytest.param(b"\x00garbage", id="garbage"),
        pytest.param(b"\r\n", id="crlf"),
    ],
)
def test_bytes_after_a_closing_request_are_ignored(data: bytes, after: bytes) -> None:
    # RFC 9112 section 9.6: the server MUST NOT process requests after a "close" one. Ignoring
    # them, rather than raising, lets the proxy still answer the request in flight.
    for feed in (Feed.WHOLE, Feed.BYTEWISE):
        sink, reader = run_requests(data, feed)
        feed_and_answer(reader, after)
        feed_and_answer(reader, after)
        assert [e[0] for e in sink.events] == ["head", "end"]
    sink, reader = run_requests(data + after)
    assert [e[0] for e in sink.events] == ["head", "end"]


@pytest.mark.parametrize(("data", "expected"), VALID_REQUESTS)
def test_request_split_at_every_offset(data: bytes, expected: list[Event]) -> None:
    for first, second in split_everywhere(data):
        sink = Recorder()
        reader = RequestReader(sink, LIMITS)
        feed_and_answer(reader, first)
        feed_and_answer(reader, second)
        assert sink.merged() == expected, first


def test_pipelined_requests_in_one_read() -> None:
    first = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
    second = b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    third = b"POST /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n"
    fourth = b"GET /4 HTTP/1.0\r\n\r\n"
    expected = [
        req_head(b"GET", b"/1", [(b"Host", b"a")]),
        ("end", ()),
        req_head(
            b"POST",
            b"/2",
            [(b"Host", b"a"), (b"Content-Length", b"3")],
            framing=Framing.LENGTH,
            length=3,
        ),
        ("body", b"abc"),
        ("end", ()),
        req_head(
            b"POST",
            b"/3",
            [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")],
            framing=Framing.CHUNKED,
        ),
        ("body", b"xy"),
        ("end", ()),
        req_head(b"GET", b"/4", [], minor=0, keep_alive=False, has_host=False),
        ("end", ()),
    ]
    data = first + second + third + fourth
    for feed in (Feed.WHOLE, Feed.BYTEWISE):
        sink, reader = run_requests(data, feed)
        assert sink.merged() == expected, feed
        assert reader.is_idle


def test_body_is_not_parsed_as_a_request() -> None:
    # The body of the first request looks like a request: it must stay body.
    inner = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(inner), inner)
    sink, _ = run_requests(data, Feed.BYTEWISE)
    assert [e[0] for e in sink.merged()] == ["head", "body", "end"]
    assert sink.merged()[1] == ("body", inner)


def test_is_idle_tracks_a_partial_next_request() -> None:
    sink = Recorder()
    reader = RequestReader(sink, LIMITS)
    idle = [reader.is_idle]
    feed_and_answer(reader, b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGE")  # a second request has begun
    assert [e[0] for e in sink.events] == ["head", "end"]
    idle.append(reader.is_idle)
    feed_and_answer(reader, b"T /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    idle.append(reader.is_idle)
    feed_and_answer(reader, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n")
    idle.append(reader.is_idle)  # in the body
    feed_and_answer(reader, b"ok")
    idle.append(reader.is_idle)
    assert idle == [True, False, True, False, True]


def test_request_head_repr_shows_line_and_framing() -> None:
    sink, _ = run_requests(b"PUT /x HTTP/1.0\r\nContent-Length: 1\r\n\r\nz")
    head = sink.heads[0]
    assert isinstance(head, RequestHead)
    assert repr(head) == "RequestHead(b'PUT' b'/x' HTTP/1.0 framing=length keep_alive=False)"
    assert head.is_idempotent


@pytest.mark.parametrize(
    ("method", "idempotent"),
    [(b"GET", True), (b"HEAD", True), (b"PUT", True), (b"DELETE", True), (b"POST", False)],
    ids=lambda v: v.decode() if isinstance(v, bytes) else str(v),
)
def test_is_idempotent(method: bytes, idempotent: bool) -> None:
    sink, _ = run_requests(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = sink.heads[0]
    assert isinstance(head, RequestHead)
    assert head.is_idempotent is idempotent


# --- refused requests -------------------------------------------------------------------------

H = b"Host: example.com\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"

REFUSED_HEADS = [
    # Host rules (RFC 9112 section 3.2)
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="http11-without-host"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="two-hosts"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", 400, id="two-hosts-same"),
    pytest.param(b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="http10-two-hosts"),
    # Tunnels and protocol switches
    pytest.param(b"CONNECT example.com:443 HTTP/1.1\r\n" + H + b"\r\n", 501, id="connect"),
    # Upgrade is forwarded since issue 4: tests/unit/test_upgrade.py.
    # Versions llhttp parses but zdlb does not speak
    pytest.param(b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505, id="http20"),
    pytest.param(b"GET / HTTP/0.9\r\n" + H + b"\r\n", 505, id="http09"),
    # llhttp reads a request line without a version as HTTP/0.9, and goes on to parse fields.
    pytest.param(b"GET /\r\n\r\n", 505, id="no-version"),
    pytest.param(b"GET /HTTP/1.1\r\n" + H + b"\r\n", 505, id="no-space-before-version"),
    pytest.param(b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400, id="http12"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, id="h2-preface"),
    # Transfer codings other than chunked cannot be re-framed (RFC 9112 section 6.1)
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
        id="te-gzip-then-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n" + CHUNKED + b"\r\n0\r\n\r\n",
        501,
        id="te-gzip-field-then-chunked-field",
    ),
    # Request line
    pytest.param(b"get / HTTP/1.1\r\n" + H + b"\r\n", 400, id="lowercase-method"),
    pytest.param(b"GET / HTTP/1.1 \r\n" + H + b"\r\n", 400, id="space-after-version"),
    pytest.param(b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400, id="space-in-target"),
    pytest.param(b"GET /\xff HTTP/1.1\r\n" + H + b"\r\n", 400, id="high-byte-in-target"),
    pytest.param(b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", 400, id="tab-after-method"),
]

# Every shape of ambiguous framing from the smuggling issue: llhttp must refuse each, with 400.
SMUGGLING_HEADS = [
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n" + CHUNKED + b"\r\n0\r\n\r\n",
        id="cl-then-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"Content-Length: 4\r\n\r\n0\r\n\r\n",
        id="te-then-cl",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        id="differing-cls",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        id="repeated-equal-cls",
    ),
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", id="cl-list"),
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", id="cl-plus"),
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -3\r\n\r\nabc", id="cl-minus"),
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", id="cl-hex"),
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 2\r\n\r\nabc", id="cl-space"),
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length:\r\n\r\nabc", id="cl-empty"),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n",
        id="cl-overflow",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        id="te-chunked-not-last",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\nabc",
        id="te-identity",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: x-chunked\r\n\r\n0\r\n\r\n",
        id="te-x-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunkedx\r\n\r\n0\r\n\r\n",
        id="te-chunkedx",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + CHUNKED + CHUNKED + b"\r\n0\r\n\r\n",
        id="te-chunked-twice",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n\r\n0\r\n\r\n",
        id="te-empty",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        id="te-obs-fold",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"X: a\r\n\tb\r\nContent-Length: 1\r\n\r\nz",
        id="obs-fold-tab",
    ),
    pytest.param(b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", id="continuation-first-field"),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        id="space-before-colon-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length\t: 3\r\n\r\nabc",
        id="tab-before-colon-cl",
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", id="space-before-colon-host"),
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n", id="cr-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", id="nul-in-value"),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\x00\r\n\r\n0\r\n\r\n",
        id="nul-after-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\rX: y\r\n\r\n0\r\n\r\n",
        id="bare-cr-splits-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\nX: y\r\n\r\n0\r\n\r\n",
        id="bare-lf-splits-te",
    ),
    pytest.param(b"GET / HTTP/1.1\nHost: a\n\n", id="bare-lf-everywhere"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\n\r\n", id="bare-lf-after-field"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\n", id="bare-lf-end-of-head"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n", id="cr-cr-lf-end-of-head"),
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b": empty-name\r\n\r\n", id="empty-field-name"),
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"X\x00Y: z\r\n\r\n", id="nul-in-name"),
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"No-Colon\r\n\r\n", id="field-without-colon"),
]


def _assert_head_refused(data: bytes, status: int) -> None:
    for feed in Feed:
        error, sink = request_error(data, feed)
        assert error.status == status, (feed, str(error))
        assert sink.events == [], (feed, sink.events)  # nothing reached the proxy


@pytest.mark.parametrize(("data", "status"), REFUSED_HEADS)
def test_refused_heads_never_reach_the_sink(data: bytes, status: int) -> None:
    _assert_head_refused(data, status)


@pytest.mark.parametrize("data", SMUGGLING_HEADS)
def test_smuggling_heads_are_400(data: bytes) -> None:
    _assert_head_refused(data, 400)


BAD_CHUNKS = [
    pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", id="hex-prefix"),
    pytest.param(b"5 \r\nhello\r\n0\r\n\r\n", id="space-after-size"),
    pytest.param(b" 5\r\nhello\r\n0\r\n\r\n", id="space-before-size"),
    pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="negative"),
    pytest.param(b"g\r\nhello\r\n0\r\n\r\n", id="not-hex"),
    pytest.param(b"\r\nhello\r\n0\r\n\r\n", id="empty-size"),
    pytest.param(b"1ffffffffffffffff\r\nhello\r\n0\r\n\r\n", id="size-overflow"),
    pytest.param(b"5\r\nhelloXX\r\n0\r\n\r\n", id="data-longer-than-size"),
    pytest.param(b"5\nhello\n0\n\n", id="bare-lf"),
    pytest.param(b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n", id="cl-in-trailers"),
    pytest.param(b"5\r\nhello\r\n0\r\nX : y\r\n\r\n", id="space-before-colon-trailer"),
    pytest.param(b"5\r\nhello\r\n0\r\nX: a\x00\r\n\r\n", id="nul-in-trailer"),
]


@pytest.mark.parametrize("body", BAD_CHUNKS)
def test_bad_chunked_body_is_400_and_never_ends(body: bytes) -> None:
    data = b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"\r\n" + body
    for feed in Feed:
        error, sink = request_error(data, feed)
        assert error.status == 400, (feed, str(error))
        assert [e[0] for e in sink.events if e[0] != "body"] == ["head"], feed


# --- limits -----------------------------------------------------------------------------------

SMALL = Limits(max_line_bytes=64, max_head_bytes=1024, max_headers=8)


def feed_until_refused(reader: RequestReader, start: bytes, filler: bytes, budget: int) -> int:
    """Feed ``start`` then ``filler`` over and over; return the bytes fed when it raised."""
    fed = len(start)
    feed_and_answer(reader, start)
    while fed < budget:
        fed += len(filler)
        # Raises before the budget runs out, or the test fails below.
        feed_and_answer(reader, filler)
    pytest.fail(f"no error after {fed} bytes")


@pytest.mark.parametrize("feed", ALL_FEEDS)
def test_long_target_is_414(feed: Feed) -> None:
    data = b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    error, sink = request_error(data, feed, SMALL)
    assert error.status == 414
    assert sink.events == []


def test_target_at_the_limit_is_fine() -> None:
    target = b"/" + b"a" * (SMALL.max_line_bytes - 1)
    sink, _ = run_requests(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", limits=SMALL)
    assert sink.events[0][2] == target


@pytest.mark.parametrize("piece", [1, 7, 500], ids=lambda n: f"pieces-of-{n}")
def test_endless_target_is_414_within_the_limit(piece: int) -> None:
    reader = RequestReader(Recorder(), SMALL)
    with pytest.raises(DownstreamProtocolError) as info:
        feed_until_refused(reader, b"GET /", b"a" * piece, 100_000)
    assert info.value.status == 414


@pytest.mark.parametrize("feed", ALL_FEEDS)
def test_too_many_headers_is_431(feed: Feed) -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(SMALL.max_headers))  # + Host = 9
    error, sink = request_error(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n", feed, SMALL)
    assert error.status == 431
    assert sink.events == []


def test_headers_at_the_limit_are_fine() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(SMALL.max_headers - 1))
    sink, _ = run_requests(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n", limits=SMALL)
    assert [e[0] for e in sink.events] == ["head", "end"]


@pytest.mark.parametrize("feed", ALL_FEEDS)
def test_large_head_is_431(feed: Feed) -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 2000 + b"\r\n\r\n"
    error, sink = request_error(data, feed, SMALL)
    assert error.status == 431
    assert sink.events == []


@pytest.mark.parametrize(
    "filler",
    [
        pytest.param(b"v" * 3, id="endless-value"),
        pytest.param(b"X-Fill: yes\r\n", id="endless-field-list"),
        pytest.param(b" " * 5, id="endless-whitespace"),
    ],
)
def test_endless_head_is_431_once_max_head_bytes_is_passed(filler: bytes) -> None:
    # Memory stays bounded: the reader refuses as soon as max_head_bytes is passed, however
    # small the pieces; a head that never ends never gets to on_headers_complete.
    limits = Limits(max_line_bytes=64, max_head_bytes=1024, max_headers=10_000)
    reader = RequestReader(Recorder(), limits)
    start = b"GET / HTTP/1.1\r\nHost: a\r\nX-Start: "
    with pytest.raises(DownstreamProtocolError) as info:
        feed_until_refused(reader, start, filler, limits.max_head_bytes + len(filler))
    assert info.value.status == 431


def test_endless_head_after_a_pipelined_request_is_bounded() -> None:
    # Bytes of a next request that arrive in the same read as the end of the previous one are
    # not counted (llhttp does not say where the message ended), so the bound is one read more.
    limits = Limits(max_line_bytes=64, max_head_bytes=1024, max_headers=10_000)
    reader = RequestReader(Recorder(), limits)
    start = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nX: " + b"v" * 500
    with pytest.raises(DownstreamProtocolError) as info:
        feed_until_refused(reader, start, b"v" * 10, len(start) + limits.max_head_bytes + 10)
    assert info.value.status == 431


def test_too_many_trailers_is_431() -> None:
    trailers = b"".join(b"T-%d: v\r\n" % i for i in range(SMALL.max_headers + 1))
    data = b"POST / HTTP/1.1\r\nHost: a\r\n" + CHUNKED + b"\r\n1\r\nz\r\n0\r\n" + trailers
    for feed in (Feed.WHOLE, Feed.BYTEWISE):
        error, sink = request_error(data + b"\r\n", feed, SMALL)
        assert error.status == 431
        assert "end" not in [e[0] for e in sink.events]


@pytest.mark.parametrize(
    ("start", "filler"),
    [
        pytest.param(b"0\r\nX-T: ", b"v" * 7, id="endless-trailer-value"),
        pytest.param(b"0\r\n", b"T: v\r\n", id="endless-trailer-list"),
        pytest.param(b"5;ext=", b"e" * 7, id="endless-chunk-extension"),
        pytest.param(b"0000", b"0" * 7, id="endless-chunk-size-zeros"),
    ],
)
def test_chunk_framing_without_data_is_bounded(start: bytes, filler: bytes) -> None:
    limits = Limits(max_line_bytes=64, max_head_bytes=1024, max_headers=10_000)
    reader = RequestReader(Recorder(), limits)
    head = b"POST / HTTP/1.1\r\nHost: a\r\n" + CHUNKED + b"\r\n"
    feed_and_answer(reader, head)
    with pytest.raises(DownstreamProtocolError) as info:
        feed_until_refused(reader, start, filler, 2 * limits.max_head_bytes)
    assert info.value.status == 431


def test_long_chunked_body_in_small_reads_is_not_limited() -> None:
    # Only feeds without body bytes count against the limit: data chunks reset it.
    reader = RequestReader(Recorder(), SMALL)
    feed_and_answer(reader, b"POST / HTTP/1.1\r\nHost: a\r\n" + CHUNKED + b"\r\n")
    for _ in range(2000):  # chunks of 64 bytes: the average the chunk budget asks for
        feed_and_answer(reader, b"40\r\n")
        feed_and_answer(reader, b"x" * 64 + b"\r\n")
    feed_and_answer(reader, b"0\r\n\r\n")
    assert reader.is_idle


@pytest.mark.parametrize(
    ("chunk_bytes", "chunks", "refused"),
    [
        pytest.param(1, FREE_CHUNKS, False, id="free-chunks-of-one-byte"),
        pytest.param(1, FREE_CHUNKS + 1, True, id="one-more-byte-chunk-refused"),
        pytest.param(MIN_AVERAGE_CHUNK_BYTES, 3 * FREE_CHUNKS, False, id="at-the-average"),
        pytest.param(MIN_AVERAGE_CHUNK_BYTES - 1, 3 * FREE_CHUNKS, True, id="under-the-average"),
    ],
)
@pytest.mark.parametrize("feed", [Feed.WHOLE, Feed.BYTEWISE], ids=["whole", "bytewise"])
def test_chunk_budget(chunk_bytes: int, chunks: int, refused: bool, feed: Feed) -> None:
    """chunked.py's budget: framing may not cost more than the payload it carries."""
    chunk = b"%x\r\n%s\r\n" % (chunk_bytes, b"x" * chunk_bytes)
    data = b"POST / HTTP/1.1\r\nHost: a\r\n" + CHUNKED + b"\r\n" + chunk * chunks + b"0\r\n\r\n"
    if feed is Feed.BYTEWISE and len(data) > 100_000:
        pytest.skip("byte by byte over 100 KB adds nothing but time")
    if refused:
        error, _ = request_error(data, feed)
        assert (error.status, str(error)) == (
            400,
            "chunks too small: framing would cost more than the payload",
        )
    else:
        sink, _ = run_requests(data, feed)
        assert sink.merged()[-1] == ("end", ())


# --- responses --------------------------------------------------------------------------------

CL5 = (b"Content-Length", b"5")

VALID_RESPONSES = [
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        [
            resp_head(200, b"OK", [CL5], framing=Framing.LENGTH, length=5),
            ("body", b"hello"),
            ("end", (), True),
        ],
        id="content-length",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        [resp_head(200, b"OK", [(b"Content-Length", b"0")], length=0), ("end", (), True)],
        id="content-length-zero",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nServer-Timing: db;dur=5\r\n\r\n",
        [
            resp_head(200, b"OK", [(b"Transfer-Encoding", b"chunked")], framing=Framing.CHUNKED),
            ("body", b"abcde"),
            ("end", ((b"Server-Timing", b"db;dur=5"),), True),
        ],
        id="chunked-trailers",
    ),
    pytest.param(
        b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        [
            resp_head(
                404,
                b"Not Found",
                [(b"Connection", b"close"), CL5],
                framing=Framing.LENGTH,
                length=5,
            ),
            ("body", b"hello"),
            ("end", (), False),
        ],
        id="connection-close",
    ),
    pytest.param(
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        [
            resp_head(200, b"OK", [CL5], minor=0, framing=Framing.LENGTH, length=5),
            ("body", b"hello"),
            ("end", (), False),
        ],
        id="http10",
    ),
    pytest.param(
        b"HTTP/1.1 200\r\nContent-Length: 5\r\n\r\nhello",
        [
            resp_head(200, b"", [CL5], framing=Framing.LENGTH, length=5),
            ("body", b"hello"),
            ("end", (), True),
        ],
        id="no-reason",
    ),
    pytest.param(
        b"HTTP/1.1 204 No Content\r\nX: y\r\n\r\n",
        [resp_head(204, b"No Content", [(b"X", b"y")]), ("end", (), True)],
        id="204",
    ),
    pytest.param(
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        [resp_head(304, b"Not Modified", [CL5], length=5), ("end", (), True)],
        id="304-with-content-length-has-no-body",
    ),
    pytest.param(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        [
            resp_head(100, b"Continue", []),
            resp_head(200, b"OK", [CL5], framing=Framing.LENGTH, length=5),
            ("body", b"hello"),
            ("end", (), True),
        ],
        id="100-continue-then-200",
    ),
    pytest.param(
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        [
            resp_head(103, b"Early Hints", [(b"Link", b"</s.css>")]),
            resp_head(100, b"Continue", []),
            resp_head(204, b"No Content", []),
            ("end", (), True),
        ],
        id="two-1xx-then-204",
    ),
]


def run_response(data: bytes, feed: Feed) -> tuple[Recorder, ResponseReader]:
    sink = Recorder()
    reader = ResponseReader(sink)
    reader.expect_response(is_head=False)
    for piece in pieces(data, feed, NEXT_RESPONSE):
        reader.feed(piece)
    return sink, reader


@pytest.mark.parametrize("feed", ALL_FEEDS)
@pytest.mark.parametrize(("data", "expected"), VALID_RESPONSES)
def test_response_events(data: bytes, expected: list[Event], feed: Feed) -> None:
    if feed is Feed.TRAILING:
        # zdlb sends one request at a time upstream, so bytes after a response, closing or not,
        # are the server's error: raised once the response has ended.
        sink = Recorder()
        reader = ResponseReader(sink)
        reader.expect_response(is_head=False)
        with pytest.raises(UpstreamProtocolError, match="after"):
            reader.feed(data + NEXT_RESPONSE)
        assert sink.merged() == expected
        return
    sink, reader = run_response(data, feed)
    assert sink.merged() == expected
    assert not reader.in_body


@pytest.mark.parametrize(("data", "expected"), VALID_RESPONSES)
def test_response_split_at_every_offset(data: bytes, expected: list[Event]) -> None:
    for first, second in split_everywhere(data):
        sink = Recorder()
        reader = ResponseReader(sink)
        reader.expect_response(is_head=False)
        reader.feed(first)
        reader.feed(second)
        assert sink.merged() == expected, first


@pytest.mark.parametrize("feed", [Feed.WHOLE, Feed.BYTEWISE], ids=lambda f: f.value)
def test_close_delimited_response_ends_at_eof(feed: Feed) -> None:
    sink, reader = run_response(b"HTTP/1.1 200 OK\r\nX: y\r\n\r\nsome body", feed)
    assert reader.in_body and reader.is_close_delimited
    assert sink.merged() == [
        resp_head(200, b"OK", [(b"X", b"y")], framing=Framing.CLOSE),
        ("body", b"some body"),
    ]
    assert reader.feed_eof() is True
    assert sink.merged()[-1] == ("end", (), False)
    assert not reader.in_body


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", id="short-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe", id="chunk"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", id="partial-head"),
        pytest.param(b"", id="nothing"),
    ],
)
def test_eof_does_not_end_a_length_delimited_response(data: bytes) -> None:
    sink, reader = run_response(data, Feed.WHOLE)
    assert reader.feed_eof() is False
    assert "end" not in [e[0] for e in sink.events]


@pytest.mark.parametrize(
    "framing_field",
    [
        pytest.param(b"Content-Length: 10\r\n", id="content-length"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", id="chunked"),
        pytest.param(b"", id="no-framing"),
    ],
)
@pytest.mark.parametrize("feed", [Feed.WHOLE, Feed.BYTEWISE], ids=lambda f: f.value)
def test_head_response_ends_with_its_head(framing_field: bytes, feed: Feed) -> None:
    sink = Recorder()
    reader = ResponseReader(sink)
    reader.expect_response(is_head=True)
    for piece in pieces(b"HTTP/1.1 200 OK\r\n" + framing_field + b"\r\n", feed, b""):
        reader.feed(piece)
    events = sink.merged()
    assert [e[0] for e in events] == ["head", "end"]
    head = sink.heads[0]
    assert isinstance(head, ResponseHead)
    assert head.framing is Framing.NONE  # whatever the fields say: a HEAD answer has no body
    assert not reader.in_body
    # The next response on the same connection parses from a clean state.
    reader.expect_response(is_head=False)
    for piece in pieces(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", feed, b""):
        reader.feed(piece)
    assert sink.merged()[2:] == [
        resp_head(200, b"OK", [(b"Content-Length", b"3")], framing=Framing.LENGTH, length=3),
        ("body", b"abc"),
        ("end", (), True),
    ]


def test_head_response_keeps_its_content_length() -> None:
    sink = Recorder()
    reader = ResponseReader(sink)
    reader.expect_response(is_head=True)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert sink.merged() == [
        resp_head(200, b"OK", [(b"Content-Length", b"1234")], length=1234),
        ("end", (), True),
    ]


def test_head_request_answered_after_100_continue() -> None:
    sink = Recorder()
    reader = ResponseReader(sink)
    reader.expect_response(is_head=True)
    reader.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    assert [e[0] for e in sink.merged()] == ["head", "head", "end"]


def test_large_body_in_the_same_read_as_the_head() -> None:
    # One read of a fast server may carry far more than the head limit: only the head counts.
    body = b"x" * (4 * DEFAULT_MAX_RESPONSE_HEAD_BYTES)
    sink, _ = run_response(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), Feed.WHOLE
    )
    assert sink.merged()[1:] == [("body", body), ("end", (), True)]


def test_response_head_repr_and_informational() -> None:
    sink, _ = run_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", Feed.WHOLE)
    informational, final = sink.heads
    assert isinstance(informational, ResponseHead) and isinstance(final, ResponseHead)
    assert informational.is_informational and not final.is_informational
    assert repr(final) == "ResponseHead(200 framing=close)"


BAD_RESPONSES = [
    pytest.param(b"garbage\r\n\r\n", id="garbage"),
    pytest.param(b"ICY 200 OK\r\n\r\n", id="icy"),
    pytest.param(b"HTTP/1.1 2000 OK\r\n\r\n", id="four-digit-status"),
    pytest.param(b"HTTP/1.1 20 OK\r\n\r\n", id="two-digit-status"),
    pytest.param(b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n", id="status-below-100"),
    pytest.param(b"HTTP/1.1 OK 200\r\n\r\n", id="swapped"),
    pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", id="bare-lf"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n", id="space-before-colon"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", id="obs-fold"),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        id="cl-and-te",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", id="two-cls"
    ),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz", id="te-gzip"),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        id="te-gzip-chunked",
    ),
    pytest.param(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
        id="unasked-101",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk-size"
    ),
]


@pytest.mark.parametrize("data", BAD_RESPONSES)
def test_bad_response_is_upstream_error(data: bytes) -> None:
    for feed in (Feed.WHOLE, Feed.BYTEWISE):
        sink = Recorder()
        reader = ResponseReader(sink)
        reader.expect_response(is_head=False)
        with pytest.raises(UpstreamProtocolError) as info:
            for piece in pieces(data, feed, b""):
                reader.feed(piece)
        assert info.value.status == 502
        assert "end" not in [e[0] for e in sink.events], feed


@pytest.mark.parametrize("piece", [1000, 65536 + 100], ids=lambda n: f"pieces-of-{n}")
def test_endless_response_head_is_refused(piece: int) -> None:
    reader = ResponseReader(Recorder())
    reader.expect_response(is_head=False)
    reader.feed(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    fed = 0
    with pytest.raises(UpstreamProtocolError, match="head too large"):
        while fed < 4 * DEFAULT_MAX_RESPONSE_HEAD_BYTES:
            fed += piece
            reader.feed(b"v" * piece)
    assert fed <= DEFAULT_MAX_RESPONSE_HEAD_BYTES + piece


def test_complete_oversize_response_head_is_refused() -> None:
    big = b"X-Big: " + b"v" * DEFAULT_MAX_RESPONSE_HEAD_BYTES + b"\r\n"
    sink = Recorder()
    reader = ResponseReader(sink)
    reader.expect_response(is_head=False)
    with pytest.raises(UpstreamProtocolError, match="head too large"):
        reader.feed(b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: 0\r\n\r\n")
    assert sink.events == []


def test_endless_response_trailers_are_refused() -> None:
    reader = ResponseReader(Recorder())
    reader.expect_response(is_head=False)
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n")
    reader.feed(b"0\r\nX-T: ")
    with pytest.raises(UpstreamProtocolError, match="trailers too large"):
        for _ in range(DEFAULT_MAX_RESPONSE_HEAD_BYTES // 100 + 2):
            reader.feed(b"v" * 100)


SHARED_PARSER_HEADS = [
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",  # llhttp takes it, zdlb answers 505
    b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",  # llhttp refuses it
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # llhttp takes it, zdlb answers 400
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",  # llhttp then refuses any byte
    b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",  # closes too
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",  # llhttp waits for a body
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
]


@pytest.mark.parametrize("first", SHARED_PARSER_HEADS)
def test_shared_parser_takes_a_plain_head_after_any_other(first: bytes) -> None:
    """One RequestHeadParser serves every connection of a listener: whatever the last head
    left it with, accepted or refused, the next connection's GET must parse."""
    parser = RequestHeadParser(Limits())
    try:
        parser.parse(first, len(first))
    except DownstreamProtocolError:
        pass
    for _ in range(2):
        plain = b"GET /next HTTP/1.1\r\nHost: b\r\n\r\n"
        head = parser.parse(plain, len(plain))
        assert (head.target, head.keep_alive) == (b"/next", True)


NEXT_READS = {
    "get": b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
    "post": b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
    "chunked": (
        b"POST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    ),
    "bad": b"BAD REQUEST\r\n\r\n",
}


@pytest.mark.parametrize("feed", list(Feed))
@pytest.mark.parametrize("data", list(NEXT_READS.values()), ids=list(NEXT_READS))
def test_feed_that_resumes_is_resume_then_feed(data: bytes, feed: Feed) -> None:
    """feed(data, resume=True), as a keep-alive connection's first read after an answer:
    the same events, state and error as resume() followed by feed(data), fed whole, byte by
    byte and with a request after it."""
    outcomes = []
    for one_call in (False, True):
        sink = Recorder()
        reader = RequestReader(sink, LIMITS)
        reader.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert reader.is_paused and not reader.held
        if not one_call:
            reader.resume()
        error = None
        try:
            for i, piece in enumerate(pieces(data, feed, NEXT_REQUEST)):
                reader.feed(piece, one_call and i == 0)
        except DownstreamProtocolError as exc:
            error = (exc.status, str(exc))
        outcomes.append((sink.events, reader.is_paused, bytes(reader.held), error))
    assert outcomes[0] == outcomes[1]


def test_reader_pauses_after_each_request_until_resumed() -> None:
    """Pipelined requests wait in the reader as bytes, not events: the next head is parsed
    only once the connection is done with the previous request (and a bad one is refused
    only then, after the good one's answer)."""
    sink = Recorder()
    reader = RequestReader(sink, LIMITS)
    reader.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nBAD")
    assert [e[0] for e in sink.events] == ["head", "end"]
    assert reader.is_paused
    assert bytes(reader.held) == b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\nBAD"
    reader.feed(b" REQUEST\r\n\r\n")  # more bytes while paused are only held
    assert [e[0] for e in sink.events] == ["head", "end"]
    reader.resume()
    assert [e[0] for e in sink.events] == ["head", "end", "head", "end"]
    assert bytes(reader.held) == b"BAD REQUEST\r\n\r\n"  # still paused: only held
    with pytest.raises(DownstreamProtocolError):
        reader.resume()
