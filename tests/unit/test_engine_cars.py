"""The CP Engine's cars and limits (SPEC §10), with a recording publisher.

A session charges at min(the CP's rate, Central's SET_LIMIT for it, the car's acceptance),
reports the car's state of charge in its telemetry and ends COMPLETED at exactly the energy
wanted or with the car full. SET_LIMIT is no state-machine event: one for another session,
or while none runs, is ignored and counted, never refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.apps.ev_cp_e.metrics import engine_metrics
from evcharging.common.car import FULL_SOC, acceptance_kw
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPStatus,
    CPTelemetry,
    StatusEvent,
)
from evcharging.common.metrics import PREFIX
from evcharging.common.states import CPState, SessionResult
from tests.unit.fakes import RecordingPublisher
from tests.unit.test_engine import FakeClock

CP_ID = "CP-001"
KW = 22.0
RATE = 0.30
TELEMETRY = 0.02


def start_supply(session_id: str = "S-1", **fields: Any) -> CentralCommand:
    payload = {"driver_id": "driver-alice", "session_id": session_id, **fields}
    return CentralCommand.model_validate(
        {"cp_id": CP_ID, "cmd": CommandType.START_SUPPLY, "payload": payload})


def set_limit(kw: float | None, session_id: str = "S-1") -> CentralCommand:
    return CentralCommand.model_validate(
        {"cp_id": CP_ID, "cmd": CommandType.SET_LIMIT,
         "payload": {"kw": kw, "session_id": session_id}})


def car(battery_kwh: float, soc: float, max_kw: float) -> dict[str, float]:
    return {"battery_kwh": battery_kwh, "soc": soc, "max_kw": max_kw}


@pytest.fixture
def pub() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
async def make_cp(pub: RecordingPublisher) -> AsyncIterator[Callable[..., ChargingPoint]]:
    made: list[ChargingPoint] = []

    def make(**overrides: Any) -> ChargingPoint:
        options: dict[str, Any] = {
            "kw_rate": KW, "euro_rate": RATE, "session_seconds": 600.0,
            "telemetry_interval": TELEMETRY, "status_interval": 600.0, **overrides,
        }
        cp = ChargingPoint(CP_ID, pub, **options)
        made.append(cp)
        return cp

    yield make
    for cp in made:
        await cp.stop()


async def next_telemetry(pub: RecordingPublisher) -> CPTelemetry:
    """The first telemetry published from now on."""
    return await pub.wait_for(CPTelemetry, since=len(pub.messages), timeout=5)


async def completed(pub: RecordingPublisher, since: int = 0) -> CPStatus:
    return await pub.wait_for(CPStatus, lambda s: s.session_result is not None,
                              since=since, timeout=10)


# ------------------------------------------------------------------------ SET_LIMIT


async def test_the_kw_follows_set_limit_from_the_next_telemetry(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    cp = make_cp()
    await cp.start()
    await cp.handle_command(start_supply())
    first = await next_telemetry(pub)
    assert (first.kw, first.soc) == (KW, None)  # no car: no state of charge

    await cp.handle_command(set_limit(7.0))
    mark = len(pub.messages)
    await pub.wait_count(CPTelemetry, 3, since=mark, timeout=5)
    assert [t.kw for t in pub.of(CPTelemetry, mark)][:3] == [7.0] * 3
    assert cp.snapshot()["limit_kw"] == 7.0

    await cp.handle_command(set_limit(50.0))  # above the CP's own rate: the rate
    assert (await next_telemetry(pub)).kw == KW

    await cp.handle_command(set_limit(3.0))
    assert (await next_telemetry(pub)).kw == 3.0
    await cp.handle_command(set_limit(None))  # no limit: full power again
    assert (await next_telemetry(pub)).kw == KW
    assert cp.snapshot()["limit_kw"] is None
    assert not pub.of(CPStatus, mark)  # SET_LIMIT announces no state
    assert cp.state is CPState.SUPPLYING and cp.ignored_limits == 0


async def test_the_kw_is_the_least_of_rate_limit_and_car(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    cp = make_cp(clock=FakeClock())  # the car's state stays where it is
    await cp.start()
    await cp.handle_command(start_supply(car=car(60.0, 0.2, 11.0)))
    first = await next_telemetry(pub)
    assert (first.kw, first.soc) == (11.0, 0.2)  # the car takes less than the CP gives
    await cp.handle_command(set_limit(7.0))
    assert (await next_telemetry(pub)).kw == 7.0  # the limit is less than the car takes
    await cp.handle_command(set_limit(16.0))
    assert (await next_telemetry(pub)).kw == 11.0


async def test_a_limit_for_another_session_or_none_is_ignored_and_counted(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    cp = make_cp()
    await cp.start()
    mark = len(pub.messages)
    await cp.handle_command(set_limit(5.0, "S-none"))  # no session runs
    assert pub.messages[mark:] == [] and cp.state is CPState.ACTIVATED
    assert cp.ignored_limits == 1

    await cp.handle_command(start_supply())
    await cp.handle_command(set_limit(5.0, "S-other"))
    mark = len(pub.messages)
    await pub.wait_count(CPTelemetry, 2, since=mark, timeout=5)
    assert [t.kw for t in pub.of(CPTelemetry, mark)][:2] == [KW, KW]
    assert not pub.of(CPStatus, mark)  # never REFUSED, no state change
    assert cp.state is CPState.SUPPLYING and cp.ignored_limits == 2

    await cp.handle_command(CentralCommand.model_validate(
        {"cp_id": CP_ID, "cmd": CommandType.STOP_CP, "payload": {}}))
    mark = len(pub.messages)
    await cp.handle_command(set_limit(5.0))  # S-1 ended with the stop
    assert pub.messages[mark:] == [] and cp.state is CPState.STOPPED
    assert cp.ignored_limits == 3
    exposed = {m.name: m.samples for m in engine_metrics(cp).registry.collect()}
    assert exposed[PREFIX + "cp_ignored_limits"][0].value == 3


async def test_a_limit_is_metered_exactly_from_the_telemetry_it_took_effect_at(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    clock = FakeClock()
    cp = make_cp(clock=clock)
    await cp.start()
    await cp.handle_command(start_supply())
    clock.advance(36.0)
    await cp.handle_command(set_limit(11.0))
    took_effect = await next_telemetry(pub)
    assert took_effect.kw == 11.0
    assert took_effect.kwh == pytest.approx(KW * 36 / 3600)  # the old rate until then
    clock.advance(72.0)
    mark = len(pub.messages)
    await cp.handle_command(CentralCommand.model_validate(
        {"cp_id": CP_ID, "cmd": CommandType.STOP_SUPPLY, "payload": {"session_id": "S-1"}}))
    [stopped] = pub.of(CPStatus, mark)
    assert stopped.session_result is SessionResult.STOPPED
    assert stopped.kwh == pytest.approx((KW * 36 + 11.0 * 72) / 3600)
    assert stopped.euros == pytest.approx(stopped.kwh * RATE)


async def test_a_plain_session_under_a_limit_still_ends_after_session_seconds(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    cp = make_cp(session_seconds=0.3)
    await cp.start()
    await cp.handle_command(start_supply())
    await cp.handle_command(set_limit(0.0))
    done = await completed(pub)
    assert (done.event, done.session_result) == (
        StatusEvent.SESSION_COMPLETE, SessionResult.COMPLETED)
    assert 0 < done.kwh < KW * 0.3 / 3600  # full power until the first telemetry only


# ------------------------------------------------------------------------ cars


async def test_the_car_tapers_above_80_percent(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    clock = FakeClock()
    cp = make_cp(clock=clock)
    await cp.start()
    await cp.handle_command(start_supply(car=car(60.0, 0.9, 20.0)))
    tapered = await next_telemetry(pub)
    assert tapered.soc == 0.9
    assert tapered.kw == pytest.approx(acceptance_kw(0.9, 20.0)) == pytest.approx(10.0)
    clock.advance(600.0)
    later = await next_telemetry(pub)
    assert tapered.soc < later.soc < FULL_SOC
    assert later.kw == pytest.approx(acceptance_kw(later.soc, 20.0))
    assert later.kw < tapered.kw
    assert later.kwh == pytest.approx((later.soc - 0.9) * 60.0)


async def test_a_car_charges_until_full_then_completes(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    # 10 Wh at 22 kW from 70 %: about 0.16 s flat, then the taper (about 1 s).
    cp = make_cp()
    await cp.start()
    await cp.handle_command(start_supply(car=car(0.01, 0.7, 22.0)))
    done = await completed(pub)
    assert (done.event, done.session_result, done.state) == (
        StatusEvent.SESSION_COMPLETE, SessionResult.COMPLETED, CPState.ACTIVATED)
    assert done.reason == "session completed: the battery is full"
    assert done.kwh == pytest.approx((FULL_SOC - 0.7) * 0.01, rel=1e-9)
    assert done.euros == pytest.approx(done.kwh * RATE, rel=1e-9)
    telemetry = pub.of(CPTelemetry)
    assert len(telemetry) >= 5
    socs = [t.soc for t in telemetry]
    assert all(s is not None and 0.7 <= s < FULL_SOC for s in socs)
    assert socs == sorted(socs)
    tapering = [t for t in telemetry if t.soc is not None and t.soc > 0.8]
    assert tapering and all(t.kw < KW for t in tapering)
    assert [t.kw for t in tapering] == sorted((t.kw for t in tapering), reverse=True)
    assert all(t.kw == KW for t in telemetry if t.soc is not None and t.soc < 0.79)
    assert cp.session_id is None


async def test_a_session_completes_at_exactly_the_energy_wanted(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    wanted = 0.0013  # about 0.2 s at 22 kW
    cp = make_cp()
    await cp.start()
    await cp.handle_command(start_supply(kwh_wanted=wanted, car=car(60.0, 0.3, 50.0)))
    done = await completed(pub)
    assert (done.session_result, done.kwh) == (SessionResult.COMPLETED, wanted)  # exactly
    assert done.euros == wanted * RATE
    assert done.reason == f"session completed: {wanted:g} kWh delivered"
    telemetry = pub.of(CPTelemetry)
    assert telemetry and all(t.kwh < wanted and t.kw == KW for t in telemetry)
    assert all(t.soc is not None and t.soc > 0.3 for t in telemetry[1:])


async def test_a_session_without_a_car_completes_at_the_energy_wanted(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    wanted = 0.0012
    cp = make_cp(session_seconds=0.05)  # not what ends a session with kwh_wanted
    await cp.start()
    await cp.handle_command(start_supply(kwh_wanted=wanted))
    await cp.handle_command(set_limit(11.0))  # half speed from the first telemetry on
    done = await completed(pub)
    assert (done.session_result, done.kwh) == (SessionResult.COMPLETED, wanted)
    telemetry = pub.of(CPTelemetry)
    assert len(telemetry) >= 5 and {t.kw for t in telemetry} == {11.0}
    assert all(t.soc is None and t.kwh < wanted for t in telemetry)


async def test_a_car_under_a_zero_limit_waits_and_stops_with_what_it_got(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    clock = FakeClock()
    cp = make_cp(clock=clock)
    await cp.start()
    await cp.handle_command(start_supply(kwh_wanted=10.0, car=car(40.0, 0.5, 11.0)))
    await cp.handle_command(set_limit(0.0))
    paused = await next_telemetry(pub)
    assert (paused.kw, paused.kwh, paused.soc) == (0.0, 0.0, 0.5)
    clock.advance(3600.0)
    assert (await next_telemetry(pub)).kwh == 0.0
    await cp.handle_command(set_limit(None))
    assert (await next_telemetry(pub)).kw == 11.0  # the limit is gone from this one on
    clock.advance(1800.0)
    resumed = await next_telemetry(pub)
    assert (resumed.kw, resumed.kwh) == (11.0, pytest.approx(5.5))
    assert resumed.soc == pytest.approx(0.5 + 5.5 / 40.0)
    mark = len(pub.messages)
    await cp.handle_command(CentralCommand.model_validate(
        {"cp_id": CP_ID, "cmd": CommandType.STOP_SUPPLY, "payload": {}}))
    [stopped] = pub.of(CPStatus, mark)
    assert (stopped.session_result, stopped.kwh) == (SessionResult.STOPPED, pytest.approx(5.5))
