"""The CP Fleet's OCPP charger (evcharging.apps.ev_fleet.ocpp_charger): what it says and
answers in 1.6 and 2.0.1, every payload checked against the version's JSON schema with the
`ocpp` library's own validators; and the fleet's round-trip quantiles."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import pytest
from ocpp.messages import MessageType, get_validator

from evcharging.apps.ev_fleet.main import load_config
from evcharging.apps.ev_fleet.ocpp_charger import ChargerModel, Outgoing, Reply
from evcharging.apps.ev_fleet.ocpp_fleet import OcppFleet, OcppFleetStats, quantile

VERSION = {"ocpp1.6": "1.6", "ocpp2.0.1": "2.0.1"}
WALL = "2026-12-07T10:00:00.000Z"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def model(protocol: str, clock: Clock, **kwargs: Any) -> ChargerModel:
    options: dict[str, Any] = {"kw_rate": 36.0, "session_seconds": 10.0,
                               "telemetry_interval": 1.0, **kwargs}
    return ChargerModel("CH-7", protocol, wall=lambda: WALL, clock=clock, **options)


def checked(outs: list[Outgoing] | tuple[Outgoing, ...], protocol: str) -> list[Outgoing]:
    """`outs`, each one's payload valid under its action's CALL schema."""
    for out in outs:
        get_validator(MessageType.Call, out.action, VERSION[protocol]).validate(out.payload)
    return list(outs)


def answered(action: str, reply: Reply, protocol: str) -> dict[str, Any]:
    assert reply.error is None and reply.payload is not None
    get_validator(MessageType.CallResult, action, VERSION[protocol]).validate(reply.payload)
    checked(reply.then, protocol)
    return reply.payload


def booted(protocol: str, clock: Clock, **kwargs: Any) -> ChargerModel:
    charger = model(protocol, clock, **kwargs)
    checked([charger.boot(), charger.heartbeat()], protocol)
    (status,) = checked(charger.on_boot({"status": "Accepted", "interval": 30,
                                         "currentTime": WALL}), protocol)
    assert charger.interval == 30
    assert status.action == "StatusNotification"
    assert "Available" in (status.payload.get("status"), status.payload.get("connectorStatus"))
    return charger


def test_boot_payloads_name_the_vendor_and_model() -> None:
    clock = Clock()
    assert model("ocpp1.6", clock).boot().payload == {
        "chargePointVendor": "evcharging-fleet", "chargePointModel": "Fleet-CP"}
    assert model("ocpp2.0.1", clock).boot().payload == {
        "chargingStation": {"model": "Fleet-CP", "vendorName": "evcharging-fleet"},
        "reason": "PowerUp"}
    charger = model("ocpp1.6", clock)
    assert charger.on_boot({"status": "Pending", "interval": 5, "currentTime": WALL}) == []
    assert charger.interval is None
    with pytest.raises(ValueError, match="protocol"):
        model("ocpp1.5", clock)


def test_a_16_remote_start_charges_meters_and_completes_after_the_session() -> None:
    clock = Clock()
    charger = booted("ocpp1.6", clock)
    reply = charger.handle("RemoteStartTransaction", {"idTag": "alice", "connectorId": 1},
                           clock.now)
    assert answered("RemoteStartTransaction", reply, "ocpp1.6") == {"status": "Accepted"}
    (start,) = reply.then
    assert start.action == "StartTransaction" and start.kind == "start"
    assert start.payload == {"connectorId": 1, "idTag": "alice", "meterStart": 0,
                             "timestamp": WALL}
    assert charger.due(clock.now) == []  # no transaction id yet: nothing to meter
    # A second start while one runs is Rejected.
    again = charger.handle("RemoteStartTransaction", {"idTag": "bob"}, clock.now)
    assert again.payload == {"status": "Rejected"} and not again.then

    follow = checked(charger.on_started(
        {"transactionId": 42, "idTagInfo": {"status": "Accepted"}}, clock.now), "ocpp1.6")
    assert [o.action for o in follow] == ["StatusNotification", "MeterValues"]
    assert follow[0].payload["status"] == "Charging"
    assert follow[1].payload["transactionId"] == 42
    clock.now += 0.5
    assert charger.due(clock.now) == []  # the next reading in 1 s
    clock.now += 0.5
    (meter,) = checked(charger.due(clock.now), "ocpp1.6")
    values = {v["measurand"]: v for v in meter.payload["meterValue"][0]["sampledValue"]}
    assert values["Energy.Active.Import.Register"] == {
        "value": "10.0", "measurand": "Energy.Active.Import.Register", "unit": "Wh"}  # 36 kW, 1 s
    assert values["Power.Active.Import"]["value"] == "36000.0"
    clock.now += 9.0  # 10 s in: the session is over
    stop, status = checked(charger.due(clock.now), "ocpp1.6")
    assert stop.action == "StopTransaction"
    assert stop.payload == {"transactionId": 42, "meterStop": 100, "timestamp": WALL,
                            "reason": "EVDisconnected"}
    assert status.payload["status"] == "Available"
    assert charger.tx is None and charger.meter_wh == pytest.approx(100.0)
    assert (charger.sessions_started, charger.sessions_ended) == (1, 1)
    # The register keeps growing: the next session starts where this one ended.
    reply = charger.handle("RemoteStartTransaction", {"idTag": "bob"}, clock.now)
    assert reply.then[0].payload["meterStart"] == 100


def test_a_16_remote_stop_of_the_running_transaction_ends_it_remote() -> None:
    clock = Clock()
    charger = booted("ocpp1.6", clock)
    charger.handle("RemoteStartTransaction", {"idTag": "alice"}, clock.now)
    charger.on_started({"transactionId": 7, "idTagInfo": {"status": "Accepted"}}, clock.now)
    wrong = charger.handle("RemoteStopTransaction", {"transactionId": 8}, clock.now)
    assert answered("RemoteStopTransaction", wrong, "ocpp1.6") == {"status": "Rejected"}
    clock.now += 2
    reply = charger.handle("RemoteStopTransaction", {"transactionId": 7}, clock.now)
    assert answered("RemoteStopTransaction", reply, "ocpp1.6") == {"status": "Accepted"}
    assert [o.action for o in reply.then] == ["StopTransaction", "StatusNotification"]
    assert reply.then[0].payload["reason"] == "Remote"
    assert reply.then[0].payload["meterStop"] == 20


def test_a_16_start_whose_id_tag_is_not_accepted_stops_at_once() -> None:
    clock = Clock()
    charger = booted("ocpp1.6", clock)
    charger.handle("RemoteStartTransaction", {"idTag": "x"}, clock.now)
    outs = checked(charger.on_started({"transactionId": 3, "idTagInfo": {"status": "Invalid"}},
                                      clock.now), "ocpp1.6")
    assert [o.action for o in outs] == ["StopTransaction", "StatusNotification"]
    assert outs[0].payload["reason"] == "DeAuthorized"


def test_a_201_request_start_sends_started_with_the_remote_start_id_then_updates_and_ended(
) -> None:
    clock = Clock()
    charger = booted("ocpp2.0.1", clock)
    reply = charger.handle("RequestStartTransaction", {
        "idToken": {"idToken": "alice", "type": "Central"}, "remoteStartId": 99, "evseId": 1},
        clock.now)
    assert answered("RequestStartTransaction", reply, "ocpp2.0.1") == {"status": "Accepted"}
    started, status, update = reply.then
    assert started.action == "TransactionEvent" and started.payload["eventType"] == "Started"
    info = started.payload["transactionInfo"]
    assert info["remoteStartId"] == 99 and info["transactionId"] == "CH-7-1"
    assert started.payload["seqNo"] == 0 and started.payload["evse"] == {"id": 1,
                                                                          "connectorId": 1}
    assert started.payload["idToken"] == {"idToken": "alice", "type": "Central"}
    assert status.payload["connectorStatus"] == "Occupied"
    assert update.payload["eventType"] == "Updated" and update.payload["seqNo"] == 1
    clock.now += 1
    (later,) = checked(charger.due(clock.now), "ocpp2.0.1")
    sample = later.payload["meterValue"][0]["sampledValue"][0]
    assert sample == {"value": 10.0, "measurand": "Energy.Active.Import.Register",
                      "unitOfMeasure": {"unit": "Wh"}}
    assert later.payload["seqNo"] == 2
    reply = charger.handle("RequestStopTransaction", {"transactionId": "CH-7-1"}, clock.now)
    assert answered("RequestStopTransaction", reply, "ocpp2.0.1") == {"status": "Accepted"}
    ended, status = reply.then
    assert ended.payload["eventType"] == "Ended" and ended.payload["triggerReason"] == "RemoteStop"
    assert ended.payload["transactionInfo"]["stoppedReason"] == "Remote"
    assert ended.payload["seqNo"] == 3
    assert status.payload["connectorStatus"] == "Available"
    # The next transaction has its own id.
    reply = charger.handle("RequestStartTransaction", {
        "idToken": {"idToken": "bob", "type": "Central"}, "remoteStartId": 100}, clock.now)
    assert reply.then[0].payload["transactionInfo"]["transactionId"] == "CH-7-2"


def test_a_201_session_ends_by_itself_completed() -> None:
    clock = Clock()
    charger = booted("ocpp2.0.1", clock, session_seconds=3.0)
    charger.handle("RequestStartTransaction", {
        "idToken": {"idToken": "alice", "type": "Central"}, "remoteStartId": 1}, clock.now)
    clock.now += 3
    ended, status = checked(charger.due(clock.now), "ocpp2.0.1")
    assert status.payload["connectorStatus"] == "Available"
    assert ended.payload["transactionInfo"]["stoppedReason"] == "EVDisconnected"
    assert ended.payload["meterValue"][0]["sampledValue"][0]["value"] == 30.0


@pytest.mark.parametrize("protocol", ["ocpp1.6", "ocpp2.0.1"])
def test_availability_and_charging_profiles(protocol: str) -> None:
    clock = Clock()
    charger = booted(protocol, clock)
    v16 = protocol == "ocpp1.6"
    inoperative: dict[str, Any] = ({"connectorId": 1, "type": "Inoperative"} if v16 else
                                   {"operationalStatus": "Inoperative", "evse": {"id": 1}})
    reply = charger.handle("ChangeAvailability", inoperative, clock.now)
    assert answered("ChangeAvailability", reply, protocol) == {"status": "Accepted"}
    (status,) = reply.then
    assert "Unavailable" in status.payload.values()
    start: tuple[str, dict[str, Any]] = (
        ("RemoteStartTransaction", {"idTag": "alice"}) if v16 else
        ("RequestStartTransaction", {"idToken": {"idToken": "alice", "type": "Central"},
                                     "remoteStartId": 5}))
    assert charger.handle(start[0], start[1], clock.now).payload == {"status": "Rejected"}
    operative = ({"connectorId": 1, "type": "Operative"} if v16 else
                 {"operationalStatus": "Operative"})
    reply = charger.handle("ChangeAvailability", operative, clock.now)
    assert "Available" in reply.then[0].payload.values()
    assert charger.handle(start[0], start[1], clock.now).payload == {"status": "Accepted"}
    # Inoperative during a transaction: Scheduled; its stop reports Unavailable.
    if v16:
        charger.on_started({"transactionId": 1, "idTagInfo": {"status": "Accepted"}}, clock.now)
    reply = charger.handle("ChangeAvailability", inoperative, clock.now)
    assert reply.payload == {"status": "Scheduled"} and not reply.then
    outs = charger.stop(clock.now, "Local")
    assert "Unavailable" in outs[-1].payload.values()
    profile = charger.handle("SetChargingProfile", profile_call(protocol, 11_000.0, "1"),
                             clock.now)
    assert profile.payload == {"status": "Rejected"}  # no transaction runs


def profile_call(protocol: str, watts: float, tx: str, *, purpose: str = "TxProfile"
                 ) -> dict[str, Any]:
    """SetChargingProfile of a TxProfile as the gateway sends it (id 9001, one period)."""
    period = {"startPeriod": 0, "limit": watts}
    if protocol == "ocpp1.6":
        payload: dict[str, Any] = {"connectorId": 1, "csChargingProfiles": {
            "chargingProfileId": 9001, "transactionId": int(tx), "stackLevel": 0,
            "chargingProfilePurpose": purpose, "chargingProfileKind": "Relative",
            "chargingSchedule": {"chargingRateUnit": "W", "chargingSchedulePeriod": [period]}}}
    else:
        payload = {"evseId": 1, "chargingProfile": {
            "id": 9001, "stackLevel": 0, "chargingProfilePurpose": purpose,
            "chargingProfileKind": "Relative", "transactionId": tx,
            "chargingSchedule": [{"id": 9001, "chargingRateUnit": "W",
                                  "chargingSchedulePeriod": [period]}]}}
    # 1.6's schema is read with decimal floats (its limit is a multiple of 0.1), as the
    # library reads (and caches) it.
    get_validator(MessageType.Call, "SetChargingProfile", VERSION[protocol],
                  parse_float=Decimal).validate(json.loads(json.dumps(payload),
                                                           parse_float=Decimal))
    return payload


@pytest.mark.parametrize("protocol", ["ocpp1.6", "ocpp2.0.1"])
def test_a_tx_profile_limits_the_power_and_energy_until_it_is_cleared(protocol: str) -> None:
    clock = Clock()
    charger = booted(protocol, clock)
    v16 = protocol == "ocpp1.6"
    start: tuple[str, dict[str, Any]] = (
        ("RemoteStartTransaction", {"idTag": "alice"}) if v16 else
        ("RequestStartTransaction", {"idToken": {"idToken": "alice", "type": "Central"},
                                     "remoteStartId": 5}))
    charger.handle(start[0], start[1], clock.now)
    if v16:
        charger.on_started({"transactionId": 42, "idTagInfo": {"status": "Accepted"}},
                           clock.now)
    assert charger.tx is not None and charger.tx.transaction_id is not None
    tx = charger.tx.transaction_id

    def power_and_energy() -> tuple[float, float]:  # as sampled: W, Wh to 0.1
        meter = charger.meter(clock.now)
        samples = checked([meter], protocol)[0].payload["meterValue"]
        values = {v["measurand"]: float(v["value"]) for v in samples[0]["sampledValue"]}
        return values["Power.Active.Import"], values["Energy.Active.Import.Register"]

    clock.now += 1.0  # 36 kW for 1 s: 10 Wh
    for wrong in (profile_call(protocol, 9_000.0, "999"),  # another transaction
                  profile_call(protocol, 9_000.0, tx, purpose="TxDefaultProfile")):
        assert charger.handle("SetChargingProfile", wrong, clock.now).payload == {
            "status": "Rejected"}
    reply = charger.handle("SetChargingProfile", profile_call(protocol, 18_000.0, tx),
                           clock.now)
    assert answered("SetChargingProfile", reply, protocol) == {"status": "Accepted"}
    assert charger.power_kw() == 18.0
    clock.now += 2.0  # 18 kW for 2 s: 10 Wh more
    assert power_and_energy() == (18_000.0, 20.0)
    # A limit above the charger's own rate: it delivers its rate.
    charger.handle("SetChargingProfile", profile_call(protocol, 50_000.0, tx), clock.now)
    assert charger.power_kw() == 36.0
    charger.handle("SetChargingProfile", profile_call(protocol, 7_200.0, tx), clock.now)
    clock.now += 1.0  # 7.2 kW for 1 s: 2 Wh
    assert power_and_energy() == (7_200.0, 22.0)
    clear = {"id": 9001} if v16 else {"chargingProfileId": 9001}
    checked([Outgoing("ClearChargingProfile", clear)], protocol)
    reply = charger.handle("ClearChargingProfile", clear, clock.now)
    assert answered("ClearChargingProfile", reply, protocol) == {"status": "Accepted"}
    clock.now += 1.0  # its own 36 kW again: 10 Wh
    assert power_and_energy() == (36_000.0, 32.0)
    again = charger.handle("ClearChargingProfile", clear, clock.now)
    assert again.payload == {"status": "Unknown"}  # nothing left to clear


@pytest.mark.parametrize("protocol", ["ocpp1.6", "ocpp2.0.1"])
def test_other_actions_get_notsupported_or_notimplemented(protocol: str) -> None:
    clock = Clock()
    charger = booted(protocol, clock)
    assert charger.handle("Reset", {"type": "Hard"}, clock.now).error == "NotSupported"
    assert charger.handle("FlyToTheMoon", {}, clock.now).error == "NotImplemented"
    other = "RequestStartTransaction" if protocol == "ocpp1.6" else "RemoteStartTransaction"
    assert charger.handle(other, {}, clock.now).error == "NotImplemented"


def test_a_charger_not_booted_refuses_remote_starts() -> None:
    clock = Clock()
    charger = model("ocpp1.6", clock)
    assert charger.handle("RemoteStartTransaction", {"idTag": "a"}, clock.now).payload == {
        "status": "Rejected"}


def test_round_trip_quantiles() -> None:
    assert quantile([], 0.5) is None
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(1, 101)], 0.99) == 99.0
    stats = OcppFleetStats()
    for ms in (1, 2, 3, 4, 100):
        stats.observe("Heartbeat", ms / 1000)
    assert stats.round_trips() == {"Heartbeat": {"count": 5, "p50_ms": 3.0, "p99_ms": 100.0}}


def test_fleet_flags_choose_the_protocol_and_the_gateway(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    for name in ("FLEET_PROTOCOL", "FLEET_OCPP_URL", "FLEET_OCPP_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert load_config(["--cps", "2"]).fleet.protocol == "kafka"
    config = load_config(["--cps", "2", "--protocol", "ocpp2.0.1", "--ocpp-url",
                          "ws://gw:9000/ocpp/"])
    assert (config.fleet.protocol, config.fleet.ocpp_url) == ("ocpp2.0.1", "ws://gw:9000/ocpp/")
    with pytest.raises(SystemExit):
        load_config(["--protocol", "ocpp1.5"])
    with pytest.raises(SystemExit):
        load_config(["--protocol", "ocpp1.6", "--ocpp-url", "http://gw/"])


# ----------------------------------------------------------------------------- the connection


class FakeWebSocket:
    """What a charger's connection sends (the frames, decoded)."""

    def __init__(self) -> None:
        self.frames: list[list[Any]] = []

    async def send(self, text: str) -> None:
        self.frames.append(json.loads(text))

    async def close(self) -> None:
        return None


