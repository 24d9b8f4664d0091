"""The Kafka bus over a real broker: keys, validation, commits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from evcharging.common.bus import TOPIC_KEYS, TOPIC_MODELS, Routes
from evcharging.common.kafka import (
    BusStats,
    KafkaBus,
    KafkaConfig,
    KafkaConsumerLoop,
    Topic,
    ensure_topics,
    partition_for_key,
)
from evcharging.common.messages import (
    CentralCommand,
    CommandPayload,
    CommandType,
    CPState,
    CPStatus,
    CPTelemetry,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    Message,
    SessionResult,
)
from tests.polling import poll

pytestmark = pytest.mark.integration

SAMPLES: dict[Topic, Message] = {
    Topic.DRIVER_REQUESTS: DriverRequest(request_id="r1", driver_id="driver-alice", cp_id="CP-001"),
    Topic.DRIVER_UPDATES: DriverUpdate(
        request_id="r1", driver_id="driver-alice", cp_id="CP-001",
        status=DriverStatus.IN_PROGRESS, session_id="s1", kw=22.0, kwh=0.5, euros=0.15,
    ),
    Topic.CENTRAL_COMMANDS: CentralCommand(
        cp_id="CP-001", cmd=CommandType.START_SUPPLY,
        payload=CommandPayload(driver_id="driver-alice", session_id="s1"),
    ),
    Topic.CP_STATUS: CPStatus(
        cp_id="CP-001", state=CPState.ACTIVATED, session_id="s1", kwh=1.2, euros=0.36,
        session_result=SessionResult.COMPLETED,
    ),
    Topic.CP_TELEMETRY: CPTelemetry(
        cp_id="CP-001", kw=22.0, kwh=0.1, euros=0.03, driver_id="driver-alice", session_id="s1"
    ),
}


@pytest.fixture
def config(kafka_bootstrap: str) -> KafkaConfig:
    return KafkaConfig(
        bootstrap=kafka_bootstrap,
        client_id="bus-test",
        topic_prefix=f"test-{uuid.uuid4().hex[:8]}.",
        partitions=2,
        connect_timeout=60,
    )


@pytest.fixture
async def bus(config: KafkaConfig) -> AsyncIterator[KafkaBus]:
    async with KafkaBus(config) as started:
        yield started


class Inbox:
    """Collects handled messages; waits for a count with a timeout."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def handler(self) -> Callable[[Any], Awaitable[None]]:
        async def handle(message: Any) -> None:
            self.items.append(message)
            self._changed.set()

        return handle

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Any]:
        async with asyncio.timeout(timeout):
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.items


async def run_loop(loop: KafkaConsumerLoop) -> asyncio.Task[None]:
    await loop.start()
    return asyncio.create_task(loop.run())


