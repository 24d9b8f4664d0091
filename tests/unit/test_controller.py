"""Central's decisions, with a recording publisher and an in-memory SQLite repository."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from evcharging.apps.ev_central import housekeeping
from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.errors import NotAllowed, UnknownCP
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.apps.ev_central.schemas import cp_out
from evcharging.common.circuit_breaker import BreakerState
from evcharging.common.kafka import Topic
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
from evcharging.common.readclock import ReadClock
from tests.polling import poll
from tests.unit.conftest import FlushingController
from tests.unit.fakes import RecordingPublisher


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def central(
    bus: RecordingPublisher, repo: SqliteRepository, clock: Clock
) -> AsyncIterator[Controller]:
    controller = FlushingController(
        bus, repo, CentralOptions(start_timeout=0.2, breaker_failure_threshold=2), clock=clock
    )
    yield controller
    await controller.close()


async def activate(central: Controller, cp_id: str = "CP-001") -> None:
    await central.register(CPRegistration(cp_id=cp_id))
    await central.handle_status(CPStatus(cp_id=cp_id, state=CPState.ACTIVATED))


async def request(central: Controller, cp_id: str = "CP-001", request_id: str | None = None,
                  driver_id: str = "driver-alice") -> DriverRequest:
    message = DriverRequest(request_id=request_id or new_id(), driver_id=driver_id, cp_id=cp_id)
    await central.handle_request(message)
    return message


def updates(bus: RecordingPublisher, request_id: str) -> list[DriverUpdate]:
    return [u for u in bus.of(DriverUpdate) if u.request_id == request_id]


def commands(bus: RecordingPublisher, cmd: CommandType) -> list[CentralCommand]:
    return [c for c in bus.of(CentralCommand) if c.cmd is cmd]


async def start_session(central: Controller, bus: RecordingPublisher,
                        cp_id: str = "CP-001") -> tuple[DriverRequest, str]:
    req = await request(central, cp_id)
    (accepted,) = updates(bus, req.request_id)
    assert accepted.status is DriverStatus.ACCEPTED and accepted.session_id
    await central.handle_status(CPStatus(
        cp_id=cp_id, state=CPState.SUPPLYING, session_id=accepted.session_id,
        driver_id=req.driver_id,
    ))
    return req, accepted.session_id


async def test_accept_sends_start_supply_and_records_the_session(
    central: Controller, bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    await activate(central)
    req = await request(central)
    (accepted,) = updates(bus, req.request_id)
    assert accepted.status is DriverStatus.ACCEPTED
    (start,) = commands(bus, CommandType.START_SUPPLY)
    assert start.cp_id == "CP-001"
    assert start.payload.session_id == accepted.session_id
    assert start.payload.driver_id == "driver-alice"
    assert [t for t, _ in bus.messages] == [Topic.DRIVER_UPDATES, Topic.CENTRAL_COMMANDS]
    row = await repo.get_session(accepted.session_id)
    assert row is not None and row.status == "ACTIVE"
    assert central.get("CP-001").session is not None


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("unknown", "unknown CP"),
        ("disconnected", "CP disconnected"),
        ("stopped", "CP stopped"),
        ("fault_state", "CP faulty"),
        ("faulty_flag", "CP faulty"),
        ("busy", "CP busy"),
    ],
)
async def test_denied_reasons(
    central: Controller, bus: RecordingPublisher, setup: str, reason: str
) -> None:
    if setup != "unknown":
        await central.register(CPRegistration(cp_id="CP-001"))
    if setup in ("stopped", "fault_state", "faulty_flag", "busy"):
        await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED))
    if setup == "stopped":
        await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.STOPPED))
    if setup == "fault_state":
        await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.FAULT))
    if setup == "faulty_flag":
        await central.report_fault("CP-001", True, "monitor lost it")
    if setup == "busy":
        await request(central)
    req = await request(central)
    (update,) = updates(bus, req.request_id)
    assert (update.status, update.reason) == (DriverStatus.DENIED, reason)


async def test_circuit_open_after_failed_starts(
    central: Controller, bus: RecordingPublisher
) -> None:
    await activate(central)
    for _ in range(2):
        req = await request(central)
        session_id = updates(bus, req.request_id)[0].session_id
        await central.handle_status(CPStatus(
            cp_id="CP-001", state=CPState.ACTIVATED, session_id=session_id,
            event=StatusEvent.REFUSED, cmd=CommandType.START_SUPPLY,
            reason="no charger here",
        ))
        assert updates(bus, req.request_id)[-1].status is DriverStatus.FAILED
    assert central.get("CP-001").breaker.state is BreakerState.OPEN
    denied = await request(central)
    assert updates(bus, denied.request_id)[0].reason == "circuit open"


async def test_start_timeout_fails_the_request(
    central: Controller, bus: RecordingPublisher
) -> None:
    await activate(central)
    req = await request(central)
    failed = await bus.wait_for(
        DriverUpdate, lambda u: u.request_id == req.request_id and u.status.is_final
    )
    assert failed.status is DriverStatus.FAILED
    assert failed.reason and "did not confirm" in failed.reason
    assert central.get("CP-001").session is None
    assert central.get("CP-001").breaker.failures == 1
    assert commands(bus, CommandType.STOP_SUPPLY)


async def test_telemetry_becomes_in_progress_and_completion_completes(
    central: Controller, bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    await activate(central)
    req, session_id = await start_session(central, bus)
    for kwh in (0.1, 0.2):
        await central.handle_telemetry(CPTelemetry(
            cp_id="CP-001", kw=22, kwh=kwh, euros=kwh * 0.3, session_id=session_id,
        ))
    await central.handle_telemetry(CPTelemetry(
        cp_id="CP-001", kw=22, kwh=9, euros=9, session_id="someone-else",
    ))
    progress = [u for u in updates(bus, req.request_id) if u.status is DriverStatus.IN_PROGRESS]
    assert [u.kwh for u in progress] == [0.1, 0.2]
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, session_id=session_id, kwh=0.25, euros=0.075,
        session_result=SessionResult.COMPLETED,
    ))
    final = updates(bus, req.request_id)[-1]
    assert (final.status, final.kwh, final.euros) == (DriverStatus.COMPLETED, 0.25, 0.075)
    row = await repo.get_session(session_id)
    assert row is not None and (row.status, row.kwh, row.euros) == ("COMPLETED", 0.25, 0.075)
    cp = central.get("CP-001")
    assert cp.state is CPState.ACTIVATED and cp.session is None


async def test_duplicate_request_id_starts_one_session(
    central: Controller, bus: RecordingPublisher
) -> None:
    await activate(central)
    req = await request(central, request_id="same")
    await request(central, request_id="same")
    assert len(updates(bus, req.request_id)) == 1
    assert len(commands(bus, CommandType.START_SUPPLY)) == 1
    assert central.stats["duplicate_requests"] == 1


async def test_expired_request_is_denied(central: Controller, bus: RecordingPublisher) -> None:
    """Its age is the broker's: the time since the broker appended it."""
    await activate(central)
    old = DriverRequest(request_id="old", driver_id="d", cp_id="CP-001")
    central.readclock.arrived(Topic.DRIVER_REQUESTS, 0, (utcnow() - timedelta(hours=1)).timestamp())
    await central.handle_request(old)
    assert updates(bus, "old")[0].reason.startswith("request expired")  # type: ignore[union-attr]


