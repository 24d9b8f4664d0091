"""The chaos harness: a system under load, what it says on the broker, and the ledger check.

* :class:`Observer` reads ``driver.updates``, ``cp.status``, ``cp.telemetry`` and
  ``driver.requests`` of one system from the beginning with its own aiokafka consumer (no
  group, nothing committed, ``read_committed`` as every reader of Central's transactions)
  and publishes driver requests with its own producer. It does not use the project's bus
  (it observes it), and it survives a broker restart: aiokafka reconnects, and a request
  whose send failed is sent again with the same id. Requests of a real driver process
  count as the test's once its driver id is adopted (:meth:`Observer.adopt`).
* :class:`FakeClock` is the wall clock of one service process, stepped by the test
  (libfaketime).
* :class:`Watcher` polls Central's ``/health`` and ``/cp`` and keeps every change it sees
  with its time: the signs that Central noticed a fault.
* :class:`DbLock` is another process holding ``BEGIN EXCLUSIVE`` on Central's database.
* :class:`ChaosRun` starts Central and its CPs (the e2e fixtures' :class:`System`), keeps
  requests coming, measures recovery after a fault and checks the ledger once things have
  settled (:func:`tests.chaos.ledger.check_ledger`). Its CPs are engines with monitors, a CP
  Fleet, or (``ocpp``) OCPP chargers played by the `ocpp` library
  (:class:`tests.chaos.chargers.Charger`) behind the OCPP gateway process
  (``evcharging.apps.ev_ocpp.main``, configured by its ``OCPP_*`` variables); then the
  chargers' own meters are the truth the ledger is held to (:meth:`ChaosRun.meter_problems`).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import math
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from evcharging.common.bus import Topic
from evcharging.common.messages import (
    CPStatus,
    CPTelemetry,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    StatusEvent,
    decode,
    encode,
    new_id,
)
from evcharging.devtools.process import free_port
from tests.chaos.centrals import Centrals, read_pg_rows
from tests.chaos.chargers import Charger
from tests.chaos.ledger import Breach, MeterLog, SessionRow, Totals, check_ledger, describe
from tests.chaos.power import Report
from tests.e2e.conftest import Proc, System
from tests.polling import poll

CHAOS_ENGINE = {
    "CP_ENGINE_SESSION_SECONDS": "6",
    "CP_ENGINE_TELEMETRY_INTERVAL": "0.5",
    "CP_ENGINE_STATUS_INTERVAL": "1",
}
CHAOS_MONITOR = {"CP_MONITOR_HEALTH_INTERVAL": "0.5"}
FLEET_PACE = {
    "CP_ENGINE_STATUS_INTERVAL": "5",
    "CP_MONITOR_HEALTH_INTERVAL": "5",
    "CP_MONITOR_HEALTH_TIMEOUT": "2",
    "CP_MONITOR_FAILURE_THRESHOLD": "3",
}
"""A fleet's heartbeats and health checks at the services' defaults."""
CHAOS_GATEWAY = {
    "OCPP_STATUS_INTERVAL": "1",
    "OCPP_CALL_TIMEOUT": "5",
}
"""The OCPP gateway's heartbeat statuses (and its liveness reports) every second, as the
chaos engines'."""
DRIVER_LOAD_PREFIX = "chaos-load-"
KW_RATE = 22.0
"""The engines' default power (CP_ENGINE_KW_RATE): telemetry kWh tell how long a session ran."""
LOAD_INTERVAL = 1.5
"""Seconds between two requests to the same CP while the load runs."""
RECOVERY_DEADLINE = 30.0
"""Every CP takes a new request within this many seconds of a fault's end."""
SEND_DEADLINE = 90.0


def now() -> float:
    return time.monotonic()


class Phase(StrEnum):
    """Where in a session a fault hits (the target CP's session; the others run too)."""

    MID = "mid-session"
    """A session runs on every CP, the target's for a second."""
    LATE = "just before the end"
    """The target's session sent its last telemetry; its end is one interval away."""
    END = "at the end"
    """The target's end-of-session status is on the broker (Central may have read it,
    not yet committed it)."""
    RECORDED = "once the end is recorded"
    """Central has written the end of the target's session: the CP is free, and the next
    request is decided right away."""
    NEXT = "as the next session starts"
    """The target's session ended and Central has just accepted the next request on it
    (both read, the offsets maybe not committed yet)."""


# --------------------------------------------------------------------------- observer


@dataclass(frozen=True)
class Seen:
    """A driver update and when the observer read it."""

    at: float
    update: DriverUpdate


