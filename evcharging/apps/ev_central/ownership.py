"""Which CPs this Central decides for (SPEC §9).

The CP topics are keyed by ``cp_id`` with Kafka's default partitioner and have the same
number of partitions, so partition ``p`` of each holds the same CPs; the group gives an
instance the same ``p`` of every topic (:mod:`~evcharging.common.assignor`), and it owns
the CPs of those partitions. While a rebalance is under way it owns none: nothing is
decided for a CP between giving it up and loading it again.

A standalone Ownership (the default, and every unit test's) owns every CP at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from evcharging.common.kafka import partition_for_key

__all__ = ["Ownership"]


class Ownership:
    def __init__(self, instance: str = "central", *, standalone: bool = True) -> None:
        self.instance = instance
        self.standalone = standalone
        """Owns every CP, with no group (tests, tools)."""
        self.partition_count = 0
        """Partitions of each CP topic (0 before the first assignment)."""
        self._owned: frozenset[int] = frozenset()
        self._settled = asyncio.Event()
        if standalone:
            self._settled.set()
        self._partition_cache: dict[str, int] = {}
        self.on_change: list[Callable[[frozenset[int], frozenset[int]], None]] = []
        """Told (gained, lost) partitions after each assignment (the dashboard's
        network view refreshes)."""

    @property
    def owned(self) -> frozenset[int]:
        """The partitions owned now (empty while rebalancing)."""
        return self._owned if self._settled.is_set() else frozenset()

    @property
    def settled(self) -> bool:
        """No rebalance under way: :meth:`owns` answers for good."""
        return self._settled.is_set()

    def partition_of(self, cp_id: str) -> int:
        """The CP's partition (its key's, with Kafka's default partitioner)."""
        if self.partition_count <= 0:
            return 0
        cached = self._partition_cache.get(cp_id)
        if cached is None:
            if len(self._partition_cache) > 200_000:
                self._partition_cache.clear()
            cached = self._partition_cache[cp_id] = partition_for_key(
                cp_id, range(self.partition_count))
        return cached

    def owns(self, cp_id: str) -> bool:
        """Whether this instance decides for the CP now."""
        if self.standalone:
            return True
        return self._settled.is_set() and self.partition_of(cp_id) in self._owned

    def owns_partition(self, partition: int) -> bool:
        return self.standalone or (self._settled.is_set() and partition in self._owned)

    def pause(self) -> None:
        """A rebalance began: nothing is owned until :meth:`assign`."""
        if not self.standalone:
            self._settled.clear()

    def assign(self, partitions: Iterable[int], partition_count: int) -> tuple[
            frozenset[int], frozenset[int]]:
        """The rebalance ended with these partitions: (gained, lost)."""
        if partition_count != self.partition_count:
            self._partition_cache.clear()
            self.partition_count = partition_count
        new = frozenset(partitions)
        gained, lost = new - self._owned, self._owned - new
        self._owned = new
        self.standalone = False
        self._settled.set()
        for hook in self.on_change:
            hook(gained, lost)
        return gained, lost

    async def wait_settled(self, timeout: float) -> bool:
        """Wait (at most `timeout` seconds) until no rebalance is under way."""
        if self._settled.is_set():
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        except TimeoutError:
            return False
        return True
