"""A worker's copies of its siblings' listening sockets, served only while a sibling is down
(workers.py, rule 6; ipc.py ``Adopt`` and ``Release``).

Rules:

1. Every worker holds, from its start, every sibling's socket of every listener, by sibling
   index and listener name, and accepts on none of them until told to ``adopt`` a share.
2. An adopted HTTP share accepts into the listener's route slot (its connections take the
   current route, as those of the worker's own socket do); an adopted TCP share is one more
   socket of the listener's ``TcpRoute`` (tcp/proxy.py ``adopt_socket``). Either way the
   adopter serves a duplicate, so letting go (``release``) closes only that and the share
   stays for the next time.
3. A reload that adds or moves listeners brings every worker's socket of each (the master's
   groups, fdchannel.py); ``replace`` keeps the shares of the listeners kept (under their new
   name), takes the new ones and closes those of listeners removed. Shares adopted across a
   reload are released before it and adopted again after, on the new routes.
4. A reload that changes ``workers`` sends every worker's socket of every listener: ``reset``
   replaces every share with them (the shares of a worker gone are closed here).

No socket is bound here, and nothing but the adopted duplicates is ever accepted on.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping, Sequence

from zdlb.config.model import Config
from zdlb.daemon.lifecycle import accept_into
from zdlb.daemon.runtime import Runtime

log = logging.getLogger(__name__)


class SiblingShares:
    """The sibling sockets of one worker (rule 1) and the shares it serves now."""

    def __init__(self, runtime: Runtime, socks: dict[int, dict[str, socket.socket]]) -> None:
        self._runtime = runtime
        self._socks = socks  # sibling index -> listener name -> its socket
        self._adopted: dict[int, list[Callable[[], None]]] = {}  # index -> how to let go

    def __repr__(self) -> str:
        return f"<SiblingShares siblings={sorted(self._socks)} adopted={sorted(self._adopted)}>"

    @property
    def adopted(self) -> list[int]:
        return sorted(self._adopted)

    async def adopt(self, index: int) -> None:
        """Rule 2: accept on sibling ``index``'s sockets too, until ``release``."""
        if index in self._adopted or index not in self._socks:
            return
        runtime = self._runtime
        tcp_routes = {route.listener.name: route for route in runtime.tcp_routes}
        closers: list[Callable[[], None]] = []
        for name, sock in self._socks[index].items():
            copy = sock.dup()  # rule 2: closing the copy leaves the share for the next time
            copy.setblocking(False)
            if (slot := runtime.slots.get(name)) is not None:
                closers.append((await accept_into(slot, copy)).close)
            elif (tcp_route := tcp_routes.get(name)) is not None:
                tcp_route.adopt_socket(copy)
                closers.append(lambda route=tcp_route, s=copy: route.release_socket(s))  # type: ignore[misc]
            else:
                copy.close()
        self._adopted[index] = closers
        log.info("worker_share_serving share=%d listeners=%d", index, len(closers))

    def release(self, index: int) -> None:
        """Stop accepting on worker ``index``'s sockets; its connections here carry on."""
        for close in self._adopted.pop(index, []):
            close()

    def replace(
        self,
        config: Config,
        sources: Mapping[str, str],
        groups: Mapping[str, Sequence[socket.socket]],
    ) -> None:
        """Rule 3, once a reload is applied: ``sources`` maps a new listener name to the old
        one whose socket it keeps; ``groups`` holds every worker's socket of the new binds
        (this worker's own is the runtime's now and is not touched)."""
        for index, old in self._socks.items():
            row: dict[str, socket.socket] = {}
            for listener in config.listeners:
                name = listener.name
                if name in groups:
                    row[name] = groups[name][index]
                elif (source := sources.get(name)) is not None and source in old:
                    row[name] = old.pop(source)
            for sock in old.values():  # a listener removed or moved
                sock.close()
            self._socks[index] = row

    def reset(self, groups: Mapping[str, Sequence[socket.socket]], own: int) -> None:
        """Rule 4: every listener's sockets, every worker's (``groups``, by listener name, by
        worker index) replace the shares held, after the master changed the number of workers
        (resize.py; shares being served were released before)."""
        for socks in self._socks.values():
            for sock in socks.values():
                sock.close()
        count = len(next(iter(groups.values()), []))
        self._socks = {
            index: {name: socks[index] for name, socks in groups.items()}
            for index in range(count)
            if index != own
        }

    def close(self) -> None:
        """At stop: let go of every sibling socket, so that once every process has, the
        listeners close and new clients are refused instead of queued for nobody."""
        for index in list(self._adopted):
            self.release(index)
        for socks in self._socks.values():
            for sock in socks.values():
                sock.close()
        self._socks = {}
