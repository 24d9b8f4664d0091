"""Central's HTTP API (SPEC §5), a FastAPI app over the controller.

Every error is JSON ``{"error": "...", "code": "...", ...}``, answered at one place
(``_error`` in create_api): CentralError subclasses carry their status, request validation and a
body that is not UTF-8 JSON give 422, unknown routes 404 and wrong methods 405 (with
``Allow``). An unexpected exception is logged and answered 500 only as a last resort.

When an API token is set, every mutating call needs ``Authorization: Bearer <token>``.
The token is checked before the body is read (:class:`_AuthFirstRoute`), so an
unauthenticated call gets 401 whatever it sends.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from loguru import logger
from pydantic import BaseModel, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.dashboard import mount_dashboard
from evcharging.apps.ev_central.errors import CentralError, Unauthorized
from evcharging.common.messages import ID_PATTERN, CPFaultReport, CPRegistration

CpId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Limit = Annotated[int, Query(ge=1, le=1000, description="most rows to return")]
SessionStatus = Annotated[str, Query(pattern="^(ACTIVE|COMPLETED|STOPPED|FAILED)$")]
HealthProbe = Callable[[], Awaitable[dict[str, Any]]]
Handler = Callable[[Request], Coroutine[Any, Any, Response]]

HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
"""The ``code`` of the errors Starlette/FastAPI raise themselves, by status."""


class OperatorAction(BaseModel):
    """The optional body of an operator command; no body, ``{}`` or ``null`` all mean none."""

    reason: Annotated[str, StringConstraints(max_length=500)] | None = Field(
        None, description="why (logged and sent to the CP)"
    )


def token_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header is ``Bearer <token>`` (scheme case-insensitive).

    Compared as bytes: ``hmac.compare_digest`` refuses non-ASCII ``str``, and Starlette
    decodes header values as latin-1, which gives the bytes back unchanged.
    """
    if authorization is None:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    try:
        presented = credentials.strip().encode("latin-1")
    except UnicodeEncodeError:  # not a header value Starlette could have produced
        return False
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, token.encode())


class _AuthFirstRoute(APIRoute):
    """A route that checks ``app.state.api_token`` before FastAPI reads and validates the body.

    A FastAPI dependency would run only after the body is parsed, so an unauthenticated
    caller with a malformed body would get 422 (and learn the schema) instead of 401.
    """

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            token: str | None = request.app.state.api_token
            if token is not None and not token_matches(
                request.headers.get("authorization"), token
            ):
                raise Unauthorized("missing or wrong API token (Authorization: Bearer <token>)")
            return await handler(request)

        return guarded


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
    app.state.api_token = api_token
    app.state.error_count = 0

    def _error(
        request: Request,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> JSONResponse:
        app.state.error_count += 1
        logger.info("{} {} -> {} {} {}", request.method, request.url.path, status, code,
                    extra.get("details") or message)
        return JSONResponse(
            {"error": message, "code": code, **extra}, status_code=status, headers=headers
        )

    @app.exception_handler(CentralError)
    async def central_error(request: Request, exc: CentralError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return _error(request, exc.http_status, exc.code, exc.message, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))}
            for err in exc.errors()
        ]
        return _error(request, 422, "invalid_request", "invalid request", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's "There was an error parsing the body": not UTF-8, nested too deep,
            # a number too long to convert. It is as invalid as any other body: 422.
            details = [{"loc": ["body"], "msg": "body is not valid UTF-8 JSON"}]
            return _error(request, 422, "invalid_request", "invalid request", details=details)
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return _error(request, exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        app.state.error_count += 1
        logger.opt(exception=exc).error("{} {} failed", request.method, request.url.path)
        return JSONResponse({"error": "internal error", "code": "internal"}, status_code=500)

    @app.get("/health", summary="Liveness and the state of Kafka and the database")
    async def get_health() -> JSONResponse:
        body: dict[str, Any] = {"status": "ok", "cps": len(controller.cps)}
        if health is not None:
            try:
                body.update(await health())
            except Exception as exc:  # noqa: BLE001 - a broken probe means "degraded", logged
                logger.opt(exception=exc).error("the health probe failed")
                body.update(status="degraded", error="health probe failed", code="unavailable")
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/cp", summary="Every CP")
    async def list_cps() -> list[dict[str, Any]]:
        return [cp.as_dict() for cp in controller.all_cps()]

    mutating = APIRouter(
        route_class=_AuthFirstRoute,
        # Documents the scheme in /docs; the check itself is _AuthFirstRoute's.
        dependencies=[Security(HTTPBearer(auto_error=False))] if api_token is not None else [],
    )

    @mutating.post("/cp/register", summary="Register or update a CP")
    async def register(body: CPRegistration) -> dict[str, Any]:
        cp = await controller.register(body)
        return {"ok": True, "cp": cp.as_dict()}

    @mutating.post("/cp/fault", summary="Report a fault or a recovery")
    async def fault(body: CPFaultReport) -> dict[str, Any]:
        cp = await controller.report_fault(body.cp_id, body.is_faulty, body.reason)
        return {"ok": True, "cp": cp.as_dict()}

    @mutating.post("/cp/{cp_id}/stop", summary="Operator: stop a CP")
    async def stop_cp(cp_id: CpId, body: OperatorAction | None = None) -> dict[str, Any]:
        reason = (body.reason if body else None) or "stopped by operator"
        cp = await controller.stop_cp(cp_id, reason)
        return {"ok": True, "sent": "STOP_CP", "cp": cp.as_dict()}

    @mutating.post("/cp/{cp_id}/resume", summary="Operator: resume a CP")
    async def resume_cp(cp_id: CpId, body: OperatorAction | None = None) -> dict[str, Any]:
        reason = (body.reason if body else None) or "resumed by operator"
        cp = await controller.resume_cp(cp_id, reason)
        return {"ok": True, "sent": "RESUME_CP", "cp": cp.as_dict()}

    app.include_router(mutating)

    @app.get("/cp/{cp_id}", summary="One CP")
    async def get_cp(cp_id: CpId) -> dict[str, Any]:
        return controller.get(cp_id).as_dict()

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
        status: SessionStatus | None = None,
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
