"""CP Fleet benchmark: Central, one CP Fleet and the driver load on a real Kafka broker.

    .venv/bin/python benchmarks/fleet_bench.py                     # 100, 1,000, 3,000, 10,000 CPs
    .venv/bin/python benchmarks/fleet_bench.py --sizes 100 --quick # ~40 s
    make bench-fleet                                               # the full set

For each size N it starts, on fresh topics (a prefix of their own), a fresh database and
free ports: EV Central, then one CP Fleet of N CPs (``CP-00001`` …), and times how long
until Central lists all N ACTIVATED (``GET /cp?state=ACTIVATED``, ``X-Total-Count``). Then
it runs the driver load generator (``ev_load``) at N/2 ÷ session length new drivers per
second for ``--duration`` seconds, so that about half the CPs are supplying once the first
sessions have run their length (Little's law), each session sending telemetry every second.
Meanwhile it samples, every second:

* **telemetry → IN_PROGRESS**: a consumer of ``cp.telemetry`` and ``driver.updates`` that
  follows a sample of the CPs (about 200) and matches each IN_PROGRESS update to the
  telemetry message it was made from (same session, same kWh); the latency is from the
  telemetry's ``ts`` (when the CP metered) to when the update arrived here (what a driver
  sees). Central may send one update for several telemetry messages of a session read in
  one batch; only the telemetry an update carries is matched.
* **Central's consumer lag**, as Central reports it on ``GET /metrics``: the messages its
  consumer has not read yet (``evcharging_consumer_lag_messages``) and how far behind it
  reads the CPs' reports (``evcharging_central_lag_seconds``). (``/health`` and ``/stats``
  do not carry it.)
* **resources**: CPU % (of one core) and RSS of Central and of the fleet from ``/proc``,
  the machine's 1-minute load average, and how many CPs Central shows SUPPLYING
  (``GET /summary``).

The load generator's ``--json`` summary gives request → ACCEPTED p50/p90/p99 and the
outcomes. A session FAILED because "CP did not confirm the start" counts against Central
(SPEC §4: no session fails for Central's own delay); DENIED "Central overloaded" is
Central shedding load as it should when behind, counted apart. Once the services have
stopped, ``driver.updates`` and ``cp.status`` are read from the start (``read_committed``)
to count the sessions Central FAILED though their CP's own meter reported them COMPLETED
(an end status or a heartbeat's ``last_session``): SPEC §4 wants 0, also above the
fleet's ceiling (an overload run: ``--sizes`` above what the machine carries).

Writes ``<out>/fleet-<date>.md`` (the machine, the settings, two tables, notes) and
``<out>/fleet-<date>.png`` (latency, lag and CPU against the number of CPs), and prints the
tables. Central and the fleet log at WARNING (at INFO they write a line per CP change).
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shlex
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evcharging.apps.ev_load.stats import percentile
from evcharging.common.bus import Topic
from evcharging.common.kafka import KafkaConfig, ensure_topics
from evcharging.devtools.kafka_broker import KafkaBroker

DEFAULT_SIZES = (100, 1000, 3000, 10_000)
DEFAULT_OUT = ROOT / "benchmarks" / "results"
SAMPLE_CPS = 200
"""About this many CPs are followed for telemetry → IN_PROGRESS."""
SAMPLE_EVERY = 1.0
SUMMARY_EVERY = 2.0
SERVICE_PREFIXES = ("CENTRAL_", "CP_ENGINE_", "CP_MONITOR_", "DRIVER_", "FLEET_", "LOAD_",
                    "EVCHARGING_")
START_NOT_CONFIRMED = "did not confirm the start"
OVERLOADED = "Central overloaded"


# --------------------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Machine:
    cpus: int
    memory_gib: float
    cpu_model: str
    python: str
    system: str
    load_at_start: tuple[float, float, float]

    @classmethod
    def read(cls) -> Machine:
        return cls(
            cpus=os.cpu_count() or 0,
            memory_gib=_meminfo_kib("MemTotal") / 1024 / 1024,
            cpu_model=_cpu_model(),
            python=platform.python_version(),
            system=platform.platform(),
            load_at_start=os.getloadavg(),
        )


def _meminfo_kib(name: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """One child process (``python -m module``), its output in a log file."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], work: Path) -> None:
        self.name = name
        self.args = [sys.executable, "-m", *args]
        self.env = env
        self.work = work
        self.log_path = work / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, stdout: int | None = None) -> Service:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.args, cwd=self.work, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout if stdout is not None else log, stderr=log,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_alive(self) -> None:
        if self.process is not None and self.process.returncode is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see "
                               f"{self.log_path}:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def stop(self, timeout: float = 60.0) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def service_env(prefix: str, work: Path, session_seconds: float) -> dict[str, str]:
    """The children's environment: no service settings of the caller's, fresh topics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_PREFIXES)}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        "CENTRAL_TOPIC_PREFIX": prefix,
        "FLEET_TOPIC_PREFIX": prefix,
        "LOAD_TOPIC_PREFIX": prefix,
        "CENTRAL_GROUP_ID": f"{prefix}central",
        "CENTRAL_DB_PATH": str(work / "central.db"),
        "CENTRAL_LOG_LEVEL": "WARNING",
        "FLEET_LOG_LEVEL": "WARNING",
        "LOAD_LOG_LEVEL": "WARNING",
        "CP_ENGINE_SESSION_SECONDS": f"{session_seconds:g}",
        "CP_ENGINE_TELEMETRY_INTERVAL": "1",
    })
    return env


# --------------------------------------------------------------------------- samplers


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


def _rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


@dataclass
class Usage:
    """CPU % (of one core) and RSS (MiB) samples of one process."""

    cpu: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)


class ResourceSampler:
    """CPU and RSS of some processes, the load average, and Central's SUPPLYING count."""

    def __init__(self, pids: dict[str, int], http: httpx.AsyncClient) -> None:
        self.pids = pids
        self.http = http
        self.usage = {name: Usage() for name in pids}
        self.load: list[float] = []
        self.supplying: list[tuple[float, int]] = []
        self._hz = os.sysconf("SC_CLK_TCK")

    async def run(self) -> None:
        last = {name: _cpu_ticks(pid) for name, pid in self.pids.items()}
        last_at = time.monotonic()
        next_summary = last_at
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            now = time.monotonic()
            for name, pid in self.pids.items():
                ticks, rss = _cpu_ticks(pid), _rss_mib(pid)
                before = last[name]
                if ticks is not None and before is not None:
                    self.usage[name].cpu.append(100 * (ticks - before) / self._hz / (now - last_at))
                if rss is not None:
                    self.usage[name].rss.append(rss)
                last[name] = ticks
            last_at = now
            self.load.append(os.getloadavg()[0])
            if now >= next_summary:
                next_summary = now + SUMMARY_EVERY
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    summary = (await self.http.get("/summary")).json()
                    self.supplying.append((now, int(summary["supplying"])))


