"""Time as Central reads it from the bus (SPEC §4 "Clocks and stalls"). Pure: the
monotonic clock is passed in.

Central never compares another program's clock with its own. It measures two things:

* **The broker's time** (:meth:`ReadClock.now`): the newest append time it has read
  (topics use ``message.timestamp.type=LogAppendTime``, so the broker stamps each message),
  carried forward between reads by Central's own monotonic clock. Each step forward by
  Central's clock is capped (``now_step_cap``), so neither a stall of Central's nor a
  jump of its clock moves it much. A request's age is the broker's time less the
  request's append time.
* **Read progress per partition** (:meth:`ReadClock.progress`): seconds of the log that
  Central has read. It grows only with a fetch the broker answered: by the span of
  append times that fetch brought, and, while Central has read everything the partition
  holds, by Central's own time since the previous answered fetch, each step capped at
  ``step_cap``. A CP's silence and a start's timeout are counted in the progress of the
  CP's own partitions, so while Central cannot read (stalled, its database full, the
  broker paused or gone), no CP becomes silent and no start times out; afterwards Central
  reads what arrived meanwhile before any time counts again.

A message on a topic without append times (an old topic that could not be changed) is
dated by Central's receive time instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from evcharging.common.bus import Topic

__all__ = ["ReadClock"]

STEP_CAP = 2.0
"""Seconds of progress one answered fetch may add to a partition."""
NOW_STEP_CAP = 5.0
"""Seconds Central's own clock may carry the broker's time forward between two reads."""


@dataclass
class _Partition:
    progress: float = 0.0
    newest: float | None = None
    """The newest append time read (epoch seconds)."""
    newest_counted: float | None = None
    """``newest`` as of the last answered fetch (what progress already counts)."""
    answered_at: float | None = None
    """Central's monotonic time of the last answered fetch."""
    caught_up: bool = False
    anchor: float | None = None
    """The broker time that ``progress`` stands for: the broker's time at the last
    answered fetch when Central had read everything, else the newest message read."""


