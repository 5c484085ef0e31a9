"""``zdlb demo-deploy ADDRESS VERSION``: deploy a version to a demo vhost (its POST /demo/deploy).

The demo's stand-in for a real deploy command, usable where curl is not (the container image),
and as ``zdlb deploy --run 'zdlb demo-deploy "$ZDLB_ADDRESS" v3'``. A one-shot blocking client
(http.client) with a deadline; exit 0 when the vhost accepted (202), 1 otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import urllib.parse
from typing import Any

from zdlb.daemon.demo_app import DEFAULT_DEPLOY_S, Broken

EXIT_OK = 0
EXIT_FAILED = 1
# The vhost answers at once (it stops after answering); this bounds a wrong address.
REQUEST_TIMEOUT_S = 5.0


def add_parser(commands: Any) -> None:
    """Add ``demo-deploy`` to the ``zdlb`` subcommands (``commands``: argparse's subparsers)."""
    parser = commands.add_parser(
        "demo-deploy",
        help="deploy a version to a demo vhost (it restarts as that version)",
        description="POST /demo/deploy to the demo vhost at ADDRESS: it refuses connections "
        "for --seconds, then answers as VERSION (--broken health: failing /health; 500: "
        "answering 500). Exit 0 once the vhost accepted, 1 otherwise.",
    )
    parser.add_argument("address", metavar="ADDRESS", help="HOST:PORT, e.g. 127.0.0.1:8081")
    parser.add_argument("version", metavar="VERSION", help="e.g. v3")
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_DEPLOY_S,
        help=f"down this long ({DEFAULT_DEPLOY_S:g})",
    )
    parser.add_argument(
        "--broken", choices=[b.value for b in Broken], default=Broken.NO.value, help="no (default)"
    )


def run_demo_deploy(args: argparse.Namespace) -> int:
    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        print(f"zdlb demo-deploy: {args.address!r} is not HOST:PORT", file=sys.stderr)
        return EXIT_FAILED
    query = urllib.parse.urlencode(
        {"version": args.version, "seconds": f"{args.seconds:g}", "broken": args.broken}
    )
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", f"/demo/deploy?{query}")
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        print(f"zdlb demo-deploy: {args.address}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        conn.close()
    ok = response.status == 202
    print(text, end="", file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED
