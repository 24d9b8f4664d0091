"""The CP Engine's health endpoint (SPEC §5) and its fault-simulation hooks.

* ``GET /health``: 200 with the CP's snapshot while it works, 503 with the same body
  while it is in FAULT (the CP Monitor turns 503 or silence into a fault report).
* ``POST /fault`` (optional body ``{"reason": "..."}``): simulate a hardware fault.
* ``POST /recover``: the fault is repaired.

Both POSTs answer 200 with the snapshot after the change (the 503 is for ``/health`` only:
the request itself succeeded).

A transition the state machine refuses answers 409 ``{"error": "..."}``; a bad body
answers 422 (FastAPI's validation error).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.common.kafka import BusStats
from evcharging.common.messages import REASON_MAX as MAX_REASON
from evcharging.common.states import CPState, InvalidTransition

__all__ = ["DEFAULT_FAULT_REASON", "FaultRequest", "create_health_app"]

DEFAULT_FAULT_REASON = "simulated hardware fault"


class FaultRequest(BaseModel):
    """Body of ``POST /fault``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    reason: Annotated[str, Field(min_length=1, max_length=MAX_REASON)] = DEFAULT_FAULT_REASON


def create_health_app(cp: ChargingPoint, stats: BusStats | None = None) -> FastAPI:
    """A FastAPI app that reports on, and can break and repair, one charging point."""
    app = FastAPI(
        title=f"CP Engine {cp.cp_id}",
        description="Health endpoint of one simulated charging point.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    def report(*, health_code: bool = True) -> JSONResponse:
        """The CP's snapshot; with `health_code`, 503 while in FAULT (else always 200)."""
        faulty = cp.state is CPState.FAULT
        body: dict[str, Any] = {
            "status": "fault" if faulty else "ok",
            **cp.snapshot(),
            "reason": cp.reason,
        }
        if stats is not None:
            body["bus"] = stats.as_dict()
        return JSONResponse(body, status_code=503 if faulty and health_code else 200)

    def refused(exc: InvalidTransition) -> JSONResponse:
        return JSONResponse({"error": str(exc), "state": cp.state.value}, status_code=409)

    @app.get("/health")
    async def health() -> JSONResponse:
        return report()

    @app.post("/fault")
    async def fault(
        body: Annotated[FaultRequest | None, Body()] = None,
    ) -> JSONResponse:
        try:
            await cp.fault((body or FaultRequest()).reason)
        except InvalidTransition as exc:
            return refused(exc)
        return report(health_code=False)

    @app.post("/recover")
    async def recover() -> JSONResponse:
        try:
            await cp.recover()
        except InvalidTransition as exc:
            return refused(exc)
        return report(health_code=False)

    return app
