"""Many drivers in one process: Poisson arrivals, one request each, followed to its end.

Over 400 lines: the generator's schedule, CP chooser and request bookkeeping, which
share one run's state; the statistics are :mod:`~evcharging.apps.ev_load.stats`.

The pure parts: :func:`arrival_offsets` (the schedule, from a seeded generator),
:func:`parse_cps` (the ``--cps`` list), :class:`CPChooser` (which CPs are free: Central's
reading less this run's own open requests) and :class:`OpenRequests` (the requests being
followed, oldest first, for the timeouts). :class:`LoadGenerator` runs them over a
:class:`~evcharging.common.bus.Publisher` and is fed ``driver.updates`` through
:meth:`LoadGenerator.handle_update`; it counts everything in a
:class:`~evcharging.apps.ev_load.stats.Tally`.

Each arrival ``n`` is a new driver ``{prefix}{n:06d}`` that sends one
:class:`DriverRequest` for a CP that is free, follows it until a final update (COMPLETED,
FAILED, DENIED) or until ``request_timeout`` seconds have passed since it was sent (then
it counts as timed out: unlike ``ev_driver``'s, this timer does not restart on updates, so
every request→final latency is bounded and a run ends at most ``request_timeout`` seconds
after its last arrival), and leaves. When no CP is known
free the arrival sends nothing and counts as "no free CP"; with ``allow_busy`` it sends its
request to a random known CP instead, so that Central's DENIED path is loaded too.

With ``cars`` every arrival also draws a car, the energy it wants and a departure (SPEC
§10) by :func:`draw_car_request`: :mod:`evcharging.common.workplace`'s ACN-like workplace
drivers (:data:`LOAD_CARS`), from a generator of their own seeded by the run's seed, so the
arrivals and CP choices are those of the same seed without cars, and the ``n``-th driver
gets the same car whatever CPs were free. The draw is made on arrival, before a CP is
chosen. A session then lasts until its car has what it wants (or is full): minutes to hours,
so such runs need a ``request_timeout`` to match.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta

from loguru import logger

from evcharging.apps.ev_load.stats import Outcome, RunInfo, Tally, progress_line
from evcharging.common.bus import BusError, Publisher
from evcharging.common.messages import (
    ID_PATTERN,
    CarSpec,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    new_id,
    utcnow,
)
from evcharging.common.service import TaskOwner
from evcharging.common.workplace import ACN_WORKPLACE, LogNormal, Normal, Uniform, draw_visit

__all__ = [
    "LOAD_CARS",
    "CPChooser",
    "CarRequest",
    "Choice",
    "LoadGenerator",
    "OpenRequest",
    "OpenRequests",
    "arrival_offsets",
    "cars_rng",
    "draw_car_request",
    "driver_id",
    "fleet_ids",
    "parse_cps",
]

_ID = re.compile(ID_PATTERN)
FLEET_ID_DIGITS = 5
"""ev_fleet numbers its CPs CP-00001 … CP-10000: at least five digits."""


def arrival_offsets(rate: float, duration: float, rng: random.Random) -> Iterator[float]:
    """The arrival times of a Poisson process of `rate` per second, in seconds from the
    start, up to (not including) `duration`: gaps drawn from an exponential distribution.
    The same seed gives the same schedule."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be > 0")
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return
        yield t


LOAD_CARS = replace(
    ACN_WORKPLACE,
    employee_stay_h=Normal(7.5, 1.2, 2.0, 9.0),
    visitor_stay_h=LogNormal(3.0, 0.4, 2.0, 9.0),
    car_max_kw=((7.4, 0.25), (11.0, 0.40), (22.0, 0.10), (50.0, 0.15), (150.0, 0.10)),
    arrival_soc=Uniform(0.10, 0.60),
)
"""The drivers of ``--cars``: ACN-like workplace drivers who stay 2–9 h, in cars of 40–100
kWh that arrive at 10–60 % and take 7.4–150 kW (AC on-board chargers and DC cars)."""


@dataclass(frozen=True)
class CarRequest:
    """What a driver of ``--cars`` asks for besides a CP."""

    kwh_wanted: float
    stay: timedelta
    """From the request to the departure."""
    car: CarSpec


def cars_rng(seed: int) -> random.Random:
    """The generator of a run's cars: its own, so the arrivals and choices do not move."""
    return random.Random(f"cars-{seed}")  # noqa: S311 - a reproducible draw, not a secret


