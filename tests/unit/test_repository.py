"""The repository contract (SPEC §7): every test of the ``repo`` fixture runs against both
adapters, SQLite (a file) and PostgreSQL (a fresh database on the real server that the
``postgres_server`` fixture starts; those runs are marked ``integration``). The SQLite-only
tests at the end look at what only SQLite has (WAL, pragmas, the file, the connection
thread)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import aiosqlite
import asyncpg
import pytest

from evcharging.apps.ev_central import writes
from evcharging.apps.ev_central.main import make_repository
from evcharging.apps.ev_central.pg_repository import PostgresRepository
from evcharging.apps.ev_central.records import CentralRecord, PendingRow
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
    StorageError,
)
from evcharging.common.circuit_breaker import BreakerState
from evcharging.common.config import CentralSettings
from evcharging.common.states import CPState, SessionResult
from evcharging.devtools.postgres import LocalPostgres
from tests.polling import poll

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

INTEGRITY = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)
"""A row the schema refuses, as each adapter says it."""


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


def accepted(s: SessionRecord) -> list[writes.Write]:
    """What the controller writes when it accepts a request (one transaction)."""
    return [writes.RequestLogged(s.request_id, s.driver_id, s.cp_id, "ACCEPTED", None,
                                 s.started_at),
            writes.SessionOpened(s)]


def finished(
    session_id: str, status: str, *, kwh: float = 0.0, euros: float = 0.0,
    reason: str | None = None, ended_at: datetime = T0, meter_final: bool = False,
) -> writes.SessionFinished:
    return writes.SessionFinished(session_id, status, kwh=kwh, euros=euros, reason=reason,
                                  ended_at=ended_at, meter_final=meter_final)


def fault(cp_id: str, event_type: str, reason: str | None, ts: datetime) -> writes.FaultRecorded:
    return writes.FaultRecorded(cp_id, event_type, reason, ts)


def health(
    cp_id: str, state: CPState, is_faulty: bool, breaker: BreakerState | str, ts: datetime,
    session_id: str | None = None,
) -> writes.HealthRecorded:
    return writes.HealthRecorded(
        HealthSnapshot(cp_id, state, is_faulty, str(breaker), ts, session_id))


def upsert(cp: CPRecord, now: datetime = T0) -> writes.CPUpserted:
    return writes.CPUpserted(cp, now)


async def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the database file through a connection of its own."""
    async with aiosqlite.connect(path) as db:
        return [tuple(row) for row in await db.execute_fetchall(sql, params)]


class Backend:
    """One database of one adapter: new repositories on it, and raw SQL beside them."""

    def __init__(self, kind: str, make: Callable[[], Repository],
                 raw: Callable[[str], Any]) -> None:
        self.kind = kind
        self.make = make
        self.raw = raw
        """Run one SQL statement through a connection of its own; its rows as tuples."""


def _sqlite_backend(tmp_path: Path) -> Backend:
    path = tmp_path / "central.db"

    async def raw(statement: str) -> list[tuple[Any, ...]]:
        async with aiosqlite.connect(path) as db:
            rows = [tuple(row) for row in await db.execute_fetchall(statement)]
            await db.commit()
            return rows

    return Backend("sqlite", lambda: SqliteRepository(path, clock=FakeClock()), raw)


def _postgres_backend(request: pytest.FixtureRequest) -> Backend:
    server = cast(LocalPostgres, request.getfixturevalue("postgres_server"))
    name = f"repo_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name)
    request.addfinalizer(lambda: server.drop_database(name))

    async def raw(statement: str) -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(row) for row in await conn.fetch(statement)]
        finally:
            await conn.close()

    return Backend("postgres", lambda: PostgresRepository(url, clock=FakeClock()), raw)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return _sqlite_backend(tmp_path)
    return _postgres_backend(request)


@pytest.fixture
async def repo(backend: Backend) -> AsyncIterator[Repository]:
    async with backend.make() as repository:
        yield repository


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "central.db"


@pytest.fixture
async def sqlite_repo(db_path: Path) -> AsyncIterator[SqliteRepository]:
    async with SqliteRepository(db_path, clock=FakeClock()) as repository:
        yield repository


