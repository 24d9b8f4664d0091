"""CP Monitor entry point: ``python -m evcharging.apps.ev_cp_m.main --cp-id CP-001 ...``.

Parses the flags (and ``CP_MONITOR_*`` variables) into :class:`CPMonitorSettings`, sets up
logging and runs one :class:`Monitor` until SIGINT or SIGTERM. With ``--metrics-port``
(``CP_MONITOR_METRICS_PORT``) it also serves ``GET /metrics`` for Prometheus on that port
(``--metrics-host``, 127.0.0.1 by default); the monitor has no other HTTP port. Exit code 0
after a signal, 1 when a task of the monitor (or the metrics server) failed or the
metrics port is taken, 2 for invalid flags or settings.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from loguru import logger

from evcharging.apps.ev_cp_m.metrics import monitor_metrics
from evcharging.apps.ev_cp_m.monitor import Monitor
from evcharging.common.config import CPMonitorSettings, load_settings
from evcharging.common.logging import setup_logging
from evcharging.common.metrics import metrics_app
from evcharging.common.service import (
    EXIT_FAILURE,
    EXIT_OK,
    HttpServer,
    TaskOwner,
    run_service,
    wait_first,
)

PROG = "python -m evcharging.apps.ev_cp_m.main"
DESCRIPTION = (
    "CP Monitor: checks one CP Engine's /health endpoint and reports its faults and "
    "recoveries to EV Central over HTTP."
)


async def run(settings: CPMonitorSettings, stop: asyncio.Event) -> int:
    """Monitor until `stop` is set; returns the exit code."""
    monitor = Monitor(settings)
    if not settings.metrics_port:
        return EXIT_FAILURE if await monitor.run(stop) else EXIT_OK
    tasks = TaskOwner(f"CP Monitor {settings.cp_id} metrics")
    http = HttpServer(
        metrics_app(monitor_metrics(monitor), f"CP Monitor {settings.cp_id}"),
        settings.metrics_host, settings.metrics_port, name="metrics", tasks=tasks,
    )
    try:
        await http.start()
    except OSError as exc:
        logger.critical("{} (change --metrics-port)", exc)
        await tasks.close()
        await monitor.stop()  # closes its HTTP client
        return EXIT_FAILURE
    ended = asyncio.Event()  # a stop signal, or the metrics server failed

    async def relay() -> None:
        await wait_first([stop, tasks.failed], ())
        ended.set()

    tasks.spawn(relay(), "stop relay")
    try:
        failed = await monitor.run(ended)
    finally:
        await http.stop()
        await tasks.close()
    return EXIT_FAILURE if failed or tasks.failed.is_set() else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(CPMonitorSettings, argv, PROG, DESCRIPTION)
    setup_logging("ev_cp_m", settings.log_level, settings.log_json, cp_id=settings.cp_id)
    return run_service(lambda stop: run(settings, stop))


if __name__ == "__main__":
    sys.exit(main())
