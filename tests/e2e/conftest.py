"""End-to-end fixtures: the real service processes, started with the seed's commands.

Each test gets its own topic prefix, database and ports on the session's real broker,
so tests do not see each other's messages. Services run with short intervals so that a
whole session takes seconds. Everything is waited for with deadlines, never with sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright

from evcharging.common.kafka import KafkaBus, KafkaConfig, KafkaConsumerLoop, Routes
from evcharging.common.messages import DriverRequest, DriverStatus, DriverUpdate, new_id
from evcharging.devtools.process import free_port
from tests.e2e.browser import VIEWPORT, PageLog, launch_chromium
from tests.polling import poll

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

FAST_ENGINE = {
    "CP_ENGINE_SESSION_SECONDS": "3",
    "CP_ENGINE_TELEMETRY_INTERVAL": "0.5",
    "CP_ENGINE_STATUS_INTERVAL": "1",
}
FAST_MONITOR = {
    "CP_MONITOR_HEALTH_INTERVAL": "0.5",
    "CP_MONITOR_HEALTH_TIMEOUT": "0.5",
    "CP_MONITOR_FAILURE_THRESHOLD": "2",
}
FAST_CENTRAL = {
    "CENTRAL_START_TIMEOUT": "3",
    "CENTRAL_HEALTH_SNAPSHOT_INTERVAL": "1",
}


async def eventually(
    probe: Callable[[], Awaitable[T | None]], timeout: float = 20.0, what: str = "condition"
) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout`.

    A refused or failed HTTP call counts as "not yet" (the service may still be starting).
    """
    result: T = await poll(
        probe, timeout=timeout, what=what, interval=0.1, retry_on=(httpx.HTTPError, OSError)
    )
    return result


class Proc:
    """One service process with its log in a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self) -> Proc:
        """Start the process; log lines from an earlier run of the same name are not read."""
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, *self.args], cwd=ROOT, env=self.env, stdout=log, stderr=log
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def log(self) -> str:
        """What this run of the process has logged so far."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self._offset)
            return log.read().decode(errors="replace")

    async def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern)

        async def probe() -> re.Match[str] | None:
            if self.popen is not None and self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}):\n{self.log()}")
            return regex.search(self.log())

        return await eventually(probe, timeout, f"{self.name} to log {pattern!r}")

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)

    async def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.popen is not None
        popen = self.popen

        async def probe() -> int | None:
            return None if popen.poll() is None else popen.returncode + 1000

        return await eventually(probe, timeout, f"{self.name} to exit") - 1000

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGINT, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                return await self.wait_exit(timeout)
            except AssertionError:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


@dataclass
class DriverProbe:
    """A test-side driver: sends requests and collects every update of each."""

    bus: KafkaBus
    driver_id: str
    updates: dict[str, list[DriverUpdate]] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_update(self, update: DriverUpdate) -> None:
        if update.driver_id != self.driver_id:
            return
        self.updates.setdefault(update.request_id, []).append(update)
        self._changed.set()

    async def request(self, cp_id: str, request_id: str | None = None) -> str:
        request_id = request_id or new_id()
        await self.bus.publish(
            DriverRequest(request_id=request_id, driver_id=self.driver_id, cp_id=cp_id),
        )
        return request_id

    async def wait_status(
        self, request_id: str, statuses: set[DriverStatus], timeout: float = 30.0
    ) -> DriverUpdate:
        deadline = time.monotonic() + timeout
        while True:
            for update in self.updates.get(request_id, []):
                if update.status in statuses:
                    return update
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no {sorted(statuses)} for {request_id} in {timeout}s; "
                    f"got {[u.status.value for u in self.updates.get(request_id, [])]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def final(self, request_id: str, timeout: float = 30.0) -> DriverUpdate:
        return await self.wait_status(
            request_id, {DriverStatus.COMPLETED, DriverStatus.DENIED, DriverStatus.FAILED}, timeout
        )

    def statuses(self, request_id: str) -> list[DriverStatus]:
        return [u.status for u in self.updates.get(request_id, [])]


