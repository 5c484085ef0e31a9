"""Header edits of ``zdlb/http/rewrite.py``: tables for each rule, h11 as the judge of the bytes.

Every head zdlb serialises is also parsed by h11 (a request by an h11 server, a response by an
h11 client), so a test passes only if the bytes are valid HTTP/1.1 as well as containing the
expected fields.
"""

from __future__ import annotations

from collections.abc import Iterable

import h11
import pytest

from zdlb.config.model import Limits
from zdlb.http import rewrite
from zdlb.http.head import Framing, Headers, RequestHead, ResponseHead
from zdlb.http.stream import RequestReader

CLIENT_IP = b"192.0.2.7"
SERVER_HOST = b"10.0.0.1:8080"


def make_request(
    headers: Headers,
    *,
    method: bytes = b"GET",
    target: bytes = b"/",
    minor: int = 1,
    framing: Framing = Framing.NONE,
    length: int | None = None,
) -> RequestHead:
    has_host = any(name.lower() == b"host" for name, _ in headers)
    raw = b"%s %s HTTP/1.%d\r\n%s\r\n" % (method, target, minor, _field_block(headers))
    return RequestHead(raw, method, target, minor, framing, length, True, has_host=has_host)


def make_response(
    headers: Headers,
    *,
    status: int = 200,
    reason: bytes = b"OK",
    framing: Framing = Framing.NONE,
    length: int | None = None,
) -> ResponseHead:
    raw = b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, _field_block(headers))
    return ResponseHead(raw, status, 1, framing, length, True)


def _field_block(headers: Headers) -> bytes:
    return b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)


def build_request(head: RequestHead, proto: bytes = b"http") -> bytes:
    return rewrite.build_request_head(head, CLIENT_IP, proto, SERVER_HOST)


def h11_request(data: bytes) -> h11.Request:
    """Parse a serialised request head with an h11 server; fails the test if h11 refuses it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    return event


def h11_response(data: bytes, method: bytes = b"GET") -> list[object]:
    """Parse a serialised response with an h11 client; return its events up to the end."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    events: list[object] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(b"")  # the server closed: ends a close-delimited body
            continue
        assert not isinstance(event, h11.ConnectionClosed), events  # the response was cut
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            return events


def field_lines(data: bytes) -> list[bytes]:
    """The field lines of a serialised head (no start line, no final empty line)."""
    head, _, _ = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[1:]


def values(data: bytes, name: bytes) -> list[bytes]:
    out = []
    for line in field_lines(data):
        field, _, value = line.partition(b":")
        if field.lower() == name.lower():
            out.append(value.strip())
    return out


# --- requests ---------------------------------------------------------------------------------

HOP_BY_HOP_FIELDS = [
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"TE",
    b"Trailer",
    b"Upgrade",
    b"keep-alive",
    b"UPGRADE",
]


@pytest.mark.parametrize("name", HOP_BY_HOP_FIELDS, ids=lambda n: n.decode())
def test_hop_by_hop_field_is_removed_from_requests(name: bytes) -> None:
    head = make_request([(b"Host", b"a"), (name, b"whatever"), (b"X-Kept", b"1")])
    out = build_request(head)
    assert values(out, name) == []
    assert values(out, b"X-Kept") == [b"1"]
    h11_request(out)


@pytest.mark.parametrize(
    ("connection", "removed"),
    [
        pytest.param(b"X-Secret", [b"X-Secret"], id="one-token"),
        pytest.param(b"close, X-A ,x-b", [b"X-A", b"X-B"], id="list-with-spaces-and-case"),
        pytest.param(b"keep-alive,,X-A", [b"X-A"], id="empty-element"),
    ],
)
def test_fields_named_by_connection_are_removed(connection: bytes, removed: list[bytes]) -> None:
    headers = [(b"Host", b"a"), (b"Connection", connection), (b"X-Kept", b"1")]
    headers += [(name, b"v") for name in (b"X-Secret", b"x-a", b"X-B")]
    out = build_request(make_request(headers))
    for name in removed:
        assert values(out, name) == [], name
    assert values(out, b"X-Kept") == [b"1"]
    assert values(out, b"Connection") == []
    h11_request(out)


def test_connection_cannot_strip_host() -> None:
    # "Connection: host" would otherwise send an HTTP/1.1 request without Host to the server.
    out = build_request(make_request([(b"Host", b"a"), (b"Connection", b"Host")]))
    assert values(out, b"Host") == [b"a"]
    assert dict(h11_request(out).headers)[b"host"] == b"a"


