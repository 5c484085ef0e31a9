"""Bulk download client: GET a file over plain TCP, reading 1 MiB at a time.

wrk reads 8 KiB at a time, which caps a bulk download near 1.4 GB/s even without a proxy
(PERFORMANCE.md); this client's 1 MiB ``recv_into`` a preallocated buffer does not. It sends
one ``Connection: close`` request per download, counts every byte until EOF, and prints one
JSON line: ``{"downloads": N, "bytes": B, "seconds": S}``. Exits 1 if a download is short.

    python -m benchmarks.bulk_client --port 8080 --path /bulk.bin --count 4 --expect 268435456
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Sequence

READ_BYTES = 1 << 20
TIMEOUT_S = 60.0


def download(port: int, path: str, buf: bytearray) -> int:
    """Bytes received (head and body) for one GET of ``path`` until the server closes."""
    request = f"GET {path} HTTP/1.1\r\nHost: bulk\r\nConnection: close\r\n\r\n".encode()
    total = 0
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sock.sendall(request)
        while n := sock.recv_into(buf):
            total += n
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/bulk.bin")
    parser.add_argument("--count", type=int, default=1, help="downloads, one after the other")
    parser.add_argument("--expect", type=int, default=0, help="body bytes each must carry")
    args = parser.parse_args(argv)
    buf = bytearray(READ_BYTES)
    total = 0
    started = time.monotonic()
    for _ in range(args.count):
        got = download(args.port, args.path, buf)
        if got < args.expect:
            print(f"short download: {got} bytes < {args.expect}", file=sys.stderr)
            return 1
        total += got
    seconds = time.monotonic() - started
    print(json.dumps({"downloads": args.count, "bytes": total, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