class LagSampler:
    """Central's consumer lag, as Central reports it on ``GET /metrics``: the messages its
    consumer has not read yet (``evcharging_consumer_lag_messages``, summed over the
    partitions, as of its last fetch) and how far behind it reads the CPs' reports
    (``evcharging_central_lag_seconds``)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.samples: list[tuple[float, float, float]] = []
        """(monotonic time, messages behind, seconds behind)."""

    async def run(self) -> None:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                response = await self.http.get("/metrics")
                if response.status_code == 200:
                    values = prometheus_values(response.text)
                    messages = values.get("evcharging_consumer_lag_messages")
                    seconds = values.get("evcharging_central_lag_seconds")
                    if messages is not None and seconds is not None:
                        self.samples.append((time.monotonic(), messages, seconds))
            await asyncio.sleep(SAMPLE_EVERY)


def prometheus_values(text: str) -> dict[str, float]:
    """Each metric of a Prometheus text exposition, its samples summed over the labels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        # A label's value may hold spaces: the sample's value follows the last "}".
        head, _, rest = line.rpartition("}") if "}" in line else line.partition(" ")
        with contextlib.suppress(ValueError, IndexError):
            name = head.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(rest.split()[0])
    return values


class TelemetryProbe:
    """Telemetry → IN_PROGRESS latency of a sample of the CPs (see the module's doc)."""

    def __init__(self, bootstrap: str, prefix: str, cps: int) -> None:
        self.config = KafkaConfig(bootstrap=bootstrap, client_id="fleet-bench-probe",
                                  topic_prefix=prefix)
        stride = max(1, cps // SAMPLE_CPS)
        self.sampled = {f"CP-{n:05d}" for n in range(1, cps + 1, stride)}
        self._keys = {cp_id.encode() for cp_id in self.sampled}
        self._telemetry = self.config.topic_name(Topic.CP_TELEMETRY)
        self._metered: dict[tuple[str, float], float] = {}
        """(session, kWh) → the telemetry's ts (epoch seconds)."""
        self._updated: dict[tuple[str, float], float] = {}
        """(session, kWh) → when its IN_PROGRESS update arrived here (epoch seconds)."""
        self.latencies: list[float] = []
        self.consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        """Subscribe from the end, with the positions resolved (nothing later is missed)."""
        topics = (Topic.CP_TELEMETRY, Topic.DRIVER_UPDATES)
        known = await ensure_topics(self.config, topics)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.config.bootstrap, group_id=None,
                                    client_id="fleet-bench-probe", fetch_max_wait_ms=100)
        await consumer.start()
        partitions = [TopicPartition(name, p) for name, ps in known.items() for p in ps]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)
        self.consumer = consumer

    async def run(self) -> None:
        assert self.consumer is not None
        last_prune = time.monotonic()
        while True:
            batch = await self.consumer.getmany(timeout_ms=500)
            arrived = time.time()
            for tp, records in batch.items():
                if tp.topic == self._telemetry:
                    for record in records:
                        if record.key in self._keys and record.value is not None:
                            self._on_telemetry(json.loads(record.value))
                else:
                    for record in records:
                        value = record.value
                        if value is not None and b"IN_PROGRESS" in value:
                            self._on_update(json.loads(value), arrived)
            if time.monotonic() - last_prune > 30:
                last_prune = time.monotonic()
                self._prune(arrived - 60)

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()

    def _on_telemetry(self, telemetry: dict[str, Any]) -> None:
        if telemetry.get("session_id") is None:
            return
        key = (str(telemetry["session_id"]), float(telemetry["kwh"]))
        metered = _epoch(str(telemetry["ts"]))
        updated = self._updated.pop(key, None)
        if updated is not None:
            self.latencies.append(updated - metered)
        else:
            self._metered[key] = metered

    def _on_update(self, update: dict[str, Any], arrived: float) -> None:
        if update.get("status") != "IN_PROGRESS" or update.get("cp_id") not in self.sampled:
            return
        if update.get("session_id") is None or update.get("kwh") is None:
            return
        key = (str(update["session_id"]), float(update["kwh"]))
        metered = self._metered.pop(key, None)
        if metered is not None:
            self.latencies.append(arrived - metered)
        else:  # the telemetry is still on its way to this consumer
            self._updated[key] = arrived

    def _prune(self, before: float) -> None:
        for table in (self._metered, self._updated):
            for key in [k for k, at in table.items() if at < before]:
                del table[key]


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


