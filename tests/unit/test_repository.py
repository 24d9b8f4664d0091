"""Tests for evcharging.apps.ev_central.repository: Central's SQLite persistence."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import aiosqlite
import pytest

from evcharging.apps.ev_central import sql as sql_module
from evcharging.apps.ev_central.repository import (
    MAX_LIMIT,
    SCHEMA_VERSION,
    CPRecord,
    FaultEvent,
    FaultEventType,
    HealthSnapshot,
    Repository,
    SessionRecord,
    SqliteRepository,
)
from evcharging.common.circuit_breaker import BreakerState
from evcharging.common.states import CPState, SessionResult

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def session(
    n: int | str,
    *,
    cp_id: str = "CP-1",
    driver_id: str = "D-1",
    status: str = "ACTIVE",
    started: float = 0.0,
    request_id: str | None = None,
) -> SessionRecord:
    return SessionRecord(
        session_id=f"S-{n}",
        request_id=request_id or f"R-{n}",
        cp_id=cp_id,
        driver_id=driver_id,
        status=status,
        started_at=at(started),
    )


def snapshot(cp_id: str, seconds: float, state: CPState = CPState.ACTIVATED) -> HealthSnapshot:
    return HealthSnapshot(cp_id, state, False, BreakerState.CLOSED.value, at(seconds))


async def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the database file through a connection of its own."""
    async with aiosqlite.connect(path) as db:
        return [tuple(row) for row in await db.execute_fetchall(sql, params)]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "central.db"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def repo(db_path: Path, clock: FakeClock) -> AsyncIterator[SqliteRepository]:
    async with SqliteRepository(db_path, clock=clock) as repository:
        yield repository


# ----------------------------------------------------------------------- open / schema


