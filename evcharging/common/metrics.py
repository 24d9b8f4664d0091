"""Prometheus metrics (SPEC §5: every service serves ``GET /metrics`` on its HTTP port).

Over 400 lines: the catalogue of every metric family, declared once for all services.

This module is the catalogue: every metric family of the project is declared once in
:data:`FAMILIES` (name, type, labels, help, histogram buckets), and nothing else makes
one. The services' collectors build their families through :func:`counter`,
:func:`gauge` and :func:`histogram_family`, which look the name up here, and
:meth:`ServiceMetrics.histogram` makes the few histograms observed on a hot path. So the
Grafana dashboard, the alert rules and the tests can check every name they use against
this table.

Conventions (Prometheus's): the ``evcharging_`` prefix, ``_total`` on counters,
``_seconds`` on durations, base units (seconds, joules, watts), snake_case labels with a
bounded set of values. A label's values are the project's own names for them, as the API
and the logs show them (``state="ACTIVATED"``, ``result="COMPLETED"``, ``reason="CP
busy"``). No family has a ``cp_id`` label: per-CP detail is in Central's API, and a
network of 10,000 CPs would make 10,000 series of each.

Each service has its own :class:`ServiceMetrics` (its own ``CollectorRegistry``, never the
global default one), so several services can share a process (the tests run them so).
Counters that the code already keeps (the controller's ``stats``, :class:`BusStats`, the
monitors' stats) are read by a collector at scrape time rather than counted twice; the
gauges (CPs by state, breakers, lag) are computed at scrape time too. Only the latency
histograms are observed as things happen: a ``perf_counter`` pair and a bucket increment.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from evcharging.common.bus import Topic

if TYPE_CHECKING:
    from evcharging.common.kafka import BusStats, KafkaConsumerLoop

__all__ = [
    "CONTENT_TYPE",
    "FAMILIES",
    "FORBIDDEN_LABELS",
    "PREFIX",
    "ArrayHistogram",
    "BusCollector",
    "Family",
    "LoopHistogram",
    "ServiceMetrics",
    "counter",
    "gauge",
    "histogram_family",
    "metrics_app",
    "mount_metrics",
    "series_names",
]

# The `_created` series that prometheus_client adds to each counter and histogram by
# default double the series count for nothing Prometheus needs (it tracks resets itself).
disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "evcharging_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Prometheus's text format, which every Prometheus reads (our names need no escaping)."""
FORBIDDEN_LABELS = frozenset({"cp_id", "driver_id", "session_id", "request_id"})
"""Labels whose values are unbounded: never on a series (per-CP detail is in the API)."""

