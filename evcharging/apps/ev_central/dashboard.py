"""Central's live dashboard (SPEC §5): ``GET /``, its static assets and the ``/ws`` feed.

The page (``static/index.html``, ``dashboard.js``, ``dashboard.css``) is plain HTML, CSS
and JavaScript served by Central itself: no CDN, no build step. It follows the network
over a WebSocket and falls back to polling ``/cp`` and ``/api/feed`` while the socket
is down.

``/ws`` speaks JSON text frames, one event each:

* first ``{"type": "snapshot", "cps": [...], "feed": [...], "ts": ...}``: every CP as
  ``GET /cp`` gives it and the recent faults, recoveries and finished sessions, newest
  first (the shape of :func:`feed_item_from_fault` and :func:`feed_item_from_session`);
* then every event of the controller's :class:`EventHub` as it happens (``cp``,
  ``telemetry``, ``fault``, ``recovery``, ``session``). Telemetry that piles up while
  the client is slow is coalesced to the latest message per CP. When the hub drops
  events for a client that fell too far behind, the client gets a fresh snapshot
  instead of the ``overflow`` marker, so it never shows a stale state.

Each connection owns two tasks (a sender and a receiver); whichever ends first (the
client went away, the server shuts down, a send timed out) cancels the other, and both
are awaited before the handler returns. Central itself never waits for a client: the
hub's bounded queue absorbs a slow one.

User-supplied text never becomes markup: the page inserts data with ``textContent``
only, and ``GET /`` carries a Content-Security-Policy that allows no inline script.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, WebSocket
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from loguru import logger
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.events import Event
from evcharging.apps.ev_central.repository import FaultEvent, SessionRecord
from evcharging.apps.ev_central.schemas import cp_out
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


# ----------------------------------------------------------------------------- the feed


def feed_item_from_fault(event: FaultEvent) -> Event:
    """A stored fault event as the hub's ``fault`` / ``recovery`` event."""
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
    """The newest `limit` faults, recoveries and finished sessions, newest first."""
    faults = await controller.repo.list_faults(limit=limit)
    sessions = await controller.repo.list_sessions(limit=limit)
    items = [feed_item_from_fault(event) for event in faults]
    items += [feed_item_from_session(s) for s in sessions if s.status != SessionStatus.ACTIVE]
    items.sort(key=_feed_time, reverse=True)
    return items[:limit]


async def snapshot(controller: Controller) -> Event:
    feed = await recent_feed(controller, SNAPSHOT_FEED_LIMIT)
    now = utcnow()
    return {
        "type": "snapshot",
        "cps": [cp_out(cp, now=now).model_dump(mode="json") for cp in controller.all_cps()],
        "feed": feed,
        "ts": format_ts(now),
    }


def coalesce(events: list[Event]) -> list[Event]:
    """Keep only the latest telemetry of each CP; every other event, in order."""
    latest: dict[Any, int] = {}
    for index, event in enumerate(events):
        if event.get("type") == "telemetry":
            latest[event.get("telemetry", {}).get("cp_id")] = index
    return [
        event
        for index, event in enumerate(events)
        if event.get("type") != "telemetry"
        or latest[event.get("telemetry", {}).get("cp_id")] == index
    ]


# ----------------------------------------------------------------------------- the socket


def _drain(queue: asyncio.Queue[Event], first: Event) -> list[Event]:
    events = [first]
    while True:
        try:
            events.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            return events


def _discard(queue: asyncio.Queue[Event]) -> None:
    while not queue.empty():
        queue.get_nowait()


async def _send(websocket: WebSocket, event: Event) -> None:
    async with asyncio.timeout(SEND_TIMEOUT):
        await websocket.send_text(json.dumps(event, separators=(",", ":")))


async def _forward(websocket: WebSocket, controller: Controller) -> None:
    """Send the snapshot, then every hub event, until the client or the server goes."""
    with controller.hub.subscribe() as queue:  # before the snapshot: nothing is missed
        await _send(websocket, await snapshot(controller))
        while True:
            events = _drain(queue, await queue.get())
            if any(event.get("type") == "overflow" for event in events):
                logger.info("dashboard client fell behind; sending a fresh snapshot")
                _discard(queue)
                await _send(websocket, await snapshot(controller))
                continue
            for event in coalesce(events):
                await _send(websocket, event)


async def _until_disconnect(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, until it disconnects."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


async def serve_socket(websocket: WebSocket, controller: Controller) -> None:
    """Serve one dashboard client until it disconnects or the server shuts down."""
    await websocket.accept()
    sender = asyncio.create_task(_forward(websocket, controller), name="dashboard-ws-send")
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


def mount_dashboard(app: FastAPI, controller: Controller) -> None:
    """Add ``GET /``, ``/static``, ``GET /api/feed`` and the ``/ws`` WebSocket to `app`."""
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
        await serve_socket(websocket, controller)
