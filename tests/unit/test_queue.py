"""balancer/queue.py: per-server maxconn and the FIFO queues, rule by rule, without sockets."""

from __future__ import annotations

import random
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from zdlb.balancer.pool import Backend
from zdlb.balancer.queue import Ticket, WaitQueues, attach_queues
from zdlb.balancer.server import UNLIMITED, AdminState, Server
from zdlb.config.model import Address, BackendConfig, PoolName, ServerConfig

MAIN, BACKUP = PoolName.MAIN, PoolName.BACKUP


class Waiter:
    """Records grants as the connection would, and keeps the slot until ``finish``."""

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        self.name = name
        self.log = log
        self.server: Server | None = None

    def queue_granted(self, ticket: Ticket, server: Server) -> None:
        self.server = server
        self.log.append((self.name, server.name))


def make(
    servers: list[tuple[str, int | None, PoolName, str | None]],
    processes: int = 1,
    defer: Callable[[Callable[[], None]], object] | None = None,
) -> tuple[Backend, WaitQueues]:
    configs = tuple(
        ServerConfig(name, Address("10.0.0.1", 8000 + i), pool=pool, pair=pair, maxconn=limit)
        for i, (name, limit, pool, pair) in enumerate(servers)
    )
    backend = Backend(BackendConfig("app", configs), random.Random(1), processes)
    queues = attach_queues(backend, processes, defer)
    assert queues is not None
    return backend, queues


def get(backend: Backend, name: str) -> Server:
    server = backend.server(name)
    assert server is not None
    return server


def occupy(server: Server, count: int) -> None:
    server.inflight += count


def test_no_maxconn_no_queues():
    configs = (ServerConfig("a", Address("10.0.0.1", 1)),)
    backend = Backend(BackendConfig("app", configs))
    assert attach_queues(backend, 1, None) is None
    assert backend.servers[0].maxconn == UNLIMITED
    assert backend.servers[0].waitq is None


def test_rule_1_each_process_keeps_its_share_of_maxconn():
    backend, _ = make([("a", 5, MAIN, None), ("b", 1, MAIN, None), ("c", None, MAIN, None)], 2)
    assert [s.maxconn for s in backend.servers] == [2, 1, UNLIMITED]  # 5 // 2; at least 1


def test_rule_2_balanced_request_takes_a_free_server_before_waiting():
    backend, queues = make([("a", 1, MAIN, None), ("b", 1, MAIN, None)])
    log: list[tuple[str, str]] = []
    occupy(get(backend, "a"), 1)
    ticket = queues.enqueue(Waiter("w1", log), None, 0.0)
    assert log == [("w1", "b")] and not ticket.is_live
    assert get(backend, "b").inflight == 1  # reserved at once
    ticket = queues.enqueue(Waiter("w2", log), None, 0.0)
    assert ticket.is_live and queues.waiting == 1 and queues.queued(None) == 1


def test_rule_2_sticky_request_waits_for_its_own_server():
    backend, queues = make([("a", 1, MAIN, None), ("b", 1, MAIN, None)])
    log: list[tuple[str, str]] = []
    occupy(get(backend, "a"), 1)
    ticket = queues.enqueue(Waiter("w1", log), "a", 0.0)
    assert ticket.is_live and log == []  # b is free, but the user is pinned to a
    assert queues.queued(get(backend, "a")) == 1


def test_rule_3_freed_slot_goes_to_the_oldest_waiter_it_can_serve():
    backend, queues = make([("a", 1, MAIN, None), ("b", 1, MAIN, None)])
    a, b = get(backend, "a"), get(backend, "b")
    log: list[tuple[str, str]] = []
    occupy(a, 1)
    occupy(b, 1)
    queues.enqueue(Waiter("shared-1", log), None, 0.0)
    queues.enqueue(Waiter("sticky-b", log), "b", 0.0)
    queues.enqueue(Waiter("sticky-a", log), "a", 0.0)
    queues.enqueue(Waiter("shared-2", log), None, 0.0)
    a.inflight -= 1
    queues.slot_freed(a, 0.0)  # shared-1 is older than sticky-a
    b.inflight -= 1
    queues.slot_freed(b, 0.0)  # sticky-b is older than shared-2
    a.inflight -= 1
    queues.slot_freed(a, 0.0)
    b.inflight -= 1
    queues.slot_freed(b, 0.0)
    assert log == [("shared-1", "a"), ("sticky-b", "b"), ("sticky-a", "a"), ("shared-2", "b")]
    assert queues.waiting == 0 and a.inflight == 1 and b.inflight == 1


