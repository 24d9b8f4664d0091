"""CP Fleet benchmark: Central, one CP Fleet and the driver load on a real Kafka broker.

    .venv/bin/python benchmarks/fleet_bench.py                     # 100, 1,000, 3,000, 10,000 CPs
    .venv/bin/python benchmarks/fleet_bench.py --sizes 100 --quick # ~40 s
    make bench-fleet                                               # the full set
    make bench-fleet ARGS="--sizes 10000 --centrals 1,2"           # 1 and 2 Centrals

With ``--centrals 1,2`` each size runs once per number of Centrals, at the same load:
several Centrals share the work (SPEC §9) on a local PostgreSQL
(``evcharging.devtools.postgres``, one fresh database per run), each with its own
``CENTRAL_INSTANCE_ID``, ports and ``CENTRAL_PEER_URL``; the fleet and the load generator
are given every Central's address, and the load starts once the Centrals have shared the
partitions (``/health``). A table then shows each Central's partitions, the CPs they hold,
its CPU, its CPU per 1,000 of those CPs and per message it handled.

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
from evcharging.common.kafka import KafkaConfig, ensure_topics, partition_for_key
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


def service_env(prefix: str, work: Path, session_seconds: float,
                partitions: int = 12) -> dict[str, str]:
    """The children's environment: no service settings of the caller's, fresh topics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_PREFIXES)}
    env.update({
        "CENTRAL_TOPIC_PARTITIONS": str(partitions),
        "FLEET_TOPIC_PARTITIONS": str(partitions),
        "LOAD_TOPIC_PARTITIONS": str(partitions),
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


def _tree_ticks(pid: int) -> int | None:
    """CPU ticks of a process and its children (PostgreSQL: the postmaster and its
    backends); a backend that ended since the last reading takes its ticks with it."""
    if _cpu_ticks(pid) is None:
        return None
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += _cpu_ticks(current) or 0
        todo.extend(children.get(current, ()))
    return total


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
    """CPU and RSS of some processes, the load average, and Central's SUPPLYING count.
    The processes named in `trees` are counted with their children (CPU only)."""

    def __init__(self, pids: dict[str, int], http: httpx.AsyncClient,
                 trees: frozenset[str] = frozenset()) -> None:
        self.pids = pids
        self.http = http
        self.trees = trees
        self.usage = {name: Usage() for name in pids}
        self.load: list[float] = []
        self.supplying: list[tuple[float, int]] = []
        self._hz = os.sysconf("SC_CLK_TCK")

    def _ticks(self, name: str, pid: int) -> int | None:
        return _tree_ticks(pid) if name in self.trees else _cpu_ticks(pid)

    async def run(self) -> None:
        last = {name: self._ticks(name, pid) for name, pid in self.pids.items()}
        last_at = time.monotonic()
        next_summary = last_at
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            now = time.monotonic()
            for name, pid in self.pids.items():
                ticks, rss = self._ticks(name, pid), _rss_mib(pid)
                before = last[name]
                if ticks is not None and before is not None:
                    self.usage[name].cpu.append(
                        100 * max(0, ticks - before) / self._hz / (now - last_at))
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
    """The Centrals' consumer lag, as each reports it on ``GET /metrics``: the messages
    its consumer has not read yet (``evcharging_consumer_lag_messages``, summed over the
    partitions, as of its last fetch) and how far behind it reads the CPs' reports
    (``evcharging_central_lag_seconds``); with several Centrals, the messages summed
    and the seconds of the one furthest behind."""

    def __init__(self, urls: Sequence[str], http: httpx.AsyncClient) -> None:
        self.urls = list(urls)
        self.http = http
        self.samples: list[tuple[float, float, float]] = []
        """(monotonic time, messages behind, seconds behind)."""

    async def run(self) -> None:
        while True:
            read = [await self._read(url) for url in self.urls]
            if read and all(r is not None for r in read):
                found = [r for r in read if r is not None]
                self.samples.append((time.monotonic(), sum(m for m, _ in found),
                                     max(s for _, s in found)))
            await asyncio.sleep(SAMPLE_EVERY)

    async def _read(self, url: str) -> tuple[float, float] | None:
        with contextlib.suppress(httpx.HTTPError):
            response = await self.http.get(f"{url}/metrics")
            if response.status_code == 200:
                values = prometheus_values(response.text)
                messages = values.get("evcharging_consumer_lag_messages")
                seconds = values.get("evcharging_central_lag_seconds")
                if messages is not None and seconds is not None:
                    return messages, seconds
        return None


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
    centrals: int = 1
    db: str = "sqlite"
    partitions: int = 12
    owned: dict[str, list[int]] = field(default_factory=dict)
    """Each Central's partitions (its ``/health``), read as the load began."""
    owned_cps: dict[str, int] = field(default_factory=dict)
    """How many of the CPs each Central owns (their cp.status partition is its)."""
    consumed: dict[str, int] = field(default_factory=dict)
    """Messages each Central's consumer handled during the load (its ``/health``)."""
    load_seconds: float = 0.0

    # --- derived numbers (None when nothing was measured)

    def central_names(self) -> list[str]:
        return [name for name in self.usage if name.startswith("central")]

    def central_cpu(self) -> float | None:
        """CPU % (of one core) of all the Centrals together."""
        means = [self.cpu_mean(name) for name in self.central_names()]
        return None if any(m is None for m in means) else sum(m or 0.0 for m in means)

    def central_rss(self) -> float | None:
        values = [v for name in self.central_names() if (v := self.rss_max(name)) is not None]
        return max(values) if values else None

    def cpu_us_per_message(self, name: str) -> float | None:
        """An instance's CPU time per message it consumed during the load (µs): its cost
        per message, which a busy machine changes less than its CPU %."""
        cpu, consumed = self.cpu_mean(name), self.consumed.get(name)
        if cpu is None or not consumed or self.load_seconds <= 0:
            return None
        return cpu / 100 * self.load_seconds / consumed * 1e6

    def cpu_per_1000(self, name: str) -> float | None:
        """An instance's CPU % per 1,000 of the CPs it owns."""
        cpu, owned = self.cpu_mean(name), self.owned_cps.get(name)
        return None if cpu is None or not owned else cpu / owned * 1000

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
            "centrals": self.centrals,
            "db": self.db,
            "partitions": self.partitions,
            "owned_partitions": self.owned,
            "owned_cps": self.owned_cps,
            "central_cpu_percent_total": self.central_cpu(),
            "central_cpu_percent_per_1000_owned_cps": {
                name: self.cpu_per_1000(name) for name in self.central_names()},
            "central_consumed": self.consumed,
            "central_cpu_us_per_message": {
                name: self.cpu_us_per_message(name) for name in self.central_names()},
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
    centrals: tuple[int, ...] = (1,)
    """Run each size with this many Centrals sharing the work (SPEC §9), in turn."""
    db: str = "auto"
    """``sqlite``, ``postgres``, or ``auto``: SQLite for one Central, PostgreSQL for more."""
    partitions: int = 12
    """CENTRAL_TOPIC_PARTITIONS (and the clients'): partitions of every topic."""
    tag: str = ""
    """Added to the report's file names (``fleet-<date><tag>.md``)."""

    def db_for(self, centrals: int) -> str:
        """The database a run of `centrals` Centrals uses."""
        if self.db == "auto":
            return "postgres" if centrals > 1 else "sqlite"
        return self.db


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


async def wait_partitions(http: httpx.AsyncClient, urls: Sequence[str],
                          centrals: Sequence[Service], timeout: float = 120.0
                          ) -> list[list[int]]:
    """With several Centrals: until their ``/health`` partitions have settled (none owned
    twice, each instance owns some, SPEC §9); each one's partitions."""
    deadline = time.monotonic() + timeout
    while True:
        for central in centrals:
            central.check_alive()
        owned = await read_partitions(http, urls)
        if len(urls) == 1:
            return owned
        from evcharging.launcher.supervisor import partitions_settled

        if partitions_settled(owned):
            return owned
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Centrals did not share the partitions within {timeout:g} "
                               f"s: {owned}")
        await asyncio.sleep(0.5)


async def read_consumed(http: httpx.AsyncClient, urls: Sequence[str]) -> list[int | None]:
    """How many messages each Central's consumer has handled (its ``/health``)."""
    found: list[int | None] = []
    for url in urls:
        count = None
        with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError, TypeError):
            count = int((await http.get(f"{url}/health")).json()["kafka"]["consumed"])
        found.append(count)
    return found


