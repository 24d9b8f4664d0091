"""Central's SQL: the schema's migrations, the statements, the records and their rows.

Over 400 lines: every statement, record and migration of one schema, pure, in one
place to read against SPEC §7.

Pure: nothing here touches a database. :mod:`evcharging.apps.ev_central.repository` runs
these statements on aiosqlite. A write is an :data:`Op` (a statement and its parameters),
so that the controller can queue the writes of many decisions and the repository can
apply them in one transaction (SPEC §4: a decision is recorded before it is announced).

Timestamps are stored as ISO 8601 UTC text of fixed width with a ``Z`` suffix
(``2024-05-01T12:00:00.000000Z``), so that text order is time order. Naive datetimes are
refused with :class:`ValueError`.
"""

from __future__ import annotations

import math
import sqlite3
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
    "SCHEMA_VERSION",
    "SESSION_ACTIVE",
    "SESSION_STATUSES",
    "CPRecord",
    "FaultEvent",
    "FaultEventType",
    "HealthSnapshot",
    "Op",
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


# ------------------------------------------------------------------------------- schema

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the seed tables and the CP registry.
    (
        """CREATE TABLE IF NOT EXISTS cp_registry (
            cp_id         TEXT PRIMARY KEY,
            state         TEXT NOT NULL,
            location      TEXT,
            kw_rate       REAL,
            euro_rate     REAL,
            health_url    TEXT,
            is_faulty     INTEGER NOT NULL DEFAULT 0 CHECK (is_faulty IN (0, 1)),
            fault_reason  TEXT,
            registered_at TEXT NOT NULL,
            updated_at    TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS charging_sessions (
            session_id TEXT PRIMARY KEY,
            request_id TEXT NOT NULL UNIQUE,
            cp_id      TEXT NOT NULL,
            driver_id  TEXT NOT NULL,
            status     TEXT NOT NULL
                       CHECK (status IN ('ACTIVE', 'COMPLETED', 'STOPPED', 'FAILED')),
            start_time TEXT NOT NULL,
            end_time   TEXT,
            kwh        REAL NOT NULL DEFAULT 0 CHECK (kwh >= 0),
            euros      REAL NOT NULL DEFAULT 0 CHECK (euros >= 0),
            reason     TEXT
        )""",
        """CREATE TABLE IF NOT EXISTS fault_events (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            cp_id      TEXT NOT NULL,
            event_type TEXT NOT NULL,
            reason     TEXT,
            timestamp  TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS cp_health_history (
            id                    INTEGER PRIMARY KEY AUTOINCREMENT,
            cp_id                 TEXT NOT NULL,
            state                 TEXT NOT NULL,
            is_faulty             INTEGER NOT NULL CHECK (is_faulty IN (0, 1)),
            circuit_breaker_state TEXT NOT NULL,
            session_id            TEXT,
            timestamp             TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS idx_fault_events_cp_ts ON fault_events (cp_id, timestamp)",
        "CREATE INDEX IF NOT EXISTS idx_cp_health_history_cp_ts"
        " ON cp_health_history (cp_id, timestamp)",
        "CREATE INDEX IF NOT EXISTS idx_charging_sessions_cp_start"
        " ON charging_sessions (cp_id, start_time)",
        "CREATE INDEX IF NOT EXISTS idx_charging_sessions_driver_start"
        " ON charging_sessions (driver_id, start_time)",
        "CREATE INDEX IF NOT EXISTS idx_charging_sessions_status ON charging_sessions (status)",
        "CREATE INDEX IF NOT EXISTS idx_charging_sessions_start ON charging_sessions (start_time)",
    ),
    # 2: every decision on a driver request, so that a request replayed after a restart
    # (its offset not yet committed) is never decided twice.
    (
        """CREATE TABLE IF NOT EXISTS request_log (
            request_id TEXT PRIMARY KEY,
            driver_id  TEXT NOT NULL,
            cp_id      TEXT NOT NULL,
            decision   TEXT NOT NULL,
            reason     TEXT,
            timestamp  TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS idx_request_log_ts ON request_log (timestamp)",
    ),
    # 3: the ledger and what a restart must not forget (SPEC §4): whether a session's
    # totals are its CP's final meter reading, the CP's state reason and its breaker.
    (
        "ALTER TABLE charging_sessions ADD COLUMN meter_final INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE cp_registry ADD COLUMN state_reason TEXT",
        "ALTER TABLE cp_registry ADD COLUMN breaker_state TEXT NOT NULL DEFAULT 'CLOSED'",
        "ALTER TABLE cp_registry ADD COLUMN breaker_failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE cp_registry ADD COLUMN breaker_reason TEXT",
    ),
    # 4: CPs grouped into sites (a fleet's --sites), and a session's start by CP and time.
    (
        "ALTER TABLE cp_registry ADD COLUMN site TEXT",
        "CREATE INDEX IF NOT EXISTS idx_cp_registry_site ON cp_registry (site)",
    ),
    # 5: whether a CP was registered (a monitor, the fleet, the gateway) or is known only
    # from the bus (SPEC §11: capped, forgotten after an hour of silence). The CPs of an
    # older database count as registered: nothing tells them apart, and forgetting a real
    # CP is worse than keeping a stray one.
    (
        "ALTER TABLE cp_registry ADD COLUMN registered INTEGER NOT NULL DEFAULT 1"
        " CHECK (registered IN (0, 1))",
    ),
    # The outbox's last flush (SPEC §4, exactly once): written in the flush's own
    # transaction, so that a restart sends again a flush that did not reach Kafka.
    (
        """CREATE TABLE IF NOT EXISTS outbox_pending (
            id       INTEGER PRIMARY KEY CHECK (id = 1),
            seq      INTEGER NOT NULL,
            offsets  TEXT NOT NULL,
            messages TEXT NOT NULL
        )""",
    ),
    # 7: the CP's own time of its first report of a session (SPEC §4): the CP's reports
    # from before it say nothing about the session, also after a restart.
    (
        "ALTER TABLE charging_sessions ADD COLUMN first_report TEXT",
    ),
    # 8: how a CP speaks to the network, and its vendor and model (OCPP chargers, §8).
    (
        "ALTER TABLE cp_registry ADD COLUMN protocol TEXT",
        "ALTER TABLE cp_registry ADD COLUMN vendor TEXT",
        "ALTER TABLE cp_registry ADD COLUMN model TEXT",
    ),
    # 9: energy (SPEC §10): what a request said of its car and charge, kept with its
    # session so that a restarted Central shares a limited site's power as before; and the
    # sites' power limits.
    (
        "ALTER TABLE charging_sessions ADD COLUMN kwh_wanted REAL",
        "ALTER TABLE charging_sessions ADD COLUMN departure TEXT",
        "ALTER TABLE charging_sessions ADD COLUMN car_battery_kwh REAL",
        "ALTER TABLE charging_sessions ADD COLUMN car_soc REAL",
        "ALTER TABLE charging_sessions ADD COLUMN car_max_kw REAL",
        """CREATE TABLE IF NOT EXISTS site_limits (
            site       TEXT PRIMARY KEY,
            kw         REAL NOT NULL CHECK (kw >= 0),
            updated_at TEXT NOT NULL
        )""",
    ),
)
"""Migration N is ``MIGRATIONS[N - 1]``; append new ones, never edit an applied one."""

