"""Central's SQL for SQLite: the schema's migrations, the statements and the rows.

Pure: nothing here touches a database. :mod:`evcharging.apps.ev_central.repository` runs
these statements on aiosqlite. A :data:`~evcharging.apps.ev_central.writes.Write` becomes
SQL here, by tables from its type: its parameters (:data:`PARAMS`) and SQLite's statement
(:data:`STATEMENTS`); :func:`runs` groups a transaction's writes for ``executemany``. The
PostgreSQL adapter (:mod:`~evcharging.apps.ev_central.pg_repository`) shares the
parameters, whose order its statements keep, and the row conversions: both databases store
the same values.

The records and the timestamp format are :mod:`evcharging.apps.ev_central.records`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from evcharging.apps.ev_central import writes as w
from evcharging.apps.ev_central.records import (
    CPRecord,
    FaultEvent,
    HealthSnapshot,
    SessionRecord,
    ts_opt_parse,
    ts_opt_text,
    ts_parse,
    ts_text,
)
from evcharging.common.circuit_breaker import BreakerState
from evcharging.common.states import CPState

__all__ = ["MIGRATIONS", "PARAMS", "SCHEMA_VERSION", "STATEMENTS", "TABLES", "runs"]


class Row(Protocol):
    """A row read back by name: ``sqlite3.Row`` and ``asyncpg.Record`` both are."""

    def __getitem__(self, key: str, /) -> Any: ...

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
    # 10: more than one Central (SPEC §9). Each instance's last flush (the outbox's, as
    # outbox_pending was for the one Central; its row moves to the instance ''), and the
    # instances: where their API answers, their transactional id and the partitions they
    # claim (a crashed instance's claims tell its successor to fence it and settle its
    # last flush).
    (
        """CREATE TABLE IF NOT EXISTS outbox_flushes (
            instance TEXT PRIMARY KEY,
            token    TEXT NOT NULL,
            offsets  TEXT NOT NULL,
            messages TEXT NOT NULL
        )""",
        "INSERT INTO outbox_flushes (instance, token, offsets, messages)"
        " SELECT '', 'seq=' || seq, offsets, messages FROM outbox_pending",
        """CREATE TABLE IF NOT EXISTS centrals (
            instance         TEXT PRIMARY KEY,
            peer_url         TEXT NOT NULL,
            transactional_id TEXT NOT NULL,
            partitions       TEXT NOT NULL,
            partition_count  INTEGER NOT NULL,
            seen_at          TEXT NOT NULL
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



def cp_from_row(row: Row) -> CPRecord:
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


def session_from_row(row: Row) -> SessionRecord:
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


def fault_from_row(row: Row) -> FaultEvent:
    return FaultEvent(
        id=row["id"],
        cp_id=row["cp_id"],
        event_type=row["event_type"],
        reason=row["reason"],
        ts=ts_parse(row["timestamp"]),
    )


def health_from_row(row: Row) -> HealthSnapshot:
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

def _cp_params(write: w.CPUpserted) -> tuple[Any, ...]:
    cp, now = write.cp, write.now
    return (
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


def _session_params(write: w.SessionOpened) -> tuple[Any, ...]:
    session = write.session
    return (
        session.session_id,
        session.request_id,
        session.cp_id,
        session.driver_id,
        str(session.status),
        ts_text(session.started_at),
        ts_opt_text(session.ended_at),
        float(session.kwh),
        float(session.euros),
        session.reason,
        session.kwh_wanted,
        ts_opt_text(session.departure),
        session.car_battery_kwh,
        session.car_soc,
        session.car_max_kw,
    )


def _finish_params(write: w.SessionFinished) -> tuple[Any, ...]:
    return (str(write.status), ts_text(write.ended_at), float(write.kwh), float(write.euros),
            write.reason, int(write.meter_final), write.session_id)


def _pending_params(write: w.PendingSaved) -> tuple[Any, ...]:
    return (write.instance, write.token, write.offsets, write.messages)


def _central_params(write: w.CentralSaved) -> tuple[Any, ...]:
    return (write.instance, write.peer_url, write.transactional_id,
            json.dumps(sorted(write.partitions)), int(write.partition_count),
            ts_text(write.seen_at))


PARAMS: dict[type[Any], Callable[[Any], tuple[Any, ...]]] = {
    w.CPUpserted: _cp_params,
    w.CPForgotten: lambda x: (x.cp_id,),
    w.RequestLogged: lambda x: (x.request_id, x.driver_id, x.cp_id, x.decision, x.reason,
                                ts_text(x.ts)),
    w.SessionOpened: _session_params,
    w.SessionStarted: lambda x: (ts_text(x.started_at), ts_text(x.first_report),
                                 x.session_id),
    w.SessionFinished: _finish_params,
    w.TotalsCorrected: lambda x: (float(x.kwh), float(x.euros), int(x.meter_final),
                                  x.session_id),
    w.CompletedByMeter: lambda x: (x.reason, x.session_id),
    w.FaultRecorded: lambda x: (x.cp_id, str(x.event_type), x.reason, ts_text(x.ts)),
    w.HealthRecorded: lambda x: health_params(x.snapshot),
    w.HealthPruned: lambda x: (ts_text(x.before),),
    w.PendingSaved: _pending_params,
    w.PendingSettled: lambda x: (x.instance,),
    w.CentralSaved: _central_params,
    w.ClaimsCut: lambda x: (json.dumps(sorted(x.partitions)), x.instance),
    w.SiteLimitSet: lambda x: (x.site, float(x.kw), ts_text(x.now)),
    w.SiteLimitRemoved: lambda x: (x.site,),
}
"""Each write's parameters, in the order of its statement's placeholders (both dialects)."""

STATEMENTS: dict[type[Any], str] = {
    w.CPUpserted: SQL_UPSERT_CP,
    w.CPForgotten: "DELETE FROM cp_registry WHERE cp_id = ? AND registered = 0",
    w.RequestLogged: SQL_LOG_REQUEST,
    w.SessionOpened: SQL_START_SESSION,
    w.SessionStarted: "UPDATE charging_sessions SET start_time = ?, first_report = ?"
                      " WHERE session_id = ? AND status = 'ACTIVE'",
    w.SessionFinished: SQL_FINISH_SESSION,
    w.TotalsCorrected: SQL_CORRECT_TOTALS,
    w.CompletedByMeter: "UPDATE charging_sessions SET status = 'COMPLETED', reason = ?"
                        " WHERE session_id = ? AND status = 'FAILED'",
    w.FaultRecorded: SQL_INSERT_FAULT,
    w.HealthRecorded: SQL_INSERT_HEALTH,
    w.HealthPruned: "DELETE FROM cp_health_history WHERE timestamp < ?",
    w.PendingSaved: "INSERT INTO outbox_flushes (instance, token, offsets, messages)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (instance) DO UPDATE SET"
                    " token = excluded.token, offsets = excluded.offsets,"
                    " messages = excluded.messages",
    w.PendingSettled: "DELETE FROM outbox_flushes WHERE instance = ?",
    w.CentralSaved: "INSERT INTO centrals (instance, peer_url, transactional_id, partitions,"
                    " partition_count, seen_at) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (instance) DO UPDATE SET peer_url = excluded.peer_url,"
                    " transactional_id = excluded.transactional_id,"
                    " partitions = excluded.partitions,"
                    " partition_count = excluded.partition_count, seen_at = excluded.seen_at",
    w.ClaimsCut: "UPDATE centrals SET partitions = ? WHERE instance = ?",
    w.SiteLimitSet: "INSERT INTO site_limits (site, kw, updated_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (site) DO UPDATE SET kw = excluded.kw,"
                    " updated_at = excluded.updated_at",
    w.SiteLimitRemoved: "DELETE FROM site_limits WHERE site = ?",
}
"""SQLite's statement of each write."""


TABLES: dict[type[Any], str] = {
    w.CPUpserted: "cp_registry",
    w.CPForgotten: "cp_registry",
    w.RequestLogged: "request_log",
    w.SessionOpened: "charging_sessions",
    w.SessionStarted: "charging_sessions",
    w.SessionFinished: "charging_sessions",
    w.TotalsCorrected: "charging_sessions",
    w.CompletedByMeter: "charging_sessions",
    w.FaultRecorded: "fault_events",
    w.HealthRecorded: "cp_health_history",
    w.HealthPruned: "cp_health_history",
    w.PendingSaved: "outbox_flushes",
    w.PendingSettled: "outbox_flushes",
    w.CentralSaved: "centrals",
    w.ClaimsCut: "centrals",
    w.SiteLimitSet: "site_limits",
    w.SiteLimitRemoved: "site_limits",
}
"""The one table each write changes (no write reads another table, and there are no
triggers or foreign keys: writes to different tables commute)."""


def runs(writes: Sequence[w.Write]) -> list[tuple[type[Any], list[tuple[Any, ...]]]]:
    """The writes of one transaction as runs of one kind each, with their parameters, for
    one ``executemany`` a run: table by table in the order each table is first written,
    and within a table in the writes' own order (so every table ends as the writes in
    order would leave it; only the interleaving of independent tables changes)."""
    by_table: dict[str, list[w.Write]] = {}
    for write in writes:
        by_table.setdefault(TABLES[type(write)], []).append(write)
    result: list[tuple[type[Any], list[tuple[Any, ...]]]] = []
    for table_writes in by_table.values():
        for write in table_writes:
            kind = type(write)
            if not result or result[-1][0] is not kind:
                result.append((kind, []))
            result[-1][1].append(PARAMS[kind](write))
    return result


SQL_LOAD_PENDING = "SELECT instance, token, offsets, messages FROM outbox_flushes ORDER BY instance"
SQL_LOAD_CENTRALS = ("SELECT instance, peer_url, transactional_id, partitions, partition_count,"
                     " seen_at FROM centrals ORDER BY instance")
SQL_LOAD_SITE_LIMITS = "SELECT site, kw FROM site_limits ORDER BY site"
