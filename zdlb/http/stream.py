"""Sans-IO HTTP/1.1 message streams: bytes in, head/body/end events out, no sockets.

``RequestReader`` and ``ResponseReader`` split a connection's byte stream into messages: a head
runs up to CRLF CRLF (validated whole by head.py), then a body framed by Content-Length, by the
chunked coding (chunked.py) or, for responses, by the server closing. zdlb frames bodies itself
because llhttp reports no offsets: only this way does it know where one message ends and the
next pipelined one begins. Bodies are emitted decoded; the proxy re-encodes for the other side.

A request reader stops at every message boundary (h11's PAUSED state): once a request has
ended, whatever follows is only kept (``held``) until the connection, done answering, calls
``resume``. Pipelined requests therefore wait in the reader as bytes, never as queued events,
and are answered in order (RFC 9112 section 9.3.2); a bad request pipelined behind a good one
is refused only after the good one's answer. After a request whose Upgrade zdlb forwards, the
held bytes may belong to another protocol: the connection either hands them to the tunnel (a
``101``) or, if the server refused the upgrade, never parses them. After the ``101`` itself,
the response reader hands every byte over unparsed.

Memory is bounded: a head that arrives in pieces is kept in one bytearray and scanned only from
where the last scan stopped (linear, not quadratic: h11's receivebuffer lesson), and refused
once past its limit; chunk lines and trailers are bounded by chunked.py; held bytes are at
most what arrives before the connection pauses its transport (one read, or two).
No I/O, no clock, no logging here.
"""

from __future__ import annotations

import enum
from typing import Protocol

import httptools

from zdlb.config.model import Limits
from zdlb.errors import DownstreamProtocolError, ProtocolError, UpstreamProtocolError
from zdlb.http.chunked import ChunkedDecoder
from zdlb.http.head import (
    BY_LENGTH,
    DEFAULT_MAX_RESPONSE_FIELDS,
    DEFAULT_MAX_RESPONSE_HEAD_BYTES,
    NO_BODY,
    Framing,
    Headers,
    RequestHead,
    RequestHeadParser,
    ResponseHead,
    new_response_parser,
    parse_response_head,
)

_HEAD_END = b"\r\n\r\n"


class RequestSink(Protocol):
    """Receives a request reader's events, in wire order. A head without a body (framing
    ``NONE``) is the whole request: no ``request_end`` follows it (one call less per GET)."""

    def request_head(self, head: RequestHead) -> None: ...
    def request_body(self, data: bytes) -> None: ...
    def request_end(self, trailers: Headers) -> None: ...


class ResponseSink(Protocol):
    """Receives a response reader's events. ``response_complete`` stands for a head, its
    whole Content-Length body and its end, when all of it came in one read (most responses:
    one call instead of three)."""

    def response_head(self, head: ResponseHead) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_end(self, trailers: Headers, keep_alive: bool) -> None: ...
    def response_complete(self, head: ResponseHead, body: bytes) -> None: ...


class _DetachedSink:
    """Where a reader whose connection closed sends events: nowhere."""

    def request_head(self, head: RequestHead) -> None:
        pass

    def request_body(self, data: bytes) -> None:
        pass

    def request_end(self, trailers: Headers) -> None:
        pass


_DETACHED = _DetachedSink()


class _State(enum.Enum):
    HEAD = "head"  # between messages or inside a head
    LENGTH = "length"  # a Content-Length body
    CHUNKED = "chunked"  # a chunked body
    CLOSE = "close"  # a body that ends when the server closes (responses only)
    DONE = "done"  # nothing more may follow (a response, or a request that closes)
    PAUSED = "paused"  # a request ended: what follows is held until resume()
    SWITCHING = "switching"  # after a 101: every byte goes to the sink raw, not parsed


# The states as module constants: an attribute of an Enum class costs ~60 ns on CPython 3.11, a
# global ~3 ns (see exchange.py's phases), and each read tests the state a few times.
_HEAD, _LENGTH, _CHUNKED, _CLOSE, _DONE, _PAUSED, _SWITCHING = _State


