"""The failed-authentication limiter (SPEC §5): pure, walked through with a hand-held clock."""

from __future__ import annotations

import itertools
import random

import pytest

from evcharging.common.throttle import (
    AUTH_BLOCK,
    AUTH_FAILURES,
    AUTH_TRACKED,
    AUTH_WINDOW,
    AuthThrottle,
)

A, B = "192.0.2.1", "192.0.2.2"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def throttle(clock: Clock, **options: float) -> AuthThrottle:
    return AuthThrottle(clock=clock, **options)  # type: ignore[arg-type]


def fail(limiter: AuthThrottle, address: str, times: int, clock: Clock, step: float = 0.0
         ) -> list[bool]:
    """`times` failures of `address`, `step` seconds apart (the clock moves before each
    but the first); what each returned."""
    results = []
    for n in range(times):
        if n:
            clock.now += step
        results.append(limiter.failed(address))
    return results


def test_the_defaults_are_the_spec() -> None:
    assert (AUTH_FAILURES, AUTH_WINDOW, AUTH_BLOCK) == (20, 10.0, 10.0)
    limiter = AuthThrottle()
    assert (limiter.failures, limiter.window, limiter.block, limiter.tracked) == (
        20, 10.0, 10.0, AUTH_TRACKED)


@pytest.mark.parametrize("options", [{"failures": 0}, {"tracked": 0}, {"window": -1.0},
                                     {"block": -1.0}])
def test_invalid_options_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=">="):
        AuthThrottle(**options)  # type: ignore[arg-type]


def test_the_20th_failure_within_10s_blocks_for_10s_from_it(clock: Clock) -> None:
    limiter = throttle(clock)
    assert fail(limiter, A, 19, clock, step=0.5) == [False] * 19
    assert limiter.retry_after(A) == 0.0
    clock.now += 0.5  # the 20th, 9.5 s after the first
    assert limiter.failed(A) is True
    blocked_at = clock.now
    assert limiter.retry_after(A) == 10.0
    clock.now = blocked_at + 9.999
    assert limiter.retry_after(A) == pytest.approx(0.001)
    clock.now = blocked_at + 10.0  # the block ends exactly 10 s after the 20th failure
    assert limiter.retry_after(A) == 0.0
    assert (limiter.blocks, limiter.refused, limiter.failed_total) == (1, 2, 20)


def test_19_failures_never_block(clock: Clock) -> None:
    limiter = throttle(clock)
    assert fail(limiter, A, 19, clock) == [False] * 19
    assert limiter.retry_after(A) == 0.0 and limiter.blocks == 0


@pytest.mark.parametrize(("spread", "blocked"), [(10.0, True), (10.001, False)])
def test_the_window_is_10s_from_the_first_to_the_20th(
    clock: Clock, spread: float, blocked: bool
) -> None:
    limiter = throttle(clock)
    limiter.failed(A)
    fail(limiter, A, 18, clock, step=0.0)
    clock.now += spread
    assert limiter.failed(A) is blocked
    assert (limiter.retry_after(A) > 0) is blocked


def test_a_slow_trickle_is_never_blocked(clock: Clock) -> None:
    limiter = throttle(clock)
    # One failure every 0.53 s: at most 19 of them within any 10 s.
    assert not any(fail(limiter, A, 1000, clock, step=0.53))
    assert limiter.blocks == 0


def test_the_window_slides(clock: Clock) -> None:
    limiter = throttle(clock)
    fail(limiter, A, 10, clock, step=1.0)  # t = 0..9
    clock.now += 5.0  # t = 14: the first four have left the window
    assert fail(limiter, A, 13, clock, step=0.0) == [False] * 13  # 6 + 13 = 19 in window
    assert limiter.failed(A) is True  # the 20th within the last 10 s


def test_failures_while_blocked_do_not_extend_the_block(clock: Clock) -> None:
    limiter = throttle(clock)
    fail(limiter, A, 20, clock)
    start = clock.now
    clock.now += 5.0
    assert fail(limiter, A, 50, clock) == [False] * 50
    assert limiter.failed_total == 20
    clock.now = start + 10.0
    assert limiter.retry_after(A) == 0.0


