"""Central's Prometheus metrics: what its ``GET /metrics`` shows (families in
:mod:`evcharging.common.metrics`).

Everything but the two latency histograms is read at scrape time from what Central keeps
anyway: the controller's ``stats`` counter and its billed totals, the summary's tally of its
CPs (states, faults, monitors, sessions, power), one pass over them for the breakers and lost
monitors, the repository's error count and the bus's counters. The request→ACCEPTED
histogram is observed by :func:`timed_requests`, which wraps the controller's request
handler; the transaction time by the repository's ``observe_write`` hook.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from operator import attrgetter

from prometheus_client.metrics_core import Metric

from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.energy import Energy
from evcharging.apps.ev_central.repository import Repository
from evcharging.common.bus import Handler
from evcharging.common.circuit_breaker import BreakerState
from evcharging.common.messages import DriverRequest, DriverStatus
from evcharging.common.metrics import PREFIX, ServiceMetrics, counter, described, gauge
from evcharging.common.states import CPState, SessionResult

__all__ = ["DENIED", "DUPLICATE", "CentralCollector", "SiteCollector", "central_metrics",
           "timed_requests"]

J_PER_KWH = 3.6e6
DENIED = "denied:"
"""The controller counts each DENIED request under ``denied:<cause>`` in its stats."""
DUPLICATE = "DUPLICATE"
"""The ``outcome`` of a request whose id Central had seen (ignored, not decided again)."""


class CentralCollector:
    """Central's decisions, sessions, ledger, database and CPs, read at scrape time
    (the tally, and one pass over the CPs for the breakers: O(N) per scrape, nothing per
    message)."""

    NAMES = tuple(PREFIX + n for n in (
        "requests_total", "requests_denied_total", "sessions_total", "start_timeouts_total",
        "ledger_corrections_total", "energy_delivered_joules_total", "revenue_euros_total",
        "faults_total", "recoveries_total", "monitors_lost_total", "db_transactions_total",
        "db_writes_total", "db_retries_total", "db_errors_total", "db_write_failing", "cps",
        "cps_faulty", "cps_unmonitored", "cps_monitor_lost", "breakers", "sessions_active",
        "network_power_watts", "central_lag_seconds", "cps_unregistered",
        "unregistered_refused_total", "unregistered_forgotten_total",
        "registrations_refused_total", "auth_failures_total", "auth_throttled_total",
        "tcp_connections_evicted_total",
    ))

    def __init__(self, controller: Controller, repo: Repository | None = None) -> None:
        self.controller = controller
        self.repo = repo

    def describe(self) -> list[Metric]:
        return described(self.NAMES)

    def collect(self) -> Iterator[Metric]:
        c = self.controller
        stats = c.stats
        yield counter(PREFIX + "requests_total", {
            (DriverStatus.ACCEPTED.value,): stats["accepted"],
            (DriverStatus.DENIED.value,): stats["denied"],
            (DUPLICATE,): stats["duplicate_requests"],
        })
        yield counter(PREFIX + "requests_denied_total", {
            (key.removeprefix(DENIED),): value
            for key, value in list(stats.items()) if key.startswith(DENIED)
        })
        yield counter(PREFIX + "sessions_total", {
            (result.value,): stats[f"sessions_{result.value.lower()}"]
            for result in SessionResult
        })
        for name, key in (("start_timeouts_total", "start_timeouts"),
                          ("ledger_corrections_total", "ledger_corrections"),
                          ("faults_total", "faults"), ("recoveries_total", "recoveries"),
                          ("monitors_lost_total", "monitors_lost"),
                          ("unregistered_refused_total", "unregistered_refused"),
                          ("unregistered_forgotten_total", "unregistered_forgotten"),
                          ("registrations_refused_total", "registrations_refused"),
                          ("tcp_connections_evicted_total", "tcp_connections_evicted"),
                          ("db_transactions_total", "db_transactions"),
                          ("db_writes_total", "db_writes"), ("db_retries_total", "db_retries")):
            yield counter(PREFIX + name, stats[key])
        for name, kind in (("auth_failures_total", "auth_failures"),
                           ("auth_throttled_total", "auth_throttled")):
            yield counter(PREFIX + name, {
                (plane,): stats[f"{kind}:{plane}"] for plane in ("http", "tcp")
            })
        yield gauge(PREFIX + "cps_unregistered", len(c.tally.unregistered))
        yield counter(PREFIX + "energy_delivered_joules_total", c.billed_kwh * J_PER_KWH)
        yield counter(PREFIX + "revenue_euros_total", c.billed_euros)
        if self.repo is not None:
            yield counter(PREFIX + "db_errors_total", self.repo.write_errors)
            yield gauge(PREFIX + "db_write_failing",
                        0.0 if self.repo.write_error is None else 1.0)
        yield from self._cps()
        behind = c.behind()
        yield gauge(PREFIX + "central_lag_seconds", max(0.0, behind))

    def _cps(self) -> Iterator[Metric]:
        # States, faults, monitors, sessions and power: the summary's tally, kept up as CPs
        # change (the CPs changed since the last answer recounted). Breakers (whose OPEN
        # turns HALF_OPEN with time) and lost monitors: one pass in C-level maps, the
        # scrape's whole O(N) cost, paid in Central's event loop once per scrape.
        tally = self.controller.tally
        tally.settle()
        views = list(self.controller.cps.values())
        breakers = Counter(map(_BREAKER_STATE, views))  # the property: OPEN may be HALF_OPEN
        lost = sum(map(_MONITOR_LOST, views))
        yield gauge(PREFIX + "cps", {(s.value,): tally.by_state[s] for s in CPState})
        yield gauge(PREFIX + "cps_faulty", tally.faulty)
        yield gauge(PREFIX + "cps_unmonitored", tally.unmonitored)
        yield gauge(PREFIX + "cps_monitor_lost", lost)
        yield gauge(PREFIX + "breakers", {(b.value,): breakers[b] for b in BreakerState})
        yield gauge(PREFIX + "sessions_active", tally.sessions)
        yield gauge(PREFIX + "network_power_watts", tally.power_ukw / 1000.0)


class SiteCollector:
    """Each site's limit, allocation and measured power (SPEC §10), read at scrape time
    from the summary's per-site counts and the energy job (O(sites) per scrape), and
    whether this instance allocates (holds the allocation lock, SPEC §9)."""

    NAMES = tuple(PREFIX + n for n in (
        "site_limit_watts", "site_allocated_watts", "site_measured_watts",
        "allocation_leader",
    ))

    def __init__(self, energy: Energy) -> None:
        self.energy = energy

    def describe(self) -> list[Metric]:
        return described(self.NAMES)

    def collect(self) -> Iterator[Metric]:
        sites = self.energy.sites()
        yield gauge(PREFIX + "site_limit_watts", {
            (s.site,): s.limit_kw * 1000.0 for s in sites if s.limit_kw is not None})
        yield gauge(PREFIX + "site_allocated_watts", {
            (s.site,): s.allocated_kw * 1000.0 for s in sites if s.allocated_kw is not None})
        yield gauge(PREFIX + "site_measured_watts", {
            (s.site,): s.measured_kw * 1000.0 for s in sites})
        yield gauge(PREFIX + "allocation_leader", 1.0 if self.energy.leader else 0.0)


_BREAKER_STATE = attrgetter("breaker.state")
_MONITOR_LOST = attrgetter("monitor_lost")


def timed_requests(
    controller: Controller, metrics: ServiceMetrics
) -> Handler[DriverRequest]:
    """The controller's request handler, observing request→ACCEPTED: from the broker's
    append time of the request to the moment Central decided (by the broker's time as
    Central reads it, never the driver's clock)."""
    accepted = metrics.loop_histogram(PREFIX + "accept_latency_seconds").observer()
    stats = controller.stats
    clock = controller.readclock

    async def handle(request: DriverRequest) -> None:
        before = stats["accepted"]
        received = clock.current
        await controller.handle_request(request)
        if stats["accepted"] != before and received is not None:
            accepted(max(0.0, (clock.now() - received).total_seconds()))

    return handle


def central_metrics(
    controller: Controller, repo: Repository | None = None, *, process: bool = True,
    energy: Energy | None = None,
) -> ServiceMetrics:
    """Central's registry with its collectors; the caller adds the bus's and wires the
    hooks (:func:`timed_requests`, the consumer's ``observe``, the repository's)."""
    metrics = ServiceMetrics(process=process)
    metrics.add(CentralCollector(controller, repo))
    if energy is not None:
        metrics.add(SiteCollector(energy))
    if repo is not None:
        repo.observe_write = metrics.histogram(PREFIX + "db_write_duration_seconds").observe
    return metrics
