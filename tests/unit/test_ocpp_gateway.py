"""The gateway's CPs on a recording publisher (no broker, no charger): what it publishes as
sessions start, meter, fault and end, and what its state file brings back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from evcharging.apps.ev_ocpp.gateway import Gateway, PendingStart
from evcharging.apps.ev_ocpp.store import StateStore
from evcharging.common.messages import CPStatus, CPTelemetry, StatusEvent
from evcharging.common.states import CPState, SessionResult
from tests.unit.fakes import RecordingPublisher

T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


def gateway() -> tuple[Gateway, RecordingPublisher]:
    publisher = RecordingPublisher()
    return Gateway(publisher, euro_rate=0.5), publisher


async def test_a_remote_start_takes_centrals_session_and_meters_bill_by_the_register() -> None:
    gw, bus = gateway()
    conn = gw.connector("CH", 1)
    await gw.change(conn, CPState.ACTIVATED, "available")
    conn.pending = PendingStart("central-session", "alice")
    session = await gw.start(conn, transaction="7", driver_id="alice", meter_start_wh=1000.0,
                             ts=T0, own_session_id="own")
    assert session.session_id == "central-session" and conn.pending is None
    start = bus.of(CPStatus)[-1]
    assert (start.state, start.event, start.session_id, start.ts) == (
        CPState.SUPPLYING, StatusEvent.START_SUPPLY, "central-session", T0)
    # No power measurand: kW from energy over time (3 kWh in 15 minutes: 12 kW).
    await gw.meter(session, 4000.0, None, T0 + timedelta(minutes=15))
    telemetry = bus.of(CPTelemetry)[-1]
    assert telemetry.kwh == pytest.approx(3.0) and telemetry.kw == pytest.approx(12.0)
    assert telemetry.euros == pytest.approx(1.5)
    await gw.stop(session, 5500.0, "EVDisconnected", T0 + timedelta(minutes=20))
    end = bus.of(CPStatus)[-1]
    assert end.session_result is SessionResult.COMPLETED and end.kwh == pytest.approx(4.5)
    assert (end.state, end.event) == (CPState.ACTIVATED, StatusEvent.SESSION_COMPLETE)
    assert conn.session is None and conn.last_end is not None
    await gw.heartbeat(conn)
    assert bus.of(CPStatus)[-1].last_session == conn.last_end


async def test_a_session_the_charger_starts_is_the_drivers_with_its_own_id() -> None:
    gw, _ = gateway()
    conn = gw.connector("CH", 2)
    await gw.change(conn, CPState.ACTIVATED, "available")
    conn.pending = PendingStart("central-session", "alice")
    session = await gw.start(conn, transaction="8", driver_id="bob", meter_start_wh=0.0,
                             ts=T0, own_session_id="own-id")
    assert (session.session_id, session.driver_id) == ("own-id", "bob")
    assert conn.pending is not None  # alice's remote start still waits for its transaction


async def test_a_fault_ends_the_session_failed_and_the_later_stop_corrects_its_totals() -> None:
    gw, bus = gateway()
    conn = gw.connector("CH", 1)
    await gw.change(conn, CPState.ACTIVATED, "available")
    session = await gw.start(conn, transaction="9", driver_id="carol", meter_start_wh=0.0,
                             ts=T0, own_session_id="s9")
    await gw.meter(session, 2000.0, 7000.0, T0 + timedelta(minutes=10))
    await gw.change(conn, CPState.FAULT, "GroundFailure")
    fault = bus.of(CPStatus)[-1]
    assert (fault.state, fault.event, fault.session_result) == (
        CPState.FAULT, StatusEvent.FAULT, SessionResult.FAILED)
    assert fault.kwh == pytest.approx(2.0)
    count = len(bus.of(CPStatus))
    await gw.stop(session, 2600.0, "EmergencyStop", T0 + timedelta(minutes=11))
    corrected = bus.of(CPStatus)[-1]
    assert len(bus.of(CPStatus)) == count + 1
    assert corrected.session_id == "s9" and corrected.kwh == pytest.approx(2.6)
    assert corrected.state is CPState.FAULT  # the stop does not repair the connector
    await gw.stop(session, 2600.0, "EmergencyStop", T0 + timedelta(minutes=11))  # a replay
    assert len(bus.of(CPStatus)) == count + 1


async def test_a_stop_centrals_stop_cp_asked_for_ends_it_stopped() -> None:
    gw, bus = gateway()
    conn = gw.connector("CH", 1)
    await gw.change(conn, CPState.ACTIVATED, "available")
    session = await gw.start(conn, transaction="10", driver_id="dan", meter_start_wh=0.0,
                             ts=T0, own_session_id="s10")
    session.stop_cp = True
    await gw.stop(session, 1000.0, "Remote", T0 + timedelta(minutes=5))
    end = bus.of(CPStatus)[-1]
    assert (end.state, end.event, end.session_result) == (
        CPState.STOPPED, StatusEvent.STOP_CP, SessionResult.STOPPED)


async def test_an_unavailable_connector_ends_its_session_stopped_at_its_last_meter() -> None:
    gw, bus = gateway()
    conn = gw.connector("CH", 1)
    await gw.change(conn, CPState.ACTIVATED, "available")
    session = await gw.start(conn, transaction="13", driver_id="fay", meter_start_wh=0.0,
                             ts=T0, own_session_id="s13")
    await gw.meter(session, 800.0, None, T0 + timedelta(minutes=5))
    await gw.change(conn, CPState.STOPPED, "unavailable")
    end = bus.of(CPStatus)[-1]
    assert (end.state, end.session_result, end.kwh) == (
        CPState.STOPPED, SessionResult.STOPPED, pytest.approx(0.8))


async def test_the_state_file_brings_back_running_sessions_and_transactions(
    tmp_path: Path,
) -> None:
    gw, _ = gateway()
    conn = gw.connector("CH", 1)
    idle = gw.connector("CH", 2)
    await gw.change(conn, CPState.ACTIVATED, "available")
    await gw.change(idle, CPState.ACTIVATED, "available")
    session = await gw.start(conn, transaction="11", driver_id="eve", meter_start_wh=500.0,
                             ts=T0, own_session_id="s11")
    await gw.meter(session, 1500.0, None, T0 + timedelta(minutes=1))
    gw.remember("CH", "12", None)
    store = StateStore(tmp_path / "state.json")
    await store.save(gw)

    back, _ = gateway()
    store.load(back)
    restored = back.connectors["CH.1"]
    assert restored.session is not None and restored.session.session_id == "s11"
    assert restored.session.offline and restored.session.last_wh == 1500.0
    assert restored.session.started_at == T0
    assert back.transactions[("CH", "11")] is restored.session
    assert ("CH", "12") in back.transactions and back.transactions[("CH", "12")] is None
    assert back.connectors["CH.2"].state is CPState.DISCONNECTED
    assert [c.cp_id for c in back.of_charger("CH")] == ["CH.1", "CH.2"]
