"""Central's HTTP API (SPEC §5), a FastAPI app over the controller.

Over 400 lines: one route each, with its documented errors; the answers' models are
:mod:`~evcharging.apps.ev_central.schemas` and the HTTP safety :mod:`evcharging.common.http`.

Every answer has a Pydantic model (:mod:`evcharging.apps.ev_central.schemas`), so
``/openapi.json`` documents it, errors included. Lists are JSON arrays; ``limit`` and
``offset`` select a page. ``/cp`` answers every CP without ``limit``, filters by ``state``
and ``site``, and gives the total before paging in ``X-Total-Count``. The database lists
(``/sessions``, ``/faults``, ``/cp/{cp_id}/history``) page through their newest
:data:`MAX_LIMIT` rows.

Every error is JSON ``{"error": "...", "code": "...", ...}`` (:class:`ErrorOut`), answered at
one place (:func:`evcharging.common.http.install_error_handlers`, plus the CentralError
handler here): CentralError subclasses carry their status, request validation and a body
that is not UTF-8 JSON give 422, unknown routes 404, wrong methods 405 (with ``Allow``),
bodies over 1 MiB 413. An unexpected exception is logged and answered 500 only as a last
resort.

Protected mode (SPEC §5 "Safe defaults"): every mutating call passes the app's
:class:`~evcharging.common.http.AccessPolicy` before its body is read. With a token it needs
``Authorization: Bearer <token>`` (401 otherwise); without one it is accepted from loopback
clients only (403 otherwise) unless ``allow_anonymous``; a browser page of another origin
is refused (403) either way. A client address whose token failed 20 times within 10 s
gets 429 for the next 10 s (:class:`~evcharging.common.throttle.AuthThrottle`).

Limits (SPEC §5): ``/summary`` is kept up as CPs change (:mod:`~.tally`), never counted per
call; registering a new CP past ``CENTRAL_MAX_CPS`` gets 409 ``too_many_cps``, and so does a
``/fleet/register`` whose new CPs would pass it (all or nothing: none of it is taken).

``/health`` answers within :data:`HEALTH_BUDGET` seconds whatever the probe does: 200 while
Kafka and the database are usable, else 503 with what is known.

More than one Central (SPEC §9): every instance answers for every CP
(:mod:`~evcharging.apps.ev_central.network`). A change to a CP (``/cp/register``,
``/cp/fault``, ``/cp/{id}/monitor``, ``/stop``, ``/resume``) and a read of one CP go to its
owner when that is another instance, and the caller gets the owner's answer as it is;
``/fleet`` calls are split by owner. ``/cp``, ``/summary``, ``/telemetry`` and ``/sites``
add up every instance's own part (``?scope=local``: this instance's alone), naming in
``X-Evcharging-Partial`` the instances that did not answer within 1 s.

``/docs`` is Swagger UI served from Central itself (the ``swagger-ui-bundle-v2`` package):
no CDN, so it works with no internet.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import httpx
from fastapi import FastAPI, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from loguru import logger
from pydantic import BaseModel, Field, SecretStr, StringConstraints, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from evcharging.apps.ev_central.commands import COMMANDS, Command
from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.dashboard import mount_dashboard
from evcharging.apps.ev_central.energy import Energy
from evcharging.apps.ev_central.errors import CentralError, Unauthorized
from evcharging.apps.ev_central.merging import cp_list, merge_cps, merge_sites, merge_summaries
from evcharging.apps.ev_central.network import FORWARDED, Network, Relayed, run_command
from evcharging.apps.ev_central.peer_feeds import PeerFeeds
from evcharging.apps.ev_central.repository import MAX_LIMIT
from evcharging.apps.ev_central.schemas import (
    CommandOut,
    CPChangeOut,
    CPOut,
    ErrorOut,
    FaultOut,
    FleetOut,
    HealthOut,
    HistoryOut,
    MonitorOut,
    SessionOut,
    SiteOut,
    StatsOut,
    SummaryOut,
    TelemetryOut,
    cp_out,
    cp_site,
    fault_out,
    history_out,
    session_out,
    telemetry_out,
)
from evcharging.common.http import (
    AccessPolicy,
    BodyLimit,
    GuardedRoute,
    error_response,
    install_error_handlers,
    is_loopback,
)
from evcharging.common.messages import (
    ID_PATTERN,
    REASON_MAX,
    CPFaultReport,
    CPRegistration,
    CPState,
    FleetMonitorEntry,
    FleetMonitorReport,
    FleetRegistration,
    MonitorReport,
    SessionStatus,
    utcnow,
)
from evcharging.common.throttle import AuthThrottle

__all__ = [
    "AUTH_FAILED_HTTP",
    "HEALTH_BUDGET",
    "THROTTLED_HTTP",
    "HealthProbe",
    "OperatorAction",
    "create_api",
]

CpId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
SiteName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
"""A site's name: as ``CPRegistration.site`` (at most 64 characters)."""
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="most rows to return")]
Offset = Annotated[int, Query(ge=0, description="rows to skip (newest first)")]
HealthProbe = Callable[[], Awaitable[dict[str, Any]]]
Scope = Annotated[Literal["network", "local"], Query(
    description="network: every Central's CPs (SPEC §9); local: this instance's own")]