async def failed_though_completed(bootstrap: str, prefix: str,
                                  idle: float = 10.0) -> tuple[int, int]:
    """(sessions whose driver got FAILED though their CP reported them COMPLETED, sessions
    whose driver got FAILED): ``driver.updates`` and ``cp.status`` of the run read from
    the start to their end as of now. Stops early when nothing arrives for `idle` s."""
    config = KafkaConfig(bootstrap=bootstrap, client_id="fleet-bench-ledger", topic_prefix=prefix)
    topics = (Topic.DRIVER_UPDATES, Topic.CP_STATUS)
    names = {config.topic_name(t): t for t in topics}
    known = await ensure_topics(config, topics)
    partitions = [TopicPartition(name, p) for name, ps in known.items() for p in ps]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                client_id="fleet-bench-ledger", enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    failed: set[str] = set()
    completed: set[str] = set()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        last = time.monotonic()

        async def behind() -> bool:
            return any([await consumer.position(tp) < end for tp, end in ends.items()])

        while await behind():
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if batch:
                last = time.monotonic()
            elif time.monotonic() - last > idle:
                break
            for tp, records in batch.items():
                status = names[tp.topic] is Topic.CP_STATUS
                for record in records:
                    if record.value is None:
                        continue
                    with contextlib.suppress(ValueError, TypeError, AttributeError):
                        message = json.loads(record.value)
                        if status:
                            _note_end(message, completed)
                        elif message.get("status") == "FAILED" and message.get("session_id"):
                            failed.add(str(message["session_id"]))
    finally:
        await consumer.stop()
    return len(failed & completed), len(failed)


def _note_end(status: dict[str, Any], completed: set[str]) -> None:
    """Add the session a CP status reports COMPLETED (its own end, or a heartbeat's
    ``last_session``) to `completed`."""
    if status.get("session_result") == "COMPLETED" and status.get("session_id"):
        completed.add(str(status["session_id"]))
    last = status.get("last_session")
    if isinstance(last, dict) and last.get("result") == "COMPLETED" and last.get("session_id"):
        completed.add(str(last["session_id"]))


