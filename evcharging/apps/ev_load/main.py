"""Driver load: ``python -m evcharging.apps.ev_load.main --kafka-bootstrap localhost:9092
--rate 50 --duration 300``.

Many drivers in one process. Start-up: read Central's ACTIVATED CPs over HTTP (retried for
``--connect-timeout`` seconds), connect a Kafka producer for ``driver.requests`` and a
group-less consumer of ``driver.updates`` from its end (started before the first request,
so no answer is missed). Then drivers arrive for ``--duration`` seconds (see
:mod:`evcharging.apps.ev_load.load`) while the CPs are read again every
``--refresh-interval`` seconds; a progress line comes every ``--progress-interval``
seconds. At the end it prints the summary: text on stdout, or with ``--json`` one JSON
object and nothing else on stdout (progress then goes to the log, on stderr). With
``--metrics-port`` the run's numbers are served at ``GET /metrics`` for Prometheus while
it lasts (its own end-to-end latency histograms among them).

Exit codes: 0 when the run was done; 1 when Kafka or Central could not be reached, or the
metrics port is taken (or the consumer died during the run: the summary so far is still
printed); 2 for invalid flags;
130 when SIGINT/SIGTERM stopped the run early (open requests count as interrupted, and the
summary so far is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import sys
from collections.abc import Callable, Sequence

import httpx
from loguru import logger
from pydantic import ValidationError

from evcharging.apps.ev_load.central import CentralError, first_reading, refresh_loop
from evcharging.apps.ev_load.load import CPChooser, LoadGenerator, parse_cps
from evcharging.apps.ev_load.metrics import load_metrics
from evcharging.apps.ev_load.stats import RunInfo, Summary
from evcharging.common.centrals import AnyDoor
from evcharging.common.config import LoadSettings, build_parser, settings_problems
from evcharging.common.kafka import (
    BusError,
    KafkaBus,
    KafkaConfig,
    KafkaConsumerLoop,
    Routes,
)
from evcharging.common.logging import setup_logging
from evcharging.common.messages import DriverUpdate
from evcharging.common.metrics import BusCollector, metrics_app
from evcharging.common.service import (
    HttpServer,
    Shutdown,
    Stopped,
    TaskOwner,
    run_service,
    until_stopped,
    wait_first,
)

PROG = "python -m evcharging.apps.ev_load.main"
DESCRIPTION = (
    "Driver load: many EV drivers in one process. Drivers arrive at random (Poisson) at "
    "--rate per second for --duration seconds; each asks Central to charge at a free CP and "
    "follows its request to the end. Prints request latencies and outcomes."
)

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Writer = Callable[[str], None]


def write_stdout(text: str) -> None:
    """The tool's own output (progress lines, the summary): stdout, never the log."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def run(settings: LoadSettings, stop: asyncio.Event, out: Writer = write_stdout) -> int:
    """One load run with `settings` until done or `stop`; returns the exit code.

    `out` gets the progress lines (unless ``json_summary``) and the summary."""
    try:
        only = parse_cps(settings.cps, settings.cp_prefix)
    except ValueError as exc:
        logger.error("{}", exc)
        return EXIT_USAGE
    seed = settings.seed if settings.seed is not None else secrets.randbelow(2**32)
    chooser = CPChooser(
        random.Random(seed + 1),  # noqa: S311 - reproducible choices, not a secret
        only=only, allow_busy=settings.allow_busy,
    )
    config = KafkaConfig.from_settings(settings, f"ev-load-{settings.driver_prefix or 'drivers'}",
                                       connect_timeout=settings.connect_timeout)
    bus = KafkaBus(config)

    def progress(line: str) -> None:
        if settings.json_summary:
            logger.info("{}", line)
        else:
            out(line)

    generator = LoadGenerator(
        bus, chooser,
        rate=settings.rate, duration=settings.duration, seed=seed,
        driver_prefix=settings.driver_prefix, request_timeout=settings.request_timeout,
        cars=settings.cars, progress=progress, progress_interval=settings.progress_interval,
    )
    metrics = load_metrics(generator) if settings.metrics_port else None
    consumer = KafkaConsumerLoop(
        config, Routes().add(DriverUpdate, generator.handle_update), group_id=None,
        start_at="latest", stats=bus.stats,
        observe=metrics.handler_observer() if metrics is not None else None,
    )
    shutdown = Shutdown(("Kafka consumer", consumer.stop), ("Kafka producer", bus.stop))
    if metrics is not None:
        metrics.add(BusCollector(bus.stats, [consumer], lambda: bus.connected))
        server = HttpServer(metrics_app(metrics, "EV load"), settings.metrics_host,
                            settings.metrics_port, name="metrics")
        try:
            await server.start()
        except OSError as exc:
            logger.error("{} (change --metrics-port)", exc)
            return EXIT_UNREACHABLE
        shutdown.add("metrics server", server.stop)
    centrals = AnyDoor.parse(settings.central_url, 80)
    async with httpx.AsyncClient(base_url=centrals.url, timeout=5.0) as http:
        try:
            try:
                await until_stopped(
                    stop, _start(settings, http, chooser, bus, consumer, centrals)
                )
            except Stopped:
                logger.info("stopped while starting; no request was sent")
                return EXIT_INTERRUPTED
            except CentralError as exc:
                logger.error("cannot read Central's CPs at {}: {}", centrals.describe(), exc)
                return EXIT_UNREACHABLE
            except BusError as exc:
                logger.error("cannot reach Kafka: {}", exc)
                return EXIT_UNREACHABLE
            logger.info(
                "load: {:g} drivers/s for {:g} s (seed {}), {} CP(s) free{}{}",
                settings.rate, settings.duration, seed, chooser.free_count,
                f" of site {settings.site}" if settings.site else "",
                "; drivers come with cars (kWh wanted, departure)" if settings.cars else "",
            )
            info, failed = await _load(settings, generator, consumer, http, stop, centrals)
        finally:
            await shutdown.run()
    if info is None:
        return EXIT_UNREACHABLE
    summary = Summary(generator.tally, info, publish_errors=bus.stats.publish_errors)
    out(json.dumps(summary.as_dict()) if settings.json_summary else summary.text())
    if failed:
        return EXIT_UNREACHABLE
    return EXIT_INTERRUPTED if info.stopped_early else EXIT_OK


