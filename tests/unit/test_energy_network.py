"""Smart charging across Centrals (SPEC §9, §10): the pure parts (merging the instances'
parts, what an absent peer keeps, the SET_LIMITs by owner, each owner's allocation, the
provisional share, the wire), then two real controllers, Energy jobs and APIs talking over
httpx's ASGI transport (no sockets), each owning half the partitions: a start at either
gets a provisional limit in its START_SUPPLY's flush, the leader plans the network and each
limit reaches its CP through the owner; the internal calls' refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from evcharging.apps.ev_central import writes
from evcharging.apps.ev_central.api import create_api
from evcharging.apps.ev_central.controller import CentralOptions
from evcharging.apps.ev_central.energy import Charging, Energy, Sent, SetLimit, plan
from evcharging.apps.ev_central.energy_network import (
    LIMITS_PATH,
    PART_PATH,
    REPLAN_PATH,
    ChargingOut,
    EnergyNetwork,
    Part,
    PartOut,
    allocated_by_owner,
    by_owner,
    merge_parts,
    provisional_share,
    reserve,
)
from evcharging.apps.ev_central.network import Network
from evcharging.apps.ev_central.peers import Directory
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPRegistration,
    CPState,
    CPStatus,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    new_id,
)
from tests.polling import poll
from tests.unit.conftest import FlushingController
from tests.unit.doors import Doors, cps_of, directory_rows, members, url
from tests.unit.fakes import RecordingPublisher


def charging(sid: str, cp: str, site: str | None = "S", cp_kw: float | None = 22.0,
             **fields: object) -> Charging:
    return Charging(session_id=sid, cp_id=cp, site=site, cp_kw=cp_kw,
                    **fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ the pure parts


def test_merge_parts_takes_each_session_once_with_its_owner_and_its_limit() -> None:
    own = Part("c1", (charging("s1", "A"), charging("s2", "B")), {"s1": Sent("A", 10.0)})
    peer = Part("c2", (charging("s2", "B"), charging("s3", "C")),
                {"s2": Sent("B", 7.0), "s3": Sent("C", 5.0)})
    union = merge_parts([own, peer])
    assert [s.session_id for s in union.sessions] == ["s1", "s2", "s3"]
    assert union.owner == {"s1": "c1", "s2": "c1", "s3": "c2"}  # the first part wins
    assert union.sent == {"s1": Sent("A", 10.0), "s3": Sent("C", 5.0)}


def test_an_absent_peer_keeps_its_limits_in_force_out_of_its_sites_limits() -> None:
    union = merge_parts([Part("c1", (charging("s1", "A"),), {})])
    absent = Part("c2", (
        charging("s2", "B"),                                   # in force: 12 kW
        charging("s3", "C", cp_kw=11.0),                       # none sent: its rate
        charging("s4", "D", cp_kw=None),                       # nothing known: 0
        charging("s1", "A"),                                   # taken over: in the union
        charging("s5", "E", site="T"),                         # a site without a limit
        charging("s6", "F", cp_kw=8.0),                        # its rate under its limit
    ), {"s2": Sent("B", 12.0), "s1": Sent("A", 30.0), "s6": Sent("F", 20.0)})
    assert reserve({"S": 40.0, "U": 5.0}, union, [absent]) == {"S": 40.0 - 12 - 11 - 8,
                                                               "U": 5.0}
    assert reserve({"S": 20.0}, union, [absent]) == {"S": 0.0}  # never below 0


def test_set_limits_go_by_owner_in_their_order() -> None:
    commands = [SetLimit("A", "s1", 10.0), SetLimit("B", "s2", None),
                SetLimit("C", "s3", 5.0), SetLimit("Z", "gone", 1.0)]
    owner = {"s1": "c1", "s2": "c2", "s3": "c1"}
    assert by_owner(commands, owner) == {
        "c1": [SetLimit("A", "s1", 10.0), SetLimit("C", "s3", 5.0)],
        "c2": [SetLimit("B", "s2", None)],
    }


def test_each_owner_gets_its_part_of_each_sites_allocation() -> None:
    union = merge_parts([
        Part("c1", (charging("s1", "A"), charging("s2", "B", site="T")), {}),
        Part("c2", (charging("s3", "C"),), {}),
    ])
    result = plan({"S": 30.0, "T": 15.0, "V": 9.0}, union.sessions, {})
    parts = allocated_by_owner(result.shares, union, ["S", "T", "V"], ["c1", "c2", "c3"])
    assert parts == {"c1": {"S": 15.0, "T": 15.0, "V": 0.0},
                     "c2": {"S": 15.0, "T": 0.0, "V": 0.0},
                     "c3": {"S": 0.0, "T": 0.0, "V": 0.0}}
    for site, kw in result.allocated.items():
        assert sum(part[site] for part in parts.values()) == pytest.approx(kw)


@pytest.mark.parametrize(("limit", "others", "new", "share"), [
    (40.0, [], 1, 40.0),                     # alone: the whole limit
    (40.0, [22.0], 1, 18.0),                 # what the other leaves free
    (40.0, [10.0], 1, 20.0),                 # an equal share
    (40.0, [20.0, 20.0], 1, 0.0),            # nothing free: 0 until the leader plans
    (40.0, [10.0, 10.0], 2, 10.0),           # two start: each its equal share
    (40.0, [5.0], 3, 10.0),                  # two start into 35 kW free: equal shares
    (10.0, [], 3, 3.333),                    # rounded down to the watt
    (30.0, [35.0], 1, 0.0),                  # the others draw more than the limit
])
def test_the_provisional_share(limit: float, others: list[float], new: int,
                               share: float) -> None:
    assert provisional_share(limit, others, new) == share


@given(limit=st.floats(0, 1000), others=st.lists(st.floats(0, 100), max_size=8),
       new=st.integers(1, 5))
def test_a_provisional_share_never_takes_the_site_over(limit: float, others: list[float],
                                                       new: int) -> None:
    share = provisional_share(limit, others, new)
    assert share >= 0
    assert share <= limit / (len(others) + new) + 1e-9
    assert sum(others) + new * share <= max(limit, sum(others)) + 1e-6


def test_provisional_share_refuses_no_new_session() -> None:
    with pytest.raises(ValueError, match="new must be at least 1"):
        provisional_share(40.0, [], 0)


def test_a_part_crosses_the_wire_as_it_is() -> None:
    departure = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)
    part = Part("c2", (charging("s1", "A", car_kw=11.0, kwh_left=20.0, departure=departure),
                       charging("s2", "B", cp_kw=None)), {"s1": Sent("A", 9.5)}, leader=True)
    out = PartOut(instance=part.instance, leader=part.leader, sessions=[
        ChargingOut.of(s, part.sent.get(s.session_id)) for s in part.sessions])
    assert PartOut.model_validate_json(out.model_dump_json()).part() == part


# ------------------------------------------------------------- two Centrals over ASGI

TOKEN = "energy-network-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SITE = "site-S"


@dataclass
class Central:
    instance: str
    controller: FlushingController
    bus: RecordingPublisher
    http: httpx.AsyncClient
    network: Network
    energy: Energy
    smart: EnergyNetwork

    def limits(self, since: int = 0) -> list[tuple[str, float | None]]:
        return [(c.cp_id, c.payload.kw) for c in self.bus.of(CentralCommand, since)
                if c.cmd is CommandType.SET_LIMIT]

    async def start(self, cp_id: str) -> str:
        request = DriverRequest(request_id=new_id(), driver_id="d", cp_id=cp_id)
        await self.controller.handle_request(request)
        update = await self.bus.wait_for(DriverUpdate,
                                         lambda u: u.request_id == request.request_id)
        assert update.status is DriverStatus.ACCEPTED and update.session_id
        await self.controller.handle_status(CPStatus(
            cp_id=cp_id, state=CPState.SUPPLYING, session_id=update.session_id,
            driver_id="d"))
        return update.session_id


@dataclass
class Two:
    one: Central
    two: Central
    doors: Doors


@pytest.fixture
async def two() -> AsyncIterator[Two]:
    doors = Doors()
    made: list[Central] = []
    async with members() as both:
        for member in both:
            name, controller = member.instance, member.controller
            network = Network(Directory(member.ownership, directory_rows()), token=TOKEN,
                              client=httpx.AsyncClient(transport=doors),
                              stats=controller.stats)
            energy = Energy(controller, interval=1.0)
            smart = EnergyNetwork(energy, network, token=TOKEN)
            app = create_api(controller, api_token=TOKEN, energy=energy, network=network)
            smart.mount(app)
            doors.apps[f"{name}.test"] = httpx.ASGITransport(app)
            for cp_id in cps_of(name, 2):
                await controller.register(CPRegistration(cp_id=cp_id, site=SITE,
                                                         kw_rate=22.0))
                await controller.handle_status(CPStatus(cp_id=cp_id, state=CPState.ACTIVATED))
            await energy.load({SITE: 40.0})
            made.append(Central(name, controller, member.bus,
                                httpx.AsyncClient(transport=doors, base_url=url(name)),
                                network, energy, smart))
        one, other = made
        other.energy.leader = False  # SQLite always holds the lock: central-1 allocates here
        for central in made:
            assert await central.smart.tick()  # each sees the other: the network plans
        yield Two(one, other, doors)
        for central in made:
            await central.http.aclose()
            await central.energy.close()
            await central.network.close()


async def test_starts_at_either_central_share_the_site_through_the_owners(two: Two) -> None:
    one, other = two.one, two.two
    [a1, a2], [b1] = cps_of("central-1", 2), cps_of("central-2", 1)
    await one.start(a1)
    # Alone at the site: its provisional limit is the whole limit, kept by the plan (22 kW
    # is all its CP takes).
    assert one.limits() == [(a1, 40.0)]
    await other.smart.tick()  # the other learns of it (every interval)
    mark1, mark2 = len(one.bus.messages), len(other.bus.messages)
    await other.start(b1)
    # The non-leader's start: what the first leaves free (18 kW) in its START_SUPPLY's
    # flush, then the leader's plan reaches both CPs through their owners.
    assert other.limits(mark2)[0] == (b1, 18.0)
    await poll(lambda: other.limits(mark2)[1:] == [(b1, 20.0)] and
               one.limits(mark1) == [(a1, 20.0)], timeout=5,
               what="the leader's 20 kW at both owners")
    assert other.controller.stats["energy_replans_requested"] == 1
    assert one.controller.stats["set_limits_forwarded"] == 1
    # /sites: each instance's part of the allocation; both doors agree on the whole.
    for central in (one, other):
        [row] = (await central.http.get("/sites")).json()
        assert (row["limit_kw"], row["allocated_kw"], row["supplying"]) == (40.0, 40.0, 2)
        [local] = (await central.http.get("/sites", params={"scope": "local"})).json()
        assert local["allocated_kw"] == 20.0
    # The part the leader reads from the other.
    part = PartOut.model_validate((await other.http.get(PART_PATH, headers=AUTH)).json())
    assert [(s.cp_id, s.kw) for s in part.sessions] == [(b1, 20.0)]
    assert not part.leader
    # A start at the leader while the other does not answer: the other's 20 kW stay out
    # of the limit, its CP is not touched, the leader's two share the rest.
    two.doors.down.add("central-2.test")
    mark1, mark2 = len(one.bus.messages), len(other.bus.messages)
    await one.start(a2)
    await poll(lambda: len(one.limits(mark1)) == 3, timeout=5, what="the leader's plan")
    assert one.limits(mark1)[0] == (a2, 0.0)  # provisional: 20 + 20 leave nothing free
    assert sorted(one.limits(mark1)[1:]) == sorted([(a1, 10.0), (a2, 10.0)])
    assert await one.smart.replan() == 0  # in force: nothing changes
    assert other.limits(mark2) == []
    assert one.controller.stats["peer_reads_partial"] >= 1
    # It answers again; a session ends at it: the leader is asked and shares anew.
    two.doors.down.clear()
    mark1, mark2 = len(one.bus.messages), len(other.bus.messages)
    await other.controller.handle_status(CPStatus(cp_id=b1, state=CPState.ACTIVATED))
    await poll(lambda: sorted(one.limits(mark1)) == sorted([(a1, 20.0), (a2, 20.0)]),
               timeout=5, what="the leader's two at 20 kW after the end at the other")
    assert other.limits(mark2) == []


async def test_internal_calls_refuse_what_is_not_theirs(two: Two) -> None:
    one, other = two.one, two.two
    theirs = cps_of("central-2", 1)[0]
    answer = await one.http.post(LIMITS_PATH, headers=AUTH, json={
        "limits": [{"cp_id": theirs, "session_id": "s-1", "kw": 5.0}]})
    assert answer.status_code == 503
    assert answer.json()["code"] == "not_owner"
    assert one.limits() == []
    answer = await other.http.post(REPLAN_PATH, headers=AUTH, params={"site": SITE})
    assert answer.status_code == 409
    assert answer.json()["code"] == "not_leader"
    assert (await one.http.post(REPLAN_PATH, headers=AUTH)).status_code == 202
    for path, method in ((PART_PATH, "GET"), (LIMITS_PATH, "POST"), (REPLAN_PATH, "POST")):
        refused = await one.http.request(method, path, json={"limits": []})
        assert refused.status_code == 401, (path, refused.text)
    # Limits for a session that already ended are skipped, not sent.
    mine = cps_of("central-1", 1)[0]
    answer = await one.http.post(LIMITS_PATH, headers=AUTH, json={
        "limits": [{"cp_id": mine, "session_id": "s-gone", "kw": 5.0}]})
    assert answer.json() == {"queued": 0, "skipped": 1}
    schema = (await one.http.get("/openapi.json")).json()
    assert not any(path.startswith("/energy") for path in schema["paths"])


async def test_one_central_alone_plans_as_before() -> None:
    repo = SqliteRepository(":memory:")
    await repo.open()
    bus = RecordingPublisher()
    controller = FlushingController(bus, repo, CentralOptions(start_timeout=30.0))
    network = Network(None, stats=controller.stats)  # SQLite: no directory of peers
    energy = Energy(controller, interval=1.0)
    smart = EnergyNetwork(energy, network)
    try:
        for cp_id in ("CP-1", "CP-2"):
            await controller.register(CPRegistration(cp_id=cp_id, site=SITE, kw_rate=22.0))
            await controller.handle_status(CPStatus(cp_id=cp_id, state=CPState.ACTIVATED))
        await energy.load({SITE: 30.0})
        assert not await smart.tick()
        central = Central("central", controller, bus, httpx.AsyncClient(), network, energy,
                          smart)
        await central.start("CP-1")
        await central.start("CP-2")
        # Energy's own plan, in the START_SUPPLY's flush: 22 kW, then 15 kW each.
        first, *shares = central.limits()
        assert (first, sorted(shares)) == (("CP-1", 22.0), [("CP-1", 15.0), ("CP-2", 15.0)])
        assert controller.stats["set_limits_provisional"] == 0
        await central.http.aclose()
    finally:
        await energy.close()
        await network.close()
        await controller.close()
        await repo.close()


async def test_a_limit_removed_at_the_other_door_frees_every_session(two: Two) -> None:
    one, other = two.one, two.two
    [a1], [b1] = cps_of("central-1", 1), cps_of("central-2", 1)
    await one.start(a1)
    await other.smart.tick()
    await other.start(b1)
    await poll(lambda: (a1, 20.0) in one.limits() and (b1, 20.0) in other.limits(),
               timeout=5, what="20 kW each")
    mark1, mark2 = len(one.bus.messages), len(other.bus.messages)
    # The Centrals share one database (SPEC §9); here each has its own: the removal
    # reaches the leader's too.
    await one.controller.repo.apply([writes.SiteLimitRemoved(SITE)])
    answer = await other.http.delete(f"/sites/{SITE}/limit", headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert other.limits(mark2) == [(b1, None)]  # its own at once
    # The leader, asked, reads the limits again and frees its own.
    await poll(lambda: one.limits(mark1) == [(a1, None)], timeout=5,
               what="the leader frees its session")
    assert SITE not in one.energy.limits
    assert other.limits(mark2) == [(b1, None)]  # once


async def test_a_new_leader_plans_from_the_limits_in_force(two: Two) -> None:
    one, other = two.one, two.two
    [a1], [b1] = cps_of("central-1", 1), cps_of("central-2", 1)
    await one.start(a1)
    await other.smart.tick()
    await other.start(b1)
    await poll(lambda: (b1, 20.0) in other.limits(), timeout=5, what="20 kW at b1")
    # central-1 loses the lock, central-2 takes it: central-2 plans the network now.
    one.energy.leader, other.energy.leader = False, True
    await one.smart.tick()
    mark1, mark2 = len(one.bus.messages), len(other.bus.messages)
    await one.start(cps_of("central-1", 2)[1])
    await poll(lambda: len(one.limits(mark1)) == 3 and len(other.limits(mark2)) == 1,
               timeout=5, what="the new leader's plan through both owners")
    a2 = cps_of("central-1", 2)[1]
    assert one.limits(mark1)[0] == (a2, 0.0)  # provisional: 20 + 20 leave nothing free
    assert sorted(one.limits(mark1)[1:]) == sorted([(a1, 13.333), (a2, 13.333)])
    assert other.limits(mark2) == [(b1, 13.333)]
    assert other.controller.stats["set_limits_forwarded"] == 2
