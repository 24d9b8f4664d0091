"""The read clock: Central's time by the broker and its read progress (SPEC §4)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from aiokafka import TopicPartition

from evcharging.common.bus import Routes, Topic
from evcharging.common.kafka import KafkaConfig, KafkaConsumerLoop
from evcharging.common.messages import CPStatus
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
    assert clock.dated() == at(T0 - 3)
    assert clock.dated() == at(T0 - 3)  # a handler retried keeps the message's date
    assert (clock.current_partition, clock.current_append) == (0, T0 - 3)


def test_outside_a_message_the_date_is_the_brokers_time(clock: ReadClock) -> None:
    clock.arrived(S, 0, T0 - 3)
    clock.handled()
    assert clock.dated() == clock.now()
    assert (clock.current_partition, clock.current_append) == (None, None)


def test_a_fresh_message_sets_the_brokers_time_even_back(
    clock: ReadClock, clocks: Clocks
) -> None:
    """The broker's clock was stepped back an hour: what it appends now is now."""
    clock.arrived(S, 0, T0)
    clock.fetched(S, 0, answered=True, caught_up=True)
    clock.arrived(S, 0, T0 - 3600)
    assert clock.now() == at(T0 - 3600)
    clock.fetched(S, 1, answered=True, caught_up=False)  # a backlog: old news moves nothing
    clock.arrived(S, 1, T0 - 7200)
    assert clock.now() == at(T0 - 3600)


def test_a_message_stands_within_the_next_fetchs_credit(
    clock: ReadClock, clocks: Clocks
) -> None:
    clock.arrived(S, 0, T0)
    clock.fetched(S, 0, answered=True, caught_up=True)
    assert clock.position_of(S, 0, T0 + 0.5) == pytest.approx(0.5)
    assert clock.position_of(S, 0, T0 + 60) == STEP_CAP  # never past the next credit
    assert clock.position_of(S, 0, T0 - 60) == 0.0
    assert clock.position_of(S, 1, T0) is None  # a partition not read yet


def test_the_moment_a_command_leaves_stands_where_the_log_will_be(
    clock: ReadClock, clocks: Clocks
) -> None:
    """Behind by 8 s, Central must read 8 s more of the log to reach this moment."""
    clock.arrived(S, 0, T0)  # the newest message anywhere
    clock.arrived(S, 1, T0 - 8)
    clock.fetched(S, 1, answered=True, caught_up=False)
    assert clock.position_now(S, 1) == pytest.approx(8.0)
    clock.fetched(S, 0, answered=True, caught_up=True)
    clocks.step(1.5)  # caught up: the moment is Central's own time past the last fetch
    assert clock.position_now(S, 0) == pytest.approx(1.5)


def test_a_partition_given_up_is_forgotten(clock: ReadClock) -> None:
    clock.fetched(S, 0, answered=True, caught_up=True)
    assert clock.known() == [(S, 0)]
    clock.forget(S, 0)
    assert clock.progress(S, 0) is None and clock.known() == []


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


class FakeConsumer:
    """What the consumer loop asks aiokafka's consumer after each batch."""

    def __init__(self, *assigned: TopicPartition) -> None:
        self.assigned = set(assigned)
        self.polled: dict[TopicPartition, int] = {}

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        return self.polled.get(tp)


async def ignore(_: CPStatus) -> None:
    pass


def test_the_consumer_credits_only_answered_fetches_and_forgets_given_up_partitions(
    clock: ReadClock, clocks: Clocks
) -> None:
    loop = KafkaConsumerLoop(KafkaConfig(bootstrap="x:1", client_id="t", topic_prefix="p."),
                             Routes().add(CPStatus, ignore), clock=clock)
    tp0, tp1 = TopicPartition("p.cp.status", 0), TopicPartition("p.cp.status", 1)
    consumer = FakeConsumer(tp0, tp1)
    loop.lag.update({tp0: 0, tp1: 5})
    consumer.polled.update({tp0: 1000, tp1: 1000})
    loop._tell_progress(consumer, clock)  # type: ignore[arg-type]
    assert clock.progress(S, 0) == 0.0 and clock.progress(S, 1) == 0.0
    clocks.step(1.0)
    loop._tell_progress(consumer, clock)  # type: ignore[arg-type]  # no new answer
    clocks.step(1.0)
    consumer.polled[tp0] = 3000  # the broker answered again; partition 1 still behind
    loop._tell_progress(consumer, clock)  # type: ignore[arg-type]
    assert clock.progress(S, 0) == pytest.approx(STEP_CAP)
    assert clock.progress(S, 1) == 0.0
    consumer.assigned = {tp0}  # partition 1 given up
    loop._tell_progress(consumer, clock)  # type: ignore[arg-type]
    assert clock.progress(S, 1) is None
