"""Exactly once on the real broker (SPEC §4): Central's flushes are Kafka transactions.

* A flush is atomic: a ``read_committed`` reader (every consumer the project builds) sees
  all the messages of a committed transaction, in order, and none of an aborted one; the
  group's committed offsets carry the flush's sequence number.
* Start-up reconciliation: a flush the database recorded and Kafka did not get (the
  process died inside its transaction) is sent again, exactly once; a flush Kafka has is
  never sent again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from evcharging.apps.ev_central.outbox import Outbox
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.common.bus import Fenced
from evcharging.common.kafka import (
    KafkaBus,
    KafkaConfig,
    KafkaConsumerLoop,
    Routes,
    Topic,
    committed_offsets,
)
from evcharging.common.messages import DriverStatus, DriverUpdate, encode
from tests.polling import poll

pytestmark = pytest.mark.integration

CONSUMED = (Topic.DRIVER_REQUESTS, Topic.CP_STATUS, Topic.CP_TELEMETRY)


def update(n: int, driver: str = "d-1") -> DriverUpdate:
    return DriverUpdate(request_id=f"r-{n}", driver_id=driver, cp_id="CP-1",
                        status=DriverStatus.IN_PROGRESS)


class Reader:
    """driver.updates from the beginning, as a driver reads them (read_committed)."""

    def __init__(self, config: KafkaConfig) -> None:
        self.seen: list[DriverUpdate] = []
        self.loop = KafkaConsumerLoop(config, Routes().add(DriverUpdate, self._on),
                                      start_at="earliest")
        self._task: asyncio.Task[None] | None = None

    async def _on(self, message: DriverUpdate) -> None:
        self.seen.append(message)

    async def start(self) -> None:
        await self.loop.start()
        self._task = asyncio.create_task(self.loop.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.loop.stop()

    def ids(self) -> list[str]:
        return [u.request_id for u in self.seen]

    async def wait_for(self, request_id: str) -> None:
        await poll(lambda: request_id in self.ids(), timeout=30, what=f"{request_id} read")


@pytest.fixture
def config(kafka_bootstrap: str) -> KafkaConfig:
    prefix = f"eo-{uuid.uuid4().hex[:8]}."
    return KafkaConfig(bootstrap=kafka_bootstrap, client_id="eo-test", topic_prefix=prefix)


@pytest.fixture
async def reader(config: KafkaConfig) -> AsyncIterator[Reader]:
    found = Reader(config)
    await found.start()
    try:
        yield found
    finally:
        await found.stop()


def central_bus(config: KafkaConfig) -> KafkaBus:
    group = f"{config.topic_prefix}central"
    return KafkaBus(config, transactional_id=f"{group}-central", offsets_group=group)


async def test_a_flush_is_seen_whole_and_an_aborted_one_not_at_all(
    config: KafkaConfig, reader: Reader
) -> None:
    bus = central_bus(config)
    await bus.start()
    raw = AIOKafkaProducer(bootstrap_servers=config.bootstrap, transactional_id=uuid.uuid4().hex)
    await raw.start()
    try:
        name = config.topic_name(Topic.DRIVER_UPDATES)
        # An aborted transaction, on the partition the next flush writes to as well.
        await raw.begin_transaction()
        for n in range(5):
            await raw.send_and_wait(name, encode(update(100 + n)), key=b"d-1")
        await raw.abort_transaction()
        status = (config.topic_name(Topic.CP_STATUS), 0)
        await bus.commit_transaction([update(n, f"d-{n % 3}") for n in range(20)],
                                     {status: 7}, metadata="seq=1")
        await reader.wait_for("r-19")
        await poll(lambda: len(reader.seen) >= 20, timeout=30, what="the whole flush")
        assert sorted(reader.ids()) == sorted(f"r-{n}" for n in range(20))  # none aborted
        for driver in ("d-0", "d-1", "d-2"):  # one driver's updates keep their order
            mine = [u.request_id for u in reader.seen if u.driver_id == driver]
            assert mine == [f"r-{n}" for n in range(20) if f"d-{n % 3}" == driver]
        group = await committed_offsets(config, f"{config.topic_prefix}central", CONSUMED)
        assert group[status] == (7, "seq=1")
        assert group[(config.topic_name(Topic.CP_STATUS), 1)] == (0, "")  # none committed
    finally:
        await raw.stop()
        await bus.stop()


class Crash(BaseException):
    """The process dies here."""


async def test_recovery_sends_again_exactly_the_flush_kafka_did_not_get(
    config: KafkaConfig, reader: Reader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = f"{config.topic_prefix}central"
    status = (config.topic_name(Topic.CP_STATUS), 2)

    def read() -> Any:
        return committed_offsets(config, group, CONSUMED)

    async with SqliteRepository(tmp_path / "central.db") as repo:
        first = central_bus(config)
        await first.start()
        outbox = Outbox(repo, first, Counter())
        await outbox.recover(read)
        outbox.send(update(1))
        outbox.consumed(status, 10)
        await outbox.flush()
        # Flush 2: recorded, its messages sent inside the transaction, then the process
        # dies before the commit (the transaction stays open on the broker).
        producer = first._producer  # the test kills it mid-transaction
        assert producer is not None

        async def die(*args: Sequence[Any]) -> None:
            await producer.flush()
            raise Crash

        monkeypatch.setattr(producer, "commit_transaction", die)
        outbox.send(update(2))
        outbox.send(update(3))
        outbox.consumed(status, 12)
        with pytest.raises(Crash):
            await outbox.flush()
        monkeypatch.undo()

        # The restart: the same transactional id aborts the open transaction, and
        # recovery sends flush 2 again, once.
        second = central_bus(config)
        await second.start()
        try:
            restarted = Outbox(repo, second, Counter())
            await restarted.recover(read)
            await reader.wait_for("r-3")
            offset, token = (await read())[status]
            assert offset == 12 and token.endswith(":2")  # flush 2, as it was recorded
            # A second restart finds Kafka up to date: nothing is sent again.
            again = Outbox(repo, second, Counter())
            await again.recover(read)
            again.send(update(4))
            await again.flush()
            await reader.wait_for("r-4")
            assert reader.ids() == ["r-1", "r-2", "r-3", "r-4"]
            assert (await read())[status][0] == 12
            assert (await read())[status][1] not in (token, "")  # the new flush's mark
        finally:
            await second.stop()
            await first.stop()


async def test_a_second_producer_with_the_same_id_fences_the_first(
    config: KafkaConfig, reader: Reader
) -> None:
    first = central_bus(config)
    await first.start()
    second = central_bus(config)
    try:
        await first.commit_transaction([update(1)], {}, metadata="seq=1")
        await second.start()  # another Central took this id over
        with pytest.raises(Fenced):
            await first.commit_transaction([update(2)], {}, metadata="seq=2")
        await second.commit_transaction([update(3)], {}, metadata="seq=2")
        await reader.wait_for("r-3")
        assert reader.ids() == ["r-1", "r-3"]
    finally:
        await second.stop()
        await first.stop()
