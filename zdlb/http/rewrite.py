"""Pure header edits between the two sides of the proxy: what a hop may not pass on, what it adds.

RFC 9110 section 7.6.1: a proxy removes Connection, every header Connection names, and the
other hop-by-hop fields (Keep-Alive, TE, Trailer, Proxy-Connection, Upgrade) before
forwarding. Requests gain ``X-Forwarded-For`` (appended to any the client sent) and
``X-Forwarded-Proto``; Host is kept. The one exception is a request whose Upgrade head.py
chose to honour (``RequestHead.upgrade``): its Upgrade field is kept and the server is sent
``Connection: Upgrade`` (RFC 9110 section 7.8: a proxy forwards an upgrade only when asked), as
is the ``101`` answer to it. Heads are serialised in one bytes join because one
``transport.write`` per message is what keeps the kernel cost per request down (PERFORMANCE.md).
No I/O here.
"""

from __future__ import annotations

import re
from http import HTTPStatus

from zdlb.http.head import Framing, Headers, RequestHead, ResponseHead

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"transfer-encoding",  # re-added by the serialiser when the outgoing body is chunked
        b"content-length",  # likewise, so a de-chunked or HEAD message cannot carry a stale one
    }
)
# Fields zdlb sets itself; any copy from the client is dropped or merged, never trusted.
# A Connection or Keep-Alive field line, with the CRLF before it: removed from raw heads.
_HOP_LINE = re.compile(rb"\r\n(?:connection|keep-alive):[^\r]*", re.IGNORECASE)
# What a request gains at its end: the format of build_request_head's common case, which
# http/connection.py also applies inline (a call less per request).
FORWARDED_LINES = b"%sX-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n\r\n"
_X_FORWARDED_FOR = b"x-forwarded-for"
_X_FORWARDED_PROTO = b"x-forwarded-proto"


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Header names listed in Connection, lower-cased (they are hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def _framing_line(framing: Framing, content_length: int | None) -> bytes:
    if framing is Framing.CHUNKED:
        return b"Transfer-Encoding: chunked\r\n"
    if framing is Framing.LENGTH or content_length is not None:
        return b"Content-Length: %d\r\n" % (content_length or 0)
    return b""


def build_request_head(
    head: RequestHead, client_ip: bytes, proto: bytes, server_host: bytes
) -> bytes:
    """Serialise ``head`` for the server as HTTP/1.1 keep-alive.

    ``server_host`` is used as Host only for an HTTP/1.0 request that had none, because
    HTTP/1.1 requires it.
    """
    if head.is_plain and head.http_minor == 1:  # only Host is notable: append ours, forward
        return FORWARDED_LINES % (head.raw[:-2], client_ip, proto)
    if head.hop_lines_only:  # drop Connection/Keep-Alive lines from the raw head
        raw = head.raw
        if head.http_minor == 0:  # the server is spoken to in HTTP/1.1
            line_end = raw.find(b"\r\n")
            raw = raw[: line_end - 1] + b"1" + raw[line_end:]
        return FORWARDED_LINES % (_HOP_LINE.sub(b"", raw[:-2]), client_ip, proto)
    headers = head.headers  # parsed on each read: read once
    named = _connection_tokens(headers)
    forwarded_for = b""
    lines = [b"%s %s HTTP/1.1\r\n" % (head.method, head.target)]
    append = lines.append
    if head.upgrade is not None:  # the only hop-by-hop field passed on, and what names it
        append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % head.upgrade)
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname == _X_FORWARDED_PROTO:
            continue
        if lname in named and lname != b"host":  # "Connection: host" must not strip Host
            continue
        if lname == _X_FORWARDED_FOR:
            forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
            continue
        append(b"%s: %s\r\n" % (name, value))
    if not head.has_host:
        append(b"Host: %s\r\n" % server_host)
    append(_framing_line(head.framing, head.content_length))
    if forwarded_for:
        append(b"X-Forwarded-For: %s, %s\r\n" % (forwarded_for, client_ip))
    else:
        append(b"X-Forwarded-For: %s\r\n" % client_ip)
    append(b"X-Forwarded-Proto: %s\r\n\r\n" % proto)
    return b"".join(lines)


def downstream_framing(head: ResponseHead, client_http_minor: int) -> Framing:
    """How the body goes to the client: chunked is kept for HTTP/1.1 clients only (an HTTP/1.0
    client cannot decode it, so it gets the body close-delimited)."""
    if head.framing is Framing.CHUNKED and client_http_minor == 0:
        return Framing.CLOSE
    return head.framing


