"""OCPP gateway benchmark: thousands of OCPP chargers on one gateway, with Central and Kafka.

    .venv/bin/python benchmarks/ocpp_bench.py                      # 1,000 and 5,000 chargers
    .venv/bin/python benchmarks/ocpp_bench.py --quick              # 50 chargers, 20 s
    .venv/bin/python benchmarks/ocpp_bench.py --sizes 5000 --duration 30 --profile
    make bench-ocpp                                                # the full set

For each size N it starts, on fresh topics (a prefix of their own), a fresh database, a fresh
gateway state file and free ports: EV Central, the OCPP gateway (``evcharging.apps.ev_ocpp``)
and CP Fleets of N OCPP chargers in all (``--protocol ocpp1.6``, ``CH-00001`` … each with one
connector, so the CPs ``CH-00001.1`` …, one WebSocket each), in ``--fleet-processes``
processes (default 1; the chargers split in equal runs with ``--first``): the round trips
are timed by the chargers, so a saturated fleet process would measure itself. It measures:

* **boot**: from starting the fleet's process until every charger's BootNotification was
  Accepted (the fleet's ``/health``), and until Central lists all N CPs ACTIVATED;
* **round trips** of the chargers' CALLs, as the chargers time them (from sending the CALL
  to reading its answer, over the whole run, boot storm included): Heartbeat (each charger
  at its own phase of ``--heartbeat-interval``, the interval the gateway's BootNotification
  answer names) and MeterValues (every second while a charger charges);
* **remote start**: driver requests published on ``driver.requests`` at N ×
  ``--busy-fraction`` ÷ session length per second, each for a charger that is free; from
  publishing the request to reading its first IN_PROGRESS on ``driver.updates`` (Central
  decides, START_SUPPLY → RemoteStartTransaction → the charger's StartTransaction →
  SUPPLYING → the charger's first MeterValues → telemetry → IN_PROGRESS); and the outcome
  of every request;
* **resources**: CPU % (of one core) and RSS of the gateway, Central and the fleet
  processes (summed), from ``/proc``, and the load average, every second after the boot;
* with ``--profile``: where the gateway's and each fleet process's event loop spends its
  time during the requests (``py-spy record --nonblocking``, the main thread's samples), as
  the report's top lines.

With several fleet processes the round trips' p50 and p99 are the largest of the processes'
own (each is at least the whole run's: an upper bound).

Targets (issue 15): 5,000 chargers on one gateway within 1 GiB of RSS; Heartbeat p99 under
100 ms; remote-start round trip p99 under 1 s. The report says, per size, met or by how much
not.

Writes ``<out>/ocpp-<date>.md`` (machine, settings, tables, targets), ``.json`` (the data)
and ``.png`` (boot time, latencies and the gateway's resources against the number of
chargers), and prints the tables. The services log at WARNING. Not a test: nothing is
asserted (tests/e2e/test_bench_ocpp.py runs ``--quick`` and checks the report adds up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_bench import (  # the CP Fleet benchmark's machine, processes and samplers
    Machine,
    ResourceSampler,
    Service,
    free_port,
    markdown_table,
    say,
    service_env,
    wait_http,
)

from evcharging.apps.ev_load.stats import percentile
from evcharging.common.kafka import KafkaBus, KafkaConfig, KafkaConsumerLoop, Routes
from evcharging.common.messages import DriverRequest, DriverStatus, DriverUpdate, new_id
from evcharging.devtools.kafka_broker import KafkaBroker

DEFAULT_SIZES = (1000, 5000)
DEFAULT_OUT = ROOT / "benchmarks" / "results"
ID_PREFIX = "CH-"
PROTOCOL = "ocpp1.6"
TARGET_RSS_MIB = 1024.0
TARGET_HEARTBEAT_P99_MS = 100.0
TARGET_REMOTE_START_P99_MS = 1000.0
TARGET_SIZE = 5000
"""The size the targets are set for (the report checks them at every size)."""
FINAL_WAIT = 30.0
"""Seconds after the last request for the requests still running to end."""


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    duration: float
    session_seconds: float
    heartbeat_interval: int
    busy_fraction: float
    out: Path
    kafka_bootstrap: str | None
    boot_timeout: float
    keep_logs: bool
    fleet_processes: int = 1
    profile: bool = False


@dataclass
class SizeResult:
    chargers: int
    boot_seconds: float | None = None
    activated_seconds: float | None = None
    round_trips: dict[str, dict[str, Any]] = field(default_factory=dict)
    steady_round_trips: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The round trips after every charger booted (the fleet's mark)."""
    fleet_health: dict[str, Any] = field(default_factory=dict)
    rate: float = 0.0
    requests: int = 0
    no_free_charger: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    remote_start_ms: list[float] = field(default_factory=list)
    usage: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)
    """The 1-minute load average, every second after the boot."""
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Process name → its py-spy summary (:func:`profile_summary`), with --profile."""

    def trip(self, action: str, key: str, *, steady: bool = False) -> float | None:
        trips = self.steady_round_trips if steady else self.round_trips
        value = trips.get(action, {}).get(key)
        return None if value is None else float(value)

    def remote_start(self, q: float) -> float | None:
        return percentile(self.remote_start_ms, q) if self.remote_start_ms else None

    def cpu_mean(self, name: str) -> float | None:
        if name == "fleet" and name not in self.usage:
            means = [self.cpu_mean(n) for n in self.fleet_names()]
            return sum(m for m in means if m is not None) if means else None
        values = self.usage.get(name, {}).get("cpu", [])
        return sum(values) / len(values) if values else None

    def fleet_names(self) -> list[str]:
        return [n for n in self.usage if n.startswith("fleet")]

    def load_mean(self) -> float | None:
        return sum(self.load) / len(self.load) if self.load else None

    def cpu_max(self, name: str) -> float | None:
        values = self.usage.get(name, {}).get("cpu", [])
        return max(values) if values else None

    def rss_max(self, name: str) -> float | None:
        if name == "fleet" and name not in self.usage:
            peaks = [self.rss_max(n) for n in self.fleet_names()]
            return sum(p for p in peaks if p is not None) if peaks else None
        values = self.usage.get(name, {}).get("rss", [])
        return max(values) if values else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "chargers": self.chargers, "boot_seconds": self.boot_seconds,
            "activated_seconds": self.activated_seconds, "round_trips": self.round_trips,
            "round_trips_after_boot": self.steady_round_trips,
            "rate": self.rate, "requests": self.requests,
            "no_free_charger": self.no_free_charger, "outcomes": dict(self.outcomes),
            "remote_start_ms": {"p50": self.remote_start(50), "p99": self.remote_start(99),
                                "count": len(self.remote_start_ms)},
            "usage": {name: {"cpu_mean": self.cpu_mean(name), "cpu_max": self.cpu_max(name),
                             "rss_max_mib": self.rss_max(name)} for name in self.usage},
            "load_average": {"mean": self.load_mean(),
                             "max": max(self.load) if self.load else None},
            "fleet_health": self.fleet_health,
            "profiles": self.profiles,
        }


# --------------------------------------------------------------------------- one size


def bench_env(prefix: str, work: Path, settings: Settings) -> dict[str, str]:
    env = service_env(prefix, work, settings.session_seconds)
    for name in list(env):
        if name.startswith("OCPP_"):
            del env[name]
    env.update({
        "OCPP_TOPIC_PREFIX": prefix,
        "OCPP_LOG_LEVEL": "WARNING",
        "OCPP_STATE_FILE": str(work / "gateway-state.json"),
        "OCPP_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval),
    })
    return env


class Driver:
    """Publishes driver requests to free chargers and follows their updates."""

    def __init__(self, bus: KafkaBus, cps: list[str], result: SizeResult) -> None:
        self.bus = bus
        self.free = deque(random.sample(cps, len(cps)))
        self.result = result
        self.sent: dict[str, tuple[str, float]] = {}
        """request id → (CP, when it was published, monotonic)."""
        self.in_progress: set[str] = set()
        self.final: dict[str, str] = {}

    async def on_update(self, update: DriverUpdate) -> None:
        sent = self.sent.get(update.request_id)
        if sent is None or update.request_id in self.final:
            return
        cp, at = sent
        if update.status is DriverStatus.IN_PROGRESS and update.request_id not in self.in_progress:
            self.in_progress.add(update.request_id)
            self.result.remote_start_ms.append((time.monotonic() - at) * 1000)
        if update.status.is_final:
            self.final[update.request_id] = update.status.value
            self.result.outcomes[update.status.value] += 1
            self.free.append(cp)

    async def send(self, rate: float, duration: float) -> None:
        """Requests at `rate` per second for `duration` seconds, each to a free charger."""
        began = time.monotonic()
        count = 0
        while True:
            due = began + count / rate
            if due - began >= duration:
                return
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            count += 1
            if not self.free:
                self.result.no_free_charger += 1
                continue
            cp = self.free.popleft()
            request_id = new_id()
            self.sent[request_id] = (cp, time.monotonic())
            self.result.requests += 1
            await self.bus.publish(DriverRequest(request_id=request_id,
                                                 driver_id=f"bench-{count % 9999}", cp_id=cp),
                                   wait=False)

    async def wait_finals(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.final) < len(self.sent) and time.monotonic() < deadline:
            await asyncio.sleep(0.25)


async def wait_booted(fleet_https: Sequence[httpx.AsyncClient],
                      central_http: httpx.AsyncClient, chargers: int,
                      fleets: Sequence[Service], began: float, timeout: float
                      ) -> tuple[float, float]:
    """Seconds from `began` until every charger booted, and until Central lists every CP
    ACTIVATED."""
    booted_at = activated_at = None
    next_line = time.monotonic() + 5
    booted = activated = 0
    while booted_at is None or activated_at is None:
        for fleet in fleets:
            fleet.check_alive()
        now = time.monotonic()
        if booted_at is None:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                booted = sum([int((await http.get("/health")).json()["booted_once"])
                              for http in fleet_https])
                if booted >= chargers:
                    booted_at = now - began
        if activated_at is None:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                response = await central_http.get("/cp", params={"state": "ACTIVATED",
                                                                 "limit": 1})
                activated = int(response.headers["X-Total-Count"])
                if activated >= chargers:
                    activated_at = now - began
        if now - began > timeout:
            raise RuntimeError(f"after {timeout:g} s only {booted:,} of {chargers:,} chargers "
                               f"booted and {activated:,} CPs ACTIVATED; see "
                               f"{fleets[0].log_path}")
        if now >= next_line:
            next_line = now + 5
            say(f"    {booted:,} booted, {activated:,} ACTIVATED at Central after "
                f"{now - began:.0f} s")
        await asyncio.sleep(0.2)
    return booted_at, activated_at


def split(chargers: int, processes: int) -> list[tuple[int, int]]:
    """(first number, count) of each fleet process: `chargers` in equal runs."""
    processes = max(1, min(processes, chargers))
    base, extra = divmod(chargers, processes)
    runs, first = [], 1
    for index in range(processes):
        count = base + (1 if index < extra else 0)
        runs.append((first, count))
        first += count
    return runs


def merge_health(healths: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fleet processes' ``/health`` as one: counts summed; per action the round trips'
    count summed and p50, p99 the largest of the processes' (an upper bound: each process
    has at most 1 % of its round trips above its own p99). One process: its own."""
    if len(healths) == 1:
        return healths[0]
    merged: dict[str, Any] = {"processes": len(healths)}
    for key in ("chargers", "connected", "booted", "booted_once", "charging", "connects",
                "connect_failures", "disconnects"):
        merged[key] = sum(int(h.get(key) or 0) for h in healths)
    boots = [h.get("all_booted_seconds") for h in healths]
    merged["all_booted_seconds"] = (None if any(b is None for b in boots)
                                    else max(float(b) for b in boots if b is not None))
    merged["sessions"] = {k: sum(int(h.get("sessions", {}).get(k, 0)) for h in healths)
                          for k in ("started", "ended")}
    for key in ("calls", "answered"):
        total: Counter[str] = Counter()
        for h in healths:
            total.update({name: int(n) for name, n in h.get(key, {}).items()})
        merged[key] = dict(sorted(total.items()))
    for key in ("round_trips", "round_trips_since_mark"):
        trips: dict[str, dict[str, Any]] = {}
        for h in healths:
            for action, trip in (h.get(key) or {}).items():
                into = trips.setdefault(action, {"count": 0, "p50_ms": None, "p99_ms": None})
                into["count"] += int(trip.get("count") or 0)
                for q in ("p50_ms", "p99_ms"):
                    if trip.get(q) is not None:
                        into[q] = max(float(trip[q]), into[q] or 0.0)
        merged[key] = trips
    return merged


