"""Any door (SPEC §9), its pure parts: the merges of network-wide answers, the directory's
choice of a CP's owner, the forwarding of a change with its loop guard and retries, and
the split of a fleet call by owner. The peers are faked (httpx.MockTransport); the
two-door tests over real controllers are in test_network_doors.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from evcharging.apps.ev_central.errors import NotOwner
from evcharging.apps.ev_central.events import Subscription
from evcharging.apps.ev_central.merging import (
    merge_cps,
    merge_fleet,
    merge_sites,
    merge_summaries,
)
from evcharging.apps.ev_central.network import FORWARDED, PARTIAL, Network, Relayed
from evcharging.apps.ev_central.ownership import Ownership
from evcharging.apps.ev_central.peer_feeds import PeerFeeds
from evcharging.apps.ev_central.peers import Directory, Peer
from evcharging.apps.ev_central.records import CentralRecord
from evcharging.apps.ev_central.repository import StorageError
from evcharging.apps.ev_central.schemas import FleetOut, SiteOut, SiteSummaryOut, SummaryOut
from evcharging.common.kafka import partition_for_key
from evcharging.common.states import CPState

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
PARTITIONS = 4
PEER_URL = "http://central-2.test"


def summary(cps: int, state: CPState, site: str | None, kw: float, **counts: int) -> SummaryOut:
    by_state = dict.fromkeys(CPState, 0)
    by_state[state] = cps
    supplying = cps if state is CPState.SUPPLYING else 0
    return SummaryOut(
        cps=cps, by_state=by_state,
        by_site=[SiteSummaryOut(site=site, cps=cps, supplying=supplying,
                                faulty=counts.get("faulty", 0), power_kw=kw)],
        supplying=supplying, power_kw=kw, active_sessions=counts.get("sessions", 0),
        faulty=counts.get("faulty", 0), unmonitored=counts.get("unmonitored", 0), ts=NOW,
    )


# ----------------------------------------------------------------------------- merges


def test_summaries_add_up_by_state_site_power_and_sessions() -> None:
    merged = merge_summaries([
        summary(3, CPState.SUPPLYING, "depot", 0.1, sessions=3),
        summary(2, CPState.SUPPLYING, "depot", 0.2, sessions=2, unmonitored=1),
        summary(4, CPState.FAULT, None, 0.0, faulty=4),
        summary(1, CPState.ACTIVATED, "mall", 0.0),
    ], NOW)
    assert merged.cps == 10
    assert merged.by_state[CPState.SUPPLYING] == 5
    assert merged.by_state[CPState.FAULT] == 4
    assert merged.by_state[CPState.ACTIVATED] == 1
    assert sum(merged.by_state.values()) == 10
    assert merged.supplying == 5
    assert merged.active_sessions == 5
    assert merged.faulty == 4
    assert merged.unmonitored == 1
    assert merged.power_kw == 0.3  # added in µkW: not 0.30000000000000004
    assert [(s.site, s.cps, s.supplying, s.faulty, s.power_kw) for s in merged.by_site] == [
        ("depot", 5, 5, 0, 0.3), ("mall", 1, 0, 0, 0.0), (None, 4, 0, 4, 0.0),
    ]
    assert merged.ts == NOW


def test_the_summary_of_one_part_is_that_part() -> None:
    own = summary(2, CPState.ACTIVATED, "depot", 0.0)
    assert merge_summaries([own], NOW).model_dump() == own.model_dump()


def test_sites_add_up_and_keep_the_network_limit() -> None:
    one = SiteOut(site="depot", limit_kw=50.0, allocated_kw=20.0, measured_kw=11.0, cps=2,
                  supplying=1)
    two = SiteOut(site="depot", limit_kw=50.0, allocated_kw=15.5, measured_kw=10.0, cps=3,
                  supplying=2)
    free = SiteOut(site="mall", limit_kw=None, allocated_kw=None, measured_kw=0.0, cps=1,
                   supplying=0)
    merged = merge_sites([[one, free], [two]])
    assert merged == [
        SiteOut(site="depot", limit_kw=50.0, allocated_kw=35.5, measured_kw=21.0, cps=5,
                supplying=3),
        free,
    ]


def test_cps_merge_by_id_once_each() -> None:
    mine = [{"cp_id": "CP-2", "at": "here"}, {"cp_id": "CP-9", "at": "here"}]
    theirs = [{"cp_id": "CP-1", "at": "there"}, {"cp_id": "CP-2", "at": "there"}]
    assert merge_cps([mine, theirs]) == [
        {"cp_id": "CP-1", "at": "there"}, {"cp_id": "CP-2", "at": "here"},
        {"cp_id": "CP-9", "at": "here"},
    ]


def test_fleet_answers_add_up() -> None:
    merged = merge_fleet([FleetOut(count=3, new=1, unknown=["a"]),
                          FleetOut(count=2, new=2, unknown=["b", "c"])])
    assert merged == FleetOut(count=5, new=3, unknown=["a", "b", "c"])


# ----------------------------------------------------------------------------- the directory


def cp_of(partition: int, prefix: str = "CP") -> str:
    """A CP id whose partition (of PARTITIONS) is `partition`."""
    return next(f"{prefix}-{n}" for n in range(10_000)
                if partition_for_key(f"{prefix}-{n}", range(PARTITIONS)) == partition)


def record(instance: str, partitions: set[int], *, age: float = 0.0,
           url: str = PEER_URL) -> CentralRecord:
    return CentralRecord(instance, url + "/", f"tx-{instance}", frozenset(partitions),
                         PARTITIONS, NOW - timedelta(seconds=age))


class Rows:
    """The ``centrals`` table as the directory reads it, with the reads counted."""

    def __init__(self, *rows: CentralRecord) -> None:
        self.rows = list(rows)
        self.reads = 0
        self.fail: Exception | None = None

    async def __call__(self) -> list[CentralRecord]:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        return list(self.rows)


def ownership(partitions: set[int]) -> Ownership:
    owner = Ownership("central-1", standalone=False)
    owner.assign(partitions, PARTITIONS)
    return owner


class Timer:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def directory(rows: Rows, owned: set[int], timer: Timer | None = None) -> Directory:
    return Directory(ownership(owned), rows, clock=lambda: NOW, timer=timer or Timer())


async def test_the_owner_is_this_instance_a_live_peer_or_nobody() -> None:
    rows = Rows(record("central-1", {0, 1}), record("central-2", {2}),
                record("central-3", {3}, age=30.0))  # central-3 stopped 30 s ago
    doors = directory(rows, {0, 1})
    assert await doors.owner_of(cp_of(0)) == doors.me
    assert await doors.owner_of(cp_of(2)) == Peer("central-2", PEER_URL)
    assert await doors.owner_of(cp_of(3)) is None
    assert doors.peers() == [Peer("central-2", PEER_URL)]  # not itself, not the stale one


async def test_a_miss_reads_the_rows_again_and_finds_the_new_owner() -> None:
    timer = Timer()
    rows = Rows(record("central-2", {2}))
    doors = directory(rows, {0, 1}, timer)
    assert await doors.owner_of(cp_of(3)) is None
    reads = rows.reads
    rows.rows.append(record("central-3", {3}, url="http://central-3.test"))
    found = await doors.owner_of(cp_of(3))  # the copy is fresh, but a miss reads again
    assert found == Peer("central-3", "http://central-3.test")
    assert rows.reads > reads
    reads = rows.reads
    await doors.owner_of(cp_of(2))
    await doors.owner_of(cp_of(3))
    assert rows.reads == reads  # hits within REFRESH_EVERY use the copy
    timer.now += 1.5
    await doors.owner_of(cp_of(2))
    assert rows.reads == reads + 1


async def test_a_database_that_fails_keeps_the_last_rows_logged_once(
    logs: list[tuple[str, str]],
) -> None:
    timer = Timer()
    rows = Rows(record("central-2", {2, 3}))
    doors = directory(rows, {0, 1}, timer)
    await doors.refresh()
    rows.fail = StorageError("database is down")
    for _ in range(3):
        timer.now += 2
        await doors.refresh()
    assert doors.owner(cp_of(2)) == Peer("central-2", PEER_URL)
    assert sum("could not be read" in message for _, message in logs) == 1


async def test_during_a_rebalance_nothing_is_owned_here() -> None:
    rows = Rows(record("central-2", {2, 3}))
    doors = directory(rows, {0, 1})
    doors.ownership.pause()
    assert await doors.owner_of(cp_of(0)) is None
    assert await doors.owner_of(cp_of(2)) == Peer("central-2", PEER_URL)


async def test_before_its_first_assignment_the_partition_is_counted_as_the_peers_do() -> None:
    rows = Rows(record("central-2", {0, 1, 2, 3}))
    doors = Directory(Ownership("central-1", standalone=False), rows, clock=lambda: NOW)
    for partition in range(PARTITIONS):
        assert await doors.owner_of(cp_of(partition)) == Peer("central-2", PEER_URL)


async def test_a_standalone_central_owns_every_cp_and_has_no_peers() -> None:
    doors = Directory(Ownership("solo"), Rows(), clock=lambda: NOW)
    assert await doors.owner_of(cp_of(3)) == doors.me
    assert doors.peers() == []


async def test_items_group_by_owner_in_their_order() -> None:
    doors = directory(Rows(record("central-2", {2})), {0, 1})
    items = [cp_of(0, "A"), cp_of(2, "B"), cp_of(3, "C"), cp_of(1, "D"), cp_of(2, "E")]
    groups = await doors.group(items, lambda cp_id: cp_id)
    assert groups == {doors.me: [items[0], items[3]],
                      Peer("central-2", PEER_URL): [items[1], items[4]], None: [items[2]]}


# ----------------------------------------------------------------------------- forwarding


class FakePeer:
    """central-2's API: answers with `reply` and records what it was sent."""

    def __init__(self, reply: Callable[[httpx.Request], httpx.Response]) -> None:
        self.reply = reply
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.reply(request)