class Observer:
    """What one system's CPs and Central say on the broker; the test's driver requests."""

    TOPICS = (Topic.DRIVER_UPDATES, Topic.CP_STATUS, Topic.CP_TELEMETRY, Topic.DRIVER_REQUESTS)

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.requests: dict[str, str] = {}
        """request id → CP id, for every request the test sent (or is sending)."""
        self.sent_at: dict[str, float] = {}
        self.updates: dict[str, list[DriverUpdate]] = {}
        self.seen: list[Seen] = []
        self.meter = MeterLog()
        self.heard: dict[str, float] = {}
        """CP id → when the observer last read a status of it."""
        self.metered: dict[str, tuple[float, str, float]] = {}
        """CP id → (when, session id, kWh) of its last telemetry read."""
        self.ended: list[tuple[float, str, str]] = []
        """(when, CP id, session id) of every end-of-session status read (not heartbeats)."""
        self.last_status: dict[str, CPStatus] = {}
        """CP id → the last heartbeat read of it."""
        self.power: list[Report] = []
        """Every session's power reports and end-of-session status, at its CP's own time
        (a limited site's power, :mod:`tests.chaos.power`)."""
        self.adopted: dict[str, list[str]] = {}
        """Driver id of a real driver process whose requests count as the test's (or a
        prefix of such ids, ending in ``*``) → the ids of its requests read so far."""
        self.invalid = 0
        self.on_broker: dict[str, float] = {}
        """request id → when the observer read it on ``driver.requests`` (every request)."""
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, client_id="chaos-observer", acks="all",
            linger_ms=0, request_timeout_ms=5000,
        )
        await self._producer.start()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, client_id="chaos-observer", group_id=None,
            enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=100,
            isolation_level="read_committed",
        )
        await consumer.start()
        self._consumer = consumer
        names = [f"{self.prefix}{t.value}" for t in self.TOPICS]

        async def known() -> list[TopicPartition] | None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap,
                                        client_id="chaos-observer")
            await admin.start()
            try:
                described = await admin.describe_topics(names)
            finally:
                await admin.close()
            found = [TopicPartition(t["topic"], p["partition"])
                     for t in described if t["error_code"] == 0 for p in t["partitions"]]
            return found if {tp.topic for tp in found} == set(names) else None

        partitions: list[TopicPartition] = await poll(
            known, timeout=30, what=f"topics {names}", interval=0.2
        )
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._run(consumer), name="chaos-observer")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in (self._consumer, self._producer):
            if client is not None:
                await client.stop()
        self._consumer = self._producer = None

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=200)
            except KafkaError:  # the broker is away; aiokafka reconnects
                await asyncio.sleep(0.2)  # the retry pace while the broker is away, not a wait
                continue
            for records in batch.values():
                for record in records:
                    self._read(record.topic.removeprefix(self.prefix), record.value)

    @property
    def results(self) -> dict[str, set[str]]:
        """session id → how its CP said it ended (end statuses and heartbeats)."""
        return self.meter.results

    def adopt(self, driver_id: str) -> None:
        """Count the requests of the driver `driver_id` (a prefix when it ends in ``*``)
        as the test's."""
        self.adopted.setdefault(driver_id, [])

    def _adopter(self, driver_id: str) -> str | None:
        if driver_id in self.adopted:
            return driver_id
        return next((key for key in self.adopted
                     if key.endswith("*") and driver_id.startswith(key[:-1])), None)

    def _read(self, topic: str, value: bytes) -> None:
        try:
            if topic == Topic.DRIVER_REQUESTS:
                request = decode(DriverRequest, value)
                self.on_broker.setdefault(request.request_id, now())
                adopter = self._adopter(request.driver_id)
                if adopter is not None:
                    if request.request_id not in self.requests:
                        self.adopted[adopter].append(request.request_id)
                    self.requests.setdefault(request.request_id, request.cp_id)
            elif topic == Topic.DRIVER_UPDATES:
                update = decode(DriverUpdate, value)
                self.updates.setdefault(update.request_id, []).append(update)
                self.seen.append(Seen(now(), update))
            elif topic == Topic.CP_STATUS:
                status = decode(CPStatus, value)
                self.heard[status.cp_id] = now()
                if status.event in (None, StatusEvent.HEARTBEAT):
                    self.last_status[status.cp_id] = status
                if status.session_result is not None and status.session_id is not None:
                    self.ended.append((now(), status.cp_id, status.session_id))
                    self.power.append(Report(status.ts.timestamp(), status.cp_id,
                                             status.session_id, None))
                end = status.session_end()
                if end is not None:
                    self.meter.add_end(end.session_id, Totals(end.kwh, end.euros),
                                       end.result.value)
            elif topic == Topic.CP_TELEMETRY:
                telemetry = decode(CPTelemetry, value)
                if telemetry.session_id is not None:
                    self.meter.add_telemetry(
                        telemetry.session_id, Totals(telemetry.kwh, telemetry.euros)
                    )
                    self.metered[telemetry.cp_id] = (now(), telemetry.session_id, telemetry.kwh)
                    self.power.append(Report(telemetry.ts.timestamp(), telemetry.cp_id,
                                             telemetry.session_id, telemetry.kw))
        except ValidationError:
            self.invalid += 1

    async def request(self, cp_id: str, driver_id: str, within: float = SEND_DEADLINE) -> str:
        """Publish a DriverRequest; a failed send is repeated with the same request id, for
        up to `within` seconds."""
        assert self._producer is not None
        request = DriverRequest(request_id=new_id(), driver_id=driver_id, cp_id=cp_id)
        self.requests[request.request_id] = cp_id
        self.sent_at[request.request_id] = now()
        deadline = now() + within
        while True:
            try:
                await self._producer.send_and_wait(
                    f"{self.prefix}{Topic.DRIVER_REQUESTS.value}", encode(request),
                    key=cp_id.encode(),
                )
                return request.request_id
            except KafkaError:
                if now() > deadline:
                    raise
                await asyncio.sleep(0.3)  # the retry pace, bounded by `deadline`

    async def publish(self, topic: Topic, key: str, value: bytes) -> None:
        """Put a message of the test's own making on one of the system's topics."""
        assert self._producer is not None
        await self._producer.send_and_wait(f"{self.prefix}{topic.value}", value,
                                           key=key.encode())

    def whereabouts(self, request_id: str, since: float) -> str:
        """Where a request is, for a problem's text: its CP, when it was sent and read
        back from the broker (seconds from `since`), its updates."""
        sent = self.sent_at.get(request_id)
        read = self.on_broker.get(request_id)
        return (f"{request_id} on {self.requests.get(request_id)}: sent "
                + ("by a driver process" if sent is None else f"{sent - since:+.2f} s")
                + ("; never on the broker" if read is None else
                   f", on the broker {read - since:+.2f} s")
                + f"; {describe(self.updates.get(request_id, ())) or 'no update'}")

    def answered(self, request_id: str) -> DriverStatus | None:
        """ACCEPTED or the final status once the request has one, else None."""
        for update in self.updates.get(request_id, ()):
            if update.status is DriverStatus.ACCEPTED or update.status.is_final:
                return update.status
        return None

    def final(self, request_id: str) -> DriverUpdate | None:
        return next((u for u in self.updates.get(request_id, ()) if u.status.is_final), None)

    def answers(self, cp_id: str) -> str:
        """How the requests on `cp_id` ended so far, counted by final status and reason."""
        counts = Counter(
            (final.status.value, (final.reason or "").split(" (")[0][:60]) if final else
            ("no final status", "")
            for request_id, cp in self.requests.items() if cp == cp_id
            for final in (self.final(request_id),)
        )
        return f"{cp_id}'s requests: " + (", ".join(
            f"{n} {status}" + (f" ({reason})" if reason else "")
            for (status, reason), n in counts.most_common()
        ) or "none")

    def accepted_since(self, cp_id: str, since: float) -> float | None:
        """When the observer first read an ACCEPTED on `cp_id` after `since`."""
        return next(
            (s.at for s in self.seen
             if s.at >= since and s.update.cp_id == cp_id
             and s.update.status is DriverStatus.ACCEPTED),
            None,
        )


