"""OCPP chargers of the chaos suite, played by the mobilityhouse `ocpp` library (SPEC §8).

:class:`Charger` is one charger with one connector and an energy meter, connected to the OCPP
gateway over a real WebSocket as a library ``ChargePoint`` (OCPP 1.6 or 2.0.1). It does what
an OCPP charger does when its link to the backend comes and goes:

* on every connection it boots (BootNotification), then reports its connector;
* a remote start (RemoteStartTransaction / RequestStartTransaction) on its free connector is
  Accepted and starts a transaction: its start (StartTransaction / TransactionEvent Started),
  a meter reading every ``meter_interval`` (MeterValues / TransactionEvent Updated) and,
  after ``session_seconds``, its stop (StopTransaction / TransactionEvent Ended, reason
  ``EVDisconnected``), each stamped with the charger's own clock when it happened;
* those transaction messages go out in order through one queue and leave it only once
  answered. While the charger is offline (its connection lost, the gateway dead, or
  :meth:`Charger.go_offline`) it goes on charging and queueing; when it is back it boots,
  replays the queue (a message whose answer was lost is sent again, as OCPP-J allows) and
  only then reports its connector as it is now (statuses are not queued);
* 1.6: a meter reading or stop queued before its StartTransaction was answered names the
  transactionId that answer gives (it is filled in when the message is sent); 2.0.1: the
  charger names its transactions itself, ``seqNo`` counts their events and an event that
  happened offline says ``offline: true``.

What the meter said of each transaction (:class:`Metered`: its start and stop readings and
times) is the truth the test holds Central's ledger to.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import websockets
from ocpp import routing
from ocpp.exceptions import OCPPError
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

__all__ = ["CONNECTOR", "Charger", "Metered"]

CONNECTOR = 1
ENERGY = "Energy.Active.Import.Register"
POWER = "Power.Active.Import"
CALL_TIMEOUT = 10.0
"""Seconds a CALL of the charger waits for its answer before it reconnects."""

_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def on(action: str) -> Callable[[_Handler], _Handler]:
    """The library's ``on`` (untyped), typed."""
    return cast(Callable[[_Handler], _Handler], routing.on(action))


def after(action: str) -> Callable[[_Handler], _Handler]:
    """The library's ``after`` (untyped), typed."""
    return cast(Callable[[_Handler], _Handler], routing.after(action))


def stamp() -> str:
    """The charger's clock now, as OCPP writes it (UTC, milliseconds)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Metered:
    """One transaction as the charger's meter saw it."""

    cp_id: str
    id_tag: str
    start_wh: int
    started: str
    """The charger's timestamp of its start."""
    stop_wh: int | None = None
    stopped: str | None = None
    transaction_id: str | None = None
    """1.6: the gateway's (once the start is answered); 2.0.1: the charger's own."""
    remote_start_id: int | None = None
    seq_no: int = 0
    """2.0.1: the seqNo of its next event."""
    offline_messages: int = 0
    """Its messages that waited in the queue while the charger was offline."""

    @property
    def kwh(self) -> float | None:
        return None if self.stop_wh is None else (self.stop_wh - self.start_wh) / 1000.0


@dataclass
class Queued:
    """A transaction message; `build` makes its payload when it is sent."""

    kind: str
    """``start``, ``meter`` or ``stop``."""
    build: Callable[[], Any]
    on_answer: Callable[[Any], None] = lambda _answer: None
    offline: bool = False


class Lost(Exception):
    """The connection went away while a CALL waited for its answer."""


class _Handlers16(ChargePoint16):  # type: ignore[misc]  # the library is untyped
    def __init__(self, charger: Charger, connection: ClientConnection) -> None:
        super().__init__(charger.charger_id, connection, response_timeout=CALL_TIMEOUT)
        self.charger = charger

    @on("RemoteStartTransaction")
    def on_remote_start(self, id_tag: str, connector_id: int | None = None, **_: Any) -> Any:
        ok = self.charger.reserve(id_tag, connector_id, None)
        return result16.RemoteStartTransaction(status="Accepted" if ok else "Rejected")

    @after("RemoteStartTransaction")
    def after_remote_start(self, **_: Any) -> None:
        self.charger.begin()

    @on("RemoteStopTransaction")
    def on_remote_stop(self, transaction_id: int, **_: Any) -> Any:
        ok = self.charger.stopping(str(transaction_id))
        return result16.RemoteStopTransaction(status="Accepted" if ok else "Rejected")

    @after("RemoteStopTransaction")
    def after_remote_stop(self, **_: Any) -> None:
        self.charger.end("Remote")

    @on("ChangeAvailability")
    def on_change_availability(self, **_: Any) -> Any:
        return result16.ChangeAvailability(status="Accepted")

    @on("SetChargingProfile")
    def on_set_charging_profile(self, **_: Any) -> Any:
        return result16.SetChargingProfile(status="Accepted")


