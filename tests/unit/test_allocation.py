"""The smart-charging allocator of SPEC §10, exhaustively on small grids and property-based."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evcharging.apps.ev_central.allocation import Demand, Policy, allocate, slack_hours

NOW = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
EPS = 1e-9
POLICIES = list(Policy)

kws = st.floats(0.0, 350.0)
departures = st.none() | st.integers(-120, 24 * 60).map(lambda m: NOW + timedelta(minutes=m))


@st.composite
def demand_lists(draw: st.DrawFn, max_size: int = 12) -> list[Demand]:
    n = draw(st.integers(0, max_size))
    return [
        Demand(
            session_id=f"s{i:02d}",
            cp_kw=draw(kws),
            car_kw=draw(st.none() | kws),
            kwh_left=draw(st.none() | st.floats(0.0, 100.0)),
            departure=draw(departures),
        )
        for i in range(n)
    ]


limits = st.floats(0.0, 1000.0)


def used_up(limit: float, shares: dict[str, float]) -> bool:
    return math.isclose(math.fsum(shares.values()), limit, rel_tol=1e-9, abs_tol=1e-9)


# --- worked examples ------------------------------------------------------------------


def test_equal_shares_under_a_limit() -> None:
    demands = [Demand(f"s{i}", 22.0) for i in range(4)]
    assert allocate(66.0, demands) == {f"s{i}": 16.5 for i in range(4)}


def test_what_a_tapering_car_cannot_use_goes_to_the_others() -> None:
    demands = [Demand("a", 22.0, car_kw=6.0)] + [Demand(s, 22.0, car_kw=50.0) for s in "bcd"]
    assert allocate(66.0, demands) == {"a": 6.0, "b": 20.0, "c": 20.0, "d": 20.0}


def test_a_small_cp_and_a_full_car_take_what_they_can() -> None:
    demands = [Demand("a", 7.4), Demand("b", 22.0, car_kw=0.0), Demand("c", 22.0),
               Demand("d", 11.0)]
    assert allocate(40.0, demands) == pytest.approx({"a": 7.4, "b": 0.0, "c": 21.6, "d": 11.0})


def test_a_limit_above_what_all_can_take_leaves_power_unused() -> None:
    demands = [Demand("a", 11.0), Demand("b", 22.0, car_kw=7.0)]
    for policy in POLICIES:
        assert allocate(100.0, demands, policy=policy, now=NOW) == {"a": 11.0, "b": 7.0}


def test_no_limit_gives_everyone_what_they_can_take() -> None:
    demands = [Demand("a", 11.0), Demand("b", 22.0, car_kw=7.0), Demand("c", 0.0)]
    for policy in POLICIES:
        assert allocate(None, demands, policy=policy, now=NOW) == {"a": 11.0, "b": 7.0,
                                                                    "c": 0.0}


def test_no_sessions_no_shares() -> None:
    for policy in POLICIES:
        assert allocate(50.0, [], policy=policy, now=NOW) == {}


def test_least_laxity_favours_the_earlier_departure() -> None:
    early = Demand("early", 22.0, kwh_left=20.0, departure=NOW + timedelta(hours=2))
    late = Demand("late", 22.0, kwh_left=20.0, departure=NOW + timedelta(hours=8))
    shares = allocate(30.0, [late, early], policy=Policy.LEAST_LAXITY, now=NOW)
    assert shares == {"early": 22.0, "late": 8.0}
    assert allocate(30.0, [late, early], policy=Policy.EQUAL) == {"early": 15.0, "late": 15.0}


def test_least_laxity_weighs_the_energy_still_wanted() -> None:
    # same departure, but "much" needs 40 kWh at 10 kW (4 h) of its 5 h: slack 1 h
    much = Demand("much", 10.0, kwh_left=40.0, departure=NOW + timedelta(hours=5))
    little = Demand("little", 10.0, kwh_left=5.0, departure=NOW + timedelta(hours=5))
    assert slack_hours(much, NOW) == pytest.approx(1.0)
    assert slack_hours(little, NOW) == pytest.approx(4.5)
    assert allocate(12.0, [little, much], policy="least_laxity", now=NOW) == {  # type: ignore[arg-type]
        "much": 10.0, "little": 2.0}


def test_least_laxity_serves_sessions_without_departure_last_and_equally() -> None:
    dated = Demand("dated", 11.0, kwh_left=5.0, departure=NOW + timedelta(hours=10))
    free = [Demand("x", 11.0), Demand("y", 11.0, kwh_left=30.0)]
    shares = allocate(20.0, [*free, dated], policy=Policy.LEAST_LAXITY, now=NOW)
    assert shares == {"dated": 11.0, "x": 4.5, "y": 4.5}
    assert slack_hours(free[0], NOW) == math.inf


def test_equal_slack_shares_equally() -> None:
    a = Demand("a", 22.0, kwh_left=11.0, departure=NOW + timedelta(hours=3))
    b = Demand("b", 22.0, kwh_left=11.0, departure=NOW + timedelta(hours=3))
    assert allocate(20.0, [a, b], policy=Policy.LEAST_LAXITY, now=NOW) == {"a": 10.0, "b": 10.0}


def test_a_session_that_wants_energy_it_cannot_take_is_most_urgent_and_gets_nothing() -> None:
    stuck = Demand("stuck", 22.0, car_kw=0.0, kwh_left=5.0, departure=NOW + timedelta(hours=9))
    other = Demand("other", 22.0, kwh_left=5.0, departure=NOW + timedelta(hours=1))
    assert slack_hours(stuck, NOW) == -math.inf
    assert allocate(10.0, [stuck, other], policy=Policy.LEAST_LAXITY, now=NOW) == {
        "stuck": 0.0, "other": 10.0}


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [-1.0, math.nan, math.inf])
def test_a_bad_limit_is_refused(limit: float) -> None:
    with pytest.raises(ValueError, match="limit_kw"):
        allocate(limit, [Demand("a", 11.0)])


@pytest.mark.parametrize(
    "kwargs",
    [{"cp_kw": -1.0}, {"cp_kw": math.inf}, {"cp_kw": 1.0, "car_kw": -0.1},
     {"cp_kw": 1.0, "car_kw": math.nan}, {"cp_kw": 1.0, "kwh_left": -3.0},
     {"cp_kw": 1.0, "departure": datetime(2026, 12, 7, 9)}],  # noqa: DTZ001 (naive on purpose)
)
def test_a_bad_demand_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Demand("a", **kwargs)  # type: ignore[arg-type]


def test_duplicate_sessions_a_missing_or_naive_now_and_an_unknown_policy_are_refused() -> None:
    with pytest.raises(ValueError, match="once"):
        allocate(10.0, [Demand("a", 1.0), Demand("a", 2.0)])
    dated = [Demand("a", 1.0, departure=NOW)]
    with pytest.raises(ValueError, match="now"):
        allocate(10.0, dated, policy=Policy.LEAST_LAXITY)
    with pytest.raises(ValueError, match="timezone"):
        allocate(10.0, dated, policy=Policy.LEAST_LAXITY, now=NOW.replace(tzinfo=None))
    with pytest.raises(ValueError):
        allocate(10.0, dated, policy="biggest_first")  # type: ignore[arg-type]
    # without departures least_laxity needs no clock: everyone shares equally
    assert allocate(10.0, [Demand("a", 22.0), Demand("b", 22.0)],
                    policy=Policy.LEAST_LAXITY) == {"a": 5.0, "b": 5.0}


# --- exhaustive: every small case against a reference ---------------------------------


def reference_water_level(limit: float, caps: list[float]) -> list[float]:
    """min(cap, L) with L found by bisection so that the shares add up to the limit."""
    if sum(caps) <= limit:
        return caps
    low, high = 0.0, max(caps)
    for _ in range(200):
        level = (low + high) / 2
        if sum(min(c, level) for c in caps) > limit:
            high = level
        else:
            low = level
    return [min(c, low) for c in caps]


GRID = [0.0, 1.0, 2.5, 7.4, 11.0, 22.0]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_equal_matches_the_water_level_for_every_small_case(n: int) -> None:
    for caps in itertools.product(GRID, repeat=n):
        for limit in (0.0, 1.0, 3.0, 10.0, 17.5, 30.0, 66.0, 100.0):
            demands = [Demand(f"s{i}", cap) for i, cap in enumerate(caps)]
            shares = allocate(limit, demands)
            expected = reference_water_level(limit, list(caps))
            assert [shares[f"s{i}"] for i in range(n)] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_least_laxity_matches_a_greedy_reference_for_every_small_case(n: int) -> None:
    hours = [1, 2, 4, None]
    for caps in itertools.product([0.0, 5.0, 11.0], repeat=n):
        for deps in itertools.product(hours, repeat=n):
            demands = [
                Demand(f"s{i}", cap, kwh_left=4.0,
                       departure=None if h is None else NOW + timedelta(hours=h))
                for i, (cap, h) in enumerate(zip(caps, deps, strict=True))
            ]
            for limit in (0.0, 4.0, 9.0, 14.0, 40.0):
                shares = allocate(limit, demands, policy=Policy.LEAST_LAXITY, now=NOW)
                # reference: by slack, groups of equal slack water-filled, then the next
                left = limit
                expected: dict[str, float] = {}
                slacks = {d.session_id: slack_hours(d, NOW) for d in demands}
                for slack in sorted(set(slacks.values())):
                    group = [d for d in demands if slacks[d.session_id] == slack]
                    level = reference_water_level(left, [d.cap_kw for d in group])
                    expected |= {d.session_id: v for d, v in zip(group, level, strict=True)}
                    left = max(0.0, left - sum(level))
                assert shares == pytest.approx(expected, abs=1e-9)


# --- properties -----------------------------------------------------------------------


@given(limits, demand_lists(), st.sampled_from(POLICIES))
def test_shares_never_exceed_the_limit_nor_what_a_session_takes(
    limit: float, demands: list[Demand], policy: Policy
) -> None:
    shares = allocate(limit, demands, policy=policy, now=NOW)
    assert set(shares) == {d.session_id for d in demands}
    assert math.fsum(shares.values()) <= limit
    assert sum(shares.values()) <= limit + EPS
    for d in demands:
        assert 0.0 <= shares[d.session_id] <= d.cap_kw
        assert shares[d.session_id] <= d.cp_kw
        if d.car_kw is not None:
            assert shares[d.session_id] <= d.car_kw


@given(limits, demand_lists(), st.sampled_from(POLICIES))
def test_no_power_is_kept_back(limit: float, demands: list[Demand], policy: Policy) -> None:
    shares = allocate(limit, demands, policy=policy, now=NOW)
    short = [d for d in demands if shares[d.session_id] < d.cap_kw - 1e-9 * max(1, d.cap_kw)]
    if short:
        assert used_up(limit, shares)
    else:
        assert math.fsum(shares.values()) == pytest.approx(
            min(limit, math.fsum(d.cap_kw for d in demands)), rel=1e-9, abs=1e-9)


@given(limits, demand_lists(), st.sampled_from(POLICIES), st.randoms(use_true_random=False))
def test_the_result_is_deterministic_and_independent_of_order(
    limit: float, demands: list[Demand], policy: Policy, rnd: object
) -> None:
    shares = allocate(limit, demands, policy=policy, now=NOW)
    assert allocate(limit, demands, policy=policy, now=NOW) == shares
    shuffled = list(demands)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert allocate(limit, shuffled, policy=policy, now=NOW) == shares
    assert list(shares) == sorted(shares)


@given(demand_lists(), st.sampled_from(POLICIES))
def test_no_limit_means_no_limits(demands: list[Demand], policy: Policy) -> None:
    assert allocate(None, demands, policy=policy, now=NOW) == {
        d.session_id: d.cap_kw for d in demands}


@given(limits, demand_lists())
def test_equal_is_max_min_fair(limit: float, demands: list[Demand]) -> None:
    """Whoever gets less than it can take gets at least as much as anyone else."""
    shares = allocate(limit, demands)
    top = max(shares.values(), default=0.0)
    for d in demands:
        if shares[d.session_id] < d.cap_kw - 1e-9:
            assert shares[d.session_id] == pytest.approx(top, rel=1e-9, abs=1e-9)


@given(limits, demand_lists())
def test_least_laxity_serves_no_one_before_the_more_urgent_have_all_they_take(
    limit: float, demands: list[Demand]
) -> None:
    shares = allocate(limit, demands, policy=Policy.LEAST_LAXITY, now=NOW)
    for urgent, other in itertools.permutations(demands, 2):
        if (slack_hours(urgent, NOW) < slack_hours(other, NOW)
                and shares[urgent.session_id] < urgent.cap_kw - 1e-9):
            assert shares[other.session_id] == pytest.approx(0.0, abs=1e-9)


@given(limits, demand_lists(), st.sampled_from(POLICIES))
def test_a_larger_limit_takes_nothing_from_anyone_under_equal_and_never_less_in_total(
    limit: float, demands: list[Demand], policy: Policy
) -> None:
    small = allocate(limit, demands, policy=policy, now=NOW)
    large = allocate(limit * 1.5 + 1, demands, policy=policy, now=NOW)
    assert math.fsum(large.values()) >= math.fsum(small.values()) - EPS
    if policy is Policy.EQUAL:
        for sid, share in small.items():
            assert large[sid] >= share - 1e-9


@given(limits, demand_lists())
def test_without_departures_least_laxity_shares_equally(
    limit: float, demands: list[Demand]
) -> None:
    undated = [Demand(d.session_id, d.cp_kw, d.car_kw, d.kwh_left) for d in demands]
    assert allocate(limit, undated, policy=Policy.LEAST_LAXITY, now=NOW) == allocate(
        limit, undated)
