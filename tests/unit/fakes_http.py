"""HTTP test doubles for the CP Monitor: a CP Engine and a Central behind httpx.MockTransport.

Both fakes record what they receive and notify one :class:`asyncio.Condition` after every
request, so a test waits for a state with :meth:`FakeNetwork.wait_for` (with a timeout)
instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

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


@dataclass
class FakeCentral:
    """Central's /cp/register and /cp/fault.

    ``up`` False refuses connections; ``fail_next`` answers that many calls with 503;
    ``token`` set requires ``Authorization: Bearer <token>``; a fault report for a CP that
    is not in ``known`` gets 404 (``forget()`` drops every CP, like a Central that lost
    its registry).
    """

    up: bool = True
    fail_next: int = 0
    token: str | None = None
    known: set[str] = field(default_factory=set)
    calls: list[httpx.Request] = field(default_factory=list)
    registrations: list[dict[str, Any]] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    """Reports Central accepted (2xx), in order."""
    refused: int = 0
    """Calls that got no 2xx answer."""

    def forget(self) -> None:
        self.known.clear()

    @property
    def fault_reports(self) -> list[dict[str, Any]]:
        return [r for r in self.reports if r["is_faulty"]]

    @property
    def recovery_reports(self) -> list[dict[str, Any]]:
        return [r for r in self.reports if not r["is_faulty"]]

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        if not self.up:
            self.refused += 1
            raise _refused(request)
        if self.fail_next > 0:
            self.fail_next -= 1
            self.refused += 1
            return httpx.Response(503, json={"error": "starting"})
        if self.token is not None and (
            request.headers.get("Authorization") != f"Bearer {self.token}"
        ):
            self.refused += 1
            return httpx.Response(401, json={"error": "invalid token"})
        body = json.loads(request.content)
        if request.method == "POST" and request.url.path == "/cp/register":
            self.known.add(body["cp_id"])
            self.registrations.append(body)
            return httpx.Response(200, json={"ok": True})
        if request.method == "POST" and request.url.path == "/cp/fault":
            if body["cp_id"] not in self.known:
                self.refused += 1
                return httpx.Response(404, json={"error": "unknown CP"})
            self.reports.append(body)
            return httpx.Response(200, json={"ok": True})
        self.refused += 1
        return httpx.Response(404, json={"error": "no such route"})


class FakeNetwork:
    """Routes requests to the fakes by host and notifies waiters after each one."""

    def __init__(self, engine: FakeEngine | None = None, central: FakeCentral | None = None):
        self.engine = engine or FakeEngine()
        self.central = central or FakeCentral()
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
                return self.central.handle(request)
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
