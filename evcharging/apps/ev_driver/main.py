"""EV Driver entry point: ``python -m evcharging.apps.ev_driver.main --driver-id ... ``.

Reads the requests file, connects to Kafka (a producer for ``driver.requests`` and a
group-less consumer of ``driver.updates`` that starts at the end, started before the first
request so that no answer is missed) and runs a :class:`Driver` over the file.

Exit codes: 0 when every request of the file was tried, 130 when SIGINT/SIGTERM stopped
the driver early (it logs the summary so far), 1 when the bus failed (Kafka unreachable,
a request could not be published) or a task failed (the consumer died: logged once, by
the task owner), 2 for invalid flags or a requests file that cannot be read.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from loguru import logger

from evcharging.apps.ev_driver.driver import (
    Driver,
    DriverSummary,
    PlannedRequest,
    RequestsFileError,
    load_plan,
    plan_text,
)
from evcharging.common.config import DriverSettings, load_settings
from evcharging.common.kafka import (
    BusError,
    KafkaBus,
    KafkaConfig,
    KafkaConsumerLoop,
    Routes,
)
from evcharging.common.logging import setup_logging
from evcharging.common.messages import DriverUpdate
from evcharging.common.service import (
    Shutdown,
    Stopped,
    TaskOwner,
    run_service,
    until_stopped,
    wait_first,
)

PROG = "python -m evcharging.apps.ev_driver.main"
DESCRIPTION = (
    "EV Driver: asks EV Central over Kafka to charge at each CP listed in a requests file "
    "and follows every request to its end. The file has one CP id per line (# comments), "
    "optionally followed by kwh=KWH (energy wanted), departure=+2h (or +90m, or an ISO 8601 "
    "time with its zone) and car=BATTERY_KWH/SOC/MAX_KW (e.g. CP-001 kwh=20 departure=+2h "
    "car=60/0.35/11)."
)

EXIT_OK = 0
EXIT_BUS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


async def run(settings: DriverSettings, stop: asyncio.Event) -> int:
    """Run the driver over its requests file until done or `stop`; returns the exit code."""
    path = settings.requests_file
    try:
        plan = load_plan(path)
    except RequestsFileError as exc:
        logger.error("{}; nothing was sent", exc)
        return EXIT_USAGE
    except FileNotFoundError:
        logger.error("requests file {} not found", path)
        return EXIT_USAGE
    except (OSError, UnicodeDecodeError) as exc:
        logger.error("cannot read requests file {}: {}", path, exc)
        return EXIT_USAGE
    if not plan:
        logger.warning("requests file {} lists no valid CP id; nothing to do", path)
        return EXIT_OK
    logger.info("{} request(s) to make: {}", len(plan), plan_text([p.cp_id for p in plan]))

    config = KafkaConfig.from_settings(settings, f"driver-{settings.driver_id}")
    bus = KafkaBus(config)
    driver = Driver(
        settings.driver_id,
        bus,
        request_timeout=settings.request_timeout,
        request_interval=settings.request_interval,
    )
    consumer = KafkaConsumerLoop(
        config, Routes().add(DriverUpdate, driver.handle_update), group_id=None,
        start_at="latest",
    )
    shutdown = Shutdown(("Kafka consumer", consumer.stop), ("Kafka producer", bus.stop))
    try:
        try:
            await until_stopped(stop, _start(bus, consumer))
        except Stopped:
            logger.info("stopped while connecting to Kafka; no request was sent")
            return EXIT_INTERRUPTED
        summary, failed = await _drive(driver, consumer, plan, stop)
    except BusError as exc:
        logger.error("the message bus failed: {}", exc)
        return EXIT_BUS
    except Exception:  # noqa: BLE001 - the process boundary: log it and exit 1
        logger.exception("the driver failed")
        return EXIT_BUS
    finally:
        await shutdown.run()
    if failed or summary is None or summary.bus_error is not None:
        return EXIT_BUS
    return EXIT_OK if summary.finished else EXIT_INTERRUPTED


async def _start(bus: KafkaBus, consumer: KafkaConsumerLoop) -> None:
    await bus.start()
    await consumer.start()  # positions are resolved here: nothing published later is missed


async def _drive(
    driver: Driver,
    consumer: KafkaConsumerLoop,
    plan: Sequence[PlannedRequest],
    stop: asyncio.Event,
) -> tuple[DriverSummary | None, bool]:
    """Run the consumer and the driver side by side.

    Returns the driver's summary (None when the driver itself failed) and whether a task
    failed; the owner has logged the failure.
    """
    if stop.is_set():
        driver.stop()
    async with TaskOwner("EV Driver") as tasks:
        tasks.spawn(consumer.run(), "driver.updates consumer", forever=True)
        driving = tasks.spawn(driver.run(plan), "driver")
        await wait_first([stop, tasks.failed], [driving])
        if not driving.done():
            if tasks.failed.is_set():
                logger.error("no update can arrive any more; stopping the driver")
            driver.stop()
            await asyncio.wait([driving])
    failed = tasks.failure is not None
    return (None if failed and driving.exception() else driving.result()), failed


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(DriverSettings, argv, PROG, DESCRIPTION)
    setup_logging(
        "ev_driver", settings.log_level, settings.log_json, driver_id=settings.driver_id
    )
    return run_service(lambda stop: run(settings, stop))


if __name__ == "__main__":
    sys.exit(main())