# --------------------------------------------------------------------------- watcher


@dataclass(frozen=True)
class Sign:
    """A change Central showed: ``kind`` is health, faulty, state or monitored."""

    at: float
    kind: str
    cp_id: str | None
    value: Any


class Watcher:
    """Polls Central's /health and /cp; keeps each change with the time it was seen."""

    def __init__(self, http: httpx.AsyncClient, interval: float = 0.2) -> None:
        self.http = http
        self.interval = interval
        self.limit: int | None = None
        """Only the first this many CPs of /cp (by id): the run's CPs of a large fleet."""
        self.signs: list[Sign] = []
        self._last: dict[tuple[str, str | None], Any] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chaos-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _note(self, kind: str, cp_id: str | None, value: Any) -> None:
        key = (kind, cp_id)
        if key not in self._last or self._last[key] != value:
            self._last[key] = value
            self.signs.append(Sign(now(), kind, cp_id, value))

    async def _run(self) -> None:
        while True:
            try:
                health = await self.http.get("/health", timeout=3)
                self._note("health", None, health.status_code)
                params = {} if self.limit is None else {"limit": str(self.limit)}
                cps = await self.http.get("/cp", params=params, timeout=3)
                if cps.status_code == 200:
                    for cp in cps.json():
                        cp_id = cp["cp_id"]
                        self._note("faulty", cp_id, cp.get("is_faulty"))
                        self._note("state", cp_id, cp.get("state"))
                        self._note("monitored", cp_id, cp.get("monitored"))
            except (httpx.HTTPError, OSError, ValueError):
                self._note("health", None, "down")
            await asyncio.sleep(self.interval)  # the observer's sampling pace, not a wait

    def first(self, since: float, match: Callable[[Sign], bool]) -> float | None:
        return next((s.at for s in self.signs if s.at >= since and match(s)), None)