# --------------------------------------------------------------------------- one size


@dataclass
class SizeResult:
    cps: int
    to_activated_s: float
    rate: float
    achieved_rate: float
    load: dict[str, Any]
    telemetry_ms: list[float]
    lag: list[tuple[float, float, float]]
    supplying: list[int]
    usage: dict[str, Usage]
    load_avg: list[float]
    central_stats: dict[str, Any]
    fleet_health: dict[str, Any]
    failed_completed: int | None = None
    """Sessions FAILED though the CP completed them (None: not counted)."""

    # --- derived numbers (None when nothing was measured)

    def accepted(self, q: str) -> float | None:
        value = self.load.get("latency_ms", {}).get("accepted", {}).get(q)
        return None if value is None else float(value)

    def telemetry(self, q: float) -> float | None:
        return percentile(self.telemetry_ms, q) if self.telemetry_ms else None

    def lag_messages(self, q: float) -> float | None:
        values = [messages for _, messages, _ in self.lag]
        return percentile(values, q) if values else None

    def lag_seconds(self, q: float) -> float | None:
        values = [seconds for _, _, seconds in self.lag]
        return percentile(values, q) if values else None

    def supplying_mean(self) -> float | None:
        return sum(self.supplying) / len(self.supplying) if self.supplying else None

    def outcome(self, name: str) -> int:
        return int(self.load.get("outcomes", {}).get(name, 0))

    def failed_start(self) -> int:
        reasons = self.load.get("failed_by_reason", {})
        return sum(int(n) for reason, n in reasons.items() if START_NOT_CONFIRMED in reason)

    def denied_overloaded(self) -> int:
        return int(self.load.get("denied_by_reason", {}).get(OVERLOADED, 0))

    def cpu_mean(self, name: str) -> float | None:
        values = self.usage[name].cpu
        return sum(values) / len(values) if values else None

    def rss_max(self, name: str) -> float | None:
        values = self.usage[name].rss
        return max(values) if values else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "cps": self.cps,
            "to_activated_s": round(self.to_activated_s, 2),
            "rate": self.rate,
            "achieved_rate": self.achieved_rate,
            "supplying_mean": self.supplying_mean(),
            "accepted_ms": {q: self.accepted(q) for q in ("p50", "p90", "p99")},
            "telemetry_to_in_progress_ms": {
                "count": len(self.telemetry_ms), "p50": self.telemetry(50),
                "p99": self.telemetry(99),
            },
            "central_lag": {"samples": len(self.lag),
                            "p50_messages": self.lag_messages(50),
                            "max_messages": self.lag_messages(100),
                            "p50_seconds": self.lag_seconds(50),
                            "max_seconds": self.lag_seconds(100)},
            "failed_start_not_confirmed": self.failed_start(),
            "denied_overloaded": self.denied_overloaded(),
            "failed_though_cp_completed": self.failed_completed,
            "cpu_percent_mean": {name: self.cpu_mean(name) for name in self.usage},
            "rss_mib_max": {name: self.rss_max(name) for name in self.usage},
            "load_average_max": max(self.load_avg) if self.load_avg else None,
            "load_summary": self.load,
            "central_stats": self.central_stats,
            "fleet_health": self.fleet_health,
        }


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    duration: float
    session_seconds: float
    busy_fraction: float
    out: Path
    kafka_bootstrap: str | None
    activate_timeout: float
    keep_logs: bool


def say(text: str) -> None:
    print(text, flush=True)


async def wait_all_activated(http: httpx.AsyncClient, cps: int, fleet: Service,
                             timeout: float) -> float:
    """Seconds until Central lists `cps` CPs ACTIVATED (a deadline of `timeout` s)."""
    began = time.monotonic()
    next_line = began + 5
    count = 0
    while True:
        fleet.check_alive()
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            response = await http.get("/cp", params={"state": "ACTIVATED", "limit": 1})
            count = int(response.headers["X-Total-Count"])
        now = time.monotonic()
        if count >= cps:
            return now - began
        if now - began > timeout:
            raise RuntimeError(f"only {count} of {cps} CPs ACTIVATED after {timeout:g} s; see "
                               f"{fleet.log_path}")
        if now >= next_line:
            next_line = now + 5
            say(f"    {count:,}/{cps:,} ACTIVATED after {now - began:.0f} s")
        await asyncio.sleep(0.25)


