"""Central and other programs' clocks (SPEC §4 "Clocks and stalls"): a CP's `ts` orders
that CP's reports and dates its sessions, and moves no clock of Central's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest

from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.common.bus import Topic
from evcharging.common.messages import (
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
from tests.unit.conftest import FlushingController
from tests.unit.fakes import RecordingPublisher


class Clocks:
    def __init__(self) -> None:
        self.mono = 0.0
        self.wall = utcnow().timestamp()

    def step(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
async def central(
    bus: RecordingPublisher, repo: SqliteRepository, clocks: Clocks
) -> AsyncIterator[FlushingController]:
    """Central as its consumer drives it: every message arrives with an append time."""
    readclock = ReadClock(monotonic=lambda: clocks.mono, wall=lambda: clocks.wall)
    readclock.partition_counts.update({Topic.CP_STATUS: 1, Topic.CP_TELEMETRY: 1})
    controller = FlushingController(bus, repo, CentralOptions(start_timeout=30.0),
                                    readclock=readclock)
    yield controller
    await controller.close()


def appended(central: Controller, clocks: Clocks, topic: Topic) -> None:
    """The consumer read a message the broker appended just now."""
    central.readclock.arrived(topic, 0, clocks.wall)


async def status(central: Controller, clocks: Clocks, message: CPStatus) -> None:
    appended(central, clocks, Topic.CP_STATUS)
    await central.handle_status(message)


async def telemetry(central: Controller, clocks: Clocks, message: CPTelemetry) -> None:
    appended(central, clocks, Topic.CP_TELEMETRY)
    await central.handle_telemetry(message)


async def accepted_session(
    central: Controller, bus: RecordingPublisher, clocks: Clocks
) -> tuple[DriverRequest, str]:
    await central.register(CPRegistration(cp_id="CP-001"))
    await status(central, clocks, CPStatus(cp_id="CP-001", state=CPState.ACTIVATED))
    req = DriverRequest(request_id=new_id(), driver_id="driver-alice", cp_id="CP-001")
    appended(central, clocks, Topic.DRIVER_REQUESTS)
    await central.handle_request(req)
    [accepted] = [u for u in bus.of(DriverUpdate) if u.request_id == req.request_id]
    assert accepted.status is DriverStatus.ACCEPTED and accepted.session_id
    return req, accepted.session_id


def finals(bus: RecordingPublisher, request_id: str) -> list[DriverUpdate]:
    return [u for u in bus.of(DriverUpdate) if u.request_id == request_id and u.status.is_final]


async def test_an_older_heartbeat_read_after_the_first_report_fails_nothing(
    central: Controller, bus: RecordingPublisher, clocks: Clocks
) -> None:
    """Found at 20,000 CPs: Central confirmed a session from cp.telemetry, then read an
    older heartbeat on cp.status that the CP had sent before START_SUPPLY."""
    req, session_id = await accepted_session(central, bus, clocks)
    sent_at = utcnow()
    await telemetry(central, clocks, CPTelemetry(
        cp_id="CP-001", kw=22, kwh=0.1, euros=0.03, driver_id="driver-alice",
        session_id=session_id, ts=sent_at))
    await status(central, clocks, CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, event=StatusEvent.HEARTBEAT,
        ts=sent_at - timedelta(seconds=1)))
    assert central.get("CP-001").session is not None
    assert finals(bus, req.request_id) == []


@pytest.mark.parametrize("skew", [-60.0, 0.0, 3600.0])
async def test_a_session_is_dated_by_its_cps_clock_and_completes_whatever_the_skew(
    central: Controller, bus: RecordingPublisher, repo: SqliteRepository, clocks: Clocks,
    skew: float,
) -> None:
    """A CP whose clock is a minute behind (or an hour ahead) is served as any other. Its
    session is dated by its reports, and a report stamped after its append time is dated
    by the append time."""
    req, session_id = await accepted_session(central, bus, clocks)
    start = datetime.fromtimestamp(clocks.wall + skew, tz=utcnow().tzinfo)
    await status(central, clocks, CPStatus(
        cp_id="CP-001", state=CPState.SUPPLYING, event=StatusEvent.START_SUPPLY,
        session_id=session_id, driver_id="driver-alice", ts=start))
    for second in range(1, 11):
        clocks.step(1.0)
        await telemetry(central, clocks, CPTelemetry(
            cp_id="CP-001", kw=22, kwh=0.06 * second, euros=0.018 * second,
            driver_id="driver-alice", session_id=session_id,
            ts=start + timedelta(seconds=second)))
    clocks.step(1.0)
    end = start + timedelta(seconds=10.5)
    await status(central, clocks, CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, event=StatusEvent.SESSION_COMPLETE,
        ts=end, last_session=SessionEnd(session_id=session_id,
                                        result=SessionResult.COMPLETED, kwh=0.63,
                                        euros=0.189)))
    [final] = finals(bus, req.request_id)
    assert (final.status, final.kwh) == (DriverStatus.COMPLETED, 0.63)
    row = await repo.get_session(session_id)
    assert row is not None and row.status == "COMPLETED"
    assert row.ended_at is not None
    if skew <= 0:  # the CP's own times: ten and a half seconds
        assert row.started_at == start
        assert (row.ended_at - row.started_at).total_seconds() == pytest.approx(10.5)
    else:  # stamped in the future: dated by the broker, never later
        assert row.ended_at <= datetime.fromtimestamp(clocks.wall, tz=row.ended_at.tzinfo)
    assert central.get("CP-001").breaker.failures == 0


async def test_a_future_stamped_status_makes_no_cp_silent(
    central: Controller, bus: RecordingPublisher, clocks: Clocks
) -> None:
    """Found by an attacker: one status stamped an hour ahead made every later round mark
    all CPs DISCONNECTED."""
    req, session_id = await accepted_session(central, bus, clocks)
    await status(central, clocks, CPStatus(
        cp_id="CP-001", state=CPState.SUPPLYING, session_id=session_id,
        driver_id="driver-alice"))
    await central.register(CPRegistration(cp_id="CP-666"))
    await status(central, clocks, CPStatus(
        cp_id="CP-666", state=CPState.ACTIVATED, ts=utcnow() + timedelta(hours=1)))
    for topic in (Topic.CP_STATUS, Topic.CP_TELEMETRY):
        central.readclock.fetched(topic, 0, answered=True, caught_up=True)
    clocks.step(1.0)
    for topic in (Topic.CP_STATUS, Topic.CP_TELEMETRY):
        central.readclock.fetched(topic, 0, answered=True, caught_up=True)
    assert central.silence(central.get("CP-001")) < 2.0
    assert central.readclock.now().timestamp() <= clocks.wall + 1e-6
    assert finals(bus, req.request_id) == []
    # Dated by its append time, not an hour ahead.
    heard = central.get("CP-666").last_heard
    assert heard is not None and heard.timestamp() == pytest.approx(clocks.wall - 1.0)


async def test_a_cps_reports_are_ordered_by_its_own_clock_even_when_ahead(
    central: Controller, bus: RecordingPublisher, clocks: Clocks
) -> None:
    """A CP an hour ahead: a heartbeat it sent before START_SUPPLY, appended after the
    session's first telemetry (another topic, another batch), says nothing about it.
    Clamping both to their append times would have put the heartbeat after it."""
    req, session_id = await accepted_session(central, bus, clocks)
    own = utcnow() + timedelta(hours=1)
    await telemetry(central, clocks, CPTelemetry(
        cp_id="CP-001", kw=22, kwh=0.1, euros=0.03, driver_id="driver-alice",
        session_id=session_id, ts=own))
    clocks.step(0.2)
    await status(central, clocks, CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, event=StatusEvent.HEARTBEAT,
        ts=own - timedelta(seconds=0.5)))
    assert central.get("CP-001").session is not None
    assert finals(bus, req.request_id) == []


async def test_a_resumed_session_its_cp_never_reported_is_judged_by_append_time(
    bus: RecordingPublisher, repo: SqliteRepository, clocks: Clocks
) -> None:
    """Central crashed before the CP's first report: the row carries the broker's time
    of the request, so the CP's own clock (a minute behind) is never compared with it."""
    readclock = ReadClock(monotonic=lambda: clocks.mono, wall=lambda: clocks.wall)
    first = FlushingController(bus, repo, CentralOptions(start_timeout=30.0),
                               readclock=readclock)
    req, _session_id = await accepted_session(first, bus, clocks)
    await first.close()
    second = FlushingController(bus, repo, CentralOptions(start_timeout=30.0),
                                readclock=readclock)
    await second.load()
    try:
        clocks.step(1.0)
        # Appended after the request: the CP shows it does not know the session.
        await status(second, clocks, CPStatus(
            cp_id="CP-001", state=CPState.ACTIVATED, event=StatusEvent.HEARTBEAT,
            ts=utcnow() - timedelta(minutes=1)))
        [final] = finals(bus, req.request_id)
        assert final.status is DriverStatus.FAILED
    finally:
        await second.close()