def test_request_line_is_http11_with_method_and_target_unchanged() -> None:
    head = make_request([], method=b"DELETE", target=b"/a%20b?c=d&e", minor=0)
    out = build_request(head)
    assert out.startswith(b"DELETE /a%20b?c=d&e HTTP/1.1\r\n")
    event = h11_request(out)
    assert (event.method, event.target, event.http_version) == (b"DELETE", b"/a%20b?c=d&e", b"1.1")


@pytest.mark.parametrize(
    ("client_xff", "expected"),
    [
        pytest.param([], b"192.0.2.7", id="none"),
        pytest.param([b"203.0.113.1"], b"203.0.113.1, 192.0.2.7", id="appended"),
        pytest.param(
            [b"203.0.113.1", b"198.51.100.2, 198.51.100.3"],
            b"203.0.113.1, 198.51.100.2, 198.51.100.3, 192.0.2.7",
            id="several-merged-in-order",
        ),
        pytest.param([b""], b"192.0.2.7", id="empty"),
    ],
)
def test_x_forwarded_for(client_xff: list[bytes], expected: bytes) -> None:
    headers = [(b"Host", b"a")]
    headers += [
        (b"X-Forwarded-For" if i % 2 else b"x-forwarded-for", v) for i, v in enumerate(client_xff)
    ]
    out = build_request(make_request(headers))
    assert values(out, b"X-Forwarded-For") == [expected]
    h11_request(out)


@pytest.mark.parametrize(
    "client_proto",
    [
        pytest.param([], id="none"),
        pytest.param([b"https"], id="one"),
        pytest.param([b"https", b"ftp"], id="two"),
    ],
)
@pytest.mark.parametrize("proto", [b"http", b"https"], ids=lambda p: p.decode())
def test_x_forwarded_proto_is_replaced(client_proto: list[bytes], proto: bytes) -> None:
    headers = [(b"Host", b"a")] + [(b"X-Forwarded-Proto", v) for v in client_proto]
    out = build_request(make_request(headers), proto)
    assert values(out, b"X-Forwarded-Proto") == [proto]


@pytest.mark.parametrize(
    ("headers", "minor", "expected_hosts"),
    [
        pytest.param([(b"Host", b"app.example")], 1, [b"app.example"], id="http11-kept"),
        pytest.param([(b"host", b"app.example")], 0, [b"app.example"], id="http10-with-host-kept"),
        pytest.param([], 0, [SERVER_HOST], id="http10-without-host-gets-server"),
    ],
)
def test_host(headers: Headers, minor: int, expected_hosts: list[bytes]) -> None:
    out = build_request(make_request(headers, minor=minor))
    assert values(out, b"Host") == expected_hosts
    h11_request(out)  # an HTTP/1.1 request: h11 insists on exactly one Host


@pytest.mark.parametrize(
    ("framing", "length", "te", "cl"),
    [
        pytest.param(Framing.CHUNKED, None, [b"chunked"], [], id="chunked"),
        pytest.param(Framing.LENGTH, 42, [], [b"42"], id="length"),
        pytest.param(Framing.NONE, 0, [], [b"0"], id="length-zero"),
        pytest.param(Framing.NONE, None, [], [], id="no-body"),
    ],
)
def test_request_framing_line(
    framing: Framing, length: int | None, te: list[bytes], cl: list[bytes]
) -> None:
    # Whatever the client sent, exactly one framing line is written: the one zdlb decided.
    headers = [
        (b"Host", b"a"),
        (b"Content-Length", b"7"),
        (b"Transfer-Encoding", b"gzip, chunked"),
    ]
    out = build_request(make_request(headers, method=b"POST", framing=framing, length=length))
    assert values(out, b"Transfer-Encoding") == te
    assert values(out, b"Content-Length") == cl
    h11_request(out)


