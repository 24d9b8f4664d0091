"""The gateway's CPs: each connector (1.6) or EVSE (2.0.1) of a charger is one CP of §2–§4.

Over 400 lines: the one place that holds every CP's state, session and last end, and
turns what chargers say into the statuses and telemetry an engine would publish, and
Central's commands into CALLs; its ordering rules only hold if it stays together.

What Central sees is what a CP Engine would publish (:mod:`evcharging.apps.ev_cp_e.engine`):

* every state change is a ``CPStatus`` with the state-machine event that led there (none
  when no single event does: Central then follows the state, as for a heartbeat);
* the end of a session is a ``CPStatus`` with ``session_id``, ``driver_id``, ``kwh``,
  ``euros`` and ``session_result``, dated by the charger's own stop timestamp;
* every ``status_interval`` seconds, and at each OCPP Heartbeat, each CP publishes a
  heartbeat status (``event=HEARTBEAT``) repeating its state, its running session and
  ``last_session``, the end of its last session: a lost end is recovered (SPEC §4). CPs of
  a charger that is offline go on beating: an idle one as DISCONNECTED, one with a running
  session as SUPPLYING (the session stays open until the charger's queued stop arrives);
* meter values become ``CPTelemetry`` (running totals of the session).

A refused command (SHUTDOWN always; any other when the charger is offline, answers
Rejected or does not answer within ``call_timeout``) is a ``CPStatus`` with
``event=REFUSED`` and ``cmd`` naming it.

A change the ledger cannot lose (a transaction's start, a session's end) made while a
charger's CALL is handled (:class:`Handling`) is answered only once it is safe: the
messages it published are acknowledged by the broker (they are sent waiting for the
acknowledgement) and the state file holds it (:attr:`Gateway.durable`, awaited by the
link before it answers); a charger never sends again a CALL it has an answer to.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from loguru import logger

from evcharging.apps.ev_ocpp.central import OcppRegistration
from evcharging.apps.ev_ocpp.logic import connector_cp_id, stop_result
from evcharging.common.bus import BusError, Publisher
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPRegistration,
    CPStatus,
    CPTelemetry,
    Message,
    SessionEnd,
    StatusEvent,
    clip_reason,
    utcnow,
)
from evcharging.common.states import CPEvent, CPState, SessionResult, path

if TYPE_CHECKING:
    from evcharging.apps.ev_ocpp.link import ChargerLink

__all__ = ["HANDLING", "Connector", "Gateway", "GatewayStats", "Handling", "Session"]

_REMEMBERED_TRANSACTIONS = 100_000
"""Transactions (running and ended) the gateway remembers, to answer replays."""
_SECONDS_PER_HOUR = 3600.0
_BEAT_SLICE = 50
"""CPs whose periodic heartbeats go out together (5,000 at once held the event loop for a
quarter of a second every interval: py-spy, bench-ocpp)."""


@dataclass
class Session:
    """A charging session: one transaction on one connector."""

    session_id: str
    driver_id: str
    cp_id: str
    transaction: str
    """The charger's transaction id (1.6: the gateway's integer, as text)."""
    meter_start_wh: float | None
    """The energy register at the start (Wh); None until a 2.0.1 charger reports it."""
    started_at: datetime
    kw: float = 0.0
    kwh: float = 0.0
    euros: float = 0.0
    last_wh: float | None = None
    last_at: datetime | None = None
    stop_cp: bool = False
    """Central's STOP_CP is ending it (the stop then ends it STOPPED)."""
    offline: bool = False
    """Its charger's connection dropped while it ran."""
    ended: SessionEnd | None = None
    """Its end, once reported (a replayed stop changes nothing)."""
    seq_no: int = -1
    """2.0.1: the highest TransactionEvent seqNo seen."""
    denied: bool = False
    """Started at the charger where Central would have denied it: its id tag was answered
    Invalid (a replayed start is answered Invalid too)."""


@dataclass
class PendingStart:
    """A START_SUPPLY sent to the charger as a remote start, not yet started by it."""

    session_id: str
    driver_id: str
    remote_start_id: int = 0
    limit: CentralCommand | None = field(default=None, compare=False)
    """Central's SET_LIMIT of the session that came before its start: carried out once the
    charger started it (kept in the state file)."""