async def test_a_drivers_clock_never_ages_a_request(
    central: Controller, bus: RecordingPublisher
) -> None:
    """SPEC §4: a driver whose clock is an hour behind (or ahead) is decided as any other:
    the broker appended its request just now."""
    await activate(central)
    for request_id, skew in (("behind", -3600), ("ahead", 3600)):
        skewed = DriverRequest(request_id=request_id, driver_id="d", cp_id="CP-001",
                               ts=utcnow() + timedelta(seconds=skew))
        central.readclock.arrived(Topic.DRIVER_REQUESTS, 0, utcnow().timestamp())
        await central.handle_request(skewed)
        [accepted] = updates(bus, request_id)
        assert accepted.status is DriverStatus.ACCEPTED
        central.end_session(central.get("CP-001"), SessionResult.COMPLETED, None)


async def test_monitor_fault_fails_the_session_and_recovery_half_opens(
    central: Controller, bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    await activate(central)
    req, _session_id = await start_session(central, bus)
    await central.report_fault("CP-001", True, "health check failed 3 times")
    final = updates(bus, req.request_id)[-1]
    assert final.status is DriverStatus.FAILED
    assert final.reason == "CP fault: health check failed 3 times"
    cp = central.get("CP-001")
    assert (cp.state, cp.is_faulty, cp.breaker.state) == (
        CPState.FAULT, True, BreakerState.OPEN
    )
    await central.report_fault("CP-001", True, "again")  # idempotent
    await central.report_fault("CP-001", False, "health checks pass again")
    assert not cp.is_faulty and cp.breaker.state is BreakerState.HALF_OPEN
    events = await repo.list_faults(cp_id="CP-001")
    assert [e.event_type for e in events] == ["RECOVERY", "FAULT"]

    # The engine comes back; the trial session closes the breaker.
    await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED))
    assert cp.state is CPState.ACTIVATED
    _, trial = await start_session(central, bus)
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, session_id=trial, kwh=1, euros=0.3,
        session_result=SessionResult.COMPLETED,
    ))
    assert cp.breaker.state is BreakerState.CLOSED


