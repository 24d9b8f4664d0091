"""EV Central's persistence (SPEC §7): SQLite through aiosqlite, never blocking the loop.

The port (a Protocol, in the domain's terms) and its SQLite adapter; the PostgreSQL
adapter is :mod:`~evcharging.apps.ev_central.pg_repository`.

Every statement runs on aiosqlite's single connection thread; the event loop only awaits.
The database is opened in WAL mode (``synchronous=NORMAL``, ``foreign_keys=ON``, a busy
timeout) and its schema is created idempotently at open by numbered migrations recorded in
``schema_version``.

Each public method is one transaction, committed before it returns. aiosqlite runs one
statement at a time, but a transaction spans several awaits (BEGIN, statements, COMMIT),
so an :class:`asyncio.Lock` keeps another task's statements out of an open transaction and
keeps readers from seeing another task's uncommitted rows. That makes the repository safe
to share between any number of tasks.

Writes are :mod:`~evcharging.apps.ev_central.writes` values; only the adapters know SQL
(SQLite's is :mod:`evcharging.apps.ev_central.sql`, which maps each write to a statement),
and :meth:`SqliteRepository.apply` runs any number of writes in one transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import aiosqlite
from loguru import logger

from evcharging.apps.ev_central import sql
from evcharging.apps.ev_central.dblock import DatabaseInUse, DatabaseLock
from evcharging.apps.ev_central.errors import Unavailable
from evcharging.apps.ev_central.reads import SqlReads
from evcharging.apps.ev_central.records import (
    MAX_LIMIT,
    SESSION_ACTIVE,
    SESSION_STATUSES,
    CentralRecord,
    Clock,
    CPRecord,
    FaultEvent,
    FaultEventType,
    HealthSnapshot,
    PendingRow,
    SessionRecord,
    ts_text,
    utcnow_,
)
from evcharging.apps.ev_central.sql import SCHEMA_VERSION
from evcharging.apps.ev_central.writes import Write
from evcharging.common.bus import TransientError

__all__ = [
    "MAX_LIMIT",
    "SCHEMA_VERSION",
    "SESSION_ACTIVE",
    "SESSION_STATUSES",
    "CPRecord",
    "CentralRecord",
    "DatabaseInUse",
    "FaultEvent",
    "FaultEventType",
    "HealthSnapshot",
    "PendingRow",
    "Repository",
    "SessionRecord",
    "SqliteRepository",
    "StorageError",
]

DEFAULT_BUSY_TIMEOUT_MS = 5000


class StorageError(TransientError, Unavailable):
    """The database could not be used now (locked, disk full, gone): try again later.

    A Kafka handler that meets it is retried with its offset uncommitted; the HTTP API
    answers 503.
    """


# ------------------------------------------------------------------------------- port


class Repository(Protocol):
    """What Central needs from its database, in the domain's terms: it applies
    :mod:`~evcharging.apps.ev_central.writes` and reads records back. The adapters are
    :class:`SqliteRepository` and
    :class:`~evcharging.apps.ev_central.pg_repository.PostgresRepository`."""

    write_error: str | None
    """Why the last transaction failed, until one succeeds again (None: fine)."""
    write_errors: int
    """Transactions that failed since the start (metrics)."""
    observe_write: Callable[[float], None] | None
    """Told the seconds of each :meth:`apply` that committed (metrics)."""

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
    async def probe(self, within: float) -> tuple[bool, bool]: ...
    async def apply(self, writes: Sequence[Write]) -> None: ...
    async def load_cps(self) -> list[CPRecord]: ...
    async def get_session(self, session_id: str) -> SessionRecord | None: ...
    async def active_sessions(self) -> list[SessionRecord]: ...
    async def recent_request_ids(self, within: timedelta) -> list[str]: ...
    async def list_sessions(
        self,
        *,
        limit: int = 50,
        cp_id: str | None = None,
        driver_id: str | None = None,
        status: str | None = None,
    ) -> list[SessionRecord]: ...
    async def list_faults(
        self, *, limit: int = 50, cp_id: str | None = None
    ) -> list[FaultEvent]: ...
    async def cp_history(self, cp_id: str, *, limit: int = 50) -> list[HealthSnapshot]: ...
    async def load_flushes(self) -> dict[str, PendingRow]: ...
    async def load_centrals(self) -> list[CentralRecord]: ...
    async def load_site_limits(self) -> dict[str, float]: ...
    async def hold_lock(self, name: str) -> bool:
        """Take the network-wide job lock `name` if it is free and keep it while this
        repository is open (SPEC §9: jobs that must run once for the network); whether it
        is held now. Idempotent: call it again to keep asking."""
        ...
    async def release_lock(self, name: str) -> None:
        """Give the lock `name` up (nothing when it is not held)."""
        ...


# ----------------------------------------------------------------------------- adapter


class SqliteRepository(SqlReads):
    """The SQLite adapter of :class:`Repository`; an async context manager.

    ``path`` may be ``":memory:"`` (then the journal mode stays ``memory``, not WAL).
    ``clock`` gives the time for ``registered_at``/``updated_at`` the caller leaves unset.
    """

    _INSERTION_ORDER = "rowid"
    _PING_ERRORS = (sqlite3.Error, StorageError, ValueError, RuntimeError)

    def __init__(
        self,
        path: Path | str,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        clock: Clock = utcnow_,
        exclusive: bool = False,
    ) -> None:
        if busy_timeout_ms < 0:
            raise ValueError("busy_timeout_ms must be >= 0")
        self._path = path
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._clock = clock
        self._file_lock = (DatabaseLock(Path(path)) if exclusive and path != ":memory:"
                           else None)
        """With `exclusive` (Central), one process per file: DatabaseInUse otherwise."""
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self.write_error: str | None = None
        """Why the last transaction failed, until one succeeds again (None: fine)."""
        self.write_errors = 0
        """Transactions that failed since the start (metrics)."""
        self.observe_write: Callable[[float], None] | None = None
        """Told the seconds of each :meth:`apply` that committed (metrics)."""

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
            if self._file_lock is not None:
                self._file_lock.acquire()
            try:
                db = await aiosqlite.connect(self._path, isolation_level=None)
            except BaseException:
                if self._file_lock is not None:
                    self._file_lock.release()
                raise
            try:
                db.row_factory = sqlite3.Row
                await self._configure(db)
                await _migrate(db, self._clock())
            except BaseException:
                await db.close()
                if self._file_lock is not None:
                    self._file_lock.release()
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
            if self._file_lock is not None:
                self._file_lock.release()

    # ---------------------------------------------------------------------- writes

    async def apply(self, writes: Sequence[Write]) -> None:
        """Run every write in one transaction: all or none (StorageError when the database
        cannot be written now)."""
        if not writes:
            return
        started = time.perf_counter()
        runs = sql.runs(writes)  # one call on the connection thread a run, not one a write
        async with self._transaction() as db:
            for kind, params in runs:
                if len(params) == 1:
                    await db.execute(sql.STATEMENTS[kind], params[0])
                else:
                    await db.executemany(sql.STATEMENTS[kind], params)
        if self.observe_write is not None:
            self.observe_write(time.perf_counter() - started)

    # ----------------------------------------------------------------------- locks

    async def hold_lock(self, name: str) -> bool:
        """Always held: one Central per SQLite file (``dblock``'s flock enforces it), so
        every network-wide job is this Central's."""
        return True

    async def release_lock(self, name: str) -> None:
        """Nothing to give up (see :meth:`hold_lock`)."""

    # ------------------------------------------------------------------ internals

    def _written(self) -> None:
        if self.write_error is not None:
            logger.info("database {} can be written again", self._path)
            self.write_error = None

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the repository is not open")
        return self._db

    async def _rows(self, query: str, *params: Any) -> list[sqlite3.Row]:
        """One read, never interleaved with another task's open transaction."""
        async with self._lock:
            try:
                return list(await self._connection().execute_fetchall(query, params))
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
                self.write_errors += 1
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
            for statement in sql.MIGRATIONS[version - 1]:
                await db.execute(statement)
            await db.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (version, ts_text(now)),
            )
        await db.commit()
    except BaseException:
        await _rollback(db)
        raise
