"""A CP Monitor's Prometheus metrics (families in :mod:`evcharging.common.metrics`), served
on ``CP_MONITOR_METRICS_PORT`` when one is set: its checks, its reports to Central and
what it believes about its CP, read at scrape time from :class:`MonitorStats`."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import Metric

from evcharging.apps.ev_cp_m.monitor import Monitor
from evcharging.apps.ev_cp_m.watch import HealthView
from evcharging.common.metrics import (
    PREFIX,
    ServiceMetrics,
    counter,
    described,
    gauge,
    one_hot,
)

__all__ = ["MonitorCollector", "monitor_metrics"]


class MonitorCollector:
    """One monitor's counters and its view of its CP (one-hot)."""

    NAMES = tuple(PREFIX + n for n in (
        "monitor_checks_total", "monitor_check_failures_total", "monitor_reports_sent_total",
        "monitor_registrations_total", "monitor_liveness_sent_total",
        "monitor_central_errors_total", "monitor_cps",
    ))

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[Metric]:
        return described(self.NAMES)

    def collect(self) -> Iterator[Metric]:
        s = self.monitor.stats
        yield counter(PREFIX + "monitor_checks_total", s.checks)
        yield counter(PREFIX + "monitor_check_failures_total", s.failures)
        yield counter(PREFIX + "monitor_reports_sent_total", {
            ("fault",): s.fault_reports_sent, ("recovery",): s.recovery_reports_sent,
        })
        yield counter(PREFIX + "monitor_registrations_total", s.registrations)
        yield counter(PREFIX + "monitor_liveness_sent_total", s.liveness_sent)
        yield counter(PREFIX + "monitor_central_errors_total", s.central_errors)
        yield gauge(PREFIX + "monitor_cps",
                    one_hot((v.value for v in HealthView), self.monitor.view.value))


def monitor_metrics(monitor: Monitor) -> ServiceMetrics:
    metrics = ServiceMetrics()
    metrics.add(MonitorCollector(monitor))
    return metrics