async def read_partitions(http: httpx.AsyncClient, urls: Sequence[str]) -> list[list[int]]:
    """The partitions each Central's ``/health`` says it owns (none when it does not say)."""
    owned: list[list[int]] = []
    for url in urls:
        found: list[int] = []
        with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError, TypeError):
            answer = (await http.get(f"{url}/health")).json().get("partitions")
            if isinstance(answer, list):
                found = sorted(int(p) for p in answer)
        owned.append(found)
    return owned


def cps_by_partition(cps: int, partitions: int) -> dict[int, int]:
    """How many of the fleet's CPs (``CP-00001`` …) each partition holds."""
    counts: dict[int, int] = {}
    for n in range(1, cps + 1):
        p = partition_for_key(f"CP-{n:05d}", range(partitions))
        counts[p] = counts.get(p, 0) + 1
    return counts


async def run_size(cps: int, bootstrap: str, settings: Settings, work: Path,
                   broker_pid: int | None, centrals: int = 1, db_url: str | None = None,
                   postgres_pid: int | None = None) -> SizeResult:
    prefix = f"bench-{uuid.uuid4().hex[:6]}-{cps}-{centrals}."
    env = service_env(prefix, work, settings.session_seconds, settings.partitions)
    if db_url is not None:
        env["CENTRAL_DB_URL"] = db_url
    fleet_port = free_port()
    rate = round(cps * settings.busy_fraction / settings.session_seconds, 3)
    instances: list[Service] = []
    ports: list[int] = []
    for n in range(1, centrals + 1):
        http_port, listen_port = free_port(), free_port()
        ports.append(http_port)
        name = "central" if centrals == 1 else f"central-{n}"
        instances.append(Service(name, [
            "evcharging.apps.ev_central.main", "--kafka-bootstrap", bootstrap,
            "--http-port", str(http_port), "--listen-port", str(listen_port),
        ], {**env, "CENTRAL_INSTANCE_ID": f"bench-central-{n}",
            "CENTRAL_PEER_URL": f"http://127.0.0.1:{http_port}"}, work))
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    fleet = Service("fleet", [
        "evcharging.apps.ev_fleet.main", "--kafka-bootstrap", bootstrap, "--cps", str(cps),
        "--id-prefix", "CP-", "--http-port", str(fleet_port),
        "--central-host", ",".join(f"127.0.0.1:{port}" for port in ports),
        "--central-port", str(ports[0]), "--seed", "1",
    ], env, work)
    load = Service("load", [
        "evcharging.apps.ev_load.main", "--kafka-bootstrap", bootstrap, "--rate", f"{rate:g}",
        "--duration", f"{settings.duration:g}", "--json", "--seed", "1",
        "--central-url", ",".join(urls), "--cps", str(cps),
        "--cp-prefix", "CP-", "--progress-interval", "10",
    ], env, work)
    services = [load, fleet, *instances]  # stop order
    tasks: list[asyncio.Task[None]] = []
    probe = TelemetryProbe(bootstrap, prefix, cps)
    label = f"{cps:,} CPs, {centrals} Central{'s' if centrals > 1 else ''}"
    async with httpx.AsyncClient(base_url=urls[0], timeout=10, trust_env=False) as http:
        try:
            for central in instances:
                await central.start()
            for central, url in zip(instances, urls, strict=True):
                await wait_http(http, f"{url}/health", central, 60)
            owned = await wait_partitions(http, urls, instances)
            if centrals > 1:
                say(f"  {label}: partitions {owned}")
            await fleet.start()
            say(f"  {label}: fleet started; waiting until Central lists them ACTIVATED")
            to_activated = await wait_all_activated(http, cps, fleet, settings.activate_timeout)
            say(f"  {label}: ACTIVATED in {to_activated:.1f} s; load {rate:g} drivers/s for "
                f"{settings.duration:g} s (sessions of {settings.session_seconds:g} s)")
            pids = {central.name: central.pid for central in instances}
            pids["fleet"] = fleet.pid
            if broker_pid is not None:
                pids["broker"] = broker_pid
            if postgres_pid is not None:
                pids["postgres"] = postgres_pid
            owned = await wait_partitions(http, urls, instances)
            await probe.start()
            lag = LagSampler(urls, http)
            await load.start(stdout=asyncio.subprocess.PIPE)
            pids["load"] = load.pid
            pids["bench"] = os.getpid()  # its probes cost CPU too
            resources = ResourceSampler(pids, http, trees=frozenset({"postgres"}))
            consumed_before = await read_consumed(http, urls)
            tasks = [asyncio.create_task(job.run()) for job in (probe, lag, resources)]
            load_began = time.monotonic()
            assert load.process is not None
            limit = settings.duration + settings.session_seconds + 180
            out, _ = await asyncio.wait_for(load.process.communicate(), limit)
            load_ended = time.monotonic()
            consumed_after = await read_consumed(http, urls)
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise RuntimeError("a sampler failed") from task.exception()
            summary = json.loads(out.decode().strip().splitlines()[-1])
            steady = (load_began + settings.session_seconds, load_began + settings.duration)
            stats = {central.name: (await http.get(f"{url}/stats")).json()
                     for central, url in zip(instances, urls, strict=True)}
            owned_after = await read_partitions(http, urls)
            if owned_after != owned:
                say(f"  {label}: the partitions moved during the load: {owned} → "
                    f"{owned_after}")
            fleet_health = (await http.get(f"http://127.0.0.1:{fleet_port}/health")).json()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await probe.stop()
            for service in services:
                await service.stop()
    say(f"  {label}: reading the ledger (driver.updates, cp.status)")
    failed_completed, failed_sessions = await failed_though_completed(bootstrap, prefix)
    say(f"  {label}: {failed_completed:,} of {failed_sessions:,} FAILED sessions were "
        "COMPLETED by their CP")
    in_load = [(t, lag_, r) for t, lag_, r in lag.samples if load_began <= t <= load_ended]
    per_partition = cps_by_partition(cps, settings.partitions)
    return SizeResult(
        cps=cps, to_activated_s=to_activated, rate=rate,
        achieved_rate=float(summary.get("achieved_rate", 0.0)), load=summary,
        telemetry_ms=[1000 * v for v in probe.latencies],
        lag=in_load,
        supplying=[n for t, n in resources.supplying if steady[0] <= t <= steady[1]],
        usage=resources.usage,
        load_avg=resources.load,
        central_stats=stats if centrals > 1 else stats[instances[0].name],
        fleet_health=fleet_health,
        failed_completed=failed_completed,
        centrals=centrals, db="postgres" if db_url is not None else "sqlite",
        partitions=settings.partitions,
        owned={central.name: found for central, found in zip(instances, owned, strict=True)},
        owned_cps={central.name: (cps if centrals == 1 else
                                  sum(per_partition.get(p, 0) for p in found))
                   for central, found in zip(instances, owned, strict=True)},
        consumed={central.name: after - before
                  for central, before, after in zip(instances, consumed_before,
                                                    consumed_after, strict=True)
                  if before is not None and after is not None},
        load_seconds=load_ended - load_began,
    )