def test_after_a_block_the_count_starts_again(clock: Clock) -> None:
    limiter = throttle(clock)
    fail(limiter, A, 20, clock)
    clock.now += 10.0
    assert fail(limiter, A, 19, clock) == [False] * 19  # not one short of a new block
    assert limiter.failed(A) is True
    assert limiter.blocks == 2


def test_addresses_are_counted_apart(clock: Clock) -> None:
    limiter = throttle(clock)
    for _ in range(19):
        limiter.failed(A)
        limiter.failed(B)
    assert limiter.failed(A) is True
    assert limiter.retry_after(A) > 0 and limiter.retry_after(B) == 0.0
    assert limiter.failed(B) is True


def test_a_zero_block_never_refuses(clock: Clock) -> None:
    limiter = throttle(clock, block=0.0)
    assert fail(limiter, A, 20, clock)[-1] is True
    assert limiter.retry_after(A) == 0.0


def test_old_entries_are_dropped(clock: Clock) -> None:
    limiter = throttle(clock)
    limiter.failed(A)
    fail(limiter, B, 20, clock)
    assert limiter.tracking == 2
    clock.now += 10.001  # A's failure is out of the window, B's block is over
    limiter.retry_after("anyone")
    assert limiter.tracking == 0


def test_memory_is_bounded_under_a_flood_of_addresses(clock: Clock) -> None:
    limiter = throttle(clock, tracked=100)
    for n in range(100_000):
        limiter.failed(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    assert limiter.tracking <= 100 and limiter.evicted == 100_000 - 100
    # an address that keeps failing is still blocked: it is always among the latest
    for n in range(20):
        limiter.failed(f"flood-{n}")
        assert limiter.failed(A) is (n == 19)
    assert limiter.retry_after(A) > 0


def test_blocks_are_bounded_too_the_soonest_to_end_goes_first(clock: Clock) -> None:
    limiter = throttle(clock, tracked=3)
    for address in ("a", "b", "c", "d"):
        clock.now += 1.0
        fail(limiter, address, 20, clock)
    assert limiter.retry_after("a") == 0.0  # forgotten: its block was the first to end
    assert all(limiter.retry_after(x) > 0 for x in "bcd")
    assert limiter.tracking == 3


def test_random_walk_agrees_with_a_brute_force_model() -> None:
    """Every call, over random interleavings of addresses and clock steps, matches a
    model that keeps every failure forever and checks the rule from scratch."""
    rng = random.Random(1404)
    for _ in range(40):
        clock = Clock()
        limiter = throttle(clock, failures=5, window=2.0, block=3.0)
        history: dict[str, list[float]] = {}
        blocked_until: dict[str, float] = {}
        for _ in range(400):
            clock.now += rng.choice((0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 3.0))
            address = rng.choice("abc")
            until = blocked_until.get(address, -1.0)
            if rng.random() < 0.3:
                expected = max(0.0, until - clock.now) if until > clock.now else 0.0
                assert limiter.retry_after(address) == pytest.approx(expected)
                continue
            if until > clock.now:
                assert limiter.failed(address) is False
                continue
            times = [t for t in history.get(address, []) if t > until]
            times.append(clock.now)
            history[address] = times
            blocks = len(times) >= 5 and clock.now - times[-5] <= 2.0
            assert limiter.failed(address) is blocks
            if blocks:
                blocked_until[address] = clock.now + 3.0
                history[address] = []


@pytest.mark.parametrize(("failures", "gap"),
                         list(itertools.product((1, 2, 20), (0.0, 0.4, 0.6))))
def test_every_small_case(failures: int, gap: float) -> None:
    """`failures` in a row with a constant `gap`: blocked exactly when they fit in 10 s."""
    clock = Clock()
    limiter = throttle(clock, failures=failures)
    results = fail(limiter, A, failures, clock, step=gap)
    assert results[-1] is ((failures - 1) * gap <= 10.0)
    assert not any(results[:-1])
