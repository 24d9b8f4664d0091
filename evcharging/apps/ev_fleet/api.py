"""The fleet's one HTTP port: every CP's health and fault hooks, and the fleet's health.

* ``GET /health``: the fleet at a glance: how many CPs are in each state, the commands
  routed, the monitoring (views, reports, Central), the bus counters. 200, or 503 while
  Kafka does not answer (the CPs cannot reach Central then).
* ``GET /cp/{cp_id}/health``: what a CP Engine's ``/health`` answers, for one CP: 200
  with ``{"status", "cp_id", "state", "session_id", …, "reason"}`` while it works, 503 in
  FAULT, and 503 too when the fleet's in-process check fails for it (a crashed task, a
  stuck CP, a CP Central shut down: ``problem`` says which). 404 for an id the fleet does
  not run.
* ``POST /cp/{cp_id}/fault`` (optional JSON body ``{"reason": "..."}``) and
  ``POST /cp/{cp_id}/recover``: the engine's ``/fault`` and ``/recover`` for one CP; 200
  with the CP after the change, 409 ``not_allowed`` when its state machine refuses.

The POSTs follow protected mode as the engine's do (:class:`AccessPolicy`, checked before
the body is read): with a token (``CP_ENGINE_API_TOKEN`` or ``EVCHARGING_API_TOKEN``)
they need ``Authorization: Bearer <token>``; without one they come from loopback clients
only unless ``allow_anonymous``; a body is JSON or absent; over 1 MiB gets 413. Every error
is ``{"error", "code"}``.

Seam: :class:`FleetParts` is everything the app reads; ``GET /metrics`` renders the same
counters for Prometheus (:mod:`evcharging.apps.ev_fleet.metrics`, mounted by ``main``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.apps.ev_cp_e.health import FaultRequest
from evcharging.apps.ev_fleet.faults import FaultStats
from evcharging.apps.ev_fleet.fleet import Fleet
from evcharging.apps.ev_fleet.monitoring import FleetMonitor, check
from evcharging.common.http import HttpError, engine_app, error_response, is_loopback
from evcharging.common.kafka import BusStats
from evcharging.common.states import CPState, InvalidTransition

__all__ = ["FleetParts", "create_fleet_app"]


@dataclass
class FleetParts:
    """What the fleet's HTTP app shows and acts on."""

    fleet: Fleet
    stall_after: float = 30.0
    """Seconds without a heartbeat after which a CP counts as stuck."""
    monitor: FleetMonitor | None = None
    bus: BusStats | None = None
    kafka_connected: Callable[[], bool] | None = None
    faults: FaultStats | None = None

    def health(self) -> tuple[int, dict[str, Any]]:
        """The status code and body of the fleet's ``/health``."""
        kafka = self.kafka_connected() if self.kafka_connected is not None else None
        body: dict[str, Any] = {
            "status": "ok" if kafka is not False else "kafka_down",
            "cps": len(self.fleet),
            "states": self.fleet.counts(),
            "commands": self.fleet.stats.as_dict(),
            "publish_failing": self.fleet.publish_failing(),
        }
        if kafka is not None:
            body["kafka"] = kafka
        if self.monitor is not None:
            body["monitoring"] = self.monitor.status()
        if self.faults is not None:
            body["random_faults"] = self.faults.as_dict()
        if self.bus is not None:
            body["bus"] = self.bus.as_dict()
        return (200 if kafka is not False else 503), body


def create_fleet_app(
    parts: FleetParts,
    *,
    api_token: SecretStr | str | None = None,
    allow_anonymous: bool = False,
    trusted_peer: Callable[[str | None], bool] = is_loopback,
) -> FastAPI:
    """The fleet's FastAPI app. `trusted_peer` decides which client hosts count as this
    machine (loopback)."""
    fleet = parts.fleet
    app = engine_app(
        "CP Fleet", "Health and fault hooks of many simulated charging points.",
        api_token=api_token, allow_anonymous=allow_anonymous, trusted_peer=trusted_peer,
    )

    def cp_of(cp_id: str) -> ChargingPoint:
        cp = fleet.get(cp_id)
        if cp is None:
            raise HttpError(404, "unknown_cp", f"no CP {cp_id!r} in this fleet")
        return cp

    def report(cp: ChargingPoint, *, health_code: bool = True) -> JSONResponse:
        """The CP's snapshot; with `health_code`, 503 while its check fails."""
        failure = check(cp, parts.stall_after)
        faulty = cp.state is CPState.FAULT
        body: dict[str, Any] = {
            "status": "fault" if faulty else ("ok" if failure is None else "failing"),
            **cp.snapshot(),
            "reason": cp.reason,
        }
        if failure is not None and not faulty:
            body["problem"] = failure.reason
        failing = failure is not None and health_code
        return JSONResponse(body, status_code=503 if failing else 200)

    def refused(cp: ChargingPoint, exc: InvalidTransition) -> JSONResponse:
        return error_response(409, "not_allowed", str(exc), state=cp.state.value)

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = parts.health()
        return JSONResponse(body, status_code=status)

    @app.get("/cp/{cp_id}/health")
    async def cp_health(cp_id: str) -> JSONResponse:
        return report(cp_of(cp_id))

    @app.post("/cp/{cp_id}/fault")
    async def fault(
        cp_id: str, body: Annotated[FaultRequest | None, Body()] = None
    ) -> JSONResponse:
        cp = cp_of(cp_id)
        try:
            await cp.fault((body or FaultRequest()).reason)
        except InvalidTransition as exc:
            return refused(cp, exc)
        return report(cp, health_code=False)

    @app.post("/cp/{cp_id}/recover")
    async def recover(cp_id: str) -> JSONResponse:
        cp = cp_of(cp_id)
        try:
            await cp.recover()
        except InvalidTransition as exc:
            return refused(cp, exc)
        return report(cp, health_code=False)

    return app