def network(doors: Directory, peer: FakePeer, **options: Any) -> Network:
    client = httpx.AsyncClient(transport=httpx.MockTransport(peer))
    return Network(doors, token="tok", client=client, **options)


async def never() -> Any:
    raise AssertionError("ran here, but another Central owns the CP")


async def test_a_change_to_a_peers_cp_gets_the_owners_answer_as_it_is() -> None:
    peer = FakePeer(lambda request: httpx.Response(409, json={"error": "no", "code": "x"}))
    door = network(directory(Rows(record("central-2", {2})), {0, 1}), peer)
    cp_id = cp_of(2)
    answer = await door.change(cp_id, never, "POST", f"/cp/{cp_id}/stop", {"reason": "r"})
    assert answer == Relayed(409, {"error": "no", "code": "x"})
    [sent] = peer.requests
    assert sent.url == f"{PEER_URL}/cp/{cp_id}/stop"
    assert json.loads(sent.content) == {"reason": "r"}
    assert sent.headers[FORWARDED] == "central-1"
    assert sent.headers["authorization"] == "Bearer tok"
    assert door.stats["forwarded"] == 1
    await door.close()


async def test_a_change_to_an_own_cp_runs_here() -> None:
    peer = FakePeer(lambda request: httpx.Response(500))
    door = network(directory(Rows(record("central-2", {2})), {0, 1}), peer)

    async def here() -> str:
        return "done here"

    assert await door.change(cp_of(1), here, "POST", "/cp/x/stop") == "done here"
    assert peer.requests == []
    await door.close()


