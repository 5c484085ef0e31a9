"""Rise/fall verdicts: sequences of results in, transitions out; plus a Hypothesis property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zdlb.balancer.server import Health
from zdlb.health.verdict import Transition, Verdict

UP, DOWN = Health.UP, Health.DOWN


def feed(verdict: Verdict, steps: str) -> list[tuple[int, Health]]:
    """Feed ``steps`` (``p`` pass, ``f`` fail, ``x`` force_down); (index, new health) per flip."""
    flips: list[tuple[int, Health]] = []
    for index, step in enumerate(steps):
        if step == "x":
            transition = verdict.force_down(f"forced at {index}")
        else:
            transition = verdict.record(step == "p", f"result {index}")
        if transition is not None:
            assert transition.old is not transition.new
            flips.append((index, transition.new))
    return flips


TRANSITIONS = [
    # rise, fall, start, steps, flips (index of the deciding step, new health)
    pytest.param(2, 3, UP, "ppppp", [], id="up-stays-up-on-passes"),
    pytest.param(2, 3, UP, "ff", [], id="up-two-fails-of-three"),
    pytest.param(2, 3, UP, "fff", [(2, DOWN)], id="up-falls-on-third-fail"),
    pytest.param(2, 3, UP, "ffpff", [], id="pass-restarts-fall-streak"),
    pytest.param(2, 3, UP, "ffpfff", [(5, DOWN)], id="fall-after-restarted-streak"),
    pytest.param(2, 3, UP, "fffff", [(2, DOWN)], id="down-stays-down-on-fails"),
    pytest.param(2, 3, DOWN, "p", [], id="down-one-pass-of-two"),
    pytest.param(2, 3, DOWN, "pp", [(1, UP)], id="down-rises-on-second-pass"),
    pytest.param(2, 3, DOWN, "pfpfp", [], id="fail-restarts-rise-streak"),
    pytest.param(2, 3, UP, "fffpp", [(2, DOWN), (4, UP)], id="fall-then-rise"),
    pytest.param(2, 3, UP, "fffppfff", [(2, DOWN), (4, UP), (7, DOWN)], id="flap-counted-anew"),
    pytest.param(1, 1, UP, "fpfp", [(0, DOWN), (1, UP), (2, DOWN), (3, UP)], id="rise1-fall1"),
    pytest.param(2, 3, UP, "x", [(0, DOWN)], id="force-down-at-once"),
    pytest.param(2, 3, UP, "xpp", [(0, DOWN), (2, UP)], id="forced-then-rise-passes"),
    pytest.param(2, 3, UP, "xpxpp", [(0, DOWN), (4, UP)], id="force-restarts-rise-streak"),
    pytest.param(2, 3, UP, "fffx", [(2, DOWN)], id="force-when-down-is-no-flip"),
    pytest.param(2, 3, UP, "ffx", [(2, DOWN)], id="force-during-fall-streak"),
]


@pytest.mark.parametrize(("rise", "fall", "start", "steps", "flips"), TRANSITIONS)
def test_transitions(
    rise: int, fall: int, start: Health, steps: str, flips: list[tuple[int, Health]]
) -> None:
    assert feed(Verdict(rise, fall, start), steps) == flips


def test_transition_carries_old_new_and_the_deciding_reason() -> None:
    verdict = Verdict(rise=2, fall=2)
    assert verdict.record(False, "connect refused") is None
    assert verdict.record(False, "timeout after 1.0 s") == Transition(
        UP, DOWN, "timeout after 1.0 s"
    )
    assert verdict.force_down("3 consecutive errors on live traffic") is None
    assert verdict.record(True, "ok 200") is None
    assert verdict.record(True, "ok 204") == Transition(DOWN, UP, "ok 204")


@pytest.mark.parametrize(
    ("start", "steps", "changing"),
    [
        pytest.param(UP, "", False, id="up-settled"),
        pytest.param(UP, "f", True, id="up-falling"),
        pytest.param(UP, "fp", False, id="up-fall-dismissed"),
        pytest.param(UP, "fff", False, id="just-fell"),
        pytest.param(DOWN, "", False, id="down-settled"),
        pytest.param(DOWN, "p", True, id="down-rising"),
        pytest.param(DOWN, "pf", False, id="down-rise-dismissed"),
        pytest.param(DOWN, "pp", False, id="just-rose"),
        pytest.param(UP, "x", False, id="just-forced"),
        pytest.param(DOWN, "px", False, id="forced-while-rising"),
    ],
)
def test_is_changing_while_a_streak_runs(start: Health, steps: str, changing: bool) -> None:
    verdict = Verdict(rise=2, fall=3, health=start)
    feed(verdict, steps)
    assert verdict.is_changing is changing


def test_health_and_streak_properties_and_repr() -> None:
    verdict = Verdict(rise=2, fall=3)
    assert (verdict.health, verdict.streak, verdict.needed) == (UP, 0, 3)
    feed(verdict, "ff")
    assert repr(verdict) == "<Verdict up streak=2/3 rise=2 fall=3>"
    feed(verdict, "fp")
    assert (verdict.health, verdict.streak, verdict.needed) == (DOWN, 1, 2)
    assert repr(verdict) == "<Verdict down streak=1/2 rise=2 fall=3>"


@pytest.mark.parametrize(("rise", "fall"), [(0, 3), (2, 0), (-1, -1)])
def test_counts_below_one_are_a_programming_error(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Verdict(rise, fall)


@given(
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
    start=st.sampled_from(Health),
    results=st.lists(st.booleans(), max_size=60),
)
def test_health_flips_only_after_exactly_rise_or_fall_consecutive_results(
    rise: int, fall: int, start: Health, results: list[bool]
) -> None:
    """Between two flips, health H holds; the segment that ends in a flip ends with exactly
    ``fall`` failures (H = UP) or ``rise`` passes (H = DOWN) and has no such run earlier; the
    last, unfinished segment has none at all."""
    verdict = Verdict(rise, fall, start)
    health = start
    run = 0  # consecutive results toward the other health since the last flip
    for passed in results:
        transition = verdict.record(passed, "r")
        is_toward_other = passed == (health is DOWN)
        run = run + 1 if is_toward_other else 0
        needed = fall if health is UP else rise
        if transition is None:
            assert run < needed
        else:
            assert run == needed
            assert transition.old is health
            assert transition.new is (UP if passed else DOWN)
            health, run = transition.new, 0
        assert verdict.health is health
        assert verdict.is_changing is (run > 0)