T = TypeVar("T")

HEALTH_BUDGET = 1.5
"""Seconds the health probe gets: ``/health`` answers within 2 s whatever it does."""

AUTH_FAILED_HTTP = "auth_failures:http"
THROTTLED_HTTP = "auth_throttled:http"
"""The controller's stats of HTTP calls answered 401 and 429 (the metrics read them)."""

SWAGGER_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")
DOCS_ASSETS = "/docs/assets"

_ERRORS = {
    401: "a token is configured and the call does not carry it (Authorization: Bearer <token>)",
    403: "protected mode: no token is configured and the client is not on this machine; "
    "or a browser page of another origin sent the call",
    404: "unknown CP",
    409: "the CP's state machine refuses the command in the CP's current state; or, when "
    "registering, Central holds CENTRAL_MAX_CPS registered CPs (code too_many_cps)",
    413: "the request body is larger than 1 MiB",
    422: "invalid path, query or body",
    429: "this client address failed authentication 20 times within 10 s: refused for "
    "10 s from the 20th failure (Retry-After)",
    503: "more than one Central (SPEC §9): no instance took the CP within 10 s (its "
    "partitions are moving between Centrals; code not_owner): try again",
}
"""When each error status is answered, for the OpenAPI document."""


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorOut, "description": _ERRORS[status]} for status in statuses}


class SiteLimitIn(BaseModel):
    """The body of ``PUT /sites/{site}/limit``: the site's power limit in kW."""

    kw: Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False,
                               description="the most the site's CPs may draw together (kW)")]


class OperatorAction(BaseModel):
    """The optional body of an operator command; no body, ``{}`` or ``null`` all mean none."""

    reason: Annotated[str, StringConstraints(max_length=REASON_MAX)] | None = Field(
        None, description="why (logged and sent to the CP)"
    )


