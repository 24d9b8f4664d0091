"""The outbox: a batch of decisions is one transaction, announced only once recorded."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from evcharging.apps.ev_central import outbox as outbox_module
from evcharging.apps.ev_central import writes
from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.outbox import OFFSETS_EVERY, Outbox, PendingFlush
from evcharging.apps.ev_central.repository import SqliteRepository, StorageError
from evcharging.common.bus import BusError, Fenced
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPRegistration,
    CPState,
    CPStatus,
    DriverRequest,
    DriverUpdate,
    FaultEventType,
    Message,
    StatusEvent,
    utcnow,
)
from tests.polling import poll
from tests.unit.fakes import RecordingPublisher, TransactionalBus


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
    outbox.write(writes.FaultRecorded("CP-1", FaultEventType.FAULT, "hot", utcnow()))
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


# ------------------------------------------------------------------ exactly once (SPEC §4)


T0 = utcnow()


def number(token: str) -> int:
    """A flush token's sequence number (instance:run:seq)."""
    return int(token.rsplit(":", 1)[1])


def command(cp_id: str) -> CentralCommand:
    return CentralCommand(cp_id=cp_id, cmd=CommandType.STOP_CP, ts=T0)


async def started(repo: SqliteRepository, kafka: TransactionalBus, **kwargs: Any) -> Outbox:
    outbox = Outbox(repo, kafka, Counter(), **kwargs)
    await outbox.recover(kafka.read_committed)
    return outbox


async def test_a_flush_is_one_db_transaction_and_one_kafka_transaction_with_its_offsets(
    repo: SqliteRepository,
) -> None:
    kafka = TransactionalBus()
    sent: list[Message] = []
    outbox = await started(repo, kafka, on_sent=sent.append)
    assert outbox.transactional
    outbox.write(writes.FaultRecorded("CP-1", FaultEventType.FAULT, "hot", utcnow()))
    outbox.send(command("CP-1"))
    outbox.consumed(("cp.status", 0), 41)
    outbox.consumed(("cp.status", 0), 42)
    outbox.consumed(("driver.requests", 3), 7)
    await outbox.flush()
    assert [c[:2] for c in kafka.commits] == [([command("CP-1")], {("cp.status", 0): 42,
                                                                   ("driver.requests", 3): 7})]
    assert number(kafka.commits[0][2]) == 1
    assert sent == [command("CP-1")]  # told once Kafka committed it
    row = (await repo.load_flushes())[""]
    assert row.token == kafka.commits[0][2]  # the flush's mark on its offsets
    assert PendingFlush.from_row(row).messages == (command("CP-1"),)
    assert [f.event_type for f in await repo.list_faults()] == ["FAULT"]
    outbox.send(command("CP-2"))
    await outbox.flush()
    assert kafka.commits[-1][:2] == ([command("CP-2")], {("cp.status", 0): 42,
                                                         ("driver.requests", 3): 7})
    assert number(kafka.commits[-1][2]) == 2
    await outbox.flush()  # nothing new: no transaction at all
    assert len(kafka.commits) == 2 and outbox.seq == 2


async def test_a_failed_kafka_transaction_is_tried_again_with_the_same_content(
    repo: SqliteRepository,
) -> None:
    kafka = TransactionalBus()
    outbox = await started(repo, kafka)
    kafka.failures = 2
    outbox.send(command("CP-1"))
    outbox.consumed(("cp.status", 1), 5)
    await outbox.flush()
    assert kafka.attempts == 3
    assert [c[:2] for c in kafka.commits] == [([command("CP-1")], {("cp.status", 1): 5})]
    assert number(kafka.commits[0][2]) == 1


async def test_offsets_alone_wait_and_keep_the_sequence_number(repo: SqliteRepository) -> None:
    now = [100.0]
    kafka = TransactionalBus()
    outbox = await started(repo, kafka, clock=lambda: now[0])
    outbox.send(command("CP-1"))
    outbox.consumed(("cp.status", 0), 1)
    await outbox.flush()
    outbox.consumed(("cp.status", 0), 9)  # a heartbeat that decided nothing
    await outbox.flush()
    assert len(kafka.commits) == 1  # too soon for offsets alone
    now[0] += OFFSETS_EVERY
    await outbox.flush()
    assert kafka.commits[-1] == ([], {("cp.status", 0): 9}, kafka.commits[0][2])
    row = (await repo.load_flushes())[""]
    assert number(row.token) == 1  # no row written for offsets alone


async def test_a_fenced_producer_stops_the_flush(repo: SqliteRepository) -> None:
    kafka = TransactionalBus()
    outbox = await started(repo, kafka)
    kafka.fenced = True
    outbox.send(command("CP-1"))
    with pytest.raises(Fenced):
        await outbox.flush()


