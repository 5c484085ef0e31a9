"""One instance's membership of a fleet: the shared server states in etcd, kept in step.

Rules (issue 16):
1. **Start**: ``join`` reads every server key and applies it before anything serves. If etcd
   does not answer, the instance serves what its state journal replayed, says so
   (``cluster_unreachable_at_start``), and catches up once etcd answers (rule 4).
2. **Write-through**: ``commit`` is one etcd transaction putting every changed server's key,
   on condition that each key's mod revision is still the one this instance last applied: an
   operator on another instance who changed it meanwhile makes it fail (``ClusterConflict``
   naming who won), and nothing changes anywhere. It returns once the change is committed and
   applied here (the watch brings it back in revision order, so a newer change from elsewhere
   is never overwritten by an older local one).
3. **Watch**: every change under ``PREFIX/servers/`` is applied to the controller (and so to
   the workers) as it arrives, a key's older revision never over a newer one.
4. **Fail-static**: when the watch breaks or a lease renewal fails, the instance keeps serving
   its last state and ``commit`` refuses (``ClusterUnavailable``): a change applied to one
   instance only would split the fleet. It retries with a growing delay; when etcd answers it
   reads the servers' keys whole at a revision R, applies what differs (logged, with the old
   and new revision: ``cluster_resynced``), and watches again from R + 1: no change missed, no
   stale one replayed, and compaction meanwhile does not matter (Kubernetes' list-then-watch).
5. **Views**: each instance publishes its own view (admin, health, weight, pool, in-flight per
   server) under a lease of ``lease_s``, so a dead instance disappears from ``show servers
   --fleet`` and from fleet-wide ``wait idle`` on its own.
Health is never shared: each instance checks from where it stands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from zdlb.balancer.server import Server
from zdlb.cluster import state as shared
from zdlb.cluster.etcd import EtcdClient, KeyValue, WatchEvent, b64, prefix_end
from zdlb.cluster.state import LockChange, ServerState
from zdlb.config.cluster import ClusterConfig
from zdlb.deploy.record import DEPLOY_LEASE_S
from zdlb.errors import ClusterConflict, ClusterUnavailable

log = logging.getLogger(__name__)

# Retry delays after etcd stopped answering: from RETRY_MIN_S, doubling up to RETRY_MAX_S. A
# restarted etcd on the same box answers within ~1 s; an operator waits at most this long more.
RETRY_MIN_S = 0.05
RETRY_MAX_S = 1.0
# The view is compared with the last one published this often and written when it differs: a
# fleet-wide `wait idle` hears of the last request ending within about this plus a round trip.
PUBLISH_POLL_S = 0.05
# A commit is answered once the watch brought it back; if the watch is slower than this (it
# broke just then), the committed change is applied here directly.
APPLIED_WAIT_S = 1.0
# A change's reply waits this long at most for every live instance to report it applied; one
# that does not is named in the reply (it may be stuck, or cut off from etcd).
REACH_WAIT_S = 1.0
REACH_POLL_S = 0.005


class StateSink(Protocol):
    """What the fleet changes and reads: the control commands' Controller is one."""

    def apply_shared(self, backend: str, server: str, state: ServerState) -> bool:
        """Apply a committed state (logged, journaled); True if anything changed."""
        ...

    def fleet_view(self) -> dict[str, dict[str, object]]:
        """This instance's view of its servers, by "backend/server" (health and load too)."""
        ...

    def apply_deploy(self, value: bytes) -> None:
        """The deploy record (``zdlb deploy``) as committed in the fleet, by any instance."""
        ...


def client_of(config: ClusterConfig) -> EtcdClient:
    """An etcd client as ``[cluster]`` says (TLS files and the password read here).

    Raises ClusterUnavailable if a TLS or password file cannot be used.
    """
    context = None
    if config.tls is not None:
        try:
            context = ssl.create_default_context(
                cafile=None if config.tls.ca is None else str(config.tls.ca)
            )
            if config.tls.cert is not None and config.tls.key is not None:
                context.load_cert_chain(str(config.tls.cert), str(config.tls.key))
        except (OSError, ssl.SSLError) as exc:
            raise ClusterUnavailable(f"cluster.tls: {exc}") from None
    auth = None
    if config.auth is not None:
        try:
            text = config.auth.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ClusterUnavailable(f"cluster.auth.password_file: {exc}") from None
        auth = (config.auth.user, text.splitlines()[0] if text else "")
    return EtcdClient(config.endpoints, config.timeout_s, context, auth)