async def test_loop_guard_a_forwarded_change_is_never_forwarded_again() -> None:
    peer = FakePeer(lambda request: httpx.Response(200, json={}))
    door = network(directory(Rows(record("central-2", {2})), {0, 1}), peer)
    with pytest.raises(NotOwner):
        await door.change(cp_of(2), never, "POST", "/cp/x/stop", forwarded=True)
    assert peer.requests == []
    assert door.stats["forwarded_not_owner"] == 1
    await door.close()


async def test_a_stale_owner_that_says_not_owner_is_asked_again_after_a_reread() -> None:
    rows = Rows(record("central-2", {2}))
    answers = iter([httpx.Response(503, json={"error": "moving", "code": "not_owner"}),
                    httpx.Response(200, json={"ok": True})])
    peer = FakePeer(lambda request: next(answers))
    door = network(directory(rows, {0, 1}), peer)
    answer = await door.change(cp_of(2), never, "POST", "/cp/x/stop")
    assert answer == Relayed(200, {"ok": True})
    assert len(peer.requests) == 2
    assert rows.reads >= 2  # the 503 made the door read the rows again
    await door.close()


async def test_a_cp_nobody_owns_waits_then_answers_not_owner() -> None:
    peer = FakePeer(lambda request: httpx.Response(200, json={}))
    door = network(directory(Rows(record("central-2", {2})), {0, 1}), peer,
                   wait_for_owner=0.3)
    with pytest.raises(NotOwner):
        await door.change(cp_of(3), never, "POST", "/cp/x/stop")
    assert peer.requests == []
    await door.close()


async def test_a_fleet_call_is_split_by_owner_and_the_answers_added_up() -> None:
    peer = FakePeer(lambda request: httpx.Response(200, json=FleetOut(
        count=len(json.loads(request.content)["cps"]), new=1, unknown=["far"]).model_dump()))
    door = network(directory(Rows(record("central-2", {2, 3})), {0, 1}), peer)
    items = [cp_of(0, "A"), cp_of(2, "B"), cp_of(1, "C"), cp_of(3, "D")]
    here: list[list[str]] = []

    async def local(share: list[str]) -> FleetOut:
        here.append(share)
        return FleetOut(count=len(share), new=2, unknown=["near"])

    answer = await door.fleet(items, lambda cp_id: cp_id, local, "/fleet/register",
                              lambda share: {"cps": share})
    assert answer == FleetOut(count=4, new=3, unknown=["near", "far"])
    assert here == [[items[0], items[2]]]
    [sent] = peer.requests
    assert sent.url.path == "/fleet/register"
    assert json.loads(sent.content) == {"cps": [items[1], items[3]]}
    await door.close()