async def count(backend: Backend, table: str) -> int:
    ((n,),) = await backend.raw(f"SELECT COUNT(*) FROM {table}")
    return int(n)


# ----------------------------------------------------------------------- open / schema


async def test_migrations_run_once_and_reopening_is_fine(backend: Backend) -> None:
    for _ in range(3):
        async with backend.make() as repo:
            assert await repo.ping()
    versions = await backend.raw("SELECT version FROM schema_version ORDER BY version")
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    for table in ("cp_registry", "charging_sessions", "fault_events", "cp_health_history",
                  "request_log", "outbox_flushes", "site_limits", "centrals"):
        assert await count(backend, table) == 0


async def test_close_is_safe_twice_and_a_closed_repository_refuses(backend: Backend) -> None:
    repo = backend.make()
    assert not await repo.ping()
    await repo.open()
    await repo.open()  # idempotent
    assert await repo.ping()
    await repo.close()
    await repo.close()
    assert not await repo.ping()
    with pytest.raises(RuntimeError, match="not open"):
        await repo.load_cps()
    with pytest.raises(RuntimeError, match="not open"):
        await repo.apply([fault("CP-1", "FAULT", None, T0)])


async def test_a_newer_schema_is_refused(backend: Backend) -> None:
    async with backend.make():
        pass
    await backend.raw(f"INSERT INTO schema_version VALUES ({SCHEMA_VERSION + 1}, 'x')")
    repo = backend.make()
    with pytest.raises(RuntimeError, match="newer"):
        await repo.open()
    assert not await repo.ping()


async def test_each_adapter_satisfies_the_protocol(repo: Repository) -> None:
    port: Repository = repo
    assert await port.ping()
    assert await port.probe(within=1.0) == (True, False)


# -------------------------------------------------------------------------- CP registry


async def test_cp_upsert_load_round_trip_keeps_registered_at(repo: Repository) -> None:
    await repo.apply([upsert(CPRecord("CP-2"))])
    first = CPRecord(
        "CP-1",
        state=CPState.ACTIVATED,
        location="Alicante",
        kw_rate=22.0,
        euro_rate=0.35,
        health_url="http://cp-1:8080/health",
    )
    await repo.apply([upsert(first)])
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

    await repo.apply([upsert(
        CPRecord(
            "CP-1",
            state=CPState.FAULT,
            location="Murcia",
            kw_rate=50.0,
            euro_rate=0.5,
            is_faulty=True,
            fault_reason="overheat",
            registered_at=at(999),  # ignored on update
            site="north",
            protocol="ocpp1.6",
            vendor="V",
            model="M",
            breaker_state=BreakerState.OPEN,
            breaker_failures=3,
        ),
        at(60),
    )])
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
        site="north",
        protocol="ocpp1.6",
        vendor="V",
        model="M",
        breaker_state=BreakerState.OPEN,
        breaker_failures=3,
    )


async def test_a_registration_is_never_undone_and_only_bus_cps_are_forgotten(
    repo: Repository,
) -> None:
    await repo.apply([upsert(CPRecord("REG", registered=True)),
                      upsert(CPRecord("BUS", registered=False))])
    await repo.apply([upsert(CPRecord("REG", registered=False))])
    await repo.apply([writes.CPForgotten("REG"), writes.CPForgotten("BUS")])
    assert [(cp.cp_id, cp.registered) for cp in await repo.load_cps()] == [("REG", True)]


async def test_timestamps_are_utc_and_naive_ones_are_refused(repo: Repository) -> None:
    madrid = timezone(timedelta(hours=2))
    await repo.apply([fault("CP-1", "FAULT", None, datetime(2024, 5, 1, 14, tzinfo=madrid))])
    (event,) = await repo.list_faults()
    assert event.ts == T0 and event.ts.tzinfo is not None
    with pytest.raises(ValueError, match="timezone"):
        await repo.apply([fault("CP-1", "FAULT", None, datetime(2024, 5, 1))])  # noqa: DTZ001
    assert len(await repo.list_faults()) == 1


# ----------------------------------------------------------------------------- sessions