class System:
    """The services of one test, on its own topics, database and ports."""

    def __init__(self, bootstrap: str, tmp: Path) -> None:
        self.bootstrap = bootstrap
        self.tmp = tmp
        self.prefix = f"e2e-{uuid.uuid4().hex[:8]}."
        self.db_path = tmp / "central.db"
        self.http_port = free_port()
        self.tcp_port = free_port()
        self.procs: list[Proc] = []
        self.engine_ports: dict[str, int] = {}
        self.fleet_port = 0
        """The HTTP port of the fleet started by :meth:`start_fleet`."""
        self.engine_env: dict[str, str] = {}
        """Extra settings for engines started from now on (e.g. a longer session)."""
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}", timeout=5)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("CENTRAL_", "CP_ENGINE_", "CP_MONITOR_", "DRIVER_"))
        }
        env.update({
            "PYTHONUNBUFFERED": "1",
            "CENTRAL_TOPIC_PREFIX": self.prefix,
            "CP_ENGINE_TOPIC_PREFIX": self.prefix,
            "DRIVER_TOPIC_PREFIX": self.prefix,
            "CENTRAL_DB_PATH": str(self.db_path),
            "CENTRAL_GROUP_ID": f"{self.prefix}central",
            "CENTRAL_INSTANCE_ID": "central-1",  # as make run: a restart takes its place
            **FAST_CENTRAL, **FAST_ENGINE, **FAST_MONITOR,
        })
        env.update(extra or {})
        return env

    def _spawn(self, name: str, module: str, flags: list[str], env: dict[str, str] | None) -> Proc:
        proc = Proc(name, ["-m", module, *flags], self.env(env), self.tmp).start()
        self.procs.append(proc)
        return proc

    async def start_central(self, env: dict[str, str] | None = None) -> Proc:
        proc = self._spawn(
            "central", "evcharging.apps.ev_central.main",
            ["--kafka-bootstrap", self.bootstrap, "--http-port", str(self.http_port),
             "--listen-port", str(self.tcp_port)],
            env,
        )
        await proc.wait_log(r"EV Central ready", timeout=60)
        return proc

    async def start_engine(self, cp_id: str, env: dict[str, str] | None = None) -> Proc:
        port = self.engine_ports.setdefault(cp_id, free_port())
        env = {**self.engine_env, **(env or {})}
        proc = self._spawn(
            f"engine-{cp_id}", "evcharging.apps.ev_cp_e.main",
            ["--kafka-bootstrap", self.bootstrap, "--cp-id", cp_id, "--health-port", str(port)],
            env,
        )
        await self.wait_cp(cp_id, lambda cp: cp["state"] == "ACTIVATED", "ACTIVATED", 60)
        return proc

    async def start_monitor(self, cp_id: str, env: dict[str, str] | None = None) -> Proc:
        port = self.engine_ports.setdefault(cp_id, free_port())
        proc = self._spawn(
            f"monitor-{cp_id}", "evcharging.apps.ev_cp_m.main",
            ["--cp-id", cp_id, "--cp-e-host", "127.0.0.1", "--cp-e-port", str(port),
             "--central-host", "127.0.0.1", "--central-port", str(self.http_port)],
            env,
        )
        await self.wait_cp(cp_id, lambda cp: cp.get("health_url") is not None,
                           "registered by its monitor", 30)
        return proc

    async def start_cp(self, cp_id: str) -> tuple[Proc, Proc]:
        engine = await self.start_engine(cp_id)
        monitor = await self.start_monitor(cp_id)
        return engine, monitor

    async def start_fleet(
        self, cps: int, env: dict[str, str] | None = None, flags: list[str] | None = None,
        timeout: float = 60.0,
    ) -> Proc:
        """A CP Fleet of `cps` CPs (``CP-00001`` …) started with the seed's flags, on this
        system's topics; returns once it logs that it runs (its CPs connected). Its HTTP
        port is :attr:`fleet_port`."""
        self.fleet_port = free_port()
        base = {k: v for k, v in self.env().items() if not k.startswith("FLEET_")}
        proc = Proc(
            "fleet",
            ["-m", "evcharging.apps.ev_fleet.main", "--kafka-bootstrap", self.bootstrap,
             "--cps", str(cps), "--id-prefix", "CP-", "--http-port", str(self.fleet_port),
             "--central-host", "127.0.0.1", "--central-port", str(self.http_port),
             *(flags or [])],
            {**base, "FLEET_TOPIC_PREFIX": self.prefix, **(env or {})},
            self.tmp,
        ).start()
        self.procs.append(proc)
        await proc.wait_log(r"CP Fleet running", timeout)
        return proc

    def fleet_url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.fleet_port}{path}"

    async def count_cps(self, **params: str) -> int:
        """How many CPs Central lists with these filters (``X-Total-Count`` of ``/cp``)."""
        response = await self.http.get("/cp", params={**params, "limit": "1"})
        response.raise_for_status()
        return int(response.headers["X-Total-Count"])

    def start_driver(self, driver_id: str, requests: list[str],
                     env: dict[str, str] | None = None) -> Proc:
        path = self.tmp / f"requests-{driver_id}.txt"
        path.write_text("# test requests\n" + "\n".join(requests) + "\n")
        return self._spawn(
            f"driver-{driver_id}", "evcharging.apps.ev_driver.main",
            ["--driver-id", driver_id, "--kafka-bootstrap", self.bootstrap,
             "--requests-file", str(path)],
            env,
        )

    async def cp(self, cp_id: str) -> dict[str, Any] | None:
        response = await self.http.get(f"/cp/{cp_id}")
        return response.json() if response.status_code == 200 else None

    async def wait_cp(
        self, cp_id: str, check: Callable[[dict[str, Any]], bool], what: str,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            cp = await self.cp(cp_id)
            return cp if cp is not None and check(cp) else None

        return await eventually(probe, timeout, f"{cp_id} {what}")

    def engine_url(self, cp_id: str) -> str:
        return f"http://127.0.0.1:{self.engine_ports[cp_id]}"

    def kafka_config(self, client_id: str) -> KafkaConfig:
        return KafkaConfig(
            bootstrap=self.bootstrap, client_id=client_id, topic_prefix=self.prefix,
            connect_timeout=60,
        )

    async def close(self) -> None:
        for proc in reversed(self.procs):
            await proc.stop()
        await self.http.aclose()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.log()[-6000:]}" for p in self.procs)


