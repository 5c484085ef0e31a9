"""Sans-IO HTTP/1.1 message readers: bytes in, head/body/end events out, no sockets.

``RequestReader`` and ``ResponseReader`` wrap llhttp (through httptools), which already rejects
the framing request smuggling lives in: Content-Length together with Transfer-Encoding,
differing or repeated Content-Lengths, a Transfer-Encoding whose last coding is not chunked,
bad chunk sizes, obs-fold, whitespace before the colon, CR/LF/NUL inside values, bare-LF line
ends. On top of that they enforce zdlb's head limits (414/431), demand exactly one Host on
HTTP/1.1 requests (RFC 9112 section 3.2), and translate every parser failure into
``DownstreamProtocolError`` or ``UpstreamProtocolError`` with the status to answer.

Bodies are emitted *decoded* (chunk framing removed); the proxy re-encodes for the other side.
No I/O, no clock, no logging here.
"""

from __future__ import annotations

import enum
from typing import Protocol

import httptools

from zdlb.config.model import Limits
from zdlb.errors import DownstreamProtocolError, UpstreamProtocolError

Headers = list[tuple[bytes, bytes]]

# RFC 9110 section 9.2.2: methods whose repetition has the same effect as one request. Only
# these are replayed on a fresh connection when a pooled one dies before answering.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# A response head from a server may be larger than a request head (cookies, CSP), but a server
# streaming an endless head must not grow our memory: same order as HAProxy's 16 KiB bufsize x4.
DEFAULT_MAX_RESPONSE_HEAD_BYTES = 65536


class Framing(enum.Enum):
    """How a message body is delimited on the wire (RFC 9112 section 6)."""

    NONE = "none"  # no body: GET without length, HEAD responses, 1xx/204/304
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"  # Transfer-Encoding: chunked
    CLOSE = "close"  # responses only: the body ends when the server closes