def draw_car_request(rng: random.Random) -> CarRequest:
    """One driver's car, energy wanted (kWh, 3 decimals) and stay (whole seconds)."""
    visit = draw_visit(rng, LOAD_CARS)
    car = visit.car
    return CarRequest(
        kwh_wanted=max(0.001, round(visit.kwh_wanted, 3)),
        stay=timedelta(seconds=round(visit.stay_h * 3600)),
        car=CarSpec(battery_kwh=car.battery_kwh, soc=car.soc, max_kw=car.max_kw),
    )


def driver_id(prefix: str, n: int) -> str:
    """The id of the `n`-th driver of a run."""
    return f"{prefix}{n:06d}"


def fleet_ids(prefix: str, count: int) -> list[str]:
    """The ids ev_fleet gives `count` CPs: ``{prefix}00001`` … (wider past 99999)."""
    width = max(FLEET_ID_DIGITS, len(str(count)))
    return [f"{prefix}{n:0{width}d}" for n in range(1, count + 1)]


def parse_cps(text: str | None, prefix: str = "CP-") -> frozenset[str] | None:
    """The CPs ``--cps`` names: None (every CP) when unset; ids separated by commas; or a
    count N (digits only) for the fleet's ``{prefix}00001`` … N. ValueError when invalid."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text.isdecimal():
        count = int(text)
        if count < 1:
            raise ValueError("--cps as a count must be at least 1")
        ids = fleet_ids(prefix, count)
    else:
        ids = [part.strip() for part in text.split(",") if part.strip()]
    bad = [cp_id for cp_id in ids if _ID.fullmatch(cp_id) is None]
    if bad:
        raise ValueError(f"invalid CP id {bad[0]!r} in --cps")
    if not ids:
        raise ValueError("--cps names no CP")
    return frozenset(ids)


@dataclass(frozen=True)
class Choice:
    cp_id: str
    busy: bool
    """The CP was not known free (sent anyway, with allow_busy)."""


class CPChooser:
    """Which CPs are free for the next request.

    A CP is *free* when the last reading of Central (:meth:`update`: the ACTIVATED CPs)
    listed it, it is in scope (``only``), and no open request of this run is on it. A
    request :meth:`take`\\ s a CP and :meth:`release`\\ s it at its end: after COMPLETED the
    CP is free again at once (Central has just ended its session); after any other end it
    waits for the next reading to say it is ACTIVATED.

    Picking is O(1): the free CPs are a list with an index (swap-remove).
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        only: frozenset[str] | None = None,
        allow_busy: bool = False,
    ) -> None:
        self._rng = rng
        self.only = only
        self.allow_busy = allow_busy
        self._known: set[str] = set()
        self._free: list[str] = []
        self._index: dict[str, int] = {}
        self._busy: Counter[str] = Counter()
        self._seen: list[str] = []
        """Every in-scope CP any reading listed: where allow_busy sends when none is free."""
        self._seen_set: set[str] = set()

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def known_count(self) -> int:
        """CPs in scope that are ACTIVATED (last reading) or busy with this run."""
        return len(self._known | set(self._busy))

    @property
    def busy_count(self) -> int:
        return len(self._busy)

    def is_free(self, cp_id: str) -> bool:
        return cp_id in self._index

    def in_scope(self, cp_id: str) -> bool:
        return self.only is None or cp_id in self.only

    def update(self, activated: Iterable[str]) -> None:
        """A new reading of Central: these CPs are ACTIVATED (out-of-scope ones are dropped)."""
        self._known = {cp_id for cp_id in activated if self.in_scope(cp_id)}
        for cp_id in sorted(self._known - self._seen_set):
            self._seen_set.add(cp_id)
            self._seen.append(cp_id)
        self._free = sorted(cp_id for cp_id in self._known if cp_id not in self._busy)
        self._index = {cp_id: i for i, cp_id in enumerate(self._free)}

    def take(self) -> Choice | None:
        """A free CP, at random, now busy; with allow_busy and none free, any CP seen;
        else None."""
        if self._free:
            cp_id = self._free[self._rng.randrange(len(self._free))]
            self._remove_free(cp_id)
            self._known.discard(cp_id)  # free again after COMPLETED, or a reading saying so
            self._busy[cp_id] += 1
            return Choice(cp_id, busy=False)
        if self.allow_busy and self._seen:
            cp_id = self._seen[self._rng.randrange(len(self._seen))]
            self._busy[cp_id] += 1
            return Choice(cp_id, busy=True)
        return None

    def release(self, cp_id: str, *, free: bool) -> None:
        """A request on `cp_id` ended; `free`: it left the CP free (COMPLETED, or not sent)."""
        if self._busy[cp_id] > 1:
            self._busy[cp_id] -= 1
            return
        self._busy.pop(cp_id, None)
        if free and self.in_scope(cp_id):
            self._known.add(cp_id)
        if cp_id in self._known and cp_id not in self._index:
            self._index[cp_id] = len(self._free)
            self._free.append(cp_id)

    def _remove_free(self, cp_id: str) -> None:
        index = self._index.pop(cp_id)
        last = self._free.pop()
        if last != cp_id:
            self._free[index] = last
            self._index[last] = index


