"""Server selection for one backend: main before backup, then the configured balance algorithm.

``Backend.select`` is called once per request (and once per retry), so it is written as plain
loops over a handful of servers: no logging, no sorting, at most two small lists per call.

Pool rules: each main server is a *slot*; a slot whose main is not usable is served by the
main's pair (its backup on the same host) with the main's weight (server.py, rule 3). Unpaired
backups keep HAProxy's semantics: they serve only when no slot takes new traffic, and then only
the first usable one in config order unless ``all_backups`` is set. ``select_sticky`` routes a
client that carries a sticky identity: to that host's main, else its pair, else nobody (the
caller then balances and re-pins).

No I/O, no clock reads, no event loop here. Randomness comes from an injected ``random.Random``
so tests are deterministic.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection
from typing import assert_never

from zdlb.balancer.server import AdminState, Health, Member, Server, slot_route
from zdlb.config.model import BackendConfig, Balance, PoolName

# Source hashing keeps 53 bits of a 64-bit BLAKE2b digest: exactly what a float holds, so the
# uniform draw (x + 0.5) / 2**53 is strictly inside (0, 1) and log() never sees 0 or 1.
_HASH_BITS = 53
_HASH_SCALE = 1.0 / (1 << _HASH_BITS)
_HASH_SHIFT = 64 - _HASH_BITS
# Per-server salt length; BLAKE2b accepts at most 16 bytes of salt.
_SALT_BYTES = 16
# What select_sticky tests for every pinned request, as globals (see _is_roundrobin).
_MAIN, _READY, _UP = PoolName.MAIN, AdminState.READY, Health.UP


class Backend:
    """Runtime view of one backend: its servers in config order and the selection state.

    Single-threaded: owned by the event loop, mutated only by ``select`` and by callers that
    change server state between awaits.
    """

    __slots__ = (
        "_balance",
        "_by_identity",
        "_by_name",
        "_current",
        "_is_roundrobin",
        "_rng",
        "_rr_generation",
        "_rr_next",
        "_rr_period",
        "_rr_schedule",
        "_rr_valid_until",
        "_salt",
        "config",
        "name",
        "processes",
        "servers",
    )

    def __init__(
        self, config: BackendConfig, rng: random.Random | None = None, processes: int = 1
    ) -> None:
        self.config = config
        # Processes sharing these servers (workers): each keeps maxconn // processes of a
        # server's slots (balancer/queue.py, attach_queues).
        self.processes = processes
        self.name = config.name
        self.balance = config.balance
        self.servers: tuple[Server, ...] = tuple(Server(s, config.name) for s in config.servers)
        self._by_name = {server.name: server for server in self.servers}
        for server in self.servers:
            if server.config.pair is not None:  # load.py checked it names a main, once
                main = self._by_name[server.config.pair]
                main.pair, server.pair = server, main
        # Every identity a sticky cookie can carry, to the server that was configured as main.
        self._by_identity = {s.identity: s for s in self.servers if s.config.pair is None}
        # Without a sticky cookie a drained server has no users to hold: its pair takes over.
        hold_s = config.sticky.drain_sticky_s if config.sticky else 0.0
        for server in self.servers:
            server.drain_hold_s = hold_s
        self._rng = rng if rng is not None else random.Random()
        # Smooth round-robin "current weight" per server, keyed by the Server object so a server
        # that changes pool or drops out of the candidates keeps its place in the rotation.
        self._current: dict[Server, int] = dict.fromkeys(self.servers, 0)
        # Source hashing salts derive from the server *name*, not its address: renaming moves a
        # server's clients, re-addressing it does not.
        self._salt: dict[Server, bytes] = {s: _name_salt(s.name) for s in self.servers}
        # Round robin without retries replays one period of the smooth weighted sequence,
        # computed once per Server.generation: ~0.15 us a pick instead of ~1.2 us.
        self._rr_schedule: list[Server] = []
        self._rr_period = 0  # len(_rr_schedule), kept: a len() call per pick is ~50 ns
        self._rr_next = 0
        self._rr_generation = -1
        self._rr_valid_until = math.inf  # a drain hold ending changes the candidates

    @property
    def balance(self) -> Balance:
        return self._balance

    @balance.setter
    def balance(self, balance: Balance) -> None:
        self._balance = balance
        # Tested by every pick: a bool, not `balance is Balance.ROUNDROBIN` (an attribute of an
        # Enum class costs ~60 ns on CPython 3.11; see http/exchange.py's phases).
        self._is_roundrobin = balance is Balance.ROUNDROBIN

    def server(self, name: str) -> Server | None:
        """The server called ``name`` in this backend, or None."""
        return self._by_name.get(name)

    def identities(self) -> list[str]:
        """Every sticky identity of this backend: one per host (a main and its pair share it)."""
        return list(self._by_identity)

    def swap_pools(self) -> None:
        """Blue/green: every main server becomes a backup and every backup a main."""
        for server in self.servers:
            server.pool = PoolName.BACKUP if server.pool is PoolName.MAIN else PoolName.MAIN

    def select_sticky(self, identity: str, now: float) -> Server | None:
        """The server for a client pinned to ``identity``, or None (unknown, or the host has
        no usable version: the caller balances and re-pins). Rule 2 and 3 of server.py."""
        if identity not in self._by_identity:  # `in` and `[]`, no call: once per request
            return None
        server = self._by_identity[identity]
        pair = server.pair
        if pair is not None and pair._pool is _MAIN:
            server = pair  # after a swap the configured backup is the slot's main
        if server._pool is not _MAIN:  # an unpaired backup keeps its users while usable
            return server if server.holds_sticky(now) else None
        # The common case, a main READY and UP, is slot_route's answer without its three calls:
        # a main that holds its sticky users keeps them, paired or not (server.py, rule 3).
        if server._admin is _READY and server._health is _UP:
            return server
        _, member = slot_route(server, now)
        if member is Member.MAIN:
            return server
        return server.pair if member is Member.PAIR else None

    def select(
        self, now: float, client_key: bytes | None = None, exclude: Collection[Server] = ()
    ) -> Server | None:
        """Pick the server for a new request, or None if no server takes new traffic.

        ``client_key`` (e.g. the client IP as bytes) is used by SOURCE balancing only; without
        it SOURCE falls back to round robin. ``exclude`` holds servers already tried for this
        request (retries). Never raises; the caller turns None into ``NoServerAvailable``.

        Rough cost, CPython 3.11, linear in the number of servers: ~0.15 us per server to find
        the candidates, ~0.15-0.3 us per candidate to pick, ~1 us per candidate for SOURCE (one
        BLAKE2b and one log each). Measured with 4 idle servers: ROUNDROBIN 1.2 us, LEASTCONN
        2 us, RANDOM 1.7 us, SOURCE 5 us per call.
        """
        if not exclude and self._is_roundrobin:
            if self._rr_generation != Server.generation or now >= self._rr_valid_until:
                self._build_schedule(now)
            schedule = self._rr_schedule
            if not schedule:
                return None
            position = self._rr_next
            self._rr_next = position + 1 if position + 1 < self._rr_period else 0
            return schedule[position]
        candidates = self._candidates(exclude, now)
        if len(candidates) <= 1:
            # One candidate: every algorithm picks it, and smooth round robin would add and
            # subtract the same weight, so skipping it leaves the rotation state unchanged.
            return candidates[0][0] if candidates else None
        match self.balance:
            case Balance.ROUNDROBIN:
                return self._pick_roundrobin(candidates)
            case Balance.LEASTCONN:
                return self._pick_leastconn(candidates)
            case Balance.RANDOM:
                return self._pick_random(candidates)
            case Balance.SOURCE:
                if client_key is None:
                    return self._pick_roundrobin(candidates)
                return self._pick_source(candidates, client_key)
            case _:
                assert_never(self.balance)

    def takes_new_traffic(self, server: Server, now: float) -> bool:
        """True if a balanced pick could choose ``server`` at ``now`` (itself, or standing in
        for its main): the queue's rule 3 asks before giving it a shared waiter."""
        return any(s is server for s, _ in self._candidates((), now))

    def _build_schedule(self, now: float) -> None:
        """One period of smooth weighted round robin over today's candidates: sum of weights
        divided by their gcd picks (2 for two equal servers, at most 256 per server)."""
        candidates = self._candidates((), now)
        weights = [weight for _, weight in candidates]
        period = sum(weights) // math.gcd(*weights) if weights else 0
        self._rr_schedule = [self._pick_roundrobin(candidates) for _ in range(period)]
        self._rr_period = period
        self._rr_next = 0
        self._rr_generation = Server.generation
        holds = [s.drain_ends for s in self.servers if s._admin is AdminState.DRAIN]
        self._rr_valid_until = min([end for end in holds if end > now], default=math.inf)

    def _candidates(self, exclude: Collection[Server], now: float) -> list[tuple[Server, int]]:
        """(server, weight) taking new traffic: each slot's main, or its pair with the main's
        weight (rule 3); else unpaired backups (only the first unless all_backups)."""
        # The common case -- a main READY and UP -- is Server.takes_new_traffic inlined, reading
        # the fields behind the properties (which exist to bump Server.generation on writes):
        # the property calls cost ~0.3 us per server, half of this method (measured, 4 servers).
        ready, up = AdminState.READY, Health.UP
        main = PoolName.MAIN
        found: list[tuple[Server, int]] = []
        for s in self.servers:
            if s._pool is not main:
                continue
            if s._admin is ready and s._health is up:
                if s._weight > 0 and s not in exclude:
                    found.append((s, s._weight))
            elif s.pair is not None and slot_route(s, now)[0] is Member.PAIR:
                if s.pair not in exclude:
                    found.append((s.pair, s._weight))
        if found:
            return found
        backup, only_first = PoolName.BACKUP, not self.config.all_backups
        for s in self.servers:
            if (
                s._pool is backup
                and s.pair is None
                and s._admin is ready
                and s._health is up
                and s._weight > 0
                and s not in exclude
            ):
                found.append((s, s._weight))
                if only_first:
                    break  # HAProxy: without allbackups only the first usable backup serves
        return found

    def _pick_roundrobin(self, candidates: list[tuple[Server, int]]) -> Server:
        """nginx's smooth weighted round robin: weights 5/1/1 give a a b a c a a."""
        current = self._current
        total = 0
        best = candidates[0][0]
        best_current = -(1 << 62)
        for s, weight in candidates:
            value = current.get(s, 0) + weight
            current[s] = value
            total += weight
            if value > best_current:  # strict: ties go to the first in config order
                best, best_current = s, value
        current[best] = best_current - total
        return best

    def _pick_leastconn(self, candidates: list[tuple[Server, int]]) -> Server:
        """Fewest in-flight requests per unit of weight; ties share by smooth round robin.

        Loads compare as ``a.inflight * b.weight < b.inflight * a.weight``: exact integers, no
        division. Breaking ties by weighted round robin (rather than "first wins") spreads an
        idle backend's traffic by weight instead of sending it all to the first server.
        """
        best, best_weight = candidates[0]
        for s, weight in candidates:
            if s.inflight * best_weight < best.inflight * weight:
                best, best_weight = s, weight
        load = best.inflight
        tied = [(s, w) for s, w in candidates if s.inflight * best_weight == load * w]
        return tied[0][0] if len(tied) == 1 else self._pick_roundrobin(tied)

    def _pick_random(self, candidates: list[tuple[Server, int]]) -> Server:
        """Weighted power of two choices: two distinct weighted draws, keep the less loaded.

        The first draw wins ties, so an idle backend is served exactly in proportion to weight.
        """
        total = 0
        for _, weight in candidates:
            total += weight
        first, first_weight = self._draw(candidates, total, None)
        second, second_weight = self._draw(candidates, total - first_weight, first)
        if second.inflight * first_weight < first.inflight * second_weight:
            return second
        return first

    def _draw(
        self, candidates: list[tuple[Server, int]], total: int, skip: Server | None
    ) -> tuple[Server, int]:
        """One candidate other than ``skip``, with probability weight / ``total``."""
        point = self._rng.random() * total
        chosen = candidates[0]
        for candidate in candidates:
            if candidate[0] is skip:
                continue
            chosen = candidate
            point -= candidate[1]
            if point < 0:
                break
        # Float rounding can leave point at 0 after the last server; `chosen` is then the last
        # eligible one, which is where the draw belongs.
        return chosen

    def _pick_source(self, candidates: list[tuple[Server, int]], client_key: bytes) -> Server:
        """Weighted rendezvous hashing: the highest ``weight / -ln(hash(key, server))`` wins.

        Each server's score depends only on the key and that server, so removing a server moves
        only the keys it held, and a server's share is proportional to its weight. The hash is
        keyed BLAKE2b, stable across processes (unlike the salted built-in ``hash``).
        """
        best = candidates[0][0]
        best_score = -1.0
        salt = self._salt
        blake2b = hashlib.blake2b
        for s, weight in candidates:
            server_salt = salt.get(s)
            if server_salt is None:
                server_salt = salt[s] = _name_salt(s.name)
            digest = blake2b(client_key, digest_size=8, salt=server_salt).digest()
            unit = ((int.from_bytes(digest, "big") >> _HASH_SHIFT) + 0.5) * _HASH_SCALE
            score = weight / -math.log(unit)
            if score > best_score:
                best, best_score = s, score
        return best

    def __repr__(self) -> str:
        servers = ", ".join(repr(s) for s in self.servers)
        return f"<Backend {self.name} balance={self.balance.value} servers=[{servers}]>"


def _name_salt(name: str) -> bytes:
    """A fixed-size BLAKE2b salt derived from a server name (names may exceed the salt size)."""
    return hashlib.blake2b(name.encode(), digest_size=_SALT_BYTES).digest()
