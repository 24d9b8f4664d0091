"""Central's limits on what it holds (SPEC §5, §11): CPs known only from the bus are capped
and forgotten after an hour of silence, registered CPs are capped at CENTRAL_MAX_CPS, and
whether a CP was registered survives a restart (over a real SQLite file)."""

from __future__ import annotations

import random
import sqlite3
import string
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from evcharging.apps.ev_central import housekeeping, sql, writes
from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.limits import MAX_CPS, MAX_UNREGISTERED, TooManyCPs
from evcharging.apps.ev_central.metrics import central_metrics
from evcharging.apps.ev_central.records import CPRecord, utcnow_
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.apps.ev_central.views import CPView
from evcharging.common.config import CentralSettings
from evcharging.common.messages import CPRegistration, CPStatus, DriverRequest
from evcharging.common.metrics import PREFIX
from evcharging.common.states import CPState
from tests.unit.conftest import FlushingController
from tests.unit.fakes import RecordingPublisher

HOUR = 3600.0


def random_ids(rng: random.Random, count: int) -> list[str]:
    alphabet = string.ascii_letters + string.digits + "._-"
    ids: set[str] = set()
    while len(ids) < count:
        ids.add("".join(rng.choices(alphabet, k=rng.randint(1, 64))))
    return sorted(ids)


@pytest.fixture
async def central(repo: SqliteRepository) -> AsyncIterator[FlushingController]:
    controller = FlushingController(RecordingPublisher(), repo)
    yield controller
    await controller.close()


def limited(repo: SqliteRepository, **options: float) -> FlushingController:
    return FlushingController(RecordingPublisher(), repo, CentralOptions(**options))  # type: ignore[arg-type]


async def status(central: Controller, cp_id: str, state: CPState = CPState.ACTIVATED) -> None:
    await central.handle_status(CPStatus(cp_id=cp_id, state=state))


def bus_only(central: Controller) -> set[str]:
    return {cp_id for cp_id, cp in central.cps.items() if not cp.registered}


# ---------------------------------------------------------------------- the defaults


def test_the_limits_default_to_the_spec() -> None:
    options = CentralOptions()
    assert (options.max_cps, options.max_unregistered) == (MAX_CPS, MAX_UNREGISTERED)
    assert (MAX_CPS, MAX_UNREGISTERED, options.forget_unregistered_after) == (
        100_000, 1_000, HOUR)
    settings = CentralSettings()
    assert (settings.max_cps, settings.max_unregistered) == (100_000, 1_000)
    for name in ("max_cps", "max_unregistered"):
        assert CentralSettings.model_fields[name].description


def test_the_limits_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CENTRAL_MAX_CPS", "50")
    monkeypatch.setenv("CENTRAL_MAX_UNREGISTERED", "0")
    assert (CentralSettings().max_cps, CentralSettings().max_unregistered) == (50, 0)


# ---------------------------------------------------------------------- CPs from the bus


async def test_2000_statuses_from_random_ids_leave_exactly_1000_bus_only_cps(
    central: FlushingController, logs: list[tuple[str, str]]
) -> None:
    ids = random_ids(random.Random(14), 2000)
    for cp_id in ids:
        await status(central, cp_id)
    assert len(central.cps) == 1000 and len(bus_only(central)) == 1000
    assert len(central.tally.unregistered) == 1000 and central.tally.registered == 0
    assert central.stats["unregistered_refused"] == 1000
    assert central.tally.summary(utcnow_()).cps == 1000
    page = central_metrics(central, process=False).render().decode()
    assert f"{PREFIX}cps_unregistered 1000.0" in page.splitlines()
    assert f"{PREFIX}unregistered_refused_total 1000.0" in page.splitlines()
    refusals = [m for level, m in logs if "CENTRAL_MAX_UNREGISTERED" in m]
    assert len(refusals) == 1 and logs.count(("WARNING", refusals[0])) == 1  # once, not 1000x
    # a refused CP stays unknown: its next status is ignored too, and so is a request
    refused = next(cp_id for cp_id in ids if cp_id not in central.cps)
    await status(central, refused, CPState.SUPPLYING)
    await central.handle_request(DriverRequest(request_id="r-1", driver_id="d-1",
                                               cp_id=refused))
    assert refused not in central.cps and central.stats["unregistered_refused"] == 1001