async def test_a_fleet_part_its_owner_refuses_is_the_answer() -> None:
    peer = FakePeer(lambda request: httpx.Response(
        409, json={"error": "full", "code": "too_many_cps"}))
    door = network(directory(Rows(record("central-2", {2, 3})), {0, 1}), peer)

    async def local(share: list[str]) -> FleetOut:
        return FleetOut(count=len(share))

    answer = await door.fleet([cp_of(0), cp_of(2)], lambda cp_id: cp_id, local,
                              "/fleet/register", lambda share: {"cps": share})
    assert answer == Relayed(409, {"error": "full", "code": "too_many_cps"})
    await door.close()


async def test_a_network_read_leaves_out_a_silent_peer_and_says_so(
    logs: list[tuple[str, str]],
) -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    rows = Rows(record("central-2", {2}), record("central-3", {3}, url="http://c3.test"))
    door = network(directory(rows, {0, 1}), FakePeer(reply))
    for _ in range(3):
        gathered = await door.gather("/summary")
        assert gathered.asked
        assert gathered.parts == {}
        assert sorted(gathered.missing) == ["central-2", "central-3"]
        assert gathered.headers == {PARTIAL: "central-2,central-3"}
    assert door.stats["peer_reads_partial"] == 3
    assert sum("does not answer" in message for _, message in logs) == 2  # once per peer
    await door.close()


async def test_with_no_peer_nothing_is_asked() -> None:
    peer = FakePeer(lambda request: httpx.Response(500))
    door = network(directory(Rows(record("central-1", {0, 1, 2, 3})), set(range(4))), peer)
    gathered = await door.gather("/cp")
    assert not gathered.asked
    assert peer.requests == []
    await door.close()


# ----------------------------------------------------------------------------- dashboards


def peer_feeds() -> tuple[PeerFeeds, Subscription]:
    doors = directory(Rows(record("central-2", {2, 3})), {0, 1})
    return PeerFeeds(Network(doors)), Subscription()


def test_a_peers_snapshot_sends_every_client_a_fresh_one_with_its_summary() -> None:
    feeds, subscription = peer_feeds()
    own = summary(1, CPState.ACTIVATED, "depot", 0.0)
    with feeds.attach(subscription):
        feeds._take(Peer("central-2", PEER_URL), {
            "type": "snapshot", "feed": [],
            "summary": summary(2, CPState.SUPPLYING, "depot", 7.5).model_dump(mode="json")})
        assert subscription.take().behind
        merged = feeds.summary(own, NOW)
    assert (merged.cps, merged.supplying, merged.power_kw) == (3, 2, 7.5)


def test_a_peers_delta_reaches_the_clients_as_their_own_changes() -> None:
    feeds, subscription = peer_feeds()
    cp = {"cp_id": "CP-far", "state": "SUPPLYING"}
    telemetry = {"cp_id": "CP-tel", "kw": 7.0}
    event = {"type": "fault", "cp_id": "CP-far", "reason": "x", "ts": "t"}
    with feeds.attach(subscription):
        feeds._take(Peer("central-2", PEER_URL), {
            "type": "delta", "cps": [cp], "telemetry": [telemetry], "events": [event],
            "summary": summary(4, CPState.ACTIVATED, None, 0.0).model_dump(mode="json")})
        delta = subscription.take()
    assert (delta.cps, delta.telemetry, delta.events) == ([cp], [telemetry], [event])
    assert feeds.summaries["central-2"].cps == 4
    feeds._take(Peer("central-2", PEER_URL), {"type": "delta", "cps": [cp]})
    assert not subscription.pending  # detached: nothing more


def test_a_change_of_ownership_sends_every_client_a_fresh_snapshot() -> None:
    doors = directory(Rows(), {0, 1})
    feeds = PeerFeeds(Network(doors), doors.ownership)
    subscription = Subscription()
    with feeds.attach(subscription):
        doors.ownership.assign({0, 1, 2}, PARTITIONS)
        assert subscription.take().behind


async def test_a_peer_that_claims_nothing_holds_no_cp_and_is_not_asked() -> None:
    rows = Rows(record("central-2", set()), record("central-3", {2, 3}, url="http://c3.test"))
    doors = directory(rows, {0, 1})
    await doors.refresh()
    assert doors.peers() == [Peer("central-3", "http://c3.test")]
