"""A broker known by its work directory: whether it runs, and stopping it (the CLI's daemons).

Its ``broker.pid`` is trusted only while that pid is alive and runs ``kafka.Kafka`` with the
``server.properties`` of that directory, so a stale pid file never stops another process.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evcharging.devtools import process
from evcharging.devtools.kafka_broker.cds import finish_cds_dump, stop_grace
from evcharging.devtools.kafka_broker.config import (
    BOOTSTRAP_FILE,
    DEFAULT_STOP_TIMEOUT,
    MAIN_CLASS,
    PID_FILE,
    PROPERTIES_FILE,
)
from evcharging.devtools.kafka_broker.errors import KafkaBrokerError

log = logging.getLogger(__name__)

_REAP_WAIT = 2.0


@dataclass(frozen=True)
class BrokerStatus:
    """What the pid file in a broker work directory says, checked against the live process."""

    work_dir: Path
    running: bool
    pid: int | None = None
    bootstrap: str | None = None


def is_broker_process(pid: int, properties: Path) -> bool:
    """Whether ``pid`` is alive and is the broker started with ``properties``."""
    if not process.pid_alive(pid):
        return False
    cmdline = process.read_cmdline(pid)
    if cmdline is None:  # no /proc: trust the pid file
        return True
    return MAIN_CLASS in cmdline and str(properties) in cmdline


def stop_java(pid: int, timeout: float, alive: Callable[[], bool]) -> bool:
    """Stop the broker ``pid``: SIGTERM, then SIGKILL after ``timeout`` s.

    Returns whether it exited without SIGKILL.
    """

    def say_why() -> None:
        log.warning("Kafka broker (pid %d) ignored SIGTERM for %g s; killing it", pid, timeout)

    try:
        return process.terminate(pid, timeout, alive=alive, before_kill=say_why)
    except process.SurvivedKill as exc:
        raise KafkaBrokerError(f"Kafka broker (pid {pid}) survived SIGKILL") from exc


def broker_status(work_dir: str | os.PathLike[str]) -> BrokerStatus:
    """Whether the broker whose state is in ``work_dir`` (see :func:`run_dir`) is running."""
    work = Path(work_dir).resolve()
    try:
        pid = int((work / PID_FILE).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return BrokerStatus(work, running=False)
    try:
        bootstrap: str | None = (work / BOOTSTRAP_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        bootstrap = None
    if not is_broker_process(pid, work / PROPERTIES_FILE):
        return BrokerStatus(work, running=False, pid=pid, bootstrap=bootstrap)
    return BrokerStatus(work, running=True, pid=pid, bootstrap=bootstrap)


def stop_broker(work_dir: str | os.PathLike[str], timeout: float = DEFAULT_STOP_TIMEOUT) -> bool:
    """Stop the (daemon) broker whose state is in ``work_dir``; False if none was running."""
    status = broker_status(work_dir)
    work = status.work_dir
    clean = False
    if status.running and status.pid is not None:
        pid = status.pid
        clean = stop_java(
            pid,
            stop_grace(work, timeout),
            lambda: is_broker_process(pid, work / PROPERTIES_FILE),
        )
        deadline = time.monotonic() + _REAP_WAIT
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # dead already; give init a moment to reap the zombie
    for name in (PID_FILE, BOOTSTRAP_FILE):
        (work / name).unlink(missing_ok=True)
    finish_cds_dump(work, clean_exit=clean)
    return status.running