SCHEMA_VERSION = len(MIGRATIONS)

# The SQL below is built from these constant column lists only (hence the S608 noqa);
# every value is a bound parameter.
_CP_COLUMNS = (
    "cp_id, state, location, kw_rate, euro_rate, health_url, is_faulty, fault_reason,"
    " registered_at, updated_at, state_reason, breaker_state, breaker_failures, breaker_reason,"
    " site, registered, protocol, vendor, model"
)
_SESSION_COLUMNS = (
    "session_id, request_id, cp_id, driver_id, status, start_time, end_time, kwh, euros, reason,"
    " meter_final, first_report, kwh_wanted, departure, car_battery_kwh, car_soc, car_max_kw"
)
_HEALTH_COLUMNS = "id, cp_id, state, is_faulty, circuit_breaker_state, session_id, timestamp"

SQL_UPSERT_CP = """
    INSERT INTO cp_registry (cp_id, state, location, kw_rate, euro_rate, health_url, is_faulty,
                             fault_reason, registered_at, updated_at, state_reason,
                             breaker_state, breaker_failures, breaker_reason, site, registered,
                             protocol, vendor, model)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (cp_id) DO UPDATE SET
        protocol = excluded.protocol,
        vendor = excluded.vendor,
        model = excluded.model,
        registered = MAX(cp_registry.registered, excluded.registered),
        site = excluded.site,
        state_reason = excluded.state_reason,
        breaker_state = excluded.breaker_state,
        breaker_failures = excluded.breaker_failures,
        breaker_reason = excluded.breaker_reason,
        state = excluded.state,
        location = excluded.location,
        kw_rate = excluded.kw_rate,
        euro_rate = excluded.euro_rate,
        health_url = excluded.health_url,
        is_faulty = excluded.is_faulty,
        fault_reason = excluded.fault_reason,
        updated_at = excluded.updated_at
"""
SQL_LOAD_CPS = f"SELECT {_CP_COLUMNS} FROM cp_registry ORDER BY cp_id"  # noqa: S608
SQL_LOG_REQUEST = (
    "INSERT OR IGNORE INTO request_log"
    " (request_id, driver_id, cp_id, decision, reason, timestamp) VALUES (?, ?, ?, ?, ?, ?)"
)


