"""A small in-process event hub: Central's live changes, coalesced for the dashboard.

The controller publishes events only while :attr:`EventHub.subscribers` is non-zero:

* ``{"type": "cp", "cp": {...}}``: a CP's whole ``CPOut`` JSON after a change;
* ``{"type": "telemetry", "telemetry": {...}}``: a CP's latest meter reading;
* feed events (``session``, ``fault``, ``recovery``, ``monitor``) and anything else.

Each subscriber owns a :class:`Subscription` holding what changed since its last
:meth:`~Subscription.take`: the latest ``cp`` per CP, the latest telemetry per CP (a ``cp``
event, which carries the CP's last telemetry, supersedes the telemetry before it), and
every other event in order, the newest :data:`MAX_EVENTS` of them. Publishing is a dict
assignment per subscriber: it never waits and never serialises.

A subscriber that lets more than ``max_pending`` CPs pile up (it reads too slowly) is
*behind*: its pending changes are dropped at once and its next :meth:`~Subscription.take`
says so, so that its reader sends a fresh snapshot instead. Memory per subscriber stays
bounded, and Central never slows down for a client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

Event = dict[str, Any]

MAX_PENDING = 8192
"""CPs (changes plus telemetry) a subscriber may have pending before it counts as behind."""

MAX_EVENTS = 200
"""Feed events kept per subscriber between two takes (the oldest are dropped)."""


@dataclass
class Delta:
    """What changed for one subscriber since its last take."""

    cps: list[Event] = field(default_factory=list)
    """The latest ``CPOut`` JSON of each changed CP."""
    telemetry: list[Event] = field(default_factory=list)
    """The latest telemetry of each CP, when newer than its ``cps`` entry."""
    events: list[Event] = field(default_factory=list)
    """Feed (and other) events, oldest first."""
    dropped: int = 0
    """Events dropped because more than :data:`MAX_EVENTS` piled up."""
    behind: bool = False
    """The subscriber fell too far behind: everything was dropped, send a snapshot."""


class Subscription:
    """One subscriber's pending changes (see the module's docstring)."""

    def __init__(self, max_pending: int = MAX_PENDING, max_events: int = MAX_EVENTS) -> None:
        self._max_pending = max_pending
        self._cps: dict[Any, Event] = {}
        self._telemetry: dict[Any, Event] = {}
        self._events: deque[Event] = deque(maxlen=max_events)
        self._dropped = 0
        self._behind = False
        self._ready = asyncio.Event()

    @property
    def pending(self) -> bool:
        """Whether a take would give something."""
        return self._ready.is_set()

    def add(self, event: Event) -> None:
        if self._behind:
            return  # a snapshot follows anyway
        kind = event.get("type")
        payload = event.get(kind) if kind in ("cp", "telemetry") else None
        if isinstance(payload, dict) and payload.get("cp_id") is not None:
            cp_id = payload["cp_id"]
            if kind == "cp":
                self._telemetry.pop(cp_id, None)  # the CP's JSON carries its last telemetry
                self._cps[cp_id] = payload
            else:
                self._telemetry[cp_id] = payload
            if len(self._cps) + len(self._telemetry) > self._max_pending:
                self._fall_behind()
        else:
            if len(self._events) == self._events.maxlen:
                self._dropped += 1
            self._events.append(event)
        self._ready.set()

    def _fall_behind(self) -> None:
        self._behind = True
        self._cps.clear()
        self._telemetry.clear()
        self._events.clear()
        self._dropped = 0

    def resync(self) -> None:
        """Drop what is pending: the reader's next take says it is behind (a fresh
        snapshot follows), as when the network it shows changed."""
        self._fall_behind()
        self._ready.set()

    async def wait(self) -> None:
        """Return once something is pending."""
        await self._ready.wait()

    def take(self) -> Delta:
        """What is pending, oldest events first; nothing is pending afterwards."""
        delta = Delta(
            cps=list(self._cps.values()),
            telemetry=list(self._telemetry.values()),
            events=list(self._events),
            dropped=self._dropped,
            behind=self._behind,
        )
        self._cps.clear()
        self._telemetry.clear()
        self._events.clear()
        self._dropped = 0
        self._behind = False
        self._ready.clear()
        return delta


class EventHub:
    def __init__(self, max_pending: int = MAX_PENDING, max_events: int = MAX_EVENTS) -> None:
        self._max_pending = max_pending
        self._max_events = max_events
        self._subscribers: set[Subscription] = set()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, event: Event) -> None:
        for subscription in self._subscribers:
            subscription.add(event)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        subscription = Subscription(self._max_pending, self._max_events)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)
