"""The outbox: a batch of decisions is one transaction, announced only once recorded."""

from __future__ import annotations

from collections import Counter

import pytest

from evcharging.apps.ev_central import sql
from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.outbox import Outbox
from evcharging.apps.ev_central.repository import SqliteRepository, StorageError
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPRegistration,
    CPState,
    CPStatus,
    DriverRequest,
    DriverUpdate,
    FaultEventType,
    StatusEvent,
    utcnow,
)
from tests.unit.fakes import RecordingPublisher


async def test_many_decisions_are_one_transaction_then_their_messages_in_order(
    bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    """As the consumer does it: 50 requests on 50 CPs handled, then one flush."""
    central = Controller(bus, repo)
    for i in range(50):
        await central.register(CPRegistration(cp_id=f"CP-{i:02d}"))
        await central.handle_status(CPStatus(cp_id=f"CP-{i:02d}", state=CPState.ACTIVATED,
                                             event=StatusEvent.CONNECT))
    await central.flush()
    before = central.stats["db_transactions"]
    for i in range(50):
        await central.handle_request(
            DriverRequest(request_id=f"r-{i:02d}", driver_id="d", cp_id=f"CP-{i:02d}")
        )
    assert bus.of(DriverUpdate) == []  # nothing announced before the batch is written
    await central.flush()
    assert central.stats["db_transactions"] == before + 1
    assert len(await repo.active_sessions()) == 50
    assert [u.request_id for u in bus.of(DriverUpdate)] == [f"r-{i:02d}" for i in range(50)]
    starts = [c for c in bus.of(CentralCommand) if c.cmd is CommandType.START_SUPPLY]
    assert len(starts) == 50
    await central.close()


async def test_a_failed_flush_keeps_everything_for_the_next(
    bus: RecordingPublisher, repo: SqliteRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats: Counter[str] = Counter()
    outbox = Outbox(repo, bus, stats)
    outbox.write(sql.fault_event("CP-1", FaultEventType.FAULT, "hot", utcnow()))
    outbox.send(CentralCommand(cp_id="CP-1", cmd=CommandType.STOP_CP))
    real_apply = repo.apply

    async def locked(ops: object) -> None:
        raise StorageError("database is locked")

    monkeypatch.setattr(repo, "apply", locked)
    with pytest.raises(StorageError):
        await outbox.flush()
    assert outbox.pending == 2 and bus.messages == []
    monkeypatch.setattr(repo, "apply", real_apply)
    await outbox.flush()
    assert outbox.pending == 0
    assert [f.event_type for f in await repo.list_faults()] == ["FAULT"]
    assert len(bus.of(CentralCommand)) == 1
    assert stats["db_transactions"] == 1
