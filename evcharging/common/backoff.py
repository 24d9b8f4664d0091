"""Exponential backoff of the clients' retries, built on tenacity.

:func:`doubling` is the schedule every client uses: `initial` seconds, doubled after each
failed try, at most `maximum`, each wait optionally multiplied by a random factor in
``[1 - jitter, 1 + jitter]``. :func:`until_done` calls a step until it says it is done,
waiting by such a schedule between tries; a step that raises (cancellation included) ends
it at once with that exception. A caller that calls :func:`until_done` again starts the
schedule over from `initial` (as the loops did that reset their delay after a success);
a loop that never ends (a reconnecting client) starts it over with :class:`Restartable`.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Awaitable, Callable

from loguru import logger
from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_never
from tenacity.stop import StopBaseT
from tenacity.wait import wait_base, wait_exponential

__all__ = ["Restartable", "doubling", "until_done"]


class _Jittered(wait_base):
    """Another wait strategy's waits, each times a random factor in 1 ± `jitter`."""

    def __init__(self, wait: wait_base, jitter: float) -> None:
        self.wait = wait
        self.jitter = jitter

    def __call__(self, retry_state: RetryCallState) -> float:
        factor = random.uniform(1 - self.jitter, 1 + self.jitter)  # noqa: S311 - jitter
        return self.wait(retry_state) * factor


def doubling(initial: float, maximum: float, *, jitter: float = 0.0) -> wait_base:
    """Waits of `initial`, 2 × `initial`, 4 × … up to `maximum` seconds (tenacity's
    exponential wait), each times a random factor in ``[1 - jitter, 1 + jitter]``."""
    if initial <= 0 or maximum < initial:
        raise ValueError("need 0 < initial <= maximum")
    if not 0 <= jitter < 1:
        raise ValueError("need 0 <= jitter < 1")
    wait: wait_base = wait_exponential(multiplier=initial, exp_base=2, max=maximum)
    return _Jittered(wait, jitter) if jitter else wait


class Restartable(wait_base):
    """Another wait strategy whose schedule :meth:`restart` starts over: the wait after
    the try running when it is called is the schedule's first (a reconnecting client
    calls it when a connection opens, so that the wait after it closes is `initial`)."""

    def __init__(self, wait: wait_base) -> None:
        self.wait = wait
        self._last = 0  # the try the last wait followed
        self._start = 0  # the tries before the schedule's first

    def restart(self) -> None:
        self._start = self._last

    def __call__(self, retry_state: RetryCallState) -> float:
        self._last = retry_state.attempt_number
        shifted = copy.copy(retry_state)
        shifted.attempt_number = retry_state.attempt_number - self._start
        return self.wait(shifted)


def _not_done(done: bool) -> bool:
    return not done


async def until_done(
    step: Callable[[], Awaitable[bool]],
    wait: wait_base | Callable[[RetryCallState], float],
    *,
    stop: StopBaseT = stop_never,
    what: str | None = "call to Central",
) -> bool:
    """``await step()`` until it returns True, waiting by `wait` between tries; True then,
    or False when `stop` ends the tries first. An exception of the step (cancellation
    included, and a cancellation during a wait) is raised at once. Each wait is logged at
    DEBUG as ``next <what> in N s`` (`what` None: not logged)."""

    def log_next(state: RetryCallState) -> None:
        if what is not None and state.next_action is not None:
            logger.debug("next {} in {:g} s", what, state.next_action.sleep)

    retrying = AsyncRetrying(
        wait=wait,
        stop=stop,
        retry=retry_if_result(_not_done),
        before_sleep=log_next,
        retry_error_callback=lambda _state: False,
        reraise=True,
    )
    return bool(await retrying(step))
