"""The summary kept up as CPs change (SPEC §5: ``/summary`` costs the same at 100 CPs as at
500,000): :class:`~evcharging.apps.ev_central.tally.Tally` against the full recount
:func:`~evcharging.apps.ev_central.schemas.summarise`, over random changes."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from evcharging.apps.ev_central import tally as tally_module
from evcharging.apps.ev_central.controller import CentralOptions
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.apps.ev_central.schemas import summarise
from evcharging.apps.ev_central.tally import Tally
from evcharging.apps.ev_central.views import ActiveSession, CPView
from evcharging.common.circuit_breaker import CircuitBreaker
from evcharging.common.messages import (
    CPRegistration,
    CPStatus,
    CPTelemetry,
    DriverRequest,
    StatusEvent,
)
from evcharging.common.states import CPState
from tests.unit.conftest import FlushingController
from tests.unit.fakes import RecordingPublisher

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SITES = (None, "north", "south", "east")


def view(cp_id: str) -> CPView:
    return CPView(cp_id=cp_id, breaker=CircuitBreaker())


def session(cp_id: str, n: int, kw: float) -> ActiveSession:
    return ActiveSession(session_id=f"s-{cp_id}-{n}", request_id=f"r-{cp_id}-{n}",
                         driver_id="d-1", cp_id=cp_id, started_at=NOW, kw=kw)


def change(rng: random.Random, cp: CPView, n: int) -> None:
    """One random write of a field the summary counts (or of a session's power)."""
    what = rng.randrange(10)
    if what == 0:
        cp.state = rng.choice(list(CPState))
    elif what == 1:
        cp.site = rng.choice(SITES)
    elif what == 2:
        cp.is_faulty = not cp.is_faulty
    elif what == 3:
        cp.session = session(cp.cp_id, n, rng.uniform(0, 50)) if cp.session is None else None
    elif what == 4 and cp.session is not None:
        cp.session.kw = rng.choice((0.0, 7.4, 11.0, 22.0, rng.uniform(0, 350)))
    elif what == 5:
        cp.last_telemetry = CPTelemetry(cp_id=cp.cp_id, kw=rng.uniform(0, 50), kwh=1.0,
                                        euros=0.3)
    elif what == 6:
        cp.monitor_interval = rng.choice((None, 1.0, 5.0))
    elif what == 7:
        cp.monitor_lost = not cp.monitor_lost
    elif what == 8:
        cp.registered = True
    else:
        cp.state, cp.session = CPState.SUPPLYING, session(cp.cp_id, n, rng.uniform(0, 22))


@pytest.mark.parametrize("seed", range(25))
def test_the_kept_counts_always_equal_a_full_recount(seed: int) -> None:
    rng = random.Random(seed)
    tally = Tally()
    cps: dict[str, CPView] = {}
    for n in range(600):
        step = rng.random()
        if step < 0.15 or not cps:
            cp = view(f"CP-{n}")
            cp.registered = rng.random() < 0.7
            cp.state = rng.choice(list(CPState))
            cps[cp.cp_id] = cp
            tally.add(cp)
        elif step < 0.2:
            gone = cps.pop(rng.choice(sorted(cps)))
            tally.remove(gone)
            gone.state = CPState.SUPPLYING  # no longer counted: changes nothing
        else:
            for _ in range(rng.randint(1, 4)):
                change(rng, cps[rng.choice(sorted(cps))], n)
        if rng.random() < 0.3:  # sometimes several steps between two answers
            assert tally.summary(NOW) == summarise(cps.values(), NOW), f"step {n}"
            assert tally.registered == sum(cp.registered for cp in cps.values())
            assert set(tally.unregistered) == {c for c, cp in cps.items() if not cp.registered}
    assert tally.summary(NOW) == summarise(cps.values(), NOW)


def test_an_empty_tally_is_an_empty_network() -> None:
    assert Tally().summary(NOW) == summarise([], NOW)


def test_a_view_is_counted_by_one_tally_only() -> None:
    cp = view("CP-1")
    Tally([cp])
    with pytest.raises(ValueError, match="CP-1"):
        Tally([cp])


def test_a_removed_view_tells_nothing_and_removing_twice_is_harmless() -> None:
    cp = view("CP-1")
    tally = Tally([cp])
    tally.remove(cp)
    tally.remove(cp)
    cp.state = CPState.FAULT
    cp.registered = False
    assert tally.summary(NOW) == summarise([], NOW)
    assert tally.registered == 0 and not tally.unregistered


def test_power_never_drifts() -> None:
    """A million changes of power sum exactly: the tally adds whole µkW."""
    cp = view("CP-1")
    cp.state, cp.session = CPState.SUPPLYING, session("CP-1", 0, 0.0)
    tally = Tally([cp])
    rng = random.Random(7)
    for _ in range(100_000):
        assert cp.session is not None
        cp.session.kw = rng.uniform(0, 350)
        tally.settle()
    cp.session.kw = 0.1
    assert tally.summary(NOW).power_kw == 0.1
    assert tally.power_ukw == 100_000


def test_a_summary_costs_the_cps_that_changed_not_the_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 100 CPs and at 500,000, an answer recounts only the CPs changed since the last."""
    recounts = 0
    part = tally_module._part

    def counting(cp: CPView) -> object:
        nonlocal recounts
        recounts += 1
        return part(cp)

    for size in (100, 500_000):
        tally = Tally()
        cps = [view(f"CP-{n}") for n in range(size)]
        for cp in cps:
            tally.add(cp)
        tally.summary(NOW)
        monkeypatch.setattr(tally_module, "_part", counting)
        recounts = 0
        for cp in cps[:10]:
            cp.state = CPState.ACTIVATED
            cp.state = CPState.SUPPLYING  # twice: recounted once
        summary = tally.summary(NOW)
        assert recounts == 10
        assert summary.cps == size and summary.by_state[CPState.SUPPLYING] == 10
        recounts = 0
        tally.summary(NOW)
        assert recounts == 0
        monkeypatch.setattr(tally_module, "_part", part)


async def test_the_controller_keeps_its_tally_over_random_traffic(
    repo: SqliteRepository,
) -> None:
    """A real controller driven as Kafka and the API would: its tally equals a recount of
    its CPs after every message."""
    rng = random.Random(42)
    bus = RecordingPublisher()
    central = FlushingController(bus, repo, CentralOptions(start_timeout=30.0,
                                                           max_unregistered=5))
    ids = [f"CP-{n}" for n in range(12)]
    try:
        for n in range(400):
            cp_id = rng.choice(ids)
            cp = central.cps.get(cp_id)
            kind = rng.randrange(6)
            if kind == 0:
                await central.register(CPRegistration(cp_id=cp_id, site=rng.choice(SITES)))
            elif kind == 1:
                await central.handle_status(CPStatus(
                    cp_id=cp_id, state=rng.choice((CPState.ACTIVATED, CPState.STOPPED,
                                                   CPState.FAULT)),
                    event=StatusEvent.HEARTBEAT))
            elif kind == 2:
                await central.handle_request(
                    DriverRequest(request_id=f"r-{n}", driver_id="d-1", cp_id=cp_id))
            elif kind == 3 and cp is not None and cp.session is not None:
                await central.handle_status(CPStatus(
                    cp_id=cp_id, state=CPState.SUPPLYING, session_id=cp.session.session_id))
                await central.handle_telemetry(CPTelemetry(
                    cp_id=cp_id, session_id=cp.session.session_id, kw=rng.uniform(1, 50),
                    kwh=0.5, euros=0.2))
            elif kind == 4 and cp is not None:
                await central.report_fault(cp_id, rng.random() < 0.5, "test")
            elif kind == 5 and cp is not None:
                await central.monitor_report(cp_id, 1.0, True)
            assert central.tally.summary(NOW) == summarise(central.cps.values(), NOW), n
    finally:
        await central.close()
