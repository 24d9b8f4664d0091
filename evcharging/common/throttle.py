"""A pure limiter of failed authentications per client address (SPEC §5: an address that
fails authentication 20 times within 10 s gets 429 for the next 10 s, counted from the
20th failure). Central's HTTP API (:class:`evcharging.common.http.AccessPolicy`) and its
TCP control plane each hold one.

No I/O; the clock is injected, so the tests walk it through every case.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

__all__ = ["AUTH_BLOCK", "AUTH_FAILURES", "AUTH_TRACKED", "AUTH_WINDOW", "AuthThrottle"]

AUTH_FAILURES = 20
AUTH_WINDOW = 10.0
AUTH_BLOCK = 10.0
AUTH_TRACKED = 4096
"""Addresses a throttle remembers at most (each for its failures, and as many blocks)."""


class AuthThrottle:
    """Per client address: `failures` failed authentications within `window` seconds
    block it for `block` seconds, counted from the failure that reached the count.

    :meth:`retry_after` says whether an address is blocked now (how many seconds are
    left); :meth:`failed` records a failure. Failures while blocked are not counted (a
    blocked address is refused before its credentials are looked at), and a block that
    ends forgets the failures before it: the count starts again from zero.

    Memory is bounded by `tracked` addresses with recent failures (at most `failures`
    timestamps each) plus `tracked` blocked addresses. Past that, the address whose
    last failure is oldest is forgotten first (``evicted``), and of the blocks the one
    that ends soonest; entries older than the window or the block go at every call.
    Every call is O(1) amortised.
    """

    def __init__(
        self,
        *,
        failures: int = AUTH_FAILURES,
        window: float = AUTH_WINDOW,
        block: float = AUTH_BLOCK,
        tracked: int = AUTH_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or tracked < 1 or window < 0 or block < 0:
            raise ValueError("failures and tracked must be >= 1, window and block >= 0")
        self.failures = failures
        self.window = window
        self.block = block
        self.tracked = tracked
        self.clock = clock
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()
        """Addresses by their last failure, oldest first, with their failures' times."""
        self._blocked: OrderedDict[str, float] = OrderedDict()
        """Blocked addresses, by when their block ends (the soonest first)."""
        self.failed_total = 0
        self.blocks = 0
        self.refused = 0
        self.evicted = 0

    def retry_after(self, address: str) -> float:
        """Seconds until `address` may try again (0.0: it may now); a positive answer
        counts as one refused call."""
        now = self.clock()
        self._expire(now)
        until = self._blocked.get(address)
        if until is None:
            return 0.0
        self.refused += 1
        return until - now

    def failed(self, address: str) -> bool:
        """Record a failed authentication of `address`; True when it blocks the address."""
        now = self.clock()
        self._expire(now)
        if address in self._blocked:
            return False
        self.failed_total += 1
        times = self._recent.get(address)
        if times is None:
            times = self._recent[address] = deque(maxlen=self.failures)
            if len(self._recent) > self.tracked:
                self._recent.popitem(last=False)
                self.evicted += 1
        else:
            self._recent.move_to_end(address)
        times.append(now)
        if len(times) < self.failures or now - times[0] > self.window:
            return False
        del self._recent[address]
        self._blocked[address] = now + self.block
        if len(self._blocked) > self.tracked:
            self._blocked.popitem(last=False)
            self.evicted += 1
        self.blocks += 1
        return True

    @property
    def tracking(self) -> int:
        """Addresses remembered now (failing or blocked)."""
        return len(self._recent) + len(self._blocked)

    def _expire(self, now: float) -> None:
        blocked = self._blocked
        while blocked:
            address, until = next(iter(blocked.items()))
            if until > now:
                break
            del blocked[address]
        recent = self._recent
        while recent:
            address, times = next(iter(recent.items()))
            if now - times[-1] <= self.window:
                break
            del recent[address]