# --------------------------------------------------------------------------- py-spy

PROFILE_SHARE = 0.8
"""The share of the requests' duration that --profile samples (from their start)."""
PROFILE_RATE = 100
"""py-spy samples per second."""
PROFILE_TOP = 12
"""Lines of each list in the report."""


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile_summary(raw: str, seconds: float, rate: int = PROFILE_RATE,
                    top: int = PROFILE_TOP) -> dict[str, Any]:
    """py-spy's raw output (``frame;frame;... count`` a line, root first) as the main
    thread's (its root is ``_run_module_as_main``: the event loop) share of the wall time
    on the CPU, and its top functions by their own time (``self``) and with what they call
    (``total``), each in % of the wall time."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if not frames[0].startswith("_run_module_as_main"):
            continue  # another thread (the thread pool's workers, mostly idle)
        n = int(count)
        samples += n
        own[frames[-1]] += n
        for name in {frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0] + ")"
                     for frame in frames}:
            total[name] += n
    wall = max(seconds * rate, 1.0)
    skip = ("_run_module_as_main", "_run_code", "<module>", "main (", "run_service",
            "Runner.run (")
    return {
        "seconds": seconds, "samples": samples,
        "busy_percent": round(100 * samples / wall, 1),
        "self": [[round(100 * n / wall, 1), frame] for frame, n in own.most_common(top)],
        "total": [[round(100 * n / wall, 1), name] for name, n in total.most_common(top * 3)
                  if not name.startswith(skip)][:top],
    }


async def profile_all(pids: dict[str, int], seconds: float, work: Path
                      ) -> dict[str, dict[str, Any]]:
    """``py-spy record --nonblocking`` of every process for `seconds`, at once."""
    exe = py_spy()
    assert exe is not None  # parse_args checked it
    seconds = max(1, round(seconds))

    async def one(name: str, pid: int) -> tuple[str, dict[str, Any]]:
        out = work / f"py-spy-{name}.txt"
        process = await asyncio.create_subprocess_exec(
            exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate",
            str(PROFILE_RATE), "--nonblocking", "--format", "raw", "--output", str(out),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await process.communicate()
        if process.returncode != 0 or not out.exists():
            say(f"    py-spy of {name} failed: {err.decode(errors='replace').strip()[-300:]}")
            return name, {}
        return name, profile_summary(out.read_text(errors="replace"), seconds)

    return dict(await asyncio.gather(*(one(name, pid) for name, pid in pids.items())))


async def run_size(chargers: int, bootstrap: str, settings: Settings, work: Path
                   ) -> SizeResult:
    prefix = f"ocppbench-{uuid.uuid4().hex[:6]}-{chargers}."
    env = bench_env(prefix, work, settings)
    http_port, listen_port = free_port(), free_port()
    ws_port, gateway_http = free_port(), free_port()
    result = SizeResult(chargers)
    central = Service("central", [
        "evcharging.apps.ev_central.main", "--kafka-bootstrap", bootstrap,
        "--http-port", str(http_port), "--listen-port", str(listen_port)], env, work)
    gateway = Service("gateway", [
        "evcharging.apps.ev_ocpp.main", "--kafka-bootstrap", bootstrap,
        "--ws-port", str(ws_port), "--central-host", "127.0.0.1",
        "--central-port", str(http_port), "--http-port", str(gateway_http)], env, work)
    fleets, fleet_ports = [], []
    for index, (first, count) in enumerate(split(chargers, settings.fleet_processes), 1):
        fleet_ports.append(free_port())
        fleets.append(Service(
            "fleet" if settings.fleet_processes == 1 else f"fleet-{index}", [
                "evcharging.apps.ev_fleet.main", "--protocol", PROTOCOL, "--cps", str(count),
                "--first", str(first), "--id-prefix", ID_PREFIX,
                "--http-port", str(fleet_ports[-1]),
                "--ocpp-url", f"ws://127.0.0.1:{ws_port}/ocpp/"], env, work))
    config = KafkaConfig(bootstrap=bootstrap, client_id="ocpp-bench", topic_prefix=prefix)
    bus = KafkaBus(config)
    cps = [f"{ID_PREFIX}{i:05d}.1" for i in range(1, chargers + 1)]
    driver = Driver(bus, cps, result)
    reader = KafkaConsumerLoop(config, Routes().add(DriverUpdate, driver.on_update),
                               start_at="latest")
    tasks: list[asyncio.Task[None]] = []
    started: list[Service] = []
    async with contextlib.AsyncExitStack() as clients:
        central_http = await clients.enter_async_context(httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{http_port}", timeout=10, trust_env=False))
        fleet_https = [await clients.enter_async_context(httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False))
            for port in fleet_ports]
        try:
            say(f"  {chargers:,} chargers: starting Central and the gateway")
            started.append(await central.start())
            await wait_http(central_http, "/health", central, 60)
            started.append(await gateway.start())
            async with httpx.AsyncClient(timeout=5, trust_env=False) as gw:
                await wait_http(gw, f"http://127.0.0.1:{gateway_http}/health", gateway, 60)
            await bus.start()
            await reader.start()
            tasks.append(asyncio.create_task(reader.run()))
            say(f"  {chargers:,} chargers: starting the fleet"
                + (f" ({len(fleets)} processes)" if len(fleets) > 1 else ""))
            began = time.monotonic()
            for fleet in fleets:
                started.append(await fleet.start())
            result.boot_seconds, result.activated_seconds = await wait_booted(
                fleet_https, central_http, chargers, fleets, began, settings.boot_timeout)
            say(f"    booted in {result.boot_seconds:.1f} s, ACTIVATED at Central in "
                f"{result.activated_seconds:.1f} s")
            for http in fleet_https:  # the round trips after the boot storm, apart
                (await http.post("/round-trips/mark")).raise_for_status()
            sampler = ResourceSampler({"gateway": gateway.pid, "central": central.pid,
                                       **{f.name: f.pid for f in fleets}}, central_http)
            tasks.append(asyncio.create_task(sampler.run()))
            result.rate = round(chargers * settings.busy_fraction / settings.session_seconds, 3)
            say(f"    {settings.duration:g} s of driver requests at {result.rate:g}/s")
            profiling = (asyncio.create_task(profile_all(
                {"gateway": gateway.pid, **{f.name: f.pid for f in fleets}},
                settings.duration * PROFILE_SHARE, work)) if settings.profile else None)
            await driver.send(result.rate, settings.duration)
            if profiling is not None:
                result.profiles = await profiling
            await driver.wait_finals(settings.session_seconds + FINAL_WAIT)
            for service in started:
                service.check_alive()
            healths = [(await http.get("/health")).json() for http in fleet_https]
            result.fleet_health = merge_health(healths)
            result.round_trips = dict(result.fleet_health.get("round_trips", {}))
            result.steady_round_trips = dict(
                result.fleet_health.get("round_trips_since_mark") or {})
            result.usage = {name: {"cpu": usage.cpu, "rss": usage.rss}
                            for name, usage in sampler.usage.items()}
            result.load = list(sampler.load)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await reader.stop()
            with contextlib.suppress(Exception):
                await bus.stop()
            for service in reversed(started):
                await service.stop()
    unanswered = result.requests - sum(result.outcomes.values())
    result.outcomes["no final status"] = unanswered
    return result


# --------------------------------------------------------------------------- the report


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pair(a: float | None, b: float | None, digits: int = 1) -> str:
    return f"{_num(a, digits)} / {_num(b, digits)}"


BOOT_HEADER = ["chargers", "all booted (s)", "all ACTIVATED at Central (s)",
               "Heartbeat p50 / p99 (ms)", "MeterValues p50 / p99 (ms)",
               "remote start → IN_PROGRESS p50 / p99 (ms)",
               "after the boot: Heartbeat p50 / p99 (ms)",
               "after the boot: MeterValues p50 / p99 (ms)"]
RESOURCE_HEADER = ["chargers", "requests/s", "requests", "COMPLETED", "FAILED", "DENIED",
                   "no final status", "gateway CPU % mean / max", "gateway RSS MiB (max)",
                   "Central CPU % / RSS MiB", "fleet CPU % / RSS MiB",
                   "load average mean / max"]
TARGET_HEADER = ["chargers", "target", "measured", "met"]


def boot_row(r: SizeResult) -> list[str]:
    return [f"{r.chargers:,}", _num(r.boot_seconds, 1), _num(r.activated_seconds, 1),
            _pair(r.trip("Heartbeat", "p50_ms"), r.trip("Heartbeat", "p99_ms")),
            _pair(r.trip("MeterValues", "p50_ms"), r.trip("MeterValues", "p99_ms")),
            _pair(r.remote_start(50), r.remote_start(99), 0),
            _pair(r.trip("Heartbeat", "p50_ms", steady=True),
                  r.trip("Heartbeat", "p99_ms", steady=True)),
            _pair(r.trip("MeterValues", "p50_ms", steady=True),
                  r.trip("MeterValues", "p99_ms", steady=True))]


def resource_row(r: SizeResult) -> list[str]:
    return [f"{r.chargers:,}", f"{r.rate:g}", f"{r.requests:,}",
            f"{r.outcomes.get('COMPLETED', 0):,}", f"{r.outcomes.get('FAILED', 0):,}",
            f"{r.outcomes.get('DENIED', 0):,}", f"{r.outcomes.get('no final status', 0):,}",
            _pair(r.cpu_mean("gateway"), r.cpu_max("gateway"), 0), _num(r.rss_max("gateway")),
            _pair(r.cpu_mean("central"), r.rss_max("central"), 0),
            _pair(r.cpu_mean("fleet"), r.rss_max("fleet"), 0),
            _pair(r.load_mean(), max(r.load) if r.load else None, 2)]


def profile_lines(results: Sequence[SizeResult]) -> list[str]:
    """The --profile section: each process's event loop, its top functions."""
    lines: list[str] = []
    for r in results:
        for name, summary in r.profiles.items():
            if not summary:
                continue
            lines += [
                f"{r.chargers:,} chargers, {name}: the event loop on the CPU "
                f"{summary['busy_percent']:g} % of {summary['seconds']:g} s "
                f"({summary['samples']:,} samples)",
                "",
                "```text",
                "own time (% of the wall time)",
                *(f"{pct:5.1f}  {frame}" for pct, frame in summary["self"]),
                "with what it calls",
                *(f"{pct:5.1f}  {frame}" for pct, frame in summary["total"]),
                "```",
                "",
            ]
    return lines