# --------------------------------------------------------------------------- the report


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _group(*values: float | None, digits: int = 0) -> str:
    return " / ".join(_num(v, digits) for v in values)


LATENCY_HEADER = (
    "CPs", "Centrals", "to ACTIVATED (s)", "drivers/s asked / got", "supplying (mean)",
    "request→ACCEPTED p50 / p90 / p99 (ms)", "telemetry→IN_PROGRESS p50 / p99 (ms)",
    "Central lag p50 / max (msgs)", "Central lag p50 / max (s)",
)
OUTCOME_HEADER = (
    "CPs", "Centrals", "drivers", "completed", "FAILED start not confirmed", "FAILED other",
    "FAILED though the CP completed", "DENIED overloaded", "DENIED other",
    "no free CP / timed out", "Central CPU % / RSS MiB",
    "fleet CPU % / RSS MiB", "fleet publish errors", "load gen / bench CPU %", "broker CPU %",
    "load avg 1 min (max)",
)


def latency_row(r: SizeResult) -> list[str]:
    return [
        f"{r.cps:,}", f"{r.centrals}", _num(r.to_activated_s, 1),
        _group(r.rate, r.achieved_rate, digits=1),
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
        f"{r.cps:,}", f"{r.centrals}", f"{int(r.load.get('arrivals', 0)):,}",
        f"{r.outcome('completed'):,}",
        f"{r.failed_start():,}", f"{failed - r.failed_start():,}",
        _num(r.failed_completed),
        f"{r.denied_overloaded():,}", f"{denied - r.denied_overloaded():,}",
        f"{r.outcome('no_free_cp'):,} / {r.outcome('timed_out'):,}",
        _group(r.central_cpu(), r.central_rss()),
        _group(r.cpu_mean("fleet"), r.rss_max("fleet")),
        f"{int(r.fleet_health.get('bus', {}).get('publish_errors', 0)):,}",
        _group(r.cpu_mean("load"), r.cpu_mean("bench")),
        _num(r.cpu_mean("broker") if "broker" in r.usage else None),
        _num(max(r.load_avg) if r.load_avg else None, 2),
    ]