async def test_a_duplicate_request_or_session_id_writes_nothing(repo: Repository) -> None:
    await repo.apply(accepted(session(1)))
    await repo.apply(accepted(session(2, request_id="R-1")))
    await repo.apply(accepted(session(1, request_id="R-other")))
    assert await repo.get_session("S-2") is None
    assert await repo.list_sessions() == [session(1)]
    assert await repo.get_session("S-1") == session(1)
    assert await repo.get_session("nope") is None


async def test_a_session_write_checks_its_values_when_built(repo: Repository) -> None:
    with pytest.raises(ValueError, match="status"):
        writes.SessionOpened(session(1, status="RUNNING"))
    with pytest.raises(ValueError, match="kwh"):
        writes.SessionOpened(
            SessionRecord("S-1", "R-1", "CP-1", "D-1", "ACTIVE", T0, kwh=float("nan")))
    with pytest.raises(ValueError, match="final"):
        finished("S-1", "ACTIVE")
    with pytest.raises(ValueError, match="euros"):
        finished("S-1", "STOPPED", euros=-1.0)
    with pytest.raises(ValueError, match="kwh"):
        writes.TotalsCorrected("S-1", kwh=-1.0, euros=0.0, meter_final=False)
    with pytest.raises(ValueError, match="kw"):
        writes.SiteLimitSet("north", float("inf"), T0)
    with pytest.raises(ValueError, match="timezone"):
        await repo.apply([writes.SessionOpened(
            SessionRecord("S-1", "R-1", "CP-1", "D-1", "ACTIVE", datetime(2024, 1, 1)))])  # noqa: DTZ001
    assert await repo.list_sessions() == []


async def test_finish_only_finishes_an_active_session(repo: Repository) -> None:
    await repo.apply(accepted(session(1)))
    await repo.apply([finished("S-1", SessionResult.COMPLETED, kwh=7.5, euros=2.25,
                               ended_at=at(30))])
    done = await repo.get_session("S-1")
    assert done == SessionRecord(
        "S-1", "R-1", "CP-1", "D-1", "COMPLETED", T0, ended_at=at(30), kwh=7.5, euros=2.25
    )
    assert done is not None and type(done.status) is str

    await repo.apply([finished("S-1", "FAILED", kwh=99.0, euros=99.0, reason="late",
                               ended_at=at(60)),
                      finished("S-404", "STOPPED", ended_at=at(60))])
    assert await repo.get_session("S-1") == done
    assert await repo.get_session("S-404") is None


async def test_a_session_is_dated_by_its_cp_and_its_ledger_corrected(repo: Repository) -> None:
    await repo.apply(accepted(session(1)))
    await repo.apply([writes.SessionStarted("S-1", at(5), at(4))])
    started = await repo.get_session("S-1")
    assert started is not None
    assert (started.started_at, started.first_report) == (at(5), at(4))
    # Totals are corrected only once the session has ended.
    await repo.apply([writes.TotalsCorrected("S-1", kwh=1.0, euros=1.0, meter_final=True)])
    assert await repo.get_session("S-1") == started
    await repo.apply([finished("S-1", "FAILED", kwh=2.0, euros=0.5, reason="CP fault",
                               ended_at=at(9))])
    await repo.apply([writes.TotalsCorrected("S-1", kwh=3.0, euros=0.75, meter_final=True)])
    await repo.apply([writes.TotalsCorrected("S-1", kwh=3.5, euros=0.8, meter_final=False)])
    await repo.apply([writes.CompletedByMeter("S-1", "corrected: completed")])
    done = await repo.get_session("S-1")
    assert done is not None
    assert (done.status, done.reason, done.kwh, done.euros, done.meter_final) == (
        "COMPLETED", "corrected: completed", 3.5, 0.8, True)  # meter_final is never undone
    # Only a FAILED session is completed by its meter.
    await repo.apply(accepted(session(2)))
    await repo.apply([finished("S-2", "STOPPED"), writes.CompletedByMeter("S-2", "x")])
    stopped = await repo.get_session("S-2")
    assert stopped is not None and stopped.status == "STOPPED"


async def test_a_session_keeps_its_car_and_charge(repo: Repository) -> None:
    record = SessionRecord("S-1", "R-1", "CP-1", "D-1", "ACTIVE", T0, kwh_wanted=20.0,
                           departure=at(3600), car_battery_kwh=60.0, car_soc=0.25,
                           car_max_kw=11.0)
    await repo.apply(accepted(record))
    assert await repo.active_sessions() == [record]


