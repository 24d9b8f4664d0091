"""The ledger of SPEC §4 in Central: the CP's meter is the truth, whatever fails.

These tests run the controller on a real SQLite file; a second connection takes the
database's write lock (``BEGIN EXCLUSIVE``), as another process would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.repository import SqliteRepository, StorageError
from evcharging.common.bus import Topic
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPRegistration,
    CPState,
    CPStatus,
    CPTelemetry,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    SessionEnd,
    SessionResult,
    StatusEvent,
    new_id,
    utcnow,
)
from tests.unit.conftest import FlushingController
from tests.unit.fakes import RecordingPublisher


@pytest.fixture
async def db_path(tmp_path: Path) -> Path:
    return tmp_path / "central.db"


@pytest.fixture
async def file_repo(db_path: Path) -> AsyncIterator[SqliteRepository]:
    async with SqliteRepository(db_path, busy_timeout_ms=20) as repository:
        yield repository


@pytest.fixture
async def central(
    bus: RecordingPublisher, file_repo: SqliteRepository
) -> AsyncIterator[Controller]:
    controller = FlushingController(bus, file_repo, CentralOptions(start_timeout=30.0))
    await controller.register(CPRegistration(cp_id="CP-001"))
    await controller.handle_status(
        CPStatus(cp_id="CP-001", state=CPState.ACTIVATED, event=StatusEvent.CONNECT)
    )
    yield controller
    await controller.close()


@contextmanager
def locked(db_path: Path) -> Iterator[None]:
    """Another process's exclusive transaction on Central's database."""
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


def updates(bus: RecordingPublisher, request_id: str) -> list[DriverUpdate]:
    return [u for u in bus.of(DriverUpdate) if u.request_id == request_id]


def driver_request() -> DriverRequest:
    return DriverRequest(request_id=new_id(), driver_id="driver-alice", cp_id="CP-001")


async def running_session(central: Controller, bus: RecordingPublisher) -> tuple[str, str]:
    req = driver_request()
    await central.handle_request(req)
    session_id = updates(bus, req.request_id)[0].session_id
    assert session_id is not None
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.SUPPLYING, event=StatusEvent.START_SUPPLY,
        session_id=session_id, driver_id="driver-alice",
    ))
    await central.handle_telemetry(CPTelemetry(
        cp_id="CP-001", kw=22.0, kwh=0.0122, euros=0.0037, session_id=session_id,
        driver_id="driver-alice",
    ))
    return req.request_id, session_id


def end_status(session_id: str, kwh: float, euros: float,
               result: SessionResult = SessionResult.COMPLETED) -> CPStatus:
    event = {SessionResult.COMPLETED: StatusEvent.SESSION_COMPLETE,
             SessionResult.STOPPED: StatusEvent.STOP_SUPPLY,
             SessionResult.FAILED: StatusEvent.FAULT}[result]
    state = CPState.FAULT if result is SessionResult.FAILED else CPState.ACTIVATED
    return CPStatus(cp_id="CP-001", state=state, event=event, session_id=session_id,
                    session_result=result, kwh=kwh, euros=euros)


# ---------------------------------------------------------------- a locked database


async def test_a_request_during_a_lock_is_announced_only_once_recorded(
    central: Controller, bus: RecordingPublisher, db_path: Path, file_repo: SqliteRepository
) -> None:
    req = driver_request()
    with locked(db_path), pytest.raises(StorageError):
        await central.handle_request(req)  # decided; its batch's flush fails
    assert updates(bus, req.request_id) == []  # nothing announced before it is recorded
    assert bus.of(CentralCommand) == []
    assert not await file_repo.ping()  # /health reads this
    await central.flush()  # the consumer's next try, once the lock is gone
    [accepted] = updates(bus, req.request_id)
    assert accepted.status is DriverStatus.ACCEPTED
    row = await file_repo.get_session(accepted.session_id)
    assert row is not None and row.status == "ACTIVE"
    assert await file_repo.ping()
    await central.handle_request(req)  # Kafka redelivers it: not decided twice
    assert len(updates(bus, req.request_id)) == 1


async def test_a_request_read_late_is_denied_as_overload(
    central: Controller, bus: RecordingPublisher
) -> None:
    """SPEC §4: a Central that fell behind (a locked database, a backlog) denies what it
    reads late instead of accepting it and failing it later."""
    late = DriverRequest(request_id=new_id(), driver_id="driver-alice", cp_id="CP-001")
    # The broker appended it 3 s before Central reads it.
    central.readclock.arrived(Topic.DRIVER_REQUESTS, 0, utcnow().timestamp() - 3)
    await central.handle_request(late)
    [denied] = updates(bus, late.request_id)
    assert (denied.status, denied.reason) == (DriverStatus.DENIED, "Central overloaded")
    assert central.decide("CP-001") is None


async def test_an_end_report_during_a_lock_is_recorded_and_told_after_it(
    central: Controller, bus: RecordingPublisher, db_path: Path, file_repo: SqliteRepository
) -> None:
    request_id, session_id = await running_session(central, bus)
    with locked(db_path), pytest.raises(StorageError):
        await central.handle_status(end_status(session_id, 0.0367, 0.011))
    assert updates(bus, request_id)[-1].status is DriverStatus.IN_PROGRESS
    await central.flush()
    final = updates(bus, request_id)[-1]
    assert (final.status, final.kwh, final.euros) == (DriverStatus.COMPLETED, 0.0367, 0.011)
    row = await file_repo.get_session(session_id)
    assert row is not None and (row.status, row.kwh, row.euros) == ("COMPLETED", 0.0367, 0.011)
    assert [u.status for u in updates(bus, request_id)].count(DriverStatus.COMPLETED) == 1


async def test_a_fault_report_during_a_lock_answers_503_and_is_recorded_later(
    central: Controller, bus: RecordingPublisher, db_path: Path, file_repo: SqliteRepository
) -> None:
    request_id, _ = await running_session(central, bus)
    with locked(db_path), pytest.raises(StorageError) as refused:
        await central.report_fault("CP-001", True, "ground fault")
    assert refused.value.http_status == 503
    assert not [u for u in updates(bus, request_id) if u.status.is_final]
    await central.report_fault("CP-001", True, "ground fault")  # the monitor retries
    assert [u.status for u in updates(bus, request_id) if u.status.is_final] == [
        DriverStatus.FAILED
    ]
    assert [f.event_type for f in await file_repo.list_faults()] == ["FAULT"]


# ---------------------------------------------------------------- late meter reports


async def test_a_late_end_report_corrects_a_closed_session(
    central: Controller, bus: RecordingPublisher, file_repo: SqliteRepository
) -> None:
    """A frozen CP: its monitor's fault report closes the session at the last telemetry;
    the CP then reports its own end, and the meter wins."""
    request_id, session_id = await running_session(central, bus)
    await central.report_fault("CP-001", True, "health check failed 3 times")
    failed = updates(bus, request_id)[-1]
    assert (failed.status, failed.kwh) == (DriverStatus.FAILED, 0.0122)
    await central.handle_status(end_status(session_id, 0.0367, 0.011, SessionResult.STOPPED))
    corrected = updates(bus, request_id)[-1]
    assert corrected.status is DriverStatus.FAILED  # one final status per request
    assert (corrected.kwh, corrected.euros) == (0.0367, 0.011)
    assert corrected.reason is not None and corrected.reason.startswith("corrected:")
    row = await file_repo.get_session(session_id)
    assert row is not None and (row.status, row.kwh, row.meter_final) == ("FAILED", 0.0367, True)
    # The same end again (a heartbeat repeating it) changes and sends nothing.
    count = len(bus.messages)
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, event=StatusEvent.HEARTBEAT,
        last_session=SessionEnd(session_id=session_id, result=SessionResult.STOPPED,
                                kwh=0.0367, euros=0.011),
    ))
    assert len(bus.messages) == count


async def test_a_session_the_cps_meter_completed_is_never_left_failed(
    central: Controller, bus: RecordingPublisher, file_repo: SqliteRepository
) -> None:
    """SPEC §4: a fault report raced the session's end; the CP's meter says COMPLETED, so
    the ledger records COMPLETED and the driver is told once more, 'corrected:'."""
    request_id, session_id = await running_session(central, bus)
    await central.report_fault("CP-001", True, "health check failed 3 times")
    assert updates(bus, request_id)[-1].status is DriverStatus.FAILED
    await central.handle_status(end_status(session_id, 0.0611, 0.0183, SessionResult.COMPLETED))
    corrected = updates(bus, request_id)[-1]
    assert (corrected.status, corrected.kwh) == (DriverStatus.COMPLETED, 0.0611)
    assert corrected.reason is not None and corrected.reason.startswith("corrected:")
    row = await file_repo.get_session(session_id)
    assert row is not None and (row.status, row.kwh) == ("COMPLETED", 0.0611)
    assert central.stats["sessions_completed_by_meter"] == 1  # counters never go down
    count = len(bus.messages)  # the heartbeats that repeat the end change nothing more
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, event=StatusEvent.HEARTBEAT,
        last_session=SessionEnd(session_id=session_id, result=SessionResult.COMPLETED,
                                kwh=0.0611, euros=0.0183),
    ))
    assert len(bus.messages) == count


async def test_late_telemetry_after_central_closed_the_session_corrects_it(
    central: Controller, bus: RecordingPublisher, file_repo: SqliteRepository
) -> None:
    request_id, session_id = await running_session(central, bus)
    await central.report_fault("CP-001", True, "monitor: no answer")
    await central.handle_telemetry(CPTelemetry(
        cp_id="CP-001", kw=22.0, kwh=0.02, euros=0.006, session_id=session_id,
    ))
    last = updates(bus, request_id)[-1]
    assert (last.status, last.kwh, last.euros) == (DriverStatus.FAILED, 0.02, 0.006)
    assert last.reason is not None and last.reason.startswith("corrected:")
    # Once the CP's end report is in, its totals are final: older telemetry cannot undo them.
    await central.handle_status(end_status(session_id, 0.03, 0.009, SessionResult.STOPPED))
    await central.handle_telemetry(CPTelemetry(
        cp_id="CP-001", kw=22.0, kwh=0.025, euros=0.0075, session_id=session_id,
    ))
    row = await file_repo.get_session(session_id)
    assert row is not None and (row.kwh, row.euros) == (0.03, 0.009)
    assert updates(bus, request_id)[-1].kwh == 0.03


async def test_an_end_status_seen_again_sends_nothing_and_moves_nothing(
    central: Controller, bus: RecordingPublisher
) -> None:
    """The same end again (a producer's retry, or a message handled again after a crash,
    whose answer left in no transaction): exactly once, so no final update repeats."""
    request_id, session_id = await running_session(central, bus)
    await central.handle_status(end_status(session_id, 0.0367, 0.011))
    count = len(updates(bus, request_id))
    central.get("CP-001").last_end = None  # a restarted Central has not seen it
    central._closed.clear()  # nor does it hold the closed session in memory
    await central.handle_status(end_status(session_id, 0.0367, 0.011))
    assert len(updates(bus, request_id)) == count
    assert central.stats["sessions_completed"] == 1


async def test_a_lost_end_status_is_recovered_from_the_next_heartbeat(
    central: Controller, bus: RecordingPublisher
) -> None:
    request_id, session_id = await running_session(central, bus)
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, event=StatusEvent.HEARTBEAT,
        last_session=SessionEnd(session_id=session_id, result=SessionResult.COMPLETED,
                                kwh=0.0367, euros=0.011),
    ))
    final = updates(bus, request_id)[-1]
    assert (final.status, final.kwh) == (DriverStatus.COMPLETED, 0.0367)
    assert central.decide("CP-001") is None


async def test_the_start_timeout_runs_from_when_start_supply_leaves(
    bus: RecordingPublisher, file_repo: SqliteRepository, db_path: Path
) -> None:
    """A database that holds a decision back is Central's own delay: the start timeout
    only runs once START_SUPPLY has left (found by the chaos suite's DB lock)."""
    central = FlushingController(bus, file_repo, CentralOptions(start_timeout=0.05))
    try:
        await central.register(CPRegistration(cp_id="CP-001"))
        await central.handle_status(
            CPStatus(cp_id="CP-001", state=CPState.ACTIVATED, event=StatusEvent.CONNECT)
        )
        req = driver_request()
        with locked(db_path), pytest.raises(StorageError):
            await central.handle_request(req)
        assert central._watchdogs == {}  # nothing armed while START_SUPPLY waits
        await central.flush()
        [start] = [c for c in bus.of(CentralCommand) if c.cmd is CommandType.START_SUPPLY]
        assert set(central._watchdogs) == {start.payload.session_id}
        failed = await bus.wait_for(DriverUpdate, lambda u: u.status.is_final)
        assert failed.reason is not None and "did not confirm" in failed.reason
    finally:
        await central.close()
