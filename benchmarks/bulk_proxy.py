"""A standalone zdlb TCP listener for the bulk benchmark, until ``zdlb run -c`` serves tcp mode.

Runs one ``TcpRoute`` on uvloop in front of one server, with the daemon's pieces: the listener
socket from ``bind_listener``, a sweeper calling ``route.sweep``, and SIGTERM/SIGINT to stop
(stop accepting, then reset what remains). Once the daemon wires ``mode = "tcp"``, bulk.py's
``--zdlb-cmd 'zdlb run -c {config}'`` replaces this script (bulk.py writes that config too).

    python -m benchmarks.bulk_proxy --listen 127.0.0.1:9000 --server 127.0.0.1:8080 --splice on
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import uvloop

from zdlb.balancer.pool import Backend
from zdlb.config.model import (
    DEFAULT_PIPE_BYTES,
    Address,
    BackendConfig,
    ListenerConfig,
    ListenerMode,
    ServerConfig,
)
from zdlb.tcp.listener import bind_listener
from zdlb.tcp.proxy import TcpRoute, TcpSettings

SWEEP_S = 1.0


def address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host, int(port))


async def serve(args: argparse.Namespace) -> None:
    listener = ListenerConfig("bulk", address(args.listen), "app", mode=ListenerMode.TCP)
    server = ServerConfig("s1", address(args.server))
    backend = Backend(BackendConfig("app", (server,)))
    settings = TcpSettings(splice=args.splice == "on", pipe_bytes=args.pipe_bytes)
    route = TcpRoute(listener, backend, settings)
    route.start_accepting(bind_listener(listener.bind, 1024))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening {listener.bind} -> {server.address} {route!r}", flush=True)
    while not stop.is_set():
        try:
            async with asyncio.timeout(SWEEP_S):
                await stop.wait()
        except TimeoutError:
            route.sweep(loop.time())
    route.stop_accepting()
    route.abort_all()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--server", required=True, help="host:port")
    parser.add_argument("--splice", choices=("on", "off"), default="on")
    parser.add_argument("--pipe-bytes", type=int, default=DEFAULT_PIPE_BYTES)
    uvloop.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