async def test_list_sessions_order_filters_and_limit(repo: Repository) -> None:
    specs = [
        # n, cp, driver, started
        (1, "CP-1", "D-1", 10.0),
        (2, "CP-2", "D-1", 30.0),
        (3, "CP-1", "D-2", 20.0),
        (4, "CP-2", "D-2", 30.0),  # same start as S-2, inserted later
        (5, "CP-1", "D-1", 40.0),
    ]
    for n, cp_id, driver_id, started in specs:
        await repo.apply(accepted(session(n, cp_id=cp_id, driver_id=driver_id, started=started)))
    await repo.apply([finished("S-3", "STOPPED", kwh=1.0, euros=1.0, reason="user",
                               ended_at=at(25))])

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
    assert [s.session_id for s in await repo.active_sessions()] == ["S-1", "S-2", "S-4", "S-5"]


async def test_request_log_keeps_the_first_decision(repo: Repository) -> None:
    assert await repo.recent_request_ids(timedelta(minutes=1)) == []
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(3):
        await repo.apply([writes.RequestLogged(f"r{n}", "d", "CP-1", "DENIED", "CP busy",
                                               base + timedelta(minutes=n))])
    await repo.apply([writes.RequestLogged("r1", "d", "CP-1", "ACCEPTED", None, base)])
    # Within a minute of the newest decision (r2, at base + 2 min), whatever the clock.
    assert await repo.recent_request_ids(timedelta(minutes=1)) == ["r1", "r2"]
    assert await repo.recent_request_ids(timedelta(0)) == ["r2"]


# ------------------------------------------------------------------ faults and history


async def test_faults_newest_first_with_filter_and_limit(repo: Repository) -> None:
    await repo.apply([fault("CP-1", FaultEventType.FAULT, "overheat", at(10))])
    await repo.apply([fault("CP-2", "FAULT", None, at(20))])
    await repo.apply([fault("CP-1", FaultEventType.RECOVERY, None, at(30))])
    await repo.apply([fault("CP-1", "MANUAL_RESET", "operator", at(30))])  # same ts, later id

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


async def test_health_history_newest_first_with_limit_and_pruned(repo: Repository) -> None:
    await repo.apply([health("CP-1", CPState.ACTIVATED, False, BreakerState.CLOSED, at(10))])
    await repo.apply([health("CP-1", CPState.SUPPLYING, False, "CLOSED", at(20), "S-1")])
    await repo.apply([health("CP-2", CPState.FAULT, True, BreakerState.OPEN, at(25))])
    await repo.apply([health("CP-1", CPState.FAULT, True, BreakerState.OPEN, at(30))])

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
    await repo.apply([writes.HealthPruned(at(20))])
    assert [h.ts for h in await repo.cp_history("CP-1")] == [at(30), at(20)]


async def test_a_batch_of_health_snapshots(repo: Repository, backend: Backend) -> None:
    await repo.apply([])
    rows = [snapshot(f"CP-{i % 3}", float(i)) for i in range(3 * (MAX_LIMIT + 5))]
    await repo.apply([writes.HealthRecorded(row) for row in rows])

    assert await count(backend, "cp_health_history") == len(rows)
    history = await repo.cp_history("CP-1", limit=MAX_LIMIT * 10)
    assert len(history) == MAX_LIMIT
    assert history[0].ts == rows[-2].ts  # the newest CP-1 row
    assert [h.ts for h in history] == sorted((h.ts for h in history), reverse=True)


async def test_a_batch_is_one_transaction(repo: Repository, backend: Backend) -> None:
    bad = HealthSnapshot(cast(str, None), CPState.ACTIVATED, False, "CLOSED", at(99))
    rows = [writes.HealthRecorded(snapshot("CP-1", float(i))) for i in range(50)]
    with pytest.raises(INTEGRITY):
        await repo.apply([*rows, writes.HealthRecorded(bad)])
    assert await count(backend, "cp_health_history") == 0
    naive = HealthSnapshot("CP-1", CPState.ACTIVATED, False, "CLOSED", datetime(2024, 1, 1))  # noqa: DTZ001
    with pytest.raises(ValueError, match="timezone"):
        await repo.apply([*rows, writes.HealthRecorded(naive)])
    assert await count(backend, "cp_health_history") == 0
    # The failed transactions were rolled back: the next one works.
    await repo.apply(rows)
    assert len(await repo.cp_history("CP-1", limit=100)) == 50
    assert await repo.ping()