def test_request_parsed_by_the_reader_round_trips_through_h11() -> None:
    data = (
        b"POST /submit?x=1 HTTP/1.0\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nContent-Length: 3\r\nAccept: */*\r\n\r\nabc"
    )
    heads: list[RequestHead] = []

    class Sink:
        def request_head(self, head: RequestHead) -> None:
            heads.append(head)

        def request_body(self, data: bytes) -> None:
            pass

        def request_end(self, trailers: Headers) -> None:
            pass

    RequestReader(Sink(), Limits()).feed(data)
    out = build_request(heads[0])
    assert out == (
        b"POST /submit?x=1 HTTP/1.1\r\n"
        b"Accept: */*\r\n"
        b"Host: 10.0.0.1:8080\r\n"
        b"Content-Length: 3\r\n"
        b"X-Forwarded-For: 203.0.113.9, 192.0.2.7\r\n"
        b"X-Forwarded-Proto: http\r\n\r\n"
    )
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(out + b"abc")
    assert isinstance(conn.next_event(), h11.Request)
    assert conn.next_event() == h11.Data(data=b"abc")
    assert isinstance(conn.next_event(), h11.EndOfMessage)


# --- responses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("framing", "client_minor", "expected"),
    [
        pytest.param(Framing.CHUNKED, 1, Framing.CHUNKED, id="chunked-to-http11"),
        pytest.param(Framing.CHUNKED, 0, Framing.CLOSE, id="chunked-to-http10-is-close"),
        pytest.param(Framing.LENGTH, 0, Framing.LENGTH, id="length-to-http10"),
        pytest.param(Framing.CLOSE, 1, Framing.CLOSE, id="close-to-http11"),
        pytest.param(Framing.NONE, 0, Framing.NONE, id="none-to-http10"),
    ],
)
def test_downstream_framing(framing: Framing, client_minor: int, expected: Framing) -> None:
    assert rewrite.downstream_framing(make_response([], framing=framing), client_minor) is expected


@pytest.mark.parametrize("name", HOP_BY_HOP_FIELDS, ids=lambda n: n.decode())
def test_hop_by_hop_field_is_removed_from_responses(name: bytes) -> None:
    head = make_response(
        [(name, b"x"), (b"Connection", b"X-Internal"), (b"X-Internal", b"1"), (b"ETag", b'"e"')],
        framing=Framing.LENGTH,
        length=0,
    )
    out = rewrite.build_response_head(head, Framing.LENGTH, True, 1)
    assert values(out, name) == []
    assert values(out, b"X-Internal") == []
    assert values(out, b"ETag") == [b'"e"']


@pytest.mark.parametrize(
    ("keep_alive", "client_minor", "connection"),
    [
        pytest.param(True, 1, [], id="http11-keep-alive-implicit"),
        pytest.param(False, 1, [b"close"], id="http11-close"),
        pytest.param(True, 0, [b"keep-alive"], id="http10-keep-alive-explicit"),
        pytest.param(False, 0, [b"close"], id="http10-close"),
    ],
)
def test_response_connection_field(
    keep_alive: bool, client_minor: int, connection: list[bytes]
) -> None:
    head = make_response([(b"Connection", b"keep-alive")], framing=Framing.LENGTH, length=2)
    out = rewrite.build_response_head(head, Framing.LENGTH, keep_alive, client_minor)
    assert values(out, b"Connection") == connection
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert values(out, b"Content-Length") == [b"2"]
    events = h11_response(out + b"hi")
    assert events[1] == h11.Data(data=b"hi")


def test_chunked_response_to_http10_client_is_close_delimited() -> None:
    head = make_response(
        [(b"Transfer-Encoding", b"chunked"), (b"X", b"y")], framing=Framing.CHUNKED
    )
    framing = rewrite.downstream_framing(head, 0)
    out = rewrite.build_response_head(head, framing, False, 0)
    assert values(out, b"Transfer-Encoding") == []
    assert values(out, b"Content-Length") == []
    assert values(out, b"Connection") == [b"close"]
    events = h11_response(out + b"body bytes")
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"body bytes"


def test_chunked_response_round_trips_with_trailers() -> None:
    head = make_response([(b"Transfer-Encoding", b"chunked")], framing=Framing.CHUNKED)
    out = rewrite.build_response_head(head, Framing.CHUNKED, True, 1)
    assert values(out, b"Transfer-Encoding") == [b"chunked"]
    assert values(out, b"Content-Length") == []
    body = rewrite.encode_chunk(b"hello ") + rewrite.encode_chunk(b"x" * 300)
    body += rewrite.encode_last_chunk([(b"Server-Timing", b"db;dur=3"), (b"Content-Length", b"9")])
    events = h11_response(out + body)
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"hello " + b"x" * 300
    end = events[-1]
    assert isinstance(end, h11.EndOfMessage)
    assert list(end.headers) == [(b"server-timing", b"db;dur=3")]


