"""The CP Fleet as OCPP chargers: ``--protocol ocpp1.6|ocpp2.0.1 --ocpp-url ws://…`` (SPEC §8).

Each of the fleet's ids is a charger (:class:`~evcharging.apps.ev_fleet.ocpp_charger.ChargerModel`)
with one connector, connected to ``{ocpp_url}{charger_id}`` over its own WebSocket; the
gateway makes it the CP ``{charger_id}.1`` at Central. The fleet speaks no Kafka then and
registers nothing: the gateway does both.

Light enough for thousands of chargers in one process:

* one task per charger: it connects (backoff 1 s doubling to 30 s after a failure), reads
  its connection and answers the gateway's CALLs; nothing else runs per charger;
* one scheduler task for the whole fleet: every :data:`TICK` it sends the heartbeats that
  are due (each charger at its own phase of the interval its BootNotification was answered
  with), the meter readings and the ends of the running transactions, and gives up on a
  CALL unanswered for ``call_timeout`` seconds;
* a charger has one CALL in flight at a time (OCPP-J): the next ones wait in its outbox
  and go out as answers come back; no WebSocket keepalive pings (the heartbeats are) and
  no compression (per-connection zlib state).

A charger that loses its connection keeps its transaction: the transaction's start and stop
wait in its outbox and go out after the next BootNotification, as a real charger replays them.

``GET /health`` on the fleet's HTTP port: the chargers connected, booted and charging, the
sessions, the CALLs by action and result and their round-trip times (p50, p99, in ms), also
since ``POST /round-trips/mark`` (a benchmark leaves the boot storm out).
Shutdown: the scheduler; a running transaction ends (reason ``Local``, so it is billed), its
stop waits up to :data:`STOP_DRAIN` seconds for its answer; the connections close.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from loguru import logger
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from evcharging.apps.ev_fleet.ocpp_charger import ChargerModel, Outgoing, Reply
from evcharging.apps.ev_load.stats import percentile
from evcharging.common.backoff import Restartable, doubling, until_done

__all__ = ["ChargerConnection", "OcppFleet", "OcppFleetStats", "quantile"]

TICK = 0.2
"""Seconds between two rounds of the scheduler."""
SLICES = 10
"""The parts of a round, each over its share of the tick (chargers n, n + SLICES, ...)."""
STOP_DRAIN = 5.0
"""Seconds the fleet waits at shutdown for its transactions' stops to be answered."""
RTT_SAMPLES = 200_000
"""Round-trip times kept per action (the oldest go first)."""
KEEP_OFFLINE = frozenset({"start", "stop", "started", "ended"})
"""The CALLs a charger keeps while it is offline and sends when it is back."""
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0


