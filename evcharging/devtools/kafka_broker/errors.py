"""The broker tool's errors, and the java output they quote."""

from __future__ import annotations

from pathlib import Path

from evcharging.devtools.common import read_log_end


class KafkaBrokerError(RuntimeError):
    """The Kafka jars could not be fetched, or the broker could not be started or stopped."""


class JavaExited(KafkaBrokerError):
    """A java process (the broker or the storage formatter) exited when it should not have."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code

    @property
    def crashed(self) -> bool:
        """Killed by a signal or aborted (e.g. SIGBUS from a damaged class-data archive)."""
        return self.code < 0 or self.code >= 128


def summary(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of java output, without stack frames and config dumps."""
    kept = [line for line in text.splitlines() if line.strip() and not line[:1].isspace()]
    return "\n".join(kept[-lines:]) or "(no output)"


def log_tail(path: Path, lines: int = 40) -> str:
    """:func:`summary` of the end of a log file."""
    text = read_log_end(path, 256 * 1024)
    if text is None:
        return "(no log)"
    return summary(text, lines)
