"""Tests for evcharging.apps.ev_central.dashboard: the page, its assets, /api/feed and /ws
(and the hub's per-subscriber coalescing, evcharging.apps.ev_central.events).

The HTTP and WebSocket tests use Starlette's TestClient. Its app runs on the client's own
event loop (a portal thread), so everything that touches the controller, the hub or the
database is run through ``client.portal`` on that loop. One test serves the app with a
real uvicorn server to check that a server shutdown ends an open WebSocket cleanly.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import websockets
from starlette.exceptions import StarletteDeprecationWarning
from starlette.websockets import WebSocketDisconnect
from websockets.typing import Origin

from evcharging.apps.ev_central import dashboard
from evcharging.apps.ev_central.api import create_api
from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.events import Delta, EventHub, Subscription
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.apps.ev_central.schemas import summarise
from evcharging.common.bus import Topic, topic_of
from evcharging.common.messages import (
    CPRegistration,
    CPState,
    CPStatus,
    CPTelemetry,
    DriverRequest,
    Message,
    SessionResult,
    utcnow,
)
from evcharging.common.service import HttpServer
from tests.polling import poll
from tests.unit.conftest import FlushingController

with warnings.catch_warnings():
    # Starlette >= 1.x prefers httpx2 for its TestClient and warns at import when only
    # httpx is installed (the project pins httpx); the client works the same with both.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

STATIC = Path(dashboard.__file__).parent / "static"
CARD_HOOKS = (
    "cp-state", "cp-kw", "cp-kwh", "cp-euros", "cp-driver", "cp-breaker", "cp-unmonitored",
)
XSS = "<img src=x onerror=alert(1)>"

T = TypeVar("T")


class FakePublisher:
    def __init__(self) -> None:
        self.calls: list[tuple[Topic, Message]] = []

    async def publish(self, message: Message, *, wait: bool = True) -> None:
        self.calls.append((topic_of(message), message))


@dataclass
class Central:
    client: TestClient
    controller: Controller

    def run(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a coroutine function on the app's event loop."""
        return self.client.portal.call(func, *args)  # type: ignore[union-attr]

    def run_sync(self, func: Callable[[], T]) -> T:
        """Run a plain function on the app's event loop, in one step of it."""
        return self.client.portal.call(func)  # type: ignore[union-attr]


def make_central(hub: EventHub | None = None) -> Iterator[Central]:
    repo = SqliteRepository(":memory:")
    controller = FlushingController(FakePublisher(), repo, hub=hub)
    with TestClient(create_api(controller)) as client:
        central = Central(client, controller)
        central.run(repo.open)
        try:
            yield central
        finally:
            central.run(controller.close)
            central.run(repo.close)


@pytest.fixture
def central() -> Iterator[Central]:
    yield from make_central()


@pytest.fixture
def small_hub_central() -> Iterator[Central]:
    yield from make_central(EventHub(max_pending=3))


async def register(controller: Controller, cp_id: str) -> None:
    await controller.register(CPRegistration(cp_id=cp_id, location="Depot"))
    await controller.handle_status(CPStatus(cp_id=cp_id, state=CPState.ACTIVATED))


async def complete_session(controller: Controller, cp_id: str, driver_id: str) -> str:
    request = DriverRequest(request_id=f"r-{cp_id}-{driver_id}", driver_id=driver_id, cp_id=cp_id)
    await controller.handle_request(request)
    session = controller.cps[cp_id].session
    assert session is not None
    await controller.handle_status(
        CPStatus(cp_id=cp_id, state=CPState.SUPPLYING, session_id=session.session_id)
    )
    await controller.handle_status(
        CPStatus(
            cp_id=cp_id,
            state=CPState.ACTIVATED,
            session_id=session.session_id,
            kwh=1.5,
            euros=0.45,
            session_result=SessionResult.COMPLETED,
        )
    )
    return session.session_id


async def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    await poll(predicate, timeout=timeout, what="the condition", interval=0.01)


def telemetry_event(cp_id: str, kw: float) -> dict[str, Any]:
    telemetry = CPTelemetry(cp_id=cp_id, kw=kw, kwh=kw / 10, euros=kw / 30)
    return {"type": "telemetry", "telemetry": telemetry.model_dump(mode="json")}


