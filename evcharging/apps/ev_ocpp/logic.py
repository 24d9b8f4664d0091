"""The OCPP gateway's pure rules (SPEC §8): ids, meter values, states, stop reasons, errors.

Nothing here does I/O, so each rule is unit-tested on its own.

* :func:`transaction_id` and :func:`session_id_of`: a StartTransaction's id depends only on
  the charger, the connector, the id tag, ``meterStart`` and ``timestamp``, so a replayed
  StartTransaction gets the same transaction (and session) and never a second one.
* :func:`read_meter`: the energy register (Wh) and the power (W) of one MeterValues sample
  list, in any of the units OCPP allows.
* :func:`connector_state`: a StatusNotification's status as a CP state of SPEC §3.
* :func:`stop_result`: how a StopTransaction's reason ends the session.
* :func:`tx_profile_id`: the id of the TxProfile that carries Central's limit (SET_LIMIT).
* :func:`schema_error_code`: the OCPP-J CALLERROR code of a payload that breaks the schema.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from evcharging.common.states import CPState, SessionResult

__all__ = [
    "CHARGER_ID_PATTERN",
    "PROTOCOLS",
    "MeterReading",
    "connector_cp_id",
    "connector_state",
    "is_valid_id_tag",
    "parse_ocpp_time",
    "read_meter",
    "schema_error_code",
    "session_id_of",
    "stop_result",
    "transaction_id",
    "tx_profile_id",
]

PROTOCOLS = ("ocpp1.6", "ocpp2.0.1")
"""The WebSocket subprotocols the gateway speaks, in its order of preference."""

CHARGER_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,60}$")
"""A charger id: the CP id pattern of SPEC §1, at most 60 characters so that its CPs'
ids ``{charger}.{n}`` (n up to 999) are CP ids too."""

_DRIVER_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ID_TAG_MAX = 20
"""OCPP 1.6's IdToken is a CiString20 (2.0.1's idToken is 36: the 1.6 limit holds for both
only where the protocol sets it; see :func:`is_valid_id_tag`)."""

_TX_ID_MAX = 2**31 - 1


def connector_cp_id(charger_id: str, connector: int) -> str:
    """The CP id of connector (or EVSE) `connector` of `charger_id`: ``X.n``."""
    return f"{charger_id}.{connector}"


def is_valid_id_tag(id_tag: str, *, max_length: int = ID_TAG_MAX) -> bool:
    """Whether `id_tag` is a driver id (SPEC §1's pattern) within OCPP's length limit."""
    return len(id_tag) <= max_length and _DRIVER_ID.fullmatch(id_tag) is not None


def _digest(*parts: object) -> bytes:
    text = "\x1f".join(str(part) for part in parts)
    return hashlib.sha256(text.encode()).digest()


def transaction_id(
    charger_id: str, connector: int, id_tag: str, meter_start: int, timestamp: str
) -> int:
    """The transactionId of a 1.6 StartTransaction: a positive 31-bit integer that depends
    only on these five fields (the timestamp as the charger wrote it, normalised)."""
    digest = _digest(charger_id, connector, id_tag, meter_start, _normal_time(timestamp))
    return int.from_bytes(digest[:8], "big") % _TX_ID_MAX + 1


TX_PROFILE_BASE = 9000
"""The gateway's TxProfiles have ids :data:`TX_PROFILE_BASE` + the connector (EVSE)."""


def tx_profile_id(connector: int) -> int:
    """The chargingProfileId (2.0.1: the profile's and its schedule's ``id``) of the
    TxProfile that carries Central's limit on connector (EVSE) `connector`: ``9000 + n``,
    stack level 0. One per connector: a new limit replaces it (same id), SET_LIMIT with
    no limit clears it by this id, and a charger's own profiles (other ids) are never
    touched."""
    return TX_PROFILE_BASE + connector


def session_id_of(charger_id: str, transaction: str | int) -> str:
    """The session id of a transaction that Central did not start (an id tag at the
    charger): stable for the charger and the transaction, 32 hex digits."""
    return _digest("session", charger_id, transaction).hex()[:32]


def _normal_time(timestamp: str) -> str:
    try:
        return parse_ocpp_time(timestamp).isoformat()
    except ValueError:
        return timestamp


def parse_ocpp_time(text: str) -> datetime:
    """An OCPP dateTime as an aware UTC datetime (no offset given: taken as UTC).

    Raises ValueError when it is not an ISO 8601 date and time.
    """
    value = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# ----------------------------------------------------------------------------- meter values

ENERGY = "Energy.Active.Import.Register"
POWER = "Power.Active.Import"

_ENERGY_TO_WH = {"wh": 1.0, "kwh": 1000.0}
_POWER_TO_W = {"w": 1.0, "kw": 1000.0}


@dataclass(frozen=True)
class MeterReading:
    """What one sample list says: the energy register (Wh) and the power (W), each None
    when absent, and when it was read (None: the sample carried no timestamp)."""

    energy_wh: float | None = None
    power_w: float | None = None
    ts: datetime | None = None


def _value(sample: Mapping[str, Any], units: Mapping[str, float], default: str) -> float | None:
    unit = str(sample.get("unit") or sample.get("unitOfMeasure", {}).get("unit") or default)
    factor = units.get(unit.lower())
    if factor is None:
        return None
    multiplier = sample.get("unitOfMeasure", {}).get("multiplier", 0)
    try:
        value = float(sample["value"])
    except (KeyError, TypeError, ValueError):
        return None
    if value != value or value in (float("inf"), float("-inf")):  # NaN, infinities
        return None
    return value * factor * 10.0 ** int(multiplier)


def _total(samples: list[Mapping[str, Any]], units: Mapping[str, float], default: str
           ) -> float | None:
    """The total of one measurand: its sample without a phase, else the sum of its
    line phases (L1, L2, L3; a phase-to-neutral reading is not double counted)."""
    whole = [s for s in samples if not s.get("phase")]
    for sample in whole:
        value = _value(sample, units, default)
        if value is not None:
            return value
    phases = {str(s["phase"]): _value(s, units, default) for s in samples if s.get("phase")}
    lines = [v for p, v in phases.items() if p in ("L1", "L2", "L3") and v is not None]
    return sum(lines) if lines else None


def read_meter(meter_values: Iterable[Mapping[str, Any]]) -> MeterReading:
    """The last energy register and power in a MeterValues ``meterValue`` list (1.6 or
    2.0.1 shapes: ``sampledValue`` items with ``value`` a string (1.6) or a number
    (2.0.1), ``measurand`` defaulting to the energy register, ``unit`` (1.6) or
    ``unitOfMeasure`` (2.0.1) defaulting to Wh and W).

    Samples of other measurands, of other contexts' units or with values that are not
    numbers are left out; a list with none of the two gives a reading of Nones.
    """
    energy: float | None = None
    power: float | None = None
    ts: datetime | None = None
    for meter_value in meter_values:
        sampled = [s for s in meter_value.get("sampledValue", []) if isinstance(s, Mapping)]
        by_measurand: dict[str, list[Mapping[str, Any]]] = {}
        for sample in sampled:
            by_measurand.setdefault(str(sample.get("measurand") or ENERGY), []).append(sample)
        found_energy = _total(by_measurand.get(ENERGY, []), _ENERGY_TO_WH, "Wh")
        found_power = _total(by_measurand.get(POWER, []), _POWER_TO_W, "W")
        if found_energy is not None:
            energy = found_energy
        if found_power is not None:
            power = found_power
        if (found_energy is not None or found_power is not None) and "timestamp" in meter_value:
            try:
                ts = parse_ocpp_time(str(meter_value["timestamp"]))
            except ValueError:
                ts = None
    return MeterReading(energy, power, ts)


# ----------------------------------------------------------------------------- states

_AVAILABLE = frozenset({"Available", "Preparing", "Finishing", "Reserved"})
_CHARGING = frozenset({"Charging", "SuspendedEV", "SuspendedEVSE"})


def connector_state(status: str, *, session_running: bool) -> CPState | None:
    """The CP state of a StatusNotification's status (SPEC §8), or None for a status
    OCPP does not define.

    Available, Preparing, Finishing, Reserved → ACTIVATED; Charging, SuspendedEV,
    SuspendedEVSE → SUPPLYING of the running session (ACTIVATED while the gateway knows
    none: no CP supplies without a session); Occupied (2.0.1) → SUPPLYING while a session
    runs, else ACTIVATED; Unavailable → STOPPED; Faulted → FAULT.
    """
    if status in _AVAILABLE:
        return CPState.ACTIVATED
    if status in _CHARGING or status == "Occupied":
        return CPState.SUPPLYING if session_running else CPState.ACTIVATED
    if status == "Unavailable":
        return CPState.STOPPED
    if status == "Faulted":
        return CPState.FAULT
    return None


_FAILED_REASONS = frozenset({"EmergencyStop", "PowerLoss", "Reboot", "HardReset", "SoftReset",
                             "Other"})


def stop_result(reason: str | None, *, stopped_by_operator: bool) -> SessionResult:
    """How a StopTransaction (or TransactionEvent Ended) ends its session: FAILED for
    EmergencyStop, PowerLoss, Reboot, HardReset, SoftReset and Other; else STOPPED when
    Central's STOP_CP ended it, else COMPLETED (1.6's default reason, Local, included)."""
    if reason in _FAILED_REASONS:
        return SessionResult.FAILED
    if stopped_by_operator:
        return SessionResult.STOPPED
    return SessionResult.COMPLETED


# ----------------------------------------------------------------------------- errors

_PROPERTY = frozenset({"enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                       "pattern", "format", "multipleOf", "const"})
_TYPE = frozenset({"type", "maxLength", "minLength"})
_OCCURRENCE = frozenset({"required", "minItems", "maxItems", "uniqueItems",
                         "minProperties", "maxProperties", "dependencies"})


def schema_error_code(validator: str, path: Iterable[object], version: str) -> str:
    """The OCPP-J CALLERROR code of a payload that breaks its schema, as each version of
    the protocol spells it.

    `validator` is the JSON-schema keyword that failed (jsonschema's
    ``ValidationError.validator``) and `path` where in the payload. A payload that is not
    an object at all, or has a field the schema does not allow, breaks the structure
    (1.6 ``FormationViolation``, 2.0.1 ``FormatViolation``); a missing field or too many
    items breaks an occurrence constraint (1.6 ``OccurenceConstraintViolation``, 2.0.1
    ``OccurrenceConstraintViolation``); a wrong type or a string too long a type
    constraint; a value outside its enumeration or bounds a property constraint.
    """
    v16 = version == "1.6"
    root = not list(path)
    if validator in _OCCURRENCE:
        return "OccurenceConstraintViolation" if v16 else "OccurrenceConstraintViolation"
    if validator in _TYPE and not (root and validator == "type"):
        return "TypeConstraintViolation"
    if validator in _PROPERTY:
        return "PropertyConstraintViolation"
    return "FormationViolation" if v16 else "FormatViolation"
