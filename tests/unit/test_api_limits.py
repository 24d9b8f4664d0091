"""Central's HTTP API at its limits (SPEC §5), over a real Controller and SQLite: 409 past
CENTRAL_MAX_CPS, 429 for an address that failed the token 20 times within 10 s, /summary
from the tally, and /health within 2 s while a long write holds the database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from evcharging.apps.ev_central.api import create_api
from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.metrics import central_metrics
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.apps.ev_central.schemas import summarise
from evcharging.common.messages import CPStatus, utcnow
from evcharging.common.metrics import PREFIX
from evcharging.common.states import CPState
from evcharging.common.throttle import AuthThrottle
from tests.unit.conftest import FlushingController
from tests.unit.fakes import RecordingPublisher
from tests.unit.http_helpers import AUTH, LOOPBACK, REMOTE, TOKEN, assert_error, client_for

OTHER = ("192.0.2.8", 50000)
WRONG = {"Authorization": "Bearer wrong"}


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def controller(bus: RecordingPublisher, repo: SqliteRepository) -> AsyncIterator[Controller]:
    central = FlushingController(bus, repo, CentralOptions(max_cps=3))
    yield central
    await central.close()


def sample(metrics_text: str, name: str) -> float:
    """The value of one series line (``name{labels}``) of a Prometheus page."""
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the page")


# ---------------------------------------------------------------------- 409


async def test_registering_past_max_cps_is_409_and_updates_are_not(
    controller: Controller,
) -> None:
    async with client_for(create_api(controller)) as client:
        for n in range(3):
            response = await client.post("/cp/register", json={"cp_id": f"CP-{n}"})
            assert response.status_code == 200
        await controller.handle_status(CPStatus(cp_id="BUS-1", state=CPState.ACTIVATED))
        body = assert_error(await client.post("/cp/register", json={"cp_id": "CP-3"}), 409,
                            "too_many_cps")
        assert "CENTRAL_MAX_CPS" in body["error"] and "3" in body["error"]
        assert_error(await client.post("/cp/register", json={"cp_id": "BUS-1"}), 409,
                     "too_many_cps")
        update = await client.post("/cp/register", json={"cp_id": "CP-1", "location": "x"})
        assert update.status_code == 200 and update.json()["cp"]["location"] == "x"
        assert (await client.get("/cp/CP-3")).status_code == 404
    assert controller.stats["registrations_refused"] == 2


async def test_fleet_registration_past_max_cps_is_409_and_takes_nothing(
    controller: Controller,
) -> None:
    async with client_for(create_api(controller)) as client:
        first = await client.post("/fleet/register", json={"cps": [{"cp_id": "CP-0"}]})
        assert first.json() == {"ok": True, "count": 1, "new": 1, "unknown": []}
        batch = {"cps": [{"cp_id": f"CP-{n}", "site": "north"} for n in range(4)]}
        body = assert_error(await client.post("/fleet/register", json=batch), 409,
                            "too_many_cps")
        assert "3 new refused, 2 free" in body["error"]
        assert sorted(controller.cps) == ["CP-0"] and controller.cps["CP-0"].site is None
        batch = {"cps": [{"cp_id": f"CP-{n}", "site": "north"} for n in range(3)]}
        taken = await client.post("/fleet/register", json=batch)
        assert taken.status_code == 200 and taken.json()["new"] == 2


def test_the_openapi_document_names_409_and_429(controller: Controller) -> None:
    paths = create_api(controller, api_token=TOKEN).openapi()["paths"]
    for path in ("/cp/register", "/fleet/register"):
        assert {"409", "429"} <= set(paths[path]["post"]["responses"])
    assert "429" in paths["/cp/fault"]["post"]["responses"]


# ---------------------------------------------------------------------- 429


async def test_an_address_failing_the_token_20_times_in_10s_gets_429_for_10s(
    controller: Controller,
) -> None:
    clock = Clock()
    app = create_api(controller, api_token=TOKEN, auth_throttle=AuthThrottle(clock=clock))
    register = {"cp_id": "CP-1"}
    async with client_for(app, REMOTE) as client, client_for(app, OTHER) as other:
        for _ in range(19):
            clock.now += 0.5
            assert_error(await client.post("/cp/register", json=register, headers=WRONG),
                         401, "unauthorized")
        clock.now += 0.4  # the 20th failure, 9.9 s after the first
        assert_error(await client.post("/cp/register", json=register), 401, "unauthorized")
        blocked_at = clock.now

        refused = await client.post("/cp/register", json=register, headers=AUTH)
        body = assert_error(refused, 429, "too_many_requests")
        assert refused.headers["retry-after"] == "10" and "10s" in body["error"]
        clock.now = blocked_at + 9.5
        refused = await client.post("/cp/CP-1/stop", headers=AUTH)
        assert_error(refused, 429, "too_many_requests")
        assert refused.headers["retry-after"] == "1"
        # reads stay open, and another address is not concerned
        assert (await client.get("/cp")).status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await other.post("/cp/register", json=register, headers=AUTH)).status_code == 200

        clock.now = blocked_at + 10.0  # 10 s from the 20th failure: free again
        assert (await client.post("/cp/register", json=register, headers=AUTH)).status_code \
            == 200
        assert_error(await client.post("/cp/register", json=register, headers=WRONG), 401,
                     "unauthorized")  # and its count starts again from zero
    assert controller.stats["auth_failures:http"] == 21
    assert controller.stats["auth_throttled:http"] == 2
    page = (central_metrics(controller, process=False).render()).decode()
    assert sample(page, PREFIX + 'auth_failures_total{plane="http"}') == 21
    assert sample(page, PREFIX + 'auth_throttled_total{plane="http"}') == 2
    assert sample(page, PREFIX + 'auth_throttled_total{plane="tcp"}') == 0


async def test_slow_failures_are_never_throttled(controller: Controller) -> None:
    clock = Clock()
    app = create_api(controller, api_token=TOKEN, auth_throttle=AuthThrottle(clock=clock))
    async with client_for(app, REMOTE) as client:
        for _ in range(60):
            clock.now += 0.6  # 17 within any 10 s
            assert (await client.post("/cp/register", json={"cp_id": "X"})).status_code == 401


async def test_without_a_token_nothing_is_throttled(controller: Controller) -> None:
    clock = Clock()
    app = create_api(controller, auth_throttle=AuthThrottle(clock=clock))
    async with client_for(app, REMOTE) as remote, client_for(app, LOOPBACK) as local:
        for _ in range(25):  # protected mode refuses; no token was failed
            assert_error(await remote.post("/cp/register", json={"cp_id": "X"}), 403,
                         "forbidden")
        assert (await local.post("/cp/register", json={"cp_id": "X"})).status_code == 200


def test_every_central_app_has_a_throttle_by_default(controller: Controller) -> None:
    policy = create_api(controller, api_token=TOKEN).state.access
    assert isinstance(policy.throttle, AuthThrottle)
    assert (policy.throttle.failures, policy.throttle.window, policy.throttle.block) == (
        20, 10.0, 10.0)


# ---------------------------------------------------------------------- /summary


async def test_summary_is_the_tally_and_equals_a_recount(controller: Controller) -> None:
    async with client_for(create_api(controller)) as client:
        await client.post("/cp/register", json={"cp_id": "CP-1", "site": "north"})
        await controller.handle_status(CPStatus(cp_id="BUS-1", state=CPState.STOPPED))
        summary = (await client.get("/summary")).json()
        recount = summarise(controller.cps.values(), utcnow()).model_dump(mode="json")
        assert {k: v for k, v in summary.items() if k != "ts"} == {
            k: v for k, v in recount.items() if k != "ts"}
        assert summary["cps"] == 2 and summary["by_state"]["STOPPED"] == 1


# ---------------------------------------------------------------------- /health


async def test_the_database_probe_answers_in_time_behind_a_long_write(
    repo: SqliteRepository,
) -> None:
    assert await repo.probe(within=1.0) == (True, False)
    held = asyncio.Event()
    release = asyncio.Event()

    async def long_write() -> None:
        async with repo._lock:  # as a big transaction holds the one connection
            held.set()
            await release.wait()

    writer = asyncio.create_task(long_write())
    try:
        await held.wait()
        started = time.perf_counter()
        assert await repo.probe(within=0.2) == (True, True)  # busy, still usable
        assert time.perf_counter() - started < 1.0
        repo.write_error = "database is locked"
        assert await repo.probe(within=0.2) == (False, False)  # the last write failed
        repo.write_error = None
    finally:
        release.set()
        await writer
    assert await repo.probe(within=1.0) == (True, False)


async def test_health_answers_within_2s_while_a_long_write_holds_the_database(
    controller: Controller, repo: SqliteRepository,
) -> None:
    """The probe main.py gives create_api, shaped as there: the database part is bounded."""

    async def health() -> dict[str, Any]:
        db_ok, busy = await repo.probe(within=1.0)
        return {"status": "ok" if db_ok else "degraded", "kafka": {"connected": True},
                "database": {"ok": db_ok, "busy": busy}}

    held = asyncio.Event()
    release = asyncio.Event()

    async def long_write() -> None:
        async with repo._lock:
            held.set()
            await release.wait()

    writer = asyncio.create_task(long_write())
    try:
        await held.wait()
        async with client_for(create_api(controller, health=health)) as client:
            started = time.perf_counter()
            response = await client.get("/health")
            assert time.perf_counter() - started < 2.0
        assert response.status_code == 200
        assert response.json()["database"] == {"ok": True, "busy": True}
    finally:
        release.set()
        await writer
