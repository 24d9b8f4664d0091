"""One charger's connection: OCPP-J messages in, CALLs out (SPEC §8).

:class:`ChargerLink` is the `ocpp` library's ``ChargePoint`` (its CALL/answer matching, its
message classes and JSON schemas) with the gateway's own dispatch of the charger's CALLs:

* an action OCPP does not define gets CALLERROR ``NotImplemented``, an action of the
  version that the gateway does not handle ``NotSupported`` (the library answers these
  two the other way round);
* a payload that breaks the version's schema gets the code of
  :func:`~evcharging.apps.ev_ocpp.logic.schema_error_code` (the library answers
  ``ProtocolError`` for a missing field and ``FormatViolation`` for a bad value);
* each such error is logged once per connection and kind, counted every time, and the
  connection stays up.

Central's commands for the charger's CPs wait in the link's queue and are carried out one
at a time by the link's worker: one CALL is in flight per charger (the library's lock), it
waits ``call_timeout`` at most, and a slow charger holds up only itself.

A transaction the charger starts by itself is answered (idTagInfo / idTokenInfo) with
Central's verdict: the answer is a :class:`Later`, sent by a task of its own once Central
confirms or denies the session (``decision_timeout`` at most), while the link goes on
reading the charger's messages; a command that stops the session, or limits it, waits for
that answer to be sent (the charger learns of its transaction first).

A CALL whose handling changed what the ledger cannot lose (a transaction's start or stop,
a session's end: :class:`~evcharging.apps.ev_ocpp.gateway.Handling`) is answered once the
change is durable (its messages acknowledged by the broker, the state file written: the
charger never sends an answered CALL again); a remote start is in the state file before
its CALL is sent, so a restarted gateway still gives the charger's start Central's session.
Each link waits for its own changes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from jsonschema import ValidationError as SchemaError
from loguru import logger
from ocpp.charge_point import ChargePoint
from ocpp.exceptions import OCPPError, UnknownCallErrorCodeError
from ocpp.messages import Call, CallError, CallResult, MessageType, unpack
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v16.enums import Action as Action16
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from ocpp.v201.enums import Action as Action201
from websockets.exceptions import ConnectionClosed

from evcharging.apps.ev_ocpp.gateway import (
    HANDLING,
    Connector,
    Gateway,
    Handling,
    PendingStart,
    Session,
)
from evcharging.apps.ev_ocpp.logic import (
    connector_state,
    is_valid_id_tag,
    parse_ocpp_time,
    read_meter,
    schema_error_code,
    session_id_of,
    transaction_id,
    tx_profile_id,
)
from evcharging.apps.ev_ocpp.schemas import validate_call
from evcharging.common.messages import CentralCommand, CommandType, clip_reason, utcnow
from evcharging.common.states import CPState, SessionResult

__all__ = ["ChargerLink", "V16Link", "V201Link"]

Payload = dict[str, Any]


@dataclass(frozen=True)
class Later:
    """The answer to a charger's CALL that waits for Central's verdict on `session`:
    `answer(accepted)` is sent once it is known."""

    session: Session
    answer: Callable[[bool], Payload]


CallHandler = Callable[[Payload], Awaitable[Payload | Later]]

_LIBRARY_LOG = logging.getLogger("evcharging.ocpp.library")
_LIBRARY_LOG.addHandler(logging.NullHandler())
_LIBRARY_LOG.propagate = False
"""The library logs every message at INFO; the gateway logs what matters itself."""


def now_text() -> str:
    return utcnow().isoformat(timespec="seconds").replace("+00:00", "Z")


def charger_time(text: object) -> datetime:
    """A charger's timestamp; its own clock dates its sessions (now when unreadable)."""
    try:
        return parse_ocpp_time(str(text))
    except ValueError:
        return utcnow()


class Refused(Exception):
    """A command the charger did not carry out (the reason says why)."""


class Ignored(Exception):
    """A command that no longer applies (a SET_LIMIT of a session that is not running)."""


