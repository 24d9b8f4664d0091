"""The OCPP gateway on the real broker, with Central's own ``run`` and chargers played by
the mobilityhouse `ocpp` library's ``ChargePoint`` over real WebSockets (SPEC §8).

Central and the gateways run in this process on topics with a unique prefix (only the
broker is shared). A probe reads ``cp.status`` and ``driver.updates`` to see what the
gateway published and what the driver got.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call, call_result
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as call_result201
from websockets.asyncio.client import ClientConnection
from websockets.typing import Subprotocol

from evcharging.apps.ev_central import main as central_main
from evcharging.apps.ev_ocpp import main as ocpp_main
from evcharging.common.config import CentralSettings, OcppSettings
from evcharging.common.kafka import KafkaBus, KafkaConfig, KafkaConsumerLoop, Routes
from evcharging.common.messages import (
    CentralCommand,
    CommandPayload,
    CommandType,
    CPStatus,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    StatusEvent,
    new_id,
)
from evcharging.common.states import CPState, SessionResult
from evcharging.devtools.process import free_port
from tests.integration.ocpp_helpers import assert_tx_profile_16, assert_tx_profile_201
from tests.polling import poll

pytestmark = pytest.mark.integration

EURO_RATE = 0.30
OCPP16 = [Subprotocol("ocpp1.6")]


@dataclass
class System:
    prefix: str
    bootstrap: str
    central: httpx.AsyncClient
    bus: KafkaBus
    updates: dict[str, list[DriverUpdate]] = field(default_factory=dict)
    statuses: list[CPStatus] = field(default_factory=list)

    async def cp_state(self, cp_id: str) -> str | None:
        answer = await self.central.get(f"/cp/{cp_id}")
        return str(answer.json()["state"]) if answer.status_code == 200 else None

    async def wait_state(self, cp_id: str, state: CPState, timeout: float = 30.0) -> None:
        async def reached() -> bool:
            return await self.cp_state(cp_id) == state.value

        await poll(reached, timeout=timeout, what=f"{cp_id} {state.value} at Central",
                   retry_on=(httpx.HTTPError,))

    def of(self, cp_id: str) -> list[CPStatus]:
        return [s for s in self.statuses if s.cp_id == cp_id]


@pytest.fixture(scope="module")
async def system(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[System]:
    prefix = f"ocpp-{uuid.uuid4().hex[:8]}."
    http_port = free_port()
    stop = asyncio.Event()
    settings = CentralSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, http_port=http_port,
        listen_port=free_port(), db_path=tmp_path_factory.mktemp("ocpp") / "central.db",
        group_id=f"central-{prefix}", start_timeout=20.0,
    )
    central = asyncio.create_task(central_main.run(settings, stop))
    config = KafkaConfig(bootstrap=kafka_bootstrap, client_id="probe", topic_prefix=prefix)
    bus = KafkaBus(config)
    await bus.start()
    probe = System(prefix, kafka_bootstrap,
                   httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}"), bus)

    async def on_update(update: DriverUpdate) -> None:
        probe.updates.setdefault(update.request_id, []).append(update)

    async def on_status(status: CPStatus) -> None:
        probe.statuses.append(status)

    reader = KafkaConsumerLoop(
        config, Routes().add(DriverUpdate, on_update).add(CPStatus, on_status),
        start_at="latest",
    )
    await reader.start()
    reading = asyncio.create_task(reader.run())

    async def central_up() -> bool:
        return (await probe.central.get("/health")).status_code == 200

    try:
        await poll(central_up, timeout=60, what="Central's /health",
                   retry_on=(httpx.HTTPError,))
        yield probe
    finally:
        stop.set()
        code = await asyncio.wait_for(central, 30)
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await reader.stop()
        await bus.stop()
        await probe.central.aclose()
        assert code == 0


@dataclass
class Gateway:
    ws_url: str
    http: httpx.AsyncClient
    stopping: asyncio.Event
    run: asyncio.Task[int]

    async def stop(self) -> None:
        self.stopping.set()
        assert await asyncio.wait_for(self.run, 30) == 0

    async def metric(self, name: str) -> float:
        text = (await self.http.get("/metrics")).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(system: System, tmp_path: Path) -> AsyncIterator[StartGateway]:
    runs: list[asyncio.Task[int]] = []
    clients: list[httpx.AsyncClient] = []

    async def start(**overrides: Any) -> Gateway:
        ws_port, http_port = free_port(), free_port()
        overrides.setdefault("state_file", tmp_path / f"state-{len(runs)}.json")
        stopping = asyncio.Event()
        central_port = int(str(system.central.base_url).rsplit(":", 1)[1].rstrip("/"))
        settings = OcppSettings(**{
            "kafka_bootstrap": system.bootstrap, "topic_prefix": system.prefix,
            "ws_port": ws_port, "http_port": http_port, "central_port": central_port,
            "central_host": "127.0.0.1", "call_timeout": 5.0, "status_interval": 1.0,
            "euro_rate": EURO_RATE, "decision_timeout": 15.0, **overrides,
        })
        runs.append(asyncio.create_task(ocpp_main.run(settings, stopping)))
        stops.append(stopping)
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}")
        clients.append(http)

        async def up() -> bool:
            if runs[-1].done():
                raise AssertionError(f"the gateway exited with {runs[-1].result()}")
            return (await http.get("/health")).status_code == 200

        await poll(up, timeout=60, what="the gateway's /health", retry_on=(httpx.HTTPError,))
        scheme = "wss" if "tls_cert" in overrides else "ws"
        return Gateway(f"{scheme}://127.0.0.1:{ws_port}/ocpp/", http, stopping, runs[-1])

    stops: list[asyncio.Event] = []
    try:
        yield start
    finally:
        for stopping in stops:
            stopping.set()
        codes = await asyncio.wait_for(asyncio.gather(*runs), 30)
        for client in clients:
            await client.aclose()
        assert all(code == 0 for code in codes), codes


# ----------------------------------------------------------------------------- chargers


class Charger(ChargePoint16):  # type: ignore[misc]
    """A 1.6 charger played by the `ocpp` library: it accepts what the gateway asks and
    tells the test through queues."""

    def __init__(self, charger_id: str, connection: ClientConnection) -> None:
        super().__init__(charger_id, connection)
        self.remote_starts: asyncio.Queue[tuple[str, int | None]] = asyncio.Queue()
        self.remote_stops: asyncio.Queue[int] = asyncio.Queue()
        self.availability: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self.profiles: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
        self.clears: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.answer = "Accepted"
        self.profile_answer = "Accepted"
        self.delay = 0.0

    @on("RemoteStartTransaction")
    async def on_remote_start(self, id_tag: str, connector_id: int | None = None,
                              **_: Any) -> Any:
        self.remote_starts.put_nowait((id_tag, connector_id))
        await asyncio.sleep(self.delay)  # a slow charger
        return call_result.RemoteStartTransaction(status=self.answer)

    @on("RemoteStopTransaction")
    async def on_remote_stop(self, transaction_id: int, **_: Any) -> Any:
        self.remote_stops.put_nowait(transaction_id)
        return call_result.RemoteStopTransaction(status=self.answer)

    @on("ChangeAvailability")
    async def on_change_availability(self, connector_id: int, type: str, **_: Any) -> Any:
        self.availability.put_nowait((connector_id, type))
        return call_result.ChangeAvailability(status=self.answer)

    @on("SetChargingProfile")
    async def on_set_charging_profile(self, connector_id: int,
                                      cs_charging_profiles: dict[str, Any]) -> Any:
        self.profiles.put_nowait((connector_id, cs_charging_profiles))
        return call_result.SetChargingProfile(status=self.profile_answer)

    @on("ClearChargingProfile")
    async def on_clear_charging_profile(self, **fields: Any) -> Any:
        self.clears.put_nowait(fields)
        return call_result.ClearChargingProfile(status="Accepted")

    async def boot(self) -> None:
        answer = await self.call(call.BootNotification(
            charge_point_model="Test-22", charge_point_vendor="evcharging-tests"))
        assert answer.status == "Accepted" and answer.interval == 60

    async def status(self, connector: int, status: str, error: str = "NoError",
                     info: str | None = None) -> None:
        await self.call(call.StatusNotification(connector_id=connector, error_code=error,
                                                status=status, info=info))


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Awaitable[Charger]]]:
    opened: list[tuple[ClientConnection, asyncio.Task[None]]] = []

    async def open_charger(url: str, charger_id: str, **kwargs: Any) -> Charger:
        ws = await websockets.connect(url + charger_id, subprotocols=OCPP16, **kwargs)
        charger = Charger(charger_id, ws)
        opened.append((ws, asyncio.create_task(charger.start())))
        return charger

    yield open_charger
    for ws, task in opened:
        await ws.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def charger_id() -> str:
    return f"CH-{uuid.uuid4().hex[:6]}"


async def ready(system: System, gateway: Gateway,
                connect: Callable[..., Awaitable[Charger]]) -> tuple[Charger, str]:
    """A booted charger whose connector 1 is ACTIVATED at Central; it and its CP id."""
    cid = charger_id()
    charger = await connect(gateway.ws_url, cid)
    await charger.boot()
    await charger.status(1, "Available")
    await system.wait_state(f"{cid}.1", CPState.ACTIVATED)
    return charger, f"{cid}.1"


async def request(system: System, cp_id: str, driver_id: str) -> str:
    request_id = new_id()
    await system.bus.publish(DriverRequest(request_id=request_id, driver_id=driver_id,
                                           cp_id=cp_id))
    return request_id


async def remote_started(system: System, charger: Charger, cp_id: str, id_tag: str,
                         meter_start: int = 0) -> tuple[str, Any]:
    """`id_tag` requests `cp_id`; `charger` gets the remote start and starts its transaction.

    The request id and the StartTransaction answer.
    """
    request_id = await request(system, cp_id, id_tag)
    await asyncio.wait_for(charger.remote_starts.get(), 30)
    started = await charger.call(call.StartTransaction(
        connector_id=1, id_tag=id_tag, meter_start=meter_start, timestamp=now()))
    return request_id, started


async def final_update(system: System, request_id: str) -> DriverUpdate:
    def final() -> DriverUpdate | None:
        return next((u for u in system.updates.get(request_id, []) if u.status.is_final),
                    None)

    found: DriverUpdate = await poll(final, timeout=30, what=f"{request_id}'s final update")
    return found


# ----------------------------------------------------------------------------- connection


async def test_handshake_refusals_unknown_path_charger_and_password(
    start_gateway: StartGateway, tmp_path: Path, connect: Callable[..., Awaitable[Charger]],
) -> None:
    passwords = tmp_path / "passwords"
    passwords.write_text("CH-AUTH:open-sesame\n")
    gateway = await start_gateway(passwords_file=passwords)
    cases = [
        (gateway.ws_url.replace("/ocpp/", "/nope/") + "CH-AUTH", {}, 404),
        (gateway.ws_url + "bad%20id", {}, 404),
        (gateway.ws_url + "CH-STRANGER", basic("CH-STRANGER", "x"), 404),
        (gateway.ws_url + "CH-AUTH", {}, 401),
        (gateway.ws_url + "CH-AUTH", basic("CH-AUTH", "wrong"), 401),
        (gateway.ws_url + "CH-AUTH", basic("CH-OTHER", "open-sesame"), 401),
    ]
    for url, headers, code in cases:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url, subprotocols=OCPP16, additional_headers=headers)
        assert refused.value.response.status_code == code, url
        if code == 401:
            assert refused.value.response.headers["WWW-Authenticate"].startswith("Basic")
    charger = await connect(gateway.ws_url, "CH-AUTH",
                            additional_headers=basic("CH-AUTH", "open-sesame"))
    await charger.boot()
    assert await gateway.metric("evcharging_ocpp_handshakes_refused_total") == len(cases)
    assert await gateway.metric('evcharging_ocpp_chargers{protocol="ocpp1.6"}') == 1


async def test_no_shared_subprotocol_gets_the_handshake_then_is_closed(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway()
    async with websockets.connect(gateway.ws_url + "CH-OLD",
                                  subprotocols=[Subprotocol("ocpp1.5")]) as ws:
        assert ws.subprotocol is None
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1002
    async with websockets.connect(gateway.ws_url + "CH-NONE") as ws:  # offers none at all
        assert ws.subprotocol is None
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)


async def test_tls_only_wss(
    start_gateway: StartGateway, tmp_path: Path, connect: Callable[..., Awaitable[Charger]],
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    gateway = await start_gateway(tls_cert=cert, tls_key=key)
    context = ssl.create_default_context(cafile=str(cert))
    charger = await connect(gateway.ws_url, "CH-TLS", ssl=context)
    await charger.boot()
    with pytest.raises((websockets.InvalidMessage, OSError, EOFError)):
        plain = gateway.ws_url.replace("wss://", "ws://")
        await asyncio.wait_for(websockets.connect(plain + "CH-TLS", subprotocols=OCPP16), 10)


# ----------------------------------------------------------------------------- errors


async def test_callerrors_leave_the_connection_up(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    async with websockets.connect(gateway.ws_url + "CH-ERR", subprotocols=OCPP16) as ws:

        async def exchange(message: list[Any]) -> list[Any]:
            await ws.send(json.dumps(message))
            answer: list[Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert answer[1] == message[1]
            return answer

        unknown = await exchange([2, "1", "FlyToTheMoon", {}])
        assert unknown[:3] == [4, "1", "NotImplemented"]
        unhandled = await exchange([2, "2", "DataTransfer", {"vendorId": "x"}])
        assert unhandled[:3] == [4, "2", "NotSupported"]
        missing = await exchange([2, "3", "BootNotification", {"chargePointVendor": "v"}])
        assert missing[:3] == [4, "3", "OccurenceConstraintViolation"]
        wrong_type = await exchange([2, "4", "StatusNotification", {
            "connectorId": "one", "errorCode": "NoError", "status": "Available"}])
        assert wrong_type[:3] == [4, "4", "TypeConstraintViolation"]
        bad_value = await exchange([2, "5", "StatusNotification", {
            "connectorId": 1, "errorCode": "NoError", "status": "Exploded"}])
        assert bad_value[:3] == [4, "5", "PropertyConstraintViolation"]
        extra = await exchange([2, "6", "Heartbeat", {"surprise": 1}])
        assert extra[:3] == [4, "6", "FormationViolation"]
        no_connector = await exchange([2, "6a", "StartTransaction", {
            "connectorId": 0, "idTag": "x", "meterStart": 0, "timestamp": now()}])
        assert no_connector[:3] == [4, "6a", "PropertyConstraintViolation"]
        too_far = await exchange([2, "6b", "StatusNotification", {
            "connectorId": 5000, "errorCode": "NoError", "status": "Available"}])
        assert too_far[:3] == [4, "6b", "PropertyConstraintViolation"]
        alive = await exchange([2, "7", "Heartbeat", {}])
        assert alive[0] == 3 and "currentTime" in alive[2]
    assert await gateway.metric(
        'evcharging_ocpp_messages_total{action="unknown",direction="in",'
        'result="NotImplemented"}') == 1


# ----------------------------------------------------------------------------- sessions


async def test_a_remote_start_from_a_driver_request_to_completed_with_the_meters_kwh(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    gateway = await start_gateway()
    charger, cp_id = await ready(system, gateway, connect)

    request_id = new_id()
    await system.bus.publish(DriverRequest(request_id=request_id, driver_id="alice",
                                           cp_id=cp_id))
    id_tag, connector = await asyncio.wait_for(charger.remote_starts.get(), 30)
    assert (id_tag, connector) == ("alice", 1)
    started = await charger.call(call.StartTransaction(
        connector_id=1, id_tag="alice", meter_start=10_000, timestamp=now()))
    assert started.id_tag_info["status"] == "Accepted"
    await charger.status(1, "Charging")
    await charger.call(call.MeterValues(connector_id=1, transaction_id=started.transaction_id,
                                        meter_value=[{"timestamp": now(), "sampledValue": [
                                            {"value": "15000", "unit": "Wh"},
                                            {"value": "11", "unit": "kW",
                                             "measurand": "Power.Active.Import"}]}]))

    def in_progress() -> DriverUpdate | None:
        return next((u for u in system.updates.get(request_id, [])
                     if u.status is DriverStatus.IN_PROGRESS and u.kwh), None)

    update: DriverUpdate = await poll(in_progress, timeout=30, what="IN_PROGRESS with kWh")
    assert update.kwh == pytest.approx(5.0) and update.kw == pytest.approx(11.0)
    assert update.euros == pytest.approx(5.0 * EURO_RATE)

    await charger.call(call.StopTransaction(meter_stop=17_500, timestamp=now(),
                                            transaction_id=started.transaction_id,
                                            reason="EVDisconnected"))
    await charger.status(1, "Finishing")

    def final() -> DriverUpdate | None:
        return next((u for u in system.updates.get(request_id, []) if u.status.is_final),
                    None)

    done: DriverUpdate = await poll(final, timeout=30, what="the final update")
    assert done.status is DriverStatus.COMPLETED, done
    assert done.kwh == pytest.approx(7.5) and done.euros == pytest.approx(7.5 * EURO_RATE)
    await system.wait_state(cp_id, CPState.ACTIVATED)


async def test_a_rejected_remote_start_is_refused_and_the_driver_gets_failed(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    gateway = await start_gateway()
    charger, cp_id = await ready(system, gateway, connect)
    charger.answer = "Rejected"
    request_id = new_id()
    await system.bus.publish(DriverRequest(request_id=request_id, driver_id="bob",
                                           cp_id=cp_id))

    def final() -> DriverUpdate | None:
        return next((u for u in system.updates.get(request_id, []) if u.status.is_final),
                    None)

    done: DriverUpdate = await poll(final, timeout=30, what="the final update")
    assert done.status is DriverStatus.FAILED
    refused = [s for s in system.of(cp_id) if s.event is StatusEvent.REFUSED]
    assert refused and refused[0].cmd is not None and refused[0].cmd.value == "START_SUPPLY"


async def test_a_replayed_start_gets_the_same_transaction_and_no_second_session(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    gateway = await start_gateway()
    charger, cp_id = await ready(system, gateway, connect)
    for tag, status in (("carol", "Accepted"), ("not a driver", "Invalid")):
        assert (await charger.call(call.Authorize(id_tag=tag))).id_tag_info["status"] == status
    refused = await charger.call(call.StartTransaction(
        connector_id=1, id_tag="bad tag", meter_start=0, timestamp=now()))
    assert refused.id_tag_info["status"] == "Invalid"
    start = call.StartTransaction(connector_id=1, id_tag="carol", meter_start=500,
                                  timestamp="2026-12-07T09:00:00Z")
    first = await charger.call(start)
    again = await charger.call(start)
    assert first.transaction_id == again.transaction_id

    def starts() -> list[CPStatus]:
        return [s for s in system.of(cp_id) if s.event is StatusEvent.START_SUPPLY]

    (status,) = await poll(starts, timeout=30, what="the start status")
    assert status.driver_id == "carol" and status.state is CPState.SUPPLYING
    # An offline transaction is dated by the charger's own clock.
    assert status.ts.isoformat().startswith("2026-12-07T09:00:00")
    # Central records the charger's own session as carol's, with no request, and bills
    # it by the meter when the charger stops it (SPEC §8).
    await charger.call(call.StopTransaction(
        meter_stop=7500, timestamp="2026-12-07T09:30:00Z", transaction_id=first.transaction_id,
        id_tag="carol"))

    async def billed() -> dict[str, object] | None:
        answer = await system.central.get("/sessions", params={"limit": 200})
        rows = [r for r in answer.json() if r["session_id"] == status.session_id]
        return rows[0] if rows and rows[0]["status"] != "ACTIVE" else None

    row = await poll(billed, timeout=30, what="the charger's session billed",
                     retry_on=(httpx.HTTPError,))
    assert (row["status"], row["driver_id"], row["kwh"]) == ("COMPLETED", "carol", 7.0)
    assert charger.remote_stops.empty()  # Central did not stop it
    assert len(starts()) == 1
    # Its id tag was answered with Central's verdict, not for want of one.
    assert await gateway.metric('evcharging_ocpp_charger_starts_total{verdict="accepted"}') == 1


async def test_a_stop_for_an_unknown_transaction_is_answered_and_counted(
    start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    gateway = await start_gateway()
    charger = await connect(gateway.ws_url, charger_id())
    await charger.boot()
    for tx in (-1, 123456):
        answer = await charger.call(call.StopTransaction(
            meter_stop=0, timestamp=now(), transaction_id=tx, id_tag="dave"))
        assert answer.id_tag_info["status"] == "Accepted"
    assert await gateway.metric("evcharging_ocpp_unknown_transactions_total") == 2


async def test_a_faulted_connector_is_a_faulty_cp_and_recovers(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    gateway = await start_gateway()
    cid = charger_id()
    charger = await connect(gateway.ws_url, cid)
    await charger.boot()
    await charger.status(1, "Available")
    await charger.status(2, "Available")
    await system.wait_state(f"{cid}.2", CPState.ACTIVATED)
    await charger.status(1, "Faulted", error="GroundFailure", info="earth leak")
    await system.wait_state(f"{cid}.1", CPState.FAULT)
    fault = next(s for s in system.of(f"{cid}.1") if s.state is CPState.FAULT)
    assert fault.event is StatusEvent.FAULT and fault.reason == "GroundFailure: earth leak"
    assert await system.cp_state(f"{cid}.2") == "ACTIVATED"
    await charger.status(1, "Available")
    await system.wait_state(f"{cid}.1", CPState.ACTIVATED)
    # Connector 0 speaks for every connector.
    await charger.status(0, "Unavailable")
    await system.wait_state(f"{cid}.1", CPState.STOPPED)
    await system.wait_state(f"{cid}.2", CPState.STOPPED)


async def test_operator_stop_resume_shutdown_and_a_closed_connection(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    gateway = await start_gateway()
    charger, cp_id = await ready(system, gateway, connect)

    assert (await system.central.post(f"/cp/{cp_id}/stop")).status_code == 200
    assert await asyncio.wait_for(charger.availability.get(), 30) == (1, "Inoperative")
    await system.wait_state(cp_id, CPState.STOPPED)
    assert (await system.central.post(f"/cp/{cp_id}/resume")).status_code == 200
    assert await asyncio.wait_for(charger.availability.get(), 30) == (1, "Operative")
    await system.wait_state(cp_id, CPState.ACTIVATED)

    await system.bus.publish(CentralCommand(cp_id=cp_id, cmd=CommandType.SHUTDOWN))

    def refused() -> list[CPStatus]:
        return [s for s in system.of(cp_id) if s.event is StatusEvent.REFUSED]

    (status,) = await poll(refused, timeout=30, what="the refused SHUTDOWN")
    assert status.cmd is CommandType.SHUTDOWN

    await charger._connection.close()
    await system.wait_state(cp_id, CPState.DISCONNECTED)


# ----------------------------------------------------------------------------- more sessions


async def test_a_silent_charger_times_out_refused_and_delays_no_other(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    gateway = await start_gateway()
    slow, slow_cp = await ready(system, gateway, connect)
    fast, fast_cp = await ready(system, gateway, connect)
    slow.delay = 8.0  # past the gateway's call_timeout of 5 s
    slow_request = await request(system, slow_cp, "erin")
    await asyncio.wait_for(slow.remote_starts.get(), 30)
    fast_request = await request(system, fast_cp, "frank")
    await asyncio.wait_for(fast.remote_starts.get(), 3)  # while the slow one still hangs
    done = await final_update(system, slow_request)
    assert done.status is DriverStatus.FAILED
    refused = [s for s in system.of(slow_cp) if s.event is StatusEvent.REFUSED]
    assert refused and "no answer within 5 s" in (refused[0].reason or "")
    assert await gateway.metric('evcharging_ocpp_messages_total{action="RemoteStartTransaction"'
                                ',direction="out",result="timeout"}') == 1
    assert fast_request in system.updates


async def test_an_operator_stop_in_mid_session_ends_it_stopped_with_the_meter(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    gateway = await start_gateway()
    charger, cp_id = await ready(system, gateway, connect)
    request_id, started = await remote_started(system, charger, cp_id, "grace")
    await charger.status(1, "Charging")
    await system.wait_state(cp_id, CPState.SUPPLYING)

    assert (await system.central.post(f"/cp/{cp_id}/stop")).status_code == 200
    assert await asyncio.wait_for(charger.remote_stops.get(), 30) == started.transaction_id
    assert await asyncio.wait_for(charger.availability.get(), 30) == (1, "Inoperative")
    await charger.call(call.StopTransaction(meter_stop=2_000, timestamp=now(),
                                            transaction_id=started.transaction_id,
                                            reason="Remote"))
    await charger.status(1, "Unavailable")
    done = await final_update(system, request_id)
    assert done.status is DriverStatus.FAILED and done.kwh == pytest.approx(2.0)
    end = next(s for s in system.of(cp_id) if s.session_result is not None)
    assert end.session_result is SessionResult.STOPPED and end.state is CPState.STOPPED
    await system.wait_state(cp_id, CPState.STOPPED)


async def test_a_charger_offline_in_mid_session_settles_its_queued_stop_when_back(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    gateway = await start_gateway()
    charger, cp_id = await ready(system, gateway, connect)
    cid = cp_id.rsplit(".", 1)[0]
    request_id, started = await remote_started(system, charger, cp_id, "heidi", 1_000)
    await system.wait_state(cp_id, CPState.SUPPLYING)
    await charger._connection.close()  # offline: the session stays open
    await poll(lambda: any(s.event is StatusEvent.HEARTBEAT and s.session_id
                           for s in system.of(cp_id)[-3:]),
               timeout=10, what="heartbeats of the open session while offline")
    assert await system.cp_state(cp_id) == "SUPPLYING"
    back = await connect(gateway.ws_url, cid)
    await back.boot()
    await back.call(call.StopTransaction(meter_stop=4_000, timestamp=now(),
                                         transaction_id=started.transaction_id,
                                         reason="EVDisconnected"))
    await back.status(1, "Available")
    done = await final_update(system, request_id)
    assert done.status is DriverStatus.COMPLETED and done.kwh == pytest.approx(3.0)


async def test_a_charger_back_available_without_the_stop_fails_the_session_at_its_meter(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    gateway = await start_gateway()
    charger, cp_id = await ready(system, gateway, connect)
    cid = cp_id.rsplit(".", 1)[0]
    request_id, started = await remote_started(system, charger, cp_id, "ivan")
    await charger.call(call.MeterValues(connector_id=1, transaction_id=started.transaction_id,
                                        meter_value=[{"timestamp": now(), "sampledValue": [
                                            {"value": "1.25", "unit": "kWh"}]}]))
    await charger._connection.close()
    back = await connect(gateway.ws_url, cid)
    await back.boot()
    await back.status(1, "Available")
    done = await final_update(system, request_id)
    assert done.status is DriverStatus.FAILED and done.kwh == pytest.approx(1.25)


# ----------------------------------------------------------------------------- OCPP 2.0.1


class Station(ChargePoint201):  # type: ignore[misc]
    """A 2.0.1 charging station played by the `ocpp` library."""

    def __init__(self, station_id: str, connection: ClientConnection) -> None:
        super().__init__(station_id, connection)
        self.remote_starts: asyncio.Queue[tuple[str, int, int | None]] = asyncio.Queue()
        self.remote_stops: asyncio.Queue[str] = asyncio.Queue()
        self.availability: asyncio.Queue[str] = asyncio.Queue()
        self.profiles: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
        self.clears: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.profile_answer = "Accepted"

    @on("RequestStartTransaction")
    async def on_request_start(self, id_token: dict[str, str], remote_start_id: int,
                               evse_id: int | None = None, **_: Any) -> Any:
        self.remote_starts.put_nowait((id_token["id_token"], remote_start_id, evse_id))
        return call_result201.RequestStartTransaction(status="Accepted")

    @on("RequestStopTransaction")
    async def on_request_stop(self, transaction_id: str, **_: Any) -> Any:
        self.remote_stops.put_nowait(transaction_id)
        return call_result201.RequestStopTransaction(status="Accepted")

    @on("ChangeAvailability")
    async def on_change_availability(self, operational_status: str, **_: Any) -> Any:
        self.availability.put_nowait(operational_status)
        return call_result201.ChangeAvailability(status="Accepted")

    @on("SetChargingProfile")
    async def on_set_charging_profile(self, evse_id: int, charging_profile: dict[str, Any],
                                      **_: Any) -> Any:
        self.profiles.put_nowait((evse_id, charging_profile))
        return call_result201.SetChargingProfile(status=self.profile_answer)

    @on("ClearChargingProfile")
    async def on_clear_charging_profile(self, **fields: Any) -> Any:
        self.clears.put_nowait(fields)
        return call_result201.ClearChargingProfile(status="Accepted")

    async def boot(self, evses: int = 1) -> None:
        """BootNotification, then EVSEs 1 to `evses` Available."""
        answer = await self.call(call201.BootNotification(
            charging_station={"model": "T-201", "vendor_name": "tests"}, reason="PowerUp"))
        assert answer.status == "Accepted"
        for evse in range(1, evses + 1):
            await self.call(call201.StatusNotification(
                timestamp=now(), connector_status="Available", evse_id=evse, connector_id=1))

    async def event(self, event_type: str, seq_no: int, tx: str, wh: float | None = None,
                    **extra: Any) -> Any:
        meter = ([{"timestamp": now(), "sampled_value": [{
            "value": wh, "measurand": "Energy.Active.Import.Register",
            "unit_of_measure": {"unit": "Wh"}}]}] if wh is not None else None)
        return await self.call(call201.TransactionEvent(
            event_type=event_type, timestamp=now(), seq_no=seq_no,
            trigger_reason=extra.pop("trigger_reason", "MeterValuePeriodic"),
            transaction_info={"transaction_id": tx, **extra.pop("info", {})},
            meter_value=meter, **extra))


@pytest.fixture
async def station201(system: System, start_gateway: StartGateway
                     ) -> AsyncIterator[Callable[..., Awaitable[tuple[Station, str]]]]:
    """Opens 2.0.1 stations on a gateway: booted, their EVSEs Available and ACTIVATED at
    Central; each one and its charger id."""
    opened: list[tuple[ClientConnection, asyncio.Task[None]]] = []

    async def open_station(gateway: Gateway, evses: int = 1) -> tuple[Station, str]:
        sid = charger_id()
        ws = await websockets.connect(gateway.ws_url + sid,
                                      subprotocols=[Subprotocol("ocpp2.0.1")])
        assert ws.subprotocol == "ocpp2.0.1"
        station = Station(sid, ws)
        opened.append((ws, asyncio.create_task(station.start())))
        await station.boot(evses)
        for evse in range(1, evses + 1):
            await system.wait_state(f"{sid}.{evse}", CPState.ACTIVATED)
        return station, sid

    yield open_station
    for ws, task in opened:
        await ws.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_ocpp_2_0_1_remote_start_events_replay_and_end(
    system: System, start_gateway: StartGateway,
    station201: Callable[..., Awaitable[tuple[Station, str]]],
) -> None:
    gateway = await start_gateway()
    station, sid = await station201(gateway)
    cp_id = f"{sid}.1"
    request_id = await request(system, cp_id, "judy")
    token, remote_id, evse = await asyncio.wait_for(station.remote_starts.get(), 30)
    assert (token, evse) == ("judy", 1)
    tx = f"tx-{uuid.uuid4().hex[:8]}"
    started = await station.event(
        "Started", 0, tx, 100_000.0, trigger_reason="RemoteStart",
        info={"remote_start_id": remote_id, "charging_state": "Charging"},
        evse={"id": 1, "connector_id": 1},
        id_token={"id_token": "judy", "type": "Central"})
    assert started.id_token_info["status"] == "Accepted"
    await station.event("Updated", 1, tx, 104_000.0)
    await station.event("Updated", 1, tx, 199_000.0)  # a replay: changes nothing

    def in_progress() -> DriverUpdate | None:
        return next((u for u in system.updates.get(request_id, [])
                     if u.status is DriverStatus.IN_PROGRESS and u.kwh), None)

    update: DriverUpdate = await poll(in_progress, timeout=30, what="IN_PROGRESS")
    assert update.kwh == pytest.approx(4.0)
    await station.event("Ended", 2, tx, 106_500.0, trigger_reason="EVDeparted",
                        info={"stopped_reason": "EVDisconnected"})
    done = await final_update(system, request_id)
    assert done.status is DriverStatus.COMPLETED and done.kwh == pytest.approx(6.5)
    assert done.euros == pytest.approx(6.5 * EURO_RATE)
    unknown = await station.event("Ended", 9, "never-started", 1.0)
    assert unknown is not None
    assert await gateway.metric("evcharging_ocpp_unknown_transactions_total") == 1


# ----------------------------------------------------------------------------- restarts


async def test_a_restarted_gateway_settles_the_session_a_charger_ran_meanwhile(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
    tmp_path: Path,
) -> None:
    state = tmp_path / "kept.json"
    first = await start_gateway(state_file=state)
    charger, cp_id = await ready(system, first, connect)
    cid = cp_id.rsplit(".", 1)[0]
    request_id = await request(system, cp_id, "kim")
    await asyncio.wait_for(charger.remote_starts.get(), 30)
    start = call.StartTransaction(connector_id=1, id_tag="kim", meter_start=2_000,
                                  timestamp=now())
    started = await charger.call(start)
    await system.wait_state(cp_id, CPState.SUPPLYING)
    await first.stop()  # the charger goes on charging, offline

    second = await start_gateway(state_file=state)
    back = await connect(second.ws_url, cid)
    await back.boot()
    replayed = await back.call(start)  # a queued start sent again: same transaction
    assert replayed.transaction_id == started.transaction_id
    await back.call(call.StopTransaction(meter_stop=9_000, timestamp=now(),
                                         transaction_id=started.transaction_id))
    await back.status(1, "Available")
    done = await final_update(system, request_id)
    assert done.status is DriverStatus.COMPLETED and done.kwh == pytest.approx(7.0)
    assert len([s for s in system.of(cp_id) if s.event is StatusEvent.START_SUPPLY]) == 1


async def test_a_charger_connecting_again_replaces_its_old_connection(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    gateway = await start_gateway()
    old, cp_id = await ready(system, gateway, connect)
    cid = cp_id.rsplit(".", 1)[0]
    new = await connect(gateway.ws_url, cid)
    await new.boot()
    await asyncio.wait_for(old._connection.wait_closed(), 15)
    assert await system.cp_state(cp_id) == "ACTIVATED"  # no DISCONNECTED in between
    assert not any(s.state is CPState.DISCONNECTED for s in system.of(cp_id))
    assert (await system.central.post(f"/cp/{cp_id}/stop")).status_code == 200
    assert await asyncio.wait_for(new.availability.get(), 30) == (1, "Inoperative")


async def test_ocpp_2_0_1_errors_are_spelled_as_2_0_1_spells_them(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway()
    async with websockets.connect(gateway.ws_url + "CH-ERR2",
                                  subprotocols=[Subprotocol("ocpp2.0.1")]) as ws:

        async def exchange(message: list[Any]) -> list[Any]:
            await ws.send(json.dumps(message))
            answer: list[Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
            return answer

        assert (await exchange([2, "1", "FlyToTheMoon", {}]))[2] == "NotImplemented"
        assert (await exchange([2, "2", "NotifyEvent", {}]))[2] == "NotSupported"
        assert (await exchange([2, "3", "BootNotification", {"reason": "PowerUp"}]))[2] == (
            "OccurrenceConstraintViolation")
        assert (await exchange([2, "4", "Heartbeat", {"x": 1}]))[2] == "FormatViolation"
        assert (await exchange([2, "5", "Heartbeat", {}]))[0] == 3


# ----------------------------------------------------------------------------- the process


async def test_the_process_with_its_seed_flags_serves_chargers_and_stops_cleanly(
    system: System, tmp_path: Path,
) -> None:
    ws_port, http_port = free_port(), free_port()
    central_port = str(system.central.base_url).rsplit(":", 1)[1].rstrip("/")
    env = {**os.environ, "OCPP_TOPIC_PREFIX": system.prefix, "OCPP_HTTP_PORT": str(http_port),
           "OCPP_STATE_FILE": str(tmp_path / "state.json")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "evcharging.apps.ev_ocpp.main", "--kafka-bootstrap",
        system.bootstrap, "--ws-port", str(ws_port), "--central-host", "127.0.0.1",
        "--central-port", central_port, env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:

            async def up() -> bool:
                return (await http.get("/health")).status_code == 200

            await poll(up, timeout=60, what="the gateway process's /health",
                       retry_on=(httpx.HTTPError,))
            cid = charger_id()
            async with websockets.connect(f"ws://127.0.0.1:{ws_port}/ocpp/{cid}",
                                          subprotocols=OCPP16) as ws:
                charger = Charger(cid, ws)
                serving = asyncio.create_task(charger.start())
                await charger.boot()
                await charger.status(1, "Available")
                await system.wait_state(f"{cid}.1", CPState.ACTIVATED)
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()[-2000:]
    assert (tmp_path / "state.json").exists()


async def test_the_gateway_reports_its_chargers_cps_alive_as_a_monitor_does(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    """SPEC §5 ``monitored``: the gateway is its chargers' watchdog; a charger gone is no
    longer reported, and Central shows its CP unmonitored after 3 intervals."""
    gateway = await start_gateway()
    cid = charger_id()
    cp_id = f"{cid}.1"
    charger = await connect(gateway.ws_url, cid)
    await charger.boot()
    await charger.status(1, "Available")

    async def monitored() -> object:
        answer = await system.central.get(f"/cp/{cp_id}")
        return answer.status_code == 200 and answer.json()["monitored"]

    await poll(monitored, timeout=30, what=f"{cp_id} monitored", retry_on=(httpx.HTTPError,))
    await charger._connection.close()  # the charger goes away

    async def unmonitored() -> bool:
        answer = await system.central.get(f"/cp/{cp_id}")
        return answer.status_code == 200 and answer.json()["monitored"] is False

    await poll(unmonitored, timeout=30, what=f"{cp_id} unmonitored once its charger left",
               retry_on=(httpx.HTTPError,))


# ------------------------------------------------------------------ limits (SPEC §8, §10)


async def session_of(system: System, request_id: str) -> str:
    """The session id Central gave `request_id` (its ACCEPTED update)."""
    def accepted() -> str | None:
        return next((u.session_id for u in system.updates.get(request_id, [])
                     if u.session_id), None)

    found: str = await poll(accepted, timeout=30, what=f"{request_id} ACCEPTED")
    return found


async def set_limit(system: System, cp_id: str, session_id: str, kw: float | None) -> None:
    await system.bus.publish(CentralCommand(cp_id=cp_id, cmd=CommandType.SET_LIMIT,
                                            payload=CommandPayload(kw=kw, session_id=session_id)))


async def refused_set_limit(system: System, cp_id: str) -> CPStatus:
    def refused() -> CPStatus | None:
        return next((s for s in system.of(cp_id)
                     if s.event is StatusEvent.REFUSED and s.cmd is CommandType.SET_LIMIT), None)

    found: CPStatus = await poll(refused, timeout=30, what="the refused SET_LIMIT")
    return found


async def test_set_limit_is_a_tx_profile_in_w_of_the_transaction_16(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    gateway = await start_gateway()
    charger, cp_id = await ready(system, gateway, connect)
    request_id, started = await remote_started(system, charger, cp_id, "lena")
    session_id = await session_of(system, request_id)
    await system.wait_state(cp_id, CPState.SUPPLYING)

    await set_limit(system, cp_id, "not-the-running-session", 3.0)  # ignored: no CALL
    await set_limit(system, cp_id, session_id, 7.4)
    connector, profile = await asyncio.wait_for(charger.profiles.get(), 30)
    assert connector == 1
    assert_tx_profile_16(profile, started.transaction_id, 7400)
    assert charger.profiles.empty()  # the stale SET_LIMIT made no call
    assert await gateway.metric(
        'evcharging_ocpp_commands_total{cmd="SET_LIMIT",outcome="ignored"}') == 1

    await set_limit(system, cp_id, session_id, None)  # no limit: the profile is cleared
    assert await asyncio.wait_for(charger.clears.get(), 30) == {"id": 9001}

    charger.profile_answer = "Rejected"
    await set_limit(system, cp_id, session_id, 2.0)
    status = await refused_set_limit(system, cp_id)
    assert "SetChargingProfile Rejected" in (status.reason or "")
    assert status.session_id == session_id
    await charger.call(call.StopTransaction(meter_stop=1_000, timestamp=now(),
                                            transaction_id=started.transaction_id))
    assert (await final_update(system, request_id)).status is DriverStatus.COMPLETED


async def test_set_limit_is_a_tx_profile_in_w_of_the_transaction_201(
    system: System, start_gateway: StartGateway,
    station201: Callable[..., Awaitable[tuple[Station, str]]],
) -> None:
    gateway = await start_gateway()
    station, sid = await station201(gateway)
    cp_id = f"{sid}.1"
    request_id = await request(system, cp_id, "mike")
    _, remote_id, _ = await asyncio.wait_for(station.remote_starts.get(), 30)
    tx = f"tx-{uuid.uuid4().hex[:8]}"
    await station.event("Started", 0, tx, 0.0, trigger_reason="RemoteStart",
                        info={"remote_start_id": remote_id}, evse={"id": 1, "connector_id": 1},
                        id_token={"id_token": "mike", "type": "Central"})
    session_id = await session_of(system, request_id)
    await system.wait_state(cp_id, CPState.SUPPLYING)

    await set_limit(system, cp_id, session_id, 11.0)
    evse, profile = await asyncio.wait_for(station.profiles.get(), 30)
    assert evse == 1
    assert_tx_profile_201(profile, tx, 11_000)

    await set_limit(system, cp_id, session_id, None)
    assert await asyncio.wait_for(station.clears.get(), 30) == {"charging_profile_id": 9001}

    station.profile_answer = "Rejected"
    await set_limit(system, cp_id, session_id, 1.5)
    status = await refused_set_limit(system, cp_id)
    assert "SetChargingProfile Rejected" in (status.reason or "")


# ----------------------------------------------------------------------------- verdicts


async def billed(system: System, session_id: str) -> dict[str, Any]:
    """The ledger's row of `session_id` once it has ended."""
    async def ended() -> dict[str, Any] | None:
        answer = await system.central.get("/sessions", params={"limit": 200})
        rows = [r for r in answer.json() if r["session_id"] == session_id]
        return rows[0] if rows and rows[0]["status"] != "ACTIVE" else None

    row: dict[str, Any] = await poll(ended, timeout=30, what=f"session {session_id} billed",
                                     retry_on=(httpx.HTTPError,))
    return row


