"""EV Central's persistence (SPEC §7): SQLite through aiosqlite, never blocking the loop.

Every statement runs on aiosqlite's single connection thread; the event loop only awaits.
The database is opened in WAL mode (``synchronous=NORMAL``, ``foreign_keys=ON``, a busy
timeout) and its schema is created idempotently at open by numbered migrations recorded in
``schema_version``.

Each public method is one transaction, committed before it returns. aiosqlite runs one
statement at a time, but a transaction spans several awaits (BEGIN, statements, COMMIT),
so an :class:`asyncio.Lock` keeps another task's statements out of an open transaction and
keeps readers from seeing another task's uncommitted rows. That makes the repository safe
to share between any number of tasks.

Timestamps are stored as ISO 8601 UTC text of fixed width with a ``Z`` suffix
(``2024-05-01T12:00:00.000000Z``), so that text order is time order. Naive datetimes are
refused with :class:`ValueError`.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import aiosqlite
from loguru import logger

from evcharging.apps.ev_central.errors import Unavailable
from evcharging.common.bus import TransientError
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
    "Repository",
    "SessionRecord",
    "SqliteRepository",
    "StorageError",
]

SESSION_ACTIVE = SessionStatus.ACTIVE.value
"""The status of a session that is still charging; every other status is final."""

SESSION_STATUSES = frozenset(status.value for status in SessionStatus)
"""ACTIVE, COMPLETED, STOPPED and FAILED."""

MAX_LIMIT = 1000
"""Every ``limit`` is clamped to 1..MAX_LIMIT."""

DEFAULT_BUSY_TIMEOUT_MS = 5000

Clock = Callable[[], datetime]


class StorageError(TransientError, Unavailable):
    """The database could not be used now (locked, disk full, gone): try again later.

    A Kafka handler that meets it is retried with its offset uncommitted; the HTTP API
    answers 503.
    """


# --------------------------------------------------------------------------- timestamps


def _utcnow() -> datetime:
    return datetime.now(UTC)


_ts_text = format_ts


def _ts_opt_text(value: datetime | None) -> str | None:
    return None if value is None else _ts_text(value)


def _ts_parse(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _ts_opt_parse(text: str | None) -> datetime | None:
    return None if text is None else _ts_parse(text)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return _ts_text(value)
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

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
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
)
"""Migration N is ``_MIGRATIONS[N - 1]``; append new ones, never edit an applied one."""

SCHEMA_VERSION = len(_MIGRATIONS)

# The SQL below is built from these constant column lists only (hence the S608 noqa);
# every value is a bound parameter.
_CP_COLUMNS = (
    "cp_id, state, location, kw_rate, euro_rate, health_url, is_faulty, fault_reason,"
    " registered_at, updated_at, state_reason, breaker_state, breaker_failures, breaker_reason"
)
_SESSION_COLUMNS = (
    "session_id, request_id, cp_id, driver_id, status, start_time, end_time, kwh, euros, reason,"
    " meter_final"
)
_HEALTH_COLUMNS = "id, cp_id, state, is_faulty, circuit_breaker_state, session_id, timestamp"

_SQL_UPSERT_CP = """
    INSERT INTO cp_registry (cp_id, state, location, kw_rate, euro_rate, health_url, is_faulty,
                             fault_reason, registered_at, updated_at, state_reason,
                             breaker_state, breaker_failures, breaker_reason)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (cp_id) DO UPDATE SET
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
_SQL_LOAD_CPS = f"SELECT {_CP_COLUMNS} FROM cp_registry ORDER BY cp_id"  # noqa: S608
_SQL_LOG_REQUEST = (
    "INSERT OR IGNORE INTO request_log"
    " (request_id, driver_id, cp_id, decision, reason, timestamp) VALUES (?, ?, ?, ?, ?, ?)"
)


class _Duplicate(Exception):
    """Raised inside a transaction to roll it back when a row turns out to exist."""


