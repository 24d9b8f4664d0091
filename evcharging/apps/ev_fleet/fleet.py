"""The fleet's charging points: one :class:`ChargingPoint` per id, one producer, one router.

Every CP is the CP Engine's own :class:`~evcharging.apps.ev_cp_e.engine.ChargingPoint`
(same state machine, same messages on Kafka), all publishing through the one publisher
they are given. The fleet's single ``central.commands`` consumer hands each command to
:meth:`Fleet.handle_command`, which finds the CP by id in a dict; a command for an id the
fleet does not run (another fleet's CP on a shared partition) is counted and ignored.

Commands of different CPs are carried out side by side, so one slow CP does not hold up
the others; those of one CP keep their order (each runs as a task, in arrival order, and
queues on the CP's lock, which is first come first served). At most ``max_in_flight``
commands run at once; then the consumer waits.

:meth:`Fleet.connect` connects the CPs ``batch`` at a time (the producer gets a steady
stream instead of ten thousand messages at once) and logs progress every few seconds;
:meth:`Fleet.stop` stops them the same way (a running session ends STOPPED, an ACTIVATED
CP disconnects, as the engine does).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from loguru import logger

from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.apps.ev_fleet.plan import CPSpec
from evcharging.common.bus import Publisher
from evcharging.common.config import CPEngineSettings
from evcharging.common.messages import CentralCommand, CommandType
from evcharging.common.service import TaskOwner
from evcharging.common.states import CPState

__all__ = ["Fleet", "FleetStats"]

PROGRESS_EVERY = 3.0
"""Seconds between progress lines while connecting or stopping."""


@dataclass
class FleetStats:
    """Counters of the fleet (read them, do not write them)."""

    commands: int = 0
    """Commands routed to one of the fleet's CPs."""
    unknown_commands: int = 0
    """Commands for ids the fleet does not run (counted and ignored)."""
    shutdowns: int = 0
    """CPs that Central shut down with SHUTDOWN (they stay stopped)."""

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class Fleet:
    """Many charging points behind one publisher and one command router."""

    def __init__(
        self,
        specs: Sequence[CPSpec],
        publisher: Publisher,
        engine: CPEngineSettings,
        *,
        rng: random.Random | None = None,
        max_in_flight: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        rng = rng or random.Random()  # noqa: S311 - heartbeat phases, not secrets
        self.specs = {spec.cp_id: spec for spec in specs}
        if len(self.specs) != len(specs):
            raise ValueError("the fleet's CP ids must be unique")
        self.cps: dict[str, ChargingPoint] = {
            spec.cp_id: ChargingPoint.from_settings(
                engine, publisher, cp_id=spec.cp_id, clock=clock,
                # Each CP's heartbeat at its own phase of the interval: no herd.
                first_heartbeat=rng.uniform(0.0, engine.status_interval),
                log_bus_errors=False,  # the monitoring says it once for every CP
            )
            for spec in specs
        }
        self.stats = FleetStats()
        self._commands = TaskOwner("fleet commands", level="ERROR")
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = False

    def __len__(self) -> int:
        return len(self.cps)

    @property
    def ids(self) -> list[str]:
        return list(self.cps)

    def get(self, cp_id: str) -> ChargingPoint | None:
        return self.cps.get(cp_id)

    # ---------------------------------------------------------------- commands

    async def handle_command(self, cmd: CentralCommand) -> None:
        """Route one command to its CP (the consumer's handler); returns once it runs."""
        cp = self.cps.get(cmd.cp_id)
        if cp is None:
            self.stats.unknown_commands += 1
            logger.debug("ignoring {} for {}: not a CP of this fleet", cmd.cmd.value, cmd.cp_id)
            return
        self.stats.commands += 1
        await self._slots.acquire()
        if self._commands.closed:  # shutting down: the CPs ignore commands from now on
            self._slots.release()
            return
        self._in_flight += 1
        self._idle.clear()
        self._commands.spawn(self._carry_out(cp, cmd), f"{cmd.cp_id} {cmd.cmd.value}")

    async def _carry_out(self, cp: ChargingPoint, cmd: CentralCommand) -> None:
        try:
            await cp.handle_command(cmd)
        finally:
            self._slots.release()
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        if cmd.cmd is CommandType.SHUTDOWN and cp.shutdown_requested.is_set():
            self.stats.shutdowns += 1
            logger.info("CP {} was shut down by Central; it stays stopped until the fleet "
                        "restarts", cp.cp_id)

    async def drain(self) -> None:
        """Wait until every command routed so far has been carried out."""
        await self._idle.wait()

    # ---------------------------------------------------------------- lifecycle

    async def connect(self, batch: int = 250, *, every: float = PROGRESS_EVERY) -> None:
        """Connect every CP, `batch` at a time, logging progress every `every` seconds."""
        started = time.monotonic()
        await _in_batches(
            "connected", [cp.start for cp in self.cps.values() if not cp.started],
            batch, len(self.cps), every,
        )
        logger.info("{:,}/{:,} CPs connected in {:.1f} s", len(self.cps), len(self.cps),
                    time.monotonic() - started)

    async def stop(self, batch: int = 250, *, every: float = PROGRESS_EVERY) -> None:
        """Stop every CP (``batch`` at a time), then the commands still running. Safe to
        call twice."""
        if not self._stopped:
            self._stopped = True
            started = time.monotonic()
            await _in_batches("stopped", [cp.stop for cp in self.cps.values()], batch,
                              len(self.cps), every)
            logger.info("{:,} CPs stopped in {:.1f} s", len(self.cps),
                        time.monotonic() - started)
        await self._commands.close()

    # ---------------------------------------------------------------- views

    def counts(self) -> dict[str, int]:
        """How many CPs are in each state (every state listed, 0 included)."""
        counted = Counter(cp.state for cp in self.cps.values())
        return {state.value: counted.get(state, 0) for state in CPState}

    def publish_failing(self) -> int:
        """How many CPs' last publish failed (the bus is down for them)."""
        return sum(1 for cp in self.cps.values() if cp.publish_failures)


async def _in_batches(
    what: str,
    steps: Iterable[Callable[[], Awaitable[None]]],
    batch: int,
    total: int,
    every: float,
) -> None:
    """Await ``step()`` for each of `steps`, `batch` at a time, logging progress."""
    pending = list(steps)
    done = total - len(pending)
    last_log = time.monotonic()
    for at in range(0, len(pending), batch):
        results = await asyncio.gather(
            *(step() for step in pending[at:at + batch]), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                logger.opt(exception=result).error("a CP could not be {}: {!r}", what, result)
        done += len(results)
        now = time.monotonic()
        if now - last_log >= every and done < total:
            logger.info("{:,}/{:,} CPs {}", done, total, what)
            last_log = now

