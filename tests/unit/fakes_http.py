"""The CP Monitor's network in unit tests: a fake CP Engine and the REAL Central API.

Both are reached through one ``httpx.MockTransport`` (no sockets), routed by host:

* :class:`FakeEngine`, a double of the engine's ``/health``: the tests need each way a
  health check can fail on demand (connection refused, a timeout, 500, 503 with FAULT),
  which a real engine does not give at will.
* :class:`CentralFront`, the real Central app (:func:`create_api` over a
  :class:`Controller` with an in-memory :class:`SqliteRepository`, see :class:`Central`)
  reached through ``httpx.ASGITransport``, with a front that plays the network between
  the monitor and Central: ``up = False`` refuses connections (Central stopped),
  ``fail_next`` answers that many calls 503 before they reach the app (Central starting
  behind a proxy), and ``liveness_route = False`` answers the liveness route 404 itself,
  as a Central older than that route does. The front records the traffic: every call,
  and the registrations and reports the app accepted. Liveness reports
  (``/cp/{cp_id}/monitor``) are recorded apart, in ``liveness``, so that the tests of
  registration and reports see the same traffic whether Central has that route or not.

:class:`FakeNetwork` notifies one :class:`asyncio.Condition` after every request, so a test
waits for a state with :meth:`FakeNetwork.wait_for` (with a timeout) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from evcharging.apps.ev_central.api import create_api
from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.repository import SqliteRepository
from tests.unit.conftest import FlushingController
from tests.unit.fakes import RecordingPublisher

ENGINE_HOST = "engine.test"
ENGINE_PORT = 8001
CENTRAL_HOST = "central.test"
CENTRAL_PORT = 8000

EngineMode = Literal["ok", "refused", "timeout", "fault", "error500"]


def _refused(request: httpx.Request) -> httpx.ConnectError:
    """What httpx raises for a closed port: a ConnectError caused by ConnectionRefusedError."""
    error = httpx.ConnectError("All connection attempts failed", request=request)
    error.__cause__ = ConnectionRefusedError(111, "Connect call failed")
    return error


@dataclass
class FakeEngine:
    """The CP Engine's /health: answers as `script` then `mode` say (the test changes them).

    Each check takes the next mode of ``script`` while it lasts, then ``mode``.
    """

    mode: EngineMode = "ok"
    script: list[EngineMode] = field(default_factory=list)
    fault_reason: str | None = "overheating"
    checks: int = 0
    auth_headers: list[str | None] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.checks += 1
        self.auth_headers.append(request.headers.get("Authorization"))
        assert request.url.path == "/health"
        mode = self.script.pop(0) if self.script else self.mode
        if mode == "refused":
            raise _refused(request)
        if mode == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if mode == "fault":
            body: dict[str, Any] = {"cp_id": "CP-001", "state": "FAULT", "session_id": None}
            if self.fault_reason is not None:
                body["reason"] = self.fault_reason
            return httpx.Response(503, json=body)
        if mode == "error500":
            return httpx.Response(500, text="boom")
        return httpx.Response(200, json={"cp_id": "CP-001", "state": "ACTIVATED"})


class Central:
    """The real Central behind its HTTP API: a Controller over an in-memory SQLite
    repository and a publisher that records what would go to Kafka."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.bus = RecordingPublisher()
        self.repo = SqliteRepository(":memory:")
        self.controller = FlushingController(
            self.bus, self.repo, CentralOptions(start_timeout=30.0)
        )
        self.app = create_api(self.controller, api_token=token)

    async def open(self) -> Central:
        await self.repo.open()
        await self.controller.load()
        return self

    async def close(self) -> None:
        await self.controller.close()
        await self.repo.close()


class CentralFront:
    """What the monitor reaches at Central's address: an ASGI app behind a network front.

    ``app`` is the real Central's unless a test gives its own (:meth:`serve`).
    """

    def __init__(self, central: Central) -> None:
        self.central = central
        self.up = True
        self.fail_next = 0
        self.liveness_route = True
        self.calls: list[httpx.Request] = []
        """Every call but liveness reports, in order."""
        self.registrations: list[dict[str, Any]] = []
        self.reports: list[dict[str, Any]] = []
        """Reports Central accepted (2xx), in order."""
        self.refused = 0
        """Calls (liveness reports aside) that got no 2xx answer."""
        self.liveness: list[tuple[httpx.Request, int | None]] = []
        """Liveness reports and the status they got (None: no answer)."""
        self._transport = httpx.ASGITransport(central.app)

    @property
    def controller(self) -> Controller:
        return self.central.controller

    def serve(self, app: Any) -> None:
        """Answer with `app` from now on (a test's own Central)."""
        self._transport = httpx.ASGITransport(app)

    async def restart_empty(self) -> None:
        """Central restarts with an empty registry (it lost its database)."""
        old, self.central = self.central, await Central(self.central.token).open()
        self._transport = httpx.ASGITransport(self.central.app)
        await old.close()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        is_liveness = request.url.path.endswith("/monitor")
        try:
            response = await self._answer(request, is_liveness)
        except httpx.HTTPError:
            self._record(request, is_liveness, None)
            raise
        self._record(request, is_liveness, response.status_code)
        return response

    async def _answer(self, request: httpx.Request, is_liveness: bool) -> httpx.Response:
        if not self.up:
            raise _refused(request)
        if self.fail_next > 0:
            self.fail_next -= 1
            return httpx.Response(503, json={"error": "starting", "code": "unavailable"})
        if is_liveness and not self.liveness_route:
            return httpx.Response(404, json={"error": "Not Found", "code": "not_found"})
        return await self._transport.handle_async_request(request)

    def _record(self, request: httpx.Request, is_liveness: bool, status: int | None) -> None:
        if is_liveness:
            self.liveness.append((request, status))
            return
        self.calls.append(request)
        if status is None or status >= 300:
            self.refused += 1
        elif request.url.path == "/cp/register":
            self.registrations.append(json.loads(request.content))
        elif request.url.path == "/cp/fault":
            self.reports.append(json.loads(request.content))


class FakeNetwork:
    """Routes requests to the engine and Central by host and notifies waiters after each."""

    def __init__(self, engine: FakeEngine, central: CentralFront) -> None:
        self.engine = engine
        self.central = central
        self.changed = asyncio.Condition()
        self.engine_delay = 0.0
        """Seconds the engine takes to answer (to exercise the monitor's own timeout)."""

    async def handle(self, request: httpx.Request) -> httpx.Response:
        try:
            if request.url.host == ENGINE_HOST and request.url.port == ENGINE_PORT:
                if self.engine_delay:
                    await asyncio.sleep(self.engine_delay)
                return self.engine.handle(request)
            if request.url.host == CENTRAL_HOST and request.url.port == CENTRAL_PORT:
                return await self.central.handle(request)
            raise httpx.ConnectError(f"no route to {request.url}", request=request)
        finally:
            async with self.changed:
                self.changed.notify_all()

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 3.0, what: str = "condition"
    ) -> None:
        """Wait until `predicate()` holds, re-checking after each request; fail on timeout."""
        try:
            async with asyncio.timeout(timeout):
                async with self.changed:
                    await self.changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None
