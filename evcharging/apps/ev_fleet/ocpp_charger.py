"""A fleet's CP played as an OCPP charger with one connector (pure: no I/O).

With ``--protocol ocpp1.6`` or ``ocpp2.0.1`` each CP of the fleet is a charger that connects
to an OCPP gateway (SPEC §8) instead of speaking Kafka; the gateway makes its connector 1 the
CP ``{charger_id}.1``. :class:`ChargerModel` decides what the charger says and answers; the
connection (:mod:`evcharging.apps.ev_fleet.ocpp_fleet`) carries it out.

What a charger does, like the CP Engine's session:

* it boots (BootNotification), reports its connector Available (StatusNotification) and
  sends a Heartbeat every ``interval`` the BootNotification's answer names;
* a remote start (1.6 RemoteStartTransaction, 2.0.1 RequestStartTransaction) on a free,
  operative connector is Accepted and starts a transaction: StartTransaction (1.6) or
  TransactionEvent Started with the ``remoteStartId`` (2.0.1), then the connector Charging
  (Occupied) and a meter reading at once and every ``telemetry_interval``
  (MeterValues / TransactionEvent Updated: the energy register in Wh and the power in W);
* after ``session_seconds`` it ends the transaction itself (reason ``EVDisconnected``: the
  session COMPLETED); a remote stop (RemoteStopTransaction / RequestStopTransaction) of its
  transaction ends it at once (reason ``Remote``); then the connector is Available again;
* ChangeAvailability Inoperative makes the connector Unavailable (after a running
  transaction's stop) and refuses remote starts; Operative makes it Available;
* SetChargingProfile of a TxProfile for the running transaction (on its connector, of
  its transactionId when the profile names one) is Accepted and limits the power to its
  first period's limit (W; A at 230 V a phase): the charger delivers min(``kw_rate``, the
  limit) from then on, in its meter readings' power and energy; ClearChargingProfile of it
  (by its id, or of every TxProfile) lifts the limit (Unknown: it has none); a profile
  with no transaction running, for another one or of another purpose is Rejected;
* any other action of its version gets CALLERROR ``NotSupported``, a name OCPP does not
  define ``NotImplemented``.

The energy register only grows: a session adds ``kw_rate`` × its duration to it.
Every payload follows the version's JSON schema (the unit tests check them with the `ocpp`
library's validators; the charger itself does not validate, to stay light).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ocpp.v16.enums import Action as Action16
from ocpp.v201.enums import Action as Action201

from evcharging.common.messages import utcnow

__all__ = ["PROTOCOLS", "ChargerModel", "Outgoing", "Reply", "Transaction", "now_text"]

PROTOCOLS = ("ocpp1.6", "ocpp2.0.1")
VENDOR = "evcharging-fleet"
MODEL = "Fleet-CP"
CONNECTOR = 1

Payload = dict[str, Any]

_KNOWN = {"ocpp1.6": frozenset(a.value for a in Action16),
          "ocpp2.0.1": frozenset(a.value for a in Action201)}


def now_text() -> str:
    """Now, as OCPP dates it (UTC, ``Z``, milliseconds)."""
    return utcnow().isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A CALL the charger sends; `kind` tells the connection what its answer is for."""

    action: str
    payload: Payload
    kind: str = ""


@dataclass(frozen=True, slots=True)
class Reply:
    """The charger's answer to a CALL (`payload`, or CALLERROR `error`) and the CALLs it
    sends after it (`then`)."""

    payload: Payload | None = None
    error: str | None = None
    then: tuple[Outgoing, ...] = ()


@dataclass(slots=True)
class Transaction:
    """The connector's running transaction."""

    id_tag: str
    started: float
    """When it started (the model's monotonic clock)."""
    meter_start_wh: float
    remote_start_id: int | None = None
    transaction_id: str | None = None
    """1.6: the gateway's, once StartTransaction is answered; 2.0.1: the charger's own."""
    seq_no: int = 0
    next_meter: float = 0.0
    limit_kw: float | None = None
    """The power limit of its TxProfile (None: none)."""
    profile_id: int | None = None
    wh_at: float | None = None
    """The energy register when the power last changed (None: at the start)."""
    since: float = 0.0
    """When the power last changed (the model's clock)."""