async def test_failed_trial_reopens_the_breaker(
    central: Controller, bus: RecordingPublisher
) -> None:
    await activate(central)
    await central.report_fault("CP-001", True, "down")
    await central.report_fault("CP-001", False, "up")
    await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED))
    _, trial = await start_session(central, bus)
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.FAULT, session_id=trial, kwh=0.1, euros=0.03,
        session_result=SessionResult.FAILED, reason="overheated",
    ))
    assert central.get("CP-001").breaker.state is BreakerState.OPEN


async def test_engine_restart_mid_session_fails_it(
    central: Controller, bus: RecordingPublisher
) -> None:
    await activate(central)
    req, _ = await start_session(central, bus)
    await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED,
                                         event=StatusEvent.CONNECT))
    final = updates(bus, req.request_id)[-1]
    assert final.status is DriverStatus.FAILED
    assert central.get("CP-001").state is CPState.ACTIVATED


async def test_unknown_session_on_a_cp_is_stopped(
    central: Controller, bus: RecordingPublisher
) -> None:
    await activate(central)
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.SUPPLYING, session_id="orphan", driver_id="d",
    ))
    (stop,) = commands(bus, CommandType.STOP_SUPPLY)
    assert stop.payload.session_id == "orphan"
    assert central.get("CP-001").state is CPState.SUPPLYING
    assert central.decide("CP-001") == "CP busy"


async def test_operator_stop_and_resume(central: Controller, bus: RecordingPublisher) -> None:
    await activate(central)
    await central.stop_cp("CP-001", "maintenance")
    (stop,) = commands(bus, CommandType.STOP_CP)
    assert stop.payload.reason == "maintenance"
    with pytest.raises(NotAllowed):
        await central.resume_cp("CP-001")
    await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.STOPPED))
    await central.resume_cp("CP-001")
    assert commands(bus, CommandType.RESUME_CP)
    with pytest.raises(UnknownCP):
        await central.stop_cp("CP-404")


async def test_operator_stop_mid_session_reports_it_stopped(
    central: Controller, bus: RecordingPublisher
) -> None:
    await activate(central)
    req, session_id = await start_session(central, bus)
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.STOPPED, session_id=session_id, kwh=0.1, euros=0.03,
        session_result=SessionResult.STOPPED, reason="maintenance",
    ))
    final = updates(bus, req.request_id)[-1]
    assert (final.status, final.reason) == (DriverStatus.FAILED, "session stopped: maintenance")
    assert central.get("CP-001").breaker.state is BreakerState.CLOSED
    assert central.get("CP-001").breaker.failures == 0


async def test_state_follows_reports_through_the_machine(central: Controller) -> None:
    await central.register(CPRegistration(cp_id="CP-001"))
    cp = central.get("CP-001")
    for state in (CPState.STOPPED, CPState.DISCONNECTED, CPState.FAULT, CPState.SUPPLYING,
                  CPState.ACTIVATED):
        await central.handle_status(CPStatus(cp_id="CP-001", state=state))
        assert cp.state is state


async def restarted(
    bus: RecordingPublisher, repo: SqliteRepository
) -> tuple[Controller, DriverRequest, str]:
    """A Central with CP-001 (fault then recovery) and a session on CP-002, then a second
    Central over the same database, as after a crash."""
    first = FlushingController(bus, repo, CentralOptions(breaker_failure_threshold=2))
    await activate(first)
    await first.report_fault("CP-001", True, "down")
    await first.handle_status(CPStatus(cp_id="CP-001", state=CPState.FAULT))
    await activate(first, "CP-002")
    req, session_id = await start_session(first, bus, "CP-002")
    await first.close()
    second = FlushingController(bus, repo, CentralOptions(breaker_failure_threshold=2))
    await second.load()
    return second, req, session_id


