"""Central's live dashboard (SPEC §5): ``GET /``, its static assets and the ``/ws`` feed.

The page (``static/index.html``, ``dashboard.js``, ``dashboard.css``) is plain HTML, CSS
and JavaScript served by Central itself: no CDN, no build step. It is made for networks of
any size: summary tiles (``GET /summary``'s numbers), a power chart, a paged CP table (or
cards, for small networks) read page by page from ``GET /cp?limit=&offset=&state=&site=``,
and an activity feed. It follows the network over a WebSocket and falls back to polling
``/summary``, ``/cp`` and ``/api/feed`` while the socket is down.

``/ws`` speaks JSON text frames:

* first ``{"type": "snapshot", "summary": {...}, "feed": [...], "ts": ...}``: the
  :class:`~evcharging.apps.ev_central.schemas.SummaryOut` of the network and the recent
  faults, recoveries, monitor changes and finished sessions, newest first (the shape of
  :func:`feed_item_from_fault` and :func:`feed_item_from_session`). The CPs themselves are
  not in it: the page reads the ones it shows from ``GET /cp``;
* then, at most every :data:`DELTA_INTERVAL` seconds and only when something changed,
  ``{"type": "delta", "cps": [...], "telemetry": [...], "events": [...], "ts": ...}``: the
  latest ``CPOut`` of each CP that changed, the latest telemetry of each CP that reported
  since, and the hub's other events (``session``, ``fault``, ``recovery``, ``monitor``) in
  order. A delta also carries ``summary`` when the network changed, as often as
  :data:`SUMMARY_BUDGET` allows (at most every delta, less often when the network is so
  large that a summary takes a while), and ``dropped`` when events were dropped;
* a fresh snapshot whenever the client fell too far behind (the hub dropped its pending
  changes, :mod:`evcharging.apps.ev_central.events`), so it never shows a stale state.

Each connection owns two tasks (a sender and a receiver); whichever ends first (the
client went away, the server shuts down, a send timed out) cancels the other, and both
are awaited before the handler returns. Central itself never waits for a client: the
hub keeps each client's pending changes, bounded, and drops them for a snapshot.

User-supplied text never becomes markup: the page inserts data with ``textContent``
only, and ``GET /`` carries a Content-Security-Policy that allows no inline script.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, WebSocket
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from loguru import logger
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.events import Delta, Event, Subscription
from evcharging.apps.ev_central.peer_feeds import PeerFeeds
from evcharging.apps.ev_central.repository import FaultEvent, SessionRecord
from evcharging.common.http import ErrorOut, is_cross_origin
from evcharging.common.messages import (
    FaultEventType,
    SessionStatus,
    format_ts,
    format_ts_opt,
    utcnow,
)

STATIC_DIR = Path(__file__).parent / "static"

SNAPSHOT_FEED_LIMIT = 20
"""Faults and sessions (each) read from the database for a WebSocket snapshot."""

FEED_MAX_LIMIT = 500

SEND_TIMEOUT = 10.0
"""A client that cannot take one message within this many seconds is dropped."""

DELTA_INTERVAL = 0.25
"""Seconds between two deltas to one client: changes within a window go out as one."""

SUMMARY_BUDGET = 0.01
"""Share of Central's time one client's summaries may take: a summary that took 5 ms
(about 8,000 CPs) goes out at most every 0.5 s, a small network's with every delta."""

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

_EPOCH = datetime.min.replace(tzinfo=UTC)

_MONITOR_EVENTS: dict[str, bool] = {
    FaultEventType.MONITOR_LOST: False, FaultEventType.MONITOR_BACK: True,
}


# ----------------------------------------------------------------------------- the feed


def feed_item_from_fault(event: FaultEvent) -> Event:
    """A stored fault event as the hub's ``fault`` / ``recovery`` / ``monitor`` event."""
    monitored = _MONITOR_EVENTS.get(event.event_type)
    if monitored is not None:
        return {"type": "monitor", "cp_id": event.cp_id, "reason": event.reason,
                "monitored": monitored, "ts": format_ts(event.ts)}
    kind = "recovery" if event.event_type == FaultEventType.RECOVERY else "fault"
    return {"type": kind, "cp_id": event.cp_id, "reason": event.reason, "ts": format_ts(event.ts)}


