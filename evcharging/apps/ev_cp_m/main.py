"""CP Monitor entry point: ``python -m evcharging.apps.ev_cp_m.main --cp-id CP-001 ...``.

Parses the flags (and ``CP_MONITOR_*`` variables) into :class:`CPMonitorSettings`, sets up
logging and runs one :class:`Monitor` until SIGINT or SIGTERM. Exit code 0 after a
signal, 1 when a task of the monitor failed, 2 for invalid flags or settings.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from evcharging.apps.ev_cp_m.monitor import Monitor
from evcharging.common.config import CPMonitorSettings, load_settings
from evcharging.common.logging import setup_logging
from evcharging.common.service import EXIT_FAILURE, EXIT_OK, run_service

PROG = "python -m evcharging.apps.ev_cp_m.main"
DESCRIPTION = (
    "CP Monitor: checks one CP Engine's /health endpoint and reports its faults and "
    "recoveries to EV Central over HTTP."
)


async def run(settings: CPMonitorSettings, stop: asyncio.Event) -> int:
    """Monitor until `stop` is set; returns the exit code."""
    failed = await Monitor(settings).run(stop)
    return EXIT_FAILURE if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(CPMonitorSettings, argv, PROG, DESCRIPTION)
    setup_logging("ev_cp_m", settings.log_level, settings.log_json, cp_id=settings.cp_id)
    return run_service(lambda stop: run(settings, stop))


if __name__ == "__main__":
    sys.exit(main())
