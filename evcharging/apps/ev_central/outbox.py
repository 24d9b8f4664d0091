"""Decisions are recorded before they are announced, and written in batches (SPEC §4).

The controller decides in memory and queues here what each decision writes (SQL
:data:`~evcharging.apps.ev_central.sql.Op` values) and what it sends (Kafka messages).
:meth:`Outbox.flush` writes everything queued in one transaction and only then publishes
the messages queued with it, in order. When the database cannot be written, nothing is
lost and nothing is announced: the queue stays as it is for the next flush, and the
consumer does not commit the offsets of the messages whose decisions are in it.

The consumer flushes once per batch it reads, so at 10,000 CPs a transaction carries the
writes of hundreds of messages instead of one each.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from loguru import logger

from evcharging.apps.ev_central.repository import Repository, StorageError
from evcharging.apps.ev_central.sql import Op
from evcharging.common.bus import BusError, Publisher
from evcharging.common.messages import Message

__all__ = ["Outbox"]

RETRY_FIRST_DELAY = 0.1
RETRY_MAX_DELAY = 5.0


class Outbox:
    def __init__(
        self,
        repo: Repository,
        bus: Publisher,
        stats: Counter[str],
        *,
        on_sent: Callable[[Message], None] | None = None,
    ) -> None:
        self._repo = repo
        self._on_sent = on_sent
        self._bus = bus
        self._stats = stats
        self._ops: list[Op] = []
        self._messages: list[Message] = []
        self._lock = asyncio.Lock()
        self._publish_failing = False
        self._soon: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Writes and messages queued and not yet flushed."""
        return len(self._ops) + len(self._messages)

    def write(self, op: Op) -> None:
        self._ops.append(op)

    def send(self, message: Message) -> None:
        """Publish `message` once the writes queued before it are recorded."""
        self._messages.append(message)

    async def flush(self) -> None:
        """Write what is queued in one transaction, then publish the messages queued with
        it. StorageError when the database cannot be written (the queue is kept)."""
        async with self._lock:
            ops, messages = len(self._ops), len(self._messages)
            if ops:
                await self._repo.apply(self._ops[:ops])
                del self._ops[:ops]
                self._stats["db_transactions"] += 1
                self._stats["db_writes"] += ops
            batch = self._messages[:messages]
            del self._messages[:messages]
            for message in batch:
                await self._publish(message)
                if self._on_sent is not None:
                    self._on_sent(message)

    def flush_soon(self) -> None:
        """Flush in a moment, once for everything queued until then (timers that fire by
        the thousand, e.g. start timeouts, share one transaction instead of one each)."""
        if self._soon is None or self._soon.done():
            self._soon = asyncio.get_running_loop().create_task(
                self._flush_later(), name="outbox-flush"
            )

    async def _flush_later(self) -> None:
        await asyncio.sleep(0)  # let the other timers of this tick queue theirs
        await self.flush_retrying()

    async def close(self) -> None:
        """Wait for a pending :meth:`flush_soon`; safe to call twice."""
        soon, self._soon = self._soon, None
        if soon is not None:
            soon.cancel()
            await asyncio.gather(soon, return_exceptions=True)

    async def flush_retrying(self) -> None:
        """Flush, and while the database cannot be written, try again with backoff (the
        repository logs the outage once and its end once)."""
        delay = RETRY_FIRST_DELAY
        while True:
            try:
                await self.flush()
            except StorageError:
                self._stats["db_retries"] += 1
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_DELAY)
            else:
                return

    async def _publish(self, message: Message) -> None:
        try:
            await self._bus.publish(message, wait=False)
        except BusError as exc:
            self._stats["publish_errors"] += 1
            if not self._publish_failing:
                self._publish_failing = True
                logger.error("could not send {}: {} (logged once until sending works again)",
                             type(message).__name__, exc)
            return
        if self._publish_failing:
            self._publish_failing = False
            logger.info("sending works again")