def cp_event(cp_id: str, **fields: Any) -> dict[str, Any]:
    return {"type": "cp", "cp": {"cp_id": cp_id, **fields}}


def receive_until(
    ws: Any, done: Callable[[list[dict[str, Any]]], bool], most: int = 20
) -> list[dict[str, Any]]:
    """The messages `ws` receives until `done(messages)` holds (at most `most` of them)."""
    received: list[dict[str, Any]] = []
    while not done(received):
        assert len(received) < most, received
        received.append(ws.receive_json())
    return received


def delta_cps(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [cp for m in messages if m["type"] == "delta" for cp in m["cps"]]


def delta_events(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for m in messages if m["type"] == "delta" for e in m["events"]]


# --------------------------------------------------------------------------- the page


def test_index_is_html_with_local_assets_only(central: Central) -> None:
    response = central.client.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "http://" not in html and "https://" not in html
    assert "//" not in "".join(re.findall(r'(?:src|href)="([^"]*)"', html))
    assert set(re.findall(r'(?:src|href)="([^"]*)"', html)) == {
        "/static/favicon.svg",
        "/static/dashboard.css",
        "/static/dashboard.js",
    }
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp
    assert "<script>" not in html  # no inline script: the CSP would block it anyway


def test_index_answers_head(central: Central) -> None:
    response = central.client.head("/")
    assert response.status_code == 200
    assert response.content == b""


def test_index_has_the_stable_dom_hooks(central: Central) -> None:
    html = central.client.get("/").text

    assert 'id="feed"' in html
    assert re.search(r'id="conn"[^>]*data-mode="connecting"', html)
    for hook in CARD_HOOKS:
        assert re.search(rf'class="[^"]*\b{hook}\b', html), hook
    assert 'id="cp-table"' in html and 'id="cp-rows"' in html
    for hook in ("state-tiles", "site-tiles", "filter-state", "filter-site", "filter-search",
                 "page-prev", "page-next", "page-info", "power-chart"):
        assert f'id="{hook}"' in html, hook
    js = (STATIC / "dashboard.js").read_text()
    assert "dataset.cpId = cpId" in js  # -> data-cp-id="<id>" on each card and row
    assert "cp.monitored !== false" in js  # the NO MONITOR badge follows CPOut.monitored
    for mode in ("ws", "polling", "connecting"):
        assert f'"{mode}"' in js


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("dashboard.js", "javascript"),
        ("dashboard.css", "text/css"),
        ("index.html", "text/html"),
        ("favicon.svg", "image/svg+xml"),
    ],
)
def test_static_files_are_served(central: Central, name: str, content_type: str) -> None:
    response = central.client.get(f"/static/{name}")

    assert response.status_code == 200
    assert content_type in response.headers["content-type"]
    assert response.text == (STATIC / name).read_text()


@pytest.mark.parametrize("name", ["index.html", "dashboard.css", "dashboard.js"])
def test_assets_fetch_nothing_from_outside(name: str) -> None:
    text = (STATIC / name).read_text()
    assert "http://" not in text and "https://" not in text
    assert "@import" not in text and "url(" not in text  # no web fonts or remote images


def test_favicon_only_names_the_svg_namespace() -> None:
    text = (STATIC / "favicon.svg").read_text()
    assert re.findall(r"https?://[^\"' ]+", text) == ["http://www.w3.org/2000/svg"]


def test_unknown_static_file_is_404(central: Central) -> None:
    assert central.client.get("/static/nope.js").status_code == 404
    assert central.client.get("/static/../dashboard.py").status_code == 404


def test_javascript_inserts_data_as_text_only() -> None:
    js = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, sink
    assert "new Function" not in js
    assert "textContent" in js


def test_javascript_connects_to_its_own_origin() -> None:
    js = (STATIC / "dashboard.js").read_text()
    assert '"wss://" : "ws://"' in js
    assert "window.location.host" in js
    assert "fetch(`/cp?${params}`" in js  # pages of the list, never the whole of it
    assert 'fetch("/summary"' in js and "fetch(`/api/feed" in js
    assert 'fetch("/cp"' not in js
    assert "POLL_MS = 2000" in js


