"""Unit tests of the driver load generator (no broker).

The pure parts exhaustively where it is cheap (schedule, percentiles, CP chooser, tally,
summary); the generator with a fake Central that answers on the bus at once; Central's
HTTP API as a small real server; ``run`` with a fake Kafka.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Response

from evcharging.apps.ev_load import main as load_main
from evcharging.apps.ev_load.central import (
    CentralError,
    activated_cps,
    first_reading,
    refresh_loop,
)
from evcharging.apps.ev_load.load import (
    CPChooser,
    LoadGenerator,
    OpenRequest,
    OpenRequests,
    arrival_offsets,
    driver_id,
    fleet_ids,
    parse_cps,
)
from evcharging.apps.ev_load.stats import (
    MAX_REASONS,
    LatencyStats,
    Outcome,
    RunInfo,
    Summary,
    Tally,
    latency_stats,
    percentile,
    progress_line,
    reason_cause,
)
from evcharging.common.bus import BusError
from evcharging.common.config import LoadSettings
from evcharging.common.kafka import BusStats
from evcharging.common.messages import DriverRequest, DriverStatus, DriverUpdate, Message
from evcharging.common.service import HttpServer
from evcharging.devtools.process import free_port

S = DriverStatus

# =========================================================================== the schedule


def test_the_same_seed_gives_the_same_schedule() -> None:
    first = list(arrival_offsets(50, 10, random.Random(7)))
    assert first == list(arrival_offsets(50, 10, random.Random(7)))
    assert first != list(arrival_offsets(50, 10, random.Random(8)))


@pytest.mark.parametrize(("rate", "duration"), [(0.5, 3.0), (5, 1), (50, 2), (1000, 0.5)])
def test_arrivals_increase_and_stay_within_the_duration(rate: float, duration: float) -> None:
    for seed in range(20):
        offsets = list(arrival_offsets(rate, duration, random.Random(seed)))
        assert all(0 <= a < b for a, b in zip([0.0, *offsets], offsets, strict=False))
        assert all(t < duration for t in offsets)


def test_arrivals_are_a_poisson_process() -> None:
    """rate 50 for 300 s: the count, the mean gap, exponential gaps (coefficient of
    variation 1) and Poisson counts per second (variance = mean)."""
    rate, duration = 50.0, 300.0
    offsets = list(arrival_offsets(rate, duration, random.Random(2024)))
    expected = rate * duration
    assert abs(len(offsets) - expected) < 4 * math.sqrt(expected)
    gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.05)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, abs=0.05)
    per_second = Counter(int(t) for t in offsets)
    counts = [per_second.get(s, 0) for s in range(int(duration))]
    assert statistics.pvariance(counts) / statistics.fmean(counts) == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize(("rate", "duration"), [(0, 1), (-1, 1), (1, 0), (1, -2)])
def test_a_schedule_needs_a_positive_rate_and_duration(rate: float, duration: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        next(arrival_offsets(rate, duration, random.Random(1)))


def test_driver_ids() -> None:
    assert driver_id("load-", 1) == "load-000001"
    assert driver_id("", 123456) == "123456"
    assert driver_id("x", 1234567) == "x1234567"


# =========================================================================== percentiles


def brute_percentile(values: list[float], q: float) -> float:
    """The smallest value with at least q % of the values at or below it."""
    return min(v for v in values if 100 * sum(x <= v for x in values) >= q * len(values))


def test_percentile_matches_its_definition_exhaustively() -> None:
    rng = random.Random(5)
    for n in range(1, 25):
        for _ in range(5):
            values = [float(rng.randint(0, 10)) for _ in range(n)]  # with ties
            for q in [*range(1, 101), 0.1, 33.3, 99.9]:
                assert percentile(values, q) == brute_percentile(values, q), (values, q)


def test_percentiles_of_one_to_a_hundred() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert latency_stats(values) == LatencyStats(100, p50=50, p90=90, p99=99, max=100)
    assert percentile(values, 100) == 100 and percentile(values, 0.5) == 1


@pytest.mark.parametrize("q", [0, -1, 100.1])
def test_percentile_refuses_a_q_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], q)


def test_percentile_of_nothing() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    assert latency_stats([]) == LatencyStats(0)
    assert LatencyStats(0).as_ms() == {"count": 0, "p50": None, "p90": None, "p99": None,
                                       "max": None}


def test_one_latency_is_every_percentile_and_json_is_in_ms() -> None:
    assert latency_stats([0.0123456]).as_ms() == {
        "count": 1, "p50": 12.346, "p90": 12.346, "p99": 12.346, "max": 12.346}


# =========================================================================== the tally


@pytest.mark.parametrize(
    ("reason", "cause"),
    [
        ("CP busy", "CP busy"),
        ("CP fault: overheating", "CP fault"),
        ("request expired (12s old)", "request expired"),
        ("CP refused the session: not ACTIVATED (SUPPLYING)", "CP refused the session"),
        ("  circuit open  ", "circuit open"),
        (None, "no reason given"),
        ("", "no reason given"),
        (": nothing before", "no reason given"),
    ],
)
def test_reasons_group_by_their_cause(reason: str | None, cause: str) -> None:
    assert reason_cause(reason) == cause


def test_the_tally_counts_each_event() -> None:
    tally = Tally()
    for _ in range(6):
        tally.arrival()
    assert tally.open == 6
    tally.request_ended(Outcome.NO_FREE_CP)
    tally.request_sent()
    tally.request_sent(to_busy=True)
    tally.request_accepted(0.01)
    tally.request_ended(Outcome.COMPLETED, latency=1.0)
    tally.request_ended(Outcome.DENIED, latency=0.02, reason="CP busy")
    tally.request_ended(Outcome.FAILED, latency=0.5, reason="CP fault: boom")
    tally.request_ended(Outcome.TIMED_OUT)
    assert (tally.arrivals, tally.sent, tally.sent_to_busy, tally.accepted) == (6, 2, 1, 1)
    assert tally.ended == 5 and tally.open == 1
    assert list(tally.accept_latencies) == [0.01]
    assert list(tally.final_latencies) == [1.0, 0.02, 0.5]
    assert tally.denied_reasons == {"CP busy": 1}
    assert tally.failed_reasons == {"CP fault": 1}


def test_reasons_past_the_limit_count_as_other() -> None:
    tally = Tally()
    for i in range(MAX_REASONS + 5):
        tally.request_ended(Outcome.DENIED, reason=f"cause {i}")
    tally.request_ended(Outcome.DENIED, reason="cause 0")  # a known one still counts as itself
    assert len(tally.denied_reasons) == MAX_REASONS + 1
    assert tally.denied_reasons["other"] == 5
    assert tally.denied_reasons["cause 0"] == 2
    assert sum(tally.denied_reasons.values()) == tally.outcomes[Outcome.DENIED]


# =========================================================================== the summary


def sample_tally() -> Tally:
    tally = Tally()
    for _ in range(10):
        tally.arrival()
    for _ in range(7):
        tally.request_sent()
    tally.request_ended(Outcome.NO_FREE_CP)
    tally.request_ended(Outcome.NO_FREE_CP)
    tally.request_ended(Outcome.NOT_SENT)
    for latency in (0.010, 0.020, 0.030, 0.040):
        tally.request_accepted(latency)
        tally.request_ended(Outcome.COMPLETED, latency=1 + latency)
    tally.request_ended(Outcome.DENIED, latency=0.005, reason="CP busy")
    tally.request_ended(Outcome.FAILED, latency=5.0, reason="start not confirmed in time")
    tally.request_ended(Outcome.TIMED_OUT)
    tally.ignored_updates = 3
    return tally


INFO = RunInfo(rate=2.0, duration=5.0, seed=42, elapsed=6.5, arrival_seconds=5.0)


def test_the_json_summary_adds_up() -> None:
    summary = Summary(sample_tally(), INFO, publish_errors=1)
    data = json.loads(json.dumps(summary.as_dict()))
    assert data["seed"] == 42 and data["rate"] == 2.0 and data["duration"] == 5.0
    assert data["arrivals"] == 10 and data["achieved_rate"] == 2.0
    assert data["sent"] == 7 and data["accepted"] == 4 and data["open"] == 0
    assert data["outcomes"] == {"completed": 4, "failed": 1, "denied": 1, "timed_out": 1,
                                "no_free_cp": 2, "not_sent": 1, "interrupted": 0}
    assert sum(data["outcomes"].values()) == data["arrivals"]
    assert data["denied_by_reason"] == {"CP busy": 1}
    assert data["failed_by_reason"] == {"start not confirmed in time": 1}
    assert data["latency_ms"]["accepted"] == {"count": 4, "p50": 20.0, "p90": 40.0,
                                              "p99": 40.0, "max": 40.0}
    assert data["latency_ms"]["final"]["count"] == 6
    assert data["latency_ms"]["final"]["max"] == 5000.0
    assert data["publish_errors"] == 1 and data["ignored_updates"] == 3
    assert data["stopped_early"] is False and data["allow_busy"] is False


def test_the_text_summary() -> None:
    text = Summary(sample_tally(), INFO).text()
    lines = text.splitlines()
    assert lines[0].startswith("load summary (done): 10 drivers in 5.0 s (2/s asked, "
                               "2.00/s achieved, seed 42)")
    assert "requests sent 7, accepted 4, publish errors 0, ignored updates 3" in lines[1]
    assert lines[2] == ("  outcomes: completed 4, failed 1, denied 1, timed out 1, "
                        "no free CP 2, not sent 1, interrupted 0")
    assert "  denied by reason: CP busy 1" in lines
    assert "  failed by reason: start not confirmed in time 1" in lines
    accepted = next(line for line in lines if "request → ACCEPTED" in line).split()
    assert accepted[-5:] == ["4", "20.0", "40.0", "40.0", "40.0"]


def test_a_text_summary_without_latencies_shows_dashes() -> None:
    info = RunInfo(rate=1.0, duration=1.0, seed=1, elapsed=1.0, arrival_seconds=0.5,
                   allow_busy=True, stopped_early=True)
    text = Summary(Tally(), info).text()
    assert text.startswith("load summary (stopped early): 0 drivers in 0.5 s")
    assert "requests sent 0 (0 to a busy CP)" in text
    assert "by reason" not in text
    final = next(line for line in text.splitlines() if "request → final" in line).split()
    assert final[-5:] == ["0", "-", "-", "-", "-"]


def test_the_progress_line() -> None:
    line = progress_line(sample_tally(), 5.0, free_cps=3, known_cps=4)
    assert line.startswith("[    5.0 s] 10 arrived (2.0/s), 0 open, 4 accepted; completed 4,")
    assert line.endswith("free CPs 3/4")
    assert "(0.0/s)" in progress_line(Tally(), 0.0, free_cps=0, known_cps=0)


# =========================================================================== --cps


def test_cps_unset_means_every_cp() -> None:
    assert parse_cps(None) is None
    assert parse_cps("  ") is None


def test_cps_as_a_list() -> None:
    assert parse_cps(" CP-00001, CP-00002,,CP-00001 ") == {"CP-00001", "CP-00002"}
    assert parse_cps("CP-001") == {"CP-001"}


def test_cps_as_a_count_names_the_fleet() -> None:
    assert parse_cps("3") == {"CP-00001", "CP-00002", "CP-00003"}
    assert parse_cps("2", "site-a.") == {"site-a.00001", "site-a.00002"}
    ids = fleet_ids("CP-", 10000)
    assert (ids[0], ids[-1], len(set(ids))) == ("CP-00001", "CP-10000", 10000)
    assert fleet_ids("CP-", 100000)[0] == "CP-000001"


@pytest.mark.parametrize(("text", "error"), [
    ("0", "at least 1"), ("CP 1", "invalid CP id"), (",", "names no CP"),
    ("CP-1,ü", "invalid CP id"), ("x" * 65, "invalid CP id"),
])
def test_invalid_cps(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_cps(text)


# =========================================================================== the chooser


def chooser(cps: list[str], *, only: frozenset[str] | None = None,
            allow_busy: bool = False, seed: int = 1) -> CPChooser:
    c = CPChooser(random.Random(seed), only=only, allow_busy=allow_busy)
    c.update(cps)
    return c


def take_id(c: CPChooser) -> str:
    choice = c.take()
    assert choice is not None
    return choice.cp_id


def test_each_free_cp_is_taken_once_then_none_is_free() -> None:
    c = chooser(["A", "B", "C"])
    taken = {take_id(c) for _ in range(3)}
    assert taken == {"A", "B", "C"}
    assert c.take() is None
    assert (c.free_count, c.busy_count, c.known_count) == (0, 3, 3)


def test_a_completed_cp_is_free_at_once_other_ends_wait_for_a_reading() -> None:
    c = chooser(["A", "B"])
    a, b = take_id(c), take_id(c)
    c.release(a, free=True)  # COMPLETED
    c.release(b, free=False)  # FAILED, DENIED or timed out
    assert c.is_free(a) and not c.is_free(b)
    c.update(["A", "B"])
    assert c.is_free(b)


def test_a_reading_does_not_free_a_busy_cp() -> None:
    c = chooser(["A"])
    take_id(c)
    c.update(["A", "B"])  # Central still lists A as ACTIVATED (before it saw the request)
    assert not c.is_free("A") and c.is_free("B")
    c.update([])  # B went away (e.g. another driver took it)
    assert c.free_count == 0


def test_only_cps_in_scope_are_chosen() -> None:
    c = chooser(["A", "B", "C"], only=frozenset({"B", "Z"}))
    assert take_id(c) == "B"
    assert c.take() is None
    c.release("A", free=True)  # never chosen: nothing to do, and out of scope
    assert c.free_count == 0


def test_allow_busy_sends_to_a_seen_cp_when_none_is_free() -> None:
    c = chooser(["A"], allow_busy=True)
    first = c.take()
    second = c.take()
    assert first is not None and not first.busy
    assert second is not None and second.busy and second.cp_id == "A"
    c.update([])  # A is SUPPLYING now; it stays a target for busy requests
    third = c.take()
    assert third is not None and third.busy
    c.release("A", free=True)
    c.release("A", free=True)
    assert not c.is_free("A"), "still one request open on A"
    c.release("A", free=True)
    assert c.is_free("A") and c.busy_count == 0


def test_allow_busy_with_no_cp_ever_seen_is_no_free_cp() -> None:
    assert chooser([], allow_busy=True).take() is None


def test_the_same_seed_chooses_the_same_cps() -> None:
    def picks(seed: int) -> list[str]:
        c = chooser([f"CP-{i}" for i in range(50)], seed=seed)
        return [take_id(c) for _ in range(20)]

    assert picks(3) == picks(3)
    assert picks(3) != picks(4)


@dataclass
class ChooserModel:
    """What a chooser must do, written the slow and obvious way."""

    only: frozenset[str] | None
    allow_busy: bool
    known: set[str] = field(default_factory=set)
    busy: Counter[str] = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)

    def scope(self, cps: set[str]) -> set[str]:
        return cps if self.only is None else cps & self.only

    @property
    def free(self) -> set[str]:
        return {cp for cp in self.known if self.busy[cp] == 0}


@pytest.mark.parametrize("seed", range(60))
def test_the_chooser_follows_its_model(seed: int) -> None:
    rng = random.Random(seed)
    universe = [f"CP-{i}" for i in range(8)]
    only = frozenset(rng.sample(universe, 5)) if seed % 3 == 0 else None
    allow_busy = seed % 2 == 0
    c = CPChooser(random.Random(seed), only=only, allow_busy=allow_busy)
    model = ChooserModel(only, allow_busy)
    for _ in range(150):
        op = rng.random()
        if op < 0.15:
            reading = set(rng.sample(universe, rng.randint(0, len(universe))))
            c.update(reading)
            model.known = model.scope(reading)
            model.seen |= model.known
        elif op < 0.6:
            free_before = set(model.free)
            choice = c.take()
            if free_before:
                assert choice is not None and not choice.busy and choice.cp_id in free_before
                model.known.discard(choice.cp_id)
            elif allow_busy and model.seen:
                assert choice is not None and choice.busy and choice.cp_id in model.seen
            else:
                assert choice is None
            if choice is not None:
                model.busy[choice.cp_id] += 1
        else:
            busy = sorted(model.busy.elements())
            if not busy:
                continue
            cp_id, free = rng.choice(busy), rng.random() < 0.5
            c.release(cp_id, free=free)
            model.busy[cp_id] -= 1
            if model.busy[cp_id] == 0 and free and model.scope({cp_id}):
                model.known.add(cp_id)
        assert {cp for cp in universe if c.is_free(cp)} == model.free
        assert c.free_count == len(model.free)
        assert c.busy_count == len(+model.busy)


# =========================================================================== open requests


def test_open_requests_expire_oldest_first() -> None:
    book = OpenRequests()
    for i, sent in enumerate([1.0, 2.0, 3.0]):
        book.add(OpenRequest(f"d{i}", f"r{i}", "CP", sent))
    with pytest.raises(ValueError, match="already has an open request"):
        book.add(OpenRequest("d0", "r9", "CP", 4.0))
    assert book.expired(now=2.9, timeout=1.0) == [OpenRequest("d0", "r0", "CP", 1.0)]
    assert [r.driver_id for r in book.expired(now=4.0, timeout=1.0)] == ["d1", "d2"]
    assert len(book) == 0 and book.expired(now=100.0, timeout=1.0) == []


def test_open_requests_pop() -> None:
    book = OpenRequests()
    book.add(OpenRequest("d0", "r0", "CP", 0.0))
    book.add(OpenRequest("d1", "r1", "CP", 0.0))
    assert "d0" in book and book.get("d2") is None
    assert book.pop("d0").request_id == "r0"
    assert [r.driver_id for r in book.pop_all()] == ["d1"]
    assert len(book) == 0


# =========================================================================== the generator

Script = Callable[[DriverRequest], list[DriverUpdate]]


def reply(request: DriverRequest, status: DriverStatus, **fields: Any) -> DriverUpdate:
    return DriverUpdate(request_id=request.request_id, driver_id=request.driver_id,
                        cp_id=request.cp_id, status=status, **fields)


def session(request: DriverRequest) -> list[DriverUpdate]:
    return [reply(request, S.ACCEPTED, session_id="s"),
            reply(request, S.IN_PROGRESS, session_id="s", kw=22.0, kwh=0.1, euros=0.03),
            reply(request, S.COMPLETED, session_id="s", kwh=0.2, euros=0.06)]


def silence(request: DriverRequest) -> list[DriverUpdate]:
    return []


class FakeCentral:
    """A publisher that plays Central: each request's updates come back on the bus at once
    (in a task, as a consumer would deliver them), from `script`."""

    def __init__(self, script: Script = session) -> None:
        self.script = script
        self.generator: LoadGenerator | None = None
        self.requests: list[DriverRequest] = []
        self.fail = False
        self.sent = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def publish(self, message: Message, *, wait: bool = True) -> None:
        assert isinstance(message, DriverRequest)
        assert wait is False, "the load generator does not wait for each delivery"
        if self.fail:
            raise BusError("simulated outage")
        self.requests.append(message)
        self.sent.set()
        task = asyncio.create_task(self._answer(self.script(message)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, updates: list[DriverUpdate]) -> None:
        assert self.generator is not None
        for update in updates:
            await self.generator.handle_update(update)

    async def close(self) -> None:
        await asyncio.gather(*self._tasks)


@pytest.fixture
async def central() -> AsyncIterator[FakeCentral]:
    fake = FakeCentral()
    yield fake
    await fake.close()


def generator(central: FakeCentral, cps: list[str], **options: Any) -> LoadGenerator:
    params: dict[str, Any] = {"rate": 500.0, "duration": 0.1, "seed": 3,
                              "driver_prefix": "t-", "request_timeout": 5.0}
    allow_busy = options.pop("allow_busy", False)
    params.update(options)
    g = LoadGenerator(central, chooser(cps, allow_busy=allow_busy), **params)
    central.generator = g
    return g


def assert_adds_up(g: LoadGenerator) -> None:
    tally = g.tally
    assert tally.open == 0 and g.open_requests == 0
    assert sum(tally.outcomes.values()) == tally.arrivals
    finals = sum(tally.outcomes[o] for o in (Outcome.COMPLETED, Outcome.FAILED, Outcome.DENIED))
    assert len(tally.final_latencies) == finals


async def test_every_driver_completes_when_there_are_cps_enough(central: FakeCentral) -> None:
    g = generator(central, [f"CP-{i}" for i in range(200)])
    info = await g.run()
    tally = g.tally
    assert tally.arrivals == len(list(arrival_offsets(500.0, 0.1, random.Random(3)))) > 10
    assert tally.outcomes[Outcome.COMPLETED] == tally.sent == tally.accepted == tally.arrivals
    assert_adds_up(g)
    assert [r.driver_id for r in central.requests] == [
        f"t-{n:06d}" for n in range(1, tally.arrivals + 1)]
    assert len({r.request_id for r in central.requests}) == tally.arrivals
    assert len(tally.accept_latencies) == tally.accepted
    assert all(a >= 0 for a in tally.accept_latencies)
    assert info.seed == 3 and not info.stopped_early
    assert info.arrival_seconds >= 0.1 and info.elapsed >= info.arrival_seconds
    assert g.chooser.free_count == 200, "every CP free again after COMPLETED"


async def test_with_no_cp_every_arrival_is_no_free_cp(central: FakeCentral) -> None:
    g = generator(central, [])
    await g.run()
    assert g.tally.arrivals > 0
    assert g.tally.outcomes[Outcome.NO_FREE_CP] == g.tally.arrivals
    assert central.requests == [] and g.tally.sent == 0
    assert_adds_up(g)


async def test_denied_and_failed_are_counted_by_reason(central: FakeCentral) -> None:
    def script(request: DriverRequest) -> list[DriverUpdate]:
        n = int(request.driver_id.removeprefix("t-"))
        if n % 3 == 0:
            return [reply(request, S.DENIED, reason="CP faulty")]
        if n % 3 == 1:
            return [reply(request, S.ACCEPTED, session_id="s"),
                    reply(request, S.FAILED, session_id="s", reason=f"CP fault: error {n}")]
        return session(request)

    central.script = script
    g = generator(central, [f"CP-{i}" for i in range(200)])
    await g.run()
    tally = g.tally
    thirds = Counter(n % 3 for n in range(1, tally.arrivals + 1))
    assert tally.outcomes[Outcome.DENIED] == thirds[0] == tally.denied_reasons["CP faulty"]
    assert tally.outcomes[Outcome.FAILED] == thirds[1] == tally.failed_reasons["CP fault"]
    assert tally.outcomes[Outcome.COMPLETED] == thirds[2]
    assert tally.accepted == thirds[1] + thirds[2]
    assert_adds_up(g)


async def test_allow_busy_loads_the_denied_path(central: FakeCentral) -> None:
    """One CP whose first session never ends: every later driver is sent there anyway and
    Central says CP busy; the first request times out."""
    first: list[str] = []

    def script(request: DriverRequest) -> list[DriverUpdate]:
        if not first:
            first.append(request.request_id)
            return [reply(request, S.ACCEPTED, session_id="s")]
        return [reply(request, S.DENIED, reason="CP busy")]

    central.script = script
    g = generator(central, ["CP-1"], allow_busy=True, request_timeout=0.3)
    info = await g.run()
    tally = g.tally
    assert info.allow_busy
    assert tally.sent == tally.arrivals and tally.sent_to_busy == tally.arrivals - 1
    assert tally.outcomes[Outcome.DENIED] == tally.arrivals - 1 == tally.denied_reasons["CP busy"]
    assert tally.outcomes[Outcome.TIMED_OUT] == 1 and tally.accepted == 1
    assert {r.cp_id for r in central.requests} == {"CP-1"}
    assert_adds_up(g)


async def test_without_allow_busy_a_held_cp_means_no_free_cp(central: FakeCentral) -> None:
    central.script = lambda request: [reply(request, S.ACCEPTED, session_id="s")]
    g = generator(central, ["CP-1"], request_timeout=0.3)
    await g.run()
    tally = g.tally
    assert tally.sent == 1 and tally.outcomes[Outcome.TIMED_OUT] == 1
    assert tally.outcomes[Outcome.NO_FREE_CP] == tally.arrivals - 1
    assert_adds_up(g)


async def test_silent_requests_time_out_and_the_run_ends_within_the_timeout(
    central: FakeCentral,
) -> None:
    central.script = silence
    g = generator(central, [f"CP-{i}" for i in range(100)], request_timeout=0.2)
    info = await g.run()
    assert g.tally.outcomes[Outcome.TIMED_OUT] == g.tally.arrivals == g.tally.sent > 0
    assert g.tally.final_latencies.tolist() == []
    assert_adds_up(g)
    assert info.elapsed < 0.1 + 0.2 + 1.5, "bounded by duration + request timeout"
    assert g.chooser.free_count == 100 - g.tally.sent, (
        "a timed-out CP waits for Central's next reading")


async def test_a_publish_error_is_not_sent_and_frees_the_cp(central: FakeCentral) -> None:
    central.fail = True
    g = generator(central, ["CP-1", "CP-2"])
    await g.run()
    assert g.tally.outcomes[Outcome.NOT_SENT] == g.tally.arrivals > 2
    assert g.tally.sent == 0
    assert g.chooser.free_count == 2
    assert_adds_up(g)


async def test_stop_ends_the_run_and_open_requests_are_interrupted(
    central: FakeCentral,
) -> None:
    central.script = silence
    g = generator(central, [f"CP-{i}" for i in range(10)], rate=50.0, duration=60.0,
                  request_timeout=60.0)
    running = asyncio.create_task(g.run())
    await asyncio.wait_for(central.sent.wait(), 5)
    g.stop()
    info = await asyncio.wait_for(running, 5)
    assert info.stopped_early and info.arrival_seconds < 60
    assert g.tally.outcomes[Outcome.INTERRUPTED] == g.tally.sent >= 1
    assert_adds_up(g)


async def test_updates_not_for_an_open_request_are_ignored(central: FakeCentral) -> None:
    central.script = silence
    g = generator(central, ["CP-1"], rate=50.0, duration=60.0)
    running = asyncio.create_task(g.run())
    await asyncio.wait_for(central.sent.wait(), 5)
    request = central.requests[0]
    other_driver = request.model_copy(update={"driver_id": "someone-else"})
    other_request = request.model_copy(update={"request_id": "not-this-one"})
    await g.handle_update(reply(other_driver, S.ACCEPTED))
    await g.handle_update(reply(other_request, S.COMPLETED))
    assert g.tally.ignored_updates == 2 and g.tally.accepted == 0
    await g.handle_update(reply(request, S.ACCEPTED))
    await g.handle_update(reply(request, S.ACCEPTED))  # a duplicate is not counted twice
    await g.handle_update(reply(request, S.IN_PROGRESS))
    await g.handle_update(reply(request, S.COMPLETED))
    await g.handle_update(reply(request, S.COMPLETED, reason="corrected: late meter"))
    assert g.tally.accepted == 1 and g.tally.outcomes[Outcome.COMPLETED] == 1
    assert g.tally.ignored_updates == 3
    g.stop()
    await asyncio.wait_for(running, 5)
    assert_adds_up(g)


async def test_progress_lines_come_while_it_runs(central: FakeCentral) -> None:
    lines: list[str] = []
    g = generator(central, ["CP-1"], rate=20.0, duration=0.3, progress=lines.append,
                  progress_interval=0.05)
    assert g.progress().startswith("[    0.0 s] 0 arrived")
    await g.run()
    assert lines and all("arrived" in line and "free CPs" in line for line in lines)


def test_the_generator_refuses_bad_numbers() -> None:
    central = FakeCentral()
    for bad in ({"rate": 0}, {"duration": -1}, {"request_timeout": 0},
                {"progress_interval": 0}):
        with pytest.raises(ValueError, match="must be > 0"):
            generator(central, [], **bad)


# =========================================================================== Central's API


@dataclass
class FakeApi:
    """A stand-in for Central's GET /cp, served for real over HTTP."""

    cps: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    calls: list[dict[str, str]] = field(default_factory=list)
    called: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/cp")
        async def list_cps(response: Response, limit: int | None = None, offset: int = 0,
                           state: str | None = None, site: str | None = None) -> Any:
            self.calls.append({k: str(v) for k, v in
                               {"limit": limit, "offset": offset, "state": state,
                                "site": site}.items() if v is not None})
            self.called.set()
            if self.status != 200:
                response.status_code = self.status
                return {"error": "nope"}
            matching = [cp for cp in self.cps
                        if (state is None or cp["state"] == state)
                        and (site is None or cp.get("site") == site)]
            response.headers["X-Total-Count"] = str(len(matching))
            end = None if limit is None else offset + limit
            return matching[offset:end]

        return app


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeApi, str]]:
    fake = FakeApi()
    server = HttpServer(fake.app(), "127.0.0.1", 0, name="fake Central")
    await server.start()
    try:
        yield fake, f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


