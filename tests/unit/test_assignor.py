"""The same-partition assignor's pure core (SPEC §9): partition p of every topic on one
member, disjoint and covering, balanced, deterministic and sticky; and its aiokafka side."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from evcharging.common.assignor import (
    ASSIGNOR_NAME,
    Assignment,
    Member,
    SamePartitionAssignor,
    assign_partitions,
    decode_member,
    partition_numbers,
)

TOPICS = ("driver.requests", "cp.status", "cp.telemetry")


def members_from(names: list[str], owned: list[set[int]] | None = None,
                 topics: tuple[str, ...] = TOPICS) -> list[Member]:
    owned = owned or [set() for _ in names]
    return [Member(f"id-{i}", name, frozenset(topics), frozenset(mine))
            for i, (name, mine) in enumerate(zip(names, owned, strict=True))]


def numbers_of(result: Assignment) -> dict[str, set[int]]:
    return {member_id: partition_numbers(topics) for member_id, topics in result.items()}


def check_invariants(members: list[Member], counts: dict[str, int], result: Assignment) -> None:
    """Every member has an entry; every partition of every subscribed topic goes to exactly
    one member; with one subscription for all, partition p of every topic is on one member
    and the partition numbers are spread within one of each other."""
    assert set(result) == {m.member_id for m in members}
    subscribed = {t for m in members for t in m.topics if counts.get(t, 0) > 0}
    given_out = Counter((t, p) for topics in result.values() for t, ps in topics.items()
                        for p in ps)
    assert set(given_out) == {(t, p) for t in subscribed for p in range(counts[t])}
    assert set(given_out.values()) <= {1}
    for topics in result.values():
        for t, ps in topics.items():
            assert ps == sorted(ps) and t in subscribed
    if len({m.topics for m in members}) == 1 and subscribed:
        owners: dict[int, str] = {}
        for member_id, topics in result.items():
            for ps in topics.values():
                for p in ps:
                    assert owners.setdefault(p, member_id) == member_id, f"p={p} split"
        sizes = [len(ns) for ns in numbers_of(result).values()]
        assert max(sizes) - min(sizes) <= 1


# --------------------------------------------------------------------------- strategies

names = st.text(alphabet="abc", min_size=1, max_size=2)


@st.composite
def groups(draw: st.DrawFn, same_counts: bool = True) -> tuple[list[Member], dict[str, int]]:
    n_members = draw(st.integers(1, 7))
    member_names = draw(st.lists(names, min_size=n_members, max_size=n_members))
    owned = draw(st.lists(st.sets(st.integers(0, 30), max_size=12),
                          min_size=n_members, max_size=n_members))
    if same_counts:
        count = draw(st.integers(0, 24))
        counts = dict.fromkeys(TOPICS, count)
    else:
        counts = {t: draw(st.integers(0, 24)) for t in TOPICS}
    return members_from(member_names, owned), counts


# --------------------------------------------------------------------------- properties


@settings(max_examples=400)
@given(groups())
def test_disjoint_covering_together_and_balanced(group: tuple[list[Member], dict[str, int]]
                                                 ) -> None:
    members, counts = group
    check_invariants(members, counts, assign_partitions(members, counts))


@settings(max_examples=200)
@given(groups(same_counts=False))
def test_topics_of_different_sizes_are_still_covered_once(
    group: tuple[list[Member], dict[str, int]],
) -> None:
    members, counts = group
    result = assign_partitions(members, counts)
    check_invariants(members, counts, result)
    # each p is still on one member: the topics that have p follow the owner of p
    owners: dict[int, str] = {}
    for member_id, topics in result.items():
        for ps in topics.values():
            for p in ps:
                assert owners.setdefault(p, member_id) == member_id


@settings(max_examples=200)
@given(groups(), st.randoms(use_true_random=False))
def test_the_order_the_broker_lists_members_in_does_not_matter(
    group: tuple[list[Member], dict[str, int]], rnd: random.Random,
) -> None:
    members, counts = group
    shuffled = list(members)
    rnd.shuffle(shuffled)
    assert assign_partitions(shuffled, counts) == assign_partitions(members, counts)


@settings(max_examples=200)
@given(groups())
def test_a_balanced_group_that_rebalances_without_a_change_keeps_its_assignment(
    group: tuple[list[Member], dict[str, int]],
) -> None:
    members, counts = group
    first = numbers_of(assign_partitions(members, counts))
    again = [Member(m.member_id, m.name, m.topics, frozenset(first[m.member_id]))
             for m in members]
    assert numbers_of(assign_partitions(again, counts)) == first


@settings(max_examples=300)
@given(groups(), names)
def test_a_member_that_joins_takes_only_what_balance_needs(
    group: tuple[list[Member], dict[str, int]], newcomer: str,
) -> None:
    members, counts = group
    before = numbers_of(assign_partitions(members, counts))
    settled = [Member(m.member_id, m.name, m.topics, frozenset(before[m.member_id]))
               for m in members]
    joined = [*settled, Member("id-new", newcomer, frozenset(TOPICS))]
    after = numbers_of(assign_partitions(joined, counts))
    check_invariants(joined, counts, assign_partitions(joined, counts))
    for m in members:  # each keeps as many of its own as its new share allows
        kept = before[m.member_id] & after[m.member_id]
        assert len(kept) == min(len(before[m.member_id]), len(after[m.member_id]))
        assert after[m.member_id] <= before[m.member_id]  # and gains none while one joins
    # the shares with one more stay with those who had them: the newcomer gets the smaller one
    assert len(after["id-new"]) == max(counts.values()) // len(joined)


@settings(max_examples=300)
@given(groups(), st.data())
def test_when_a_member_leaves_only_its_partitions_move(
    group: tuple[list[Member], dict[str, int]], data: st.DataObject,
) -> None:
    members, counts = group
    if len(members) < 2:
        return
    before = numbers_of(assign_partitions(members, counts))
    leaving = data.draw(st.sampled_from(members))
    staying = [Member(m.member_id, m.name, m.topics, frozenset(before[m.member_id]))
               for m in members if m is not leaving]
    after = numbers_of(assign_partitions(staying, counts))
    for m in staying:
        assert before[m.member_id] <= after[m.member_id]


@settings(max_examples=200)
@given(groups())
def test_claims_beyond_the_partitions_or_of_others_are_ignored(
    group: tuple[list[Member], dict[str, int]],
) -> None:
    members, counts = group  # owned sets are random: overlapping, too large, out of range
    result = numbers_of(assign_partitions(members, counts))
    n = max(counts.values())
    assert set().union(*result.values()) == set(range(n))


# --------------------------------------------------------------------------- examples


def test_a_new_group_deals_partition_numbers_round_robin_by_name() -> None:
    members = members_from(["central-b", "central-a", "central-c"])  # id-0 is b
    result = numbers_of(assign_partitions(members, dict.fromkeys(TOPICS, 12)))
    assert result == {"id-1": {0, 3, 6, 9}, "id-0": {1, 4, 7, 10}, "id-2": {2, 5, 8, 11}}


def test_twelve_partitions_over_five_members() -> None:
    members = members_from(["a", "b", "c", "d", "e"])
    sizes = {k: len(v) for k, v in numbers_of(
        assign_partitions(members, dict.fromkeys(TOPICS, 12))).items()}
    assert sizes == {"id-0": 3, "id-1": 3, "id-2": 2, "id-3": 2, "id-4": 2}


def test_a_second_instance_takes_half_and_the_first_keeps_its_lowest_six() -> None:
    counts = dict.fromkeys(TOPICS, 12)
    alone = assign_partitions(members_from(["central-a"]), counts)
    assert alone["id-0"] == {t: list(range(12)) for t in sorted(TOPICS)}
    both = members_from(["central-a", "central-b"], [set(range(12)), set()])
    assert numbers_of(assign_partitions(both, counts)) == {
        "id-0": set(range(6)), "id-1": set(range(6, 12))}


def test_the_same_name_twice_is_ordered_by_member_id() -> None:
    twins = [Member("m-2", "central", frozenset(TOPICS)), Member("m-1", "central",
                                                                  frozenset(TOPICS))]
    result = numbers_of(assign_partitions(twins, dict.fromkeys(TOPICS, 4)))
    assert result == {"m-1": {0, 2}, "m-2": {1, 3}}


def test_a_contested_partition_stays_with_the_first_by_name() -> None:
    members = members_from(["b", "a"], [{0, 1}, {1, 2}])
    result = numbers_of(assign_partitions(members, dict.fromkeys(TOPICS, 4)))
    assert result == {"id-1": {1, 2}, "id-0": {0, 3}}


def test_a_topic_only_some_members_read_goes_to_its_readers() -> None:
    xy, x = frozenset({"x", "y"}), frozenset({"x"})
    members = [Member("id-a", "a", xy), Member("id-b", "b", x), Member("id-c", "c", xy)]
    result = assign_partitions(members, {"x": 6, "y": 6, "z": 6})
    assert result["id-a"]["x"] == [0, 3] and result["id-b"]["x"] == [1, 4]
    assert result["id-c"]["x"] == [2, 5]
    # b does not read y: its 1 and 4 go to the readers a and c by p mod 2
    assert result["id-a"]["y"] == [0, 3, 4] and result["id-c"]["y"] == [1, 2, 5]
    assert "y" not in result["id-b"]
    assert all("z" not in topics for topics in result.values())  # nobody reads z


def test_no_members_or_no_partitions() -> None:
    assert assign_partitions([], dict.fromkeys(TOPICS, 12)) == {}
    assert assign_partitions(members_from(["a", "b"]), {}) == {"id-0": {}, "id-1": {}}
    assert assign_partitions(members_from(["a"]), dict.fromkeys(TOPICS, 0)) == {"id-0": {}}


def test_member_ids_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        assign_partitions([Member("x", "a", frozenset()), Member("x", "b", frozenset())], {})


# --------------------------------------------------------------------------- aiokafka side


class Cluster:
    """What the adapter reads of aiokafka's ClusterMetadata: the partitions of a topic."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(range(self.counts[topic])) if topic in self.counts else None


