"""Paired backups and the server state machine: every row of server.py's rules, as tables.

A slot is a main and its pair (the same host's other version). ``slot_route`` says who serves
it for new and for sticky traffic; ``plan_flip`` what ``flip`` does; ``Backend`` applies both.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from zdlb.balancer.pool import Backend
from zdlb.balancer.server import (
    AdminState,
    Health,
    Member,
    Server,
    plan_flip,
    slot_route,
)
from zdlb.config.model import (
    Address,
    BackendConfig,
    Balance,
    PoolName,
    ServerConfig,
    StickyConfig,
)

READY, DRAIN, MAINT = AdminState.READY, AdminState.DRAIN, AdminState.MAINT
UP, DOWN = Health.UP, Health.DOWN
MAIN, PAIR, NONE = Member.MAIN, Member.PAIR, Member.NONE
HOLD_S = 300.0


def paired_backend(
    balance: Balance = Balance.ROUNDROBIN,
    weights: tuple[int, int] = (100, 100),
    unpaired_backup: bool = True,
    sticky: bool = True,
) -> Backend:
    """front-1 and front-2 (mains), each with a paired backup, and an unpaired 'spare'."""
    servers = [
        ServerConfig("front-1", Address("10.0.0.1", 8081), weight=weights[0]),
        ServerConfig("front-2", Address("10.0.0.2", 8082), weight=weights[1]),
        ServerConfig(
            "front-1-backup", Address("10.0.0.1", 8091), pool=PoolName.BACKUP, pair="front-1"
        ),
        ServerConfig(
            "front-2-backup", Address("10.0.0.2", 8092), pool=PoolName.BACKUP, pair="front-2"
        ),
    ]
    if unpaired_backup:
        servers.append(ServerConfig("spare", Address("10.0.0.3", 8080), pool=PoolName.BACKUP))
    config = BackendConfig(
        "app",
        tuple(servers),
        balance=balance,
        sticky=StickyConfig("SERVERID", drain_sticky_s=HOLD_S) if sticky else None,
    )
    return Backend(config, random.Random(7))


def get(backend: Backend, name: str) -> Server:
    server = backend.server(name)
    assert server is not None
    return server


def picks(backend: Backend, count: int = 40, now: float = 0.0) -> set[str]:
    return {s.name for _ in range(count) if (s := backend.select(now)) is not None}


# --- the slot table ----------------------------------------------------------------------------

# main admin, main health, drain hold open, pair usable -> (new traffic, sticky traffic)
SLOT_TABLE = [
    (READY, UP, False, True, MAIN, MAIN),
    (READY, UP, False, False, MAIN, MAIN),
    (READY, DOWN, False, True, PAIR, PAIR),
    (READY, DOWN, False, False, NONE, NONE),
    (DRAIN, UP, True, True, NONE, MAIN),  # the hold keeps the main's users; nobody new
    (DRAIN, UP, True, False, NONE, MAIN),
    (DRAIN, UP, False, True, PAIR, PAIR),  # hold over: the pair takes the host
    (DRAIN, UP, False, False, NONE, NONE),
    (DRAIN, DOWN, True, True, PAIR, PAIR),  # a down server holds nobody
    (DRAIN, DOWN, False, False, NONE, NONE),
    (MAINT, UP, False, True, PAIR, PAIR),
    (MAINT, UP, False, False, NONE, NONE),
    (MAINT, DOWN, False, True, PAIR, PAIR),
    (MAINT, DOWN, False, False, NONE, NONE),
]


@pytest.mark.parametrize(("admin", "health", "hold", "pair_ok", "new", "sticky"), SLOT_TABLE)
def test_slot_table(
    admin: AdminState, health: Health, hold: bool, pair_ok: bool, new: Member, sticky: Member
) -> None:
    backend = paired_backend()
    main, pair = get(backend, "front-1"), get(backend, "front-1-backup")
    main.set_admin(admin, now=0.0)
    main.set_health(health)
    if not pair_ok:
        pair.set_health(DOWN)
    now = HOLD_S / 2 if hold else HOLD_S * 2
    assert slot_route(main, now) == (new, sticky)


def test_slot_table_covers_every_state() -> None:
    seen = {(a, h, p) for a, h, _, p, _, _ in SLOT_TABLE}
    assert seen == set(itertools.product(AdminState, Health, [True, False]))


@pytest.mark.parametrize("pair_admin", [DRAIN, MAINT])
def test_a_pair_not_ready_never_stands_in(pair_admin: AdminState) -> None:
    backend = paired_backend()
    get(backend, "front-1").set_admin(MAINT)
    get(backend, "front-1-backup").set_admin(pair_admin)
    assert slot_route(get(backend, "front-1"), 0.0) == (NONE, NONE)


def test_a_weight_zero_main_keeps_its_users_and_its_pair_gets_no_new_ones() -> None:
    backend = paired_backend(weights=(0, 100))
    main = get(backend, "front-1")
    assert slot_route(main, 0.0) == (NONE, MAIN)
    main.set_health(DOWN)
    assert slot_route(main, 0.0) == (NONE, PAIR)  # stands in with the main's weight: 0


# --- flip ---------------------------------------------------------------------------------------

# main admin, main health, pair health, force -> (main, pair, refused)
FLIP_TABLE = [
    (READY, UP, UP, False, MAINT, READY, False),
    (READY, DOWN, UP, False, MAINT, READY, False),
    (DRAIN, UP, UP, False, MAINT, READY, False),
    (READY, UP, DOWN, False, MAINT, READY, True),  # would hand the host to a failing version
    (READY, UP, DOWN, True, MAINT, READY, False),
    (MAINT, UP, UP, False, READY, READY, False),
    (MAINT, UP, DOWN, False, READY, READY, False),
    (MAINT, DOWN, UP, False, READY, READY, True),  # flipping back to a failing main
    (MAINT, DOWN, UP, True, READY, READY, False),
]


@pytest.mark.parametrize(
    ("admin", "health", "pair_health", "force", "to_main", "to_pair", "refused"), FLIP_TABLE
)
def test_flip_table(
    admin: AdminState,
    health: Health,
    pair_health: Health,
    force: bool,
    to_main: AdminState,
    to_pair: AdminState,
    refused: bool,
) -> None:
    backend = paired_backend()
    main, pair = get(backend, "front-1"), get(backend, "front-1-backup")
    main.set_admin(admin)
    main.set_health(health)
    pair.set_health(pair_health)
    plan = plan_flip(main, pair, force)
    assert (plan.main, plan.pair, plan.refusal is not None) == (to_main, to_pair, refused)


def test_flip_out_makes_a_parked_pair_ready() -> None:
    backend = paired_backend()
    main, pair = get(backend, "front-1"), get(backend, "front-1-backup")
    pair.set_admin(MAINT)
    assert plan_flip(main, pair, force=False).pair is READY


# --- selection with pairs -----------------------------------------------------------------------


def test_pairs_link_both_ways_and_share_the_main_identity() -> None:
    backend = paired_backend()
    main, pair = get(backend, "front-1"), get(backend, "front-1-backup")
    assert main.pair is pair and pair.pair is main
    assert main.identity == pair.identity == "front-1"
    assert get(backend, "spare").pair is None
    assert backend.identities() == ["front-1", "front-2", "spare"]


@pytest.mark.parametrize("balance", list(Balance))
def test_a_pair_stands_in_for_its_main_alone(balance: Balance) -> None:
    backend = paired_backend(balance)
    assert picks(backend) == {"front-1", "front-2"}
    get(backend, "front-1").set_health(DOWN)
    assert picks(backend) == {"front-1-backup", "front-2"}  # not the spare, not front-2's pair
    get(backend, "front-1").set_admin(MAINT)
    get(backend, "front-1").set_health(UP)
    assert picks(backend) == {"front-1-backup", "front-2"}


@pytest.mark.parametrize("balance", [Balance.ROUNDROBIN, Balance.RANDOM])
def test_a_stand_in_carries_its_mains_weight(balance: Balance) -> None:
    backend = paired_backend(balance, weights=(30, 10))
    get(backend, "front-1-backup").weight = 1  # the pair's own weight does not count
    get(backend, "front-1").set_admin(MAINT)
    counts = {"front-1-backup": 0, "front-2": 0}
    for _ in range(4000):
        server = backend.select(0.0)
        assert server is not None
        counts[server.name] += 1
    assert counts["front-1-backup"] / counts["front-2"] == pytest.approx(3.0, rel=0.15)


def test_unpaired_backups_serve_only_when_no_slot_can() -> None:
    backend = paired_backend()
    for name in ("front-1", "front-2"):
        get(backend, name).set_admin(MAINT)
        get(backend, f"{name}-backup").set_health(DOWN)
    assert picks(backend) == {"spare"}
    get(backend, "front-2-backup").set_health(UP)
    assert picks(backend) == {"front-2-backup"}


def test_excluding_a_stand_in_moves_the_retry_elsewhere() -> None:
    backend = paired_backend(Balance.LEASTCONN)
    get(backend, "front-1").set_admin(MAINT)
    stand_in = get(backend, "front-1-backup")
    assert {backend.select(0.0, None, [stand_in]).name for _ in range(10)} == {"front-2"}  # type: ignore[union-attr]


def test_a_drain_hold_ending_rebuilds_the_round_robin_schedule() -> None:
    backend = paired_backend()
    get(backend, "front-1").set_admin(DRAIN, now=100.0)
    assert picks(backend, now=100.0) == {"front-2"}
    assert picks(backend, now=100.0 + HOLD_S - 1) == {"front-2"}
    assert picks(backend, now=100.0 + HOLD_S) == {"front-1-backup", "front-2"}


def test_without_a_sticky_cookie_a_drain_hands_the_slot_over_at_once() -> None:
    backend = paired_backend(sticky=False)
    get(backend, "front-1").set_admin(DRAIN, now=100.0)
    assert picks(backend, now=100.0) == {"front-1-backup", "front-2"}


def test_swap_exchanges_the_pools_and_the_pairs_keep_their_hosts() -> None:
    backend = paired_backend(unpaired_backup=False)
    backend.swap_pools()
    assert picks(backend) == {"front-1-backup", "front-2-backup"}
    get(backend, "front-1-backup").set_admin(MAINT)
    assert picks(backend) == {"front-1", "front-2-backup"}  # now front-1 is the stand-in
    backend.swap_pools()
    assert picks(backend) == {"front-1", "front-2"}


# --- sticky routing -----------------------------------------------------------------------------


def test_sticky_follows_the_host_through_a_flip() -> None:
    backend = paired_backend()
    assert backend.select_sticky("front-1", 0.0) is get(backend, "front-1")
    get(backend, "front-1").set_admin(MAINT)
    assert backend.select_sticky("front-1", 0.0) is get(backend, "front-1-backup")
    get(backend, "front-1-backup").set_health(DOWN)
    assert backend.select_sticky("front-1", 0.0) is None  # the caller balances and re-pins


def test_sticky_users_of_a_drained_main_stay_until_the_hold_ends() -> None:
    backend = paired_backend()
    main = get(backend, "front-1")
    main.set_admin(DRAIN, now=10.0)
    assert backend.select_sticky("front-1", 10.0 + HOLD_S - 0.001) is main
    assert backend.select_sticky("front-1", 10.0 + HOLD_S) is get(backend, "front-1-backup")
    main.set_admin(DRAIN, now=1000.0)  # draining again keeps the first deadline
    assert main.drain_ends == 10.0 + HOLD_S


def test_sticky_to_an_unpaired_drained_server_ends_in_a_redispatch() -> None:
    backend = paired_backend()
    spare = get(backend, "spare")
    assert backend.select_sticky("spare", 0.0) is spare  # a backup keeps its users while usable
    spare.set_admin(DRAIN, now=0.0)
    assert backend.select_sticky("spare", HOLD_S / 2) is spare
    assert backend.select_sticky("spare", HOLD_S) is None


def test_sticky_after_a_swap_goes_to_the_host_in_the_main_pool() -> None:
    backend = paired_backend()
    backend.swap_pools()
    assert backend.select_sticky("front-1", 0.0) is get(backend, "front-1-backup")


@pytest.mark.parametrize("identity", ["nobody", "front-1-backup", ""])
def test_unknown_identities_are_not_routed(identity: str) -> None:
    assert paired_backend().select_sticky(identity, 0.0) is None


@pytest.mark.parametrize(
    ("main_admin", "main_health", "pair_admin", "pair_health", "weight"),
    list(itertools.product(AdminState, Health, AdminState, Health, [0, 100])),
)
def test_sticky_routing_is_the_slot_table(
    main_admin: AdminState,
    main_health: Health,
    pair_admin: AdminState,
    pair_health: Health,
    weight: int,
) -> None:
    """select_sticky answers a READY and UP main without asking slot_route (a fast path):
    whatever the states, it routes as slot_route's sticky member says."""
    backend = paired_backend()
    main, pair = get(backend, "front-1"), get(backend, "front-1-backup")
    main.set_admin(main_admin, now=0.0)
    main.set_health(main_health)
    main.weight = weight
    pair.set_admin(pair_admin, now=0.0)
    pair.set_health(pair_health)
    for now in (0.0, HOLD_S):
        _, member = slot_route(main, now)
        expected = {MAIN: main, PAIR: pair, NONE: None}[member]
        assert backend.select_sticky("front-1", now) is expected


def test_a_weight_zero_server_keeps_its_sticky_users() -> None:
    backend = paired_backend()
    get(backend, "front-1").weight = 0
    assert backend.select_sticky("front-1", 0.0) is get(backend, "front-1")
    assert "front-1" not in picks(backend)


def test_drain_without_now_holds_for_good() -> None:
    server = get(paired_backend(), "front-1")
    server.set_admin(DRAIN)
    assert server.drain_ends == math.inf
    assert server.holds_sticky(1e12)