def actions(ws: FakeWebSocket) -> list[str]:
    return [frame[2] for frame in ws.frames if frame[0] == 2]


BOOTED = json.dumps({"status": "Accepted", "interval": 30, "currentTime": WALL})


async def test_one_call_in_flight_and_the_transaction_kept_while_offline() -> None:
    fleet = OcppFleet(["CH-1"], "ocpp1.6", "ws://gw/ocpp", kw_rate=36.0, session_seconds=10.0,
                      telemetry_interval=1.0)
    (charger,) = fleet.chargers
    assert charger.url == "ws://gw/ocpp/CH-1"
    ws = FakeWebSocket()
    charger._opened(ws)  # type: ignore[arg-type]
    await charger.flush()
    assert actions(ws) == ["BootNotification"]
    await charger.call(charger.model.heartbeat())
    assert actions(ws) == ["BootNotification"]  # waits for the boot's answer
    await charger.receive(f'[3,"1",{BOOTED}]')
    assert charger.booted and fleet.booted == 1
    assert actions(ws) == ["BootNotification", "Heartbeat"]
    await charger.receive('[3,"2",{"currentTime":"2026-12-07T10:00:00Z"}]')
    assert actions(ws)[-1] == "StatusNotification"
    await charger.receive('[3,"3",{}]')
    assert charger.inflight is None and not charger.outbox

    # The gateway's remote start: answered at once, then StartTransaction.
    await charger.receive('[2,"g1","RemoteStartTransaction",{"idTag":"alice","connectorId":1}]')
    assert ws.frames[-2] == [3, "g1", {"status": "Accepted"}]
    assert actions(ws)[-1] == "StartTransaction"
    # An unknown action gets a CALLERROR; a broken payload FormationViolation.
    await charger.receive('[2,"g2","FlyToTheMoon",{}]')
    assert ws.frames[-1] == [4, "g2", "NotImplemented", "", {}]
    await charger.receive('[2,"g3","RemoteStartTransaction",{}]')
    assert ws.frames[-1][:3] == [3, "g3", {"status": "Rejected"}]  # one already runs

    # The connection drops with StartTransaction in flight: it is kept, a heartbeat is not.
    charger._closed()
    assert fleet.stats.results[("StartTransaction", "lost")] == 1
    await charger.call(charger.model.heartbeat())
    assert [out.action for out in charger.outbox] == ["StartTransaction"]
    again = FakeWebSocket()
    charger._opened(again)  # type: ignore[arg-type]
    await charger.flush()
    await charger.receive(f'[3,"{again.frames[-1][1]}",{BOOTED}]')
    assert actions(again) == ["BootNotification", "StartTransaction"]  # replayed after boot
    assert fleet.booted == 1  # a charger counts once
    started = '{"transactionId":5,"idTagInfo":{"status":"Accepted"}}'
    await charger.receive(f'[3,"{again.frames[-1][1]}",{started}]')
    assert charger.model.tx is not None and charger.model.tx.transaction_id == "5"
    assert fleet.stats.round_trips()["BootNotification"]["count"] == 2
    assert fleet.health()["charging"] == 1

    # A CALL unanswered for call_timeout is given up by the scheduler's tick.
    fleet.call_timeout = 0.0
    assert charger.inflight is not None
    assert charger.due(0.0, time.perf_counter() + 1)
    await charger.tick(0.0)
    assert sum(n for (_, result), n in fleet.stats.results.items() if result == "timeout") == 1
