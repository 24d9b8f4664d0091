"""Tests for evcharging.apps.ev_central.dashboard: the page, its assets, /api/feed and /ws.

The HTTP and WebSocket tests use Starlette's TestClient. Its app runs on the client's own
event loop (a portal thread), so everything that touches the controller, the hub or the
database is run through ``client.portal`` on that loop. One test serves the app with a
real uvicorn server to check that a server shutdown ends an open WebSocket cleanly.
"""

from __future__ import annotations

import asyncio
import json
import re
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
from evcharging.apps.ev_central.events import EventHub
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.apps.ev_central.schemas import cp_out
from evcharging.common.bus import Topic, topic_of
from evcharging.common.messages import (
    CPRegistration,
    CPState,
    CPStatus,
    CPTelemetry,
    DriverRequest,
    Message,
    SessionResult,
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
    yield from make_central(EventHub(queue_size=3))


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
    js = (STATIC / "dashboard.js").read_text()
    assert "dataset.cpId = cpId" in js  # -> data-cp-id="<id>" on each card
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
    assert 'fetch("/cp"' in js and "fetch(`/api/feed" in js
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
    assert [cp["cp_id"] for cp in snapshot["cps"]] == ["CP-1"]
    cp = snapshot["cps"][0]
    assert cp == cp_out(controller.cps["CP-1"]).model_dump(mode="json")
    assert cp["is_faulty"] is True and cp["fault_reason"] == XSS  # text, escaped by the page
    assert snapshot["feed"] == [
        {"type": "fault", "cp_id": "CP-1", "reason": XSS, "ts": snapshot["feed"][0]["ts"]}
    ]
    assert snapshot["ts"].endswith("Z")


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


def test_websocket_forwards_hub_events(central: Central) -> None:
    controller = central.controller

    with central.client.websocket_connect("/ws") as ws:
        snapshot = ws.receive_json()
        assert (snapshot["type"], snapshot["cps"], snapshot["feed"]) == ("snapshot", [], [])
        central.run(controller.register, CPRegistration(cp_id="CP-9"))
        event = ws.receive_json()
        assert event["type"] == "cp"
        assert event["cp"]["cp_id"] == "CP-9"
        assert event["cp"]["state"] == "DISCONNECTED"

        central.run(controller.handle_status, CPStatus(cp_id="CP-9", state=CPState.ACTIVATED))
        assert ws.receive_json()["cp"]["state"] == "ACTIVATED"

        central.run(controller.report_fault, "CP-9", True, "no heartbeat")
        events = [ws.receive_json(), ws.receive_json()]
        fault = next(e for e in events if e["type"] == "fault")
        assert (fault["cp_id"], fault["reason"]) == ("CP-9", "no heartbeat")
        assert any(e["type"] == "cp" and e["cp"]["is_faulty"] for e in events)


def test_websocket_forwards_session_results(central: Central) -> None:
    controller = central.controller
    central.run(register, controller, "CP-1")

    with central.client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["type"] == "snapshot"
        session_id = central.run(complete_session, controller, "CP-1", "driver-b")
        events: list[dict[str, Any]] = []
        while not any(e["type"] == "session" for e in events):
            events.append(ws.receive_json())

    session = next(e for e in events if e["type"] == "session")
    assert session["result"] == "COMPLETED"
    assert session["session_id"] == session_id
    assert (session["cp_id"], session["driver_id"]) == ("CP-1", "driver-b")


def test_websocket_coalesces_a_telemetry_burst(central: Central) -> None:
    controller = central.controller
    central.run(register, controller, "CP-1")
    central.run(register, controller, "CP-2")

    def burst() -> None:  # one step of the loop: the sender sees all of it at once
        for kw in (1.0, 2.0, 3.0):
            controller.hub.publish(telemetry_event("CP-1", kw))
        controller.hub.publish(telemetry_event("CP-2", 7.0))
        controller.hub.publish({"type": "fault", "cp_id": "CP-1", "reason": "x", "ts": None})
        controller.hub.publish(telemetry_event("CP-1", 4.0))

    with central.client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["type"] == "snapshot"
        central.run_sync(burst)
        central.run_sync(lambda: controller.hub.publish({"type": "marker"}))
        received: list[dict[str, Any]] = []
        while not received or received[-1]["type"] != "marker":
            received.append(ws.receive_json())

    summary = [
        (e["type"], e["telemetry"]["cp_id"], e["telemetry"]["kw"])
        if e["type"] == "telemetry"
        else (e["type"],)
        for e in received
    ]
    assert summary == [
        ("telemetry", "CP-2", 7.0),
        ("fault",),
        ("telemetry", "CP-1", 4.0),
        ("marker",),
    ]


def test_websocket_resyncs_a_client_that_fell_behind(small_hub_central: Central) -> None:
    central = small_hub_central
    controller = central.controller
    central.run(register, controller, "CP-1")

    def flood() -> None:  # more than the hub's queue holds, in one step of the loop
        for n in range(10):
            controller.hub.publish(telemetry_event("CP-1", float(n)))

    with central.client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["type"] == "snapshot"
        central.run_sync(flood)
        fresh = ws.receive_json()
        assert fresh["type"] == "snapshot"
        assert [cp["cp_id"] for cp in fresh["cps"]] == ["CP-1"]
        central.run(controller.register, CPRegistration(cp_id="CP-2"))
        assert ws.receive_json()["cp"]["cp_id"] == "CP-2"


def test_websocket_ignores_what_the_client_sends(central: Central) -> None:
    with central.client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["type"] == "snapshot"
        ws.send_text("ping")
        ws.send_bytes(b"\x00")
        central.run(central.controller.register, CPRegistration(cp_id="CP-1"))
        assert ws.receive_json()["type"] == "cp"


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


def test_coalesce_keeps_the_latest_telemetry_per_cp_in_order() -> None:
    events = [
        telemetry_event("A", 1.0),
        {"type": "cp", "cp": {"cp_id": "A"}},
        telemetry_event("B", 2.0),
        telemetry_event("A", 3.0),
    ]
    assert dashboard.coalesce(events) == [events[1], events[2], events[3]]
    assert dashboard.coalesce([]) == []


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
                assert [cp["cp_id"] for cp in snapshot["cps"]] == ["CP-1"]
                await controller.register(CPRegistration(cp_id="CP-2"))
                event = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert event["cp"]["cp_id"] == "CP-2"

                async with asyncio.timeout(3):  # well before uvicorn's forced exit
                    await server.stop()
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
        finally:
            await server.stop()
            await controller.close()
        assert controller.hub.subscribers == 0
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("dashboard-ws")]