CENTRALS_HEADER = (
    "CPs", "Centrals (database)", "instance", "partitions", "CPs owned", "CPU % (mean)",
    "CPU % per 1,000 owned CPs", "all Centrals: CPU % per 1,000 CPs",
    "messages handled / CPU µs each",
    "request→ACCEPTED p50 / p99 (ms)", "Central lag p50 / max (msgs)",
    "Central lag max (s)", "PostgreSQL CPU %",
)


def centrals_rows(r: SizeResult) -> list[list[str]]:
    """One row per Central of a run: its share of the CPs and its CPU; the latency and
    the lag are the network's (the same on each row of a run)."""
    total = r.central_cpu()
    rows = []
    for name in r.central_names():
        partitions = r.owned.get(name, [])
        rows.append([
            f"{r.cps:,}", f"{r.centrals} ({r.db})", name,
            (f"{len(partitions)} of {r.partitions}" if partitions else "-"),
            f"{r.owned_cps.get(name, 0):,}", _num(r.cpu_mean(name)),
            _num(r.cpu_per_1000(name), 2),
            _num(None if total is None else total / r.cps * 1000, 2),
            _group(r.consumed.get(name), r.cpu_us_per_message(name)),
            _group(r.accepted("p50"), r.accepted("p99"), digits=1),
            _group(r.lag_messages(50), r.lag_messages(100)),
            _num(r.lag_seconds(100), 2),
            _num(r.cpu_mean("postgres") if "postgres" in r.usage else None),
        ])
    return rows


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
        f"- per size and number of Centrals ({', '.join(map(str, settings.centrals))}): "
        "fresh Centrals (one: SQLite; several: one PostgreSQL database they share, each with "
        "its CENTRAL_INSTANCE_ID; `--db` chooses), topics of their own and one CP Fleet; "
        f"{settings.duration:g} s of driver arrivals at N × {settings.busy_fraction:g} ÷ "
        f"{settings.session_seconds:g} s per second (so about "
        f"{settings.busy_fraction:.0%} of the CPs supply), one request per driver",
        f"- sessions of {settings.session_seconds:g} s (`CP_ENGINE_SESSION_SECONDS`), "
        "telemetry every second, heartbeats every 5 s, fleet monitoring every 5 s; "
        "Central and the fleet log at WARNING",
        f"- Kafka: {'the broker at ' + settings.kafka_bootstrap if settings.kafka_bootstrap else 'a local broker started for the run (KRaft, one node)'}"  # noqa: E501
        f", topics of {settings.partitions} partitions (`CENTRAL_TOPIC_PARTITIONS`)",
        "",
        "## Latency and lag",
        "",
        markdown_table(LATENCY_HEADER, [latency_row(r) for r in results]),
        "",
        "## Outcomes and resources",
        "",
        markdown_table(OUTCOME_HEADER, [outcome_row(r) for r in results]),
        "",
        "## Each Central",
        "",
        markdown_table(CENTRALS_HEADER, [row for r in results for row in centrals_rows(r)]),
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
        "- *Each Central*: its partitions (`GET /health`) and the CPs of the fleet they hold "
        "(by Kafka's default partitioner on the CP's id), its CPU per 1,000 of those CPs, and "
        "the CPU of all the Centrals per 1,000 CPs of the network; the latency and lag are "
        "the network's (lag: the Centrals' messages behind summed, the seconds of the one "
        "furthest behind); *messages handled / CPU µs each*: what its consumer handled "
        "during the load (`/health`) and its CPU time per message (a busy machine changes "
        "it less than the CPU %); *PostgreSQL CPU*: the server and its backends.",
        "- *CPU %*: of one core, the mean over the load (*bench*: this script, with its "
        "probes; *Central*: all the Centrals together); *RSS*: the largest; *load avg*: "
        "the machine's, the largest during the load (above the number of CPUs, the processes "
        "measured here waited for a core).",
        "",
    ]
    return "\n".join(lines)