async def test_registered_cps_do_not_count_against_the_bus_cap(
    repo: SqliteRepository,
) -> None:
    central = limited(repo, max_unregistered=2)
    for n in range(5):
        await central.register(CPRegistration(cp_id=f"REG-{n}"))
    for cp_id in ("BUS-1", "BUS-2", "BUS-3"):
        await status(central, cp_id)
    assert bus_only(central) == {"BUS-1", "BUS-2"} and central.tally.registered == 5
    # A CP first seen on the bus and registered later leaves the bus-only count: room again.
    await central.register(CPRegistration(cp_id="BUS-1", location="depot"))
    assert central.cps["BUS-1"].registered and bus_only(central) == {"BUS-2"}
    await status(central, "BUS-3")
    assert bus_only(central) == {"BUS-2", "BUS-3"}
    # Statuses of registered or known CPs are never refused.
    await status(central, "REG-0", CPState.STOPPED)
    assert central.cps["REG-0"].state is CPState.STOPPED
    await central.close()


async def test_no_bus_only_cps_at_all_with_a_cap_of_0(repo: SqliteRepository) -> None:
    central = limited(repo, max_unregistered=0)
    await status(central, "BUS-1")
    assert central.cps == {} and central.stats["unregistered_refused"] == 1
    await central.close()


# ---------------------------------------------------------------------- forgetting