async def test_schema_is_created_once_and_reopening_is_fine(db_path: Path) -> None:
    for _ in range(3):
        async with SqliteRepository(db_path) as repo:
            assert await repo.ping()

    versions = await query(db_path, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    tables = {
        name
        for (name,) in await query(db_path, "SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert {
        "schema_version",
        "cp_registry",
        "charging_sessions",
        "fault_events",
        "cp_health_history",
        "request_log",
    } <= tables
    index_sql = await query(
        db_path, "SELECT tbl_name, sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL"
    )
    indexed = {(table, sql.split("(", 1)[1].rstrip(")")) for table, sql in index_sql}
    assert {
        ("fault_events", "cp_id, timestamp"),
        ("cp_health_history", "cp_id, timestamp"),
        ("charging_sessions", "cp_id, start_time"),
        ("charging_sessions", "driver_id, start_time"),
        ("charging_sessions", "status"),
    } <= indexed


async def test_wal_mode_and_connection_pragmas(repo: SqliteRepository, db_path: Path) -> None:
    # journal_mode is a property of the file: any connection sees it.
    assert await query(db_path, "PRAGMA journal_mode") == [("wal",)]
    # The others are per connection: look at the repository's own (white box).
    db = repo._connection()
    pragmas = {}
    for name in ("synchronous", "foreign_keys", "busy_timeout"):
        rows = list(await db.execute_fetchall(f"PRAGMA {name}"))
        pragmas[name] = rows[0][0]
    assert pragmas == {"synchronous": 1, "foreign_keys": 1, "busy_timeout": 5000}


async def test_in_memory_database_works() -> None:
    async with SqliteRepository(":memory:") as repo:
        assert await repo.ping()
        await repo.upsert_cp(CPRecord("CP-1"))
        assert [cp.cp_id for cp in await repo.load_cps()] == ["CP-1"]


async def test_close_is_safe_twice_and_a_closed_repository_refuses(db_path: Path) -> None:
    repo = SqliteRepository(db_path)
    assert not await repo.ping()
    await repo.open()
    await repo.open()  # idempotent
    assert repo.is_open and await repo.ping()
    await repo.close()
    await repo.close()
    assert not repo.is_open
    assert not await repo.ping()
    with pytest.raises(RuntimeError, match="not open"):
        await repo.load_cps()
    with pytest.raises(RuntimeError, match="not open"):
        await repo.record_fault_event("CP-1", "FAULT", None, T0)


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    async with SqliteRepository(db_path):
        pass
    async with aiosqlite.connect(db_path) as db:
        await db.execute("INSERT INTO schema_version VALUES (?, ?)", (SCHEMA_VERSION + 1, "x"))
        await db.commit()
    repo = SqliteRepository(db_path)
    with pytest.raises(RuntimeError, match="newer"):
        await repo.open()
    assert not repo.is_open


async def test_sqlite_repository_satisfies_the_protocol(repo: SqliteRepository) -> None:
    port: Repository = repo
    assert await port.ping()


# -------------------------------------------------------------------------- CP registry


async def test_cp_upsert_load_round_trip_keeps_registered_at(
    repo: SqliteRepository, clock: FakeClock
) -> None:
    await repo.upsert_cp(CPRecord("CP-2"))
    first = CPRecord(
        "CP-1",
        state=CPState.ACTIVATED,
        location="Alicante",
        kw_rate=22.0,
        euro_rate=0.35,
        health_url="http://cp-1:8080/health",
    )
    await repo.upsert_cp(first)
    loaded = {cp.cp_id: cp for cp in await repo.load_cps()}
    assert list(loaded) == ["CP-1", "CP-2"]
    assert loaded["CP-1"] == CPRecord(
        "CP-1",
        state=CPState.ACTIVATED,
        location="Alicante",
        kw_rate=22.0,
        euro_rate=0.35,
        health_url="http://cp-1:8080/health",
        registered_at=T0,
        updated_at=T0,
    )
    assert loaded["CP-2"].state is CPState.DISCONNECTED

    clock.now = at(60)
    await repo.upsert_cp(
        CPRecord(
            "CP-1",
            state=CPState.FAULT,
            location="Murcia",
            kw_rate=50.0,
            euro_rate=0.5,
            is_faulty=True,
            fault_reason="overheat",
            registered_at=at(999),  # ignored on update
        )
    )
    (cp1,) = [cp for cp in await repo.load_cps() if cp.cp_id == "CP-1"]
    assert cp1 == CPRecord(
        "CP-1",
        state=CPState.FAULT,
        location="Murcia",
        kw_rate=50.0,
        euro_rate=0.5,
        health_url=None,
        is_faulty=True,
        fault_reason="overheat",
        registered_at=T0,
        updated_at=at(60),
    )


async def test_timestamps_are_utc_text_with_z_and_naive_ones_are_refused(
    repo: SqliteRepository, db_path: Path
) -> None:
    madrid = timezone(timedelta(hours=2))
    await repo.record_fault_event("CP-1", "FAULT", None, datetime(2024, 5, 1, 14, tzinfo=madrid))
    assert await query(db_path, "SELECT timestamp FROM fault_events") == [
        ("2024-05-01T12:00:00.000000Z",)
    ]
    (event,) = await repo.list_faults()
    assert event.ts == T0 and event.ts.tzinfo is not None
    with pytest.raises(ValueError, match="timezone"):
        await repo.record_fault_event("CP-1", "FAULT", None, datetime(2024, 5, 1))  # noqa: DTZ001
    assert len(await repo.list_faults()) == 1


# ----------------------------------------------------------------------------- sessions


async def test_start_session_refuses_a_duplicate_request_or_session_id(
    repo: SqliteRepository,
) -> None:
    assert await repo.start_session(session(1))
    assert not await repo.start_session(session(2, request_id="R-1"))
    assert not await repo.start_session(session(1, request_id="R-other"))
    assert await repo.get_session("S-2") is None
    assert await repo.get_session_by_request("R-other") is None
    assert await repo.get_session_by_request("R-1") == session(1)
    assert await repo.get_session("S-1") == session(1)
    assert await repo.get_session("nope") is None


async def test_start_session_validates_its_input(repo: SqliteRepository) -> None:
    with pytest.raises(ValueError, match="status"):
        await repo.start_session(session(1, status="RUNNING"))
    with pytest.raises(ValueError, match="timezone"):
        await repo.start_session(
            SessionRecord("S-1", "R-1", "CP-1", "D-1", "ACTIVE", datetime(2024, 1, 1))  # noqa: DTZ001
        )
    with pytest.raises(ValueError, match="kwh"):
        await repo.start_session(
            SessionRecord("S-1", "R-1", "CP-1", "D-1", "ACTIVE", T0, kwh=float("nan"))
        )
    assert await repo.list_sessions() == []


async def test_finish_session_only_finishes_an_active_session(repo: SqliteRepository) -> None:
    await repo.start_session(session(1))
    assert await repo.finish_session(
        "S-1", SessionResult.COMPLETED, kwh=7.5, euros=2.25, reason=None, ended_at=at(30)
    )
    done = await repo.get_session("S-1")
    assert done == SessionRecord(
        "S-1", "R-1", "CP-1", "D-1", "COMPLETED", T0, ended_at=at(30), kwh=7.5, euros=2.25
    )
    assert type(done.status) is str

    assert not await repo.finish_session(
        "S-1", "FAILED", kwh=99.0, euros=99.0, reason="late", ended_at=at(60)
    )
    assert await repo.get_session("S-1") == done
    assert not await repo.finish_session(
        "S-404", "STOPPED", kwh=0.0, euros=0.0, reason=None, ended_at=at(60)
    )
    with pytest.raises(ValueError, match="final"):
        await repo.finish_session("S-1", "ACTIVE", kwh=0.0, euros=0.0, reason=None, ended_at=T0)
    with pytest.raises(ValueError, match="euros"):
        await repo.finish_session("S-1", "STOPPED", kwh=0.0, euros=-1.0, reason=None, ended_at=T0)


async def test_list_sessions_order_filters_and_limit(repo: SqliteRepository) -> None:
    specs = [
        # n, cp, driver, started
        (1, "CP-1", "D-1", 10.0),
        (2, "CP-2", "D-1", 30.0),
        (3, "CP-1", "D-2", 20.0),
        (4, "CP-2", "D-2", 30.0),  # same start as S-2, inserted later
        (5, "CP-1", "D-1", 40.0),
    ]
    for n, cp_id, driver_id, started in specs:
        await repo.start_session(session(n, cp_id=cp_id, driver_id=driver_id, started=started))
    await repo.finish_session("S-3", "STOPPED", kwh=1.0, euros=1.0, reason="user", ended_at=at(25))

    async def ids(**kwargs: Any) -> list[str]:
        return [s.session_id for s in await repo.list_sessions(**kwargs)]

    assert await ids() == ["S-5", "S-4", "S-2", "S-3", "S-1"]
    assert await ids(cp_id="CP-1") == ["S-5", "S-3", "S-1"]
    assert await ids(driver_id="D-2") == ["S-4", "S-3"]
    assert await ids(status="STOPPED") == ["S-3"]
    assert await ids(status="ACTIVE", cp_id="CP-1", driver_id="D-1") == ["S-5", "S-1"]
    assert await ids(cp_id="CP-9") == []
    assert await ids(limit=2) == ["S-5", "S-4"]
    assert await ids(limit=0) == ["S-5"]
    assert await ids(limit=-10) == ["S-5"]
    assert len(await ids(limit=10**9)) == 5


# ------------------------------------------------------------------ faults and history


async def test_faults_newest_first_with_filter_and_limit(repo: SqliteRepository) -> None:
    await repo.record_fault_event("CP-1", FaultEventType.FAULT, "overheat", at(10))
    await repo.record_fault_event("CP-2", "FAULT", None, at(20))
    await repo.record_fault_event("CP-1", FaultEventType.RECOVERY, None, at(30))
    await repo.record_fault_event("CP-1", "MANUAL_RESET", "operator", at(30))  # same ts, later id

    events = await repo.list_faults()
    assert [(e.cp_id, e.event_type, e.ts) for e in events] == [
        ("CP-1", "MANUAL_RESET", at(30)),
        ("CP-1", "RECOVERY", at(30)),
        ("CP-2", "FAULT", at(20)),
        ("CP-1", "FAULT", at(10)),
    ]
    assert all(type(e.event_type) is str for e in events)
    assert events[-1] == FaultEvent(events[-1].id, "CP-1", "FAULT", "overheat", at(10))
    assert [e.event_type for e in await repo.list_faults(cp_id="CP-1", limit=2)] == [
        "MANUAL_RESET",
        "RECOVERY",
    ]
    assert await repo.list_faults(cp_id="CP-9") == []
    assert len(await repo.list_faults(limit=0)) == 1


async def test_health_history_newest_first_with_limit(repo: SqliteRepository) -> None:
    await repo.record_health("CP-1", CPState.ACTIVATED, False, BreakerState.CLOSED, at(10))
    await repo.record_health("CP-1", CPState.SUPPLYING, False, "CLOSED", at(20), session_id="S-1")
    await repo.record_health("CP-2", CPState.FAULT, True, BreakerState.OPEN, at(25))
    await repo.record_health("CP-1", CPState.FAULT, True, BreakerState.OPEN, at(30))

    history = await repo.cp_history("CP-1")
    assert [(h.state, h.is_faulty, h.breaker_state, h.ts) for h in history] == [
        (CPState.FAULT, True, "OPEN", at(30)),
        (CPState.SUPPLYING, False, "CLOSED", at(20)),
        (CPState.ACTIVATED, False, "CLOSED", at(10)),
    ]
    assert history[1].session_id == "S-1"
    assert all(h.id is not None for h in history)
    assert all(type(h.breaker_state) is str for h in history)
    assert [h.ts for h in await repo.cp_history("CP-1", limit=1)] == [at(30)]
    assert await repo.cp_history("CP-9") == []


async def test_record_health_many_writes_a_batch(repo: SqliteRepository, db_path: Path) -> None:
    await repo.record_health_many([])
    rows = [snapshot(f"CP-{i % 3}", float(i)) for i in range(3 * (MAX_LIMIT + 5))]
    await repo.record_health_many(rows)

    assert await query(db_path, "SELECT COUNT(*) FROM cp_health_history") == [(len(rows),)]
    history = await repo.cp_history("CP-1", limit=MAX_LIMIT * 10)
    assert len(history) == MAX_LIMIT
    assert history[0].ts == rows[-2].ts  # the newest CP-1 row
    assert [h.ts for h in history] == sorted((h.ts for h in history), reverse=True)


async def test_record_health_many_is_one_transaction(repo: SqliteRepository, db_path: Path) -> None:
    bad = HealthSnapshot(cast(str, None), CPState.ACTIVATED, False, "CLOSED", at(99))
    rows = [snapshot("CP-1", float(i)) for i in range(50)] + [bad]
    with pytest.raises(sqlite3.IntegrityError):
        await repo.record_health_many(rows)
    assert await query(db_path, "SELECT COUNT(*) FROM cp_health_history") == [(0,)]
    naive = HealthSnapshot("CP-1", CPState.ACTIVATED, False, "CLOSED", datetime(2024, 1, 1))  # noqa: DTZ001
    with pytest.raises(ValueError, match="timezone"):
        await repo.record_health_many([*rows[:50], naive])
    assert await query(db_path, "SELECT COUNT(*) FROM cp_health_history") == [(0,)]
    # The failed transactions were rolled back: the next one works.
    await repo.record_health_many(rows[:50])
    assert len(await repo.cp_history("CP-1", limit=100)) == 50


# ---------------------------------------------------------------- durability and JSON


async def test_reopening_the_file_keeps_the_data(db_path: Path) -> None:
    async with SqliteRepository(db_path, clock=FakeClock()) as repo:
        await repo.upsert_cp(CPRecord("CP-1", state=CPState.ACTIVATED, kw_rate=11.0))
        await repo.start_session(session(1))
        await repo.record_fault_event("CP-1", "FAULT", "lost", at(1))
        await repo.record_health("CP-1", CPState.FAULT, True, BreakerState.OPEN, at(1))

    async with SqliteRepository(db_path) as repo:
        assert await repo.load_cps() == [
            CPRecord("CP-1", CPState.ACTIVATED, kw_rate=11.0, registered_at=T0, updated_at=T0)
        ]
        assert await repo.active_sessions() == [session(1)]
        assert [e.reason for e in await repo.list_faults()] == ["lost"]
        assert [h.state for h in await repo.cp_history("CP-1")] == [CPState.FAULT]


async def test_as_dict_is_json_ready(repo: SqliteRepository) -> None:
    await repo.upsert_cp(CPRecord("CP-1", state=CPState.SUPPLYING, euro_rate=0.4))
    await repo.start_session(session(1))
    await repo.finish_session("S-1", "COMPLETED", kwh=3.0, euros=1.2, reason=None, ended_at=at(9))
    await repo.record_fault_event("CP-1", FaultEventType.FAULT, "overheat", at(5))
    await repo.record_health("CP-1", CPState.FAULT, True, BreakerState.HALF_OPEN, at(6))

    (cp,) = await repo.load_cps()
    sess = await repo.get_session("S-1")
    assert sess is not None
    (fault,) = await repo.list_faults()
    (health,) = await repo.cp_history("CP-1")

    decoded = json.loads(json.dumps([r.as_dict() for r in (cp, sess, fault, health)]))
    cp_d, sess_d, fault_d, health_d = decoded
    assert cp_d == {
        "cp_id": "CP-1",
        "state": "SUPPLYING",
        "location": None,
        "kw_rate": None,
        "euro_rate": 0.4,
        "health_url": None,
        "is_faulty": False,
        "fault_reason": None,
        "registered_at": "2024-05-01T12:00:00.000000Z",
        "updated_at": "2024-05-01T12:00:00.000000Z",
        "state_reason": None,
        "breaker_state": "CLOSED",
        "breaker_failures": 0,
        "breaker_reason": None,
        "site": None,
        "registered": True,
        "protocol": None,
        "vendor": None,
        "model": None,
    }
    assert sess_d["status"] == "COMPLETED"
    assert sess_d["started_at"] == "2024-05-01T12:00:00.000000Z"
    assert sess_d["ended_at"] == "2024-05-01T12:00:09.000000Z"
    assert fault_d == {
        "id": fault.id,
        "cp_id": "CP-1",
        "event_type": "FAULT",
        "reason": "overheat",
        "ts": "2024-05-01T12:00:05.000000Z",
    }
    assert health_d["state"] == "FAULT" and health_d["breaker_state"] == "HALF_OPEN"
    assert health_d["ts"].endswith("Z") and health_d["id"] == health.id
    # Records built in memory (enums, unset fields) are JSON-ready too.
    json.dumps(snapshot("CP-1", 0).as_dict())
    json.dumps(CPRecord("CP-1").as_dict())


# ----------------------------------------------------------------------- concurrency


async def _ticks_while(work: Callable[[], Any]) -> int:
    """Run `work()` and count how often a concurrent task got the loop meanwhile."""
    ticks = 0
    done = asyncio.Event()
    running = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        running.set()
        while not done.is_set():
            await asyncio.sleep(0.001)
            ticks += 1

    async with asyncio.TaskGroup() as tg:
        tg.create_task(ticker())
        await running.wait()
        start = ticks
        try:
            await work()
        finally:
            counted = ticks - start
            done.set()
    return counted


async def test_a_large_batch_does_not_block_the_event_loop(repo: SqliteRepository) -> None:
    rows = [snapshot(f"CP-{i % 50}", i / 1000) for i in range(20_000)]
    ticks = await _ticks_while(lambda: repo.record_health_many(rows))
    # A blocking write would let the ticker run at most once before the write returned.
    assert ticks > 3
    assert len(await repo.cp_history("CP-7", limit=1000)) == 400


async def test_concurrent_tasks_share_one_repository(repo: SqliteRepository, db_path: Path) -> None:
    async def start(n: int) -> bool:
        return await repo.start_session(session(f"{n}", request_id=f"R-{n % 10}"))

    async def batch(k: int) -> None:
        await repo.record_health_many([snapshot("CP-1", k * 100 + i) for i in range(100)])

    async def read() -> int:
        return len(await repo.list_sessions(limit=1000))

    results = await asyncio.gather(
        *(start(n) for n in range(60)), *(batch(k) for k in range(10)), *(read() for _ in range(10))
    )
    started = results[:60]
    assert sum(1 for ok in started if ok) == 10  # one per distinct request id
    assert len(await repo.list_sessions(limit=1000)) == 10
    assert await query(db_path, "SELECT COUNT(*) FROM cp_health_history") == [(1000,)]


async def test_a_write_cancelled_at_begin_leaves_no_open_transaction(
    repo: SqliteRepository, db_path: Path
) -> None:
    rows = [snapshot("CP-1", float(i)) for i in range(1000)]
    task = asyncio.create_task(repo.record_health_many(rows))
    # One pass of the loop, not a delay: the task runs to its first await, BEGIN queued
    # on the connection thread, and is cancelled there.
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert await query(db_path, "SELECT COUNT(*) FROM cp_health_history") == [(0,)]
    # No transaction was left open: the next writes work.
    assert await repo.start_session(session(1))
    assert await repo.get_session("S-1") == session(1)


async def test_a_write_cancelled_mid_batch_is_rolled_back(
    repo: SqliteRepository, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [snapshot("CP-1", float(i)) for i in range(1000)]
    halfway = len(rows) // 2
    loop = asyncio.get_running_loop()
    mid_batch = asyncio.Event()
    resume = threading.Event()
    converted = 0
    real_params = sql_module.health_params

    def params_pausing_halfway(row: HealthSnapshot) -> tuple[Any, ...]:
        # executemany pulls the parameters row by row on the connection thread: hold it
        # there, half the batch inserted, until the test has cancelled the write.
        nonlocal converted
        converted += 1
        if converted == halfway:
            loop.call_soon_threadsafe(mid_batch.set)
            if not resume.wait(timeout=5):
                raise TimeoutError("the test never resumed the batch")
        return real_params(row)

    monkeypatch.setattr(sql_module, "health_params", params_pausing_halfway)
    task = asyncio.create_task(repo.record_health_many(rows))
    try:
        await asyncio.wait_for(mid_batch.wait(), 5)
        task.cancel()  # the awaiting task is cancelled while executemany runs
    finally:
        resume.set()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done and task.cancelled()
    # The cancel landed with half the rows inserted. The task ended only after the whole
    # executemany had run (its ROLLBACK is queued behind it on the same thread), and that
    # ROLLBACK undid every row: nothing was committed.
    assert converted == len(rows)
    assert await query(db_path, "SELECT COUNT(*) FROM cp_health_history") == [(0,)]

    # No transaction was left open: the repository still works, and the same batch,
    # written again, is stored exactly once.
    monkeypatch.undo()
    await repo.record_health_many(rows)
    assert await query(db_path, "SELECT COUNT(*) FROM cp_health_history") == [(len(rows),)]
    assert await repo.start_session(session(1))
    assert await repo.get_session("S-1") == session(1)


async def test_request_log_refuses_a_second_decision(tmp_path: Path) -> None:
    async with SqliteRepository(tmp_path / "recent.db") as repo:
        base = datetime(2026, 1, 1, tzinfo=UTC)
        for n in range(3):
            assert await repo.record_request(
                f"r{n}", "d", "CP-1", "DENIED", "CP busy", base + timedelta(minutes=n)
            )
        assert not await repo.record_request("r1", "d", "CP-1", "ACCEPTED", None, base)
        # Within a minute of the newest decision (r2, at base + 2 min), whatever the clock.
        assert await repo.recent_request_ids(timedelta(minutes=1)) == ["r1", "r2"]
        assert await repo.recent_request_ids(timedelta(0)) == ["r2"]
