"""The messages of SPEC §2 and the HTTP bodies of SPEC §5, one Pydantic model each.

Messages are UTF-8 JSON. Unknown fields are ignored; a missing or ill-typed required field
makes a message invalid (:class:`pydantic.ValidationError`). Timestamps are timezone-aware
UTC and are written with a ``Z`` suffix.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Self, TypeVar, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    ValidationError,
    model_validator,
)

from evcharging.common.states import CPEvent, CPState, SessionResult

__all__ = [
    "ID_PATTERN",
    "REASON_MAX",
    "CPFaultReport",
    "CPRegistration",
    "CPState",
    "CPStatus",
    "CPTelemetry",
    "CarSpec",
    "CentralCommand",
    "CommandPayload",
    "CommandType",
    "DriverRequest",
    "DriverStatus",
    "DriverUpdate",
    "FaultEventType",
    "FleetMonitorEntry",
    "FleetMonitorReport",
    "FleetRegistration",
    "Identifier",
    "Message",
    "MonitorReport",
    "SessionEnd",
    "SessionResult",
    "SessionStatus",
    "StatusEvent",
    "ValidationError",
    "clip_reason",
    "decode",
    "dump",
    "encode",
    "format_ts",
    "format_ts_opt",
    "new_id",
    "utcnow",
]

ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
"""A CP, driver, session or request id: 1-64 of letters, digits, '.', '_' and '-'."""

REASON_MAX = 500
"""The longest ``reason`` any message, HTTP body or TCP request may carry."""

Reason = Annotated[str, StringConstraints(max_length=REASON_MAX)]


def clip_reason(text: str) -> str:
    """`text` cut to :data:`REASON_MAX` characters (with an ellipsis when cut)."""
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 1] + "…"


def _require_utc(value: datetime) -> datetime:
    offset = value.utcoffset()
    if offset is None:
        raise ValueError("timestamp must carry a timezone (Z or +00:00)")
    if offset != timedelta(0):
        raise ValueError("timestamp must be UTC (Z or +00:00)")
    return value.astimezone(UTC)


_SECONDS: dict[tuple[int, int, int, int, int, int], str] = {}
"""``YYYY-MM-DDTHH:MM:SS`` of the seconds :func:`format_ts` wrote lately (every message,
row and answer carries timestamps: most of them fall in a few recent seconds)."""
_SECONDS_KEPT = 4096


def format_ts(value: datetime) -> str:
    """The one text form of a timestamp: ISO 8601 UTC with a ``Z`` suffix (microseconds
    always written, so that text order is time order)."""
    if value.tzinfo is UTC:  # the usual case: only the microseconds are formatted anew
        key = (value.year, value.month, value.day, value.hour, value.minute, value.second)
        second = _SECONDS.get(key)
        if second is None:
            if len(_SECONDS) >= _SECONDS_KEPT:
                _SECONDS.clear()
            second = _SECONDS[key] = value.replace(microsecond=0, tzinfo=None).isoformat()
        return f"{second}.{value.microsecond:06d}Z"
    if value.utcoffset() is None:
        raise ValueError(f"timestamp must be timezone-aware (UTC), got naive {value!r}")
    return value.astimezone(UTC).isoformat(timespec="microseconds").removesuffix("+00:00") + "Z"


def format_ts_opt(value: datetime | None) -> str | None:
    return None if value is None else format_ts(value)


UtcDatetime = Annotated[
    datetime,
    AfterValidator(_require_utc),
    PlainSerializer(format_ts, return_type=str, when_used="json"),
]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A fresh request or session id."""
    return uuid.uuid4().hex


class DriverStatus(StrEnum):
    ACCEPTED = "ACCEPTED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    DENIED = "DENIED"
    FAILED = "FAILED"

    @property
    def is_final(self) -> bool:
        return self in (DriverStatus.COMPLETED, DriverStatus.DENIED, DriverStatus.FAILED)


class SessionStatus(StrEnum):
    """A session row's status: ACTIVE while it runs, then how it ended."""

    ACTIVE = "ACTIVE"
    COMPLETED = "COMPLETED"
    STOPPED = "STOPPED"
    FAILED = "FAILED"

    @property
    def is_final(self) -> bool:
        return self is not SessionStatus.ACTIVE


class FaultEventType(StrEnum):
    """What a ``fault_events`` row records."""

    FAULT = "FAULT"
    RECOVERY = "RECOVERY"
    MONITOR_LOST = "MONITOR_LOST"
    MONITOR_BACK = "MONITOR_BACK"