def target_rows(r: SizeResult) -> list[list[str]]:
    rows = []
    for what, measured, limit, unit in (
        ("gateway RSS ≤ 1 GiB", r.rss_max("gateway"), TARGET_RSS_MIB, "MiB"),
        ("Heartbeat p99 < 100 ms", r.trip("Heartbeat", "p99_ms"), TARGET_HEARTBEAT_P99_MS, "ms"),
        ("remote start p99 < 1 s", r.remote_start(99), TARGET_REMOTE_START_P99_MS, "ms"),
    ):
        if measured is None:
            met = "not measured"
        elif measured <= limit:
            met = f"yes ({limit - measured:,.0f} {unit} to spare)"
        else:
            met = f"no ({measured - limit:,.0f} {unit} over)"
        rows.append([f"{r.chargers:,}", what, f"{_num(measured, 1)} {unit}", met])
    return rows


def report(results: Sequence[SizeResult], machine: Machine, settings: Settings, command: str,
           png_name: str, started: datetime, elapsed: float) -> str:
    load = ", ".join(f"{v:.2f}" for v in machine.load_at_start)
    kafka = (f"the broker at {settings.kafka_bootstrap}" if settings.kafka_bootstrap
             else "a local broker started for the run (KRaft, one node)")
    lines = [
        f"# OCPP gateway benchmark, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"`{command}` ({elapsed / 60:.1f} min)",
        "",
        "## Machine",
        "",
        f"- {machine.cpus} CPUs (`nproc`), {machine.memory_gib:.1f} GiB of memory, "
        f"{machine.cpu_model}",
        f"- Python {machine.python} on {machine.system}",
        f"- load average when the run began: {load} (1, 5, 15 min); the machine is shared, "
        "so other work ran beside this one",
        "",
        "## Settings",
        "",
        "- per size: a fresh Central, OCPP gateway (state file, topics of their own) and "
        f"CP Fleets of OCPP {PROTOCOL[4:]} chargers (`--protocol {PROTOCOL}`), one connector "
        "and one WebSocket each, "
        + ("all in one fleet process" if settings.fleet_processes == 1 else
           f"in {settings.fleet_processes} fleet processes (`--fleet-processes`)"),
        f"- heartbeats every {settings.heartbeat_interval} s (`OCPP_HEARTBEAT_INTERVAL`, each "
        "charger at its own phase); sessions of "
        f"{settings.session_seconds:g} s with MeterValues every second",
        f"- {settings.duration:g} s of driver requests at N × {settings.busy_fraction:g} ÷ "
        f"{settings.session_seconds:g} s per second, each to a charger that is free",
        f"- Kafka: {kafka}; every service logs at WARNING",
        "",
        "## Boot and round trips",
        "",
        markdown_table(BOOT_HEADER, [boot_row(r) for r in results]),
        "",
        "## Requests and resources",
        "",
        markdown_table(RESOURCE_HEADER, [resource_row(r) for r in results]),
        "",
        "## Targets",
        "",
        f"Set for {TARGET_SIZE:,} chargers on one gateway; checked at every size.",
        "",
        markdown_table(TARGET_HEADER, [row for r in results for row in target_rows(r)]),
        "",
        f"![boot, latencies and the gateway's resources against the number of chargers]"
        f"({png_name})",
        "",
        *(["## Where the time goes (py-spy)", "",
           "`py-spy record --nonblocking` of each process during the first "
           f"{PROFILE_SHARE:.0%} of the requests, {PROFILE_RATE} samples a second, its main "
           "thread (the event loop) only; % of the wall time.", "",
           *profile_lines(results)] if any(r.profiles for r in results) else []),
        "## What the columns mean",
        "",
        "- *all booted*: from starting the fleet's process until every charger's "
        "BootNotification was Accepted; *all ACTIVATED*: until Central lists every CP "
        "`X.1` ACTIVATED (the gateway registers each and reports its StatusNotification).",
        "- *Heartbeat*, *MeterValues*: the chargers' own timing of their CALLs, from sending "
        "to reading the answer, over the whole run (the boot storm included); nearest-rank "
        "percentiles; with several fleet processes, the largest of the processes' own "
        "(an upper bound). *after the boot*: the same, of the round trips after every "
        "charger booted (the boot storm left out); the targets are checked on the whole "
        "run.",
        "- *remote start → IN_PROGRESS*: from publishing a driver request to reading its "
        "first IN_PROGRESS: Central's decision, START_SUPPLY, RemoteStartTransaction, the "
        "charger's StartTransaction, SUPPLYING, its first MeterValues, telemetry, the update.",
        "- *no final status*: requests without COMPLETED, FAILED or DENIED "
        f"{FINAL_WAIT:g} s after the session length past the last request.",
        "- *CPU %*: of one core, the mean (and the largest one-second sample) after the boot; "
        "*RSS*: the largest; the fleet's: its processes' summed. *load average*: the "
        "1-minute load average, sampled every second after the boot (other work on the "
        "machine counts in it).",
        "",
    ]
    return "\n".join(lines)