# --------------------------------------------------------------------------- /api/feed


def test_feed_is_empty_without_history(central: Central) -> None:
    response = central.client.get("/api/feed")
    assert response.status_code == 200
    assert response.json() == []


def test_feed_merges_faults_recoveries_and_finished_sessions(central: Central) -> None:
    controller = central.controller
    central.run(register, controller, "CP-1")
    central.run(register, controller, "CP-2")
    session_id = central.run(complete_session, controller, "CP-1", "driver-a")
    central.run(controller.report_fault, "CP-2", True, "engine unreachable")
    central.run(controller.report_fault, "CP-2", False, "health checks pass")

    feed = central.client.get("/api/feed").json()

    assert [item["type"] for item in feed] == ["recovery", "fault", "session"]
    assert feed[0] == {
        "type": "recovery",
        "cp_id": "CP-2",
        "reason": "health checks pass",
        "ts": feed[0]["ts"],
    }
    assert feed[1]["reason"] == "engine unreachable"
    session = feed[2]
    assert session["result"] == "COMPLETED"
    assert session["session_id"] == session_id
    assert session["driver_id"] == "driver-a"
    assert (session["kwh"], session["euros"]) == (1.5, 0.45)
    assert session["ts"].endswith("Z")


def test_feed_leaves_out_running_sessions(central: Central) -> None:
    controller = central.controller
    central.run(register, controller, "CP-1")
    request = DriverRequest(request_id="r-1", driver_id="driver-a", cp_id="CP-1")
    central.run(controller.handle_request, request)

    assert central.client.get("/api/feed").json() == []


def test_feed_limit(central: Central) -> None:
    controller = central.controller
    central.run(register, controller, "CP-1")
    for n in range(3):
        central.run(controller.report_fault, "CP-1", True, f"fault {n}")
        central.run(controller.report_fault, "CP-1", False, f"recovered {n}")

    feed = central.client.get("/api/feed", params={"limit": 2}).json()

    assert [item["reason"] for item in feed] == ["recovered 2", "fault 2"]


@pytest.mark.parametrize("limit", ["0", "-1", "501", "many"])
def test_feed_refuses_a_bad_limit(central: Central, limit: str) -> None:
    response = central.client.get("/api/feed", params={"limit": limit})
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_request"


# --------------------------------------------------------------------------- /ws


def test_websocket_sends_the_snapshot_first(central: Central) -> None:
    controller = central.controller
    central.run(register, controller, "CP-1")
    central.run(controller.report_fault, "CP-1", True, XSS)

    with central.client.websocket_connect("/ws") as ws:
        snapshot = ws.receive_json()

    assert snapshot["type"] == "snapshot"
    assert "cps" not in snapshot  # summary first: the page reads the CPs it shows from /cp
    summary = snapshot["summary"]
    assert summary == {
        **summarise(controller.cps.values(), utcnow()).model_dump(mode="json"),
        "ts": summary["ts"],
    }
    assert (summary["cps"], summary["faulty"], summary["by_state"]["FAULT"]) == (1, 1, 1)
    assert snapshot["feed"] == [
        {"type": "fault", "cp_id": "CP-1", "reason": XSS, "ts": snapshot["feed"][0]["ts"]}
    ]
    assert snapshot["ts"].endswith("Z")


def test_snapshot_feed_tells_monitor_changes(central: Central) -> None:
    controller = central.controller
    central.run(register, controller, "CP-1")
    central.run(controller.monitor_report, "CP-1", 0.01, True)
    controller.cps["CP-1"].monitor_seen -= 10  # silent for far more than 3 intervals
    central.run(controller.check_monitors)
    central.run(controller.monitor_report, "CP-1", 0.01, True)

    with central.client.websocket_connect("/ws") as ws:
        feed = ws.receive_json()["feed"]

    assert [(item["type"], item["monitored"]) for item in feed] == [
        ("monitor", True), ("monitor", False),
    ]
    assert all(item["cp_id"] == "CP-1" for item in feed)

