"""The driver load's ``--cars`` (SPEC §10): seeded, deterministic draws in range, sent with
each request; off by default (no broker: a fake publisher plays Central)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from evcharging.apps.ev_load.load import LOAD_CARS, cars_rng, draw_car_request
from evcharging.apps.ev_load.main import parse_settings
from evcharging.common.car import FULL_SOC
from tests.unit.test_load import FakeCentral, generator

HOUR = timedelta(hours=1)


@pytest.fixture
async def central() -> AsyncIterator[FakeCentral]:
    fake = FakeCentral()
    yield fake
    await fake.close()


def test_the_draws_are_deterministic_and_in_range() -> None:
    rng = cars_rng(7)
    draws = [draw_car_request(rng) for _ in range(2000)]
    again = cars_rng(7)
    assert draws == [draw_car_request(again) for _ in range(2000)]
    other = cars_rng(8)
    assert draws[:20] != [draw_car_request(other) for _ in range(20)]
    for d in draws:
        assert 40.0 <= d.car.battery_kwh <= 100.0
        assert 0.1 <= d.car.soc <= 0.6
        assert 7.0 <= d.car.max_kw <= 150.0
        assert 2 * HOUR <= d.stay <= 9 * HOUR
        assert 0 < d.kwh_wanted <= (FULL_SOC - d.car.soc) * d.car.battery_kwh + 0.0005
    assert {d.car.max_kw for d in draws} == {kw for kw, _ in LOAD_CARS.car_max_kw}
    assert {d.car.battery_kwh for d in draws} == {b for b, _ in LOAD_CARS.batteries_kwh}
    stays = sorted(d.stay / HOUR for d in draws)
    assert stays[0] < 3 and stays[-1] > 8.5  # the range is used, not one value
    assert 5 < stays[len(stays) // 2] < 8  # a working day for most
    socs = [d.car.soc for d in draws]
    assert min(socs) < 0.15 and max(socs) > 0.55


async def test_with_cars_each_request_carries_the_nth_draw(central: FakeCentral) -> None:
    g = generator(central, [f"CP-{i}" for i in range(200)], cars=True, seed=3)
    await g.run()
    assert g.tally.arrivals == len(central.requests) > 10
    rng = cars_rng(3)
    for request in central.requests:
        drawn = draw_car_request(rng)
        assert (request.kwh_wanted, request.car) == (drawn.kwh_wanted, drawn.car)
        assert request.departure is not None
        assert request.departure - request.ts == pytest.approx(drawn.stay, abs=timedelta(
            seconds=1))


async def test_without_cars_requests_are_as_before(central: FakeCentral) -> None:
    g = generator(central, [f"CP-{i}" for i in range(200)], seed=3)
    await g.run()
    assert central.requests and all(
        (r.kwh_wanted, r.departure, r.car) == (None, None, None) for r in central.requests)


def test_the_cars_flag_is_off_by_default() -> None:
    assert not parse_settings(["--kafka-bootstrap", "k:1"]).cars
    assert parse_settings(["--kafka-bootstrap", "k:1", "--cars"]).cars