async def test_restart_reloads_the_registry_breakers_and_running_sessions(
    bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    second, req, session_id = await restarted(bus, repo)
    try:
        assert set(second.cps) == {"CP-001", "CP-002"}
        cp1 = second.get("CP-001")
        assert (cp1.state, cp1.is_faulty, cp1.breaker.state) == (
            CPState.FAULT, True, BreakerState.OPEN,
        )
        assert cp1.state_reason == "down"
        assert second.get("CP-002").state is CPState.SUPPLYING
        [row] = await repo.active_sessions()  # nothing closed before the CPs are heard
        assert row.session_id == session_id
        assert second.decide("CP-002") == "CP busy"
        again = await request(second, request_id=req.request_id, cp_id="CP-002")
        assert len(updates(bus, again.request_id)) == 1  # no new answer for a replay
    finally:
        await second.close()


async def test_after_a_restart_the_cps_end_report_settles_the_session(
    bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    second, req, session_id = await restarted(bus, repo)
    try:
        await second.handle_status(CPStatus(
            cp_id="CP-002", state=CPState.ACTIVATED, event=StatusEvent.SESSION_COMPLETE,
            session_id=session_id, session_result=SessionResult.COMPLETED,
            kwh=0.0367, euros=0.011,
        ))
        final = updates(bus, req.request_id)[-1]
        assert (final.status, final.kwh, final.euros) == (DriverStatus.COMPLETED, 0.0367, 0.011)
        row = await repo.get_session(session_id)
        assert row is not None and (row.status, row.kwh, row.meter_final) == (
            "COMPLETED", 0.0367, True,
        )
    finally:
        await second.close()


async def test_after_a_restart_a_heartbeats_last_session_settles_it(
    bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    second, req, session_id = await restarted(bus, repo)
    try:
        await second.handle_status(CPStatus(
            cp_id="CP-002", state=CPState.ACTIVATED, event=StatusEvent.HEARTBEAT,
            last_session=SessionEnd(session_id=session_id, result=SessionResult.COMPLETED,
                                    kwh=0.02, euros=0.006),
        ))
        final = updates(bus, req.request_id)[-1]
        assert (final.status, final.kwh) == (DriverStatus.COMPLETED, 0.02)
        assert second.decide("CP-002") is None
    finally:
        await second.close()


async def test_after_a_restart_a_cp_that_claims_the_session_keeps_it(
    bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    second, req, session_id = await restarted(bus, repo)
    try:
        await second.handle_status(CPStatus(
            cp_id="CP-002", state=CPState.SUPPLYING, event=StatusEvent.HEARTBEAT,
            session_id=session_id, driver_id="driver-alice",
        ))
        session = second.get("CP-002").session
        assert session is not None and not session.resumed
        assert updates(bus, req.request_id)[-1].status is DriverStatus.ACCEPTED
    finally:
        await second.close()


async def test_after_a_restart_a_session_no_cp_claims_fails_with_the_ledgers_totals(
    bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    second, req, _ = await restarted(bus, repo)
    try:
        await second.handle_status(CPStatus(
            cp_id="CP-002", state=CPState.ACTIVATED, event=StatusEvent.HEARTBEAT,
        ))
        final = updates(bus, req.request_id)[-1]
        assert final.status is DriverStatus.FAILED
        assert await repo.active_sessions() == []
        assert second.get("CP-002").breaker.failures == 0  # not the CP's failure
    finally:
        await second.close()


async def test_status_from_an_unknown_cp_registers_it(central: Controller) -> None:
    await central.handle_status(CPStatus(cp_id="CP-NEW", state=CPState.ACTIVATED))
    assert central.get("CP-NEW").state is CPState.ACTIVATED
    assert central.decide("CP-NEW") is None


async def test_publish_failures_are_counted_not_raised(
    central: Controller, bus: RecordingPublisher
) -> None:
    await activate(central)
    bus.fail = True
    await request(central)
    assert central.stats["publish_errors"] >= 1


async def test_snapshots_write_history_of_changed_cps_only(
    central: Controller, repo: SqliteRepository, clock: Clock
) -> None:
    await activate(central)
    await activate(central, "CP-002")
    assert await central.snapshot_health() == 0  # each state change wrote its own row
    await central.report_fault("CP-002", True, "hot")
    before = len(await repo.cp_history("CP-002"))
    clock.now += 31.0  # the breaker's reset timeout passes: HALF_OPEN, with no event
    assert await central.snapshot_health() == 1
    history = await repo.cp_history("CP-002")
    assert len(history) > before
    assert history[0].breaker_state == "HALF_OPEN"
    assert await central.snapshot_health() == 0


async def test_denied_request_replayed_after_restart_is_not_decided_again(
    bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    first = FlushingController(bus, repo)
    await activate(first)
    await first.handle_status(CPStatus(cp_id="CP-001", state=CPState.STOPPED))
    req = await request(first, request_id="replayed")
    assert updates(bus, "replayed")[0].reason == "CP stopped"
    await first.close()

    second = FlushingController(bus, repo)
    await second.load()
    try:
        await second.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED))
        await second.handle_request(req)  # the same message, replayed by Kafka
        assert [u.status for u in updates(bus, "replayed")] == [DriverStatus.DENIED]
        assert not commands(bus, CommandType.START_SUPPLY)
    finally:
        await second.close()


async def test_start_timeout_stops_the_old_session_before_a_new_start(
    central: Controller, bus: RecordingPublisher
) -> None:
    await activate(central)
    first = await request(central)
    await bus.wait_for(DriverUpdate, lambda u: u.request_id == first.request_id
                       and u.status is DriverStatus.FAILED)
    await request(central)
    sequence = [(c.cmd, c.payload.session_id) for c in bus.of(CentralCommand)]
    first_session = updates(bus, first.request_id)[0].session_id
    assert sequence[:2] == [(CommandType.START_SUPPLY, first_session),
                            (CommandType.STOP_SUPPLY, first_session)]
    assert sequence[2][0] is CommandType.START_SUPPLY


async def test_a_fault_before_the_flush_ends_the_session_it_interrupts(
    bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    """A fault report that comes between a decision and its batch's flush: the session is
    recorded and ended, and the CP hears START then STOP, never a START left behind."""
    central = Controller(bus, repo)
    await central.register(CPRegistration(cp_id="CP-001"))
    await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED))
    req = DriverRequest(request_id="r-1", driver_id="driver-alice", cp_id="CP-001")
    await central.handle_request(req)  # decided, not yet flushed
    assert bus.of(DriverUpdate) == []
    await central.report_fault("CP-001", True, "monitor lost it")  # flushes both
    assert [u.status for u in updates(bus, "r-1")] == [DriverStatus.ACCEPTED,
                                                       DriverStatus.FAILED]
    assert [c.cmd for c in bus.of(CentralCommand)] == [CommandType.START_SUPPLY,
                                                      CommandType.STOP_SUPPLY]
    assert await repo.active_sessions() == []
    [row] = await repo.list_sessions()
    assert row.status == "FAILED"
    await central.close()


async def test_a_restarted_cp_stays_stopped(central: Controller, bus: RecordingPublisher) -> None:
    await activate(central)
    await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.STOPPED,
                                         reason="maintenance"))
    await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED,
                                         event=StatusEvent.CONNECT))
    (again,) = commands(bus, CommandType.STOP_CP)
    assert again.payload.reason == "maintenance"
    assert central.get("CP-001").state is CPState.STOPPED
    assert central.decide("CP-001") == "CP stopped"