def test_rule_3_a_draining_server_gives_no_slot_to_shared_waiters():
    backend, queues = make([("a", 1, MAIN, None), ("b", 1, MAIN, None)])
    a, b = get(backend, "a"), get(backend, "b")
    log: list[tuple[str, str]] = []
    occupy(a, 1)
    occupy(b, 1)
    queues.enqueue(Waiter("shared", log), None, 0.0)
    a.set_admin(AdminState.DRAIN, 0.0)  # no defer: re-placed at once, still waiting
    a.inflight -= 1
    queues.slot_freed(a, 0.0)
    assert log == []
    b.inflight -= 1
    queues.slot_freed(b, 0.0)
    assert log == [("shared", "b")]


def test_rule_4_flip_moves_sticky_waiters_to_the_pair_once_complete():
    deferred: list[Callable[[], None]] = []
    backend, queues = make(
        [("a", 1, MAIN, None), ("a2", 1, BACKUP, "a"), ("b", 1, MAIN, None)], defer=deferred.append
    )
    a, a2 = get(backend, "a"), get(backend, "a2")
    log: list[tuple[str, str]] = []
    a2.set_admin(AdminState.MAINT)  # nobody waits yet: nothing to re-place
    assert deferred == []
    occupy(a, 1)
    occupy(get(backend, "b"), 1)
    queues.enqueue(Waiter("u1", log), "a", 0.0)
    queues.enqueue(Waiter("u2", log), "a", 0.0)
    # A flip: the main to maint first, then its pair ready; between them, nothing moves.
    a.set_admin(AdminState.MAINT)
    a2.set_admin(AdminState.READY)
    assert log == [] and len(deferred) == 1  # coalesced into one re-placing
    deferred.pop()()
    assert log == [("u1", "a2")]  # the pair has one slot; u2 waits for it now
    assert queues.queued(a2) == 1 and queues.queued(a) == 0
    a2.inflight -= 1
    queues.slot_freed(a2, 0.0)
    assert log == [("u1", "a2"), ("u2", "a2")]


def test_rule_4_weight_back_above_zero_hands_out_free_slots():
    backend, queues = make([("a", 2, MAIN, None)])
    a = get(backend, "a")
    log: list[tuple[str, str]] = []
    a.weight = 0
    queues.enqueue(Waiter("w", log), None, 0.0)
    assert log == [] and queues.waiting == 1  # nobody takes new traffic
    a.weight = 100
    assert log == [("w", "a")]


def test_rule_5_leaving_is_a_flag_and_dead_tickets_are_skipped():
    backend, queues = make([("a", 1, MAIN, None)])
    a = get(backend, "a")
    log: list[tuple[str, str]] = []
    occupy(a, 1)
    gone = queues.enqueue(Waiter("gone", log), None, 0.0)
    queues.enqueue(Waiter("stays", log), None, 0.0)
    queues.leave(gone)
    queues.leave(gone)  # twice is harmless
    assert queues.waiting == 1
    a.inflight -= 1
    queues.slot_freed(a, 0.0)
    assert log == [("stays", "a")] and queues.queued(None) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ef"), st.integers(0, 2)), min_size=1, max_size=60))
def test_never_more_in_flight_than_maxconn_and_fifo_per_queue(steps: list[tuple[str, int]]):
    """Random arrivals (e), finishes (f) and leaves: inflight never passes maxconn, every
    grant of the shared queue comes in arrival order, and nothing waits with a slot free."""
    backend, queues = make([("a", 2, MAIN, None), ("b", 1, MAIN, None)])
    log: list[tuple[str, str]] = []
    waiters: list[Waiter] = []
    running: list[Waiter] = []
    for i, (kind, which) in enumerate(steps):
        if kind == "e":
            waiter = Waiter(f"{i:03d}", log)
            waiters.append(waiter)
            server = backend.select(0.0)
            assert server is not None
            if server.inflight < server.maxconn:
                server.inflight += 1
                waiter.server = server
            else:
                queues.enqueue(waiter, None, 0.0)
        else:
            running = [w for w in waiters if w.server is not None]
            if running:
                done = running[which % len(running)]
                waiters.remove(done)
                assert done.server is not None
                done.server.inflight -= 1
                queues.slot_freed(done.server, 0.0)
        for server in backend.servers:
            assert 0 <= server.inflight <= server.maxconn
        if queues.waiting:
            assert all(s.inflight == s.maxconn for s in backend.servers)
    granted = [name for name, _ in log]
    assert granted == sorted(granted)
