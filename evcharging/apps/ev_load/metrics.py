"""The load generator's Prometheus metrics (families in :mod:`evcharging.common.metrics`),
served on ``--metrics-port`` while a run lasts: read at scrape time from its
:class:`~evcharging.apps.ev_load.stats.Tally`, the one place a run's numbers go through.

Its two histograms are end to end, as the drivers see them (publish → ACCEPTED, publish
→ final update); Central's own ``evcharging_accept_latency_seconds`` is its view of the
same requests. Each scrape buckets only the latencies measured since the last one."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import Metric

from evcharging.apps.ev_load.load import LoadGenerator
from evcharging.apps.ev_load.stats import Outcome
from evcharging.common.metrics import (
    PREFIX,
    ArrayHistogram,
    ServiceMetrics,
    counter,
    counts,
    described,
    gauge,
)

__all__ = ["LoadCollector", "load_metrics"]


class LoadCollector:
    """A run's arrivals, requests and outcomes."""

    NAMES = tuple(PREFIX + n for n in (
        "load_arrivals_total", "load_requests_sent_total", "load_outcomes_total",
        "load_denied_total", "load_open_requests",
    ))

    def __init__(self, generator: LoadGenerator) -> None:
        self.generator = generator

    def describe(self) -> list[Metric]:
        return described(self.NAMES)

    def collect(self) -> Iterator[Metric]:
        tally = self.generator.tally
        yield counter(PREFIX + "load_arrivals_total", tally.arrivals)
        yield counter(PREFIX + "load_requests_sent_total", tally.sent)
        ended = {outcome.value: n for outcome, n in tally.outcomes.items()}
        yield counter(PREFIX + "load_outcomes_total", counts((o.value for o in Outcome), ended))
        yield counter(PREFIX + "load_denied_total",
                      {(reason,): n for reason, n in tally.denied_reasons.items()})
        yield gauge(PREFIX + "load_open_requests", self.generator.open_requests)


def load_metrics(generator: LoadGenerator) -> ServiceMetrics:
    """The run's registry: its collector and its two latency histograms (the caller adds
    the bus's)."""
    metrics = ServiceMetrics()
    metrics.add(LoadCollector(generator))
    tally = generator.tally
    metrics.add(ArrayHistogram(PREFIX + "load_accept_latency_seconds", tally.accept_latencies))
    metrics.add(ArrayHistogram(PREFIX + "load_final_latency_seconds", tally.final_latencies))
    return metrics
