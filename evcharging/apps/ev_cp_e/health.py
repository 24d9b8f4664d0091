"""The CP Engine's health endpoint (SPEC §5) and its fault-simulation hooks.

* ``GET /health``: 200 with the CP's snapshot while it works, 503 with the same body
  while it is in FAULT (the CP Monitor turns 503 or silence into a fault report).
* ``POST /fault`` (optional JSON body ``{"reason": "..."}``): simulate a hardware fault.
* ``POST /recover``: the fault is repaired.

Both POSTs answer 200 with the snapshot after the change (the 503 is for ``/health`` only:
the request itself succeeded).

The POSTs follow the service's :class:`~evcharging.common.http.AccessPolicy`, checked
before the body is read (SPEC §5 "Safe defaults"): with a token (``CP_ENGINE_API_TOKEN``
or ``EVCHARGING_API_TOKEN``) they need ``Authorization: Bearer <token>`` (401); without
one they are accepted from loopback clients only (403) unless ``allow_anonymous``. A page
of another origin is refused (403), and a body must be JSON or absent (415): an empty
cross-site form post cannot fault the CP. Bodies over 1 MiB get 413.

Every error is ``{"error": "...", "code": "..."}``: a transition the state machine refuses
is 409 ``not_allowed`` (with the CP's ``state``), a bad body 422 ``invalid_request``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.common.http import engine_app, error_response, is_loopback
from evcharging.common.kafka import BusStats
from evcharging.common.messages import REASON_MAX
from evcharging.common.states import CPState, InvalidTransition

__all__ = ["DEFAULT_FAULT_REASON", "FaultRequest", "create_health_app"]

DEFAULT_FAULT_REASON = "simulated hardware fault"


class FaultRequest(BaseModel):
    """Body of ``POST /fault``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    reason: Annotated[str, Field(min_length=1, max_length=REASON_MAX)] = DEFAULT_FAULT_REASON


def create_health_app(
    cp: ChargingPoint,
    stats: BusStats | None = None,
    *,
    api_token: SecretStr | str | None = None,
    allow_anonymous: bool = False,
    trusted_peer: Callable[[str | None], bool] = is_loopback,
) -> FastAPI:
    """A FastAPI app that reports on, and can break and repair, one charging point.

    `trusted_peer` decides which client hosts count as this machine (loopback).
    """
    app = engine_app(
        f"CP Engine {cp.cp_id}", "Health endpoint of one simulated charging point.",
        api_token=api_token, allow_anonymous=allow_anonymous, trusted_peer=trusted_peer,
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
        return error_response(409, "not_allowed", str(exc), state=cp.state.value)

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
