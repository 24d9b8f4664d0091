"""Retention runs once for the network (SPEC §9): only the Central holding its job lock
prunes the health history."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from evcharging.apps.ev_central import housekeeping, writes
from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.records import HealthSnapshot
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.common.circuit_breaker import BreakerState
from evcharging.common.messages import utcnow
from evcharging.common.states import CPState
from tests.polling import poll
from tests.unit.fakes import RecordingPublisher


@pytest.mark.parametrize("held", [True, False])
async def test_only_the_lock_holder_prunes_the_history(
    bus: RecordingPublisher, repo: SqliteRepository, monkeypatch: pytest.MonkeyPatch,
    held: bool,
) -> None:
    old = HealthSnapshot("CP-1", CPState.ACTIVATED, False, BreakerState.CLOSED.value,
                         utcnow() - timedelta(days=30))
    await repo.apply([writes.HealthRecorded(old)])
    asked: list[str] = []

    async def hold_lock(name: str) -> bool:
        asked.append(name)
        return held

    monkeypatch.setattr(repo, "hold_lock", hold_lock)
    monkeypatch.setattr(housekeeping, "PRUNE_EVERY", 0.0)  # every round
    central = Controller(bus, repo)
    job = asyncio.create_task(housekeeping.run(central, 0.01, retention_days=7))
    try:
        await poll(lambda: len(asked) >= 3, timeout=5.0, what="three rounds")
        await central.outbox.flush()
        history = await repo.cp_history("CP-1")
        assert asked[0] == housekeeping.RETENTION_LOCK
        assert (history == []) is held
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        await central.close()
