"""Decisions are recorded before they are announced, and written in batches (SPEC §4).

The controller decides in memory and queues here what each decision writes (typed
:mod:`~evcharging.apps.ev_central.writes`) and what it sends (Kafka messages).
:meth:`Outbox.flush` writes everything queued in one transaction and only then publishes
the messages queued with it, in order. When the database cannot be written, nothing is
lost and nothing is announced: the queue stays as it is for the next flush.

The consumer flushes once per batch it reads, so at 10,000 CPs a transaction carries the
writes of hundreds of messages instead of one each.

Exactly once (SPEC §4), with a transactional bus (Central's :class:`KafkaBus`): the
consumer tells :meth:`Outbox.consumed` each partition's next offset as soon as a message
is handled, and every flush is

1. ONE database transaction: the queued writes and this instance's row of
   ``outbox_flushes`` (the flush's token ``instance:run:seq``, the consumed offsets, the
   messages);
2. ONE Kafka transaction: the messages and the consumed offsets, each offset with the
   token as its metadata, so the group's committed offsets say whether the flush reached
   Kafka. It is tried again (the same content) until it commits, and no next flush
   starts before it has.

A crash before (1) loses nothing: the messages are read again and decided again. A crash
between (1) and (2) leaves a flush the database holds and Kafka does not:
:meth:`Outbox.settle`, run before consuming (by the restarted instance, or by the one that
gains a crashed instance's partitions, SPEC §9), sends it again (decided once, sent once).
Before giving its partitions up in a rebalance an instance flushes and marks its row
settled (:meth:`Outbox.release`). A flush that only moves offsets (a batch that decided
nothing) writes no row and carries the last token; it waits for :data:`OFFSETS_EVERY`
seconds (re-reading such messages after a crash changes nothing).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

from loguru import logger

from evcharging.apps.ev_central.records import PendingRow
from evcharging.apps.ev_central.repository import Repository, StorageError
from evcharging.apps.ev_central.writes import PendingSaved, PendingSettled, Write
from evcharging.common.bus import TOPIC_MODELS, BusError, Fenced, Publisher, Topic, topic_of
from evcharging.common.messages import Message, decode, encode

__all__ = [
    "OFFSETS_EVERY",
    "Committed",
    "Outbox",
    "PendingFlush",
    "Position",
    "TransactionalBus",
]

RETRY_FIRST_DELAY = 0.1
RETRY_MAX_DELAY = 5.0
OFFSETS_EVERY = 1.0
"""Seconds between Kafka transactions that only move offsets."""
CLOSING_DELIVERY_TIMEOUT = 10.0
"""After :meth:`Outbox.close`, how long a flush waits for Kafka before it gives up (the
database holds the flush: the next start sends it)."""
STABLE_TIMEOUT = 30.0
"""How long :meth:`Outbox.recover` waits to read back the offsets it committed."""

Position = tuple[str, int]
"""A consumed partition: (topic name, partition); aiokafka's ``TopicPartition`` is one."""

Committed = Mapping[Position, tuple[int, str]]
"""A group's committed offsets: the next offset and its metadata, per partition."""

@runtime_checkable
class TransactionalBus(Protocol):
    """A bus that sends messages and consumed offsets in one Kafka transaction."""

    @property
    def transactional(self) -> bool: ...

    async def commit_transaction(
        self, messages: Sequence[Message], offsets: Mapping[Position, int], *, metadata: str,
        payloads: Sequence[bytes] | None = None,
    ) -> None:
        """Send `messages` (`payloads`: them encoded, when the caller has that already)
        and commit `offsets` (each with `metadata`) atomically.
        BusError: the transaction did not commit (none of it is visible; try again);
        :class:`~evcharging.common.bus.Fenced`: this producer may never send again."""