Kind = Literal["counter", "gauge", "histogram"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
"""Request latencies: 1 ms (Central's decision on an idle broker) to 30 s (a backlog)."""
HANDLER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 1.0, 5.0)
"""One message's handler: 100 µs (most) to seconds (a handler waiting for a retry)."""
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""One transaction: under a millisecond to the busy timeout (5 s) of a locked database."""


@dataclass(frozen=True)
class Family:
    """One metric family: the name as PromQL sees it (counters end in ``_total``)."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    service: str = "any"
    """Which service exposes it (documentation; ``any``: every Kafka service)."""

    @property
    def series(self) -> frozenset[str]:
        """The sample names it exposes (a histogram's ``_bucket``, ``_sum``, ``_count``)."""
        if self.kind == "histogram":
            return frozenset(f"{self.name}{s}" for s in ("_bucket", "_sum", "_count"))
        return frozenset({self.name})

    @property
    def base(self) -> str:
        """The name prometheus_client wants (a counter's without ``_total``)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


def _c(name: str, help: str, *labels: str, service: str = "any") -> Family:
    return Family(PREFIX + name + "_total", "counter", help, labels, service=service)


def _g(name: str, help: str, *labels: str, service: str = "any") -> Family:
    return Family(PREFIX + name, "gauge", help, labels, service=service)


def _h(name: str, help: str, buckets: tuple[float, ...], *labels: str,
       service: str = "any") -> Family:
    return Family(PREFIX + name + "_seconds", "histogram", help, labels, buckets, service)


_CATALOGUE: tuple[Family, ...] = (
    # --- the bus: every Kafka service ----------------------------------------------------
    _c("messages_consumed", "Kafka messages read by the service's consumer"),
    _c("messages_produced", "Kafka messages the service published"),
    _c("invalid_messages", "Messages skipped because they failed validation", "topic"),
    _c("handler_errors", "Messages whose handler raised (logged and skipped)"),
    _c("handler_retries", "Handler attempts retried after a transient error (e.g. a "
       "locked database); the offset is not committed meanwhile"),
    _c("publish_errors", "Messages that could not be published or delivered"),
    _g("consumer_lag_messages", "Messages not yet read, per assigned partition, as of the "
       "last fetch", "topic", "partition"),
    _g("kafka_connected", "1 while the broker answers the producer's probe, else 0"),
    _h("handler_duration", "Time one message spends in its handler, retries included",
       HANDLER_BUCKETS, "topic"),
    # --- EV Central ----------------------------------------------------------------------
    _c("requests", "Driver requests decided, by outcome (ACCEPTED, DENIED, DUPLICATE: a "
       "request_id seen before, ignored)",
       "outcome", service="central"),
    _c("requests_denied", "DENIED requests by the reason's cause (SPEC §4: CP busy, "
       "CP faulty, circuit open, Central overloaded, ...)", "reason", service="central"),
    _h("accept_latency", "From a request's ts (sent by the driver) to Central's ACCEPTED "
       "decision, as Central sees it", LATENCY_BUCKETS, service="central"),
    _c("sessions", "Sessions ended, by result (COMPLETED, STOPPED, FAILED)", "result",
       service="central"),
    _c("start_timeouts", "Sessions failed because the CP did not confirm START_SUPPLY",
       service="central"),
    _c("ledger_corrections", "Closed sessions whose totals a later meter report changed",
       service="central"),
    _c("energy_delivered_joules", "Energy billed for ended sessions (the CPs' meters, "
       "corrections included); kWh = J / 3.6e6", service="central"),
    _c("revenue_euros", "Money billed for ended sessions (corrections included), €",
       service="central"),
    _c("faults", "Fault reports that made a CP faulty", service="central"),
    _c("recoveries", "Recovery reports that cleared a fault", service="central"),
    _c("monitors_lost", "Times a CP's monitor went silent for 3 of its intervals",
       service="central"),
    _c("db_transactions", "Database transactions committed", service="central"),
    _c("db_writes", "Database writes (statements) committed", service="central"),
    _c("db_errors", "Database transactions that failed (locked, disk full, ...); the "
       "decisions stay queued and are retried", service="central"),
    _c("db_retries", "Flushes retried after a database error", service="central"),
    _g("db_write_failing", "1 while the last database transaction failed, else 0",
       service="central"),
    _h("db_write_duration", "Time of one database transaction (a batch of writes), the "
       "wait for the connection included", DB_BUCKETS, service="central"),
    _g("cps", "CPs known to Central, by state", "state", service="central"),
    _g("cps_faulty", "CPs reported faulty or in FAULT", service="central"),
    _g("cps_unmonitored", "CPs no monitor watches now (never reported, or lost)",
       service="central"),
    _g("cps_monitor_lost", "CPs whose monitor stopped reporting", service="central"),
    _g("breakers", "Circuit breakers by state (CLOSED, OPEN, HALF_OPEN)", "state",
       service="central"),
    _g("sessions_active", "Sessions from ACCEPTED until their end", service="central"),
    _g("network_power_watts", "Power the supplying CPs deliver now", service="central"),
    _g("site_limit_watts", "A site's power limit (SPEC §10; only limited sites)", "site",
       service="central"),
    _g("site_allocated_watts", "What smart charging shares among a limited site's sessions",
       "site", service="central"),
    _g("site_measured_watts", "The latest telemetry power of a site's supplying CPs", "site",
       service="central"),
    _g("allocation_leader", "1 while this Central holds the smart-charging lock and "
       "allocates (SPEC §9, §10), else 0", service="central"),
    _g("central_lag_seconds", "How far behind Central reads the CPs' reports (0 when it "
       "has caught up)", service="central"),
    _g("cps_unregistered", "CPs known only from the bus (never registered), at most "
       "CENTRAL_MAX_UNREGISTERED", service="central"),
    _c("unregistered_refused", "Statuses of CPs known only from the bus ignored because "
       "Central held CENTRAL_MAX_UNREGISTERED of them", service="central"),
    _c("unregistered_forgotten", "CPs known only from the bus forgotten after an hour of "
       "silence", service="central"),
    _c("registrations_refused", "New CPs refused (409) because Central held "
       "CENTRAL_MAX_CPS registered CPs", service="central"),
    _c("auth_failures", "Calls with a missing or wrong API token, by plane (http, tcp)",
       "plane", service="central"),
    _c("auth_throttled", "Calls refused (429, too_many_requests) because their address "
       "failed authentication 20 times within 10 s, by plane (http, tcp)", "plane",
       service="central"),
    _c("tcp_connections_evicted", "TCP control connections closed, idle longest, to admit "
       "a new one at the connection cap", service="central"),
    # --- one CP Engine -------------------------------------------------------------------
    _g("cp_state", "1 for the CP's current state, 0 for the others", "state",
       service="engine"),
    _g("cp_publish_failures", "The CP's failed publishes in a row (0: the bus works)",
       service="engine"),
    _c("cp_ignored_limits", "SET_LIMIT commands ignored: for another session, or while "
       "none runs", service="engine"),
    # --- the CP Fleet --------------------------------------------------------------------
    _g("fleet_cps", "The fleet's CPs by state", "state", service="fleet"),
    _g("fleet_publish_failing_cps", "The fleet's CPs whose last publish failed",
       service="fleet"),
    _c("fleet_commands", "Commands routed to one of the fleet's CPs", service="fleet"),
    _c("fleet_unknown_commands", "Commands for CPs the fleet does not run (ignored)",
       service="fleet"),
    _c("fleet_ignored_limits", "SET_LIMIT commands the fleet's CPs ignored: for another "
       "session, or while none ran", service="fleet"),
    _c("fleet_random_faults", "Random faults (--fault-rate) by event (injected, skipped, "
       "repaired)", "event", service="fleet"),
    # --- monitoring: a CP Monitor, or the fleet's in-process monitoring ------------------
    _c("monitor_checks", "Health checks run", service="monitor"),
    _c("monitor_check_failures", "Health checks that failed", service="monitor"),
    _c("monitor_reports_sent", "Reports Central accepted, by kind (fault, recovery)", "kind",
       service="monitor"),
    _c("monitor_registrations", "Registrations Central accepted", service="monitor"),
    _c("monitor_liveness_sent", "Liveness reports Central accepted", service="monitor"),
    _c("monitor_central_errors", "Calls to Central that failed or were refused",
       service="monitor"),
    _g("monitor_cps", "CPs by what their monitoring believes (UNKNOWN, HEALTHY, FAILING, "
       "FAULT)",
       "view", service="monitor"),
    # --- the OCPP gateway ----------------------------------------------------------------
    _g("ocpp_chargers", "Chargers connected, by OCPP protocol (ocpp1.6, ocpp2.0.1)",
       "protocol", service="ocpp"),
    _g("ocpp_cps", "The gateway's CPs (connectors, EVSEs) by state", "state", service="ocpp"),
    _c("ocpp_messages", "OCPP messages handled, by action (unknown: not an OCPP action), "
       "direction (in: the charger's CALL, out: the gateway's) and result (accepted, "
       "rejected, timeout, or the CALLERROR code)", "action", "direction", "result",
       service="ocpp"),
    _h("ocpp_call_duration", "Round trip of one CALL from the gateway to a charger",
       LATENCY_BUCKETS, "action", service="ocpp"),
    _c("ocpp_handshakes_refused", "WebSocket handshakes refused, by reason (unknown_path, "
       "unauthorized, unknown_charger, not_loopback, no_subprotocol)", "reason",
       service="ocpp"),
    _c("ocpp_unknown_transactions", "Stops and meter values for a transaction the gateway "
       "does not know (answered as usual, no session changed)", service="ocpp"),
    _c("ocpp_commands", "Central's commands for the gateway's CPs, by command and outcome "
       "(done, refused, ignored: a SET_LIMIT of a session not running)", "cmd", "outcome",
       service="ocpp"),
    _c("ocpp_charger_starts", "Transactions started at a charger, by Central's verdict "
       "(accepted, denied: id tag answered Invalid, timeout: answered Accepted without one)",
       "verdict", service="ocpp"),
    # --- the driver load generator -------------------------------------------------------
    _c("load_arrivals", "Drivers that arrived", service="load"),
    _c("load_requests_sent", "Requests published", service="load"),
    _c("load_outcomes", "Arrivals ended, by outcome (completed, failed, denied, timed_out, "
       "no_free_cp, not_sent, interrupted)", "outcome", service="load"),
    _c("load_denied", "DENIED requests by the reason's cause", "reason", service="load"),
    _g("load_open_requests", "Requests sent whose final status has not come yet",
       service="load"),
    _h("load_accept_latency", "From publishing a request to its ACCEPTED update "
       "(end to end, as the driver sees it)", LATENCY_BUCKETS, service="load"),
    _h("load_final_latency", "From publishing a request to its final update",
       (*LATENCY_BUCKETS, 60.0, 120.0), service="load"),
)

FAMILIES: Mapping[str, Family] = {family.name: family for family in _CATALOGUE}
"""Every metric family of the project, by name."""


def series_names() -> frozenset[str]:
    """Every sample name the project's families expose (for checking dashboards)."""
    return frozenset(name for family in _CATALOGUE for name in family.series)


