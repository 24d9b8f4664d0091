"""Central's topics on a real broker (SPEC §4): stamped by the broker, and recreated when
the broker loses or changes them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from evcharging.common.kafka import (
    LOG_APPEND_TIME,
    KafkaBus,
    KafkaConfig,
    Topic,
    ensure_topics,
    repair_topics,
)
from tests.polling import poll

pytestmark = pytest.mark.integration


@pytest.fixture
def config(kafka_bootstrap: str) -> KafkaConfig:
    return KafkaConfig(bootstrap=kafka_bootstrap, client_id="topics-test",
                       topic_prefix=f"topics-{uuid.uuid4().hex[:8]}.", partitions=3,
                       connect_timeout=60)


@pytest.fixture
async def admin(config: KafkaConfig) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(bootstrap_servers=config.bootstrap)
    await client.start()
    yield client
    await client.close()


async def partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    described = await admin.describe_topics(names)
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


async def first_record_timestamp(config: KafkaConfig, name: str) -> tuple[int, int]:
    consumer = AIOKafkaConsumer(name, bootstrap_servers=config.bootstrap,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        record = await consumer.getone()
        return record.timestamp, record.timestamp_type
    finally:
        await consumer.stop()


async def test_topics_are_created_stamped_by_the_broker(config: KafkaConfig) -> None:
    """A producer's clock an hour ahead (or a forged ts) does not date the message."""
    await ensure_topics(config, [Topic.CP_STATUS])
    name = config.topic_name(Topic.CP_STATUS)
    producer = AIOKafkaProducer(bootstrap_servers=config.bootstrap)
    await producer.start()
    try:
        metadata = await producer.send_and_wait(name, b"{}", key=b"CP-1", timestamp_ms=1000)
    finally:
        await producer.stop()
    assert metadata.timestamp != 1000
    timestamp, kind = await first_record_timestamp(config, name)
    assert kind == LOG_APPEND_TIME and timestamp > 1_000_000_000_000


async def test_central_stamps_a_topic_that_keeps_the_producers_time(
    config: KafkaConfig, admin: AIOKafkaAdminClient
) -> None:
    name = config.topic_name(Topic.CP_TELEMETRY)
    # CreateTime, as an old release made it, with a retention of the operator's own
    await admin.create_topics([NewTopic(name, 3, 1, topic_configs={"retention.ms": "123456"})])
    await ensure_topics(config, [Topic.CP_TELEMETRY], stamp=True)
    [described] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    kept = {entry[0]: entry[1] for entry in described.resources[0][4]}
    assert kept["retention.ms"] == "123456"  # the change kept the topic's own settings
    assert kept["message.timestamp.type"] == "LogAppendTime"
    producer = AIOKafkaProducer(bootstrap_servers=config.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(name, b"{}", key=b"CP-1", timestamp_ms=1000)
    finally:
        await producer.stop()
    assert (await first_record_timestamp(config, name))[1] == LOG_APPEND_TIME


async def test_central_recreates_topics_the_broker_lost(
    config: KafkaConfig, admin: AIOKafkaAdminClient
) -> None:
    """The broker lost its topics; one came back with one partition (auto-created by an
    old client). Central says so (its /health answers 503 meanwhile), recreates the lost
    ones with its partition count, adds the missing partitions, and is well again."""
    names = [config.topic_name(t) for t in Topic]
    bus = KafkaBus(config, probe_interval=0.2, stamp_topics=True)
    await bus.start()
    try:
        assert bus.topics_ok
        status, telemetry = (config.topic_name(Topic.CP_STATUS),
                             config.topic_name(Topic.CP_TELEMETRY))
        await admin.delete_topics([status, telemetry])
        await poll(lambda: not bus.topics_ok, timeout=20, what="the loss noticed")
        await poll(lambda: bus.topics_ok, timeout=30, what="the topics recreated")
        assert await partition_counts(admin, names) == {name: 3 for name in names}
    finally:
        await bus.stop()



async def test_a_topic_back_with_one_partition_gets_its_partitions_again(
    config: KafkaConfig, admin: AIOKafkaAdminClient
) -> None:
    name = config.topic_name(Topic.DRIVER_REQUESTS)
    await admin.create_topics([NewTopic(name, 1, 1)])  # as broker auto-creation makes it
    await repair_topics(config, {name: 3}, {name: 1})
    assert await partition_counts(admin, [name]) == {name: 3}