async def _start(
    settings: LoadSettings,
    http: httpx.AsyncClient,
    chooser: CPChooser,
    bus: KafkaBus,
    consumer: KafkaConsumerLoop,
    centrals: AnyDoor,
) -> None:
    cps = await first_reading(http, site=settings.site, timeout=settings.connect_timeout,
                              centrals=centrals)
    chooser.update(cps)
    if chooser.free_count == 0:
        logger.warning("Central lists no ACTIVATED CP{}{}; arrivals count as 'no free CP' "
                       "until one is", " of site " + settings.site if settings.site else "",
                       " among --cps" if settings.cps else "")
    await bus.start()
    await consumer.start()  # positions resolved here: no answer to a later request is missed


async def _load(
    settings: LoadSettings,
    generator: LoadGenerator,
    consumer: KafkaConsumerLoop,
    http: httpx.AsyncClient,
    stop: asyncio.Event,
    centrals: AnyDoor,
) -> tuple[RunInfo | None, bool]:
    """Run the consumer, the CP refresh and the generator side by side.

    Returns how the run went (None when the generator itself failed) and whether a task
    failed; the owner has logged the failure.
    """
    async with TaskOwner("EV load") as tasks:
        tasks.spawn(consumer.run(), "driver.updates consumer", forever=True)
        tasks.spawn(
            refresh_loop(http, generator.chooser, site=settings.site,
                         interval=settings.refresh_interval, centrals=centrals),
            "CP refresh", forever=True,
        )
        running = tasks.spawn(generator.run(), "load generator")
        await wait_first([stop, tasks.failed], [running])
        if not running.done():
            if tasks.failed.is_set():
                logger.error("no update can arrive any more; stopping the run")
            generator.stop()
            await asyncio.wait([running])
    if running.cancelled() or running.exception() is not None:
        return None, True
    return running.result(), tasks.failure is not None


def parse_settings(argv: Sequence[str] | None) -> LoadSettings:
    """The flags over the environment; invalid ones end the program with exit code 2."""
    parser = build_parser(LoadSettings, PROG, DESCRIPTION)
    parser.add_argument(
        "--json", dest="json_summary", action="store_const", const=True,
        default=argparse.SUPPRESS, help="same as --json-summary",
    )
    flags = vars(parser.parse_args(argv))
    try:
        settings = LoadSettings(**flags)
        parse_cps(settings.cps, settings.cp_prefix)
    except ValidationError as exc:
        parser.error(f"invalid settings: {settings_problems(LoadSettings, exc)}")
    except ValueError as exc:
        parser.error(f"invalid settings: cps (LOAD_CPS): {exc}")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    setup_logging("ev_load", settings.log_level, settings.log_json)
    return run_service(lambda stop: run(settings, stop))


if __name__ == "__main__":
    sys.exit(main())
