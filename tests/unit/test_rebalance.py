"""The rebalance logic (SPEC §9) with Kafka faked: what an instance gives up, what it takes
over, and what it settles for a crashed one. The database is a real SQLite file (the
repository's adapter), the transactional bus an in-memory one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from aiokafka import TopicPartition

from evcharging.apps.ev_central import controller as controller_module
from evcharging.apps.ev_central import writes
from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.errors import NotOwner
from evcharging.apps.ev_central.outbox import PendingFlush
from evcharging.apps.ev_central.ownership import Ownership
from evcharging.apps.ev_central.rebalance import Rebalancer, Self
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.common.kafka import partition_for_key
from evcharging.common.messages import (
    CentralCommand,
    CommandType,
    CPRegistration,
    CPState,
    CPStatus,
    DriverRequest,
    StatusEvent,
    utcnow,
)
from tests.polling import poll
from tests.unit.fakes import TransactionalBus

PARTITIONS = 4
TOPICS = ("driver.requests", "cp.status", "cp.telemetry")


def cp_on(partition: int, n: int = 0) -> str:
    """The n-th CP id (CP-…) that Kafka's partitioner puts on `partition`."""
    found = [f"CP-{i:04d}" for i in range(10_000)
             if partition_for_key(f"CP-{i:04d}", range(PARTITIONS)) == partition]
    return found[n]


def tps(*partitions: int) -> frozenset[TopicPartition]:
    return frozenset(TopicPartition(t, p) for t in TOPICS for p in partitions)


class Instance:
    """One Central's controller and rebalancer over a shared database and Kafka."""

    def __init__(self, name: str, repo: SqliteRepository, kafka: TransactionalBus,
                 fenced: list[str]) -> None:
        self.kafka = kafka
        self.controller = Controller(kafka, repo, CentralOptions(start_timeout=0.2),
                                     ownership=Ownership(name, standalone=False))

        async def fence(transactional_id: str) -> None:
            fenced.append(transactional_id)

        self.rebalancer = Rebalancer(
            self.controller, Self(name, f"http://{name}", f"g-central-{name}", "g-central"),
            read_committed=kafka.read_committed, fence=fence,
            partition_count=lambda: PARTITIONS)

    async def assign(self, *partitions: int) -> dict[TopicPartition, int]:
        return dict(await self.rebalancer.assigned(tps(*partitions)))


@pytest.fixture
async def shared(tmp_path: object) -> AsyncIterator[tuple[SqliteRepository, TransactionalBus]]:
    async with SqliteRepository(":memory:") as repo:
        yield repo, TransactionalBus()


async def split(repo: SqliteRepository, kafka: TransactionalBus
                ) -> tuple[Instance, Instance, list[str]]:
    """c-1 owns partitions 0 and 1, c-2 owns 2 and 3; the ids either fenced."""
    fenced: list[str] = []
    one = Instance("c-1", repo, kafka, fenced)
    two = Instance("c-2", repo, kafka, fenced)
    await one.assign(0, 1)
    await two.assign(2, 3)
    return one, two, fenced


async def register(instance: Instance, *cp_ids: str) -> None:
    for cp_id in cp_ids:
        await instance.controller.register(CPRegistration(cp_id=cp_id))
        await instance.controller.handle_status(CPStatus(
            cp_id=cp_id, state=CPState.ACTIVATED, event=StatusEvent.CONNECT))
    await instance.controller.flush()


async def test_an_instance_owns_and_loads_only_the_cps_of_its_partitions(
    shared: tuple[SqliteRepository, TransactionalBus],
) -> None:
    repo, kafka = shared
    fenced: list[str] = []
    one = Instance("c-1", repo, kafka, fenced)
    await one.assign(0, 1, 2, 3)
    a, b = cp_on(0), cp_on(3)
    await register(one, a, b)
    # A second instance joins: c-1 releases everything, then keeps 0 and 1.
    two = Instance("c-2", repo, kafka, fenced)
    await one.rebalancer.revoked()
    assert not one.controller.ownership.owns(a)  # nothing decided while rebalancing
    # Asked while nothing is owned, the stop waits for the assignment instead of refusing.
    stopping = asyncio.create_task(one.controller.stop_cp(a))
    await one.assign(0, 1)
    assert (await stopping).cp_id == a
    await two.assign(2, 3)
    assert fenced == []  # c-1 gave them up cleanly: nobody fences it
    assert set(one.controller.cps) == {a} and set(two.controller.cps) == {b}
    assert two.controller.cps[b].state is CPState.ACTIVATED  # loaded from the database
    with pytest.raises(NotOwner):
        await one.controller.stop_cp(b)
    await two.controller.stop_cp(b)
    centrals = {c.instance: c.partitions for c in await repo.load_centrals()}
    assert centrals == {"c-1": frozenset({0, 1}), "c-2": frozenset({2, 3})}


