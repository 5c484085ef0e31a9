"""Measure a proxy's memory per idle keep-alive client connection.

Opens N connections to 127.0.0.1:PORT; on each it sends one complete GET and reads the whole
response, so the proxy holds it in keep-alive state; then holds them all open and compares the
VmRSS of the proxy's process tree (/proc/PID/status) before and after. Bounded by --timeout.

    python3 -m benchmarks.idle_conns --port 8080 --pid 1234 -n 5000 [--json]   # from the repo root
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass

from benchmarks.procs import raise_nofile_limit, tree_rss_bytes

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: zdlb-idle-conns\r\n\r\n"
# Connects in flight at once: well under the listen backlogs (HAProxy/nginx/kernel >= 511),
# so no SYN is dropped and retried a second later.
DEFAULT_CONCURRENCY = 200
DEFAULT_TIMEOUT_S = 120.0
# After the last response, give the proxy a moment to finish its per-request cleanup
# (pooled upstream release, buffer frees) before RSS is read.
DEFAULT_SETTLE_S = 1.0


@dataclass(frozen=True, slots=True)
class IdleResult:
    connections: int
    failed: int
    closed_by_proxy: int
    rss_before_bytes: int
    rss_after_bytes: int
    bytes_per_conn: float
    elapsed_s: float
    first_error: str | None


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response completely; return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        await reader.readuntil(b"0\r\n\r\n")  # good enough for the tiny one-chunk test page
    else:
        raise ValueError("response has no length: the proxy would close the connection")
    return status


async def _open_one(
    port: int, gate: asyncio.Semaphore
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(REQUEST)
            status = await _read_response(reader)
        except BaseException:
            writer.close()
            raise
        if status != 200:
            writer.close()
            raise ValueError(f"status {status}")
        return reader, writer


async def measure(
    port: int, pid: int, count: int, concurrency: int, timeout_s: float, settle_s: float
) -> IdleResult:
    """Open count idle keep-alive connections and return the proxy's RSS growth."""
    started = time.monotonic()
    rss_before = tree_rss_bytes(pid)
    gate = asyncio.Semaphore(concurrency)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failed = 0
    first_error: str | None = None
    try:
        async with asyncio.timeout(timeout_s):
            tasks = [asyncio.create_task(_open_one(port, gate)) for _ in range(count)]
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    failed += 1
                    first_error = first_error or repr(outcome)
                else:
                    conns.append(outcome)
            await asyncio.sleep(settle_s)
            rss_after = tree_rss_bytes(pid)
            closed = sum(1 for reader, _ in conns if reader.at_eof())
    finally:
        for _, writer in conns:
            writer.close()
    held = len(conns) - closed
    return IdleResult(
        connections=held,
        failed=failed,
        closed_by_proxy=closed,
        rss_before_bytes=rss_before,
        rss_after_bytes=rss_after,
        bytes_per_conn=(rss_after - rss_before) / held if held else 0.0,
        elapsed_s=time.monotonic() - started,
        first_error=first_error,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="proxy port on 127.0.0.1")
    parser.add_argument("--pid", type=int, required=True, help="proxy pid (its tree is summed)")
    parser.add_argument("-n", "--connections", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")
    parser.add_argument("--settle", type=float, default=DEFAULT_SETTLE_S, help="seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    limit = raise_nofile_limit()
    if limit < args.connections + 64:
        print(f"RLIMIT_NOFILE hard limit {limit} is too low", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(
            measure(
                args.port, args.pid, args.connections, args.concurrency, args.timeout, args.settle
            )
        )
    except TimeoutError:
        print(f"gave up after {args.timeout:.0f} s", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(
            f"{result.connections} idle connections: RSS {result.rss_before_bytes / 1e6:.1f} -> "
            f"{result.rss_after_bytes / 1e6:.1f} MB, {result.bytes_per_conn:.0f} bytes each "
            f"({result.failed} failed, {result.closed_by_proxy} closed by the proxy, "
            f"{result.elapsed_s:.1f} s)"
        )
    return 0 if result.connections else 1


if __name__ == "__main__":
    sys.exit(main())
