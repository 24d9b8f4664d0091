"""Central's decisions (SPEC §4): assignment, sessions, faults and the breaker per CP.

The controller is the one place where Central decides. It holds a view of every CP,
moves that view only through the shared state machine, and talks to the outside only
through its ports: a publisher (Kafka in the product) and a repository (SQLite).

Messages are handled one at a time by the Kafka consumer; HTTP and TCP calls come in
between. Every decision that reserves a CP is taken before the first ``await``, so two
requests can never both get the same CP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from loguru import logger

from evcharging.apps.ev_central.errors import NotAllowed, UnknownCP
from evcharging.apps.ev_central.events import EventHub
from evcharging.apps.ev_central.repository import (
    CPRecord,
    HealthSnapshot,
    Repository,
    SessionRecord,
    StorageError,
)
from evcharging.common.bus import BusError, Publisher
from evcharging.common.circuit_breaker import BreakerState, CircuitBreaker
from evcharging.common.messages import (
    CentralCommand,
    CommandPayload,
    CommandType,
    CPRegistration,
    CPStatus,
    CPTelemetry,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    FaultEventType,
    SessionEnd,
    SessionStatus,
    StatusEvent,
    clip_reason,
    dump,
    format_ts_opt,
    new_id,
    utcnow,
)
from evcharging.common.states import (
    TRANSITIONS,
    CPEvent,
    CPState,
    InvalidTransition,
    SessionResult,
    next_state,
    path,
)

SEEN_REQUESTS_KEPT = 100_000


@dataclass(frozen=True)
class CentralOptions:
    start_timeout: float = 5.0
    breaker_failure_threshold: int = 3
    breaker_reset_timeout: float = 30.0
    request_max_age: float = 120.0
    cp_silence_timeout: float = 30.0


@dataclass
class ActiveSession:
    """A session from ACCEPTED until its end: pending until the CP confirms SUPPLYING."""

    session_id: str
    request_id: str
    driver_id: str
    cp_id: str
    started_at: datetime
    trial: bool = False
    confirmed: bool = False
    ending: bool = False
    """Its end is being recorded (a second caller leaves it alone)."""
    resumed: bool = False
    """Reloaded after a restart: kept until its CP claims it, reports its end, or shows
    (by a heartbeat) that it does not know it."""
    kw: float = 0.0
    kwh: float = 0.0
    euros: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "request_id": self.request_id,
            "driver_id": self.driver_id,
            "started_at": format_ts_opt(self.started_at),
            "confirmed": self.confirmed,
            "kw": self.kw,
            "kwh": self.kwh,
            "euros": self.euros,
        }


@dataclass
class CPView:
    """What Central knows of one CP."""

    cp_id: str
    breaker: CircuitBreaker
    state: CPState = CPState.DISCONNECTED
    is_faulty: bool = False
    fault_reason: str | None = None
    location: str | None = None
    kw_rate: float | None = None
    euro_rate: float | None = None
    health_url: str | None = None
    registered_at: datetime | None = None
    last_seen: datetime | None = None
    session: ActiveSession | None = None
    last_telemetry: CPTelemetry | None = None
    state_reason: str | None = None
    last_end: SessionEnd | None = None
    """The last session end this CP reported that the ledger has recorded."""
    last_closed: str | None = None
    """The id of the last session that ended on this CP (late meter reports name it)."""
    monitor_interval: float | None = None
    """The health interval its monitor announced (None: no monitor has reported)."""
    monitor_seen: float = 0.0
    """Controller clock reading of the monitor's last report."""
    monitor_lost: bool = False

    @property
    def monitored(self) -> bool:
        """Whether a monitor watches this CP: it reported within 3 of its intervals."""
        return self.monitor_interval is not None and not self.monitor_lost

    def record(self) -> CPRecord:
        return CPRecord(
            cp_id=self.cp_id,
            state=self.state,
            location=self.location,
            kw_rate=self.kw_rate,
            euro_rate=self.euro_rate,
            health_url=self.health_url,
            is_faulty=self.is_faulty,
            fault_reason=self.fault_reason,
            registered_at=self.registered_at,
            updated_at=utcnow(),
            state_reason=self.state_reason,
            breaker_state=self.breaker.state,
            breaker_failures=self.breaker.failures,
            breaker_reason=self.breaker.reason,
        )

    def snapshot(self) -> HealthSnapshot:
        return HealthSnapshot(
            cp_id=self.cp_id,
            state=self.state,
            is_faulty=self.is_faulty,
            breaker_state=self.breaker.state.value,
            ts=utcnow(),
            session_id=self.session.session_id if self.session else None,
        )

    def as_dict(self) -> dict[str, Any]:
        session = self.session
        return {
            "cp_id": self.cp_id,
            "state": self.state.value,
            "state_reason": self.state_reason,
            "is_faulty": self.is_faulty,
            "fault_reason": self.fault_reason,
            "circuit_breaker_state": self.breaker.state.value,
            "circuit_breaker_reason": self.breaker.reason,
            "location": self.location,
            "kw_rate": self.kw_rate,
            "euro_rate": self.euro_rate,
            "health_url": self.health_url,
            "current_driver": session.driver_id if session else None,
            "current_session": session.session_id if session else None,
            "session": session.as_dict() if session else None,
            "last_telemetry": dump(self.last_telemetry) if self.last_telemetry else None,
            "last_seen": format_ts_opt(self.last_seen),
            "registered_at": format_ts_opt(self.registered_at),
            "monitored": self.monitored,
        }


