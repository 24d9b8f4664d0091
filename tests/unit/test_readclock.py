"""The read clock: Central's time by the broker and its read progress (SPEC §4)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from evcharging.common.bus import Topic
from evcharging.common.readclock import NOW_STEP_CAP, STEP_CAP, ReadClock

T0 = 1_800_000_000.0
S = Topic.CP_STATUS


class Clocks:
    """Central's monotonic and wall clocks, moved by hand."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = T0

    def step(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def clock(clocks: Clocks) -> ReadClock:
    return ReadClock(monotonic=lambda: clocks.mono, wall=lambda: clocks.wall)


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def test_a_message_is_dated_by_its_append_time(clock: ReadClock) -> None:
    assert clock.arrived(S, 0, T0 - 3) == at(T0 - 3)
    assert clock.take_current() == at(T0 - 3)
    assert clock.current_partition == 0


def test_the_current_date_is_taken_once(clock: ReadClock, clocks: Clocks) -> None:
    clock.arrived(S, 0, T0 - 3)
    clock.take_current()
    assert clock.take_current() == clock.now()  # outside a message: the broker's time


def test_without_append_time_a_message_is_dated_on_arrival(
    clock: ReadClock, clocks: Clocks
) -> None:
    assert clock.arrived(S, 0, None) == at(clocks.wall)  # nothing read yet: own clock
    clock.arrived(S, 1, T0 + 10)
    clocks.step(1.0)
    assert clock.arrived(S, 0, None) == at(T0 + 11)  # the broker's time, carried forward


def test_the_brokers_time_is_the_newest_append_time_carried_by_own_clock(
    clock: ReadClock, clocks: Clocks
) -> None:
    clock.arrived(S, 0, T0 - 100)  # Central's own clock says nothing about the broker's
    assert clock.now() == at(T0 - 100)
    clocks.step(2.0)
    assert clock.now() == at(T0 - 98)
    clock.arrived(S, 0, T0 - 99.5)  # an older message moves nothing back
    assert clock.now() == at(T0 - 98)


@pytest.mark.parametrize("jump", [45.0, 120.0, 3600.0])
def test_a_stall_or_a_jump_of_centrals_clock_moves_the_brokers_time_one_short_step(
    clock: ReadClock, clocks: Clocks, jump: float
) -> None:
    clock.arrived(S, 0, T0)
    clocks.mono += jump
    assert clock.now() == at(T0 + NOW_STEP_CAP)
    clock.tick()
    assert clock.now() == at(T0 + NOW_STEP_CAP)


def test_a_wall_clock_step_moves_nothing(clock: ReadClock, clocks: Clocks) -> None:
    clock.arrived(S, 0, T0)
    clocks.wall += 120.0  # an NTP step: the monotonic clock does not move
    assert clock.now() == at(T0)


def test_no_progress_before_the_first_answered_fetch(clock: ReadClock) -> None:
    assert clock.progress(S, 0) is None
    clock.fetched(S, 0, answered=False, caught_up=True)
    assert clock.progress(S, 0) is None
    clock.fetched(S, 0, answered=True, caught_up=True)
    assert clock.progress(S, 0) == 0.0


def test_caught_up_progress_is_own_time_between_answered_fetches(
    clock: ReadClock, clocks: Clocks
) -> None:
    clock.fetched(S, 0, answered=True, caught_up=True)
    for _ in range(10):
        clocks.step(1.0)
        clock.fetched(S, 0, answered=True, caught_up=True)
    assert clock.progress(S, 0) == pytest.approx(10.0)


def test_an_unanswered_fetch_adds_nothing_and_the_next_answer_one_short_step(
    clock: ReadClock, clocks: Clocks
) -> None:
    """A paused broker, or a stalled Central: 45 s without an answer count as one step."""
    clock.fetched(S, 0, answered=True, caught_up=True)
    for _ in range(45):
        clocks.step(1.0)
        clock.fetched(S, 0, answered=False, caught_up=True)
    assert clock.progress(S, 0) == 0.0
    clock.fetched(S, 0, answered=True, caught_up=True)
    assert clock.progress(S, 0) == STEP_CAP


def test_behind_progress_is_the_span_of_the_log_read(clock: ReadClock, clocks: Clocks) -> None:
    clock.arrived(S, 0, T0)
    clock.fetched(S, 0, answered=True, caught_up=False)
    for i in range(1, 6):  # a backlog read fast: each fetch brings 1 s of the log
        clocks.step(0.01)
        clock.arrived(S, 0, T0 + i)
        clock.fetched(S, 0, answered=True, caught_up=False)
    assert clock.progress(S, 0) == pytest.approx(5.0)
    clock.arrived(S, 0, T0 + 60)  # a gap in the log (the broker was paused): one step
    clock.fetched(S, 0, answered=True, caught_up=False)
    assert clock.progress(S, 0) == pytest.approx(5.0 + STEP_CAP)


def test_partitions_progress_apart(clock: ReadClock, clocks: Clocks) -> None:
    for partition in (0, 1):
        clock.fetched(S, partition, answered=True, caught_up=True)
    clocks.step(1.0)
    clock.fetched(S, 0, answered=True, caught_up=True)
    clock.fetched(S, 1, answered=True, caught_up=False)  # a backlog appeared on 1
    assert clock.progress(S, 0) == pytest.approx(1.0)
    assert clock.progress(S, 1) == 0.0
    assert clock.progress(Topic.CP_TELEMETRY, 0) is None


def test_progress_never_falls_and_grows_at_most_a_step_per_fetch(clocks: Clocks) -> None:
    rng = random.Random(7)
    for _ in range(200):
        clock = ReadClock(monotonic=lambda: clocks.mono, wall=lambda: clocks.wall)
        newest = T0
        last = 0.0
        for _ in range(50):
            clocks.step(rng.choice([0.0, 0.1, 1.0, 3.0, 60.0]))
            if rng.random() < 0.5:
                newest += rng.choice([-5.0, 0.0, 0.5, 10.0])
                clock.arrived(S, 0, newest)
            clock.fetched(S, 0, answered=rng.random() < 0.7, caught_up=rng.random() < 0.5)
            progress = clock.progress(S, 0) or 0.0
            assert last <= progress <= last + STEP_CAP
            last = progress


def test_behind_is_measured_on_partitions_not_read_to_their_end(
    clock: ReadClock, clocks: Clocks
) -> None:
    assert clock.behind() == 0.0
    clock.arrived(S, 0, T0)
    clock.arrived(S, 1, T0 - 8)
    clock.fetched(S, 0, answered=True, caught_up=True)
    clock.fetched(S, 1, answered=True, caught_up=False)
    assert clock.behind() == pytest.approx(8.0)
    clock.fetched(S, 1, answered=True, caught_up=True)
    assert clock.behind() == 0.0


def test_standalone_progress_follows_own_clock(clocks: Clocks) -> None:
    """A Central driven without a consumer (unit tests, tools): its own clock."""
    clock = ReadClock(monotonic=lambda: clocks.mono, wall=lambda: clocks.wall, standalone=True)
    assert clock.progress(S, 0) == clocks.mono
    assert clock.now() == at(clocks.wall)
    assert clock.behind() == 0.0
