"""EV Central's persistence on PostgreSQL (SPEC §7, §9): the asyncpg adapter of the port.

The same schema as SQLite's (:mod:`~evcharging.apps.ev_central.sql`), migration by
migration with the same numbers, so that ``schema_version`` means the same on both; the
DDL is PostgreSQL's where the types differ (DOUBLE PRECISION, identity columns). Timestamps
are the same fixed-width ISO 8601 'Z' text as in SQLite, so that the records, the rows and
each write's parameters (:data:`~evcharging.apps.ev_central.sql.PARAMS`) are shared: only
the statements differ. SQLite's ``rowid`` (the order of insertion, which breaks ties of
equal times) is a ``seq`` identity column here.

A pool of connections: every :meth:`PostgresRepository.apply` is one transaction on one
connection, and reads run beside it on others (they see committed rows only). A round trip
to the server costs far more than SQLite's thread hop, so a transaction sends its writes as
runs of one kind (:func:`~evcharging.apps.ev_central.sql.runs`), one ``executemany`` each:
table by table, each table's writes in their order. Several
Centrals may share one database; migrations take a transaction-scoped advisory lock, so
two that start at once do not both apply them. A database that cannot be reached or
written now raises :class:`~evcharging.apps.ev_central.repository.StorageError`, and so
does one that does not answer in time (a black-holed server, a lock held elsewhere): every
statement has a command timeout and every wait for a connection of the pool an acquire
timeout (:data:`COMMAND_TIMEOUT`, :data:`ACQUIRE_TIMEOUT`), as SQLite has its busy timeout;
the outbox then retries the write with its backoff instead of hanging until TCP gives up.

Network-wide job locks (SPEC §9, :meth:`PostgresRepository.hold_lock`) are session-level
advisory locks taken with ``pg_try_advisory_lock`` on one connection kept for them, apart
from the pool: a lock lives as long as that connection, so a Central that dies or loses
it gives its locks up, and the next :meth:`~PostgresRepository.hold_lock` reconnects and
tries again. A lock's key is :func:`lock_key` of its name.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

import asyncpg
from loguru import logger

from evcharging.apps.ev_central import sql
from evcharging.apps.ev_central import writes as w
from evcharging.apps.ev_central.records import (
    SESSION_ACTIVE,
    Clock,
    CPRecord,
    FaultEvent,
    HealthSnapshot,
    PendingRow,
    SessionRecord,
    clamp,
    ts_parse,
    ts_text,
    utcnow_,
)
from evcharging.apps.ev_central.repository import StorageError
from evcharging.apps.ev_central.writes import Write

__all__ = [
    "ACQUIRE_TIMEOUT",
    "COMMAND_TIMEOUT",
    "MIGRATIONS",
    "STATEMENTS",
    "PostgresRepository",
    "lock_key",
]

COMMAND_TIMEOUT = 10.0
"""Seconds a statement may wait for its answer before it fails (StorageError). Twice
SQLite's busy timeout (5 s): a round trip over the network and row locks of the other
Centrals on the same database come on top; a healthy write takes milliseconds. A write that
fails is retried by the outbox (0.1 s doubling to 5 s), so failing sooner costs nothing."""
ACQUIRE_TIMEOUT = 10.0
"""Seconds a call may wait for a connection of the pool (all in use, or a new one to
connect: as the connect timeout) before it fails (StorageError); asyncpg gives the same
budget to handing the connection back (its reset)."""

MIGRATION_LOCK = 0x65764D4947  # "evMIG": the advisory lock the migrations take



def lock_key(name: str) -> int:
    """The advisory lock key of the job lock `name`: the first 8 bytes of the BLAKE2b
    digest of its UTF-8 text as a signed 64-bit integer (PostgreSQL's ``bigint`` key).
    Stable across processes, versions and servers (unlike ``hashtext``, which is internal
    to PostgreSQL); ``lock_key("allocation")`` is the smart-charging job's."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the seed tables and the CP registry.
    (
        """CREATE TABLE IF NOT EXISTS cp_registry (
            cp_id         TEXT PRIMARY KEY,
            state         TEXT NOT NULL,
            location      TEXT,
            kw_rate       DOUBLE PRECISION,
            euro_rate     DOUBLE PRECISION,
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
            kwh        DOUBLE PRECISION NOT NULL DEFAULT 0 CHECK (kwh >= 0),
            euros      DOUBLE PRECISION NOT NULL DEFAULT 0 CHECK (euros >= 0),
            reason     TEXT,
            seq        BIGINT GENERATED ALWAYS AS IDENTITY
        )""",
        """CREATE TABLE IF NOT EXISTS fault_events (
            id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            cp_id      TEXT NOT NULL,
            event_type TEXT NOT NULL,
            reason     TEXT,
            timestamp  TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS cp_health_history (
            id                    BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
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
    # 2: every decision on a driver request.
    (
        """CREATE TABLE IF NOT EXISTS request_log (
            request_id TEXT PRIMARY KEY,
            driver_id  TEXT NOT NULL,
            cp_id      TEXT NOT NULL,
            decision   TEXT NOT NULL,
            reason     TEXT,
            timestamp  TEXT NOT NULL,
            seq        BIGINT GENERATED ALWAYS AS IDENTITY
        )""",
        "CREATE INDEX IF NOT EXISTS idx_request_log_ts ON request_log (timestamp)",
    ),
    # 3: the ledger's meter_final, the CP's state reason and its breaker.
    (
        "ALTER TABLE charging_sessions ADD COLUMN meter_final INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE cp_registry ADD COLUMN state_reason TEXT",
        "ALTER TABLE cp_registry ADD COLUMN breaker_state TEXT NOT NULL DEFAULT 'CLOSED'",
        "ALTER TABLE cp_registry ADD COLUMN breaker_failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE cp_registry ADD COLUMN breaker_reason TEXT",
    ),
    # 4: CPs grouped into sites.
    (
        "ALTER TABLE cp_registry ADD COLUMN site TEXT",
        "CREATE INDEX IF NOT EXISTS idx_cp_registry_site ON cp_registry (site)",
    ),
    # 5: registered, or known only from the bus.
    (
        "ALTER TABLE cp_registry ADD COLUMN registered INTEGER NOT NULL DEFAULT 1"
        " CHECK (registered IN (0, 1))",
    ),
    # 6: the outbox's last flush.
    (
        """CREATE TABLE IF NOT EXISTS outbox_pending (
            id       INTEGER PRIMARY KEY CHECK (id = 1),
            seq      BIGINT NOT NULL,
            offsets  TEXT NOT NULL,
            messages TEXT NOT NULL
        )""",
    ),
    # 7: the CP's own time of its first report of a session.
    ("ALTER TABLE charging_sessions ADD COLUMN first_report TEXT",),
    # 8: how a CP speaks to the network, its vendor and model.
    (
        "ALTER TABLE cp_registry ADD COLUMN protocol TEXT",
        "ALTER TABLE cp_registry ADD COLUMN vendor TEXT",
        "ALTER TABLE cp_registry ADD COLUMN model TEXT",
    ),
    # 9: energy: a request's car and charge, and the sites' power limits.
    (
        "ALTER TABLE charging_sessions ADD COLUMN kwh_wanted DOUBLE PRECISION",
        "ALTER TABLE charging_sessions ADD COLUMN departure TEXT",
        "ALTER TABLE charging_sessions ADD COLUMN car_battery_kwh DOUBLE PRECISION",
        "ALTER TABLE charging_sessions ADD COLUMN car_soc DOUBLE PRECISION",
        "ALTER TABLE charging_sessions ADD COLUMN car_max_kw DOUBLE PRECISION",
        """CREATE TABLE IF NOT EXISTS site_limits (
            site       TEXT PRIMARY KEY,
            kw         DOUBLE PRECISION NOT NULL CHECK (kw >= 0),
            updated_at TEXT NOT NULL
        )""",
    ),
)
"""Migration N is ``MIGRATIONS[N - 1]``, the same N as SQLite's."""

assert len(MIGRATIONS) == sql.SCHEMA_VERSION, "every SQLite migration has its PostgreSQL twin"

_PLACEHOLDER = re.compile(r"\?")


def numbered(statement: str) -> str:
    """SQLite's ``?`` placeholders as PostgreSQL's ``$1, $2, …`` (the statements here
    hold no ``?`` inside a literal)."""
    count = 0

    def next_one(_: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(next_one, statement)


STATEMENTS: dict[type[Any], str] = {
    **{kind: numbered(text) for kind, text in sql.STATEMENTS.items()},
    w.CPUpserted: numbered(sql.SQL_UPSERT_CP.replace(
        "MAX(cp_registry.registered, excluded.registered)",
        "GREATEST(cp_registry.registered, excluded.registered)")),
    w.RequestLogged: numbered(
        "INSERT INTO request_log (request_id, driver_id, cp_id, decision, reason, timestamp)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"),
    w.TotalsCorrected: numbered(
        "UPDATE charging_sessions SET kwh = ?, euros = ?, meter_final = GREATEST(meter_final, ?)"
        " WHERE session_id = ? AND status != 'ACTIVE'"),
}
"""PostgreSQL's statement of each write; its parameters are SQLite's (same order)."""
assert set(STATEMENTS) == set(sql.PARAMS)

_SESSIONS = sql.SQL_SELECT_SESSIONS
_PERMANENT = (
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.DataError,
    asyncpg.exceptions.SyntaxOrAccessError,
)
"""Errors of the statement itself: trying again does not help, so they are not
StorageError (as SQLite's IntegrityError is not)."""
_UNAVAILABLE = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
                TimeoutError)
"""The database cannot be used now (down, restarted, connections cut): StorageError.
InternalClientError is what asyncpg raises on a connection the server closed while it
was idle in the pool."""


class PostgresRepository:
    """The PostgreSQL adapter of :class:`~evcharging.apps.ev_central.repository.Repository`;
    an async context manager. `url` is ``postgresql://user:password@host:port/db``."""

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = utcnow_,
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout: float = 10.0,
        command_timeout: float = COMMAND_TIMEOUT,
        acquire_timeout: float = ACQUIRE_TIMEOUT,
    ) -> None:
        if command_timeout <= 0 or acquire_timeout <= 0:
            raise ValueError("command_timeout and acquire_timeout must be > 0")
        self._url = url
        self._clock = clock
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._acquire_timeout = acquire_timeout
        self._pool: asyncpg.Pool | None = None
        self._open_lock = asyncio.Lock()
        self._lock_conn: asyncpg.Connection | None = None
        """The connection the job locks live on (None: none yet, or lost)."""
        self._locks: set[str] = set()
        """The job locks held on ``_lock_conn``."""
        self._locks_mutex = asyncio.Lock()
        self.write_error: str | None = None
        """Why the last transaction failed, until one succeeds again (None: fine)."""
        self.write_errors = 0
        """Transactions that failed since the start (metrics)."""
        self.observe_write: Callable[[float], None] | None = None
        """Told the seconds of each :meth:`apply` that committed (metrics)."""

    @property
    def url(self) -> str:
        """The URL without its password (for logs)."""
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", self._url)

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Connect and bring the schema up to date. Idempotent."""
        async with self._open_lock:
            if self._pool is not None:
                return
            try:
                pool = await asyncpg.create_pool(
                    self._url, min_size=self._min_size, max_size=self._max_size,
                    timeout=self._connect_timeout, command_timeout=self._command_timeout,
                )
            except _UNAVAILABLE as exc:
                raise StorageError(f"database {self.url}: {self._why(exc)}") from exc
            try:
                async with self._connection(pool) as conn:
                    await _migrate(conn, self._clock())
            except BaseException as exc:
                try:  # a server that does not answer does not hold the close up either
                    async with asyncio.timeout(self._connect_timeout):
                        await pool.close()
                except TimeoutError:
                    pool.terminate()
                if isinstance(exc, _UNAVAILABLE) and not isinstance(exc, _PERMANENT):
                    raise StorageError(f"database {self.url}: {self._why(exc)}") from exc
                raise
            self._pool = pool
        logger.info("database {} open (schema version {})", self.url, sql.SCHEMA_VERSION)

    async def close(self) -> None:
        """Wait for the running transactions, then close. Safe to call twice."""
        async with self._open_lock:
            pool, self._pool = self._pool, None
            async with self._locks_mutex:
                await self._drop_lock_connection()
            if pool is not None:
                await pool.close()

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
        """Whether the database answers ``SELECT 1`` and the last write did not fail."""
        if self.write_error is not None:
            return False
        try:
            rows = await self._fetch("SELECT 1")
        except (StorageError, RuntimeError):
            return False
        return len(rows) == 1 and rows[0][0] == 1

    async def probe(self, within: float) -> tuple[bool, bool]:
        """``(usable, busy)`` within `within` seconds: a ping that does not answer in
        time finds the database busy, usable unless the last write failed."""
        try:
            async with asyncio.timeout(within):
                return await self.ping(), False
        except TimeoutError:
            return self.write_error is None, True

    # ---------------------------------------------------------------------- writes

    async def apply(self, writes: Sequence[Write]) -> None:
        """Run every write in one transaction: all or none (StorageError when the database
        cannot be written now)."""
        if not writes:
            return
        started = time.perf_counter()
        runs = sql.runs(writes)  # one round trip a run, not one a write
        pool = self._connected()
        try:
            async with self._connection(pool) as conn, conn.transaction():
                for kind, params in runs:
                    if len(params) == 1:
                        await conn.execute(STATEMENTS[kind], *params[0])
                    else:
                        await conn.executemany(STATEMENTS[kind], params)
        except _PERMANENT:
            raise
        except _UNAVAILABLE as exc:
            why = self._why(exc)
            if self.write_error is None:
                logger.error("database {} cannot be written: {}", self.url, why)
            self.write_error = why
            self.write_errors += 1
            raise StorageError(f"database {self.url}: {why}") from exc
        if self.write_error is not None:
            logger.info("database {} can be written again", self.url)
            self.write_error = None
        if self.observe_write is not None:
            self.observe_write(time.perf_counter() - started)

    # ----------------------------------------------------------------------- reads

    async def load_cps(self) -> list[CPRecord]:
        """Every registered CP, by cp_id."""
        return [sql.cp_from_row(row) for row in await self._fetch(sql.SQL_LOAD_CPS)]

    async def get_session(self, session_id: str) -> SessionRecord | None:
        rows = await self._fetch(f"{_SESSIONS} WHERE session_id = $1", session_id)
        return sql.session_from_row(rows[0]) if rows else None

    async def active_sessions(self) -> list[SessionRecord]:
        """Every ACTIVE session, oldest first."""
        rows = await self._fetch(
            f"{_SESSIONS} WHERE status = $1 ORDER BY start_time, seq", SESSION_ACTIVE)
        return [sql.session_from_row(row) for row in rows]

    async def recent_request_ids(self, within: timedelta) -> list[str]:
        """The ids of the requests decided within `within` of the newest one, oldest
        first (measured on the log's own dates, never on this process's clock)."""
        newest = await self._fetch("SELECT MAX(timestamp) FROM request_log")
        if not newest or newest[0][0] is None:
            return []
        since = ts_parse(str(newest[0][0])) - within
        rows = await self._fetch(
            "SELECT request_id FROM request_log WHERE timestamp >= $1 ORDER BY timestamp, seq",
            ts_text(since))
        return [str(row[0]) for row in rows]

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
                params.append(str(value))
                clauses.append(f"{column} = ${len(params)}")  # the literals above
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(clamp(limit))
        query = f"{_SESSIONS}{where} ORDER BY start_time DESC, seq DESC LIMIT ${len(params)}"
        return [sql.session_from_row(row) for row in await self._fetch(query, *params)]

    async def list_faults(self, *, limit: int = 50, cp_id: str | None = None) -> list[FaultEvent]:
        """Fault events newest first; at most `limit` (1..1000)."""
        columns = "SELECT id, cp_id, event_type, reason, timestamp FROM fault_events"
        if cp_id is None:
            rows = await self._fetch(
                f"{columns} ORDER BY timestamp DESC, id DESC LIMIT $1", clamp(limit))
        else:
            rows = await self._fetch(
                f"{columns} WHERE cp_id = $1 ORDER BY timestamp DESC, id DESC LIMIT $2",
                cp_id, clamp(limit))
        return [sql.fault_from_row(row) for row in rows]

    async def cp_history(self, cp_id: str, *, limit: int = 50) -> list[HealthSnapshot]:
        """A CP's health snapshots newest first; at most `limit` (1..1000)."""
        rows = await self._fetch(numbered(sql.SQL_CP_HISTORY), cp_id, clamp(limit))
        return [sql.health_from_row(row) for row in rows]

    async def load_pending(self) -> PendingRow | None:
        """The outbox's last flush (None before the first)."""
        rows = await self._fetch(sql.SQL_LOAD_PENDING)
        if not rows:
            return None
        return PendingRow(int(rows[0]["seq"]), str(rows[0]["offsets"]),
                          str(rows[0]["messages"]))

    async def load_site_limits(self) -> dict[str, float]:
        """Every site's power limit in kW (SPEC §10), by site."""
        rows = await self._fetch(sql.SQL_LOAD_SITE_LIMITS)
        return {str(row["site"]): float(row["kw"]) for row in rows}

    # ----------------------------------------------------------------------- locks

    async def hold_lock(self, name: str) -> bool:
        """Take the job lock `name` (key :func:`lock_key`) if it is free and keep it
        while this repository is open; whether it is held now. Idempotent: a held lock is
        confirmed with one round trip on its connection. A lost connection lost its locks:
        this call then connects again and tries once more; a database it cannot reach (within
        the connect timeout) holds nothing (False, no exception)."""
        self._connected()
        async with self._locks_mutex:
            for attempt in range(2):
                fresh = self._lock_conn is None
                try:
                    async with asyncio.timeout(self._connect_timeout):
                        return await self._try_lock(name)
                except _UNAVAILABLE as exc:
                    if self._locks:
                        logger.warning("database {}: the connection of the job locks {} is "
                                       "lost ({}): they are released",
                                       self.url, sorted(self._locks), exc)
                    await self._drop_lock_connection()
                    if fresh or attempt:
                        logger.debug("database {}: job lock {!r} not taken: {}",
                                     self.url, name, exc)
                        return False
            return False  # pragma: no cover - the loop returns

    async def release_lock(self, name: str) -> None:
        """Give the job lock `name` up (nothing when it is not held)."""
        async with self._locks_mutex:
            if name not in self._locks or self._lock_conn is None:
                return
            self._locks.discard(name)
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._lock_conn.execute("SELECT pg_advisory_unlock($1)",
                                                  lock_key(name))
            except _UNAVAILABLE:
                await self._drop_lock_connection()  # its locks went with it

    async def _try_lock(self, name: str) -> bool:
        conn = self._lock_conn
        if conn is None or conn.is_closed():
            self._locks.clear()
            conn = self._lock_conn = await asyncpg.connect(self._url)
        if name in self._locks:
            await conn.fetchval("SELECT 1")  # alive: its session still holds the lock
            return True
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(name)):
            self._locks.add(name)
            return True
        return False

    async def _drop_lock_connection(self) -> None:
        """Close the locks' connection (the server releases its locks); call it holding
        ``_locks_mutex``."""
        conn, self._lock_conn = self._lock_conn, None
        self._locks.clear()
        if conn is None or conn.is_closed():
            return
        try:
            async with asyncio.timeout(self._connect_timeout):
                await conn.close()
        except (*_UNAVAILABLE, asyncpg.PostgresError):
            conn.terminate()

    # ------------------------------------------------------------------ internals

    def _connected(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the repository is not open")
        return self._pool

    @asynccontextmanager
    async def _connection(self, pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
        """A connection of `pool` within the acquire timeout (a TimeoutError that says so),
        handed back at the end (within the same timeout, else asyncpg terminates it)."""
        try:
            conn = await pool.acquire(timeout=self._acquire_timeout)
        except TimeoutError:
            raise TimeoutError(f"no connection free within {self._acquire_timeout:g} s "
                               "(the pool's are all in use or cannot connect)") from None
        try:
            yield conn
        finally:
            await pool.release(conn)

    def _why(self, exc: BaseException) -> str:
        """Why the database cannot be used, for StorageError and the logs (asyncpg's
        command timeout is a TimeoutError without text)."""
        if isinstance(exc, TimeoutError) and not str(exc):
            return f"no answer within {self._command_timeout:g} s"
        return str(exc) or type(exc).__name__

    async def _fetch(self, query: str, *params: Any) -> list[asyncpg.Record]:
        pool = self._connected()
        try:
            async with self._connection(pool) as conn:
                return list(await conn.fetch(query, *params))
        except _PERMANENT:
            raise
        except _UNAVAILABLE as exc:
            raise StorageError(f"database {self.url}: {self._why(exc)}") from exc


async def _migrate(conn: asyncpg.Connection, now: datetime) -> None:
    """Apply the migrations this database has not seen, in one transaction, under an
    advisory lock (Centrals that start together apply them once)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        current = int(await conn.fetchval(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version"))
        if current > sql.SCHEMA_VERSION:
            raise RuntimeError(f"database schema version {current} is newer than this code "
                               f"({sql.SCHEMA_VERSION})")
        for version in range(current + 1, sql.SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                version, ts_text(now))