@pytest.fixture
async def system(
    kafka_bootstrap: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[System]:
    sys_ = System(kafka_bootstrap, tmp_path)
    try:
        yield sys_
    finally:
        await sys_.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            sys.stderr.write(sys_.logs())


@pytest.fixture
async def driver_probe(system: System) -> AsyncIterator[DriverProbe]:
    config = system.kafka_config("e2e-driver-probe")
    bus = KafkaBus(config)
    await bus.start()
    probe = DriverProbe(bus, f"probe-{uuid.uuid4().hex[:6]}")
    loop = KafkaConsumerLoop(
        config, Routes().add(DriverUpdate, probe.on_update), start_at="latest"
    )
    await loop.start()
    task = asyncio.create_task(loop.run())
    try:
        yield probe
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await loop.stop()
        await bus.stop()


@pytest.fixture(scope="session")
async def chromium() -> AsyncIterator[Browser]:
    """The system's headless Chromium under Playwright, for the whole session (each test
    gets its own context); no Chromium fails the test (scripts/ensure_chromium.sh)."""
    async with async_playwright() as playwright:
        browser = await launch_chromium(playwright)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def page_log() -> PageLog:
    """What went wrong on the test's `page` (attached by that fixture)."""
    return PageLog()


@pytest.fixture
async def page(
    chromium: Browser, page_log: PageLog, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Page]:
    """A fresh page in its own browser context, recorded in `page_log`; when the test
    fails, a screenshot and what the page reported."""
    context = await chromium.new_context(viewport=VIEWPORT)
    context.set_default_timeout(15_000)  # a click or fill waits at most that for its element
    context.set_default_navigation_timeout(30_000)
    try:
        page = await context.new_page()
        await page_log.attach(page)
        yield page
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            with contextlib.suppress(Exception):
                shot = tmp_path / "failure.png"
                await page.screenshot(path=shot)
                sys.stderr.write(f"screenshot of the failing page: {shot}\n")
            sys.stderr.write(page_log.report())
    finally:
        await context.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
