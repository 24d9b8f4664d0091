"""Site limits over Central's HTTP API (SPEC §10, §5): PUT and DELETE /sites/{site}/limit,
GET /sites, the bodies they refuse and the protection every mutating call has."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from evcharging.apps.ev_central.api import create_api
from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.energy import Energy
from evcharging.apps.ev_central.metrics import central_metrics
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPRegistration,
    CPState,
    CPStatus,
    CPTelemetry,
    DriverRequest,
    DriverUpdate,
)
from tests.unit.fakes import RecordingPublisher
from tests.unit.http_helpers import AUTH, REMOTE, TOKEN, assert_error, client_for


async def supplying(controller: Controller, bus: RecordingPublisher, cp_id: str,
                    site: str) -> str:
    await controller.register(CPRegistration(cp_id=cp_id, site=site, kw_rate=22.0))
    await controller.handle_status(CPStatus(cp_id=cp_id, state=CPState.ACTIVATED))
    await controller.handle_request(DriverRequest(request_id=f"r-{cp_id}", driver_id="d",
                                                  cp_id=cp_id))
    update = await bus.wait_for(DriverUpdate, lambda u: u.cp_id == cp_id)
    assert update.session_id is not None
    return update.session_id


def set_limits(bus: RecordingPublisher) -> list[tuple[str, float | None]]:
    return [(c.cp_id, c.payload.kw) for c in bus.of(CentralCommand)
            if c.cmd is CommandType.SET_LIMIT]


async def test_put_get_delete(controller: Controller, energy: Energy,
                              bus: RecordingPublisher, repo: SqliteRepository) -> None:
    await supplying(controller, bus, "CP-1", "site-A")
    await supplying(controller, bus, "CP-2", "site-A")
    await controller.register(CPRegistration(cp_id="CP-3", site="site-B"))
    async with client_for(create_api(controller, energy=energy)) as client:
        listed = (await client.get("/sites")).json()
        assert [s["site"] for s in listed] == ["site-A", "site-B"]
        assert listed[0] == {"site": "site-A", "limit_kw": None, "allocated_kw": None,
                             "measured_kw": 0.0, "cps": 2, "supplying": 0}
        response = await client.put("/sites/site-A/limit", json={"kw": 30})
        assert response.status_code == 200, response.text
        assert response.json()["limit_kw"] == 30.0
        assert response.json()["allocated_kw"] == 30.0
        assert sorted(set_limits(bus)) == [("CP-1", 15.0), ("CP-2", 15.0)]
        assert await repo.load_site_limits() == {"site-A": 30.0}
        # A limit for a site no CP has yet is listed too.
        assert (await client.put("/sites/site-Z/limit", json={"kw": 0})).status_code == 200
        listed = {s["site"]: s for s in (await client.get("/sites")).json()}
        assert listed.keys() == {"site-A", "site-B", "site-Z"}
        assert listed["site-Z"]["cps"] == 0
        response = await client.delete("/sites/site-A/limit")
        assert response.status_code == 200, response.text
        assert response.json()["limit_kw"] is None
        assert sorted(set_limits(bus)[-2:]) == [("CP-1", None), ("CP-2", None)]
        assert await repo.load_site_limits() == {"site-Z": 0.0}
        # Removing a limit twice is fine and sends nothing more.
        before = len(set_limits(bus))
        assert (await client.delete("/sites/site-A/limit")).status_code == 200
        assert len(set_limits(bus)) == before


@pytest.mark.parametrize("body", [
    {}, {"kw": -1}, {"kw": "lots"}, {"kw": None}, {"kw": 1e12}, [66], "66",
])
async def test_bad_bodies_get_422(controller: Controller, energy: Energy, body: Any) -> None:
    async with client_for(create_api(controller, energy=energy)) as client:
        assert_error(await client.put("/sites/site-A/limit", json=body), 422,
                     "invalid_request")
    assert energy.limits == {}


async def test_non_finite_and_bad_site_names_get_422(controller: Controller,
                                                    energy: Energy) -> None:
    async with client_for(create_api(controller, energy=energy)) as client:
        response = await client.put("/sites/site-A/limit", content=b'{"kw": NaN}',
                                    headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert_error(await client.put("/sites/" + "s" * 65 + "/limit", json={"kw": 1}), 422,
                     "invalid_request")
    assert energy.limits == {}


async def test_limits_need_the_token_like_every_change(controller: Controller,
                                                       energy: Energy) -> None:
    async with client_for(create_api(controller, api_token=TOKEN, energy=energy)) as client:
        assert_error(await client.put("/sites/site-A/limit", json={"kw": 5}), 401,
                     "unauthorized")
        assert_error(await client.delete("/sites/site-A/limit"), 401, "unauthorized")
        assert (await client.get("/sites")).status_code == 200  # reads need none
        assert (await client.put("/sites/site-A/limit", json={"kw": 5},
                                 headers=AUTH)).status_code == 200
    assert energy.limits == {"site-A": 5.0}


async def test_without_a_token_remote_clients_may_not_set_limits(
    controller: Controller, energy: Energy
) -> None:
    async with client_for(create_api(controller, energy=energy), REMOTE) as client:
        assert_error(await client.put("/sites/site-A/limit", json={"kw": 5}), 403,
                     "forbidden")
        assert_error(await client.delete("/sites/site-A/limit"), 403, "forbidden")
        assert (await client.get("/sites")).status_code == 200
    assert energy.limits == {}


async def test_site_gauges(controller: Controller, energy: Energy,
                           bus: RecordingPublisher) -> None:
    sid = await supplying(controller, bus, "CP-1", "site-A")
    await controller.register(CPRegistration(cp_id="CP-2", site="site-B"))
    await controller.handle_status(CPStatus(cp_id="CP-1", state=CPState.SUPPLYING,
                                            session_id=sid, driver_id="d"))
    await controller.handle_telemetry(CPTelemetry(cp_id="CP-1", kw=9.5, kwh=0.1, euros=0.0,
                                                  session_id=sid))
    await energy.set_limit("site-A", 12.0)
    samples = {
        f"{family.name}:{sample.labels['site']}": sample.value
        for family in text_string_to_metric_families(
            central_metrics(controller, energy=energy, process=False).render().decode())
        if family.name.startswith("evcharging_site_")
        for sample in family.samples
    }
    assert samples == {
        "evcharging_site_limit_watts:site-A": 12_000.0,
        "evcharging_site_allocated_watts:site-A": 12_000.0,
        "evcharging_site_measured_watts:site-A": 9_500.0,
        "evcharging_site_measured_watts:site-B": 0.0,
    }
