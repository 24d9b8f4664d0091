"""The CP Fleet as OCPP chargers (``--protocol ocpp1.6|ocpp2.0.1``) against the real OCPP
gateway, Central and broker: the chargers boot and become CPs ``X.1`` at Central, and driver
requests for them complete with the meter's energy, in both versions.

Central, the gateway and the fleet run in this process (their own ``run``), on topics with
a unique prefix; a probe publishes the driver requests and reads ``driver.updates``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from evcharging.apps.ev_central import main as central_main
from evcharging.apps.ev_fleet import main as fleet_main
from evcharging.apps.ev_ocpp import main as ocpp_main
from evcharging.common.config import (
    CentralSettings,
    CPEngineSettings,
    CPMonitorSettings,
    FleetSettings,
    OcppSettings,
)
from evcharging.common.kafka import KafkaBus, KafkaConfig, KafkaConsumerLoop, Routes
from evcharging.common.messages import (
    CentralCommand,
    CommandPayload,
    CommandType,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    new_id,
)
from evcharging.devtools.process import free_port
from tests.polling import poll

pytestmark = pytest.mark.integration

CHARGERS = 4
KW = 36.0
SESSION_SECONDS = 2.0


async def _up(client: httpx.AsyncClient, path: str, task: asyncio.Task[int], what: str
              ) -> None:
    async def ready() -> bool:
        if task.done():
            raise AssertionError(f"{what} exited with {task.result()}")
        return (await client.get(path)).status_code == 200

    await poll(ready, timeout=60, what=what, retry_on=(httpx.HTTPError,))


@pytest.fixture
async def network(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    """Central and the gateway on a unique topic prefix; yields their ports and a probe."""
    prefix = f"fleet-ocpp-{uuid.uuid4().hex[:8]}."
    stop = asyncio.Event()
    http_port, ws_port, gateway_http = free_port(), free_port(), free_port()
    central = asyncio.create_task(central_main.run(CentralSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, http_port=http_port,
        listen_port=free_port(), db_path=tmp_path / "central.db", group_id=f"c-{prefix}",
        start_timeout=20.0), stop))
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}")
    gateway: asyncio.Task[int] | None = None
    config = KafkaConfig(bootstrap=kafka_bootstrap, client_id="probe", topic_prefix=prefix)
    bus = KafkaBus(config)
    updates: dict[str, list[DriverUpdate]] = {}

    async def on_update(update: DriverUpdate) -> None:
        updates.setdefault(update.request_id, []).append(update)

    reader = KafkaConsumerLoop(config, Routes().add(DriverUpdate, on_update),
                               start_at="latest")
    reading: asyncio.Task[None] | None = None
    try:
        await _up(client, "/health", central, "Central's /health")
        gateway = asyncio.create_task(ocpp_main.run(OcppSettings(
            kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, ws_port=ws_port,
            http_port=gateway_http, central_port=http_port, central_host="127.0.0.1",
            call_timeout=5.0, status_interval=1.0, heartbeat_interval=2,
            state_file=tmp_path / "gateway.json"), stop))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway_http}") as gw:
            await _up(gw, "/health", gateway, "the gateway's /health")
        await bus.start()
        await reader.start()
        reading = asyncio.create_task(reader.run())
        yield {"prefix": prefix, "central": client, "url": f"ws://127.0.0.1:{ws_port}/ocpp/",
               "bus": bus, "updates": updates}
    finally:
        stop.set()
        codes = await asyncio.wait_for(
            asyncio.gather(central, *([gateway] if gateway else [])), 60)
        if reading is not None:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
        await reader.stop()
        await bus.stop()
        await client.aclose()
        assert all(code == 0 for code in codes), codes


@pytest.mark.parametrize("protocol", ["ocpp1.6", "ocpp2.0.1"])
async def test_an_ocpp_fleet_boots_and_its_driver_requests_complete(
    network: dict[str, object], protocol: str,
) -> None:
    central = network["central"]
    bus = network["bus"]
    updates = network["updates"]
    assert isinstance(central, httpx.AsyncClient) and isinstance(bus, KafkaBus)
    assert isinstance(updates, dict)
    id_prefix = f"F{uuid.uuid4().hex[:6]}-"
    fleet_port = free_port()
    first = f"{id_prefix}00001"
    config = fleet_main.FleetConfig(
        FleetSettings(cps=CHARGERS, id_prefix=id_prefix, http_port=fleet_port,
                      protocol=protocol, ocpp_url=str(network["url"])),
        CPEngineSettings(cp_id=first, kw_rate=KW, session_seconds=SESSION_SECONDS,
                         telemetry_interval=0.5),
        CPMonitorSettings(cp_id=first),
    )
    stop = asyncio.Event()
    fleet = asyncio.create_task(fleet_main.run(config, stop))
    cps = [f"{id_prefix}{i:05d}.1" for i in range(1, CHARGERS + 1)]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fleet_port}") as http:

            async def all_booted() -> dict[str, object] | None:
                if fleet.done():
                    raise AssertionError(f"the fleet exited with {fleet.result()}")
                health: dict[str, object] = (await http.get("/health")).json()
                return health if health["booted"] == CHARGERS else None

            health = await poll(all_booted, timeout=30, what="every charger booted",
                                retry_on=(httpx.HTTPError,))
            assert health["protocol"] == protocol and health["connected"] == CHARGERS

            async def activated() -> bool:
                rows = (await central.get("/cp", params={"limit": 1000})).json()
                states = {row["cp_id"]: row["state"] for row in rows}
                return all(states.get(cp) == "ACTIVATED" for cp in cps)

            await poll(activated, timeout=30, what="the fleet's CPs ACTIVATED at Central",
                       retry_on=(httpx.HTTPError,))
            row = (await central.get(f"/cp/{cps[0]}")).json()
            assert (row.get("protocol"), row.get("vendor"), row.get("model")) in (
                (protocol, "evcharging-fleet", "Fleet-CP"), (None, None, None))

            requests = {new_id(): cp for cp in cps[:2]}
            for request_id, cp in requests.items():
                await bus.publish(DriverRequest(request_id=request_id, driver_id="alice",
                                                cp_id=cp))

            def finals() -> dict[str, DriverUpdate] | None:
                found = {rid: next((u for u in updates.get(rid, []) if u.status.is_final),
                                   None) for rid in requests}
                done = {rid: u for rid, u in found.items() if u is not None}
                return done if len(done) == len(requests) else None

            done: dict[str, DriverUpdate] = await poll(
                finals, timeout=45, what="both requests final")
            for request_id, update in done.items():
                assert update.status is DriverStatus.COMPLETED, update
                assert update.cp_id == requests[request_id]
                # The meter: KW for SESSION_SECONDS (Wh rounded by the charger).
                assert update.kwh == pytest.approx(KW * SESSION_SECONDS / 3600, abs=0.002)
                seen = [u.status for u in updates[request_id]]
                assert DriverStatus.IN_PROGRESS in seen, seen

            health = (await http.get("/health")).json()
            assert health["sessions"] == {"started": 2, "ended": 2}
            trips = health["round_trips"]
            assert trips["BootNotification"]["count"] >= CHARGERS
            meter = "MeterValues" if protocol == "ocpp1.6" else "TransactionEvent"
            assert trips[meter]["count"] >= 2
            answered = health["answered"]
            start = ("RemoteStartTransaction" if protocol == "ocpp1.6"
                     else "RequestStartTransaction")
            assert answered[f"{start} ok"] == 2
    finally:
        stop.set()
        assert await asyncio.wait_for(fleet, 30) == 0


@pytest.mark.parametrize("protocol", ["ocpp1.6", "ocpp2.0.1"])
async def test_an_ocpp_fleet_charger_delivers_the_limit_of_set_limit(
    network: dict[str, object], protocol: str,
) -> None:
    """SPEC §8, §10: SET_LIMIT reaches the fleet's charger as SetChargingProfile; it
    delivers min(its rate, the limit) from then on, in power and in energy."""
    central, bus, updates = network["central"], network["bus"], network["updates"]
    assert isinstance(central, httpx.AsyncClient) and isinstance(bus, KafkaBus)
    assert isinstance(updates, dict)
    id_prefix = f"L{uuid.uuid4().hex[:6]}-"
    cp_id, seconds, limit = f"{id_prefix}00001.1", 8.0, 9.0
    config = fleet_main.FleetConfig(
        FleetSettings(cps=1, id_prefix=id_prefix, http_port=free_port(), protocol=protocol,
                      ocpp_url=str(network["url"])),
        CPEngineSettings(cp_id=f"{id_prefix}00001", kw_rate=KW, session_seconds=seconds,
                         telemetry_interval=0.5),
        CPMonitorSettings(cp_id=f"{id_prefix}00001"),
    )
    stop = asyncio.Event()
    fleet = asyncio.create_task(fleet_main.run(config, stop))
    try:
        async def activated() -> bool:
            if fleet.done():
                raise AssertionError(f"the fleet exited with {fleet.result()}")
            answer = await central.get(f"/cp/{cp_id}")
            return answer.status_code == 200 and answer.json()["state"] == "ACTIVATED"

        await poll(activated, timeout=30, what=f"{cp_id} ACTIVATED",
                   retry_on=(httpx.HTTPError,))
        request_id = new_id()
        await bus.publish(DriverRequest(request_id=request_id, driver_id="alice", cp_id=cp_id))

        def at(kw: float) -> DriverUpdate | None:
            return next((u for u in updates.get(request_id, [])
                         if u.status is DriverStatus.IN_PROGRESS and u.kw == pytest.approx(kw)
                         and u.session_id), None)

        def charged() -> DriverUpdate | None:
            # Some energy at the full rate first: a limit that lands within ~0.1 s of the
            # start (a fast gateway) left the meter's whole Wh at the limit's energy.
            return next((u for u in updates.get(request_id, [])
                         if u.status is DriverStatus.IN_PROGRESS and u.kw == pytest.approx(KW)
                         and (u.kwh or 0) >= 0.002 and u.session_id), None)

        running: DriverUpdate = await poll(charged, timeout=30,
                                           what="IN_PROGRESS at the charger's rate, 2 Wh in")
        assert running.session_id is not None
        await bus.publish(CentralCommand(cp_id=cp_id, cmd=CommandType.SET_LIMIT,
                                         payload=CommandPayload(kw=limit,
                                                                session_id=running.session_id)))
        await poll(lambda: at(limit), timeout=seconds, what="IN_PROGRESS at the limit")

        def final() -> DriverUpdate | None:
            return next((u for u in updates.get(request_id, []) if u.status.is_final), None)

        done: DriverUpdate = await poll(final, timeout=30, what="the final update")
        assert done.status is DriverStatus.COMPLETED and done.kwh is not None
        # Less than the whole session at its rate, more than the whole at the limit.
        assert limit * seconds / 3600 < done.kwh < KW * seconds / 3600 - 0.002
    finally:
        stop.set()
        assert await asyncio.wait_for(fleet, 30) == 0