def plot(results: Sequence[SizeResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.chargers for r in results]
    fig, (boot, lat, res) = plt.subplots(1, 3, figsize=(15, 5.5))

    def series(ax: Any, values: list[float | None], label: str, style: str) -> None:
        points = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)

    series(boot, [r.boot_seconds for r in results], "all booted", "o-")
    series(boot, [r.activated_seconds for r in results], "all ACTIVATED at Central", "s--")
    boot.set_ylabel("seconds")
    boot.set_title("boot")
    series(lat, [r.trip("Heartbeat", "p50_ms") for r in results], "Heartbeat p50", "o-")
    series(lat, [r.trip("Heartbeat", "p99_ms") for r in results], "Heartbeat p99", "o--")
    series(lat, [r.trip("MeterValues", "p99_ms") for r in results], "MeterValues p99", "^--")
    series(lat, [r.remote_start(50) for r in results], "remote start p50", "s-")
    series(lat, [r.remote_start(99) for r in results], "remote start p99", "s--")
    lat.axhline(TARGET_HEARTBEAT_P99_MS, color="grey", linestyle=":", linewidth=1)
    lat.axhline(TARGET_REMOTE_START_P99_MS, color="grey", linestyle=":", linewidth=1)
    lat.set_yscale("log")
    lat.set_ylabel("ms (dotted: the targets)")
    lat.set_title("round trips")
    series(res, [r.rss_max("gateway") for r in results], "gateway RSS MiB (max)", "o-")
    res.axhline(TARGET_RSS_MIB, color="grey", linestyle=":", linewidth=1)
    res.set_ylabel("MiB (dotted: 1 GiB)")
    cpu = res.twinx()
    series(cpu, [r.cpu_mean("gateway") for r in results], "gateway CPU % (mean, right)", "s--")
    cpu.set_ylabel("CPU % of one core")
    res.set_title("the gateway")
    for ax in (boot, lat, res):
        ax.set_xlabel("chargers")
        ax.grid(True, alpha=0.3)
        if len(xs) > 1:
            ax.set_xscale("log")
    res.set_ylim(bottom=0, top=max(TARGET_RSS_MIB, res.get_ylim()[1]) * 1.1)
    cpu.set_ylim(bottom=0, top=max(10.0, cpu.get_ylim()[1] * 1.15))
    below = {"fontsize": 8, "loc": "upper center", "bbox_to_anchor": (0.5, -0.14), "ncol": 2}
    boot.legend(**below)
    lat.legend(**below)
    handles, labels = res.get_legend_handles_labels()
    more_handles, more_labels = cpu.get_legend_handles_labels()
    res.legend(handles + more_handles, labels + more_labels, **below)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        description="OCPP chargers (a CP Fleet with --protocol ocpp1.6) on one OCPP gateway "
        "with Central on a real Kafka broker: boot time, Heartbeat and MeterValues round "
        "trips, remote-start round trip, the gateway's CPU and RSS. Writes a markdown "
        "report, its data (JSON) and a PNG.")
    parser.add_argument("--sizes", default=None,
                        help="numbers of chargers, separated by commas (default: "
                        f"{','.join(map(str, DEFAULT_SIZES))}; 50 with --quick)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of driver requests per size (default: 60; 20 with "
                        "--quick)")
    parser.add_argument("--session-seconds", type=float, default=None,
                        help="CP_ENGINE_SESSION_SECONDS of the chargers (default: 10; 5 with "
                        "--quick)")
    parser.add_argument("--heartbeat-interval", type=int, default=None,
                        help="OCPP_HEARTBEAT_INTERVAL (default: 30; 5 with --quick)")
    parser.add_argument("--busy-fraction", type=float, default=0.2,
                        help="share of the chargers that should be charging (default: 0.2)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 50 chargers, 20 s of requests, 5 s sessions")
    parser.add_argument("--kafka-bootstrap", default=None,
                        help="use this broker (default: start a local one for the run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where the report goes (default: benchmarks/results)")
    parser.add_argument("--boot-timeout", type=float, default=300.0,
                        help="seconds every charger gets to boot and be ACTIVATED (default: 300)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the services' logs (their folder is printed)")
    parser.add_argument("--fleet-processes", type=int, default=1,
                        help="CP Fleet processes that play the chargers, in equal runs "
                        "(default: 1)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the gateway and the fleet processes during the requests "
                        "and report their top functions (needs py-spy, and the right to "
                        "attach to them)")
    args = parser.parse_args(argv)
    text = args.sizes or ("50" if args.quick else ",".join(map(str, DEFAULT_SIZES)))
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        parser.error(f"--sizes: not numbers separated by commas: {text!r}")
    if not sizes or min(sizes) < 2 or max(sizes) > 99_999:
        parser.error("--sizes: between 2 and 99,999 chargers")
    if not 1 <= args.fleet_processes <= min(sizes):
        parser.error("--fleet-processes: from 1 to the smallest size")
    if args.profile and py_spy() is None:
        parser.error("--profile needs py-spy (pip install py-spy)")
    duration = args.duration if args.duration is not None else (20.0 if args.quick else 60.0)
    session = (args.session_seconds if args.session_seconds is not None
               else (5.0 if args.quick else 10.0))
    heartbeat = (args.heartbeat_interval if args.heartbeat_interval is not None
                 else (5 if args.quick else 30))
    if duration <= 0 or session <= 0 or heartbeat < 1 or not 0 < args.busy_fraction <= 1:
        parser.error("--duration and --session-seconds must be > 0, --heartbeat-interval "
                     ">= 1, --busy-fraction in (0, 1]")
    return Settings(sizes=sizes, duration=duration, session_seconds=session,
                    heartbeat_interval=heartbeat, busy_fraction=args.busy_fraction,
                    out=args.out, kafka_bootstrap=args.kafka_bootstrap,
                    boot_timeout=args.boot_timeout, keep_logs=args.keep_logs,
                    fleet_processes=args.fleet_processes, profile=args.profile)


