"""The fleet's monitoring: what a CP Monitor does for one CP, done in process for all.

Over 400 lines: the in-process checks and the batched calls to Central that replace
10,000 CP Monitors, with their retry rules; the decisions are the monitor's pure Watch.

Each CP has a :class:`~evcharging.apps.ev_cp_m.watch.Watch` (the CP Monitor's own
decisions: ``CP_MONITOR_FAILURE_THRESHOLD`` consecutive failed checks make one fault
report, the first passing check after it one recovery report, the newest undelivered
report wins). Three loops, run as tasks of the fleet's service:

* **checks**, every ``CP_MONITOR_HEALTH_INTERVAL``: :func:`check` looks at each CP in
  process (no HTTP to itself). A check fails while the CP is in FAULT (its reason becomes
  the fault's, as the engine's 503 body does for the monitor), when one of its tasks
  crashed, when its heartbeat has not gone out for ``stall_after`` seconds (its lock is
  held by something stuck; a publish waiting for a slow broker does not count, as a CP
  Engine's ``/health`` answers while Kafka is down), or once it was stopped (Central's
  SHUTDOWN). The round also says once, for all CPs, when some cannot publish on Kafka
  and when all can again (the CPs themselves log that at DEBUG only).
* **the Central link** registers the CPs (``POST /fleet/register``, at start and again for
  ids Central forgot) and delivers the queued fault and recovery reports, one
  ``POST /cp/fault`` per CP, a few at a time, retried with backoff (0.5 s doubling up to
  10 s) until Central takes them. A 404 for a CP registers it again; another 4xx drops
  the report (logged).
* **liveness**, every health interval once registered: one ``POST /fleet/monitor`` with
  every CP's ``healthy`` (its last check passed) instead of one call per CP; the ids in the
  answer's ``unknown`` are registered again. A Central without the route is told nothing
  (logged once, tried again every 60 s).

A restarted fleet would tell Central, for every CP, that its first check passed (the
monitor's start-up recovery, which clears a fault an earlier run reported). Instead the
fleet reads once, at start, which of its CPs Central holds as faulty, and only those get
the recovery; when Central cannot be read, every CP's is sent, as a monitor would.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from loguru import logger
from tenacity import RetryCallState

from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.apps.ev_cp_m.watch import Change, Failure, HealthView, Watch, clip, kind
from evcharging.apps.ev_fleet.central import CentralClient, Outcome
from evcharging.apps.ev_fleet.fleet import Fleet
from evcharging.common.backoff import doubling, until_done
from evcharging.common.messages import CPFaultReport, CPRegistration, FleetMonitorEntry
from evcharging.common.service import TaskOwner
from evcharging.common.states import CPState

__all__ = ["FleetMonitor", "MonitoringStats", "check"]

_YIELD_EVERY = 1000
"""CPs checked between two yields to the event loop (a round never blocks it long)."""


def check(cp: ChargingPoint, stall_after: float) -> Failure | None:
    """One in-process health check of `cp`: None when it passes, else why it failed."""
    if cp.crashed is not None:
        return Failure(f"engine {cp.crashed}")
    if cp.closed:
        return Failure("the CP's engine is stopped")
    if not cp.started:
        return Failure("the CP's engine is not connected")
    if cp.state is CPState.FAULT:
        reason = cp.reason
        return Failure("CP reports FAULT" + (f": {clip(reason)}" if reason else ""),
                       cp_reports_fault=True)
    age = cp.heartbeat_age
    if age is not None and age > stall_after:
        waiting = cp.publish_waiting
        # A publish waiting for a slow broker is the bus's delay (bounded by its own
        # timeout), not the CP's: only one that waits longer than stall_after counts.
        if waiting is None or waiting > stall_after:
            return Failure(f"no heartbeat for {age:.0f} s (the CP is stuck)")
    return None


@dataclass
class MonitoringStats:
    """Counters of the fleet's monitoring (read them, do not write them)."""

    rounds: int = 0
    """Rounds of checks (each checks every CP)."""
    checks: int = 0
    failures: int = 0
    """Failed checks, in total."""
    faults: int = 0
    """CPs declared faulty (threshold reached)."""
    recoveries: int = 0
    report_attempts: int = 0
    reports_sent: int = 0
    """Fault and recovery reports Central accepted."""
    fault_reports_sent: int = 0
    recovery_reports_sent: int = 0
    reports_rejected: int = 0
    registrations: int = 0
    """Successful fleet registrations (calls, each of up to every CP)."""
    liveness_sent: int = 0
    """Liveness rounds Central accepted."""
    publish_failing: int = 0
    """CPs whose last publish failed, as of the last round."""

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class FleetMonitor:
    """Monitor every CP of `fleet` and report to Central through `central`.

    `registration(cp_id)` gives the body that registers a CP. Call :meth:`register`
    before the CPs connect, then :meth:`start` with the service's task owner, and
    :meth:`stop` before the CPs stop (a stopped CP would fail its checks).
    """

    def __init__(
        self,
        fleet: Fleet,
        central: CentralClient,
        registration: Callable[[str], CPRegistration],
        *,
        health_interval: float,
        failure_threshold: int,
        stall_after: float,
        retry_initial: float = 0.5,
        retry_max: float = 10.0,
        liveness_retry: float = 60.0,
        report_concurrency: int = 8,
    ) -> None:
        if retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("need 0 < retry_initial <= retry_max")
        self.fleet = fleet
        self.central = central
        self.health_interval = health_interval
        self.stall_after = stall_after
        self.stats = MonitoringStats()
        self.watches = {cp_id: Watch(cp_id, failure_threshold) for cp_id in fleet.cps}
        self._registration = registration
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._liveness_retry = liveness_retry
        self._report_slots = asyncio.Semaphore(report_concurrency)
        self._to_register: set[str] = set(fleet.cps)
        """Ids Central must be told about (all of them until the first registration)."""
        self._registered = asyncio.Event()
        self._checked = asyncio.Event()
        self._dirty: set[str] = set()
        """Ids whose watch has a pending report."""
        self._wake = asyncio.Event()
        self._liveness_unsupported = False
        self._tasks: list[asyncio.Task[None]] = []
        self._owner: TaskOwner | None = None
        self.lag = 0.0
        """Seconds the last round of checks started late (the event loop was busy)."""
        self.max_lag = 0.0

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    def views(self) -> dict[str, int]:
        """How many CPs the monitoring sees in each view."""
        counted = Counter(watch.view for watch in self.watches.values())
        return {view.value: counted.get(view, 0) for view in HealthView}

    def status(self) -> dict[str, Any]:
        """The monitoring at a glance (the fleet's ``/health``)."""
        return {
            "registered": self.registered,
            "central": self.central.problem or "ok",
            "views": self.views(),
            "pending_reports": len(self._dirty),
            "check_lag_s": round(self.lag, 3),
            "max_check_lag_s": round(self.max_lag, 3),
            **self.stats.as_dict(),
        }

    # ---------------------------------------------------------------- lifecycle

    async def register(self, timeout: float) -> bool:
        """Register every CP with Central, retrying for up to `timeout` seconds; then
        read which of them Central holds as faulty. False when Central could not be
        reached: the link keeps trying in the background once started."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = doubling(self._retry_initial, self._retry_max)

        def wait(state: RetryCallState) -> float:  # the backoff, never past the deadline
            return max(0.0, min(backoff(state), deadline - loop.time()))

        def past_deadline(_state: RetryCallState) -> bool:
            return loop.time() >= deadline

        if await until_done(self._register_pending, wait, stop=past_deadline):
            return True
        logger.warning("Central did not take the fleet's registration within {:g} s; "
                       "connecting the CPs anyway (registration goes on in the "
                       "background)", timeout)
        return False

    def start(self, tasks: TaskOwner) -> None:
        """Start the checks, the Central link and liveness as tasks of `tasks`."""
        self._owner = tasks
        self._tasks = [
            tasks.spawn(self._check_loop(), "fleet health checks", forever=True),
            tasks.spawn(self._link_loop(), "fleet Central link", forever=True),
            tasks.spawn(self._liveness_loop(), "fleet liveness", forever=True),
        ]
        logger.info(
            "monitoring {:,} CPs every {:g} s (fault after {} failed checks, stuck after "
            "{:g} s without a heartbeat); reporting to Central at {}",
            len(self.watches), self.health_interval,
            next(iter(self.watches.values())).failure_threshold, self.stall_after,
            self.central.base_url,
        )

    async def stop(self) -> None:
        """Stop the loops; safe to call twice."""
        tasks, self._tasks = self._tasks, []
        if tasks and self._owner is not None:
            await self._owner.cancel(*tasks)
        if self._dirty:
            logger.warning("stopping with {:,} undelivered fault/recovery report(s)",
                           len(self._dirty))

    # ---------------------------------------------------------------- checks

    async def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            self.lag = max(0.0, loop.time() - next_at)
            self.max_lag = max(self.max_lag, self.lag)
            await self.check_round()
            next_at += self.health_interval
            now = loop.time()
            if next_at < now:  # a slow round: do not run the missed ones in a burst
                next_at = now
            await asyncio.sleep(next_at - now)

    async def check_round(self) -> None:
        """Check every CP once and queue the reports that follows."""
        first = not self._checked.is_set()
        changes: Counter[Change] = Counter()
        publish_failing = 0
        for index, (cp_id, cp) in enumerate(self.fleet.cps.items()):
            if index and index % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            changes[self._check_one(cp_id, cp)] += 1
            if cp.publish_failures:
                publish_failing += 1
        self.stats.rounds += 1
        self._publishing(publish_failing)
        if first:
            self._checked.set()
            healthy = changes[Change.FIRST_HEALTHY]
            logger.info("first health checks: {:,} of {:,} CPs healthy{}", healthy,
                        len(self.watches),
                        "" if healthy == len(self.watches)
                        else f", {len(self.watches) - healthy:,} failing")

    def _publishing(self, failing: int) -> None:
        """Say once, for the whole fleet, that CPs cannot publish, and once that all can."""
        before, self.stats.publish_failing = self.stats.publish_failing, failing
        if failing and not before:
            logger.error("{:,} of {:,} CPs cannot publish on Kafka (their messages are lost "
                         "until it works again; the heartbeats repair Central's view)",
                         failing, len(self.watches))
        elif before and not failing:
            logger.info("every CP publishes on Kafka again")

    def _check_one(self, cp_id: str, cp: ChargingPoint) -> Change:
        watch = self.watches[cp_id]
        self.stats.checks += 1
        failure = check(cp, self.stall_after)
        if failure is None:
            step = watch.passed()
        else:
            self.stats.failures += 1
            step = watch.failed(failure)
        if step.change is Change.FAULT:
            self.stats.faults += 1
        elif step.change is Change.RECOVERED:
            self.stats.recoveries += 1
        if step.change not in (Change.HEALTHY, Change.FIRST_HEALTHY):
            # The first healthy check of each CP is summed up once per round instead.
            logger.bind(cp_id=cp_id).log(step.level, "{}", step.message)
        if step.superseded is not None:
            logger.bind(cp_id=cp_id).info(
                "the undelivered {} report is superseded by a {} report",
                kind(step.superseded), "fault" if step.change is Change.FAULT else "recovery",
            )
        if watch.pending is not None:
            self._dirty.add(cp_id)
            self._wake.set()
        return step.change

    # ---------------------------------------------------------------- Central link

    async def _link_loop(self) -> None:
        wait = doubling(self._retry_initial, self._retry_max)
        while True:
            if not self._to_register and not self._dirty:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Tried with backoff until one call gets through; the schedule starts over
            # for the next.
            await until_done(self._link_step, wait)

    async def _link_step(self) -> bool:
        """Register what must be, else deliver the queued reports; whether that is done."""
        if self._to_register:
            return await self._register_pending()
        if self._dirty:
            return await self.deliver_reports()
        return True

    async def _register_pending(self) -> bool:
        """Register the ids Central must be told about; whether that is done."""
        ids = sorted(self._to_register)
        if not ids:
            return True
        outcome, new = await self.central.register([self._registration(i) for i in ids])
        if outcome is Outcome.RETRY:
            return False
        self._to_register.difference_update(ids)
        if outcome is Outcome.OK:
            self.stats.registrations += 1
            logger.info("registered {:,} CP(s) at Central {} ({:,} new)",
                        len(ids), self.central.base_url, new)
            if not self._registered.is_set():
                await self._learn_faults()
        elif outcome is Outcome.NO_ROUTE:
            logger.error("Central at {} has no /fleet/register (an older Central?): its CPs "
                         "are known from their first status, without site or location",
                         self.central.base_url)
        else:
            logger.error("Central rejected the registration of {:,} CP(s); not retried",
                         len(ids))
        self._registered.set()
        return True

    async def _learn_faults(self) -> None:
        """Tell each watch whether Central holds its CP as faulty (uncertain if unread)."""
        faulty = await self.central.faulty(set(self.watches))
        if faulty is None:
            return
        for cp_id, watch in self.watches.items():
            watch.central_holds(faulty.get(cp_id, False))
            if watch.pending is None:
                self._dirty.discard(cp_id)
        held = sum(faulty.values())
        if held:
            logger.info("Central holds {:,} of the fleet's CPs as faulty; their first "
                        "healthy check will be reported as a recovery", held)

    async def deliver_reports(self) -> bool:
        """Deliver every pending report once (a few at a time); whether all went through
        (or were dropped for good)."""
        ids = list(self._dirty)
        results = await asyncio.gather(*(self._deliver(cp_id) for cp_id in ids))
        return all(results)

    async def _deliver(self, cp_id: str) -> bool:
        watch = self.watches[cp_id]
        report = watch.pending
        if report is None:
            self._dirty.discard(cp_id)
            return True
        async with self._report_slots:
            self.stats.report_attempts += 1
            outcome = await self.central.report(report)
        log = logger.bind(cp_id=cp_id)
        if outcome is Outcome.OK:
            watch.delivered(report)
            self._count_sent(report)
            log.info("{} report delivered to Central: {}", kind(report), report.reason)
        elif outcome is Outcome.RETRY:
            watch.not_delivered()
        elif outcome in (Outcome.UNKNOWN_CP, Outcome.NO_ROUTE):
            watch.not_delivered()
            log.warning("Central does not know {} (HTTP 404); registering it again", cp_id)
            self._to_register.add(cp_id)
        else:
            watch.dropped(report)
            self.stats.reports_rejected += 1
            log.error("Central rejected the {} report; dropping it", kind(report))
        if watch.pending is None:
            self._dirty.discard(cp_id)
            return True
        return watch.pending is not report  # a newer report came meanwhile: send it now

    def _count_sent(self, report: CPFaultReport) -> None:
        self.stats.reports_sent += 1
        if report.is_faulty:
            self.stats.fault_reports_sent += 1
        else:
            self.stats.recovery_reports_sent += 1

    # ---------------------------------------------------------------- liveness

    async def _liveness_loop(self) -> None:
        await self._registered.wait()
        await self._checked.wait()
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            outcome = await self.report_liveness()
            next_at += (
                self._liveness_retry if outcome is Outcome.NO_ROUTE else self.health_interval
            )
            now = loop.time()
            next_at = max(next_at, now)
            await asyncio.sleep(next_at - now)

    async def report_liveness(self) -> Outcome:
        """Tell Central once that every CP is watched, and whether its last check passed."""
        entries = [
            FleetMonitorEntry(cp_id=cp_id, healthy=watch.view is HealthView.HEALTHY)
            for cp_id, watch in self.watches.items()
        ]
        outcome, unknown = await self.central.monitor(self.health_interval, entries)
        if outcome is Outcome.OK:
            self.stats.liveness_sent += 1
            if self._liveness_unsupported:
                self._liveness_unsupported = False
                logger.info("Central takes the fleet's liveness reports now")
            if unknown:
                logger.warning("Central does not know {:,} of the fleet's CPs (e.g. {}); "
                               "registering them again", len(unknown), unknown[0])
                self._ask_registration(unknown)
        elif outcome is Outcome.NO_ROUTE and not self._liveness_unsupported:
            self._liveness_unsupported = True
            logger.warning(
                "Central at {} has no /fleet/monitor route (an older Central?): it cannot "
                "show that the fleet's CPs are monitored; fault reports go on, and liveness "
                "is tried again every {:g} s", self.central.base_url, self._liveness_retry,
            )
        return outcome

    def _ask_registration(self, ids: Iterable[str]) -> None:
        known = [cp_id for cp_id in ids if cp_id in self.watches]
        if known:
            self._to_register.update(known)
            self._wake.set()