# ------------------------------------------------------------ the outbox and the sites


async def test_the_outbox_keeps_each_instances_last_flush_only(repo: Repository) -> None:
    assert await repo.load_flushes() == {}
    await repo.apply([writes.PendingSaved("c-1", "c-1:r:1", "[]", "[]")])
    await repo.apply([fault("CP-1", "FAULT", None, T0),
                      writes.PendingSaved("c-1", "c-1:r:2", "[[1]]", "[2]"),
                      writes.PendingSaved("c-2", "c-2:r:9", "[]", "[3]")])
    assert await repo.load_flushes() == {"c-1": PendingRow("c-1", "c-1:r:2", "[[1]]", "[2]"),
                                         "c-2": PendingRow("c-2", "c-2:r:9", "[]", "[3]")}
    await repo.apply([writes.PendingSettled("c-1")])
    assert list(await repo.load_flushes()) == ["c-2"]


async def test_centrals_say_where_they_answer_and_what_they_claim(repo: Repository) -> None:
    assert await repo.load_centrals() == []
    await repo.apply([
        writes.CentralSaved("c-1", "http://a:8000", "g-central-c-1", frozenset({0, 2}), 12, T0),
        writes.CentralSaved("c-2", "http://b:8000", "g-central-c-2", frozenset({1}), 12, T0),
    ])
    later = T0 + timedelta(seconds=2)
    await repo.apply([
        writes.CentralSaved("c-1", "http://a:8000", "g-central-c-1", frozenset(), 12, later),
        writes.ClaimsCut("c-2", frozenset()),
    ])
    assert await repo.load_centrals() == [
        CentralRecord("c-1", "http://a:8000", "g-central-c-1", frozenset(), 12, later),
        CentralRecord("c-2", "http://b:8000", "g-central-c-2", frozenset(), 12, T0),
    ]


async def test_site_limits_are_set_replaced_and_removed(repo: Repository) -> None:
    assert await repo.load_site_limits() == {}
    await repo.apply([writes.SiteLimitSet("south", 50, T0), writes.SiteLimitSet("north", 22.5, T0)])
    await repo.apply([writes.SiteLimitSet("south", 40.0, at(1)), writes.SiteLimitRemoved("north"),
                      writes.SiteLimitRemoved("nowhere")])
    assert await repo.load_site_limits() == {"south": 40.0}


# ---------------------------------------------------------------- durability and JSON


async def test_reopening_keeps_the_data(backend: Backend) -> None:
    async with backend.make() as repo:
        await repo.apply([upsert(CPRecord("CP-1", state=CPState.ACTIVATED, kw_rate=11.0)),
                          *accepted(session(1)),
                          fault("CP-1", "FAULT", "lost", at(1)),
                          health("CP-1", CPState.FAULT, True, BreakerState.OPEN, at(1))])

    async with backend.make() as repo:
        assert await repo.load_cps() == [
            CPRecord("CP-1", CPState.ACTIVATED, kw_rate=11.0, registered_at=T0, updated_at=T0)
        ]
        assert await repo.active_sessions() == [session(1)]
        assert [e.reason for e in await repo.list_faults()] == ["lost"]
        assert [h.state for h in await repo.cp_history("CP-1")] == [CPState.FAULT]


async def test_as_dict_is_json_ready(repo: Repository) -> None:
    await repo.apply([upsert(CPRecord("CP-1", state=CPState.SUPPLYING, euro_rate=0.4)),
                      *accepted(session(1))])
    await repo.apply([finished("S-1", "COMPLETED", kwh=3.0, euros=1.2, ended_at=at(9)),
                      fault("CP-1", FaultEventType.FAULT, "overheat", at(5)),
                      health("CP-1", CPState.FAULT, True, BreakerState.HALF_OPEN, at(6))])

    (cp,) = await repo.load_cps()
    sess = await repo.get_session("S-1")
    assert sess is not None
    (fault_event,) = await repo.list_faults()
    (snap,) = await repo.cp_history("CP-1")

    decoded = json.loads(json.dumps([r.as_dict() for r in (cp, sess, fault_event, snap)]))
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
        "id": fault_event.id,
        "cp_id": "CP-1",
        "event_type": "FAULT",
        "reason": "overheat",
        "ts": "2024-05-01T12:00:05.000000Z",
    }
    assert health_d["state"] == "FAULT" and health_d["breaker_state"] == "HALF_OPEN"
    assert health_d["ts"].endswith("Z") and health_d["id"] == snap.id
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
            await asyncio.sleep(0.001)  # the ticker's pace: what the test counts
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


