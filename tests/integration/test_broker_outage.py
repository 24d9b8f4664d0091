"""A broker outage as the bus sees it: `connected` turns False within seconds, and back."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from evcharging.common.kafka import KafkaBus, KafkaConfig
from evcharging.devtools.kafka_broker import KafkaBroker
from tests.polling import poll

pytestmark = pytest.mark.integration


async def test_connected_follows_the_broker(tmp_path: Path) -> None:
    """SPEC §5: /health says 503 within 10 s of Kafka becoming unreachable; the bus's
    `connected` is what it reads."""
    broker = KafkaBroker(work_dir=tmp_path / "kafka")
    await asyncio.to_thread(broker.start)
    port = broker.port
    try:
        config = KafkaConfig(bootstrap=broker.bootstrap, client_id="outage-test",
                             topic_prefix=f"outage-{uuid.uuid4().hex[:6]}.", partitions=1,
                             connect_timeout=60)
        bus = KafkaBus(config, probe_interval=0.5)
        await bus.start()
        try:
            assert bus.connected
            await asyncio.to_thread(broker.kill)
            lost = asyncio.get_running_loop().time()
            await poll(lambda: not bus.connected, timeout=10.0, what="the outage is seen")
            assert asyncio.get_running_loop().time() - lost < 10.0
            broker = KafkaBroker(port=port, work_dir=tmp_path / "kafka")
            await asyncio.to_thread(broker.start)
            await poll(lambda: bus.connected, timeout=30.0, what="the broker is seen again")
        finally:
            await bus.stop()
        assert not bus.connected
    finally:
        await asyncio.to_thread(broker.stop)