def _family(name: str, kind: Kind) -> Family:
    family = FAMILIES.get(name)
    if family is None:
        raise KeyError(f"{name} is not in the metrics catalogue (evcharging.common.metrics)")
    if family.kind != kind:
        raise TypeError(f"{name} is a {family.kind}, not a {kind}")
    return family


Values = float | Mapping[tuple[str, ...], float]
"""One value, or one per tuple of label values (in the family's label order)."""


def _fill(metric: CounterMetricFamily | GaugeMetricFamily, family: Family, values: Values
          ) -> None:
    if isinstance(values, Mapping):
        for labels, value in values.items():
            if len(labels) != len(family.labels):
                raise ValueError(f"{family.name} takes labels {family.labels}, got {labels}")
            metric.add_metric(list(labels), float(value))
    else:
        if family.labels:
            raise ValueError(f"{family.name} needs labels {family.labels}")
        metric.add_metric([], float(values))


def counter(name: str, values: Values | None = None) -> CounterMetricFamily:
    """The catalogue's counter `name` with these values (none: an empty family)."""
    family = _family(name, "counter")
    metric = CounterMetricFamily(family.base, family.help, labels=family.labels)
    if values is not None:
        _fill(metric, family, values)
    return metric


def gauge(name: str, values: Values | None = None) -> GaugeMetricFamily:
    """The catalogue's gauge `name` with these values (none: an empty family)."""
    family = _family(name, "gauge")
    metric = GaugeMetricFamily(family.base, family.help, labels=family.labels)
    if values is not None:
        _fill(metric, family, values)
    return metric


