"""Tests for the CP Engine's ChargingPoint and its health app, with a recording publisher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.apps.ev_cp_e.health import create_health_app
from evcharging.apps.ev_cp_e.main import _wait_for_exit, main
from evcharging.common.kafka import BusStats, Topic
from evcharging.common.messages import REASON_MAX as MAX_REASON
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPStatus,
    CPTelemetry,
    StatusEvent,
)
from evcharging.common.states import CPState, InvalidTransition, SessionResult
from tests.unit.fakes import RecordingPublisher

CP_ID = "CP-001"
KW = 22.0
RATE = 0.30
TELEMETRY_INTERVAL = 0.05
BEAT = 3 * TELEMETRY_INTERVAL
"""A heartbeat interval that spans more than two telemetry intervals (see outlast_telemetry)."""


class FakeClock:
    """A clock the test moves by hand, for exact energy totals."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def command(kind: CommandType, cp_id: str = CP_ID, **payload: str) -> CentralCommand:
    return CentralCommand.model_validate({"cp_id": cp_id, "cmd": kind, "payload": payload})


def start_supply(session_id: str = "S-1", driver_id: str = "driver-alice") -> CentralCommand:
    return command(CommandType.START_SUPPLY, session_id=session_id, driver_id=driver_id)


def statuses(pub: RecordingPublisher, since: int = 0) -> list[CPStatus]:
    return pub.of(CPStatus, since)


async def outlast_telemetry(beats: RecordingPublisher) -> list[CPStatus]:
    """Return once over two telemetry intervals of loop time have passed; proven by events.

    `beats` records a running ChargingPoint with a heartbeat every BEAT seconds. Of the
    heartbeats published after this call begins, the second comes at least BEAT (> 2
    telemetry intervals) later, and the loop runs its timers in deadline order: so every
    telemetry tick due in between, of any session still running, has been published by the
    time it is seen. Returns those two heartbeats.
    """
    loop = asyncio.get_running_loop()
    began = loop.time()
    beats_so_far = len(beats.messages)
    heartbeats = await beats.wait_count(CPStatus, 2, since=beats_so_far, timeout=5)
    assert loop.time() - began > 2 * TELEMETRY_INTERVAL
    return heartbeats


@pytest.fixture
def pub() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
async def make_cp(pub: RecordingPublisher) -> AsyncIterator[Callable[..., ChargingPoint]]:
    """Build ChargingPoints with fast test timings; each is stopped at teardown."""
    made: list[ChargingPoint] = []

    def make(**overrides: Any) -> ChargingPoint:
        options: dict[str, Any] = {
            "kw_rate": KW,
            "euro_rate": RATE,
            "session_seconds": 0.3,
            "telemetry_interval": TELEMETRY_INTERVAL,
            "status_interval": 60.0,
            **overrides,
        }
        cp = ChargingPoint(CP_ID, pub, **options)
        made.append(cp)
        return cp

    yield make
    for cp in made:
        await cp.stop()


@pytest.fixture
async def metronome() -> AsyncIterator[RecordingPublisher]:
    """The heartbeats of a second, idle CP (every BEAT s): a clock for tests whose own CP
    was stopped and so has no heartbeat left. Its messages go to a publisher of its own."""
    beats = RecordingPublisher()
    witness = ChargingPoint("CP-METRONOME", beats, status_interval=BEAT)
    await witness.start()
    yield beats
    await witness.stop()


@pytest.fixture
async def cp(make_cp: Callable[..., ChargingPoint]) -> ChargingPoint:
    """A started CP with a 0.3 s session and telemetry every 0.05 s."""
    point = make_cp()
    await point.start()
    return point


def health_client(cp: ChargingPoint, stats: BusStats | None = None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_health_app(cp, stats))
    return httpx.AsyncClient(transport=transport, base_url="http://cp")


# ------------------------------------------------------------------------ start-up


