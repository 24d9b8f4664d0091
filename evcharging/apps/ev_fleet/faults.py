"""Random hardware faults, for demos that look like a real network (``--fault-rate``).

Faults arrive as a Poisson process of ``rate`` faults per CP-hour over the whole fleet
(``rate × CPs / 3600`` per second), each on a CP chosen at random; each is repaired
``repair_after`` seconds later. :class:`FaultPlan` is the pure schedule (seeded, with the
clock passed in); :func:`inject_faults` carries it out on the fleet's CPs through the
engine's own hooks (``cp.fault`` / ``cp.recover``), as ``POST /cp/{id}/fault`` does, so the
fleet's monitoring then reports them to Central like any other fault.

A CP that is already in FAULT (or stopped) when its turn comes is skipped, and a repair
finds nothing to do when someone recovered the CP first (or faulted it again for another
reason).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from loguru import logger

from evcharging.apps.ev_fleet.fleet import Fleet
from evcharging.common.states import InvalidTransition

__all__ = ["RANDOM_FAULT_REASON", "Action", "FaultPlan", "FaultStats", "inject_faults"]

RANDOM_FAULT_REASON = "simulated hardware fault (random)"
_SECONDS_PER_HOUR = 3600.0


class Action(Enum):
    FAULT = "fault"
    REPAIR = "repair"


@dataclass
class FaultStats:
    injected: int = 0
    skipped: int = 0
    """Faults that found their CP already faulty or stopped."""
    repaired: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class FaultPlan:
    """When each random fault and repair is due. Pure: times are what the caller says."""

    def __init__(
        self,
        cp_ids: Sequence[str],
        rate: float,
        repair_after: float,
        *,
        rng: random.Random,
        now: float,
    ) -> None:
        if rate < 0 or repair_after <= 0:
            raise ValueError("need rate >= 0 and repair_after > 0")
        if not cp_ids:
            raise ValueError("no CPs to break")
        self.cp_ids = list(cp_ids)
        self.repair_after = repair_after
        self.per_second = rate * len(self.cp_ids) / _SECONDS_PER_HOUR
        """Faults per second over the whole fleet."""
        self._rng = rng
        self._next_fault = now + self._gap() if self.per_second > 0 else None
        self._repairs: deque[tuple[float, str]] = deque()

    def _gap(self) -> float:
        return self._rng.expovariate(self.per_second)

    def next_due(self) -> float | None:
        """When the next fault or repair is due (None: never)."""
        due = [t for t in (self._next_fault, self._repairs[0][0] if self._repairs else None)
               if t is not None]
        return min(due) if due else None

    def due(self, now: float) -> list[tuple[Action, str]]:
        """Every action due by `now`, in time order (repairs first on a tie)."""
        actions: list[tuple[float, Action, str]] = []
        while self._repairs and self._repairs[0][0] <= now:
            at, cp_id = self._repairs.popleft()
            actions.append((at, Action.REPAIR, cp_id))
        while self._next_fault is not None and self._next_fault <= now:
            actions.append((self._next_fault, Action.FAULT, self._rng.choice(self.cp_ids)))
            self._next_fault += self._gap()
        actions.sort(key=lambda item: (item[0], item[1] is Action.FAULT))
        return [(action, cp_id) for _, action, cp_id in actions]

    def faulted(self, cp_id: str, now: float) -> None:
        """The fault on `cp_id` happened at `now`: its repair is due `repair_after` later."""
        self._repairs.append((now + self.repair_after, cp_id))


async def inject_faults(fleet: Fleet, plan: FaultPlan, stats: FaultStats) -> None:
    """Carry out `plan` on `fleet` until cancelled."""
    loop = asyncio.get_running_loop()
    logger.info("random faults: {:.3g} per CP-hour ({:.3g} per minute over {:,} CPs), each "
                "repaired after {:g} s", plan.per_second * _SECONDS_PER_HOUR / len(plan.cp_ids),
                plan.per_second * 60, len(plan.cp_ids), plan.repair_after)
    while True:
        due = plan.next_due()
        if due is None:
            await asyncio.Event().wait()  # nothing will ever be due: wait to be cancelled
            continue
        await asyncio.sleep(max(0.0, due - loop.time()))
        now = loop.time()
        for action, cp_id in plan.due(now):
            cp = fleet.cps[cp_id]
            log = logger.bind(cp_id=cp_id)
            try:
                if action is Action.FAULT:
                    await cp.fault(RANDOM_FAULT_REASON)
                    plan.faulted(cp_id, loop.time())
                    stats.injected += 1
                    log.info("random fault injected; repair in {:g} s", plan.repair_after)
                elif cp.reason == RANDOM_FAULT_REASON:  # not a fault someone else caused
                    await cp.recover()
                    stats.repaired += 1
                    log.info("random fault repaired")
            except InvalidTransition as exc:
                if action is Action.FAULT:
                    stats.skipped += 1
                log.debug("random {} skipped: {}", action.value, exc)