def histogram_family(
    name: str, buckets: Sequence[tuple[str, float]] | None = None, sum_value: float = 0.0
) -> HistogramMetricFamily:
    """The catalogue's histogram `name` (cumulative `buckets` ending with ``+Inf``)."""
    family = _family(name, "histogram")
    if buckets is None:
        return HistogramMetricFamily(family.base, family.help, labels=family.labels)
    return HistogramMetricFamily(family.base, family.help, buckets=list(buckets),
                                 sum_value=sum_value)


def described(names: Iterable[str]) -> list[Metric]:
    """Empty families for a collector's ``describe()``: the registry then refuses two
    collectors that would expose the same name."""
    found: list[Metric] = []
    for name in names:
        family = FAMILIES[name]
        if family.kind == "counter":
            found.append(counter(name))
        elif family.kind == "gauge":
            found.append(gauge(name))
        else:
            found.append(histogram_family(name))
    return found


def one_hot(values: Iterable[str], current: str | None) -> dict[tuple[str, ...], float]:
    """1 for `current`, 0 for every other value (a state as a gauge per state)."""
    return {(value,): 1.0 if value == current else 0.0 for value in values}


def counts(values: Iterable[str], counted: Mapping[str, int]) -> dict[tuple[str, ...], float]:
    """Every value of a label with its count, 0 included (no series comes and goes)."""
    return {(value,): float(counted.get(value, 0)) for value in values}