_SQL_START_SESSION = """
    INSERT INTO charging_sessions (session_id, request_id, cp_id, driver_id, status, start_time,
                                   end_time, kwh, euros, reason)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT DO NOTHING
"""
_SQL_FINISH_SESSION = """
    UPDATE charging_sessions
    SET status = ?, end_time = ?, kwh = ?, euros = ?, reason = ?, meter_final = ?
    WHERE session_id = ? AND status = 'ACTIVE'
"""
_SQL_CORRECT_TOTALS = """
    UPDATE charging_sessions SET kwh = ?, euros = ?, meter_final = MAX(meter_final, ?)
    WHERE session_id = ? AND status != 'ACTIVE'
"""
_SQL_SELECT_SESSIONS = f"SELECT {_SESSION_COLUMNS} FROM charging_sessions"  # noqa: S608
_SQL_INSERT_FAULT = (
    "INSERT INTO fault_events (cp_id, event_type, reason, timestamp) VALUES (?, ?, ?, ?)"
)
_SQL_INSERT_HEALTH = (
    "INSERT INTO cp_health_history"
    " (cp_id, state, is_faulty, circuit_breaker_state, session_id, timestamp)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_SQL_CP_HISTORY = f"""
    SELECT {_HEALTH_COLUMNS} FROM cp_health_history WHERE cp_id = ?
    ORDER BY timestamp DESC, id DESC LIMIT ?
"""  # noqa: S608


# ---------------------------------------------------------------------- row conversions


def _clamp(limit: int) -> int:
    return max(1, min(MAX_LIMIT, int(limit)))


def _amount(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _cp_from_row(row: sqlite3.Row) -> CPRecord:
    return CPRecord(
        cp_id=row["cp_id"],
        state=CPState(row["state"]),
        location=row["location"],
        kw_rate=row["kw_rate"],
        euro_rate=row["euro_rate"],
        health_url=row["health_url"],
        is_faulty=bool(row["is_faulty"]),
        fault_reason=row["fault_reason"],
        registered_at=_ts_opt_parse(row["registered_at"]),
        updated_at=_ts_opt_parse(row["updated_at"]),
        state_reason=row["state_reason"],
        breaker_state=BreakerState(row["breaker_state"]),
        breaker_failures=int(row["breaker_failures"]),
        breaker_reason=row["breaker_reason"],
    )


def _session_from_row(row: sqlite3.Row) -> SessionRecord:
    return SessionRecord(
        session_id=row["session_id"],
        request_id=row["request_id"],
        cp_id=row["cp_id"],
        driver_id=row["driver_id"],
        status=row["status"],
        started_at=_ts_parse(row["start_time"]),
        ended_at=_ts_opt_parse(row["end_time"]),
        kwh=row["kwh"],
        euros=row["euros"],
        reason=row["reason"],
        meter_final=bool(row["meter_final"]),
    )


def _fault_from_row(row: sqlite3.Row) -> FaultEvent:
    return FaultEvent(
        id=row["id"],
        cp_id=row["cp_id"],
        event_type=row["event_type"],
        reason=row["reason"],
        ts=_ts_parse(row["timestamp"]),
    )


def _health_from_row(row: sqlite3.Row) -> HealthSnapshot:
    return HealthSnapshot(
        cp_id=row["cp_id"],
        state=CPState(row["state"]),
        is_faulty=bool(row["is_faulty"]),
        breaker_state=row["circuit_breaker_state"],
        ts=_ts_parse(row["timestamp"]),
        session_id=row["session_id"],
        id=row["id"],
    )


def _health_params(snapshot: HealthSnapshot) -> tuple[Any, ...]:
    return (
        snapshot.cp_id,
        CPState(snapshot.state).value,
        int(bool(snapshot.is_faulty)),
        str(snapshot.breaker_state),
        snapshot.session_id,
        _ts_text(snapshot.ts),
    )


# ------------------------------------------------------------------------------- port


class Repository(Protocol):
    """What Central needs from its database; :class:`SqliteRepository` is the adapter."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> Self: ...
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
    async def ping(self) -> bool: ...
    async def upsert_cp(self, cp: CPRecord) -> None: ...
    async def load_cps(self) -> list[CPRecord]: ...
    async def start_session(self, session: SessionRecord) -> bool: ...
    async def finish_session(
        self,
        session_id: str,
        status: str,
        *,
        kwh: float,
        euros: float,
        reason: str | None,
        ended_at: datetime,
        meter_final: bool = False,
    ) -> bool: ...
    async def correct_totals(
        self, session_id: str, *, kwh: float, euros: float, meter_final: bool
    ) -> bool: ...
    async def get_session(self, session_id: str) -> SessionRecord | None: ...
    async def get_session_by_request(self, request_id: str) -> SessionRecord | None: ...
    async def active_sessions(self) -> list[SessionRecord]: ...
    async def recent_request_ids(self, since: datetime) -> list[str]: ...
    async def record_request(
        self, request_id: str, driver_id: str, cp_id: str, decision: str, reason: str | None,
        ts: datetime,
    ) -> bool: ...
    async def list_sessions(
        self,
        *,
        limit: int = 50,
        cp_id: str | None = None,
        driver_id: str | None = None,
        status: str | None = None,
    ) -> list[SessionRecord]: ...
    async def record_fault_event(
        self, cp_id: str, event_type: str, reason: str | None, ts: datetime
    ) -> None: ...
    async def list_faults(
        self, *, limit: int = 50, cp_id: str | None = None
    ) -> list[FaultEvent]: ...
    async def record_health(
        self,
        cp_id: str,
        state: CPState,
        is_faulty: bool,
        breaker_state: BreakerState | str,
        ts: datetime,
        *,
        session_id: str | None = None,
    ) -> None: ...
    async def record_health_many(self, rows: Sequence[HealthSnapshot]) -> None: ...
    async def cp_history(self, cp_id: str, *, limit: int = 50) -> list[HealthSnapshot]: ...


# ----------------------------------------------------------------------------- adapter


class SqliteRepository:
    """The SQLite adapter of :class:`Repository`; an async context manager.

    ``path`` may be ``":memory:"`` (then the journal mode stays ``memory``, not WAL).
    ``clock`` gives the time for ``registered_at``/``updated_at`` the caller leaves unset.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        clock: Clock = _utcnow,
    ) -> None:
        if busy_timeout_ms < 0:
            raise ValueError("busy_timeout_ms must be >= 0")
        self._path = path
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._clock = clock
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self.write_error: str | None = None
        """Why the last transaction failed, until one succeeds again (None: fine)."""

    @property
    def path(self) -> Path | str:
        return self._path

    @property
    def is_open(self) -> bool:
        return self._db is not None

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Connect, set the pragmas and bring the schema up to date. Idempotent."""
        async with self._lock:
            if self._db is not None:
                return
            if self._path != ":memory:":
                await asyncio.to_thread(_make_parent_dir, Path(self._path))
            db = await aiosqlite.connect(self._path, isolation_level=None)
            try:
                db.row_factory = sqlite3.Row
                await self._configure(db)
                await _migrate(db, self._clock())
            except BaseException:
                await db.close()
                raise
            self._db = db
        logger.info("database {} open (schema version {})", self._path, SCHEMA_VERSION)

    async def _configure(self, db: aiosqlite.Connection) -> None:
        # busy_timeout first: switching to WAL needs a lock another process may hold.
        await db.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms:d}")
        rows = list(await db.execute_fetchall("PRAGMA journal_mode=WAL"))
        mode = str(rows[0][0]).lower() if rows else "unknown"
        if mode not in ("wal", "memory"):  # ":memory:" databases stay in "memory" mode
            logger.warning("database {} is in journal mode {!r}, not WAL", self._path, mode)
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA foreign_keys=ON")

    async def close(self) -> None:
        """Wait for the running transaction, then close. Safe to call twice."""
        async with self._lock:
            db, self._db = self._db, None
            if db is not None:
                await db.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def ping(self) -> bool:
        """Whether the database is usable: it answers ``SELECT 1`` and the last write
        did not fail (in WAL mode a reader is not stopped by another process's lock)."""
        if self.write_error is not None:
            return False
        try:
            rows = await self._fetchall("SELECT 1", ())
        except (sqlite3.Error, StorageError, ValueError, RuntimeError):
            return False
        return len(rows) == 1 and rows[0][0] == 1

    # ---------------------------------------------------------------- CP registry

    async def upsert_cp(self, cp: CPRecord) -> None:
        """Insert the CP, or update every field of it but ``registered_at``."""
        now = self._clock()
        params = (
            cp.cp_id,
            CPState(cp.state).value,
            cp.location,
            cp.kw_rate,
            cp.euro_rate,
            cp.health_url,
            int(bool(cp.is_faulty)),
            cp.fault_reason,
            _ts_text(now if cp.registered_at is None else cp.registered_at),
            _ts_text(now if cp.updated_at is None else cp.updated_at),
            cp.state_reason,
            BreakerState(cp.breaker_state).value,
            int(cp.breaker_failures),
            cp.breaker_reason,
        )
        async with self._transaction() as db:
            await db.execute(_SQL_UPSERT_CP, params)

    async def load_cps(self) -> list[CPRecord]:
        """Every registered CP, by cp_id."""
        return [_cp_from_row(row) for row in await self._fetchall(_SQL_LOAD_CPS, ())]

    # ------------------------------------------------------------------- sessions

    async def start_session(self, session: SessionRecord) -> bool:
        """Insert a session and log its request as ACCEPTED, in one transaction; False,
        with nothing written, if its session_id is stored or its request was decided."""
        if session.status not in SESSION_STATUSES:
            raise ValueError(f"unknown session status {session.status!r}")
        params = (
            session.session_id,
            session.request_id,
            session.cp_id,
            session.driver_id,
            str(session.status),
            _ts_text(session.started_at),
            _ts_opt_text(session.ended_at),
            _amount("kwh", session.kwh),
            _amount("euros", session.euros),
            session.reason,
        )
        logged = (session.request_id, session.driver_id, session.cp_id, "ACCEPTED", None,
                  _ts_text(session.started_at))
        try:
            async with self._transaction() as db:
                if (await db.execute(_SQL_LOG_REQUEST, logged)).rowcount != 1:
                    return False
                if (await db.execute(_SQL_START_SESSION, params)).rowcount != 1:
                    raise _Duplicate  # roll the request's log entry back too
        except _Duplicate:
            return False
        return True

    async def finish_session(
        self,
        session_id: str,
        status: str,
        *,
        kwh: float,
        euros: float,
        reason: str | None,
        ended_at: datetime,
        meter_final: bool = False,
    ) -> bool:
        """End an ACTIVE session with a final status; whether a row changed."""
        if status == SESSION_ACTIVE or status not in SESSION_STATUSES:
            raise ValueError(f"{status!r} is not a final session status")
        params = (
            str(status),
            _ts_text(ended_at),
            _amount("kwh", kwh),
            _amount("euros", euros),
            reason,
            int(meter_final),
            session_id,
        )
        async with self._transaction() as db:
            cursor = await db.execute(_SQL_FINISH_SESSION, params)
            return cursor.rowcount == 1

    async def correct_totals(
        self, session_id: str, *, kwh: float, euros: float, meter_final: bool
    ) -> bool:
        """Set an ended session's totals to a later meter report; whether a row changed."""
        params = (_amount("kwh", kwh), _amount("euros", euros), int(meter_final), session_id)
        async with self._transaction() as db:
            cursor = await db.execute(_SQL_CORRECT_TOTALS, params)
            return cursor.rowcount == 1

    async def get_session(self, session_id: str) -> SessionRecord | None:
        rows = await self._fetchall(f"{_SQL_SELECT_SESSIONS} WHERE session_id = ?", (session_id,))
        return _session_from_row(rows[0]) if rows else None

    async def get_session_by_request(self, request_id: str) -> SessionRecord | None:
        rows = await self._fetchall(f"{_SQL_SELECT_SESSIONS} WHERE request_id = ?", (request_id,))
        return _session_from_row(rows[0]) if rows else None

    async def active_sessions(self) -> list[SessionRecord]:
        """Every ACTIVE session, oldest first."""
        rows = await self._fetchall(
            f"{_SQL_SELECT_SESSIONS} WHERE status = ? ORDER BY start_time, rowid",
            (SESSION_ACTIVE,),
        )
        return [_session_from_row(row) for row in rows]

    async def recent_request_ids(self, since: datetime) -> list[str]:
        """The ids of the requests decided at `since` or later, oldest first."""
        rows = await self._fetchall(
            "SELECT request_id FROM request_log WHERE timestamp >= ? "
            "ORDER BY timestamp, rowid",
            (_ts_text(since),),
        )
        return [str(row[0]) for row in rows]

    async def record_request(
        self, request_id: str, driver_id: str, cp_id: str, decision: str, reason: str | None,
        ts: datetime,
    ) -> bool:
        """Log the decision on a request; False (nothing written) if it was decided before."""
        params = (request_id, driver_id, cp_id, decision, reason, _ts_text(ts))
        async with self._transaction() as db:
            cursor = await db.execute(_SQL_LOG_REQUEST, params)
            return cursor.rowcount == 1

    async def list_sessions(
        self,
        *,
        limit: int = 50,
        cp_id: str | None = None,
        driver_id: str | None = None,
        status: str | None = None,
    ) -> list[SessionRecord]:
        """Sessions newest first, optionally filtered; at most `limit` (1..1000)."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("cp_id", cp_id), ("driver_id", driver_id), ("status", status)):
            if value is not None:
                clauses.append(f"{column} = ?")  # column names are the literals above
                params.append(str(value))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"{_SQL_SELECT_SESSIONS}{where} ORDER BY start_time DESC, rowid DESC LIMIT ?"
        params.append(_clamp(limit))
        return [_session_from_row(row) for row in await self._fetchall(sql, params)]

    # --------------------------------------------------------------- fault events

    async def record_fault_event(
        self, cp_id: str, event_type: str, reason: str | None, ts: datetime
    ) -> None:
        params = (cp_id, str(event_type), reason, _ts_text(ts))
        async with self._transaction() as db:
            await db.execute(_SQL_INSERT_FAULT, params)

    async def list_faults(self, *, limit: int = 50, cp_id: str | None = None) -> list[FaultEvent]:
        """Fault events newest first; at most `limit` (1..1000)."""
        if cp_id is None:
            sql = (
                "SELECT id, cp_id, event_type, reason, timestamp FROM fault_events"
                " ORDER BY timestamp DESC, id DESC LIMIT ?"
            )
            params: tuple[Any, ...] = (_clamp(limit),)
        else:
            sql = (
                "SELECT id, cp_id, event_type, reason, timestamp FROM fault_events"
                " WHERE cp_id = ? ORDER BY timestamp DESC, id DESC LIMIT ?"
            )
            params = (cp_id, _clamp(limit))
        return [_fault_from_row(row) for row in await self._fetchall(sql, params)]

    # ------------------------------------------------------------- health history

    async def record_health(
        self,
        cp_id: str,
        state: CPState,
        is_faulty: bool,
        breaker_state: BreakerState | str,
        ts: datetime,
        *,
        session_id: str | None = None,
    ) -> None:
        snapshot = HealthSnapshot(cp_id, state, is_faulty, str(breaker_state), ts, session_id)
        params = _health_params(snapshot)
        async with self._transaction() as db:
            await db.execute(_SQL_INSERT_HEALTH, params)

    async def record_health_many(self, rows: Sequence[HealthSnapshot]) -> None:
        """Store many snapshots in one transaction (one executemany); all or none.

        The rows are turned into parameters lazily, on the connection thread, so that a
        large batch costs the event loop nothing but a copy of the list.
        """
        batch = tuple(rows)
        if not batch:
            return
        async with self._transaction() as db:
            await db.executemany(_SQL_INSERT_HEALTH, map(_health_params, batch))

    async def cp_history(self, cp_id: str, *, limit: int = 50) -> list[HealthSnapshot]:
        """A CP's health snapshots newest first; at most `limit` (1..1000)."""
        rows = await self._fetchall(_SQL_CP_HISTORY, (cp_id, _clamp(limit)))
        return [_health_from_row(row) for row in rows]

    # ------------------------------------------------------------------ internals

    def _written(self) -> None:
        if self.write_error is not None:
            logger.info("database {} can be written again", self._path)
            self.write_error = None

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the repository is not open")
        return self._db

    async def _fetchall(self, sql: str, params: Iterable[Any]) -> list[sqlite3.Row]:
        """One read, never interleaved with another task's open transaction."""
        async with self._lock:
            try:
                return list(await self._connection().execute_fetchall(sql, params))
            except sqlite3.OperationalError as exc:
                raise StorageError(f"database {self._path}: {exc}") from exc

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception or cancellation.

        BEGIN is inside the try: if the caller is cancelled while BEGIN is queued, the
        ROLLBACK is queued after it on the same thread, so no transaction is left open.
        """
        async with self._lock:
            db = self._connection()
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.commit()
                self._written()
            except sqlite3.OperationalError as exc:  # locked, busy, disk I/O, full
                await _rollback(db)
                if self.write_error is None:
                    logger.error("database {} cannot be written: {}", self._path, exc)
                self.write_error = str(exc)
                raise StorageError(f"database {self._path}: {exc}") from exc
            except BaseException:
                await _rollback(db)
                raise


def _make_parent_dir(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)


async def _rollback(db: aiosqlite.Connection) -> None:
    try:
        await db.rollback()
    except (sqlite3.Error, ValueError):
        logger.exception("rollback failed")


async def _migrate(db: aiosqlite.Connection, now: datetime) -> None:
    """Apply the migrations this database has not seen, in one transaction."""
    try:
        await db.execute("BEGIN IMMEDIATE")
        await db.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        rows = list(
            await db.execute_fetchall("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        )
        current = int(rows[0][0])
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {current} is newer than this code ({SCHEMA_VERSION})"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version - 1]:
                await db.execute(statement)
            await db.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (version, _ts_text(now)),
            )
        await db.commit()
    except BaseException:
        await _rollback(db)
        raise
