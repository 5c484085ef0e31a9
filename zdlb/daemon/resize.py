"""A reload that changes ``workers``: the master's listener groups grow or shrink with the worker
processes, and no client waits on a socket nobody accepts on or is reset by one closing.

The kernel numbers a ``SO_REUSEPORT`` group's sockets in the order they joined, and the master
never closes one in the middle (a worker's socket outlives the worker), so worker i's socket is
the group's i-th. Rules (workers.py ``Supervisor.resize`` runs them in this order):

1. Growing from N to M: first steer new connections to the first N sockets (a classic BPF
   program on the group, tcp/listener.py ``steer_to_first``), then add M - N sockets to every
   group, start the new workers on them, and once they serve, steer over all M. Without the
   first step, the kernel would queue clients on a new socket for the ~0.3 s its worker takes
   to start.
2. Shrinking from N to M: steer to the first M sockets, so the last ones receive nothing new;
   a remaining worker accepts on each retiring worker's sockets (the adoption of rule 6 in
   workers.py) while the retiring worker hands its idle keep-alive connections over
   (idle_handover.py) and then drains; once those sockets' accept queues are empty, they
   close. A closing listening socket resets what is queued on it: nothing is, by then.
3. Every worker then gets every listener's sockets again (ipc.py ``Siblings``), so its shares
   match the new number of siblings.
4. ``--workers N`` on the command line fixes the number: a reload that changes ``workers`` is
   refused then, as in a single process (``workers = 1`` has no master to add workers).

Where the BPF program cannot be attached (not Linux, or forbidden), growing still works (new
clients may wait for a new worker's start) and shrinking is refused before anything changed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Sequence
from typing import Protocol

from zdlb.config.model import ListenerConfig
from zdlb.daemon import ipc
from zdlb.daemon.handoff import Dealer, Peer, Shares, collect_idle, send_groups
from zdlb.daemon.runtime import Runtime
from zdlb.daemon.slot import WorkerSlot, ready_or_exited
from zdlb.errors import ListenerError, ZdlbError
from zdlb.tcp.listener import accept_queue_length, join_listener_group, steer_to_first

log = logging.getLogger(__name__)

# A retiring worker's sockets receive nothing new once steered away (rule 2); what was queued
# is accepted by a sibling within milliseconds. Past this, they close anyway.
QUEUE_DRAIN_S = 2.0
QUEUE_POLL_S = 0.005
# A new worker imports zdlb and uvloop (~0.3 s here); a loaded box gets many times that.
READY_TIMEOUT_S = 15.0


def check(override: int | None) -> list[str]:
    """Rule 4: the problems of a reload that changes ``workers``, or none."""
    if override is not None:
        return [
            f"workers: fixed at {override} by `zdlb run --workers` on the command line; "
            "changing it needs a restart"
        ]
    return []


def steer(groups: Sequence[Sequence[socket.socket]], count: int) -> list[str]:
    """Rules 1-2: new connections of every group go to its first ``count`` sockets. Returns
    the problems (an unsupported kernel), each group being tried."""
    problems = []
    for group in groups:
        try:
            steer_to_first(group[0], count)
        except ListenerError as exc:
            problems.append(f"workers: {exc}")
    return problems


def grow(
    groups: list[list[socket.socket]], listeners: Sequence[ListenerConfig], count: int
) -> None:
    """Rule 1: every group gets sockets up to ``count``. Raises ListenerError; the groups
    then hold what they held before."""
    before = len(groups[0]) if groups else 0
    try:
        for group, listener in zip(groups, listeners, strict=True):
            join_listener_group(group, listener.backlog, count - len(group))
    except ListenerError:
        shrink(groups, before)
        raise


def shrink(groups: Sequence[list[socket.socket]], count: int) -> None:
    """Close every group's sockets past ``count`` (this process's copies)."""
    for group in groups:
        for sock in group[count:]:
            sock.close()
        del group[count:]


async def wait_queues_empty(socks: Sequence[socket.socket]) -> bool:
    """Rule 2: until nothing waits in the accept queue of ``socks``, at most QUEUE_DRAIN_S.
    Returns whether they emptied."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + QUEUE_DRAIN_S
    while any(accept_queue_length(sock) for sock in socks):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(QUEUE_POLL_S)
    return True


async def send_siblings(
    peers: Sequence[Peer],
    seq: int,
    listeners: Sequence[ListenerConfig],
    groups: Sequence[list[socket.socket]],
) -> None:
    """Rule 3: every listener's group to every serving worker, then ``Siblings``."""
    by_name = {listener.name: group for listener, group in zip(listeners, groups, strict=True)}
    names = tuple(by_name)
    for peer in peers:
        if not peer.ready.is_set():
            continue
        try:
            await send_groups(peer, seq, by_name)
        except OSError as exc:  # it died: its restart gets every socket anyway
            log.warning("worker_siblings_not_sent worker=%d error=%s", peer.index, exc)
            continue
        peer.send(ipc.Siblings(seq, names))


class Workforce(Protocol):
    """What growing and shrinking need of the master's supervisor (workers.py)."""

    runtime: Runtime
    slots: list[WorkerSlot]  # serving, by index
    retiring: list[WorkerSlot]  # retired, still draining
    shares: Shares

    async def add(self, slot: WorkerSlot) -> None: ...


async def grow_workers(force: Workforce, target: int) -> list[str]:
    """Rule 1: from ``len(force.slots)`` workers to ``target``; the problems met."""
    running, groups = len(force.slots), force.runtime.listener_groups
    problems = steer(groups, running)  # the new sockets get nothing yet
    try:
        grow(groups, force.runtime.config.listeners, target)
    except ListenerError as exc:
        return [*problems, f"workers: {exc}"]
    added = [WorkerSlot(index) for index in range(running, target)]
    force.slots.extend(added)
    for slot in added:
        await force.add(slot)
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            for slot in added:
                await ready_or_exited(slot)
    except TimeoutError:  # restarted as any worker: serving soon, or never
        problems.append(f"workers: new workers not serving after {READY_TIMEOUT_S} s")
    except ZdlbError as exc:
        problems.append(f"workers: {exc}")
    return problems + steer(groups, target)


async def shrink_workers(force: Workforce, target: int) -> list[str]:
    """Rule 2: from ``len(force.slots)`` workers to ``target``; the problems met."""
    running, groups = len(force.slots), force.runtime.listener_groups
    problems = steer(groups, target)  # the last ones get nothing new
    staying, retiring = force.slots[:target], force.slots[target:]
    for slot in retiring:
        slot.is_retiring = True
        force.shares.hand_over(slot.index, staying)  # a sibling serves what is queued
    moved = await collect_idle(retiring, Dealer(staying).deliver)
    for slot in retiring:
        if slot.proc is not None and slot.proc.returncode is None:
            slot.proc.send_signal(signal.SIGTERM)  # it drains what is still busy
    tails = [group[index] for group in groups for index in range(target, running)]
    if not await wait_queues_empty(tails):
        problems.append("workers: a retiring worker's accept queue did not empty")
    for slot in retiring:
        force.shares.give_back(slot.index, staying)
    del force.slots[target:]
    force.retiring.extend(retiring)
    shrink(groups, target)
    log.info("workers_retiring workers=%d connections_moved=%d", len(retiring), moved)
    return problems