class Controller:
    def __init__(
        self,
        bus: Publisher,
        repo: Repository,
        options: CentralOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        hub: EventHub | None = None,
    ) -> None:
        self.bus = bus
        self.repo = repo
        self.options = options or CentralOptions()
        self.clock = clock
        self.hub = hub or EventHub()
        self.cps: dict[str, CPView] = {}
        self.stats: Counter[str] = Counter()
        self._seen_requests: OrderedDict[str, None] = OrderedDict()
        self._watchdogs: dict[str, asyncio.Task[None]] = {}
        self._unsaved: set[str] = set()
        self._started_at = utcnow()

    # ------------------------------------------------------------------ lifecycle

    async def load(self) -> None:
        """Reload the registry, the breakers and the sessions that were running.

        Nothing is closed here: the sessions a crash left ACTIVE are resumed, and the
        consumer first reads what the CPs reported meanwhile (their end statuses, and the
        ``last_session`` of their heartbeats). A resumed session ends with its CP's meter
        when the CP reports its end, and FAILED only when the CP shows that it does not
        know it, or stays silent (SPEC §4).
        """
        for record in await self.repo.load_cps():
            cp = self._new_view(record.cp_id)
            cp.state = record.state
            cp.state_reason = record.state_reason
            cp.is_faulty = record.is_faulty
            cp.fault_reason = record.fault_reason
            cp.location = record.location
            cp.kw_rate = record.kw_rate
            cp.euro_rate = record.euro_rate
            cp.health_url = record.health_url
            cp.registered_at = record.registered_at
            cp.breaker.restore(record.breaker_state, record.breaker_failures,
                               record.breaker_reason)
            if cp.is_faulty and cp.breaker.state is BreakerState.CLOSED:
                cp.breaker.trip(cp.fault_reason)
        # Requests older than request_max_age are refused anyway, so remembering the ids
        # of younger sessions is enough to keep a replayed request from starting twice.
        since = utcnow() - timedelta(seconds=self.options.request_max_age)
        for request_id in await self.repo.recent_request_ids(since):
            self._remember_request(request_id)
        resumed = await self.repo.active_sessions()
        for row in resumed:
            self._remember_request(row.request_id)
            cp = self.cps.get(row.cp_id) or self._new_view(row.cp_id)
            cp.session = ActiveSession(
                session_id=row.session_id, request_id=row.request_id, driver_id=row.driver_id,
                cp_id=row.cp_id, started_at=row.started_at, confirmed=True, resumed=True,
                kwh=row.kwh, euros=row.euros,
            )
        logger.info("loaded {} CP(s); resumed {} running session(s)", len(self.cps),
                    len(resumed))

    async def close(self) -> None:
        """Cancel the start watchdogs; safe to call twice."""
        tasks = list(self._watchdogs.values())
        self._watchdogs.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ queries

    def get(self, cp_id: str) -> CPView:
        cp = self.cps.get(cp_id)
        if cp is None:
            raise UnknownCP(cp_id)
        return cp

    def all_cps(self) -> list[CPView]:
        return [self.cps[k] for k in sorted(self.cps)]

    def decide(self, cp_id: str) -> str | None:
        """Why a request for this CP would be DENIED now, or None when it would be ACCEPTED."""
        cp = self.cps.get(cp_id)
        if cp is None:
            return "unknown CP"
        if cp.is_faulty or cp.state is CPState.FAULT:
            return "CP faulty"
        if cp.state is CPState.STOPPED:
            return "CP stopped"
        if cp.state is CPState.DISCONNECTED:
            return "CP disconnected"
        if cp.session is not None or cp.state is CPState.SUPPLYING:
            return "CP busy"
        if not cp.breaker.allows():
            return "circuit open"
        return None

    # ------------------------------------------------------------------ driver requests

    async def handle_request(self, request: DriverRequest) -> None:
        """Decide a driver request: ACCEPTED (and START_SUPPLY) or DENIED, exactly once.

        The decision is recorded before anything is sent. When the database cannot record
        it, nothing is held (the CP is released) and StorageError makes the consumer try
        the same message again later.
        """
        if request.request_id in self._seen_requests:
            self.stats["duplicate_requests"] += 1
            logger.warning(
                "duplicate request {} from {} ignored", request.request_id, request.driver_id
            )
            return
        age = (utcnow() - request.ts).total_seconds()
        reason = (
            f"request expired ({age:.0f}s old)"
            if age > self.options.request_max_age
            else self.decide(request.cp_id)
        )
        if reason is not None:
            await self._deny(request, reason)
            return
        cp = self.cps[request.cp_id]
        trial = cp.breaker.state is BreakerState.HALF_OPEN
        cp.breaker.try_acquire()
        session = ActiveSession(
            session_id=new_id(),
            request_id=request.request_id,
            driver_id=request.driver_id,
            cp_id=cp.cp_id,
            started_at=utcnow(),
            trial=trial,
        )
        cp.session = session  # reserved before the first await
        record = SessionRecord(
            session_id=session.session_id,
            request_id=session.request_id,
            cp_id=session.cp_id,
            driver_id=session.driver_id,
            status=SessionStatus.ACTIVE,
            started_at=session.started_at,
        )
        try:
            recorded = await self.repo.start_session(record)  # logs the request as ACCEPTED
        except StorageError:
            if cp.session is session:
                cp.session = None
            if trial:
                cp.breaker.release()
            raise
        self._remember_request(request.request_id)
        self.stats["requests"] += 1
        if not recorded:
            if cp.session is session:
                cp.session = None
            if trial:
                cp.breaker.release()
            self.stats["duplicate_requests"] += 1
            logger.warning("duplicate request {} from {} ignored (decided before)",
                           request.request_id, request.driver_id)
            return
        if cp.session is not session:
            # A fault report ended it while the rows were written; its driver was told.
            await self.repo.finish_session(
                session.session_id, SessionResult.FAILED.value, kwh=0.0, euros=0.0,
                reason="the CP failed before the session started", ended_at=utcnow(),
            )
            return
        self.stats["accepted"] += 1
        logger.info(
            "ACCEPTED request {} of {} on {} (session {})",
            request.request_id, request.driver_id, cp.cp_id, session.session_id,
        )
        await self._send_update(self._update(session, DriverStatus.ACCEPTED))
        if cp.session is not session:
            return
        self._watchdogs[session.session_id] = asyncio.create_task(
            self._start_watchdog(cp, session), name=f"start-watchdog-{session.session_id}"
        )
        await self._send_command(
            cp.cp_id, CommandType.START_SUPPLY,
            driver_id=session.driver_id, session_id=session.session_id,
        )
        self._changed(cp)

    async def _deny(self, request: DriverRequest, reason: str) -> None:
        if not await self.repo.record_request(
            request.request_id, request.driver_id, request.cp_id, DriverStatus.DENIED.value,
            reason, utcnow(),
        ):
            self._remember_request(request.request_id)
            self.stats["duplicate_requests"] += 1
            logger.warning("duplicate request {} from {} ignored (decided before)",
                           request.request_id, request.driver_id)
            return
        self._remember_request(request.request_id)
        self.stats["requests"] += 1
        self.stats["denied"] += 1
        self.stats[f"denied:{reason.split(' (')[0]}"] += 1
        logger.info(
            "DENIED request {} of {} on {}: {}",
            request.request_id, request.driver_id, request.cp_id, reason,
        )
        await self._send_update(
            DriverUpdate(
                request_id=request.request_id,
                driver_id=request.driver_id,
                cp_id=request.cp_id,
                status=DriverStatus.DENIED,
                reason=reason,
            )
        )

    async def _start_watchdog(self, cp: CPView, session: ActiveSession) -> None:
        try:
            await asyncio.sleep(self.options.start_timeout)
            if cp.session is session and not session.confirmed:
                reason = (
                    f"CP did not confirm the start within {self.options.start_timeout:g}s"
                )
                self.stats["start_timeouts"] += 1
                delay = 0.1
                while cp.session is session:
                    try:
                        await self._end_session(
                            cp, SessionResult.FAILED, reason, breaker_failure=True,
                            stop_reason="start not confirmed in time",
                        )
                    except StorageError:  # logged by the repository; try again
                        await asyncio.sleep(delay)
                        delay = min(2 * delay, 5.0)
        finally:
            if self._watchdogs.get(session.session_id) is asyncio.current_task():
                del self._watchdogs[session.session_id]

    # ------------------------------------------------------------------ CP reports

    async def handle_status(self, status: CPStatus) -> None:
        """Follow a CP's state and settle its sessions with the CP's own meter (SPEC §4)."""
        cp = self.cps.get(status.cp_id)
        if cp is None:
            cp = self._new_view(status.cp_id)
            logger.info("CP {} registered by its first status message", status.cp_id)
        cp.last_seen = utcnow()
        before = cp.state
        if cp.state is CPState.STOPPED and status.event is StatusEvent.CONNECT:
            # The CP restarted and came back ACTIVATED; the operator's stop still holds.
            reason = cp.state_reason or "stopped by operator"
            logger.info("CP {} restarted while stopped; stopping it again", cp.cp_id)
            await self._send_command(cp.cp_id, CommandType.STOP_CP, reason=reason)
            self._changed(cp)
            return
        end = status.session_end()
        if end is not None and end != cp.last_end:
            await self._settle(cp, end, status)
        session = cp.session
        if session is not None and status.session_id == session.session_id:
            await self._follow_own_session(cp, session, status)
        elif session is not None and (session.confirmed or session.resumed) and (
            status.state is not CPState.SUPPLYING or status.session_id is not None
        ):
            # The CP is not supplying the session, and did not report its end.
            if status.event is not StatusEvent.REFUSED:
                await self._end_session(
                    cp, SessionResult.FAILED,
                    f"CP {status.state.value.lower()} without the session "
                    f"({status.reason or 'no reason given'})",
                    breaker_failure=not session.resumed,
                )
        elif (
            session is None
            and status.state is CPState.SUPPLYING
            and status.session_id is not None
            and status.session_id != (cp.last_end.session_id if cp.last_end else None)
        ):
            logger.warning("CP {} supplies unknown session {}; stopping it",
                           cp.cp_id, status.session_id)
            await self._send_command(
                cp.cp_id, CommandType.STOP_SUPPLY, session_id=status.session_id,
                reason="session unknown to Central",
            )
        self._follow_state(cp, status.state, status.reason, status.event)
        if cp.state is not before:
            await self._persist(cp)
        self._changed(cp)

    async def _follow_own_session(
        self, cp: CPView, session: ActiveSession, status: CPStatus
    ) -> None:
        if status.event is StatusEvent.REFUSED:
            if not session.confirmed:
                await self._end_session(
                    cp, SessionResult.FAILED,
                    f"CP refused the session: {status.reason or 'refused'}",
                    breaker_failure=True,
                )
        elif status.state is CPState.SUPPLYING:
            if not session.confirmed or session.resumed:
                session.confirmed = True
                session.resumed = False
                self._cancel_watchdog(session.session_id)
                logger.info("CP {} confirmed session {}", cp.cp_id, session.session_id)
        elif status.session_end() is None:
            why = status.reason or f"CP is {status.state.value}"
            await self._end_session(
                cp, SessionResult.FAILED, f"CP refused the session: {why}",
                breaker_failure=True,
            )

    # ------------------------------------------------------------------ the ledger

    async def _settle(self, cp: CPView, end: SessionEnd, status: CPStatus) -> None:
        """Record the end of a session as the CP's meter reports it, exactly once.

        The running session ends with the CP's result and totals. A session Central has
        already closed gets the CP's totals, and its driver one more update with the
        same final status and a ``corrected:`` reason; an explicit end status that finds
        the ledger as it already was sends the final status again (the answer to a
        replayed message may not have reached the broker before a crash).
        """
        session = cp.session
        if session is not None and session.session_id == end.session_id:
            session.kwh, session.euros = end.kwh, end.euros
            reason = {
                SessionResult.COMPLETED: None,
                SessionResult.STOPPED: f"session stopped: {status.reason or 'stopped'}",
                SessionResult.FAILED: f"CP fault: {status.reason or 'unknown fault'}",
            }[end.result]
            await self._end_session(
                cp, end.result, reason, meter_final=True,
                breaker_failure=end.result is SessionResult.FAILED,
            )
        else:
            row = await self.repo.get_session(end.session_id)
            if row is None or row.cp_id != cp.cp_id or not SessionStatus(row.status).is_final:
                logger.debug("CP {} reports the end of unknown session {}",
                             cp.cp_id, end.session_id)
            else:
                await self._correct(row, end.kwh, end.euros, meter_final=True,
                                    resend=status.event is not StatusEvent.HEARTBEAT)
        cp.last_end = end

    async def _correct(
        self, row: SessionRecord, kwh: float, euros: float, *, meter_final: bool, resend: bool
    ) -> None:
        """Bring a closed session's totals to a later meter report; tell its driver."""
        if row.meter_final and not meter_final:
            return  # the CP's end report is final: no telemetry changes it any more
        changed = (kwh, euros) != (row.kwh, row.euros)
        if changed or meter_final != row.meter_final:
            await self.repo.correct_totals(
                row.session_id, kwh=kwh, euros=euros, meter_final=meter_final
            )
        if not changed and not resend:
            return
        status = (DriverStatus.COMPLETED if row.status == SessionStatus.COMPLETED
                  else DriverStatus.FAILED)
        reason = row.reason
        if changed:
            self.stats["ledger_corrections"] += 1
            reason = clip_reason(
                f"corrected: the CP's meter reported {kwh:.4f} kWh, {euros:.4f} € after "
                f"the session was closed ({row.reason or status.value.lower()})"
            )
            logger.warning("session {} on {}: ledger corrected from {:.4f} to {:.4f} kWh",
                           row.session_id, row.cp_id, row.kwh, kwh)
        await self._send_update(DriverUpdate(
            request_id=row.request_id, driver_id=row.driver_id, cp_id=row.cp_id,
            status=status, reason=reason, session_id=row.session_id, kwh=kwh, euros=euros,
        ))

    def _follow_state(
        self,
        cp: CPView,
        target: CPState,
        reason: str | None,
        reported: StatusEvent | None = None,
    ) -> None:
        """Move Central's view to the CP's reported state through allowed events.

        The CP's own event is applied when it leads from Central's view to the reported
        state; otherwise (a heartbeat, or messages Central missed) the shortest path of
        allowed events is followed.
        """
        if cp.state is target:
            return
        event = reported.transition if reported is not None else None
        if event is not None and TRANSITIONS.get((cp.state, event)) is target:
            events = [event]
        else:
            events = path(cp.state, target)
        for step in events:
            self._apply(cp, step, reason)

    def _apply(self, cp: CPView, event: CPEvent, reason: str | None) -> None:
        session = cp.session
        new = next_state(
            cp.state, event,
            driver_id=session.driver_id if session else "unknown",
            session_id=session.session_id if session else "unknown",
        )
        logger.info("CP {}: {} --{}--> {}{}", cp.cp_id, cp.state.value, event.value,
                    new.value, f" ({reason})" if reason else "")
        cp.state = new
        cp.state_reason = reason

    # ------------------------------------------------------------------ telemetry

    async def handle_telemetry(self, telemetry: CPTelemetry) -> None:
        cp = self.cps.get(telemetry.cp_id)
        if cp is None:
            self.stats["telemetry_unknown_cp"] += 1
            logger.debug("telemetry from unknown CP {} ignored", telemetry.cp_id)
            return
        cp.last_seen = utcnow()
        cp.last_telemetry = telemetry
        session = cp.session
        if session is None or telemetry.session_id != session.session_id:
            self.stats["telemetry_stale"] += 1
            if telemetry.session_id is not None and telemetry.session_id == cp.last_closed:
                # The meter ran on after Central closed the session: the meter is the truth.
                row = await self.repo.get_session(telemetry.session_id)
                if row is not None and SessionStatus(row.status).is_final:
                    await self._correct(row, telemetry.kwh, telemetry.euros,
                                        meter_final=False, resend=False)
            self.hub.publish({"type": "telemetry", "telemetry": dump(telemetry)})
            return
        if not session.confirmed or session.resumed:
            session.confirmed = True
            session.resumed = False
            self._cancel_watchdog(session.session_id)
        session.kw, session.kwh, session.euros = telemetry.kw, telemetry.kwh, telemetry.euros
        await self._send_update(self._update(session, DriverStatus.IN_PROGRESS))
        self.hub.publish({"type": "telemetry", "telemetry": dump(telemetry)})

    # ------------------------------------------------------------------ monitors, operators

    async def register(self, registration: CPRegistration) -> CPView:
        cp = self.cps.get(registration.cp_id)
        created = cp is None
        if cp is None:
            cp = self._new_view(registration.cp_id)
        for name in ("location", "kw_rate", "euro_rate", "health_url"):
            value = getattr(registration, name)
            if value is not None:
                setattr(cp, name, value)
        await self._persist(cp)
        logger.info("CP {} {}", cp.cp_id, "registered" if created else "re-registered")
        self._changed(cp)
        return cp

    async def report_fault(self, cp_id: str, is_faulty: bool, reason: str) -> CPView:
        cp = self.get(cp_id)
        if is_faulty:
            await self._mark_faulty(cp, reason or "fault reported")
        else:
            await self._mark_recovered(cp, reason or "recovered")
        return cp

    async def _mark_faulty(self, cp: CPView, reason: str) -> None:
        """Record the fault (first, so a database error changes nothing), deny the CP,
        open its breaker and end its session. A retried report records no second event."""
        was_faulty = cp.is_faulty
        if not was_faulty:
            await self.repo.record_fault_event(cp.cp_id, FaultEventType.FAULT, reason, utcnow())
            self.stats["faults"] += 1
            logger.warning("CP {} is faulty: {}", cp.cp_id, reason)
            self.hub.publish({"type": "fault", "cp_id": cp.cp_id, "reason": reason,
                              "ts": format_ts_opt(utcnow())})
        cp.is_faulty = True
        cp.fault_reason = reason
        cp.breaker.trip(reason)
        if cp.session is not None:
            await self._end_session(
                cp, SessionResult.FAILED, f"CP fault: {reason}", stop_reason=reason
            )
        if cp.state is not CPState.FAULT:
            self._apply(cp, CPEvent.FAULT, reason)
        await self._persist(cp)
        self._changed(cp)

    async def _mark_recovered(self, cp: CPView, reason: str) -> None:
        if not cp.is_faulty:
            logger.debug("recovery report for {} which is not faulty", cp.cp_id)
            return
        await self.repo.record_fault_event(cp.cp_id, FaultEventType.RECOVERY, reason, utcnow())
        cp.is_faulty = False
        cp.fault_reason = None
        cp.breaker.recover()
        self.stats["recoveries"] += 1
        logger.info("CP {} recovered: {} (breaker {})", cp.cp_id, reason, cp.breaker.state.value)
        self.hub.publish({"type": "recovery", "cp_id": cp.cp_id, "reason": reason,
                          "ts": format_ts_opt(utcnow())})
        await self._persist(cp)
        self._changed(cp)

    async def stop_cp(self, cp_id: str, reason: str = "stopped by operator") -> CPView:
        return await self._operator_command(cp_id, CPEvent.STOP_CP, CommandType.STOP_CP, reason)

    async def resume_cp(self, cp_id: str, reason: str = "resumed by operator") -> CPView:
        return await self._operator_command(
            cp_id, CPEvent.RESUME_CP, CommandType.RESUME_CP, reason
        )

    async def _operator_command(
        self, cp_id: str, event: CPEvent, command: CommandType, reason: str
    ) -> CPView:
        cp = self.get(cp_id)
        try:
            next_state(cp.state, event)
        except InvalidTransition as exc:
            raise NotAllowed(f"{cp_id}: {exc}") from exc
        logger.info("operator: {} {} ({})", command.value, cp_id, reason)
        await self._send_command(cp_id, command, reason=reason)
        return cp

    async def monitor_report(self, cp_id: str, interval: float, healthy: bool) -> CPView:
        """A CP's monitor says it is alive (every health interval, SPEC §5 ``monitored``)."""
        cp = self.get(cp_id)
        cp.monitor_interval = interval
        cp.monitor_seen = self.clock()
        if cp.monitor_lost:
            cp.monitor_lost = False
            reason = "the monitor reports again"
            logger.info("CP {}: {}", cp.cp_id, reason)
            await self.repo.record_fault_event(cp.cp_id, FaultEventType.MONITOR_BACK, reason,
                                               utcnow())
            self.hub.publish({"type": "monitor", "cp_id": cp.cp_id, "monitored": True,
                              "reason": reason, "ts": format_ts_opt(utcnow())})
            self._changed(cp)
        if not healthy and not cp.is_faulty:
            logger.debug("CP {}: its monitor's last check failed", cp.cp_id)
        return cp

    async def check_monitors(self) -> list[str]:
        """Mark the CPs whose monitor has not reported for 3 of its intervals; a fault
        event "monitor lost" each. Returns their ids."""
        now = self.clock()
        lost = []
        for cp in self.cps.values():
            if (cp.monitor_interval is None or cp.monitor_lost
                    or now - cp.monitor_seen <= 3 * cp.monitor_interval):
                continue
            cp.monitor_lost = True
            reason = f"monitor lost: no report for {3 * cp.monitor_interval:g}s"
            logger.warning("CP {}: {}", cp.cp_id, reason)
            self.stats["monitors_lost"] += 1
            await self.repo.record_fault_event(cp.cp_id, FaultEventType.MONITOR_LOST, reason,
                                               utcnow())
            self.hub.publish({"type": "monitor", "cp_id": cp.cp_id, "monitored": False,
                              "reason": reason, "ts": format_ts_opt(utcnow())})
            self._changed(cp)
            lost.append(cp.cp_id)
        return lost

    # ------------------------------------------------------------------ silent CPs

    async def check_silent_cps(self) -> list[str]:
        """Take CPs not heard from for ``cp_silence_timeout`` as DISCONNECTED.

        An engine re-announces its state every few seconds, so silence means it is gone
        (e.g. killed with no monitor to report it). A session it was running ends FAILED.
        Returns the ids of the CPs that were marked.
        """
        now = utcnow()
        limit = timedelta(seconds=self.options.cp_silence_timeout)
        marked = []
        for cp in list(self.cps.values()):
            heard = cp.last_seen or self._started_at
            if now - heard < limit or cp.state in (CPState.DISCONNECTED, CPState.FAULT):
                continue
            reason = f"no message from the CP for {self.options.cp_silence_timeout:g}s"
            logger.warning("CP {} is silent: {}", cp.cp_id, reason)
            await self._end_session(cp, SessionResult.FAILED, f"CP lost: {reason}",
                                    breaker_failure=True)
            self._follow_state(cp, CPState.DISCONNECTED, reason)
            await self._persist(cp)
            self._changed(cp)
            marked.append(cp.cp_id)
        return marked

    # ------------------------------------------------------------------ snapshots

    async def snapshot_health(self) -> int:
        for cp_id in list(self._unsaved):
            await self.repo.upsert_cp(self.cps[cp_id].record())
            self._unsaved.discard(cp_id)
        rows = [cp.snapshot() for cp in self.cps.values()]
        if rows:
            await self.repo.record_health_many(rows)
        return len(rows)

    # ------------------------------------------------------------------ internals

    def _new_view(self, cp_id: str) -> CPView:
        cp = CPView(
            cp_id=cp_id,
            breaker=CircuitBreaker(
                failure_threshold=self.options.breaker_failure_threshold,
                reset_timeout=self.options.breaker_reset_timeout,
                clock=self.clock,
            ),
            registered_at=utcnow(),
        )
        self.cps[cp_id] = cp
        return cp

    def _remember_request(self, request_id: str) -> None:
        self._seen_requests[request_id] = None
        while len(self._seen_requests) > SEEN_REQUESTS_KEPT:
            self._seen_requests.popitem(last=False)

    def _cancel_watchdog(self, session_id: str) -> None:
        task = self._watchdogs.get(session_id)
        if task is None or task is asyncio.current_task():
            return  # a watchdog that fires removes itself when it is done
        del self._watchdogs[session_id]
        task.cancel()

    async def _end_session(
        self,
        cp: CPView,
        result: SessionResult,
        reason: str | None,
        *,
        breaker_failure: bool = False,
        stop_reason: str | None = None,
        meter_final: bool = False,
    ) -> None:
        """End the CP's session; with `stop_reason`, tell the CP to stop supplying it.

        Order: STOP_SUPPLY is queued, the row is finished, and only then is the CP
        released, the driver told and the breaker counted. When the database fails
        (StorageError) nothing in memory has changed and the caller tries again (the CP
        may get STOP_SUPPLY twice). The CP stays busy until the end is recorded, so no
        START_SUPPLY of a next session can overtake the STOP_SUPPLY.
        """
        session = cp.session
        if session is None or session.ending:
            return
        session.ending = True
        status = DriverStatus.COMPLETED if result is SessionResult.COMPLETED else (
            DriverStatus.FAILED
        )
        ended = utcnow()
        try:
            if stop_reason is not None:
                await self._send_command(
                    cp.cp_id, CommandType.STOP_SUPPLY, session_id=session.session_id,
                    reason=stop_reason,
                )
            await self.repo.finish_session(
                session.session_id, result.value, kwh=session.kwh, euros=session.euros,
                reason=reason, ended_at=ended, meter_final=meter_final,
            )
        except BaseException:
            session.ending = False
            raise
        if cp.session is session:
            cp.session = None
        cp.last_closed = session.session_id
        self._cancel_watchdog(session.session_id)
        breaker_before = (cp.breaker.state, cp.breaker.failures)
        if result is SessionResult.COMPLETED:
            cp.breaker.record_success()
        elif breaker_failure:
            cp.breaker.record_failure(reason)
        elif session.trial:
            cp.breaker.release()
        if (cp.breaker.state, cp.breaker.failures) != breaker_before:
            await self._persist_later(cp)
        await self._send_update(self._update(session, status, reason=reason))
        self.stats[f"sessions_{result.value.lower()}"] += 1
        log = logger.info if result is SessionResult.COMPLETED else logger.warning
        log("session {} on {} ended {}: {:.4f} kWh, {:.4f} €{}", session.session_id,
            cp.cp_id, result.value, session.kwh, session.euros,
            f" ({reason})" if reason else "")
        self.hub.publish({
            "type": "session", "result": result.value, "cp_id": cp.cp_id,
            "driver_id": session.driver_id, "session_id": session.session_id,
            "kwh": session.kwh, "euros": session.euros, "reason": reason,
            "ts": format_ts_opt(ended),
        })
        self._changed(cp)

    def _update(
        self, session: ActiveSession, status: DriverStatus, reason: str | None = None
    ) -> DriverUpdate:
        with_totals = status in (DriverStatus.IN_PROGRESS, DriverStatus.COMPLETED,
                                 DriverStatus.FAILED)
        return DriverUpdate(
            request_id=session.request_id,
            driver_id=session.driver_id,
            cp_id=session.cp_id,
            status=status,
            reason=reason,
            session_id=session.session_id,
            kw=session.kw if status is DriverStatus.IN_PROGRESS else None,
            kwh=session.kwh if with_totals else None,
            euros=session.euros if with_totals else None,
        )

    async def _send_update(self, update: DriverUpdate) -> None:
        try:
            await self.bus.publish(update, wait=False)
        except BusError as exc:
            self.stats["publish_errors"] += 1
            logger.error("could not tell {} about {}: {}", update.driver_id, update.status, exc)

    async def _send_command(
        self,
        cp_id: str,
        cmd: CommandType,
        *,
        driver_id: str | None = None,
        session_id: str | None = None,
        reason: str | None = None,
    ) -> None:
        command = CentralCommand(
            cp_id=cp_id,
            cmd=cmd,
            payload=CommandPayload(driver_id=driver_id, session_id=session_id, reason=reason),
        )
        try:
            await self.bus.publish(command, wait=False)
        except BusError as exc:
            self.stats["publish_errors"] += 1
            logger.error("could not send {} to {}: {}", cmd.value, cp_id, exc)

    async def _persist(self, cp: CPView) -> None:
        await self.repo.upsert_cp(cp.record())
        await self.repo.record_health(
            cp.cp_id, cp.state, cp.is_faulty, cp.breaker.state, utcnow(),
            session_id=cp.session.session_id if cp.session else None,
        )

    async def _persist_later(self, cp: CPView) -> None:
        """Save the CP's record now if the database lets us, else at the next housekeeping
        round (the decision it belongs to is recorded already)."""
        try:
            await self.repo.upsert_cp(cp.record())
        except StorageError:
            self._unsaved.add(cp.cp_id)

    def _changed(self, cp: CPView) -> None:
        self.hub.publish({"type": "cp", "cp": cp.as_dict()})