async def wait_http(http: httpx.AsyncClient, path: str, service: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        service.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get(path)).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{service.name} did not answer {path} within {timeout:g} s:\n"
                               f"{service.tail()}")
        await asyncio.sleep(0.2)


async def run_size(cps: int, bootstrap: str, settings: Settings, work: Path,
                   broker_pid: int | None) -> SizeResult:
    prefix = f"bench-{uuid.uuid4().hex[:6]}-{cps}."
    env = service_env(prefix, work, settings.session_seconds)
    http_port, listen_port, fleet_port = free_port(), free_port(), free_port()
    rate = round(cps * settings.busy_fraction / settings.session_seconds, 3)
    central = Service("central", [
        "evcharging.apps.ev_central.main", "--kafka-bootstrap", bootstrap,
        "--http-port", str(http_port), "--listen-port", str(listen_port),
    ], env, work)
    fleet = Service("fleet", [
        "evcharging.apps.ev_fleet.main", "--kafka-bootstrap", bootstrap, "--cps", str(cps),
        "--id-prefix", "CP-", "--http-port", str(fleet_port), "--central-host", "127.0.0.1",
        "--central-port", str(http_port), "--seed", "1",
    ], env, work)
    load = Service("load", [
        "evcharging.apps.ev_load.main", "--kafka-bootstrap", bootstrap, "--rate", f"{rate:g}",
        "--duration", f"{settings.duration:g}", "--json", "--seed", "1",
        "--central-url", f"http://127.0.0.1:{http_port}", "--cps", str(cps),
        "--cp-prefix", "CP-", "--progress-interval", "10",
    ], env, work)
    services = [load, fleet, central]  # stop order
    tasks: list[asyncio.Task[None]] = []
    probe = TelemetryProbe(bootstrap, prefix, cps)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=10,
                                 trust_env=False) as http:
        try:
            await central.start()
            await wait_http(http, "/health", central, 60)
            await fleet.start()
            say(f"  {cps:,} CPs: fleet started; waiting until Central lists them ACTIVATED")
            to_activated = await wait_all_activated(http, cps, fleet, settings.activate_timeout)
            say(f"  {cps:,} CPs ACTIVATED in {to_activated:.1f} s; load {rate:g} drivers/s for "
                f"{settings.duration:g} s (sessions of {settings.session_seconds:g} s)")
            pids = {"central": central.pid, "fleet": fleet.pid}
            if broker_pid is not None:
                pids["broker"] = broker_pid
            await probe.start()
            lag = LagSampler(http)
            await load.start(stdout=asyncio.subprocess.PIPE)
            pids["load"] = load.pid
            pids["bench"] = os.getpid()  # its probes cost CPU too
            resources = ResourceSampler(pids, http)
            tasks = [asyncio.create_task(job.run()) for job in (probe, lag, resources)]
            load_began = time.monotonic()
            assert load.process is not None
            limit = settings.duration + settings.session_seconds + 180
            out, _ = await asyncio.wait_for(load.process.communicate(), limit)
            load_ended = time.monotonic()
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise RuntimeError("a sampler failed") from task.exception()
            summary = json.loads(out.decode().strip().splitlines()[-1])
            steady = (load_began + settings.session_seconds, load_began + settings.duration)
            stats = (await http.get("/stats")).json()
            fleet_health = (await http.get(f"http://127.0.0.1:{fleet_port}/health")).json()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await probe.stop()
            for service in services:
                await service.stop()
    say(f"  {cps:,} CPs: reading the ledger (driver.updates, cp.status)")
    failed_completed, failed_sessions = await failed_though_completed(bootstrap, prefix)
    say(f"  {cps:,} CPs: {failed_completed:,} of {failed_sessions:,} FAILED sessions were "
        "COMPLETED by their CP")
    in_load = [(t, lag_, r) for t, lag_, r in lag.samples if load_began <= t <= load_ended]
    return SizeResult(
        cps=cps, to_activated_s=to_activated, rate=rate,
        achieved_rate=float(summary.get("achieved_rate", 0.0)), load=summary,
        telemetry_ms=[1000 * v for v in probe.latencies],
        lag=in_load,
        supplying=[n for t, n in resources.supplying if steady[0] <= t <= steady[1]],
        usage=resources.usage,
        load_avg=resources.load, central_stats=stats, fleet_health=fleet_health,
        failed_completed=failed_completed,
    )