def silent_for(central: Controller, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Make ``central.silence`` answer from a table (cp_id -> seconds; 0 when absent)."""
    table: dict[str, float] = {}

    def silence(cp: CPView) -> float:
        return table.get(cp.cp_id, 0.0)

    monkeypatch.setattr(central, "silence", silence)
    return table


async def test_bus_only_cps_silent_for_an_hour_are_forgotten(
    central: FlushingController, repo: SqliteRepository, monkeypatch: pytest.MonkeyPatch,
    logs: list[tuple[str, str]],
) -> None:
    for cp_id in ("BUS-1", "BUS-2", "BUS-3"):
        await status(central, cp_id)
    await central.register(CPRegistration(cp_id="REG-1"))
    silence = silent_for(central, monkeypatch)
    silence.update({"BUS-1": HOUR, "BUS-2": HOUR - 1, "REG-1": 10 * HOUR})

    assert housekeeping.forget_unregistered(central) == ["BUS-1"]
    await central.outbox.flush()
    assert set(central.cps) == {"BUS-2", "BUS-3", "REG-1"}  # a registered CP is never
    page = central_metrics(central, process=False).render().decode().splitlines()
    assert f"{PREFIX}unregistered_forgotten_total 1.0" in page
    assert central.stats["unregistered_forgotten"] == 1
    assert central.tally.summary(utcnow_()).cps == 3
    assert [r.cp_id for r in await repo.load_cps()] == ["BUS-2", "BUS-3", "REG-1"]
    assert any("forgot 1 CP(s)" in m for _, m in logs)

    silence["BUS-2"] = HOUR
    assert housekeeping.forget_unregistered(central) == ["BUS-2"]
    assert housekeeping.forget_unregistered(central) == []
    # A forgotten CP that speaks again is new again (and counted again).
    await status(central, "BUS-1")
    assert "BUS-1" in central.cps and not central.cps["BUS-1"].registered


async def test_a_bus_only_cp_with_a_session_is_kept(
    central: FlushingController, monkeypatch: pytest.MonkeyPatch
) -> None:
    await status(central, "BUS-1")
    await central.handle_request(DriverRequest(request_id="r-1", driver_id="d-1",
                                               cp_id="BUS-1"))
    assert central.cps["BUS-1"].session is not None
    silent_for(central, monkeypatch)["BUS-1"] = 2 * HOUR
    assert housekeeping.forget_unregistered(central) == []


async def test_forgetting_makes_room_under_the_cap(
    repo: SqliteRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    central = limited(repo, max_unregistered=1)
    await status(central, "BUS-1")
    await status(central, "BUS-2")
    assert bus_only(central) == {"BUS-1"}
    silent_for(central, monkeypatch)["BUS-1"] = HOUR
    housekeeping.forget_unregistered(central)
    await status(central, "BUS-2")
    assert bus_only(central) == {"BUS-2"}
    await central.close()


# ---------------------------------------------------------------------- CENTRAL_MAX_CPS


async def test_registering_a_new_cp_past_max_cps_is_refused(repo: SqliteRepository) -> None:
    central = limited(repo, max_cps=3)
    for n in range(3):
        await central.register(CPRegistration(cp_id=f"CP-{n}"))
    await status(central, "BUS-1")  # bus-only CPs do not count
    with pytest.raises(TooManyCPs) as refused:
        await central.register(CPRegistration(cp_id="CP-3"))
    assert refused.value.http_status == 409 and refused.value.code == "too_many_cps"
    assert "CENTRAL_MAX_CPS" in refused.value.message
    with pytest.raises(TooManyCPs):  # a bus-only CP registering is a new one too
        await central.register(CPRegistration(cp_id="BUS-1"))
    assert "CP-3" not in central.cps and not central.cps["BUS-1"].registered
    assert central.stats["registrations_refused"] == 2
    # updates of CPs it holds are never refused
    cp = await central.register(CPRegistration(cp_id="CP-0", location="moved"))
    assert cp.location == "moved" and central.tally.registered == 3
    await central.close()


async def test_fleet_registration_past_max_cps_takes_nothing(repo: SqliteRepository) -> None:
    """All or nothing (a fleet learns at once, and runs nothing half registered)."""
    central = limited(repo, max_cps=5)
    assert await central.register_many([CPRegistration(cp_id=f"CP-{n}") for n in range(3)]) == 3
    batch = [CPRegistration(cp_id=f"CP-{n}", location="new") for n in range(1, 6)]  # 3 new
    with pytest.raises(TooManyCPs, match="3 new refused, 2 free"):
        await central.register_many(batch)
    assert sorted(central.cps) == ["CP-0", "CP-1", "CP-2"]
    assert all(cp.location is None for cp in central.cps.values())  # updates not taken
    assert [r.cp_id for r in await repo.load_cps()] == ["CP-0", "CP-1", "CP-2"]
    # exactly up to the cap, duplicates counted once, is taken
    batch = [CPRegistration(cp_id=cp_id) for cp_id in ("CP-3", "CP-4", "CP-4", "CP-0")]
    assert await central.register_many(batch) == 3  # "new" counts entries, as before
    assert central.tally.registered == 5
    await central.close()


# ---------------------------------------------------------------------- restarts


async def test_whether_a_cp_was_registered_survives_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "central.db"
    async with SqliteRepository(path) as repo:
        central = FlushingController(RecordingPublisher(), repo)
        await central.register(CPRegistration(cp_id="REG-1"))
        await status(central, "BUS-1")
        await status(central, "BUS-2")
        await status(central, "REG-2")
        await central.register(CPRegistration(cp_id="REG-2"))  # from the bus, then registered
        await central.close()
    async with SqliteRepository(path) as repo:
        central = FlushingController(RecordingPublisher(), repo)
        await central.load()
        assert bus_only(central) == {"BUS-1", "BUS-2"}
        assert set(central.tally.unregistered) == {"BUS-1", "BUS-2"}
        assert central.tally.registered == 2
        assert central.tally.summary(utcnow_()).cps == 4
        # a restarted Central forgets them as any other: after an hour of silence
        silent_for(central, monkeypatch)["BUS-1"] = HOUR
        assert housekeeping.forget_unregistered(central) == ["BUS-1"]
        await central.close()
    async with SqliteRepository(path) as repo:
        assert [r.cp_id for r in await repo.load_cps()] == ["BUS-2", "REG-1", "REG-2"]


async def test_a_registration_is_never_undone_by_an_older_write(
    repo: SqliteRepository,
) -> None:
    now = utcnow_()
    await repo.apply([writes.CPUpserted(CPRecord("CP-1", registered=True), now)])
    await repo.apply([writes.CPUpserted(CPRecord("CP-1", registered=False), now)])
    await repo.apply([writes.CPForgotten("CP-1")])
    (record,) = await repo.load_cps()
    assert record.registered is True


async def test_an_older_database_gets_the_column_and_its_cps_count_as_registered(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
    for version, statements in enumerate(sql.MIGRATIONS[:4], start=1):
        for statement in statements:
            db.execute(statement)
        db.execute("INSERT INTO schema_version VALUES (?, 'then')", (version,))
    db.execute("INSERT INTO cp_registry (cp_id, state, registered_at, updated_at)"
               " VALUES ('OLD-1', 'ACTIVATED', '2026-01-01T00:00:00.000000Z',"
               " '2026-01-01T00:00:00.000000Z')")
    db.commit()
    db.close()
    async with SqliteRepository(path) as repo:
        (record,) = await repo.load_cps()
        assert record.cp_id == "OLD-1" and record.registered is True
        central = FlushingController(RecordingPublisher(), repo)
        await central.load()
        assert central.cps["OLD-1"].registered and central.tally.registered == 1
        await central.close()