def feed_item_from_session(session: SessionRecord) -> Event:
    """A stored, finished session as the hub's ``session`` event."""
    return {
        "type": "session",
        "result": session.status,
        "cp_id": session.cp_id,
        "driver_id": session.driver_id,
        "session_id": session.session_id,
        "kwh": session.kwh,
        "euros": session.euros,
        "reason": session.reason,
        "ts": format_ts_opt(session.ended_at or session.started_at),
    }


def _feed_time(item: Event) -> datetime:
    try:
        return datetime.fromisoformat(str(item.get("ts"))).astimezone(UTC)
    except ValueError:
        return _EPOCH


async def recent_feed(controller: Controller, limit: int) -> list[Event]:
    """The newest `limit` faults, recoveries, monitor changes and finished sessions,
    newest first."""
    faults = await controller.repo.list_faults(limit=limit)
    sessions = await controller.repo.list_sessions(limit=limit)
    items = [feed_item_from_fault(event) for event in faults]
    items += [feed_item_from_session(s) for s in sessions if s.status != SessionStatus.ACTIVE]
    items.sort(key=_feed_time, reverse=True)
    return items[:limit]


def summary_json(controller: Controller, feeds: PeerFeeds | None = None) -> dict[str, Any]:
    """The network's :class:`~evcharging.apps.ev_central.schemas.SummaryOut`, as JSON:
    this instance's CPs, and the followed peers' with `feeds` (SPEC §9)."""
    now = utcnow()
    own = controller.tally.summary(now)
    return (feeds.summary(own, now) if feeds else own).model_dump(mode="json")


async def snapshot(controller: Controller, feeds: PeerFeeds | None = None) -> Event:
    """The first message of a connection (and of a resync): the summary and the feed."""
    feed = await recent_feed(controller, SNAPSHOT_FEED_LIMIT)
    return {
        "type": "snapshot",
        "summary": summary_json(controller, feeds),  # after the await: as new as the subscription
        "feed": feed,
        "ts": format_ts(utcnow()),
    }


def delta_message(delta: Delta, summary: dict[str, Any] | None) -> Event:
    """The JSON of one delta (``summary`` and ``dropped`` only when there are some)."""
    message: Event = {
        "type": "delta", "cps": delta.cps, "telemetry": delta.telemetry, "events": delta.events,
    }
    if summary is not None:
        message["summary"] = summary
    if delta.dropped:
        message["dropped"] = delta.dropped
    message["ts"] = format_ts(utcnow())
    return message


# ----------------------------------------------------------------------------- the socket


async def _send(websocket: WebSocket, event: Event) -> None:
    async with asyncio.timeout(SEND_TIMEOUT):
        await websocket.send_text(json.dumps(event, separators=(",", ":")))


