"""Sans-IO decoder for the chunked transfer coding (RFC 9112 section 7.1).

zdlb frames bodies itself so that it knows exactly where one message ends and the next
pipelined one begins (llhttp, through httptools, reports no offsets). The decoder is strict,
because lenient chunk parsing is where TE.CL/CL.TE request smuggling lives: chunk sizes are
1-16 hex digits and nothing else (no sign, no whitespace, no "0x"), extensions may not hold
control characters, every line ends in CRLF (never a bare LF), trailer fields are
``token ":" value`` without obs-fold. Memory is bounded: a size line may hold at most
``MAX_CHUNK_LINE_BYTES`` and the trailer section at most ``max_trailer_bytes``.

CPU is bounded per byte too. Each chunk costs a few Python calls whatever its size, so a body
sent as one-byte chunks costs ~3.5 us per payload byte: measured here, 12 MB in 2,000,000
one-byte chunks held the event loop for 7 s while an unrelated request waited 5.9 s (HAProxy,
in C: 0.01 s). A body may therefore use ``FREE_CHUNKS`` chunks of any size, and beyond them its
chunks must average at least ``MIN_AVERAGE_CHUNK_BYTES`` of payload, or it is refused (400 for a
request, 502 for a response). Real senders stay far inside that: HTTP client libraries chunk
uploads in 8-64 KiB pieces and servers flush 4-16 KiB at a time, and a stream of small events
(one chunk each) gets 1,024 of them before the average counts. An attacker gets at most
``FREE_CHUNKS + payload / MIN_AVERAGE_CHUNK_BYTES`` chunks of work: one-byte chunks are refused
at the 1,025th (~4 ms of work), where a 256 KiB read of them would be ~43,000 (~150 ms).
benchmarks/tiny_chunks.py measures the other clients' latency meanwhile.

No I/O here.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

from zdlb.errors import ProtocolError

# Chunk extensions are nearly unused; 4 KiB for a size line bounds a client that streams an
# endless extension (llhttp and h11 impose similar limits).
MAX_CHUNK_LINE_BYTES = 4096
# 16 hex digits is 2**64 - 1: anything longer can only be an overflow attempt.
MAX_CHUNK_SIZE_DIGITS = 16
# The chunk budget of the module docstring: chunks of any size first, then an average.
FREE_CHUNKS = 1024
MIN_AVERAGE_CHUNK_BYTES = 64

_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*)?)")
_TRAILER_LINE = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*"
)


_FRAMING_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"host"})


class _State(enum.Enum):
    SIZE = "size"  # reading a chunk-size line
    DATA = "data"  # inside chunk data
    DATA_END = "data_end"  # the CRLF after chunk data
    TRAILER = "trailer"  # trailer lines until an empty one
    DONE = "done"


class ChunkedDecoder:
    """Decodes one chunked body. ``feed`` returns the data found and how many bytes it used.

    ``error`` is the ``ProtocolError`` subclass to raise (downstream or upstream), so the same
    decoder serves requests (answer 400) and responses (answer 502).
    """

    __slots__ = (
        "_chunks",
        "_error",
        "_line",
        "_max_trailer_bytes",
        "_max_trailer_fields",
        "_payload_bytes",
        "_remaining",
        "_state",
        "_too_large_status",
        "trailers",
    )

    def __init__(
        self,
        error: type[ProtocolError],
        too_large_status: int,
        max_trailer_bytes: int,
        max_trailer_fields: int,
    ) -> None:
        self._error = error
        self._too_large_status = too_large_status  # 431 for a request, 502 for a response
        self._max_trailer_bytes = max_trailer_bytes
        self._max_trailer_fields = max_trailer_fields
        self._state = _State.SIZE
        self._remaining = 0
        self._chunks = 0  # data chunks announced (the last-chunk is not one)
        self._payload_bytes = 0  # chunk data announced so far
        self._line = bytearray()  # a partial line carried between feeds
        self.trailers: list[tuple[bytes, bytes]] = []

    @property
    def is_done(self) -> bool:
        return self._state is _State.DONE

    def feed(self, data: bytes, pos: int, emit: Callable[[bytes], None]) -> int:
        """Decode ``data[pos:]``, passing chunk data to ``emit``; return the new position.

        Stops at the end of the body (``is_done``), leaving any following bytes (a pipelined
        message) unread. Raises ``self._error`` (status 400/502) on a framing violation.
        """
        end = len(data)
        while pos < end:
            state = self._state
            if state is _State.DATA:
                take = min(self._remaining, end - pos)
                emit(data[pos : pos + take] if take != end or pos else data)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _State.DATA_END
            elif state is _State.DATA_END:
                # Exactly CRLF must follow chunk data: checked byte by byte so that a wrong
                # byte is refused at once instead of waiting for a line end that may never come.
                expected = b"\r\n"[self._remaining]  # _remaining counts CRLF bytes seen here
                if data[pos] != expected:
                    raise self._error("chunk data longer than its size")
                pos += 1
                self._remaining += 1
                if self._remaining == 2:
                    self._state = _State.SIZE
            elif state is _State.DONE:
                break
            else:
                line, pos = self._read_line(data, pos)
                if line is None:
                    break
                self._on_line(line)
        return pos

    def _read_line(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        """A complete CRLF-terminated line (without the CRLF), or None and all bytes used."""
        carry = self._line
        newline = data.find(b"\n", pos)
        limit = self._max_trailer_bytes
        if self._state is not _State.TRAILER:
            limit = min(limit, MAX_CHUNK_LINE_BYTES)
        if newline < 0:
            carry += data[pos:]
            if len(carry) > limit:
                raise self._error("chunk framing or trailers too large", self._too_large_status)
            return None, len(data)
        carry += data[pos : newline + 1]
        if len(carry) > limit + 2:
            raise self._error("chunk framing or trailers too large", self._too_large_status)
        if len(carry) < 2 or carry[-2] != 0x0D:
            raise self._error("chunk line not terminated by CRLF")
        line = bytes(carry[:-2])
        carry.clear()
        return line, newline + 1

    def _on_line(self, line: bytes) -> None:
        state = self._state
        if state is _State.SIZE:
            match = _SIZE_LINE.fullmatch(line)
            if match is None:
                raise self._error("invalid chunk size line")
            size = self._remaining = int(match.group(1), 16)
            if not size:  # the last-chunk: trailers follow
                self._state = _State.TRAILER
                return
            self._state = _State.DATA
            self._chunks += 1
            self._payload_bytes += size
            if (
                self._chunks > FREE_CHUNKS
                and self._chunks * MIN_AVERAGE_CHUNK_BYTES > self._payload_bytes
            ):
                raise self._error("chunks too small: framing would cost more than the payload")
        elif not line:  # the empty line that ends the trailer section
            self._state = _State.DONE
        else:
            match = _TRAILER_LINE.fullmatch(line)
            if match is None:
                raise self._error("invalid trailer field")
            self.trailers.append((match.group(1), match.group(2)))
            self._max_trailer_bytes -= len(line) + 2
            if self._max_trailer_bytes < 0 or len(self.trailers) > self._max_trailer_fields:
                raise self._error("chunk framing or trailers too large", self._too_large_status)
            if match.group(1).lower() in _FRAMING_FIELDS:
                # RFC 9110 section 6.5.1: framing fields are never trailers; one here is an
                # attempt to make some later hop reframe the message.
                raise self._error("framing field in the trailer section")
