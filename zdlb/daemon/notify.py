"""systemd's readiness protocol (``sd_notify``) without libsystemd: one datagram per state.

Under ``Type=notify`` (deploy/zdlb.service) systemd passes ``NOTIFY_SOCKET``: a UNIX datagram
socket path, or an abstract one when it starts with ``@``. zdlb sends ``READY=1`` once every
listener accepts, ``RELOADING=1`` (with ``MONOTONIC_USEC``, which systemd 253+ wants) when a
reload starts and ``READY=1`` when it ends, ``MAINPID=`` when an upgrade hands the service to a
new process, and ``STOPPING=1`` when a stop begins. Without ``NOTIFY_SOCKET`` every call does
nothing. A failed send is logged once and never raised: readiness reporting must not take the
load balancer down.

No other I/O here; the variable is read when a message is sent, never at import.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

_failed = False  # log the first failure only: systemd gone is not worth a line per reload


def notify(*fields: str) -> bool:
    """Send ``fields`` ("READY=1", ...) as one datagram; True if one was sent."""
    global _failed
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)  # a datagram to a local socket: never really waits
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        if not _failed:
            _failed = True
            log.warning("notify_failed socket=%s error=%s", address.lstrip("\0"), exc)
        return False
    return True


def ready() -> bool:
    return notify("READY=1", f"STATUS=serving, pid {os.getpid()}")


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=draining")


def main_pid(pid: int) -> bool:
    """An upgrade: process ``pid`` is the service now (needs ``NotifyAccess=all``)."""
    return notify(f"MAINPID={pid}", "READY=1", f"STATUS=serving, pid {pid} (upgraded)")