@dataclass(frozen=True)
class PendingFlush:
    """One flush as an instance's ``outbox_flushes`` row keeps it. Its `token` is the
    metadata of every offset it commits: a partition whose committed offset carries it
    shows that Kafka has the flush."""

    token: str
    offsets: dict[Position, int]
    messages: tuple[Message, ...]

    @cached_property
    def payloads(self) -> tuple[bytes, ...]:
        """The messages encoded, once for the row and for Kafka (frozen: they stay so)."""
        return tuple(encode(m) for m in self.messages)

    def row(self, instance: str) -> PendingSaved:
        offsets = [[topic, partition, offset]
                   for (topic, partition), offset in sorted(self.offsets.items())]
        messages = [[topic_of(m).value, payload.decode()]
                    for m, payload in zip(self.messages, self.payloads, strict=True)]
        return PendingSaved(instance, self.token, json.dumps(offsets), json.dumps(messages))

    @classmethod
    def from_row(cls, row: PendingRow) -> PendingFlush:
        offsets = {(str(t), int(p)): int(o) for t, p, o in json.loads(row.offsets)}
        messages = tuple(decode(TOPIC_MODELS[Topic(t)], text.encode())
                         for t, text in json.loads(row.messages))
        return cls(row.token, offsets, messages)

    def in_kafka(self, committed: Committed) -> bool:
        """Whether the group's committed offsets show this flush."""
        return any(committed.get(position, (0, ""))[1] == self.token
                   for position in self.offsets)