# --------------------------------------------------------------------------- the report


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _group(*values: float | None, digits: int = 0) -> str:
    return " / ".join(_num(v, digits) for v in values)


LATENCY_HEADER = (
    "CPs", "to ACTIVATED (s)", "drivers/s asked / got", "supplying (mean)",
    "request→ACCEPTED p50 / p90 / p99 (ms)", "telemetry→IN_PROGRESS p50 / p99 (ms)",
    "Central lag p50 / max (msgs)", "Central lag p50 / max (s)",
)
OUTCOME_HEADER = (
    "CPs", "drivers", "completed", "FAILED start not confirmed", "FAILED other",
    "FAILED though the CP completed", "DENIED overloaded", "DENIED other",
    "no free CP / timed out", "Central CPU % / RSS MiB",
    "fleet CPU % / RSS MiB", "fleet publish errors", "load gen / bench CPU %", "broker CPU %",
    "load avg 1 min (max)",
)


def latency_row(r: SizeResult) -> list[str]:
    return [
        f"{r.cps:,}", _num(r.to_activated_s, 1), _group(r.rate, r.achieved_rate, digits=1),
        _num(r.supplying_mean()),
        _group(r.accepted("p50"), r.accepted("p90"), r.accepted("p99"), digits=1),
        _group(r.telemetry(50), r.telemetry(99), digits=1),
        _group(r.lag_messages(50), r.lag_messages(100)),
        _group(r.lag_seconds(50), r.lag_seconds(100), digits=2),
    ]


