"""What a master tells its workers beyond the servers' state (workers.py): who serves an exited
worker's share of the listeners (``Shares``, workers.py rule 6) and a config to apply in place
(``ConfigPush``, reload.py). Each is a small state object over ``Peer``, the narrow view of a
worker slot it needs; neither starts, watches nor stops a process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from zdlb.config.model import Config
from zdlb.daemon import ipc

log = logging.getLogger(__name__)

# A worker applies a pushed config in a few milliseconds (it binds nothing); a loaded box
# gets many times that before the master reports it as a problem.
RELOAD_TIMEOUT_S = 5.0


class Peer(Protocol):
    """A worker as the master sees it (workers.py ``WorkerSlot``)."""

    index: int
    ready: asyncio.Event

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
        self, seq: int, config: Config, state: ipc.StateUpdate, peers: Sequence[Peer]
    ) -> list[str]:
        """Returns the problems (a worker that failed, or did not answer in time)."""
        serving = [peer for peer in peers if peer.ready.is_set()]
        for peer in serving:
            peer.send(ipc.Reload(seq, config))
            peer.send(state)  # ipc.py rule 1: the master's state stands
        problems: list[str] = []
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
