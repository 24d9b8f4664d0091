"""The four services as real processes over the real broker (issue: services end to end)."""

from __future__ import annotations

import signal
import sqlite3
import time

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from evcharging.common.kafka import Topic
from evcharging.common.messages import DriverStatus
from tests.e2e.conftest import DriverProbe, System, eventually

pytestmark = pytest.mark.e2e

SESSION_SECONDS = 3.0
KW = 22.0
EURO_RATE = 0.30
FINAL_STATUSES = {DriverStatus.COMPLETED, DriverStatus.DENIED, DriverStatus.FAILED}


def session_row(system: System, session_id: str) -> sqlite3.Row:
    with sqlite3.connect(system.db_path) as db:
        db.row_factory = sqlite3.Row
        row = db.execute(
            "SELECT * FROM charging_sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
    assert row is not None, f"no row for session {session_id}"
    return row


async def charge(probe: DriverProbe, cp_id: str) -> str:
    """A request that must complete; returns its request id."""
    request_id = await probe.request(cp_id)
    final = await probe.final(request_id, timeout=40)
    assert final.status is DriverStatus.COMPLETED, probe.updates[request_id]
    return request_id


async def test_happy_path_matches_the_database(system: System, driver_probe: DriverProbe) -> None:
    await system.start_central()
    await system.start_cp("CP-001")

    request_id = await driver_probe.request("CP-001")
    final = await driver_probe.final(request_id, timeout=40)

    updates = driver_probe.updates[request_id]
    statuses = [u.status for u in updates]
    assert statuses[0] is DriverStatus.ACCEPTED
    assert final.status is DriverStatus.COMPLETED, updates
    progress = [u for u in updates if u.status is DriverStatus.IN_PROGRESS]
    assert len(progress) >= 2
    kwh = [u.kwh for u in progress]
    euros = [u.euros for u in progress]
    assert kwh == sorted(kwh) and kwh[0] < kwh[-1]  # type: ignore[operator]
    assert euros == sorted(euros) and euros[0] < euros[-1]  # type: ignore[operator]
    assert all(u.kw == KW for u in progress)

    expected_kwh = KW * SESSION_SECONDS / 3600
    assert final.kwh == pytest.approx(expected_kwh, rel=1e-6)
    assert final.euros == pytest.approx(expected_kwh * EURO_RATE, rel=1e-6)
    assert final.kwh >= kwh[-1]  # type: ignore[operator]

    row = await eventually(
        lambda: _finished_row(system, final.session_id or ""), 10, "the session row"
    )
    assert row["status"] == "COMPLETED"
    assert row["request_id"] == request_id
    assert row["driver_id"] == driver_probe.driver_id
    assert row["kwh"] == pytest.approx(final.kwh)
    assert row["euros"] == pytest.approx(final.euros)
    assert row["end_time"] is not None

    cp = await system.wait_cp("CP-001", lambda cp: cp["state"] == "ACTIVATED", "back to ACTIVATED")
    assert cp["current_session"] is None
    assert cp["circuit_breaker_state"] == "CLOSED"


async def _finished_row(system: System, session_id: str) -> sqlite3.Row | None:
    row = session_row(system, session_id)
    return row if row["status"] != "ACTIVE" else None


async def test_driver_process_follows_its_requests_and_exits(system: System) -> None:
    await system.start_central()
    await system.start_cp("CP-001")
    driver = system.start_driver(
        "driver-alice", ["CP-001", "CP-404"], env={"DRIVER_REQUEST_INTERVAL": "0.2"}
    )
    assert await driver.wait_exit(timeout=60) == 0
    log = driver.log()
    assert "ACCEPTED" in log and "COMPLETED" in log
    assert "DENIED" in log and "unknown CP" in log
    assert "1 completed, 1 denied" in log, log


async def test_denied_for_unknown_busy_stopped_and_faulty(
    system: System, driver_probe: DriverProbe
) -> None:
    system.engine_env["CP_ENGINE_SESSION_SECONDS"] = "30"
    await system.start_central()
    await system.start_cp("CP-001")
    await system.start_cp("CP-002")

    unknown = await driver_probe.request("CP-999")
    assert (await driver_probe.final(unknown)).reason == "unknown CP"

    first = await driver_probe.request("CP-001")
    await driver_probe.wait_status(first, {DriverStatus.IN_PROGRESS})
    busy = await driver_probe.request("CP-001")
    denied = await driver_probe.final(busy)
    assert (denied.status, denied.reason) == (DriverStatus.DENIED, "CP busy")

    response = await system.http.post("/cp/CP-002/stop", json={"reason": "maintenance"})
    assert response.status_code == 200, response.text
    await system.wait_cp("CP-002", lambda cp: cp["state"] == "STOPPED", "STOPPED")
    stopped = await driver_probe.request("CP-002")
    assert (await driver_probe.final(stopped)).reason == "CP stopped"
    response = await system.http.post("/cp/CP-002/resume")
    assert response.status_code == 200, response.text
    await system.wait_cp("CP-002", lambda cp: cp["state"] == "ACTIVATED", "ACTIVATED again")

    async with system_engine(system, "CP-002") as engine:
        response = await engine.post("/fault", json={"reason": "overheated"})
        assert response.status_code == 200
    await system.wait_cp("CP-002", lambda cp: cp["state"] == "FAULT", "FAULT")
    faulty = await driver_probe.request("CP-002")
    assert (await driver_probe.final(faulty)).reason == "CP faulty"


def system_engine(system: System, cp_id: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=system.engine_url(cp_id), timeout=5)


async def test_engine_crash_fails_the_session_then_recovers(
    system: System, driver_probe: DriverProbe
) -> None:
    system.engine_env["CP_ENGINE_SESSION_SECONDS"] = "30"
    await system.start_central()
    engine, _monitor = await system.start_cp("CP-001")

    running = await driver_probe.request("CP-001")
    await driver_probe.wait_status(running, {DriverStatus.IN_PROGRESS})
    killed_at = time.monotonic()
    engine.signal(signal.SIGKILL)

    failed = await driver_probe.final(running, timeout=30)
    assert failed.status is DriverStatus.FAILED
    assert failed.reason and "fault" in failed.reason.lower()
    cp = await system.wait_cp("CP-001", lambda cp: cp["is_faulty"], "reported faulty")
    detected = time.monotonic() - killed_at
    # interval 0.5 s × threshold 2, plus one interval; generous slack for a loaded CI machine.
    assert detected < 10, f"fault reported {detected:.1f}s after the crash"
    assert cp["circuit_breaker_state"] == "OPEN"

    denied = await driver_probe.request("CP-001")
    assert (await driver_probe.final(denied)).reason == "CP faulty"

    await system.start_engine("CP-001", env={"CP_ENGINE_SESSION_SECONDS": "3"})
    await system.wait_cp("CP-001", lambda cp: not cp["is_faulty"], "recovered")
    await charge(driver_probe, "CP-001")
    cp = await system.wait_cp(
        "CP-001", lambda cp: cp["circuit_breaker_state"] == "CLOSED", "breaker closed again"
    )
    faults = (await system.http.get("/faults", params={"cp_id": "CP-001"})).json()
    assert [f["event_type"] for f in faults][:2] == ["RECOVERY", "FAULT"]


async def test_hardware_fault_mid_session_then_repair(
    system: System, driver_probe: DriverProbe
) -> None:
    system.engine_env["CP_ENGINE_SESSION_SECONDS"] = "30"
    await system.start_central()
    await system.start_cp("CP-001")
    running = await driver_probe.request("CP-001")
    await driver_probe.wait_status(running, {DriverStatus.IN_PROGRESS})

    async with system_engine(system, "CP-001") as engine:
        assert (await engine.post("/fault", json={"reason": "cable fault"})).status_code == 200
        failed = await driver_probe.final(running)
        assert failed.status is DriverStatus.FAILED
        assert failed.reason and "cable fault" in failed.reason
        await system.wait_cp("CP-001", lambda cp: cp["is_faulty"], "reported by the monitor")
        assert (await engine.get("/health")).status_code == 503
        assert (await engine.post("/recover")).status_code == 200
    await system.wait_cp(
        "CP-001", lambda cp: not cp["is_faulty"] and cp["state"] == "ACTIVATED", "repaired"
    )
    request_id = await driver_probe.request("CP-001")
    await driver_probe.wait_status(request_id, {DriverStatus.IN_PROGRESS})
    sessions = (await system.http.get("/sessions", params={"cp_id": "CP-001"})).json()
    assert sessions[1]["status"] == "FAILED"


async def test_central_crash_and_restart(system: System, driver_probe: DriverProbe) -> None:
    """SPEC §4: a restarted Central reads what its CPs reported while it was down and
    closes only the sessions no CP claims; the CP's meter sets the bill."""
    system.engine_env["CP_ENGINE_SESSION_SECONDS"] = "6"
    central = await system.start_central()
    await system.start_cp("CP-001")
    await system.start_cp("CP-002")
    running = await driver_probe.request("CP-001")
    await driver_probe.wait_status(running, {DriverStatus.IN_PROGRESS})

    central.signal(signal.SIGKILL)
    await central.wait_exit()
    await system.start_central()

    cps = (await system.http.get("/cp")).json()
    assert {cp["cp_id"] for cp in cps} == {"CP-001", "CP-002"}
    final = await driver_probe.final(running)
    assert final.status is DriverStatus.COMPLETED  # the CP finished it meanwhile
    assert final.kwh == pytest.approx(22.0 * 6 / 3600)
    [row] = (await system.http.get("/sessions", params={"status": "COMPLETED"})).json()
    assert (row["kwh"], row["euros"]) == (final.kwh, final.euros)
    active = (await system.http.get("/sessions", params={"status": "ACTIVE"})).json()
    assert active == []
    await system.wait_cp(
        "CP-001", lambda cp: cp["state"] == "ACTIVATED", "free again after the restart"
    )
    await charge_briefly(system, driver_probe, "CP-002")


async def charge_briefly(system: System, probe: DriverProbe, cp_id: str) -> None:
    request_id = await probe.request(cp_id)
    await probe.wait_status(request_id, {DriverStatus.IN_PROGRESS}, timeout=30)


async def test_two_drivers_at_once_and_duplicate_request_ids(
    system: System, driver_probe: DriverProbe
) -> None:
    await system.start_central()
    await system.start_cp("CP-001")
    await system.start_cp("CP-002")
    alice = system.start_driver("driver-alice", ["CP-001"])
    bob = system.start_driver("driver-bob", ["CP-002"])
    assert await alice.wait_exit(60) == 0
    assert await bob.wait_exit(60) == 0
    sessions = (await system.http.get("/sessions", params={"status": "COMPLETED"})).json()
    assert {(s["driver_id"], s["cp_id"]) for s in sessions} == {
        ("driver-alice", "CP-001"), ("driver-bob", "CP-002")
    }

    request_id = "dup-" + driver_probe.driver_id
    await driver_probe.request("CP-001", request_id)
    await driver_probe.request("CP-001", request_id)
    final = await driver_probe.final(request_id, timeout=40)
    assert final.status is DriverStatus.COMPLETED
    assert driver_probe.statuses(request_id).count(DriverStatus.ACCEPTED) == 1
    mine = (await system.http.get(
        "/sessions", params={"driver_id": driver_probe.driver_id}
    )).json()
    assert [s["request_id"] for s in mine] == [request_id]
    stats = (await system.http.get("/stats")).json()
    assert stats["controller"]["duplicate_requests"] >= 1


async def test_malformed_messages_are_skipped(system: System, driver_probe: DriverProbe) -> None:
    await system.start_central()
    engine, _ = await system.start_cp("CP-001")
    driver = system.start_driver(
        "driver-carol", ["CP-001"], env={"DRIVER_REQUEST_INTERVAL": "0"}
    )
    await driver.wait_log(r"ACCEPTED", timeout=30)

    producer = AIOKafkaProducer(bootstrap_servers=system.bootstrap)
    await producer.start()
    try:
        for topic in Topic:
            name = system.prefix + topic.value
            for junk in (b"\x00garbage", b'{"cp_id": "CP-001"}', b"[]"):
                await producer.send_and_wait(name, junk, key=b"CP-001")
    finally:
        await producer.stop()

    async def central_counted() -> dict[str, int] | None:
        body = (await system.http.get("/health")).json()
        by_topic = body["kafka"]["invalid_by_topic"]
        wanted = {"driver.requests", "cp.status", "cp.telemetry"}
        return by_topic if all(by_topic.get(t, 0) >= 3 for t in wanted) else None

    await eventually(central_counted, 20, "Central to count the invalid messages")
    await engine.wait_log(r"skipped invalid message on \S*central\.commands", timeout=20)
    await driver.wait_log(r"skipped invalid message on \S*driver\.updates", timeout=20)
    assert await driver.wait_exit(60) == 0
    assert "1 completed" in driver.log()
    await charge(driver_probe, "CP-001")
    for proc in system.procs:
        assert proc.popen is not None and proc.popen.poll() in (None, 0), proc.name
