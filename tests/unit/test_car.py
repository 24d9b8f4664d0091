"""The car model of SPEC §10: its acceptance curve and the charging step, property-based."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from evcharging.common.car import (
    FULL_SOC,
    TAPER_SOC,
    Car,
    Done,
    acceptance_kw,
    charge,
    seconds_to,
)

socs = st.floats(0.0, 1.0)
batteries = st.floats(5.0, 200.0)
max_kws = st.floats(1.0, 350.0)
rates = st.floats(0.0, 400.0)
limits = st.none() | st.floats(0.0, 400.0)
steps = st.floats(0.0, 7200.0)
wanted = st.none() | st.floats(0.0, 150.0)


@st.composite
def cars(draw: st.DrawFn, soc: st.SearchStrategy[float] = socs) -> Car:
    return Car(draw(batteries), draw(soc), draw(max_kws))


def close(a: float, b: float, rel: float = 1e-9, abs_: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


# --- the curve ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("soc", "expected"),
    [(0.0, 11.0), (0.5, 11.0), (0.8, 11.0), (0.85, 8.25), (0.9, 5.5), (0.95, 2.75), (0.99, 0.55),
     (1.0, 0.0)],
)
def test_acceptance_is_flat_to_80_percent_then_linear_to_zero(soc: float, expected: float) -> None:
    assert acceptance_kw(soc, 11.0) == pytest.approx(expected)


@given(socs, socs, max_kws)
def test_acceptance_never_rises_with_the_state_of_charge(a: float, b: float, max_kw: float) -> None:
    low, high = sorted((a, b))
    assert 0.0 <= acceptance_kw(high, max_kw) <= acceptance_kw(low, max_kw) <= max_kw


@given(st.floats(TAPER_SOC, 1.0), max_kws)
def test_acceptance_is_linear_in_the_taper(soc: float, max_kw: float) -> None:
    assert acceptance_kw(soc, max_kw) == pytest.approx(max_kw * (1 - soc) / (1 - TAPER_SOC))


def test_a_full_car_accepts_nothing() -> None:
    assert Car(60, FULL_SOC, 11).acceptance_kw == 0.0
    assert Car(60, FULL_SOC, 11).full
    assert not Car(60, 0.989, 11).full
    assert Car(60, 0.5, 11).room_kwh == pytest.approx(0.49 * 60)


@pytest.mark.parametrize(
    "args",
    [(0, 0.5, 11), (-1, 0.5, 11), (60, -0.1, 11), (60, 1.1, 11), (60, 0.5, 0), (60, 0.5, -2),
     (math.nan, 0.5, 11), (60, math.nan, 11), (60, 0.5, math.inf)],
)
def test_a_car_that_cannot_be_is_refused(args: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        Car(*args)


@pytest.mark.parametrize(
    "kwargs",
    [{"cp_kw": -1.0}, {"cp_kw": math.nan}, {"cp_kw": 11.0, "limit_kw": -1.0},
     {"cp_kw": 11.0, "limit_kw": math.inf}, {"cp_kw": 11.0, "kwh_left": -0.5},
     {"cp_kw": 11.0, "kwh_left": math.nan}],
)
def test_a_step_with_bad_input_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        charge(Car(60, 0.5, 11), 1.0, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        charge(Car(60, 0.5, 11), -1.0, cp_kw=11.0)


# --- worked examples ------------------------------------------------------------------


def test_below_the_taper_a_step_charges_at_the_least_of_rate_limit_and_car() -> None:
    car = Car(60, 0.2, 11)
    assert charge(car, 3600, cp_kw=22).kwh == pytest.approx(11)       # the car's 11 kW
    assert charge(car, 3600, cp_kw=7.4).kwh == pytest.approx(7.4)     # the CP's 7.4 kW
    step = charge(car, 3600, cp_kw=22, limit_kw=3)                     # Central's 3 kW
    assert step.kwh == pytest.approx(3)
    assert step.kw == pytest.approx(3)
    assert step.car.soc == pytest.approx(0.2 + 3 / 60)
    assert step.done is None
    assert step.seconds == 3600


def test_in_the_taper_the_state_of_charge_approaches_full_exponentially() -> None:
    car = Car(50, TAPER_SOC, 10)
    k = 10 / (0.2 * 50)  # per hour
    step = charge(car, 1800, cp_kw=22)
    assert step.car.soc == pytest.approx(1 - 0.2 * math.exp(-k * 0.5))
    assert step.kw == pytest.approx(acceptance_kw(step.car.soc, 10))
    # to full: 0.2 → 0.01 of room left
    assert seconds_to(car, FULL_SOC, cp_kw=22) == pytest.approx(math.log(20) / k * 3600)


def test_a_limit_below_the_acceptance_keeps_the_power_flat_into_the_taper() -> None:
    car = Car(50, 0.8, 10)
    # acceptance falls to 5 kW at 90 %: flat at 5 kW until then (1 h for 5 kWh), then taper
    assert seconds_to(car, 0.9, cp_kw=22, limit_kw=5) == pytest.approx(3600)
    step = charge(car, 3600, cp_kw=22, limit_kw=5)
    assert step.car.soc == pytest.approx(0.9)
    assert step.kwh == pytest.approx(5)


def test_the_step_that_reaches_the_wanted_energy_is_cut_short_there() -> None:
    car = Car(60, 0.3, 11)
    step = charge(car, 3600, cp_kw=22, kwh_left=5.5)
    assert step.done is Done.WANTED
    assert step.kwh == 5.5  # exactly
    assert step.seconds == pytest.approx(1800)
    assert step.kw == 0.0
    assert step.car.soc == pytest.approx(0.3 + 5.5 / 60)


def test_the_step_that_fills_the_battery_is_cut_short_at_99_percent() -> None:
    car = Car(40, 0.95, 11)
    step = charge(car, 36_000, cp_kw=22, kwh_left=30)
    assert step.done is Done.FULL
    assert step.car.soc == FULL_SOC
    assert step.kwh == pytest.approx(0.04 * 40)
    assert step.seconds == pytest.approx(seconds_to(car, FULL_SOC, cp_kw=22))
    assert step.seconds < 36_000


def test_nothing_left_or_already_full_ends_at_once() -> None:
    assert charge(Car(60, 0.5, 11), 10, cp_kw=11, kwh_left=0).done is Done.WANTED
    full = charge(Car(60, 0.995, 11), 10, cp_kw=11)
    assert (full.done, full.kwh, full.seconds) == (Done.FULL, 0.0, 0.0)


def test_a_zero_limit_pauses_the_car() -> None:
    step = charge(Car(60, 0.5, 11), 60, cp_kw=11, limit_kw=0)
    assert (step.kwh, step.kw, step.done, step.car.soc) == (0.0, 0.0, None, 0.5)
    assert seconds_to(Car(60, 0.5, 11), 0.6, cp_kw=11, limit_kw=0) == math.inf


# --- properties -----------------------------------------------------------------------


@given(cars(), steps, rates, limits, wanted)
def test_a_step_conserves_energy_and_respects_every_bound(
    car: Car, seconds: float, cp_kw: float, limit_kw: float | None, kwh_left: float | None
) -> None:
    step = charge(car, seconds, cp_kw=cp_kw, limit_kw=limit_kw, kwh_left=kwh_left)
    offer = cp_kw if limit_kw is None else min(cp_kw, limit_kw)
    hours = step.seconds / 3600
    assert 0.0 <= step.seconds <= seconds
    assert step.kwh >= 0.0
    # the stored energy grows by what was delivered
    assert close((step.car.soc - car.soc) * car.battery_kwh, step.kwh, abs_=1e-9 * car.battery_kwh)
    # never faster than the offer, nor than the car took at the step's start
    assert step.kwh <= min(offer, car.acceptance_kw) * hours * (1 + 1e-9) + 1e-12
    # never past full, never more than wanted
    assert car.soc <= step.car.soc <= max(car.soc, FULL_SOC)
    if kwh_left is not None:
        assert step.kwh <= kwh_left
    # the power at the end is what the car takes then, within the offer
    assert 0.0 <= step.kw <= min(offer, acceptance_kw(step.car.soc, car.max_kw)) + 1e-12
    if step.done is None:
        assert step.seconds == seconds
        assert not step.car.full
    elif step.done is Done.WANTED:
        assert step.kwh == kwh_left
    else:
        assert step.car.soc == max(car.soc, FULL_SOC)


@given(cars(st.floats(0.0, 0.98)), st.floats(0.0, 3600.0), st.floats(0.0, 3600.0), rates, limits)
def test_two_steps_are_one_step_of_their_sum(
    car: Car, a: float, b: float, cp_kw: float, limit_kw: float | None
) -> None:
    first = charge(car, a, cp_kw=cp_kw, limit_kw=limit_kw)
    assume(first.done is None)
    second = charge(first.car, b, cp_kw=cp_kw, limit_kw=limit_kw)
    both = charge(car, a + b, cp_kw=cp_kw, limit_kw=limit_kw)
    assert close(second.car.soc, both.car.soc, rel=1e-7, abs_=1e-9)
    assert close(first.kwh + second.kwh, both.kwh, rel=1e-7, abs_=1e-7)
    assert (second.done is None) == (both.done is None) or close(
        second.car.soc, FULL_SOC, abs_=1e-9)


@settings(deadline=None)  # thousands of steps per example
@given(cars(st.floats(0.0, 0.98)), rates, limits, st.floats(0.1, 100.0))
def test_the_wanted_energy_is_delivered_exactly_however_it_is_stepped(
    car: Car, cp_kw: float, limit_kw: float | None, kwh_wanted: float
) -> None:
    assume((limit_kw is None or limit_kw > 0.5) and cp_kw > 0.5)
    left = kwh_wanted
    delivered = 0.0
    done: Done | None = None
    for _ in range(100_000):
        step = charge(car, 60.0, cp_kw=cp_kw, limit_kw=limit_kw, kwh_left=left)
        car, delivered, left = step.car, delivered + step.kwh, left - step.kwh
        if step.done is not None:
            done = step.done
            break
    assert done is not None
    if done is Done.WANTED:
        assert close(delivered, kwh_wanted, abs_=1e-9)
        assert left == pytest.approx(0, abs=1e-9)
    else:
        assert car.soc == FULL_SOC
        assert delivered <= kwh_wanted + 1e-9


@settings(deadline=None)  # thousands of steps per example
@given(cars(st.floats(0.0, 0.98)), rates, limits)
def test_the_exact_step_agrees_with_fine_euler_integration(
    car: Car, cp_kw: float, limit_kw: float | None
) -> None:
    offer = cp_kw if limit_kw is None else min(cp_kw, limit_kw)
    exact = charge(car, 1800.0, cp_kw=cp_kw, limit_kw=limit_kw)
    soc = car.soc
    dt = 1.0 / 3600  # one second, in hours
    for _ in range(1800):
        soc = min(FULL_SOC, soc + min(offer, acceptance_kw(soc, car.max_kw)) * dt / car.battery_kwh)
    assert exact.car.soc == pytest.approx(soc, abs=2e-4)
