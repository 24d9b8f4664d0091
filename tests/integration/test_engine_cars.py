"""The CP Engine's own ``run`` on the real broker with a car and Central's limits (SPEC §10).

A probe plays Central on topics with a unique prefix: START_SUPPLY with kwh_wanted and a
car, SET_LIMIT for the session (and one for another session), and reads what the engine
sends back: telemetry at the limit with the car's state of charge, no refusal, and the end
COMPLETED at exactly the energy wanted.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from evcharging.apps.ev_cp_e import main as engine_main
from evcharging.common.config import CPEngineSettings
from evcharging.common.kafka import KafkaBus, KafkaConfig, KafkaConsumerLoop, Routes
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPStatus,
    CPTelemetry,
    Message,
    StatusEvent,
)
from evcharging.common.states import CPState, SessionResult
from evcharging.devtools.process import free_port
from tests.polling import poll

pytestmark = pytest.mark.integration

CP_ID = "CP-CAR1"
WANTED = 0.01
"""kWh: about 6.5 s at the 5.5 kW limit (3.3 s at the car's 11 kW)."""


def command(cmd: CommandType, **payload: object) -> CentralCommand:
    return CentralCommand.model_validate({"cp_id": CP_ID, "cmd": cmd, "payload": payload})


async def test_the_engine_follows_the_limit_and_ends_at_the_energy_wanted(
    kafka_bootstrap: str,
) -> None:
    prefix = f"cars-{uuid.uuid4().hex[:8]}."
    settings = CPEngineSettings(
        _env_file=None, kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, cp_id=CP_ID,
        health_port=free_port(), kw_rate=22.0, session_seconds=600.0, telemetry_interval=0.1,
        status_interval=2.0, api_token=None, allow_anonymous=True,
    )
    config = KafkaConfig(bootstrap=kafka_bootstrap, client_id="probe", topic_prefix=prefix)
    bus = KafkaBus(config)
    await bus.start()
    seen: list[Message] = []

    async def collect(message: Message) -> None:
        seen.append(message)

    reports = KafkaConsumerLoop(
        config, Routes().add(CPStatus, collect).add(CPTelemetry, collect), start_at="latest")
    await reports.start()
    reading = asyncio.create_task(reports.run())
    stop = asyncio.Event()
    engine = asyncio.create_task(engine_main.run(settings, stop))

    def statuses() -> list[CPStatus]:
        return [m for m in seen if isinstance(m, CPStatus)]

    try:
        await poll(lambda: any(s.event is StatusEvent.CONNECT for s in statuses()),
                   timeout=60, what=f"{CP_ID} connected")
        await bus.publish(command(
            CommandType.START_SUPPLY, driver_id="d-1", session_id="S-1", kwh_wanted=WANTED,
            car={"battery_kwh": 50.0, "soc": 0.4, "max_kw": 11.0}))
        await bus.publish(command(CommandType.SET_LIMIT, kw=5.5, session_id="S-1"))
        await bus.publish(command(CommandType.SET_LIMIT, kw=1.0, session_id="S-other"))
        final: CPStatus = await poll(
            lambda: next((s for s in statuses() if s.session_result is not None), None),
            timeout=30, what="the session's end")
    finally:
        stop.set()
        code = await asyncio.wait_for(engine, 30)
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await reports.stop()
        await bus.stop()
    assert code == 0
    assert (final.session_id, final.session_result, final.state) == (
        "S-1", SessionResult.COMPLETED, CPState.ACTIVATED)
    assert final.kwh == WANTED  # exactly, through JSON
    telemetry = [m for m in seen if isinstance(m, CPTelemetry) and m.session_id == "S-1"]
    kws = [t.kw for t in telemetry]
    # The car's 11 kW until the limit took effect (at the first telemetry after it came),
    # then 5.5.
    assert kws.count(5.5) >= 10 and kws == sorted(kws, reverse=True)
    assert set(kws) <= {11.0, 5.5}
    socs = [t.soc for t in telemetry]
    assert all(s is not None and 0.4 < s < 0.4 + WANTED / 50.0 for s in socs)
    assert socs == sorted(socs)
    assert not [s for s in statuses() if s.event is StatusEvent.REFUSED]