async def test_nothing_leaves_before_recover(repo: SqliteRepository) -> None:
    """Before its partitions are settled a Central has read nothing: what it queued
    (a health snapshot, say) waits, and leaves with the first flush after."""
    kafka = TransactionalBus()
    outbox = Outbox(repo, kafka, Counter())
    outbox.send(command("CP-1"))
    await outbox.flush()
    assert kafka.attempts == 0 and outbox.pending == 1
    await outbox.recover(kafka.read_committed)
    await outbox.flush()
    assert kafka.sent == [command("CP-1")]


async def crash_between_db_and_kafka(repo: SqliteRepository) -> TransactionalBus:
    """A Central that flushed twice: flush 1 reached Kafka, flush 2 only the database."""
    kafka = TransactionalBus()
    outbox = await started(repo, kafka)
    outbox.send(command("CP-1"))
    outbox.consumed(("cp.status", 0), 10)
    await outbox.flush()
    kafka.failures = 1_000_000  # the broker is gone; then the process dies
    outbox.send(command("CP-2"))
    outbox.send(command("CP-3"))
    outbox.consumed(("cp.status", 0), 12)
    outbox.consumed(("cp.status", 1), 3)
    flush = asyncio.create_task(outbox.flush())
    await poll(lambda: kafka.attempts >= 2, timeout=5.0, what="a failed attempt")
    flush.cancel()
    await asyncio.gather(flush, return_exceptions=True)
    kafka.failures = 0
    return kafka


async def test_recover_sends_again_exactly_the_flush_kafka_did_not_get(
    repo: SqliteRepository,
) -> None:
    kafka = await crash_between_db_and_kafka(repo)
    assert kafka.sent == [command("CP-1")]
    restarted = Outbox(repo, kafka, Counter())
    await restarted.recover(kafka.read_committed)
    assert kafka.sent == [command("CP-1"), command("CP-2"), command("CP-3")]
    assert kafka.commits[-1][1] == {("cp.status", 0): 12, ("cp.status", 1): 3}
    assert number(kafka.commits[-1][2]) == 2  # the dead process's token, as it recorded it
    assert await repo.load_flushes() == {}  # settled: nobody sends it again
    # A second restart finds Kafka up to date: nothing is sent again.
    again = Outbox(repo, kafka, Counter())
    await again.recover(kafka.read_committed)
    assert len(kafka.commits) == 2
    again.send(command("CP-4"))
    await again.flush()
    assert kafka.commits[-1][2] not in {c[2] for c in kafka.commits[:-1]}


async def test_recover_sends_nothing_when_kafka_has_the_last_flush(
    repo: SqliteRepository,
) -> None:
    kafka = TransactionalBus()
    outbox = await started(repo, kafka)
    outbox.send(command("CP-1"))
    outbox.consumed(("cp.status", 0), 10)
    await outbox.flush()
    restarted = Outbox(repo, kafka, Counter())
    await restarted.recover(kafka.read_committed)
    assert len(kafka.commits) == 1
    restarted.consumed(("cp.status", 0), 11)  # resumes from Kafka's offsets
    restarted.send(command("CP-2"))
    await restarted.flush()
    assert kafka.commits[-1][:2] == ([command("CP-2")], {("cp.status", 0): 11})


async def test_a_cancelled_flush_is_finished_by_the_next_not_sent_twice(
    repo: SqliteRepository,
) -> None:
    """A caller cancelled while its flush is in Kafka's hands (shutdown): the next flush
    waits for that same attempt, and sends its own after it, in a transaction of its own."""
    kafka = TransactionalBus()
    outbox = await started(repo, kafka)
    kafka.failures = 3
    outbox.send(command("CP-1"))
    first = asyncio.create_task(outbox.flush())
    await poll(lambda: kafka.attempts >= 1, timeout=5.0, what="an attempt")
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    outbox.send(command("CP-2"))
    await outbox.flush()
    assert [messages for messages, _, _ in kafka.commits] == [[command("CP-1")],
                                                              [command("CP-2")]]
    assert [number(meta) for _, _, meta in kafka.commits] == [1, 2]


async def test_at_shutdown_a_flush_waits_for_kafka_only_so_long_and_the_restart_sends_it(
    repo: SqliteRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "CLOSING_DELIVERY_TIMEOUT", 0.2)
    kafka = TransactionalBus()
    outbox = await started(repo, kafka)
    await outbox.close()
    kafka.failures = 1_000_000  # the broker is gone
    outbox.send(command("CP-1"))
    outbox.consumed(("cp.status", 0), 4)
    with pytest.raises(BusError, match="next start sends it"):
        await outbox.flush()
    kafka.failures = 0
    restarted = Outbox(repo, kafka, Counter())
    await restarted.recover(kafka.read_committed)
    assert [c[:2] for c in kafka.commits] == [([command("CP-1")], {("cp.status", 0): 4})]
