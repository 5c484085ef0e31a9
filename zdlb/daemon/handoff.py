"""What a master tells its workers beyond the servers' state (workers.py): who serves an exited
worker's share of the listeners (``Shares``, workers.py rule 6), a config to apply in place
with the sockets of its new listeners (``ConfigPush``, reload.py), and an upgrade's idle
connections, collected from old workers or dealt out to new ones (``collect_idle``,
``deliver``; idle_handover.py). Each works over ``Peer``, the narrow view of a worker slot it
needs; none starts, watches nor stops a process.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Protocol

from zdlb.config.model import Config
from zdlb.daemon import ipc
from zdlb.daemon.fdchannel import MAX_FDS, FdChannel
from zdlb.daemon.idle_handover import HANDOVER_S, Batch, collect_from_worker, deal
from zdlb.daemon.runtime import SendConnections

log = logging.getLogger(__name__)

# A worker applies a pushed config in a few milliseconds (it binds nothing); a loaded box
# gets many times that before the master reports it as a problem.
RELOAD_TIMEOUT_S = 5.0
# An old worker hands over for at most HANDOVER_S; past this margin its master stops waiting.
COLLECT_MARGIN_S = 2.0


class Peer(Protocol):
    """A worker as the master sees it (workers.py ``WorkerSlot``)."""

    index: int
    ready: asyncio.Event
    fds: FdChannel | None

    def send(self, message: ipc.Message) -> None: ...


class Shares:
    """Which live worker accepts on an exited worker's sockets, until it serves again."""

    def __init__(self) -> None:
        self._adopter: dict[int, int] = {}  # an exited worker's index -> who serves its share

    def hand_over(self, index: int, peers: Sequence[Peer]) -> None:
        """Worker ``index`` exited: the shares it served (its own and any it had adopted) go
        to the live workers, round robin."""
        shares = [index, *(dead for dead, by in self._adopter.items() if by == index)]
        live = [p for p in peers if p.ready.is_set() and p.index != index]
        for number, share in enumerate(shares):
            if not live:  # nobody serves: the queue waits for a restart, as before
                self._adopter.pop(share, None)
                continue
            target = live[number % len(live)]
            self._adopter[share] = target.index
            target.send(ipc.Adopt(share))
            log.info("worker_share_adopted share=%d by=%d", share, target.index)

    def give_back(self, index: int, peers: Sequence[Peer]) -> None:
        """Worker ``index`` serves again: whoever adopted its share lets go."""
        adopter = self._adopter.pop(index, None)
        if adopter is not None:
            peers[adopter].send(ipc.Release(index))
            log.info("worker_share_released share=%d by=%d", index, adopter)


class ConfigPush:
    """Send a config to the serving workers and collect their ``Reloaded`` answers."""

    def __init__(self) -> None:
        self._answers: dict[int, ipc.Reloaded] = {}  # by worker index: its latest answer
        self._answered = asyncio.Event()

    def answered(self, index: int, message: ipc.Reloaded) -> None:
        self._answers[index] = message
        self._answered.set()

    async def push(
        self,
        seq: int,
        config: Config,
        state: ipc.StateUpdate,
        peers: Sequence[Peer],
        groups: Mapping[str, Sequence[socket.socket]],
    ) -> list[str]:
        """Returns the problems (a worker that failed, or did not answer in time). ``groups``:
        the sockets of the listeners the reload binds, every worker's of each, sent to every
        worker (its siblings' are its shares, sibling_shares.py) before the ``Reload``."""
        serving = [peer for peer in peers if peer.ready.is_set()]
        problems: list[str] = []
        for peer in serving:
            try:
                await send_groups(peer, seq, groups)
            except OSError as exc:  # it died: it restarts with the new config and sockets
                problems.append(f"worker {peer.index}: sending the new listeners failed: {exc}")
                continue
            peer.send(ipc.Reload(seq, config, tuple(groups)))
            peer.send(state)  # ipc.py rule 1: the master's state stands
        try:
            async with asyncio.timeout(RELOAD_TIMEOUT_S):
                while not all(self._is_done(peer, seq) for peer in serving):
                    self._answered.clear()
                    await self._answered.wait()
        except TimeoutError:
            late = [peer.index for peer in serving if not self._is_done(peer, seq)]
            problems.append(f"workers {late} did not apply it within {RELOAD_TIMEOUT_S} s")
        for peer in serving:
            answer = self._answers.get(peer.index)
            if answer is not None and answer.seq == seq:
                problems += [f"worker {peer.index}: {p}" for p in answer.problems]
        return problems

    def _is_done(self, peer: Peer, seq: int) -> bool:
        answer = self._answers.get(peer.index)
        return (answer is not None and answer.seq >= seq) or not peer.ready.is_set()


async def send_groups(peer: Peer, seq: int, groups: Mapping[str, Sequence[socket.socket]]) -> None:
    """``listeners`` messages (fdchannel.py) holding every group, as few as MAX_FDS allows."""
    if not groups or peer.fds is None:
        return
    names = list(groups)
    count = len(groups[names[0]])
    per_message = max(1, MAX_FDS // count)
    for start in range(0, len(names), per_message):
        part = names[start : start + per_message]
        socks = [sock for name in part for sock in groups[name]]
        payload = {"t": "listeners", "seq": seq, "names": part, "count": count}
        await peer.fds.send(payload, socks)


async def collect_idle(peers: Sequence[Peer], send: SendConnections) -> int:
    """An old master in an upgrade: ask every serving worker for its idle connections and pass
    them on to ``send`` as they come, until each says it is done (or HANDOVER_S plus a margin
    passed: a worker that does not finish drains the rest). Returns how many were passed on."""
    serving = [peer for peer in peers if peer.ready.is_set() and peer.fds is not None]
    for peer in serving:
        peer.send(ipc.HandOver())
    lock = asyncio.Lock()  # one batch at a time on the channel to the new process

    async def locked(batch: Batch) -> None:
        async with lock:
            await send(batch)

    async def one(peer: Peer) -> int:
        assert peer.fds is not None
        try:
            async with asyncio.timeout(HANDOVER_S + COLLECT_MARGIN_S):
                return await collect_from_worker(peer.fds, locked)
        except (TimeoutError, ConnectionError, ValueError) as exc:
            log.error("upgrade_collect_failed worker=%d error=%r", peer.index, exc)
            return 0

    return sum(await asyncio.gather(*(one(peer) for peer in serving)))


class Dealer:
    """A new master in an upgrade: deals the connections received out to its serving workers."""

    def __init__(self, peers: Sequence[Peer]) -> None:
        self._peers = peers
        self._dealt = 0

    async def deliver(self, batch: Batch) -> None:
        channels = [p.fds for p in self._peers if p.ready.is_set() and p.fds is not None]
        await deal(batch, channels, self._dealt)
        self._dealt += len(batch)