async def test_start_announces_activated(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    cp = make_cp()
    assert cp.state is CPState.DISCONNECTED
    await cp.start()
    assert cp.state is CPState.ACTIVATED
    assert [
        (t, m.state, m.event, m.reason) for t, m in pub.messages if isinstance(m, CPStatus)
    ] == [(Topic.CP_STATUS, CPState.ACTIVATED, StatusEvent.CONNECT, "connected")]
    with pytest.raises(RuntimeError):
        await cp.start()


def test_rejects_nonsense_settings(pub: RecordingPublisher) -> None:
    with pytest.raises(ValueError, match="intervals"):
        ChargingPoint(CP_ID, pub, telemetry_interval=0)
    with pytest.raises(ValueError, match="kw_rate"):
        ChargingPoint(CP_ID, pub, kw_rate=-1)


# ------------------------------------------------------------------------ sessions


async def test_session_sends_growing_telemetry_then_completes(
    cp: ChargingPoint, pub: RecordingPublisher
) -> None:
    mark = len(pub.messages)
    await cp.handle_command(start_supply())

    assert cp.state is CPState.SUPPLYING
    supplying = statuses(pub, mark)[0]
    assert (supplying.state, supplying.session_id, supplying.driver_id) == (
        CPState.SUPPLYING, "S-1", "driver-alice",
    )
    assert supplying.session_result is None
    snap = cp.snapshot()
    assert snap["state"] == "SUPPLYING" and snap["session_id"] == "S-1" and snap["kw"] == KW

    final = await pub.wait_for(
        CPStatus, lambda s: s.session_result is SessionResult.COMPLETED, since=mark, timeout=3
    )
    telemetry = pub.of(CPTelemetry, mark)
    assert len(telemetry) >= 2
    kwhs = [t.kwh for t in telemetry]
    assert kwhs == sorted(kwhs) and kwhs[0] < kwhs[-1]
    assert [t.euros for t in telemetry] == sorted(t.euros for t in telemetry)
    for t in telemetry:
        assert (t.cp_id, t.kw, t.session_id, t.driver_id) == (CP_ID, KW, "S-1", "driver-alice")
        assert t.euros == pytest.approx(t.kwh * RATE)
        assert t.kwh <= KW * 0.3 / 3600

    assert final.state is CPState.ACTIVATED
    assert (final.session_id, final.driver_id) == ("S-1", "driver-alice")
    assert final.kwh == pytest.approx(KW * 0.3 / 3600)
    assert final.euros == pytest.approx(KW * 0.3 / 3600 * RATE)
    assert cp.state is CPState.ACTIVATED and cp.session_id is None
    # The final status is the session's last word: no telemetry after it.
    await cp.stop()
    last_telemetry = max(i for i, (_, m) in enumerate(pub.messages) if isinstance(m, CPTelemetry))
    assert last_telemetry < next(i for i, (_, m) in enumerate(pub.messages) if m is final)


async def test_stop_supply_ends_session_stopped_with_totals_so_far(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    clock = FakeClock()
    cp = make_cp(session_seconds=60.0, clock=clock, status_interval=BEAT)
    await cp.start()
    await cp.handle_command(start_supply())
    clock.advance(36.0)
    mark = len(pub.messages)
    await cp.handle_command(command(CommandType.STOP_SUPPLY, session_id="S-1"))

    assert cp.state is CPState.ACTIVATED and cp.session_id is None
    stopped = await pub.wait_for(CPStatus, since=mark)
    assert stopped.state is CPState.ACTIVATED
    assert stopped.session_result is SessionResult.STOPPED
    assert (stopped.session_id, stopped.driver_id) == ("S-1", "driver-alice")
    assert stopped.kwh == pytest.approx(KW * 36 / 3600)
    assert stopped.euros == pytest.approx(KW * 36 / 3600 * RATE)
    # The CP lives on (heartbeats), but the stopped session sends no more telemetry.
    heartbeats = await outlast_telemetry(pub)
    assert all((b.state, b.session_id) == (CPState.ACTIVATED, None) for b in heartbeats)
    assert not pub.of(CPTelemetry, mark)


async def test_stop_cp_ends_session_stopped_and_resume_activates(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    clock = FakeClock()
    cp = make_cp(session_seconds=60.0, clock=clock)
    await cp.start()
    await cp.handle_command(start_supply())
    clock.advance(18.0)
    mark = len(pub.messages)
    await cp.handle_command(command(CommandType.STOP_CP, reason="maintenance"))

    assert cp.state is CPState.STOPPED
    [status] = statuses(pub, mark)
    assert (status.state, status.reason, status.session_result) == (
        CPState.STOPPED, "maintenance", SessionResult.STOPPED,
    )
    assert status.session_id == "S-1"
    assert status.kwh == pytest.approx(KW * 18 / 3600)
    assert status.euros == pytest.approx(KW * 18 / 3600 * RATE)

    mark = len(pub.messages)
    await cp.handle_command(command(CommandType.RESUME_CP))
    assert cp.state is CPState.ACTIVATED
    [resumed] = statuses(pub, mark)
    assert resumed.state is CPState.ACTIVATED and resumed.session_result is None


async def test_stop_cp_without_session_uses_default_reason(
    cp: ChargingPoint, pub: RecordingPublisher
) -> None:
    mark = len(pub.messages)
    await cp.handle_command(command(CommandType.STOP_CP))
    [status] = statuses(pub, mark)
    assert (status.state, status.reason) == (CPState.STOPPED, "stopped by operator")
    assert status.session_result is None and status.kwh is None


async def test_duplicate_start_for_running_session_is_ignored(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    cp = make_cp(session_seconds=60.0, telemetry_interval=60.0)
    await cp.start()
    await cp.handle_command(start_supply())
    mark = len(pub.messages)
    await cp.handle_command(start_supply())
    assert pub.messages[mark:] == []
    assert cp.state is CPState.SUPPLYING and cp.session_id == "S-1"


async def test_start_for_another_session_while_supplying_is_refused(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    cp = make_cp(session_seconds=60.0, telemetry_interval=60.0)
    await cp.start()
    await cp.handle_command(start_supply())
    mark = len(pub.messages)
    await cp.handle_command(start_supply(session_id="S-2", driver_id="driver-bob"))
    [refusal] = statuses(pub, mark)
    assert refusal.state is CPState.SUPPLYING
    assert refusal.session_id == "S-2"
    assert (refusal.event, refusal.cmd) == (StatusEvent.REFUSED, CommandType.START_SUPPLY)
    assert refusal.reason is not None and refusal.reason.startswith("refused START_SUPPLY: ")
    assert cp.session_id == "S-1" and cp.driver_id == "driver-alice"


async def test_late_start_for_an_ended_session_is_ignored(
    cp: ChargingPoint, pub: RecordingPublisher
) -> None:
    await cp.handle_command(start_supply())
    await cp.handle_command(command(CommandType.STOP_SUPPLY))
    mark = len(pub.messages)
    await cp.handle_command(start_supply())
    assert pub.messages[mark:] == []
    assert cp.state is CPState.ACTIVATED


async def test_stop_supply_for_another_session_is_refused(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    cp = make_cp(session_seconds=60.0, telemetry_interval=60.0)
    await cp.start()
    await cp.handle_command(start_supply())
    mark = len(pub.messages)
    await cp.handle_command(command(CommandType.STOP_SUPPLY, session_id="S-old"))
    [refusal] = statuses(pub, mark)
    assert (refusal.event, refusal.cmd) == (StatusEvent.REFUSED, CommandType.STOP_SUPPLY)
    assert refusal.session_id == "S-old"
    assert cp.state is CPState.SUPPLYING and cp.session_id == "S-1"


# ------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("setup", "refused", "state"),
    [
        ([command(CommandType.STOP_CP)], start_supply("S-9"), CPState.STOPPED),
        ([], command(CommandType.RESUME_CP), CPState.ACTIVATED),
        ([], command(CommandType.STOP_SUPPLY), CPState.ACTIVATED),
        ([command(CommandType.STOP_CP)], command(CommandType.STOP_CP), CPState.STOPPED),
    ],
    ids=["start-while-stopped", "resume-while-activated", "stop-supply-idle", "stop-twice"],
)
async def test_refused_command_announces_refusal_and_changes_nothing(
    make_cp: Callable[..., ChargingPoint],
    pub: RecordingPublisher,
    setup: list[CentralCommand],
    refused: CentralCommand,
    state: CPState,
) -> None:
    cp = make_cp(status_interval=BEAT)
    await cp.start()
    for cmd in setup:
        await cp.handle_command(cmd)
    before = cp.snapshot()
    mark = len(pub.messages)
    await cp.handle_command(refused)

    [status] = statuses(pub, mark)
    assert status.state is state
    assert (status.event, status.cmd) == (StatusEvent.REFUSED, refused.cmd)
    assert status.reason is not None
    assert status.reason.startswith(f"refused {refused.cmd.value}: ")
    assert status.session_id == refused.payload.session_id
    assert status.session_result is None and status.kwh is None
    assert cp.snapshot() == before
    # Nothing was started behind the refusal: time passes and no telemetry comes.
    heartbeats = await outlast_telemetry(pub)
    assert all(b.state is state and b.session_id is None for b in heartbeats)
    assert not pub.of(CPTelemetry, mark)
    assert cp.snapshot() == before


async def test_commands_for_another_cp_are_ignored(
    cp: ChargingPoint, pub: RecordingPublisher
) -> None:
    mark = len(pub.messages)
    other = "CP-999"
    await cp.handle_command(command(CommandType.START_SUPPLY, other, session_id="S", driver_id="d"))
    await cp.handle_command(command(CommandType.STOP_CP, other))
    await cp.handle_command(command(CommandType.SHUTDOWN, other))
    assert pub.messages[mark:] == []
    assert cp.state is CPState.ACTIVATED
    assert not cp.shutdown_requested.is_set()


# ------------------------------------------------------------------------ faults and health


async def test_fault_mid_session_fails_it_and_health_reports_503(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    clock = FakeClock()
    cp = make_cp(session_seconds=60.0, clock=clock)
    await cp.start()
    await cp.handle_command(start_supply())
    clock.advance(9.0)
    mark = len(pub.messages)

    async with health_client(cp, BusStats()) as client:
        response = await client.get("/health")
        assert response.status_code == 200
        assert response.json()["state"] == "SUPPLYING"
        assert response.json()["session_id"] == "S-1"
        assert response.json()["bus"]["produced"] == 0

        response = await client.post("/fault", json={"reason": "overheating"})
        assert response.status_code == 200
        assert response.json()["state"] == "FAULT"

        [failed] = statuses(pub, mark)
        assert (failed.state, failed.reason, failed.session_result) == (
            CPState.FAULT, "overheating", SessionResult.FAILED,
        )
        assert (failed.session_id, failed.driver_id) == ("S-1", "driver-alice")
        assert failed.kwh == pytest.approx(KW * 9 / 3600)
        assert failed.euros == pytest.approx(KW * 9 / 3600 * RATE)

        response = await client.get("/health")
        assert response.status_code == 503
        body = response.json()
        assert (body["cp_id"], body["state"], body["session_id"]) == (CP_ID, "FAULT", None)
        assert body["reason"] == "overheating"

        response = await client.post("/fault")
        assert response.status_code == 409
        assert "FAULT" in response.json()["error"]
        assert response.json()["code"] == "not_allowed"

        mark = len(pub.messages)
        response = await client.post("/recover")
        assert response.status_code == 200
        assert response.json()["state"] == "ACTIVATED"
        [recovered] = statuses(pub, mark)
        assert (recovered.state, recovered.reason) == (CPState.ACTIVATED, "recovered")

        response = await client.get("/health")
        assert response.status_code == 200
        assert response.json()["status"] == "ok"

        response = await client.post("/recover")
        assert response.status_code == 409
        assert "error" in response.json()
    assert cp.state is CPState.ACTIVATED


async def test_fault_without_body_uses_default_reason(
    cp: ChargingPoint, pub: RecordingPublisher
) -> None:
    mark = len(pub.messages)
    async with health_client(cp) as client:
        response = await client.post("/fault")
    assert response.status_code == 200
    [status] = statuses(pub, mark)
    assert (status.state, status.reason) == (CPState.FAULT, "simulated hardware fault")
    assert status.session_result is None


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"reason": 5}', b'{"reason": ""}',
     b'{"reason": "' + b"x" * (MAX_REASON + 1) + b'"}'],
    ids=["malformed", "array", "number", "empty", "too-long"],
)
async def test_fault_with_bad_body_is_422_and_changes_nothing(
    cp: ChargingPoint, pub: RecordingPublisher, content: bytes
) -> None:
    mark = len(pub.messages)
    async with health_client(cp) as client:
        response = await client.post(
            "/fault", content=content, headers={"content-type": "application/json"}
        )
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_request"
    assert cp.state is CPState.ACTIVATED
    assert pub.messages[mark:] == []


async def test_fault_and_recover_refuse_what_the_machine_refuses(cp: ChargingPoint) -> None:
    with pytest.raises(InvalidTransition):
        await cp.recover()
    assert cp.state is CPState.ACTIVATED
    await cp.fault("broken")
    with pytest.raises(InvalidTransition):
        await cp.fault("broken again")
    assert (cp.state, cp.reason) == (CPState.FAULT, "broken")


async def test_long_fault_reason_is_clipped(cp: ChargingPoint, pub: RecordingPublisher) -> None:
    mark = len(pub.messages)
    await cp.fault("x" * 2000)
    [status] = statuses(pub, mark)
    assert status.reason is not None and len(status.reason) == MAX_REASON


# ------------------------------------------------------------------------ shutdown


async def test_stop_from_activated_disconnects_once(
    cp: ChargingPoint, pub: RecordingPublisher
) -> None:
    mark = len(pub.messages)
    await cp.stop()
    await cp.stop()
    [status] = statuses(pub, mark)
    assert (status.state, status.reason) == (CPState.DISCONNECTED, "shutdown")
    assert cp.state is CPState.DISCONNECTED


async def test_stop_while_supplying_stops_the_session_then_disconnects(
    make_cp: Callable[..., ChargingPoint],
    pub: RecordingPublisher,
    metronome: RecordingPublisher,
) -> None:
    clock = FakeClock()
    cp = make_cp(session_seconds=60.0, clock=clock, status_interval=BEAT)
    await cp.start()
    await cp.handle_command(start_supply())
    clock.advance(3.6)
    mark = len(pub.messages)
    await cp.stop()
    stopped, disconnected = statuses(pub, mark)
    assert (stopped.state, stopped.reason, stopped.session_result) == (
        CPState.ACTIVATED, "CP shutting down", SessionResult.STOPPED,
    )
    assert stopped.kwh == pytest.approx(KW * 3.6 / 3600)
    assert disconnected.state is CPState.DISCONNECTED
    # After stop() the CP sends nothing more: no telemetry, no heartbeat.
    await outlast_telemetry(metronome)
    assert not pub.of(CPTelemetry, mark)
    assert [m for _, m in pub.messages[mark:]] == [stopped, disconnected]


@pytest.mark.parametrize("state", [CPState.STOPPED, CPState.FAULT])
async def test_stop_from_stopped_or_fault_announces_shutting_down(
    cp: ChargingPoint, pub: RecordingPublisher, state: CPState
) -> None:
    if state is CPState.STOPPED:
        await cp.handle_command(command(CommandType.STOP_CP))
    else:
        await cp.fault("broken")
    mark = len(pub.messages)
    await cp.stop()
    [status] = statuses(pub, mark)
    assert (status.state, status.reason) == (state, "shutting down")
    assert cp.state is state


async def test_after_stop_commands_and_faults_are_refused(
    cp: ChargingPoint, pub: RecordingPublisher
) -> None:
    await cp.stop()
    mark = len(pub.messages)
    await cp.handle_command(start_supply())
    assert pub.messages[mark:] == []
    with pytest.raises(InvalidTransition, match="shutting down"):
        await cp.fault("late")
    async with health_client(cp) as client:
        response = await client.post("/fault")
    assert response.status_code == 409


async def test_shutdown_command_stops_and_requests_exit(
    make_cp: Callable[..., ChargingPoint],
    pub: RecordingPublisher,
    metronome: RecordingPublisher,
) -> None:
    cp = make_cp(session_seconds=60.0, status_interval=BEAT)
    await cp.start()
    await cp.handle_command(start_supply())
    mark = len(pub.messages)
    await cp.handle_command(command(CommandType.SHUTDOWN))
    assert cp.shutdown_requested.is_set()
    results = [(s.state, s.session_result) for s in statuses(pub, mark)]
    assert results == [
        (CPState.ACTIVATED, SessionResult.STOPPED),
        (CPState.DISCONNECTED, None),
    ]
    # After SHUTDOWN the CP sends nothing more: no telemetry, no heartbeat.
    await outlast_telemetry(metronome)
    assert not pub.of(CPTelemetry, mark)
    assert len(pub.messages) == mark + 2


# ------------------------------------------------------------------------ heartbeat


async def test_heartbeat_republishes_the_current_state(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    cp = make_cp(status_interval=0.02, session_seconds=60.0, telemetry_interval=60.0)
    await cp.start()
    beats = await pub.wait_count(CPStatus, 2, since=1)
    assert all(
        (b.state, b.event, b.reason) == (CPState.ACTIVATED, StatusEvent.HEARTBEAT, "connected")
        for b in beats
    )

    await cp.handle_command(start_supply())
    mark = len(pub.messages)
    beat = await pub.wait_for(CPStatus, since=mark)
    assert (beat.state, beat.session_id, beat.driver_id) == (
        CPState.SUPPLYING, "S-1", "driver-alice",
    )
    assert beat.session_result is None and beat.kwh is None


async def test_bus_failures_are_logged_not_raised(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    pub.fail = True
    cp = make_cp(session_seconds=60.0)
    await cp.start()
    await cp.handle_command(start_supply())
    await cp.fault("broken")
    await cp.stop()
    assert pub.failures >= 3 and pub.messages == []
    assert cp.state is CPState.FAULT
    assert cp.publish_failures == pub.failures


async def test_a_bus_outage_is_logged_once_and_its_end_once(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    try:
        cp = make_cp(session_seconds=60.0, telemetry_interval=60.0)
        pub.fail = True
        await cp.start()
        for _ in range(5):
            await cp.handle_command(command(CommandType.STOP_CP))
            await cp.handle_command(command(CommandType.RESUME_CP))
        pub.fail = False
        await cp.handle_command(command(CommandType.STOP_CP))
    finally:
        logger.remove(sink)
    assert sum("could not publish" in line for line in lines) == 1
    assert sum("publishing works again after 11 failure(s)" in line for line in lines) == 1
    assert cp.publish_failures == 0


# ------------------------------------------------------------------------ command line


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--kafka-bootstrap", "--cp-id", "--health-port", "--kw-rate", "--euro-rate",
                 "--session-seconds", "--telemetry-interval", "--status-interval"):
        assert flag in out


async def test_wait_for_exit_returns_0_on_stop_and_shutdown_1_on_consumer_death(
    cp: ChargingPoint,
) -> None:
    forever = asyncio.Event()
    consuming = asyncio.create_task(forever.wait())
    stop = asyncio.Event()
    stop.set()
    assert await _wait_for_exit(stop, cp, consuming) == 0

    await cp.handle_command(command(CommandType.SHUTDOWN))
    assert await _wait_for_exit(asyncio.Event(), cp, consuming) == 0
    consuming.cancel()

    async def die() -> None:
        raise RuntimeError("consumer broke")

    assert await _wait_for_exit(asyncio.Event(), cp, asyncio.create_task(die())) == 1


# ------------------------------------------------------------------------ the `event` field


async def test_every_state_change_names_its_event(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    """Every status carries `event`: the state-machine event that produced it."""
    cp = make_cp(session_seconds=60.0, telemetry_interval=60.0)
    await cp.start()
    await cp.handle_command(start_supply())
    await cp.handle_command(command(CommandType.STOP_SUPPLY))
    await cp.handle_command(command(CommandType.STOP_CP))
    await cp.handle_command(command(CommandType.RESUME_CP))
    await cp.fault("broken")
    await cp.recover()
    await cp.stop()
    assert [(s.event, s.state) for s in statuses(pub, 0)] == [
        (StatusEvent.CONNECT, CPState.ACTIVATED),
        (StatusEvent.START_SUPPLY, CPState.SUPPLYING),
        (StatusEvent.STOP_SUPPLY, CPState.ACTIVATED),
        (StatusEvent.STOP_CP, CPState.STOPPED),
        (StatusEvent.RESUME_CP, CPState.ACTIVATED),
        (StatusEvent.FAULT, CPState.FAULT),
        (StatusEvent.RECOVER, CPState.ACTIVATED),
        (StatusEvent.DISCONNECT, CPState.DISCONNECTED),
    ]


async def test_a_completed_session_says_session_complete(
    make_cp: Callable[..., ChargingPoint], pub: RecordingPublisher
) -> None:
    cp = make_cp(session_seconds=0.05, telemetry_interval=0.02)
    await cp.start()
    await cp.handle_command(start_supply())
    done = await pub.wait_for(CPStatus, lambda s: s.session_result is not None)
    assert (done.event, done.session_result) == (
        StatusEvent.SESSION_COMPLETE, SessionResult.COMPLETED,
    )