def test_the_adapter_speaks_aiokafkas_protocol_and_remembers_what_it_owns() -> None:
    a, b = SamePartitionAssignor("central-a"), SamePartitionAssignor("central-b")
    assert a.name == b.name == ASSIGNOR_NAME
    metadata = {
        "member-9": ConsumerProtocolMemberMetadata.decode(a.metadata(set(TOPICS)).encode()),
        "member-1": ConsumerProtocolMemberMetadata.decode(b.metadata(list(TOPICS)).encode()),
    }
    out = a.assign(Cluster(dict.fromkeys(TOPICS, 4)), metadata)
    wire = {k: ConsumerProtocolMemberAssignment.decode(v.encode()) for k, v in out.items()}
    assert {k: sorted((tp.topic, tp.partition) for tp in v.partitions())
            for k, v in wire.items()} == {
        "member-9": sorted((t, p) for t in TOPICS for p in (0, 2)),  # central-a: first
        "member-1": sorted((t, p) for t in TOPICS for p in (1, 3)),
    }
    a.on_assignment(wire["member-9"])
    assert a.owned == {0, 2}
    reported = decode_member("member-9", ConsumerProtocolMemberMetadata.decode(
        a.metadata(TOPICS).encode()))
    assert reported == Member("member-9", "central-a", frozenset(TOPICS), frozenset({0, 2}))


@pytest.mark.parametrize("user_data", [b"", b"not json", b'{"name": 3, "owned": []}',
                                       b'{"name": "x", "owned": ["1"]}', b'{"owned": [1]}',
                                       b'{"name": "x", "owned": [true]}'])
def test_a_member_without_our_data_is_named_by_its_id_and_owns_nothing(user_data: bytes) -> None:
    metadata = ConsumerProtocolMemberMetadata(0, list(TOPICS), user_data)
    assert decode_member("m-1", metadata) == Member("m-1", "m-1", frozenset(TOPICS))


def test_a_topic_without_metadata_is_left_out() -> None:
    a = SamePartitionAssignor("central-a")
    metadata = {"m": ConsumerProtocolMemberMetadata.decode(a.metadata(["x", "y"]).encode())}
    out = a.assign(Cluster({"x": 2}), metadata)
    assert out["m"].partitions() == [("x", 0), ("x", 1)]


def test_a_member_needs_a_name() -> None:
    with pytest.raises(ValueError, match="name"):
        SamePartitionAssignor("")