@dataclass
class Connector:
    """One CP: connector (or EVSE) `number` of `charger_id`."""

    charger_id: str
    number: int
    state: CPState = CPState.DISCONNECTED
    reason: str | None = None
    session: Session | None = None
    last_end: SessionEnd | None = None
    pending: PendingStart | None = None

    @property
    def cp_id(self) -> str:
        return connector_cp_id(self.charger_id, self.number)


@dataclass
class GatewayStats:
    """Counters the gateway's ``/metrics`` reads (read them, do not write them)."""

    messages: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    """(action, direction, result) → count."""
    handshakes_refused: Counter[str] = field(default_factory=Counter)
    unknown_transactions: int = 0
    commands: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(cmd, outcome) → count."""
    verdicts: Counter[str] = field(default_factory=Counter)
    """Central's verdicts on sessions started at a charger: accepted, denied, timeout."""
    publish_failures: int = 0


class Handling:
    """One charger's CALL being handled: whether it changed what the ledger cannot lose
    (its answer then waits until that is durable)."""

    __slots__ = ("durable", "unpublished")

    def __init__(self) -> None:
        self.durable = False
        self.unpublished = False
        """A message of its durable change did not reach the broker: the CALL is not
        confirmed (CALLERROR InternalError), so the charger sends it again (OCPP-J)."""


HANDLING: ContextVar[Handling | None] = ContextVar("ocpp_handling", default=None)
"""The CALL the running task handles (set by the charger's link around its handler)."""


async def _nothing_to_keep() -> None:
    return None


def _event_between(old: CPState, new: CPState) -> StatusEvent | None:
    """The one state-machine event that leads from `old` to `new`, if one does."""
    if old is new:
        return None
    steps = path(old, new)
    return StatusEvent.of(steps[0]) if len(steps) == 1 else None


