"""The faults of the chaos matrix, each replayed as a careful tester would.

A fault is injected into a running :class:`ChaosRun` while sessions run and requests
arrive, lasts ``hold`` seconds where it has a length of its own (a lock held, a process
stopped or dead), and returns a :class:`Window`: when it began, when it ended (the moment
the last thing it broke was given back: lock released, SIGCONT, restart spawned) and how
to find the first sign that Central noticed it.

Detection, per fault:

* database lock, broker kill: Central's ``/health`` stops answering 200;
* Central kill: the restarted Central's first driver update (it acts on what happened);
* frozen or killed engine: the CP shown faulty or disconnected, or a FAILED update of a
  session on it;
* monitor kill: the CP shown ``monitored: false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from evcharging.common.messages import DriverStatus
from evcharging.devtools.kafka_broker import KafkaBroker
from evcharging.devtools.process import free_port
from tests.chaos.harness import ChaosRun, DbLock, Sign, now
from tests.polling import poll

FAST_BROKER_RESTART = {
    # A SIGKILLed broker's registration outlives it by the session timeout: its successor
    # waits that long before it may register (DUPLICATE_BROKER_REGISTRATION).
    "broker.session.timeout.ms": "2000",
    "broker.heartbeat.interval.ms": "500",
}


@dataclass
class Window:
    start: float
    end: float
    detect: Callable[[], float | None]
    """When Central first showed that it noticed (None: it never did)."""
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


Fault = Callable[[ChaosRun, float], Awaitable[Window]]


def target(run: ChaosRun) -> str:
    """The CP a CP fault hits; the others keep working beside it."""
    return run.cps[0]


def health_bad(sign: Sign) -> bool:
    return sign.kind == "health" and sign.value != 200


def cp_trouble(run: ChaosRun, cp_id: str, since: float) -> float | None:
    """The first sign after `since` that Central saw `cp_id` fail."""
    shown = run.watcher.first(since, lambda s: s.cp_id == cp_id and (
        (s.kind == "faulty" and s.value is True)
        or (s.kind == "state" and s.value in ("FAULT", "DISCONNECTED"))
    ))
    failed = next((s.at for s in run.observer.seen
                   if s.at >= since and s.update.cp_id == cp_id
                   and s.update.status is DriverStatus.FAILED), None)
    times = [t for t in (shown, failed) if t is not None]
    return min(times) if times else None


async def db_lock(run: ChaosRun, hold: float) -> Window:
    """Another process holds BEGIN EXCLUSIVE on Central's database for `hold` seconds."""
    async with DbLock(run.system.db_path) as lock:
        assert lock.locked_at is not None
        start = lock.locked_at
        await asyncio.sleep(hold)  # the fault itself
    return Window(start, now(), lambda: run.watcher.first(start, health_bad))


async def central_kill(run: ChaosRun, hold: float) -> Window:
    """SIGKILL Central mid-session; restart it `hold` seconds later."""
    assert run.central is not None
    start = now()
    run.central.signal(signal.SIGKILL)
    await run.central.wait_exit()
    await asyncio.sleep(hold)  # Central stays dead: the fault itself
    end = now()
    await run.restart_central()
    return Window(start, end, lambda: next(
        (s.at for s in run.observer.seen if s.at >= end), None
    ))


async def frozen_engine(run: ChaosRun, hold: float) -> Window:
    """SIGSTOP the target's engine for `hold` seconds, then SIGCONT."""
    cp_id = target(run)
    engine = run.engines[cp_id]
    start = now()
    engine.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(hold)  # the fault itself
    finally:
        engine.signal(signal.SIGCONT)
    return Window(start, now(), lambda: cp_trouble(run, cp_id, start))


async def engine_kill(run: ChaosRun, hold: float) -> Window:
    """SIGKILL the target's engine mid-session; restart it once Central has noticed (and
    at least `hold` seconds later)."""
    cp_id = target(run)
    engine = run.engines[cp_id]
    start = now()
    engine.signal(signal.SIGKILL)
    await engine.wait_exit()
    window = Window(start, start, lambda: cp_trouble(run, cp_id, start))
    try:
        await poll(lambda: cp_trouble(run, cp_id, start), timeout=30,
                   what=f"Central to notice that {cp_id}'s engine died")
    except AssertionError as exc:
        window.problems.append(str(exc))
    await asyncio.sleep(max(0.0, start + hold - now()))  # the engine stays dead
    window.end = now()
    await run.restart_engine(cp_id)
    return window


async def monitor_kill(run: ChaosRun, hold: float) -> Window:
    """SIGKILL the target's monitor mid-session; with it dead, SIGKILL the engine too:
    Central must still notice (the CP falls silent). Then restart both."""
    cp_id = target(run)
    start = now()
    monitor = run.monitors[cp_id]
    monitor.signal(signal.SIGKILL)
    await monitor.wait_exit()
    window = Window(start, start, lambda: run.watcher.first(
        start, lambda s: s.cp_id == cp_id and s.kind == "monitored" and s.value is False
    ))
    try:
        await poll(window.detect, timeout=20, what=f"{cp_id} shown unmonitored")
    except AssertionError as exc:
        window.problems.append(str(exc))
    await asyncio.sleep(max(0.0, start + hold - now()))  # the monitor stays dead
    crash = now()
    run.engines[cp_id].signal(signal.SIGKILL)
    await run.engines[cp_id].wait_exit()
    try:
        noticed = await poll(lambda: cp_trouble(run, cp_id, crash), timeout=45,
                             what=f"Central to notice {cp_id}'s engine crash with no monitor")
        window.notes.append(f"engine crash with no monitor noticed after {noticed - crash:.1f} s")
    except AssertionError as exc:
        window.problems.append(str(exc))
    window.end = now()
    await run.restart_engine(cp_id)
    await run.restart_monitor(cp_id)
    return window


def broker_kill(broker: KafkaBroker) -> Fault:
    """SIGKILL the broker mid-session; start it again on the same port and data `hold`
    seconds later."""
    async def inject(run: ChaosRun, hold: float) -> Window:
        start = now()
        broker.kill()
        await asyncio.to_thread(broker.stop)  # reaps java, clears its pid file
        await asyncio.sleep(hold)  # the broker stays dead: the fault itself
        end = now()
        await asyncio.to_thread(broker.start)
        return Window(start, end, lambda: run.watcher.first(start, health_bad))

    return inject


@contextlib.asynccontextmanager
async def own_broker(work_dir: Path) -> AsyncIterator[KafkaBroker]:
    """A broker of the test's own, to kill: fixed ports, so that a restart is the same
    broker with the same data."""
    broker = KafkaBroker(work_dir=work_dir, controller_port=free_port(),
                         properties=FAST_BROKER_RESTART)
    await asyncio.to_thread(broker.start)
    try:
        yield broker
    finally:
        await asyncio.to_thread(broker.stop)