async def test_a_silent_cp_is_disconnected_and_its_session_failed(
    bus: RecordingPublisher, repo: SqliteRepository, clock: Clock
) -> None:
    """Silence is how far Central has read the CP's partitions past its last message
    (SPEC §4): a stall or a paused broker counts as one short step, not as silence."""
    readclock = ReadClock(monotonic=clock)
    readclock.partition_counts.update({Topic.CP_STATUS: 1, Topic.CP_TELEMETRY: 1})
    central = FlushingController(bus, repo, CentralOptions(cp_silence_timeout=30),
                                 readclock=readclock)
    try:
        read_to(readclock)
        await activate(central)
        req, _ = await start_session(central, bus)
        assert await central.check_silent_cps() == []
        clock.now += 600.0  # Central stalled, or the broker paused: nothing read
        read_to(readclock)  # the first answered fetch counts as one short step
        assert await central.check_silent_cps() == []
        for _ in range(16):  # then 32 s of reading, caught up, with nothing from CP-001
            clock.now += 2.0
            read_to(readclock)
        assert await central.check_silent_cps() == ["CP-001"]
        final = updates(bus, req.request_id)[-1]
        assert final.status is DriverStatus.FAILED and "CP lost" in (final.reason or "")
        assert central.decide("CP-001") == "CP disconnected"
        assert await repo.active_sessions() == []
        # It speaks again: Central follows it back.
        await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED))
        assert central.decide("CP-001") is None
    finally:
        await central.close()


