"""The CP Fleet (ev_fleet) without a broker: ids and sites, command routing, the in-process
monitoring against the real Central API (in process), the random-fault schedule, the HTTP
routes, the settings and the run's lifecycle (Kafka replaced by a fake)."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger

from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.apps.ev_cp_m.watch import (
    RECOVERY_REASON,
    STARTUP_HEALTHY_REASON,
    Change,
    Failure,
    HealthView,
    Watch,
)
from evcharging.apps.ev_fleet import main as fleet_main
from evcharging.apps.ev_fleet.api import FleetParts, create_fleet_app
from evcharging.apps.ev_fleet.central import CentralClient, Outcome, batches
from evcharging.apps.ev_fleet.faults import (
    RANDOM_FAULT_REASON,
    Action,
    FaultPlan,
    FaultStats,
    inject_faults,
)
from evcharging.apps.ev_fleet.fleet import Fleet
from evcharging.apps.ev_fleet.monitoring import FleetMonitor, check
from evcharging.apps.ev_fleet.plan import PLACES, fleet_plan, site_place
from evcharging.common.config import CPEngineSettings
from evcharging.common.kafka import BusStats
from evcharging.common.messages import (
    CentralCommand,
    CommandPayload,
    CommandType,
    CPRegistration,
    CPStatus,
    FleetMonitorEntry,
    Message,
    StatusEvent,
)
from evcharging.common.service import HttpServer, TaskOwner
from evcharging.common.states import CPState
from tests.polling import poll
from tests.unit.fakes import RecordingPublisher
from tests.unit.fakes_http import CENTRAL_HOST, CENTRAL_PORT, Central, CentralFront
from tests.unit.http_helpers import AUTH, JSON, REMOTE, TOKEN, assert_error, client_for

CENTRAL_URL = f"http://{CENTRAL_HOST}:{CENTRAL_PORT}"


def engine_settings(**overrides: Any) -> CPEngineSettings:
    values: dict[str, Any] = {
        "cp_id": "CP-00001", "kw_rate": 22.0, "euro_rate": 0.30, "session_seconds": 30.0,
        "telemetry_interval": 10.0, "status_interval": 60.0, "api_token": None,
    }
    values.update(overrides)
    return CPEngineSettings(_env_file=None, **values)


def make_fleet(
    count: int = 3, publisher: Any = None, *, sites: int = 1, **engine: Any
) -> Fleet:
    return Fleet(
        fleet_plan("CP-", 1, count, sites), publisher or RecordingPublisher(),
        engine_settings(**engine), rng=random.Random(7),
    )


def command(cp_id: str, cmd: CommandType, **payload: str) -> CentralCommand:
    return CentralCommand(cp_id=cp_id, cmd=cmd, payload=CommandPayload(**payload))


def start_supply(cp_id: str, session: str = "s-1") -> CentralCommand:
    return command(cp_id, CommandType.START_SUPPLY, driver_id="d-1", session_id=session)


@pytest.fixture
def logs() -> Iterator[list[tuple[str, str]]]:
    records: list[tuple[str, str]] = []
    sink_id = logger.add(
        lambda m: records.append((m.record["level"].name, m.record["message"])),
        level="DEBUG", format="{message}", filter="evcharging.apps.ev_fleet",
    )
    yield records
    logger.remove(sink_id)


# --------------------------------------------------------------------------- ids and sites


def test_ids_are_the_prefix_and_five_digits_from_first() -> None:
    assert [s.cp_id for s in fleet_plan("CP-", 1, 3)] == ["CP-00001", "CP-00002", "CP-00003"]
    assert [s.cp_id for s in fleet_plan("X.", 5001, 2)] == ["X.05001", "X.05002"]
    assert fleet_plan("CP-", 1, 100_000)[-1].cp_id == "CP-100000"


def test_two_fleets_split_a_network_without_overlap() -> None:
    first = {s.cp_id for s in fleet_plan("CP-", 1, 5000)}
    second = {s.cp_id for s in fleet_plan("CP-", 5001, 5000)}
    assert len(first) == len(second) == 5000
    assert not first & second
    assert max(first) == "CP-05000" and min(second) == "CP-05001"


def test_sites_are_consecutive_blocks_of_even_size_with_a_location_each() -> None:
    specs = fleet_plan("CP-", 1, 10, sites=3)
    assert [s.site for s in specs] == ["site-01"] * 4 + ["site-02"] * 3 + ["site-03"] * 3
    assert [s.location for s in specs[:5]] == [
        f"{PLACES[0]}, bay 1", f"{PLACES[0]}, bay 2", f"{PLACES[0]}, bay 3",
        f"{PLACES[0]}, bay 4", f"{PLACES[1]}, bay 1",
    ]
    assert {s.site for s in fleet_plan("CP-", 1, 10)} == {"site-01"}
    assert fleet_plan("CP-", 1, 2, site_prefix="north-")[0].site == "north-01"


def test_site_places_come_round_again_numbered() -> None:
    assert site_place(1) == PLACES[0]
    assert site_place(len(PLACES)) == PLACES[-1]
    assert site_place(len(PLACES) + 1) == f"{PLACES[0]} 2"
    specs = fleet_plan("CP-", 1, 200, sites=100)
    assert len({s.location for s in specs}) == 200
    assert len({s.site for s in specs}) == 100


@pytest.mark.parametrize(("prefix", "first", "count"), [
    ("CP ", 1, 3), ("X" * 60, 1, 1), ("CP-", 1, 0), ("CP-", -1, 2),
])
def test_an_id_that_would_be_invalid_is_refused(prefix: str, first: int, count: int) -> None:
    with pytest.raises(ValueError):
        fleet_plan(prefix, first, count)


# --------------------------------------------------------------------------- command routing


async def test_each_command_reaches_its_cp_only() -> None:
    publisher = RecordingPublisher()
    fleet = make_fleet(3, publisher)
    await fleet.connect()
    assert fleet.counts()["ACTIVATED"] == 3
    await fleet.handle_command(start_supply("CP-00002"))
    await fleet.drain()
    assert [cp.state for cp in fleet.cps.values()] == [
        CPState.ACTIVATED, CPState.SUPPLYING, CPState.ACTIVATED
    ]
    assert fleet.cps["CP-00002"].session_id == "s-1"
    assert fleet.stats.commands == 1
    await fleet.stop()


async def test_a_command_for_an_unknown_id_is_counted_and_ignored() -> None:
    publisher = RecordingPublisher()
    fleet = make_fleet(2, publisher)
    await fleet.connect()
    before = len(publisher.messages)
    await fleet.handle_command(start_supply("CP-99999"))
    await fleet.handle_command(command("other-1", CommandType.STOP_CP))
    await fleet.drain()
    assert fleet.stats.unknown_commands == 2
    assert fleet.stats.commands == 0
    assert len(publisher.messages) == before  # no CP said anything
    assert fleet.counts()["ACTIVATED"] == 2
    await fleet.stop()


async def test_commands_of_one_cp_keep_their_order() -> None:
    publisher = RecordingPublisher()
    fleet = make_fleet(1, publisher)
    await fleet.connect()
    since = len(publisher.messages)
    for cmd in (start_supply("CP-00001", "s-1"),
                command("CP-00001", CommandType.STOP_SUPPLY, session_id="s-1"),
                command("CP-00001", CommandType.STOP_CP),
                command("CP-00001", CommandType.RESUME_CP),
                start_supply("CP-00001", "s-2")):
        await fleet.handle_command(cmd)
    await fleet.drain()
    events = [m.event for m in publisher.of(CPStatus, since)]
    assert events == [StatusEvent.START_SUPPLY, StatusEvent.STOP_SUPPLY, StatusEvent.STOP_CP,
                      StatusEvent.RESUME_CP, StatusEvent.START_SUPPLY]
    assert fleet.cps["CP-00001"].session_id == "s-2"
    await fleet.stop()


class HoldingPublisher(RecordingPublisher):
    """Holds every publish of `held` (a CP id) until `release` is set."""

    def __init__(self, held: str) -> None:
        super().__init__()
        self.held = held
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def publish(self, message: Message, *, wait: bool = True) -> None:
        if getattr(message, "cp_id", None) == self.held and not self.release.is_set():
            self.holding.set()
            await self.release.wait()
        await super().publish(message, wait=wait)


async def test_a_stuck_cp_does_not_hold_up_the_commands_of_the_others() -> None:
    publisher = HoldingPublisher("CP-00001")
    publisher.release.set()
    fleet = make_fleet(2, publisher)
    await fleet.connect()
    publisher.release.clear()
    await fleet.handle_command(start_supply("CP-00001", "s-1"))
    await asyncio.wait_for(publisher.holding.wait(), 2)
    await fleet.handle_command(start_supply("CP-00002", "s-2"))
    await publisher.wait_for(CPStatus, lambda s: s.cp_id == "CP-00002"
                             and s.event is StatusEvent.START_SUPPLY)
    assert fleet.cps["CP-00002"].state is CPState.SUPPLYING
    publisher.release.set()
    await fleet.drain()
    assert fleet.cps["CP-00001"].state is CPState.SUPPLYING
    await fleet.stop()


async def test_shutdown_stops_one_cp_and_the_fleet_goes_on(logs: list[tuple[str, str]]) -> None:
    fleet = make_fleet(2)
    await fleet.connect()
    await fleet.handle_command(command("CP-00001", CommandType.SHUTDOWN))
    await fleet.drain()
    assert fleet.cps["CP-00001"].closed
    assert fleet.cps["CP-00001"].state is CPState.DISCONNECTED
    assert fleet.cps["CP-00002"].state is CPState.ACTIVATED
    assert fleet.stats.shutdowns == 1
    assert any("shut down by Central" in m for _, m in logs)
    await fleet.stop()


async def test_connect_and_stop_go_in_batches_with_progress(
    logs: list[tuple[str, str]],
) -> None:
    publisher = RecordingPublisher()
    fleet = make_fleet(25, publisher)
    await fleet.connect(batch=4, every=0.0)
    assert fleet.counts()["ACTIVATED"] == 25
    progress = [m for _, m in logs if m.endswith("CPs connected")]
    assert progress[0] == "4/25 CPs connected"
    assert "25/25 CPs connected in" in logs[-1][1]
    await fleet.handle_command(start_supply("CP-00003"))
    await fleet.drain()
    await fleet.stop(batch=10, every=0.0)
    assert fleet.counts()["DISCONNECTED"] == 25
    ends = publisher.of(CPStatus, 0)
    stopped = [s for s in ends if s.cp_id == "CP-00003" and s.session_result is not None]
    assert stopped and stopped[-1].session_result == "STOPPED"
    await fleet.stop()  # twice is fine


async def test_heartbeats_are_spread_over_the_interval() -> None:
    fleet = make_fleet(200, status_interval=5.0)
    phases = [cp.first_heartbeat for cp in fleet.cps.values()]
    assert all(0.0 <= p <= 5.0 for p in phases)
    assert min(phases) < 0.5 and max(phases) > 4.5  # not all at once
    assert len(set(phases)) == 200


# --------------------------------------------------------------------------- in-process checks


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_check_passes_for_a_working_cp_and_fails_in_fault_with_its_reason() -> None:
    cp = ChargingPoint("CP-1", RecordingPublisher(), status_interval=60)
    assert check(cp, 30) == Failure("the CP's engine is not connected")
    await cp.start()
    assert check(cp, 30) is None
    await cp.fault("overheating")
    assert check(cp, 30) == Failure("CP reports FAULT: overheating", cp_reports_fault=True)
    await cp.recover()
    assert check(cp, 30) is None
    await cp.stop()
    assert check(cp, 30) == Failure("the CP's engine is stopped")


async def test_a_cp_whose_heartbeat_is_stuck_fails_its_checks_until_it_beats_again() -> None:
    clock = Clock()
    publisher = HoldingPublisher("CP-1")
    publisher.release.set()
    cp = ChargingPoint("CP-1", publisher, status_interval=0.05, clock=clock)
    await cp.start()
    publisher.release.clear()  # the next heartbeat's publish does not return
    await asyncio.wait_for(publisher.holding.wait(), 2)
    clock.now += 29
    assert check(cp, 30) is None
    clock.now += 2
    failure = check(cp, 30)
    assert failure is not None and failure.reason == "no heartbeat for 31 s (the CP is stuck)"
    publisher.release.set()
    await poll(lambda: check(cp, 30) is None, timeout=2, what="the next heartbeat")
    await cp.stop()


async def test_a_publish_waiting_for_a_slow_broker_does_not_make_a_cp_stuck() -> None:
    clock = Clock()
    publisher = HoldingPublisher("CP-1")
    publisher.release.set()
    cp = ChargingPoint("CP-1", publisher, status_interval=0.05, clock=clock)
    await cp.start()
    clock.now += 20  # the last heartbeat went out 20 s ago; the next one's publish waits
    publisher.release.clear()
    publisher.holding.clear()
    await asyncio.wait_for(publisher.holding.wait(), 2)
    clock.now += 20
    assert cp.heartbeat_age == 40 and cp.publish_waiting == 20
    assert check(cp, 30) is None  # the bus's delay, not the CP's
    clock.now += 11
    failure = check(cp, 30)  # a publish that never returns is stuck too
    assert failure is not None and failure.reason == "no heartbeat for 51 s (the CP is stuck)"
    publisher.release.set()
    await poll(lambda: check(cp, 30) is None, timeout=2, what="the heartbeat to go out")
    assert cp.publish_waiting is None
    await cp.stop()


class CrashingPublisher(RecordingPublisher):
    """A bug in the publishing path: heartbeats raise something the engine does not expect."""

    async def publish(self, message: Message, *, wait: bool = True) -> None:
        if isinstance(message, CPStatus) and message.event is StatusEvent.HEARTBEAT:
            raise RuntimeError("boom")
        await super().publish(message, wait=wait)


async def test_a_cp_whose_task_crashed_fails_its_checks() -> None:
    cp = ChargingPoint("CP-1", CrashingPublisher(), status_interval=0.01)
    await cp.start()
    await poll(lambda: cp.crashed, timeout=2, what="the heartbeat to crash")
    failure = check(cp, 30)
    assert failure is not None
    assert failure.reason.startswith("engine task CP-1-heartbeat crashed: RuntimeError('boom')")
    await cp.stop()


async def test_the_bus_being_down_is_not_a_failure_of_the_cp() -> None:
    publisher = RecordingPublisher()
    cp = ChargingPoint("CP-1", publisher, status_interval=0.01)
    await cp.start()
    publisher.fail = True  # BusError: logged once by the engine, not a crash
    await poll(lambda: publisher.failures >= 3, timeout=2, what="failed heartbeats")
    assert cp.crashed is None and check(cp, 30) is None
    await cp.stop()


async def test_the_monitoring_says_once_for_all_cps_that_they_cannot_publish(
    network: Network, logs: list[tuple[str, str]]
) -> None:
    publisher = RecordingPublisher()
    fleet = make_fleet(3, publisher, status_interval=0.01)
    await fleet.connect()
    monitor = monitoring(fleet, network)
    engine_errors: list[str] = []
    sink = logger.add(lambda m: engine_errors.append(m.record["message"]), level="ERROR",
                      filter="evcharging.apps.ev_cp_e")
    publisher.fail = True
    await poll(lambda: fleet.publish_failing() == 3, timeout=2, what="failed heartbeats")
    await monitor.check_round()
    await monitor.check_round()
    assert monitor.views()["HEALTHY"] == 3  # Kafka being down is not the CPs' fault
    publisher.fail = False
    await poll(lambda: fleet.publish_failing() == 0, timeout=2, what="heartbeats again")
    await monitor.check_round()
    errors = [m for level, m in logs if level == "ERROR"]
    assert errors == ["3 of 3 CPs cannot publish on Kafka (their messages are lost until it "
                      "works again; the heartbeats repair Central's view)"]
    assert [m for _, m in logs if "publishes on Kafka again" in m] == [
        "every CP publishes on Kafka again"
    ]
    logger.remove(sink)
    assert engine_errors == []  # each CP logs it at DEBUG only
    await fleet.stop()


# --------------------------------------------------------------------------- the decisions


def test_watch_threshold_failures_make_one_fault_report() -> None:
    watch = Watch("CP-1", 3, central_believes_faulty=False)
    assert watch.passed().change is Change.FIRST_HEALTHY
    assert watch.pending is None  # Central is known to hold it healthy: nothing to say
    failing = Failure("connection refused")
    assert watch.failed(failing).change is Change.FAILING
    assert watch.failed(failing).change is Change.STILL_FAILING
    assert watch.pending is None and watch.view is HealthView.FAILING
    step = watch.failed(failing)
    assert step.change is Change.FAULT and step.level == "WARNING"
    assert watch.pending is not None
    assert watch.pending.model_dump() == {
        "cp_id": "CP-1", "is_faulty": True,
        "reason": "health check failed 3 times: connection refused",
    }
    report = watch.pending
    assert watch.failed(failing).change is Change.STILL_FAULT
    assert watch.pending is report  # one report per fault
    watch.delivered(report)
    assert watch.pending is None and watch.central_believes_faulty is True


def test_watch_recovery_after_a_fault_and_nothing_after_fewer_failures() -> None:
    watch = Watch("CP-1", 2, central_believes_faulty=False)
    watch.passed()
    watch.failed(Failure("x"))
    assert watch.passed().change is Change.PASSED_AGAIN
    assert watch.pending is None
    watch.failed(Failure("CP reports FAULT: overheating", cp_reports_fault=True))
    watch.failed(Failure("CP reports FAULT: overheating", cp_reports_fault=True))
    assert watch.pending is not None and watch.pending.reason == "CP reports FAULT: overheating"
    watch.delivered(watch.pending)
    step = watch.passed()
    assert step.change is Change.RECOVERED
    assert watch.pending is not None
    assert (watch.pending.is_faulty, watch.pending.reason) == (False, RECOVERY_REASON)


def test_watch_newest_report_wins_and_what_central_knows_is_not_sent() -> None:
    watch = Watch("CP-1", 1)  # Central's view unknown: the first pass is reported
    watch.passed()
    assert watch.pending is not None and watch.pending.reason == STARTUP_HEALTHY_REASON
    startup = watch.pending
    step = watch.failed(Failure("x"))
    assert step.superseded is startup
    assert watch.pending is not None and watch.pending.is_faulty
    watch.not_delivered()
    watch.central_holds(True)  # read from Central: it already holds the fault
    assert watch.pending is None
    watch.passed()
    assert watch.pending is not None and not watch.pending.is_faulty
    watch.dropped(watch.pending)
    assert watch.pending is None


# --------------------------------------------------------------------------- the monitoring


class Network:
    """Central's real API (in process) behind a front; the fleet's CentralClient uses it."""

    def __init__(self, front: CentralFront) -> None:
        self.front = front
        self.http = httpx.AsyncClient(transport=httpx.MockTransport(front.handle))

    def client(self, token: str | None = None) -> CentralClient:
        return CentralClient(CENTRAL_URL, token, client=self.http)

    def calls(self, path: str) -> list[httpx.Request]:
        return [r for r in self.front.calls if r.url.path == path]

    def liveness(self) -> list[tuple[httpx.Request, int | None]]:
        return self.front.liveness


@pytest.fixture
async def network() -> AsyncIterator[Network]:
    front = CentralFront(await Central().open())
    net = Network(front)
    yield net
    await net.http.aclose()
    await front.central.close()


def registration(fleet: Fleet) -> Any:
    def make(cp_id: str) -> CPRegistration:
        spec = fleet.specs[cp_id]
        return CPRegistration(cp_id=cp_id, site=spec.site, location=spec.location,
                              kw_rate=22.0, euro_rate=0.3,
                              health_url=f"http://fleet.test/cp/{cp_id}/health")
    return make


def monitoring(fleet: Fleet, net: Network, threshold: int = 2, **options: Any) -> FleetMonitor:
    options.setdefault("retry_initial", 0.01)
    options.setdefault("retry_max", 0.05)
    return FleetMonitor(fleet, net.client(options.pop("token", None)), registration(fleet),
                        health_interval=options.pop("health_interval", 0.05),
                        failure_threshold=threshold, stall_after=30.0, **options)


async def test_registration_sends_every_cp_in_one_call_with_sites_and_locations(
    network: Network,
) -> None:
    fleet = make_fleet(10, sites=2)
    monitor = monitoring(fleet, network)
    assert await monitor.register(timeout=2)
    assert len(network.calls("/fleet/register")) == 1
    cp = network.front.controller.get("CP-00007")
    assert (cp.site, cp.location) == ("site-02", f"{PLACES[1]}, bay 2")
    assert cp.health_url == "http://fleet.test/cp/CP-00007/health"
    assert monitor.registered


async def test_liveness_is_one_call_per_interval_for_every_cp(network: Network) -> None:
    fleet = make_fleet(50)
    await fleet.connect()
    monitor = monitoring(fleet, network)
    await monitor.register(timeout=2)
    await monitor.check_round()
    assert await monitor.report_liveness() is Outcome.OK
    (request, status), = network.liveness()
    assert (request.url.path, status) == ("/fleet/monitor", 200)
    body = json.loads(request.content)
    assert body["interval"] == 0.05 and len(body["cps"]) == 50
    assert all(entry["healthy"] for entry in body["cps"])
    assert all(network.front.controller.get(i).monitored for i in fleet.ids)
    await fleet.stop()


async def test_a_fault_is_reported_after_the_threshold_and_its_recovery_after_it(
    network: Network,
) -> None:
    fleet = make_fleet(5)
    await fleet.connect()
    monitor = monitoring(fleet, network, threshold=3)
    await monitor.register(timeout=2)
    await monitor.check_round()
    assert await monitor.deliver_reports()
    assert network.front.reports == []  # Central knew they were not faulty
    cp = fleet.cps["CP-00004"]
    await cp.fault("overheating")
    for _ in range(2):
        await monitor.check_round()
        await monitor.deliver_reports()
    assert network.front.reports == []  # 2 failures of 3
    await monitor.check_round()
    assert await monitor.deliver_reports()
    assert network.front.reports == [
        {"cp_id": "CP-00004", "is_faulty": True, "reason": "CP reports FAULT: overheating"}
    ]
    central_cp = network.front.controller.get("CP-00004")
    assert central_cp.is_faulty and central_cp.fault_reason == "CP reports FAULT: overheating"
    for _ in range(3):
        await monitor.check_round()
        await monitor.deliver_reports()
    assert len(network.front.reports) == 1  # one report per fault
    await cp.recover()
    await monitor.check_round()
    assert await monitor.deliver_reports()
    assert network.front.reports[-1] == {
        "cp_id": "CP-00004", "is_faulty": False, "reason": RECOVERY_REASON
    }
    assert not network.front.controller.get("CP-00004").is_faulty
    assert monitor.stats.fault_reports_sent == monitor.stats.recovery_reports_sent == 1
    await monitor.check_round()
    await monitor.report_liveness()
    body = json.loads(network.liveness()[-1][0].content)
    assert all(entry["healthy"] for entry in body["cps"])
    await fleet.stop()


async def test_a_restarted_fleet_sends_recoveries_only_for_what_central_holds_faulty(
    network: Network,
) -> None:
    fleet = make_fleet(6)
    await network.front.controller.register(CPRegistration(cp_id="CP-00002"))
    await network.front.controller.report_fault("CP-00002", True, "left by an earlier run")
    await fleet.connect()
    monitor = monitoring(fleet, network)
    await monitor.register(timeout=2)
    await monitor.check_round()
    assert await monitor.deliver_reports()
    assert network.front.reports == [
        {"cp_id": "CP-00002", "is_faulty": False, "reason": STARTUP_HEALTHY_REASON}
    ]
    assert not network.front.controller.get("CP-00002").is_faulty
    await fleet.stop()


async def test_reports_are_retried_until_central_takes_them(
    network: Network, logs: list[tuple[str, str]]
) -> None:
    fleet = make_fleet(2)
    await fleet.connect()
    monitor = monitoring(fleet, network, threshold=1)
    await monitor.register(timeout=2)
    await monitor.check_round()
    network.front.up = False
    await fleet.cps["CP-00001"].fault("broken")
    await monitor.check_round()
    assert not await monitor.deliver_reports()
    assert not await monitor.deliver_reports()
    assert network.front.reports == []
    assert monitor.status()["pending_reports"] == 1
    network.front.up = True
    assert await monitor.deliver_reports()
    assert [r["cp_id"] for r in network.front.reports] == ["CP-00001"]
    assert monitor.status()["pending_reports"] == 0
    unreachable = [m for level, m in logs if level == "WARNING" and "unreachable" in m]
    assert len(unreachable) == 1  # an outage is logged once
    assert any("answers again" in m for _, m in logs)
    await fleet.stop()


async def test_the_loops_register_again_the_cps_central_forgot(network: Network) -> None:
    fleet = make_fleet(4, sites=2)
    await fleet.connect()
    monitor = monitoring(fleet, network)
    assert await monitor.register(timeout=2)
    async with TaskOwner("test") as tasks:
        monitor.start(tasks)
        await poll(lambda: len(network.liveness()) >= 2, timeout=5, what="liveness")
        await network.front.restart_empty()  # Central lost its registry
        await poll(lambda: "CP-00004" in network.front.controller.cps, timeout=5,
                   what="the CPs registered again")
        assert network.front.controller.get("CP-00004").site == "site-02"
        await poll(lambda: network.front.controller.get("CP-00001").monitored, timeout=5,
                   what="liveness again")
        await monitor.stop()
        assert not tasks.failed.is_set()
    registrations = network.calls("/fleet/register")
    # The first one, then at least one more; on a loaded machine a second liveness round
    # can list the CPs as unknown before the first re-registration lands (idempotent).
    assert len(registrations) >= 2
    await fleet.stop()


async def test_with_a_token_every_call_carries_it(network: Network) -> None:
    secured = await Central(TOKEN).open()
    network.front.serve(secured.app)
    try:
        fleet = make_fleet(2)
        await fleet.connect()
        refused = monitoring(fleet, network)
        assert not await refused.register(timeout=0.05)  # no token: 401, retried
        monitor = monitoring(fleet, network, token=TOKEN)
        assert await monitor.register(timeout=2)
        await monitor.check_round()
        await monitor.report_liveness()
        assert all(secured.controller.get(i).monitored for i in fleet.ids)
        calls = [*network.front.calls, *(r for r, _ in network.liveness())]
        with_token = [(r.method, r.url.path) for r in calls
                      if r.headers.get("Authorization") == f"Bearer {TOKEN}"]
        assert with_token == [("POST", "/fleet/register"), ("GET", "/cp"),
                              ("POST", "/fleet/monitor")]
        await fleet.stop()
    finally:
        await secured.close()


def test_big_fleets_are_sent_in_bodies_under_the_limit() -> None:
    entries = [FleetMonitorEntry(cp_id=f"CP-{i:05d}", healthy=True) for i in range(30_000)]
    groups = list(batches(entries))
    assert [len(g) for g in groups] == [20_000, 10_000]
    long = [CPRegistration(cp_id=f"CP-{i:05d}", location="x" * 100, site="site-01",
                           health_url="http://h/" + "p" * 200) for i in range(10_000)]
    groups = list(batches(long, max_bytes=700 * 1024))
    assert sum(len(g) for g in groups) == 10_000 and len(groups) > 1
    assert all(sum(len(e) + 1 for e in g) <= 700 * 1024 for g in groups)


# --------------------------------------------------------------------------- random faults


def schedule(seed: int, horizon: float = 600.0) -> list[tuple[float, Action, str]]:
    ids = [f"CP-{i:05d}" for i in range(1, 101)]
    plan = FaultPlan(ids, rate=3.6, repair_after=30.0, rng=random.Random(seed), now=0.0)
    happened: list[tuple[float, Action, str]] = []
    while (due := plan.next_due()) is not None and due <= horizon:
        for action, cp_id in plan.due(due):
            happened.append((round(due, 6), action, cp_id))
            if action is Action.FAULT:
                plan.faulted(cp_id, due)
    return happened


def test_the_fault_schedule_is_the_same_for_the_same_seed() -> None:
    assert schedule(42) == schedule(42)
    assert schedule(42) != schedule(43)


def test_faults_come_at_the_rate_and_each_is_repaired_after_its_delay() -> None:
    events = schedule(7, horizon=3600.0)
    faults = [(t, cp) for t, a, cp in events if a is Action.FAULT]
    repairs = [(t, cp) for t, a, cp in events if a is Action.REPAIR]
    # 3.6 faults per CP-hour over 100 CPs: 360 in an hour (Poisson: ± a few dozen).
    assert 300 < len(faults) < 420
    fault_times: dict[str, list[float]] = {cp: [] for _, cp in faults}
    for t, cp in faults:
        fault_times[cp].append(t)
    for t, cp in repairs:
        assert any(abs(t - (ft + 30.0)) < 1e-6 for ft in fault_times[cp])
    assert len(repairs) == len([t for t, _ in faults if t + 30.0 <= 3600.0])


def test_no_rate_no_faults() -> None:
    plan = FaultPlan(["CP-1"], rate=0.0, repair_after=30.0, rng=random.Random(1), now=0.0)
    assert plan.next_due() is None
    assert plan.due(1e9) == []


async def test_random_faults_break_and_repair_cps_and_the_monitoring_reports_them(
    network: Network,
) -> None:
    fleet = make_fleet(2)
    await fleet.connect()
    loop = asyncio.get_running_loop()
    plan = FaultPlan(fleet.ids, rate=3600.0 * 5, repair_after=0.2, rng=random.Random(3),
                     now=loop.time())
    stats = FaultStats()
    monitor = monitoring(fleet, network, threshold=1)
    await monitor.register(timeout=2)
    async with TaskOwner("test") as tasks:
        monitor.start(tasks)
        tasks.spawn(inject_faults(fleet, plan, stats), "faults", forever=True)
        await poll(lambda: stats.repaired >= 2, timeout=10, what="two repairs")
        await poll(lambda: monitor.stats.recovery_reports_sent >= 1, timeout=10,
                   what="a recovery reported")
        await monitor.stop()
    faults = [r for r in network.front.reports if r["is_faulty"]]
    assert faults and faults[0]["reason"] == f"CP reports FAULT: {RANDOM_FAULT_REASON}"
    await fleet.stop()


async def test_a_repair_leaves_alone_a_fault_someone_else_caused() -> None:
    fleet = make_fleet(1)
    await fleet.connect()
    cp = fleet.cps["CP-00001"]
    loop = asyncio.get_running_loop()
    plan = FaultPlan(fleet.ids, rate=0.0, repair_after=0.01, rng=random.Random(1),
                     now=loop.time())
    stats = FaultStats()
    await cp.fault("operator test")
    plan.faulted("CP-00001", loop.time())  # as if a random fault had been there
    task = asyncio.create_task(inject_faults(fleet, plan, stats))
    await poll(lambda: plan.next_due() is None, timeout=2, what="the repair to be due")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert cp.state is CPState.FAULT and stats.repaired == 0
    await fleet.stop()


# --------------------------------------------------------------------------- HTTP


def app_for(fleet: Fleet, **options: Any) -> Any:
    parts = FleetParts(fleet, 30.0, bus=BusStats(produced=5),
                       kafka_connected=options.pop("kafka", lambda: True))
    return create_fleet_app(parts, **options)


async def test_cp_health_is_200_503_in_fault_and_404_for_an_unknown_id() -> None:
    fleet = make_fleet(2)
    await fleet.connect()
    async with client_for(app_for(fleet)) as client:
        ok = await client.get("/cp/CP-00001/health")
        assert ok.status_code == 200
        body = ok.json()
        assert {k: body[k] for k in ("cp_id", "state", "session_id", "status")} == {
            "cp_id": "CP-00001", "state": "ACTIVATED", "session_id": None, "status": "ok"
        }
        assert_error(await client.get("/cp/CP-09999/health"), 404, "unknown_cp")
        await fleet.cps["CP-00002"].fault("overheating")
        fault = await client.get("/cp/CP-00002/health")
        assert fault.status_code == 503
        assert (fault.json()["state"], fault.json()["reason"]) == ("FAULT", "overheating")
        await fleet.cps["CP-00001"].stop()
        stopped = await client.get("/cp/CP-00001/health")
        assert stopped.status_code == 503
        assert stopped.json()["problem"] == "the CP's engine is stopped"
    await fleet.stop()


async def test_fault_and_recover_routes_change_the_cp_like_the_engines() -> None:
    fleet = make_fleet(2)
    await fleet.connect()
    async with client_for(app_for(fleet)) as client:
        faulted = await client.post("/cp/CP-00002/fault", json={"reason": "water ingress"})
        assert faulted.status_code == 200, faulted.text
        assert (faulted.json()["state"], faulted.json()["reason"]) == ("FAULT", "water ingress")
        assert fleet.cps["CP-00002"].state is CPState.FAULT
        assert fleet.cps["CP-00001"].state is CPState.ACTIVATED
        again = await client.post("/cp/CP-00002/fault")
        assert assert_error(again, 409, "not_allowed")["state"] == "FAULT"
        default = await client.post("/cp/CP-00001/fault")
        assert default.json()["reason"] == "simulated hardware fault"
        recovered = await client.post("/cp/CP-00002/recover")
        assert recovered.status_code == 200 and recovered.json()["state"] == "ACTIVATED"
        assert_error(await client.post("/cp/CP-00002/recover"), 409, "not_allowed")
        assert_error(await client.post("/cp/nope/recover"), 404, "unknown_cp")
        assert_error(await client.post("/cp/CP-00002/fault", json={"reason": ""}), 422,
                     "invalid_request")
    await fleet.stop()


async def test_protected_mode_without_a_token_accepts_changes_from_loopback_only() -> None:
    fleet = make_fleet(1)
    await fleet.connect()
    app = app_for(fleet)
    async with client_for(app, REMOTE) as remote:
        assert_error(await remote.post("/cp/CP-00001/fault"), 403, "forbidden")
        assert (await remote.get("/cp/CP-00001/health")).status_code == 200  # reads are open
    async with client_for(app) as local:
        form = await local.post("/cp/CP-00001/fault", content=b"reason=x",
                                headers={"content-type": "application/x-www-form-urlencoded"})
        assert_error(form, 415, "unsupported_media_type")
        big = await local.post("/cp/CP-00001/fault", content=b" " * (2 << 20), headers=JSON)
        assert_error(big, 413, "too_large")
        cross = await local.post("/cp/CP-00001/fault",
                                 headers={"Origin": "http://evil.test", "Host": "fleet.test"})
        assert_error(cross, 403, "forbidden")
    assert fleet.cps["CP-00001"].state is CPState.ACTIVATED
    async with client_for(app_for(fleet, allow_anonymous=True), REMOTE) as anonymous:
        assert (await anonymous.post("/cp/CP-00001/fault")).status_code == 200
    await fleet.stop()


async def test_with_a_token_every_change_needs_it() -> None:
    fleet = make_fleet(1)
    await fleet.connect()
    async with client_for(app_for(fleet, api_token=TOKEN)) as local:
        assert_error(await local.post("/cp/CP-00001/fault"), 401, "unauthorized")
        assert_error(await local.post("/cp/CP-09999/fault"), 401, "unauthorized")
    async with client_for(app_for(fleet, api_token=TOKEN), REMOTE) as remote:
        ok = await remote.post("/cp/CP-00001/fault", headers=AUTH)
        assert ok.status_code == 200
    await fleet.stop()


async def test_fleet_health_counts_states_and_says_503_while_kafka_is_down() -> None:
    fleet = make_fleet(3)
    await fleet.connect()
    await fleet.cps["CP-00003"].fault("x")
    kafka = {"up": True}
    async with client_for(app_for(fleet, kafka=lambda: kafka["up"])) as client:
        response = await client.get("/health")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ok" and body["cps"] == 3
        assert body["states"] == {"DISCONNECTED": 0, "ACTIVATED": 2, "SUPPLYING": 0,
                                  "STOPPED": 0, "FAULT": 1}
        assert body["bus"]["produced"] == 5 and body["kafka"] is True
        assert body["commands"] == {"commands": 0, "unknown_commands": 0, "shutdowns": 0}
        kafka["up"] = False
        down = await client.get("/health")
        assert down.status_code == 503 and down.json()["status"] == "kafka_down"
    await fleet.stop()


# --------------------------------------------------------------------------- settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)  # no .env
    for name in list(os.environ):
        if name.startswith(("FLEET_", "CP_ENGINE_", "CP_MONITOR_", "EVCHARGING_")):
            monkeypatch.delenv(name)
    return tmp_path


def test_seed_flags_work_and_flags_beat_variables_beat_defaults(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = ["--kafka-bootstrap", "localhost:9092", "--cps", "10000", "--id-prefix", "CP-",
            "--http-port", "8100", "--central-host", "localhost", "--central-port", "8000"]
    config = fleet_main.load_config(seed)
    assert (config.fleet.cps, config.fleet.id_prefix, config.fleet.http_port) == (
        10000, "CP-", 8100)
    assert config.fleet.http_host == "127.0.0.1" and config.first_id == "CP-00001"
    monkeypatch.setenv("FLEET_CPS", "7")
    monkeypatch.setenv("FLEET_SITES", "4")
    assert fleet_main.load_config([]).fleet.cps == 7
    assert fleet_main.load_config(["--cps", "5"]).fleet.cps == 5
    assert fleet_main.load_config(["--cps", "5"]).fleet.sites == 4
    (clean_env / ".env").write_text("FLEET_FAULT_RATE=2.5\nFLEET_CPS=9\n")
    config = fleet_main.load_config([])
    assert (config.fleet.fault_rate, config.fleet.cps) == (2.5, 7)  # variable beats .env
    monkeypatch.delenv("FLEET_CPS")
    assert fleet_main.load_config([]).fleet.cps == 9


def test_the_cps_follow_the_engine_and_monitor_settings(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CP_ENGINE_KW_RATE", "11")
    monkeypatch.setenv("CP_ENGINE_SESSION_SECONDS", "4")
    monkeypatch.setenv("CP_ENGINE_STATUS_INTERVAL", "2")
    monkeypatch.setenv("CP_ENGINE_CP_ID", "ignored")
    monkeypatch.setenv("CP_MONITOR_FAILURE_THRESHOLD", "5")
    monkeypatch.setenv("CP_MONITOR_HEALTH_INTERVAL", "1.5")
    monkeypatch.setenv("EVCHARGING_API_TOKEN", "shared")
    monkeypatch.setenv("CP_MONITOR_API_TOKEN", "to-central")
    config = fleet_main.load_config(["--cps", "3", "--first", "11"])
    assert config.engine.cp_id == config.monitor.cp_id == "CP-00011"
    assert (config.engine.kw_rate, config.engine.session_seconds) == (11.0, 4.0)
    assert (config.monitor.failure_threshold, config.monitor.health_interval) == (5, 1.5)
    assert config.engine.api_token is not None
    assert config.engine.api_token.get_secret_value() == "shared"
    assert config.monitor.api_token is not None
    assert config.monitor.api_token.get_secret_value() == "to-central"
    fleet = Fleet(fleet_plan("CP-", 11, 3), RecordingPublisher(), config.engine)
    cp = fleet.cps["CP-00013"]
    assert (cp.kw_rate, cp.session_seconds, cp.status_interval) == (11.0, 4.0, 2.0)


@pytest.mark.parametrize("argv", [
    ["--cps", "0"], ["--id-prefix", "C P"], ["--fault-rate", "-1"],
    ["--stall-after", "9"],  # not above twice the status interval (5 s)
    ["--sites", "0"], ["--http-port", "70000"], ["--repair-after", "0"],
])
def test_invalid_settings_exit_2_with_a_message(
    clean_env: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fleet_main.load_config(argv)
    assert exit_info.value.code == 2
    assert "invalid settings" in capsys.readouterr().err


def test_an_invalid_engine_setting_exits_2_naming_its_variable(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CP_ENGINE_KW_RATE", "-3")
    with pytest.raises(SystemExit) as exit_info:
        fleet_main.load_config([])
    assert exit_info.value.code == 2
    assert "CP_ENGINE_KW_RATE" in capsys.readouterr().err


def test_help_lists_every_flag_and_the_settings_the_cps_follow(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        fleet_main.load_config(["--help"])
    out = capsys.readouterr().out
    for flag in ("--kafka-bootstrap", "--cps", "--id-prefix", "--first", "--sites",
                 "--http-port", "--http-host", "--central-host", "--central-port",
                 "--fault-rate", "--repair-after", "--seed", "--allow-anonymous"):
        assert flag in out
    for variable in ("FLEET_CPS", "CP_ENGINE_KW_RATE", "CP_ENGINE_STATUS_INTERVAL",
                     "CP_ENGINE_API_TOKEN (or EVCHARGING_API_TOKEN)",
                     "CP_MONITOR_HEALTH_INTERVAL", "CP_MONITOR_FAILURE_THRESHOLD",
                     "CP_MONITOR_API_TOKEN"):
        assert variable in out


# --------------------------------------------------------------------------- the run


class FakeKafka:
    """Stands in for KafkaBus and KafkaConsumerLoop; records what the fleet does."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.published: list[Message] = []
        self.keys: list[str] | None = None
        self.commands: asyncio.Queue[CentralCommand] = asyncio.Queue()

    def bus(self, config: Any, stats: Any = None, **_: Any) -> Any:
        kafka = self

        class Bus:
            connected = True

            async def start(self) -> None:
                kafka.events.append("bus.start")

            async def stop(self) -> None:
                kafka.events.append("bus.stop")

            async def publish(self, message: Message, *, wait: bool = True) -> None:
                kafka.published.append(message)

        return Bus()

    def consumer(self, config: Any, routes: Any, *, keys: Any = None, **_: Any) -> Any:
        kafka = self
        kafka.keys = list(keys) if keys is not None else None

        class Consumer:
            async def start(self) -> None:
                kafka.events.append("consumer.start")

            async def run(self) -> None:
                handler = routes.handler(routes.topics[0])
                try:
                    while True:
                        await handler(await kafka.commands.get())
                except asyncio.CancelledError:
                    kafka.events.append("consumer.run cancelled")
                    raise

            async def stop(self) -> None:
                kafka.events.append("consumer.stop")

        return Consumer()

    def statuses(self, event: StatusEvent) -> list[CPStatus]:
        return [m for m in self.published if isinstance(m, CPStatus) and m.event is event]