class Fleet:
    """This instance's link to the fleet's etcd keys; see the module's rules."""

    def __init__(self, config: ClusterConfig, client: EtcdClient) -> None:
        self.config = config
        self.client = client
        self.revision = 0  # the etcd revision applied up to (0: never read)
        self.is_synced = False  # True while the watch runs on a full read: commits allowed
        self._seen: dict[str, int] = {}  # server key -> mod revision applied (absent: 0)
        self._sink: StateSink | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Commits waiting for the watch to bring their revision back (rule 2).
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._stale = asyncio.Event()  # a lease renewal failed: the watch must be redone
        self._moved = asyncio.Event()  # the applied revision moved: publish the view now
        self._lease = 0
        self.deploy_lock: dict[str, Any] | None = None  # PREFIX/deploy/lock's value, if held

    @property
    def instance(self) -> str:
        return self.config.instance

    def __repr__(self) -> str:
        return (
            f"<Fleet {self.config.prefix} instance={self.config.instance} "
            f"revision={self.revision} synced={self.is_synced}>"
        )

    @property
    def _servers_prefix(self) -> str:
        return f"{self.config.prefix}/{shared.SERVERS}/"

    @property
    def _followed(self) -> tuple[str, str]:
        """The keys every instance follows: ``deploy/`` and ``servers/`` (state.py)."""
        return f"{self.config.prefix}/deploy/", prefix_end(self._servers_prefix)

    async def join(self, servers: Iterable[Server]) -> bool:
        """Rule 1: apply the fleet's state to ``servers`` (before they serve), a server without
        a key being as configured; False when etcd did not answer (the journal's state stays,
        and the watch catches up later)."""
        by_key = {shared.server_key(self.config.prefix, s.backend, s.name): s for s in servers}
        try:
            revision, kvs = await self.client.range_prefix(self._servers_prefix)
        except ClusterUnavailable as exc:
            log.warning(
                "cluster_unreachable_at_start prefix=%s serving=journal error=%s",
                self.config.prefix,
                exc,
            )
            return False
        loop_now, wall_now = asyncio.get_running_loop().time(), time.time()
        # The fleet's state wins over the journal's: a server without a key is as configured.
        states = {key: shared.configured(server) for key, server in by_key.items()}
        for kv in kvs:
            self._seen[kv.key] = kv.mod_revision
            if kv.key in states and (state := self._decode(kv)) is not None:
                states[kv.key] = state
        applied = sum(
            shared.apply(by_key[key], state, wall_now, loop_now) for key, state in states.items()
        )
        self.revision = revision
        log.info(
            "cluster_joined prefix=%s instance=%s revision=%d keys=%d changed=%d",
            self.config.prefix,
            self.config.instance,
            revision,
            len(kvs),
            applied,
        )
        return True

    def attach(self, sink: StateSink) -> None:
        """Start following the fleet (rules 3-5), applying changes to ``sink``."""
        self._sink = sink
        for name, body in (("cluster watch", self._follow()), ("cluster view", self._publish())):
            task = asyncio.get_running_loop().create_task(body, name=name)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop following; revoke this instance's lease so its view goes at once."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._lease:
            try:
                await self.client.revoke(self._lease)
            except ClusterUnavailable:
                pass  # it expires by itself
        await self.client.close()

    # -- write-through (rule 2) ------------------------------------------------------------

    async def commit(self, changes: Mapping[tuple[str, str], ServerState], uid: int) -> int:
        """Commit ``changes`` (by (backend, server)) as one transaction; the revision.

        Raises ClusterUnavailable (etcd down or this instance not in step: nothing changed)
        or ClusterConflict (another change won the race: nothing changed).
        """
        self._refuse_unless_synced()
        wall_now = time.time()
        compares, puts, seen = [], [], {}
        for (backend, server), state in changes.items():
            key = shared.server_key(self.config.prefix, backend, server)
            seen[key] = self._seen.get(key, 0)
            compares.append(
                {
                    "key": b64(key),
                    "target": "MOD",
                    "mod_revision": str(seen[key]),
                    "result": "EQUAL",
                }
            )
            tagged = ServerState(
                state.admin, state.weight, state.pool, state.drain_until, self.config.instance, uid
            )
            value = shared.encode(tagged, wall_now)
            puts.append({"request_put": {"key": b64(key), "value": b64(value)}})
        try:
            result = await self.client.txn(compares, puts, list(seen))
        except ClusterUnavailable as exc:
            raise ClusterUnavailable(
                f"{exc}: change refused, nothing changed; every instance keeps serving its "
                "last state"
            ) from None
        if not result.succeeded:
            raise ClusterConflict(self._conflict_message(result.current, seen))
        await self._until_applied(result.revision, changes)
        return result.revision

    async def lagging(self, revision: int) -> list[str]:
        """Wait (at most REACH_WAIT_S) until every live instance reports it applied
        ``revision``; the instances that still do not (empty: the whole fleet has it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REACH_WAIT_S
        while True:
            try:
                views = await self.views()
            except ClusterUnavailable:
                return ["? (etcd did not answer)"]
            behind = sorted(n for n, v in views.items() if _int(v.get("revision")) < revision)
            if not behind or loop.time() >= deadline:
                return behind
            await asyncio.sleep(REACH_POLL_S)

    def _conflict_message(self, current: Iterable[KeyValue], seen: Mapping[str, int]) -> str:
        lines = []
        for kv in current:
            if kv.mod_revision == seen.get(kv.key, 0):
                continue
            name = kv.key.removeprefix(self._servers_prefix)
            try:
                state = shared.decode(kv.value)
                who = f"by {state.by or '?'} (uid {state.uid})"
                lines.append(f"{name} was changed {who} to {state.describe()}")
            except ValueError:
                lines.append(f"{name} was changed meanwhile")
        detail = "; ".join(lines) or "a server was changed meanwhile"
        return f"{detail}; your change was not applied: look again (show servers) and retry"

    async def _until_applied(
        self, revision: int, changes: Mapping[tuple[str, str], ServerState]
    ) -> None:
        if self.revision >= revision:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, waiter))
        try:
            async with asyncio.timeout(APPLIED_WAIT_S):
                await waiter
        except TimeoutError:
            # Committed, so every instance applies it once it watches again; this one now.
            if self._sink is not None:
                for (backend, server), state in changes.items():
                    self._sink.apply_shared(backend, server, state)

    # -- the deploy lock and record (zdlb deploy across the fleet) ---------------------------

    def _key(self, name: str) -> str:
        return f"{self.config.prefix}/{name}"

    async def commit_deploy(self, value: bytes, lock: LockChange, holder: str) -> None:
        """Commit the deploy record ``value`` (on condition that it is still the one this
        instance last applied), and change the lock: ``TAKE`` it under a new etcd lease of
        DEPLOY_LEASE_S (refused while anyone holds it: etcd lets the lease of a crashed deploy
        expire), ``RENEW`` that lease, ``RELEASE`` it, or ``KEEP`` it. ``holder`` describes
        who takes it, for the refusal others get.

        Raises ClusterUnavailable or ClusterConflict (nothing changed then).
        """
        self._refuse_unless_synced()
        record_key, lock_key = self._key(shared.DEPLOY_RECORD), self._key(shared.DEPLOY_LOCK)
        seen = str(self._seen.get(record_key, 0))
        compares: list[dict[str, Any]] = [
            {"key": b64(record_key), "target": "MOD", "mod_revision": seen, "result": "EQUAL"}
        ]
        ops: list[dict[str, Any]] = [{"request_put": {"key": b64(record_key), "value": b64(value)}}]
        lease = old_lease = _int((self.deploy_lock or {}).get("lease"))
        try:
            if lock in (LockChange.TAKE, LockChange.TAKE_OVER):
                lease = await self.client.grant(int(DEPLOY_LEASE_S))
                if lock is LockChange.TAKE_OVER and old_lease:
                    same = {"target": "LEASE", "lease": str(old_lease), "result": "EQUAL"}
                    compares.append({"key": b64(lock_key), **same})
                else:
                    absent = {"target": "CREATE", "create_revision": "0", "result": "EQUAL"}
                    compares.append({"key": b64(lock_key), **absent})
                text = json.dumps(
                    {"holder": holder, "instance": self.config.instance, "lease": lease}
                )
                ops.append(
                    {"request_put": {"key": b64(lock_key), "value": b64(text), "lease": str(lease)}}
                )
            elif lock is LockChange.RENEW and lease and await self.client.keepalive(lease) <= 0:
                raise ClusterConflict("the deploy lock's etcd lease expired: the deploy lost it")
            elif lock is LockChange.RELEASE:
                ops.append({"request_delete_range": {"key": b64(lock_key)}})
            result = await self.client.txn(compares, ops, [lock_key])
        except ClusterUnavailable as exc:
            raise ClusterUnavailable(f"{exc}: the deploy's record cannot be written") from None
        if not result.succeeded:
            if lock in (LockChange.TAKE, LockChange.TAKE_OVER):
                await self._revoke_quietly(lease)
            held = next((_json_object(kv.value) for kv in result.current), None)
            if held is not None:
                raise ClusterConflict(
                    f"a deploy holds the fleet's lock: {held.get('holder')} on instance "
                    f"{held.get('instance')}"
                )
            raise ClusterConflict("the deploy record changed meanwhile: look again (show deploy)")
        if lock is LockChange.RELEASE or (lock is LockChange.TAKE_OVER and old_lease):
            await self._revoke_quietly(old_lease)
        await self._until_applied(result.revision, {})

    async def _revoke_quietly(self, lease: int) -> None:
        if lease:
            try:
                await self.client.revoke(lease)
            except ClusterUnavailable:
                pass  # it expires by itself within DEPLOY_LEASE_S

    def _refuse_unless_synced(self) -> None:
        if not self.is_synced:
            raise ClusterUnavailable(
                f"not in step with the fleet's etcd ({self.client.endpoint}): change refused, "
                "nothing changed; every instance keeps serving its last state"
            )

    # -- following the fleet (rules 3, 4) --------------------------------------------------

    async def _follow(self) -> None:
        delay = RETRY_MIN_S
        while True:
            try:
                await self._resync()
                delay = RETRY_MIN_S
                await self._watch_until_stale()
            except ClusterUnavailable as exc:
                if self.is_synced or delay == RETRY_MIN_S:
                    log.warning(
                        "cluster_unavailable prefix=%s revision=%d serving=last state error=%s",
                        self.config.prefix,
                        self.revision,
                        exc,
                    )
                self.is_synced = False
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)

    async def _resync(self) -> None:
        """Read every server key at once; apply what differs; log what was caught up."""
        revision, kvs = await self.client.range_keys(*self._followed)
        old_revision = self.revision
        caught_up = [name for kv in kvs if (name := self._apply_kv(kv)) is not None]
        if all(kv.key != self._key(shared.DEPLOY_LOCK) for kv in kvs):
            self.deploy_lock = None
        self._set_revision(revision)
        self.is_synced = True
        self._stale.clear()
        log.info(
            "cluster_resynced prefix=%s from_revision=%d to_revision=%d caught_up=%d servers=%s",
            self.config.prefix,
            old_revision,
            revision,
            len(caught_up),
            ",".join(caught_up) or "-",
        )

    async def _watch_until_stale(self) -> None:
        watching = asyncio.ensure_future(self._watch())
        stale = asyncio.ensure_future(self._stale.wait())
        try:
            await asyncio.wait((watching, stale), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            stale.cancel()
            await asyncio.gather(watching, stale, return_exceptions=True)
        if watching.done() and not watching.cancelled() and watching.exception() is not None:
            raise watching.exception()  # type: ignore[misc]  # checked not None just above
        raise ClusterUnavailable("a lease renewal failed: watching again")

    async def _watch(self) -> None:
        start, end = self._followed
        async for batch in self.client.watch(start, self.revision + 1, end):
            self._apply_batch(batch)

    def _apply_batch(self, batch: list[WatchEvent]) -> None:
        top = self.revision
        for event in batch:
            top = max(top, event.kv.mod_revision)
            if event.is_delete:
                self._seen.pop(event.kv.key, None)  # an operator's etcdctl; config rules next
                if event.kv.key == self._key(shared.DEPLOY_LOCK):
                    self.deploy_lock = None  # released, or its lease expired
                continue
            self._apply_kv(event.kv)
        self._set_revision(top)

    def _apply_kv(self, kv: KeyValue) -> str | None:
        """Apply one key if newer than what was applied; its "backend/server" if it changed."""
        if kv.mod_revision <= self._seen.get(kv.key, 0):
            return None  # already applied (rule 4: no stale replay)
        self._seen[kv.key] = kv.mod_revision
        if kv.key == self._key(shared.DEPLOY_LOCK):
            self.deploy_lock = _json_object(kv.value)
            return None
        if kv.key == self._key(shared.DEPLOY_RECORD):
            if self._sink is not None:
                self._sink.apply_deploy(kv.value)
            return None
        names = shared.parse_server_key(self.config.prefix, kv.key)
        state = self._decode(kv)
        if names is None or state is None or self._sink is None:
            return None
        backend, server = names
        return f"{backend}/{server}" if self._sink.apply_shared(backend, server, state) else None

    def _set_revision(self, revision: int) -> None:
        if revision > self.revision:
            self._moved.set()
        self.revision = max(self.revision, revision)
        waiting = []
        for wanted, waiter in self._waiters:
            if wanted <= self.revision:
                if not waiter.done():
                    waiter.set_result(None)
            elif not waiter.done():
                waiting.append((wanted, waiter))
        self._waiters = waiting

    def _decode(self, kv: KeyValue) -> ServerState | None:
        try:
            return shared.decode(kv.value)
        except ValueError as exc:
            log.warning("cluster_value_ignored key=%s reason=%s", kv.key, exc)
            return None

    # -- this instance's view (rule 5) -----------------------------------------------------

    async def _publish(self) -> None:
        key = shared.view_key(self.config.prefix, self.config.instance)
        renew_every_s = self.config.lease_s / 3
        last_text, last_renew = "", 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not self._lease:
                    self._lease = await self.client.grant(self.config.lease_s)
                    last_text = ""
                now = loop.time()
                if now - last_renew >= renew_every_s:
                    if await self.client.keepalive(self._lease) <= 0:
                        self._lease = 0  # expired while etcd was away: a new one
                        continue
                    # Written again with each renewal: a predecessor (an upgrade) revoking
                    # its own lease may have taken the shared key with it.
                    last_renew, last_text = now, ""
                text = self._view_text()
                if text != last_text:
                    put = {"key": b64(key), "value": b64(text), "lease": str(self._lease)}
                    await self.client.call("kv/put", put)
                    last_text = text
            except ClusterUnavailable:
                self._stale.set()
                self._lease, last_text = 0, ""
                await asyncio.sleep(RETRY_MAX_S)
                continue
            try:  # at once when a change was applied: `lagging` waits for it
                async with asyncio.timeout(PUBLISH_POLL_S):
                    await self._moved.wait()
            except TimeoutError:
                pass
            self._moved.clear()

    def _view_text(self) -> str:
        assert self._sink is not None
        view = {
            "instance": self.config.instance,
            "pid": os.getpid(),
            "revision": self.revision,
            "synced": self.is_synced,
            "servers": self._sink.fleet_view(),
        }
        return json.dumps(view, sort_keys=True)

    async def views(self) -> dict[str, dict[str, Any]]:
        """Every live instance's published view, by instance name. Raises ClusterUnavailable."""
        prefix = f"{self.config.prefix}/{shared.VIEWS}/"
        _, kvs = await self.client.range_prefix(prefix)
        views = {}
        for kv in kvs:
            try:
                view = json.loads(kv.value)
            except ValueError:
                continue
            if isinstance(view, dict):
                views[kv.key.removeprefix(prefix)] = view
        return views


async def join_fleet(config: ClusterConfig, servers: Iterable[Server]) -> Fleet:
    """A Fleet for ``config``, its state applied to ``servers`` if etcd answers (rule 1).

    Raises ClusterUnavailable only if ``[cluster.tls]``/``[cluster.auth]`` files are unusable.
    """
    fleet = Fleet(config, client_of(config))
    await fleet.join(servers)
    return fleet


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _json_object(value: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(value)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