def cps(count: int, state: str = "ACTIVATED", site: str | None = None) -> list[dict[str, Any]]:
    return [{"cp_id": f"CP-{state[0]}{i:03d}", "state": state, "site": site, "extra": 1}
            for i in range(count)]


async def test_activated_cps_reads_every_page(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.cps = cps(25) + cps(5, "SUPPLYING")
    async with httpx.AsyncClient(base_url=url) as http:
        ids = await activated_cps(http, page_size=10)
    assert ids == [f"CP-A{i:03d}" for i in range(25)]
    assert [call["offset"] for call in fake.calls] == ["0", "10", "20"]
    assert all(call["state"] == "ACTIVATED" and call["limit"] == "10" for call in fake.calls)


async def test_activated_cps_of_one_site(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.cps = [*cps(3, site="north"), {"cp_id": "X", "state": "ACTIVATED", "site": "south"}]
    async with httpx.AsyncClient(base_url=url) as http:
        assert await activated_cps(http, site="south") == ["X"]
    assert fake.calls[0]["site"] == "south"


@pytest.mark.parametrize(("status", "fatal"), [(404, True), (422, True), (503, False)])
async def test_an_error_answer_is_a_central_error(
    api: tuple[FakeApi, str], status: int, fatal: bool
) -> None:
    fake, url = api
    fake.status = status
    async with httpx.AsyncClient(base_url=url) as http:
        with pytest.raises(CentralError, match=str(status)) as caught:
            await activated_cps(http)
    assert caught.value.fatal is fatal


async def test_an_answer_that_is_no_list_of_cps_is_a_central_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": []})

    async with httpx.AsyncClient(base_url="http://central",
                                 transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(CentralError, match="not a list of CPs"):
            await activated_cps(http)


async def test_an_unreachable_central_is_a_central_error() -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}") as http:
        with pytest.raises(CentralError, match="failed"):
            await activated_cps(http)
        with pytest.raises(CentralError):
            await first_reading(http, site=None, timeout=0.3)


async def test_first_reading_waits_for_central_to_answer(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.status = 503
    fake.cps = cps(2)
    async with httpx.AsyncClient(base_url=url) as http:
        reading = asyncio.create_task(first_reading(http, site=None, timeout=10))
        await asyncio.wait_for(fake.called.wait(), 5)
        fake.status = 200
        assert await asyncio.wait_for(reading, 10) == ["CP-A000", "CP-A001"]


async def test_first_reading_gives_up_at_once_on_a_4xx(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.status = 404
    async with httpx.AsyncClient(base_url=url) as http:
        with pytest.raises(CentralError, match="404"):
            await asyncio.wait_for(first_reading(http, site=None, timeout=60), 5)
    assert len(fake.calls) == 1


async def test_refresh_keeps_the_last_reading_while_central_fails() -> None:
    answers: list[httpx.Response] = [
        httpx.Response(200, json=[{"cp_id": "A"}, {"cp_id": "B"}], headers={"X-Total-Count": "2"}),
        httpx.Response(500, text="boom"),
        httpx.Response(200, json=[{"cp_id": "C"}], headers={"X-Total-Count": "1"}),
    ]
    readings: list[set[str]] = []
    done = asyncio.Event()
    c = CPChooser(random.Random(1))

    def handler(request: httpx.Request) -> httpx.Response:
        readings.append({cp for cp in ("A", "B", "C") if c.is_free(cp)})
        if not answers:
            done.set()
            return httpx.Response(500)
        return answers.pop(0)

    async with httpx.AsyncClient(base_url="http://central",
                                 transport=httpx.MockTransport(handler)) as http:
        task = asyncio.create_task(refresh_loop(http, c, site=None, interval=0.01))
        await asyncio.wait_for(done.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # What the chooser held when each reading began: nothing, A+B, A+B (500 kept it), C.
    assert readings[:4] == [set(), {"A", "B"}, {"A", "B"}, {"C"}]


# =========================================================================== flags and run


def test_the_seed_flags_parse() -> None:
    settings = load_main.parse_settings(
        ["--kafka-bootstrap", "localhost:9092", "--rate", "50", "--duration", "300"])
    assert (settings.kafka_bootstrap, settings.rate, settings.duration) == (
        "localhost:9092", 50.0, 300.0)
    assert settings.driver_prefix == "load-" and settings.request_timeout == 60.0
    assert settings.central_url == "http://localhost:8000" and not settings.json_summary


def test_json_flag_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOAD_RATE", "7.5")
    monkeypatch.setenv("LOAD_CPS", "4")
    settings = load_main.parse_settings(["--json", "--seed", "9"])
    assert settings.json_summary and settings.seed == 9
    assert settings.rate == 7.5 and settings.cps == "4"
    assert load_main.parse_settings(["--rate", "2"]).rate == 2.0, "a flag beats the variable"


@pytest.mark.parametrize("argv", [
    ["--rate", "0"], ["--duration", "-1"], ["--rate", "fast"], ["--cps", "CP 1"],
    ["--cps", "0"], ["--driver-prefix", "a b"], ["--driver-prefix", "x" * 57],
    ["--central-url", "localhost:8000"], ["--no-such-flag"],
])
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load_main.parse_settings(argv)
    assert caught.value.code == 2
    assert "error" in capsys.readouterr().err


def test_help_lists_every_flag_with_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load_main.parse_settings(["--help"])
    assert caught.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in LoadSettings.model_fields:
        assert f"--{name.replace('_', '-')}" in text
        assert f"LOAD_{name.upper()}" in text
    assert "--json " in text and "[LOAD_RATE; default: 10.0]" in text


class FakeKafka:
    """KafkaBus and KafkaConsumerLoop for ``run``: requests come back as updates through
    the consumer's handler, from `script`."""

    def __init__(self, script: Script = session) -> None:
        self.script = script
        self.queue: asyncio.Queue[DriverUpdate] = asyncio.Queue()
        self.events: list[str] = []
        self.consumer_error: Exception | None = None
        self.fail_start = False
        self.published = asyncio.Event()

    def bus(self, config: Any, stats: Any = None, **_: Any) -> Any:
        kafka = self

        class Bus:
            def __init__(self) -> None:
                self.stats = BusStats()

            async def start(self) -> None:
                kafka.events.append("bus.start")
                if kafka.fail_start:
                    raise BusError("no broker")

            async def stop(self) -> None:
                kafka.events.append("bus.stop")

            async def publish(self, message: Message, *, wait: bool = True) -> None:
                assert isinstance(message, DriverRequest)
                kafka.published.set()
                for update in kafka.script(message):
                    kafka.queue.put_nowait(update)

        return Bus()

    def consumer(self, config: Any, routes: Any, **options: Any) -> Any:
        kafka = self
        assert options["group_id"] is None and options["start_at"] == "latest"

        class Consumer:
            async def start(self) -> None:
                kafka.events.append("consumer.start")

            async def run(self) -> None:
                if kafka.consumer_error is not None:
                    raise kafka.consumer_error
                handler = routes.handler(routes.topics[0])
                while True:
                    await handler(await kafka.queue.get())

            async def stop(self) -> None:
                kafka.events.append("consumer.stop")

        return Consumer()


@pytest.fixture
def kafka(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKafka]:
    fake = FakeKafka()
    monkeypatch.setattr(load_main, "KafkaBus", fake.bus)
    monkeypatch.setattr(load_main, "KafkaConsumerLoop", fake.consumer)
    yield fake


def load_settings(url: str, **values: Any) -> LoadSettings:
    params: dict[str, Any] = {"central_url": url, "rate": 200.0, "duration": 0.2, "seed": 11,
                              "connect_timeout": 2.0, "progress_interval": 0.05,
                              "refresh_interval": 0.05}
    params.update(values)
    return LoadSettings(_env_file=None, **params)


async def test_run_writes_only_the_json_summary(
    kafka: FakeKafka, api: tuple[FakeApi, str]
) -> None:
    fake, url = api
    fake.cps = cps(100)
    out: list[str] = []
    code = await load_main.run(load_settings(url, json_summary=True), asyncio.Event(),
                               out.append)
    assert code == 0
    assert len(out) == 1
    summary = json.loads(out[0])
    assert summary["seed"] == 11 and summary["arrivals"] > 0
    assert summary["outcomes"]["completed"] == summary["arrivals"]
    assert kafka.events == ["bus.start", "consumer.start", "consumer.stop", "bus.stop"]


async def test_run_writes_progress_then_the_text_summary(
    kafka: FakeKafka, api: tuple[FakeApi, str]
) -> None:
    fake, url = api
    fake.cps = cps(3)
    out: list[str] = []
    assert await load_main.run(load_settings(url, cps="CP-A000"), asyncio.Event(),
                               out.append) == 0
    *progress, summary = out
    assert progress and all(line.startswith("[") for line in progress)
    assert summary.startswith("load summary (done)")
    assert progress[-1].endswith("/1"), "--cps keeps one CP of the three"


async def test_run_exits_1_when_central_cannot_be_read(
    kafka: FakeKafka, api: tuple[FakeApi, str]
) -> None:
    fake, url = api
    fake.status = 404
    out: list[str] = []
    assert await load_main.run(load_settings(url), asyncio.Event(), out.append) == 1
    assert out == [] and kafka.events == ["consumer.stop", "bus.stop"]


async def test_run_exits_1_when_kafka_cannot_be_reached(
    kafka: FakeKafka, api: tuple[FakeApi, str]
) -> None:
    _, url = api
    kafka.fail_start = True
    out: list[str] = []
    assert await load_main.run(load_settings(url), asyncio.Event(), out.append) == 1
    assert out == []


async def test_run_exits_1_with_the_summary_when_the_consumer_dies(
    kafka: FakeKafka, api: tuple[FakeApi, str]
) -> None:
    fake, url = api
    fake.cps = cps(10)
    kafka.consumer_error = RuntimeError("consumer broke")
    out: list[str] = []
    code = await load_main.run(load_settings(url, duration=30.0, json_summary=True),
                               asyncio.Event(), out.append)
    assert code == 1
    summary = json.loads(out[-1])
    assert summary["stopped_early"] is True
    assert sum(summary["outcomes"].values()) == summary["arrivals"]


async def test_run_stopped_by_a_signal_exits_130_with_the_summary(
    kafka: FakeKafka, api: tuple[FakeApi, str]
) -> None:
    fake, url = api
    fake.cps = cps(10)
    kafka.script = silence
    stop = asyncio.Event()
    out: list[str] = []
    running = asyncio.create_task(load_main.run(
        load_settings(url, duration=30.0, json_summary=True), stop, out.append))
    await asyncio.wait_for(kafka.published.wait(), 5)
    stop.set()
    assert await asyncio.wait_for(running, 5) == 130
    summary = json.loads(out[-1])
    assert summary["stopped_early"] is True and summary["outcomes"]["interrupted"] >= 1


async def test_run_refuses_bad_cps_from_settings(kafka: FakeKafka) -> None:
    settings = load_settings("http://127.0.0.1:9", cps="CP 1")
    assert await load_main.run(settings, asyncio.Event(), [].append) == 2
    assert kafka.events == []