def create_api(
    controller: Controller,
    *,
    api_token: SecretStr | str | None = None,
    allow_anonymous: bool = False,
    health: HealthProbe | None = None,
    health_budget: float = HEALTH_BUDGET,
    trusted_peer: Callable[[str | None], bool] = is_loopback,
    auth_throttle: AuthThrottle | None = None,
    energy: Energy | None = None,
    network: Network | None = None,
    feeds: PeerFeeds | None = None,
) -> FastAPI:
    """Central's app. `trusted_peer` decides which client hosts count as this machine;
    `auth_throttle` limits failed tokens per client address (one is made when None);
    `energy` holds the site limits (one with the defaults is made when None); `network`
    reaches the other Centrals (none when None: every CP is this instance's) and `feeds`
    follows their dashboards."""
    energy = energy or Energy(controller)
    network = network or Network(None, stats=controller.stats)
    app = FastAPI(
        title="EV Central",
        description="Controller of the EV charging network: CPs, sessions, faults.",
        version="0.1.0",
        docs_url=None,  # served below from local files, not a CDN
        redoc_url=None,
    )
    app.router.route_class = GuardedRoute  # every route checks app.state.access first
    access = AccessPolicy.of(
        api_token, allow_anonymous=allow_anonymous, trusted_peer=trusted_peer,
        env_name="CENTRAL_API_TOKEN", throttle=auth_throttle or AuthThrottle(),
    )
    app.state.controller = controller
    app.state.access = access
    app.state.error_count = 0
    app.add_middleware(BodyLimit)

    def count_error(request: Request, status: int, code: str, message: str) -> None:
        app.state.error_count += 1
        if status in (401, 429):  # /metrics: auth_failures_total, auth_throttled_total
            controller.stats[AUTH_FAILED_HTTP if status == 401 else THROTTLED_HTTP] += 1
        logger.info("{} {} -> {} {} {}", request.method, request.url.path, status, code, message)

    install_error_handlers(app, count_error)

    @app.exception_handler(CentralError)
    async def central_error(request: Request, exc: CentralError) -> JSONResponse:
        count_error(request, exc.http_status, exc.code, exc.message)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return error_response(exc.http_status, exc.code, exc.message, headers=headers)

    _mount_docs(app)

    @app.get(
        "/health",
        summary="Liveness and the state of Kafka and the database",
        response_model=HealthOut,
        response_model_exclude_none=True,
        responses={503: {"model": HealthOut, "description": "Kafka or the database is not "
                         "usable, or the probe gave no answer in time"}},
    )
    async def get_health() -> JSONResponse:
        body = await _probe(controller, health, health_budget)
        return JSONResponse(
            body.model_dump(mode="json", exclude_none=True),
            status_code=200 if body.status == "ok" else 503,
        )

    @app.get(
        "/cp",
        summary="Every CP (a page of them with limit/offset); the total in X-Total-Count",
        response_model=list[CPOut],
        responses=_errors(422),
    )
    async def list_cps(
        response: Response,
        limit: Annotated[
            int | None, Query(ge=1, le=MAX_LIMIT, description="most CPs to return (all without)")
        ] = None,
        offset: Offset = 0,
        state: Annotated[CPState | None, Query(description="only CPs in this state")] = None,
        site: Annotated[
            str | None,
            Query(min_length=1, max_length=REASON_MAX, description="only CPs of this site"),
        ] = None,
        scope: Scope = "network",
    ) -> list[CPOut] | JSONResponse:
        matching = [
            cp for cp in controller.all_cps()
            if (state is None or cp.state is state) and (site is None or cp_site(cp) == site)
        ]
        end = None if limit is None else offset + limit
        # Each peer's first `end` CPs are enough for the page; its total is in its header.
        query: dict[str, Any] = {"state": state.value if state else None, "site": site}
        if end is not None and end <= MAX_LIMIT:
            query["limit"] = end
        gathered = (await network.gather("/cp", _present(query)) if scope == "network"
                    else None)
        if gathered is None or not gathered.asked:
            response.headers["X-Total-Count"] = str(len(matching))
            return [cp_out(cp) for cp in matching[offset:end]]
        own = [cp_out(cp).model_dump(mode="json") for cp in matching[:end]]
        merged = merge_cps([own, *gathered.parse(cp_list)])
        total = len(matching) + sum(
            _total(answer) for instance, answer in gathered.parts.items()
            if instance not in gathered.missing)
        return JSONResponse(merged[offset:end], headers={
            "X-Total-Count": str(total), **gathered.headers})

    @app.get(
        "/summary",
        summary="The network in a few numbers: CPs by state and by site, power, sessions",
        response_model=SummaryOut, responses=_errors(422),
    )
    async def summary(response: Response, scope: Scope = "network") -> SummaryOut:
        now = utcnow()
        own = controller.tally.summary(now)
        if scope == "local":
            return own
        gathered = await network.gather("/summary")
        if not gathered.asked:
            return own
        parts = [own, *gathered.parse(SummaryOut.model_validate)]
        response.headers.update(gathered.headers)
        return merge_summaries(parts, now)

    # Documents the bearer scheme in /docs; the check itself is GuardedRoute's.
    bearer = [Security(HTTPBearer(auto_error=False))] if access.token else []
    access_errors = _errors(401, 403, 413, 422, 429)
    mutation_errors = access_errors | _errors(503)  # changes to a CP (SPEC §9)

    @app.post(
        "/cp/register", summary="Register or update a CP", response_model=CPChangeOut,
        responses=mutation_errors | _errors(409), dependencies=bearer,
    )
    async def register(request: Request, body: CPRegistration) -> CPChangeOut | JSONResponse:
        async def local() -> CPChangeOut:
            return CPChangeOut(cp=cp_out(await controller.register(body)))

        return _answer(await network.change(
            body.cp_id, local, "POST", "/cp/register", _json(body), forwarded=_forwarded(request)))

    @app.post(
        "/cp/fault", summary="Report a fault or a recovery", response_model=CPChangeOut,
        responses=mutation_errors | _errors(404), dependencies=bearer,
    )
    async def fault(request: Request, body: CPFaultReport) -> CPChangeOut | JSONResponse:
        async def local() -> CPChangeOut:
            cp = await controller.report_fault(body.cp_id, body.is_faulty, body.reason)
            return CPChangeOut(cp=cp_out(cp))

        return _answer(await network.change(
            body.cp_id, local, "POST", "/cp/fault", _json(body), forwarded=_forwarded(request)))

    @app.post(
        "/fleet/register", summary="A fleet registers many CPs", response_model=FleetOut,
        responses=mutation_errors | _errors(409), dependencies=bearer,
    )
    async def fleet_register(
        request: Request, body: FleetRegistration
    ) -> FleetOut | JSONResponse:
        """Registers or updates every CP of the body in one transaction (a CP Fleet sends
        its CPs at start instead of one ``POST /cp/register`` each). With several Centrals
        each owner takes its CPs in its own transaction."""
        async def local(share: list[CPRegistration]) -> FleetOut:
            return FleetOut(count=len(share), new=await controller.register_many(share))

        return _answer(await network.fleet(
            body.cps, lambda reg: reg.cp_id, local, "/fleet/register",
            lambda share: {"cps": [_json(reg) for reg in share]},
            forwarded=_forwarded(request)))

    @app.post(
        "/fleet/monitor", summary="A fleet's monitoring reports many CPs", response_model=FleetOut,
        responses=mutation_errors, dependencies=bearer,
    )
    async def fleet_monitor(
        request: Request, body: FleetMonitorReport
    ) -> FleetOut | JSONResponse:
        """The liveness reports of many CPs at once (``unknown``: CPs to register again)."""
        async def local(share: list[FleetMonitorEntry]) -> FleetOut:
            unknown = await controller.monitor_reports(
                body.interval, [(entry.cp_id, entry.healthy) for entry in share])
            return FleetOut(count=len(share), unknown=unknown)

        return _answer(await network.fleet(
            body.cps, lambda entry: entry.cp_id, local, "/fleet/monitor",
            lambda share: {"interval": body.interval, "cps": [_json(e) for e in share]},
            forwarded=_forwarded(request)))

    @app.post(
        "/cp/{cp_id}/monitor", summary="A monitor says it watches the CP",
        response_model=MonitorOut, responses=mutation_errors | _errors(404),
        dependencies=bearer,
    )
    async def monitor(
        request: Request, cp_id: CpId, body: MonitorReport
    ) -> MonitorOut | JSONResponse:
        """Sent by a CP's monitor every health interval; a CP whose monitor is silent for
        3 intervals shows ``monitored: false`` and gets a "monitor lost" fault event."""
        async def local() -> MonitorOut:
            cp = await controller.monitor_report(cp_id, body.interval, body.healthy)
            return MonitorOut(cp_id=cp.cp_id, monitored=cp.monitored)

        return _answer(await network.change(
            cp_id, local, "POST", f"/cp/{cp_id}/monitor", _json(body),
            forwarded=_forwarded(request)))

    def operator_route(command: Command) -> None:
        """``POST /cp/{cp_id}/<action>``: the operator's command (:mod:`~.commands`)."""

        async def operate(
            request: Request, cp_id: CpId, body: OperatorAction | None = None
        ) -> CommandOut | JSONResponse:
            return _answer(await run_command(
                network, controller, command, cp_id, body.reason if body else None,
                forwarded=_forwarded(request)))

        app.post(
            f"/cp/{{cp_id}}/{command.action}", summary=f"Operator: {command.help}",
            response_model=CommandOut, responses=mutation_errors | _errors(404, 409),
            dependencies=bearer, name=f"{command.action}_cp",
        )(operate)

    for command in COMMANDS.values():
        operator_route(command)

    @app.get("/sites", summary="Every site: its limit, allocation and measured power",
             response_model=list[SiteOut], responses=_errors(422))
    async def sites(response: Response, scope: Scope = "network") -> list[SiteOut]:
        """The sites of the registered CPs and every site with a limit (SPEC §10)."""
        own = energy.sites()
        gathered = await network.gather("/sites") if scope == "network" else None
        if gathered is None or not gathered.asked:
            return own
        parts = [own, *gathered.parse(_site_list)]
        response.headers.update(gathered.headers)
        return merge_sites(parts)

    @app.put(
        "/sites/{site}/limit", summary="Set a site's power limit", response_model=SiteOut,
        responses=access_errors, dependencies=bearer,
    )
    async def put_site_limit(site: SiteName, body: SiteLimitIn) -> SiteOut:
        """Smart charging shares it among the site's sessions at once (SET_LIMIT to each
        CP whose limit changes); it never denies a request."""
        return await energy.set_limit(site, body.kw)

    @app.delete(
        "/sites/{site}/limit", summary="Remove a site's power limit", response_model=SiteOut,
        responses=access_errors, dependencies=bearer,
    )
    async def delete_site_limit(site: SiteName) -> SiteOut:
        """The site's supplying CPs get SET_LIMIT with ``kw`` null (no limit)."""
        return await energy.remove_limit(site)

    @app.get("/cp/{cp_id}", summary="One CP", response_model=CPOut,
             responses=_errors(404, 422, 503))
    async def get_cp(request: Request, cp_id: CpId) -> CPOut | JSONResponse:
        async def local() -> CPOut:
            return cp_out(controller.get(cp_id))

        return _answer(await network.change(cp_id, local, "GET", f"/cp/{cp_id}",
                                            forwarded=_forwarded(request)))

    @app.get(
        "/cp/{cp_id}/history", summary="Health snapshots of one CP, newest first",
        response_model=list[HistoryOut], responses=_errors(404, 422, 503),
    )
    async def history(
        request: Request, cp_id: CpId, limit: Limit = 50, offset: Offset = 0
    ) -> list[HistoryOut] | JSONResponse:
        window = _window(limit, offset)

        async def local() -> list[HistoryOut]:
            controller.get(cp_id)
            rows = await controller.repo.cp_history(cp_id, limit=window)
            return [history_out(row) for row in rows[offset:]]

        return _answer(await network.change(
            cp_id, local, "GET", f"/cp/{cp_id}/history", forwarded=_forwarded(request),
            params={"limit": limit, "offset": offset}))

    @app.get(
        "/telemetry", summary="Latest telemetry of every CP, by CP id",
        response_model=dict[str, TelemetryOut], responses=_errors(422),
    )
    async def telemetry(scope: Scope = "network") -> dict[str, TelemetryOut] | JSONResponse:
        own = {
            cp.cp_id: telemetry_out(cp.last_telemetry)
            for cp in controller.all_cps()
            if cp.last_telemetry is not None
        }
        gathered = await network.gather("/telemetry") if scope == "network" else None
        if gathered is None or not gathered.asked:
            return own
        merged: dict[str, Any] = {}
        for part in gathered.parse(_telemetry_map):
            merged.update(part)
        merged.update({cp_id: t.model_dump(mode="json") for cp_id, t in own.items()})
        return JSONResponse(dict(sorted(merged.items())), headers=gathered.headers)

    @app.get(
        "/sessions", summary="Charging sessions, newest first", response_model=list[SessionOut],
        responses=_errors(422),
    )
    async def sessions(
        limit: Limit = 50,
        offset: Offset = 0,
        cp_id: Annotated[CpId | None, Query()] = None,
        driver_id: Annotated[CpId | None, Query()] = None,
        status: Annotated[SessionStatus | None, Query()] = None,
    ) -> list[SessionOut]:
        rows = await controller.repo.list_sessions(
            limit=_window(limit, offset), cp_id=cp_id, driver_id=driver_id,
            status=status.value if status else None,
        )
        return [session_out(row) for row in rows[offset:]]

    @app.get(
        "/faults", summary="Fault and recovery events, newest first",
        response_model=list[FaultOut], responses=_errors(422),
    )
    async def faults(
        limit: Limit = 50, offset: Offset = 0, cp_id: Annotated[CpId | None, Query()] = None
    ) -> list[FaultOut]:
        rows = await controller.repo.list_faults(limit=_window(limit, offset), cp_id=cp_id)
        return [fault_out(row) for row in rows[offset:]]

    @app.get(
        "/stats", summary="Counters of Central's decisions and errors", response_model=StatsOut
    )
    async def stats() -> StatsOut:
        return StatsOut(controller=dict(controller.stats), http_errors=app.state.error_count)

    mount_dashboard(app, controller, feeds)
    return app


