"""Partition assignment that keeps partition ``p`` of every topic on one member (SPEC §9).

Central's topics are keyed by ``cp_id`` and have the same number of partitions, so partition
``p`` of ``driver.requests``, ``cp.status`` and ``cp.telemetry`` holds the same CPs; the
instance that owns those CPs must read ``p`` of each. aiokafka's default round-robin assignor
spreads the partitions of all topics one by one and does not keep them together.

The unit of assignment is a *partition number* ``p`` (0 ≤ p < the largest partition count
of the subscribed topics); whoever owns ``p`` gets partition ``p`` of every topic it
subscribes to. :func:`assign_partitions` is the pure core:

- **Balanced**: with ``n`` partition numbers and ``m`` members, each member owns
  ``n // m`` or ``n // m + 1`` of them.
- **Deterministic**: the result depends only on the members (their ``name``, then member
  id, as the order; their subscriptions; the partitions they report owning) and the
  partition counts, not on the order the broker lists the members in. ``name`` is what the
  member calls itself (Central's instance id, also its ``group_instance_id``): broker-given
  member ids change on every restart, names do not.
- **Sticky**: each member reports the partition numbers it owns (in the JoinGroup metadata's
  user data) and keeps as many of them as its balanced share allows, its lowest-numbered ones
  first; the members that report the most get the shares with one more. So a member that joins
  takes partitions only from members above the new share, one that leaves hands its own to
  the others and nobody else's move, and a balanced group that rebalances without a change
  keeps its assignment. A partition number two members claim (a member that was thrown out
  and comes back) stays with the first of them in the order. Partitions nobody keeps go, in
  ascending order, round-robin to the members below their share, in the order; in a new group
  that is ``p mod m``.

Members are expected to subscribe to the same topics (Central's do). If some member does not
subscribe to a topic, partition ``p`` of that topic goes to the owner of ``p`` if it
subscribes to it, else to subscriber number ``p mod k`` (of the ``k`` that do, in the order):
still every partition once, but no longer together.

:class:`SamePartitionAssignor` is the aiokafka adapter: one *instance* per consumer (it
carries the member's name and what it owns), passed as
``partition_assignment_strategy=(SamePartitionAssignor(instance_id),)``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from loguru import logger

__all__ = [
    "ASSIGNOR_NAME",
    "Assignment",
    "Member",
    "SamePartitionAssignor",
    "assign_partitions",
    "partition_numbers",
]

ASSIGNOR_NAME = "evcharging-same-partition"
"""The protocol name every member of the group must offer (Kafka picks one all offer)."""

Assignment = dict[str, dict[str, list[int]]]
"""member id -> topic -> partitions, ascending; every member has an entry."""


@dataclass(frozen=True)
class Member:
    """One group member as the assignment sees it."""

    member_id: str
    name: str
    topics: frozenset[str]
    owned: frozenset[int] = frozenset()
    """The partition numbers it owned before this rebalance (what it reported)."""

    @property
    def order(self) -> tuple[str, str]:
        return (self.name, self.member_id)


def assign_partitions(members: Iterable[Member], partition_counts: Mapping[str, int]) -> Assignment:
    """Give each partition number to one member, balanced, deterministic and sticky (see the
    module's text); ``partition_counts`` is topic -> number of partitions (topics nobody
    subscribes to are ignored)."""
    ordered = sorted(members, key=lambda m: m.order)
    if len({m.member_id for m in ordered}) != len(ordered):
        raise ValueError("member ids must be unique")
    result: Assignment = {m.member_id: {} for m in ordered}
    subscribed = sorted({t for m in ordered for t in m.topics if partition_counts.get(t, 0) > 0})
    if not subscribed:
        return result
    owner = _owners(ordered, max(partition_counts[t] for t in subscribed))
    topics_of = {m.member_id: m.topics for m in ordered}
    for topic in subscribed:
        subscribers = [m.member_id for m in ordered if topic in m.topics]
        for p in range(partition_counts[topic]):
            holder = owner[p]
            if topic not in topics_of[holder]:
                holder = subscribers[p % len(subscribers)]
            result[holder].setdefault(topic, []).append(p)
    return result


def _owners(ordered: list[Member], numbers: int) -> dict[int, str]:
    """Partition number -> member id, for members in their order and ``numbers`` partitions."""
    base, extra = divmod(numbers, len(ordered))
    claimed: dict[str, list[int]] = {}
    taken: set[int] = set()
    for m in ordered:
        mine = sorted(p for p in m.owned if 0 <= p < numbers and p not in taken)
        claimed[m.member_id] = mine
        taken.update(mine)
    by_claim = sorted(ordered, key=lambda m: (-len(claimed[m.member_id]), m.order))
    share = {m.member_id: base + (1 if i < extra else 0) for i, m in enumerate(by_claim)}
    owner: dict[int, str] = {}
    for m in ordered:
        for p in claimed[m.member_id][: share[m.member_id]]:
            owner[p] = m.member_id
    held = Counter(owner.values())
    ids = [m.member_id for m in ordered]
    turn = 0
    for p in range(numbers):
        if p in owner:
            continue
        while held[ids[turn]] >= share[ids[turn]]:
            turn = (turn + 1) % len(ids)
        owner[p] = ids[turn]
        held[ids[turn]] += 1
        turn = (turn + 1) % len(ids)
    return owner


def partition_numbers(assignment: Mapping[str, Iterable[int]]) -> set[int]:
    """The partition numbers in one member's assignment (topic -> partitions)."""
    return {p for partitions in assignment.values() for p in partitions}