def check_line_ends(chunk: bytes, error: type[ProtocolError]) -> None:
    """Refuse a bare CR or LF in a head still arriving: without it, "\\n\\n" would never end a
    head and the connection would wait for CRLF CRLF until its limit (RFC 9112 section 2.2)."""
    tail = chunk[:-1] if chunk.endswith(b"\r") else chunk  # its LF may be in the next read
    crlf = tail.count(b"\r\n")
    if tail.count(b"\n") != crlf or tail.count(b"\r") != crlf:
        raise error("bare CR or LF in a head")


class _HeadBuffer:
    """The start of a head that arrived without its end, kept until CRLF CRLF shows up."""

    __slots__ = ("_error", "_scan_from", "buf")

    def __init__(self, error: type[ProtocolError]) -> None:
        # Tested for emptiness on every read: a plain bytearray attribute, not __len__, which
        # would cost a Python call each time.
        self.buf = bytearray()
        self._scan_from = 0
        self._error = error

    def add(self, data: bytes) -> bytes | None:
        """Append ``data``; return everything buffered once it holds a whole head, else None."""
        buf = self.buf
        old = len(buf)
        buf += data
        if buf.find(_HEAD_END, self._scan_from) < 0:
            self._scan_from = max(0, len(buf) - 3)
            # Check only what is new, plus a CR left pending at the end of the last read.
            start = old - 1 if old and buf[old - 1] == 0x0D else old
            check_line_ends(bytes(buf[start:]), self._error)
            return None
        joined = bytes(buf)
        self.clear()
        return joined

    def split(self, data: bytes, pos: int, skip_crlf: bool) -> tuple[bytes | None, bytes, int]:
        """The next whole head in what is buffered plus ``data[pos:]``: ``(head, source, end)``
        where ``source[end:]`` is what follows it; ``(None, data, len(data))`` and everything
        kept when the head is not complete yet. ``skip_crlf`` drops empty lines before a request
        line (RFC 9112 section 2.2)."""
        if self.buf:
            joined = self.add(data[pos:] if pos else data)
            if joined is None:
                return None, data, len(data)
            data, pos = joined, 0
        while skip_crlf and data.startswith(b"\r\n", pos):
            pos += 2
        head_end = data.find(_HEAD_END, pos)
        if head_end < 0:
            if pos < len(data):
                self.add(data[pos:] if pos else data)
            return None, data, len(data)
        head_end += 4
        head = data if pos == 0 and head_end == len(data) else data[pos:head_end]
        return head, data, head_end

    def has_line_end(self) -> bool:
        return b"\r\n" in self.buf

    def clear(self) -> None:
        self.buf.clear()
        self._scan_from = 0


