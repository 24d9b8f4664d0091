"""The chaos harness: a system under load, what it says on the broker, and the ledger check.

* :class:`Observer` reads ``driver.updates``, ``cp.status`` and ``cp.telemetry`` of one
  system from the beginning with its own aiokafka consumer (no group, nothing committed)
  and publishes driver requests with its own producer. It does not use the project's bus
  (it observes it), and it survives a broker restart: aiokafka reconnects, and a request
  whose send failed is sent again with the same id.
* :class:`Watcher` polls Central's ``/health`` and ``/cp`` and keeps every change it sees
  with its time: the signs that Central noticed a fault.
* :class:`DbLock` is another process holding ``BEGIN EXCLUSIVE`` on Central's database.
* :class:`ChaosRun` starts Central and its CPs (the e2e fixtures' :class:`System`), keeps
  requests coming, measures recovery after a fault and checks the ledger once things have
  settled (:func:`tests.chaos.ledger.check_ledger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
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
    decode,
    encode,
    new_id,
)
from tests.chaos.ledger import Breach, MeterLog, SessionRow, Totals, check_ledger
from tests.e2e.conftest import Proc, System
from tests.polling import poll

CHAOS_ENGINE = {
    "CP_ENGINE_SESSION_SECONDS": "6",
    "CP_ENGINE_TELEMETRY_INTERVAL": "0.5",
    "CP_ENGINE_STATUS_INTERVAL": "1",
}
CHAOS_MONITOR = {"CP_MONITOR_HEALTH_INTERVAL": "0.5"}
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

    TOPICS = (Topic.DRIVER_UPDATES, Topic.CP_STATUS, Topic.CP_TELEMETRY)

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
        self.results: dict[str, set[str]] = {}
        """session id → how its CP said it ended (end statuses and heartbeats)."""
        self.invalid = 0
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
                await asyncio.sleep(0.2)
                continue
            for records in batch.values():
                for record in records:
                    self._read(record.topic.removeprefix(self.prefix), record.value)

    def _read(self, topic: str, value: bytes) -> None:
        try:
            if topic == Topic.DRIVER_UPDATES:
                update = decode(DriverUpdate, value)
                self.updates.setdefault(update.request_id, []).append(update)
                self.seen.append(Seen(now(), update))
            elif topic == Topic.CP_STATUS:
                status = decode(CPStatus, value)
                self.heard[status.cp_id] = now()
                if status.session_result is not None and status.session_id is not None:
                    self.ended.append((now(), status.cp_id, status.session_id))
                end = status.session_end()
                if end is not None:
                    self.meter.add_end(end.session_id, Totals(end.kwh, end.euros))
                    self.results.setdefault(end.session_id, set()).add(end.result.value)
            elif topic == Topic.CP_TELEMETRY:
                telemetry = decode(CPTelemetry, value)
                if telemetry.session_id is not None:
                    self.meter.add_telemetry(
                        telemetry.session_id, Totals(telemetry.kwh, telemetry.euros)
                    )
                    self.metered[telemetry.cp_id] = (now(), telemetry.session_id, telemetry.kwh)
        except ValidationError:
            self.invalid += 1

    async def request(self, cp_id: str, driver_id: str) -> str:
        """Publish a DriverRequest; a failed send is repeated with the same request id."""
        assert self._producer is not None
        request = DriverRequest(request_id=new_id(), driver_id=driver_id, cp_id=cp_id)
        self.requests[request.request_id] = cp_id
        self.sent_at[request.request_id] = now()
        deadline = now() + SEND_DEADLINE
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
                await asyncio.sleep(0.3)

    def answered(self, request_id: str) -> DriverStatus | None:
        """ACCEPTED or the final status once the request has one, else None."""
        for update in self.updates.get(request_id, ()):
            if update.status is DriverStatus.ACCEPTED or update.status.is_final:
                return update.status
        return None

    def final(self, request_id: str) -> DriverUpdate | None:
        return next((u for u in self.updates.get(request_id, ()) if u.status.is_final), None)

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
                cps = await self.http.get("/cp", timeout=3)
                if cps.status_code == 200:
                    for cp in cps.json():
                        cp_id = cp["cp_id"]
                        self._note("faulty", cp_id, cp.get("is_faulty"))
                        self._note("state", cp_id, cp.get("state"))
                        self._note("monitored", cp_id, cp.get("monitored"))
            except (httpx.HTTPError, OSError, ValueError):
                self._note("health", None, "down")
            await asyncio.sleep(self.interval)

    def first(self, since: float, match: Callable[[Sign], bool]) -> float | None:
        return next((s.at for s in self.signs if s.at >= since and match(s)), None)


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
    header = ("fault", "detection", "recovery", "sessions", "requests", "corrected",
              "mismatches", "result")
    rows = [header] + [
        (o.fault, _seconds(o.detection), _seconds(o.recovery), str(o.sessions),
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
        self._load: asyncio.Task[None] | None = None

    async def start(self, central_env: dict[str, str] | None = None) -> None:
        self.system.engine_env.update(CHAOS_ENGINE)
        self.central_env = dict(central_env or {})
        self.central = await self.system.start_central(self.central_env)
        await asyncio.gather(*(self.start_cp(cp) for cp in self.cps))
        await self.observer.start()
        self.watcher.start()

    async def start_cp(self, cp_id: str) -> None:
        self.engines[cp_id] = await self.system.start_engine(cp_id)
        self.monitors[cp_id] = await self.system.start_monitor(cp_id, CHAOS_MONITOR)

    async def restart_central(self) -> None:
        self.central = await self.system.start_central(self.central_env)

    async def restart_engine(self, cp_id: str) -> None:
        self.engines[cp_id] = await self.system.start_engine(cp_id)

    async def restart_monitor(self, cp_id: str) -> None:
        self.monitors[cp_id] = await self.system.start_monitor(cp_id, CHAOS_MONITOR)

    async def close(self) -> None:
        await self.stop_load()
        await self.watcher.stop()
        await self.observer.stop()

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
                    pending[cp_id] = await self.observer.request(cp_id, "chaos-probe")
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
            response = await self.system.http.get("/cp")
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
        return await asyncio.to_thread(read_rows, self.system.db_path)

    async def check(self, timeout: float = 15.0) -> tuple[list[SessionRow], list[Breach]]:
        """The ledger check, repeated until it passes or `timeout` ends (late corrections
        may still be on their way); returns the last rows and breaches."""
        last: tuple[list[SessionRow], list[Breach]] = ([], [])

        async def passes() -> bool:
            nonlocal last
            rows = await self.rows()
            last = rows, check_ledger(
                self.observer.requests, rows, self.observer.meter, self.observer.updates
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
