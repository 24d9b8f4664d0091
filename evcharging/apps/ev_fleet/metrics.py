"""The CP Fleet's Prometheus metrics, on its HTTP port's ``GET /metrics`` (families in
:mod:`evcharging.common.metrics`), read at scrape time from :class:`FleetParts`: its CPs
by state, the commands it routed and the SET_LIMITs its CPs ignored, its in-process
monitoring (the same families as a CP Monitor's, summed over its CPs) and its random faults.
Two C-level passes over the CPs per scrape."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from operator import attrgetter

from prometheus_client.metrics_core import Metric

from evcharging.apps.ev_cp_m.watch import HealthView
from evcharging.apps.ev_fleet.api import FleetParts
from evcharging.common.metrics import PREFIX, counter, counts, described, gauge
from evcharging.common.states import CPState

__all__ = ["FleetCollector"]


class FleetCollector:
    """The fleet at a glance, as Prometheus series."""

    NAMES = tuple(PREFIX + n for n in (
        "fleet_cps", "fleet_publish_failing_cps", "fleet_commands_total",
        "fleet_unknown_commands_total", "fleet_ignored_limits_total",
        "fleet_random_faults_total", "monitor_checks_total",
        "monitor_check_failures_total", "monitor_reports_sent_total",
        "monitor_registrations_total", "monitor_liveness_sent_total", "monitor_cps",
    ))

    def __init__(self, parts: FleetParts) -> None:
        self.parts = parts

    def describe(self) -> list[Metric]:
        return described(self.NAMES)

    def collect(self) -> Iterator[Metric]:
        fleet = self.parts.fleet
        states = Counter(map(_STATE, fleet.cps.values()))  # C-level: 10,000 CPs in ~1 ms
        yield gauge(PREFIX + "fleet_cps", {(s.value,): states[s] for s in CPState})
        yield gauge(PREFIX + "fleet_publish_failing_cps", fleet.publish_failing())
        yield counter(PREFIX + "fleet_commands_total", fleet.stats.commands)
        yield counter(PREFIX + "fleet_unknown_commands_total", fleet.stats.unknown_commands)
        yield counter(PREFIX + "fleet_ignored_limits_total",
                      sum(map(_IGNORED_LIMITS, fleet.cps.values())))
        faults = self.parts.faults
        if faults is not None:
            yield counter(PREFIX + "fleet_random_faults_total", {
                (event,): value for event, value in faults.as_dict().items()
            })
        monitor = self.parts.monitor
        if monitor is not None:
            s = monitor.stats
            yield counter(PREFIX + "monitor_checks_total", s.checks)
            yield counter(PREFIX + "monitor_check_failures_total", s.failures)
            yield counter(PREFIX + "monitor_reports_sent_total", {
                ("fault",): s.fault_reports_sent, ("recovery",): s.recovery_reports_sent,
            })
            yield counter(PREFIX + "monitor_registrations_total", s.registrations)
            yield counter(PREFIX + "monitor_liveness_sent_total", s.liveness_sent)
            yield gauge(PREFIX + "monitor_cps",
                        counts((v.value for v in HealthView), monitor.views()))


_STATE = attrgetter("state")
_IGNORED_LIMITS = attrgetter("ignored_limits")
