"""Central's periodic checks: silent CPs, lost monitors, health snapshots, retention.

Each check decides through the controller and queues its writes in the controller's
outbox; :func:`run` flushes once per round. Silence is judged by how far Central has read
each CP's own partitions (``Controller.silence``), so a Central that falls behind, stalls,
waits for a locked database or a paused broker never takes a working CP for a silent one.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from loguru import logger

from evcharging.apps.ev_central import writes
from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.repository import StorageError
from evcharging.common.messages import FaultEventType, utcnow
from evcharging.common.states import CPState, SessionResult

__all__ = [
    "check_monitors",
    "check_silent_cps",
    "forget_unregistered",
    "forgive_stall",
    "prune_history",
    "run",
    "snapshot_health",
]

PRUNE_EVERY = 3600.0
STALL_SLACK = 2.0
"""A housekeeping round later than this (seconds) means Central itself was stalled."""
LOG_EACH_UP_TO = 10
"""A round that marks more CPs than this logs one summary line, not one line each."""


def _log_round(ids: list[str], what: str) -> None:
    if len(ids) > LOG_EACH_UP_TO:
        shown = ", ".join(ids[:LOG_EACH_UP_TO])
        logger.warning("{:,} CPs {} ({}, …)", len(ids), what, shown)


def check_silent_cps(central: Controller) -> list[str]:
    """Take CPs not heard from for ``cp_silence_timeout`` as DISCONNECTED.

    An engine re-announces its state every few seconds, so silence means it is gone
    (e.g. killed with no monitor to report it). A session it was running ends FAILED
    with the totals the ledger holds. Returns the ids of the CPs that were marked.
    """
    timeout = central.options.cp_silence_timeout
    marked: list[str] = []
    for cp in central.cps.values():
        if cp.state in (CPState.DISCONNECTED, CPState.FAULT) or central.silence(cp) < timeout:
            continue
        reason = f"no message from the CP for {timeout:g}s"
        logger.log("DEBUG" if len(marked) >= LOG_EACH_UP_TO else "WARNING",
                   "CP {} is silent: {}", cp.cp_id, reason)
        central.end_session(cp, SessionResult.FAILED, f"CP lost: {reason}",
                            breaker_failure=True)
        central.follow_state(cp, CPState.DISCONNECTED, reason, None)
        central.persist(cp)
        central.changed(cp)
        marked.append(cp.cp_id)
    _log_round(marked, f"silent for {timeout:g}s: taken as DISCONNECTED")
    return marked


def forgive_stall(central: Controller, late: float) -> None:
    """A round came `late` seconds late: Central itself was stalled (SIGSTOP, a blocked
    event loop), so the monitors could not reach it. That time does not count against
    them (SPEC §4: while Central cannot work, nobody is silent)."""
    if late <= STALL_SLACK:
        return
    logger.warning("Central was stalled for {:.0f}s: not counted against the monitors", late)
    now = central.clock()
    for cp in central.cps.values():
        cp.monitor_seen = min(now, cp.monitor_seen + late)


def check_monitors(central: Controller) -> list[str]:
    """Mark the CPs whose monitor has not reported for 3 of its intervals; a fault event
    "monitor lost" each (the CP itself may still work). Returns their ids."""
    now = central.clock()
    lost: list[str] = []
    for cp in central.cps.values():
        if (cp.monitor_interval is None or cp.monitor_lost
                or now - cp.monitor_seen <= 3 * cp.monitor_interval):
            continue
        cp.monitor_lost = True
        reason = f"monitor lost: no report for {3 * cp.monitor_interval:g}s"
        logger.log("DEBUG" if len(lost) >= LOG_EACH_UP_TO else "WARNING",
                   "CP {}: {}", cp.cp_id, reason)
        central.stats["monitors_lost"] += 1
        central.outbox.write(writes.FaultRecorded(cp.cp_id, FaultEventType.MONITOR_LOST,
                                                  reason, utcnow()))
        central.event("monitor", cp, reason)
        central.changed(cp)
        lost.append(cp.cp_id)
    _log_round(lost, "lost their monitor")
    return lost


def forget_unregistered(central: Controller) -> list[str]:
    """Forget the CPs known only from the bus (never registered) that have been silent for
    ``forget_unregistered_after`` (an hour; SPEC §11): out of memory, the summary and the
    database. One with a session running is kept until the session ends. Returns their
    ids; the round is logged in one line."""
    after = central.options.forget_unregistered_after
    forgotten: list[str] = []
    for cp in list(central.tally.unregistered.values()):
        if cp.session is not None or central.silence(cp) < after:
            continue
        del central.cps[cp.cp_id]
        central.tally.remove(cp)
        central.outbox.write(writes.CPForgotten(cp.cp_id))
        forgotten.append(cp.cp_id)
    if forgotten:
        central.stats["unregistered_forgotten"] += len(forgotten)
        shown = ", ".join(forgotten[:LOG_EACH_UP_TO])
        logger.info("forgot {:,} CP(s) known only from the bus, silent for {:g}s ({}{})",
                    len(forgotten), after, shown,
                    ", …" if len(forgotten) > LOG_EACH_UP_TO else "")
    return forgotten


def snapshot_health(central: Controller) -> int:
    """Queue a health snapshot of every CP that changed since its last one."""
    count = 0
    for cp in central.cps.values():
        if cp.snapshot_key != cp.health_key():
            central.outbox.write(writes.HealthRecorded(cp.snapshot()))
            count += 1
    return count


RETENTION_LOCK = "retention"
"""The job lock under which one Central prunes the network's health history."""


def prune_history(central: Controller, retention_days: float) -> None:
    """Forget health snapshots older than the retention."""
    central.outbox.write(writes.HealthPruned(utcnow() - timedelta(days=retention_days)))


async def run(central: Controller, interval: float, retention_days: float) -> None:
    """Every `interval`: silent CPs, lost monitors and snapshots; hourly, retention."""
    since_prune = PRUNE_EVERY
    while True:
        asleep = central.clock()
        await asyncio.sleep(interval)
        # A sleep that overran: Central's loop itself did not run (a slow flush at the
        # end of the last round is not a stall, so only the sleep is measured).
        forgive_stall(central, central.clock() - asleep - interval)
        check_silent_cps(central)
        check_monitors(central)
        forget_unregistered(central)
        snapshot_health(central)
        since_prune += interval
        if since_prune >= PRUNE_EVERY:
            # Once for the network (SPEC §9): the instance holding the lock prunes.
            with contextlib.suppress(StorageError):
                if await central.repo.hold_lock(RETENTION_LOCK):
                    prune_history(central, retention_days)
            since_prune = 0.0
        # A database error is logged by the repository; the writes stay in the outbox.
        with contextlib.suppress(StorageError):
            await central.outbox.flush()