def _forwarded(request: Request) -> bool:
    """Whether another Central sent the request (it is never forwarded again)."""
    return FORWARDED in request.headers


def _answer(result: T | Relayed) -> T | JSONResponse:
    """Our answer, or the owner's as it gave it."""
    if isinstance(result, Relayed):
        return JSONResponse(result.body, status_code=result.status)
    return result


def _json(body: BaseModel) -> Any:
    """A request body as it came (the fields the caller set), to send on to the owner."""
    return body.model_dump(mode="json", exclude_unset=True)


def _present(query: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in query.items() if value is not None}


def _total(answer: httpx.Response) -> int:
    """A peer's ``X-Total-Count`` (0 when it gave none that reads)."""
    count = answer.headers.get("X-Total-Count", "")
    return int(count) if count.isdigit() else 0


def _site_list(body: Any) -> list[SiteOut]:
    if not isinstance(body, list):
        raise ValueError("not a list of sites")
    return [SiteOut.model_validate(site) for site in body]


def _telemetry_map(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError("not a map of telemetry")
    return body


def _window(limit: int, offset: int) -> int:
    """The rows to read for a page of the newest :data:`MAX_LIMIT` (422 past them)."""
    if offset + limit > MAX_LIMIT:
        raise RequestValidationError([{
            "type": "value_error",
            "loc": ("query", "offset"),
            "msg": f"offset + limit must be at most {MAX_LIMIT} (the newest rows are paged)",
            "input": offset,
        }])
    return offset + limit


async def _probe(controller: Controller, health: HealthProbe | None, budget: float) -> HealthOut:
    """The health answer: the probe's report, judged; ``degraded`` when it fails or is late."""
    known: dict[str, Any] = {"cps": len(controller.cps)}
    if health is None:
        return HealthOut(status="ok", **known)
    try:
        async with asyncio.timeout(budget):
            report = await health()
    except TimeoutError:
        logger.warning("the health probe gave no answer within {:g}s", budget)
        return HealthOut(
            status="degraded", error=f"health probe gave no answer within {budget:g}s",
            code="unavailable", **known,
        )
    except Exception as exc:  # noqa: BLE001 - a broken probe means "degraded", logged
        logger.opt(exception=exc).error("the health probe failed")
        return HealthOut(
            status="degraded", error="health probe failed", code="unavailable", **known
        )
    usable = report.get("status", "ok") == "ok" and all(
        _part_ok(report.get(part), key)
        for part, key in (("kafka", "connected"), ("database", "ok"))
    )
    try:
        return HealthOut.model_validate(
            {**known, **report, "status": "ok" if usable else "degraded"}
        )
    except ValidationError as exc:
        logger.error("the health probe gave an invalid report: {}", exc)
        return HealthOut(
            status="degraded", error="health probe gave an invalid report", code="unavailable",
            **known,
        )


def _part_ok(part: Any, key: str) -> bool:
    """A part the probe reported (``{"connected": ...}``, ``{"ok": ...}``) is not down."""
    return part is None or (isinstance(part, dict) and part.get(key, True) is True)


def _swagger_dir() -> Path:
    # The package has no type information; its one attribute is the assets' folder.
    bundle = importlib.import_module("swagger_ui_bundle")
    return Path(str(bundle.swagger_ui_path))


def _mount_docs(app: FastAPI) -> None:
    """``GET /docs``: Swagger UI from local files (no CDN, no validator badge)."""
    assets = _swagger_dir()
    media = {".js": "text/javascript", ".css": "text/css"}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(DOCS_ASSETS + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        if name not in SWAGGER_ASSETS:
            raise StarletteHTTPException(404, "Not Found")
        return FileResponse(assets / name, media_type=media[Path(name).suffix])

