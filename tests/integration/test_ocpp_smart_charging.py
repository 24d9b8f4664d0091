"""Smart charging reaches OCPP chargers (SPEC §8, §10), end to end on the real broker.

Central's own ``run`` and the OCPP gateway's own ``run``, in this process on topics with a
unique prefix; a 1.6 charger and a 2.0.1 station played by the `ocpp` library over real
WebSockets. The gateway registers the charger's CP at the site by ``OCPP_SITE`` and the
station's by its line of ``OCPP_SITES_FILE`` (the same site here; the file winning over
``OCPP_SITE`` is unit-tested), and Central knows the site only from those registrations.
The operator sets the site's limit with ``PUT /sites/{site}/limit``: each charger receives a
SetChargingProfile (TxProfile, W, of its transaction) with its share as Central allocates
it, the first alone and then both when the second starts; ``DELETE`` clears both profiles
(ClearChargingProfile).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from ocpp.v16 import call
from websockets.typing import Subprotocol

from evcharging.apps.ev_central import main as central_main
from evcharging.apps.ev_ocpp import main as ocpp_main
from evcharging.common.config import CentralSettings, OcppSettings
from evcharging.common.kafka import KafkaBus, KafkaConfig, KafkaConsumerLoop, Routes
from evcharging.common.messages import DriverRequest, DriverStatus, DriverUpdate, new_id
from evcharging.devtools.process import free_port, tcp_accepts
from tests.integration.ocpp_helpers import assert_tx_profile_16, assert_tx_profile_201
from tests.integration.test_ocpp import OCPP16, Charger, Station, now
from tests.polling import poll

pytestmark = pytest.mark.integration

SITE = "site-O"
LIMIT_KW = 15.0


@dataclass
class Network:
    central: httpx.AsyncClient
    bus: KafkaBus
    ws_url: str
    charger_id: str
    station_id: str
    updates: dict[str, list[DriverUpdate]] = field(default_factory=dict)

    async def request(self, cp_id: str, driver_id: str) -> str:
        request_id = new_id()
        await self.bus.publish(DriverRequest(request_id=request_id, driver_id=driver_id,
                                             cp_id=cp_id))
        return request_id

    async def update(self, request_id: str, status: DriverStatus) -> DriverUpdate:
        found: DriverUpdate = await poll(
            lambda: next((u for u in self.updates.get(request_id, []) if u.status is status),
                         None),
            timeout=30, what=f"{request_id} {status.value}")
        return found

    async def state(self, cp_id: str, state: str) -> None:
        async def reached() -> bool:
            answer = await self.central.get(f"/cp/{cp_id}")
            return answer.status_code == 200 and answer.json()["state"] == state

        await poll(reached, timeout=30, what=f"{cp_id} {state} at Central",
                   retry_on=(httpx.HTTPError,))

    async def site(self) -> dict[str, Any]:
        sites = (await self.central.get("/sites")).json()
        row: dict[str, Any] = next(s for s in sites if s["site"] == SITE)
        return row


@pytest.fixture
async def network(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[Network]:
    """Central, a probe of driver.updates and a gateway whose chargers are at SITE."""
    prefix = f"ocpp-smart-{uuid.uuid4().hex[:8]}."
    http_port = free_port()
    stop = asyncio.Event()
    central_settings = CentralSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, http_port=http_port,
        listen_port=free_port(), db_path=tmp_path / "central.db", group_id=f"central-{prefix}",
        start_timeout=20.0, allocation_interval=1.0,
    )
    charger_id, station_id = (f"{kind}-{uuid.uuid4().hex[:6]}" for kind in ("CH", "ST"))
    sites_file = tmp_path / "sites.txt"
    sites_file.write_text(f"# the 2.0.1 station\n{station_id}:{SITE}\n", encoding="utf-8")
    ws_port = free_port()
    gateway_settings = OcppSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, ws_port=ws_port,
        http_port=free_port(), central_host="127.0.0.1", central_port=http_port,
        call_timeout=5.0, status_interval=1.0, state_file=tmp_path / "ocpp_state.json",
        site=SITE, sites_file=sites_file,
    )
    runs = [asyncio.create_task(central_main.run(central_settings, stop)),
            asyncio.create_task(ocpp_main.run(gateway_settings, stop))]
    config = KafkaConfig(bootstrap=kafka_bootstrap, client_id="probe", topic_prefix=prefix)
    bus = KafkaBus(config)
    await bus.start()
    probe = Network(httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}"), bus,
                    f"ws://127.0.0.1:{ws_port}/ocpp/", charger_id, station_id)

    async def on_update(update: DriverUpdate) -> None:
        probe.updates.setdefault(update.request_id, []).append(update)

    reader = KafkaConsumerLoop(config, Routes().add(DriverUpdate, on_update),
                               start_at="latest")
    await reader.start()
    reading = asyncio.create_task(reader.run())

    async def up() -> bool:
        for run in runs:
            if run.done():
                raise AssertionError(f"a service exited with {run.result()}")
        return ((await probe.central.get("/health")).status_code == 200
                and tcp_accepts("127.0.0.1", ws_port, 0.5))  # the gateway listens too

    try:
        await poll(up, timeout=60, what="Central's /health and the gateway's port",
                   retry_on=(httpx.HTTPError,))
        yield probe
    finally:
        stop.set()
        codes = await asyncio.wait_for(asyncio.gather(*runs), 30)
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await reader.stop()
        await bus.stop()
        await probe.central.aclose()
        assert codes == [0, 0]


async def test_a_site_limit_reaches_ocpp_chargers_as_their_charging_profiles(
    network: Network,
) -> None:
    ws16 = await websockets.connect(network.ws_url + network.charger_id, subprotocols=OCPP16)
    ws201 = await websockets.connect(network.ws_url + network.station_id,
                                     subprotocols=[Subprotocol("ocpp2.0.1")])
    charger, station = Charger(network.charger_id, ws16), Station(network.station_id, ws201)
    serving = [asyncio.create_task(charger.start()), asyncio.create_task(station.start())]
    cp16, cp201 = f"{network.charger_id}.1", f"{network.station_id}.1"
    try:
        await charger.boot()
        await charger.status(1, "Available")
        await station.boot()
        await network.state(cp16, "ACTIVATED")
        await network.state(cp201, "ACTIVATED")

        async def at_the_site() -> bool:  # the registrations carried the site
            listed = (await network.central.get("/cp", params={"site": SITE})).json()
            return sorted(cp["cp_id"] for cp in listed) == sorted([cp16, cp201])

        await poll(at_the_site, timeout=30, what=f"both CPs at {SITE}",
                   retry_on=(httpx.HTTPError,))
        answer = await network.central.put(f"/sites/{SITE}/limit", json={"kw": LIMIT_KW})
        assert answer.status_code == 200, answer.text

        # The 1.6 charger's session alone: the whole limit, as a TxProfile of its transaction.
        first = await network.request(cp16, "olga")
        assert await asyncio.wait_for(charger.remote_starts.get(), 30) == ("olga", 1)
        started = await charger.call(call.StartTransaction(
            connector_id=1, id_tag="olga", meter_start=0, timestamp=now()))
        await network.state(cp16, "SUPPLYING")
        connector, profile = await asyncio.wait_for(charger.profiles.get(), 30)
        assert connector == 1
        assert_tx_profile_16(profile, started.transaction_id, 15_000)

        # The 2.0.1 station's session starts: equal shares, each told its own.
        second = await network.request(cp201, "pablo")
        token, remote_id, evse = await asyncio.wait_for(station.remote_starts.get(), 30)
        assert (token, evse) == ("pablo", 1)
        tx = f"tx-{uuid.uuid4().hex[:8]}"
        await station.event("Started", 0, tx, 0.0, trigger_reason="RemoteStart",
                            info={"remote_start_id": remote_id},
                            evse={"id": 1, "connector_id": 1},
                            id_token={"id_token": "pablo", "type": "Central"})
        await network.state(cp201, "SUPPLYING")
        evse_id, profile201 = await asyncio.wait_for(station.profiles.get(), 30)
        assert evse_id == 1
        assert_tx_profile_201(profile201, tx, 7_500)
        connector, profile = await asyncio.wait_for(charger.profiles.get(), 30)
        assert (connector, profile["transaction_id"]) == (1, started.transaction_id)
        assert profile["charging_schedule"]["charging_schedule_period"] == [
            {"start_period": 0, "limit": 7_500}]
        site = await network.site()
        assert (site["limit_kw"], site["allocated_kw"], site["cps"], site["supplying"]) == (
            LIMIT_KW, pytest.approx(LIMIT_KW), 2, 2)

        # No limit: both profiles are cleared, and nothing else was sent meanwhile.
        answer = await network.central.delete(f"/sites/{SITE}/limit")
        assert answer.status_code == 200, answer.text
        assert await asyncio.wait_for(charger.clears.get(), 30) == {"id": 9001}
        assert await asyncio.wait_for(station.clears.get(), 30) == {"charging_profile_id": 9001}
        assert charger.profiles.empty() and station.profiles.empty()

        await charger.call(call.StopTransaction(meter_stop=2_000, timestamp=now(),
                                                transaction_id=started.transaction_id))
        await station.event("Ended", 1, tx, 1_000.0, trigger_reason="EVDeparted",
                            info={"stopped_reason": "EVDisconnected"})
        assert (await network.update(first, DriverStatus.COMPLETED)).kwh == pytest.approx(2.0)
        assert (await network.update(second, DriverStatus.COMPLETED)).kwh == pytest.approx(1.0)
    finally:
        await ws16.close()
        await ws201.close()
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