async def stop_loop(loop: KafkaConsumerLoop, task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await loop.stop()


async def test_topics_are_created_with_partitions(config: KafkaConfig, bus: KafkaBus) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=config.bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([config.topic_name(t) for t in Topic])
        assert {t["topic"]: len(t["partitions"]) for t in described} == {
            config.topic_name(t): 2 for t in Topic
        }
        # A second start finds them and changes nothing.
        assert await ensure_topics(config, Topic) == {config.topic_name(t): [0, 1] for t in Topic}
    finally:
        await admin.close()


@pytest.mark.parametrize("topic", list(Topic))
async def test_round_trip_with_key(config: KafkaConfig, bus: KafkaBus, topic: Topic) -> None:
    inbox = Inbox()
    routes = Routes().add(TOPIC_MODELS[topic], inbox.handler())
    loop = KafkaConsumerLoop(config, routes, start_at="latest")
    task = await run_loop(loop)
    try:
        await bus.publish(SAMPLES[topic])
        (received,) = await inbox.wait_for(1)
        assert received == SAMPLES[topic]
    finally:
        await stop_loop(loop, task)
    # The raw record carries the key SPEC §2 names.
    raw = AIOKafkaConsumer(bootstrap_servers=config.bootstrap, auto_offset_reset="earliest")
    await raw.start()
    try:
        name = config.topic_name(topic)
        partitions = [TopicPartition(name, p) for p in (0, 1)]
        raw.assign(partitions)
        await raw.seek_to_beginning(*partitions)
        records = []
        async with asyncio.timeout(20):
            while not records:
                batch = await raw.getmany(timeout_ms=500)
                records = [r for rs in batch.values() for r in rs]
        expected_key = getattr(SAMPLES[topic], TOPIC_KEYS[topic])
        assert records[0].key == expected_key.encode()
    finally:
        await raw.stop()


async def test_publish_refuses_a_model_that_has_no_topic(bus: KafkaBus) -> None:
    with pytest.raises(TypeError, match="CommandPayload is not a bus message"):
        await bus.publish(CommandPayload())


async def test_invalid_messages_are_counted_and_skipped(config: KafkaConfig, bus: KafkaBus) -> None:
    inbox = Inbox()
    stats = BusStats()
    loop = KafkaConsumerLoop(
        config, Routes().add(CPTelemetry, inbox.handler()), start_at="latest", stats=stats
    )
    task = await run_loop(loop)
    producer = AIOKafkaProducer(bootstrap_servers=config.bootstrap)
    await producer.start()
    try:
        name = config.topic_name(Topic.CP_TELEMETRY)
        for bad in [b"not json", b"{}", b'{"cp_id": "CP-001", "kw": -1, "kwh": 0, "euros": 0}',
                    b"[1, 2]", b'{"cp_id": "bad id!", "kw": 1, "kwh": 0, "euros": 0}']:
            await producer.send_and_wait(name, bad, key=b"CP-001", partition=0)
        await producer.send_and_wait(name, None, key=b"CP-001", partition=0)
        await bus.publish(SAMPLES[Topic.CP_TELEMETRY])
        (received,) = await inbox.wait_for(1)
        assert received == SAMPLES[Topic.CP_TELEMETRY]
        assert stats.invalid == 6
        assert stats.invalid_by_topic == {"cp.telemetry": 6}
    finally:
        await producer.stop()
        await stop_loop(loop, task)


async def test_handler_errors_do_not_stop_the_consumer(config: KafkaConfig, bus: KafkaBus) -> None:
    seen: list[CPStatus] = []
    done = asyncio.Event()

    async def flaky(message: CPStatus) -> None:
        seen.append(message)
        if len(seen) == 1:
            raise RuntimeError("boom")
        done.set()

    stats = BusStats()
    loop = KafkaConsumerLoop(
        config, Routes().add(CPStatus, flaky), start_at="latest", stats=stats
    )
    task = await run_loop(loop)
    try:
        await bus.publish(SAMPLES[Topic.CP_STATUS])
        await bus.publish(SAMPLES[Topic.CP_STATUS])
        await asyncio.wait_for(done.wait(), 20)
        assert stats.handler_errors == 1
    finally:
        await stop_loop(loop, task)


async def test_restarted_group_consumer_resumes_from_committed_offset(
    config: KafkaConfig, bus: KafkaBus
) -> None:
    group = f"group-{uuid.uuid4().hex[:8]}"

    def request(n: int) -> DriverRequest:
        return DriverRequest(request_id=f"r{n}", driver_id="driver-alice", cp_id="CP-001")

    first = Inbox()
    loop = KafkaConsumerLoop(
        config, Routes().add(DriverRequest, first.handler()), group_id=group,
        start_at="earliest",
    )
    task = await run_loop(loop)
    try:
        for n in range(3):
            await bus.publish(request(n))
        await first.wait_for(3, timeout=40)
    finally:
        await stop_loop(loop, task)
    # Published while no consumer of the group runs.
    for n in range(3, 5):
        await bus.publish(request(n))
    second = Inbox()
    loop = KafkaConsumerLoop(
        config, Routes().add(DriverRequest, second.handler()), group_id=group,
        start_at="earliest",
    )
    task = await run_loop(loop)
    try:
        received = await second.wait_for(2, timeout=40)
        assert [m.request_id for m in received] == ["r3", "r4"]
    finally:
        await stop_loop(loop, task)
    assert [m.request_id for m in first.items] == ["r0", "r1", "r2"]


async def test_a_consumer_with_keys_reads_only_their_partitions(
    config: KafkaConfig, bus: KafkaBus
) -> None:
    """A CP engine reads the central.commands partition its own id hashes to, nothing else."""
    mine, other = "CP-00001", next(
        f"CP-{i:05d}" for i in range(2, 100)
        if partition_for_key(f"CP-{i:05d}", [0, 1]) != partition_for_key("CP-00001", [0, 1])
    )
    inbox = Inbox()
    loop = KafkaConsumerLoop(config, Routes().add(CentralCommand, inbox.handler()),
                             start_at="latest", keys=[mine])
    task = await run_loop(loop)
    try:
        await bus.publish(CentralCommand(cp_id=other, cmd=CommandType.STOP_CP))
        await bus.publish(CentralCommand(cp_id=mine, cmd=CommandType.STOP_CP))
        [got] = await inbox.wait_for(1)
        assert got.cp_id == mine
        await bus.publish(CentralCommand(cp_id=mine, cmd=CommandType.RESUME_CP))
        await inbox.wait_for(2)
        assert [m.cp_id for m in inbox.items] == [mine, mine]
    finally:
        await stop_loop(loop, task)


async def test_a_backlog_comes_in_batches_of_at_most_max_records(
    config: KafkaConfig, bus: KafkaBus
) -> None:
    def request(n: int) -> DriverRequest:
        return DriverRequest(request_id=f"r{n}", driver_id="driver-alice", cp_id="CP-001")

    for n in range(25):  # a backlog before the consumer starts
        await bus.publish(request(n), wait=False)
    await bus.flush()
    inbox = Inbox()
    batches: list[int] = []

    async def after_batch() -> None:
        batches.append(len(inbox.items) - sum(batches))

    loop = KafkaConsumerLoop(config, Routes().add(DriverRequest, inbox.handler()),
                             start_at="earliest", after_batch=after_batch, max_records=10)
    task = await run_loop(loop)
    try:
        received = await inbox.wait_for(25, timeout=40)
        assert [m.request_id for m in received] == [f"r{n}" for n in range(25)]  # one key
        await poll(lambda: sum(batches) == 25, timeout=20, what="the last batch settled")
        assert max(batches) <= 10 and len(batches) >= 3
    finally:
        await stop_loop(loop, task)