class SummaryPacer:
    """When one client gets its next summary: with the first delta after a change, unless
    the last summary's cost (:data:`SUMMARY_BUDGET`) says to wait a little longer."""

    def __init__(
        self,
        summarise: Callable[[], dict[str, Any]],
        *,
        budget: float | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._summarise = summarise
        self._budget = budget
        self._timer = timer
        self.owed = False
        """The network changed since the last summary this client got."""
        self.next_at = -math.inf
        """Loop time from which the next summary may be computed."""

    def compute(self, now: float) -> dict[str, Any]:
        started = self._timer()
        summary = self._summarise()
        cost = self._timer() - started
        self.owed = False
        self.next_at = now + cost / (self._budget or SUMMARY_BUDGET)
        return summary

    def take(self, delta: Delta, now: float) -> dict[str, Any] | None:
        """The summary to send with `delta`, if it is due."""
        self.owed = self.owed or bool(delta.cps or delta.telemetry)
        return self.compute(now) if self.owed and now >= self.next_at else None


async def _next(subscription: Subscription, summaries: SummaryPacer) -> None:
    """Wait for a change, or for the summary the client is owed to be due."""
    if not summaries.owed:
        await subscription.wait()
        return
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(max(summaries.next_at, loop.time())):
            await subscription.wait()


async def _forward(websocket: WebSocket, controller: Controller,
                   feeds: PeerFeeds | None) -> None:
    """Send the snapshot, then a delta per window with changes, until the client or the
    server goes. With `feeds`, the other Centrals' CPs come along (SPEC §9)."""
    loop = asyncio.get_running_loop()
    summaries = SummaryPacer(lambda: summary_json(controller, feeds))
    with (controller.hub.subscribe() as subscription,  # before the snapshot: nothing missed
          feeds.attach(subscription) if feeds else contextlib.nullcontext()):
        await _send(websocket, await snapshot(controller, feeds))
        sent_at = -math.inf
        while True:
            await _next(subscription, summaries)
            wait = sent_at + DELTA_INTERVAL - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the window: what arrives meanwhile goes along
            delta = subscription.take()
            if delta.behind:
                logger.debug("dashboard client behind (or the network changed); sending a "
                             "fresh snapshot")
                await _send(websocket, await snapshot(controller, feeds))
                summaries.owed = False
            else:
                summary = summaries.take(delta, loop.time())
                if not (delta.cps or delta.telemetry or delta.events or summary):
                    continue
                await _send(websocket, delta_message(delta, summary))
            sent_at = loop.time()


async def _until_disconnect(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, until it disconnects."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


async def serve_socket(
    websocket: WebSocket, controller: Controller, feeds: PeerFeeds | None = None
) -> None:
    """Serve one dashboard client until it disconnects or the server shuts down."""
    await websocket.accept()
    sender = asyncio.create_task(_forward(websocket, controller, feeds),
                                 name="dashboard-ws-send")
    receiver = asyncio.create_task(_until_disconnect(websocket), name="dashboard-ws-recv")
    tasks = (sender, receiver)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    _outcome(receiver)
    if not _outcome(sender):
        # The sender failed while the client was still there: close our side (a client
        # that reads nothing may not take the close frame either: TimeoutError is an OSError).
        with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, OSError):
            async with asyncio.timeout(SEND_TIMEOUT):
                await websocket.close(code=1011)


def _outcome(task: asyncio.Task[None]) -> bool:
    """Log how an ended task ended; False when it failed on our side (not the client's)."""
    if task.cancelled():
        return True
    exc = task.exception()
    if isinstance(exc, TimeoutError):  # before OSError, of which it is a subclass
        logger.info("dashboard client too slow (no send within {}s); dropped", SEND_TIMEOUT)
        return False
    if exc is None or isinstance(exc, (WebSocketDisconnect, WebSocketDisconnected, OSError)):
        logger.debug("dashboard client gone ({})", task.get_name())
        return True
    logger.opt(exception=exc).error("dashboard WebSocket failed")
    return False


# ----------------------------------------------------------------------------- mounting


def mount_dashboard(app: FastAPI, controller: Controller, feeds: PeerFeeds | None = None) -> None:
    """Add ``GET /``, ``/static``, ``GET /api/feed`` and the ``/ws`` WebSocket to `app`.
    ``/ws`` shows the whole network with `feeds` (the other Centrals' CPs); ``/ws?scope=local``
    this instance's own CPs (what a peer follows)."""
    index = STATIC_DIR / "index.html"

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(index, media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get(
        "/api/feed",
        summary="Recent faults, recoveries and finished sessions, newest first",
        responses={422: {"model": ErrorOut, "description": "invalid limit"}},
    )
    async def feed(
        limit: Annotated[int, Query(ge=1, le=FEED_MAX_LIMIT)] = 50,
    ) -> list[dict[str, Any]]:
        return await recent_feed(controller, limit)

    @app.websocket("/ws")
    async def live(websocket: WebSocket) -> None:
        if is_cross_origin(websocket):
            # A page of another site must not read the network through the operator's
            # browser: refused before the handshake completes (HTTP 403, close code 1008).
            logger.warning("WebSocket from origin {!r} refused (host {!r})",
                           websocket.headers.get("origin"), websocket.headers.get("host"))
            await websocket.close(code=1008)
            return
        local = websocket.query_params.get("scope") == "local"
        await serve_socket(websocket, controller, None if local else feeds)