class ReadClock:
    """The broker's time and each partition's read progress, as Central has read them.

    The consumer calls :meth:`tick` after each fetch, :meth:`arrived` for each message
    before its handler, and :meth:`fetched` for each partition after the batch. With
    ``standalone=True`` (a Central driven without a consumer, as in unit tests) every
    partition progresses with Central's own clock and messages are dated on arrival.
    """

    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        step_cap: float = STEP_CAP,
        now_step_cap: float = NOW_STEP_CAP,
        standalone: bool = False,
    ) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self.step_cap = step_cap
        self.now_step_cap = now_step_cap
        self.standalone = standalone
        self._now: float | None = None
        self._now_at = monotonic()
        self._partitions: dict[tuple[Topic, int], _Partition] = {}
        self.partition_counts: dict[Topic, int] = {}
        """Partitions of each topic read (set by the consumer at start)."""
        self.current: datetime | None = None
        """The date of the message being handled (its append time, or receive time)."""
        self.current_append: float | None = None
        """Its append time (epoch seconds; None on a topic that keeps producer time)."""
        self.current_partition: int | None = None

    # ------------------------------------------------------------------ the consumer's side

    def tick(self) -> None:
        """Carry the broker's time forward by Central's own clock (at most
        ``now_step_cap`` per call: a stall or a clock jump counts as one short step)."""
        at = self._monotonic()
        if self._now is not None:
            self._now += min(max(0.0, at - self._now_at), self.now_step_cap)
        self._now_at = at

    def arrived(self, topic: Topic, partition: int, append_ts: float | None) -> datetime:
        """A message read at `partition` of `topic`, appended at `append_ts` (epoch
        seconds; None when the topic keeps the producer's time): its date."""
        self.tick()
        fresh = False
        if append_ts is None:
            when = self._now if self._now is not None else self._wall()
        else:
            when = append_ts
            state = self._partitions.setdefault((topic, partition), _Partition())
            if state.newest is None or when > state.newest:
                state.newest = when
            # Read up to the end at the last fetch: this message was appended just now,
            # so its append time is the broker's time, even if that went back (a broker
            # whose clock was stepped back must not make every request look expired).
            fresh = state.caught_up
        if self._now is None or when > self._now or fresh:
            self._now = when
            self._now_at = self._monotonic()
        self.current = datetime.fromtimestamp(when, UTC)
        self.current_append = append_ts
        self.current_partition = partition
        return self.current

    def fetched(self, topic: Topic, partition: int, *, answered: bool, caught_up: bool) -> None:
        """After a batch: whether the broker answered a fetch of this partition since the
        last call, and whether Central has now read everything it holds."""
        state = self._partitions.setdefault((topic, partition), _Partition())
        if not answered:
            return
        at = self._monotonic()
        step = 0.0
        if state.newest is not None and state.newest_counted is not None:
            step = state.newest - state.newest_counted
        if caught_up and state.caught_up and state.answered_at is not None:
            step = max(step, at - state.answered_at)
        state.progress += min(max(0.0, step), self.step_cap)
        state.newest_counted = state.newest
        state.answered_at = at
        state.caught_up = caught_up
        state.anchor = self.now().timestamp() if caught_up else state.newest

    # ------------------------------------------------------------------ Central's side

    def now(self) -> datetime:
        """The broker's time as Central reads it (Central's own before the first read)."""
        if self.standalone or self._now is None:
            return datetime.fromtimestamp(self._wall(), UTC)
        at = self._monotonic()
        return datetime.fromtimestamp(
            self._now + min(max(0.0, at - self._now_at), self.now_step_cap), UTC
        )

    def dated(self) -> datetime:
        """The date of the message being handled (outside the consumer: :meth:`now`)."""
        return self.current if self.current is not None else self.now()

    def handled(self) -> None:
        """The consumer is done with the current message (a retry keeps its date)."""
        self.current = None
        self.current_append = None
        self.current_partition = None

    def forget(self, topic: Topic, partition: int) -> None:
        """This Central no longer reads the partition (given up in a rebalance)."""
        self._partitions.pop((topic, partition), None)

    def known(self) -> list[tuple[Topic, int]]:
        """The partitions the clock has heard of."""
        return list(self._partitions)

    def progress(self, topic: Topic, partition: int) -> float | None:
        """Seconds of `partition` read so far; None before its first answered fetch."""
        if self.standalone:
            return self._monotonic()
        state = self._partitions.get((topic, partition))
        if state is None or state.answered_at is None:
            return None
        return state.progress

    def position_of(self, topic: Topic, partition: int, append_ts: float | None) -> float | None:
        """Where a message just read (appended at `append_ts`) stands in the partition's
        progress: never past what the next fetch will credit, so a CP's silence is never
        negative and never counts the batch it was read in."""
        state = self._partitions.get((topic, partition))
        if self.standalone or state is None or state.answered_at is None:
            return self.progress(topic, partition)
        ahead = 0.0
        if append_ts is not None and state.anchor is not None:
            ahead = append_ts - state.anchor
        return state.progress + min(max(0.0, ahead), self.step_cap)

    def position_now(self, topic: Topic, partition: int) -> float | None:
        """Where this moment stands in the partition's progress (a START_SUPPLY leaving):
        the progress read so far plus the broker's time since the newest message counted
        (with a backlog, Central must read that far before the moment is reached)."""
        state = self._partitions.get((topic, partition))
        if self.standalone or state is None or state.answered_at is None:
            return self.progress(topic, partition)
        ahead = 0.0 if state.anchor is None else self.now().timestamp() - state.anchor
        return state.progress + max(0.0, ahead)

    def behind(self) -> float:
        """Seconds between the broker's time and the oldest partition Central has not
        read to its end (0 when it has read everything)."""
        if self.standalone or self._now is None:
            return 0.0
        now = self.now().timestamp()
        lagging = [s.newest for s in self._partitions.values()
                   if not s.caught_up and s.answered_at is not None and s.newest is not None]
        return max((now - newest for newest in lagging), default=0.0)
