"""The sticky census: HyperLogLog counts per host within the stated error, a sliding window,
hostile tokens, and worker sketches merged at the master."""

from __future__ import annotations

import random

import pytest

from zdlb.census import (
    REGISTERS,
    STANDARD_ERROR,
    Census,
    estimate,
    merge,
    mint_token,
    split_value,
    with_token,
)
from zdlb.daemon import ipc
from zdlb.stats import Stats

# The stated error: 3 standard errors hold 99.7% of estimates.
BOUND = 3 * STANDARD_ERROR


def _tokens(rng: random.Random, count: int) -> list[bytes]:
    return [b"%016x" % rng.getrandbits(64) for _ in range(count)]


def test_thousand_cookie_jars_over_two_hosts_within_the_stated_error():
    rng = random.Random(15)
    census = Census(["front-1", "front-2"], key=rng.getrandbits(64))
    jars = _tokens(rng, 1000)
    pinned = {"front-1": 0, "front-2": 0}
    for token in jars:
        host = rng.choice(["front-1", "front-2"])
        pinned[host] += 1
        for _ in range(3):  # a user makes several requests: counted once
            census.observe(host, token)
    counts = census.counts()
    for host, truth in pinned.items():
        assert abs(counts[host] - truth) <= BOUND * truth, (host, counts[host], truth)


@pytest.mark.parametrize("users", [0, 1, 50, 5_000, 20_000])
def test_estimates_within_the_stated_error(users):
    rng = random.Random(users)
    census = Census(["h"], key=rng.getrandbits(64))
    for token in _tokens(rng, users):
        census.observe("h", token)
    assert abs(census.counts()["h"] - users) <= max(1, BOUND * users)


def test_the_window_slides_slice_by_slice():
    census = Census(["h"], key=1, window_s=50, slices=5)  # slices of 10 s
    rng = random.Random(2)
    census.tick(0.0)
    for token in _tokens(rng, 200):
        census.observe("h", token)
    census.tick(35.0)  # three slices later: still inside the window
    for token in _tokens(rng, 100):
        census.observe("h", token)
    assert abs(census.counts()["h"] - 300) <= BOUND * 300
    census.tick(55.0)  # the first slice is cleared: only the second batch is left
    assert abs(census.counts()["h"] - 100) <= BOUND * 100
    census.tick(1000.0)
    assert census.counts()["h"] == 0


@pytest.mark.parametrize(
    "token",
    [b"", b"not hex at all", b"\xff\xfe", b"zzzzzzzzzzzzzzzz"],
    ids=["empty", "text", "binary", "letters"],
)
def test_hostile_tokens_are_ignored(token):
    census = Census(["h"], key=3)
    census.observe("h", token)
    census.observe("nobody", b"0123456789abcdef")
    assert census.counts() == {"h": 0}


def test_crafted_zero_runs_do_not_blow_up_the_count():
    # Without the key a client could pick tokens whose hash starts with long zero runs; with
    # it, these are just 100 more users.
    census = Census(["h"])
    for i in range(100):
        census.observe("h", b"%016x" % (1 << (i % 64)))
    assert census.counts()["h"] <= 100 * (1 + BOUND)


def test_long_tokens_are_read_to_sixteen_digits():
    census = Census(["h"], key=4)
    census.observe("h", b"0123456789abcdef" + b"f" * 1000)
    census.observe("h", b"0123456789abcdef")
    assert census.counts() == {"h": 1}


def test_worker_registers_merge_at_the_master():
    rng = random.Random(5)
    key = rng.getrandbits(64)
    master = Census(["front-1"], key=key)
    workers = [Census(["front-1"], key=key) for _ in range(2)]
    tokens = _tokens(rng, 2000)
    for i, token in enumerate(tokens):  # some users seen by both workers
        workers[i % 2].observe("front-1", token)
        if i % 5 == 0:
            workers[(i + 1) % 2].observe("front-1", token)
    for worker in workers:
        master.merge_registers(worker.take_registers())
        assert worker.take_registers() == {}  # emptied by the take
    assert abs(master.counts()["front-1"] - 2000) <= BOUND * 2000


def test_worker_registers_travel_in_the_stats_report():
    # What worker.py sends and workers.py merges, through the real channel encoding.
    rng = random.Random(8)
    key = rng.getrandbits(64)
    master, worker = Census(["front-1"], key=key), Census(["front-1"], key=key)
    for token in _tokens(rng, 300):
        worker.observe("front-1", token)
    taken = {"app": {h: [list(p) for p in pairs] for h, pairs in worker.take_registers().items()}}
    snapshot = Stats().snapshot({})
    message = ipc.decode(ipc.encode(ipc.StatsReport(1, 0, snapshot, taken)))
    assert isinstance(message, ipc.StatsReport)
    master.merge_registers(message.census["app"])
    assert abs(master.counts()["front-1"] - 300) <= BOUND * 300


@pytest.mark.parametrize(
    "taken",
    [
        "not a map",
        {"h": "not a list"},
        {"h": [["1", 2], [1, "2"], [True, 2], [1.0, 2], None, [1, 2, 3]]},
        {"h": {"1": 2}},
    ],
    ids=["string", "host-string", "bad-pairs", "host-map"],
)
def test_merge_registers_ignores_hostile_shapes(taken):
    census = Census(["h"], key=9)
    census.merge_registers(taken)
    assert census.counts() == {"h": 0}


def test_merge_registers_skips_garbage():
    census = Census(["h"], key=6)
    census.merge_registers({"h": [(0, 3), (-1, 2), (REGISTERS, 1), (5, 99), (7,)], "x": [(1, 1)]})
    registers = merge(census._rings["h"])
    assert registers[0] == 3 and registers[5] == 0 and sum(registers) == 3


def test_merge_is_max_per_register():
    assert merge([bytes([1, 5, 0]), bytes([3, 2, 0])]) == bytes([3, 5, 0])
    assert estimate(bytes(REGISTERS)) == 0.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"front-1", (b"front-1", None)),
        (b"front-1~0123456789abcdef", (b"front-1", b"0123456789abcdef")),
        (b"front-1.TAGtag~0123456789abcdef", (b"front-1.TAGtag", b"0123456789abcdef")),
        (b"front-1~abc", (b"front-1", None)),  # not what mint_token makes: never echoed
        (b"front-1~0123456789ABCDEF", (b"front-1", None)),
        (b"front-1~0123456789abcdef0", (b"front-1", None)),
        (b"front-1~Domain=evil", (b"front-1", None)),
        (b"~", (b"", None)),
    ],
    ids=["no-token", "token", "signed", "short", "upper", "long", "junk", "bare-sep"],
)
def test_split_value(value, expected):
    assert split_value(value) == expected


def test_with_token_goes_after_the_value():
    lines = b"Set-Cookie: SERVERID=front-1.abc_-; Path=/; HttpOnly; SameSite=Lax\r\n"
    token = b"0123456789abcdef"
    added = with_token(lines, token)
    assert added == (
        b"Set-Cookie: SERVERID=front-1.abc_-~0123456789abcdef; Path=/; HttpOnly; SameSite=Lax\r\n"
    )
    value = added.split(b"=", 1)[1].split(b";", 1)[0]
    assert split_value(value) == (b"front-1.abc_-", token)


def test_minted_tokens_are_sixteen_hex_digits_and_distinct():
    tokens = {mint_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(t) == 16 and int(t, 16) >= 0 for t in tokens)
