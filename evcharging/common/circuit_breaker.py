"""A per-CP circuit breaker (SPEC §4), pure and driven by an injectable clock.

CLOSED   -> OPEN       on a monitor's fault report (:meth:`trip`) or after
                       ``failure_threshold`` consecutive failures.
OPEN     -> HALF_OPEN  on a recovery report (:meth:`recover`) or once ``reset_timeout``
                       seconds have passed since it opened.
HALF_OPEN              lets one trial session through (:meth:`try_acquire`); its success
                       closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

Clock = Callable[[], float]


class BreakerState(StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


@dataclass
class CircuitBreaker:
    failure_threshold: int = 3
    reset_timeout: float = 30.0
    clock: Clock = time.monotonic
    _state: BreakerState = field(default=BreakerState.CLOSED, init=False)
    _failures: int = field(default=0, init=False)
    _opened_at: float = field(default=0.0, init=False)
    _trial_in_flight: bool = field(default=False, init=False)
    reason: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if self.reset_timeout <= 0:
            raise ValueError("reset_timeout must be positive")

    @property
    def state(self) -> BreakerState:
        """The current state; an OPEN breaker whose reset timeout has passed is HALF_OPEN."""
        if (
            self._state is BreakerState.OPEN
            and self.clock() - self._opened_at >= self.reset_timeout
        ):
            self._to_half_open()
        return self._state

    @property
    def failures(self) -> int:
        return self._failures

    def allows(self) -> bool:
        """Whether a call would be let through now (does not reserve the trial)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and not self._trial_in_flight

    def try_acquire(self) -> bool:
        """Let a call through if the breaker allows it; in HALF_OPEN this takes the trial."""
        if not self.allows():
            return False
        if self._state is BreakerState.HALF_OPEN:
            self._trial_in_flight = True
        return True

    def release(self) -> None:
        """Give back a trial that ended with no verdict (e.g. it was never started)."""
        self._trial_in_flight = False

    def record_success(self) -> None:
        self._failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self._close()

    def record_failure(self, reason: str | None = None) -> None:
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._open(reason or "trial failed")
            return
        if state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open(reason or f"{self._failures} consecutive failures")

    def trip(self, reason: str | None = None) -> None:
        """Open at once (a monitor reported a fault)."""
        self._open(reason or "fault reported")

    def recover(self) -> None:
        """A recovery was reported: an OPEN breaker goes HALF_OPEN to try one session."""
        if self.state is BreakerState.OPEN:
            self._to_half_open()

    def restore(self, state: BreakerState, failures: int, reason: str | None) -> None:
        """Take back a state saved before a restart; an OPEN one counts its reset timeout
        from now (the clock of the earlier process is not comparable)."""
        self._failures = max(0, failures)
        self._trial_in_flight = False
        self.reason = reason
        self._state = state
        if state is BreakerState.OPEN:
            self._opened_at = self.clock()

    def reset(self) -> None:
        """Back to CLOSED with no failures (an operator's decision)."""
        self._close()

    def _open(self, reason: str) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self.clock()
        self._trial_in_flight = False
        self.reason = reason

    def _to_half_open(self) -> None:
        self._state = BreakerState.HALF_OPEN
        self._trial_in_flight = False

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._trial_in_flight = False
        self.reason = None
