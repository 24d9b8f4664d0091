"""A CP Engine's Prometheus metrics, on its health port's ``GET /metrics`` (families in
:mod:`evcharging.common.metrics`): its state and the bus's counters, read at scrape time.

The series carry no CP id: Prometheus's target labels (``instance``) say which engine."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import Metric

from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.common.metrics import (
    PREFIX,
    ServiceMetrics,
    counter,
    described,
    gauge,
    one_hot,
)
from evcharging.common.states import CPState

__all__ = ["EngineCollector", "engine_metrics"]


class EngineCollector:
    """One CP: its state (one-hot), its failed publishes in a row and the SET_LIMITs it
    ignored."""

    NAMES = (PREFIX + "cp_state", PREFIX + "cp_publish_failures",
             PREFIX + "cp_ignored_limits_total")

    def __init__(self, cp: ChargingPoint) -> None:
        self.cp = cp

    def describe(self) -> list[Metric]:
        return described(self.NAMES)

    def collect(self) -> Iterator[Metric]:
        yield gauge(PREFIX + "cp_state", one_hot((s.value for s in CPState), self.cp.state.value))
        yield gauge(PREFIX + "cp_publish_failures", self.cp.publish_failures)
        yield counter(PREFIX + "cp_ignored_limits_total", self.cp.ignored_limits)


def engine_metrics(cp: ChargingPoint) -> ServiceMetrics:
    """The engine's registry with its collector (the caller adds the bus's)."""
    metrics = ServiceMetrics()
    metrics.add(EngineCollector(cp))
    return metrics
