"""Central's HTTP API (SPEC §5) through httpx's ASGI transport, over a real Controller.

The controller has a recording publisher and an in-memory SQLite repository; sessions
are driven the way Kafka would drive them (``handle_request`` / ``handle_status``).

No test may reach the last-resort 500 handler by accident: Starlette re-raises an
unhandled exception after answering 500, and the ``client`` fixture's transport raises
app exceptions, so such a test fails with the exception itself. Only
:func:`test_unexpected_exception_is_logged_and_answered_500_json` goes there on purpose.

Most parametrised error cases share one module-wide Central (``shared``), because building
a FastAPI app is most of a test's time; that fixture checks after each test that the CPs
are unchanged and nothing was published, which is part of what those tests assert.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from loguru import logger

from evcharging.apps.ev_central.api import HEALTH_BUDGET, create_api
from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.apps.ev_central.schemas import cp_out
from evcharging.common.http import token_matches
from evcharging.common.kafka import Topic
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPRegistration,
    CPState,
    CPStatus,
    CPTelemetry,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    SessionResult,
)
from evcharging.common.throttle import AuthThrottle
from tests.unit.conftest import FlushingController
from tests.unit.fakes import RecordingPublisher

BASE = "http://central.test"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>&amp;'
JSON = {"content-type": "application/json"}
ERROR_KEYS = {"error", "code"}

Factory = Callable[..., Awaitable[httpx.AsyncClient]]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
async def controller(bus: RecordingPublisher, repo: SqliteRepository) -> AsyncIterator[Controller]:
    central = FlushingController(bus, repo, CentralOptions(start_timeout=30.0))
    yield central
    await central.close()


@pytest.fixture
async def make_client(controller: Controller) -> AsyncIterator[Factory]:
    """Build clients on `controller`'s API with any create_api options; all closed at the end."""
    clients: list[httpx.AsyncClient] = []

    async def make(*, raise_app_exceptions: bool = True, **options: Any) -> httpx.AsyncClient:
        app = create_api(controller, **options)
        transport = httpx.ASGITransport(app, raise_app_exceptions=raise_app_exceptions)
        client = httpx.AsyncClient(transport=transport, base_url=BASE)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def client(make_client: Factory) -> httpx.AsyncClient:
    return await make_client()


@pytest.fixture
async def secured(make_client: Factory) -> httpx.AsyncClient:
    return await make_client(api_token=TOKEN)


@dataclass
class Shared:
    """One Central for the many tests that expect an error and so must change nothing."""

    controller: Controller
    bus: RecordingPublisher
    client: httpx.AsyncClient
    secured: httpx.AsyncClient

    def state(self) -> dict[str, dict[str, Any]]:
        return {
            cp.cp_id: cp_out(cp).model_dump(mode="json") for cp in self.controller.all_cps()
        }


@pytest.fixture(scope="module")
async def shared_central() -> AsyncIterator[Shared]:
    """Built once per module (building a FastAPI app is most of a test's time): see layout."""
    bus = RecordingPublisher()
    async with SqliteRepository(":memory:") as repository:
        controller = FlushingController(bus, repository, CentralOptions(start_timeout=30.0))
        await layout(controller)
        # The many 401 tests all come from one address: a throttle that never blocks
        # (test_api_limits.py tests the 429).
        apps = create_api(controller), create_api(
            controller, api_token=TOKEN, auth_throttle=AuthThrottle(failures=1_000_000)
        )
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(apps[0]), base_url=BASE) as client,
            httpx.AsyncClient(transport=httpx.ASGITransport(apps[1]), base_url=BASE) as secured,
        ):
            yield Shared(controller, bus, client, secured)
        await controller.close()


@pytest.fixture
def shared(shared_central: Shared) -> Iterator[Shared]:
    """The shared Central, checked unchanged after the test: same CPs, nothing published."""
    before = shared_central.state()
    published = len(shared_central.bus.messages)
    yield shared_central
    assert shared_central.state() == before
    assert shared_central.bus.messages[published:] == []


# ----------------------------------------------------------------------------- helpers


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is `status` with a JSON ``{"error": str, "code": str, ...}`` body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body, dict) and body.keys() >= ERROR_KEYS, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["code"], str) and body["code"]
    if code is not None:
        assert body["code"] == code, body
    return body


