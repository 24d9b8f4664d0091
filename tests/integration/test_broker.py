"""The local broker from ``evcharging.devtools.kafka_broker`` carries a message end to end."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

pytestmark = pytest.mark.integration


async def test_produce_then_consume_in_a_group(kafka_bootstrap: str) -> None:
    topic = f"test-broker-{uuid.uuid4().hex}"  # auto-created on first use
    key, value = b"cp-1", uuid.uuid4().bytes

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = await asyncio.wait_for(producer.send_and_wait(topic, value, key=key), 30)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"test-broker-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        received = await asyncio.wait_for(consumer.getone(), 60)
        await consumer.commit()
    finally:
        await consumer.stop()

    assert (received.topic, received.partition, received.offset) == (
        sent.topic,
        sent.partition,
        sent.offset,
    )
    assert (received.key, received.value) == (key, value)