class RequestReader:
    """Splits client bytes into requests and emits their events to ``sink``.

    ``feed`` raises ``DownstreamProtocolError`` (400, 414, 431, 501 or 505) on the first
    violation; the connection must then be answered and closed, never fed again. After each
    request's end the reader is paused (``is_paused``) and holds what follows until ``resume``
    (or a ``feed`` that resumes).
    Bytes after a request that closes the connection are ignored (RFC 9112 section 9.6).
    """

    __slots__ = (
        "_chunked",
        "_head_parser",
        "_is_upgrade",
        "_keep_alive",
        "_limits",
        "_partial",
        "_remaining",
        "_sink",
        "_state",
        "bytes_read",
        "held",
    )

    def __init__(
        self, sink: RequestSink, limits: Limits, head_parser: RequestHeadParser | None = None
    ) -> None:
        # Bytes fed so far: the connection publishes and resets it once per exchange (a len()
        # per read saved: feed measures every read anyway).
        self.bytes_read = 0
        self._sink = sink
        self._limits = limits
        # Shared by the listener's connections (see RequestHeadParser), or this reader's own.
        self._head_parser = head_parser or RequestHeadParser(limits)
        self._state = _HEAD
        # The start of a head that came without its end; None between heads. Made only when
        # needed (~120 bytes that 5,000 idle keep-alive connections need not hold).
        self._partial: _HeadBuffer | None = None
        self._remaining = 0  # Content-Length bytes still to come
        self._chunked: ChunkedDecoder | None = None
        self._keep_alive = True
        self._is_upgrade = False
        # Bytes after the last request's end, unparsed until resume(). Immutable, so idle
        # connections share the empty one; holding is rare and bounded (stream docstring).
        self.held = b""

    @property
    def is_idle(self) -> bool:
        """True between requests: no byte of a next request has been seen."""
        return self._state in (_HEAD, _DONE, _PAUSED) and self._partial is None and not self.held

    @property
    def is_paused(self) -> bool:
        """A request ended and ``resume`` was not called yet."""
        return self._state is _PAUSED

    def resume(self) -> None:
        """Go on with the next request: parse what was held (events may follow at once).
        Raises as ``feed``."""
        self._state = _HEAD
        held = self.held
        if held:
            self.held = b""
            self.feed(held)

    def take_held(self) -> bytes:
        """What was held past the last request, handed over (to a tunnel) and forgotten."""
        held, self.held = self.held, b""
        return held

    def detach(self) -> None:
        """Forget the sink (the connection is gone): breaks the reader <-> sink cycle."""
        self._sink = _DETACHED

    def feed(self, data: bytes, resume: bool = False) -> None:
        """Parse ``data``; events go to the sink. ``resume``: the caller is done with the last
        request and nothing was held (``held`` is empty): ``resume()`` first, in the same call
        (a keep-alive connection's next request costs one call, not two)."""
        if resume:
            assert not self.held, "resume() parses held bytes first"
            self._state = _HEAD
        if self._state is _HEAD and self._partial is None:
            # The common read: exactly one whole head, nothing before or after it (a slice of
            # at most one byte past it says so: no len() call).
            size = data.find(_HEAD_END) + 4
            if size > 4 and not data[size : size + 1] and data[0] != 0x0D:
                self.bytes_read += size
                head = self._head_parser.parse(data, size)
                if head.framing is NO_BODY:  # the whole request (_start_body, inlined)
                    if head.keep_alive or head.upgrade is not None:
                        self._state = _PAUSED
                    else:
                        self._state = _DONE
                    self._sink.request_head(head)
                else:
                    self._start_body(head)
                return
        pos = 0
        end = len(data)
        self.bytes_read += end
        sink = self._sink
        while pos < end:
            state = self._state
            if state is _HEAD:
                partial = self._partial
                if partial is None:
                    partial = self._partial = _HeadBuffer(DownstreamProtocolError)
                raw, data, pos = partial.split(data, pos, skip_crlf=True)
                end = len(data)
                if raw is None:
                    self._check_partial(partial)
                    return
                if not partial.buf:
                    self._partial = None
                self._start_body(self._head_parser.parse(raw, len(raw)))
            elif state is _LENGTH:
                take = min(self._remaining, end - pos)
                sink.request_body(data if pos == 0 and take == end else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._end([])
            elif state is _CHUNKED:
                decoder = self._chunked
                assert decoder is not None
                pos = decoder.feed(data, pos, sink.request_body)
                if decoder.is_done:
                    self._chunked = None
                    self._end(decoder.trailers)
            elif state is _PAUSED:
                self.held += data[pos:] if pos else data
                return
            else:
                return  # after a request that closes the connection: never processed

    @property
    def remaining_body(self) -> int:
        """Content-Length bytes of the current body not read yet (0 outside such a body)."""
        return self._remaining if self._state is _LENGTH else 0

    def body_moved(self, size: int) -> None:
        """``size`` bytes of the body went around the reader (http/splice.py); ends the request
        at its end."""
        self._remaining -= size
        if not self._remaining:
            self._end([])

    def _start_body(self, head: RequestHead) -> None:
        """Set the state for what follows ``head``, then emit it: the sink may resume this
        reader from inside ``request_head`` (an answer decided at once)."""
        self._keep_alive = head.keep_alive
        self._is_upgrade = head.upgrade is not None
        match head.framing:
            case Framing.NONE:
                self._state = _PAUSED if head.keep_alive or head.upgrade is not None else _DONE
            case Framing.LENGTH:
                self._remaining = head.content_length or 0
                self._state = _LENGTH
            case Framing.CHUNKED:
                limits = self._limits
                self._chunked = ChunkedDecoder(
                    DownstreamProtocolError, 431, limits.max_head_bytes, limits.max_headers
                )
                self._state = _CHUNKED
            case Framing.CLOSE:
                raise AssertionError("requests are never close-delimited")
        self._sink.request_head(head)

    def _end(self, trailers: Headers) -> None:
        self._state = _PAUSED if self._keep_alive or self._is_upgrade else _DONE
        self._sink.request_end(trailers)

    def _check_partial(self, partial: _HeadBuffer) -> None:
        limits = self._limits
        size = len(partial.buf)
        if size > limits.max_line_bytes and not partial.has_line_end():
            raise DownstreamProtocolError("request line too long", 414)
        if size > limits.max_head_bytes:
            raise DownstreamProtocolError("request head too large", 431)


class ResponseReader:
    """Splits server bytes into responses and emits their events to ``sink``.

    Raises ``UpstreamProtocolError`` (answer 502) on garbage. Only the proxy knows that a
    response answers HEAD, so it says so with ``expect_response(is_head=True)``; such a
    response ends with its head. A close-delimited body ends when the proxy calls ``feed_eof``.
    After a ``101`` to an upgrade request (``expect_response(is_upgrade=True)``), every byte
    that follows goes to ``response_body`` unparsed: it is the new protocol's.
    """

    __slots__ = (
        "_chunked",
        "_is_head",
        "_is_upgrade",
        "_keep_alive",
        "_llhttp",
        "_partial",
        "_remaining",
        "_state",
        "sink",
    )

    def __init__(self, sink: ResponseSink) -> None:
        self.sink = sink
        self._state = _DONE
        self._partial = _HeadBuffer(UpstreamProtocolError)
        self._remaining = 0
        self._chunked: ChunkedDecoder | None = None
        self._is_head = False
        self._is_upgrade = False
        self._keep_alive = False
        # One llhttp parser per connection, reused while it sees whole messages (Content-Length
        # bodies are fed through it too): creating one costs ~0.3 us per response.
        self._llhttp: httptools.HttpResponseParser | None = None

    def expect_response(self, is_head: bool, is_upgrade: bool = False) -> None:
        """Prepare for the response to the request just sent."""
        self._is_head = is_head
        self._is_upgrade = is_upgrade
        self._state = _HEAD
        if self._partial.buf:
            self._partial.clear()

    @property
    def in_body(self) -> bool:
        return self._state in (_LENGTH, _CHUNKED, _CLOSE)

    @property
    def is_close_delimited(self) -> bool:
        return self._state is _CLOSE

    @property
    def remaining_body(self) -> int:
        """Content-Length bytes of the current body not read yet (0 outside such a body)."""
        return self._remaining if self._state is _LENGTH else 0

    def take_body(self) -> int:
        """Content-Length bytes of the current body not read yet, which the caller will move
        itself (http/splice.py) and report with ``body_moved``; 0 if not in such a body."""
        if self._state is not _LENGTH:
            return 0
        self._llhttp = None  # it will not see these bytes: no reuse for the next response
        return self._remaining

    def body_moved(self, size: int) -> None:
        """``size`` bytes of the body went around the reader; ends the response at its end."""
        self._remaining -= size
        if not self._remaining:
            self._end([])

    def feed_eof(self) -> bool:
        """The server closed. True if that ended a close-delimited body (a complete response)."""
        if self._state is _CLOSE:
            self._state = _DONE
            self.sink.response_end([], False)
            return True
        return False

    def feed(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        if self._state is _HEAD and not self._partial.buf:
            # The common read: a whole final head first (16 bytes at least: "HTTP/1.1 200" and
            # two CRLFs). A "1xx" one, and anything shorter, take the general path below.
            size = data.find(_HEAD_END) + 4
            if size >= 16 and data[9] != 0x31:
                parser = self._llhttp or new_response_parser()
                self._llhttp = None  # until this head proves valid and its body is fed through
                raw = data if size == end else data[:size]
                head = parse_response_head(raw, size, parser, self._is_head, self._is_upgrade)
                framing = head.framing
                if (framing is BY_LENGTH and head.content_length == end - size) or (
                    framing is NO_BODY and size == end
                ):
                    body = data[size:] if framing is BY_LENGTH else b""
                    if body:
                        parser.feed_data(body)  # keeps it at a message boundary for reuse
                    # A HEAD answer's Content-Length told llhttp of a body that never comes.
                    self._llhttp = None if self._is_head else parser
                    self._state = _DONE
                    self.sink.response_complete(head, body)
                    return
                self._start_response(head, parser)
                pos = size
        while pos < end:
            state = self._state
            if state is _HEAD:
                head_raw, data, pos = self._partial.split(data, pos, skip_crlf=False)
                end = len(data)
                if head_raw is None:
                    self._check_partial()
                    return
                self._on_head(head_raw)
            elif state is _LENGTH:
                take = min(self._remaining, end - pos)
                body = data if pos == 0 and take == end else data[pos : pos + take]
                if self._llhttp is not None:
                    self._llhttp.feed_data(body)  # keeps it at a message boundary for reuse
                self.sink.response_body(body)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._end([])
            elif state is _CHUNKED:
                decoder = self._chunked
                assert decoder is not None
                pos = decoder.feed(data, pos, self.sink.response_body)
                if decoder.is_done:
                    self._chunked = None
                    self._end(decoder.trailers)
            elif state is _CLOSE or state is _SWITCHING:
                self.sink.response_body(data[pos:] if pos else data)
                return
            else:
                raise UpstreamProtocolError("bytes after the end of a response")

    def _on_head(self, raw: bytes) -> None:
        parser = self._llhttp or new_response_parser()
        self._llhttp = None  # until this head proves valid and its body is fed through
        head = parse_response_head(raw, len(raw), parser, self._is_head, self._is_upgrade)
        self._start_response(head, parser)

    def _start_response(self, head: ResponseHead, parser: httptools.HttpResponseParser) -> None:
        """Set the state for what follows a validated head, and emit it."""
        if head.status == 101:  # only to an upgrade request: the connection switched
            self._state = _SWITCHING
            self.sink.response_head(head)
            return
        framing = head.framing
        if framing is BY_LENGTH or (framing is NO_BODY and not self._is_head):
            self._llhttp = parser
        if head.status < 200:  # 1xx
            self.sink.response_head(head)  # the final response follows in the same stream
            return
        self._keep_alive = head.keep_alive
        self.sink.response_head(head)
        match head.framing:
            case Framing.LENGTH:
                self._remaining = head.content_length or 0
                self._state = _LENGTH
            case Framing.CHUNKED:
                self._chunked = ChunkedDecoder(
                    UpstreamProtocolError,
                    502,
                    DEFAULT_MAX_RESPONSE_HEAD_BYTES,
                    DEFAULT_MAX_RESPONSE_FIELDS,
                )
                self._state = _CHUNKED
            case Framing.CLOSE:
                self._state = _CLOSE
            case Framing.NONE:
                self._end([])

    def _end(self, trailers: Headers) -> None:
        self._state = _DONE
        self.sink.response_end(trailers, self._keep_alive)

    def _check_partial(self) -> None:
        if len(self._partial.buf) > DEFAULT_MAX_RESPONSE_HEAD_BYTES:
            raise UpstreamProtocolError("response head too large")