async def test_a_large_batch_does_not_block_the_event_loop(repo: Repository) -> None:
    rows = [writes.HealthRecorded(snapshot(f"CP-{i % 50}", i / 1000)) for i in range(5_000)]
    ticks = await _ticks_while(lambda: repo.apply(rows))
    # A blocking write would let the ticker run at most once before the write returned.
    assert ticks > 3
    assert len(await repo.cp_history("CP-7", limit=1000)) == 100


async def test_concurrent_tasks_share_one_repository(repo: Repository, backend: Backend) -> None:
    async def start(n: int) -> None:
        await repo.apply(accepted(session(f"{n}", request_id=f"R-{n % 10}")))

    async def batch(k: int) -> None:
        await repo.apply([writes.HealthRecorded(snapshot("CP-1", k * 100 + i))
                          for i in range(100)])

    async def read() -> int:
        return len(await repo.list_sessions(limit=1000))

    await asyncio.gather(
        *(start(n) for n in range(60)), *(batch(k) for k in range(10)), *(read() for _ in range(10))
    )
    assert len(await repo.list_sessions(limit=1000)) == 10  # one per distinct request id
    assert await count(backend, "cp_health_history") == 1000


async def test_a_write_cancelled_at_its_start_leaves_no_open_transaction(
    repo: Repository, backend: Backend
) -> None:
    rows = [writes.HealthRecorded(snapshot("CP-1", float(i))) for i in range(1000)]
    task = asyncio.create_task(repo.apply(rows))
    # One pass of the loop, not a delay: the task runs to its first await (BEGIN queued
    # on SQLite's connection thread, a pool connection asked for) and is cancelled there.
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert await count(backend, "cp_health_history") == 0
    # No transaction was left open: the next writes work.
    await repo.apply(accepted(session(1)))
    assert await repo.get_session("S-1") == session(1)


# ------------------------------------------------------------------------ SQLite only


async def test_sqlite_schema_has_the_seed_tables_and_indexes(
    sqlite_repo: SqliteRepository, db_path: Path
) -> None:
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


async def test_sqlite_wal_mode_and_connection_pragmas(
    sqlite_repo: SqliteRepository, db_path: Path
) -> None:
    # journal_mode is a property of the file: any connection sees it.
    assert await query(db_path, "PRAGMA journal_mode") == [("wal",)]
    # The others are per connection: look at the repository's own (white box).
    db = sqlite_repo._connection()
    pragmas = {}
    for name in ("synchronous", "foreign_keys", "busy_timeout"):
        rows = list(await db.execute_fetchall(f"PRAGMA {name}"))
        pragmas[name] = rows[0][0]
    assert pragmas == {"synchronous": 1, "foreign_keys": 1, "busy_timeout": 5000}


async def test_sqlite_timestamps_are_utc_text_with_z(
    sqlite_repo: SqliteRepository, db_path: Path
) -> None:
    madrid = timezone(timedelta(hours=2))
    await sqlite_repo.apply([fault("CP-1", "FAULT", None,
                                   datetime(2024, 5, 1, 14, tzinfo=madrid))])
    assert await query(db_path, "SELECT timestamp FROM fault_events") == [
        ("2024-05-01T12:00:00.000000Z",)
    ]


async def test_sqlite_in_memory_database_works() -> None:
    async with SqliteRepository(":memory:") as repo:
        assert await repo.ping()
        await repo.apply([upsert(CPRecord("CP-1"))])
        assert [cp.cp_id for cp in await repo.load_cps()] == ["CP-1"]
        assert repo.is_open


