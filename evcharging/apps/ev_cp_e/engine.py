"""One charging point: its state, its charging session and what it tells Central.

Over 400 lines: one class, the CP's whole firmware (state changes under one lock,
sessions, telemetry, heartbeats), whose ordering rules only hold if it stays together.

:class:`ChargingPoint` holds no process-global state, so one process can host many. It
changes state only through :func:`evcharging.common.states.next_state`, and announces
every change on ``cp.status``; while it supplies, it sends ``cp.telemetry``.

Concurrency. Every change (a command, a fault, a recovery, the end of a session, the
heartbeat, shutdown) runs under one per-CP :class:`asyncio.Lock` and publishes while
holding it. So the messages of one CP leave in the order of its state changes: no
telemetry follows the status that ended its session, and no heartbeat repeats a state
that was already left.

Messages.

* On every state change: ``CPStatus(state, event, reason, session_id, driver_id)``, where
  ``event`` is the state-machine event; when the change ends a session, also its totals
  ``kwh``, ``euros`` and ``session_result``.
* A heartbeat (``event=HEARTBEAT``) every ``status_interval`` seconds repeats the current
  state, the reason of that state, the running session if any, and ``last_session``: the
  id, result and final totals of the last session that ended. Central records that end
  idempotently, so an end-of-session status lost on the way is recovered (SPEC §4).
* A refused command changes nothing and is answered at once with
  ``CPStatus(current state, event=REFUSED, cmd=<CMD>, session_id=<the command's>)``.

Many in one process (the CP Fleet). ``first_heartbeat`` sets when the first heartbeat
comes (by default one ``status_interval`` after connecting): a fleet spreads its CPs'
heartbeats over the interval instead of waking thousands of them at once. For an
in-process watchdog the CP tells how long ago its last heartbeat went out
(:attr:`~ChargingPoint.heartbeat_age`: a CP whose lock is held by something stuck stops
beating), how long its publish in progress has waited for the bus
(:attr:`~ChargingPoint.publish_waiting`) and whether one of its tasks crashed
(:attr:`~ChargingPoint.crashed`). With ``log_bus_errors=False`` a failed publish is logged
at DEBUG only (a fleet says once for all its CPs that Kafka is down).

Cars and limits (SPEC §10). START_SUPPLY may carry ``kwh_wanted``, ``departure`` and a
``car``. Every session is metered at min(the CP's ``kw_rate``, Central's limit for the
session, the car's acceptance) by :func:`evcharging.common.car.charge`, which integrates
exactly; telemetry adds the car's ``soc`` (None without a car). A session with neither
``kwh_wanted`` nor a car ends after ``session_seconds``, as it always did; one with either
ends COMPLETED at the moment exactly ``kwh_wanted`` has been delivered or the car is full
(``session_seconds`` does not apply to it). SET_LIMIT for the running session is kept and
applied from the next telemetry on (``kw`` None: no limit); SET_LIMIT for another session or
when none runs is ignored and counted (:attr:`~ChargingPoint.ignored_limits`). It is not a
state-machine event: it never changes the state and is never refused.

The metering holds exact: the session's energy is computed from the start of its current
*segment* (the session's start, or the telemetry where a new limit took effect) in one step,
never summed over telemetry ticks.

Shutdown. :meth:`ChargingPoint.stop` ends a running session as ``STOPPED`` and, from
ACTIVATED, disconnects (``DISCONNECTED``, reason ``shutdown``). The state machine has no
DISCONNECT from STOPPED or FAULT, so from there the CP only announces its current state
with the reason ``shutting down`` and stays in it: Central keeps knowing that it was
stopped or faulty, which is what an operator needs to see when it comes back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from loguru import logger

from evcharging.common.bus import BusError, Publisher
from evcharging.common.car import Car, Done, charge
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPStatus,
    CPTelemetry,
    Message,
    SessionEnd,
    StatusEvent,
    clip_reason,
)
from evcharging.common.service import TaskOwner
from evcharging.common.states import (
    CPEvent,
    CPState,
    InvalidTransition,
    SessionResult,
    next_state,
    session_result,
)

if TYPE_CHECKING:
    from evcharging.common.config import CPEngineSettings

__all__ = ["ChargingPoint", "Publisher"]

_REMEMBERED_SESSIONS = 64
"""How many ended session ids a CP remembers, to ignore a late duplicate START_SUPPLY."""

_SECONDS_PER_HOUR = 3600.0
_HORIZON = 1e7
"""Seconds (about 116 days) beyond which a metered session counts as never ending."""


@dataclass(frozen=True)
class _Limit:
    """A SET_LIMIT waiting for the next telemetry: ``kw`` None removes the limit."""

    kw: float | None


@dataclass(frozen=True)
class _Reading:
    """A session's meter at some moment."""

    kwh: float
    kw: float
    """The power drawn at that moment (0 once done)."""
    car: Car | None
    done: Done | None
    """Why the session is over (a metered session only), or None."""
    done_after: float | None = None
    """Seconds from the session's start at which it is over under the present offer, if
    within the horizon (a metered session only)."""


