"""EV Central: ``python -m evcharging.apps.ev_central.main --help``.

Start order: database, Kafka producer, controller (reloads the registry), HTTP API and
dashboard, TCP control plane, then the Kafka consumer. Shutdown runs in reverse:
stop accepting, drain, close Kafka, close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

from loguru import logger

from evcharging.apps.ev_central.api import create_api
from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.apps.ev_central.tcp_server import TcpControlServer
from evcharging.common.config import CentralSettings, load_settings
from evcharging.common.kafka import (
    BusError,
    BusStats,
    KafkaBus,
    KafkaConfig,
    KafkaConsumerLoop,
    Routes,
)
from evcharging.common.logging import setup_logging
from evcharging.common.messages import CPStatus, CPTelemetry, DriverRequest
from evcharging.common.service import (
    HttpServer,
    Stopped,
    run_service,
    until_stopped,
    wait_first,
)

DESCRIPTION = "EV Central: the controller of the EV charging network."


async def _housekeeping(controller: Controller, interval: float) -> None:
    """Every `interval`: health snapshots in the database, and silent CPs found."""
    while True:
        await asyncio.sleep(interval)
        try:
            await controller.check_silent_cps()
            await controller.snapshot_health()
        except Exception:  # noqa: BLE001 - a failed round must not stop the next one
            logger.exception("housekeeping failed")


async def run(settings: CentralSettings, stop: asyncio.Event) -> int:
    stats = BusStats()
    kafka = KafkaConfig(
        bootstrap=settings.kafka_bootstrap,
        client_id="ev-central",
        topic_prefix=settings.topic_prefix,
        partitions=settings.topic_partitions,
    )
    token = settings.api_token.get_secret_value() if settings.api_token else None
    async with SqliteRepository(settings.db_path) as repo:
        bus = KafkaBus(kafka, stats)
        try:
            await until_stopped(stop, bus.start())
        except Stopped:
            logger.info("stopped before Kafka was reached")
            return 0
        except BusError as exc:
            logger.critical("{}", exc)
            return 1
        controller = Controller(
            bus,
            repo,
            CentralOptions(
                start_timeout=settings.start_timeout,
                breaker_failure_threshold=settings.breaker_failure_threshold,
                breaker_reset_timeout=settings.breaker_reset_timeout,
                request_max_age=settings.request_max_age,
                cp_silence_timeout=settings.cp_silence_timeout,
            ),
        )
        consumer = KafkaConsumerLoop(
            kafka,
            Routes()
            .add(DriverRequest, controller.handle_request)
            .add(CPStatus, controller.handle_status)
            .add(CPTelemetry, controller.handle_telemetry),
            group_id=settings.group_id,
            group_instance_id=f"{settings.group_id}-central",
            start_at="earliest",
            stats=stats,
            before_commit=bus.flush,
        )

        async def health() -> dict[str, Any]:
            db_ok = await repo.ping()
            kafka_ok = bus.connected
            return {
                "status": "ok" if db_ok and kafka_ok else "degraded",
                "kafka": {"connected": kafka_ok, "bootstrap": settings.kafka_bootstrap,
                          **stats.as_dict()},
                "database": {"ok": db_ok, "path": str(settings.db_path)},
                "tcp": tcp.stats(),
            }

        http = HttpServer(
            create_api(controller, api_token=token, health=health),
            settings.http_host, settings.http_port, name="HTTP API",
        )
        tcp = TcpControlServer(controller, settings.listen_host, settings.listen_port, token)
        tasks: list[asyncio.Task[None]] = []
        try:
            await controller.load()
            await http.start()
            await tcp.start()
            await until_stopped(stop, consumer.start())
            tasks.append(asyncio.create_task(consumer.run(), name="consumer"))
            tasks.append(asyncio.create_task(
                _housekeeping(controller, settings.health_snapshot_interval),
                name="housekeeping",
            ))
            logger.info("EV Central ready: dashboard http://localhost:{}/", http.port)
            failed = await wait_first([stop], tasks)
            for task in failed:
                logger.critical(
                    "{} stopped unexpectedly: {!r}", task.get_name(), task.exception()
                )
            return 1 if failed else 0
        except OSError as exc:
            logger.critical("{} (change --http-port / --listen-port)", exc)
            return 1
        except Stopped:
            return 0
        except BusError as exc:
            logger.critical("{}", exc)
            return 1
        finally:
            logger.info("shutting down")
            await tcp.stop()
            await http.stop()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await controller.close()
            await consumer.stop()
            await bus.stop()
            logger.info("EV Central stopped")


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(
        CentralSettings, argv, "python -m evcharging.apps.ev_central.main", DESCRIPTION
    )
    setup_logging("ev_central", settings.log_level, settings.log_json)
    return run_service(lambda stop: run(settings, stop))


if __name__ == "__main__":
    sys.exit(main())
