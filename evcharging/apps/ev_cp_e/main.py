"""CP Engine process: one charging point on Kafka, with an HTTP health endpoint.

    python -m evcharging.apps.ev_cp_e.main --kafka-bootstrap localhost:9092 \\
        --cp-id CP-001 --health-port 8001

Start-up: connect the producer (it waits for the broker, with backoff), start the
``central.commands`` consumer (no group, from the latest offset: a CP only cares about
commands sent from now on), serve ``/health`` (and ``/metrics``), then connect the CP
(ACTIVATED).

It runs until SIGINT/SIGTERM, until Central sends SHUTDOWN (both exit 0) or until a
background task fails (exit 1): the command consumer or the health server, logged once by
the task owner. Shutdown order: the CP (which ends a running session and announces
DISCONNECTED), the health server, the consumer's task, the consumer, the producer.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from loguru import logger

from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.apps.ev_cp_e.health import create_health_app
from evcharging.apps.ev_cp_e.metrics import engine_metrics
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
from evcharging.common.metrics import BusCollector, mount_metrics
from evcharging.common.service import (
    EXIT_FAILURE,
    EXIT_OK,
    HttpServer,
    Shutdown,
    Stopped,
    TaskOwner,
    run_service,
    until_stopped,
    wait_first,
)

PROG = "python -m evcharging.apps.ev_cp_e.main"
DESCRIPTION = "CP Engine: one simulated charging point connected to EV Central over Kafka."


async def run(settings: CPEngineSettings, stop: asyncio.Event) -> int:
    """Run one CP until `stop` is set, Central says SHUTDOWN, or a task fails."""
    log = logger.bind(cp_id=settings.cp_id)
    exposure = check_exposure(
        settings.health_host, settings.api_token, settings.allow_anonymous,
        env_name="CP_ENGINE_API_TOKEN",
    )
    if exposure is not None:
        log.critical("{}", exposure)
        return EXIT_FAILURE
    stats = BusStats()
    config = KafkaConfig.from_settings(settings, f"cp-engine-{settings.cp_id}")
    bus = KafkaBus(config, stats)
    cp = ChargingPoint.from_settings(settings, bus)
    metrics = engine_metrics(cp)
    consumer = KafkaConsumerLoop(
        config,
        Routes().add(CentralCommand, cp.handle_command),
        group_id=None,
        start_at="latest",
        stats=stats,
        keys=[settings.cp_id],  # only the partition this CP's commands go to
        observe=metrics.handler_observer(),
    )
    metrics.add(BusCollector(stats, [consumer], lambda: bus.connected))
    app = create_health_app(
        cp, stats, api_token=settings.api_token, allow_anonymous=settings.allow_anonymous
    )
    mount_metrics(app, metrics)  # GET /metrics on the health port
    tasks = TaskOwner(f"CP Engine {settings.cp_id}")
    http = HttpServer(
        app, settings.health_host, settings.health_port, name="health", tasks=tasks
    )
    shutdown = Shutdown(
        ("charging point", cp.stop),
        ("health server", http.stop),
        ("command consumer task", tasks.close),
        ("command consumer", consumer.stop),
        ("Kafka producer", bus.stop),
    )
    try:
        await until_stopped(stop, start_parts(bus, consumer, http))
        tasks.spawn(consumer.run(), "central.commands consumer", forever=True)
        await cp.start()
        log.info("CP Engine {} running; health on port {}", settings.cp_id, http.port)
        return await _wait_for_exit(stop, cp, tasks)
    except (BusError, OSError) as exc:
        log.error("CP Engine could not start: {}", exc)
        return EXIT_FAILURE
    except Stopped:
        log.info("stopped while starting")
        return EXIT_OK
    finally:
        await shutdown.run()
        log.info("CP Engine {} stopped (state {})", settings.cp_id, cp.state.value)


async def start_parts(bus: KafkaBus, consumer: KafkaConsumerLoop, http: HttpServer) -> None:
    """Start a CP process's parts in order (the engine's and the fleet's)."""
    await bus.start()  # waits for the broker, with backoff
    await consumer.start()
    await http.start()  # OSError when the port is taken


async def _wait_for_exit(
    stop: asyncio.Event, cp: ChargingPoint, tasks: TaskOwner | asyncio.Task[None]
) -> int:
    """Wait for SIGINT/SIGTERM, a SHUTDOWN command, or a failed task; the exit code."""
    log = logger.bind(cp_id=cp.cp_id)
    if isinstance(tasks, asyncio.Task):
        # One task instead of the owner (tests/unit/test_engine.py passes the consumer's).
        failed = bool(await wait_first([stop, cp.shutdown_requested], [tasks]))
        if failed and not tasks.cancelled():
            log.opt(exception=tasks.exception()).critical("{} died", tasks.get_name())
    else:
        failed = await tasks.wait(stop, cp.shutdown_requested)
    if failed:
        log.error("stopping the CP Engine after the failure above")
        return EXIT_FAILURE
    if cp.shutdown_requested.is_set():
        log.info("Central asked this CP to shut down")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, configure logging and run the CP Engine; returns the exit code."""
    settings = load_settings(CPEngineSettings, argv, PROG, DESCRIPTION)
    setup_logging("ev_cp_e", settings.log_level, settings.log_json, cp_id=settings.cp_id)
    return run_service(lambda stop: run(settings, stop))


if __name__ == "__main__":
    sys.exit(main())
