"""Listening sockets (tcp/listener.py): a master's SO_REUSEPORT group, one socket per worker."""

from __future__ import annotations

import socket

import pytest

from tests.net.proxy_harness import open_fds
from zdlb.config.model import Address
from zdlb.errors import ListenerError
from zdlb.tcp.listener import (
    accept_queue_length,
    bind_listener,
    bind_listener_group,
    bound_address,
    join_listener_group,
    steer_to_first,
)


def test_a_group_shares_one_port_and_takes_connections_on_each() -> None:
    group = bind_listener_group(Address("127.0.0.1", 0), 128, 3)
    try:
        ports = {bound_address(sock).port for sock in group}
        assert len(group) == 3 and len(ports) == 1 and 0 not in ports
        port = ports.pop()
        accepted: set[int] = set()
        clients = []
        for _ in range(60):  # the hash picks a socket each: all 3 get some but 1 in ~10^10
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        for index, sock in enumerate(group):
            while True:
                try:
                    sock.accept()[0].close()
                except BlockingIOError:
                    break
                accepted.add(index)
        for client in clients:
            client.close()
        assert accepted == {0, 1, 2}
    finally:
        for sock in group:
            sock.close()


def test_a_second_group_or_listener_on_its_port_is_refused() -> None:
    group = bind_listener_group(Address("127.0.0.1", 0), 16, 2)
    try:
        address = bound_address(group[0])
        fds_before = open_fds()
        with pytest.raises(ListenerError, match="Address already in use"):
            bind_listener_group(address, 16, 2)
        with pytest.raises(ListenerError, match="Address already in use"):
            bind_listener(address, 16)
        assert open_fds() == fds_before  # nothing of the refused group stays open
    finally:
        for sock in group:
            sock.close()


def test_a_group_grows_and_new_connections_are_steered_to_its_first_sockets() -> None:
    """resize.py's two moves: sockets join a group at its end, and a BPF program sends new
    connections to the first ``count`` only, so the others can close with nothing queued."""
    group = bind_listener_group(Address("127.0.0.1", 0), 128, 2)
    clients: list[socket.socket] = []
    try:
        steer_to_first(group[0], 2)  # before joining: the new socket gets nothing yet
        join_listener_group(group, 128, 1)
        assert len(group) == 3 and len({bound_address(s).port for s in group}) == 1
        port = bound_address(group[0]).port
        clients += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
        queued = [accept_queue_length(sock) for sock in group]
        assert queued[2] == 0 and sum(queued) == 40, queued
        steer_to_first(group[0], 3)  # its worker serves: all three take new ones
        clients += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(60)]
        assert accept_queue_length(group[2]) > 0  # 1 in ~10^10 that it gets none of 60
        steer_to_first(group[0], 1)  # shrinking to one: only the first takes new ones
        before = [accept_queue_length(sock) for sock in group]
        clients += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(30)]
        after = [accept_queue_length(sock) for sock in group]
        assert (after[0] - before[0], after[1:]) == (30, before[1:])
    finally:
        for sock in [*group, *clients]:
            sock.close()