class Violation(Exception):
    """A CALL the schema allows but the gateway cannot take (answered with `code`)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


MAX_CONNECTOR = 999
"""The highest connector (EVSE) number: ``{charger}.{n}`` stays a CP id."""


class ChargerLink(ChargePoint):  # type: ignore[misc]  # the library is untyped
    """One connected charger, for one version of OCPP (a subclass per version)."""

    version: ClassVar[str]
    protocol: ClassVar[str]
    known_actions: ClassVar[frozenset[str]]
    id_tag_max: ClassVar[int]

    def __init__(self, charger_id: str, connection: Any, gateway: Gateway) -> None:
        super().__init__(charger_id, connection, response_timeout=gateway.call_timeout,
                         logger=_LIBRARY_LOG)
        self.charger_id = charger_id
        self.gateway = gateway
        self.vendor: str | None = None
        self.model: str | None = None
        self._queue: asyncio.Queue[CentralCommand] = asyncio.Queue()
        self._answering: dict[str, asyncio.Task[None]] = {}
        """Session id → the task that answers its start once Central's verdict is in."""
        self._idle = asyncio.Event()
        self._idle.set()
        """Clear while one of the charger's CALLs is handled and not yet answered (a
        durable change waits some milliseconds for the disk)."""
        self._logged: set[tuple[str, str]] = set()
        self.handlers: dict[str, CallHandler] = self.call_handlers()
        self._log = logger.bind(charger_id=charger_id)

    def call_handlers(self) -> dict[str, CallHandler]:
        raise NotImplementedError

    # ---------------------------------------------------------------- the connection

    async def serve(self) -> None:
        """Read the charger's messages and carry out its commands until it disconnects
        (ConnectionClosed ends it)."""
        worker = asyncio.create_task(self._work(), name=f"ocpp-{self.charger_id}-commands")
        try:
            await self.start()
        finally:
            tasks = [worker, *self._answering.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def once(self, kind: str, what: str, message: str, *args: object) -> None:
        """Log a problem once per connection and kind."""
        if (kind, what) not in self._logged:
            self._logged.add((kind, what))
            self._log.warning("charger {}: " + message + " (logged once per connection)",
                              self.charger_id, *args)

    def count(self, action: str, direction: str, result: str) -> None:
        self.gateway.stats.messages[(action, direction, result)] += 1

    async def route_message(self, raw_msg: str | bytes) -> None:
        """One message from the charger: a CALL is answered here; an answer goes to the
        CALL waiting for it."""
        try:
            msg = unpack(raw_msg)
        except OCPPError as exc:
            self.count("unknown", "in", exc.code)
            self.once("unparsable", exc.code, "message that is not OCPP-J ({}): {!r}",
                      exc.code, str(raw_msg)[:200])
            return
        if msg.message_type_id == MessageType.Call:
            await self._answer(msg)
        elif msg.message_type_id in (MessageType.CallResult, MessageType.CallError):
            self._response_queue.put_nowait(msg)

    async def _answer(self, msg: Call) -> None:
        self._idle.clear()
        try:
            await self._answer_call(msg)
        finally:
            self._idle.set()

    async def _answer_call(self, msg: Call) -> None:
        action = str(msg.action)
        handler = self.handlers.get(action)
        if handler is None:
            known = action in self.known_actions
            code = "NotSupported" if known else "NotImplemented"
            label = action if known else "unknown"
            await self._error(msg, label, code, f"{action} is not "
                              f"{'supported by this gateway' if known else 'an OCPP action'}")
            return
        payload = msg.payload
        try:
            validate_call(action, self.version, payload)  # compiled; the library's errors
        except SchemaError as exc:
            code = schema_error_code(str(exc.validator), exc.path, self.version)
            await self._error(msg, action, code, exc.message[:300])
            return
        handling = Handling()
        token = HANDLING.set(handling)
        try:
            answer = await handler(payload)
            if handling.durable:  # answered once safe: the charger never sends it again
                await self.gateway.durable()
            if handling.unpublished:
                # Not confirmed while the bus is down: the charger sends it again (OCPP-J:
                # a transaction-related CALL answered CALLERROR is retried), and the retry
                # is idempotent (the same transaction, the same session, published then).
                self.count(action, "in", "InternalError")
                self._log.warning("charger {}: {} not confirmed: the bus is unavailable",
                                  self.charger_id, action)
                await self._send(CallError(msg.unique_id, "InternalError", "the gateway "
                                           "could not publish it: send it again", {}).to_json())
                return
        except Violation as exc:
            await self._error(msg, action, exc.code, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a bug answers InternalError, not a crash
            self.count(action, "in", "InternalError")
            self._log.opt(exception=exc).error("charger {}: {} failed", self.charger_id, action)
            await self._send(CallError(msg.unique_id, "InternalError", "the gateway failed "
                                       "to handle the message", {}).to_json())
            return
        finally:
            HANDLING.reset(token)
        if isinstance(answer, Later):
            self._answer_later(msg, action, answer)
            return
        self.count(action, "in", "accepted")
        await self._send(CallResult(msg.unique_id, answer).to_json())

    def _answer_later(self, msg: Call, action: str, later: Later) -> None:
        """Answer `msg` once Central's verdict on its session is in, in a task of its own:
        the link reads on meanwhile (the charger sends no CALL before this answer)."""
        session_id = later.session.session_id

        async def answer() -> None:
            accepted = await self.gateway.verdict(later.session)
            self.count(action, "in", "accepted")
            # Gone meanwhile: the charger sends its start again when it is back.
            with contextlib.suppress(ConnectionClosed):
                await self._send(CallResult(msg.unique_id, later.answer(accepted)).to_json())

        task = asyncio.create_task(answer(), name=f"ocpp-{self.charger_id}-verdict")
        self._answering[session_id] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._answering.get(session_id) is done:
                del self._answering[session_id]

        task.add_done_callback(forget)

    def verdict_answer(self, session: Session, answer: Callable[[bool], Payload]
                       ) -> Payload | Later:
        """The answer to `session`'s start: later when it waits for Central's verdict,
        else now (Accepted unless Central denied it)."""
        if self.gateway.awaits_verdict(session):
            return Later(session, answer)
        return answer(not session.denied)

    async def answered(self, session: Session) -> None:
        """Wait until the charger has the answer to `session`'s start (sent once durable,
        or once Central's verdict is in): a stop or a limit of the session follows it."""
        with contextlib.suppress(TimeoutError):  # a CALL being answered (the start's)
            await asyncio.wait_for(self._idle.wait(), self.gateway.call_timeout)
        task = self._answering.get(session.session_id)
        if task is not None:
            await asyncio.wait([task])

    async def _error(self, msg: Call, action: str, code: str, description: str) -> None:
        self.count(action, "in", code)
        self.once(code, action, "{} answered CALLERROR {}: {}", msg.action, code, description)
        await self._send(CallError(msg.unique_id, code, clip_reason(description)[:255],
                                   {}).to_json())

    # ---------------------------------------------------------------- what both versions share

    def number(self, value: object, *, zero: bool = False) -> int:
        """A connector (EVSE) number of a CALL: 1 to :data:`MAX_CONNECTOR` (0 too where
        it means the whole charger), else PropertyConstraintViolation."""
        number = int(str(value))
        if not (0 if zero else 1) <= number <= MAX_CONNECTOR:
            raise Violation("PropertyConstraintViolation",
                            f"connector {number} is outside 1..{MAX_CONNECTOR}")
        return number

    async def apply_status(
        self, conn: Connector, status: str, error: object, info: object,
        ts: datetime | None,
    ) -> None:
        """A connector's (EVSE's) status as SPEC §8 maps it."""
        session = conn.session
        state = connector_state(status, session_running=session is not None)
        if state is None:
            return
        if session is not None and state is CPState.ACTIVATED:
            if session.offline and status == "Available":
                # Back online with the connector free and no stop: the session is over.
                await self.gateway.end(session, session.last_wh,
                                       SessionResult.FAILED, "charger came back without the "
                                       "transaction's stop", ts=ts)
            return  # Finishing before the stop: the stop ends the session
        if state is CPState.FAULT:
            reason = ": ".join(str(p) for p in (error, info) if p and p != "NoError")
            await self.gateway.change(conn, state, reason or "Faulted", ts=ts)
            return
        reason = {"Unavailable": "unavailable", "Charging": "charging"}.get(
            status, status.lower())
        if conn.state is CPState.FAULT:
            await self.gateway.change(conn, CPState.ACTIVATED, "recovered", ts=ts)
        if state is CPState.SUPPLYING:
            if session is not None:
                session.offline = False  # back online and still charging
            return  # already SUPPLYING since its transaction started
        await self.gateway.change(conn, state, reason, ts=ts)

    def _session(self, transaction: object, what: str) -> Session | None:
        session = self.gateway.transactions.get((self.charger_id, str(transaction)))
        if session is None:
            self.gateway.unknown_transaction(self.charger_id, what, transaction)
        return session

    # ---------------------------------------------------------------- CALLs to the charger

    def enqueue(self, cmd: CentralCommand) -> None:
        self._queue.put_nowait(cmd)

    async def _work(self) -> None:
        while True:
            cmd = await self._queue.get()
            conn = self.gateway.connectors.get(cmd.cp_id)
            if conn is None:
                continue
            try:
                await self.execute(conn, cmd)
            except Refused as exc:
                await self.gateway.refuse(conn, cmd, str(exc))
            except Ignored as exc:
                self.gateway.stats.commands[(cmd.cmd.value, "ignored")] += 1
                self._log.info("CP {}: {} ignored: {}", conn.cp_id, cmd.cmd.value, exc)
            except Exception as exc:  # noqa: BLE001 - a bug refuses the command, not the link
                self._log.opt(exception=exc).error("charger {}: {} failed", self.charger_id,
                                                   cmd.cmd.value)
                await self.gateway.refuse(conn, cmd, f"gateway error {type(exc).__name__}")
            else:
                self.gateway.done(cmd)

    async def execute(self, conn: Connector, cmd: CentralCommand) -> None:
        """Carry out one of Central's commands (SPEC §8, Commands); Refused when the
        charger does not."""
        p = cmd.payload
        match cmd.cmd:
            case CommandType.START_SUPPLY:
                assert p.session_id is not None and p.driver_id is not None  # the model's rule
                running = conn.session
                if running is not None and running.session_id == p.session_id:
                    return  # a duplicate START_SUPPLY
                if conn.state is not CPState.ACTIVATED or running is not None:
                    raise Refused(f"CP is {conn.state.value}")
                if not is_valid_id_tag(p.driver_id, max_length=self.id_tag_max):
                    raise Refused(f"driver id {p.driver_id!r} is no OCPP {self.version} id "
                                  f"token ({self.id_tag_max} characters at most)")
                pending = PendingStart(p.session_id, p.driver_id, remote_start_id(p.session_id))
                conn.pending = pending  # before the CALL: the start may come before its answer
                self.gateway.keep(conn)
                await self.gateway.durable()  # a restarted gateway still knows it
                try:
                    await self.remote_start(conn, pending)
                except Refused:
                    if conn.pending is pending:
                        conn.pending = None  # on disk before Central fails the session:
                        self.gateway.keep(conn)  # a restart brings back no stale start
                        await self.gateway.durable()
                    raise
            case CommandType.STOP_SUPPLY:
                session = conn.session
                if session is None:
                    raise Refused("no running session")
                if p.session_id and p.session_id != session.session_id:
                    raise Refused(f"session {p.session_id} is not the running session")
                await self.answered(session)
                await self.remote_stop(session)
            case CommandType.STOP_CP:
                session = conn.session
                if session is not None:
                    await self.answered(session)
                    session.stop_cp = True  # on disk before the stop: it ends STOPPED
                    self.gateway.keep(conn, session)
                    await self.gateway.durable()
                    try:
                        await self.remote_stop(session)
                    except Refused:
                        session.stop_cp = False
                        self.gateway.keep(conn, session)
                        raise
                if await self.change_availability(conn, operative=False):
                    await self._now(conn, CPState.STOPPED, p.reason or "stopped by operator")
            case CommandType.RESUME_CP:
                if await self.change_availability(conn, operative=True):
                    await self._now(conn, CPState.ACTIVATED, p.reason or "resumed by operator")
            case CommandType.SET_LIMIT:
                session = conn.session
                waiting = conn.pending
                if session is None or session.session_id != p.session_id:
                    if waiting is not None and waiting.session_id == p.session_id:
                        waiting.limit = cmd  # carried out once the charger starts it
                        self.gateway.keep(conn)  # even after a restart
                        raise Ignored(f"session {p.session_id} not started yet: limited "
                                      "at its start")
                    raise Ignored(f"session {p.session_id} is not the running session")
                await self.answered(session)
                if p.kw is None:
                    await self.clear_limit(conn)
                else:
                    await self.set_limit(conn, session, round(p.kw * 1000.0, 1))
            case _:
                raise Refused(f"{cmd.cmd.value} is not supported")

    async def _now(self, conn: Connector, state: CPState, reason: str) -> None:
        """The charger accepted an availability change at once: the CP changes now (a
        running session's stop changes it when it comes)."""
        if conn.session is None and conn.state in (CPState.ACTIVATED, CPState.STOPPED):
            await self.gateway.change(conn, state, reason)

    async def remote_start(self, conn: Connector, pending: PendingStart) -> None:
        raise NotImplementedError

    async def remote_stop(self, session: Session) -> None:
        raise NotImplementedError

    async def change_availability(self, conn: Connector, operative: bool) -> bool:
        """Whether the charger changed it at once (Accepted; Scheduled: later)."""
        raise NotImplementedError

    async def set_limit(self, conn: Connector, session: Session, watts: float) -> None:
        """The session's TxProfile (:func:`tx_profile_id`): one period of `watts`."""
        raise NotImplementedError

    async def clear_limit(self, conn: Connector) -> None:
        """Clear the connector's TxProfile (Unknown: there was none, which is as good)."""
        raise NotImplementedError

    async def request(self, payload: Any) -> Any:
        """Send one CALL and return the charger's answer; Refused when it answers with a
        CALLERROR, does not answer within ``call_timeout`` or is gone."""
        action = type(payload).__name__
        started = time.perf_counter()
        try:
            answer = await self.call(payload, suppress=False)
        except TimeoutError:
            self.count(action, "out", "timeout")
            raise Refused(f"{action}: no answer within {self.gateway.call_timeout:g} s") from None
        except (OCPPError, UnknownCallErrorCodeError) as exc:
            code = getattr(exc, "code", "unknown")
            self.count(action, "out", str(code))
            raise Refused(f"{action}: CALLERROR {code}") from None
        except ConnectionClosed:
            self.count(action, "out", "closed")
            raise Refused(f"{action}: the charger disconnected") from None
        self.gateway.observe_call(action, time.perf_counter() - started)
        return answer

    def accepted(self, action: str, status: object, *ok: str) -> bool:
        accepted = _text(status) in (ok or ("Accepted",))
        self.count(action, "out", "accepted" if accepted else "rejected")
        return accepted


class V16Link(ChargerLink):
    """OCPP 1.6J, Core profile."""

    version = "1.6"
    protocol = "ocpp1.6"
    id_tag_max = 20
    _ocpp_version = "1.6"  # what the library's call() validates and answers with
    _call = call16
    _call_result = result16
    known_actions = frozenset(action.value for action in Action16)

    def call_handlers(self) -> dict[str, CallHandler]:
        return {
            "BootNotification": self.on_boot_notification,
            "Heartbeat": self.on_heartbeat,
            "StatusNotification": self.on_status_notification,
            "Authorize": self.on_authorize,
            "StartTransaction": self.on_start_transaction,
            "MeterValues": self.on_meter_values,
            "StopTransaction": self.on_stop_transaction,
        }

    # ---------------------------------------------------------------- the charger's CALLs

    async def on_boot_notification(self, payload: Payload) -> Payload:
        self.vendor = str(payload["chargePointVendor"])
        self.model = str(payload["chargePointModel"])
        self._log.info("charger {} booted: {} {} (OCPP 1.6)", self.charger_id, self.vendor,
                       self.model)
        self.gateway.booted(self.charger_id)
        return {"status": "Accepted", "currentTime": now_text(),
                "interval": self.gateway.heartbeat_interval}

    async def on_heartbeat(self, payload: Payload) -> Payload:
        await self.gateway.heartbeats(self.charger_id)
        return {"currentTime": now_text()}

    async def on_authorize(self, payload: Payload) -> Payload:
        return {"idTagInfo": {"status": _tag_status(str(payload["idTag"]))}}

    async def on_status_notification(self, payload: Payload) -> Payload:
        number = self.number(payload["connectorId"], zero=True)
        status = str(payload["status"])
        conns = (self.gateway.of_charger(self.charger_id) if number == 0
                 else [self.gateway.connector(self.charger_id, number)])
        ts = charger_time(payload["timestamp"]) if "timestamp" in payload else None
        for conn in conns:
            await self.apply_status(conn, status, payload.get("errorCode"),
                                    payload.get("info"), ts)
        return {}

    async def on_start_transaction(self, payload: Payload) -> Payload | Later:
        number = self.number(payload["connectorId"])
        id_tag = str(payload["idTag"])
        meter_start = int(payload["meterStart"])
        stamp = str(payload["timestamp"])
        tx = transaction_id(self.charger_id, number, id_tag, meter_start, stamp)
        key = (self.charger_id, str(tx))
        if key in self.gateway.transactions:
            session = self.gateway.transactions[key]
            self._log.info("charger {}: StartTransaction replayed: transaction {} again",
                           self.charger_id, tx)
            if session is None:
                return {"transactionId": tx, "idTagInfo": {"status": "Invalid"}}
            await self.gateway.announce_again(session)
            return self.verdict_answer(session, lambda accepted: _started16(tx, accepted))
        if not is_valid_id_tag(id_tag):
            self.gateway.remember(self.charger_id, str(tx), None)
            self.once("id_tag", "start", "StartTransaction with id tag {!r}, not a driver id: "
                      "Invalid", id_tag)
            return {"transactionId": tx, "idTagInfo": {"status": "Invalid"}}
        conn = self.gateway.connector(self.charger_id, number)
        session = await self.gateway.start(
            conn, transaction=str(tx), driver_id=id_tag, meter_start_wh=float(meter_start),
            ts=charger_time(stamp), own_session_id=session_id_of(self.charger_id, tx),
        )
        return self.verdict_answer(session, lambda accepted: _started16(tx, accepted))

    async def on_meter_values(self, payload: Payload) -> Payload:
        number = self.number(payload["connectorId"], zero=True)
        reading = read_meter(payload.get("meterValue", []))
        if "transactionId" in payload:
            session = self._session(payload["transactionId"], "MeterValues")
        else:
            conn = self.gateway.connectors.get(f"{self.charger_id}.{number}")
            session = conn.session if conn is not None else None
        if session is not None and (reading.energy_wh is not None or reading.power_w is not None):
            await self.gateway.meter(session, reading.energy_wh, reading.power_w, reading.ts)
        return {}

    async def on_stop_transaction(self, payload: Payload) -> Payload:
        tx = payload["transactionId"]
        answer: Payload = {}
        if "idTag" in payload:
            answer["idTagInfo"] = {"status": _tag_status(str(payload["idTag"]))}
        session = self._session(tx, "StopTransaction")
        if session is None:
            return answer
        meter_stop = float(payload["meterStop"])
        ts = charger_time(payload["timestamp"])
        data = payload.get("transactionData")
        if data:
            reading = read_meter(data)
            if reading.energy_wh is not None:
                session.last_wh = reading.energy_wh
        await self.gateway.stop(session, meter_stop, payload.get("reason"), ts)
        return answer

    # ---------------------------------------------------------------- Central's commands

    async def remote_start(self, conn: Connector, pending: PendingStart) -> None:
        answer = await self.request(call16.RemoteStartTransaction(
            id_tag=pending.driver_id, connector_id=conn.number))
        if not self.accepted("RemoteStartTransaction", answer.status):
            raise Refused("RemoteStartTransaction Rejected")

    async def remote_stop(self, session: Session) -> None:
        answer = await self.request(call16.RemoteStopTransaction(
            transaction_id=int(session.transaction)))
        if not self.accepted("RemoteStopTransaction", answer.status):
            raise Refused("RemoteStopTransaction Rejected")

    async def change_availability(self, conn: Connector, operative: bool) -> bool:
        kind = "Operative" if operative else "Inoperative"
        answer = await self.request(call16.ChangeAvailability(
            connector_id=conn.number, type=kind))
        if not self.accepted("ChangeAvailability", answer.status, "Accepted", "Scheduled"):
            raise Refused(f"ChangeAvailability {kind} Rejected")
        return _text(answer.status) == "Accepted"

    async def set_limit(self, conn: Connector, session: Session, watts: float) -> None:
        profile = tx_profile_id(conn.number)
        answer = await self.request(call16.SetChargingProfile(
            connector_id=conn.number, cs_charging_profiles={
                "charging_profile_id": profile, "transaction_id": int(session.transaction),
                "stack_level": 0, "charging_profile_purpose": "TxProfile",
                "charging_profile_kind": "Relative",
                "charging_schedule": {"charging_rate_unit": "W", "charging_schedule_period": [
                    {"start_period": 0, "limit": watts}]},
            }))
        if not self.accepted("SetChargingProfile", answer.status):
            raise Refused(f"SetChargingProfile {_text(answer.status)}")

    async def clear_limit(self, conn: Connector) -> None:
        answer = await self.request(call16.ClearChargingProfile(id=tx_profile_id(conn.number)))
        if not self.accepted("ClearChargingProfile", answer.status, "Accepted", "Unknown"):
            raise Refused(f"ClearChargingProfile {_text(answer.status)}")


class V201Link(ChargerLink):
    """OCPP 2.0.1: boot, heartbeat, status, authorization, transactions (TransactionEvent,
    RequestStart/StopTransaction) and availability. The charger's transactionId names the
    session; ``seqNo`` orders a transaction's events and a replayed event changes nothing."""

    version = "2.0.1"
    protocol = "ocpp2.0.1"
    id_tag_max = 36
    _ocpp_version = "2.0.1"
    _call = call201
    _call_result = result201
    known_actions = frozenset(action.value for action in Action201)

    def call_handlers(self) -> dict[str, CallHandler]:
        return {
            "BootNotification": self.on_boot_notification,
            "Heartbeat": self.on_heartbeat,
            "StatusNotification": self.on_status_notification,
            "Authorize": self.on_authorize,
            "TransactionEvent": self.on_transaction_event,
            "MeterValues": self.on_meter_values,
        }

    async def on_boot_notification(self, payload: Payload) -> Payload:
        station = payload["chargingStation"]
        self.vendor, self.model = str(station["vendorName"]), str(station["model"])
        self._log.info("charger {} booted: {} {} (OCPP 2.0.1)", self.charger_id, self.vendor,
                       self.model)
        self.gateway.booted(self.charger_id)
        return {"status": "Accepted", "currentTime": now_text(),
                "interval": self.gateway.heartbeat_interval}

    async def on_heartbeat(self, payload: Payload) -> Payload:
        await self.gateway.heartbeats(self.charger_id)
        return {"currentTime": now_text()}

    async def on_authorize(self, payload: Payload) -> Payload:
        token = str(payload["idToken"]["idToken"])
        return {"idTokenInfo": {"status": _tag_status(token, self.id_tag_max)}}

    async def on_status_notification(self, payload: Payload) -> Payload:
        evse = self.number(payload["evseId"], zero=True)
        conns = (self.gateway.of_charger(self.charger_id) if evse == 0
                 else [self.gateway.connector(self.charger_id, evse)])
        for conn in conns:
            await self.apply_status(conn, str(payload["connectorStatus"]), None, None,
                                    charger_time(payload["timestamp"]))
        return {}

    async def on_meter_values(self, payload: Payload) -> Payload:
        evse = self.number(payload["evseId"], zero=True)
        conn = self.gateway.connectors.get(f"{self.charger_id}.{evse}")
        reading = read_meter(payload.get("meterValue", []))
        session = conn.session if conn is not None else None
        if session is not None and (reading.energy_wh is not None or reading.power_w is not None):
            await self.gateway.meter(session, reading.energy_wh, reading.power_w, reading.ts)
        return {}

    async def on_transaction_event(self, payload: Payload) -> Payload | Later:
        info = payload["transactionInfo"]
        tx = str(info["transactionId"])
        event = str(payload["eventType"])
        seq = int(payload["seqNo"])
        ts = charger_time(payload["timestamp"])
        reading = read_meter(payload.get("meterValue", []))
        token = payload.get("idToken", {}).get("idToken")
        answer: Payload = {}
        if token is not None:
            answer["idTokenInfo"] = {"status": _tag_status(str(token), self.id_tag_max)}
        key = (self.charger_id, tx)
        began = key not in self.gateway.transactions
        if began:
            session = await self._begin(payload, info, tx, token, reading.energy_wh, ts)
            if session is None:
                return answer
        else:
            found = self.gateway.transactions[key]
            if found is None:
                return answer  # a transaction the gateway refused: no session
            session = found
            if seq <= session.seq_no:
                self._log.info("charger {}: TransactionEvent {} seqNo {} of transaction {} "
                               "replayed: nothing changes", self.charger_id, event, seq, tx)
                await self.gateway.announce_again(session)
                return self._token_verdict(session, answer)
        session.seq_no = max(session.seq_no, seq)
        if event == "Ended":
            final = reading.energy_wh if reading.energy_wh is not None else session.last_wh
            await self.gateway.stop(session, final, info.get("stoppedReason"), ts)
        elif reading.energy_wh is not None or reading.power_w is not None:
            await self.gateway.meter(session, reading.energy_wh, reading.power_w,
                                     reading.ts or ts)
        return self._token_verdict(session, answer) if began or session.denied else answer

    def _token_verdict(self, session: Session, answer: Payload) -> Payload | Later:
        """The answer with Central's verdict on a session started at the station (its
        idTokenInfo Invalid where Central would have denied it), once it is known."""
        if "idTokenInfo" not in answer or answer["idTokenInfo"]["status"] != "Accepted":
            return answer

        def decided(accepted: bool) -> Payload:
            return {**answer, "idTokenInfo": {"status": "Accepted" if accepted else "Invalid"}}

        return self.verdict_answer(session, decided)

    async def _begin(self, payload: Payload, info: Payload, tx: str, token: object,
                     energy_wh: float | None, ts: datetime) -> Session | None:
        """The first event of a transaction (Started, or a later one whose Started was
        lost): its session, or None when none can be made."""
        evse = payload.get("evse", {}).get("id")
        if evse is None:
            self.gateway.unknown_transaction(self.charger_id, "TransactionEvent without an "
                                             "EVSE", tx)
            return None
        conn = self.gateway.connector(self.charger_id, self.number(evse))
        remote = info.get("remoteStartId")
        pending = conn.pending
        driver = str(token) if token is not None else None
        if (driver is None or not is_valid_id_tag(driver, max_length=self.id_tag_max)) and (
            pending is not None and remote is not None and pending.remote_start_id == remote
        ):
            driver = pending.driver_id
        if driver is None or not is_valid_id_tag(driver, max_length=self.id_tag_max):
            self.gateway.remember(self.charger_id, tx, None)
            self.once("id_tag", "start", "transaction {} with id token {!r}, not a driver id: "
                      "no session", tx, token)
            return None
        return await self.gateway.start(
            conn, transaction=tx, driver_id=driver, meter_start_wh=energy_wh, ts=ts,
            own_session_id=session_id_of(self.charger_id, tx),
            remote_start_id=int(remote) if remote is not None else None,
        )

    # ---------------------------------------------------------------- Central's commands

    async def remote_start(self, conn: Connector, pending: PendingStart) -> None:
        answer = await self.request(call201.RequestStartTransaction(
            id_token={"id_token": pending.driver_id, "type": "Central"},
            remote_start_id=pending.remote_start_id, evse_id=conn.number))
        if not self.accepted("RequestStartTransaction", answer.status):
            raise Refused("RequestStartTransaction Rejected")

    async def remote_stop(self, session: Session) -> None:
        answer = await self.request(call201.RequestStopTransaction(
            transaction_id=session.transaction))
        if not self.accepted("RequestStopTransaction", answer.status):
            raise Refused("RequestStopTransaction Rejected")

    async def change_availability(self, conn: Connector, operative: bool) -> bool:
        kind = "Operative" if operative else "Inoperative"
        answer = await self.request(call201.ChangeAvailability(
            operational_status=kind, evse={"id": conn.number}))
        if not self.accepted("ChangeAvailability", answer.status, "Accepted", "Scheduled"):
            raise Refused(f"ChangeAvailability {kind} Rejected")
        return _text(answer.status) == "Accepted"

    async def set_limit(self, conn: Connector, session: Session, watts: float) -> None:
        profile = tx_profile_id(conn.number)
        answer = await self.request(call201.SetChargingProfile(
            evse_id=conn.number, charging_profile={
                "id": profile, "stack_level": 0, "charging_profile_purpose": "TxProfile",
                "charging_profile_kind": "Relative", "transaction_id": session.transaction,
                "charging_schedule": [{"id": profile, "charging_rate_unit": "W",
                                       "charging_schedule_period": [
                                           {"start_period": 0, "limit": watts}]}],
            }))
        if not self.accepted("SetChargingProfile", answer.status):
            raise Refused(f"SetChargingProfile {_text(answer.status)}")

    async def clear_limit(self, conn: Connector) -> None:
        answer = await self.request(call201.ClearChargingProfile(
            charging_profile_id=tx_profile_id(conn.number)))
        if not self.accepted("ClearChargingProfile", answer.status, "Accepted", "Unknown"):
            raise Refused(f"ClearChargingProfile {_text(answer.status)}")


def _started16(tx: int, accepted: bool) -> Payload:
    """StartTransaction.conf: Accepted, or Invalid where Central would have denied it."""
    return {"transactionId": tx, "idTagInfo": {"status": "Accepted" if accepted else "Invalid"}}


def _tag_status(id_tag: str, max_length: int = 20) -> str:
    return "Accepted" if is_valid_id_tag(id_tag, max_length=max_length) else "Invalid"


def _text(status: object) -> str:
    return str(getattr(status, "value", status))


def remote_start_id(session_id: str) -> int:
    """The remoteStartId (2.0.1) of Central's session: a positive 31-bit integer."""
    return int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "big") % (
        2**31 - 1) + 1
