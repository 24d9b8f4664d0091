"""Test doubles for unit tests (no broker): a publisher that records what it is given."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from evcharging.common.bus import BusError, Topic, topic_of
from evcharging.common.messages import Message

M = TypeVar("M", bound=Message)


class RecordingPublisher:
    """Records every published message; tests await the ones they expect.

    Set ``fail`` to make ``publish`` raise :class:`BusError` (a broker outage).
    """

    def __init__(self) -> None:
        self.messages: list[tuple[Topic, Message]] = []
        self.fail = False
        self.failures = 0
        self._changed = asyncio.Condition()

    async def publish(self, message: Message, *, wait: bool = True) -> None:
        topic = topic_of(message)
        if self.fail:
            self.failures += 1
            raise BusError(f"simulated outage publishing to {topic.value}")
        self.messages.append((topic, message))
        async with self._changed:
            self._changed.notify_all()

    def of(self, kind: type[M], since: int = 0) -> list[M]:
        """The messages of one model, in order, from index `since` of ``messages``."""
        return [m for _, m in self.messages[since:] if isinstance(m, kind)]

    async def wait_for(
        self,
        kind: type[M],
        predicate: Callable[[M], bool] = lambda _: True,
        *,
        since: int = 0,
        timeout: float = 2.0,
    ) -> M:
        """The first message of `kind` from index `since` that matches, waiting for it."""

        def find() -> M | None:
            return next((m for m in self.of(kind, since) if predicate(m)), None)

        async with asyncio.timeout(timeout), self._changed:
            while (found := find()) is None:
                await self._changed.wait()
            return found

    async def wait_count(
        self,
        kind: type[M],
        count: int,
        predicate: Callable[[M], bool] = lambda _: True,
        *,
        since: int = 0,
        timeout: float = 2.0,
    ) -> list[M]:
        """The first `count` matching messages of `kind` from index `since`, waiting for them."""

        def matching() -> list[M]:
            return [m for m in self.of(kind, since) if predicate(m)]

        async with asyncio.timeout(timeout), self._changed:
            while len(found := matching()) < count:
                await self._changed.wait()
            return found[:count]