@pytest.mark.parametrize(
    ("status", "framing", "length"),
    [
        pytest.param(200, Framing.NONE, 1234, id="head-answer-keeps-content-length"),
        pytest.param(304, Framing.NONE, 99, id="304-keeps-content-length"),
        pytest.param(204, Framing.NONE, None, id="204-no-length"),
    ],
)
def test_bodyless_response_keeps_content_length(
    status: int, framing: Framing, length: int | None
) -> None:
    head = make_response([], status=status, reason=b"R", framing=framing, length=length)
    out = rewrite.build_response_head(head, framing, True, 1)
    assert values(out, b"Content-Length") == ([] if length is None else [b"%d" % length])
    method = b"HEAD" if status == 200 else b"GET"
    events = h11_response(out, method)
    assert isinstance(events[0], h11.Response) and events[0].status_code == status


def test_informational_response_has_no_framing_or_connection() -> None:
    head = make_response([(b"Link", b"</a.css>")], status=103, reason=b"Early Hints")
    out = rewrite.build_response_head(head, Framing.NONE, False, 1)
    assert out == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"


def test_response_with_empty_reason() -> None:
    out = rewrite.build_response_head(
        make_response([], reason=b"", length=0), Framing.NONE, True, 1
    )
    assert out.startswith(b"HTTP/1.1 200 \r\n")
    events = h11_response(out)
    assert isinstance(events[0], h11.Response) and events[0].reason == b""


# --- chunks and error responses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "encoded"),
    [
        pytest.param(b"a", b"1\r\na\r\n", id="one-byte"),
        pytest.param(b"hello", b"5\r\nhello\r\n", id="five"),
        pytest.param(b"z" * 300, b"12c\r\n" + b"z" * 300 + b"\r\n", id="hex-size"),
        pytest.param(
            b"\r\n0\r\n\r\n", b"7\r\n\r\n0\r\n\r\n\r\n", id="data-that-looks-like-framing"
        ),
        # A zero-size chunk is the last-chunk: encoding empty data as one would end the body.
        pytest.param(b"", b"", id="empty-is-nothing"),
    ],
)
def test_encode_chunk(data: bytes, encoded: bytes) -> None:
    assert rewrite.encode_chunk(data) == encoded


@pytest.mark.parametrize(
    ("trailers", "encoded"),
    [
        pytest.param([], b"0\r\n\r\n", id="no-trailers"),
        pytest.param(
            [(b"X-Sum", b"1"), (b"X-Two", b"2")], b"0\r\nX-Sum: 1\r\nX-Two: 2\r\n\r\n", id="kept"
        ),
        pytest.param(
            [(b"Connection", b"close"), (b"transfer-encoding", b"chunked"), (b"X-Sum", b"1")],
            b"0\r\nX-Sum: 1\r\n\r\n",
            id="hop-by-hop-dropped",
        ),
    ],
)
def test_encode_last_chunk(trailers: Headers, encoded: bytes) -> None:
    assert rewrite.encode_last_chunk(trailers) == encoded


def test_empty_chunks_do_not_end_a_chunked_body_early() -> None:
    head = make_response([], framing=Framing.CHUNKED)
    out = rewrite.build_response_head(head, Framing.CHUNKED, True, 1)
    body = rewrite.encode_chunk(b"ab") + rewrite.encode_chunk(b"") + rewrite.encode_chunk(b"cd")
    events = h11_response(out + body + rewrite.encode_last_chunk([]))
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"abcd"


ERROR_STATUSES = [400, 404, 408, 413, 414, 431, 500, 501, 502, 503, 504, 505]


@pytest.mark.parametrize("close", [True, False], ids=["close", "keep-alive"])
@pytest.mark.parametrize("status", ERROR_STATUSES, ids=str)
def test_error_response_is_valid_http(status: int, close: bool) -> None:
    data = rewrite.error_response(status, close=close)
    events = h11_response(data)
    response = events[0]
    assert isinstance(response, h11.Response)
    assert response.status_code == status
    headers = dict(response.headers)
    body = b"".join(e.data for e in events if isinstance(e, h11.Data))
    assert int(headers[b"content-length"]) == len(body) > 0
    assert body.startswith(b"%d " % status)
    assert (headers.get(b"connection") == b"close") is close
    assert data.endswith(body)  # nothing after the body: the next response would start there