class ChargerModel:
    """What one charger says and answers, for OCPP 1.6 or 2.0.1."""

    def __init__(
        self,
        charger_id: str,
        protocol: str,
        *,
        kw_rate: float = 22.0,
        session_seconds: float = 10.0,
        telemetry_interval: float = 1.0,
        wall: Callable[[], str] = now_text,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
        self.charger_id = charger_id
        self.protocol = protocol
        self.v16 = protocol == "ocpp1.6"
        self.kw_rate = kw_rate
        self.session_seconds = session_seconds
        self.telemetry_interval = telemetry_interval
        self.wall = wall
        self.clock = clock
        self.meter_wh = 0.0
        """The energy register at the end of the last transaction (Wh)."""
        self.interval: float | None = None
        """The heartbeat interval of the BootNotification's answer (None: not booted)."""
        self.operative = True
        self.tx: Transaction | None = None
        self.sessions_started = 0
        self.sessions_ended = 0
        self._tx_counter = 0

    # ---------------------------------------------------------------- what it sends

    def boot(self) -> Outgoing:
        if self.v16:
            payload: Payload = {"chargePointVendor": VENDOR, "chargePointModel": MODEL}
        else:
            payload = {"chargingStation": {"model": MODEL, "vendorName": VENDOR},
                       "reason": "PowerUp"}
        return Outgoing("BootNotification", payload, "boot")

    def on_boot(self, answer: Payload) -> list[Outgoing]:
        """The BootNotification's answer: Accepted → the connector's status follows."""
        if answer.get("status") != "Accepted":
            return []
        self.interval = float(answer.get("interval") or 60)
        return [self.status()]

    def heartbeat(self) -> Outgoing:
        return Outgoing("Heartbeat", {}, "heartbeat")

    def connector_status(self) -> str:
        if self.tx is not None:
            return "Charging" if self.v16 else "Occupied"
        return "Available" if self.operative else "Unavailable"

    def status(self) -> Outgoing:
        if self.v16:
            payload: Payload = {"connectorId": CONNECTOR, "errorCode": "NoError",
                                "status": self.connector_status(), "timestamp": self.wall()}
        else:
            payload = {"timestamp": self.wall(), "connectorStatus": self.connector_status(),
                       "evseId": CONNECTOR, "connectorId": CONNECTOR}
        return Outgoing("StatusNotification", payload, "status")

    def power_kw(self) -> float:
        """The power it delivers: min(``kw_rate``, its transaction's limit)."""
        tx = self.tx
        if tx is None or tx.limit_kw is None:
            return self.kw_rate
        return min(self.kw_rate, tx.limit_kw)

    def energy_wh(self, now: float) -> float:
        """The energy register now."""
        tx = self.tx
        if tx is None:
            return self.meter_wh
        start = tx.since if tx.wh_at is not None else tx.started
        base = tx.wh_at if tx.wh_at is not None else tx.meter_start_wh
        end = min(now, tx.started + self.session_seconds)
        return base + self.power_kw() * 1000.0 * max(end - start, 0.0) / 3600.0

    def _limit(self, tx: Transaction, limit_kw: float | None, profile_id: int | None,
               now: float) -> None:
        """The transaction's power changes now (the energy so far at the old power)."""
        tx.wh_at, tx.since = self.energy_wh(now), now
        tx.limit_kw, tx.profile_id = limit_kw, profile_id

    def _samples(self, now: float, *, power: bool) -> list[Payload]:
        wh = round(self.energy_wh(now), 1)
        watts = round(self.power_kw() * 1000.0, 1)
        if self.v16:
            values: list[Payload] = [{"value": f"{wh:.1f}", "measurand":
                                      "Energy.Active.Import.Register", "unit": "Wh"}]
            if power:
                values.append({"value": f"{watts:.1f}", "measurand": "Power.Active.Import",
                               "unit": "W"})
        else:
            values = [{"value": wh, "measurand": "Energy.Active.Import.Register",
                       "unitOfMeasure": {"unit": "Wh"}}]
            if power:
                values.append({"value": watts, "measurand": "Power.Active.Import",
                               "unitOfMeasure": {"unit": "W"}})
        return [{"timestamp": self.wall(), "sampledValue": values}]

    def _event(self, tx: Transaction, event: str, trigger: str, now: float, *,
               state: str, reason: str | None = None) -> Outgoing:
        """A 2.0.1 TransactionEvent of `tx`."""
        info: Payload = {"transactionId": tx.transaction_id, "chargingState": state}
        if event == "Started" and tx.remote_start_id is not None:
            info["remoteStartId"] = tx.remote_start_id
        if reason is not None:
            info["stoppedReason"] = reason
        payload: Payload = {
            "eventType": event, "timestamp": self.wall(), "triggerReason": trigger,
            "seqNo": tx.seq_no, "transactionInfo": info,
            "meterValue": self._samples(now, power=event == "Updated"),
        }
        tx.seq_no += 1
        if event == "Started":
            payload["evse"] = {"id": CONNECTOR, "connectorId": CONNECTOR}
            payload["idToken"] = {"idToken": tx.id_tag, "type": "Central"}
        return Outgoing("TransactionEvent", payload, event.lower())

    def meter(self, now: float) -> Outgoing:
        """The running transaction's meter reading (MeterValues / TransactionEvent Updated)."""
        tx = self.tx
        assert tx is not None and tx.transaction_id is not None
        tx.next_meter = now + self.telemetry_interval
        if self.v16:
            return Outgoing("MeterValues", {
                "connectorId": CONNECTOR, "transactionId": int(tx.transaction_id),
                "meterValue": self._samples(now, power=True)}, "meter")
        return self._event(tx, "Updated", "MeterValuePeriodic", now, state="Charging")

    def _start(self, id_tag: str, now: float, remote_start_id: int | None) -> list[Outgoing]:
        tx = Transaction(id_tag, now, self.meter_wh, remote_start_id)
        self.tx = tx
        self.sessions_started += 1
        if self.v16:
            return [Outgoing("StartTransaction", {
                "connectorId": CONNECTOR, "idTag": id_tag,
                "meterStart": round(self.meter_wh), "timestamp": self.wall()}, "start")]
        self._tx_counter += 1
        tx.transaction_id = f"{self.charger_id[-24:]}-{self._tx_counter}"
        return [self._event(tx, "Started", "RemoteStart", now, state="Charging"),
                self.status(), self.meter(now)]

    def on_started(self, answer: Payload, now: float) -> list[Outgoing]:
        """1.6: StartTransaction's answer names the transaction; an id tag that is not
        Accepted ends it at once."""
        tx = self.tx
        if tx is None or tx.transaction_id is not None or "transactionId" not in answer:
            return []
        tx.transaction_id = str(answer["transactionId"])
        if answer.get("idTagInfo", {}).get("status") != "Accepted":
            return self.stop(now, "DeAuthorized")
        return [self.status(), self.meter(now)]

    def stop(self, now: float, reason: str) -> list[Outgoing]:
        """End the running transaction: its stop, then the connector's status."""
        tx = self.tx
        if tx is None or tx.transaction_id is None:
            return []
        final = self.energy_wh(now)
        out: list[Outgoing]
        if self.v16:
            out = [Outgoing("StopTransaction", {
                "transactionId": int(tx.transaction_id), "meterStop": round(final),
                "timestamp": self.wall(), "reason": reason}, "stop")]
        else:
            trigger = {"Remote": "RemoteStop", "DeAuthorized": "Deauthorized"}.get(
                reason, "EVDeparted")
            out = [self._event(tx, "Ended", trigger, now, state="Idle", reason=reason)]
        self.meter_wh = final
        self.tx = None
        self.sessions_ended += 1
        return [*out, self.status()]

    def due(self, now: float) -> list[Outgoing]:
        """What the running transaction sends now: its end after ``session_seconds``, else
        a meter reading every ``telemetry_interval``."""
        tx = self.tx
        if tx is None or tx.transaction_id is None:
            return []
        if now - tx.started >= self.session_seconds:
            return self.stop(now, "EVDisconnected")
        if now >= tx.next_meter:
            return [self.meter(now)]
        return []

    # ---------------------------------------------------------------- what it answers

    def handle(self, action: str, payload: Payload, now: float) -> Reply:
        """The gateway's CALL `action`: the answer and what follows it."""
        handlers = {
            "RemoteStartTransaction": self._remote_start16,
            "RemoteStopTransaction": self._remote_stop16,
            "RequestStartTransaction": self._remote_start201,
            "RequestStopTransaction": self._remote_stop201,
            "ChangeAvailability": self._change_availability,
            "SetChargingProfile": self._set_profile,
            "ClearChargingProfile": self._clear_profile,
        }
        handler = handlers.get(action)
        if handler is None or (action.startswith("Remote") != self.v16
                               and action.startswith(("Remote", "Request"))):
            code = "NotSupported" if action in _KNOWN[self.protocol] else "NotImplemented"
            return Reply(error=code)
        return handler(payload, now)

    def _can_start(self) -> bool:
        return self.operative and self.tx is None and self.interval is not None

    def _remote_start16(self, payload: Payload, now: float) -> Reply:
        if not self._can_start() or payload.get("connectorId", CONNECTOR) != CONNECTOR:
            return Reply({"status": "Rejected"})
        return Reply({"status": "Accepted"}, then=tuple(self._start(
            str(payload["idTag"]), now, None)))

    def _remote_start201(self, payload: Payload, now: float) -> Reply:
        if not self._can_start() or payload.get("evseId", CONNECTOR) != CONNECTOR:
            return Reply({"status": "Rejected"})
        token = str(payload["idToken"]["idToken"])
        return Reply({"status": "Accepted"}, then=tuple(self._start(
            token, now, int(payload["remoteStartId"]))))

    def _running(self, transaction: object) -> bool:
        tx = self.tx
        return tx is not None and tx.transaction_id is not None and (
            str(transaction) == tx.transaction_id)

    def _remote_stop16(self, payload: Payload, now: float) -> Reply:
        if not self._running(payload.get("transactionId")):
            return Reply({"status": "Rejected"})
        return Reply({"status": "Accepted"}, then=tuple(self.stop(now, "Remote")))

    def _remote_stop201(self, payload: Payload, now: float) -> Reply:
        if not self._running(payload.get("transactionId")):
            return Reply({"status": "Rejected"})
        return Reply({"status": "Accepted"}, then=tuple(self.stop(now, "Remote")))

    def _change_availability(self, payload: Payload, now: float) -> Reply:
        if self.v16:
            where, kind = payload.get("connectorId", 0), str(payload.get("type"))
        else:
            where = (payload.get("evse") or {}).get("id", 0)
            kind = str(payload.get("operationalStatus"))
        if where not in (0, CONNECTOR):
            return Reply({"status": "Rejected"})
        self.operative = kind == "Operative"
        if self.tx is not None:  # the transaction's stop sends the status
            return Reply({"status": "Scheduled"})
        return Reply({"status": "Accepted"}, then=(self.status(),))

    def _set_profile(self, payload: Payload, now: float) -> Reply:
        """A TxProfile for the running transaction limits its power (see the module)."""
        if self.v16:
            where, profile = payload.get("connectorId"), payload.get("csChargingProfiles", {})
            schedule = profile.get("chargingSchedule", {})
            profile_id = profile.get("chargingProfileId")
        else:
            where, profile = payload.get("evseId"), payload.get("chargingProfile", {})
            schedule = (profile.get("chargingSchedule") or [{}])[0]
            profile_id = profile.get("id")
        tx = self.tx
        periods = sorted(schedule.get("chargingSchedulePeriod") or [],
                         key=lambda period: period.get("startPeriod", 0))
        named = profile.get("transactionId")
        if (tx is None or tx.transaction_id is None or where != CONNECTOR or not periods
                or profile.get("chargingProfilePurpose") != "TxProfile"
                or (named is not None and not self._running(named))):
            return Reply({"status": "Rejected"})
        limit = float(periods[0]["limit"])
        if schedule.get("chargingRateUnit") == "A":
            limit *= 230.0 * int(periods[0].get("numberPhases", 3))
        self._limit(tx, limit / 1000.0, profile_id, now)
        return Reply({"status": "Accepted"})

    def _clear_profile(self, payload: Payload, now: float) -> Reply:
        """ClearChargingProfile of the transaction's TxProfile lifts its limit."""
        wanted = payload.get("id") if self.v16 else payload.get("chargingProfileId")
        tx = self.tx
        if tx is None or tx.limit_kw is None or (wanted is not None
                                                 and wanted != tx.profile_id):
            return Reply({"status": "Unknown"})
        self._limit(tx, None, None, now)
        return Reply({"status": "Accepted"})