def plot(results: Sequence[SizeResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, lag, cpu) = plt.subplots(1, 3, figsize=(15, 5.5))
    axes = (lat, lag, lag.twinx(), cpu)
    counts = sorted({r.centrals for r in results})
    for count in counts:
        _plot_runs([r for r in results if r.centrals == count], axes,
                   "" if len(counts) == 1 else f", {count} Central{'s' if count > 1 else ''}")
    _finish_plot(fig, axes, path, title)


def _plot_runs(results: Sequence[SizeResult], axes: tuple[Any, Any, Any, Any],
               suffix: str) -> None:
    lat, lag, seconds, cpu = axes
    xs = [r.cps for r in results]

    def series(ax: Any, values: list[float | None], label: str, style: str) -> None:
        points = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style,
                    label=label + suffix)

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
    series(seconds, [r.lag_seconds(100) for r in results], "lag max (s, right)", "^:")
    series(cpu, [r.central_cpu() for r in results], "Central", "o-")
    series(cpu, [r.cpu_mean("fleet") for r in results], "CP Fleet", "s-")
    series(cpu, [r.cpu_mean("load") for r in results], "load generator", "^-")
    if any("broker" in r.usage for r in results):
        series(cpu, [r.cpu_mean("broker") if "broker" in r.usage else None for r in results],
               "Kafka broker", "d-")