class RequestHead:
    """A parsed request head. ``headers`` keep wire order and case; values are raw bytes."""

    __slots__ = (
        "content_length",
        "expects_continue",
        "framing",
        "has_host",
        "headers",
        "http_minor",
        "keep_alive",
        "method",
        "target",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        http_minor: int,
        headers: Headers,
        framing: Framing,
        content_length: int | None,
        keep_alive: bool,
        expects_continue: bool,
        has_host: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.http_minor = http_minor
        self.headers = headers
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.expects_continue = expects_continue
        self.has_host = has_host

    @property
    def is_idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS

    def __repr__(self) -> str:
        return (
            f"RequestHead({self.method!r} {self.target!r} HTTP/1.{self.http_minor} "
            f"framing={self.framing.value} keep_alive={self.keep_alive})"
        )


class ResponseHead:
    """A parsed response head from a server."""

    __slots__ = ("content_length", "framing", "headers", "http_minor", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: bytes,
        http_minor: int,
        headers: Headers,
        framing: Framing,
        content_length: int | None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.http_minor = http_minor
        self.headers = headers
        self.framing = framing
        self.content_length = content_length

    @property
    def is_informational(self) -> bool:
        return 100 <= self.status < 200

    def __repr__(self) -> str:
        return f"ResponseHead({self.status} framing={self.framing.value})"


class RequestSink(Protocol):
    """Receives a request reader's events, in wire order, possibly several requests per feed."""

    def request_head(self, head: RequestHead) -> None: ...
    def request_body(self, data: bytes) -> None: ...
    def request_end(self, trailers: Headers) -> None: ...


class ResponseSink(Protocol):
    def response_head(self, head: ResponseHead) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_end(self, trailers: Headers, keep_alive: bool) -> None: ...


class _State(enum.Enum):
    HEAD = "head"  # between messages or inside a head
    BODY = "body"  # head done, body (or trailers) in progress


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if len(name) == 14 and name.lower() == b"content-length":
            return int(value)  # llhttp already proved it is one run of digits
    return None


class RequestReader:
    """Feeds client bytes to llhttp and emits request events to ``sink``.

    ``feed`` raises ``DownstreamProtocolError`` (status 400, 414, 431 or 501) on the first
    violation; the connection must then be answered and closed, never fed again.
    """

    __slots__ = ("_head_bytes", "_headers", "_limits", "_parser", "_sink", "_state", "_target")

    def __init__(self, sink: RequestSink, limits: Limits) -> None:
        self._sink = sink
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._state = _State.HEAD
        self._target = b""
        self._headers: Headers = []
        self._head_bytes = 0

    @property
    def is_idle(self) -> bool:
        """True between requests: no byte of a next request has been seen."""
        return self._state is _State.HEAD and self._head_bytes == 0

    def feed(self, data: bytes) -> None:
        if self._state is _State.HEAD:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, DownstreamProtocolError):
                raise cause from None
            raise
        except httptools.HttpParserUpgrade as exc:
            # CONNECT, or Upgrade (tunnels are a later issue): llhttp stops after the head.
            raise DownstreamProtocolError("upgrade and CONNECT are not supported", 501) from exc
        except httptools.HttpParserError as exc:
            raise DownstreamProtocolError(f"malformed request: {exc}") from None
        if self._state is _State.HEAD and self._head_bytes > self._limits.max_head_bytes:
            status = 431 if self._target else 414
            raise DownstreamProtocolError("request head too large", status)

    # llhttp callbacks; each runs inside feed().
    def on_message_begin(self) -> None:
        self._target = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._target += url  # llhttp may deliver the target in several spans
        if len(self._target) > self._limits.max_line_bytes:
            raise DownstreamProtocolError("request target too long", 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state is _State.BODY:  # a trailer field of a chunked body
            self._headers.append((name, value))
            return
        self._headers.append((name, value))
        if len(self._headers) > self._limits.max_headers:
            raise DownstreamProtocolError("too many header fields", 431)

    def on_headers_complete(self) -> None:
        parser = self._parser
        headers = self._headers
        size = len(self._target) + sum(len(n) + len(v) + 4 for n, v in headers)
        if size > self._limits.max_head_bytes:
            raise DownstreamProtocolError("request head too large", 431)
        http_minor = 1 if parser.get_http_version() == "1.1" else 0
        hosts = 0
        expects_continue = False
        framing = Framing.NONE
        for name, value in headers:
            lname = name.lower()
            if lname == b"host":
                hosts += 1
            elif lname == b"transfer-encoding":
                framing = Framing.CHUNKED  # llhttp refuses any TE not ending in chunked
            elif lname == b"expect" and value.lower() == b"100-continue":
                expects_continue = True
        if hosts > 1 or (hosts == 0 and http_minor == 1):
            raise DownstreamProtocolError("a request needs exactly one Host header")
        content_length = _content_length(headers)
        if framing is Framing.NONE and content_length:
            framing = Framing.LENGTH
        head = RequestHead(
            parser.get_method(),
            self._target,
            http_minor,
            headers,
            framing,
            content_length,
            parser.should_keep_alive(),
            expects_continue,
            hosts == 1,
        )
        self._state = _State.BODY
        self._headers = []
        self._sink.request_head(head)

    def on_body(self, body: bytes) -> None:
        self._sink.request_body(body)

    def on_message_complete(self) -> None:
        trailers = self._headers
        self._headers = []
        self._state = _State.HEAD
        self._head_bytes = 0
        self._sink.request_end(trailers)


class ResponseReader:
    """Feeds server bytes to llhttp and emits response events to ``sink``.

    Raises ``UpstreamProtocolError`` (answer 502) on garbage. llhttp cannot know that a response
    answers HEAD, so the proxy says so with ``expect_response(is_head=True)``; such a response
    ends with its head. A close-delimited body ends when the proxy calls ``feed_eof``.
    """

    __slots__ = (
        "_done",
        "_framing",
        "_head_bytes",
        "_headers",
        "_is_head",
        "_parser",
        "_reason",
        "_state",
        "sink",
    )

    def __init__(self, sink: ResponseSink) -> None:
        self.sink = sink
        self._parser = httptools.HttpResponseParser(self)
        self._state = _State.HEAD
        self._headers: Headers = []
        self._reason = b""
        self._is_head = False
        self._done = False
        self._framing = Framing.NONE
        self._head_bytes = 0

    def expect_response(self, is_head: bool) -> None:
        """Prepare for the response to the request just sent."""
        if self._done:  # the last answer was to HEAD: llhttp still waits for a body
            self._parser = httptools.HttpResponseParser(self)
            self._done = False
        self._is_head = is_head
        self._state = _State.HEAD
        self._head_bytes = 0

    @property
    def in_body(self) -> bool:
        return self._state is _State.BODY

    @property
    def is_close_delimited(self) -> bool:
        return self._state is _State.BODY and self._framing is Framing.CLOSE

    def feed(self, data: bytes) -> None:
        if self._state is _State.HEAD:
            self._head_bytes += len(data)
            if self._head_bytes > DEFAULT_MAX_RESPONSE_HEAD_BYTES:
                raise UpstreamProtocolError("response head too large")
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, UpstreamProtocolError):
                raise cause from None
            raise
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            raise UpstreamProtocolError(f"malformed response: {exc}") from None

    def feed_eof(self) -> bool:
        """The server closed. True if that ended a close-delimited body (a complete response)."""
        if self.is_close_delimited:
            self._state = _State.HEAD
            self.sink.response_end([], False)
            return True
        return False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        headers = self._headers
        self._headers = []
        content_length = _content_length(headers)
        framing = Framing.CLOSE
        if status < 200 or status in (204, 304) or self._is_head:
            framing = Framing.NONE
        elif content_length is not None:
            framing = Framing.LENGTH if content_length else Framing.NONE
        else:
            for name, _ in headers:
                if name.lower() == b"transfer-encoding":
                    framing = Framing.CHUNKED
        if status == 101:
            raise UpstreamProtocolError("server switched protocols without being asked")
        http_minor = 1 if parser.get_http_version() == "1.1" else 0
        self._framing = framing
        self._state = _State.BODY
        head = ResponseHead(status, self._reason, http_minor, headers, framing, content_length)
        self.sink.response_head(head)
        if self._is_head and status >= 200:
            self._done = True  # llhttp would wait for Content-Length bytes that never come
            self._state = _State.HEAD
            self.sink.response_end([], parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if not self._done:
            self.sink.response_body(body)

    def on_message_complete(self) -> None:
        trailers = self._headers
        self._headers = []
        self._state = _State.HEAD
        self._head_bytes = 0
        if self._done or self._parser.get_status_code() < 200:
            return  # a HEAD answer already ended, or a 1xx: the final response follows
        self.sink.response_end(trailers, self._parser.should_keep_alive())