async def test_sqlite_write_cancelled_mid_batch_is_rolled_back(
    sqlite_repo: SqliteRepository, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Alternating kinds in one table: each write is a run of its own, one execute each.
    rows: list[writes.Write] = [
        writes.HealthRecorded(snapshot("CP-1", float(i))) if i % 2 == 0
        else writes.HealthPruned(at(-3600)) for i in range(1000)
    ]
    halfway = len(rows) // 2
    mid_batch = asyncio.Event()
    executed = 0
    real_execute = aiosqlite.Connection.execute

    async def execute_pausing_halfway(
        self: aiosqlite.Connection, sql: str, parameters: Any = None
    ) -> Any:
        # Hold the batch with half its rows inserted, until the test cancels the write.
        nonlocal executed
        executed += 1
        if executed == halfway:
            mid_batch.set()
            await asyncio.Event().wait()  # cancelled here
        return await real_execute(self, sql, parameters)

    monkeypatch.setattr(aiosqlite.Connection, "execute", execute_pausing_halfway)
    task = asyncio.create_task(sqlite_repo.apply(rows))
    await asyncio.wait_for(mid_batch.wait(), 5)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done and task.cancelled()
    monkeypatch.undo()
    # The ROLLBACK undid every row inserted before the cancel: nothing was committed.
    assert await query(db_path, "SELECT COUNT(*) FROM cp_health_history") == [(0,)]
    # No transaction was left open: the repository still works, and the same batch,
    # written again, is stored exactly once.
    await sqlite_repo.apply(rows)
    assert await query(db_path, "SELECT COUNT(*) FROM cp_health_history") == [(len(rows) // 2,)]


# ------------------------------------------------------------------- CENTRAL_DB_URL


def test_central_db_url_chooses_the_adapter(tmp_path: Path) -> None:
    settings = CentralSettings(db_path=tmp_path / "c.db")
    assert settings.database_url == f"sqlite:///{tmp_path / 'c.db'}"
    repo, where = make_repository(settings.database_url)
    assert isinstance(repo, SqliteRepository) and repo.path == tmp_path / "c.db"
    assert where == str(tmp_path / "c.db")
    url = "postgresql://central:s3cret@db.example:5432/ev"
    settings = CentralSettings(db_url=url)
    assert settings.database_url == url
    repo, where = make_repository(settings.database_url)
    assert isinstance(repo, PostgresRepository)
    assert where == "postgresql://central:***@db.example:5432/ev"
    assert "s3cret" not in repr(settings)


def test_central_db_url_must_name_a_known_database() -> None:
    with pytest.raises(ValueError, match="postgresql://"):
        CentralSettings(db_url="mysql://h/db")


async def test_an_unreachable_postgresql_is_a_storage_error() -> None:
    repo = PostgresRepository("postgresql://nobody:x@127.0.0.1:9/none", connect_timeout=2.0)
    with pytest.raises(StorageError, match=r"nobody:\*\*\*@127\.0\.0\.1:9/none"):
        await repo.open()
    assert not await repo.ping()


@pytest.mark.integration
async def test_postgresql_connections_cut_heal_on_new_ones(
    request: pytest.FixtureRequest,
) -> None:
    """PostgreSQL restarted or its connections killed: a write gets a new connection from
    the pool, or, when the pool had not yet seen its connection die, fails once with
    StorageError (the outbox retries it: nothing half written); then writes work again."""
    backend = _postgres_backend(request)
    async with backend.make() as repo:
        await repo.apply(accepted(session(1)))
        for n in range(5):
            await backend.raw("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                              " WHERE datname = current_database() AND pid <> pg_backend_pid()")
            write = [finished("S-1", "COMPLETED", kwh=1.0 + n, ended_at=at(5))] if n == 0 else [
                writes.TotalsCorrected("S-1", kwh=1.0 + n, euros=0.0, meter_final=True)]
            failures = 0
            while True:
                try:
                    await repo.apply(write)
                    break
                except StorageError:
                    failures += 1
                    assert failures < 3, "the pool did not heal"
                    assert repo.write_error is not None
            assert repo.write_error is None and await repo.ping()
        done = await repo.get_session("S-1")
        assert done is not None and (done.status, done.kwh) == ("COMPLETED", 5.0)


@pytest.mark.integration
async def test_postgresql_that_does_not_answer_in_time_is_a_storage_error(
    request: pytest.FixtureRequest,
) -> None:
    """A statement that gets no answer (here stuck on a lock another connection holds; a
    black-holed server alike) fails with StorageError at the command timeout, and a write
    waiting for a connection of the full pool at the acquire timeout, instead of hanging
    until TCP gives up; once the lock is gone, writes work again."""
    server = cast(LocalPostgres, request.getfixturevalue("postgres_server"))
    name = f"repo_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name)
    request.addfinalizer(lambda: server.drop_database(name))
    loop = asyncio.get_running_loop()
    async with PostgresRepository(url, clock=FakeClock(), max_size=1, command_timeout=1.5,
                                  acquire_timeout=0.3) as repo:
        await repo.apply(accepted(session(1)))
        blocker = await asyncpg.connect(url)
        try:
            holding = blocker.transaction()
            await holding.start()
            await blocker.execute("LOCK TABLE charging_sessions IN ACCESS EXCLUSIVE MODE")
            started = loop.time()
            stuck = asyncio.create_task(repo.apply([finished("S-1", "COMPLETED", kwh=2.0)]))

            async def waiting_on_the_lock() -> bool:
                return bool(await blocker.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"
                    " AND relation = 'charging_sessions'::regclass"))

            await poll(waiting_on_the_lock, timeout=5.0, what="the write to wait on the lock")
            # the pool's one connection is taken: the next write waits for it, not forever
            with pytest.raises(StorageError, match=r"no connection free within 0\.3 s"):
                await repo.apply([finished("S-1", "COMPLETED", kwh=3.0)])
            with pytest.raises(StorageError, match=r"no answer within 1\.5 s"):
                await stuck
            assert loop.time() - started < 5.0
            assert repo.write_error is not None and not await repo.ping()
        finally:
            await blocker.close()
        await repo.apply([finished("S-1", "COMPLETED", kwh=4.0)])
        assert repo.write_error is None and await repo.ping()
        done = await repo.get_session("S-1")
        assert done is not None and (done.status, done.kwh) == ("COMPLETED", 4.0)


# ------------------------------------------------------------ network-wide job locks (§9)


async def test_one_repository_holds_a_job_lock_until_it_closes(backend: Backend) -> None:
    """Two Centrals on one database: one holds "allocation"; when it closes, the other
    takes it on its next call. SQLite always holds (one Central per file)."""
    async with backend.make() as first, backend.make() as second:
        assert await first.hold_lock("allocation")
        assert await first.hold_lock("allocation")  # idempotent: kept, not taken twice
        if backend.kind == "sqlite":
            assert await second.hold_lock("allocation")
            await second.release_lock("allocation")
            assert await second.hold_lock("allocation")
            return
        assert not await second.hold_lock("allocation")
        assert await second.hold_lock("other job")  # another name, another lock
        await first.close()
        await poll(lambda: second.hold_lock("allocation"), timeout=10.0,
                   what="the second repository to take the lock the first gave up")
        await second.release_lock("allocation")
        await second.release_lock("allocation")  # not held: nothing
        async with backend.make() as third:
            assert await third.hold_lock("allocation")
            assert not await second.hold_lock("allocation")


@pytest.mark.integration
async def test_a_job_lock_lost_with_its_connection_passes_to_another(
    request: pytest.FixtureRequest,
) -> None:
    """The connection that holds the lock is terminated: the lock is gone, the other
    repository takes it on its next call, and the first, asked again, reconnects and
    answers honestly (not held) until the lock is free again."""
    backend = _postgres_backend(request)
    async with backend.make() as first, backend.make() as second:
        assert await first.hold_lock("allocation")
        assert not await second.hold_lock("allocation")
        [(pid,)] = await backend.raw(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())")
        await backend.raw(f"SELECT pg_terminate_backend({int(pid)})")
        await poll(lambda: second.hold_lock("allocation"), timeout=10.0,
                   what="the second repository to take the lock of a terminated connection")
        assert not await first.hold_lock("allocation")
        await second.release_lock("allocation")
        assert await first.hold_lock("allocation")
        assert not await second.hold_lock("allocation")