async def test_run_connects_routes_and_stops_in_order(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, logs: list[tuple[str, str]]
) -> None:
    kafka = FakeKafka()
    monkeypatch.setattr(fleet_main, "KafkaBus", kafka.bus)
    monkeypatch.setattr(fleet_main, "KafkaConsumerLoop", kafka.consumer)
    central = await Central().open()
    central_http = HttpServer(central.app, "127.0.0.1", 0, name="central")
    await central_http.start()
    monkeypatch.setenv("CP_MONITOR_HEALTH_INTERVAL", "0.05")
    config = fleet_main.load_config([
        "--cps", "30", "--first", "101", "--sites", "3", "--http-port", "0",
        "--central-host", "127.0.0.1", "--central-port", str(central_http.port),
        "--connect-batch", "7",
    ])
    stop = asyncio.Event()
    running = asyncio.create_task(fleet_main.run(config, stop))
    try:
        await poll(lambda: len(kafka.statuses(StatusEvent.CONNECT)) == 30, timeout=10,
                   what="30 CPs connected")
        assert kafka.keys == [f"CP-{i:05d}" for i in range(101, 131)]
        assert central.controller.get("CP-00130").site == "site-03"
        await poll(lambda: all(central.controller.get(f"CP-{i:05d}").monitored
                               for i in range(101, 131)), timeout=10, what="liveness")
        health_url = central.controller.get("CP-00101").health_url
        assert health_url is not None
        async with httpx.AsyncClient() as client:
            answer = await client.get(health_url)
            assert answer.status_code == 200 and answer.json()["cp_id"] == "CP-00101"
        await kafka.commands.put(start_supply("CP-00105"))
        await kafka.commands.put(start_supply("CP-99999"))
        await poll(lambda: kafka.statuses(StatusEvent.START_SUPPLY), timeout=5,
                   what="the session to start")
    finally:
        stop.set()
        code = await asyncio.wait_for(running, 20)
        await central_http.stop()
        await central.close()
    assert code == 0
    assert len(kafka.statuses(StatusEvent.DISCONNECT)) == 30
    ended = [s for s in kafka.statuses(StatusEvent.STOP_SUPPLY) if s.cp_id == "CP-00105"]
    assert ended and ended[0].session_result == "STOPPED"
    assert kafka.events == ["bus.start", "consumer.start", "consumer.run cancelled",
                            "consumer.stop", "bus.stop"]
    lines = [m for _, m in logs]
    stopped_at = next(i for i, m in enumerate(lines) if "CPs stopped in" in m)
    assert any("30/30 CPs connected in" in m for m in lines[:stopped_at])
    assert lines[-1].startswith("CP Fleet stopped (30 DISCONNECTED)")


async def test_run_refuses_a_public_address_without_a_token(clean_env: Path) -> None:
    config = fleet_main.load_config(["--http-host", "0.0.0.0", "--cps", "1"])
    assert await fleet_main.run(config, asyncio.Event()) == 1
