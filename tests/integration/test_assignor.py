"""The same-partition assignor on a real broker (SPEC §9): two consumers of one group get
disjoint partitions that cover the three topics Central reads, partition p of each on the same
consumer; one that joins takes only what balance needs from the others; when one stops, the
others keep theirs and share its partitions."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from evcharging.common.assignor import SamePartitionAssignor
from tests.polling import poll

pytestmark = pytest.mark.integration

PARTITIONS = 12
SESSION_TIMEOUT_MS = 6000  # the broker's smallest (group.min.session.timeout.ms)
ALL = range(PARTITIONS)


@pytest.fixture
async def topics(kafka_bootstrap: str) -> list[str]:
    prefix = f"assignor-{uuid.uuid4().hex[:8]}."
    names = [prefix + t for t in ("driver.requests", "cp.status", "cp.telemetry")]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names])
    finally:
        await admin.close()
    return names


class Member:
    """A consumer of the group that keeps reading (as Central does) until stopped."""

    def __init__(self, bootstrap: str, group: str, topics: list[str], name: str,
                 *, static: bool = False) -> None:
        self.assignor = SamePartitionAssignor(name)
        self.consumer = AIOKafkaConsumer(
            *topics, bootstrap_servers=bootstrap, group_id=group, client_id=name,
            group_instance_id=name if static else None,
            partition_assignment_strategy=(self.assignor,), enable_auto_commit=False,
            heartbeat_interval_ms=300, session_timeout_ms=SESSION_TIMEOUT_MS,
        )
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            with contextlib.suppress(KafkaError):
                await self.consumer.getmany(timeout_ms=200)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        await self.consumer.stop()

    def owned(self) -> dict[str, set[int]]:
        """topic -> partitions this consumer is assigned now."""
        out: dict[str, set[int]] = {}
        for tp in self.consumer.assignment():
            out.setdefault(tp.topic, set()).add(tp.partition)
        return out


@pytest.fixture(params=[False, True], ids=["dynamic", "static"])
async def members(
    kafka_bootstrap: str, topics: list[str], request: pytest.FixtureRequest,
) -> AsyncIterator[list[Member]]:
    """Three members of a new group; "static" ones have a group_instance_id (their name), as
    each Central has: the broker then waits for the session timeout before it hands a
    stopped member's partitions to the others (a static member leaves no LeaveGroup)."""
    group = f"assignor-{uuid.uuid4().hex[:8]}"
    made = [Member(kafka_bootstrap, group, topics, f"central-{n}", static=request.param)
            for n in ("a", "b", "c")]
    yield made
    for member in made:
        await member.stop()


def together(member: Member, topics: list[str]) -> set[int] | None:
    """The partition numbers of ``member`` if it holds the same ones of every topic."""
    owned = member.owned()
    numbers = [owned.get(t, set()) for t in topics]
    return numbers[0] if all(n == numbers[0] for n in numbers) else None


async def test_two_consumers_share_every_partition_with_p_together(
    members: list[Member], topics: list[str],
) -> None:
    a, b, c = members
    await a.start()
    await poll(lambda: together(a, topics) == set(ALL), timeout=60,
               what="the only member to own every partition of the three topics")

    await b.start()

    def split(*group: Member) -> list[set[int]] | None:
        """Each member's partition numbers, once they hold p of every topic together,
        disjoint, covering all 12, none empty."""
        held = [together(m, topics) for m in group]
        if any(not h for h in held):
            return None
        numbers = [h for h in held if h]
        covered = set().union(*numbers)
        return numbers if covered == set(ALL) and sum(map(len, numbers)) == PARTITIONS else None

    mine, theirs = await poll(lambda: split(a, b), timeout=60,
                              what="the two members to split the 12 partitions")
    assert len(mine) == len(theirs) == PARTITIONS // 2
    assert a.assignor.owned == mine and b.assignor.owned == theirs
    for topic in topics:  # every partition of every topic once, p of each on one member
        assert a.owned()[topic] | b.owned()[topic] == set(ALL)
        assert not a.owned()[topic] & b.owned()[topic]

    await c.start()  # sticky: a and b each give up only 2 of their 6
    a3, b3, c3 = await poll(lambda: split(a, b, c), timeout=60,
                            what="the three members to split the 12 partitions")
    assert len(a3) == len(b3) == len(c3) == 4
    assert a3 <= mine and b3 <= theirs

    await c.stop()  # a and b keep theirs and share c's
    a2, b2 = await poll(lambda: split(a, b), timeout=60, what="the two to share c's partitions")
    assert a3 <= a2 and b3 <= b2 and len(a2) == len(b2) == 6

    await b.stop()
    await poll(lambda: together(a, topics) == set(ALL), timeout=60,
               what="the remaining member to own every partition again")
    assert a.assignor.owned == set(ALL)
