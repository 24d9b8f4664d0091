"""Unit tests of the CP Monitor: a fake CP Engine, and the real Central API in process.

Central is the real app (``create_api`` over a ``Controller`` with an in-memory SQLite
repository) through ``httpx.ASGITransport`` (:mod:`tests.unit.fakes_http`), or served by
uvicorn on a free port where the monitor's own client and real sockets are the point. The
liveness report (``POST /cp/{cp_id}/monitor``) is tested against the real Central once,
and otherwise against a small app of the test's own (:class:`LivenessCentral`) that
records every report and answers as an older Central would (404/405 for the route).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from loguru import logger

from evcharging.apps.ev_cp_m.monitor import STARTUP_HEALTHY_REASON, HealthView, Monitor
from evcharging.common.config import CPMonitorSettings
from evcharging.common.service import HttpServer
from tests.polling import poll
from tests.unit.fakes_http import (
    CENTRAL_HOST,
    CENTRAL_PORT,
    ENGINE_HOST,
    ENGINE_PORT,
    Central,
    CentralFront,
    FakeEngine,
    FakeNetwork,
)

CP_ID = "CP-001"
INTERVAL = 0.01


def make_settings(**overrides: Any) -> CPMonitorSettings:
    values: dict[str, Any] = {
        "cp_id": CP_ID,
        "cp_e_host": ENGINE_HOST,
        "cp_e_port": ENGINE_PORT,
        "central_host": CENTRAL_HOST,
        "central_port": CENTRAL_PORT,
        "health_interval": INTERVAL,
        "health_timeout": 0.5,
        "failure_threshold": 3,
        "api_token": None,
    }
    values.update(overrides)
    return CPMonitorSettings(_env_file=None, **values)


class Started:
    """A started monitor on a fake network; stopped (and checked) on exit."""

    def __init__(
        self, net: FakeNetwork, *, liveness_retry: float = 60.0, **settings: Any
    ) -> None:
        self.net = net
        self.client = net.client()
        self.monitor = Monitor(
            make_settings(**settings), self.client, retry_initial=0.01, retry_max=0.05,
            liveness_retry=liveness_retry,
        )

    async def __aenter__(self) -> Monitor:
        await self.monitor.start()
        return self.monitor

    async def __aexit__(self, *exc: object) -> None:
        await self.monitor.stop()
        assert not self.monitor.running
        assert not self.client.is_closed  # an injected client belongs to the caller
        await self.client.aclose()


@pytest.fixture
def logs() -> Iterator[list[tuple[str, str]]]:
    """(level, message) of every log line of the monitor (not Central's) while the test runs."""
    records: list[tuple[str, str]] = []
    sink_id = logger.add(
        lambda m: records.append((m.record["level"].name, m.record["message"])),
        level="DEBUG",
        format="{message}",
        filter="evcharging.apps.ev_cp_m",
    )
    yield records
    logger.remove(sink_id)


MakeNet = Callable[..., Awaitable[FakeNetwork]]


@pytest.fixture
async def make_net() -> AsyncIterator[MakeNet]:
    """Networks with a real Central (its API token as given); Centrals closed at the end."""
    fronts: list[CentralFront] = []

    async def make(engine: FakeEngine | None = None, token: str | None = None) -> FakeNetwork:
        front = CentralFront(await Central(token).open())
        fronts.append(front)
        return FakeNetwork(engine or FakeEngine(), front)

    yield make
    for front in fronts:
        await front.central.close()


@pytest.fixture
async def net(make_net: MakeNet) -> FakeNetwork:
    return await make_net()


# ----------------------------------------------------------------- checks and reports


async def test_healthy_cp_registers_and_says_so_once(net: FakeNetwork) -> None:
    async with Started(net) as monitor:
        await net.wait_for(lambda: monitor.stats.checks >= 10, what="10 checks")
        await net.wait_for(lambda: monitor.stats.reports_sent >= 1, what="the first report")
        assert monitor.registered
        assert monitor.view is HealthView.HEALTHY
        health_url = f"http://{ENGINE_HOST}:{ENGINE_PORT}/health"
        assert net.central.registrations == [{"cp_id": CP_ID, "health_url": health_url}]
        # One "healthy" report at start, so that a fault left by an earlier run of the
        # monitor is cleared; nothing after it while the CP stays healthy.
        assert net.central.reports == [
            {"cp_id": CP_ID, "is_faulty": False, "reason": STARTUP_HEALTHY_REASON}
        ]
        assert monitor.stats.failures == 0
        assert monitor.stats.reports_sent == 1
        cp = net.central.controller.get(CP_ID)
        assert cp.health_url == health_url and not cp.is_faulty


async def test_threshold_reached_sends_exactly_one_fault_report(
    net: FakeNetwork, logs: list[tuple[str, str]]
) -> None:
    net.engine.mode = "refused"
    async with Started(net) as monitor:
        await net.wait_for(lambda: len(net.central.reports) >= 1, what="a fault report")
        checks_then = net.engine.checks
        await net.wait_for(lambda: net.engine.checks >= checks_then + 10, what="more checks")
        reason = "health check failed 3 times: connection refused"
        assert net.central.reports == [{"cp_id": CP_ID, "is_faulty": True, "reason": reason}]
        assert monitor.view is HealthView.FAULT
        assert monitor.stats.fault_reports_sent == 1
        assert monitor.stats.reports_sent == 1
        assert monitor.stats.failures == monitor.stats.checks
        cp = net.central.controller.get(CP_ID)
        assert cp.is_faulty and cp.fault_reason == reason
    infos = [msg for level, msg in logs if level in ("INFO", "WARNING")]
    assert any("health check failed (1/3)" in m for m in infos)
    assert any("is faulty" in m for m in infos)
    assert any("fault report delivered" in m for m in infos)


async def test_failures_below_threshold_report_nothing(net: FakeNetwork) -> None:
    net.engine.script = ["timeout", "timeout", "ok", "refused", "error500", "ok", "fault", "ok"]
    async with Started(net) as monitor:
        await net.wait_for(lambda: net.engine.checks >= 15, what="15 checks")
        assert monitor.stats.failures == 5
        assert monitor.view is HealthView.HEALTHY
    assert net.central.reports == []
    assert not net.central.controller.get(CP_ID).is_faulty


async def test_recovery_sends_exactly_one_recovery_report(net: FakeNetwork) -> None:
    net.engine.mode = "fault"
    async with Started(net) as monitor:
        await net.wait_for(lambda: len(net.central.reports) == 1, what="a fault report")
        assert net.central.reports[0]["reason"] == "CP reports FAULT: overheating"
        assert net.central.controller.get(CP_ID).is_faulty
        net.engine.mode = "ok"
        await net.wait_for(lambda: len(net.central.reports) == 2, what="a recovery report")
        checks_then = net.engine.checks
        await net.wait_for(lambda: net.engine.checks >= checks_then + 10, what="more checks")
        assert net.central.reports[1] == {
            "cp_id": CP_ID,
            "is_faulty": False,
            "reason": "health checks pass again",
        }
        assert len(net.central.reports) == 2
        assert monitor.stats.recovery_reports_sent == 1
        assert monitor.view is HealthView.HEALTHY
        assert not net.central.controller.get(CP_ID).is_faulty


async def test_second_fault_after_recovery_is_reported_again(net: FakeNetwork) -> None:
    net.engine.mode = "error500"
    async with Started(net, failure_threshold=2):
        await net.wait_for(lambda: len(net.central.reports) == 1, what="first fault")
        net.engine.mode = "ok"
        await net.wait_for(lambda: len(net.central.reports) == 2, what="recovery")
        net.engine.mode = "fault"
        net.engine.fault_reason = None
        await net.wait_for(lambda: len(net.central.reports) == 3, what="second fault")
    assert [r["is_faulty"] for r in net.central.reports] == [True, False, True]
    assert net.central.reports[0]["reason"] == "health check failed 2 times: HTTP 500"
    assert net.central.reports[2]["reason"] == "CP reports FAULT"
    assert net.central.controller.get(CP_ID).fault_reason == "CP reports FAULT"


async def test_central_down_then_up_delivers_the_report_once_back(
    net: FakeNetwork, logs: list[tuple[str, str]]
) -> None:
    net.central.up = False
    net.engine.mode = "refused"
    async with Started(net) as monitor:
        await net.wait_for(lambda: monitor.view is HealthView.FAULT, what="the fault")
        await net.wait_for(lambda: net.central.refused >= 5, what="5 refused calls")
        assert net.central.reports == []
        assert monitor.pending_report is not None
        net.central.up = True
        await net.wait_for(lambda: len(net.central.reports) == 1, what="the delivered report")
        checks_then = net.engine.checks
        await net.wait_for(lambda: net.engine.checks >= checks_then + 5, what="more checks")
        assert len(net.central.reports) == 1
        assert net.central.reports[0]["is_faulty"] is True
        assert monitor.pending_report is None
    unreachable = [m for level, m in logs if level == "WARNING" and "unreachable" in m]
    assert len(unreachable) == 1, unreachable  # one warning per outage, not one per try
    assert any("answers again" in m for _, m in logs)


async def test_newest_pending_report_wins(net: FakeNetwork) -> None:
    net.central.up = False
    net.engine.mode = "refused"
    async with Started(net) as monitor:
        await net.wait_for(lambda: monitor.view is HealthView.FAULT, what="the fault")
        net.engine.mode = "ok"
        await net.wait_for(lambda: monitor.view is HealthView.HEALTHY, what="the recovery")
        net.central.up = True
        await net.wait_for(lambda: len(net.central.reports) == 1, what="a delivered report")
        checks_then = net.engine.checks
        await net.wait_for(lambda: net.engine.checks >= checks_then + 5, what="more checks")
    # Central never got the fault, and is told the latest truth only.
    assert [r["is_faulty"] for r in net.central.reports] == [False]
    assert not net.central.controller.get(CP_ID).is_faulty


async def test_registration_retries_until_success(net: FakeNetwork) -> None:
    net.central.fail_next = 2
    net.central.up = False
    async with Started(net) as monitor:
        await net.wait_for(lambda: net.central.refused >= 3, what="3 refused registrations")
        assert not monitor.registered
        assert monitor.stats.checks > 0  # health checks run meanwhile
        net.central.up = True
        await net.wait_for(lambda: len(net.central.registrations) == 1, what="registration")
        await net.wait_for(lambda: monitor.registered, what="registered")
        await net.wait_for(lambda: len(net.central.reports) == 1, what="the startup report")
        assert monitor.stats.registrations == 1
        paths = [c.url.path for c in net.central.calls]
        assert paths == ["/cp/register"] * (net.central.refused + 1) + ["/cp/fault"]


async def test_token_header_sent_to_central_only(make_net: MakeNet) -> None:
    net = await make_net(FakeEngine(mode="refused"), token="s3cret")
    async with Started(net, api_token="s3cret"):
        await net.wait_for(lambda: len(net.central.reports) == 1, what="a fault report")
        await net.wait_for(lambda: len(net.central.liveness) >= 1, what="a liveness report")
    assert net.central.refused == 0
    assert {c.headers.get("Authorization") for c in net.central.calls} == {"Bearer s3cret"}
    assert {c.headers.get("Authorization") for c, _ in net.central.liveness} == {
        "Bearer s3cret"
    }
    assert net.engine.auth_headers and set(net.engine.auth_headers) == {None}
    assert net.central.controller.get(CP_ID).is_faulty


async def test_wrong_token_logs_one_error_and_keeps_trying(
    make_net: MakeNet, logs: list[tuple[str, str]]
) -> None:
    net = await make_net(token="right")
    async with Started(net, api_token="wrong") as monitor:
        await net.wait_for(lambda: net.central.refused >= 4, what="4 refused calls")
        assert not monitor.registered
    errors = [m for level, m in logs if level == "ERROR"]
    assert len(errors) == 1
    assert "HTTP 401" in errors[0] and "CP_MONITOR_API_TOKEN" in errors[0]
    assert "wrong" not in errors[0]  # the token itself is never logged
    assert CP_ID not in net.central.controller.cps


async def test_404_from_central_triggers_registration_then_retry(net: FakeNetwork) -> None:
    # An older Central, without the liveness route, so that only the fault report finds
    # out that Central lost its registry (the liveness tests below cover that route).
    net.central.liveness_route = False
    async with Started(net) as monitor:
        await net.wait_for(lambda: monitor.stats.reports_sent == 1, what="the startup report")
        await net.central.restart_empty()  # Central restarted with an empty registry
        net.engine.mode = "refused"
        await net.wait_for(lambda: monitor.stats.fault_reports_sent == 1, what="the fault report")
        assert len(net.central.registrations) == 2
        assert monitor.stats.registrations == 2
        assert [r["is_faulty"] for r in net.central.reports] == [False, True]
        assert net.central.controller.get(CP_ID).is_faulty
    paths = [c.url.path for c in net.central.calls]
    assert paths == ["/cp/register", "/cp/fault", "/cp/fault", "/cp/register", "/cp/fault"]


async def test_slow_engine_counts_as_a_timeout(net: FakeNetwork) -> None:
    net.engine_delay = 5.0
    async with Started(net, health_timeout=0.02, failure_threshold=2):
        await net.wait_for(lambda: len(net.central.reports) == 1, what="a fault report")
    assert net.central.reports[0]["reason"] == "health check failed 2 times: timed out after 0.02 s"


# ----------------------------------------------------------------- lifecycle


async def test_run_returns_when_stop_is_set(net: FakeNetwork) -> None:
    stop = asyncio.Event()
    client = net.client()
    monitor = Monitor(make_settings(), client, retry_initial=0.01, retry_max=0.05)
    runner = asyncio.create_task(monitor.run(stop))
    await net.wait_for(lambda: monitor.stats.checks >= 3, what="3 checks")
    stop.set()
    assert await asyncio.wait_for(runner, timeout=2) is False  # no task failed
    assert not monitor.running
    await monitor.stop()  # a second stop is harmless
    await client.aclose()


async def test_a_failed_task_stops_the_monitor_and_is_logged_once(
    net: FakeNetwork, monkeypatch: pytest.MonkeyPatch
) -> None:
    records: list[tuple[str, str, bool]] = []
    sink_id = logger.add(
        lambda m: records.append(
            (m.record["level"].name, m.record["message"], m.record["exception"] is not None)
        ),
        level="DEBUG",
        format="{message}",
    )
    client = net.client()
    monitor = Monitor(make_settings(), client, retry_initial=0.01, retry_max=0.05)

    async def broken_check() -> bool:
        raise RuntimeError("probe broke")

    monkeypatch.setattr(monitor, "check_once", broken_check)
    try:
        assert await asyncio.wait_for(monitor.run(asyncio.Event()), 2) is True
    finally:
        logger.remove(sink_id)
        await client.aclose()
    assert not monitor.running
    failures = [(level, msg, tb) for level, msg, tb in records if "probe broke" in msg]
    assert failures == [
        ("CRITICAL", f"monitor {CP_ID} health checks died (RuntimeError('probe broke'))", True)
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_reports_a_fault_to_central_served_by_uvicorn() -> None:
    """Real sockets end to end: the monitor's own client, Central's app on uvicorn, and
    an engine whose port is closed."""
    central = await Central().open()
    server = HttpServer(central.app, "127.0.0.1", 0, name="central-test")
    await server.start()
    settings = make_settings(
        cp_e_host="127.0.0.1", cp_e_port=_free_port(), central_host="127.0.0.1",
        central_port=server.port, health_interval=0.02,
    )
    monitor = Monitor(settings, retry_initial=0.01, retry_max=0.05)
    try:
        await monitor.start()
        await poll(lambda: CP_ID in central.controller.cps and
                   central.controller.get(CP_ID).is_faulty,
                   timeout=10, what="Central marking the CP faulty")
        reason = central.controller.get(CP_ID).fault_reason
        assert reason == "health check failed 3 times: connection refused"
    finally:
        await monitor.stop()
        await server.stop()
        await central.close()


async def test_a_central_that_times_out_is_logged_once_and_checks_go_on(
    logs: list[tuple[str, str]],
) -> None:
    """Central accepts connections and never answers (a listening socket nobody serves:
    the real app cannot be made to hang)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        settings = make_settings(
            cp_e_host="127.0.0.1", cp_e_port=_free_port(), central_host="127.0.0.1",
            central_port=silent.getsockname()[1], health_interval=0.02,
        )
        monitor = Monitor(settings, retry_initial=0.01, retry_max=0.05, central_timeout=0.1)
        try:
            await monitor.start()
            await poll(lambda: monitor.stats.central_errors >= 4, timeout=10,
                       what="4 calls to Central timing out")
            checks_then = monitor.stats.checks
            await poll(lambda: monitor.stats.checks >= checks_then + 5, timeout=10,
                       what="more health checks")
            assert monitor.view is HealthView.FAULT and not monitor.registered
        finally:
            await monitor.stop()
    warnings = [m for level, m in logs if level == "WARNING" and "unreachable" in m]
    assert len(warnings) == 1, warnings
    assert "timed out after 0.1 s" in warnings[0]


async def test_process_cli_exits_zero_on_sigterm() -> None:
    """The exact seed command line runs, survives absent peers and exits 0 on SIGTERM."""
    engine_port, central_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_MONITOR_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "evcharging.apps.ev_cp_m.main",
        "--cp-id", "CP-001", "--cp-e-host", "127.0.0.1", "--cp-e-port", str(engine_port),
        "--central-host", "127.0.0.1", "--central-port", str(central_port),
        "--health-interval", "0.05",
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, env=env,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(15):
            while not any("is faulty" in line for line in seen):
                line = await proc.stderr.readline()
                assert line, f"monitor exited early: {seen}"
                seen.append(line.decode())
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), timeout=10)
        code = await asyncio.wait_for(proc.wait(), timeout=10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = "".join(seen) + rest.decode()
    assert code == 0, output
    assert "connection refused" in output
    assert "monitor stopped" in output


# ----------------------------------------------------------------- liveness (SPEC §5)


class LivenessCentral:
    """A small Central with the liveness route, as the real one will have it.

    ``route`` says how the liveness route answers: ``"ok"``, ``"404"`` (absent, as in a
    Central from before it) or ``"405"`` (the path exists for another method).
    """

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.route = "ok"
        self.known: set[str] = set()
        self.beats: list[dict[str, Any]] = []
        self.registrations = 0
        self.reports: list[dict[str, Any]] = []
        self.app = FastAPI()
        app = self.app

        def refused(request: Request) -> JSONResponse | None:
            if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
                return JSONResponse({"error": "bad token", "code": "unauthorized"}, 401)
            return None

        def unknown(cp_id: str) -> JSONResponse:
            return JSONResponse({"error": f"unknown CP {cp_id}", "code": "unknown_cp"}, 404)

        @app.post("/cp/register")
        async def register(request: Request) -> Any:
            if (answer := refused(request)) is not None:
                return answer
            self.known.add((await request.json())["cp_id"])
            self.registrations += 1
            return {"ok": True}

        @app.post("/cp/fault")
        async def fault(request: Request) -> Any:
            if (answer := refused(request)) is not None:
                return answer
            body = await request.json()
            if body["cp_id"] not in self.known:
                return unknown(body["cp_id"])
            self.reports.append(body)
            return {"ok": True}

        @app.get("/cp/{cp_id}/monitor")
        async def monitor_get(cp_id: str) -> Any:
            return {"cp_id": cp_id}

        @app.post("/cp/{cp_id}/monitor")
        async def monitored(cp_id: str, request: Request) -> Any:
            if self.route == "404":
                return JSONResponse({"detail": "Not Found"}, 404)  # FastAPI's own 404
            if self.route == "405":
                return JSONResponse({"detail": "Method Not Allowed"}, 405)
            if (answer := refused(request)) is not None:
                return answer
            if cp_id not in self.known:
                return unknown(cp_id)
            self.beats.append(await request.json())
            return {"cp_id": cp_id, "monitored": True}


@pytest.fixture
def liveness_central(net: FakeNetwork) -> LivenessCentral:
    central = LivenessCentral()
    net.central.serve(central.app)
    return central


async def test_liveness_is_reported_every_interval_with_the_last_check(
    net: FakeNetwork, liveness_central: LivenessCentral
) -> None:
    liveness_central.token = "s3cret"
    async with Started(net, api_token="s3cret") as monitor:
        await net.wait_for(lambda: len(liveness_central.beats) >= 5, what="5 liveness reports")
        assert all(beat == {"interval": INTERVAL, "healthy": beat["healthy"]}
                   for beat in liveness_central.beats)
        assert liveness_central.beats[-1]["healthy"] is True
        net.engine.mode = "refused"
        await net.wait_for(lambda: monitor.view is not HealthView.HEALTHY, what="a failed check")
        seen = len(liveness_central.beats)
        await net.wait_for(lambda: len(liveness_central.beats) >= seen + 2, what="2 more")
        assert liveness_central.beats[-1]["healthy"] is False
        assert monitor.stats.liveness_sent == len(liveness_central.beats)
    assert {req.headers.get("Authorization") for req, _ in net.central.liveness} == {
        "Bearer s3cret"
    }
    assert {status for _, status in net.central.liveness} == {200}


async def test_liveness_404_for_an_unknown_cp_registers_again(
    net: FakeNetwork, liveness_central: LivenessCentral, logs: list[tuple[str, str]]
) -> None:
    async with Started(net) as monitor:
        await net.wait_for(lambda: len(liveness_central.beats) >= 2, what="liveness reports")
        liveness_central.known.clear()  # Central forgot the CP
        await net.wait_for(lambda: monitor.stats.registrations == 2, what="a new registration")
        seen = len(liveness_central.beats)
        await net.wait_for(lambda: len(liveness_central.beats) >= seen + 2, what="more reports")
    statuses = [status for _, status in net.central.liveness]
    assert 404 in statuses
    assert liveness_central.registrations == 2
    assert any("does not know CP-001" in m and "registering it again" in m for _, m in logs)


async def test_liveness_reaches_the_real_central(net: FakeNetwork) -> None:
    async with Started(net) as monitor:
        await net.wait_for(lambda: monitor.stats.liveness_sent >= 3, what="3 liveness reports")
        await net.wait_for(lambda: net.central.controller.get(CP_ID).monitored,
                           what="Central showing the CP as monitored")
    assert {status for _, status in net.central.liveness} == {200}
    assert net.central.controller.get(CP_ID).monitor_interval == INTERVAL


@pytest.mark.parametrize("route", ["404", "405"])
async def test_an_older_central_without_the_liveness_route_is_tolerated(
    net: FakeNetwork, liveness_central: LivenessCentral, logs: list[tuple[str, str]],
    route: str,
) -> None:
    liveness_central.route = route
    async with Started(net, liveness_retry=0.02) as monitor:
        await net.wait_for(lambda: len(net.central.liveness) >= 5, what="5 liveness tries")
        assert monitor.stats.registrations == 1  # not mistaken for an unknown CP
        net.engine.mode = "refused"  # everything else goes on
        await net.wait_for(lambda: len(liveness_central.reports) == 2, what="the fault report")
        assert liveness_central.reports[-1]["is_faulty"] is True
        liveness_central.route = "ok"  # Central upgraded
        await net.wait_for(lambda: len(liveness_central.beats) >= 1, what="a liveness report")
    warnings = [m for level, m in logs if level == "WARNING" and "/monitor route" in m]
    assert len(warnings) == 1, warnings
    assert any("takes liveness reports now" in m for _, m in logs)
    assert monitor.stats.liveness_sent >= 1


async def test_an_older_real_central_gets_one_liveness_try_per_retry_period(
    net: FakeNetwork,
) -> None:
    net.central.liveness_route = False  # 404 with code not_found, as an older Central
    async with Started(net) as monitor:
        await net.wait_for(lambda: monitor.stats.checks >= 20, what="20 checks")
        await net.wait_for(lambda: len(net.central.liveness) == 1, what="one liveness try")
    assert [status for _, status in net.central.liveness] == [404]


async def test_central_unreachable_for_liveness_is_logged_once_per_outage(
    net: FakeNetwork, liveness_central: LivenessCentral, logs: list[tuple[str, str]]
) -> None:
    async with Started(net) as monitor:
        await net.wait_for(lambda: len(liveness_central.beats) >= 2, what="liveness reports")
        for outage in range(2):
            net.central.up = False
            errors = monitor.stats.central_errors
            await net.wait_for(lambda errors=errors: monitor.stats.central_errors >= errors + 5,
                               what=f"5 failed liveness reports in outage {outage}")
            net.central.up = True
            seen = len(liveness_central.beats)
            await net.wait_for(lambda seen=seen: len(liveness_central.beats) > seen,
                               what="a liveness report")
    unreachable = [m for level, m in logs if level == "WARNING" and "unreachable" in m]
    assert len(unreachable) == 2, unreachable  # one per outage
    assert "reporting liveness" in unreachable[0]
    assert sum("answers again" in m for _, m in logs) == 2


async def test_liveness_body_is_what_central_expects() -> None:
    """The exact request: method, path, JSON body and headers (no token configured)."""
    seen: list[httpx.Request] = []

    def central(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"cp_id": CP_ID, "monitored": True})

    async with httpx.AsyncClient(transport=httpx.MockTransport(central)) as client:
        monitor = Monitor(make_settings(health_interval=5.0), client)
        await monitor._report_liveness()
    [request] = seen
    assert request.method == "POST"
    assert str(request.url) == f"http://{CENTRAL_HOST}:{CENTRAL_PORT}/cp/{CP_ID}/monitor"
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers
    assert json.loads(request.content) == {"interval": 5.0, "healthy": False}
    assert monitor.stats.liveness_sent == 1
