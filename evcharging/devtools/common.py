"""Pieces the devtools' command lines (Kafka broker, PostgreSQL) share.

:func:`out` writes a line for people, :func:`read_log_end` reads the end of a server log,
:func:`signals_interrupt` makes SIGTERM/SIGHUP behave like Ctrl-C in a foreground run, and
:func:`run_cli` is the body of each tool's ``main``; :func:`spawn_logged` starts a
server process with its output in a log file.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evcharging.devtools import process

__all__ = ["out", "read_log_end", "run_cli", "signals_interrupt", "spawn_logged"]


def out(text: str) -> None:
    """Write ``text`` and a newline to stdout, flushed (the tools' output for people)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def read_log_end(path: Path, max_bytes: int) -> str | None:
    """The last ``max_bytes`` bytes of a log file as text; None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def signals_interrupt() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt from now on, like Ctrl-C."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)


def run_cli(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    error: type[Exception],
    *,
    quiet_loggers: Sequence[str] = (),
) -> int:
    """Parse ``argv``, set up logging to stderr (``-v``: DEBUG; ``quiet_loggers`` only log
    criticals then) and run the subcommand's ``func``; an ``error`` it raises becomes
    ``error: ...`` on stderr and exit code 1."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        for name in quiet_loggers:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except error as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1


def spawn_logged(
    cmd: Sequence[str], cwd: Path, log_file: Path, *, detach: bool, **popen_kwargs: Any
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in ``cwd`` with its output appended to ``log_file`` (the previous log
    kept as ``<name>.1``), in its own session; unless ``detach``, the kernel ends it when
    this process dies (:class:`~evcharging.devtools.process.DieWithParent`)."""
    if log_file.exists():
        log_file.replace(log_file.with_name(log_file.name + ".1"))
    # The kernel signals the child when the thread that forked it ends: only the main
    # thread lives as long as this process.
    die_with_parent = process.DieWithParent()
    tie_to_parent = (
        not detach
        and threading.current_thread() is threading.main_thread()
        and die_with_parent.supported
    )
    with open(log_file, "ab") as log_fh:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal goes to Python, not to it
            preexec_fn=die_with_parent if tie_to_parent else None,
            **popen_kwargs,
        )