@pytest.mark.parametrize(
    "origin", ["http://evil.example", "http://testserver.evil.example", "http://testserver:81",
               "null"],
)
def test_websocket_from_another_origin_is_refused(central: Central, origin: str) -> None:
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        central.client.websocket_connect("/ws", headers={"Origin": origin}),
    ):
        pass
    assert refused.value.code == 1008
    assert central.controller.hub.subscribers == 0


@pytest.mark.parametrize("headers", [{"Origin": "http://testserver"}, {}], ids=["same", "none"])
def test_websocket_from_the_same_origin_or_no_browser_is_served(
    central: Central, headers: dict[str, str]
) -> None:
    with central.client.websocket_connect("/ws", headers=headers) as ws:
        assert ws.receive_json()["type"] == "snapshot"


def test_websocket_forwards_changes_as_deltas(central: Central) -> None:
    controller = central.controller

    with central.client.websocket_connect("/ws") as ws:
        snapshot = ws.receive_json()
        assert (snapshot["type"], snapshot["summary"]["cps"], snapshot["feed"]) == (
            "snapshot", 0, [],
        )
        central.run(controller.register, CPRegistration(cp_id="CP-9", site="north"))
        delta = ws.receive_json()
        assert delta["type"] == "delta"
        assert [(cp["cp_id"], cp["state"], cp["site"]) for cp in delta["cps"]] == [
            ("CP-9", "DISCONNECTED", "north"),
        ]
        assert (delta["telemetry"], delta["events"]) == ([], [])
        assert delta["summary"]["cps"] == 1  # a small network's summary rides every delta
        assert delta["summary"]["by_site"][0]["site"] == "north"
        assert delta["ts"].endswith("Z")

        central.run(controller.handle_status, CPStatus(cp_id="CP-9", state=CPState.ACTIVATED))
        assert ws.receive_json()["cps"][-1]["state"] == "ACTIVATED"

        central.run(controller.report_fault, "CP-9", True, "no heartbeat")
        received = receive_until(
            ws, lambda got: bool(delta_events(got)) and delta_cps(got)[-1:] != []
            and delta_cps(got)[-1]["is_faulty"],
        )
        fault = delta_events(received)[0]
        assert (fault["type"], fault["cp_id"], fault["reason"]) == ("fault", "CP-9", "no heartbeat")
        # Summaries are paced (a share of Central's time), so one may come a delta later.
        summaries = [got["summary"] for got in received if "summary" in got]
        if not summaries or summaries[-1]["faulty"] != 1:
            later = receive_until(ws, lambda got: bool(got) and "summary" in got[-1])
            summaries = [later[-1]["summary"]]
        assert summaries[-1]["faulty"] == 1


def test_websocket_forwards_session_results(central: Central) -> None:
    controller = central.controller
    central.run(register, controller, "CP-1")

    with central.client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["type"] == "snapshot"
        session_id = central.run(complete_session, controller, "CP-1", "driver-b")
        received = receive_until(
            ws, lambda got: any(e["type"] == "session" for e in delta_events(got))
        )

    session = next(e for e in delta_events(received) if e["type"] == "session")
    assert session["result"] == "COMPLETED"
    assert session["session_id"] == session_id
    assert (session["cp_id"], session["driver_id"]) == ("CP-1", "driver-b")


def test_websocket_coalesces_what_arrives_together(central: Central) -> None:
    controller = central.controller

    def burst() -> None:  # one step of the loop: the sender sees all of it at once
        for kw in (1.0, 2.0, 3.0):
            controller.hub.publish(telemetry_event("CP-1", kw))
        controller.hub.publish(telemetry_event("CP-2", 7.0))
        controller.hub.publish({"type": "fault", "cp_id": "CP-1", "reason": "x", "ts": None})
        controller.hub.publish(telemetry_event("CP-1", 4.0))
        controller.hub.publish(cp_event("CP-2", state="ACTIVATED"))  # carries its telemetry
        controller.hub.publish(cp_event("CP-3", state="FAULT"))
        controller.hub.publish(cp_event("CP-3", state="ACTIVATED"))
        controller.hub.publish({"type": "marker"})

    with central.client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["type"] == "snapshot"
        central.run_sync(burst)
        delta = ws.receive_json()

    assert delta["type"] == "delta"
    assert delta["cps"] == [
        {"cp_id": "CP-2", "state": "ACTIVATED"}, {"cp_id": "CP-3", "state": "ACTIVATED"},
    ]
    assert [(t["cp_id"], t["kw"]) for t in delta["telemetry"]] == [("CP-1", 4.0)]
    assert [e["type"] for e in delta["events"]] == ["fault", "marker"]