# --------------------------------------------------------------------------- clocks

LIBFAKETIME_PATHS = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
                     "/usr/local/lib/faketime/libfaketime.so.1")


def libfaketime() -> str:
    """The path of libfaketime.so.1: ``$EVCHARGING_LIBFAKETIME``, else Debian's (installed by
    ``scripts/ensure_faketime.sh``, which ``make chaos`` and ``make test`` run)."""
    given = os.environ.get("EVCHARGING_LIBFAKETIME")
    found = [given] if given else [p for pattern in LIBFAKETIME_PATHS
                                   for p in sorted(glob.glob(pattern))]
    for path in found:
        if os.access(path, os.R_OK):
            return path
    raise AssertionError(
        "libfaketime.so.1 not found (the clock faults need it): run scripts/ensure_faketime.sh"
        " or point EVCHARGING_LIBFAKETIME at it"
    )


class FakeClock:
    """The wall clock of one service process, stepped by the test while it runs.

    The process is started with :meth:`env`: libfaketime (``LD_PRELOAD``) reads its offset
    from a file on every call (``FAKETIME_NO_CACHE``), so :meth:`step` moves the running
    process's clock at once. Only ``CLOCK_REALTIME`` moves (``time.time()``,
    ``datetime.now()``, the timestamps it stamps on messages): a real clock step (NTP,
    ``date -s``) moves the wall clock, never ``CLOCK_MONOTONIC``, so asyncio's timers and
    every ``time.monotonic()`` stay true (``FAKETIME_DONT_FAKE_MONOTONIC``).
    """

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self.library = libfaketime()
        self._write()

    def env(self) -> dict[str, str]:
        preload = os.environ.get("LD_PRELOAD")
        return {
            "LD_PRELOAD": f"{self.library} {preload}" if preload else self.library,
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
            # A real step (NTP, `date -s`) moves CLOCK_REALTIME, not CLOCK_MONOTONIC.
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def step(self, offset: int) -> None:
        """From now on the process's wall clock is `offset` seconds off the true time."""
        self.offset = offset
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".new")
        tmp.write_text(f"{self.offset:+d}\n")
        tmp.replace(self.path)  # a reader sees the old offset or the new, never half a file


# --------------------------------------------------------------------------- database

LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
print("released", flush=True)
"""


class DbLock:
    """Another process holds ``BEGIN EXCLUSIVE`` on a SQLite file while the block runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.locked_at: float | None = None
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> DbLock:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LOCKER, str(self.path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 60)
        assert line.strip() == b"locked", f"the locker said {line!r}"
        self.locked_at = now()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"release\n")
        await proc.stdin.drain()
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        await asyncio.wait_for(proc.wait(), 30)
        assert line.strip() == b"released", f"the locker said {line!r}"


def read_times(db_path: Path) -> dict[str, tuple[str, str | None]]:
    """session id → (start_time, end_time) of every ``charging_sessions`` row."""
    with contextlib.closing(
        sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    ) as db:
        rows = db.execute(
            "SELECT session_id, start_time, end_time FROM charging_sessions"
        ).fetchall()
    return {sid: (start, end) for sid, start, end in rows}


def read_rows(db_path: Path) -> list[SessionRow]:
    """Every ``charging_sessions`` row, read through a read-only connection."""
    with contextlib.closing(
        sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    ) as db:
        rows = db.execute(
            "SELECT session_id, request_id, cp_id, status, kwh, euros, reason"
            " FROM charging_sessions"
        ).fetchall()
    return [SessionRow(*row) for row in rows]


# --------------------------------------------------------------------------- the run


