"""Central's records: what its database keeps, as the domain sees it (SPEC §7).

Pure: no SQL here. The adapters (:mod:`~evcharging.apps.ev_central.repository` for SQLite,
:mod:`~evcharging.apps.ev_central.pg_repository` for PostgreSQL) turn these records into
rows and back; :mod:`~evcharging.apps.ev_central.writes` names the changes to them.

Timestamps are stored as ISO 8601 UTC text of fixed width with a ``Z`` suffix
(``2024-05-01T12:00:00.000000Z``), so that text order is time order. Naive datetimes are
refused with :class:`ValueError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from evcharging.common.circuit_breaker import BreakerState
from evcharging.common.messages import FaultEventType, SessionStatus, format_ts
from evcharging.common.states import CPState

__all__ = [
    "MAX_LIMIT",
    "SESSION_ACTIVE",
    "SESSION_STATUSES",
    "CPRecord",
    "CentralRecord",
    "FaultEvent",
    "FaultEventType",
    "HealthSnapshot",
    "PendingRow",
    "SessionRecord",
]

SESSION_ACTIVE = SessionStatus.ACTIVE.value
"""The status of a session that is still charging; every other status is final."""

SESSION_STATUSES = frozenset(status.value for status in SessionStatus)
"""ACTIVE, COMPLETED, STOPPED and FAILED."""

MAX_LIMIT = 1000
"""Every ``limit`` is clamped to 1..MAX_LIMIT."""

Clock = Callable[[], datetime]


# --------------------------------------------------------------------------- timestamps


def utcnow_() -> datetime:
    return datetime.now(UTC)


ts_text = format_ts


def ts_opt_text(value: datetime | None) -> str | None:
    return None if value is None else ts_text(value)


def ts_parse(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def ts_opt_parse(text: str | None) -> datetime | None:
    return None if text is None else ts_parse(text)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return ts_text(value)
    if isinstance(value, Enum):
        return value.value
    return value


def _record_dict(record: Any) -> dict[str, Any]:
    return {f.name: _json_value(getattr(record, f.name)) for f in fields(record)}


class _AsDict:
    """``as_dict`` for the record dataclasses below."""

    def as_dict(self) -> dict[str, Any]:
        """The fields in order, JSON-ready: datetimes as ISO 8601 'Z' text, enums as values."""
        return _record_dict(self)


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class CPRecord(_AsDict):
    """A charging point as Central knows it (``cp_registry``)."""

    cp_id: str
    state: CPState = CPState.DISCONNECTED
    location: str | None = None
    kw_rate: float | None = None
    euro_rate: float | None = None
    health_url: str | None = None
    is_faulty: bool = False
    fault_reason: str | None = None
    registered_at: datetime | None = None
    """Set by the repository on first insert when None; never changed by an update."""
    updated_at: datetime | None = None
    """Set by the repository to the current time on every upsert when None."""
    state_reason: str | None = None
    breaker_state: BreakerState = BreakerState.CLOSED
    breaker_failures: int = 0
    breaker_reason: str | None = None
    site: str | None = None
    registered: bool = True
    """Registered by a monitor, the fleet or the gateway; False for a CP known only from
    the bus. An upsert never turns True back into False."""
    protocol: str | None = None
    vendor: str | None = None
    model: str | None = None
    """What an OCPP charger says of itself (BootNotification, SPEC §8)."""


@dataclass(frozen=True)
class SessionRecord(_AsDict):
    """One charging session (``charging_sessions``)."""

    session_id: str
    request_id: str
    cp_id: str
    driver_id: str
    status: str
    """One of :data:`SESSION_STATUSES`: ACTIVE, COMPLETED, STOPPED, FAILED."""
    started_at: datetime
    ended_at: datetime | None = None
    kwh: float = 0.0
    euros: float = 0.0
    reason: str | None = None
    meter_final: bool = False
    """The CP reported this session's end: kwh and euros are its meter's final totals."""
    first_report: datetime | None = None
    """The CP's own time of its first report of the session (None: not yet reported)."""
    kwh_wanted: float | None = None
    departure: datetime | None = None
    car_battery_kwh: float | None = None
    car_soc: float | None = None
    car_max_kw: float | None = None
    """What the driver's request said of the car and the charge (SPEC §10; None: not given)."""


@dataclass(frozen=True)
class FaultEvent(_AsDict):
    """A fault or recovery of a CP (``fault_events``)."""

    id: int
    cp_id: str
    event_type: str
    reason: str | None
    ts: datetime


@dataclass(frozen=True)
class HealthSnapshot(_AsDict):
    """A CP's health at one moment (``cp_health_history``); ``id`` is set when read back."""

    cp_id: str
    state: CPState
    is_faulty: bool
    breaker_state: str
    ts: datetime
    session_id: str | None = None
    id: int | None = None



@dataclass(frozen=True)
class PendingRow:
    """An instance's last flush (``outbox_flushes``): its token (the mark its offsets
    carry in Kafka), and the consumed offsets and messages it sends, as JSON text (the
    outbox reads and writes them)."""

    instance: str
    token: str
    offsets: str
    messages: str


@dataclass(frozen=True)
class CentralRecord:
    """A Central sharing the work (SPEC §9), as it last said."""

    instance: str
    peer_url: str
    transactional_id: str
    partitions: frozenset[int]
    partition_count: int
    seen_at: datetime


# ------------------------------------------------------------------------- checks


def clamp(limit: int) -> int:
    return max(1, min(MAX_LIMIT, int(limit)))


def amount(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)