# --------------------------------------------------------------------------- aiokafka


def encode_user_data(name: str, owned: Iterable[int]) -> bytes:
    """What a member tells the group leader: its name and the partition numbers it owns."""
    return json.dumps({"name": name, "owned": sorted(owned)}, separators=(",", ":")).encode()


def decode_member(member_id: str, metadata: Any) -> Member:
    """A :class:`Member` from a JoinGroup member's metadata; one whose user data is not ours
    (another client, another version) is named by its member id and owns nothing."""
    topics = frozenset(metadata.subscription)
    try:
        raw = json.loads(metadata.user_data)
        name, owned = raw["name"], raw["owned"]
        if not isinstance(name, str) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in owned
        ):
            raise TypeError("name must be a string and owned a list of integers")
        return Member(member_id, name, topics, frozenset(owned))
    except (ValueError, TypeError, KeyError) as exc:
        logger.warning("group member {} sent assignor data that is not {}'s ({}: {}); "
                       "it is ordered by its member id and owns nothing",
                       member_id, ASSIGNOR_NAME, type(exc).__name__, exc)
        return Member(member_id, member_id, topics)


class SamePartitionAssignor(AbstractPartitionAssignor):  # type: ignore[misc]  # aiokafka has no types
    """aiokafka's side of :func:`assign_partitions`; one instance per consumer.

    aiokafka declares ``assign``, ``metadata`` and ``on_assignment`` as class methods and
    calls them on whatever object is in ``partition_assignment_strategy``; instance methods
    keep each consumer's name and owned partitions apart (two consumers in one process, as
    in the tests, would share class state).
    """

    name = ASSIGNOR_NAME
    version = 0

    def __init__(self, member_name: str) -> None:
        if not member_name:
            raise ValueError("a member needs a name (Central's instance id)")
        self.member_name = member_name
        self.owned: frozenset[int] = frozenset()
        """The partition numbers of the last assignment this member received."""

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(
            self.version, sorted(topics), encode_user_data(self.member_name, self.owned)
        )

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.owned = frozenset(p for _, partitions in assignment.assignment for p in partitions)

    def assign(
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        decoded = [decode_member(member_id, meta) for member_id, meta in members.items()]
        counts: dict[str, int] = {}
        for topic in sorted({t for m in decoded for t in m.topics}):
            partitions = cluster.partitions_for_topic(topic)
            if partitions is None:
                logger.warning("no partition metadata for topic {}: not assigned", topic)
                continue
            counts[topic] = len(partitions)
        result = assign_partitions(decoded, counts)
        logger.info("assigned partitions {}", {
            m.name: sorted(partition_numbers(result[m.member_id]))
            for m in sorted(decoded, key=lambda m: m.order)
        })
        return {
            member_id: ConsumerProtocolMemberAssignment(
                self.version, sorted(result[member_id].items()), b""
            )
            for member_id in members
        }

    def __repr__(self) -> str:
        return f"SamePartitionAssignor({self.member_name!r}, owned={sorted(self.owned)})"