@contextlib.contextmanager
def broker_for(settings: Settings, work: Path) -> Iterator[str]:
    if settings.kafka_bootstrap:
        yield settings.kafka_bootstrap
        return
    with KafkaBroker(work_dir=work / "kafka") as broker:
        yield broker.bootstrap


async def run_all(settings: Settings, work: Path, bootstrap: str) -> list[SizeResult]:
    results = []
    for chargers in settings.sizes:
        size_dir = work / f"chargers-{chargers}"
        size_dir.mkdir()
        results.append(await run_size(chargers, bootstrap, settings, size_dir))
        say(markdown_table(BOOT_HEADER, [boot_row(results[-1])]).splitlines()[-1])
    return results


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    command = " ".join(["python benchmarks/ocpp_bench.py", *(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])
    machine = Machine.read()
    started = datetime.now(tz=UTC)
    began = time.monotonic()
    say(f"OCPP benchmark: {', '.join(f'{n:,}' for n in settings.sizes)} chargers; "
        f"{settings.duration:g} s of requests each; {machine.cpus} CPUs, load average "
        f"{machine.load_at_start[0]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="ocpp-bench-"))
    try:
        with broker_for(settings, work) as bootstrap:
            results = asyncio.run(run_all(settings, work, bootstrap))
    finally:
        if settings.keep_logs:
            say(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    settings.out.mkdir(parents=True, exist_ok=True)
    stem = f"ocpp-{started:%Y-%m-%d}"
    png = settings.out / f"{stem}.png"
    plot(results, png, f"OCPP gateway benchmark {started:%Y-%m-%d}: {machine.cpus} CPUs, "
         f"OCPP {PROTOCOL[4:]}, heartbeats every {settings.heartbeat_interval} s")
    text = report(results, machine, settings, command, png.name, started,
                  time.monotonic() - began)
    (settings.out / f"{stem}.md").write_text(text, encoding="utf-8")
    (settings.out / f"{stem}.json").write_text(json.dumps(
        {"machine": machine.__dict__, "settings": {**settings.__dict__, "out": str(settings.out)},
         "results": [r.as_dict() for r in results]}, indent=1, default=str) + "\n",
        encoding="utf-8")
    say("")
    say(markdown_table(BOOT_HEADER, [boot_row(r) for r in results]))
    say("")
    say(markdown_table(RESOURCE_HEADER, [resource_row(r) for r in results]))
    say("")
    say(markdown_table(TARGET_HEADER, [row for r in results for row in target_rows(r)]))
    say("")
    say(f"report: {settings.out / (stem + '.md')}\nplot:   {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