@dataclass
class OpenRequest:
    driver_id: str
    request_id: str
    cp_id: str
    sent_at: float
    accepted_at: float | None = None


class OpenRequests:
    """The requests being followed, by driver id, the oldest first."""

    def __init__(self) -> None:
        self._by_driver: OrderedDict[str, OpenRequest] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_driver)

    def __contains__(self, driver: object) -> bool:
        return driver in self._by_driver

    def add(self, request: OpenRequest) -> None:
        if request.driver_id in self._by_driver:
            raise ValueError(f"driver {request.driver_id} already has an open request")
        self._by_driver[request.driver_id] = request

    def get(self, driver: str) -> OpenRequest | None:
        return self._by_driver.get(driver)

    def pop(self, driver: str) -> OpenRequest:
        return self._by_driver.pop(driver)

    def expired(self, now: float, timeout: float) -> list[OpenRequest]:
        """Remove and return the requests sent at least `timeout` seconds before `now`
        (requests are added in the order they are sent)."""
        gone: list[OpenRequest] = []
        while self._by_driver:
            oldest = next(iter(self._by_driver.values()))
            if now - oldest.sent_at < timeout:
                break
            gone.append(self._by_driver.popitem(last=False)[1])
        return gone

    def pop_all(self) -> list[OpenRequest]:
        gone = list(self._by_driver.values())
        self._by_driver.clear()
        return gone


_FINAL = {
    DriverStatus.COMPLETED: Outcome.COMPLETED,
    DriverStatus.FAILED: Outcome.FAILED,
    DriverStatus.DENIED: Outcome.DENIED,
}


