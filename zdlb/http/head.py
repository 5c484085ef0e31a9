"""Sans-IO HTTP/1.1 heads: validate one complete head, read what framing and routing need.

A head reaches this module whole (``stream.py`` splits the byte stream at CRLF CRLF). llhttp,
through httptools, validates it and rejects the framing request smuggling lives in: Content-Length
together with Transfer-Encoding, repeated Content-Lengths, a request Transfer-Encoding not ending
in chunked, obs-fold, whitespace before the colon, CR/LF/NUL inside values, bare-LF line ends.
On top of that zdlb refuses what it cannot forward faithfully: codings other than plain
``chunked`` (501), HTTP versions other than 1.0/1.1 (505), CONNECT (501), a missing or
repeated Host on HTTP/1.1 (RFC 9112 section 3.2), framing fields spelled with an underscore
(CGI-style servers read ``_`` as ``-``), and its own limits (414/431).

Upgrade (RFC 9110 section 7.8) is honoured only on a bodiless HTTP/1.1 GET whose Connection
names ``upgrade`` (``RequestHead.upgrade``): that is every WebSocket handshake (RFC 6455 section
4.1), and a request without a body leaves no bytes whose framing could be read two ways when the
connection switches. Anywhere else (HTTP/1.0, which must ignore it, a body, another method)
Upgrade is stripped as hop-by-hop and the request proxied as plain HTTP.

Why whole heads: the head is then one bytes object that is forwarded as it is when no field
needs editing, instead of being rebuilt from one Python callback per field. Measured here:
callback parsing plus rebuilding cost ~6 us per request and ~9 us per response; split + llhttp
validation + one regex pass costs ~2 us each (PERFORMANCE.md: "parse only framing, routing and
the cookie; forward raw bytes"). No I/O, no clock, no logging here.
"""

from __future__ import annotations

import enum
import re

import httptools

from zdlb.config.model import Limits
from zdlb.errors import DownstreamProtocolError, UpstreamProtocolError

Headers = list[tuple[bytes, bytes]]

# RFC 9110 section 9.2.2: methods whose repetition has the same effect as one request. Only
# these are replayed on a fresh connection when a pooled one dies before answering.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# A response head may be larger than a request head (cookies, CSP), but a server streaming an
# endless head must not grow our memory: 4x HAProxy's default 16 KiB buffer.
DEFAULT_MAX_RESPONSE_HEAD_BYTES = 65536
# Trailer fields of a chunked response; a server sending more is broken or hostile. HAProxy's
# default tune.http.maxhdr is 101. (Response heads are bounded by their size alone.)
DEFAULT_MAX_RESPONSE_FIELDS = 200

# The fields zdlb must look at or may have to edit; anything else passes through untouched.
# llhttp has already refused whitespace before the colon, so "\r\nname:" is exact.
# The lookahead on their first letters lets every other line fail at its first byte: 0.67 ->
# 0.49 us for an nginx response head (Server, Date, Content-Type...), timeit on this box.
_NOTABLE_FIELD = re.compile(
    rb"\n(?=[CcTtKkPpUuXxEeHh])"
    rb"(content[-_]length|transfer[-_]encoding|connection|keep-alive|proxy-connection|te"
    rb"|trailer|upgrade|x-forwarded-for|x-forwarded-proto|expect|host):[ \t]*([^\r]*)\r",
    re.IGNORECASE,
)  # values keep trailing whitespace (stripped where used): a lazy match measured 2.5x slower
_FIELD_LINE = re.compile(rb"([^:\r\n]+):[ \t]*([^\r\n]*?)[ \t]*\r\n")
# The request line as zdlb forwards it: one space each side of the target, HTTP/1.0 or 1.1.
# llhttp already checked the method and the target's characters, but tolerates runs of spaces.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^ \r\n]+) HTTP/1\.([01])\r\n")
# How servers and clients spell the fields of the fast paths: a set lookup is no Python call,
# ``name.lower()`` is one per field. Any other spelling takes the general path, which lowers.
_HOST_SPELLINGS = frozenset({b"Host", b"host", b"HOST"})
_CONTENT_LENGTH_SPELLINGS = frozenset({b"Content-Length", b"content-length", b"Content-length"})
_CONNECTION_SPELLINGS = frozenset({b"Connection", b"connection"})
_KEEP_ALIVE_SPELLINGS = frozenset({b"keep-alive", b"Keep-Alive", b"Keep-alive"})