def outcome_row(r: SizeResult) -> list[str]:
    failed = r.outcome("failed")
    denied = r.outcome("denied")
    return [
        f"{r.cps:,}", f"{int(r.load.get('arrivals', 0)):,}", f"{r.outcome('completed'):,}",
        f"{r.failed_start():,}", f"{failed - r.failed_start():,}",
        _num(r.failed_completed),
        f"{r.denied_overloaded():,}", f"{denied - r.denied_overloaded():,}",
        f"{r.outcome('no_free_cp'):,} / {r.outcome('timed_out'):,}",
        _group(r.cpu_mean("central"), r.rss_max("central")),
        _group(r.cpu_mean("fleet"), r.rss_max("fleet")),
        f"{int(r.fleet_health.get('bus', {}).get('publish_errors', 0)):,}",
        _group(r.cpu_mean("load"), r.cpu_mean("bench")),
        _num(r.cpu_mean("broker") if "broker" in r.usage else None),
        _num(max(r.load_avg) if r.load_avg else None, 2),
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report(results: Sequence[SizeResult], machine: Machine, settings: Settings,
           command: str, png_name: str, started: datetime, elapsed: float) -> str:
    load = ", ".join(f"{v:.2f}" for v in machine.load_at_start)
    lines = [
        f"# CP Fleet benchmark, {started:%Y-%m-%d %H:%M} UTC",
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
        f"- per size: a fresh Central (SQLite database, topics of its own) and one CP Fleet; "
        f"{settings.duration:g} s of driver arrivals at N × {settings.busy_fraction:g} ÷ "
        f"{settings.session_seconds:g} s per second (so about "
        f"{settings.busy_fraction:.0%} of the CPs supply), one request per driver",
        f"- sessions of {settings.session_seconds:g} s (`CP_ENGINE_SESSION_SECONDS`), "
        "telemetry every second, heartbeats every 5 s, fleet monitoring every 5 s; "
        "Central and the fleet log at WARNING",
        f"- Kafka: {'the broker at ' + settings.kafka_bootstrap if settings.kafka_bootstrap else 'a local broker started for the run (KRaft, one node)'}"  # noqa: E501
        ", topics of 3 partitions",
        "",
        "## Latency and lag",
        "",
        markdown_table(LATENCY_HEADER, [latency_row(r) for r in results]),
        "",
        "## Outcomes and resources",
        "",
        markdown_table(OUTCOME_HEADER, [outcome_row(r) for r in results]),
        "",
        f"![latency, lag and CPU against the number of CPs]({png_name})",
        "",
        "## What the columns mean",
        "",
        "- *to ACTIVATED*: from starting the fleet until Central lists every CP ACTIVATED.",
        "- *supplying (mean)*: CPs Central shows SUPPLYING, sampled every 2 s once the first "
        "sessions have run their length, until the last arrival.",
        "- *request→ACCEPTED*: the load generator's, from publishing a request to reading "
        "its ACCEPTED (nearest-rank percentiles).",
        f"- *telemetry→IN_PROGRESS*: about {SAMPLE_CPS} CPs followed; from the telemetry's "
        "`ts` to the arrival of the IN_PROGRESS update that carries its kWh.",
        "- *Central lag*: what Central reports on `GET /metrics`, read every second during "
        "the load: the messages its consumer has not read yet "
        "(`evcharging_consumer_lag_messages`, all partitions, as of its last fetch) and how "
        "far behind it reads the CPs' reports (`evcharging_central_lag_seconds`).",
        "- *FAILED start not confirmed*: sessions Central failed because the CP did not "
        "confirm the start in time (SPEC §4 wants none); *DENIED overloaded*: requests Central "
        "refused because it read them more than `CENTRAL_SHED_AFTER` late.",
        "- *FAILED though the CP completed*: sessions whose driver got FAILED while their "
        "CP's own meter reported them COMPLETED (end status or a heartbeat's "
        "`last_session`), read from the topics after the run; SPEC §4 wants 0, at every "
        "size, above the ceiling too.",
        "- *fleet publish errors*: messages the fleet's producer could not deliver (its "
        "`/health`, at the end); a CP whose status or telemetry does not leave looks silent "
        "to Central.",
        "- *CPU %*: of one core, the mean over the load (*bench*: this script, with its "
        "probes); *RSS*: the largest; *load avg*: "
        "the machine's, the largest during the load (above the number of CPUs, the processes "
        "measured here waited for a core).",
        "",
    ]
    return "\n".join(lines)


def plot(results: Sequence[SizeResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.cps for r in results]
    fig, (lat, lag, cpu) = plt.subplots(1, 3, figsize=(15, 5.5))

    def series(ax: Any, values: list[float | None], label: str, style: str) -> None:
        points = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)

    series(lat, [r.accepted("p50") for r in results], "request→ACCEPTED p50", "o-")
    series(lat, [r.accepted("p99") for r in results], "request→ACCEPTED p99", "o--")
    series(lat, [r.telemetry(50) for r in results], "telemetry→IN_PROGRESS p50", "s-")
    series(lat, [r.telemetry(99) for r in results], "telemetry→IN_PROGRESS p99", "s--")
    lat.set_ylabel("ms")
    lat.set_title("latency")
    series(lag, [r.lag_messages(50) for r in results], "lag p50 (messages)", "o-")
    series(lag, [r.lag_messages(100) for r in results], "lag max (messages)", "o--")
    lag.set_ylabel("messages behind")
    lag.set_title("Central's consumer lag")
    seconds = lag.twinx()
    series(seconds, [r.lag_seconds(100) for r in results], "lag max (s, right)", "^:")
    seconds.set_ylabel("seconds behind (max)")
    series(cpu, [r.cpu_mean("central") for r in results], "Central", "o-")
    series(cpu, [r.cpu_mean("fleet") for r in results], "CP Fleet", "s-")
    series(cpu, [r.cpu_mean("load") for r in results], "load generator", "^-")
    if any("broker" in r.usage for r in results):
        series(cpu, [r.cpu_mean("broker") if "broker" in r.usage else None for r in results],
               "Kafka broker", "d-")
    cpu.set_ylabel("CPU % of one core (mean)")
    cpu.set_title("CPU")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _pos: f"{value:g}")
    for ax in (lat, lag, cpu):
        ax.set_xscale("log")
        ax.set_xlabel("CPs")
        ax.xaxis.set_major_formatter(plain)
        ax.grid(True, which="both", alpha=0.3)
    lat.set_yscale("log")
    lat.yaxis.set_major_formatter(plain)
    lat.yaxis.set_minor_formatter(FuncFormatter(lambda _value, _pos: ""))
    for ax in (lag, seconds, cpu):
        ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1] * 1.15))
    below = {"fontsize": 8, "loc": "upper center", "bbox_to_anchor": (0.5, -0.16), "ncol": 2}
    handles, labels = lag.get_legend_handles_labels()
    more_handles, more_labels = seconds.get_legend_handles_labels()
    lag.legend(handles + more_handles, labels + more_labels, **below)
    lat.legend(**below)
    cpu.legend(**below)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        description="Central, a CP Fleet and the driver load at several network sizes, on a "
        "real Kafka broker: time to ACTIVATED, latencies, Central's lag, outcomes, CPU and "
        "memory. Writes a markdown report and a PNG.",
    )
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="numbers of CPs, separated by commas (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of driver arrivals per size (default: 120; 20 with "
                        "--quick)")
    parser.add_argument("--session-seconds", type=float, default=None,
                        help="CP_ENGINE_SESSION_SECONDS (default: 10; 5 with --quick)")
    parser.add_argument("--busy-fraction", type=float, default=0.5,
                        help="share of the CPs that should be supplying (default: 0.5)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 20 s of load and 5 s sessions per size")
    parser.add_argument("--kafka-bootstrap", default=None,
                        help="use this broker (default: start a local one for the run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where the report and the plot go (default: benchmarks/results)")
    parser.add_argument("--activate-timeout", type=float, default=300.0,
                        help="seconds a fleet gets until every CP is ACTIVATED (default: 300)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the services' logs (their folder is printed)")
    args = parser.parse_args(argv)
    try:
        sizes = tuple(int(part) for part in args.sizes.split(",") if part.strip())
    except ValueError:
        parser.error(f"--sizes: not numbers separated by commas: {args.sizes!r}")
    if not sizes or min(sizes) < 2:
        parser.error("--sizes needs at least one size of 2 CPs or more")
    duration = args.duration if args.duration is not None else (20.0 if args.quick else 120.0)
    session = (args.session_seconds if args.session_seconds is not None
               else (5.0 if args.quick else 10.0))
    if duration <= 0 or session <= 0 or not 0 < args.busy_fraction <= 1:
        parser.error("--duration and --session-seconds must be > 0, --busy-fraction in (0, 1]")
    return Settings(sizes=sizes, duration=duration, session_seconds=session,
                    busy_fraction=args.busy_fraction, out=args.out,
                    kafka_bootstrap=args.kafka_bootstrap, activate_timeout=args.activate_timeout,
                    keep_logs=args.keep_logs)


