"""Unit tests of the CP Monitor against a fake CP Engine and a fake Central (no network)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from loguru import logger

from evcharging.apps.ev_cp_m.monitor import STARTUP_HEALTHY_REASON, HealthView, Monitor
from evcharging.common.config import CPMonitorSettings
from tests.unit.fakes_http import (
    CENTRAL_HOST,
    CENTRAL_PORT,
    ENGINE_HOST,
    ENGINE_PORT,
    FakeCentral,
    FakeEngine,
    FakeNetwork,
)

CP_ID = "CP-001"


def make_settings(**overrides: Any) -> CPMonitorSettings:
    values: dict[str, Any] = {
        "cp_id": CP_ID,
        "cp_e_host": ENGINE_HOST,
        "cp_e_port": ENGINE_PORT,
        "central_host": CENTRAL_HOST,
        "central_port": CENTRAL_PORT,
        "health_interval": 0.01,
        "health_timeout": 0.5,
        "failure_threshold": 3,
        "api_token": None,
    }
    values.update(overrides)
    return CPMonitorSettings(_env_file=None, **values)


class Started:
    """A started monitor on a fake network; stopped (and checked) on exit."""

    def __init__(self, net: FakeNetwork, **settings: Any) -> None:
        self.net = net
        self.client = net.client()
        self.monitor = Monitor(
            make_settings(**settings), self.client, retry_initial=0.01, retry_max=0.05
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
    """(level, message) of every log line while the test runs."""
    records: list[tuple[str, str]] = []
    sink_id = logger.add(
        lambda m: records.append((m.record["level"].name, m.record["message"])),
        level="DEBUG",
        format="{message}",
    )
    yield records
    logger.remove(sink_id)


@pytest.fixture
async def net() -> AsyncIterator[FakeNetwork]:
    yield FakeNetwork(FakeEngine(), FakeCentral())


async def test_healthy_cp_registers_and_says_so_once(net: FakeNetwork) -> None:
    async with Started(net) as monitor:
        await net.wait_for(lambda: monitor.stats.checks >= 10, what="10 checks")
        await net.wait_for(lambda: monitor.stats.reports_sent >= 1, what="the first report")
        assert monitor.registered
        assert monitor.view is HealthView.HEALTHY
        assert net.central.registrations == [
            {"cp_id": CP_ID, "health_url": f"http://{ENGINE_HOST}:{ENGINE_PORT}/health"}
        ]
        # One "healthy" report at start, so that a fault left by an earlier run of the
        # monitor is cleared; nothing after it while the CP stays healthy.
        assert net.central.reports == [
            {"cp_id": CP_ID, "is_faulty": False, "reason": STARTUP_HEALTHY_REASON}
        ]
        assert monitor.stats.failures == 0
        assert monitor.stats.reports_sent == 1


async def test_threshold_reached_sends_exactly_one_fault_report(
    net: FakeNetwork, logs: list[tuple[str, str]]
) -> None:
    net.engine.mode = "refused"
    async with Started(net) as monitor:
        await net.wait_for(lambda: len(net.central.reports) >= 1, what="a fault report")
        checks_then = net.engine.checks
        await net.wait_for(lambda: net.engine.checks >= checks_then + 10, what="more checks")
        assert net.central.reports == [
            {
                "cp_id": CP_ID,
                "is_faulty": True,
                "reason": "health check failed 3 times: connection refused",
            }
        ]
        assert monitor.view is HealthView.FAULT
        assert monitor.stats.fault_reports_sent == 1
        assert monitor.stats.reports_sent == 1
        assert monitor.stats.failures == monitor.stats.checks
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


async def test_recovery_sends_exactly_one_recovery_report(net: FakeNetwork) -> None:
    net.engine.mode = "fault"
    async with Started(net) as monitor:
        await net.wait_for(lambda: len(net.central.reports) == 1, what="a fault report")
        assert net.central.reports[0]["reason"] == "CP reports FAULT: overheating"
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


async def test_token_header_sent_to_central_only() -> None:
    net = FakeNetwork(FakeEngine(mode="refused"), FakeCentral(token="s3cret"))
    async with Started(net, api_token="s3cret"):
        await net.wait_for(lambda: len(net.central.reports) == 1, what="a fault report")
    assert net.central.refused == 0
    assert {c.headers.get("Authorization") for c in net.central.calls} == {"Bearer s3cret"}
    assert net.engine.auth_headers and set(net.engine.auth_headers) == {None}


async def test_wrong_token_logs_one_error_and_keeps_trying(
    logs: list[tuple[str, str]],
) -> None:
    net = FakeNetwork(FakeEngine(), FakeCentral(token="right"))
    async with Started(net, api_token="wrong") as monitor:
        await net.wait_for(lambda: net.central.refused >= 4, what="4 refused calls")
        assert not monitor.registered
    errors = [m for level, m in logs if level == "ERROR"]
    assert len(errors) == 1
    assert "HTTP 401" in errors[0] and "CP_MONITOR_API_TOKEN" in errors[0]
    assert "wrong" not in errors[0]  # the token itself is never logged


async def test_404_from_central_triggers_registration_then_retry(net: FakeNetwork) -> None:
    async with Started(net) as monitor:
        await net.wait_for(lambda: monitor.stats.reports_sent == 1, what="the startup report")
        net.central.forget()  # e.g. Central restarted with an empty registry
        net.engine.mode = "refused"
        await net.wait_for(lambda: monitor.stats.fault_reports_sent == 1, what="the fault report")
        assert len(net.central.registrations) == 2
        assert monitor.stats.registrations == 2
        assert [r["is_faulty"] for r in net.central.reports] == [False, True]
    paths = [c.url.path for c in net.central.calls]
    assert paths == ["/cp/register", "/cp/fault", "/cp/fault", "/cp/register", "/cp/fault"]


async def test_slow_engine_counts_as_a_timeout(net: FakeNetwork) -> None:
    net.engine_delay = 5.0
    async with Started(net, health_timeout=0.02, failure_threshold=2):
        await net.wait_for(lambda: len(net.central.reports) == 1, what="a fault report")
    assert net.central.reports[0]["reason"] == "health check failed 2 times: timed out after 0.02 s"


async def test_run_returns_when_stop_is_set(net: FakeNetwork) -> None:
    stop = asyncio.Event()
    client = net.client()
    monitor = Monitor(make_settings(), client, retry_initial=0.01, retry_max=0.05)
    runner = asyncio.create_task(monitor.run(stop))
    await net.wait_for(lambda: monitor.stats.checks >= 3, what="3 checks")
    stop.set()
    await asyncio.wait_for(runner, timeout=2)
    assert not monitor.running
    await monitor.stop()  # a second stop is harmless
    await client.aclose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