def build_response_head(
    head: ResponseHead,
    framing: Framing,
    keep_alive: bool,
    client_http_minor: int,
    added: bytes = b"",
) -> bytes:
    """Serialise ``head`` for the client, with the framing and persistence zdlb decided.

    ``added``: complete field lines zdlb inserts after the status line (the sticky cookie).
    """
    if head.is_plain and keep_alive and client_http_minor == 1 and head.http_minor == 1:
        # Nothing to edit: a passed-on "Connection: keep-alive" says what zdlb does anyway.
        if not added:
            return head.raw
        cut = head.line_end + 2  # after the status line (sliced here: no call per answer)
        return head.raw[:cut] + added + head.raw[cut:]
    if head.hop_lines_only and head.http_minor == 1 and framing is head.framing:
        persistence = b""
        if head.status >= 200:
            if not keep_alive:
                persistence = b"Connection: close\r\n"
            elif client_http_minor == 0:
                persistence = b"Connection: keep-alive\r\n"
        raw = _insert_after_status(head, added) if added else head.raw
        return b"%s%s\r\n" % (_HOP_LINE.sub(b"", raw[:-2]), persistence)
    headers = head.headers  # parsed on each read: read once
    named = _connection_tokens(headers)
    lines = [b"HTTP/1.1 %d %s\r\n" % (head.status, head.reason), added]
    append = lines.append
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in named:
            continue
        append(b"%s: %s\r\n" % (name, value))
    if head.status >= 200:
        if head.content_length is not None and framing is not Framing.CHUNKED:
            # Kept even when the body is absent (HEAD, 304): it describes the representation.
            append(b"Content-Length: %d\r\n" % head.content_length)
        elif framing is Framing.CHUNKED:
            append(b"Transfer-Encoding: chunked\r\n")
        if not keep_alive:
            append(b"Connection: close\r\n")
        elif client_http_minor == 0:
            append(b"Connection: keep-alive\r\n")
    append(b"\r\n")
    return b"".join(lines)


def build_switch_head(head: ResponseHead, added: bytes = b"") -> bytes:
    """Serialise a ``101 Switching Protocols`` for the client: its Upgrade field kept, the
    other hop-by-hop fields dropped, ``Connection: Upgrade`` (RFC 9110 section 7.8)."""
    headers = head.headers  # parsed on each read: read once
    named = _connection_tokens(headers)
    lines = [b"HTTP/1.1 101 %s\r\n" % head.reason, added]
    append = lines.append
    for name, value in headers:
        lname = name.lower()
        if lname == b"upgrade" or not (lname in HOP_BY_HOP or lname in named):
            append(b"%s: %s\r\n" % (name, value))
    append(b"Connection: Upgrade\r\n\r\n")
    return b"".join(lines)


def _insert_after_status(head: ResponseHead, lines: bytes) -> bytes:
    cut = head.line_end + 2
    return head.raw[:cut] + lines + head.raw[cut:]


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 section 7.1); empty data encodes to nothing,
    since a zero-size chunk is the last-chunk and would end the body early."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


def encode_last_chunk(trailers: Headers) -> bytes:
    """The zero-size chunk and the trailer section, hop-by-hop fields removed."""
    kept = [b"%s: %s\r\n" % (n, v) for n, v in trailers if n.lower() not in HOP_BY_HOP]
    return b"0\r\n" + b"".join(kept) + b"\r\n"


def error_response(
    status: int,
    *,
    close: bool = True,
    location: bytes | None = None,
    retry_after: int | None = None,
) -> bytes:
    """A small complete response zdlb answers on its own (400, 404, 408, 502, 503, 504...),
    or a redirect to ``location`` (a routing rule's, http/headrules.py: already validated);
    ``retry_after``: seconds for a ``Retry-After`` field (a 503 from a full queue)."""
    phrase = HTTPStatus(status).phrase.encode()
    body = b"%d %s\n" % (status, phrase)
    return b"HTTP/1.1 %d %s\r\n%sContent-Type: text/plain\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
        status,
        phrase,
        b"" if location is None else b"Location: %s\r\n" % location,
        len(body),
        b"" if retry_after is None else b"Retry-After: %d\r\n" % retry_after,
        b"Connection: close\r\n" if close else b"",
        body,
    )