class Outbox:
    def __init__(
        self,
        repo: Repository,
        bus: Publisher,
        stats: Counter[str],
        *,
        on_sent: Callable[[Message], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        instance: str = "",
    ) -> None:
        self.instance = instance
        """Whose row of ``outbox_flushes`` this outbox writes (SPEC §9)."""
        self._run = uuid.uuid4().hex[:12]
        """This process's mark in its flushes' tokens (a restart counts anew)."""
        self._repo = repo
        self._on_sent = on_sent
        self._bus = bus
        self._txn = bus if isinstance(bus, TransactionalBus) and bus.transactional else None
        self._stats = stats
        self._clock = clock
        self._ops: list[Write] = []
        self._messages: list[Message] = []
        self._lock = asyncio.Lock()
        self._publish_failing = False
        self._soon: asyncio.Task[None] | None = None
        # Exactly once (a transactional bus only):
        self._seq = 0
        """The number of the last flush written (its token is instance:run:seq)."""
        self._recovered = False
        self._consumed: dict[Position, int] = {}
        """The next offset of every partition read, as the consumer handled it."""
        self._committed: dict[Position, int] = {}
        """The offsets the last committed Kafka transaction carried."""
        self._committed_at = -OFFSETS_EVERY
        self._delivery: asyncio.Task[None] | None = None
        self._delivering: PendingFlush | None = None
        self._closing = False
        self.before_flush: list[Callable[[], None]] = []
        """Called at the start of each flush, under its lock: what they queue leaves in it
        (smart charging plans the sites where sessions started, SPEC §10)."""

    @property
    def transactional(self) -> bool:
        """Messages leave with the consumed offsets in one Kafka transaction."""
        return self._txn is not None

    @property
    def pending(self) -> int:
        """Writes and messages queued and not yet flushed (or flushed and not delivered)."""
        undelivered = 0 if self._delivering is None else len(self._delivering.messages)
        return len(self._ops) + len(self._messages) + undelivered

    @property
    def seq(self) -> int:
        """The sequence number of the last flush written (0: none yet)."""
        return self._seq

    def write(self, write: Write) -> None:
        """Record `write` with the next flush (before the messages queued after it)."""
        self._ops.append(write)

    def send(self, message: Message) -> None:
        """Publish `message` once the writes queued before it are recorded."""
        self._messages.append(message)

    def consumed(self, position: Position, next_offset: int) -> None:
        """The consumer handled a message: `next_offset` is where its partition resumes.
        The next flush commits it with the decisions queued so far."""
        self._consumed[(position[0], position[1])] = next_offset

    def restart_topics(self, names: Iterable[str]) -> None:
        """The broker lost these topics and Central recreated them: their partitions start
        again at offset 0, and the next flush commits that instead of the offsets of the
        lost topics (which would skip the new topics' first messages)."""
        recreated = set(names)
        for position in self._consumed:
            if position[0] in recreated:
                self._consumed[position] = 0
        self._committed = {}

    async def flush(self) -> None:
        """Write what is queued in one transaction, then publish the messages queued with
        it. StorageError when the database cannot be written (the queue is kept);
        :class:`~evcharging.common.bus.Fenced` when another Central took over."""
        async with self._lock:
            for hook in self.before_flush:
                hook()
            if self._txn is None:
                await self._flush_plain()
            else:
                await self._flush_transaction()

    async def _flush_plain(self) -> None:
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

    async def _flush_transaction(self) -> None:
        if not self._recovered:
            return  # nothing read yet (no partitions): what is queued waits for settle()
        if self._delivering is not None:  # a flush written whose delivery was interrupted
            await self._finish_delivery()
        ops, messages = len(self._ops), len(self._messages)
        offsets = dict(self._consumed)
        if not ops and not messages:
            if offsets == self._committed or (
                self._clock() - self._committed_at < OFFSETS_EVERY
            ):
                return
            flush = PendingFlush(self._token(self._seq), offsets, ())  # no row: nothing to
            # send again
        else:
            flush = PendingFlush(self._token(self._seq + 1), offsets,
                                 tuple(self._messages[:messages]))
            await self._repo.apply([*self._ops[:ops], flush.row(self.instance)])
            self._seq += 1
            del self._ops[:ops]
            del self._messages[:messages]
            self._stats["db_transactions"] += 1
            self._stats["db_writes"] += ops
        self._delivering = flush
        await self._finish_delivery()

    async def _finish_delivery(self) -> None:
        """Deliver the flush written last, trying until Kafka commits it. The attempt runs
        in a task of its own: a caller that is cancelled does not cut a transaction in
        two, and the next flush waits for that same attempt instead of starting one."""
        flush = self._delivering
        assert flush is not None
        failed = self._delivery is not None and self._delivery.done() and (
            self._delivery.cancelled() or self._delivery.exception() is not None)
        if self._delivery is None or failed:
            self._delivery = asyncio.get_running_loop().create_task(
                self._deliver(flush), name="outbox-delivery"
            )
        if self._closing:
            try:
                await asyncio.wait_for(asyncio.shield(self._delivery), CLOSING_DELIVERY_TIMEOUT)
            except TimeoutError:
                self._delivery.cancel()
                raise BusError(f"flush {flush.token} did not reach Kafka before shutdown; the "
                               "database holds it and the next start sends it") from None
        else:
            await asyncio.shield(self._delivery)
        self._delivery = None
        self._delivering = None
        self._committed = flush.offsets
        self._committed_at = self._clock()
        self._stats["kafka_transactions"] += 1
        if self._on_sent is not None:
            for message in flush.messages:
                self._on_sent(message)

    async def _deliver(self, flush: PendingFlush) -> None:
        assert self._txn is not None
        delay = RETRY_FIRST_DELAY
        while True:
            try:
                await self._txn.commit_transaction(
                    flush.messages, flush.offsets, metadata=flush.token,
                    payloads=flush.payloads,
                )
            except Fenced as exc:
                logger.critical("flush {} cannot be sent, another Central took over ({}); "
                                "stopping", flush.token, exc)
                raise
            except BusError as exc:
                self._stats["publish_errors"] += 1
                self._stats["kafka_retries"] += 1
                if not self._publish_failing:
                    self._publish_failing = True
                    logger.error("flush {} ({} message(s)) not sent: {}; retrying (logged "
                                 "once until sending works again)", flush.token,
                                 len(flush.messages), exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_DELAY)
                continue
            if self._publish_failing:
                self._publish_failing = False
                logger.info("sending works again")
            return

    def _token(self, seq: int) -> str:
        return f"{self.instance}:{self._run}:{seq}"

    async def recover(self, read_committed: Callable[[], Awaitable[Committed]]) -> None:
        """One Central (no partitions to share): before it consumes, send again its last
        flush if the database holds it and Kafka does not, and start from the group's
        committed offsets of every partition it reads (:meth:`settle`)."""
        await self.settle(read_committed, adopt=(self.instance, ""), positions=None)

    async def settle(
        self,
        read_committed: Callable[[], Awaitable[Committed]],
        *,
        adopt: Iterable[str],
        positions: Iterable[Position] | None,
    ) -> dict[Position, int]:
        """Before Central consumes partitions: send again the last flush of each instance
        in `adopt` (this one's from before a restart, or a crashed one's whose partitions
        it gained) that the database holds and Kafka does not (its decisions are
        recorded; nothing is decided twice), then start this outbox's offsets at the
        group's committed ones of `positions` (None: every partition `read_committed`
        reads). Returns those offsets: where consuming resumes. `read_committed` reads
        the group's committed offsets with their metadata (offset 0 and no metadata
        where the group has none)."""
        if self._txn is None:
            self._recovered = True
            return {}
        async with self._lock:
            if self._delivering is not None:
                await self._finish_delivery()
            committed = await read_committed()
            rows = await self._repo.load_flushes()
            for instance in dict.fromkeys(adopt):
                row = rows.get(instance)
                if row is None:
                    continue
                flush = PendingFlush.from_row(row)
                if flush.offsets and flush.in_kafka(committed):
                    logger.info("outbox: the last flush of {} is in Kafka",
                                instance or "the Central before", )
                else:
                    logger.warning("outbox: the last flush of {} ({} message(s)) was recorded "
                                   "but did not reach Kafka; sending it again",
                                   instance or "the Central before", len(flush.messages))
                    await self._commit_alone(flush)
                    self._stats["flushes_recovered"] += 1
                    if flush.offsets:
                        committed = await self._wait_stable(read_committed, flush)
                await self._repo.apply([PendingSettled(instance)])
            start = {pos: offset for pos, (offset, _) in committed.items()
                     if positions is None or pos in positions}
            if positions is not None:
                for pos in positions:
                    start.setdefault((pos[0], pos[1]), 0)
            self._consumed.update(start)
            self._committed.update(start)
            self._recovered = True
            return start

    async def _commit_alone(self, flush: PendingFlush) -> None:
        """Deliver another flush (a recorded one Kafka did not get) with its own token and
        offsets, before anything else this outbox sends."""
        self._delivering = flush
        saved = self._committed, self._committed_at
        await self._finish_delivery()
        self._committed, self._committed_at = saved

    async def release(
        self, read_committed: Callable[[], Awaitable[Committed]] | None = None
    ) -> None:
        """Before giving every partition up (a rebalance): everything decided is flushed
        and in Kafka with every offset read (not only when :data:`OFFSETS_EVERY` says),
        and, with `read_committed`, shows in the group's committed offsets (the next
        owner starts from them); the offsets read so far are forgotten (another instance
        may read them next), and this instance's last flush is marked settled, so that
        nobody sends it again. Nothing before the first :meth:`settle` (nothing read)."""
        if self._txn is not None and not self._recovered:
            return
        self._committed_at = -math.inf  # offsets alone leave now too
        await self.flush_retrying()
        async with self._lock:
            if self._txn is None:
                return
            if read_committed is not None and self._committed:
                await self._wait_offsets(read_committed, dict(self._committed))
            self._consumed.clear()
            self._committed.clear()
            await self._repo.apply([PendingSettled(self.instance)])

    async def _wait_offsets(
        self, read_committed: Callable[[], Awaitable[Committed]], offsets: dict[Position, int]
    ) -> None:
        """Wait until the group's committed offsets are `offsets` (the last transaction's
        markers written: the next owner of these partitions starts where this one ends)."""
        deadline = time.monotonic() + STABLE_TIMEOUT
        while time.monotonic() < deadline:
            committed = await read_committed()
            if all(committed.get(pos, (0, ""))[0] == offset for pos, offset in offsets.items()):
                return
            await asyncio.sleep(0.05)
        raise BusError("the offsets committed before a rebalance do not show")

    async def _wait_stable(
        self, read_committed: Callable[[], Awaitable[Committed]], flush: PendingFlush
    ) -> Committed:
        """The group coordinator applies a transaction's offsets once its commit marker is
        written, just after the commit returns: wait until they show before consuming."""
        deadline = time.monotonic() + STABLE_TIMEOUT
        while time.monotonic() < deadline:
            committed = await read_committed()
            if flush.in_kafka(committed):
                return committed
            await asyncio.sleep(0.05)
        raise BusError(f"the offsets of flush {flush.token} were committed but do not show")

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
        """Wait for a pending :meth:`flush_soon`; safe to call twice. A delivery in flight
        is left to finish (the next flush waits for it; a restart sends it again); from
        now on a flush waits at most :data:`CLOSING_DELIVERY_TIMEOUT` for Kafka."""
        self._closing = True
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
