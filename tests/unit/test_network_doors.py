"""Any door (SPEC §9) over two real Centrals' controllers and APIs, each with its own
in-memory repository and recording publisher, owning half the partitions. Their HTTP
APIs talk to each other through httpx's ASGI transport (no sockets); the ``centrals``
rows are given. Whatever door a call comes in by, the answer is the one Central would
give, and a change happens at the CP's owner only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from evcharging.apps.ev_central.api import create_api
from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.ctl import ControlClient
from evcharging.apps.ev_central.network import FORWARDED, Network
from evcharging.apps.ev_central.peers import Directory
from evcharging.apps.ev_central.tcp_server import TcpControlServer
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPRegistration,
    CPState,
    CPStatus,
)
from tests.unit.doors import Doors, cps_of, directory_rows, members, url
from tests.unit.fakes import RecordingPublisher


@dataclass
class Central:
    instance: str
    controller: Controller
    bus: RecordingPublisher
    http: httpx.AsyncClient
    network: Network

    def stops(self) -> list[CentralCommand]:
        return [c for c in self.bus.of(CentralCommand) if c.cmd is CommandType.STOP_CP]


@pytest.fixture
async def centrals() -> AsyncIterator[dict[str, Central]]:
    doors = Doors()
    made: dict[str, Central] = {}
    async with members() as both:
        for member in both:
            name, controller = member.instance, member.controller
            network = Network(Directory(member.ownership, directory_rows()),
                              client=httpx.AsyncClient(transport=doors),
                              stats=controller.stats, wait_for_owner=0.5)
            doors.apps[f"{name}.test"] = httpx.ASGITransport(
                create_api(controller, network=network))
            made[name] = Central(name, controller, member.bus,
                                 httpx.AsyncClient(transport=doors, base_url=url(name)),
                                 network)
        for central in made.values():
            for cp_id in cps_of(central.instance, 3):
                await central.controller.register(CPRegistration(cp_id=cp_id, site="depot"))
                await central.controller.handle_status(CPStatus(cp_id=cp_id,
                                                                state=CPState.ACTIVATED))
        yield made
        for central in made.values():
            await central.http.aclose()
            await central.network.close()


async def test_a_stop_sent_to_the_non_owner_reaches_the_owner(
    centrals: dict[str, Central],
) -> None:
    one, two = centrals["central-1"], centrals["central-2"]
    cp_id = cps_of("central-2", 1)[0]
    answer = await one.http.post(f"/cp/{cp_id}/stop", json={"reason": "maintenance"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["sent"] == "STOP_CP"
    assert answer.json()["cp"]["cp_id"] == cp_id
    assert [(c.cp_id, c.payload.reason) for c in two.stops()] == [(cp_id, "maintenance")]
    assert one.stops() == []
    assert one.controller.stats["forwarded"] == 1


async def test_the_owners_refusal_comes_back_as_it_is(centrals: dict[str, Central]) -> None:
    one = centrals["central-1"]
    unknown = cps_of("central-2", 1, prefix="NOPE")[0]
    answer = await one.http.post(f"/cp/{unknown}/resume")
    assert answer.status_code == 404
    assert answer.json()["code"] == "unknown_cp"
    assert (await one.http.get(f"/cp/{unknown}")).status_code == 404


async def test_a_forwarded_change_for_a_cp_it_does_not_own_is_refused(
    centrals: dict[str, Central],
) -> None:
    one, two = centrals["central-1"], centrals["central-2"]
    cp_id = cps_of("central-2", 1)[0]
    answer = await one.http.post(f"/cp/{cp_id}/stop", headers={FORWARDED: "central-2"})
    assert answer.status_code == 503
    assert answer.json()["code"] == "not_owner"
    assert one.stops() == two.stops() == []


async def test_every_door_answers_for_every_cp(centrals: dict[str, Central]) -> None:
    every = sorted(cps_of("central-1", 3) + cps_of("central-2", 3))
    pages = {}
    for central in centrals.values():
        listed = await central.http.get("/cp")
        assert listed.headers["X-Total-Count"] == "6"
        assert [cp["cp_id"] for cp in listed.json()] == every
        page = await central.http.get("/cp", params={"limit": 2, "offset": 3})
        assert page.headers["X-Total-Count"] == "6"
        assert [cp["cp_id"] for cp in page.json()] == every[3:5]
        pages[central.instance] = [cp["cp_id"] for cp in page.json()]
        summary = (await central.http.get("/summary")).json()
        assert summary["cps"] == 6
        assert summary["by_state"]["ACTIVATED"] == 6
        assert summary["by_site"][0]["site"] == "depot"
        assert summary["by_site"][0]["cps"] == 6
        local = (await central.http.get("/summary", params={"scope": "local"})).json()
        assert local["cps"] == 3
        assert len((await central.http.get("/sites")).json()) == 1
        for cp_id in every:
            one = await central.http.get(f"/cp/{cp_id}")
            assert one.status_code == 200
            assert one.json()["state"] == "ACTIVATED"
    assert pages["central-1"] == pages["central-2"]


async def test_registrations_and_fleet_calls_reach_their_owners(
    centrals: dict[str, Central],
) -> None:
    one, two = centrals["central-1"], centrals["central-2"]
    theirs = cps_of("central-2", 5, prefix="NEW")[3:]
    mine = cps_of("central-1", 5, prefix="NEW")[3:]
    answer = await one.http.post("/cp/register", json={"cp_id": theirs[0], "site": "mall"})
    assert answer.status_code == 200
    assert theirs[0] in two.controller.cps
    assert theirs[0] not in one.controller.cps
    fleet = await two.http.post("/fleet/register", json={"cps": [
        {"cp_id": cp_id} for cp_id in [*mine, theirs[1]]]})
    assert fleet.status_code == 200
    assert fleet.json()["count"] == 3
    assert fleet.json()["new"] == 3
    assert set(mine) <= set(one.controller.cps)
    monitor = await one.http.post("/fleet/monitor", json={"interval": 5, "cps": [
        {"cp_id": cp_id} for cp_id in [*mine, *theirs, "GONE-1"]]})
    assert monitor.status_code == 200
    assert monitor.json()["count"] == 5
    assert monitor.json()["unknown"] == ["GONE-1"]


async def test_the_tcp_plane_of_any_door_commands_any_cp(
    centrals: dict[str, Central],
) -> None:
    one, two = centrals["central-1"], centrals["central-2"]
    cp_id = cps_of("central-2", 1)[0]
    async with (TcpControlServer(one.controller, "127.0.0.1", 0, network=one.network) as tcp,
                ControlClient("127.0.0.1", tcp.port) as client):
        answer: dict[str, Any] = await client.request({"cmd": "STOP_CP", "cp_id": cp_id})
        assert answer["ok"] is True, answer
        assert answer["sent"] == "STOP_CP"
        assert answer["cp"]["cp_id"] == cp_id
        status = await client.request({"cmd": "STATUS", "cp_id": cp_id})
        assert status["ok"] is True
        assert status["cp"]["cp_id"] == cp_id
        every = await client.request({"cmd": "STATUS"})
        assert every["total"] == 6
        ping = await client.request({"cmd": "PING"})
        assert ping["cps"] == 6
        unknown = await client.request({"cmd": "RESUME_CP", "cp_id": "NOPE-404"})
        assert unknown["ok"] is False
        assert unknown["code"] in {"unknown_cp", "not_owner"}
    assert [c.cp_id for c in two.stops()] == [cp_id]
    assert one.stops() == []
