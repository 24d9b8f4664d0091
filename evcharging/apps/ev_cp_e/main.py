"""CP Engine process: one charging point on Kafka, with an HTTP health endpoint.

    python -m evcharging.apps.ev_cp_e.main --kafka-bootstrap localhost:9092 \\
        --cp-id CP-001 --health-port 8001

Start-up: connect the producer (it waits for the broker, with backoff), start the
``central.commands`` consumer (no group, from the latest offset: a CP only cares about
commands sent from now on), serve ``/health``, then connect the CP (ACTIVATED).

It runs until SIGINT/SIGTERM, until Central sends SHUTDOWN (both exit 0) or until the
command consumer dies (exit 1). Shutdown order: the CP (which ends a running session
and announces DISCONNECTED), the consumer, the HTTP server, the producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable, Sequence

from loguru import logger

from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.apps.ev_cp_e.health import create_health_app
from evcharging.common.config import CPEngineSettings, load_settings
from evcharging.common.http import check_exposure
from evcharging.common.kafka import (
    BusError,
    BusStats,
    KafkaBus,
    KafkaConfig,
    KafkaConsumerLoop,
    Routes,
)
from evcharging.common.logging import setup_logging
from evcharging.common.messages import CentralCommand
from evcharging.common.service import (
    HttpServer,
    Stopped,
    run_service,
    until_stopped,
    wait_first,
)

PROG = "python -m evcharging.apps.ev_cp_e.main"
DESCRIPTION = "CP Engine: one simulated charging point connected to EV Central over Kafka."

EXIT_OK = 0
EXIT_FAILURE = 1


async def run(settings: CPEngineSettings, stop: asyncio.Event) -> int:
    """Run one CP until `stop` is set, Central says SHUTDOWN, or the consumer dies."""
    log = logger.bind(cp_id=settings.cp_id)
    exposure = check_exposure(
        settings.health_host, settings.api_token, settings.allow_anonymous,
        env_name="CP_ENGINE_API_TOKEN",
    )
    if exposure is not None:
        log.critical("{}", exposure)
        return EXIT_FAILURE
    stats = BusStats()
    config = KafkaConfig(
        bootstrap=settings.kafka_bootstrap,
        client_id=f"cp-engine-{settings.cp_id}",
        topic_prefix=settings.topic_prefix,
        partitions=settings.topic_partitions,
    )
    bus = KafkaBus(config, stats)
    cp = ChargingPoint.from_settings(settings, bus)
    consumer = KafkaConsumerLoop(
        config,
        Routes().add(CentralCommand, cp.handle_command),
        group_id=None,
        start_at="latest",
        stats=stats,
    )
    app = create_health_app(
        cp, stats, api_token=settings.api_token, allow_anonymous=settings.allow_anonymous
    )
    http = HttpServer(app, settings.health_host, settings.health_port, name="health")
    consuming: asyncio.Task[None] | None = None
    code = EXIT_OK
    try:
        try:
            await until_stopped(stop, _start_parts(bus, consumer, http))
        except (BusError, OSError) as exc:
            log.error("CP Engine could not start: {}", exc)
            return EXIT_FAILURE
        except Stopped:
            log.info("stopped while starting")
            return EXIT_OK
        consuming = asyncio.create_task(consumer.run(), name=f"{settings.cp_id}-commands")
        await cp.start()
        log.info("CP Engine {} running; health on port {}", settings.cp_id, http.port)
        code = await _wait_for_exit(stop, cp, consuming)
    finally:
        await _shutdown(cp, consuming, consumer, http, bus)
        log.info("CP Engine {} stopped (state {})", settings.cp_id, cp.state.value)
    return code


async def _start_parts(bus: KafkaBus, consumer: KafkaConsumerLoop, http: HttpServer) -> None:
    await bus.start()  # waits for the broker, with backoff
    await consumer.start()
    await http.start()  # OSError when the port is taken


async def _wait_for_exit(
    stop: asyncio.Event, cp: ChargingPoint, consuming: asyncio.Task[None]
) -> int:
    """Wait for SIGINT/SIGTERM, a SHUTDOWN command, or the consumer's death."""
    log = logger.bind(cp_id=cp.cp_id)
    await wait_first([stop, cp.shutdown_requested], [consuming])
    if consuming.done():
        exc = None if consuming.cancelled() else consuming.exception()
        log.opt(exception=exc).critical(
            "the central.commands consumer died ({!r}); the CP cannot obey Central, exiting",
            exc,
        )
        return EXIT_FAILURE
    if cp.shutdown_requested.is_set():
        log.info("Central asked this CP to shut down")
    return EXIT_OK


async def _shutdown(
    cp: ChargingPoint,
    consuming: asyncio.Task[None] | None,
    consumer: KafkaConsumerLoop,
    http: HttpServer,
    bus: KafkaBus,
) -> None:
    """Stop every part in order; one failing step does not skip the others."""
    log = logger.bind(cp_id=cp.cp_id)

    async def cancel_consuming() -> None:
        if consuming is not None and not consuming.done():
            consuming.cancel()
        if consuming is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(consuming, return_exceptions=True)

    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("charging point", cp.stop),
        ("command consumer task", cancel_consuming),
        ("command consumer", consumer.stop),
        ("health server", http.stop),
        ("Kafka producer", bus.stop),
    ]
    for name, step in steps:
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - shutdown must reach every step
            log.opt(exception=exc).error("stopping the {} failed", name)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, configure logging and run the CP Engine; returns the exit code."""
    settings = load_settings(CPEngineSettings, argv, PROG, DESCRIPTION)
    setup_logging("ev_cp_e", settings.log_level, settings.log_json, cp_id=settings.cp_id)
    return run_service(lambda stop: run(settings, stop))


if __name__ == "__main__":
    sys.exit(main())