class Framing(enum.Enum):
    """How a message body is delimited on the wire (RFC 9112 section 6)."""

    NONE = "none"  # no body: GET without length, HEAD responses, 1xx/204/304
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"  # Transfer-Encoding: chunked
    CLOSE = "close"  # responses only: the body ends when the server closes


# The framings as module constants, for the hot paths: an attribute of an Enum class costs ~60
# ns on CPython 3.11, a global ~3 ns (see exchange.py's phases).
NO_BODY, BY_LENGTH, CHUNKED, BY_CLOSE = Framing


def parse_fields(raw_head: bytes) -> Headers:
    """Every header field of a validated head, in wire order, names and values as sent."""
    start = raw_head.find(b"\r\n") + 2
    return [(m.group(1), m.group(2)) for m in _FIELD_LINE.finditer(raw_head, start)]


def _codings(values: list[bytes]) -> list[bytes]:
    """Transfer codings of every Transfer-Encoding field, in order, lower-cased, empty list
    elements dropped (RFC 9110 section 5.6.1)."""
    return [c for v in values for c in (t.strip().lower() for t in v.split(b",")) if c]


class _Head:
    """What both heads share: the raw bytes, and the fields parsed from them when asked.

    ``raw`` may be replaced by an edit that keeps every notable field (a cookie cut, a header
    rule): a plain attribute, so such an edit costs no call. ``headers`` is parsed from ``raw``
    on every read, not cached (a cache would need invalidating on each edit): the fast paths
    forward ``raw`` and never read it; the rebuilds read it once."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    @property
    def headers(self) -> Headers:
        return parse_fields(self.raw)


class RequestHead(_Head):
    """A validated request head. ``raw`` is the head as received, final CRLF CRLF included.

    ``is_plain``: no field zdlb must edit is present (only Host), so the head is forwarded as
    it is with X-Forwarded-* appended. ``hop_lines_only``: the only edit needed is dropping
    Connection (naming only close/keep-alive) and Keep-Alive lines, done on the raw bytes.
    """

    __slots__ = (
        "content_length",
        "expects_continue",
        "framing",
        "has_host",
        "hop_lines_only",
        "host",
        "http_minor",
        "is_plain",
        "keep_alive",
        "method",
        "target",
        "upgrade",
    )

    def __init__(
        self,
        raw: bytes,
        method: bytes,
        target: bytes,
        http_minor: int,
        framing: Framing,
        content_length: int | None,
        keep_alive: bool,
        expects_continue: bool = False,
        has_host: bool = True,
        is_plain: bool = False,
        hop_lines_only: bool = False,
        upgrade: bytes | None = None,
        host: bytes = b"",
    ) -> None:
        # _Head's field set here, not through _Head.__init__: one call less per request.
        self.raw = raw
        self.host = host  # the Host value as sent (trailing whitespace kept), b"" without one
        self.upgrade = upgrade  # the Upgrade value when zdlb forwards the upgrade, else None
        self.method = method
        self.target = target
        self.http_minor = http_minor
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.expects_continue = expects_continue
        self.has_host = has_host
        self.is_plain = is_plain
        self.hop_lines_only = hop_lines_only or is_plain

    @property
    def is_idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS

    def __repr__(self) -> str:
        return (
            f"RequestHead({self.method!r} {self.target!r} HTTP/1.{self.http_minor} "
            f"framing={self.framing.value} keep_alive={self.keep_alive})"
        )


class ResponseHead(_Head):
    """A validated response head. ``is_plain``: among hop-by-hop and framing fields only
    Content-Length and ``Connection: keep-alive``, so it may be forwarded as it is.
    ``hop_lines_only``: besides, only Connection (close/keep-alive) and Keep-Alive lines."""

    __slots__ = (
        "content_length",
        "framing",
        "hop_lines_only",
        "http_minor",
        "is_plain",
        "keep_alive",
        "status",
    )

    def __init__(
        self,
        raw: bytes,
        status: int,
        http_minor: int,
        framing: Framing,
        content_length: int | None,
        keep_alive: bool,
        is_plain: bool = False,
        hop_lines_only: bool = False,
    ) -> None:
        self.raw = raw  # as RequestHead: _Head's field set here
        self.status = status
        self.http_minor = http_minor
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.is_plain = is_plain
        self.hop_lines_only = hop_lines_only or is_plain

    @property
    def line_end(self) -> int:
        """Where the status line's CRLF starts (a cookie is inserted after it). Searched on
        each read, not at parse time: an answer forwarded as it came never needs it."""
        return self.raw.find(b"\r\n")

    @property
    def reason(self) -> bytes:
        # llhttp proved a space before any reason. No empty slice with end < start: mypyc's
        # bytes slice passes end - start unclamped to PyBytes_FromStringAndSize (SystemError).
        raw = self.raw
        end = raw.find(b"\r\n")
        return raw[13:end] if end > 13 else b""

    @property
    def is_informational(self) -> bool:
        return 100 <= self.status < 200

    def __repr__(self) -> str:
        return f"ResponseHead({self.status} framing={self.framing.value})"


def is_persistent(http_minor: int, connection: list[bytes]) -> bool:
    """RFC 9112 section 9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with
    "keep-alive". (llhttp's should_keep_alive() is reset once a message completes.)"""
    if not connection:
        return http_minor == 1
    tokens = _connection_tokens(connection)
    if b"close" in tokens:
        return False
    return http_minor == 1 or b"keep-alive" in tokens


# Fields a raw edit of the head copes with: kept as they are (Host, Content-Length) or dropped
# whole (Connection, Keep-Alive). Anything else notable needs the head rebuilt.
_RAW_EDITABLE = frozenset({b"host", b"content-length", b"connection", b"keep-alive"})
_PERSISTENCE_TOKENS = frozenset({b"close", b"keep-alive"})


def _names_only_persistence(connection: list[bytes]) -> bool:
    """True if Connection names no other field (whose line would have to go too)."""
    return not connection or _connection_tokens(connection) <= _PERSISTENCE_TOKENS


def _connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    return frozenset(t.strip().lower() for v in values for t in v.split(b","))


class _NoCallbacks:
    """llhttp needs a protocol object; zdlb wants no Python call per field."""

    __slots__ = ()


_NO_CALLBACKS = _NoCallbacks()


class RequestHeadParser:
    """Validates request heads, reusing one llhttp parser while it can.

    One may serve every connection of a listener (http/route.py): each ``parse`` feeds one
    whole head and returns with the parser back at a message start, or without a parser (after
    a head that announces a body, a close, an upgrade, or an error), and the event loop never
    runs two parses at once. Per connection, llhttp's parser was ~530 bytes of every idle
    keep-alive connection and one allocation per accepted connection.
    """

    __slots__ = ("_limits", "_parser")

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._parser: httptools.HttpRequestParser | None = None

    def parse(self, raw: bytes, size: int) -> RequestHead:
        """Validate ``raw`` (a whole head of ``size`` bytes). Raises DownstreamProtocolError:
        400, 414, 431, 501, 505.

        The hot path of every request, ~8 Python calls for a plain GET: one llhttp pass, one
        regex match for the request line, one regex pass over the fields. Fields are not split
        out. What llhttp lets through but zdlb refuses is checked after it.
        """
        limits = self._limits
        if size > limits.max_head_bytes:
            raise DownstreamProtocolError("request head too large", 431)
        # A field line takes at least 4 bytes ("a:" CRLF): a head shorter than that many lines
        # cannot hold too many fields, and the count is skipped (one call less for most heads).
        if size > 4 * limits.max_headers and raw.count(b"\r\n") - 2 > limits.max_headers:
            raise DownstreamProtocolError("too many header fields", 431)
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(_NO_CALLBACKS)
        try:
            parser.feed_data(raw)
        except httptools.HttpParserUpgrade as exc:
            # CONNECT, or Connection: upgrade + Upgrade. llhttp pauses only once the whole head
            # was validated, so an Upgrade head is as checked as any other; the parser cannot
            # go on past the pause, hence a new one for the next request.
            self._parser = None
            if raw.startswith(b"CONNECT "):  # a forward proxy's job, not a load balancer's
                raise DownstreamProtocolError("CONNECT is not supported", 501) from exc
        except httptools.HttpParserError as exc:
            self._parser = None
            raise DownstreamProtocolError(f"malformed request: {exc}") from None
        line = _REQUEST_LINE.match(raw)
        if line is None:
            self._parser = None  # llhttp took a head zdlb refuses: no state to build on
            raise _request_line_error(raw)
        method, target = line[1], line[2]
        # A head shorter than the line limit cannot hold a target over it: no len() then.
        if size > limits.max_line_bytes and len(target) > limits.max_line_bytes:
            self._parser = None
            raise DownstreamProtocolError("request target too long", 414)
        fields = _NOTABLE_FIELD.findall(raw)
        try:
            if target[:1] != b"/":  # not origin-form: rare, never on the hot path
                raw, target = _origin_form(raw, method, target, line.end(2), fields)
            http_minor = 1 if line[3] == b"1" else 0
            match fields:
                case [(name, host)] if http_minor and name in _HOST_SPELLINGS:
                    # The common case: only Host: nothing to edit, no body, persistent. Every
                    # argument positional: a keyword one cost 0.17 us a call (timeit).
                    return RequestHead(
                        raw,
                        method,
                        target,
                        1,
                        NO_BODY,
                        None,
                        True,
                        False,
                        True,
                        True,
                        True,
                        None,
                        host,
                    )
            return self._parse_fields(raw, method, target, http_minor, fields)
        except DownstreamProtocolError:
            self._parser = None
            raise

    def _parse_fields(
        self,
        raw: bytes,
        method: bytes,
        target: bytes,
        http_minor: int,
        fields: list[tuple[bytes, bytes]],
    ) -> RequestHead:
        """The general case: framing, persistence and the other notable fields."""
        hosts = 0
        host = b""
        content_length: int | None = None
        codings: list[bytes] = []
        connection: list[bytes] = []
        expects_continue = False
        upgrade: list[bytes] = []
        editable = 0  # fields that a raw edit cannot handle
        for name, value in fields:
            lname = name.lower()
            if lname not in _RAW_EDITABLE:
                editable += 1
            if lname == b"host":
                hosts += 1
                host = value
            elif lname == b"upgrade":
                upgrade.append(value.rstrip())
            elif lname == b"content-length":
                content_length = int(value)  # llhttp proved: digits, and only one such field
            elif lname == b"transfer-encoding":
                codings.append(value)
            elif lname == b"expect":
                expects_continue = value.rstrip().lower() == b"100-continue"
            elif lname == b"connection":
                connection.append(value)
            elif lname == b"transfer_encoding" or lname == b"content_length":
                # Not framing to llhttp, but servers that see headers through a CGI-style
                # environ (HTTP_TRANSFER_ENCODING) read "_" as "-" and would frame by it.
                raise DownstreamProtocolError("framing field name spelled with an underscore")
        if hosts != 1 and (hosts or http_minor == 1):
            raise DownstreamProtocolError("a request needs exactly one Host header")
        framing = Framing.LENGTH if content_length else Framing.NONE
        if codings:
            codings = _codings(codings)
            if codings[-1:] != [b"chunked"]:
                raise DownstreamProtocolError("Transfer-Encoding does not end in chunked")
            if codings != [b"chunked"]:
                # RFC 9112 section 6.1: a coding the proxy cannot pass on faithfully is a 501.
                raise DownstreamProtocolError("only Transfer-Encoding: chunked is supported", 501)
            framing = Framing.CHUNKED
        persistent = is_persistent(http_minor, connection)
        if framing is not Framing.NONE or not persistent:
            # llhttp now waits for a body that stream.py frames itself, or, after a close,
            # refuses any further byte: the next head needs a new parser.
            self._parser = None
        return RequestHead(
            raw,
            method,
            target,
            http_minor,
            framing,
            content_length,
            persistent,
            expects_continue,
            hosts == 1,
            http_minor == 1 and len(fields) == hosts,
            hosts == 1 and not editable and _names_only_persistence(connection),
            _honoured_upgrade(method, http_minor, framing, connection, upgrade),
            host,
        )


def _request_line_error(raw: bytes) -> DownstreamProtocolError:
    """Why llhttp's request line is not one zdlb forwards: an HTTP version other than 1.0 and
    1.1 (llhttp also takes "GET /", HTTP/0.9, and "HTTP/2.0": RFC 9112 section 2.3), or an
    ambiguous shape (runs of spaces, a stray CR before the method: section 3)."""
    line_end = raw.find(b"\r\n")
    # line_end < 9 first: a slice with end < start raises SystemError under mypyc (see reason).
    if line_end < 9 or raw[line_end - 9 : line_end] not in (b" HTTP/1.1", b" HTTP/1.0"):
        return DownstreamProtocolError("only HTTP/1.0 and HTTP/1.1 are supported", 505)
    return DownstreamProtocolError("malformed request line")


def _origin_form(
    raw: bytes, method: bytes, target: bytes, target_end: int, fields: list[tuple[bytes, bytes]]
) -> tuple[bytes, bytes]:
    """``(raw, target)`` with an absolute-form target made origin-form, or as they are for
    OPTIONS's asterisk-form. RFC 9112 section 3.2.2: a request in absolute-form is meant for
    the authority in its target, whatever Host says, and a server behind zdlb may route by
    either; so the two must agree (the request is refused otherwise, as HAProxy does), and the
    server gets the path with Host, the only form every origin server must accept."""
    if target == b"*" and method == b"OPTIONS":
        return raw, target
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise DownstreamProtocolError("request target is neither origin- nor absolute-form")
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if not authority or b"@" in authority:  # RFC 9110 section 4.2.4: no userinfo in http(s)
        raise DownstreamProtocolError("absolute-form target without a valid authority")
    hosts = [value.rstrip() for name, value in fields if name.lower() == b"host"]
    if len(hosts) != 1:
        raise DownstreamProtocolError("absolute-form target needs exactly one Host header")
    if hosts[0].lower() != authority.lower():
        raise DownstreamProtocolError("Host does not match the absolute-form target")
    if not path.startswith(b"/"):
        path = b"/" + path
    return b"%s %s%s" % (method, path, raw[target_end:]), path


def _honoured_upgrade(
    method: bytes,
    http_minor: int,
    framing: Framing,
    connection: list[bytes],
    upgrade: list[bytes],
) -> bytes | None:
    """The Upgrade value to forward, or None to strip it (see the module docstring)."""
    if not upgrade or method != b"GET" or http_minor != 1 or framing is not Framing.NONE:
        return None
    if b"upgrade" not in _connection_tokens(connection):
        return None
    return b", ".join(upgrade)


def new_response_parser() -> httptools.HttpResponseParser:
    return httptools.HttpResponseParser(_NO_CALLBACKS)


def parse_response_head(
    raw: bytes,
    size: int,
    parser: httptools.HttpResponseParser,
    answers_head: bool,
    answers_upgrade: bool = False,
) -> ResponseHead:
    """Validate one whole response head of ``size`` bytes with ``parser`` (fresh, or back at
    a message start). ``answers_upgrade``: the request asked for an Upgrade, so 101 is a valid
    answer (after which ``parser`` is unusable). Raises UpstreamProtocolError (answer 502).

    The hot path of every response, ~4 Python calls for a plain one: one llhttp pass and one
    regex pass over the fields (the status line's end is searched only by what needs it)."""
    if size > DEFAULT_MAX_RESPONSE_HEAD_BYTES:
        raise UpstreamProtocolError("response head too large")
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        # llhttp pauses after a whole valid 101 head: what follows is the other protocol.
        if not answers_upgrade:
            raise UpstreamProtocolError("server switched protocols without being asked") from None
    except httptools.HttpParserError as exc:
        raise UpstreamProtocolError(f"malformed response: {exc}") from None
    status = int(raw[9:12])  # llhttp proved "HTTP/1.x NNN"
    if status < 100:  # llhttp takes any three digits; 0xx has no meaning (RFC 9110 section 15)
        raise UpstreamProtocolError(f"invalid status code {status}")
    if status == 101 and not answers_upgrade:
        raise UpstreamProtocolError("server switched protocols without being asked")
    http_minor = 1 if raw[:8] == b"HTTP/1.1" else 0
    fields = _NOTABLE_FIELD.findall(raw)
    if http_minor and 200 <= status and status != 204 and status != 304 and not answers_head:
        # The common case: Content-Length and perhaps "Connection: keep-alive", nothing else.
        content_length: int | None = None
        for name, value in fields:
            if name in _CONTENT_LENGTH_SPELLINGS and content_length is None:
                content_length = int(value)
            elif name not in _CONNECTION_SPELLINGS or value not in _KEEP_ALIVE_SPELLINGS:
                break
        else:
            if content_length is not None:
                framing = BY_LENGTH if content_length else NO_BODY
                return ResponseHead(raw, status, 1, framing, content_length, True, True, True)
    return _parse_response_fields(raw, status, http_minor, fields, answers_head)


def _parse_response_fields(
    raw: bytes,
    status: int,
    http_minor: int,
    fields: list[tuple[bytes, bytes]],
    answers_head: bool,
) -> ResponseHead:
    """The general case: chunked, close-delimited, bodiless, other hop-by-hop fields."""
    content_length: int | None = None
    codings: list[bytes] = []
    connection: list[bytes] = []
    is_plain = True
    editable = 0  # fields that a raw edit cannot handle
    for name, value in fields:
        lname = name.lower()
        if lname not in _RAW_EDITABLE:
            editable += 1
        if lname == b"content-length":
            content_length = int(value)
        elif lname == b"transfer-encoding":
            codings.append(value)
            is_plain = False
        elif lname == b"connection":
            connection.append(value)
            is_plain = is_plain and value.rstrip().lower() == b"keep-alive"
        else:
            is_plain = False
    if codings and _codings(codings) != [b"chunked"]:
        # Any other coding would have to be passed on while zdlb re-frames the body; it refuses
        # instead of corrupting the content.
        raise UpstreamProtocolError("only Transfer-Encoding: chunked is supported")
    if status < 200 or status in (204, 304) or answers_head:
        framing = Framing.NONE
    elif codings:
        framing = Framing.CHUNKED
    elif content_length is not None:
        framing = Framing.LENGTH if content_length else Framing.NONE
    else:
        framing = Framing.CLOSE
    keep_alive = framing is not Framing.CLOSE and is_persistent(http_minor, connection)
    hop_lines_only = not editable and _names_only_persistence(connection)
    return ResponseHead(
        raw,
        status,
        http_minor,
        framing,
        content_length,
        keep_alive,
        is_plain,
        hop_lines_only,
    )
