"""The lifecycle of Central's and the CP Engine's ``run``: start, run, shut down in order.

Kafka is replaced by a fake (no broker); everything else is real: the SQLite database
on a temporary file, the HTTP servers and the TCP control plane on free ports.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from evcharging.apps.ev_central import main as central_main
from evcharging.apps.ev_cp_e import main as engine_main
from evcharging.common.config import CentralSettings, CPEngineSettings
from evcharging.common.messages import CentralCommand, CommandType, CPStatus, Message
from evcharging.common.states import CPState


class FakeKafka:
    """Stands in for KafkaBus and KafkaConsumerLoop: records what the service does."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.published: list[Message] = []
        self.consuming = asyncio.Event()
        self.consumer_error: Exception | None = None
        self.commands: asyncio.Queue[Message] = asyncio.Queue()
        self.hang_on_start = False
        self.starting = asyncio.Event()

    def bus(self, config: Any, stats: Any = None, **_: Any) -> Any:
        kafka = self

        class Bus:
            connected = True

            async def start(self) -> None:
                kafka.events.append("bus.start")
                kafka.starting.set()
                if kafka.hang_on_start:
                    await asyncio.Event().wait()

            async def stop(self) -> None:
                kafka.events.append("bus.stop")

            async def flush(self) -> None:
                pass

            async def publish(self, message: Message, *, wait: bool = True) -> None:
                kafka.published.append(message)

        return Bus()

    def consumer(self, config: Any, routes: Any, **_: Any) -> Any:
        kafka = self

        class Consumer:
            async def start(self) -> None:
                kafka.events.append("consumer.start")

            async def run(self) -> None:
                kafka.events.append("consumer.run")
                kafka.consuming.set()
                try:
                    if kafka.consumer_error is not None:
                        raise kafka.consumer_error
                    handler = routes.handler(routes.topics[0])
                    while True:
                        await handler(await kafka.commands.get())
                except asyncio.CancelledError:
                    kafka.events.append("consumer.run cancelled")
                    raise

            async def stop(self) -> None:
                kafka.events.append("consumer.stop")

        return Consumer()


# ----------------------------------------------------------------------------- Central


@pytest.fixture
def central_kafka(monkeypatch: pytest.MonkeyPatch) -> FakeKafka:
    fake = FakeKafka()
    monkeypatch.setattr(central_main, "KafkaBus", fake.bus)
    monkeypatch.setattr(central_main, "KafkaConsumerLoop", fake.consumer)
    return fake


def central_settings(tmp_path: Path) -> CentralSettings:
    return CentralSettings(
        _env_file=None, http_port=0, listen_port=0, db_path=tmp_path / "central.db",
        api_token=None,
    )


async def test_central_runs_until_stopped_then_shuts_down_in_order(
    central_kafka: FakeKafka, tmp_path: Path, logs: list[tuple[str, str]]
) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(central_main.run(central_settings(tmp_path), stop))
    await asyncio.wait_for(central_kafka.consuming.wait(), 10)
    stop.set()
    assert await asyncio.wait_for(running, 10) == 0
    assert central_kafka.events == [
        "bus.start", "consumer.start", "consumer.run",
        "consumer.run cancelled", "consumer.stop", "bus.stop",
    ]
    messages = [m for _, m in logs]
    assert messages.index("shutting down") < messages.index("EV Central stopped")
    assert any(m.startswith("TCP control plane stopped") for m in messages)
    assert not any(level in ("ERROR", "CRITICAL") for level, _ in logs)


async def test_central_exits_1_when_its_consumer_dies(
    central_kafka: FakeKafka, tmp_path: Path, logs: list[tuple[str, str]]
) -> None:
    central_kafka.consumer_error = RuntimeError("fetch failed")
    code = await asyncio.wait_for(
        central_main.run(central_settings(tmp_path), asyncio.Event()), 10
    )
    assert code == 1
    assert [(level, m) for level, m in logs if "fetch failed" in m] == [
        ("CRITICAL", "Kafka consumer died (RuntimeError('fetch failed'))")
    ]
    assert central_kafka.events[-2:] == ["consumer.stop", "bus.stop"]  # shut down anyway


async def test_central_stopped_while_waiting_for_kafka_exits_0(
    central_kafka: FakeKafka, tmp_path: Path
) -> None:
    central_kafka.hang_on_start = True
    stop = asyncio.Event()
    running = asyncio.create_task(central_main.run(central_settings(tmp_path), stop))
    await asyncio.wait_for(central_kafka.starting.wait(), 10)
    stop.set()
    assert await asyncio.wait_for(running, 10) == 0
    assert "consumer.start" not in central_kafka.events
    assert central_kafka.events[-1] == "bus.stop"


# ----------------------------------------------------------------------------- CP Engine


@pytest.fixture
def engine_kafka(monkeypatch: pytest.MonkeyPatch) -> FakeKafka:
    fake = FakeKafka()
    monkeypatch.setattr(engine_main, "KafkaBus", fake.bus)
    monkeypatch.setattr(engine_main, "KafkaConsumerLoop", fake.consumer)
    return fake


def engine_settings() -> CPEngineSettings:
    return CPEngineSettings(_env_file=None, cp_id="CP-001", health_port=0, api_token=None)


async def test_engine_obeys_shutdown_and_disconnects_before_closing_kafka(
    engine_kafka: FakeKafka,
) -> None:
    running = asyncio.create_task(engine_main.run(engine_settings(), asyncio.Event()))
    await asyncio.wait_for(engine_kafka.consuming.wait(), 10)
    await engine_kafka.commands.put(CentralCommand(cp_id="CP-001", cmd=CommandType.SHUTDOWN))
    assert await asyncio.wait_for(running, 10) == 0
    states = [m.state for m in engine_kafka.published if isinstance(m, CPStatus)]
    assert states[0] is CPState.ACTIVATED and states[-1] is CPState.DISCONNECTED
    assert engine_kafka.events[-3:] == ["consumer.run cancelled", "consumer.stop", "bus.stop"]


async def test_engine_exits_1_when_its_consumer_dies(
    engine_kafka: FakeKafka, logs: list[tuple[str, str]]
) -> None:
    engine_kafka.consumer_error = RuntimeError("fetch failed")
    code = await asyncio.wait_for(engine_main.run(engine_settings(), asyncio.Event()), 10)
    assert code == 1
    assert [(level, m) for level, m in logs if "fetch failed" in m] == [
        ("CRITICAL", "central.commands consumer died (RuntimeError('fetch failed'))")
    ]
    assert engine_kafka.events[-2:] == ["consumer.stop", "bus.stop"]
    states = [m.state for m in engine_kafka.published if isinstance(m, CPStatus)]
    assert states[-1] is CPState.DISCONNECTED