class _Handlers201(ChargePoint201):  # type: ignore[misc]  # the library is untyped
    def __init__(self, charger: Charger, connection: ClientConnection) -> None:
        super().__init__(charger.charger_id, connection, response_timeout=CALL_TIMEOUT)
        self.charger = charger

    @on("RequestStartTransaction")
    def on_request_start(self, id_token: dict[str, Any], remote_start_id: int,
                         evse_id: int | None = None, **_: Any) -> Any:
        ok = self.charger.reserve(str(id_token["id_token"]), evse_id, remote_start_id)
        return result201.RequestStartTransaction(status="Accepted" if ok else "Rejected")

    @after("RequestStartTransaction")
    def after_request_start(self, **_: Any) -> None:
        self.charger.begin()

    @on("RequestStopTransaction")
    def on_request_stop(self, transaction_id: str, **_: Any) -> Any:
        ok = self.charger.stopping(transaction_id)
        return result201.RequestStopTransaction(status="Accepted" if ok else "Rejected")

    @after("RequestStopTransaction")
    def after_request_stop(self, **_: Any) -> None:
        self.charger.end("Remote")

    @on("ChangeAvailability")
    def on_change_availability(self, **_: Any) -> Any:
        return result201.ChangeAvailability(status="Accepted")

    @on("SetChargingProfile")
    def on_set_charging_profile(self, **_: Any) -> Any:
        return result201.SetChargingProfile(status="Accepted")


@dataclass
class ChargerStats:
    connects: int = 0
    lost_answers: int = 0
    """CALLs whose answer the connection lost (sent again when back)."""
    replayed: int = 0
    """Transaction messages sent after waiting offline."""
    errors: list[str] = field(default_factory=list)
    """CALLERRORs and refused ids: a charger of the test never expects one."""