# ----------------------------------------------------------------------------- a service


class ServiceMetrics:
    """One service's metrics: its own registry, its collectors and hot-path histograms.

    ``process``: also the standard ``process_*`` (CPU, memory, open files) and
    ``python_info`` series of the process (one service per process only; the tests that
    run several services in one process leave it to one of them).
    """

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._handler: LoopHistogram | None = None

    def add(self, collector: Collector) -> None:
        self.registry.register(collector)

    def loop_histogram(self, name: str) -> LoopHistogram:
        """A histogram of the catalogue observed on a hot path in the event loop
        (:class:`LoopHistogram`), registered here."""
        histogram = LoopHistogram(name)
        self.add(histogram)
        return histogram

    def histogram(self, name: str) -> Histogram:
        """A histogram of the catalogue, observed as things happen (registered here)."""
        family = _family(name, "histogram")
        return Histogram(family.base, family.help, labelnames=family.labels,
                         buckets=family.buckets, registry=self.registry)

    def handler_observer(self) -> Callable[[Topic, float], None]:
        """The ``observe`` hook of a :class:`~evcharging.common.kafka.KafkaConsumerLoop`:
        each message's handler time into ``evcharging_handler_duration_seconds{topic}``."""
        if self._handler is None:
            self._handler = self.loop_histogram(PREFIX + "handler_duration_seconds")
        histogram = self._handler
        children = {topic: histogram.observer(topic.value) for topic in Topic}

        def observe(topic: Topic, seconds: float) -> None:
            children[topic](seconds)

        return observe

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4, :data:`CONTENT_TYPE`) of everything
        registered."""
        return generate_latest(self.registry)


def mount_metrics(app: FastAPI, metrics: ServiceMetrics) -> None:
    """``GET /metrics`` on `app`: the service's metrics in Prometheus's text format.

    A plain read, like ``/health``: protected mode guards mutating calls only."""

    @app.get("/metrics", include_in_schema=False)
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def metrics_app(metrics: ServiceMetrics, title: str) -> FastAPI:
    """A FastAPI app with only ``GET /metrics``, for a service with no HTTP port of its
    own (the CP Monitor, the load generator)."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    mount_metrics(app, metrics)
    return app


# ----------------------------------------------------------------------------- the bus