class LoadGenerator:
    """Runs the arrivals of one load run and follows their requests.

    :meth:`run` schedules the arrivals for ``duration`` seconds, then waits (at most
    ``request_timeout`` seconds) until every request has ended, and returns how it went;
    the numbers are in :attr:`tally`. :meth:`stop` ends it early: the open requests count
    as interrupted. ``progress``, when given, gets a progress line every
    ``progress_interval`` seconds.
    """

    def __init__(
        self,
        publisher: Publisher,
        chooser: CPChooser,
        *,
        rate: float,
        duration: float,
        seed: int,
        driver_prefix: str = "load-",
        request_timeout: float = 60.0,
        cars: bool = False,
        tally: Tally | None = None,
        progress: Callable[[str], None] | None = None,
        progress_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or duration <= 0 or request_timeout <= 0 or progress_interval <= 0:
            raise ValueError("rate, duration, request_timeout and progress_interval must be > 0")
        self.rate = rate
        self.duration = duration
        self.seed = seed
        self.driver_prefix = driver_prefix
        self.request_timeout = request_timeout
        self.cars = cars
        """Each driver asks with a car, energy wanted and departure (SPEC §10)."""
        self.tally = tally if tally is not None else Tally()
        self.chooser = chooser
        self._publisher = publisher
        self._progress = progress
        self._progress_interval = progress_interval
        self._clock = clock
        self._open = OpenRequests()
        self._idle = asyncio.Event()
        """Set while no request is open."""
        self._idle.set()
        self._stopping = asyncio.Event()
        self._started_at: float | None = None
        self._publish_failing = False

    @property
    def open_requests(self) -> int:
        return len(self._open)

    def stop(self) -> None:
        """End the run early: no more arrivals, open requests end as interrupted."""
        self._stopping.set()

    # ------------------------------------------------------------------ updates

    async def handle_update(self, update: DriverUpdate) -> None:
        """Consumer handler for driver.updates; updates not for an open request of this run
        (other drivers, other generators, late or corrected updates) are counted and ignored."""
        request = self._open.get(update.driver_id)
        if request is None or request.request_id != update.request_id:
            self.tally.ignored_updates += 1
            return
        now = self._clock()
        status = update.status
        if status is DriverStatus.ACCEPTED and request.accepted_at is None:
            request.accepted_at = now
            self.tally.request_accepted(now - request.sent_at)
        outcome = _FINAL.get(status)
        if outcome is None:
            return
        self._open.pop(update.driver_id)
        self.tally.request_ended(outcome, latency=now - request.sent_at, reason=update.reason)
        self.chooser.release(request.cp_id, free=outcome is Outcome.COMPLETED)
        self._check_idle()

    # ------------------------------------------------------------------ the run

    async def run(self) -> RunInfo:
        """Run the arrivals, then wait for the open requests; returns how the run went."""
        start = self._started_at = self._clock()
        rng = random.Random(self.seed)  # noqa: S311 - a reproducible schedule, not a secret
        cars = cars_rng(self.seed) if self.cars else None
        async with TaskOwner("load generator", level="ERROR") as tasks:
            tasks.spawn(self._expire_loop(), "request timeouts", forever=True)
            if self._progress is not None:
                tasks.spawn(self._progress_loop(), "progress", forever=True)
            for n, offset in enumerate(arrival_offsets(self.rate, self.duration, rng), start=1):
                if await self._pause_until(start + offset):
                    break
                await self._arrive(n, draw_car_request(cars) if cars else None)
            else:
                await self._pause_until(start + self.duration)
            arrival_seconds = self._clock() - start
            await self._drain()
        stopped = self._stopping.is_set()
        for request in self._open.pop_all():
            outcome = Outcome.INTERRUPTED if stopped else Outcome.TIMED_OUT
            self.tally.request_ended(outcome)
            self.chooser.release(request.cp_id, free=False)
        self._check_idle()
        return RunInfo(
            rate=self.rate,
            duration=self.duration,
            seed=self.seed,
            elapsed=self._clock() - start,
            arrival_seconds=arrival_seconds,
            allow_busy=self.chooser.allow_busy,
            stopped_early=stopped,
        )

    def progress(self) -> str:
        """The progress line of now."""
        elapsed = 0.0 if self._started_at is None else self._clock() - self._started_at
        return progress_line(self.tally, elapsed, free_cps=self.chooser.free_count,
                             known_cps=self.chooser.known_count)

    async def _arrive(self, n: int, car: CarRequest | None = None) -> None:
        self.tally.arrival()
        choice = self.chooser.take()
        if choice is None:
            self.tally.request_ended(Outcome.NO_FREE_CP)
            return
        driver = driver_id(self.driver_prefix, n)
        if car is None:
            request = DriverRequest(request_id=new_id(), driver_id=driver, cp_id=choice.cp_id)
        else:
            request = DriverRequest(
                request_id=new_id(), driver_id=driver, cp_id=choice.cp_id,
                kwh_wanted=car.kwh_wanted, departure=utcnow() + car.stay, car=car.car,
            )
        now = self._clock()
        # Open before publishing, so that an answer that comes at once is not missed.
        self._open.add(OpenRequest(driver, request.request_id, choice.cp_id, now))
        self._idle.clear()
        try:
            await self._publisher.publish(request, wait=False)
        except BusError as exc:
            if not self._publish_failing:  # once per outage, not once per arrival
                self._publish_failing = True
                logger.error("could not send the request of {}: {} (further failures are "
                             "counted, not logged, until a request is sent again)", driver, exc)
            if driver in self._open:
                self._open.pop(driver)
                self.tally.request_ended(Outcome.NOT_SENT)
                self.chooser.release(choice.cp_id, free=not choice.busy)
            self._check_idle()
            return
        if self._publish_failing:
            self._publish_failing = False
            logger.info("requests are sent again")
        self.tally.request_sent(to_busy=choice.busy)

    async def _pause_until(self, deadline: float) -> bool:
        """Sleep until `deadline` (on the clock); True when stop() was called."""
        delay = deadline - self._clock()
        if delay > 0 and not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
        return self._stopping.is_set()

    async def _drain(self) -> None:
        """Wait until no request is open or stop() is called; the timeouts end every request
        within `request_timeout` (the wait's own bound is a little longer, in case)."""
        if self._stopping.is_set() or self._idle.is_set():
            return
        idle = asyncio.ensure_future(self._idle.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({idle, stopping}, timeout=self.request_timeout + 1.0,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            stopping.cancel()
            await asyncio.gather(idle, stopping, return_exceptions=True)

    def _check_idle(self) -> None:
        if not self._open:
            self._idle.set()

    def expire(self) -> int:
        """End the requests sent `request_timeout` seconds ago or more as timed out."""
        gone = self._open.expired(self._clock(), self.request_timeout)
        for request in gone:
            self.tally.request_ended(Outcome.TIMED_OUT)
            self.chooser.release(request.cp_id, free=False)
        if gone:
            self._check_idle()
        return len(gone)

    async def _expire_loop(self) -> None:
        tick = min(1.0, self.request_timeout / 4)
        while True:
            await asyncio.sleep(tick)
            self.expire()

    async def _progress_loop(self) -> None:
        assert self._progress is not None
        while True:
            await asyncio.sleep(self._progress_interval)
            self._progress(self.progress())
