"""The PostgreSQL tool's error, and the server log it quotes."""

from __future__ import annotations

import os
from pathlib import Path


class PostgresError(RuntimeError):
    """PostgreSQL could not be found, initialised, started, queried or stopped."""


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` non-empty lines of a log file."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:]) or "(empty log)"