SQL_START_SESSION = """
    INSERT INTO charging_sessions (session_id, request_id, cp_id, driver_id, status, start_time,
                                   end_time, kwh, euros, reason, kwh_wanted, departure,
                                   car_battery_kwh, car_soc, car_max_kw)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT DO NOTHING
"""
SQL_FINISH_SESSION = """
    UPDATE charging_sessions
    SET status = ?, end_time = ?, kwh = ?, euros = ?, reason = ?, meter_final = ?
    WHERE session_id = ? AND status = 'ACTIVE'
"""
SQL_CORRECT_TOTALS = """
    UPDATE charging_sessions SET kwh = ?, euros = ?, meter_final = MAX(meter_final, ?)
    WHERE session_id = ? AND status != 'ACTIVE'
"""
SQL_SELECT_SESSIONS = f"SELECT {_SESSION_COLUMNS} FROM charging_sessions"  # noqa: S608
SQL_INSERT_FAULT = (
    "INSERT INTO fault_events (cp_id, event_type, reason, timestamp) VALUES (?, ?, ?, ?)"
)
SQL_INSERT_HEALTH = (
    "INSERT INTO cp_health_history"
    " (cp_id, state, is_faulty, circuit_breaker_state, session_id, timestamp)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
SQL_CP_HISTORY = f"""
    SELECT {_HEALTH_COLUMNS} FROM cp_health_history WHERE cp_id = ?
    ORDER BY timestamp DESC, id DESC LIMIT ?
"""  # noqa: S608


# ---------------------------------------------------------------------- row conversions


def clamp(limit: int) -> int:
    return max(1, min(MAX_LIMIT, int(limit)))


def amount(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def cp_from_row(row: sqlite3.Row) -> CPRecord:
    return CPRecord(
        cp_id=row["cp_id"],
        state=CPState(row["state"]),
        location=row["location"],
        kw_rate=row["kw_rate"],
        euro_rate=row["euro_rate"],
        health_url=row["health_url"],
        is_faulty=bool(row["is_faulty"]),
        fault_reason=row["fault_reason"],
        registered_at=ts_opt_parse(row["registered_at"]),
        updated_at=ts_opt_parse(row["updated_at"]),
        state_reason=row["state_reason"],
        breaker_state=BreakerState(row["breaker_state"]),
        breaker_failures=int(row["breaker_failures"]),
        breaker_reason=row["breaker_reason"],
        site=row["site"],
        registered=bool(row["registered"]),
        protocol=row["protocol"],
        vendor=row["vendor"],
        model=row["model"],
    )


def session_from_row(row: sqlite3.Row) -> SessionRecord:
    return SessionRecord(
        session_id=row["session_id"],
        request_id=row["request_id"],
        cp_id=row["cp_id"],
        driver_id=row["driver_id"],
        status=row["status"],
        started_at=ts_parse(row["start_time"]),
        ended_at=ts_opt_parse(row["end_time"]),
        kwh=row["kwh"],
        euros=row["euros"],
        reason=row["reason"],
        meter_final=bool(row["meter_final"]),
        first_report=ts_opt_parse(row["first_report"]),
        kwh_wanted=row["kwh_wanted"],
        departure=ts_opt_parse(row["departure"]),
        car_battery_kwh=row["car_battery_kwh"],
        car_soc=row["car_soc"],
        car_max_kw=row["car_max_kw"],
    )


def fault_from_row(row: sqlite3.Row) -> FaultEvent:
    return FaultEvent(
        id=row["id"],
        cp_id=row["cp_id"],
        event_type=row["event_type"],
        reason=row["reason"],
        ts=ts_parse(row["timestamp"]),
    )


def health_from_row(row: sqlite3.Row) -> HealthSnapshot:
    return HealthSnapshot(
        cp_id=row["cp_id"],
        state=CPState(row["state"]),
        is_faulty=bool(row["is_faulty"]),
        breaker_state=row["circuit_breaker_state"],
        ts=ts_parse(row["timestamp"]),
        session_id=row["session_id"],
        id=row["id"],
    )


def health_params(snapshot: HealthSnapshot) -> tuple[Any, ...]:
    return (
        snapshot.cp_id,
        CPState(snapshot.state).value,
        int(bool(snapshot.is_faulty)),
        str(snapshot.breaker_state),
        snapshot.session_id,
        ts_text(snapshot.ts),
    )




# ---------------------------------------------------------------------------- writes

Op = tuple[str, tuple[Any, ...]]
"""One write: a statement and its parameters. A list of them is one transaction."""


def upsert_cp(cp: CPRecord, now: datetime) -> Op:
    """Insert the CP, or update every field of it but ``registered_at``."""
    return SQL_UPSERT_CP, (
        cp.cp_id,
        CPState(cp.state).value,
        cp.location,
        cp.kw_rate,
        cp.euro_rate,
        cp.health_url,
        int(bool(cp.is_faulty)),
        cp.fault_reason,
        ts_text(now if cp.registered_at is None else cp.registered_at),
        ts_text(now if cp.updated_at is None else cp.updated_at),
        cp.state_reason,
        BreakerState(cp.breaker_state).value,
        int(cp.breaker_failures),
        cp.breaker_reason,
        cp.site,
        int(bool(cp.registered)),
        cp.protocol,
        cp.vendor,
        cp.model,
    )


def forget_cp(cp_id: str) -> Op:
    """Delete a CP known only from the bus (a registered CP is never deleted by it)."""
    return "DELETE FROM cp_registry WHERE cp_id = ? AND registered = 0", (cp_id,)


def log_request(
    request_id: str, driver_id: str, cp_id: str, decision: str, reason: str | None,
    ts: datetime,
) -> Op:
    """The decision on a request (ignored when the request was decided before)."""
    return SQL_LOG_REQUEST, (request_id, driver_id, cp_id, decision, reason, ts_text(ts))


def start_session(session: SessionRecord) -> Op:
    """A new session row (ignored when its session_id or request_id is stored)."""
    if session.status not in SESSION_STATUSES:
        raise ValueError(f"unknown session status {session.status!r}")
    return SQL_START_SESSION, (
        session.session_id,
        session.request_id,
        session.cp_id,
        session.driver_id,
        str(session.status),
        ts_text(session.started_at),
        ts_opt_text(session.ended_at),
        amount("kwh", session.kwh),
        amount("euros", session.euros),
        session.reason,
        session.kwh_wanted,
        ts_opt_text(session.departure),
        session.car_battery_kwh,
        session.car_soc,
        session.car_max_kw,
    )


def session_started(session_id: str, started_at: datetime, first_report: datetime) -> Op:
    """Date a running session by its CP's first report of it (SPEC §4: sessions are dated
    by their CP's times; `first_report` is that report's own time, unclamped)."""
    return ("UPDATE charging_sessions SET start_time = ?, first_report = ? WHERE "
            "session_id = ? AND status = 'ACTIVE'",
            (ts_text(started_at), ts_text(first_report), session_id))


def finish_session(
    session_id: str, status: str, *, kwh: float, euros: float, reason: str | None,
    ended_at: datetime, meter_final: bool = False,
) -> Op:
    """End an ACTIVE session with a final status (an ended one is left as it is)."""
    if status == SESSION_ACTIVE or status not in SESSION_STATUSES:
        raise ValueError(f"{status!r} is not a final session status")
    return SQL_FINISH_SESSION, (
        str(status), ts_text(ended_at), amount("kwh", kwh), amount("euros", euros), reason,
        int(meter_final), session_id,
    )


def correct_totals(session_id: str, *, kwh: float, euros: float, meter_final: bool) -> Op:
    """An ended session's totals, as a later meter report gives them."""
    return SQL_CORRECT_TOTALS, (
        amount("kwh", kwh), amount("euros", euros), int(meter_final), session_id,
    )


def completed_by_meter(session_id: str, reason: str) -> Op:
    """A session Central had closed FAILED that its CP's meter completed (SPEC §4: a CP
    that completed a session is never recorded FAILED)."""
    return ("UPDATE charging_sessions SET status = 'COMPLETED', reason = ? "
            "WHERE session_id = ? AND status = 'FAILED'", (reason, session_id))


def fault_event(cp_id: str, event_type: str, reason: str | None, ts: datetime) -> Op:
    return SQL_INSERT_FAULT, (cp_id, str(event_type), reason, ts_text(ts))


def health(snapshot: HealthSnapshot) -> Op:
    return SQL_INSERT_HEALTH, health_params(snapshot)


@dataclass(frozen=True)
class PendingRow:
    """The outbox's last flush (``outbox_pending``): its sequence number, and the consumed
    offsets and messages it sends, as JSON text (the outbox reads and writes them)."""

    seq: int
    offsets: str
    messages: str


SQL_LOAD_PENDING = "SELECT seq, offsets, messages FROM outbox_pending WHERE id = 1"


def save_pending(seq: int, offsets: str, messages: str) -> Op:
    """Replace the outbox's last flush (the table has one row)."""
    return (
        "INSERT INTO outbox_pending (id, seq, offsets, messages) VALUES (1, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, offsets = excluded.offsets,"
        " messages = excluded.messages",
        (int(seq), offsets, messages),
    )


SQL_LOAD_SITE_LIMITS = "SELECT site, kw FROM site_limits ORDER BY site"


def set_site_limit(site: str, kw: float, now: datetime) -> Op:
    """Set (or replace) a site's power limit (SPEC §10)."""
    return (
        "INSERT INTO site_limits (site, kw, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (site) DO UPDATE SET kw = excluded.kw, updated_at = excluded.updated_at",
        (site, amount("kw", kw), ts_text(now)),
    )


def delete_site_limit(site: str) -> Op:
    """Remove a site's power limit (nothing when it has none)."""
    return "DELETE FROM site_limits WHERE site = ?", (site,)


def prune_health(before: datetime) -> Op:
    """Forget health snapshots older than `before` (the history's retention)."""
    return "DELETE FROM cp_health_history WHERE timestamp < ?", (ts_text(before),)
