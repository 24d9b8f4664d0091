"""Test doubles for unit tests (no broker): a publisher that records what it is given."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from evcharging.common.bus import BusError, Fenced, Topic, topic_of
from evcharging.common.messages import Message, encode

Position = tuple[str, int]

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


class TransactionalBus:
    """Kafka's transactions in memory: what each commit carried, and the group's offsets
    as the last commit left them (offset and metadata per partition)."""

    transactional = True

    def __init__(self) -> None:
        self.commits: list[tuple[list[Message], dict[Position, int], str]] = []
        self.group: dict[Position, tuple[int, str]] = {}
        self.failures = 0
        """The next commits that fail (aborted: nothing of them is visible)."""
        self.fenced = False
        self.attempts = 0

    async def publish(self, message: Message, *, wait: bool = True) -> None:
        raise BusError("a transactional bus sends with commit_transaction")

    async def commit_transaction(
        self, messages: Sequence[Message], offsets: Mapping[Position, int], *, metadata: str,
        payloads: Sequence[bytes] | None = None,
    ) -> None:
        assert payloads is None or list(payloads) == [encode(m) for m in messages]
        self.attempts += 1
        if self.fenced:
            raise Fenced("another Central took over")
        if self.failures:
            self.failures -= 1
            raise BusError("broker unreachable")
        self.commits.append((list(messages), dict(offsets), metadata))
        self.group.update({pos: (offset, metadata) for pos, offset in offsets.items()})

    async def read_committed(self) -> dict[Position, tuple[int, str]]:
        return dict(self.group)

    @property
    def sent(self) -> list[Message]:
        return [m for messages, _, _ in self.commits for m in messages]
