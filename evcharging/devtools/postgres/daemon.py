"""A server known by its work directory: whether it runs, and stopping it (the CLI's
daemons). Its ``data/postmaster.pid`` is trusted only while that pid is alive and runs
``postgres -D`` that folder, so a stale pid file never stops another process."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evcharging.devtools import process
from evcharging.devtools.postgres.config import (
    DATA_DIR,
    DEFAULT_STOP_TIMEOUT,
    Passwords,
    database_url,
)
from evcharging.devtools.postgres.errors import PostgresError

log = logging.getLogger(__name__)


def shut_down(pid: int, timeout: float, alive: Callable[[], bool]) -> bool:
    """Stop the postmaster ``pid``: SIGINT (fast shutdown), after ``timeout`` s SIGQUIT
    (immediate: crash recovery on the next start), then SIGKILL. Returns whether the fast
    shutdown was enough."""
    steps = ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, process.KILL_WAIT))
    for sig, wait in steps:
        if not alive():
            return sig == signal.SIGINT
        if sig != signal.SIGINT:
            log.warning("PostgreSQL (pid %d) still runs; sending %s", pid, sig.name)
        process.signal_pid(pid, sig)
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive():
            return sig == signal.SIGINT
    raise PostgresError(f"PostgreSQL (pid {pid}) survived SIGKILL")


@dataclass(frozen=True)


class PostgresStatus:
    """What a work directory's ``data/postmaster.pid`` says, checked against the process."""

    work_dir: Path
    running: bool
    pid: int | None = None
    url: str | None = None


def is_postmaster(pid: int, data_dir: Path) -> bool:
    if not process.pid_alive(pid):
        return False
    cmdline = process.read_cmdline(pid)
    if cmdline is None:  # no /proc: trust the pid file
        return True
    return bool(cmdline) and Path(cmdline[0]).name == "postgres" and str(data_dir) in cmdline


def postgres_status(work_dir: str | os.PathLike[str]) -> PostgresStatus:
    """Whether the server whose state is in ``work_dir`` (see :func:`run_dir`) is running."""
    work = Path(work_dir).resolve()
    data = work / DATA_DIR
    try:
        lines = (data / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return PostgresStatus(work, running=False)
    passwords = Passwords.load(work)
    url = database_url(port, passwords.user) if passwords else None
    return PostgresStatus(work, running=is_postmaster(pid, data), pid=pid, url=url)


def stop_postgres(
    work_dir: str | os.PathLike[str], timeout: float = DEFAULT_STOP_TIMEOUT
) -> bool:
    """Stop the (daemon) server whose state is in ``work_dir``; False if none was running."""
    status = postgres_status(work_dir)
    if not status.running or status.pid is None:
        return False
    pid, data = status.pid, status.work_dir / DATA_DIR
    shut_down(pid, timeout, lambda: is_postmaster(pid, data))
    return True