class Gateway:
    """Every CP the gateway speaks for, the chargers connected now and the transactions
    it remembers; the bridge between the chargers' links and the bus."""

    def __init__(
        self,
        publisher: Publisher,
        *,
        euro_rate: float = 0.30,
        heartbeat_interval: int = 60,
        status_interval: float = 5.0,
        call_timeout: float = 30.0,
        decision_timeout: float = 5.0,
        register: Callable[[CPRegistration], None] = lambda _: None,
        observe_call: Callable[[str, float], None] = lambda _a, _s: None,
    ) -> None:
        self.publisher = publisher
        self.euro_rate = euro_rate
        self.heartbeat_interval = heartbeat_interval
        self.status_interval = status_interval
        self.call_timeout = call_timeout
        self.decision_timeout = decision_timeout
        self.register = register
        self.observe_call = observe_call
        self.stats = GatewayStats()
        self.connectors: dict[str, Connector] = {}
        self._by_charger: dict[str, list[Connector]] = {}
        self.links: dict[str, ChargerLink] = {}
        """The connected chargers, by charger id."""
        self.transactions: OrderedDict[tuple[str, str], Session | None] = OrderedDict()
        """(charger id, transaction id) → its session (None: refused, no session)."""
        self._verdicts: dict[str, asyncio.Future[bool]] = {}
        """Sessions started at a charger whose start waits for Central's verdict."""
        self._publish_failing = False
        self._unannounced: dict[str, CPStatus] = {}
        """Session id → its start's status that did not reach the bus (sent again with
        the charger's retry of the start)."""
        self.dirty = False
        """Something the state file keeps changed since it was last written."""
        self.durable: Callable[[], Awaitable[None]] = _nothing_to_keep
        """Returns once the state file holds every change made so far (the state
        store's group commit; nothing to wait for without a state file)."""
        self.kept_transactions: set[tuple[str, str]] = set()
        self.kept_connectors: set[str] = set()
        """The transactions and CPs of changes the ledger cannot lose (:meth:`keep`) not
        yet in the state file's journal (the state store takes them)."""

    # ---------------------------------------------------------------- chargers

    def attach(self, link: ChargerLink) -> ChargerLink | None:
        """A charger connected; the link it replaces (the same charger connected again
        before its old connection was seen to close), if any."""
        old = self.links.get(link.charger_id)
        self.links[link.charger_id] = link
        return old

    async def detach(self, link: ChargerLink) -> None:
        """A charger's connection closed: its idle CPs become DISCONNECTED, a running
        session stays open (SPEC §8: it ends by the charger's stop when it is back)."""
        if self.links.get(link.charger_id) is not link:
            return  # replaced by a newer connection of the same charger
        del self.links[link.charger_id]
        forgotten = False
        for conn in self.of_charger(link.charger_id):
            if conn.pending is not None:  # kept: a restart brings back no stale start
                conn.pending = None
                self.keep(conn)
                forgotten = True
            if conn.session is not None:
                conn.session.offline = True
                self._verdicts.pop(conn.session.session_id, None)  # its start goes unanswered
                continue
            if conn.state is CPState.ACTIVATED:
                await self.change(conn, CPState.DISCONNECTED, "charger offline")
        if forgotten:
            await self.durable()

    def of_charger(self, charger_id: str) -> list[Connector]:
        return list(self._by_charger.get(charger_id, ()))

    def add(self, conn: Connector) -> None:
        """Hold `conn` (a new CP, or one the state file restores)."""
        self.connectors[conn.cp_id] = conn
        self._by_charger.setdefault(conn.charger_id, []).append(conn)
        self.dirty = True

    def connector(self, charger_id: str, number: int) -> Connector:
        """The CP of this connector, created (and registered with Central) on first use."""
        cp_id = connector_cp_id(charger_id, number)
        conn = self.connectors.get(cp_id)
        if conn is None:
            conn = Connector(charger_id, number)
            self.add(conn)
            self.register(self.registration(conn))
        return conn

    def registration(self, conn: Connector) -> CPRegistration:
        """What Central is told of `conn`: its price and its charger's protocol, vendor
        and model (as its BootNotification said)."""
        link = self.links.get(conn.charger_id)
        return OcppRegistration(
            cp_id=conn.cp_id, euro_rate=self.euro_rate,
            protocol=link.protocol if link is not None else None,
            vendor=link.vendor[:50] if link is not None and link.vendor else None,
            model=link.model[:50] if link is not None and link.model else None,
        )

    def booted(self, charger_id: str) -> None:
        """A charger (re)booted: its known CPs are registered again with what it said."""
        for conn in self.of_charger(charger_id):
            self.register(self.registration(conn))

    # ---------------------------------------------------------------- states

    async def change(
        self, conn: Connector, new: CPState, reason: str, *, ts: datetime | None = None
    ) -> None:
        """Move `conn` to `new` and announce it; a running session ends as the state
        machine says (FAULT: FAILED; STOPPED: STOPPED) at its last meter."""
        old = conn.state
        session = conn.session
        if session is not None and new in (CPState.FAULT, CPState.STOPPED):
            result = SessionResult.FAILED if new is CPState.FAULT else SessionResult.STOPPED
            await self.end(session, session.last_wh, result, reason, ts=ts, state=new)
            return
        if old is new and conn.reason == reason:
            return
        conn.state = new
        conn.reason = clip_reason(reason)
        self.dirty = True
        logger.info("CP {}: {} → {} ({})", conn.cp_id, old.value, new.value, reason)
        await self.publish(CPStatus(
            cp_id=conn.cp_id, state=new, event=_event_between(old, new), reason=conn.reason,
            session_id=session.session_id if session else None,
            driver_id=session.driver_id if session else None,
            ts=ts or utcnow(),
        ))

    async def heartbeat(self, conn: Connector) -> None:
        session = conn.session
        await self.publish(CPStatus(
            cp_id=conn.cp_id, state=conn.state, event=StatusEvent.HEARTBEAT,
            reason=conn.reason, last_session=conn.last_end,
            session_id=session.session_id if session else None,
            driver_id=session.driver_id if session else None,
        ))

    async def heartbeats(self, charger_id: str | None = None) -> None:
        """A heartbeat status of every CP (of one charger, when given)."""
        conns = (self.of_charger(charger_id) if charger_id is not None
                 else list(self.connectors.values()))
        for conn in conns:
            await self.heartbeat(conn)

    async def beat_forever(self) -> None:
        """Every ``status_interval``: a heartbeat of every CP (Central's silence check),
        spread over the interval in slices of :data:`_BEAT_SLICE` CPs, each CP at the same
        point of every round: the chargers' messages are served between the slices."""
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            conns = list(self.connectors.values())
            starts = range(0, len(conns), _BEAT_SLICE)
            step = self.status_interval / max(1, len(starts))
            for number, at in enumerate(starts, 1):
                await asyncio.sleep(max(0.0, began + number * step - loop.time()))
                for conn in conns[at:at + _BEAT_SLICE]:
                    await self.heartbeat(conn)
            if not conns:
                await asyncio.sleep(self.status_interval)

    # ---------------------------------------------------------------- sessions

    def remember(self, charger_id: str, transaction: str, session: Session | None) -> None:
        self.transactions[(charger_id, transaction)] = session
        self.dirty = True
        self.transactions.move_to_end((charger_id, transaction))
        while len(self.transactions) > _REMEMBERED_TRANSACTIONS:
            self.transactions.popitem(last=False)

    async def start(
        self,
        conn: Connector,
        *,
        transaction: str,
        driver_id: str,
        meter_start_wh: float | None,
        ts: datetime,
        own_session_id: str,
        remote_start_id: int | None = None,
    ) -> Session:
        """A transaction began on `conn`: Central's session when it asked for one for
        this driver (a remote start), else a session of the driver with no request, whose
        start waits for Central's verdict (:meth:`verdict`)."""
        pending = conn.pending
        by_charger = not (pending is not None and (pending.driver_id == driver_id or (
            remote_start_id is not None and pending.remote_start_id == remote_start_id)))
        if pending is not None and not by_charger:
            session_id, driver_id = pending.session_id, pending.driver_id
            conn.pending = None
            link = self.links.get(conn.charger_id)
            if pending.limit is not None and link is not None:
                link.enqueue(pending.limit)  # after the start's answer (link.answered)
        else:
            session_id = own_session_id
            self._verdicts[session_id] = asyncio.get_running_loop().create_future()
            logger.info("CP {}: session {} started at the charger by {} (no request)",
                        conn.cp_id, session_id, driver_id)
        running = conn.session
        if running is not None:
            await self.end(running, running.last_wh, SessionResult.FAILED,
                           "a new transaction started on the connector", ts=ts)
        session = Session(session_id, driver_id, conn.cp_id, transaction, meter_start_wh, ts,
                          last_wh=meter_start_wh, last_at=ts)
        conn.session = session
        self.remember(conn.charger_id, transaction, session)
        self.keep(conn, session)
        old = conn.state
        conn.state, conn.reason = CPState.SUPPLYING, "charging"
        logger.info("CP {}: {} → SUPPLYING, session {} of {} (transaction {})",
                    conn.cp_id, old.value, session_id, driver_id, transaction)
        # A start at the charger is a START_SUPPLY whatever the CP was: Central records
        # it (and, where it would have denied it, stops it) rather than ignoring it.
        started = CPStatus(
            cp_id=conn.cp_id, state=CPState.SUPPLYING,
            event=StatusEvent.START_SUPPLY if old is CPState.ACTIVATED or by_charger
            else None,
            reason="charging", session_id=session_id, driver_id=driver_id, ts=ts,
        )
        if not await self.publish(started):
            self._unannounced[session_id] = started  # the charger's retry sends it again
        return session

    async def announce_again(self, session: Session) -> None:
        """A replayed start of `session`: its start's status again, when it did not
        reach the bus (its CALL was answered CALLERROR, and the charger sent it again)."""
        started = self._unannounced.pop(session.session_id, None)
        if started is not None and session.ended is None:
            handling = HANDLING.get()
            if handling is not None:
                handling.durable = True  # confirmed only once on the bus
            if not await self.publish(started):
                self._unannounced[session.session_id] = started

    async def verdict(self, session: Session) -> bool:
        """Whether the charger's start of `session` is answered Accepted: Central's verdict
        on a session started at the charger (it confirms it with a START_SUPPLY of the
        session, or denies it with a STOP_SUPPLY), waited for ``decision_timeout`` at most
        (then Accepted: Central still records it, and stops it if it denies it later);
        always True for Central's own sessions."""
        decided = self._verdicts.get(session.session_id)
        if decided is None or session.ended is not None:
            return not session.denied
        try:
            accepted = await asyncio.wait_for(asyncio.shield(decided), self.decision_timeout)
        except TimeoutError:
            self.stats.verdicts["timeout"] += 1
            logger.warning("CP {}: no verdict from Central on session {} within {:g} s: "
                           "Accepted", session.cp_id, session.session_id,
                           self.decision_timeout)
            return True
        finally:
            if self._verdicts.get(session.session_id) is decided:
                del self._verdicts[session.session_id]
        await self.durable()  # a denial is on disk before the charger hears of it
        return accepted

    def awaits_verdict(self, session: Session) -> bool:
        """Whether the answer to `session`'s start waits for Central's verdict."""
        return session.session_id in self._verdicts and session.ended is None

    def _decide(self, conn: Connector, cmd: CentralCommand) -> bool:
        """Central's START_SUPPLY (accepted) or STOP_SUPPLY (denied) of a session started at
        the charger whose start waits for it; whether `cmd` was such a verdict."""
        session_id = cmd.payload.session_id
        decided = self._verdicts.get(session_id) if session_id is not None else None
        session = conn.session
        if (decided is None or decided.done() or session is None
                or session.session_id != session_id
                or cmd.cmd not in (CommandType.START_SUPPLY, CommandType.STOP_SUPPLY)):
            return False  # not awaited (any more): the command is carried out as usual
        accepted = cmd.cmd is CommandType.START_SUPPLY
        session.denied = not accepted
        self.keep(conn, session)  # journalled: the charger's answer waits for it (verdict)
        decided.set_result(accepted)
        self.stats.verdicts["accepted" if accepted else "denied"] += 1
        logger.info("CP {}: Central {} session {} started at the charger", conn.cp_id,
                    "accepts" if accepted else "denies", session.session_id)
        return True

    async def meter(
        self, session: Session, energy_wh: float | None, power_w: float | None,
        ts: datetime | None,
    ) -> None:
        """Meter values of a session: telemetry with its running totals."""
        ts = ts or utcnow()
        if energy_wh is not None and session.meter_start_wh is None:
            session.meter_start_wh = energy_wh
        if energy_wh is not None and session.meter_start_wh is not None:
            kwh = max(0.0, (energy_wh - session.meter_start_wh) / 1000.0)
            if power_w is None and session.last_wh is not None and session.last_at is not None:
                hours = (ts - session.last_at).total_seconds() / _SECONDS_PER_HOUR
                if hours > 0:
                    session.kw = max(0.0, (energy_wh - session.last_wh) / 1000.0 / hours)
            session.kwh, session.euros = kwh, kwh * self.euro_rate
            session.last_wh, session.last_at = energy_wh, ts
        if power_w is not None:
            session.kw = max(0.0, power_w / 1000.0)
        self.dirty = True
        await self.publish(CPTelemetry(
            cp_id=session.cp_id, kw=session.kw, kwh=session.kwh, euros=session.euros,
            driver_id=session.driver_id, session_id=session.session_id, ts=ts,
        ))

    async def stop(
        self, session: Session, meter_stop_wh: float | None, reason: str | None,
        ts: datetime,
    ) -> None:
        """The charger stopped `session`'s transaction (StopTransaction, Ended)."""
        result = stop_result(reason, stopped_by_operator=session.stop_cp)
        await self.end(session, meter_stop_wh, result, f"transaction stopped ({reason or 'Local'})",
                       ts=ts)

    async def end(
        self,
        session: Session,
        final_wh: float | None,
        result: SessionResult,
        reason: str,
        *,
        ts: datetime | None = None,
        state: CPState | None = None,
    ) -> None:
        """End `session` with its final meter; announced as an engine announces an end.

        A session already ended (by a fault, then by the charger's own stop) is announced
        again only when the final meter changes its totals: Central corrects the ledger.
        """
        if final_wh is not None and session.meter_start_wh is not None:
            kwh = max(0.0, (final_wh - session.meter_start_wh) / 1000.0)
            session.kwh, session.euros = kwh, kwh * self.euro_rate
        end = SessionEnd(session_id=session.session_id, result=result, kwh=session.kwh,
                         euros=session.euros)
        conn = self.connectors[session.cp_id]
        already = session.ended
        if already is not None and (already.kwh, already.euros) == (end.kwh, end.euros):
            return
        session.ended = end
        self.keep(conn, session)
        decided = self._verdicts.pop(session.session_id, None)
        if decided is not None and not decided.done():
            decided.set_result(True)  # over before Central decided: nothing left to deny
        if conn.session is session:
            conn.session = None
        last = conn.last_end
        if already is None or (last is not None and last.session_id == end.session_id):
            conn.last_end = end
        old = conn.state
        if state is None:
            state = (CPState.STOPPED if result is SessionResult.STOPPED
                     else old if old in (CPState.FAULT, CPState.STOPPED)
                     else CPState.ACTIVATED)
        conn.state, conn.reason = state, clip_reason(reason)
        event: StatusEvent | None
        if already is not None or old is not CPState.SUPPLYING:
            event = _event_between(old, state)
        else:
            event = StatusEvent.of({
                SessionResult.COMPLETED: CPEvent.SESSION_COMPLETE,
                SessionResult.STOPPED: CPEvent.STOP_CP,
                SessionResult.FAILED: CPEvent.FAULT if state is CPState.FAULT
                else CPEvent.STOP_SUPPLY,
            }[result])
        logger.info("CP {}: session {} of {} {}: {:.4f} kWh, {:.4f} € ({})", conn.cp_id,
                    session.session_id, session.driver_id, result.value, end.kwh, end.euros,
                    reason)
        await self.publish(CPStatus(
            cp_id=conn.cp_id, state=state, event=event, reason=conn.reason,
            session_id=session.session_id, driver_id=session.driver_id, kwh=end.kwh,
            euros=end.euros, session_result=result, ts=ts or utcnow(),
        ))

    def unknown_transaction(self, charger_id: str, what: str, transaction: object) -> None:
        self.stats.unknown_transactions += 1
        logger.warning("charger {}: {} for unknown transaction {}; answered, no session "
                       "changed", charger_id, what, transaction)

    # ---------------------------------------------------------------- Central's commands

    async def handle_command(self, cmd: CentralCommand) -> None:
        """A command of Central's for one of the gateway's CPs (others are ignored): queued
        to its charger's link, so a slow charger holds up no other."""
        conn = self.connectors.get(cmd.cp_id)
        if conn is None:
            return
        logger.info("command {} for {} {}", cmd.cmd.value, cmd.cp_id,
                    cmd.payload.model_dump(exclude_none=True))
        if cmd.cmd is CommandType.SHUTDOWN:
            await self.refuse(conn, cmd, "a charger cannot be shut down from Central")
            return
        decided = self._decide(conn, cmd)
        if cmd.cmd is CommandType.START_SUPPLY and (decided or (
                conn.last_end is not None
                and conn.last_end.session_id == cmd.payload.session_id)):
            self.done(cmd)  # accepted and running, or already over: no CALL
            return
        link = self.links.get(conn.charger_id)
        if link is None:
            await self.refuse(conn, cmd, "charger offline")
            return
        link.enqueue(cmd)

    async def refuse(self, conn: Connector, cmd: CentralCommand, why: str) -> None:
        self.stats.commands[(cmd.cmd.value, "refused")] += 1
        reason = f"refused {cmd.cmd.value}: {why}"
        logger.warning("CP {}: {}", conn.cp_id, reason)
        await self.publish(CPStatus(
            cp_id=conn.cp_id, state=conn.state, event=StatusEvent.REFUSED, cmd=cmd.cmd,
            reason=clip_reason(reason), session_id=cmd.payload.session_id,
        ))

    def done(self, cmd: CentralCommand) -> None:
        self.stats.commands[(cmd.cmd.value, "done")] += 1

    # ---------------------------------------------------------------- publishing

    def keep(self, conn: Connector, session: Session | None = None) -> None:
        """A change of `conn` (and `session`) the ledger cannot lose: the CALL being handled
        is answered once it is durable (its messages from now on wait for the broker)."""
        self.dirty = True
        self.kept_connectors.add(conn.cp_id)
        if session is not None:
            self.kept_transactions.add((conn.charger_id, session.transaction))
        handling = HANDLING.get()
        if handling is not None:
            handling.durable = True

    async def publish(self, message: Message) -> bool:
        """Queue `message` on the bus (and wait for the broker's acknowledgement while a
        CALL with a durable change is handled); a failure is logged once per outage (the
        next heartbeat repeats the state and the last end), and marks such a CALL
        unpublished: it is answered CALLERROR, not confirmed; whether it reached the bus."""
        handling = HANDLING.get()
        try:
            await self.publisher.publish(
                message, wait=handling is not None and handling.durable)
        except BusError as exc:
            self.stats.publish_failures += 1
            if handling is not None and handling.durable:
                handling.unpublished = True
            if not self._publish_failing:
                self._publish_failing = True
                logger.error("could not publish {}: {} (logged once until it works again)",
                             type(message).__name__, exc)
            return False
        if self._publish_failing:
            self._publish_failing = False
            logger.info("publishing works again")
        return True