async def test_a_change_waits_for_a_rebalance_only_so_long(
    shared: tuple[SqliteRepository, TransactionalBus], monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, kafka = shared
    monkeypatch.setattr(controller_module, "OWNER_WAIT", 0.05)
    one = Instance("c-1", repo, kafka, [])
    with pytest.raises(NotOwner):  # no assignment yet (a Central that is starting)
        await one.controller.register(CPRegistration(cp_id=cp_on(0)))


async def test_a_crashed_instances_last_flush_is_sent_once_by_its_successor(
    shared: tuple[SqliteRepository, TransactionalBus],
) -> None:
    repo, kafka = shared
    one, two, fenced = await split(repo, kafka)
    cp = cp_on(2)
    await register(two, cp)
    # c-2 records a flush (a session accepted) and dies before Kafka has it.
    kafka.failures = 1_000_000
    await two.controller.handle_request(DriverRequest(request_id="r-1", driver_id="d",
                                                      cp_id=cp))
    two.controller.outbox.consumed(("driver.requests", 2), 8)
    tried = kafka.attempts
    flushing = asyncio.create_task(two.controller.outbox.flush())
    await poll(lambda: kafka.attempts >= tried + 2, timeout=5.0, what="two failed attempts")
    flushing.cancel()
    await asyncio.gather(flushing, return_exceptions=True)
    kafka.failures = 0
    before = len(kafka.commits)
    # The group gives c-1 everything.
    await one.rebalancer.revoked()
    start = await one.assign(0, 1, 2, 3)
    assert fenced == ["g-central-c-2"]
    resent = kafka.commits[before]
    assert [type(m).__name__ for m in resent[0]][:1] == ["DriverUpdate"]
    assert any(isinstance(m, CentralCommand) and m.cmd is CommandType.START_SUPPLY
               for m in resent[0])
    assert resent[1][("driver.requests", 2)] == 8
    assert start[TopicPartition("driver.requests", 2)] == 8  # read on after the flush
    assert await repo.load_flushes() == {}  # settled: never sent again
    assert {c.instance: c.partitions for c in await repo.load_centrals()}["c-2"] == frozenset()
    assert one.controller.cps[cp].session is not None  # the session, loaded as running
    # Another rebalance sends nothing again.
    await one.rebalancer.revoked()
    count = len(kafka.commits)
    await one.assign(0, 1, 2, 3)
    assert [c for c in kafka.commits[count:] if c[0]] == []


async def test_a_crashed_instances_flush_that_kafka_has_is_not_sent_again(
    shared: tuple[SqliteRepository, TransactionalBus],
) -> None:
    repo, kafka = shared
    one, two, fenced = await split(repo, kafka)
    await register(two, cp_on(3))
    two.controller.outbox.consumed(("cp.status", 3), 5)
    await two.controller.outbox.flush()
    assert (await repo.load_flushes())["c-2"]  # its last flush, and Kafka has it
    sent = len(kafka.sent)
    await one.rebalancer.revoked()  # c-2 is gone without a word
    await one.assign(0, 1, 2, 3)
    assert fenced == ["g-central-c-2"] and len(kafka.sent) == sent
    assert await repo.load_flushes() == {}


async def test_a_start_watchdog_lets_a_session_go_when_its_cp_moved(
    shared: tuple[SqliteRepository, TransactionalBus],
) -> None:
    repo, kafka = shared
    one = Instance("c-1", repo, kafka, [])
    await one.assign(0, 1, 2, 3)
    cp = cp_on(1)
    await register(one, cp)
    await one.controller.handle_request(DriverRequest(request_id="r-1", driver_id="d",
                                                      cp_id=cp))
    await one.controller.flush()  # START_SUPPLY left: its start timeout runs
    session = one.controller.cps[cp].session
    assert session is not None
    await one.rebalancer.revoked()
    await one.assign(0)  # CP's partition 1 went to another instance
    assert cp not in one.controller.cps
    assert session.session_id not in one.controller._watchdogs  # cancelled, not fired
    await one.controller.close()  # waits for the start timeouts' tasks to end
    assert one.controller.stats["start_timeouts"] == 0
    rows = await repo.active_sessions()
    assert [r.session_id for r in rows] == [session.session_id]  # the new owner's to end


async def test_the_membership_row_says_where_the_instance_answers(
    shared: tuple[SqliteRepository, TransactionalBus],
) -> None:
    repo, kafka = shared
    one = Instance("c-1", repo, kafka, [])
    await one.assign(1, 3)
    row = one.rebalancer.row()
    assert (row.instance, row.peer_url, row.partitions, row.partition_count) == (
        "c-1", "http://c-1", frozenset({1, 3}), PARTITIONS)
    assert abs(row.seen_at - utcnow()) < timedelta(seconds=5)
    await repo.apply([writes.PendingSaved("c-1", PendingFlush("c-1:x:1", {}, ()).token,
                                          "[]", "[]")])
    await one.rebalancer.leave()  # a clean stop: nothing pending
    assert await repo.load_flushes() == {}
    assert (await repo.load_centrals())[0].partitions == frozenset()
