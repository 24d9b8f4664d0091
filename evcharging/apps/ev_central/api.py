"""Central's HTTP API (SPEC §5), a FastAPI app over the controller.

Errors are JSON ``{"error": "...", "code": "..."}`` with a 4xx status, never a 500:
CentralError subclasses carry their status, request validation gives 422, and an
unexpected exception is logged and answered 500 only as a last resort.
When an API token is set, every mutating call needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loguru import logger
from pydantic import BaseModel, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.dashboard import mount_dashboard
from evcharging.apps.ev_central.errors import CentralError, Unauthorized
from evcharging.common.messages import ID_PATTERN, CPFaultReport, CPRegistration

CpId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Limit = Annotated[int, Query(ge=1, le=1000, description="most rows to return")]
HealthProbe = Callable[[], Awaitable[dict[str, Any]]]


class OperatorAction(BaseModel):
    reason: Annotated[str, StringConstraints(max_length=500)] | None = Field(
        None, description="why (logged and sent to the CP)"
    )


def create_api(
    controller: Controller,
    *,
    api_token: str | None = None,
    health: HealthProbe | None = None,
) -> FastAPI:
    app = FastAPI(
        title="EV Central",
        description="Controller of the EV charging network: CPs, sessions, faults.",
        version="0.1.0",
    )
    app.state.controller = controller
    app.state.error_count = 0

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if api_token is None:
            return
        expected = f"Bearer {api_token}"
        if authorization is None or not hmac.compare_digest(authorization, expected):
            raise Unauthorized("missing or wrong API token (Authorization: Bearer <token>)")

    mutating = [Depends(require_token)]

    @app.exception_handler(CentralError)
    async def central_error(request: Request, exc: CentralError) -> JSONResponse:
        app.state.error_count += 1
        logger.info("{} {} -> {} {}", request.method, request.url.path, exc.http_status,
                    exc.message)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse(
            {"error": exc.message, "code": exc.code}, status_code=exc.http_status,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        app.state.error_count += 1
        details = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))}
            for err in exc.errors()
        ]
        logger.info("{} {} -> 422 {}", request.method, request.url.path, details)
        return JSONResponse(
            {"error": "invalid request", "code": "invalid_request", "details": details},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail), "code": "http_error"}, status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.opt(exception=exc).error("{} {} failed", request.method, request.url.path)
        return JSONResponse({"error": "internal error", "code": "internal"}, status_code=500)

    @app.get("/health", summary="Liveness and the state of Kafka and the database")
    async def get_health() -> JSONResponse:
        body: dict[str, Any] = {"status": "ok", "cps": len(controller.cps)}
        if health is not None:
            body.update(await health())
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/cp", summary="Every CP")
    async def list_cps() -> list[dict[str, Any]]:
        return [cp.as_dict() for cp in controller.all_cps()]

    @app.post("/cp/register", dependencies=mutating, summary="Register or update a CP")
    async def register(body: CPRegistration) -> dict[str, Any]:
        cp = await controller.register(body)
        return {"ok": True, "cp": cp.as_dict()}

    @app.post("/cp/fault", dependencies=mutating, summary="Report a fault or a recovery")
    async def fault(body: CPFaultReport) -> dict[str, Any]:
        cp = await controller.report_fault(body.cp_id, body.is_faulty, body.reason)
        return {"ok": True, "cp": cp.as_dict()}

    @app.get("/cp/{cp_id}", summary="One CP")
    async def get_cp(cp_id: CpId) -> dict[str, Any]:
        return controller.get(cp_id).as_dict()

    @app.post("/cp/{cp_id}/stop", dependencies=mutating, summary="Operator: stop a CP")
    async def stop_cp(cp_id: CpId, body: OperatorAction | None = None) -> dict[str, Any]:
        reason = (body.reason if body else None) or "stopped by operator"
        cp = await controller.stop_cp(cp_id, reason)
        return {"ok": True, "sent": "STOP_CP", "cp": cp.as_dict()}

    @app.post("/cp/{cp_id}/resume", dependencies=mutating, summary="Operator: resume a CP")
    async def resume_cp(cp_id: CpId, body: OperatorAction | None = None) -> dict[str, Any]:
        reason = (body.reason if body else None) or "resumed by operator"
        cp = await controller.resume_cp(cp_id, reason)
        return {"ok": True, "sent": "RESUME_CP", "cp": cp.as_dict()}

    @app.get("/cp/{cp_id}/history", summary="Health snapshots of one CP, newest first")
    async def history(cp_id: CpId, limit: Limit = 50) -> list[dict[str, Any]]:
        controller.get(cp_id)
        rows = await controller.repo.cp_history(cp_id, limit=limit)
        return [row.as_dict() for row in rows]

    @app.get("/telemetry", summary="Latest telemetry of every CP")
    async def telemetry() -> dict[str, Any]:
        return {
            cp.cp_id: cp.as_dict()["last_telemetry"]
            for cp in controller.all_cps()
            if cp.last_telemetry is not None
        }

    @app.get("/sessions", summary="Charging sessions, newest first")
    async def sessions(
        limit: Limit = 50,
        cp_id: Annotated[CpId | None, Query()] = None,
        driver_id: Annotated[CpId | None, Query()] = None,
        status: Annotated[str | None, Query(pattern="^(ACTIVE|COMPLETED|STOPPED|FAILED)$")] = None,
    ) -> list[dict[str, Any]]:
        rows = await controller.repo.list_sessions(
            limit=limit, cp_id=cp_id, driver_id=driver_id, status=status
        )
        return [row.as_dict() for row in rows]

    @app.get("/faults", summary="Fault and recovery events, newest first")
    async def faults(
        limit: Limit = 50, cp_id: Annotated[CpId | None, Query()] = None
    ) -> list[dict[str, Any]]:
        rows = await controller.repo.list_faults(limit=limit, cp_id=cp_id)
        return [row.as_dict() for row in rows]

    @app.get("/stats", summary="Counters of Central's decisions and errors")
    async def stats() -> dict[str, Any]:
        return {"controller": dict(controller.stats), "http_errors": app.state.error_count}

    mount_dashboard(app, controller)
    return app