@contextlib.contextmanager
def broker_for(settings: Settings, work: Path) -> Iterator[tuple[str, int | None]]:
    if settings.kafka_bootstrap:
        yield settings.kafka_bootstrap, None
        return
    with KafkaBroker(work_dir=work / "kafka") as broker:
        yield broker.bootstrap, broker.pid


async def run_all(settings: Settings, work: Path, bootstrap: str,
                  broker_pid: int | None) -> list[SizeResult]:
    results = []
    for cps in settings.sizes:
        size_dir = work / f"cps-{cps}"
        size_dir.mkdir()
        results.append(await run_size(cps, bootstrap, settings, size_dir, broker_pid))
        say(markdown_table(LATENCY_HEADER, [latency_row(results[-1])]).splitlines()[-1])
    return results


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    command = " ".join(["python benchmarks/fleet_bench.py", *(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])
    machine = Machine.read()
    started = datetime.now(tz=UTC)
    began = time.monotonic()
    say(f"fleet benchmark: sizes {', '.join(f'{n:,}' for n in settings.sizes)}; "
        f"{settings.duration:g} s of load each; {machine.cpus} CPUs, load average "
        f"{machine.load_at_start[0]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    try:
        with broker_for(settings, work) as (bootstrap, broker_pid):
            results = asyncio.run(run_all(settings, work, bootstrap, broker_pid))
    finally:
        if settings.keep_logs:
            say(f"logs kept in {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    settings.out.mkdir(parents=True, exist_ok=True)
    stem = f"fleet-{started:%Y-%m-%d}"
    png = settings.out / f"{stem}.png"
    title = (f"CP Fleet benchmark {started:%Y-%m-%d}: {machine.cpus} CPUs, "
             f"{settings.duration:g} s of load per size, sessions of "
             f"{settings.session_seconds:g} s")
    plot(results, png, title)
    text = report(results, machine, settings, command, png.name, started,
                  time.monotonic() - began)
    (settings.out / f"{stem}.md").write_text(text, encoding="utf-8")
    (settings.out / f"{stem}.json").write_text(
        json.dumps({"machine": machine.__dict__, "results": [r.as_dict() for r in results]},
                   indent=1, default=str) + "\n", encoding="utf-8")
    say("")
    say(markdown_table(LATENCY_HEADER, [latency_row(r) for r in results]))
    say("")
    say(markdown_table(OUTCOME_HEADER, [outcome_row(r) for r in results]))
    say("")
    say(f"report: {settings.out / (stem + '.md')}\nplot:   {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