# ---------------------------------------------------------------------- routing on `event`


async def test_a_reason_that_reads_like_a_protocol_word_decides_nothing(
    central: Controller, bus: RecordingPublisher
) -> None:
    """Only `event` is decided on: a heartbeat whose reason says 'refused'/'connected' is a
    heartbeat."""
    await activate(central)
    req, session_id = await start_session(central, bus)
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.SUPPLYING, session_id=session_id,
        event=StatusEvent.HEARTBEAT, reason="refused START_SUPPLY: just a string",
    ))
    assert updates(bus, req.request_id)[-1].status is DriverStatus.ACCEPTED
    assert central.get("CP-001").session is not None
    await central.stop_cp("CP-001", "maintenance")
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.STOPPED, event=StatusEvent.STOP_CP, reason="maintenance",
        session_id=session_id, session_result=SessionResult.STOPPED, kwh=0.1, euros=0.03,
    ))
    stops = len(commands(bus, CommandType.STOP_CP))
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, event=StatusEvent.HEARTBEAT, reason="connected",
    ))
    assert len(commands(bus, CommandType.STOP_CP)) == stops  # not taken as a restart


async def test_a_refusal_fails_an_unconfirmed_start_whatever_its_reason(
    central: Controller, bus: RecordingPublisher
) -> None:
    await activate(central)
    req = await request(central)
    session_id = updates(bus, req.request_id)[0].session_id
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, session_id=session_id,
        event=StatusEvent.REFUSED, cmd=CommandType.START_SUPPLY, reason="supplying",
    ))
    final = updates(bus, req.request_id)[-1]
    assert final.status is DriverStatus.FAILED
    assert final.reason is not None and "refused" in final.reason


@pytest.mark.parametrize(
    ("event", "result"),
    [(StatusEvent.SESSION_COMPLETE, SessionResult.COMPLETED),
     (StatusEvent.STOP_SUPPLY, SessionResult.STOPPED)],
)
async def test_the_cps_own_event_moves_centrals_view(
    central: Controller, bus: RecordingPublisher, event: StatusEvent, result: SessionResult
) -> None:
    await activate(central)
    req, session_id = await start_session(central, bus)
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, event=event, session_id=session_id,
        session_result=result, kwh=0.05, euros=0.015,
    ))
    assert central.get("CP-001").state is CPState.ACTIVATED
    assert updates(bus, req.request_id)[-1].kwh == pytest.approx(0.05)


async def test_a_status_without_event_is_followed_by_its_state(
    central: Controller, bus: RecordingPublisher
) -> None:
    await activate(central)
    await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.FAULT))
    assert central.get("CP-001").state is CPState.FAULT
    await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED))
    assert central.get("CP-001").state is CPState.ACTIVATED


# ---------------------------------------------------------------------- monitor liveness


async def test_a_silent_monitor_is_lost_after_three_intervals_and_back_on_its_report(
    central: Controller, clock: Clock, repo: SqliteRepository
) -> None:
    await activate(central)
    cp = central.get("CP-001")
    assert not cp.monitored  # no monitor has reported yet
    await central.monitor_report("CP-001", 1.0, True)
    assert cp.monitored
    clock.now += 3.0
    assert await central.check_monitors() == []
    clock.now += 0.5
    assert await central.check_monitors() == ["CP-001"]
    assert not cp.monitored
    assert await central.check_monitors() == []  # one event per loss
    [lost] = await repo.list_faults(cp_id="CP-001")
    assert lost.event_type == "MONITOR_LOST" and "monitor lost" in (lost.reason or "")
    assert central.decide("CP-001") is None  # the CP itself may still work
    await central.monitor_report("CP-001", 1.0, True)
    assert cp.monitored
    back = await repo.list_faults(cp_id="CP-001")
    assert [f.event_type for f in back] == ["MONITOR_BACK", "MONITOR_LOST"]


async def test_a_stall_of_centrals_own_is_not_counted_against_the_monitors(
    central: Controller, clock: Clock
) -> None:
    """Central was stopped (SIGSTOP) for 45 s: its monitors could not reach it."""
    await activate(central)
    await central.monitor_report("CP-001", 1.0, True)
    clock.now += 45.0
    housekeeping.forgive_stall(central, 44.0)  # the round came 44 s late
    assert await central.check_monitors() == []
    housekeeping.forgive_stall(central, 1.0)  # a round a second late is no stall
    clock.now += 3.5
    assert await central.check_monitors() == ["CP-001"]


