"""Group commit: changes that must be on disk before the gateway answers, gathered into
one write of the state file.

A charger never sends again a CALL it has an answer to, so the gateway answers a
transaction's start or stop only once the state file holds it (SPEC §4: the ledger). One
write per change would cost thousands of writes a second at thousands of chargers; instead
a handler that changed something durable asks for a write (:meth:`GroupCommit.ask`) and
awaits the future it gets. The writer (:meth:`~evcharging.apps.ev_ocpp.store.StateStore.
keep_saved`) writes at :meth:`GroupCommit.due`, a short delay after the oldest unanswered
ask, so every change made meanwhile shares that write; a write covers exactly the asks made
before it began (:meth:`GroupCommit.begin`), and those are answered when it completed
(:meth:`GroupCommit.written`). A failed write answers nobody: the asks stay waiting for the
next write (the charger, unanswered, sends its CALL again if it gives up).

Pure bookkeeping over the caller's clock: no task, no sleep of its own.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["GroupCommit"]


class GroupCommit:
    """The asks for a durable write and the writes that answer them.

    Tickets count the asks; a write begun after ask `n` covers tickets up to the number
    handed out when it began."""

    def __init__(self) -> None:
        self._asked = 0
        """Tickets handed out."""
        self._covered = 0
        """The highest ticket a completed write covers."""
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        """(ticket, its future), in ticket order."""
        self._oldest: float | None = None
        """When the oldest ask no write has begun to cover was made (the caller's clock)."""
        self.asked = asyncio.Event()
        """Set while some ask waits for a write to begin (the writer waits on it)."""

    @property
    def waiting(self) -> int:
        """Asks not yet answered."""
        return len(self._waiting)

    def ask(self, now: float) -> asyncio.Future[None]:
        """Ask for a write that includes every change made so far; the future is done once
        one has completed. `now`: the caller's clock (the writer's :meth:`due`)."""
        self._asked += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((self._asked, future))
        if self._oldest is None:
            self._oldest = now
            self.asked.set()
        return future

    def due(self, delay: float) -> float | None:
        """When the next write is due: `delay` after the oldest ask no write has begun
        to cover; None when there is none."""
        return None if self._oldest is None else self._oldest + delay

    def begin(self) -> int:
        """A write begins (call it before taking the snapshot it writes): it covers every
        ask made so far; returns what to pass to :meth:`written` or :meth:`failed`."""
        self._oldest = None
        self.asked.clear()
        return self._asked

    def written(self, covers: int) -> None:
        """The write begun with :meth:`begin` returning `covers` completed: its asks are
        answered (a cancelled waiter is simply dropped)."""
        self._covered = max(self._covered, covers)
        waiting = self._waiting
        while waiting and waiting[0][0] <= self._covered:
            _, future = waiting.popleft()
            if not future.done():
                future.set_result(None)

    def failed(self, now: float) -> None:
        """The write failed: its asks wait for the next one, due as if asked `now`."""
        if self._waiting and self._oldest is None:
            self._oldest = now
            self.asked.set()