@dataclass
class Outcome:
    """One row of the chaos table."""

    fault: str
    detection: float | None = None
    recovery: float | None = None
    sessions: int = 0
    requests: int = 0
    corrected: int = 0
    """Requests whose driver got a ``corrected:`` update (the ledger fixed itself)."""
    takeover: float | None = None
    """With several Centrals (issue 16): seconds from an instance's death (or stop) until
    another owned every partition and served the CPs it had."""
    breaches: list[Breach] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """What else went wrong (no detection, no recovery, requests never answered)."""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaches and not self.problems


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def format_table(outcomes: Sequence[Outcome]) -> list[str]:
    """The table; a take-over column when some row has several Centrals (issue 16)."""
    takeovers = any(o.takeover is not None for o in outcomes)
    header = ("fault", "detection", "recovery", *(("take-over",) if takeovers else ()),
              "sessions", "requests", "corrected", "mismatches", "result")
    rows = [header] + [
        (o.fault, _seconds(o.detection), _seconds(o.recovery),
         *((_seconds(o.takeover),) if takeovers else ()), str(o.sessions),
         str(o.requests), str(o.corrected), str(len(o.breaches)), "ok" if o.ok else "FAIL")
        for o in outcomes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for outcome in outcomes:
        for text in [*outcome.notes, *outcome.problems, *map(str, outcome.breaches)]:
            lines.append(f"{outcome.fault}: {text}")
    return lines


class ChaosRun:
    """Central and its CPs under load, for one fault."""

    def __init__(self, system: System, cps: Sequence[str]) -> None:
        self.system = system
        self.cps = tuple(cps)
        self.observer = Observer(system.bootstrap, system.prefix)
        self.watcher = Watcher(system.http)
        self.central: Proc | None = None
        self.engines: dict[str, Proc] = {}
        self.monitors: dict[str, Proc] = {}
        self.central_env: dict[str, str] = {}
        self.engine_envs: dict[str, dict[str, str]] = {}
        """Extra settings of one CP's engine (e.g. its fake clock), restarts included."""
        self.fleet: Proc | None = None
        self.gateway: Proc | None = None
        self.gateway_env: dict[str, str] = {}
        self.chargers: dict[str, Charger] = {}
        """CP id → the OCPP charger whose connector it is (runs with ``ocpp``)."""
        self.centrals: Centrals | None = None
        """Several Centrals on PostgreSQL (issue 16): then :attr:`central` is None, the
        clients get every instance's address and the test's HTTP calls go to any that
        answers."""
        self._load: asyncio.Task[None] | None = None

    async def start(
        self, central_env: dict[str, str] | None = None, fleet: int = 0,
        fleet_env: dict[str, str] | None = None, ocpp: str = "", centrals: int = 0,
        db_url: str = "",
    ) -> None:
        """Central, then the CPs: an engine and a monitor each, or (`fleet` > 0) one CP
        Fleet of that many CPs (with `fleet_env`), of which the run's CPs are the first, or
        (`ocpp`, a protocol) the OCPP gateway and one charger of that protocol per CP (the
        run's CPs are ``{charger}.1``). `centrals` > 0: that many Centrals on the
        PostgreSQL database `db_url` (:class:`~tests.chaos.centrals.Centrals`), started
        before the CPs until they share the partitions."""
        self.system.engine_env.update(CHAOS_ENGINE)
        self.central_env = dict(central_env or {})
        if centrals:
            assert db_url.startswith("postgresql://"), "several Centrals need PostgreSQL"
            self.centrals = Centrals(self.system, db_url, centrals)
            await self.system.http.aclose()
            self.system.http = self.watcher.http = self.centrals.any_door()
            await self.centrals.start_all(self.central_env)
        else:
            self.central = await self.system.start_central(self.central_env)
        if ocpp:
            await self.start_chargers(ocpp)
        elif fleet:
            await self.start_fleet(fleet, FLEET_PACE if fleet_env is None else fleet_env)
        else:
            await asyncio.gather(*(self.start_cp(cp) for cp in self.cps))
        await self.observer.start()
        self.watcher.start()

    async def start_fleet(self, size: int, env: dict[str, str]) -> None:
        """A CP Fleet of `size` CPs with the chaos sessions and `env`. Returns once
        Central lists every one ACTIVATED."""
        flags = ([] if self.centrals is None  # the last --central-host wins
                 else ["--central-host", self.centrals.addresses])
        self.fleet = await self.system.start_fleet(size, {**CHAOS_ENGINE, **env}, flags=flags,
                                                   timeout=120)
        self.watcher.limit = len(self.cps)

        async def activated() -> bool:
            return await self.system.count_cps(state="ACTIVATED") >= size

        await poll(activated, timeout=120, what=f"{size} CPs ACTIVATED", interval=0.5,
                   retry_on=(httpx.HTTPError, OSError, KeyError))

    async def start_gateway(self) -> Proc:
        """The OCPP gateway process on this system's topics, configured by its ``OCPP_*``
        variables; the same ports and state file when it is started again. Returns once it
        logs that it runs."""
        system = self.system
        if not self.gateway_env:
            self.gateway_env = {
                "OCPP_TOPIC_PREFIX": system.prefix,
                "OCPP_HOST": "127.0.0.1",
                "OCPP_WS_PORT": str(free_port()),
                "OCPP_HTTP_PORT": str(free_port()),
                "OCPP_STATE_FILE": str(system.tmp / "ocpp-state.json"),
                "OCPP_CENTRAL_HOST": "127.0.0.1",
                "OCPP_CENTRAL_PORT": str(system.http_port),
                **CHAOS_GATEWAY,
            }
        proc = Proc("ocpp", ["-m", "evcharging.apps.ev_ocpp.main", "--kafka-bootstrap",
                             system.bootstrap], system.env(self.gateway_env), system.tmp).start()
        system.procs.append(proc)
        self.gateway = proc
        await proc.wait_log(r"OCPP gateway running", timeout=60)
        return proc

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway_env['OCPP_WS_PORT']}/ocpp/"

    async def start_chargers(self, protocol: str) -> None:
        """The gateway, then a charger of `protocol` for each of the run's CPs (``X.1`` is
        connector 1 of charger ``X``); returns once Central lists each ACTIVATED."""
        await self.start_gateway()
        session = float(CHAOS_ENGINE["CP_ENGINE_SESSION_SECONDS"])
        interval = float(CHAOS_ENGINE["CP_ENGINE_TELEMETRY_INTERVAL"])
        for cp_id in self.cps:
            charger_id, connector = cp_id.rsplit(".", 1)
            assert connector == "1", f"an OCPP run's CP is connector 1 of a charger: {cp_id}"
            charger = Charger(charger_id, self.gateway_url, protocol, kw=KW_RATE,
                              session_seconds=session, meter_interval=interval)
            self.chargers[cp_id] = charger
            charger.start()
        for cp_id in self.cps:
            await self.system.wait_cp(cp_id, lambda cp: cp["state"] == "ACTIVATED",
                                      "ACTIVATED", 60)

    async def start_cp(self, cp_id: str) -> None:
        self.engines[cp_id] = await self.system.start_engine(cp_id, self.engine_envs.get(cp_id))
        self.monitors[cp_id] = await self.start_monitor(cp_id)

    async def start_monitor(self, cp_id: str) -> Proc:
        """The CP's monitor; with several Centrals it gets every instance's address."""
        if self.centrals is None:
            return await self.system.start_monitor(cp_id, CHAOS_MONITOR)
        system = self.system
        port = system.engine_ports.setdefault(cp_id, free_port())
        proc = Proc(f"monitor-{cp_id}", [
            "-m", "evcharging.apps.ev_cp_m.main", "--cp-id", cp_id, "--cp-e-host",
            "127.0.0.1", "--cp-e-port", str(port), "--central-host", self.centrals.addresses,
        ], system.env(CHAOS_MONITOR), system.tmp).start()
        system.procs.append(proc)
        await system.wait_cp(cp_id, lambda cp: cp.get("health_url") is not None,
                             "registered by its monitor", 30)
        return proc

    def start_driver_load(self, rate: float, duration: float, cps: int) -> Proc:
        """The driver load generator (ev_load) at `rate` drivers a second for `duration`
        seconds on the fleet's `cps` CPs; its requests count as the test's."""
        self.observer.adopt(f"{DRIVER_LOAD_PREFIX}*")
        system = self.system
        proc = Proc("load", [
            "-m", "evcharging.apps.ev_load.main", "--kafka-bootstrap", system.bootstrap,
            "--topic-prefix", system.prefix, "--rate", f"{rate:g}",
            "--duration", f"{duration:g}", "--seed", "1", "--driver-prefix", DRIVER_LOAD_PREFIX,
            "--central-url", (f"http://127.0.0.1:{system.http_port}" if self.centrals is None
                              else self.centrals.urls), "--cps", str(cps),
            "--cp-prefix", "CP-", "--refresh-interval", "1", "--progress-interval", "10",
        ], system.env(), system.tmp).start()
        system.procs.append(proc)
        return proc

    async def join_site(self, site: str) -> None:
        """Register every CP of the run in `site` (its monitor registered it without one),
        at the engines' rate; returns once Central lists them there."""
        for cp_id in self.cps:
            answer = await self.system.http.post(
                "/cp/register", json={"cp_id": cp_id, "site": site, "kw_rate": KW_RATE})
            assert answer.status_code == 200, answer.text
        for cp_id in self.cps:
            await self.system.wait_cp(cp_id, lambda cp: cp.get("site") == site, f"in {site}")

    async def restart_central(self) -> None:
        self.central = await self.system.start_central(self.central_env)

    async def restart_engine(self, cp_id: str) -> None:
        self.engines[cp_id] = await self.system.start_engine(cp_id, self.engine_envs.get(cp_id))

    async def restart_monitor(self, cp_id: str) -> None:
        self.monitors[cp_id] = await self.start_monitor(cp_id)

    async def close(self) -> None:
        await self.stop_load()
        for charger in self.chargers.values():
            await charger.close()
        await self.watcher.stop()
        await self.observer.stop()
        if self.centrals is not None:
            await self.centrals.close()

    # ---------------------------------------------------------------- load

    def start_load(self) -> None:
        """Requests to every CP, one per CP every LOAD_INTERVAL, answered or not."""
        self._load = asyncio.create_task(self._load_loop(), name="chaos-load")

    async def stop_load(self) -> None:
        task, self._load = self._load, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _load_loop(self) -> None:
        async def one(cp_id: str) -> None:
            while True:
                await self.observer.request(cp_id, f"chaos-driver-{cp_id}")
                await asyncio.sleep(LOAD_INTERVAL)  # pacing of the load, not a wait

        async with asyncio.TaskGroup() as group:
            for cp_id in self.cps:
                group.create_task(one(cp_id))

    def answers(self, cp_id: str) -> str:
        return self.observer.answers(cp_id)

    async def wait_phase(self, phase: Phase, cp_id: str, timeout: float = 40.0) -> None:
        """Until the load has brought `cp_id`'s session to `phase` (see :class:`Phase`)."""
        since = now()
        session = float(CHAOS_ENGINE["CP_ENGINE_SESSION_SECONDS"])

        def supplied_for(seconds: float) -> bool:
            at, _session_id, kwh = self.observer.metered.get(cp_id, (0.0, "", 0.0))
            return at >= since and kwh * 3600 / KW_RATE >= seconds - 1e-6

        async def reached() -> bool:
            ended = [sid for at, cp, sid in self.observer.ended if at >= since and cp == cp_id]
            if phase is Phase.END:
                return bool(ended)
            if phase is Phase.NEXT:
                first_end = min((at for at, cp, _ in self.observer.ended
                                 if at >= since and cp == cp_id), default=None)
                return first_end is not None and self.observer.accepted_since(
                    cp_id, first_end) is not None
            if phase is Phase.RECORDED:
                if not ended:
                    return False
                rows = {r.session_id: r for r in await self.rows()}
                return any(sid in rows and rows[sid].status != "ACTIVE" for sid in ended)
            running = {s.update.cp_id for s in self.observer.seen
                       if s.at >= since and s.update.status is DriverStatus.IN_PROGRESS}
            if not running >= set(self.cps):
                return False
            if phase is Phase.LATE:
                return supplied_for(session - float(CHAOS_ENGINE["CP_ENGINE_TELEMETRY_INTERVAL"]))
            return supplied_for(1.0)

        await poll(reached, timeout=timeout, what=f"{cp_id}'s session {phase.value}",
                   interval=0.02)

    # ---------------------------------------------------------------- after a fault

    async def recover(self, since: float) -> dict[str, float | None]:
        """Every CP's first ACCEPTED after `since`; probe requests go to the CPs that have
        none yet, one at a time. A CP with none within RECOVERY_DEADLINE gets None."""
        deadline = since + RECOVERY_DEADLINE
        pending: dict[str, str] = {}

        async def probe() -> bool:
            for cp_id in self.cps:
                if self.observer.accepted_since(cp_id, since) is not None:
                    continue
                request_id = pending.get(cp_id)
                if request_id is None or self.observer.answered(request_id) is not None:
                    try:
                        pending[cp_id] = await self.observer.request(
                            cp_id, "chaos-probe", within=max(deadline - now(), 1.0)
                        )
                    except KafkaError as exc:
                        raise AssertionError(f"no request could be sent: {exc!r}") from exc
            return all(self.observer.accepted_since(cp, since) is not None for cp in self.cps)

        with contextlib.suppress(AssertionError):
            await poll(probe, timeout=max(deadline - now(), 0.0), what="recovery",
                       interval=0.3)
        return {cp: self.observer.accepted_since(cp, since) for cp in self.cps}

    async def drain(self, timeout: float) -> list[str]:
        """Wait until every request has a final status; returns those that have none."""
        def unanswered() -> list[str]:
            return [r for r in self.observer.requests if self.observer.final(r) is None]

        with contextlib.suppress(AssertionError):
            await poll(lambda: not unanswered(), timeout=timeout, what="every final status")
        return unanswered()

    async def settle(self, timeout: float = 30.0) -> None:
        """Until Central shows every CP idle, and every CP has spoken since."""
        async def idle() -> bool:
            params = {} if self.watcher.limit is None else {"limit": str(self.watcher.limit)}
            response = await self.system.http.get("/cp", params=params)
            return response.status_code == 200 and all(
                cp["current_session"] is None and cp["state"] != "SUPPLYING"
                for cp in response.json() if cp["cp_id"] in self.cps
            )

        await poll(idle, timeout=timeout, what="every CP idle", interval=0.2,
                   retry_on=(httpx.HTTPError, OSError))
        mark = now()
        await poll(
            lambda: all(self.observer.heard.get(cp, 0.0) > mark for cp in self.cps),
            timeout=15, what="a status of every CP after settling",
        )

    async def rows(self) -> list[SessionRow]:
        if self.centrals is not None:
            return await read_pg_rows(self.centrals.db_url)
        return await asyncio.to_thread(read_rows, self.system.db_path)

    async def meter_problems(self) -> list[str]:
        """The ledger held to the OCPP chargers' own meters: each transaction a charger
        ran and stopped is one COMPLETED session of Central's on its CP that starts and
        ends at the charger's own times and is billed (kWh) exactly its meter's stop minus
        start; every COMPLETED session on those CPs is one of these transactions."""
        rows = await self.rows()
        times = await asyncio.to_thread(read_times, self.system.db_path)
        problems: list[str] = []
        matched: set[str] = set()
        for charger in self.chargers.values():
            for tx in charger.transactions:
                if tx.stopped is None or tx.kwh is None:
                    continue  # still running (the end of the test stops it)
                started = datetime.fromisoformat(tx.started)
                found = [r for r in rows if r.cp_id == tx.cp_id
                         and datetime.fromisoformat(times[r.session_id][0]) == started]
                what = (f"{tx.cp_id}'s transaction {tx.transaction_id} ({tx.started} → "
                        f"{tx.stopped}, {tx.kwh:.3f} kWh by its meter, "
                        f"{tx.offline_messages} message(s) queued offline)")
                if len(found) != 1:
                    starts = sorted(times[r.session_id][0] for r in rows if r.cp_id == tx.cp_id)
                    problems.append(f"{what}: {len(found)} session(s) of Central's start at "
                                    f"its start; the CP's sessions start at {starts}")
                    continue
                row = found[0]
                matched.add(row.session_id)
                end = times[row.session_id][1]
                if row.status != "COMPLETED" or not math.isclose(
                        row.kwh, tx.kwh, rel_tol=0, abs_tol=1e-9):
                    problems.append(f"{what}: Central's session {row.session_id} is "
                                    f"{row.status} {row.kwh:.6f} kWh ({row.reason!r})")
                if end is None or datetime.fromisoformat(end) != datetime.fromisoformat(
                        tx.stopped):
                    problems.append(f"{what}: Central's session {row.session_id} ends at "
                                    f"{end}, not at the charger's stop")
        problems += [
            f"session {r.session_id} on {r.cp_id} is COMPLETED {r.totals}, but no "
            f"transaction of its charger ran then ({r.reason!r})"
            for r in rows
            if r.cp_id in self.chargers and r.status == "COMPLETED"
            and r.session_id not in matched
        ]
        for cp_id, charger in self.chargers.items():
            problems += [f"{cp_id}'s charger: {error}" for error in charger.stats.errors]
        return problems

    async def check(
        self, timeout: float = 15.0, *, exactly_once: bool = False
    ) -> tuple[list[SessionRow], list[Breach]]:
        """The ledger check, repeated until it passes or `timeout` ends (late corrections
        may still be on their way); returns the last rows and breaches."""
        last: tuple[list[SessionRow], list[Breach]] = ([], [])

        async def passes() -> bool:
            nonlocal last
            rows = await self.rows()
            last = rows, check_ledger(
                self.observer.requests, rows, self.observer.meter, self.observer.updates,
                exactly_once=exactly_once,
            )
            return not last[1]

        with contextlib.suppress(AssertionError):
            await poll(passes, timeout=timeout, what="an exact ledger", interval=0.5)
        return last


@contextlib.asynccontextmanager
async def chaos_system(bootstrap: str, tmp: Path, cps: Sequence[str]) -> AsyncIterator[ChaosRun]:
    """A :class:`ChaosRun` on its own topics, database and ports; on failure the tail of
    every process's log goes to stderr (the whole logs stay in `tmp`)."""
    system = System(bootstrap, tmp)
    run = ChaosRun(system, cps)
    failed = False
    try:
        yield run
    except BaseException:
        failed = True
        raise
    finally:
        await run.close()
        await system.close()
        if failed:
            sys.stderr.write(f"logs in {tmp}\n{system.logs()}")