async def test_a_monitor_report_for_an_unknown_cp_is_refused(central: Controller) -> None:
    with pytest.raises(UnknownCP):
        await central.monitor_report("CP-NOPE", 1.0, True)


async def test_breaker_failures_survive_a_restart(
    bus: RecordingPublisher, repo: SqliteRepository, clock: Clock
) -> None:
    first = FlushingController(
        bus, repo, CentralOptions(start_timeout=0.05, breaker_failure_threshold=3), clock=clock
    )
    await activate(first)
    req = await request(first)
    await bus.wait_for(DriverUpdate, lambda u: u.request_id == req.request_id and u.status.is_final)
    assert first.get("CP-001").breaker.failures == 1
    await first.close()
    second = FlushingController(bus, repo, CentralOptions(breaker_failure_threshold=3), clock=clock)
    await second.load()
    assert second.get("CP-001").breaker.failures == 1


async def test_after_a_restart_a_replayed_report_from_before_the_session_fails_nothing(
    bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    """Found by the chaos suite: the consumer replays what it had not committed, e.g. the
    previous session's end, which says nothing about the session that followed."""
    second, req, session_id = await restarted(bus, repo)
    try:
        session = second.get("CP-002").session
        assert session is not None
        old = session.started_at - timedelta(seconds=2)
        await second.handle_status(CPStatus(
            cp_id="CP-002", state=CPState.ACTIVATED, event=StatusEvent.SESSION_COMPLETE, ts=old,
        ))
        assert second.get("CP-002").session is session
        assert not [u for u in updates(bus, req.request_id) if u.status.is_final]
        await second.handle_status(CPStatus(
            cp_id="CP-002", state=CPState.SUPPLYING, event=StatusEvent.HEARTBEAT,
            session_id=session_id, driver_id="driver-alice",
        ))
        assert not session.resumed  # the CP claims it
    finally:
        await second.close()


async def test_a_round_that_loses_many_monitors_logs_one_line(
    central: Controller, clock: Clock
) -> None:
    from loguru import logger

    for i in range(25):
        await central.register(CPRegistration(cp_id=f"CP-{i:03d}"))
        await central.monitor_report(f"CP-{i:03d}", 1.0, True)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    try:
        clock.now += 10.0
        assert len(await central.check_monitors()) == 25
    finally:
        logger.remove(sink)
    assert len(lines) == 11  # ten named, then one line for the whole round
    assert lines[-1].startswith("25 CPs lost their monitor (CP-000, ")


def read_to(readclock: ReadClock, *, caught_up: bool = True) -> None:
    """The broker answered a fetch of every CP partition (partition 0 of one)."""
    for topic in (Topic.CP_STATUS, Topic.CP_TELEMETRY):
        readclock.fetched(topic, 0, answered=True, caught_up=caught_up)


async def test_a_start_is_failed_only_once_the_cps_partitions_are_read_past_the_timeout(
    bus: RecordingPublisher, repo: SqliteRepository, clock: Clock
) -> None:
    """SPEC §4: a start counts as confirmed when the CP's message says so, however late
    Central reads it; while Central cannot read the CP's partitions (a stall, a paused
    broker) or reads a backlog, the start timeout does not run."""
    readclock = ReadClock(monotonic=clock)
    readclock.partition_counts.update({Topic.CP_STATUS: 1, Topic.CP_TELEMETRY: 1})
    central = FlushingController(bus, repo, CentralOptions(start_timeout=0.05),
                                 readclock=readclock)
    try:
        await activate(central)
        read_to(readclock)
        req = await request(central)
        session_id = updates(bus, req.request_id)[0].session_id
        await poll(lambda: central._watchdogs, timeout=2, what="the start timeout armed")
        watchdog = central._watchdogs[session_id or ""]
        clock.now += 60.0  # a minute of Central's own time, but no fetch answered
        await poll(lambda: central.stats["start_timeouts"] == 0 and not watchdog.done(),
                   timeout=0.5, what="still waiting")
        read_to(readclock, caught_up=False)  # answered, but a backlog: no progress yet
        await poll(lambda: not watchdog.done(), timeout=0.3, what="still waiting")
        # The backlog holds the CP's confirmation, sent in time: the session lives.
        await central.handle_status(CPStatus(
            cp_id="CP-001", state=CPState.SUPPLYING, event=StatusEvent.START_SUPPLY,
            session_id=session_id, driver_id="driver-alice",
        ))
        assert central.get("CP-001").session is not None
        assert not [u for u in updates(bus, req.request_id) if u.status.is_final]
    finally:
        await central.close()


async def test_an_unconfirmed_start_fails_once_the_cps_partitions_are_read_past_it(
    bus: RecordingPublisher, repo: SqliteRepository, clock: Clock
) -> None:
    readclock = ReadClock(monotonic=clock)
    readclock.partition_counts.update({Topic.CP_STATUS: 1, Topic.CP_TELEMETRY: 1})
    central = FlushingController(bus, repo, CentralOptions(start_timeout=0.05),
                                 readclock=readclock)
    try:
        await activate(central)
        read_to(readclock)
        req = await request(central)
        await poll(lambda: central._watchdogs, timeout=2, what="the start timeout armed")
        for _ in range(3):  # caught up: Central's own time counts, a step at a time
            clock.now += 0.05
            read_to(readclock)
        final = await bus.wait_for(
            DriverUpdate, lambda u: u.request_id == req.request_id and u.status.is_final)
        assert final.status is DriverStatus.FAILED
        assert central.stats["start_timeouts"] == 1
    finally:
        await central.close()


async def test_an_ocpp_chargers_protocol_vendor_and_model_are_kept_and_shown(
    bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    """SPEC §8: the gateway registers each connector with what BootNotification said."""
    first = Controller(bus, repo)
    await first.register(CPRegistration(cp_id="ACME-7.1", protocol="ocpp1.6",
                                        vendor="Acme", model="Volt 22"))
    shown = cp_out(first.get("ACME-7.1"))
    assert (shown.protocol, shown.vendor, shown.model) == ("ocpp1.6", "Acme", "Volt 22")
    await first.register(CPRegistration(cp_id="ACME-7.1", location="bay 3"))  # kept
    await first.close()
    second = Controller(bus, repo)
    await second.load()
    again = second.get("ACME-7.1")
    assert (again.protocol, again.vendor, again.model, again.location) == (
        "ocpp1.6", "Acme", "Volt 22", "bay 3")
    await second.close()


async def test_a_session_the_charger_started_is_recorded_and_billed_without_a_request(
    central: Controller, bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    """SPEC §8: an id tag at an OCPP charger; the charger is already charging."""
    await activate(central)
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.SUPPLYING, event=StatusEvent.START_SUPPLY,
        session_id="tx-abc", driver_id="driver-bob"))
    session = central.get("CP-001").session
    assert session is not None and session.driver_id == "driver-bob"
    assert commands(bus, CommandType.STOP_SUPPLY) == []
    [confirm] = commands(bus, CommandType.START_SUPPLY)  # the verdict the gateway awaits
    assert (confirm.payload.session_id, confirm.payload.driver_id) == ("tx-abc", "driver-bob")
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, event=StatusEvent.SESSION_COMPLETE,
        last_session=SessionEnd(session_id="tx-abc", result=SessionResult.COMPLETED,
                                kwh=4.2, euros=1.26)))
    row = await repo.get_session("tx-abc")
    assert row is not None and (row.status, row.kwh, row.request_id) == (
        "COMPLETED", 4.2, "charger.tx-abc")
    assert central.stats["sessions_started_by_charger"] == 1