def test_websocket_sends_at_most_one_delta_per_window(
    central: Central, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard, "DELTA_INTERVAL", 1.0)
    hub = central.controller.hub

    with central.client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["type"] == "snapshot"
        central.run_sync(lambda: hub.publish(cp_event("CP-1", n=1)))
        first = ws.receive_json()  # the first change goes out at once
        sent = time.monotonic()
        central.run_sync(lambda: hub.publish(cp_event("CP-1", n=2)))
        central.run_sync(lambda: hub.publish(cp_event("CP-2", n=1)))
        central.run_sync(lambda: hub.publish(cp_event("CP-1", n=3)))
        second = ws.receive_json()  # the rest of the window, together
        waited = time.monotonic() - sent

    assert first["cps"] == [{"cp_id": "CP-1", "n": 1}]
    assert second["cps"] == [{"cp_id": "CP-1", "n": 3}, {"cp_id": "CP-2", "n": 1}]
    assert waited >= 0.9  # a window after the first (less the first's own delivery)


def test_a_large_networks_summary_follows_after_its_deltas(
    central: Central, monkeypatch: pytest.MonkeyPatch
) -> None:
    class SlowPacer(dashboard.SummaryPacer):
        """As if a summary took long: the next one is due 1 s after the last."""

        def compute(self, now: float) -> dict[str, Any]:
            summary = super().compute(now)
            self.next_at = now + 1.0
            return summary

    monkeypatch.setattr(dashboard, "SummaryPacer", SlowPacer)
    monkeypatch.setattr(dashboard, "DELTA_INTERVAL", 0.05)
    controller = central.controller

    with central.client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["type"] == "snapshot"
        central.run(controller.register, CPRegistration(cp_id="CP-1"))
        first = ws.receive_json()
        central.run(controller.register, CPRegistration(cp_id="CP-2"))
        second = ws.receive_json()
        trailing = ws.receive_json()

    assert (first["cps"][0]["cp_id"], first["summary"]["cps"]) == ("CP-1", 1)
    assert second["cps"][0]["cp_id"] == "CP-2" and "summary" not in second
    assert (trailing["cps"], trailing["telemetry"], trailing["events"]) == ([], [], [])
    assert trailing["summary"]["cps"] == 2  # owed since CP-2, sent once due


def test_websocket_resyncs_a_client_that_fell_behind(small_hub_central: Central) -> None:
    central = small_hub_central
    controller = central.controller
    central.run(register, controller, "CP-1")

    def flood() -> None:  # more CPs than the hub keeps pending, in one step of the loop
        for n in range(10):
            controller.hub.publish(telemetry_event(f"CP-{n}", float(n)))

    with central.client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["type"] == "snapshot"
        central.run_sync(flood)
        fresh = ws.receive_json()
        assert fresh["type"] == "snapshot"
        assert fresh["summary"]["cps"] == 1
        central.run(controller.register, CPRegistration(cp_id="CP-2"))
        assert ws.receive_json()["cps"][0]["cp_id"] == "CP-2"


def test_websocket_ignores_what_the_client_sends(central: Central) -> None:
    with central.client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["type"] == "snapshot"
        ws.send_text("ping")
        ws.send_bytes(b"\x00")
        central.run(central.controller.register, CPRegistration(cp_id="CP-1"))
        assert ws.receive_json()["type"] == "delta"


def test_websocket_unsubscribes_on_disconnect(central: Central) -> None:
    hub = central.controller.hub
    with central.client.websocket_connect("/ws") as ws:
        ws.receive_json()
        assert hub.subscribers == 1
        with central.client.websocket_connect("/ws") as other:
            other.receive_json()
            assert hub.subscribers == 2
    central.run(wait_for, lambda: hub.subscribers == 0)
    assert not [
        t for t in central.run_sync(asyncio.all_tasks) if t.get_name().startswith("dashboard-")
    ]


