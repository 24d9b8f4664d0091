"""The CP Fleet's CPs with cars and limits (SPEC §10): the engine's own ChargingPoint, so the
same behaviour, through the fleet's command router (Kafka replaced by a recording publisher)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from evcharging.apps.ev_fleet.api import FleetParts
from evcharging.apps.ev_fleet.fleet import Fleet
from evcharging.apps.ev_fleet.metrics import FleetCollector
from evcharging.apps.ev_fleet.plan import fleet_plan
from evcharging.common.config import CPEngineSettings
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

KW = 22.0


def command(cp_id: str, cmd: CommandType, **payload: Any) -> CentralCommand:
    return CentralCommand.model_validate({"cp_id": cp_id, "cmd": cmd, "payload": payload})


@pytest.fixture
def pub() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
async def fleet(pub: RecordingPublisher) -> AsyncIterator[Fleet]:
    settings = CPEngineSettings(
        _env_file=None, cp_id="CP-00001", kw_rate=KW, euro_rate=0.30, session_seconds=600.0,
        telemetry_interval=0.02, status_interval=600.0, api_token=None,
    )
    running = Fleet(fleet_plan("CP-", 1, 2, 1), pub, settings, rng=random.Random(7))
    await running.connect()
    yield running
    await running.stop()


def telemetry_of(pub: RecordingPublisher, cp_id: str, since: int) -> list[CPTelemetry]:
    return [t for t in pub.of(CPTelemetry, since) if t.cp_id == cp_id]


async def test_a_fleet_cp_follows_set_limit_and_ends_at_the_energy_wanted(
    fleet: Fleet, pub: RecordingPublisher
) -> None:
    wanted = 0.002  # about half a second at 11 kW
    car = {"battery_kwh": 50.0, "soc": 0.4, "max_kw": 11.0}
    await fleet.handle_command(command("CP-00002", CommandType.START_SUPPLY, driver_id="d-1",
                                       session_id="s-1", kwh_wanted=wanted, car=car))
    await fleet.drain()
    first = await pub.wait_for(CPTelemetry, lambda t: t.cp_id == "CP-00002", timeout=5)
    assert (first.kw, first.session_id) == (11.0, "s-1")  # the car's most
    assert first.soc is not None and first.soc > 0.4

    await fleet.handle_command(command("CP-00002", CommandType.SET_LIMIT, kw=5.5,
                                       session_id="s-1"))
    await fleet.handle_command(command("CP-00001", CommandType.SET_LIMIT, kw=5.5,
                                       session_id="s-1"))  # no session there: ignored
    await fleet.drain()
    mark = len(pub.messages)
    await pub.wait_for(CPTelemetry, lambda t: t.cp_id == "CP-00002", since=mark, timeout=5)
    done = await pub.wait_for(CPStatus, lambda s: s.session_result is not None, timeout=10)
    assert (done.cp_id, done.session_result, done.kwh) == (
        "CP-00002", SessionResult.COMPLETED, wanted)
    assert {t.kw for t in telemetry_of(pub, "CP-00002", mark)} == {5.5}
    assert not [s for s in pub.of(CPStatus) if s.cp_id == "CP-00001"
                and s.event not in (StatusEvent.CONNECT, StatusEvent.HEARTBEAT)]
    cps = fleet.cps
    assert cps["CP-00001"].ignored_limits == 1 and cps["CP-00002"].ignored_limits == 0
    assert cps["CP-00001"].state is CPState.ACTIVATED
    assert cps["CP-00002"].state is CPState.ACTIVATED
    [ignored] = [m for m in FleetCollector(FleetParts(fleet)).collect()
                 if m.name == PREFIX + "fleet_ignored_limits"]
    assert ignored.samples[0].value == 1
