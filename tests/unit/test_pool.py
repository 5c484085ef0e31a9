"""Backend selection: pool rules, exclusion, every balance algorithm, and a Hypothesis property."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zdlb.balancer.pool import Backend
from zdlb.balancer.server import AdminState, Health, Server
from zdlb.config.model import Address, BackendConfig, Balance, PoolName, ServerConfig

MAIN, BACKUP = PoolName.MAIN, PoolName.BACKUP
ALL_BALANCES = [pytest.param(b, id=b.value) for b in Balance]


def make_backend(
    servers: list[tuple[str, int, PoolName]],
    balance: Balance = Balance.ROUNDROBIN,
    all_backups: bool = False,
    seed: int = 1,
) -> Backend:
    configs = tuple(
        ServerConfig(name, Address("10.0.0.1", 8000 + i), weight=weight, pool=pool)
        for i, (name, weight, pool) in enumerate(servers)
    )
    config = BackendConfig("app", configs, balance=balance, all_backups=all_backups)
    return Backend(config, random.Random(seed))


def get(backend: Backend, name: str) -> Server:
    server = backend.server(name)
    assert server is not None, name
    return server


def key(i: int) -> bytes:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}".encode()


def pick_names(backend: Backend, picks: int, exclude: tuple[Server, ...] = ()) -> set[str | None]:
    """Names picked over many calls, with a different client key each time (for SOURCE)."""
    names: set[str | None] = set()
    for i in range(picks):
        server = backend.select(0.0, key(i), exclude)
        names.add(None if server is None else server.name)
    return names


# --- pool rules: main before backup, first backup only, exclusion, unusable servers ----------

FOUR = [("a", 100, MAIN), ("b", 100, MAIN), ("x", 100, BACKUP), ("y", 100, BACKUP)]


@dataclass(frozen=True)
class PoolCase:
    states: dict[str, AdminState | Health | int] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    all_backups: bool = False
    expected: frozenset[str | None] = frozenset()


POOL_CASES = {
    "all-up-mains-only": PoolCase(expected=frozenset({"a", "b"})),
    "one-main-down": PoolCase({"a": Health.DOWN}, expected=frozenset({"b"})),
    "one-main-drain": PoolCase({"b": AdminState.DRAIN}, expected=frozenset({"a"})),
    "one-main-maint": PoolCase({"a": AdminState.MAINT}, expected=frozenset({"b"})),
    "one-main-weight0": PoolCase({"a": 0}, expected=frozenset({"b"})),
    "mains-down-first-backup-only": PoolCase(
        {"a": Health.DOWN, "b": Health.DOWN}, expected=frozenset({"x"})
    ),
    "mains-down-all-backups": PoolCase(
        {"a": Health.DOWN, "b": Health.DOWN}, all_backups=True, expected=frozenset({"x", "y"})
    ),
    "mains-drain-maint-first-backup": PoolCase(
        {"a": AdminState.DRAIN, "b": AdminState.MAINT}, expected=frozenset({"x"})
    ),
    "mains-weight0-first-backup": PoolCase({"a": 0, "b": 0}, expected=frozenset({"x"})),
    "first-backup-down-second-serves": PoolCase(
        {"a": Health.DOWN, "b": Health.DOWN, "x": Health.DOWN}, expected=frozenset({"y"})
    ),
    "first-backup-weight0-second-serves": PoolCase(
        {"a": Health.DOWN, "b": Health.DOWN, "x": 0}, expected=frozenset({"y"})
    ),
    "exclude-one-main": PoolCase(exclude=("a",), expected=frozenset({"b"})),
    "exclude-mains-first-backup": PoolCase(exclude=("a", "b"), expected=frozenset({"x"})),
    "exclude-first-backup-second-serves": PoolCase(
        {"a": Health.DOWN}, exclude=("b", "x"), expected=frozenset({"y"})
    ),
    "exclude-everything": PoolCase(exclude=("a", "b", "x", "y"), expected=frozenset({None})),
    "nothing-usable": PoolCase(
        {"a": Health.DOWN, "b": AdminState.MAINT, "x": 0, "y": AdminState.DRAIN},
        all_backups=True,
        expected=frozenset({None}),
    ),
}


@pytest.mark.parametrize("balance", ALL_BALANCES)
@pytest.mark.parametrize("case", list(POOL_CASES.values()), ids=list(POOL_CASES))
def test_pool_rules(case: PoolCase, balance: Balance) -> None:
    backend = make_backend(FOUR, balance, case.all_backups)
    for name, state in case.states.items():
        server = get(backend, name)
        if isinstance(state, AdminState):
            server.set_admin(state)
        elif isinstance(state, Health):
            server.set_health(state)
        else:
            server.weight = state
    exclude = tuple(get(backend, name) for name in case.exclude)
    assert pick_names(backend, 200, exclude) == case.expected


@pytest.mark.parametrize("all_backups", [False, True], ids=["first-backup", "all-backups"])
@pytest.mark.parametrize("balance", ALL_BALANCES)
def test_retries_walk_every_candidate_once_then_none(balance: Balance, all_backups: bool) -> None:
    backend = make_backend(FOUR, balance, all_backups)
    tried: list[Server] = []
    while (server := backend.select(0.0, b"10.9.8.7", tried)) is not None:
        assert server not in tried
        tried.append(server)
        assert len(tried) <= 4
    names = [s.name for s in tried]
    assert sorted(names[:2]) == ["a", "b"]
    # Without all_backups the backups serve one at a time, in config order.
    assert (sorted(names[2:]) if all_backups else names[2:]) == ["x", "y"]


@pytest.mark.parametrize("balance", ALL_BALANCES)
def test_weight_zero_is_never_picked(balance: Balance) -> None:
    backend = make_backend([("a", 100, MAIN), ("b", 0, MAIN), ("c", 50, MAIN)], balance)
    assert pick_names(backend, 2000) == {"a", "c"}


def test_runtime_pool_change_is_honoured() -> None:
    backend = make_backend(FOUR)
    get(backend, "b").pool = BACKUP
    assert pick_names(backend, 50) == {"a"}
    get(backend, "x").pool = MAIN
    assert pick_names(backend, 50) == {"a", "x"}


# --- distribution by weight ------------------------------------------------------------------

WEIGHTED = [("a", 100, MAIN), ("b", 50, MAIN), ("c", 25, MAIN)]
WEIGHT_SHARES = {"a": 100 / 175, "b": 50 / 175, "c": 25 / 175}
PICKS = 10_000
TOLERANCE = 0.02  # absolute share: 2 percentage points


def assert_shares(counts: Counter[str]) -> None:
    total = sum(counts.values())
    for name, share in WEIGHT_SHARES.items():
        assert abs(counts[name] / total - share) < TOLERANCE, (name, counts)


@pytest.mark.parametrize("balance", ALL_BALANCES)
def test_idle_picks_follow_weights(balance: Balance) -> None:
    backend = make_backend(WEIGHTED, balance, seed=7)
    counts: Counter[str] = Counter()
    for i in range(PICKS):
        server = backend.select(0.0, key(i))
        assert server is not None
        counts[server.name] += 1
    assert_shares(counts)


@pytest.mark.parametrize(
    "balance", [pytest.param(b, id=b.value) for b in (Balance.LEASTCONN, Balance.RANDOM)]
)
def test_loaded_picks_follow_weights(balance: Balance) -> None:
    """Steady state: ~70 requests in flight, a uniformly random one finishes after each pick."""
    backend = make_backend(WEIGHTED, balance, seed=11)
    rng = random.Random(3)
    inflight: list[Server] = []
    counts: Counter[str] = Counter()
    for _ in range(PICKS):
        server = backend.select(0.0)
        assert server is not None
        server.request_started()
        inflight.append(server)
        counts[server.name] += 1
        if len(inflight) > 70:
            inflight.pop(rng.randrange(len(inflight))).request_finished()
    assert_shares(counts)


@pytest.mark.parametrize(
    "balance",
    [
        pytest.param(Balance.ROUNDROBIN, id="roundrobin"),
        pytest.param(Balance.LEASTCONN, id="leastconn-idle-ties"),
        pytest.param(Balance.SOURCE, id="source-without-key"),
    ],
)
def test_smooth_roundrobin_sequence_is_nginx(balance: Balance) -> None:
    backend = make_backend([("a", 5, MAIN), ("b", 1, MAIN), ("c", 1, MAIN)], balance)
    picked = "".join(s.name for _ in range(14) if (s := backend.select(0.0)) is not None)
    assert picked == "aabacaa" * 2


def test_roundrobin_is_exact_over_a_whole_cycle() -> None:
    backend = make_backend(WEIGHTED)
    counts = Counter(s.name for _ in range(175 * 4) if (s := backend.select(0.0)) is not None)
    assert counts == {"a": 400, "b": 200, "c": 100}


def test_random_never_picks_the_busiest_of_its_two_draws() -> None:
    """Two distinct draws mean the strictly busiest server always loses its comparison."""
    backend = make_backend(WEIGHTED, Balance.RANDOM)
    get(backend, "a").inflight = 10
    assert pick_names(backend, 1000) == {"b", "c"}


def test_random_is_deterministic_for_a_seed() -> None:
    def sequence(seed: int) -> list[str]:
        backend = make_backend(WEIGHTED, Balance.RANDOM, seed=seed)
        return [s.name for _ in range(50) if (s := backend.select(0.0)) is not None]

    assert sequence(5) == sequence(5)
    assert sequence(5) != sequence(6)


# --- least connections -----------------------------------------------------------------------

LEASTCONN_CASES = [
    # (weights, inflight), expected pick
    pytest.param((100, 100, 100), (3, 1, 2), "b", id="fewest-inflight"),
    pytest.param((100, 100, 100), (0, 5, 5), "a", id="idle-first"),
    pytest.param((200, 100, 100), (3, 2, 4), "a", id="per-unit-of-weight"),
    pytest.param((100, 200, 100), (2, 3, 2), "b", id="heavier-server-takes-more"),
    pytest.param((1, 256, 100), (1, 255, 100), "b", id="extreme-weights"),
]


@pytest.mark.parametrize(("weights", "inflight", "expected"), LEASTCONN_CASES)
def test_leastconn_picks_least_loaded_per_weight(
    weights: tuple[int, int, int], inflight: tuple[int, int, int], expected: str
) -> None:
    specs = [(name, w, MAIN) for name, w in zip("abc", weights, strict=True)]
    backend = make_backend(specs, Balance.LEASTCONN)
    for server, load in zip(backend.servers, inflight, strict=True):
        server.inflight = load
    assert {s.name for _ in range(20) if (s := backend.select(0.0))} == {expected}


def test_leastconn_spreads_ties_round_robin() -> None:
    backend = make_backend([("a", 100, MAIN), ("b", 100, MAIN), ("c", 100, MAIN)])
    backend.balance = Balance.LEASTCONN
    get(backend, "a").inflight = 1
    picked = [s.name for _ in range(6) if (s := backend.select(0.0)) is not None]
    assert picked == ["b", "c", "b", "c", "b", "c"]


def test_leastconn_balances_as_requests_start() -> None:
    backend = make_backend([("a", 100, MAIN), ("b", 100, MAIN), ("c", 100, MAIN)])
    backend.balance = Balance.LEASTCONN
    for _ in range(30):
        server = backend.select(0.0)
        assert server is not None
        server.request_started()
    assert [s.inflight for s in backend.servers] == [10, 10, 10]


# --- source hashing --------------------------------------------------------------------------

FIVE = [(name, 100, MAIN) for name in "abcde"]
KEYS = [key(i) for i in range(1000)]


def source_map(backend: Backend, exclude: tuple[Server, ...] = ()) -> dict[bytes, str]:
    return {k: s.name for k in KEYS if (s := backend.select(0.0, k, exclude)) is not None}


def test_source_same_key_same_server_across_instances() -> None:
    first = source_map(make_backend(FIVE, Balance.SOURCE, seed=1))
    again = make_backend(FIVE, Balance.SOURCE, seed=2)
    assert source_map(again) == first
    assert source_map(again) == first
    assert set(first.values()) == set("abcde")


def test_source_hash_is_stable_across_processes() -> None:
    """Pinned picks: a changed hash would remap every client on upgrade, so it must be noticed.

    Python's salted ``hash()`` would fail this under a different PYTHONHASHSEED.
    """
    backend = make_backend(FIVE, Balance.SOURCE)
    picked = "".join(s.name for i in range(12) if (s := backend.select(0.0, key(i))) is not None)
    assert picked == "ecceddddadec"


@pytest.mark.parametrize(
    "removal", ["health-down", "maint", "drain", "weight0", "excluded", "pool-backup"]
)
def test_source_removing_a_server_moves_only_its_keys(removal: str) -> None:
    backend = make_backend(FIVE, Balance.SOURCE)
    before = source_map(backend)
    gone = get(backend, "c")
    exclude: tuple[Server, ...] = ()
    match removal:
        case "health-down":
            gone.set_health(Health.DOWN)
        case "maint":
            gone.set_admin(AdminState.MAINT)
        case "drain":
            gone.set_admin(AdminState.DRAIN)
        case "weight0":
            gone.weight = 0
        case "excluded":
            exclude = (gone,)
        case "pool-backup":
            gone.pool = BACKUP
    after = source_map(backend, exclude)
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "c"}
    assert "c" not in after.values()
    assert 100 < len(moved) < 300  # about a fifth of the keys were on c


def test_source_restoring_a_server_restores_its_keys() -> None:
    backend = make_backend(FIVE, Balance.SOURCE)
    before = source_map(backend)
    get(backend, "c").set_health(Health.DOWN)
    source_map(backend)
    get(backend, "c").set_health(Health.UP)
    assert source_map(backend) == before


# --- lookups and repr ------------------------------------------------------------------------


def test_backend_exposes_servers_in_config_order() -> None:
    backend = make_backend(FOUR, Balance.LEASTCONN)
    assert backend.name == "app"
    assert backend.balance is Balance.LEASTCONN
    assert [s.name for s in backend.servers] == ["a", "b", "x", "y"]
    assert {s.backend for s in backend.servers} == {"app"}
    assert get(backend, "x") is backend.servers[2]
    assert backend.server("nope") is None


def test_backend_repr_shows_balance_and_server_states() -> None:
    backend = make_backend([("a", 100, MAIN), ("x", 50, BACKUP)], Balance.RANDOM)
    get(backend, "a").set_admin(AdminState.DRAIN)
    get(backend, "x").request_started()
    text = repr(backend)
    assert text.startswith("<Backend app balance=random servers=[")
    assert "<Server app/a pool=main admin=drain health=up weight=100 inflight=0" in text
    assert "<Server app/x pool=backup admin=ready health=up weight=50 inflight=1" in text


# --- property: never an excluded or unusable server; None only when nothing can serve ----------

SERVER_STATES = st.tuples(
    st.sampled_from(PoolName),
    st.sampled_from(AdminState),
    st.sampled_from(Health),
    st.sampled_from([0, 1, 2, 100, 256]),
    st.integers(min_value=0, max_value=5),  # inflight
    st.booleans(),  # excluded
)


@settings(max_examples=300, deadline=None)
@given(
    states=st.lists(SERVER_STATES, max_size=6),
    balance=st.sampled_from(Balance),
    all_backups=st.booleans(),
    client_key=st.none() | st.binary(max_size=16),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_select_property(
    states: list[tuple[PoolName, AdminState, Health, int, int, bool]],
    balance: Balance,
    all_backups: bool,
    client_key: bytes | None,
    seed: int,
) -> None:
    specs = [(f"s{i}", weight, pool) for i, (pool, _, _, weight, _, _) in enumerate(states)]
    backend = make_backend(specs, balance, all_backups, seed)
    excluded: list[Server] = []
    for server, (_, admin, health, _, inflight, is_excluded) in zip(
        backend.servers, states, strict=True
    ):
        server.set_admin(admin)
        server.set_health(health)
        server.inflight = inflight
        if is_excluded:
            excluded.append(server)
    eligible = [s for s in backend.servers if s.takes_new_traffic and s not in excluded]
    eligible_main = [s for s in eligible if s.pool is MAIN]
    for _ in range(3):  # repeated picks exercise the rotation state too
        picked = backend.select(0.0, client_key, excluded)
        if not eligible:
            assert picked is None
            continue
        assert picked is not None
        assert picked.takes_new_traffic
        assert picked not in excluded
        if eligible_main:
            assert picked.pool is MAIN
        elif not all_backups:
            assert picked is eligible[0]