class Charger:
    """One OCPP charger with one connector, its meter and its offline queue."""

    def __init__(
        self, charger_id: str, url: str, protocol: str, *, kw: float, session_seconds: float,
        meter_interval: float, retry: float = 0.5,
    ) -> None:
        if protocol not in ("ocpp1.6", "ocpp2.0.1"):
            raise ValueError(f"no such OCPP protocol {protocol!r}")
        self.charger_id = charger_id
        self.url = url
        self.protocol = protocol
        self.v16 = protocol == "ocpp1.6"
        self.kw = kw
        self.session_seconds = session_seconds
        self.meter_interval = meter_interval
        self.retry = retry
        self.register_wh = 0
        """The energy register at the end of the last transaction (Wh)."""
        self.tx: Metered | None = None
        self.transactions: list[Metered] = []
        self.stats = ChargerStats()
        self.queue: deque[Queued] = deque()
        self.allowed = asyncio.Event()
        """Cleared while the test holds the charger offline."""
        self.allowed.set()
        self.online = asyncio.Event()
        """Set while connected and booted."""
        self._wake = asyncio.Event()
        self._status_due = True
        self._reserved: tuple[str, int | None] | None = None
        self._tx_started = 0.0
        self._charging: asyncio.Task[None] | None = None
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._tx_count = 0
        self.tap: Callable[[str], None] | None = None
        """Called with a message's kind (``start``, ``meter``, ``stop``) the moment its
        answer arrives: a fault can strike right then."""

    @property
    def cp_id(self) -> str:
        return f"{self.charger_id}.{CONNECTOR}"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"charger-{self.charger_id}")

    async def close(self) -> None:
        for task in (self._charging, self._task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._ws is not None:
            await self._ws.close()

    # ---------------------------------------------------------------- the link

    def go_offline(self) -> None:
        """Drop the connection as a lost network does (the TCP connection reset, no
        WebSocket close), and stay offline until :meth:`go_online`."""
        self.allowed.clear()
        self.online.clear()
        ws = self._ws
        if ws is not None:
            ws.transport.abort()

    def go_online(self) -> None:
        self.allowed.set()

    async def _run(self) -> None:
        while True:
            await self.allowed.wait()
            try:
                async with websockets.connect(
                    self.url + self.charger_id, subprotocols=[Subprotocol(self.protocol)],
                    open_timeout=5, close_timeout=1,
                ) as ws:
                    self._ws = ws
                    self.stats.connects += 1
                    handlers = (_Handlers16 if self.v16 else _Handlers201)(self, ws)
                    reader = asyncio.create_task(handlers.start(), name="charger-reader")
                    try:
                        await self._serve(handlers, reader)
                    finally:
                        reader.cancel()
                        await asyncio.gather(reader, return_exceptions=True)
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError, Lost):
                pass  # offline: it tries again
            except Exception as exc:  # shown by the test (meter_problems); it tries again
                self.stats.errors.append(f"connection failed: {exc!r}")
            finally:
                self._ws = None
                self.online.clear()
                self._status_due = True
            if self.allowed.is_set():
                await asyncio.sleep(self.retry)  # the charger's reconnect pace, not a wait

    async def _serve(self, cp: Any, reader: asyncio.Task[None]) -> None:
        """Boot, replay the queue, report the connector; then send what comes."""
        if self.v16:
            boot = call16.BootNotification(charge_point_model="Chaos-22",
                                           charge_point_vendor="evcharging-chaos")
        else:
            boot = call201.BootNotification(
                charging_station={"model": "Chaos-22", "vendor_name": "evcharging-chaos"},
                reason="PowerUp")
        await self._call(cp, reader, boot)
        self.online.set()
        while self.allowed.is_set():
            if self.queue:
                item = self.queue[0]
                answer = await self._call(cp, reader, item.build())
                self.queue.popleft()
                if self.tap is not None:
                    self.tap(item.kind)
                if item.offline:
                    self.stats.replayed += 1
                item.on_answer(answer)
            elif self._status_due:
                self._status_due = False
                await self._call(cp, reader, self._status())
            else:
                self._wake.clear()
                waiter = asyncio.create_task(self._wake.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if reader.done():
                    raise Lost

    async def _call(self, cp: Any, reader: asyncio.Task[None], payload: Any) -> Any:
        """One CALL; Lost when the connection goes first (the message stays queued)."""
        call = asyncio.create_task(cp.call(payload, suppress=False))
        await asyncio.wait({call, reader}, return_when=asyncio.FIRST_COMPLETED)
        if not call.done():
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            self.stats.lost_answers += 1
            raise Lost
        try:
            return call.result()
        except OCPPError as exc:
            self.stats.errors.append(f"{type(payload).__name__}: CALLERROR {exc!r}")
            return None

    def _status(self) -> Any:
        if self.v16:
            return call16.StatusNotification(
                connector_id=CONNECTOR, error_code="NoError",
                status="Charging" if self.tx is not None else "Available", timestamp=stamp())
        return call201.StatusNotification(
            timestamp=stamp(), connector_status="Occupied" if self.tx is not None else "Available",
            evse_id=CONNECTOR, connector_id=CONNECTOR)

    def _send(self, item: Queued) -> None:
        item.offline = not self.online.is_set()
        if item.offline and self.tx is not None:
            self.tx.offline_messages += 1
        self.queue.append(item)
        self._wake.set()

    # ---------------------------------------------------------------- the meter

    def energy_wh(self) -> int:
        """The energy register now (whole Wh)."""
        if self.tx is None:
            return self.register_wh
        elapsed = min(time.monotonic() - self._tx_started, self.session_seconds)
        return self.tx.start_wh + round(self.kw * 1000.0 * elapsed / 3600.0)

    def _meter_value(self, wh: int, at: str, *, power: bool) -> list[dict[str, Any]]:
        if self.v16:
            values: list[dict[str, Any]] = [{"value": str(wh), "measurand": ENERGY,
                                             "unit": "Wh"}]
            if power:
                values.append({"value": f"{self.kw * 1000.0:.0f}", "measurand": POWER,
                               "unit": "W"})
            return [{"timestamp": at, "sampledValue": values}]
        values = [{"value": wh, "measurand": ENERGY, "unit_of_measure": {"unit": "Wh"}}]
        if power:
            values.append({"value": self.kw * 1000.0, "measurand": POWER,
                           "unit_of_measure": {"unit": "W"}})
        return [{"timestamp": at, "sampled_value": values}]

    # ---------------------------------------------------------------- transactions

    def reserve(self, id_tag: str, connector: int | None, remote_start_id: int | None) -> bool:
        """A remote start: Accepted when the connector is free (it starts once answered)."""
        if self.tx is not None or self._reserved is not None or connector not in (
                None, CONNECTOR):
            return False
        self._reserved = (id_tag, remote_start_id)
        return True

    def begin(self) -> None:
        """Start the reserved transaction: its start now, its meter and its end to come."""
        if self._reserved is None:
            return
        id_tag, remote_start_id = self._reserved
        self._reserved = None
        tx = Metered(self.cp_id, id_tag, self.register_wh, stamp(),
                     remote_start_id=remote_start_id)
        self.tx = tx
        self._tx_started = time.monotonic()
        self.transactions.append(tx)
        if self.v16:
            def started(answer: Any) -> None:
                if answer is None:  # a CALLERROR (counted): no transaction id to go on
                    return
                tx.transaction_id = str(answer.transaction_id)
                if answer.id_tag_info.get("status") != "Accepted":
                    self.stats.errors.append(f"StartTransaction of {id_tag}: {answer!r}")

            start = call16.StartTransaction(connector_id=CONNECTOR, id_tag=id_tag,
                                            meter_start=tx.start_wh, timestamp=tx.started)
            self._send(Queued("start", lambda: start, started))
        else:
            self._tx_count += 1
            tx.transaction_id = f"{self.charger_id}-{self._tx_count}-{int(time.time())}"
            self._event(tx, "Started", "RemoteStart", tx.start_wh, tx.started)
        self._status_due = True
        self._charging = asyncio.create_task(self._charge(tx), name=f"tx-{self.charger_id}")

    async def _charge(self, tx: Metered) -> None:
        """A meter reading every meter_interval, the end after session_seconds."""
        begun = self._tx_started
        k = 1
        while k * self.meter_interval < self.session_seconds - 1e-6:
            await asyncio.sleep(max(0.0, begun + k * self.meter_interval - time.monotonic()))
            self._reading(tx)  # the meter's pace (above), not a wait for anything
            k += 1
        await asyncio.sleep(max(0.0, begun + self.session_seconds - time.monotonic()))
        self._charging = None
        self.end("EVDisconnected")

    def _reading(self, tx: Metered) -> None:
        wh, at = self.energy_wh(), stamp()
        if not self.v16:
            self._event(tx, "Updated", "MeterValuePeriodic", wh, at)
            return
        value = self._meter_value(wh, at, power=True)
        self._send(Queued("meter", lambda: call16.MeterValues(
            connector_id=CONNECTOR, transaction_id=int(str(tx.transaction_id)),
            meter_value=value)))

    def stopping(self, transaction: str) -> bool:
        return self.tx is not None and self.tx.transaction_id == transaction

    def end(self, reason: str) -> None:
        """Stop the running transaction with the meter as it is now."""
        tx = self.tx
        if tx is None:
            return
        if self._charging is not None and reason != "EVDisconnected":
            self._charging.cancel()
            self._charging = None
        tx.stop_wh, tx.stopped = self.energy_wh(), stamp()
        self.register_wh = tx.stop_wh
        self.tx = None
        if self.v16:
            self._send(Queued("stop", lambda: call16.StopTransaction(
                meter_stop=tx.stop_wh, timestamp=tx.stopped,
                transaction_id=int(str(tx.transaction_id)), reason=reason)))
        else:
            assert tx.stop_wh is not None and tx.stopped is not None
            self._event(tx, "Ended", "EVDeparted" if reason == "EVDisconnected" else
                        "RemoteStop", tx.stop_wh, tx.stopped, stopped_reason=reason)
        self._status_due = True

    def _event(self, tx: Metered, event: str, trigger: str, wh: int, at: str,
               stopped_reason: str | None = None) -> None:
        """A 2.0.1 TransactionEvent of `tx`, numbered now."""
        info: dict[str, Any] = {"transaction_id": tx.transaction_id,
                                "charging_state": "Idle" if event == "Ended" else "Charging"}
        if event == "Started" and tx.remote_start_id is not None:
            info["remote_start_id"] = tx.remote_start_id
        if stopped_reason is not None:
            info["stopped_reason"] = stopped_reason
        seq = tx.seq_no
        tx.seq_no += 1
        offline = not self.online.is_set()
        extra: dict[str, Any] = {}
        if event == "Started":
            extra = {"evse": {"id": CONNECTOR, "connector_id": CONNECTOR},
                     "id_token": {"id_token": tx.id_tag, "type": "Central"}}
        payload = call201.TransactionEvent(
            event_type=event, timestamp=at, trigger_reason=trigger, seq_no=seq,
            transaction_info=info, offline=True if offline else None,
            meter_value=self._meter_value(wh, at, power=event == "Updated"), **extra)
        kind = {"Started": "start", "Ended": "stop"}.get(event, "meter")
        self._send(Queued(kind, lambda: payload))
