"""The PostgreSQL tool's error, and the server log it quotes."""

from __future__ import annotations

from pathlib import Path

from evcharging.devtools.common import read_log_end


class PostgresError(RuntimeError):
    """PostgreSQL could not be found, initialised, started, queried or stopped."""


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` non-empty lines of a log file."""
    text = read_log_end(path, 64 * 1024)
    if text is None:
        return "(no log)"
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:]) or "(empty log)"
