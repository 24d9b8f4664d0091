"""The network's summary: :func:`~evcharging.apps.ev_central.schemas.summarise` (pure, over
CP views) and ``GET /summary`` (SPEC §5) over a real Controller, driven as Kafka would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest

from evcharging.apps.ev_central.api import create_api
from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.apps.ev_central.schemas import SiteSummaryOut, SummaryOut, cp_power_kw, summarise
from evcharging.apps.ev_central.views import ActiveSession, CPView
from evcharging.common.circuit_breaker import CircuitBreaker
from evcharging.common.messages import (
    CPRegistration,
    CPState,
    CPStatus,
    CPTelemetry,
    DriverRequest,
)
from tests.unit.conftest import FlushingController
from tests.unit.fakes import RecordingPublisher

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def view(cp_id: str, state: CPState = CPState.ACTIVATED, site: str | None = None,
         **fields: object) -> CPView:
    cp = CPView(cp_id=cp_id, breaker=CircuitBreaker(), state=state, site=site,
                monitor_interval=1.0)
    for name, value in fields.items():
        setattr(cp, name, value)
    return cp


def session(cp_id: str, kw: float, *, confirmed: bool = True) -> ActiveSession:
    return ActiveSession(session_id=f"s-{cp_id}", request_id=f"r-{cp_id}", driver_id="d-1",
                         cp_id=cp_id, started_at=NOW, confirmed=confirmed, kw=kw)


def telemetry(cp_id: str, kw: float) -> CPTelemetry:
    return CPTelemetry(cp_id=cp_id, kw=kw, kwh=1.0, euros=0.5)


# --------------------------------------------------------------------------- pure


def test_an_empty_network() -> None:
    summary = summarise([], NOW)
    assert summary == SummaryOut(
        cps=0, by_state=dict.fromkeys(CPState, 0), by_site=[], supplying=0, power_kw=0.0,
        active_sessions=0, faulty=0, unmonitored=0, ts=NOW,
    )
    assert summary.model_dump(mode="json")["ts"] == "2026-01-02T03:04:05.000000Z"


def test_a_network_counted_by_state_and_site() -> None:
    views = [
        view("A1", CPState.SUPPLYING, "north", session=session("A1", 22.0)),
        view("A2", CPState.SUPPLYING, "north", last_telemetry=telemetry("A2", 7.5)),
        view("A3", CPState.ACTIVATED, "north", session=session("A3", 0.0, confirmed=False)),
        view("B1", CPState.FAULT, "south", is_faulty=True),
        view("B2", CPState.ACTIVATED, "south", is_faulty=True),  # reported, not yet FAULT
        view("B3", CPState.STOPPED, "south", monitor_lost=True),
        view("C1", CPState.DISCONNECTED, None, monitor_interval=None),  # never monitored
        view("C2", CPState.SUPPLYING, None),  # no telemetry yet: no power known
    ]

    summary = summarise(views, NOW)

    assert summary.cps == 8
    assert summary.by_state == {
        CPState.DISCONNECTED: 1, CPState.ACTIVATED: 2, CPState.SUPPLYING: 3,
        CPState.STOPPED: 1, CPState.FAULT: 1,
    }
    assert summary.by_site == [
        SiteSummaryOut(site="north", cps=3, supplying=2, faulty=0, power_kw=29.5),
        SiteSummaryOut(site="south", cps=3, supplying=0, faulty=2, power_kw=0.0),
        SiteSummaryOut(site=None, cps=2, supplying=1, faulty=0, power_kw=0.0),
    ]
    assert (summary.supplying, summary.power_kw) == (3, 29.5)
    assert summary.active_sessions == 2  # from ACCEPTED on, confirmed or not
    assert (summary.faulty, summary.unmonitored) == (2, 2)


def test_sites_are_sorted_by_name_with_the_unknown_site_last() -> None:
    views = [view("1", site=None), view("2", site="b"), view("3", site="a"), view("4", site="B")]
    assert [s.site for s in summarise(views, NOW).by_site] == ["B", "a", "b", None]


@pytest.mark.parametrize("state", [s for s in CPState if s is not CPState.SUPPLYING])
def test_only_a_supplying_cp_delivers_power(state: CPState) -> None:
    cp = view("A", state, session=session("A", 50.0), last_telemetry=telemetry("A", 50.0))
    assert cp_power_kw(cp) == 0.0


def test_a_supplying_cps_power_is_its_sessions_then_its_last_telemetrys() -> None:
    assert cp_power_kw(view("A", CPState.SUPPLYING, session=session("A", 11.0),
                            last_telemetry=telemetry("A", 99.0))) == 11.0
    assert cp_power_kw(view("A", CPState.SUPPLYING, last_telemetry=telemetry("A", 3.5))) == 3.5
    assert cp_power_kw(view("A", CPState.SUPPLYING)) == 0.0


def test_power_is_rounded_to_watts() -> None:
    views = [view(str(n), CPState.SUPPLYING, "s", session=session(str(n), 0.1))
             for n in range(3)]
    summary = summarise(views, NOW)
    assert summary.power_kw == 0.3
    assert summary.by_site[0].power_kw == 0.3


# --------------------------------------------------------------------------- GET /summary


@pytest.fixture
async def controller(repo: SqliteRepository) -> AsyncIterator[Controller]:
    central = FlushingController(RecordingPublisher(), repo, CentralOptions(start_timeout=30.0))
    yield central
    await central.close()


@pytest.fixture
async def client(controller: Controller) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(create_api(controller))
    async with httpx.AsyncClient(transport=transport, base_url="http://central.test") as http:
        yield http


async def test_get_summary_follows_the_network(
    client: httpx.AsyncClient, controller: Controller
) -> None:
    response = await client.get("/summary")
    assert response.status_code == 200
    assert response.json()["cps"] == 0

    for cp_id, site in (("CP-1", "north"), ("CP-2", "north"), ("CP-3", None)):
        await controller.register(CPRegistration(cp_id=cp_id, site=site))
        await controller.handle_status(CPStatus(cp_id=cp_id, state=CPState.ACTIVATED))
    await controller.handle_request(DriverRequest(request_id="r-1", driver_id="d-1",
                                                  cp_id="CP-1"))
    running = controller.cps["CP-1"].session
    assert running is not None
    await controller.handle_status(CPStatus(cp_id="CP-1", state=CPState.SUPPLYING,
                                            session_id=running.session_id))
    await controller.handle_telemetry(CPTelemetry(
        cp_id="CP-1", kw=22.0, kwh=0.5, euros=0.2, driver_id="d-1",
        session_id=running.session_id,
    ))
    await controller.report_fault("CP-3", True, "isolation fault")

    body = (await client.get("/summary")).json()

    assert body == {
        "cps": 3,
        "by_state": {"DISCONNECTED": 0, "ACTIVATED": 1, "SUPPLYING": 1, "STOPPED": 0,
                     "FAULT": 1},
        "by_site": [
            {"site": "north", "cps": 2, "supplying": 1, "faulty": 0, "power_kw": 22.0},
            {"site": None, "cps": 1, "supplying": 0, "faulty": 1, "power_kw": 0.0},
        ],
        "supplying": 1,
        "power_kw": 22.0,
        "active_sessions": 1,
        "faulty": 1,
        "unmonitored": 3,  # no monitor has reported for any of them
        "ts": body["ts"],
    }
    assert body["ts"].endswith("Z")


async def test_summary_is_documented(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    answer = spec["paths"]["/summary"]["get"]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SummaryOut"
    }
    fields = spec["components"]["schemas"]["SummaryOut"]["properties"]
    assert {"cps", "by_state", "by_site", "power_kw", "active_sessions", "faulty",
            "unmonitored"} <= set(fields)