class BusCollector:
    """The bus counters of :class:`~evcharging.common.kafka.BusStats`, the consumers'
    lag per partition and whether the broker answers, read at scrape time."""

    NAMES = tuple(PREFIX + n for n in (
        "messages_consumed_total", "messages_produced_total", "invalid_messages_total",
        "handler_errors_total", "handler_retries_total", "publish_errors_total",
        "consumer_lag_messages", "kafka_connected",
    ))

    def __init__(
        self,
        stats: BusStats,
        consumers: Sequence[KafkaConsumerLoop] = (),
        connected: Callable[[], bool] | None = None,
    ) -> None:
        self.stats = stats
        self.consumers = consumers
        self.connected = connected

    def describe(self) -> list[Metric]:
        return described(self.NAMES)

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield counter(PREFIX + "messages_consumed_total", s.consumed)
        yield counter(PREFIX + "messages_produced_total", s.produced)
        yield counter(PREFIX + "invalid_messages_total",
                      {(topic.value,): s.invalid_by_topic.get(topic.value, 0)
                       for topic in Topic})
        yield counter(PREFIX + "handler_errors_total", s.handler_errors)
        yield counter(PREFIX + "handler_retries_total", s.handler_retries)
        yield counter(PREFIX + "publish_errors_total", s.publish_errors)
        lag: dict[tuple[str, ...], float] = {}
        for consumer in self.consumers:
            prefix = consumer.config.topic_prefix
            for tp, behind in list(consumer.lag.items()):
                lag[(tp.topic.removeprefix(prefix), str(tp.partition))] = behind
        yield gauge(PREFIX + "consumer_lag_messages", lag)
        if self.connected is not None:
            yield gauge(PREFIX + "kafka_connected", 1.0 if self.connected() else 0.0)


# ----------------------------------------------------------------------------- histograms


class ArrayHistogram:
    """A histogram of the catalogue built at scrape time from a list of values that only
    grows (the load generator's latencies): each scrape buckets only the new ones."""

    def __init__(self, name: str, values: Sequence[float]) -> None:
        self.name = name
        self.family = _family(name, "histogram")
        self.values = values
        self._bounds = list(self.family.buckets)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        self._seen = 0

    def describe(self) -> list[Metric]:
        return described([self.name])

    def collect(self) -> Iterator[Metric]:
        values = self.values
        for value in values[self._seen:]:
            self._counts[bisect.bisect_left(self._bounds, value)] += 1
            self._sum += value
        self._seen = len(values)
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip([*self._bounds, math.inf], self._counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), float(total)))
        yield histogram_family(self.name, buckets, self._sum)


class LoopHistogram:
    """A histogram of the catalogue observed on a hot path (each message a consumer
    handles): one bisect and two additions per observation, where prometheus_client's
    ``Histogram`` takes a lock twice and walks the buckets in Python (7 % of Central's
    CPU at 10,000 CPs). Not thread-safe: observed and scraped in one event loop only
    (``GET /metrics`` is an ``async`` route)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.family = _family(name, "histogram")
        self._bounds = list(self.family.buckets)
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observer(self, *labels: str) -> Callable[[float], None]:
        """The observe function of the series with these label values (in the family's
        label order); the series is exposed from now on, with zeros until observed."""
        if len(labels) != len(self.family.labels):
            raise ValueError(f"{self.name} takes labels {self.family.labels}, got {labels}")
        counts, total = self._series.setdefault(
            labels, ([0] * (len(self._bounds) + 1), [0.0]))
        bounds = self._bounds
        bisect_left = bisect.bisect_left

        def observe(value: float) -> None:
            counts[bisect_left(bounds, value)] += 1  # le is "less than or equal"
            total[0] += value

        return observe

    def describe(self) -> list[Metric]:
        return described([self.name])

    def collect(self) -> Iterator[Metric]:
        family = self.family
        metric = HistogramMetricFamily(family.base, family.help, labels=family.labels)
        names = [*(repr(bound) for bound in self._bounds), "+Inf"]
        for labels, (counts, total) in list(self._series.items()):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for name, count in zip(names, counts, strict=True):
                cumulative += count
                buckets.append((name, float(cumulative)))
            metric.add_metric(list(labels), buckets, sum_value=total[0])
        yield metric


def timer() -> Callable[[], float]:
    """Seconds since the call (``perf_counter``): ``elapsed = timer(); ...; elapsed()``."""
    started = time.perf_counter()
    return lambda: time.perf_counter() - started