@dataclass
class _Session:
    """A charging session in progress."""

    session_id: str
    driver_id: str
    started_at: float
    """Clock reading at the start, for the energy delivered so far."""
    kwh_wanted: float | None = None
    departure: datetime | None = None
    car: Car | None = None
    """The car at the start of the current segment."""
    limit_kw: float | None = None
    """Central's limit for the session, in effect since the segment's start."""
    pending: _Limit | None = None
    """A SET_LIMIT received, to take effect at the next telemetry."""
    segment_at: float = 0.0
    """Seconds from the session's start to the start of the current segment."""
    segment_kwh: float = 0.0
    """Energy delivered before the current segment."""
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def metered(self) -> bool:
        """Whether it ends by its energy (wanted, or the car full), not session_seconds."""
        return self.car is not None or self.kwh_wanted is not None


class ChargingPoint:
    """The simulated hardware and firmware of one charging point.

    ``clock`` (seconds, monotonic) measures the energy delivered; the pacing of telemetry
    and of the session's end follows the event loop's own timers.
    """

    def __init__(
        self,
        cp_id: str,
        publisher: Publisher,
        *,
        kw_rate: float = 22.0,
        euro_rate: float = 0.30,
        session_seconds: float = 10.0,
        telemetry_interval: float = 1.0,
        status_interval: float = 5.0,
        first_heartbeat: float | None = None,
        log_bus_errors: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if kw_rate <= 0 or euro_rate < 0:
            raise ValueError("kw_rate must be > 0 and euro_rate >= 0")
        if min(session_seconds, telemetry_interval, status_interval) <= 0:
            raise ValueError("session_seconds and the intervals must be > 0")
        if first_heartbeat is not None and first_heartbeat < 0:
            raise ValueError("first_heartbeat must be >= 0")
        self.cp_id = cp_id
        self.kw_rate = kw_rate
        self.euro_rate = euro_rate
        self.session_seconds = session_seconds
        self.telemetry_interval = telemetry_interval
        self.status_interval = status_interval
        self.first_heartbeat = status_interval if first_heartbeat is None else first_heartbeat
        """Seconds from connecting to the first heartbeat."""
        self._publisher = publisher
        self._clock = clock
        self._state = CPState.DISCONNECTED
        self._reason: str | None = None
        self._session: _Session | None = None
        self._ended_sessions: deque[str] = deque(maxlen=_REMEMBERED_SESSIONS)
        self._last_end: SessionEnd | None = None
        self.publish_failures = 0
        """Failed publishes in a row (the bus is down while this is above 0)."""
        self.ignored_limits = 0
        """SET_LIMIT commands ignored: for another session, or while none runs."""
        self._bus_log_level = "ERROR" if log_bus_errors else "DEBUG"
        self._publish_started: float | None = None
        self._lock = asyncio.Lock()
        self._tasks = TaskOwner(f"CP {cp_id}", level="ERROR")
        """The CP's timers: heartbeat and session; a crash is logged once, as a bug."""
        self._heartbeat: asyncio.Task[None] | None = None
        self._beat_at: float | None = None
        """Clock reading when the last heartbeat (or the connect) went out."""
        self._started = False
        self._closed = False
        self._log = logger.bind(cp_id=cp_id)
        self.shutdown_requested = asyncio.Event()
        """Set once a SHUTDOWN command has shut the CP down: the process should exit."""

    @classmethod
    def from_settings(
        cls,
        settings: CPEngineSettings,
        publisher: Publisher,
        *,
        cp_id: str | None = None,
        first_heartbeat: float | None = None,
        log_bus_errors: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> ChargingPoint:
        """A CP as `settings` describe it; `cp_id` replaces theirs (a fleet's CPs share
        one settings object)."""
        return cls(
            settings.cp_id if cp_id is None else cp_id,
            publisher,
            kw_rate=settings.kw_rate,
            euro_rate=settings.euro_rate,
            session_seconds=settings.session_seconds,
            telemetry_interval=settings.telemetry_interval,
            status_interval=settings.status_interval,
            first_heartbeat=first_heartbeat,
            log_bus_errors=log_bus_errors,
            clock=clock,
        )

    # ---------------------------------------------------------------- read-only view

    @property
    def state(self) -> CPState:
        return self._state

    @property
    def reason(self) -> str | None:
        """Why the CP is in its current state (e.g. the fault's reason)."""
        return self._reason

    @property
    def session_id(self) -> str | None:
        return self._session.session_id if self._session else None

    @property
    def driver_id(self) -> str | None:
        return self._session.driver_id if self._session else None

    @property
    def started(self) -> bool:
        """Whether :meth:`start` connected the CP."""
        return self._started

    @property
    def closed(self) -> bool:
        """Whether :meth:`stop` ran (a stopped CP does nothing more)."""
        return self._closed

    @property
    def crashed(self) -> str | None:
        """Which of the CP's tasks crashed and with what, if one did (a bug: it is logged
        with its traceback, and the CP cannot be trusted any more)."""
        failure = self._tasks.failure
        if failure is None:
            return None
        return f"task {self._tasks.failed_task} crashed: {failure!r}"

    @property
    def heartbeat_age(self) -> float | None:
        """Seconds since the last heartbeat (or the connect) went out; None before start.

        It grows past ``status_interval`` only while the heartbeat cannot run: the CP's
        lock is held (a publish that does not return) or its heartbeat task ended.
        """
        if self._beat_at is None:
            return None
        return max(0.0, self._clock() - self._beat_at)

    @property
    def publish_waiting(self) -> float | None:
        """Seconds the publish in progress has been waiting for the bus (None: none is).

        A slow or unreachable broker holds a publish up to the bus's own timeout; a
        watchdog tells that apart from a CP that is stuck by itself.
        """
        started = self._publish_started
        return None if started is None else max(0.0, self._clock() - started)

    def snapshot(self) -> dict[str, Any]:
        """The CP at a glance, for the health endpoint."""
        session = self._session
        reading = self._read(session) if session else None
        return {
            "cp_id": self.cp_id,
            "state": self._state.value,
            "session_id": session.session_id if session else None,
            "driver_id": session.driver_id if session else None,
            "kw": reading.kw if reading else 0.0,
            "kwh": reading.kwh if reading else None,
            "euros": reading.kwh * self.euro_rate if reading else None,
            "soc": reading.car.soc if reading and reading.car else None,
            "limit_kw": session.limit_kw if session else None,
        }

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect (DISCONNECTED → ACTIVATED), announce it and start the heartbeat."""
        if self._started or self._closed:
            raise RuntimeError(f"charging point {self.cp_id} was already started or stopped")
        async with self._lock:
            await self._change(CPEvent.CONNECT, "connected")
            self._started = True
            self._beat_at = self._clock()
            self._heartbeat = self._spawn(self._heartbeat_loop(), "heartbeat")

    async def stop(self) -> None:
        """Shut down cleanly; safe to call twice (the second call only awaits the tasks).

        A running session ends as STOPPED; from ACTIVATED the CP disconnects. From
        STOPPED or FAULT (no DISCONNECT in the state machine) it re-announces its state
        with the reason ``shutting down``.
        """
        async with self._lock:
            if not self._closed:
                self._closed = True
                if self._heartbeat is not None:
                    self._heartbeat.cancel()
                await self._shut_down()
        await self._tasks.close()

    async def _shut_down(self) -> None:
        if self._state is CPState.SUPPLYING:
            await self._change(CPEvent.STOP_SUPPLY, "CP shutting down")
        if self._state is CPState.ACTIVATED:
            await self._change(CPEvent.DISCONNECT, "shutdown")
        elif self._state in (CPState.STOPPED, CPState.FAULT):
            self._log.info("shutting down in state {}", self._state.value)
            await self._publish_status(reason="shutting down")
        # DISCONNECTED: never connected (or already disconnected), nothing to announce.

    async def __aenter__(self) -> ChargingPoint:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- Central's commands

    async def handle_command(self, cmd: CentralCommand) -> None:
        """Carry out one command from Central (commands for other CPs are ignored)."""
        if cmd.cp_id != self.cp_id:
            self._log.debug("ignoring {} for {}", cmd.cmd.value, cmd.cp_id)
            return
        if self._closed:
            self._log.info("ignoring {}: the CP is shutting down", cmd.cmd.value)
            return
        if cmd.cmd is CommandType.SET_LIMIT:
            async with self._lock:
                self._set_limit(cmd)
            return
        self._log.info("command {} {}", cmd.cmd.value, cmd.payload.model_dump(exclude_none=True))
        if cmd.cmd is CommandType.SHUTDOWN:
            await self.stop()
            self._log.info("SHUTDOWN done; asking the process to exit")
            self.shutdown_requested.set()
            return
        async with self._lock:
            if self._closed:  # stop() ran while this command waited for the lock
                self._log.info("ignoring {}: the CP is shutting down", cmd.cmd.value)
                return
            try:
                await self._apply_command(cmd)
            except InvalidTransition as exc:
                await self._refuse(cmd, str(exc))

    async def _apply_command(self, cmd: CentralCommand) -> None:
        payload = cmd.payload
        match cmd.cmd:
            case CommandType.START_SUPPLY:
                await self._start_supply(cmd)
            case CommandType.STOP_SUPPLY:
                running = self._session
                if payload.session_id and running and payload.session_id != running.session_id:
                    await self._refuse(
                        cmd, f"session {payload.session_id} is not the running session"
                    )
                    return
                await self._change(CPEvent.STOP_SUPPLY, payload.reason or "supply stopped")
            case CommandType.STOP_CP:
                await self._change(CPEvent.STOP_CP, payload.reason or "stopped by operator")
            case CommandType.RESUME_CP:
                await self._change(CPEvent.RESUME_CP, payload.reason or "resumed by operator")
            case CommandType.SHUTDOWN | CommandType.SET_LIMIT:  # pragma: no cover
                raise AssertionError(f"{cmd.cmd.value} is handled by handle_command")

    def _set_limit(self, cmd: CentralCommand) -> None:
        """Keep Central's limit for the running session until the next telemetry; a limit
        for another session, or while none runs, is ignored and counted (hold the lock)."""
        session, kw = self._session, cmd.payload.kw
        if session is None or session.session_id != cmd.payload.session_id:
            self.ignored_limits += 1
            self._log.debug("SET_LIMIT {} for session {} ignored: the running session is {}",
                            kw, cmd.payload.session_id, self.session_id)
            return
        self._log.debug("SET_LIMIT {} for session {} (from the next telemetry)",
                        "none" if kw is None else f"{kw:g} kW", session.session_id)
        session.pending = _Limit(kw)

    async def _start_supply(self, cmd: CentralCommand) -> None:
        session_id, driver_id = cmd.payload.session_id, cmd.payload.driver_id
        running = self._session
        if running is not None and running.session_id == session_id:
            self._log.info("duplicate START_SUPPLY for running session {} ignored", session_id)
            return
        if session_id in self._ended_sessions:
            self._log.warning("START_SUPPLY for ended session {} ignored", session_id)
            return
        await self._change(
            CPEvent.START_SUPPLY, "supplying", driver_id=driver_id, session_id=session_id,
            command=cmd,
        )

    async def _refuse(self, cmd: CentralCommand, why: str) -> None:
        reason = f"refused {cmd.cmd.value}: {why}"
        self._log.warning("{} (state stays {})", reason, self._state.value)
        await self._publish(
            CPStatus(
                cp_id=self.cp_id,
                state=self._state,
                event=StatusEvent.REFUSED,
                cmd=cmd.cmd,
                reason=clip_reason(reason),
                session_id=cmd.payload.session_id,
            ),
        )

    # ---------------------------------------------------------------- the monitor's hooks

    async def fault(self, reason: str) -> None:
        """A hardware fault: any state but FAULT → FAULT; a running session FAILS.

        Raises InvalidTransition when refused (already in FAULT, or shutting down).
        """
        async with self._lock:
            self._refuse_when_closed(CPEvent.FAULT)
            await self._change(CPEvent.FAULT, reason or "fault")

    async def recover(self) -> None:
        """The fault is repaired: FAULT → ACTIVATED. Raises InvalidTransition otherwise."""
        async with self._lock:
            self._refuse_when_closed(CPEvent.RECOVER)
            await self._change(CPEvent.RECOVER, "recovered")

    def _refuse_when_closed(self, event: CPEvent) -> None:
        if self._closed:
            raise InvalidTransition(self._state, event, "the CP is shutting down")

    # ---------------------------------------------------------------- state changes

    async def _change(
        self,
        event: CPEvent,
        reason: str,
        *,
        driver_id: str | None = None,
        session_id: str | None = None,
        command: CentralCommand | None = None,
    ) -> None:
        """Apply `event` through the state machine and announce it (hold the lock).

        ``command`` is the START_SUPPLY that starts a session (its car fields).
        Raises InvalidTransition, having changed nothing, when the machine refuses.
        """
        old = self._state
        new = next_state(old, event, driver_id=driver_id, session_id=session_id)
        result = session_result(old, event)
        ended = self._session if result is not None else None
        reason = clip_reason(reason)
        kwh = euros = 0.0
        if ended is not None:
            final = self._final(ended) if result is SessionResult.COMPLETED else None
            kwh = (final or self._read(ended)).kwh
            euros = kwh * self.euro_rate
            status = CPStatus(
                cp_id=self.cp_id,
                state=new,
                event=StatusEvent.of(event),
                reason=reason,
                session_id=ended.session_id,
                driver_id=ended.driver_id,
                kwh=kwh,
                euros=euros,
                session_result=result,
            )
        else:
            status = CPStatus(
                cp_id=self.cp_id,
                state=new,
                event=StatusEvent.of(event),
                reason=reason,
                session_id=session_id,
                driver_id=driver_id,
            )
        # Nothing below can be refused: commit the change.
        self._state = new
        self._reason = reason
        if ended is not None:
            assert result is not None
            self._last_end = SessionEnd(
                session_id=ended.session_id, result=result, kwh=kwh, euros=euros
            )
            self._end_session(ended)
            self._log.info(
                "{} --{}--> {} ({}); session {} of {} {}: {:.4f} kWh, {:.4f} €",
                old.value, event.value, new.value, reason, ended.session_id,
                ended.driver_id, result, kwh, euros,
            )
        else:
            self._log.info("{} --{}--> {} ({})", old.value, event.value, new.value, reason)
        if event is CPEvent.START_SUPPLY:
            assert driver_id is not None and session_id is not None  # the guard saw them
            self._begin_session(session_id, driver_id, command)
        await self._publish(status)

    def _begin_session(
        self, session_id: str, driver_id: str, command: CentralCommand | None
    ) -> None:
        session = _Session(session_id, driver_id, started_at=self._clock())
        if command is not None:
            payload = command.payload
            session.kwh_wanted, session.departure = payload.kwh_wanted, payload.departure
            if payload.car is not None:
                spec = payload.car
                session.car = Car(spec.battery_kwh, spec.soc, spec.max_kw)
            if session.metered:
                self._log.info("session {}: {} kWh wanted, car {}, departure {}",
                               session_id, session.kwh_wanted, session.car, session.departure)
        self._session = session
        session.task = self._spawn(self._run_session(session), f"session-{session_id}")

    def _end_session(self, session: _Session) -> None:
        self._session = None
        self._ended_sessions.append(session.session_id)
        task = session.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()  # stop() awaits it, as it awaits every task

    # ---------------------------------------------------------------- the meter

    def _read(self, session: _Session, elapsed: float | None = None) -> _Reading:
        """The meter of `session` `elapsed` seconds after its start (default: now), under
        the offer of its current segment: min(kw_rate, its limit, the car's acceptance).

        A session that is not metered stops at ``session_seconds``; a metered one at its
        ``kwh_wanted`` (exactly) or when the car is full."""
        if elapsed is None:
            elapsed = self._clock() - session.started_at
        limit = session.limit_kw
        offer = self.kw_rate if limit is None else min(self.kw_rate, limit)
        if not session.metered:
            elapsed = min(max(elapsed, 0.0), self.session_seconds)
            seconds = max(0.0, elapsed - session.segment_at)
            kwh = session.segment_kwh + offer * seconds / _SECONDS_PER_HOUR
            return _Reading(kwh, offer, None, None)
        seconds = min(max(0.0, elapsed - session.segment_at), _HORIZON)
        wanted = session.kwh_wanted
        left = None if wanted is None else max(0.0, wanted - session.segment_kwh)
        if session.car is None:
            assert wanted is not None and left is not None
            to_done = left / offer * _SECONDS_PER_HOUR if offer > 0 else math.inf
            done_after = session.segment_at + to_done if to_done <= _HORIZON else None
            if seconds >= to_done:
                return _Reading(wanted, 0.0, None, Done.WANTED, done_after)
            kwh = session.segment_kwh + offer * seconds / _SECONDS_PER_HOUR
            return _Reading(kwh, offer, None, None, done_after)
        step = charge(session.car, seconds, cp_kw=self.kw_rate, limit_kw=limit, kwh_left=left)
        if step.done is not None:
            kwh = wanted if step.done is Done.WANTED and wanted is not None else (
                session.segment_kwh + step.kwh)
            return _Reading(kwh, 0.0, step.car, step.done, session.segment_at + step.seconds)
        ahead = charge(session.car, _HORIZON, cp_kw=self.kw_rate, limit_kw=limit,
                       kwh_left=left)
        done_after = session.segment_at + ahead.seconds if ahead.done is not None else None
        return _Reading(session.segment_kwh + step.kwh, step.kw, step.car, None, done_after)

    def _final(self, session: _Session) -> _Reading:
        """The meter of a session that completes: at ``session_seconds``, or at the moment
        a metered session was done (exactly ``kwh_wanted``, or the car full)."""
        if not session.metered:
            return self._read(session, self.session_seconds)
        reading = self._read(session, session.segment_at + _HORIZON)
        return reading if reading.done is not None else self._read(session)

    def _apply_limit(self, session: _Session, elapsed: float) -> _Reading:
        """At a telemetry: the meter now, after a pending limit took effect (a new segment)."""
        reading = self._read(session, elapsed)
        pending = session.pending
        if pending is None or reading.done is not None:
            return reading
        session.pending = None
        if pending.kw == session.limit_kw:
            return reading
        session.segment_at = elapsed if session.metered else min(
            max(elapsed, 0.0), self.session_seconds)
        session.segment_kwh, session.car = reading.kwh, reading.car
        session.limit_kw = pending.kw
        self._log.info("session {}: limit {} from now on", session.session_id,
                       "none" if pending.kw is None else f"{pending.kw:g} kW")
        return self._read(session, elapsed)

    # ---------------------------------------------------------------- background tasks

    async def _run_session(self, session: _Session) -> None:
        """Send telemetry every telemetry_interval; complete after session_seconds, or
        for a metered session at the moment it is done (the end as the meter foresees it
        under the present offer, foreseen again at every telemetry)."""
        loop = asyncio.get_running_loop()
        start = tick = loop.time()
        end: float | None = start + self.session_seconds
        if session.metered:
            end = self._end_at(session, self._read(session, 0.0), 0.0, start)
        while True:
            tick += self.telemetry_interval
            now = loop.time()
            if tick <= now:  # fell behind (a slow publish): skip the missed ticks
                tick = now + self.telemetry_interval
            if end is not None and tick >= end:
                await asyncio.sleep(max(0.0, end - now))
                break
            await asyncio.sleep(tick - now)
            async with self._lock:
                if self._session is not session:
                    return
                elapsed = self._clock() - session.started_at
                reading = self._apply_limit(session, elapsed)
                if reading.done is not None:
                    break
                await self._publish(
                    CPTelemetry(
                        cp_id=self.cp_id,
                        kw=reading.kw,
                        kwh=reading.kwh,
                        euros=reading.kwh * self.euro_rate,
                        driver_id=session.driver_id,
                        session_id=session.session_id,
                        soc=reading.car.soc if reading.car else None,
                    ),
                )
                if session.metered:
                    end = self._end_at(session, reading, elapsed, loop.time())
        async with self._lock:
            if self._session is session:
                await self._change(CPEvent.SESSION_COMPLETE, self._completion(session))

    @staticmethod
    def _end_at(session: _Session, reading: _Reading, elapsed: float, now: float) -> float | None:
        """The loop time at which a metered session will be done (None: not foreseen)."""
        if reading.done_after is None:
            return None
        return now + max(0.0, reading.done_after - elapsed)

    def _completion(self, session: _Session) -> str:
        """The reason of a session's completion, for people."""
        if not session.metered:
            return "session completed"
        done = self._final(session).done
        if done is Done.WANTED:
            return f"session completed: {session.kwh_wanted:g} kWh delivered"
        if done is Done.FULL:
            return "session completed: the battery is full"
        return "session completed"

    async def _heartbeat_loop(self) -> None:
        delay = self.first_heartbeat
        while True:
            await asyncio.sleep(delay)
            delay = self.status_interval
            async with self._lock:
                self._log.debug("heartbeat {}", self._state.value)
                await self._publish_status(reason=self._reason)
                self._beat_at = self._clock()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return self._tasks.spawn(coro, f"{self.cp_id}-{name}")

    # ---------------------------------------------------------------- publishing

    async def _publish_status(self, *, reason: str | None) -> None:
        """Announce the current state, the running session (no totals) and how the last
        session ended (``last_session``): a heartbeat."""
        session = self._session
        await self._publish(
            CPStatus(
                cp_id=self.cp_id,
                state=self._state,
                event=StatusEvent.HEARTBEAT,
                last_session=self._last_end,
                reason=reason,
                session_id=session.session_id if session else None,
                driver_id=session.driver_id if session else None,
            ),
        )

    async def _publish(self, message: Message) -> None:
        """Publish; a bus failure is logged once per outage, never raised (the next
        heartbeat, which repeats the state and the last session's end, repairs it).

        The message is queued in the producer, not waited for: the producer keeps the
        order of one CP's messages (one key, one partition), and a CP whose broker is
        slow to acknowledge must still obey Central's next command at once (it holds its
        lock while it publishes). A delivery that fails later is counted and logged by
        the bus, once per outage."""
        self._publish_started = self._clock()
        try:
            await self._publisher.publish(message, wait=False)
        except BusError as exc:
            self.publish_failures += 1
            if self.publish_failures == 1:
                self._log.log(self._bus_log_level, "could not publish {}: {} (logged once "
                              "until it works again)", type(message).__name__, exc)
            return
        finally:
            self._publish_started = None
        if self.publish_failures:
            self._log.log("INFO" if self._bus_log_level == "ERROR" else "DEBUG",
                          "publishing works again after {} failure(s)", self.publish_failures)
            self.publish_failures = 0