class CommandType(StrEnum):
    START_SUPPLY = "START_SUPPLY"
    STOP_SUPPLY = "STOP_SUPPLY"
    STOP_CP = "STOP_CP"
    RESUME_CP = "RESUME_CP"
    SHUTDOWN = "SHUTDOWN"
    SET_LIMIT = "SET_LIMIT"


class Message(BaseModel):
    """Base of every wire message: strict types, unknown fields ignored, immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
KwhWanted = Annotated[float, Field(gt=0, le=10_000, allow_inf_nan=False)]


class CarSpec(Message):
    """The car of a request (SPEC §10): battery (kWh), state of charge at arrival (0–1) and
    the most it takes (kW). Its acceptance curve is :mod:`evcharging.common.car`'s."""

    battery_kwh: Annotated[float, Field(gt=0, le=1_000, allow_inf_nan=False)]
    soc: Fraction
    max_kw: Annotated[float, Field(gt=0, le=1_000, allow_inf_nan=False)]


class DriverRequest(Message):
    """driver.requests, keyed by cp_id: a driver asks to charge at a CP.

    ``kwh_wanted``, ``departure`` and ``car`` are optional (SPEC §10); Central passes them to
    the CP with START_SUPPLY and uses them to share a limited site's power."""

    request_id: Identifier
    driver_id: Identifier
    cp_id: Identifier
    ts: UtcDatetime = Field(default_factory=utcnow)
    kwh_wanted: KwhWanted | None = None
    departure: UtcDatetime | None = None
    car: CarSpec | None = None


class DriverUpdate(Message):
    """driver.updates, keyed by driver_id: what happened to a driver's request."""

    request_id: Identifier
    driver_id: Identifier
    cp_id: Identifier
    status: DriverStatus
    reason: Reason | None = None
    session_id: Identifier | None = None
    kw: NonNegative | None = None
    euros: NonNegative | None = None
    kwh: NonNegative | None = None
    ts: UtcDatetime | None = Field(default_factory=utcnow)


class CommandPayload(Message):
    """What a command carries: the session of START_SUPPLY (with the car fields of SPEC §10
    when the driver gave them), the limit ``kw`` of SET_LIMIT (None: no limit) or a reason."""

    driver_id: Identifier | None = None
    session_id: Identifier | None = None
    reason: Reason | None = None
    kw: NonNegative | None = None
    kwh_wanted: KwhWanted | None = None
    departure: UtcDatetime | None = None
    car: CarSpec | None = None


class CentralCommand(Message):
    """central.commands, keyed by cp_id: Central tells one CP what to do."""

    cp_id: Identifier
    cmd: CommandType
    payload: CommandPayload = Field(default_factory=CommandPayload)
    ts: UtcDatetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _start_needs_session(self) -> Self:
        if self.cmd is CommandType.START_SUPPLY and not (
            self.payload.driver_id and self.payload.session_id
        ):
            raise ValueError("START_SUPPLY needs payload.driver_id and payload.session_id")
        if self.cmd is CommandType.SET_LIMIT and not self.payload.session_id:
            raise ValueError("SET_LIMIT needs payload.session_id")
        return self


class StatusEvent(StrEnum):
    """What produced a ``cp.status`` message (SPEC §2 ``event``).

    A state-machine event of SPEC §3 (the CP changed state through it), ``HEARTBEAT`` (a
    periodic re-announcement of the current state) or ``REFUSED`` (a command was refused;
    ``cmd`` names it and the state is unchanged).
    """

    CONNECT = "CONNECT"
    DISCONNECT = "DISCONNECT"
    START_SUPPLY = "START_SUPPLY"
    STOP_SUPPLY = "STOP_SUPPLY"
    SESSION_COMPLETE = "SESSION_COMPLETE"
    STOP_CP = "STOP_CP"
    RESUME_CP = "RESUME_CP"
    FAULT = "FAULT"
    RECOVER = "RECOVER"
    HEARTBEAT = "HEARTBEAT"
    REFUSED = "REFUSED"

    @classmethod
    def of(cls, event: CPEvent) -> StatusEvent:
        return cls(event.value)

    @property
    def transition(self) -> CPEvent | None:
        """The state-machine event, or None for HEARTBEAT and REFUSED."""
        return None if self in (StatusEvent.HEARTBEAT, StatusEvent.REFUSED) else CPEvent(self)


class SessionEnd(Message):
    """How a CP's last session ended, by its own meter: id, result and final totals.

    A CP repeats it in every heartbeat until its next session ends, so that Central
    recovers an end-of-session status it missed (SPEC §4, the ledger).
    """

    session_id: Identifier
    result: SessionResult
    kwh: NonNegative
    euros: NonNegative

    def same_as(self, other: SessionEnd | None) -> bool:
        """Whether `other` reports this very end: the same session, result and totals
        (what ``==`` says of two ends, in a few comparisons: a heartbeat repeats its CP's
        last end every few seconds)."""
        return other is self or (
            other is not None and other.session_id == self.session_id
            and other.result == self.result and other.kwh == self.kwh
            and other.euros == self.euros
        )


