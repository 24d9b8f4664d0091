"""The other Centrals sharing the work (SPEC §9): who owns a CP now, and where its API is.

Every instance writes its row of ``centrals`` every 2 s (:mod:`~.rebalance`): its
``peer_url`` and the partitions it owns. :class:`Directory` keeps a copy of those rows,
read again when it is older than :data:`REFRESH_EVERY` seconds and whenever an owner is
not found (a miss), and answers :meth:`Directory.owner` from it: this instance when its
:class:`~.ownership.Ownership` owns the CP, else the live row (seen within
:data:`LIVE_FOR` seconds) whose partitions hold the CP's partition, else None (nobody owns
it now: a rebalance is under way). A database that does not answer keeps the last copy
(logged once until it answers again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from loguru import logger

from evcharging.apps.ev_central.ownership import Ownership
from evcharging.apps.ev_central.records import CentralRecord
from evcharging.apps.ev_central.repository import StorageError
from evcharging.common.kafka import partition_for_key
from evcharging.common.messages import utcnow

__all__ = ["LIVE_FOR", "REFRESH_EVERY", "Directory", "Peer"]

Item = TypeVar("Item")

LIVE_FOR = 10.0
"""Seconds since a row's ``seen_at`` within which its instance counts as live."""
REFRESH_EVERY = 1.0
"""Seconds a copy of the rows is used before it is read again."""
LOAD_TIMEOUT = 1.0
"""Seconds a read of the rows may take (a busy database keeps the last copy)."""


@dataclass(frozen=True)
class Peer:
    """A Central: this instance (``local``) or another one, whose API is at ``url``."""

    instance: str
    url: str
    local: bool = False


class Directory:
    """The live Centrals, from the ``centrals`` rows (see the module's text)."""

    def __init__(
        self,
        ownership: Ownership,
        load: Callable[[], Awaitable[Sequence[CentralRecord]]],
        *,
        clock: Callable[[], datetime] = utcnow,
        timer: Callable[[], float] = time.monotonic,
        live_for: float = LIVE_FOR,
        refresh_every: float = REFRESH_EVERY,
    ) -> None:
        self.ownership = ownership
        self.me = Peer(ownership.instance, "", local=True)
        self._load = load
        self._clock = clock
        self._timer = timer
        self._live_for = timedelta(seconds=live_for)
        self._refresh_every = refresh_every
        self._rows: tuple[CentralRecord, ...] = ()
        self._loaded_at = -float("inf")
        self._lock = asyncio.Lock()
        self._failing = False
        self.loads = 0

    # ------------------------------------------------------------------ the rows

    def invalidate(self) -> None:
        """The copy is stale (a peer said it does not own a CP): read it again next."""
        self._loaded_at = -float("inf")

    async def refresh(self, *, force: bool = False) -> None:
        """Read the rows again if the copy is older than :data:`REFRESH_EVERY` (or `force`)."""
        if not force and self._fresh():
            return
        async with self._lock:
            if not force and self._fresh():  # another caller read them meanwhile
                return
            try:
                async with asyncio.timeout(LOAD_TIMEOUT):
                    rows = tuple(await self._load())
            except (StorageError, TimeoutError) as exc:
                if not self._failing:
                    logger.warning("the list of Centrals could not be read ({}); using the "
                                   "last one (logged once)", exc or "timeout")
                self._failing = True
                self._loaded_at = self._timer()  # not again before REFRESH_EVERY
                return
            if self._failing:
                logger.info("the list of Centrals is read again")
                self._failing = False
            self._rows = rows
            self._loaded_at = self._timer()
            self.loads += 1

    def _fresh(self) -> bool:
        return self._timer() - self._loaded_at < self._refresh_every

    def _live(self) -> list[CentralRecord]:
        oldest = self._clock() - self._live_for
        return [row for row in self._rows
                if row.instance != self.me.instance and row.seen_at >= oldest]

    # ------------------------------------------------------------------ answers

    def peers(self) -> list[Peer]:
        """The other live Centrals that claim partitions, by instance (from the copy): one
        that claims none holds no CP (it left, or its partitions were taken over)."""
        rows = sorted((row for row in self._live() if row.partitions),
                      key=lambda row: row.instance)
        return [Peer(row.instance, row.peer_url.rstrip("/")) for row in rows]

    def partition_of(self, cp_id: str) -> int:
        """The CP's partition: as this instance counts them, or as a peer does before this
        one's first assignment."""
        if self.ownership.partition_count > 0:
            return self.ownership.partition_of(cp_id)
        count = max((row.partition_count for row in self._live()), default=0)
        return partition_for_key(cp_id, range(count)) if count > 0 else 0

    def owner(self, cp_id: str) -> Peer | None:
        """Who decides for the CP now, from the copy: this instance, a peer, or None."""
        if self.ownership.owns(cp_id):
            return self.me
        partition = self.partition_of(cp_id)
        for row in self._live():
            if partition in row.partitions:
                return Peer(row.instance, row.peer_url.rstrip("/"))
        return None

    async def owner_of(self, cp_id: str) -> Peer | None:
        """:meth:`owner` from a fresh copy (read again on a miss)."""
        await self.refresh()
        owner = self.owner(cp_id)
        if owner is None:
            await self.refresh(force=True)
            owner = self.owner(cp_id)
        return owner

    async def group(
        self, items: Iterable[Item], cp_id_of: Callable[[Item], str]
    ) -> dict[Peer | None, list[Item]]:
        """`items` by the owner of their CP (None: nobody owns it now), in their order."""
        await self.refresh()
        groups: dict[Peer | None, list[Item]] = {}
        for item in items:
            groups.setdefault(self.owner(cp_id_of(item)), []).append(item)
        return groups
