"""Bulk HTTP client: downloads and uploads over plain TCP, 1 MiB at a time.

wrk reads 8 KiB at a time, which caps a bulk download near 1.4 GB/s even without a proxy
(PERFORMANCE.md); this client's 1 MiB ``recv_into`` a preallocated buffer does not. Three modes,
each printing one JSON line ``{"requests": N, "bytes": B, "seconds": S}`` (S: wall time of all
N requests, connecting included):

- default (bulk.py): one ``Connection: close`` GET per download, every byte counted until EOF
  (B includes the heads); exits 1 if a download carries fewer than ``--expect`` bytes;
- ``--keep-alive`` (bulk_http.py): N GETs on one connection, each response read to exactly its
  Content-Length; B counts body bytes;
- ``--upload BYTES`` (bulk_http.py): N POSTs of BYTES on one connection, the head sent first,
  then the body from one preallocated 1 MiB buffer with ``sendall`` in 1 MiB pieces; each
  response is read to its Content-Length before the next request; B counts uploaded body bytes.

In the last two a response that is not 200, has no Content-Length or is cut short exits 1.

    python -m benchmarks.bulk_client --port 8080 --path /bulk.bin --count 4 --expect 268435456
    python -m benchmarks.bulk_client --port 8080 --path /f-1048576.bin --count 64 --keep-alive
    python -m benchmarks.bulk_client --port 8080 --path /upload --count 64 --upload 1048576
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence

READ_BYTES = 1 << 20
TIMEOUT_S = 60.0
MAX_HEAD_BYTES = 64 * 1024


class ResponseError(Exception):
    """A response this client cannot count: not 200, unframed, or cut short."""


def download(port: int, path: str, buf: bytearray) -> int:
    """Bytes received (head and body) for one GET of ``path`` until the server closes."""
    request = f"GET {path} HTTP/1.1\r\nHost: bulk\r\nConnection: close\r\n\r\n".encode()
    total = 0
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sock.sendall(request)
        while n := sock.recv_into(buf):
            total += n
    return total


def read_response(sock: socket.socket, buf: bytearray) -> int:
    """Read one 200 response with a Content-Length from ``sock``; return its body length.

    The head may arrive with the start of the body in one read; the rest is read into ``buf``
    in pieces of at most its size and never past the body (requests are not pipelined).
    """
    view = memoryview(buf)
    got = 0
    while (end := buf.find(b"\r\n\r\n", 0, got)) < 0:
        if got >= MAX_HEAD_BYTES:
            raise ResponseError(f"no end of head in {got} bytes")
        n = sock.recv_into(view[got:])
        if not n:
            raise ResponseError(f"connection closed after {got} bytes of head")
        got += n
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    if lines[0].split(" ", 2)[1:2] != ["200"]:
        raise ResponseError(f"not a 200: {lines[0]!r}")
    fields = (line.partition(":") for line in lines[1:])
    lengths = [value for name, _, value in fields if name.lower() == "content-length"]
    if len(lengths) != 1:
        raise ResponseError(f"need one Content-Length, got {lengths}")
    length = int(lengths[0])
    remaining = length - (got - end - 4)
    if remaining < 0:
        raise ResponseError(f"{-remaining} bytes past a {length}-byte body")
    while remaining:
        n = sock.recv_into(buf, min(remaining, len(buf)))
        if not n:
            raise ResponseError(f"connection closed {remaining} bytes before the body's end")
        remaining -= n
    return length


def keep_alive_downloads(port: int, path: str, count: int, buf: bytearray) -> int:
    """GET ``path`` ``count`` times on one connection; body bytes received."""
    request = f"GET {path} HTTP/1.1\r\nHost: bulk\r\n\r\n".encode()
    total = 0
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        for _ in range(count):
            sock.sendall(request)
            total += read_response(sock, buf)
    return total


def uploads(port: int, path: str, count: int, size: int, buf: bytearray) -> int:
    """POST ``size`` bytes to ``path`` ``count`` times on one connection; body bytes sent."""
    head = f"POST {path} HTTP/1.1\r\nHost: bulk\r\nContent-Length: {size}\r\n\r\n".encode()
    piece = memoryview(os.urandom(READ_BYTES))
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        for _ in range(count):
            sock.sendall(head)
            for offset in range(0, size, len(piece)):
                sock.sendall(piece[: size - offset])  # a slice past the end stops at the end
            read_response(sock, buf)
    return count * size


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/bulk.bin")
    parser.add_argument("--count", type=int, default=1, help="requests, one after the other")
    parser.add_argument("--expect", type=int, default=0, help="bytes each close-mode GET carries")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--keep-alive", action="store_true", help="GETs on one connection")
    mode.add_argument("--upload", type=int, metavar="BYTES", help="POSTs of BYTES, keep-alive")
    args = parser.parse_args(argv)
    buf = bytearray(READ_BYTES)
    started = time.monotonic()
    try:
        if args.upload is not None:
            total = uploads(args.port, args.path, args.count, args.upload, buf)
        elif args.keep_alive:
            total = keep_alive_downloads(args.port, args.path, args.count, buf)
        else:
            total = 0
            for _ in range(args.count):
                got = download(args.port, args.path, buf)
                if got < args.expect:
                    raise ResponseError(f"short download: {got} bytes < {args.expect}")
                total += got
    except (ResponseError, OSError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - started
    print(json.dumps({"requests": args.count, "bytes": total, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