def assert_client_error(response: httpx.Response) -> dict[str, Any]:
    """Any 4xx with the JSON error shape (never a 5xx)."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    return assert_error(response, response.status_code)


def error_locs(body: dict[str, Any]) -> list[list[str]]:
    return [detail["loc"] for detail in body["details"]]


def commands(bus: RecordingPublisher, cmd: CommandType) -> list[CentralCommand]:
    return [c for c in bus.of(CentralCommand) if c.cmd is cmd]


async def activate(controller: Controller, cp_id: str = "CP-001", **fields: Any) -> None:
    await controller.register(CPRegistration(cp_id=cp_id, **fields))
    await controller.handle_status(CPStatus(cp_id=cp_id, state=CPState.ACTIVATED))


async def stopped(controller: Controller, cp_id: str = "CP-001") -> None:
    await activate(controller, cp_id)
    await controller.handle_status(CPStatus(cp_id=cp_id, state=CPState.STOPPED))


async def layout(controller: Controller) -> None:
    """CP-001 registered (DISCONNECTED), CP-002 ACTIVATED, CP-003 STOPPED."""
    await controller.register(CPRegistration(cp_id="CP-001"))
    await activate(controller, "CP-002")
    await stopped(controller, "CP-003")


async def start_session(
    controller: Controller, cp_id: str = "CP-001", driver_id: str = "driver-alice",
    request_id: str | None = None,
) -> str:
    """Request, accept and confirm a session on an ACTIVATED CP; its session id."""
    request = DriverRequest(
        request_id=request_id or f"r-{cp_id}-{driver_id}", driver_id=driver_id, cp_id=cp_id
    )
    await controller.handle_request(request)
    session = controller.cps[cp_id].session
    assert session is not None, "the request was not ACCEPTED"
    await controller.handle_status(CPStatus(
        cp_id=cp_id, state=CPState.SUPPLYING, session_id=session.session_id, driver_id=driver_id
    ))
    assert session.confirmed
    return session.session_id


async def end_session(
    controller: Controller, cp_id: str, session_id: str,
    result: SessionResult = SessionResult.COMPLETED,
) -> None:
    await controller.handle_status(CPStatus(
        cp_id=cp_id, state=CPState.ACTIVATED, session_id=session_id,
        kwh=2.5, euros=0.75, session_result=result,
    ))


# ----------------------------------------------------------------------------- /health


async def test_health_without_probe(client: httpx.AsyncClient, controller: Controller) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "cps": 0}
    await activate(controller)
    assert (await client.get("/health")).json() == {"status": "ok", "cps": 1}


async def test_health_with_a_probe_reports_its_fields(make_client: Factory) -> None:
    async def probe() -> dict[str, Any]:
        return {"status": "ok", "kafka": {"connected": True}, "database": {"ok": True}}

    response = await (await make_client(health=probe)).get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok", "cps": 0, "kafka": {"connected": True}, "database": {"ok": True},
    }


async def test_health_degraded_is_503(make_client: Factory) -> None:
    async def probe() -> dict[str, Any]:
        return {"status": "degraded", "kafka": {"connected": False}, "database": {"ok": True}}

    response = await (await make_client(health=probe)).get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["kafka"] == {"connected": False}


async def test_health_probe_that_raises_is_503_not_500(make_client: Factory) -> None:
    async def probe() -> dict[str, Any]:
        raise RuntimeError("probe broke")

    response = await (await make_client(health=probe)).get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["code"] == "unavailable"
    assert "probe broke" not in response.text


@pytest.mark.parametrize(
    "report",
    [
        {"status": "ok", "kafka": {"connected": False}, "database": {"ok": True}},
        {"status": "ok", "kafka": {"connected": True}, "database": {"ok": False}},
        {"status": "ok", "kafka": "down", "database": {"ok": True}},
        {"status": "starting"},
    ],
    ids=["kafka-down", "database-down", "kafka-nonsense", "other-status"],
)
async def test_health_is_503_while_kafka_or_the_database_is_down_whatever_the_status_says(
    make_client: Factory, report: dict[str, Any]
) -> None:
    async def probe() -> dict[str, Any]:
        return report

    response = await (await make_client(health=probe)).get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "degraded"


async def test_health_answers_503_in_time_when_the_probe_hangs(
    make_client: Factory, controller: Controller
) -> None:
    await activate(controller)
    cancelled = asyncio.Event()

    async def probe() -> dict[str, Any]:
        try:
            await asyncio.Event().wait()  # a database or broker that never answers
        finally:
            cancelled.set()
        return {}

    client = await make_client(health=probe, health_budget=0.05)
    loop = asyncio.get_running_loop()
    began = loop.time()
    response = await client.get("/health")
    assert loop.time() - began < 1.0
    assert response.status_code == 503
    assert response.json() == {
        "status": "degraded", "cps": 1, "code": "unavailable",
        "error": "health probe gave no answer within 0.05s",
    }
    assert cancelled.is_set()  # the probe was not left running


def test_the_health_budget_keeps_the_answer_within_two_seconds() -> None:
    assert 0 < HEALTH_BUDGET <= 1.5


# ----------------------------------------------------------------------------- /cp


async def test_list_cps_empty(client: httpx.AsyncClient) -> None:
    response = await client.get("/cp")
    assert response.status_code == 200
    assert response.json() == []


async def test_list_cps_sorted_with_every_field_of_the_spec(
    client: httpx.AsyncClient, controller: Controller
) -> None:
    await activate(controller, "CP-002", location="Depot B", kw_rate=22.0, euro_rate=0.3)
    await activate(controller, "CP-001")
    session_id = await start_session(controller, "CP-002", "driver-bob")
    await controller.handle_telemetry(CPTelemetry(
        cp_id="CP-002", kw=22.0, kwh=1.0, euros=0.3, driver_id="driver-bob",
        session_id=session_id,
    ))

    cps = (await client.get("/cp")).json()
    assert [cp["cp_id"] for cp in cps] == ["CP-001", "CP-002"]
    idle, busy = cps
    assert idle["state"] == "ACTIVATED"
    assert idle["current_driver"] is None and idle["current_session"] is None
    assert idle["last_telemetry"] is None
    assert busy["state"] == "SUPPLYING"
    assert busy["is_faulty"] is False and busy["fault_reason"] is None
    assert busy["circuit_breaker_state"] == "CLOSED"
    assert busy["current_driver"] == "driver-bob"
    assert busy["current_session"] == session_id
    assert busy["location"] == "Depot B" and busy["kw_rate"] == 22.0
    assert busy["last_telemetry"]["kw"] == 22.0
    assert busy["last_telemetry"]["session_id"] == session_id


async def test_get_one_cp(client: httpx.AsyncClient, controller: Controller) -> None:
    await activate(controller, location="Main street 1")
    response = await client.get("/cp/CP-001")
    assert response.status_code == 200
    body = response.json()
    assert body["cp_id"] == "CP-001"
    assert body["state"] == "ACTIVATED"
    assert body["location"] == "Main street 1"
    assert body == cp_out(controller.get("CP-001")).model_dump(mode="json")


async def test_list_cps_pages_with_the_total_in_a_header(
    client: httpx.AsyncClient, controller: Controller
) -> None:
    for n in range(1, 6):
        await activate(controller, f"CP-00{n}")
    response = await client.get("/cp")
    assert [cp["cp_id"] for cp in response.json()] == [f"CP-00{n}" for n in range(1, 6)]
    assert response.headers["x-total-count"] == "5"

    response = await client.get("/cp?limit=2&offset=1")
    assert [cp["cp_id"] for cp in response.json()] == ["CP-002", "CP-003"]
    assert response.headers["x-total-count"] == "5"
    assert [cp["cp_id"] for cp in (await client.get("/cp?offset=4")).json()] == ["CP-005"]
    response = await client.get("/cp?offset=9&limit=3")
    assert (response.json(), response.headers["x-total-count"]) == ([], "5")


async def test_list_cps_filters_by_state_and_site(
    client: httpx.AsyncClient, controller: Controller
) -> None:
    await controller.register(CPRegistration(cp_id="CP-001"))  # DISCONNECTED
    await activate(controller, "CP-002")
    await activate(controller, "CP-003")
    await stopped(controller, "CP-004")
    controller.get("CP-002").site = "depot-a"  # type: ignore[attr-defined]
    controller.get("CP-004").site = "depot-a"  # type: ignore[attr-defined]

    response = await client.get("/cp?state=ACTIVATED")
    assert [cp["cp_id"] for cp in response.json()] == ["CP-002", "CP-003"]
    assert response.headers["x-total-count"] == "2"
    response = await client.get("/cp?site=depot-a")
    assert [(cp["cp_id"], cp["site"]) for cp in response.json()] == [
        ("CP-002", "depot-a"), ("CP-004", "depot-a"),
    ]
    response = await client.get("/cp?site=depot-a&state=STOPPED&limit=1")
    assert [cp["cp_id"] for cp in response.json()] == ["CP-004"]
    assert response.headers["x-total-count"] == "1"
    assert (await client.get("/cp?site=elsewhere")).json() == []


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        ("state=BROKEN", ["query", "state"]),
        ("state=activated", ["query", "state"]),
        ("limit=0", ["query", "limit"]),
        ("limit=1001", ["query", "limit"]),
        ("offset=-1", ["query", "offset"]),
        ("offset=x", ["query", "offset"]),
        ("site=", ["query", "site"]),
        ("site=" + "x" * 501, ["query", "site"]),
    ],
)
async def test_list_cps_bad_params_are_422(shared: Shared, query: str, loc: list[str]) -> None:
    body = assert_error(await shared.client.get(f"/cp?{query}"), 422, "invalid_request")
    assert loc in error_locs(body)


async def test_monitored_follows_the_monitors_reports(
    client: httpx.AsyncClient, controller: Controller
) -> None:
    for cp_id in ("CP-001", "CP-002", "CP-003"):
        await activate(controller, cp_id)
    assert [cp["monitored"] for cp in (await client.get("/cp")).json()] == [False] * 3
    await controller.monitor_report("CP-001", 1.0, True)
    await controller.monitor_report("CP-002", 1.0, True)
    controller.get("CP-002").monitor_lost = True  # as housekeeping marks a silent monitor
    cps = (await client.get("/cp")).json()
    assert [cp["monitored"] for cp in cps] == [True, False, False]
    assert (await client.get("/cp/CP-002")).json()["monitored"] is False


@pytest.mark.parametrize("cp_id", ["CP-404", "x" * 64, "a", "a.b_c-D"])
async def test_get_unknown_cp_is_404_json(shared: Shared, cp_id: str) -> None:
    body = assert_error(await shared.client.get(f"/cp/{cp_id}"), 404, "unknown_cp")
    assert cp_id in body["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/cp/bad id!",
        "/cp/" + "x" * 65,
        "/cp/CP%00",
        "/cp/caf%C3%A9",
        "/cp/a;b",
        "/cp/%F0%9F%94%8C",
    ],
)
async def test_get_cp_with_an_invalid_id_is_422(shared: Shared, path: str) -> None:
    body = assert_error(await shared.client.get(path), 422, "invalid_request")
    assert ["path", "cp_id"] in error_locs(body)


# ----------------------------------------------------------------------------- /cp/register


async def test_register_creates_a_cp(
    client: httpx.AsyncClient, controller: Controller, repo: SqliteRepository
) -> None:
    response = await client.post("/cp/register", json={
        "cp_id": "CP-001", "location": "Depot", "kw_rate": 11.0, "euro_rate": 0.25,
        "health_url": "http://cp-001:8001/health",
    })
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True
    cp = body["cp"]
    assert cp["cp_id"] == "CP-001"
    assert cp["state"] == "DISCONNECTED"
    assert (cp["location"], cp["kw_rate"], cp["euro_rate"]) == ("Depot", 11.0, 0.25)
    assert cp["health_url"] == "http://cp-001:8001/health"
    assert "CP-001" in controller.cps
    (record,) = await repo.load_cps()
    assert (record.cp_id, record.location, record.kw_rate) == ("CP-001", "Depot", 11.0)
    assert (await client.get("/cp/CP-001")).json()["location"] == "Depot"


async def test_register_again_updates_the_given_fields_only(
    client: httpx.AsyncClient, controller: Controller, repo: SqliteRepository
) -> None:
    await client.post("/cp/register", json={"cp_id": "CP-001", "location": "Old", "kw_rate": 7.0})
    await controller.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED))
    response = await client.post("/cp/register", json={"cp_id": "CP-001", "location": "New"})
    assert response.status_code == 200
    cp = response.json()["cp"]
    assert cp["location"] == "New"
    assert cp["kw_rate"] == 7.0  # not given: kept
    assert cp["state"] == "ACTIVATED"  # re-registering does not reset the state
    assert len(controller.cps) == 1
    (record,) = await repo.load_cps()
    assert record.location == "New"


async def test_register_ignores_unknown_fields(client: httpx.AsyncClient) -> None:
    response = await client.post("/cp/register", json={"cp_id": "CP-001", "colour": "red"})
    assert response.status_code == 200
    assert "colour" not in response.json()["cp"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ["body", "cp_id"]),
        ({"location": "Depot"}, ["body", "cp_id"]),
        ({"cp_id": None}, ["body", "cp_id"]),
        ({"cp_id": 17}, ["body", "cp_id"]),
        ({"cp_id": ["CP-001"]}, ["body", "cp_id"]),
        ({"cp_id": {"id": "CP-001"}}, ["body", "cp_id"]),
        ({"cp_id": ""}, ["body", "cp_id"]),
        ({"cp_id": "bad id!"}, ["body", "cp_id"]),
        ({"cp_id": "x" * 65}, ["body", "cp_id"]),
        ({"cp_id": "CP-001", "kw_rate": -1}, ["body", "kw_rate"]),
        ({"cp_id": "CP-001", "kw_rate": "fast"}, ["body", "kw_rate"]),
        ({"cp_id": "CP-001", "kw_rate": [1]}, ["body", "kw_rate"]),
        ({"cp_id": "CP-001", "euro_rate": -0.01}, ["body", "euro_rate"]),
        ({"cp_id": "CP-001", "location": 5}, ["body", "location"]),
        ({"cp_id": "CP-001", "location": "x" * 501}, ["body", "location"]),
        ({"cp_id": "CP-001", "health_url": "http://" + "x" * 300}, ["body", "health_url"]),
    ],
)
async def test_register_invalid_body_is_422_json(
    shared: Shared, body: dict[str, Any], loc: list[str]
) -> None:
    response = await shared.client.post("/cp/register", json=body)
    error = assert_error(response, 422, "invalid_request")
    assert error["error"] == "invalid request"
    assert loc in error_locs(error)
    assert all(isinstance(d["msg"], str) and d["msg"] for d in error["details"])


@pytest.mark.parametrize(
    "number", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"1" + b"0" * 5000]
)
async def test_register_non_finite_or_absurd_numbers_are_422(
    shared: Shared, number: bytes
) -> None:
    content = b'{"cp_id": "CP-001", "kw_rate": ' + number + b"}"
    response = await shared.client.post("/cp/register", content=content, headers=JSON)
    assert_error(response, 422, "invalid_request")


@pytest.mark.parametrize(
    "content", [b"not json", b"{", b"{'cp_id': 'CP-001'}", b'{"cp_id": "CP-001",}', b"\x00"]
)
async def test_register_body_that_is_not_json_is_422(shared: Shared, content: bytes) -> None:
    response = await shared.client.post("/cp/register", content=content, headers=JSON)
    body = assert_error(response, 422, "invalid_request")
    assert error_locs(body)[0][0] == "body"


@pytest.mark.parametrize(
    "content", [b"\xff\xfe\xfd", b'{"cp_id": "CP-\xff"}', b"\xc3\x28", b"[" * 100_000]
)
async def test_register_body_that_cannot_be_decoded_is_422_not_400(
    shared: Shared, content: bytes
) -> None:
    response = await shared.client.post("/cp/register", content=content, headers=JSON)
    body = assert_error(response, 422, "invalid_request")
    assert error_locs(body) == [["body"]]


async def test_register_json_with_a_non_json_content_type_is_422(shared: Shared) -> None:
    response = await shared.client.post(
        "/cp/register", content=b'{"cp_id": "CP-009"}', headers={"content-type": "text/plain"}
    )
    assert_error(response, 422, "invalid_request")


async def test_register_accepts_a_json_suffix_content_type(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/cp/register", content=b'{"cp_id": "CP-001"}',
        headers={"content-type": "application/vnd.api+json; charset=utf-8"},
    )
    assert response.status_code == 200


# ----------------------------------------------------------------------------- /cp/fault


async def test_fault_on_an_unknown_cp_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/cp/fault", json={"cp_id": "CP-404", "is_faulty": True, "reason": "x"}
    )
    body = assert_error(response, 404, "unknown_cp")
    assert "CP-404" in body["error"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ["body", "cp_id"]),
        ({"is_faulty": True}, ["body", "cp_id"]),
        ({"cp_id": "CP-001"}, ["body", "is_faulty"]),
        ({"cp_id": "CP-001", "is_faulty": "maybe"}, ["body", "is_faulty"]),
        ({"cp_id": "CP-001", "is_faulty": None}, ["body", "is_faulty"]),
        ({"cp_id": "CP-001", "is_faulty": [True]}, ["body", "is_faulty"]),
        ({"cp_id": "CP-001", "is_faulty": True, "reason": None}, ["body", "reason"]),
        ({"cp_id": "CP-001", "is_faulty": True, "reason": 42}, ["body", "reason"]),
        ({"cp_id": "CP-001", "is_faulty": True, "reason": "x" * 501}, ["body", "reason"]),
        ({"cp_id": "bad id!", "is_faulty": True}, ["body", "cp_id"]),
    ],
)
async def test_fault_invalid_body_is_422(
    shared: Shared, body: dict[str, Any], loc: list[str]
) -> None:
    error = assert_error(await shared.client.post("/cp/fault", json=body), 422, "invalid_request")
    assert loc in error_locs(error)


async def test_fault_then_recovery_moves_is_faulty_and_the_breaker(
    client: httpx.AsyncClient, controller: Controller
) -> None:
    await activate(controller)
    response = await client.post(
        "/cp/fault", json={"cp_id": "CP-001", "is_faulty": True, "reason": "overheating"}
    )
    assert response.status_code == 200
    cp = response.json()["cp"]
    assert cp["is_faulty"] is True
    assert cp["fault_reason"] == "overheating"
    assert cp["state"] == "FAULT"
    assert cp["circuit_breaker_state"] == "OPEN"
    assert (await client.get("/cp/CP-001")).json()["is_faulty"] is True

    response = await client.post(
        "/cp/fault", json={"cp_id": "CP-001", "is_faulty": False, "reason": "cooled down"}
    )
    assert response.status_code == 200
    cp = response.json()["cp"]
    assert cp["is_faulty"] is False
    assert cp["fault_reason"] is None
    assert cp["circuit_breaker_state"] == "HALF_OPEN"

    faults = (await client.get("/faults")).json()
    assert [(f["event_type"], f["reason"]) for f in faults] == [
        ("RECOVERY", "cooled down"), ("FAULT", "overheating"),
    ]


async def test_fault_without_a_reason_gets_a_default_one(
    client: httpx.AsyncClient, controller: Controller
) -> None:
    await activate(controller)
    response = await client.post("/cp/fault", json={"cp_id": "CP-001", "is_faulty": True})
    assert response.status_code == 200
    assert response.json()["cp"]["fault_reason"] == "fault reported"


async def test_lax_boolean_is_accepted(client: httpx.AsyncClient, controller: Controller) -> None:
    await activate(controller)
    response = await client.post("/cp/fault", json={"cp_id": "CP-001", "is_faulty": "true"})
    assert response.status_code == 200
    assert response.json()["cp"]["is_faulty"] is True


async def test_fault_ends_the_running_session(
    client: httpx.AsyncClient, controller: Controller, bus: RecordingPublisher
) -> None:
    await activate(controller)
    session_id = await start_session(controller)
    assert (await client.get("/cp/CP-001")).json()["current_session"] == session_id

    response = await client.post(
        "/cp/fault", json={"cp_id": "CP-001", "is_faulty": True, "reason": "ground fault"}
    )
    assert response.status_code == 200
    cp = response.json()["cp"]
    assert cp["current_session"] is None and cp["current_driver"] is None
    assert cp["state"] == "FAULT"

    (stop,) = commands(bus, CommandType.STOP_SUPPLY)
    assert stop.payload.session_id == session_id
    failed = [u for u in bus.of(DriverUpdate) if u.status is DriverStatus.FAILED]
    assert [u.session_id for u in failed] == [session_id]
    assert failed[0].reason == "CP fault: ground fault"

    (row,) = (await client.get("/sessions")).json()
    assert (row["session_id"], row["status"]) == (session_id, "FAILED")
    assert row["reason"] == "CP fault: ground fault"
    assert row["ended_at"] is not None


# ----------------------------------------------------------------------------- stop / resume


async def test_stop_sends_stop_cp(
    client: httpx.AsyncClient, controller: Controller, bus: RecordingPublisher
) -> None:
    await activate(controller)
    response = await client.post("/cp/CP-001/stop", json={"reason": "maintenance"})
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True and body["sent"] == "STOP_CP"
    assert body["cp"]["cp_id"] == "CP-001"
    (command,) = commands(bus, CommandType.STOP_CP)
    assert command.cp_id == "CP-001"
    assert command.payload.reason == "maintenance"
    topic, _ = bus.messages[-1]
    assert topic is Topic.CENTRAL_COMMANDS


async def test_resume_sends_resume_cp(
    client: httpx.AsyncClient, controller: Controller, bus: RecordingPublisher
) -> None:
    await stopped(controller)
    response = await client.post("/cp/CP-001/resume", json={"reason": "fixed"})
    assert response.status_code == 200
    assert response.json()["sent"] == "RESUME_CP"
    (command,) = commands(bus, CommandType.RESUME_CP)
    assert (command.cp_id, command.payload.reason) == ("CP-001", "fixed")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"content": b"", "headers": JSON},
        {"content": b"null", "headers": JSON},
        {"json": {}},
        {"json": {"reason": None}},
        {"json": {"reason": ""}},
        {"json": {"reason": "", "other": 1}},
    ],
    ids=["no-body", "empty", "null", "empty-object", "null-reason", "empty-reason", "extra"],
)
@pytest.mark.parametrize(
    ("action", "default"), [("stop", "stopped by operator"), ("resume", "resumed by operator")]
)
async def test_operator_body_is_optional(
    client: httpx.AsyncClient, controller: Controller, bus: RecordingPublisher,
    action: str, default: str, kwargs: dict[str, Any],
) -> None:
    await (activate if action == "stop" else stopped)(controller)
    response = await client.post(f"/cp/CP-001/{action}", **kwargs)
    assert response.status_code == 200, response.text
    (command,) = commands(bus, CommandType(f"{action.upper()}_CP"))
    assert command.payload.reason == default


@pytest.mark.parametrize(
    ("action", "setup"),
    [
        ("stop", "disconnected"),
        ("stop", "stopped"),
        ("stop", "fault"),
        ("resume", "disconnected"),
        ("resume", "activated"),
        ("resume", "supplying"),
        ("resume", "fault"),
    ],
)
async def test_operator_command_refused_by_the_state_machine_is_409(
    client: httpx.AsyncClient, controller: Controller, bus: RecordingPublisher,
    action: str, setup: str,
) -> None:
    await controller.register(CPRegistration(cp_id="CP-001"))
    if setup != "disconnected":
        await controller.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED))
    if setup == "stopped":
        await controller.handle_status(CPStatus(cp_id="CP-001", state=CPState.STOPPED))
    if setup == "fault":
        await controller.report_fault("CP-001", True, "broken")
    if setup == "supplying":
        await start_session(controller)
    before = len(bus.messages)
    body = assert_error(await client.post(f"/cp/CP-001/{action}"), 409, "not_allowed")
    assert "CP-001" in body["error"]
    assert bus.messages[before:] == []


@pytest.mark.parametrize("action", ["stop", "resume"])
async def test_operator_command_on_an_unknown_cp_is_404(shared: Shared, action: str) -> None:
    assert_error(await shared.client.post(f"/cp/CP-404/{action}"), 404, "unknown_cp")


@pytest.mark.parametrize(("action", "ready_cp"), [("stop", "CP-002"), ("resume", "CP-003")])
@pytest.mark.parametrize(
    ("path_id", "kwargs", "loc"),
    [
        ("bad id!", {}, ["path", "cp_id"]),
        ("x" * 65, {}, ["path", "cp_id"]),
        (None, {"json": {"reason": "x" * 501}}, ["body", "reason"]),
        (None, {"json": {"reason": 5}}, ["body", "reason"]),
        (None, {"json": {"reason": ["a"]}}, ["body", "reason"]),
        (None, {"json": []}, ["body"]),
        (None, {"json": "maintenance"}, ["body"]),
        (None, {"content": b"not json", "headers": JSON}, ["body", "0"]),
    ],
)
async def test_operator_command_invalid_input_is_422(
    shared: Shared, action: str, ready_cp: str, path_id: str | None, kwargs: dict[str, Any],
    loc: list[str],
) -> None:
    path = f"/cp/{path_id or ready_cp}/{action}"  # the CP is in a state that allows it
    body = assert_error(await shared.client.post(path, **kwargs), 422, "invalid_request")
    assert loc in error_locs(body)


async def test_stop_during_a_session_is_allowed(
    client: httpx.AsyncClient, controller: Controller, bus: RecordingPublisher
) -> None:
    await activate(controller)
    await start_session(controller)
    response = await client.post("/cp/CP-001/stop")
    assert response.status_code == 200
    assert len(commands(bus, CommandType.STOP_CP)) == 1


# ----------------------------------------------------------------------------- /telemetry


async def test_telemetry_latest_of_every_cp(
    client: httpx.AsyncClient, controller: Controller
) -> None:
    assert (await client.get("/telemetry")).json() == {}
    await activate(controller, "CP-001")
    await activate(controller, "CP-002")
    session_id = await start_session(controller, "CP-001")
    for kwh in (0.5, 1.5):
        await controller.handle_telemetry(CPTelemetry(
            cp_id="CP-001", kw=11.0, kwh=kwh, euros=kwh * 0.3, session_id=session_id,
        ))
    response = await client.get("/telemetry")
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["CP-001"]  # CP-002 has sent none
    assert body["CP-001"]["kwh"] == 1.5
    assert body["CP-001"]["session_id"] == session_id
    assert body["CP-001"]["ts"].endswith("Z")


# ----------------------------------------------------------------------------- /sessions


@pytest.fixture
async def history(controller: Controller) -> dict[str, str]:
    """Sessions, oldest first: alice COMPLETED on CP-001, bob FAILED on CP-002,
    alice STOPPED on CP-001, carol ACTIVE on CP-002. Their ids by name."""
    await activate(controller, "CP-001")
    await activate(controller, "CP-002")
    ids: dict[str, str] = {}
    ids["completed"] = await start_session(controller, "CP-001", "driver-alice", "r1")
    await end_session(controller, "CP-001", ids["completed"])
    ids["failed"] = await start_session(controller, "CP-002", "driver-bob", "r2")
    await end_session(controller, "CP-002", ids["failed"], SessionResult.FAILED)
    ids["stopped"] = await start_session(controller, "CP-001", "driver-alice", "r3")
    await end_session(controller, "CP-001", ids["stopped"], SessionResult.STOPPED)
    await controller.report_fault("CP-002", False, "ok again")  # a FAILED run reopened nothing
    ids["active"] = await start_session(controller, "CP-002", "driver-carol", "r4")
    return ids


async def test_sessions_newest_first(
    client: httpx.AsyncClient, history: dict[str, str]
) -> None:
    response = await client.get("/sessions")
    assert response.status_code == 200
    rows = response.json()
    assert [r["session_id"] for r in rows] == [
        history["active"], history["stopped"], history["failed"], history["completed"],
    ]
    assert [r["status"] for r in rows] == ["ACTIVE", "STOPPED", "FAILED", "COMPLETED"]
    completed = rows[-1]
    assert (completed["kwh"], completed["euros"]) == (2.5, 0.75)
    assert completed["meter_final"] is True  # the CP's end status carried the totals
    assert rows[0]["meter_final"] is False  # still running
    assert completed["started_at"].endswith("Z") and completed["ended_at"].endswith("Z")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("limit=1", ["active"]),
        ("limit=2", ["active", "stopped"]),
        ("limit=1000", ["active", "stopped", "failed", "completed"]),
        ("cp_id=CP-001", ["stopped", "completed"]),
        ("cp_id=CP-404", []),
        ("driver_id=driver-alice", ["stopped", "completed"]),
        ("driver_id=driver-bob", ["failed"]),
        ("status=ACTIVE", ["active"]),
        ("status=COMPLETED", ["completed"]),
        ("status=STOPPED", ["stopped"]),
        ("status=FAILED", ["failed"]),
        ("cp_id=CP-001&status=COMPLETED", ["completed"]),
        ("cp_id=CP-002&driver_id=driver-alice", []),
        ("driver_id=driver-alice&limit=1", ["stopped"]),
    ],
)
async def test_sessions_filters(
    client: httpx.AsyncClient, history: dict[str, str], query: str, expected: list[str]
) -> None:
    response = await client.get(f"/sessions?{query}")
    assert response.status_code == 200
    assert [r["session_id"] for r in response.json()] == [history[name] for name in expected]


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        ("limit=0", ["query", "limit"]),
        ("limit=1001", ["query", "limit"]),
        ("limit=x", ["query", "limit"]),
        ("limit=-1", ["query", "limit"]),
        ("limit=1.5", ["query", "limit"]),
        ("limit=", ["query", "limit"]),
        ("limit=99999999999999999999999999", ["query", "limit"]),
        ("status=DONE", ["query", "status"]),
        ("status=active", ["query", "status"]),
        ("status=ACTIVE%0A", ["query", "status"]),
        ("status=", ["query", "status"]),
        ("cp_id=bad%20id!", ["query", "cp_id"]),
        ("cp_id=" + "x" * 65, ["query", "cp_id"]),
        ("driver_id=%3Cscript%3E", ["query", "driver_id"]),
    ],
)
async def test_sessions_bad_params_are_422(shared: Shared, query: str, loc: list[str]) -> None:
    body = assert_error(await shared.client.get(f"/sessions?{query}"), 422, "invalid_request")
    assert loc in error_locs(body)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("offset=1", ["stopped", "failed", "completed"]),
        ("offset=1&limit=2", ["stopped", "failed"]),
        ("offset=3", ["completed"]),
        ("offset=4", []),
        ("driver_id=driver-alice&offset=1", ["completed"]),
        ("limit=1&offset=999", []),
    ],
)
async def test_sessions_offset(
    client: httpx.AsyncClient, history: dict[str, str], query: str, expected: list[str]
) -> None:
    response = await client.get(f"/sessions?{query}")
    assert response.status_code == 200
    assert [r["session_id"] for r in response.json()] == [history[name] for name in expected]


@pytest.mark.parametrize("path", ["/sessions", "/faults", "/cp/CP-001/history"])
@pytest.mark.parametrize("query", ["offset=1000", "offset=991&limit=10", "offset=-1", "offset=x"])
async def test_paging_past_the_newest_rows_is_422(shared: Shared, path: str, query: str) -> None:
    body = assert_error(await shared.client.get(f"{path}?{query}"), 422, "invalid_request")
    assert ["query", "offset"] in error_locs(body)


# ----------------------------------------------------------------------------- /faults


async def test_faults_limit_and_cp_filter(
    client: httpx.AsyncClient, controller: Controller
) -> None:
    await activate(controller, "CP-001")
    await activate(controller, "CP-002")
    await controller.report_fault("CP-001", True, "first")
    await controller.report_fault("CP-002", True, "second")
    await controller.report_fault("CP-001", False, "third")

    rows = (await client.get("/faults")).json()
    assert [(r["cp_id"], r["event_type"], r["reason"]) for r in rows] == [
        ("CP-001", "RECOVERY", "third"), ("CP-002", "FAULT", "second"),
        ("CP-001", "FAULT", "first"),
    ]
    assert all(isinstance(r["id"], int) and r["ts"].endswith("Z") for r in rows)
    assert [r["reason"] for r in (await client.get("/faults?limit=1")).json()] == ["third"]
    assert [r["reason"] for r in (await client.get("/faults?cp_id=CP-001")).json()] == [
        "third", "first",
    ]
    assert [r["reason"] for r in (await client.get("/faults?cp_id=CP-002&limit=5")).json()] == [
        "second",
    ]
    assert (await client.get("/faults?cp_id=CP-404")).json() == []
    assert [r["reason"] for r in (await client.get("/faults?offset=1&limit=1")).json()] == [
        "second",
    ]


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=1001", "limit=x", "limit=-5", "cp_id=bad%20id!", "cp_id="]
)
async def test_faults_bad_params_are_422(shared: Shared, query: str) -> None:
    assert_error(await shared.client.get(f"/faults?{query}"), 422, "invalid_request")


# ----------------------------------------------------------------------------- history


async def test_history_of_an_unknown_cp_is_404(shared: Shared) -> None:
    assert_error(await shared.client.get("/cp/CP-404/history"), 404, "unknown_cp")


async def test_history_newest_first_with_limit(
    client: httpx.AsyncClient, controller: Controller
) -> None:
    await activate(controller)  # registered (DISCONNECTED), then ACTIVATED
    await controller.report_fault("CP-001", True, "hot")
    rows = (await client.get("/cp/CP-001/history")).json()
    assert len(rows) >= 3
    assert [r["state"] for r in rows[:2]] == ["FAULT", "ACTIVATED"]
    assert rows[-1]["state"] == "DISCONNECTED"
    assert rows[0]["is_faulty"] is True and rows[0]["breaker_state"] == "OPEN"
    assert all(r["cp_id"] == "CP-001" for r in rows)
    limited = (await client.get("/cp/CP-001/history?limit=1")).json()
    assert limited == rows[:1]
    assert (await client.get("/cp/CP-001/history?limit=2&offset=1")).json() == rows[1:3]
    await controller.snapshot_health()  # nothing changed since the last row: none added
    assert len((await client.get("/cp/CP-001/history?limit=1000")).json()) == len(rows)


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x"])
async def test_history_bad_limit_is_422(shared: Shared, query: str) -> None:
    response = await shared.client.get(f"/cp/CP-001/history?{query}")
    assert_error(response, 422, "invalid_request")


async def test_history_with_an_invalid_id_is_422(shared: Shared) -> None:
    assert_error(await shared.client.get("/cp/bad id!/history"), 422, "invalid_request")


# ----------------------------------------------------------------------------- /stats


async def test_stats_counts_decisions_and_http_errors(
    client: httpx.AsyncClient, controller: Controller
) -> None:
    body = (await client.get("/stats")).json()
    assert body == {"controller": {}, "http_errors": 0}
    await activate(controller)
    await start_session(controller)
    await client.get("/cp/CP-404")
    await client.get("/sessions?limit=0")
    await client.get("/no-such-route")
    body = (await client.get("/stats")).json()
    assert body["controller"]["requests"] == 1
    assert body["controller"]["accepted"] == 1
    assert body["http_errors"] == 3


# ----------------------------------------------------------------------------- docs


async def test_docs_and_openapi_are_served(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    assert (await client.get("/redoc")).status_code == 404  # ReDoc would need a CDN
    schema = (await client.get("/openapi.json")).json()
    assert schema["info"]["title"] == "EV Central"
    assert {
        "/health", "/cp", "/cp/{cp_id}", "/cp/register", "/cp/fault", "/cp/{cp_id}/stop",
        "/cp/{cp_id}/resume", "/cp/{cp_id}/history", "/telemetry", "/sessions", "/faults",
        "/stats",
    } <= schema["paths"].keys()
    assert "security" not in schema["paths"]["/cp/register"]["post"]


async def test_docs_work_offline(client: httpx.AsyncClient) -> None:
    """The page names no other host, and every asset it loads is served here."""
    html = (await client.get("/docs")).text
    assert "http://" not in html and "https://" not in html
    assert "validatorUrl" in html and '"validatorUrl": null' in html  # no validator badge
    assets = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert {asset.rsplit(".", 1)[-1] for asset in assets} == {"js", "css", "svg"}
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), asset
        response = await client.get(asset)
        assert response.status_code == 200, asset
        assert response.content
        if asset.endswith(".css"):
            assert "text/css" in response.headers["content-type"]
            remote = re.findall(r"url\(\s*['\"]?(?!data:)([^)'\"]+)", response.text)
            assert remote == [], remote  # no fonts or images from elsewhere
        if asset.endswith(".js"):
            assert "javascript" in response.headers["content-type"]
    assert "/openapi.json" in html


@pytest.mark.parametrize(
    "path", ["/docs/assets/index.html", "/docs/assets/../api.py", "/docs/assets/nope.js"]
)
async def test_docs_assets_serve_only_the_ui(shared: Shared, path: str) -> None:
    assert (await shared.client.get(path)).status_code == 404


async def test_openapi_documents_every_answer(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    error_ref = {"$ref": "#/components/schemas/ErrorOut"}

    def answers(path: str, method: str) -> dict[str, Any]:
        responses: dict[str, Any] = schema["paths"][path][method]["responses"]
        for status, answer in responses.items():
            if status != "200":
                assert answer["content"]["application/json"]["schema"] == error_ref or (
                    path == "/health"
                ), (path, status)
            assert answer["description"], (path, status)
        return responses

    for path in ("/cp/register", "/cp/fault", "/cp/{cp_id}/stop", "/cp/{cp_id}/resume"):
        assert {"200", "401", "403", "413", "422"} <= answers(path, "post").keys(), path
    for path in ("/cp/fault", "/cp/{cp_id}/stop", "/cp/{cp_id}/resume", "/cp/{cp_id}"):
        method = "get" if path == "/cp/{cp_id}" else "post"
        assert "404" in answers(path, method), path
    for path in ("/cp/{cp_id}/stop", "/cp/{cp_id}/resume"):
        assert "409" in answers(path, "post")
    for path in ("/cp", "/sessions", "/faults", "/cp/{cp_id}/history"):
        assert "422" in answers(path, "get"), path
    assert "HTTPValidationError" not in schema["components"]["schemas"]

    def ok_schema(path: str, method: str = "get") -> dict[str, Any]:
        content = schema["paths"][path][method]["responses"]["200"]["content"]
        result: dict[str, Any] = content["application/json"]["schema"]
        return result

    assert ok_schema("/cp")["items"] == {"$ref": "#/components/schemas/CPOut"}
    assert ok_schema("/cp/{cp_id}") == {"$ref": "#/components/schemas/CPOut"}
    assert ok_schema("/sessions")["items"] == {"$ref": "#/components/schemas/SessionOut"}
    assert ok_schema("/faults")["items"] == {"$ref": "#/components/schemas/FaultOut"}
    assert ok_schema("/health") == {"$ref": "#/components/schemas/HealthOut"}
    assert ok_schema("/cp/register", "post") == {"$ref": "#/components/schemas/CPChangeOut"}
    assert ok_schema("/cp/{cp_id}/stop", "post") == {"$ref": "#/components/schemas/CommandOut"}
    answers("/health", "get")
    assert "503" in schema["paths"]["/health"]["get"]["responses"]
    cp_fields = schema["components"]["schemas"]["CPOut"]["properties"]
    assert {"cp_id", "state", "is_faulty", "fault_reason", "circuit_breaker_state",
            "current_driver", "current_session", "last_telemetry", "monitored",
            "site"} <= cp_fields.keys()


async def test_openapi_documents_the_bearer_token_when_one_is_set(
    secured: httpx.AsyncClient,
) -> None:
    schema = (await secured.get("/openapi.json")).json()
    for path in ("/cp/register", "/cp/fault", "/cp/{cp_id}/stop", "/cp/{cp_id}/resume"):
        assert schema["paths"][path]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/cp"]["get"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# ----------------------------------------------------------------------------- auth

# Each call would succeed with the token on the CPs of `layout`.
MUTATING = [
    ("/cp/register", {"cp_id": "CP-009", "location": "Depot"}),
    ("/cp/fault", {"cp_id": "CP-002", "is_faulty": True, "reason": "x"}),
    ("/cp/CP-002/stop", {"reason": "maintenance"}),
    ("/cp/CP-003/resume", {"reason": "back"}),
]
MUTATING_IDS = ["register", "fault", "stop", "resume"]


@pytest.mark.parametrize(("path", "body"), MUTATING, ids=MUTATING_IDS)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Token {TOKEN}"},
        {"Authorization": b"Bearer caf\xe9"},
        {"Authorization": b"Bearer \xff\xfe"},
        {"X-Api-Token": TOKEN},
    ],
    ids=[
        "missing", "empty", "scheme-only", "scheme-space", "wrong", "longer", "shorter",
        "no-scheme", "basic", "other-scheme", "latin1", "bytes", "other-header",
    ],
)
async def test_mutating_call_without_the_right_token_is_401(
    shared: Shared, path: str, body: dict[str, Any], headers: dict[str, Any]
) -> None:
    response = await shared.secured.post(path, json=body, headers=headers)
    error = assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in response.text and TOKEN not in error["error"]


@pytest.mark.parametrize(("path", "body"), MUTATING, ids=MUTATING_IDS)
@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"  Bearer   {TOKEN}  "],
    ids=["canonical", "lower", "upper", "spaces"],
)
async def test_mutating_call_with_the_token_is_200(
    secured: httpx.AsyncClient, controller: Controller, bus: RecordingPublisher,
    path: str, body: dict[str, Any], authorization: str,
) -> None:
    await layout(controller)
    response = await secured.post(path, json=body, headers={"Authorization": authorization})
    assert response.status_code == 200, response.text
    assert response.json()["ok"] is True
    if path.endswith(("/stop", "/resume")):
        assert len(bus.of(CentralCommand)) == 1


@pytest.mark.parametrize(("path", "body"), MUTATING, ids=MUTATING_IDS)
@pytest.mark.parametrize(
    "content", [b"not json", b"\xff\xfe", b"[]", b"", b"[" * 50_000],
    ids=["not-json", "not-utf8", "list", "empty", "deep"],
)
async def test_token_is_checked_before_the_body(
    shared: Shared, path: str, body: dict[str, Any], content: bytes
) -> None:
    response = await shared.secured.post(path, content=content, headers=JSON)
    assert_error(response, 401, "unauthorized")
    assert "details" not in response.json()  # nothing about the schema leaks


async def test_with_the_token_invalid_bodies_still_get_422(secured: httpx.AsyncClient) -> None:
    response = await secured.post("/cp/register", content=b"nope", headers=JSON | AUTH)
    assert_error(response, 422, "invalid_request")
    response = await secured.post("/cp/fault", json={"cp_id": "CP-404", "is_faulty": 1},
                                  headers=AUTH)
    assert_error(response, 404, "unknown_cp")


@pytest.mark.parametrize(
    "path",
    [
        "/health", "/cp", "/cp/CP-001", "/cp/CP-001/history", "/telemetry", "/sessions",
        "/faults", "/stats", "/docs", "/openapi.json", "/api/feed", "/",
    ],
)
async def test_reads_stay_open_with_a_token(shared: Shared, path: str) -> None:
    response = await shared.secured.get(path)
    assert response.status_code == 200, response.text


async def test_without_a_token_any_authorization_header_is_ignored(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/cp/register", json={"cp_id": "CP-001"}, headers={"Authorization": "Bearer whatever"}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("authorization", "token", "expected"),
    [
        (None, "t", False),
        ("Bearer t", "t", True),
        ("bearer t", "t", True),
        ("Bearer  t ", "t", True),
        ("Bearer t t", "t", False),
        ("Bearer", "t", False),
        ("Bearert", "t", False),
        ("t", "t", False),
        ("Bearer café", "café", False),  # header latin-1 "é" vs the UTF-8 token
        ("Bearer cafÃ©", "café", True),  # UTF-8 bytes of "café" decoded as latin-1
        ("Bearer ☃", "t", False),  # not latin-1 at all: no crash
    ],
)
def test_token_matches(authorization: str | None, token: str, expected: bool) -> None:
    assert token_matches(authorization, token) is expected


# ----------------------------------------------------------------------------- never a 500

HUGE = "x" * 1_000_000
DEEP_OBJECT = '{"a":' * 10_000 + "1" + "}" * 10_000
MALFORMED: list[tuple[str, bytes, dict[str, str]]] = [
    ("empty", b"", JSON),
    ("null", b"null", JSON),
    ("list", b"[]", JSON),
    ("list-of-body", b'[{"cp_id": "CP-001", "is_faulty": true}]', JSON),
    ("number", b"42", JSON),
    ("string", b'"CP-001"', JSON),
    ("true", b"true", JSON),
    ("empty-object", b"{}", JSON),
    ("truncated", b'{"cp_id": "CP-001"', JSON),
    ("trailing-garbage", b'{"cp_id": "CP-001"} xyz', JSON),
    ("single-quotes", b"{'cp_id': 'CP-001'}", JSON),
    ("huge-string", f'{{"cp_id": "{HUGE}", "reason": "{HUGE}"}}'.encode(), JSON),
    ("huge-garbage", HUGE.encode(), JSON),
    ("huge-int", b'{"cp_id": "CP-001", "kw_rate": ' + b"9" * 10_000 + b"}", JSON),
    ("nan", b'{"cp_id": NaN, "is_faulty": NaN, "kw_rate": NaN, "reason": NaN}', JSON),
    ("deep-array", b"[" * 100_000 + b"]" * 100_000, JSON),
    ("deep-object", DEEP_OBJECT.encode(), JSON),
    ("nested-fields", b'{"cp_id": {"a": {"b": [1, {"c": null}]}}, "is_faulty": {},'
                      b' "reason": {"x": 1}}', JSON),
    ("invalid-utf8", b"\xff\xfe\xfd\xfc", JSON),
    ("invalid-utf8-in-string", b'{"cp_id": "CP-001", "reason": "\xc3\x28"}', JSON),
    ("lone-surrogate", b'{"cp_id": "\\ud800", "reason": "\\ud800"}', JSON),
    ("nul-bytes", b'{"cp_id": "CP\\u0000001", "reason": "\x00"}', JSON),
    ("utf16", '{"cp_id": 1, "reason": 1}'.encode("utf-16"), JSON),
    ("text-plain", b'{"cp_id": "CP-001", "is_faulty": true}', {"content-type": "text/plain"}),
    ("no-content-type", b'{"cp_id": "CP-001", "is_faulty": true}', {}),
    ("form", b"cp_id=CP-001&is_faulty=true",
     {"content-type": "application/x-www-form-urlencoded"}),
    ("multipart-garbage", b"--xx\r\nnonsense",
     {"content-type": "multipart/form-data; boundary=xx"}),
    ("bad-content-type", b"{}", {"content-type": "application/"}),
    ("xml", b"<cp id='CP-001'/>", {"content-type": "application/xml"}),
    ("json-charset-latin1", '{"cp_id": "CP-é"}'.encode("latin-1"),
     {"content-type": "application/json; charset=latin-1"}),
]
POSTS = ["/cp/register", "/cp/fault", "/cp/CP-001/stop", "/cp/CP-001/resume"]


@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize(
    ("content", "headers"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
async def test_malformed_posts_are_4xx_json_never_500(
    shared: Shared, path: str, content: bytes, headers: dict[str, str]
) -> None:
    # CP-001 is DISCONNECTED: a body taken as "no body" still ends in 409, never in 200.
    response = await shared.client.post(path, content=content, headers=headers)
    assert_client_error(response)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/cp/CP-001/nope", 404),
        ("GET", "/cp/CP-001/history/extra", 404),
        ("GET", "/cp/a%2Fb", 404),
        ("GET", "/static/nope.js", 404),
        ("GET", "/static/%2e%2e/api.py", 404),
        ("GET", "/static/..%2F..%2Fapi.py", 404),
        ("GET", "/openapi.json/x", 404),
        ("GET", "/" + "x" * 10_000, 404),
        ("GET", "/cp/" + "x" * 10_000, 422),
        ("GET", "/cp/%00", 422),
        ("GET", "/cp/%FF%FE", 422),
        ("GET", "/cp/CP-001/history?limit=-1", 422),
        ("GET", "/cp/CP-001/history?limit=1e3", 422),
        ("GET", "/sessions?limit=NaN", 422),
        ("GET", "/sessions?limit=%FF", 422),
        ("GET", "/sessions?cp_id=%FF%FE", 422),
        ("GET", "/sessions?status=" + "A" * 10_000, 422),
        ("GET", "/faults?limit=1&limit=x", 422),
        ("GET", "/faults?limit=0x10", 422),
        ("GET", "/api/feed?limit=0", 422),
        ("GET", "/cp/register", 404),  # an id like any other: no such CP
        ("GET", "/cp/CP-001/stop", 405),
        ("PUT", "/cp", 405),
        ("POST", "/cp", 405),
        ("DELETE", "/cp/CP-001", 405),
        ("PATCH", "/cp/register", 405),
        ("POST", "/health", 405),
        ("POST", "/sessions", 405),
        ("DELETE", "/faults", 405),
        ("POST", "/cp/CP-001", 405),
        ("OPTIONS", "/cp", 405),
    ],
)
async def test_odd_requests_are_4xx_json_never_500(
    shared: Shared, method: str, path: str, status: int
) -> None:
    response = await shared.client.request(method, path)
    code = {404: None, 405: "method_not_allowed", 422: "invalid_request"}[status]
    assert_error(response, status, code)


async def test_405_says_which_methods_are_allowed(client: httpx.AsyncClient) -> None:
    response = await client.delete("/cp")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"
    response = await client.get("/cp/CP-001/stop")
    assert response.headers["allow"] == "POST"


async def test_unknown_route_is_404_not_found(client: httpx.AsyncClient) -> None:
    body = assert_error(await client.get("/nope"), 404, "not_found")
    assert body["error"] == "Not Found"


@pytest.mark.parametrize(
    "query",
    [
        "limit=1&" + "&".join(f"p{i}=v" for i in range(2000)),
        "cp_id=CP-001&cp_id=bad%20id!",
        "%00=%00",
        "limit",
        "=&=&",
    ],
)
@pytest.mark.parametrize("path", ["/sessions", "/faults", "/cp/CP-001/history", "/cp"])
async def test_odd_query_strings_never_500(shared: Shared, path: str, query: str) -> None:
    response = await shared.client.get(f"{path}?{query}")
    assert response.status_code < 500
    if response.status_code >= 400:
        assert_client_error(response)
    else:
        assert isinstance(response.json(), list)


# ----------------------------------------------------------------------------- text as data


async def test_user_text_comes_back_as_json_data_unchanged(
    client: httpx.AsyncClient, controller: Controller, bus: RecordingPublisher
) -> None:
    response = await client.post("/cp/register", json={
        "cp_id": "CP-001", "location": XSS, "health_url": "javascript:alert(1)",
    })
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["cp"]["location"] == XSS
    await controller.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED))

    response = await client.post(
        "/cp/fault", json={"cp_id": "CP-001", "is_faulty": True, "reason": XSS}
    )
    assert response.json()["cp"]["fault_reason"] == XSS
    cp = (await client.get("/cp/CP-001")).json()
    assert (cp["location"], cp["fault_reason"]) == (XSS, XSS)
    assert (await client.get("/cp")).json()[0]["fault_reason"] == XSS
    (fault,) = (await client.get("/faults")).json()
    assert fault["reason"] == XSS

    await client.post("/cp/fault", json={"cp_id": "CP-001", "is_faulty": False})
    await controller.handle_status(CPStatus(cp_id="CP-001", state=CPState.ACTIVATED))
    response = await client.post("/cp/CP-001/stop", json={"reason": XSS})
    assert response.status_code == 200
    (command,) = commands(bus, CommandType.STOP_CP)
    assert command.payload.reason == XSS


async def test_unicode_text_round_trips(client: httpx.AsyncClient) -> None:
    location = "Estación Ñ — 充电站 🔌 \u202e"
    response = await client.post("/cp/register", json={"cp_id": "CP-001", "location": location})
    assert response.json()["cp"]["location"] == location
    assert (await client.get("/cp/CP-001")).json()["location"] == location


async def test_error_messages_carry_user_text_as_json_data(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/cp/fault", json={"cp_id": "a<b>c", "is_faulty": True, "reason": XSS}
    )
    assert_error(response, 422, "invalid_request")
    response = await client.get("/cp/CP-404")
    assert response.json()["error"] == "unknown CP 'CP-404'"


# ----------------------------------------------------------------------------- last resort


async def test_unexpected_exception_is_logged_and_answered_500_json(
    make_client: Factory, controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(**_: Any) -> list[Any]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(controller.repo, "list_faults", broken)
    records: list[str] = []
    sink = logger.add(lambda m: records.append(str(m)), level="ERROR", format="{message}")
    try:
        client = await make_client(raise_app_exceptions=False)
        response = await client.get("/faults")
    finally:
        logger.remove(sink)
    body = assert_error(response, 500, "internal")
    assert body == {"error": "internal error", "code": "internal"}
    assert "disk on fire" not in response.text
    assert any("GET /faults failed" in r and "disk on fire" in r for r in records)
    assert (await client.get("/stats")).json()["http_errors"] == 1


def test_create_api_returns_a_fastapi_app(controller: Controller) -> None:
    app = create_api(controller, api_token=TOKEN)
    assert isinstance(app, FastAPI)
    assert app.state.controller is controller


async def test_a_monitor_report_keeps_the_cp_monitored(
    client: httpx.AsyncClient, controller: Controller
) -> None:
    await activate(controller)
    assert (await client.get("/cp/CP-001")).json()["monitored"] is False
    response = await client.post("/cp/CP-001/monitor", json={"interval": 1.0, "healthy": True})
    assert response.status_code == 200
    assert response.json() == {"cp_id": "CP-001", "monitored": True}
    assert (await client.get("/cp/CP-001")).json()["monitored"] is True


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [("/cp/CP-404/monitor", {"interval": 1.0}, 404),
     ("/cp/CP-001/monitor", {"interval": 0}, 422),
     ("/cp/CP-001/monitor", {"interval": "soon"}, 422),
     ("/cp/CP-001/monitor", {}, 422)],
)
async def test_bad_monitor_reports_are_refused(
    client: httpx.AsyncClient, controller: Controller, path: str, body: object, status: int
) -> None:
    await activate(controller)
    response = await client.post(path, json=body)
    assert response.status_code == status
    assert set(response.json()) >= {"error", "code"}


async def test_a_fleet_registers_and_reports_many_cps_at_once(
    client: httpx.AsyncClient, controller: Controller, repo: SqliteRepository
) -> None:
    cps = [{"cp_id": f"CP-{i:05d}", "site": f"site-{i % 3}", "location": "Depot",
            "health_url": f"http://127.0.0.1:8100/cp/CP-{i:05d}/health"} for i in range(1, 101)]
    answer = await client.post("/fleet/register", json={"cps": cps})
    assert answer.status_code == 200
    assert answer.json() == {"ok": True, "count": 100, "new": 100, "unknown": []}
    again = await client.post("/fleet/register", json={"cps": cps[:10]})
    assert again.json()["new"] == 0
    assert len(await repo.load_cps()) == 100
    listed = await client.get("/cp", params={"site": "site-1"})
    assert int(listed.headers["x-total-count"]) == 34  # i % 3 == 1 for i in 1..100
    report = await client.post("/fleet/monitor", json={
        "interval": 5.0,
        "cps": [{"cp_id": "CP-00001", "healthy": True}, {"cp_id": "CP-99999"}],
    })
    assert report.json() == {"ok": True, "count": 2, "new": 0, "unknown": ["CP-99999"]}
    assert (await client.get("/cp/CP-00001")).json()["monitored"] is True
    assert (await client.get("/cp/CP-00002")).json()["monitored"] is False


@pytest.mark.parametrize(
    ("path", "body"),
    [("/fleet/register", {"cps": []}),
     ("/fleet/register", {"cps": [{"cp_id": "bad id"}]}),
     ("/fleet/monitor", {"interval": 5.0, "cps": []}),
     ("/fleet/monitor", {"interval": -1, "cps": [{"cp_id": "CP-1"}]})],
)
async def test_bad_fleet_bodies_are_422(
    client: httpx.AsyncClient, path: str, body: object
) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == 422
    assert set(response.json()) >= {"error", "code"}
