"""Central's decisions (SPEC §4): assignment, sessions, the ledger, faults, the breakers.

Over 400 lines on purpose: it is the one class that decides (STYLE: each decision in one
place); the ledger, the sessions and the faults share its state and its outbox, and a
split would scatter one decision over several files. Periodic checks, the in-memory views,
the outbox and the SQL are already modules of their own.

The controller is the one place where Central decides. It holds a view of every CP
(:mod:`~evcharging.apps.ev_central.views`), moves that view only through the shared state
machine, and talks to the outside only through its ports: a publisher (Kafka) and a
repository (SQLite), both behind an :class:`~evcharging.apps.ev_central.outbox.Outbox`.

Decisions are taken in memory, message by message, and queue their writes and messages
in the outbox; the consumer flushes it once per batch it reads (one transaction), and
only then are the messages sent and the offsets committed. An HTTP or TCP call flushes
before it answers. So a decision is never announced before it is recorded, and a
database that cannot be written delays decisions but loses none.

The ledger: the CP's meter is the truth. A session's billed kWh and € are the last totals
its CP reported for it (telemetry, its end status, or the ``last_session`` a heartbeat
repeats), whenever that report arrives; a report that changes a closed session's totals
sends its driver one more update with the same final status and a ``corrected:`` reason.

Periodic checks (silent CPs, lost monitors, snapshots) are in
:mod:`~evcharging.apps.ev_central.housekeeping`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from loguru import logger

from evcharging.apps.ev_central import writes
from evcharging.apps.ev_central.errors import NotAllowed, NotOwner, UnknownCP
from evcharging.apps.ev_central.events import EventHub
from evcharging.apps.ev_central.limits import (
    FORGET_UNREGISTERED_AFTER,
    MAX_CPS,
    MAX_UNREGISTERED,
    TooManyCPs,
)
from evcharging.apps.ev_central.outbox import Outbox
from evcharging.apps.ev_central.ownership import Ownership
from evcharging.apps.ev_central.records import SessionRecord
from evcharging.apps.ev_central.repository import Repository, StorageError
from evcharging.apps.ev_central.schemas import cp_out
from evcharging.apps.ev_central.tally import Tally
from evcharging.apps.ev_central.views import ActiveSession, ClosedSession, CPView, car_of
from evcharging.common.bus import Publisher, Topic
from evcharging.common.circuit_breaker import BreakerState, CircuitBreaker
from evcharging.common.kafka import partition_for_key
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
    Message,
    SessionEnd,
    SessionStatus,
    StatusEvent,
    clip_reason,
    dump,
    format_ts_opt,
    new_id,
    utcnow,
)
from evcharging.common.readclock import ReadClock
from evcharging.common.service import TaskOwner
from evcharging.common.states import (
    TRANSITIONS,
    CPEvent,
    CPState,
    InvalidTransition,
    SessionResult,
    next_state,
    path,
)

__all__ = ["ActiveSession", "CPView", "CentralOptions", "Controller"]

SEEN_REQUESTS_KEPT = 100_000
CLOSED_SESSIONS_KEPT = 50_000
OVERLOADED = "Central overloaded"
START_POLL = 0.1
OWNER_WAIT = 10.0
"""Seconds a change waits for a rebalance (or the first assignment) to end."""
REBALANCE_WAIT = 60.0
"""Seconds a start timeout waits for a rebalance to end before it lets the session go
(the CP's owner loads it as a running session)."""
CP_TOPICS = (Topic.CP_STATUS, Topic.CP_TELEMETRY)
"""The topics a CP reports on: keyed by its id, so one partition of each holds it."""


@dataclass(frozen=True)
class CentralOptions:
    start_timeout: float = 5.0
    breaker_failure_threshold: int = 3
    breaker_reset_timeout: float = 30.0
    request_max_age: float = 120.0
    cp_silence_timeout: float = 30.0
    shed_after: float = 1.0
    """A request read this many seconds after the broker appended it is DENIED
    "Central overloaded"."""
    max_cps: int = MAX_CPS
    """Registered CPs held at most: a new one past it is refused (409, :class:`TooManyCPs`)."""
    max_unregistered: int = MAX_UNREGISTERED
    """CPs known only from the bus held at most: statuses of more are counted, ignored."""
    forget_unregistered_after: float = FORGET_UNREGISTERED_AFTER
    """A CP known only from the bus silent this long is forgotten (housekeeping)."""


class Controller:
    def __init__(
        self,
        bus: Publisher,
        repo: Repository,
        options: CentralOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        hub: EventHub | None = None,
        readclock: ReadClock | None = None,
        ownership: Ownership | None = None,
    ) -> None:
        self.ownership = ownership or Ownership()
        """Which CPs this instance decides for (SPEC §9; standalone: all of them)."""
        self.bus = bus
        self.repo = repo
        self.options = options or CentralOptions()
        self.clock = clock
        self.hub = hub or EventHub()
        self.cps: dict[str, CPView] = {}
        self.tally = Tally()
        """The summary's counts over ``cps``, kept up as they change (limits.py, tally.py)."""
        self.stats: Counter[str] = Counter()
        self.outbox = Outbox(repo, bus, self.stats, on_sent=self._sent,
                             instance=self.ownership.instance)
        self.readclock = readclock or ReadClock(standalone=True)
        """The broker's time and how far Central has read each partition (SPEC §4): ages,
        silences and start timeouts are measured with it, never with a CP's clock."""
        self.billed_kwh = 0.0
        self.billed_euros = 0.0
        """What the sessions ended since the start billed, corrections included (metrics)."""
        self._seen_requests: OrderedDict[str, None] = OrderedDict()
        self._closed: OrderedDict[str, ClosedSession] = OrderedDict()
        self._watchdogs: dict[str, asyncio.Task[None]] = {}
        self._timers = TaskOwner("start timeouts", level="ERROR")
        self.session_hooks: list[Callable[[CPView, ActiveSession, bool], None]] = []
        """Told of each session that starts (True) or ends (False) on a CP, at once and
        cheaply (smart charging, :mod:`~evcharging.apps.ev_central.energy`)."""
        self.limit_refused_hooks: list[Callable[[CPView, str | None], None]] = []
        """Told of each SET_LIMIT a CP refused (REFUSED, ``cmd`` SET_LIMIT), with its
        session id: the limit is not in force (smart charging sends it again)."""
        self.site_hooks: list[Callable[[CPView, str | None], None]] = []
        """Told of each CP whose site a registration changed, with its old site (smart
        charging re-indexes its running session)."""

    # ------------------------------------------------------------------ lifecycle

    async def load(self, keep: Callable[[str], bool] | None = None) -> None:
        """Reload the registry, the breakers and the sessions that were running: of every
        CP, or of the CPs `keep` says (the partitions a rebalance gave, SPEC §9).

        Nothing is closed here: the sessions a crash left ACTIVE are resumed, and the
        consumer first reads what the CPs reported meanwhile. A resumed session ends with
        its CP's meter when the CP reports its end, and FAILED only when the CP shows that
        it does not know it, or stays silent (SPEC §4).
        """
        loaded = 0
        for record in await self.repo.load_cps():
            if keep is not None and not keep(record.cp_id):
                continue
            loaded += 1
            old = self.cps.get(record.cp_id)
            if old is not None:
                self.tally.remove(old)
            cp = self._new_view(record.cp_id)
            cp.state = record.state
            cp.state_reason = record.state_reason
            cp.is_faulty = record.is_faulty
            cp.fault_reason = record.fault_reason
            cp.location = record.location
            cp.site = record.site
            cp.protocol, cp.vendor, cp.model = record.protocol, record.vendor, record.model
            cp.kw_rate = record.kw_rate
            cp.euro_rate = record.euro_rate
            cp.health_url = record.health_url
            cp.registered_at = record.registered_at
            cp.registered = record.registered
            cp.breaker.restore(record.breaker_state, record.breaker_failures,
                               record.breaker_reason)
            if cp.is_faulty and cp.breaker.state is BreakerState.CLOSED:
                cp.breaker.trip(cp.fault_reason)
        # Requests older than request_max_age are refused anyway, so remembering the ids
        # of younger ones is enough to keep a replayed request from being decided twice
        # (younger than the newest decided: this process's clock is not consulted).
        within = timedelta(seconds=2 * self.options.request_max_age)
        for request_id in await self.repo.recent_request_ids(within):
            self._remember_request(request_id)
        resumed = [row for row in await self.repo.active_sessions()
                   if keep is None or keep(row.cp_id)]
        for row in resumed:
            self._remember_request(row.request_id)
            cp = self.cps.get(row.cp_id) or self._new_view(row.cp_id)
            cp.session = ActiveSession(
                session_id=row.session_id, request_id=row.request_id, driver_id=row.driver_id,
                cp_id=row.cp_id, started_at=row.started_at, confirmed=True, resumed=True,
                kwh=row.kwh, euros=row.euros, first_report=row.first_report,
                kwh_wanted=row.kwh_wanted, departure=row.departure, car=car_of(row),
            )
        logger.info("loaded {} CP(s); resumed {} running session(s)", loaded, len(resumed))

    def drop(self, keep: Callable[[str], bool]) -> int:
        """Forget the CPs `keep` does not say (their partitions went to another Central
        in a rebalance, everything decided for them flushed): their start watchdogs stop
        and smart charging lets their sessions go. How many were dropped."""
        dropped = [cp for cp_id, cp in self.cps.items() if not keep(cp_id)]
        for cp in dropped:
            if cp.session is not None:
                self._cancel_watchdog(cp.session.session_id)
                self._session_hook(cp, cp.session, started=False)
            self.tally.remove(cp)
            del self.cps[cp.cp_id]
        if dropped:
            logger.info("gave up {} CP(s) to other Centrals", len(dropped))
        return len(dropped)

    async def _check_owner(self, cp_id: str) -> None:
        """NotOwner when another Central decides for the CP. While a rebalance is under
        way (or before the first assignment) it waits up to :data:`OWNER_WAIT` seconds
        for it to end, so that a Central that is starting answers once it can."""
        if not self.ownership.settled:
            await self.ownership.wait_settled(OWNER_WAIT)
        if not self.ownership.owns(cp_id):
            self.stats["not_owner"] += 1
            raise NotOwner(cp_id)

    async def close(self) -> None:
        """Cancel the start watchdogs and write what is queued; safe to call twice."""
        self._watchdogs.clear()
        await self._timers.close()
        await self.outbox.close()
        if self.outbox.pending:
            try:
                await self.outbox.flush()
            except StorageError as exc:
                logger.error("{} decision(s) not written at shutdown: {}", self.outbox.pending,
                             exc)

    async def flush(self) -> None:
        """Record and announce the decisions taken so far (retrying while the database
        cannot be written): the consumer calls this after each batch."""
        await self.outbox.flush_retrying()

    def behind(self) -> float:
        """Seconds Central is behind the broker (0 when it has read everything)."""
        return self.readclock.behind()

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
        """Decide a driver request, exactly once: ACCEPTED (and START_SUPPLY) or DENIED."""
        if request.request_id in self._seen_requests:
            self.stats["duplicate_requests"] += 1
            logger.warning(
                "duplicate request {} from {} ignored", request.request_id, request.driver_id
            )
            return
        self._remember_request(request.request_id)
        self.stats["requests"] += 1
        # Dated by the broker's append time, never by the driver's clock (SPEC §4).
        received = self.readclock.dated()
        age = (self.readclock.now() - received).total_seconds()
        if age > self.options.request_max_age:
            reason: str | None = f"request expired ({age:.0f}s old)"
        elif age > self.options.shed_after:
            reason = OVERLOADED  # Central is behind: deny now rather than fail it later
        else:
            reason = self.decide(request.cp_id)
        if reason is not None:
            self._deny(request, reason, received)
            return
        cp = self.cps[request.cp_id]
        trial = cp.breaker.state is BreakerState.HALF_OPEN
        cp.breaker.try_acquire()
        session = ActiveSession(
            session_id=new_id(), request_id=request.request_id, driver_id=request.driver_id,
            cp_id=cp.cp_id, started_at=received, trial=trial,
            kwh_wanted=request.kwh_wanted, departure=request.departure, car=request.car,
        )
        cp.session = session
        self.outbox.write(writes.RequestLogged(session.request_id, session.driver_id, cp.cp_id,
                                               DriverStatus.ACCEPTED.value, None,
                                               session.started_at))
        self.outbox.write(writes.SessionOpened(SessionRecord(
            session_id=session.session_id, request_id=session.request_id, cp_id=cp.cp_id,
            driver_id=session.driver_id, status=SessionStatus.ACTIVE,
            started_at=session.started_at, kwh_wanted=request.kwh_wanted,
            departure=request.departure,
            car_battery_kwh=request.car.battery_kwh if request.car else None,
            car_soc=request.car.soc if request.car else None,
            car_max_kw=request.car.max_kw if request.car else None,
        )))
        self.stats["accepted"] += 1
        logger.info("ACCEPTED request {} of {} on {} (session {})",
                    request.request_id, request.driver_id, cp.cp_id, session.session_id)
        self._send_update(self._update(session, DriverStatus.ACCEPTED))
        # The start timeout runs from when START_SUPPLY leaves (see _sent), not from the
        # decision: a database that holds the decision back is Central's own delay.
        self.outbox.send(CentralCommand(
            cp_id=cp.cp_id, cmd=CommandType.START_SUPPLY,
            payload=CommandPayload(driver_id=session.driver_id, session_id=session.session_id,
                                   kwh_wanted=request.kwh_wanted, departure=request.departure,
                                   car=request.car),
        ))
        self._session_hook(cp, session, started=True)
        self.changed(cp)

    def _deny(self, request: DriverRequest, reason: str, received: datetime) -> None:
        self.outbox.write(writes.RequestLogged(request.request_id, request.driver_id,
                                               request.cp_id, DriverStatus.DENIED.value, reason,
                                               received))
        self.stats["denied"] += 1
        self.stats[f"denied:{reason.split(' (')[0]}"] += 1
        logger.info("DENIED request {} of {} on {}: {}",
                    request.request_id, request.driver_id, request.cp_id, reason)
        self._send_update(DriverUpdate(
            request_id=request.request_id, driver_id=request.driver_id, cp_id=request.cp_id,
            status=DriverStatus.DENIED, reason=reason,
        ))

    def _sent(self, message: Message) -> None:
        """The outbox sent `message`: a START_SUPPLY starts its session's start timeout."""
        if not (isinstance(message, CentralCommand)
                and message.cmd is CommandType.START_SUPPLY):
            return
        cp = self.cps.get(message.cp_id)
        session = cp.session if cp is not None else None
        if cp is None or session is None or session.session_id != message.payload.session_id:
            return  # ended before its START_SUPPLY left
        if session.confirmed or session.session_id in self._watchdogs:
            return
        self._watchdogs[session.session_id] = self._timers.spawn(
            self._start_watchdog(cp, session, self._positions_now(cp)),
            f"start-watchdog-{session.session_id}",
        )

    async def _start_watchdog(
        self, cp: CPView, session: ActiveSession, sent: list[float | None]
    ) -> None:
        """Fail a start the CP has not confirmed once Central has read the CP's own
        partitions for the start timeout past START_SUPPLY leaving: Central's own delay, a
        stall or a paused broker fails no session (SPEC §4); a confirmation is taken
        whenever it is read."""
        timeout = self.options.start_timeout
        try:
            await asyncio.sleep(timeout)
            while cp.session is session and not session.confirmed:
                if self._read_past(cp, sent, timeout):
                    break
                await asyncio.sleep(START_POLL)
            if not self.ownership.settled:  # a rebalance: decide once it is over
                await self.ownership.wait_settled(REBALANCE_WAIT)
            if not self.ownership.owns(cp.cp_id):
                # Another Central owns the CP now: it loaded the session as a running one,
                # which ends by the CP's own reports (SPEC §9).
                return
            if cp.session is session and not session.confirmed:
                self.stats["start_timeouts"] += 1
                self.end_session(
                    cp, SessionResult.FAILED,
                    f"CP did not confirm the start within {self.options.start_timeout:g}s",
                    breaker_failure=True, stop_reason="start not confirmed in time",
                )
                self.outbox.flush_soon()
        finally:
            if self._watchdogs.get(session.session_id) is asyncio.current_task():
                del self._watchdogs[session.session_id]

    # ------------------------------------------------------------------ CP reports

    async def handle_status(self, status: CPStatus) -> None:
        """Follow a CP's state and settle its sessions with the CP's own meter (SPEC §4)."""
        cp = self.cps.get(status.cp_id) or self._cp_from_bus(status.cp_id)
        if cp is None:
            return
        ts = self._heard(cp, status.ts, Topic.CP_STATUS)
        before = cp.state
        if status.event is StatusEvent.REFUSED and status.cmd is CommandType.SET_LIMIT:
            for hook in self.limit_refused_hooks:
                hook(cp, status.session_id)
        if cp.state is CPState.STOPPED and status.event is StatusEvent.CONNECT:
            # The CP restarted and came back ACTIVATED; the operator's stop still holds.
            logger.info("CP {} restarted while stopped; stopping it again", cp.cp_id)
            self._send_command(cp.cp_id, CommandType.STOP_CP,
                               reason=cp.state_reason or "stopped by operator")
            self.changed(cp)
            return
        # Read what the decision needs before it queues anything: an HTTP call's flush
        # while this handler awaits must not send half a decision (exactly once, §4).
        end = status.session_end()
        closed_end = (await self._closed_session(end.session_id)
                      if end is not None and not end.same_as(cp.last_end)
                      and (cp.session is None or cp.session.session_id != end.session_id)
                      else None)
        unknown = (
            status.state is CPState.SUPPLYING
            and status.session_id is not None
            and status.session_id != cp.last_closed
            and (cp.session is None or cp.session.session_id != status.session_id)
            and (end is None or end.session_id != status.session_id)
            and await self._closed_session(status.session_id) is None
        )
        if end is not None and not end.same_as(cp.last_end):
            self._settle(cp, end, status, ts, closed_end)
        session = cp.session
        if session is not None and status.session_id == session.session_id:
            self._follow_own_session(cp, session, status, ts)
        elif (
            session is not None
            and (session.confirmed or session.resumed)
            and status.event is not StatusEvent.REFUSED
            and (status.state is not CPState.SUPPLYING or status.session_id is not None)
            # A report the CP made before its first report of the session (by its own
            # clock, whichever topic carried it) says nothing about the session.
            and self._after_first_report(session, status.ts)
        ):
            # The CP is not supplying the session, and did not report its end.
            self.end_session(
                cp, SessionResult.FAILED,
                f"CP {status.state.value.lower()} without the session "
                f"({status.reason or 'no reason given'})",
                breaker_failure=not session.resumed,
            )
        elif session is None and unknown:
            if status.event is StatusEvent.START_SUPPLY and status.driver_id is not None:
                self._adopt(cp, status, ts)
            else:
                logger.warning("CP {} supplies unknown session {}; stopping it",
                               cp.cp_id, status.session_id)
                self._send_command(cp.cp_id, CommandType.STOP_SUPPLY,
                                   session_id=status.session_id,
                                   reason="session unknown to Central")
        self.follow_state(cp, status.state, status.reason, status.event)
        if cp.state is not before:
            self.persist(cp)
        self.changed(cp)

    def _adopt(self, cp: CPView, status: CPStatus, ts: datetime) -> None:
        """A session the charger started by itself (an id tag at an OCPP charger, SPEC
        §8): the charger is already charging, so Central records it as a session of that
        driver with no request and bills it by its meter. It confirms the session with a
        START_SUPPLY of it (the gateway answers the id tag Accepted); where Central would
        have denied a request, it stops it with a STOP_SUPPLY (the id tag is answered
        Invalid; the session is still billed)."""
        assert status.session_id is not None and status.driver_id is not None
        refused = self.decide(cp.cp_id)
        session = ActiveSession(
            session_id=status.session_id, request_id=f"charger.{status.session_id}"[:64],
            driver_id=status.driver_id, cp_id=cp.cp_id, started_at=ts, confirmed=True,
            first_report=status.ts, last_report=ts,
        )
        cp.session = session
        self.outbox.write(writes.SessionOpened(SessionRecord(
            session_id=session.session_id, request_id=session.request_id, cp_id=cp.cp_id,
            driver_id=session.driver_id, status=SessionStatus.ACTIVE, started_at=ts,
            first_report=status.ts,
        )))
        self.outbox.write(writes.SessionStarted(session.session_id, ts, status.ts))
        self.stats["sessions_started_by_charger"] += 1
        logger.info("CP {}: session {} of {} started at the charger, recorded with no request",
                    cp.cp_id, session.session_id, session.driver_id)
        if refused is not None:
            logger.warning("CP {}: stopping session {} started at the charger: {}",
                           cp.cp_id, session.session_id, refused)
            self._send_command(cp.cp_id, CommandType.STOP_SUPPLY, session_id=session.session_id,
                               reason=f"Central would have denied it: {refused}")
        else:  # the verdict the gateway answers the id tag with: accepted, already running
            self._send_command(cp.cp_id, CommandType.START_SUPPLY, driver_id=session.driver_id,
                               session_id=session.session_id)
        self._session_hook(cp, session, started=True)
        self.changed(cp)

    def _follow_own_session(
        self, cp: CPView, session: ActiveSession, status: CPStatus, ts: datetime
    ) -> None:
        if status.event is not StatusEvent.REFUSED:
            self._reported(session, status.ts, ts)
        if status.event is StatusEvent.REFUSED:
            # A refused SET_LIMIT says nothing of the session (smart charging resends it).
            if not session.confirmed and status.cmd is not CommandType.SET_LIMIT:
                self.end_session(
                    cp, SessionResult.FAILED,
                    f"CP refused the session: {status.reason or 'refused'}",
                    breaker_failure=True,
                )
        elif status.state is CPState.SUPPLYING:
            self._confirm(cp, session)
        elif status.session_end() is None:
            why = status.reason or f"CP is {status.state.value}"
            self.end_session(cp, SessionResult.FAILED, f"CP refused the session: {why}",
                              breaker_failure=True)

    def _reported(self, session: ActiveSession, own: datetime, dated: datetime) -> None:
        """The CP reported on its session at `own` (its own clock; `dated`: that time, or
        the append time when it is later). The first report dates the session's start,
        and orders the CP's other reports (:meth:`_after_first_report`); the last one
        dates its end when the CP reports no end itself."""
        if session.first_report is None:
            session.first_report = own
            session.started_at = dated
            self.outbox.write(writes.SessionStarted(session.session_id, dated, own))
        if session.last_report is None or dated > session.last_report:
            session.last_report = dated

    def _after_first_report(self, session: ActiveSession, own: datetime) -> bool:
        """Whether a report the CP made at `own` (its clock) can speak of the session: it
        was made at or after the CP's first report of it. A session resumed after a
        restart whose CP had not reported yet is judged by the broker's time instead."""
        if session.first_report is not None:
            return own >= session.first_report
        return self.readclock.dated() >= session.started_at

    def _confirm(self, cp: CPView, session: ActiveSession) -> None:
        if session.confirmed and not session.resumed:
            return
        session.confirmed = True
        session.resumed = False
        self._cancel_watchdog(session.session_id)
        logger.info("CP {} confirmed session {}", cp.cp_id, session.session_id)

    def follow_state(
        self, cp: CPView, target: CPState, reason: str | None, reported: StatusEvent | None
    ) -> None:
        """Move Central's view to the CP's reported state through allowed events: the
        CP's own event when it leads there, else the shortest path (a heartbeat, or
        messages Central missed)."""
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

    async def handle_telemetry(self, telemetry: CPTelemetry) -> None:
        cp = self.cps.get(telemetry.cp_id)
        if cp is None:
            self.stats["telemetry_unknown_cp"] += 1
            logger.debug("telemetry from unknown CP {} ignored", telemetry.cp_id)
            return
        ts = self._heard(cp, telemetry.ts, Topic.CP_TELEMETRY)
        cp.last_telemetry = telemetry
        session = cp.session
        if session is not None and telemetry.session_id == session.session_id:
            self._reported(session, telemetry.ts, ts)
            self._confirm(cp, session)
            session.kw, session.kwh, session.euros = (
                telemetry.kw, telemetry.kwh, telemetry.euros,
            )
            self._send_update(self._update(session, DriverStatus.IN_PROGRESS))
        else:
            self.stats["telemetry_stale"] += 1
            if telemetry.session_id is not None and telemetry.session_id == cp.last_closed:
                # The meter ran on after Central closed the session: the meter is the truth.
                closed = await self._closed_session(telemetry.session_id)
                if closed is not None:
                    self._correct(closed, telemetry.kwh, telemetry.euros,
                                  meter_final=False, resend=False)
        if self.hub.subscribers:
            self.hub.publish({"type": "telemetry", "telemetry": dump(telemetry)})

    # ------------------------------------------------------------------ the ledger

    def _settle(
        self, cp: CPView, end: SessionEnd, status: CPStatus, ts: datetime,
        closed: ClosedSession | None,
    ) -> None:
        """Record the end of a session as the CP's meter reports it, exactly once.

        The running session ends with the CP's result and totals. A session already
        closed (`closed`, read by the caller before anything was queued) gets the CP's
        totals (:meth:`_correct`). An end that finds the ledger as it was sends nothing:
        with Central's updates leaving in one Kafka transaction with the offsets that
        caused them, a message handled again after a crash had its answer not sent.
        """
        session = cp.session
        if session is not None and session.session_id == end.session_id:
            session.kwh, session.euros = end.kwh, end.euros
            reason = {
                SessionResult.COMPLETED: None,
                SessionResult.STOPPED: f"session stopped: {status.reason or 'stopped'}",
                SessionResult.FAILED: f"CP fault: {status.reason or 'unknown fault'}",
            }[end.result]
            self.end_session(cp, end.result, reason, meter_final=True,
                              breaker_failure=end.result is SessionResult.FAILED, ended_at=ts)
        else:
            if closed is None or closed.cp_id != cp.cp_id:
                logger.debug("CP {} reports the end of unknown session {}",
                             cp.cp_id, end.session_id)
            else:
                flipped = (end.result is SessionResult.COMPLETED
                           and self._completed_by_meter(closed))
                self._correct(closed, end.kwh, end.euros, meter_final=True, resend=flipped)
        cp.last_end = end

    def _completed_by_meter(self, closed: ClosedSession) -> bool:
        """The CP's meter completed a session Central had closed FAILED (it took the CP
        for silent, or a start for unconfirmed, or a fault report raced the end): the
        ledger follows the meter (the caller tells the driver, ``corrected:``). Whether
        it changed the session."""
        if closed.status is not SessionStatus.FAILED:
            return False
        was = closed.reason or "failed"
        closed.status = SessionStatus.COMPLETED
        closed.reason = clip_reason(f"corrected: the CP completed the session (was FAILED: "
                                    f"{was})")
        self.outbox.write(writes.CompletedByMeter(closed.session_id, closed.reason))
        self.stats["sessions_completed_by_meter"] += 1
        self.stats["ledger_corrections"] += 1
        logger.warning("session {} on {}: the CP completed it; FAILED corrected to COMPLETED "
                       "({})", closed.session_id, closed.cp_id, was)
        return True

    def _correct(
        self, closed: ClosedSession, kwh: float, euros: float, *, meter_final: bool,
        resend: bool,
    ) -> None:
        """Bring a closed session's totals to a later meter report; tell its driver."""
        if closed.meter_final and not meter_final:
            return  # the CP's end report is final: no telemetry changes it any more
        changed = (kwh, euros) != (closed.kwh, closed.euros)
        if changed or meter_final != closed.meter_final:
            self.outbox.write(writes.TotalsCorrected(closed.session_id, kwh=kwh, euros=euros,
                                                     meter_final=meter_final))
        if changed:
            self.stats["ledger_corrections"] += 1
            logger.warning("session {} on {}: ledger corrected from {:.4f} to {:.4f} kWh",
                           closed.session_id, closed.cp_id, closed.kwh, kwh)
            closed.reason = clip_reason(
                f"corrected: the CP's meter reported {kwh:.4f} kWh, {euros:.4f} € after "
                f"the session was closed ({closed.reason or closed.status.value.lower()})"
            )
        self.billed_kwh += max(0.0, kwh - closed.kwh)  # a meter's totals only grow
        self.billed_euros += max(0.0, euros - closed.euros)
        closed.kwh, closed.euros = kwh, euros
        closed.meter_final = closed.meter_final or meter_final
        if changed or resend:
            status = (DriverStatus.COMPLETED if closed.status is SessionStatus.COMPLETED
                      else DriverStatus.FAILED)
            self._send_update(DriverUpdate(
                request_id=closed.request_id, driver_id=closed.driver_id, cp_id=closed.cp_id,
                status=status, reason=closed.reason, session_id=closed.session_id,
                kwh=kwh, euros=euros,
            ))

    async def _closed_session(self, session_id: str) -> ClosedSession | None:
        """A closed session from memory, or from the database (after a restart)."""
        closed = self._closed.get(session_id)
        if closed is not None:
            return closed
        row = await self.repo.get_session(session_id)
        if row is None or not SessionStatus(row.status).is_final:
            return None
        return self._remember_closed(ClosedSession.from_row(row))

    def end_session(
        self,
        cp: CPView,
        result: SessionResult,
        reason: str | None,
        *,
        breaker_failure: bool = False,
        stop_reason: str | None = None,
        meter_final: bool = False,
        ended_at: datetime | None = None,
    ) -> None:
        """End the CP's session; with `stop_reason`, tell the CP to stop supplying it.

        The row is finished in the outbox before the driver's final update is queued, so
        the update leaves only once the end is recorded; STOP_SUPPLY is queued first, so no
        START_SUPPLY of a next session can overtake it.
        """
        session = cp.session
        if session is None:
            return
        cp.session = None
        cp.last_closed = session.session_id
        self._cancel_watchdog(session.session_id)
        self._session_hook(cp, session, started=False)
        if stop_reason is not None:
            self._send_command(cp.cp_id, CommandType.STOP_SUPPLY,
                               session_id=session.session_id, reason=stop_reason)
        # Dated by the CP's clock: its end report, else its last report of the session.
        ended = ended_at or session.last_report or self.readclock.now()
        self.outbox.write(writes.SessionFinished(
            session.session_id, result.value, kwh=session.kwh, euros=session.euros,
            reason=reason, ended_at=ended, meter_final=meter_final,
        ))
        self._remember_closed(ClosedSession(
            session_id=session.session_id, request_id=session.request_id,
            driver_id=session.driver_id, cp_id=cp.cp_id, status=SessionStatus(result.value),
            reason=reason, kwh=session.kwh, euros=session.euros, meter_final=meter_final,
        ))
        breaker_before = (cp.breaker.state, cp.breaker.failures)
        if result is SessionResult.COMPLETED:
            cp.breaker.record_success()
        elif breaker_failure:
            cp.breaker.record_failure(reason)
        elif session.trial:
            cp.breaker.release()
        if (cp.breaker.state, cp.breaker.failures) != breaker_before:
            self.persist(cp)
        self.stats[f"sessions_{result.value.lower()}"] += 1
        self.billed_kwh += session.kwh
        self.billed_euros += session.euros
        log = logger.info if result is SessionResult.COMPLETED else logger.warning
        log("session {} on {} ended {}: {:.4f} kWh, {:.4f} €{}", session.session_id,
            cp.cp_id, result.value, session.kwh, session.euros,
            f" ({reason})" if reason else "")
        self._send_update(self._update(session, DriverStatus.COMPLETED if result is
                                       SessionResult.COMPLETED else DriverStatus.FAILED,
                                       reason=reason))
        if self.hub.subscribers:
            self.hub.publish({
                "type": "session", "result": result.value, "cp_id": cp.cp_id,
                "driver_id": session.driver_id, "session_id": session.session_id,
                "kwh": session.kwh, "euros": session.euros, "reason": reason,
                "ts": format_ts_opt(ended),
            })
        self.changed(cp)

    # ------------------------------------------------------------------ monitors, operators

    async def register(self, registration: CPRegistration) -> CPView:
        """Register or update a CP (TooManyCPs, 409: a new one past ``max_cps``)."""
        await self._check_owner(registration.cp_id)
        known = self.cps.get(registration.cp_id)
        self._check_room(int(known is None or not known.registered))
        cp = self._register(registration)
        await self.outbox.flush()
        return cp

    async def register_many(self, registrations: Sequence[CPRegistration]) -> int:
        """A fleet's CPs in one call and one transaction; how many were new.

        All or nothing: when the CPs new to the registry would take it past ``max_cps``,
        none of the call is taken (TooManyCPs, 409), updates included, so a fleet never
        runs half registered without knowing it."""
        for registration in registrations:
            await self._check_owner(registration.cp_id)
        joining = {reg.cp_id for reg in registrations
                   if reg.cp_id not in self.cps or not self.cps[reg.cp_id].registered}
        self._check_room(len(joining))
        new = sum(reg.cp_id not in self.cps for reg in registrations)
        for registration in registrations:
            self._register(registration, quiet=True)
        await self.outbox.flush()
        logger.info("fleet registration: {} CP(s), {} new", len(registrations), new)
        return new

    def _check_room(self, joining: int) -> None:
        """Refuse (TooManyCPs) `joining` new registered CPs that would pass ``max_cps``."""
        if joining and self.tally.registered + joining > self.options.max_cps:
            self.stats["registrations_refused"] += joining
            free = max(0, self.options.max_cps - self.tally.registered)
            raise TooManyCPs(
                f"Central holds {self.tally.registered:,} registered CPs, at most "
                f"{self.options.max_cps:,} (CENTRAL_MAX_CPS): {joining:,} new refused, "
                f"{free:,} free"
            )

    def _register(self, registration: CPRegistration, *, quiet: bool = False) -> CPView:
        cp = self.cps.get(registration.cp_id)
        created = cp is None
        if cp is None:
            cp = self._new_view(registration.cp_id)
        elif not cp.registered:
            cp.registered = True  # known from the bus until now
        old_site = cp.site
        for name in ("location", "site", "kw_rate", "euro_rate", "health_url", "protocol",
                     "vendor", "model"):
            value = getattr(registration, name)
            if value is not None:
                setattr(cp, name, value)
        if cp.site != old_site and not created:
            for hook in self.site_hooks:
                hook(cp, old_site)
        self.persist(cp)
        if not quiet:
            logger.info("CP {} {}", cp.cp_id, "registered" if created else "re-registered")
        self.changed(cp)
        return cp

    async def report_fault(self, cp_id: str, is_faulty: bool, reason: str) -> CPView:
        """A monitor's (or operator's) fault or recovery report; recorded before it answers
        (StorageError: try again; a repeated report records no second event)."""
        await self._check_owner(cp_id)
        cp = self.get(cp_id)
        if is_faulty:
            self._mark_faulty(cp, reason or "fault reported")
        else:
            self._mark_recovered(cp, reason or "recovered")
        await self.outbox.flush()
        return cp

    def _mark_faulty(self, cp: CPView, reason: str) -> None:
        if not cp.is_faulty:
            self.outbox.write(writes.FaultRecorded(cp.cp_id, FaultEventType.FAULT, reason,
                                                   utcnow()))
            self.stats["faults"] += 1
            logger.warning("CP {} is faulty: {}", cp.cp_id, reason)
            self.event("fault", cp, reason)
        cp.is_faulty = True
        cp.fault_reason = reason
        cp.breaker.trip(reason)
        self.end_session(cp, SessionResult.FAILED, f"CP fault: {reason}", stop_reason=reason)
        if cp.state is not CPState.FAULT:
            self._apply(cp, CPEvent.FAULT, reason)
        self.persist(cp)
        self.changed(cp)

    def _mark_recovered(self, cp: CPView, reason: str) -> None:
        if not cp.is_faulty:
            logger.debug("recovery report for {} which is not faulty", cp.cp_id)
            return
        self.outbox.write(writes.FaultRecorded(cp.cp_id, FaultEventType.RECOVERY, reason, utcnow()))
        cp.is_faulty = False
        cp.fault_reason = None
        cp.breaker.recover()
        self.stats["recoveries"] += 1
        logger.info("CP {} recovered: {} (breaker {})", cp.cp_id, reason, cp.breaker.state.value)
        self.event("recovery", cp, reason)
        self.persist(cp)
        self.changed(cp)

    async def stop_cp(self, cp_id: str, reason: str = "stopped by operator") -> CPView:
        return await self._operator_command(cp_id, CPEvent.STOP_CP, CommandType.STOP_CP, reason)

    async def resume_cp(self, cp_id: str, reason: str = "resumed by operator") -> CPView:
        return await self._operator_command(
            cp_id, CPEvent.RESUME_CP, CommandType.RESUME_CP, reason
        )

    async def _operator_command(
        self, cp_id: str, event: CPEvent, command: CommandType, reason: str
    ) -> CPView:
        await self._check_owner(cp_id)
        cp = self.get(cp_id)
        try:
            next_state(cp.state, event)
        except InvalidTransition as exc:
            raise NotAllowed(f"{cp_id}: {exc}") from exc
        logger.info("operator: {} {} ({})", command.value, cp_id, reason)
        self._send_command(cp_id, command, reason=reason)
        await self.outbox.flush()
        return cp

    async def monitor_report(self, cp_id: str, interval: float, healthy: bool) -> CPView:
        """A CP's monitor says it is alive (every health interval, SPEC §5 ``monitored``)."""
        await self._check_owner(cp_id)
        cp = self._monitor_seen(self.get(cp_id), interval, healthy)
        await self.outbox.flush()
        return cp

    async def monitor_reports(
        self, interval: float, reports: Sequence[tuple[str, bool]]
    ) -> list[str]:
        """A fleet's liveness reports for many CPs; returns the ids Central does not know
        (the fleet registers them again)."""
        for cp_id, _ in reports:
            await self._check_owner(cp_id)
        unknown = []
        for cp_id, healthy in reports:
            cp = self.cps.get(cp_id)
            if cp is None:
                unknown.append(cp_id)
            else:
                self._monitor_seen(cp, interval, healthy)
        await self.outbox.flush()
        return unknown

    def _monitor_seen(self, cp: CPView, interval: float, healthy: bool) -> CPView:
        cp.monitor_interval = interval
        cp.monitor_seen = self.clock()
        if cp.monitor_lost:
            cp.monitor_lost = False
            self.outbox.write(writes.FaultRecorded(cp.cp_id, FaultEventType.MONITOR_BACK,
                                                   "the monitor reports again", utcnow()))
            logger.info("CP {}: the monitor reports again", cp.cp_id)
            self.event("monitor", cp, "the monitor reports again")
            self.changed(cp)
        if not healthy and not cp.is_faulty:
            logger.debug("CP {}: its monitor's last check failed", cp.cp_id)
        return cp

    # ------------------------------------------------------------------ internals

    def _new_view(self, cp_id: str, *, registered: bool = True) -> CPView:
        cp = CPView(
            cp_id=cp_id,
            breaker=CircuitBreaker(
                failure_threshold=self.options.breaker_failure_threshold,
                reset_timeout=self.options.breaker_reset_timeout,
                clock=self.clock,
            ),
            registered_at=utcnow(),
            registered=registered,
        )
        self.cps[cp_id] = cp
        self.tally.add(cp)
        return cp

    def _cp_from_bus(self, cp_id: str) -> CPView | None:
        """A CP Central learns of from its first status message (not registered by a
        monitor, the fleet or the gateway); None when it is not taken in: Central holds
        ``max_unregistered`` such CPs already (counted, the first refusal logged)."""
        if len(self.tally.unregistered) >= self.options.max_unregistered:
            self.stats["unregistered_refused"] += 1
            if self.stats["unregistered_refused"] == 1:
                logger.warning(
                    "Central holds {:,} CPs known only from the bus (CENTRAL_MAX_UNREGISTERED):"
                    " statuses of further unregistered CPs, such as {}, are ignored (logged "
                    "once; counted in evcharging_unregistered_refused_total)",
                    len(self.tally.unregistered), cp_id)
            return None
        logger.info("CP {} known from its first status message (not registered)", cp_id)
        return self._new_view(cp_id, registered=False)

    def silence(self, cp: CPView) -> float:
        """Seconds the CP has been silent, as Central judges it (SPEC §4): how far Central
        has read the CP's own partitions since its last message on them, so neither
        Central's own delay nor a paused broker counts. A topic the CP has not been heard
        on since the start counts from the first time this is asked; 0 while Central has
        not read the CP's partitions at all."""
        clock = self.readclock
        least: float | None = None
        for index, (topic, partition) in enumerate(zip(CP_TOPICS, self._partitions_of(cp),
                                                       strict=True)):
            progress = clock.progress(topic, partition)
            if progress is None:
                return 0.0
            heard = cp.heard[index]
            if heard is None:
                cp.heard[index] = heard = progress
            gap = progress - heard
            least = gap if least is None else min(least, gap)
        return max(0.0, least or 0.0)

    def _partitions_of(self, cp: CPView) -> tuple[int, ...]:
        """The CP's partition on each CP topic (Kafka's default partitioner on its id)."""
        known = self.readclock.partition_counts  # per message: no generator, two gets
        counts = (known.get(Topic.CP_STATUS, 0), known.get(Topic.CP_TELEMETRY, 0))
        if cp.partitions_for != counts:
            cp.partitions_for = counts
            cp.partitions = tuple(partition_for_key(cp.cp_id, range(count)) if count else 0
                                  for count in counts)
        return cp.partitions

    def _positions_now(self, cp: CPView) -> list[float | None]:
        """Where this moment stands in the progress of each of the CP's partitions."""
        clock = self.readclock
        return [clock.position_now(topic, partition)
                for topic, partition in zip(CP_TOPICS, self._partitions_of(cp), strict=True)]

    def _read_past(self, cp: CPView, sent: list[float | None], seconds: float) -> bool:
        """Whether Central has read every partition of the CP for `seconds` past the
        positions `sent` (unknown positions are taken from the first reading)."""
        clock = self.readclock
        past = True
        for index, (topic, partition) in enumerate(zip(CP_TOPICS, self._partitions_of(cp),
                                                       strict=True)):
            progress = clock.progress(topic, partition)
            if progress is None:
                return False
            mark = sent[index]
            if mark is None:
                sent[index] = mark = progress
            past = past and progress - mark >= seconds
        return past

    def _heard(self, cp: CPView, ts: datetime, topic: Topic) -> datetime:
        """The CP reported on `topic`, stamped `ts` by its own clock: remember where that
        stands in its partition's read progress, and return `ts`, or the append time when
        `ts` is later (a message stamped in the future moves nothing, SPEC §4)."""
        clock = self.readclock
        received = clock.dated()
        cp.last_seen = received  # for people: when the broker took the message in
        index = CP_TOPICS.index(topic)
        cp.heard[index] = clock.position_of(topic, self._partitions_of(cp)[index],
                                            clock.current_append)
        ts = min(ts, received)
        cp.last_heard = ts
        return ts

    def _remember_request(self, request_id: str) -> None:
        self._seen_requests[request_id] = None
        while len(self._seen_requests) > SEEN_REQUESTS_KEPT:
            self._seen_requests.popitem(last=False)

    def _remember_closed(self, closed: ClosedSession) -> ClosedSession:
        self._closed[closed.session_id] = closed
        while len(self._closed) > CLOSED_SESSIONS_KEPT:
            self._closed.popitem(last=False)
        return closed

    def _cancel_watchdog(self, session_id: str) -> None:
        task = self._watchdogs.get(session_id)
        if task is None or task is asyncio.current_task():
            return  # a watchdog that fires removes itself when it is done
        del self._watchdogs[session_id]
        task.cancel()

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

    def _session_hook(self, cp: CPView, session: ActiveSession, *, started: bool) -> None:
        for hook in self.session_hooks:
            hook(cp, session, started)

    def _send_update(self, update: DriverUpdate) -> None:
        self.outbox.send(update)

    def _send_command(
        self,
        cp_id: str,
        cmd: CommandType,
        *,
        driver_id: str | None = None,
        session_id: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.outbox.send(CentralCommand(
            cp_id=cp_id, cmd=cmd,
            payload=CommandPayload(driver_id=driver_id, session_id=session_id, reason=reason),
        ))

    def persist(self, cp: CPView) -> None:
        """Save the CP's record (and a health snapshot) with the next flush."""
        self.outbox.write(writes.CPUpserted(cp.record(), utcnow()))
        self.outbox.write(writes.HealthRecorded(cp.snapshot()))

    def event(self, kind: str, cp: CPView, reason: str) -> None:
        if self.hub.subscribers:
            self.hub.publish({"type": kind, "cp_id": cp.cp_id, "reason": reason,
                              "monitored": cp.monitored, "ts": format_ts_opt(utcnow())})

    def changed(self, cp: CPView) -> None:
        if self.hub.subscribers:  # nobody listening: no serialisation
            self.hub.publish({"type": "cp", "cp": cp_out(cp).model_dump(mode="json")})
