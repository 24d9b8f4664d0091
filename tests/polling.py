"""Waiting on a condition with a deadline: the one polling helper of the test suite.

Tests synchronise on events where the code under test offers one; where it does not (a
process's log, an HTTP answer, a DOM value), they poll with one of these, which fail with
an AssertionError naming what was awaited and the last value seen.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def poll(
    probe: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    retry_on: tuple[type[BaseException], ...] = (),
) -> Any:
    """Call `probe` (sync or async) until it returns something truthy, and return that.

    Exceptions of the `retry_on` types count as "not yet"; after `timeout` seconds an
    AssertionError names `what` and the last value or exception.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = probe()
            last = await value if inspect.isawaitable(value) else value
        except retry_on as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


def poll_sync(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """:func:`poll` for code outside an event loop."""
    deadline = time.monotonic() + timeout
    last: T | BaseException | None = None
    while True:
        try:
            value = probe()
        except retry_on as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        time.sleep(interval)