class CPStatus(Message):
    """cp.status, keyed by cp_id: a CP's state, and its totals when a session ends.

    ``event`` says what produced it; a status without one (an older engine) is followed
    by its ``state``, as a heartbeat is. ``cmd`` names the refused command of a REFUSED.
    ``reason`` is text for people only: no program decides on it.
    """

    cp_id: Identifier
    state: CPState
    event: StatusEvent | None = None
    cmd: CommandType | None = None
    reason: Reason | None = None
    session_id: Identifier | None = None
    driver_id: Identifier | None = None
    kwh: NonNegative | None = None
    euros: NonNegative | None = None
    session_result: SessionResult | None = None
    last_session: SessionEnd | None = None
    ts: UtcDatetime = Field(default_factory=utcnow)

    def session_end(self) -> SessionEnd | None:
        """The end of a session this status reports: its own (``session_result``) or the
        last one a heartbeat repeats (``last_session``)."""
        if self.session_result is not None and self.session_id is not None:
            return SessionEnd(
                session_id=self.session_id, result=self.session_result,
                kwh=self.kwh or 0.0, euros=self.euros or 0.0,
            )
        return self.last_session


class CPTelemetry(Message):
    """cp.telemetry, keyed by cp_id: power and running totals of a session."""

    cp_id: Identifier
    kw: NonNegative
    kwh: NonNegative
    euros: NonNegative
    driver_id: Identifier | None = None
    session_id: Identifier | None = None
    soc: Fraction | None = None
    """The car's state of charge (SPEC §10); None without a car."""
    ts: UtcDatetime = Field(default_factory=utcnow)


class HttpBody(BaseModel):
    """Base of HTTP bodies: lax JSON types are fine, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class CPRegistration(HttpBody):
    """POST /cp/register: a monitor (or operator) registers or updates a CP."""

    cp_id: Identifier
    location: Reason | None = None
    site: Annotated[str, StringConstraints(max_length=64)] | None = None
    kw_rate: NonNegative | None = None
    euro_rate: NonNegative | None = None
    health_url: Annotated[str, StringConstraints(max_length=300)] | None = None
    protocol: Annotated[str, StringConstraints(max_length=20)] | None = None
    """How the CP speaks to the network: ``ocpp1.6`` or ``ocpp2.0.1`` through the OCPP
    gateway (SPEC §8); None for the project's own engines."""
    vendor: Annotated[str, StringConstraints(max_length=64)] | None = None
    model: Annotated[str, StringConstraints(max_length=64)] | None = None


class MonitorReport(HttpBody):
    """POST /cp/{cp_id}/monitor: a monitor is alive (sent every health interval)."""

    interval: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]
    healthy: bool = True


class FleetRegistration(HttpBody):
    """POST /fleet/register: a fleet registers (or updates) many CPs in one call."""

    cps: Annotated[list[CPRegistration], Field(min_length=1, max_length=20_000)]


class FleetMonitorEntry(HttpBody):
    cp_id: Identifier
    healthy: bool = True


class FleetMonitorReport(HttpBody):
    """POST /fleet/monitor: a fleet's monitoring says, for many CPs at once, that it is
    alive (sent every health interval instead of one POST /cp/{cp_id}/monitor each)."""

    interval: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]
    cps: Annotated[list[FleetMonitorEntry], Field(min_length=1, max_length=20_000)]


class CPFaultReport(HttpBody):
    """POST /cp/fault: a monitor reports a fault (is_faulty) or a recovery (not is_faulty)."""

    cp_id: Identifier
    is_faulty: bool
    reason: Reason = ""


M = TypeVar("M", bound=BaseModel)


def encode(message: BaseModel) -> bytes:
    """The UTF-8 JSON bytes of a message."""
    return message.model_dump_json().encode()


def decode(model: type[M], data: bytes | str) -> M:
    """Parse and validate one message; raises pydantic.ValidationError when invalid.
    (The model's validator itself, as ``model_validate_json`` calls it, without that
    method's Python wrapper: Central decodes every message it reads.)"""
    return cast(M, model.__pydantic_validator__.validate_json(data))


def dump(message: BaseModel) -> dict[str, Any]:
    """A JSON-ready dict of a message (timestamps as strings)."""
    return message.model_dump(mode="json")