async def test_a_session_the_charger_started_where_central_would_deny_is_stopped(
    central: Controller, bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    await activate(central)
    central.get("CP-001").breaker.trip("three failed starts")
    await central.handle_status(CPStatus(
        cp_id="CP-001", state=CPState.SUPPLYING, event=StatusEvent.START_SUPPLY,
        session_id="tx-def", driver_id="driver-bob"))
    [stop] = commands(bus, CommandType.STOP_SUPPLY)
    assert stop.payload.session_id == "tx-def"
    assert stop.payload.reason == "Central would have denied it: circuit open"
    assert commands(bus, CommandType.START_SUPPLY) == []
    row = await repo.get_session("tx-def")
    assert row is not None and row.status == "ACTIVE"  # billed by its meter when it ends


async def test_an_unknown_session_an_engine_supplies_is_still_stopped(
    central: Controller, bus: RecordingPublisher
) -> None:
    """No driver and no start event: not a charger's own session."""
    await activate(central)
    await central.handle_status(CPStatus(cp_id="CP-001", state=CPState.SUPPLYING,
                                         session_id="ghost", event=StatusEvent.HEARTBEAT))
    [stop] = commands(bus, CommandType.STOP_SUPPLY)
    assert stop.payload.reason == "session unknown to Central"
    assert central.get("CP-001").session is None