# --- raw edits agree with rebuilding ------------------------------------------------------------
# build_*_head forward a head as received (plain) or with Connection/Keep-Alive lines cut out of
# the raw bytes (hop_lines_only). Both shortcuts must say exactly what rebuilding says.

RAW_EDIT_REQUESTS = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: x\r\n\r\n", id="plain"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", id="close"),
    pytest.param(
        b"GET / HTTP/1.1\r\nConnection: Keep-Alive\r\nHost: a\r\nKeep-Alive: 300\r\n\r\n",
        id="keep-alive-and-its-field",
    ),
    pytest.param(b"GET /x HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", id="http10"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nconnection: close\r\n\r\n",
        id="body-and-close",
    ),
]


def _fields(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An h11 event's headers, lower-cased names, in a comparable order."""
    return sorted((name.lower(), value) for name, value in headers)


@pytest.mark.parametrize("raw", RAW_EDIT_REQUESTS)
def test_raw_request_edit_matches_rebuild(raw: bytes) -> None:
    from zdlb.http.head import RequestHeadParser

    head = RequestHeadParser(Limits()).parse(raw, len(raw))
    assert head.hop_lines_only
    edited = build_request(head)
    head.is_plain = head.hop_lines_only = False
    rebuilt = build_request(head)
    ours, theirs = h11_request(edited), h11_request(rebuilt)
    assert (ours.method, ours.target, ours.http_version) == (
        theirs.method,
        theirs.target,
        theirs.http_version,
    )
    assert _fields(ours.headers) == _fields(theirs.headers)
    assert values(edited, b"Connection") == values(edited, b"Keep-Alive") == []


RAW_EDIT_RESPONSES = [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: s\r\n\r\n", id="plain"),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n", id="keep-alive"
    ),
    pytest.param(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\n",
        id="keep-alive-field",
    ),
]


@pytest.mark.parametrize("raw", RAW_EDIT_RESPONSES)
@pytest.mark.parametrize(
    ("keep_alive", "client_minor"),
    [(True, 1), (False, 1), (True, 0), (False, 0)],
    ids=["keep-alive", "close", "http10-keep-alive", "http10-close"],
)
def test_raw_response_edit_matches_rebuild(raw: bytes, keep_alive: bool, client_minor: int) -> None:
    from zdlb.http.head import new_response_parser, parse_response_head

    head = parse_response_head(raw, len(raw), new_response_parser(), answers_head=False)
    assert head.hop_lines_only
    edited = rewrite.build_response_head(head, head.framing, keep_alive, client_minor)
    head.is_plain = head.hop_lines_only = False
    rebuilt = rewrite.build_response_head(head, head.framing, keep_alive, client_minor)
    ours, theirs = h11_response(edited + b"ok"), h11_response(rebuilt + b"ok")
    assert ours[0].status_code == theirs[0].status_code  # type: ignore[attr-defined]
    ours_fields = _fields(ours[0].headers)  # type: ignore[attr-defined]
    theirs_fields = _fields(theirs[0].headers)  # type: ignore[attr-defined]
    if keep_alive and client_minor == 1:  # a passed-on "Connection: keep-alive" is harmless
        ours_fields = [f for f in ours_fields if f != (b"connection", b"keep-alive")]
    assert ours_fields == theirs_fields


ADDED = b"Set-Cookie: SERVERID=front-1; Path=/\r\nCache-Control: private\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", id="plain"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n",
            id="hop-lines-only",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: x\r\nX: 1\r\nContent-Length: 2\r\n\r\n",
            id="rebuilt",
        ),
    ],
)
@pytest.mark.parametrize("keep_alive", [True, False], ids=["keep-alive", "close"])
def test_added_lines_follow_the_status_line_on_every_path(raw: bytes, keep_alive: bool) -> None:
    from zdlb.http.head import new_response_parser, parse_response_head

    head = parse_response_head(raw, len(raw), new_response_parser(), answers_head=False)
    out = rewrite.build_response_head(head, head.framing, keep_alive, 1, ADDED)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n" + ADDED)
    assert values(out, b"Set-Cookie") == [b"SERVERID=front-1; Path=/"]
    assert values(out, b"Content-Length") == [b"2"]
    events = h11_response(out + b"ok")
    assert events[1] == h11.Data(data=b"ok")