def quantile(values: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0 < q <= 1, nearest rank, as the load generator's percentiles) of
    `values`; None when there are none."""
    return percentile(values, q * 100) if values else None


@dataclass
class OcppFleetStats:
    """What the fleet's chargers did (read it, do not write it)."""

    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    sent: Counter[str] = field(default_factory=Counter)
    results: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(action, ``ok`` / a CALLERROR code / ``timeout`` / ``lost``) of the charger's CALLs."""
    answered: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(action, ``ok`` / CALLERROR code) of the gateway's CALLs the chargers answered."""
    rtt: dict[str, deque[float]] = field(default_factory=dict)
    since_mark: dict[str, deque[float]] | None = None
    """The round trips since :meth:`mark` (a benchmark's boot storm left out), if marked."""

    def observe(self, action: str, seconds: float) -> None:
        for kept in (self.rtt, self.since_mark):
            if kept is None:
                continue
            samples = kept.get(action)
            if samples is None:
                samples = kept[action] = deque(maxlen=RTT_SAMPLES)
            samples.append(seconds)

    def mark(self) -> None:
        """Keep the round trips from now on apart too (:meth:`round_trips` ``since_mark``)."""
        self.since_mark = {}

    def round_trips(self, *, since_mark: bool = False
                    ) -> dict[str, dict[str, float | int | None]]:
        """Per action: count, p50 and p99 in milliseconds (since :meth:`mark`: of the round
        trips since then; none before a mark)."""
        shown: dict[str, dict[str, float | int | None]] = {}
        kept = (self.since_mark or {}) if since_mark else self.rtt
        for action, samples in sorted(kept.items()):
            values = list(samples)
            p50, p99 = quantile(values, 0.5), quantile(values, 0.99)
            shown[action] = {
                "count": len(values),
                "p50_ms": None if p50 is None else round(p50 * 1000, 2),
                "p99_ms": None if p99 is None else round(p99 * 1000, 2),
            }
        return shown


class ChargerConnection:
    """One charger's connection: its outbox, its CALL in flight and its reader."""

    __slots__ = ("_ids", "booted", "connected_once", "counted", "fleet", "inflight", "model",
                 "next_boot", "next_heartbeat", "outbox", "url", "ws")

    def __init__(self, model: ChargerModel, url: str, fleet: OcppFleet) -> None:
        self.model = model
        self.url = url
        self.fleet = fleet
        self.ws: ClientConnection | None = None
        self.outbox: deque[Outgoing] = deque()
        self.inflight: tuple[str, Outgoing, float] | None = None
        self.booted = False
        self.next_heartbeat = 0.0
        self.next_boot = 0.0
        self._ids = 0
        self.connected_once = False
        self.counted = False

    # ---------------------------------------------------------------- the connection

    async def run(self) -> None:
        """Connect, boot and serve until cancelled; reconnect with backoff
        (:data:`BACKOFF_FIRST` doubling up to :data:`BACKOFF_MAX`, ±20 % jitter), from
        :data:`BACKOFF_FIRST` again once a connection opened."""
        backoff = Restartable(doubling(BACKOFF_FIRST, BACKOFF_MAX, jitter=0.2))

        async def session() -> bool:
            await self._session(backoff.restart)
            return False  # the connection failed or closed: always try again

        await until_done(session, backoff, what=None)

    async def _session(self, opened: Callable[[], None]) -> None:
        """One connection: open it, boot and serve until it closes (`opened` is called
        when it opens)."""
        stats = self.fleet.stats
        try:
            async with connect(
                self.url, subprotocols=[Subprotocol(self.model.protocol)],
                additional_headers=self.fleet.headers(self.model.charger_id),
                open_timeout=self.fleet.call_timeout, ping_interval=None,
                close_timeout=2, compression=None, max_queue=4,
            ) as ws:
                stats.connects += 1
                self._opened(ws)
                opened()
                await self.flush()
                async for raw in ws:
                    await self.receive(raw)
        except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
            if self.ws is None:
                stats.connect_failures += 1
                self.fleet.failed_once(self, exc)
        finally:
            if self.ws is not None:
                stats.disconnects += 1
            self._closed()

    def _opened(self, ws: ClientConnection) -> None:
        self.ws = ws
        if not self.connected_once:
            self.connected_once = True
            self.fleet.attempted()
        kept = [out for out in self.outbox if out.kind in KEEP_OFFLINE]
        self.outbox = deque([self.model.boot(), *kept])
        self.inflight = None
        self.booted = False

    def _closed(self) -> None:
        if self.ws is not None and self.inflight is not None:
            out = self.inflight[1]
            self.fleet.stats.results[(out.action, "lost")] += 1
            if out.kind in KEEP_OFFLINE:
                self.outbox.appendleft(out)
        self.ws = None
        self.inflight = None
        self.booted = False
        if not self.connected_once:
            self.connected_once = True
            self.fleet.attempted()

    async def call(self, out: Outgoing) -> None:
        """Send `out` now, or after the CALLs before it are answered."""
        if self.ws is None:
            if out.kind in KEEP_OFFLINE:
                self.outbox.append(out)
            return
        self.outbox.append(out)
        if self.inflight is None:
            await self.flush()

    async def flush(self) -> None:
        """Send the next CALL of the outbox when none is in flight."""
        ws = self.ws
        if ws is None or self.inflight is not None or not self.outbox:
            return
        out = self.outbox.popleft()
        self._ids += 1
        unique = str(self._ids)
        self.inflight = (unique, out, time.perf_counter())
        self.fleet.stats.sent[out.action] += 1
        await ws.send(json.dumps([2, unique, out.action, out.payload], separators=(",", ":")))

    async def receive(self, raw: str | bytes) -> None:
        """One message of the gateway: a CALL is answered, an answer ends the CALL in
        flight."""
        try:
            message = json.loads(raw)
            kind, unique = int(message[0]), str(message[1])
        except (ValueError, TypeError, IndexError, KeyError):
            self.fleet.stats.results[("unknown", "unparsable")] += 1
            return
        if kind == 2:
            await self._answer(unique, str(message[2]), message[3])
            return
        inflight = self.inflight
        if inflight is None or inflight[0] != unique:
            return  # late: the CALL timed out
        _, out, sent_at = inflight
        self.inflight = None
        self.fleet.progress.set()
        stats = self.fleet.stats
        if kind == 3:
            stats.results[(out.action, "ok")] += 1
            stats.observe(out.action, time.perf_counter() - sent_at)
            for follow in self._followups(out, message[2]):
                self.outbox.append(follow)
        else:
            stats.results[(out.action, str(message[2]) if len(message) > 2 else "error")] += 1
            if out.kind == "boot":
                self.next_boot = time.monotonic() + self.fleet.reboot_after
        await self.flush()

    def _followups(self, out: Outgoing, answer: Any) -> list[Outgoing]:
        payload = answer if isinstance(answer, dict) else {}
        now = time.monotonic()
        if out.kind == "boot":
            follow = self.model.on_boot(payload)
            if self.model.interval is None or payload.get("status") != "Accepted":
                self.next_boot = now + float(payload.get("interval") or self.fleet.reboot_after)
                return []
            self.booted = True
            self.fleet.booted_once(self)
            interval = self.model.interval
            self.next_heartbeat = now + random.uniform(0.0, interval)  # noqa: S311 - a phase
            return follow
        if out.kind == "start":
            return self.model.on_started(payload, now)
        return []

    async def _answer(self, unique: str, action: str, payload: Any) -> None:
        ws = self.ws
        if ws is None:
            return
        try:
            reply = self.model.handle(action, payload if isinstance(payload, dict) else {},
                                      time.monotonic())
        except (KeyError, TypeError, ValueError):
            reply = Reply(error="FormationViolation")
        if reply.error is not None:
            self.fleet.stats.answered[(action, reply.error)] += 1
            frame: list[Any] = [4, unique, reply.error, "", {}]
        else:
            self.fleet.stats.answered[(action, "ok")] += 1
            frame = [3, unique, reply.payload or {}]
        await ws.send(json.dumps(frame, separators=(",", ":")))
        for out in reply.then:
            await self.call(out)

    # ---------------------------------------------------------------- the scheduler's part

    def due(self, now: float, clock: float) -> bool:
        """Whether :meth:`tick` has anything to do (a cheap test, no coroutine)."""
        if self.ws is None:
            return False
        if self.inflight is not None and clock - self.inflight[2] > self.fleet.call_timeout:
            return True
        if not self.booted:
            return self.inflight is None and not self.outbox and now >= self.next_boot
        return now >= self.next_heartbeat or self.model.tx is not None

    async def tick(self, now: float) -> None:
        """What is due now: a timed-out CALL, a heartbeat, a meter reading, a stop."""
        if self.ws is None:
            return
        inflight = self.inflight
        if inflight is not None and time.perf_counter() - inflight[2] > self.fleet.call_timeout:
            out = inflight[1]
            self.inflight = None
            self.fleet.stats.results[(out.action, "timeout")] += 1
            if out.kind == "boot":
                self.next_boot = now + self.fleet.reboot_after
            await self.flush()
        if not self.booted:
            if self.inflight is None and not self.outbox and now >= self.next_boot:
                self.next_boot = now + self.fleet.reboot_after
                await self.call(self.model.boot())
            return
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + (self.model.interval or 60.0)
            await self.call(self.model.heartbeat())
        if self.model.tx is not None:
            for out in self.model.due(now):
                await self.call(out)

    async def close(self) -> None:
        ws = self.ws
        if ws is not None:
            await ws.close()


class OcppFleet:
    """The fleet's chargers, their scheduler and their counters."""

    def __init__(
        self,
        ids: Sequence[str],
        protocol: str,
        url: str,
        *,
        kw_rate: float,
        session_seconds: float,
        telemetry_interval: float,
        call_timeout: float = 30.0,
        password: str | None = None,
        reboot_after: float = 10.0,
    ) -> None:
        if not url.endswith("/"):
            url += "/"
        self.protocol = protocol
        self.url = url
        self.call_timeout = call_timeout
        self.reboot_after = reboot_after
        self.password = password
        self.stats = OcppFleetStats()
        self.chargers = [
            ChargerConnection(ChargerModel(
                charger_id, protocol, kw_rate=kw_rate, session_seconds=session_seconds,
                telemetry_interval=telemetry_interval), url + charger_id, self)
            for charger_id in ids
        ]
        self.booted = 0
        """Chargers whose BootNotification has been Accepted at least once."""
        self.first_boot_at: float | None = None
        self.all_booted_at: float | None = None
        self._attempts = 0
        self._attempt = asyncio.Event()
        self.progress = asyncio.Event()
        """Set whenever a CALL of a charger is answered (the shutdown waits on it)."""
        self._logged_failure = False
        self._tasks: list[asyncio.Task[None]] = []
        self._scheduler: asyncio.Task[None] | None = None
        self.started_at: float | None = None

    def __len__(self) -> int:
        return len(self.chargers)

    def headers(self, charger_id: str) -> dict[str, str]:
        if self.password is None:
            return {}
        token = base64.b64encode(f"{charger_id}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def attempted(self) -> None:
        self._attempts += 1
        self._attempt.set()

    def failed_once(self, charger: ChargerConnection, exc: BaseException) -> None:
        if not self._logged_failure:
            self._logged_failure = True
            logger.warning("charger {} could not connect to {} ({!r}); the chargers retry "
                           "with backoff (logged once)", charger.model.charger_id,
                           charger.url, exc)

    def booted_once(self, charger: ChargerConnection) -> None:
        if charger.counted:
            return
        charger.counted = True
        self.booted += 1
        now = time.monotonic()
        if self.first_boot_at is None:
            self.first_boot_at = now
        if self.booted == len(self.chargers):
            self.all_booted_at = now
            logger.info("all {:,} chargers booted in {:.1f} s", self.booted,
                        now - (self.started_at or now))

    # ---------------------------------------------------------------- lifecycle

    async def connect(self, batch: int = 250, spawn: Callable[..., Any] | None = None) -> None:
        """Start every charger, `batch` at a time: the next batch once the chargers before
        have tried to connect once (or after ``call_timeout``)."""
        self.started_at = time.monotonic()
        for at in range(0, len(self.chargers), batch):
            for charger in self.chargers[at:at + batch]:
                self._tasks.append(asyncio.create_task(
                    charger.run(), name=f"ocpp charger {charger.model.charger_id}"))
            wanted = min(at + batch, len(self.chargers))
            deadline = time.monotonic() + self.call_timeout
            while self._attempts < wanted and time.monotonic() < deadline:
                self._attempt.clear()
                try:
                    await asyncio.wait_for(self._attempt.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break
        connected = sum(1 for c in self.chargers if c.ws is not None)
        logger.info("{:,}/{:,} chargers connected to {} in {:.1f} s", connected,
                    len(self.chargers), self.url, time.monotonic() - self.started_at)
        self._scheduler = asyncio.create_task(self._schedule(), name="ocpp fleet scheduler")

    async def _schedule(self) -> None:
        """Every :data:`TICK` each charger's due CALLs, one :data:`SLICES` th of the
        chargers at a time, evenly over the tick: all at once, every meter reading came due
        on the same tick and the gateway got ~230 CALLs in a burst every 0.2 s at 5,000
        chargers, which the round trips then measured (the chargers queued behind each
        other)."""
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            for part in range(SLICES):
                now, clock = time.monotonic(), time.perf_counter()
                for charger in self.chargers[part::SLICES]:
                    if not charger.due(now, clock):
                        continue
                    try:
                        await charger.tick(now)
                    except ConnectionClosed:
                        continue  # its reader sees it too and reconnects
                await asyncio.sleep(max(0.0, began + (part + 1) * TICK / SLICES - loop.time()))

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return [*self._tasks, *([self._scheduler] if self._scheduler else [])]

    async def stop(self) -> None:
        """End the running transactions (billed), then close every connection."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        now = time.monotonic()
        stopping = [c for c in self.chargers if c.model.tx is not None and c.ws is not None]
        for charger in stopping:
            for out in charger.model.stop(now, "Local"):
                try:
                    await charger.call(out)
                except ConnectionClosed:
                    break
        deadline = time.monotonic() + STOP_DRAIN
        while time.monotonic() < deadline and any(
                c.ws is not None and (c.inflight is not None or c.outbox) for c in stopping):
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), deadline - time.monotonic())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        logger.info("OCPP fleet stopped: {:,} sessions ended at shutdown", len(stopping))

    # ---------------------------------------------------------------- views

    def health(self) -> dict[str, Any]:
        chargers = self.chargers
        started = sum(c.model.sessions_started for c in chargers)
        ended = sum(c.model.sessions_ended for c in chargers)
        boot_time = (None if self.all_booted_at is None or self.started_at is None
                     else round(self.all_booted_at - self.started_at, 3))
        return {
            "status": "ok",
            "protocol": self.protocol,
            "url": self.url,
            "chargers": len(chargers),
            "connected": sum(1 for c in chargers if c.ws is not None),
            "booted": sum(1 for c in chargers if c.booted),
            "booted_once": self.booted,
            "all_booted_seconds": boot_time,
            "charging": sum(1 for c in chargers if c.model.tx is not None),
            "sessions": {"started": started, "ended": ended},
            "connects": self.stats.connects,
            "connect_failures": self.stats.connect_failures,
            "disconnects": self.stats.disconnects,
            "calls": {f"{action} {result}": n
                      for (action, result), n in sorted(self.stats.results.items())},
            "answered": {f"{action} {result}": n
                         for (action, result), n in sorted(self.stats.answered.items())},
            "round_trips": self.stats.round_trips(),
            "round_trips_since_mark": (None if self.stats.since_mark is None
                                       else self.stats.round_trips(since_mark=True)),
        }


def create_ocpp_fleet_app(fleet: OcppFleet) -> FastAPI:
    """``GET /health`` of an OCPP fleet (always 200: the chargers retry on their own)."""
    app = FastAPI(title="CP Fleet (OCPP)", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(fleet.health())

    @app.post("/round-trips/mark")
    async def mark() -> JSONResponse:
        """Keep the round trips from now on apart (``round_trips_since_mark`` of /health):
        bench-ocpp marks once every charger has booted."""
        fleet.stats.mark()
        return JSONResponse({"status": "marked"})

    return app