def test_websocket_closes_with_1011_when_the_snapshot_fails(central: Central) -> None:
    central.run(central.controller.repo.close)  # the snapshot cannot read the feed

    with central.client.websocket_connect("/ws") as ws:
        message = ws.receive()

    assert message["type"] == "websocket.close"
    assert message["code"] == 1011
    central.run(wait_for, lambda: central.controller.hub.subscribers == 0)


class StuckSocket:
    """A WebSocket whose client reads nothing: every send after the first blocks."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: int | None = None
        self.disconnect = asyncio.Event()

    async def accept(self) -> None:
        return None

    async def send_text(self, text: str) -> None:
        if self.sent:
            await asyncio.Event().wait()
        self.sent.append(json.loads(text))

    async def receive(self) -> dict[str, Any]:
        await self.disconnect.wait()
        return {"type": "websocket.disconnect", "code": 1001}

    async def close(self, code: int = 1000) -> None:
        self.closed = code


async def test_a_stuck_client_is_dropped_without_blocking_central(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dashboard, "SEND_TIMEOUT", 0.1)
    async with SqliteRepository(":memory:") as repo:
        controller = FlushingController(FakePublisher(), repo)
        socket = StuckSocket()
        serving = asyncio.create_task(dashboard.serve_socket(cast(Any, socket), controller))
        await wait_for(lambda: bool(socket.sent))
        for n in range(5):  # Central goes on; the stuck client never holds it up
            await controller.register(CPRegistration(cp_id=f"CP-{n}"))

        await asyncio.wait_for(serving, 2)

        assert socket.sent[0]["type"] == "snapshot"
        assert socket.closed == 1011
        assert controller.hub.subscribers == 0


async def test_a_disconnect_ends_a_blocked_send() -> None:
    async with SqliteRepository(":memory:") as repo:
        controller = FlushingController(FakePublisher(), repo)
        socket = StuckSocket()
        serving = asyncio.create_task(dashboard.serve_socket(cast(Any, socket), controller))
        await wait_for(lambda: bool(socket.sent))
        await controller.register(CPRegistration(cp_id="CP-1"))  # this send blocks

        socket.disconnect.set()
        await asyncio.wait_for(serving, 2)

        assert socket.closed is None  # the client is gone: nothing to close
        assert controller.hub.subscribers == 0


# --------------------------------------------------------------------------- pure parts


def test_a_subscription_keeps_the_latest_of_each_cp_and_every_event_in_order() -> None:
    subscription = Subscription()
    assert not subscription.pending
    fault = {"type": "fault", "cp_id": "A", "reason": "x", "ts": None}
    for event in (
        telemetry_event("A", 1.0), cp_event("A", n=1), telemetry_event("B", 2.0), fault,
        cp_event("A", n=2), telemetry_event("A", 3.0), {"type": "session", "cp_id": "B"},
        telemetry_event("B", 5.0),
    ):
        subscription.add(event)
    assert subscription.pending

    delta = subscription.take()

    assert delta.cps == [{"cp_id": "A", "n": 2}]
    assert sorted((t["cp_id"], t["kw"]) for t in delta.telemetry) == [("A", 3.0), ("B", 5.0)]
    assert delta.events == [fault, {"type": "session", "cp_id": "B"}]
    assert (delta.dropped, delta.behind) == (0, False)
    assert not subscription.pending
    assert subscription.take() == Delta()


def test_a_cp_event_supersedes_the_telemetry_before_it() -> None:
    subscription = Subscription()
    subscription.add(telemetry_event("A", 1.0))
    subscription.add(cp_event("A"))
    assert subscription.take().telemetry == []


def test_malformed_cp_events_are_kept_as_plain_events() -> None:
    subscription = Subscription()
    odd = [{"type": "cp", "cp": None}, {"type": "telemetry"}, {"type": "cp", "cp": {}}]
    for event in odd:
        subscription.add(event)
    delta = subscription.take()
    assert (delta.cps, delta.telemetry, delta.events) == ([], [], odd)


def test_a_subscription_keeps_the_newest_events_and_counts_the_rest() -> None:
    subscription = Subscription(max_events=3)
    for n in range(5):
        subscription.add({"type": "session", "n": n})
    delta = subscription.take()
    assert [e["n"] for e in delta.events] == [2, 3, 4]
    assert delta.dropped == 2


def test_a_subscription_that_falls_behind_drops_everything_for_a_snapshot() -> None:
    subscription = Subscription(max_pending=2)
    subscription.add({"type": "fault", "cp_id": "A"})
    for cp_id in ("A", "B", "C"):
        subscription.add(cp_event(cp_id))
    subscription.add(cp_event("D"))  # ignored: a snapshot follows anyway

    delta = subscription.take()

    assert delta == Delta(behind=True)
    subscription.add(cp_event("E"))
    assert subscription.take() == Delta(cps=[{"cp_id": "E"}])


def test_the_hub_gives_each_subscriber_its_own_changes() -> None:
    hub = EventHub()
    with hub.subscribe() as first:
        first.add(cp_event("early"))
        with hub.subscribe() as second:
            assert hub.subscribers == 2
            hub.publish(cp_event("A"))
            assert second.take().cps == [{"cp_id": "A"}]
        assert hub.subscribers == 1
        hub.publish(cp_event("B"))
        assert [cp["cp_id"] for cp in first.take().cps] == ["early", "A", "B"]
    assert hub.subscribers == 0
    hub.publish(cp_event("C"))  # nobody listens: nothing is kept


async def test_a_subscription_wakes_its_reader() -> None:
    subscription = Subscription()
    waiting = asyncio.create_task(subscription.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    subscription.add(cp_event("A"))
    await asyncio.wait_for(waiting, 1)


def test_the_summary_pacer_keeps_summaries_within_their_budget() -> None:
    clock = iter([0.0, 0.005, 1.0, 1.005])  # each summary takes 5 ms
    pacer = dashboard.SummaryPacer(lambda: {"cps": 1}, budget=0.01, timer=lambda: next(clock))
    change = Delta(cps=[{"cp_id": "A"}])

    assert pacer.take(change, now=0.0) == {"cps": 1}
    assert pacer.next_at == pytest.approx(0.5)  # 5 ms is 1 % of 0.5 s
    assert pacer.take(change, now=0.2) is None and pacer.owed
    assert pacer.take(Delta(), now=0.4) is None
    assert pacer.take(Delta(), now=0.6) == {"cps": 1}  # owed, and due
    assert not pacer.owed
    assert pacer.take(Delta(events=[{"type": "marker"}]), now=5.0) is None  # nothing changed


# --------------------------------------------------------------------------- real server


async def test_a_real_server_refuses_a_cross_origin_handshake_with_403() -> None:
    async with SqliteRepository(":memory:") as repo:
        controller = FlushingController(FakePublisher(), repo)
        server = HttpServer(create_api(controller), "127.0.0.1", 0, name="dashboard-origin")
        await server.start()
        try:
            url = f"ws://127.0.0.1:{server.port}/ws"
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(url, origin=Origin("http://evil.example"))
            assert refused.value.response.status_code == 403
            async with websockets.connect(
                url, origin=Origin(f"http://127.0.0.1:{server.port}")
            ) as ws:
                snapshot = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert snapshot["type"] == "snapshot"
        finally:
            await server.stop()
            await controller.close()


async def test_server_shutdown_closes_open_websockets() -> None:
    async with SqliteRepository(":memory:") as repo:
        controller = FlushingController(FakePublisher(), repo)
        await register(controller, "CP-1")
        server = HttpServer(create_api(controller), "127.0.0.1", 0, name="dashboard-test")
        await server.start()
        try:
            url = f"ws://127.0.0.1:{server.port}/ws"
            async with websockets.connect(url) as ws:
                snapshot = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert snapshot["summary"]["cps"] == 1
                await controller.register(CPRegistration(cp_id="CP-2"))
                delta = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert delta["cps"][0]["cp_id"] == "CP-2"

                async with asyncio.timeout(3):  # well before uvicorn's forced exit
                    await server.stop()
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
        finally:
            await server.stop()
            await controller.close()
        assert controller.hub.subscribers == 0
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("dashboard-ws")]
