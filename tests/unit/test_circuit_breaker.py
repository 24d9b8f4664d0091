"""The circuit breaker: every transition, driven by a fake clock."""

from __future__ import annotations

import pytest

from evcharging.common.circuit_breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, reset_timeout=30.0, clock=clock)


def test_starts_closed_and_lets_calls_through(breaker: CircuitBreaker) -> None:
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allows()
    assert breaker.try_acquire()
    assert breaker.try_acquire()


def test_opens_after_threshold_consecutive_failures(breaker: CircuitBreaker) -> None:
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure("start timeout")
    assert breaker.state is BreakerState.OPEN
    assert breaker.reason == "start timeout"
    assert not breaker.allows()
    assert not breaker.try_acquire()


def test_success_resets_the_failure_count(breaker: CircuitBreaker) -> None:
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failures == 2


def test_trip_opens_at_once(breaker: CircuitBreaker) -> None:
    breaker.trip("monitor: health check failed")
    assert breaker.state is BreakerState.OPEN
    assert breaker.reason == "monitor: health check failed"


def test_recovery_report_half_opens(breaker: CircuitBreaker) -> None:
    breaker.trip()
    breaker.recover()
    assert breaker.state is BreakerState.HALF_OPEN


def test_recover_does_nothing_when_closed(breaker: CircuitBreaker) -> None:
    breaker.recover()
    assert breaker.state is BreakerState.CLOSED


def test_reset_timeout_half_opens(breaker: CircuitBreaker, clock: FakeClock) -> None:
    breaker.trip()
    clock.now += 29.9
    assert breaker.state is BreakerState.OPEN
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN


def test_half_open_lets_exactly_one_trial_through(breaker: CircuitBreaker) -> None:
    breaker.trip()
    breaker.recover()
    assert breaker.try_acquire()
    assert not breaker.allows()
    assert not breaker.try_acquire()
    assert breaker.state is BreakerState.HALF_OPEN


def test_trial_success_closes(breaker: CircuitBreaker) -> None:
    breaker.trip()
    breaker.recover()
    assert breaker.try_acquire()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.reason is None
    assert breaker.try_acquire() and breaker.try_acquire()


def test_trial_failure_reopens(breaker: CircuitBreaker, clock: FakeClock) -> None:
    breaker.trip()
    breaker.recover()
    assert breaker.try_acquire()
    breaker.record_failure("CP fault")
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows()
    clock.now += 30
    assert breaker.state is BreakerState.HALF_OPEN


def test_released_trial_can_be_taken_again(breaker: CircuitBreaker) -> None:
    breaker.trip()
    breaker.recover()
    assert breaker.try_acquire()
    breaker.release()
    assert breaker.try_acquire()


def test_failures_while_open_change_nothing(breaker: CircuitBreaker, clock: FakeClock) -> None:
    breaker.trip()
    opened = clock.now
    clock.now += 10
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now = opened + 30
    assert breaker.state is BreakerState.HALF_OPEN


def test_operator_reset(breaker: CircuitBreaker) -> None:
    breaker.trip()
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(("threshold", "timeout"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_rejects_bad_settings(threshold: int, timeout: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=threshold, reset_timeout=timeout)


@pytest.mark.parametrize("state", list(BreakerState))
def test_restore_takes_back_a_saved_state(state: BreakerState) -> None:
    now = [100.0]
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=10.0, clock=lambda: now[0])
    breaker.restore(state, 2, "saved")
    assert (breaker.state, breaker.failures, breaker.reason) == (state, 2, "saved")
    if state is BreakerState.OPEN:
        now[0] += 10.0  # the reset timeout counts from the restore
        assert breaker.state is BreakerState.HALF_OPEN
    if state is BreakerState.CLOSED:
        breaker.record_failure("third")
        assert breaker.state is BreakerState.OPEN
