"""Listening sockets: bound and configured before the event loop serves them.

Binding happens before anything else starts so that a bad or busy address fails the start-up
with a clear error rather than half a daemon. A ``SO_REUSEPORT`` group (one socket per worker)
can grow and, with ``steer_to_first``, shrink without resetting a queued client (a reload that
changes ``workers``, daemon/resize.py). No event loop here.
"""

from __future__ import annotations

import ctypes
import socket
import struct

from zdlb.config.model import Address
from zdlb.errors import ListenerError


def bind_listener(address: Address, backlog: int) -> socket.socket:
    """A non-blocking listening TCP socket on ``address``. Raises ListenerError.

    SO_REUSEADDR lets a restarted daemon bind while old connections sit in TIME_WAIT; IPv6
    sockets are v6-only so ``[::]:80`` and ``0.0.0.0:80`` can be configured side by side.
    """
    return _bind(address, backlog, reuse_port=False, listen=True)


def bind_listener_group(address: Address, backlog: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one address, one per worker process, with SO_REUSEPORT:
    the kernel spreads new connections over them by a hash of the client's address and port.

    Why not one socket shared by the workers: each worker's event loop accepts every pending
    connection when it wakes, so a burst lands on whichever woke first. Measured with 2
    workers and ``wrk -c50``: 50/0, 40/10 and 48/2 connections per worker, and 32k rps for the
    50/0 split against 38-44k for the others.

    SO_REUSEPORT would also let a second zdlb share the port silently, so an exclusive bind
    (no SO_REUSEPORT) first proves the port free, as ``bind_listener`` would, and resolves port
    0; the group then binds to that port. Raises ListenerError; nothing stays open then.
    """
    probe = _bind(address, backlog, reuse_port=False, listen=False)
    port = probe.getsockname()[1]
    probe.close()
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(_bind(Address(address.host, port), backlog, reuse_port=True))
    except ListenerError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def join_listener_group(group: list[socket.socket], backlog: int, count: int) -> None:
    """Add ``count`` sockets to the ``SO_REUSEPORT`` group on ``group``'s address (appended: the
    kernel numbers a group's sockets in the order they joined). Raises ListenerError; nothing
    is added then."""
    address = bound_address(group[0])
    added: list[socket.socket] = []
    try:
        for _ in range(count):
            added.append(_bind(address, backlog, reuse_port=True))
    except ListenerError:
        for sock in added:
            sock.close()
        raise
    group.extend(added)


# Linux's SO_ATTACH_REUSEPORT_CBPF (asm-generic/socket.h; the socket module lacks it), and the
# classic BPF opcodes and ancillary offset (linux/filter.h) of the program below.
SO_ATTACH_REUSEPORT_CBPF = 51
_BPF_LD_W_ABS, _BPF_ALU_MOD_K, _BPF_RET_A = 0x20, 0x94, 0x16
_SKF_AD_RANDOM = -0x1000 + 56


def steer_to_first(sock: socket.socket, count: int) -> None:
    """New connections to ``sock``'s ``SO_REUSEPORT`` group go to its first ``count`` sockets
    only (a random one of them each): ``A = random; A %= count; return A``, attached to the
    group. Sockets past ``count`` then receive nothing, so once their queue is served they can
    close without resetting a client. Raises ListenerError (no BPF here: the caller decides)."""
    program = [
        (_BPF_LD_W_ABS, 0, 0, _SKF_AD_RANDOM & 0xFFFFFFFF),
        (_BPF_ALU_MOD_K, 0, 0, count),
        (_BPF_RET_A, 0, 0, 0),
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(code))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        raise ListenerError(exc.errno, f"cannot steer new connections: {exc.strerror}") from None


def accept_queue_length(sock: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue (TCP_INFO ``tcpi_unacked``,
    which Linux sets to the queue length for a listener)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    return int(struct.unpack_from("I", info, 24)[0])


def _bind(
    address: Address, backlog: int, *, reuse_port: bool, listen: bool = True
) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: the stdlib loop sets TCP_NODELAY on accepted sockets only when
    # sock.proto says TCP; without it a head and body written apart wait ~40 ms for an ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accept()
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenerError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    return sock


def bound_address(sock: socket.socket) -> Address:
    """The address a listening socket actually got (port 0 in the config means any port)."""
    host, port = sock.getsockname()[:2]
    return Address(host, port)