def _finish_plot(fig: Any, axes: tuple[Any, Any, Any, Any], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    lat, lag, seconds, cpu = axes
    lat.set_ylabel("ms")
    lat.set_title("latency")
    lag.set_ylabel("messages behind")
    lag.set_title("Central's consumer lag")
    seconds.set_ylabel("seconds behind (max)")
    cpu.set_ylabel("CPU % of one core (mean)")
    cpu.set_title("CPU")

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
    parser.add_argument("--centrals", default="1",
                        help="numbers of Centrals sharing the work (SPEC §9), separated by "
                        "commas: each size runs with each, at the same load, side by side "
                        "(default: %(default)s; more than one: on a local PostgreSQL)")
    parser.add_argument("--db", choices=("auto", "sqlite", "postgres"), default="auto",
                        help="Central's database: auto (SQLite for one Central, PostgreSQL "
                        "for several), sqlite (one Central only) or postgres (default: auto)")
    parser.add_argument("--partitions", type=int, default=12,
                        help="CENTRAL_TOPIC_PARTITIONS, the partitions of every topic "
                        "(default: %(default)s)")
    parser.add_argument("--tag", default="",
                        help="added to the report's file names: fleet-<date><tag>.md")
    args = parser.parse_args(argv)
    try:
        sizes = tuple(int(part) for part in args.sizes.split(",") if part.strip())
    except ValueError:
        parser.error(f"--sizes: not numbers separated by commas: {args.sizes!r}")
    if not sizes or min(sizes) < 2:
        parser.error("--sizes needs at least one size of 2 CPs or more")
    try:
        centrals = tuple(int(part) for part in args.centrals.split(",") if part.strip())
    except ValueError:
        parser.error(f"--centrals: not numbers separated by commas: {args.centrals!r}")
    if not centrals or min(centrals) < 1:
        parser.error("--centrals needs at least one number of 1 or more")
    if args.db == "sqlite" and max(centrals) > 1:
        parser.error("--db sqlite: several Centrals share one PostgreSQL (SPEC §9)")
    if args.partitions < max(centrals):
        parser.error("--partitions: fewer partitions than Centrals leaves one idle")
    duration = args.duration if args.duration is not None else (20.0 if args.quick else 120.0)
    session = (args.session_seconds if args.session_seconds is not None
               else (5.0 if args.quick else 10.0))
    if duration <= 0 or session <= 0 or not 0 < args.busy_fraction <= 1:
        parser.error("--duration and --session-seconds must be > 0, --busy-fraction in (0, 1]")
    return Settings(sizes=sizes, duration=duration, session_seconds=session,
                    busy_fraction=args.busy_fraction, out=args.out,
                    kafka_bootstrap=args.kafka_bootstrap, activate_timeout=args.activate_timeout,
                    keep_logs=args.keep_logs, centrals=centrals, db=args.db,
                    partitions=args.partitions, tag=args.tag)


@contextlib.contextmanager
def broker_for(settings: Settings, work: Path) -> Iterator[tuple[str, int | None]]:
    if settings.kafka_bootstrap:
        yield settings.kafka_bootstrap, None
        return
    with KafkaBroker(work_dir=work / "kafka") as broker:
        yield broker.bootstrap, broker.pid


@contextlib.contextmanager
def postgres_for(settings: Settings) -> Iterator[Any]:
    """A local PostgreSQL (``evcharging.devtools.postgres``, not durable) when a run needs
    one, stopped and deleted at the end; None when none does."""
    if all(settings.db_for(count) != "postgres" for count in settings.centrals):
        yield None
        return
    import shutil

    from evcharging.devtools.postgres import LocalPostgres

    folder = Path(tempfile.mkdtemp(prefix="evcharging-postgres-"))
    try:
        with LocalPostgres(work_dir=folder, durable=False) as server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def run_all(settings: Settings, work: Path, bootstrap: str,
                  broker_pid: int | None, postgres: Any = None) -> list[SizeResult]:
    results = []
    for cps in settings.sizes:
        for centrals in settings.centrals:
            run_dir = work / f"cps-{cps}-centrals-{centrals}"
            run_dir.mkdir()
            database = None
            if settings.db_for(centrals) == "postgres":
                database = f"bench_{uuid.uuid4().hex[:12]}"
                db_url = postgres.create_database(database)
            else:
                db_url = None
            try:
                results.append(await run_size(
                    cps, bootstrap, settings, run_dir, broker_pid, centrals=centrals,
                    db_url=db_url, postgres_pid=None if db_url is None else postgres.pid))
            finally:
                if database is not None:
                    with contextlib.suppress(Exception):
                        postgres.drop_database(database)
            say(markdown_table(LATENCY_HEADER, [latency_row(results[-1])]).splitlines()[-1])
            for row in centrals_rows(results[-1]):
                say("    " + " | ".join(row))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    command = " ".join(["python benchmarks/fleet_bench.py", *(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])
    machine = Machine.read()
    started = datetime.now(tz=UTC)
    began = time.monotonic()
    say(f"fleet benchmark: sizes {', '.join(f'{n:,}' for n in settings.sizes)}; "
        f"Centrals {', '.join(map(str, settings.centrals))}; "
        f"{settings.duration:g} s of load each; {machine.cpus} CPUs, load average "
        f"{machine.load_at_start[0]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    try:
        with broker_for(settings, work) as (bootstrap, broker_pid), \
                postgres_for(settings) as postgres:
            results = asyncio.run(run_all(settings, work, bootstrap, broker_pid, postgres))
    finally:
        if settings.keep_logs:
            say(f"logs kept in {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    settings.out.mkdir(parents=True, exist_ok=True)
    stem = f"fleet-{started:%Y-%m-%d}{settings.tag}"
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
    say(markdown_table(CENTRALS_HEADER, [row for r in results for row in centrals_rows(r)]))
    say("")
    say(f"report: {settings.out / (stem + '.md')}\nplot:   {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