def started_at_charger(system: System, cp_id: str) -> str:
    (status,) = [s for s in system.of(cp_id) if s.event is StatusEvent.START_SUPPLY]
    assert status.session_id is not None
    return status.session_id


async def test_a_start_at_a_stopped_16_charger_is_answered_invalid_stopped_and_billed(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    """SPEC §8: Central would deny a request for a stopped CP; the charger's own start
    there is answered Invalid, stopped, and billed by its meter."""
    gateway = await start_gateway()
    charger, cp_id = await ready(system, gateway, connect)
    assert (await system.central.post(f"/cp/{cp_id}/stop")).status_code == 200
    assert await asyncio.wait_for(charger.availability.get(), 30) == (1, "Inoperative")
    await system.wait_state(cp_id, CPState.STOPPED)

    start = call.StartTransaction(connector_id=1, id_tag="mallory", meter_start=1_000,
                                  timestamp=now())
    started = await charger.call(start)
    assert started.id_tag_info["status"] == "Invalid"
    assert await asyncio.wait_for(charger.remote_stops.get(), 30) == started.transaction_id
    await charger.call(call.StopTransaction(meter_stop=3_500, timestamp=now(),
                                            transaction_id=started.transaction_id,
                                            reason="DeAuthorized"))
    row = await billed(system, started_at_charger(system, cp_id))
    assert (row["driver_id"], row["kwh"]) == ("mallory", 2.5)
    assert row["euros"] == pytest.approx(2.5 * EURO_RATE)
    assert await gateway.metric('evcharging_ocpp_charger_starts_total{verdict="denied"}') == 1
    again = await charger.call(start)  # a replay is answered as the first one was
    assert (again.transaction_id, again.id_tag_info["status"]) == (
        started.transaction_id, "Invalid")


async def test_starts_at_a_201_station_get_centrals_verdict_accepted_or_invalid(
    system: System, start_gateway: StartGateway,
    station201: Callable[..., Awaitable[tuple[Station, str]]],
) -> None:
    gateway = await start_gateway()
    station, sid = await station201(gateway, evses=2)
    stopped, free = f"{sid}.1", f"{sid}.2"
    assert (await system.central.post(f"/cp/{stopped}/stop")).status_code == 200
    assert await asyncio.wait_for(station.availability.get(), 30) == "Inoperative"
    await system.wait_state(stopped, CPState.STOPPED)

    ok_tx, bad_tx = f"tx-{uuid.uuid4().hex[:8]}", f"tx-{uuid.uuid4().hex[:8]}"
    accepted = await station.event(
        "Started", 0, ok_tx, 10_000.0, trigger_reason="Authorized",
        evse={"id": 2, "connector_id": 1}, id_token={"id_token": "nina", "type": "ISO14443"})
    assert accepted.id_token_info["status"] == "Accepted"
    denied = await station.event(
        "Started", 0, bad_tx, 20_000.0, trigger_reason="Authorized",
        evse={"id": 1, "connector_id": 1}, id_token={"id_token": "oscar", "type": "ISO14443"})
    assert denied.id_token_info["status"] == "Invalid"
    assert await asyncio.wait_for(station.remote_stops.get(), 30) == bad_tx
    await station.event("Ended", 1, bad_tx, 21_500.0, trigger_reason="Deauthorized",
                        info={"stopped_reason": "DeAuthorized"})
    await station.event("Ended", 1, ok_tx, 14_000.0, trigger_reason="EVDeparted",
                        info={"stopped_reason": "EVDisconnected"})
    bad_row = await billed(system, started_at_charger(system, stopped))
    ok_row = await billed(system, started_at_charger(system, free))
    assert (bad_row["driver_id"], bad_row["kwh"]) == ("oscar", 1.5)
    assert (ok_row["driver_id"], ok_row["kwh"], ok_row["status"]) == ("nina", 4.0, "COMPLETED")
    assert station.remote_stops.empty()  # the accepted one was not stopped
    for verdict in ("accepted", "denied"):
        assert await gateway.metric(
            f'evcharging_ocpp_charger_starts_total{{verdict="{verdict}"}}') == 1


async def test_without_a_verdict_in_time_the_start_is_accepted_and_holds_up_no_other(
    system: System, start_gateway: StartGateway, connect: Callable[..., Awaitable[Charger]],
) -> None:
    """Central sends no verdict for a start on a CP it has just given a session of its own
    (its session is not confirmed yet): the id tag is Accepted after the decision timeout,
    and another charger is served meanwhile."""
    gateway = await start_gateway(decision_timeout=8.0)
    charger, cp_id = await ready(system, gateway, connect)
    await request(system, cp_id, "peggy")
    await asyncio.wait_for(charger.remote_starts.get(), 30)  # the charger never starts it
    waiting = asyncio.create_task(charger.call(call.StartTransaction(
        connector_id=1, id_tag="quentin", meter_start=0, timestamp=now())))
    other, _ = await ready(system, gateway, connect)  # served while the start waits
    assert (await other.call(call.Heartbeat())).current_time
    assert not waiting.done()
    started = await asyncio.wait_for(waiting, 30)
    assert started.id_tag_info["status"] == "Accepted"
    assert await gateway.metric('evcharging_ocpp_charger_starts_total{verdict="timeout"}') == 1
