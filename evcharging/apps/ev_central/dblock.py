"""One Central per SQLite file (SPEC §4): a second one refuses to start, naming the lock.

The lock is an exclusive ``flock`` on ``<database>.lock`` beside the file, held for as long
as the repository is open. The kernel releases it when the process dies however it dies
(SIGKILL included), so a crashed Central never leaves a stale lock behind; the file keeps
the holder's process id for the error message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["DatabaseInUse", "DatabaseLock"]


class DatabaseInUse(RuntimeError):
    """Another process holds the database's lock."""


class DatabaseLock:
    def __init__(self, database: Path) -> None:
        database = database.resolve()  # one lock per file, whatever path names it
        self.path = database.with_name(database.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise DatabaseInUse naming it and its holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseInUse(
                f"the database {self.path.with_suffix('')} is in use by another EV Central "
                f"(pid {holder}): it holds the lock {self.path}. Stop that one first, or give "
                "this one its own database (--db-path); several Centrals share work only on "
                "PostgreSQL"
            ) from None
        self._fd = fd
        # The pid is for the message only: a full disk must not stop a Central starting.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        """Let the lock go; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
