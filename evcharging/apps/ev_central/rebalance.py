"""What a Central does when the group moves partitions between instances (SPEC §9).

On revoke (every partition, aiokafka's eager protocol): stop deciding, flush the outbox
and wait until Kafka has it, forget the offsets read, and tell the database that this
instance claims nothing (so that its successor does not fence it).

On assign, before the consumer reads anything:

1. forget the CPs of the partitions given up (everything decided for them is flushed);
2. under the ``rebalance`` lock, find the instances whose claims cover a partition
   gained: they did not give it up (they crashed). Fence their transactional ids (the
   broker aborts their open transaction), send again their last flush if Kafka does not
   have it (:meth:`Outbox.settle`), and cut their claims;
3. load the CPs and the running sessions of the partitions gained from the database;
4. own the partitions, claim them, and read them from the committed offsets (which now
   include a crashed instance's last flush).

:class:`Membership` keeps this instance's row of ``centrals`` fresh: where its API
answers and what it claims (other instances forward changes there).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from aiokafka import TopicPartition
from loguru import logger

from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.outbox import Committed
from evcharging.apps.ev_central.ownership import Ownership
from evcharging.apps.ev_central.repository import StorageError
from evcharging.apps.ev_central.writes import CentralSaved, ClaimsCut, PendingSettled
from evcharging.common.bus import BusError
from evcharging.common.messages import utcnow

__all__ = ["LOCK", "Membership", "Rebalancer", "Self"]

T = TypeVar("T")

LOCK = "rebalance"
"""The advisory lock an instance holds while it settles what crashed instances left."""
LOCK_WAIT = 30.0
RETRY_FIRST_DELAY = 0.2
RETRY_MAX_DELAY = 5.0
HEARTBEAT = 2.0
"""Seconds between the refreshes of an instance's row (``seen_at``)."""


@dataclass(frozen=True)
class Self:
    """How this instance shows in ``centrals``."""

    instance: str
    peer_url: str
    transactional_id: str
    legacy_transactional_id: str
    """The transactional id of a Central from before §9 (its flush has instance '')."""


class Rebalancer:
    def __init__(
        self,
        controller: Controller,
        me: Self,
        *,
        read_committed: Callable[[], Awaitable[Committed]],
        fence: Callable[[str], Awaitable[None]],
        partition_count: Callable[[], int],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.controller = controller
        self.me = me
        self._read_committed = read_committed
        self._fence = fence
        self._partition_count = partition_count
        self._clock = clock
        self.claims: frozenset[int] = frozenset()
        """What this instance claims in ``centrals`` now."""
        self._held: frozenset[int] = frozenset()
        """The partitions whose CPs are loaded (what the last assignment gave)."""
        self.rebalances = 0

    @property
    def ownership(self) -> Ownership:
        return self.controller.ownership

    def row(self) -> CentralSaved:
        return CentralSaved(self.me.instance, self.me.peer_url, self.me.transactional_id,
                            self.claims, self._partition_count(), self._clock())

    async def revoked(self) -> None:
        self.ownership.pause()
        await self._retrying("giving the partitions up", self._release)

    async def _release(self) -> None:
        await self.controller.outbox.release(self._read_committed)
        self.claims = frozenset()
        await self.controller.repo.apply([self.row()])

    async def assigned(
        self, assigned: frozenset[TopicPartition]
    ) -> Mapping[TopicPartition, int]:
        partitions = frozenset(tp.partition for tp in assigned)
        start = await self._retrying("taking the partitions",
                                     lambda: self._take(assigned, partitions))
        self.rebalances += 1
        return start

    async def _take(
        self, assigned: frozenset[TopicPartition], partitions: frozenset[int]
    ) -> dict[TopicPartition, int]:
        ownership = self.ownership
        count = self._partition_count()
        ownership.partition_count = count
        gained, lost = partitions - self._held, self._held - partitions
        self.controller.drop(lambda cp_id: ownership.partition_of(cp_id) in partitions)
        self._held = self._held - lost
        repo = self.controller.repo
        await self._lock()
        try:
            crashed = [c for c in await repo.load_centrals()
                       if c.instance != self.me.instance and c.partitions & gained]
            flushes = await repo.load_flushes()
            for central in crashed:
                logger.warning("Central {} did not give partitions {} up (it stopped?): "
                               "fencing it and settling its last flush", central.instance,
                               sorted(central.partitions & gained))
                await self._fence(central.transactional_id)
            if "" in flushes:
                await self._fence(self.me.legacy_transactional_id)
            adopt = [self.me.instance, "", *(c.instance for c in crashed)]
            positions = {(tp.topic, tp.partition) for tp in assigned}
            start = await self.controller.outbox.settle(
                self._read_committed, adopt=adopt, positions=positions)
            cuts = [ClaimsCut(c.instance, c.partitions - partitions) for c in crashed]
            if cuts:
                await repo.apply(cuts)
        finally:
            await repo.release_lock(LOCK)
        await self.controller.load(keep=lambda cp_id: ownership.partition_of(cp_id) in gained)
        self._held = partitions
        ownership.assign(partitions, count)
        self.claims = partitions
        await repo.apply([self.row()])
        logger.info("Central {} owns partitions {} (gained {}, gave up {})", self.me.instance,
                    sorted(partitions), sorted(gained), sorted(lost))
        return {TopicPartition(topic, partition): offset
                for (topic, partition), offset in start.items()}

    async def _lock(self) -> None:
        """Take the rebalance lock (another instance may be settling a crashed one's
        flush: wait for it, so that the flush is sent once)."""
        repo = self.controller.repo
        deadline = asyncio.get_running_loop().time() + LOCK_WAIT
        while not await repo.hold_lock(LOCK):
            if asyncio.get_running_loop().time() > deadline:
                raise StorageError(f"the {LOCK!r} lock stayed taken for {LOCK_WAIT:g}s")
            await asyncio.sleep(0.1)

    async def _retrying(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        """Run `step` until it works: a rebalance that half happened would leave CPs
        with no owner (the database or Kafka out: logged once, tried again)."""
        delay = RETRY_FIRST_DELAY
        failing = False
        while True:
            try:
                result = await step()
            except (StorageError, BusError) as exc:
                if not failing:
                    logger.error("{}: {}; trying again (logged once)", what, exc)
                    failing = True
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_DELAY)
                continue
            if failing:
                logger.info("{}: done", what)
            return result

    async def leave(self) -> None:
        """At shutdown, once the outbox is flushed and Kafka has it all: claim nothing and
        mark the last flush settled (nobody needs to fence this instance or send its
        flush again). With a flush Kafka did not take, both stay for the successor."""
        if self.controller.outbox.pending or not self.rebalances:
            return
        self.claims = frozenset()
        try:
            await self.controller.repo.apply([PendingSettled(self.me.instance), self.row()])
        except StorageError as exc:
            logger.warning("could not clear this Central's claims: {}", exc)


class Membership:
    """Keeps this instance's row of ``centrals`` fresh every :data:`HEARTBEAT` seconds."""

    def __init__(self, rebalancer: Rebalancer, interval: float = HEARTBEAT) -> None:
        self.rebalancer = rebalancer
        self.interval = interval

    async def run(self) -> None:
        repo = self.rebalancer.controller.repo
        while True:
            with contextlib.suppress(StorageError):  # the repository logs an outage once
                await repo.apply([self.rebalancer.row()])
            await asyncio.sleep(self.interval)
