"""The metrics catalogue and every service's collectors (no broker, no Prometheus).

What the services expose is read the way Prometheus reads it: the text of ``GET
/metrics`` (or of the registry), parsed by prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import TopicPartition
from fastapi import FastAPI
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from evcharging.apps.ev_central.api import create_api
from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.metrics import (
    J_PER_KWH,
    CentralCollector,
    SiteCollector,
    central_metrics,
    timed_requests,
)
from evcharging.apps.ev_central.repository import SqliteRepository, StorageError
from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.apps.ev_cp_e.metrics import EngineCollector, engine_metrics
from evcharging.apps.ev_cp_m import main as monitor_main
from evcharging.apps.ev_cp_m.metrics import MonitorCollector, monitor_metrics
from evcharging.apps.ev_cp_m.monitor import Monitor
from evcharging.apps.ev_fleet.api import FleetParts
from evcharging.apps.ev_fleet.faults import FaultStats
from evcharging.apps.ev_fleet.fleet import Fleet
from evcharging.apps.ev_fleet.metrics import FleetCollector
from evcharging.apps.ev_fleet.plan import fleet_plan
from evcharging.apps.ev_load.load import CPChooser, LoadGenerator
from evcharging.apps.ev_load.metrics import LoadCollector, load_metrics
from evcharging.apps.ev_load.stats import Outcome
from evcharging.apps.ev_ocpp.metrics import OcppCollector
from evcharging.common.bus import Topic
from evcharging.common.config import CPEngineSettings, CPMonitorSettings
from evcharging.common.kafka import BusStats, KafkaConfig
from evcharging.common.messages import (
    CPRegistration,
    CPStatus,
    CPTelemetry,
    DriverRequest,
    StatusEvent,
    new_id,
    utcnow,
)
from evcharging.common.metrics import (
    FAMILIES,
    FORBIDDEN_LABELS,
    PREFIX,
    ArrayHistogram,
    BusCollector,
    ServiceMetrics,
    counter,
    gauge,
    histogram_family,
    metrics_app,
    mount_metrics,
    series_names,
)
from evcharging.common.readclock import ReadClock
from evcharging.common.states import CPState, SessionResult
from evcharging.devtools.process import free_port
from tests.polling import poll
from tests.unit.fakes import RecordingPublisher

Samples = dict[str, float]

HOT_PATH_HISTOGRAMS = {
    PREFIX + "accept_latency_seconds", PREFIX + "db_write_duration_seconds",
    PREFIX + "handler_duration_seconds", PREFIX + "load_accept_latency_seconds",
    PREFIX + "load_final_latency_seconds", PREFIX + "ocpp_call_duration_seconds",
}
"""Histograms observed as things happen (or built from the load's latencies)."""
COLLECTORS: list[Any] = [BusCollector, CentralCollector, EngineCollector, FleetCollector,
                         MonitorCollector, LoadCollector, OcppCollector, SiteCollector]


def parse(text: str) -> Samples:
    """Every sample of an exposition as ``name{label="value",...}`` (labels sorted)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def families(text: str) -> set[str]:
    """The families an exposition declares (with or without samples), as PromQL names."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def scrape(metrics: ServiceMetrics) -> Samples:
    return parse(metrics.render().decode())


# ----------------------------------------------------------------------------- the catalogue


def test_every_family_follows_prometheus_naming() -> None:
    assert FAMILIES
    for name, family in FAMILIES.items():
        assert re.fullmatch(r"evcharging_[a-z][a-z0-9_]*[a-z0-9]", name), name
        assert family.help.strip(), f"{name} has no help"
        if family.kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        if family.kind == "histogram":
            assert name.endswith("_seconds"), f"{name}: our histograms are durations"
            assert family.buckets and list(family.buckets) == sorted(set(family.buckets))
            assert family.buckets[0] > 0
        else:
            assert not family.buckets
        # Base units only: no milliseconds, kilowatts or kilowatt-hours in a name.
        for unit in ("_ms", "millis", "kw", "kwh", "minutes", "hours", "percent"):
            assert unit not in name.removeprefix(PREFIX).split("_") and unit not in name, name
        for label in family.labels:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", label), f"{name}: label {label}"
            assert label not in ("le", "quantile", "job", "instance"), f"{name}: {label}"


def test_no_family_has_an_unbounded_label() -> None:
    for name, family in FAMILIES.items():
        assert not FORBIDDEN_LABELS & set(family.labels), f"{name} has {family.labels}"
    assert "cp_id" in FORBIDDEN_LABELS


def test_every_family_is_exposed_by_a_collector_or_a_hot_path_histogram() -> None:
    exposed = {name for cls in COLLECTORS for name in cls.NAMES} | HOT_PATH_HISTOGRAMS
    assert exposed == set(FAMILIES), (
        f"never exposed: {sorted(set(FAMILIES) - exposed)}; "
        f"not in the catalogue: {sorted(exposed - set(FAMILIES))}"
    )
    assert all(FAMILIES[name].kind == "histogram" for name in HOT_PATH_HISTOGRAMS)


def test_series_names_include_the_histogram_samples() -> None:
    names = series_names()
    assert PREFIX + "accept_latency_seconds_bucket" in names
    assert PREFIX + "accept_latency_seconds_count" in names
    assert PREFIX + "requests_total" in names
    assert PREFIX + "accept_latency_seconds" not in names


def test_helpers_refuse_names_outside_the_catalogue_and_wrong_labels() -> None:
    with pytest.raises(KeyError, match="not in the metrics catalogue"):
        counter(PREFIX + "made_up_total", 1)
    with pytest.raises(TypeError, match="is a counter"):
        gauge(PREFIX + "requests_total", 1)
    with pytest.raises(ValueError, match="needs labels"):
        counter(PREFIX + "requests_total", 1)
    with pytest.raises(ValueError, match="takes labels"):
        counter(PREFIX + "requests_total", {("a", "b"): 1})
    with pytest.raises(TypeError, match="is a counter"):
        ServiceMetrics(process=False).histogram(PREFIX + "requests_total")
    assert histogram_family(PREFIX + "accept_latency_seconds").samples == []


def test_each_service_has_its_own_registry_and_none_uses_the_global_one() -> None:
    first, second = ServiceMetrics(), ServiceMetrics()
    observe_first, observe_second = first.handler_observer(), second.handler_observer()
    observe_first(Topic.CP_STATUS, 0.002)
    observe_first(Topic.CP_STATUS, 0.2)
    observe_second(Topic.DRIVER_REQUESTS, 0.0001)
    one, two = scrape(first), scrape(second)
    count = PREFIX + "handler_duration_seconds_count"
    assert one[f'{count}{{topic="cp.status"}}'] == 2
    assert one[f'{count}{{topic="driver.requests"}}'] == 0
    assert two[f'{count}{{topic="driver.requests"}}'] == 1
    assert two[f'{count}{{topic="cp.status"}}'] == 0
    assert one[f'{PREFIX}handler_duration_seconds_bucket{{le="0.005",topic="cp.status"}}'] == 1
    assert "process_cpu_seconds_total" in one
    assert any(key.startswith("python_info{") for key in one)
    assert not any(name.startswith(PREFIX) for name in
                   (m.name for m in REGISTRY.collect()))
    assert not any(name.endswith("_created") for name in one), "no _created series"


def test_a_loop_histogram_buckets_like_prometheus_clients() -> None:
    """The hot-path histogram exposes what prometheus_client's Histogram would."""
    ours, theirs = ServiceMetrics(process=False), ServiceMetrics(process=False)
    name = PREFIX + "handler_duration_seconds"
    observe = ours.loop_histogram(name).observer("cp.status")
    child = theirs.histogram(name).labels("cp.status")
    for value in (0.0, 0.0001, 0.00010001, 0.0005, 0.003, 1.0, 5.0, 7.5, 0.02):
        observe(value)
        child.observe(value)
    assert scrape(ours) == scrape(theirs)
    with pytest.raises(ValueError, match="takes labels"):
        ours.loop_histogram(PREFIX + "accept_latency_seconds").observer("x")


# ----------------------------------------------------------------------------- the route


async def test_metrics_route_serves_the_text_format_to_get_only() -> None:
    metrics = ServiceMetrics(process=False)
    metrics.handler_observer()(Topic.CP_TELEMETRY, 0.01)
    app = FastAPI()
    mount_metrics(app, metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        answer = await c.get("/metrics")
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        count = f'{PREFIX}handler_duration_seconds_count{{topic="cp.telemetry"}}'
        assert parse(answer.text)[count] == 1
        assert (await c.post("/metrics")).status_code == 405
    assert metrics_app(metrics, "x").openapi_url is None


# ----------------------------------------------------------------------------- the bus


def test_bus_collector_reads_the_counters_the_lag_and_the_connection() -> None:
    stats = BusStats(produced=7, consumed=11, invalid=3, handler_errors=2, handler_retries=5,
                     publish_errors=1, invalid_by_topic={"cp.status": 3})

    class Consumer:  # what the collector reads of a KafkaConsumerLoop
        def __init__(self) -> None:
            self.config = KafkaConfig(bootstrap="x:1", client_id="t", topic_prefix="run1.")
            self.lag = {TopicPartition("run1.cp.status", 0): 4,
                        TopicPartition("run1.cp.status", 2): 0,
                        TopicPartition("run1.driver.requests", 1): 9}

    connected = [True]
    metrics = ServiceMetrics(process=False)
    metrics.add(BusCollector(stats, [Consumer()], lambda: connected[0]))  # type: ignore[list-item]
    got = scrape(metrics)
    assert got[PREFIX + "messages_produced_total"] == 7
    assert got[PREFIX + "messages_consumed_total"] == 11
    assert got[PREFIX + "handler_errors_total"] == 2
    assert got[PREFIX + "handler_retries_total"] == 5
    assert got[PREFIX + "publish_errors_total"] == 1
    assert got[f'{PREFIX}invalid_messages_total{{topic="cp.status"}}'] == 3
    assert got[f'{PREFIX}invalid_messages_total{{topic="driver.requests"}}'] == 0  # every topic
    lag = PREFIX + "consumer_lag_messages"
    assert got[f'{lag}{{partition="0",topic="cp.status"}}'] == 4
    assert got[f'{lag}{{partition="2",topic="cp.status"}}'] == 0
    assert got[f'{lag}{{partition="1",topic="driver.requests"}}'] == 9
    assert got[PREFIX + "kafka_connected"] == 1
    connected[0] = False
    stats.consumed += 1
    got = scrape(metrics)
    assert got[PREFIX + "kafka_connected"] == 0
    assert got[PREFIX + "messages_consumed_total"] == 12  # read at scrape time


def test_two_collectors_of_one_family_are_refused() -> None:
    metrics = ServiceMetrics(process=False)
    metrics.add(BusCollector(BusStats()))
    with pytest.raises(ValueError, match="Duplicated"):
        metrics.add(BusCollector(BusStats()))


# ----------------------------------------------------------------------------- Central


@pytest.fixture
async def file_repo(tmp_path: Path) -> AsyncIterator[SqliteRepository]:
    async with SqliteRepository(tmp_path / "central.db", busy_timeout_ms=0) as repository:
        yield repository


async def _flushed(controller: Controller, coro: Any) -> None:
    await coro
    await controller.flush()


async def test_central_collector_reads_decisions_sessions_ledger_and_cps(
    bus: RecordingPublisher, file_repo: SqliteRepository
) -> None:
    controller = Controller(bus, file_repo, CentralOptions(start_timeout=30))
    metrics = central_metrics(controller, file_repo, process=False)
    handle = timed_requests(controller, metrics)
    try:
        for cp_id in ("CP-1", "CP-2", "CP-3"):
            await controller.register(CPRegistration(cp_id=cp_id))
            await _flushed(controller, controller.handle_status(
                CPStatus(cp_id=cp_id, state=CPState.ACTIVATED)))
        await controller.monitor_report("CP-1", 5.0, True)
        request = DriverRequest(request_id=new_id(), driver_id="d1", cp_id="CP-1")
        # The broker appended it 30 ms ago.
        controller.readclock.arrived(Topic.DRIVER_REQUESTS, 0, utcnow().timestamp() - 0.03)
        await _flushed(controller, handle(request))
        await _flushed(controller, handle(request))  # a duplicate: not decided again
        await _flushed(controller, handle(DriverRequest(request_id=new_id(), driver_id="d2",
                                                        cp_id="CP-404")))
        session = controller.get("CP-1").session
        assert session is not None
        await _flushed(controller, controller.handle_status(CPStatus(
            cp_id="CP-1", state=CPState.SUPPLYING, session_id=session.session_id,
            driver_id="d1")))
        await _flushed(controller, controller.handle_telemetry(CPTelemetry(
            cp_id="CP-1", kw=22.0, kwh=0.5, euros=0.15, driver_id="d1",
            session_id=session.session_id)))
        await controller.report_fault("CP-3", True, "overheating")

        during = scrape(metrics)
        assert during[PREFIX + "sessions_active"] == 1
        assert during[PREFIX + "network_power_watts"] == 22_000
        assert during[f'{PREFIX}cps{{state="SUPPLYING"}}'] == 1
        assert during[f'{PREFIX}cps{{state="FAULT"}}'] == 1
        assert during[f'{PREFIX}cps{{state="ACTIVATED"}}'] == 1
        assert during[f'{PREFIX}cps{{state="STOPPED"}}'] == 0  # every state, 0 included
        assert during[PREFIX + "cps_faulty"] == 1
        assert during[PREFIX + "cps_unmonitored"] == 2  # CP-2 and CP-3 have no monitor
        assert during[PREFIX + "cps_monitor_lost"] == 0
        assert during[f'{PREFIX}breakers{{state="OPEN"}}'] == 1
        assert during[f'{PREFIX}breakers{{state="CLOSED"}}'] == 2
        assert during[f'{PREFIX}breakers{{state="HALF_OPEN"}}'] == 0
        assert during[PREFIX + "faults_total"] == 1

        await _flushed(controller, controller.handle_status(CPStatus(
            cp_id="CP-1", state=CPState.ACTIVATED, event=StatusEvent.STOP_SUPPLY,
            session_id=session.session_id, kwh=0.6, euros=0.18,
            session_result=SessionResult.COMPLETED)))
        after = scrape(metrics)
    finally:
        await controller.close()
    assert after[f'{PREFIX}requests_total{{outcome="ACCEPTED"}}'] == 1
    assert after[f'{PREFIX}requests_total{{outcome="DENIED"}}'] == 1
    assert after[f'{PREFIX}requests_total{{outcome="DUPLICATE"}}'] == 1
    assert after[f'{PREFIX}requests_denied_total{{reason="unknown CP"}}'] == 1
    assert after[f'{PREFIX}sessions_total{{result="COMPLETED"}}'] == 1
    assert after[f'{PREFIX}sessions_total{{result="FAILED"}}'] == 0
    assert after[PREFIX + "energy_delivered_joules_total"] == pytest.approx(0.6 * J_PER_KWH)
    assert after[PREFIX + "revenue_euros_total"] == pytest.approx(0.18)
    assert after[PREFIX + "sessions_active"] == 0
    assert after[PREFIX + "network_power_watts"] == 0
    # Only the ACCEPTED request is timed: from its ts (30 ms before it was sent here).
    assert after[PREFIX + "accept_latency_seconds_count"] == 1
    assert after[PREFIX + "accept_latency_seconds_sum"] >= 0.03
    assert after[f'{PREFIX}accept_latency_seconds_bucket{{le="0.025"}}'] == 0
    assert after[f'{PREFIX}accept_latency_seconds_bucket{{le="+Inf"}}'] == 1
    transactions = after[PREFIX + "db_transactions_total"]
    assert transactions > 0 and after[PREFIX + "db_writes_total"] >= transactions
    assert after[PREFIX + "db_write_duration_seconds_count"] >= transactions
    assert after[PREFIX + "db_errors_total"] == 0 and after[PREFIX + "db_write_failing"] == 0
    assert after[PREFIX + "central_lag_seconds"] == 0


async def test_a_late_meter_report_adds_its_correction_to_the_billed_energy(
    bus: RecordingPublisher, file_repo: SqliteRepository
) -> None:
    controller = Controller(bus, file_repo)
    metrics = central_metrics(controller, process=False)
    try:
        await controller.register(CPRegistration(cp_id="CP-1"))
        await _flushed(controller, controller.handle_status(
            CPStatus(cp_id="CP-1", state=CPState.ACTIVATED)))
        await _flushed(controller, controller.handle_request(
            DriverRequest(request_id=new_id(), driver_id="d", cp_id="CP-1")))
        session = controller.get("CP-1").session
        assert session is not None
        await _flushed(controller, controller.handle_status(CPStatus(
            cp_id="CP-1", state=CPState.SUPPLYING, session_id=session.session_id,
            driver_id="d")))
        await _flushed(controller, controller.handle_telemetry(CPTelemetry(
            cp_id="CP-1", kw=22.0, kwh=1.0, euros=0.3, driver_id="d",
            session_id=session.session_id)))
        await controller.report_fault("CP-1", True, "smoke")  # ends it FAILED at 1 kWh
        assert scrape(metrics)[PREFIX + "energy_delivered_joules_total"] == pytest.approx(
            1.0 * J_PER_KWH)
        await _flushed(controller, controller.handle_status(CPStatus(  # the meter: 1.5 kWh
            cp_id="CP-1", state=CPState.FAULT, event=StatusEvent.FAULT,
            session_id=session.session_id, kwh=1.5, euros=0.45,
            session_result=SessionResult.FAILED)))
        got = scrape(metrics)
    finally:
        await controller.close()
    assert got[PREFIX + "energy_delivered_joules_total"] == pytest.approx(1.5 * J_PER_KWH)
    assert got[PREFIX + "revenue_euros_total"] == pytest.approx(0.45)
    assert got[PREFIX + "ledger_corrections_total"] == 1
    assert got[f'{PREFIX}sessions_total{{result="FAILED"}}'] == 1


async def test_a_locked_database_shows_as_errors_and_failing(
    bus: RecordingPublisher, file_repo: SqliteRepository, tmp_path: Path
) -> None:
    controller = Controller(bus, file_repo)
    metrics = central_metrics(controller, file_repo, process=False)
    locker = sqlite3.connect(tmp_path / "central.db", isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError):
            await controller.register(CPRegistration(cp_id="CP-1"))
        locked = scrape(metrics)
        locker.execute("ROLLBACK")
        await controller.flush()
        unlocked = scrape(metrics)
    finally:
        locker.close()
        await controller.close()
    assert locked[PREFIX + "db_errors_total"] == 1
    assert locked[PREFIX + "db_write_failing"] == 1
    assert unlocked[PREFIX + "db_errors_total"] == 1
    assert unlocked[PREFIX + "db_write_failing"] == 0


async def test_central_lag_is_how_far_behind_it_reads(
    bus: RecordingPublisher, file_repo: SqliteRepository
) -> None:
    """By the broker's time: from the newest message read on a partition Central has not
    read to its end, to the broker's time as Central reads it."""
    wall = [1_000_000.0]
    readclock = ReadClock(monotonic=lambda: wall[0], wall=lambda: wall[0])
    controller = Controller(bus, file_repo, readclock=readclock)
    metrics = central_metrics(controller, process=False)
    readclock.arrived(Topic.CP_STATUS, 0, wall[0])  # the newest message read anywhere
    readclock.arrived(Topic.CP_TELEMETRY, 1, wall[0] - 8)  # behind on this partition
    readclock.fetched(Topic.CP_TELEMETRY, 1, answered=True, caught_up=False)
    readclock.fetched(Topic.CP_STATUS, 0, answered=True, caught_up=True)
    assert scrape(metrics)[PREFIX + "central_lag_seconds"] == pytest.approx(8)
    wall[0] += 1.0
    readclock.fetched(Topic.CP_TELEMETRY, 1, answered=True, caught_up=True)
    assert scrape(metrics)[PREFIX + "central_lag_seconds"] == 0  # caught up: lag 0


# ----------------------------------------------------------------------------- engine, fleet


async def test_engine_collector_shows_its_state_one_hot() -> None:
    cp = ChargingPoint("CP-1", RecordingPublisher())
    metrics = engine_metrics(cp)
    before = scrape(metrics)
    assert before[f'{PREFIX}cp_state{{state="DISCONNECTED"}}'] == 1
    async with cp:
        got = scrape(metrics)
    assert got[f'{PREFIX}cp_state{{state="ACTIVATED"}}'] == 1
    assert sum(v for k, v in got.items() if k.startswith(PREFIX + "cp_state{")) == 1
    assert got[PREFIX + "cp_publish_failures"] == 0
    assert not any("CP-1" in key for key in got), "no CP id on any series"


async def test_fleet_collector_counts_states_commands_monitoring_and_faults() -> None:
    fleet = Fleet(fleet_plan("CP-", 1, 5), RecordingPublisher(),
                  CPEngineSettings(_env_file=None, cp_id="CP-00001"))
    faults = FaultStats(injected=3, skipped=1, repaired=2)
    metrics = ServiceMetrics(process=False)
    metrics.add(FleetCollector(FleetParts(fleet, faults=faults)))
    try:
        await fleet.connect()
        fleet.stats.commands, fleet.stats.unknown_commands = 4, 2
        await fleet.cps["CP-00002"].fault("test")
        got = scrape(metrics)
    finally:
        await fleet.stop()
    assert got[f'{PREFIX}fleet_cps{{state="ACTIVATED"}}'] == 4
    assert got[f'{PREFIX}fleet_cps{{state="FAULT"}}'] == 1
    assert got[f'{PREFIX}fleet_cps{{state="SUPPLYING"}}'] == 0
    assert got[PREFIX + "fleet_commands_total"] == 4
    assert got[PREFIX + "fleet_unknown_commands_total"] == 2
    assert got[f'{PREFIX}fleet_random_faults_total{{event="injected"}}'] == 3
    assert got[f'{PREFIX}fleet_random_faults_total{{event="repaired"}}'] == 2
    assert got[PREFIX + "fleet_publish_failing_cps"] == 0
    assert not any("CP-0000" in key for key in got)


# ----------------------------------------------------------------------------- the monitor


def _monitor_settings(**overrides: Any) -> CPMonitorSettings:
    values: dict[str, Any] = {"_env_file": None, "cp_id": "CP-1", "cp_e_port": free_port(),
                              "central_port": free_port(), "api_token": None}
    return CPMonitorSettings(**{**values, **overrides})


async def test_monitor_collector_counts_checks_and_shows_its_view() -> None:
    def engine(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"state": "FAULT", "reason": "x"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(engine))
    monitor = Monitor(_monitor_settings(failure_threshold=2), client)
    metrics = monitor_metrics(monitor)
    try:
        assert scrape(metrics)[f'{PREFIX}monitor_cps{{view="UNKNOWN"}}'] == 1
        await monitor.check_once()
        await monitor.check_once()
        monitor.stats.fault_reports_sent = 1
        got = scrape(metrics)
    finally:
        await client.aclose()
    assert got[PREFIX + "monitor_checks_total"] == 2
    assert got[PREFIX + "monitor_check_failures_total"] == 2
    assert got[f'{PREFIX}monitor_cps{{view="FAULT"}}'] == 1
    assert got[f'{PREFIX}monitor_cps{{view="HEALTHY"}}'] == 0
    assert got[f'{PREFIX}monitor_reports_sent_total{{kind="fault"}}'] == 1
    assert got[f'{PREFIX}monitor_reports_sent_total{{kind="recovery"}}'] == 0


async def test_monitor_serves_metrics_on_its_metrics_port_only_when_asked() -> None:
    port = free_port()
    stop = asyncio.Event()
    running = asyncio.create_task(monitor_main.run(
        _monitor_settings(metrics_port=port, health_interval=0.05), stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async def checked() -> float:
                answer = await client.get("/metrics")
                return parse(answer.text).get(PREFIX + "monitor_check_failures_total", 0)

            # The engine's port is closed: every check fails, and the count shows it.
            await poll(checked, timeout=10, what="failed checks in /metrics",
                       retry_on=(httpx.HTTPError,))
            assert (await client.get("/health")).status_code == 404  # only /metrics
    finally:
        stop.set()
        assert await asyncio.wait_for(running, 10) == 0
    default = _monitor_settings()
    assert default.metrics_port == 0 and default.metrics_host == "127.0.0.1"


async def test_monitor_exits_1_when_its_metrics_port_is_taken() -> None:
    port = free_port()
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
    try:
        code = await asyncio.wait_for(
            monitor_main.run(_monitor_settings(metrics_port=port), asyncio.Event()), 10)
    finally:
        server.close()
        await server.wait_closed()
    assert code == 1


# ----------------------------------------------------------------------------- the load


def test_array_histogram_buckets_only_new_values_and_is_cumulative() -> None:
    values: list[float] = [0.003, 0.2]
    metrics = ServiceMetrics(process=False)
    metrics.add(ArrayHistogram(PREFIX + "load_accept_latency_seconds", values))
    name = PREFIX + "load_accept_latency_seconds"
    first = scrape(metrics)
    assert first[f'{name}_bucket{{le="0.0025"}}'] == 0
    assert first[f'{name}_bucket{{le="0.005"}}'] == 1
    assert first[f'{name}_bucket{{le="0.25"}}'] == 2
    assert first[f'{name}_bucket{{le="+Inf"}}'] == 2
    values += [0.005, 100.0]  # a bound itself counts in its bucket (le: less or equal)
    second = scrape(metrics)
    assert second[f'{name}_bucket{{le="0.005"}}'] == 2
    assert second[f'{name}_bucket{{le="30.0"}}'] == 3
    assert second[f'{name}_bucket{{le="+Inf"}}'] == 4
    assert second[f"{name}_count"] == 4
    assert second[f"{name}_sum"] == pytest.approx(100.208)


def test_load_collector_reads_the_tally() -> None:
    generator = LoadGenerator(RecordingPublisher(), CPChooser(random.Random(1)),
                              rate=1, duration=1, seed=1)
    tally = generator.tally
    for _ in range(3):
        tally.arrival()
    tally.request_sent()
    tally.request_sent()
    tally.request_accepted(0.012)
    tally.request_ended(Outcome.COMPLETED, latency=10.5)
    tally.request_ended(Outcome.DENIED, latency=0.01, reason="CP busy")
    tally.request_ended(Outcome.NO_FREE_CP)
    got = scrape(load_metrics(generator))
    assert got[PREFIX + "load_arrivals_total"] == 3
    assert got[PREFIX + "load_requests_sent_total"] == 2
    assert got[f'{PREFIX}load_outcomes_total{{outcome="completed"}}'] == 1
    assert got[f'{PREFIX}load_outcomes_total{{outcome="no_free_cp"}}'] == 1
    assert got[f'{PREFIX}load_outcomes_total{{outcome="timed_out"}}'] == 0
    assert got[f'{PREFIX}load_denied_total{{reason="CP busy"}}'] == 1
    assert got[PREFIX + "load_open_requests"] == 0
    assert got[PREFIX + "load_accept_latency_seconds_count"] == 1
    assert got[PREFIX + "load_final_latency_seconds_count"] == 2
    assert got[f'{PREFIX}load_final_latency_seconds_bucket{{le="10.0"}}'] == 1
    assert not math.isnan(got[PREFIX + "load_final_latency_seconds_sum"])


async def test_metrics_need_no_token_even_when_central_has_one(
    bus: RecordingPublisher, file_repo: SqliteRepository
) -> None:
    """Protected mode guards mutating calls: Prometheus scrapes without the API token, from
    any address (as it does from its own container)."""
    controller = Controller(bus, file_repo)
    app = create_api(controller, api_token="s3cret", trusted_peer=lambda host: False)
    mount_metrics(app, central_metrics(controller, file_repo, process=False))
    transport = httpx.ASGITransport(app, client=("10.1.2.3", 5555))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://central") as c:
            answer = await c.get("/metrics")
            assert answer.status_code == 200
            assert PREFIX + "cps_unmonitored" in parse(answer.text)
            refused = await c.post("/cp/register", json={"cp_id": "CP-1"})
            assert refused.status_code == 401  # the token still guards the changes
    finally:
        await controller.close()
