"""Central's own ``run`` and CP engines in the test's process, on the real broker, with a
probe: shared by the integration tests of Central (test_central, test_central_postgres,
test_smart_charging)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from evcharging.apps.ev_central import main as central_main
from evcharging.apps.ev_cp_e import main as engine_main
from evcharging.common.config import CentralSettings, CPEngineSettings
from evcharging.common.kafka import KafkaBus, KafkaConfig, KafkaConsumerLoop, Routes


@dataclass
class Probe:
    http: httpx.AsyncClient
    """Central's HTTP API."""
    bus: KafkaBus
    """A publisher on the services' topics."""


@asynccontextmanager
async def services(central: CentralSettings, engines: Sequence[CPEngineSettings],
                   routes: Routes) -> AsyncIterator[Probe]:
    """Central and `engines` running, and a consumer of `routes` reading from now on.

    On the way out all of them stop; unless the body failed, each run must have returned 0.
    """
    stop = asyncio.Event()
    tasks = [asyncio.create_task(central_main.run(central, stop))]
    tasks += [asyncio.create_task(engine_main.run(engine, stop)) for engine in engines]
    config = KafkaConfig(bootstrap=central.kafka_bootstrap, client_id="probe",
                         topic_prefix=central.topic_prefix)
    bus = KafkaBus(config)
    await bus.start()
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{central.http_port}")
    consumer = KafkaConsumerLoop(config, routes, start_at="latest")
    await consumer.start()
    reading = asyncio.create_task(consumer.run())
    try:
        yield Probe(http, bus)
    finally:
        stop.set()
        codes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await consumer.stop()
        await bus.stop()
        await http.aclose()
    assert codes == [0] * len(tasks), codes
