"""Which central.commands partitions a CP's process reads: the producer's own choice."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner

from evcharging.common.kafka import batch_by_partition, partition_for_key, partitions_for_keys


@pytest.mark.parametrize("count", [1, 2, 3, 12, 24])
def test_a_key_goes_where_the_producers_partitioner_sends_it(count: int) -> None:
    partitions = list(range(count))
    for i in range(1, 2001):
        key = f"CP-{i:05d}"
        assert partition_for_key(key, partitions) == DefaultPartitioner()(
            key.encode(), partitions, partitions
        )


def test_partition_ids_need_not_be_dense_or_ordered() -> None:
    assert partition_for_key("CP-00001", [5, 1, 3]) == DefaultPartitioner()(
        b"CP-00001", [1, 3, 5], [1, 3, 5]
    )


def test_many_keys_cover_their_partitions_once_each() -> None:
    keys = [f"CP-{i:05d}" for i in range(1, 10_001)]
    assert partitions_for_keys(keys, range(12)) == list(range(12))
    one = partitions_for_keys(["CP-00001"], range(12))
    assert len(one) == 1
    assert partitions_for_keys([], range(12)) == []


def test_a_transaction_batches_each_partitions_records_in_their_order() -> None:
    partitions = {"t.updates": (0, 1, 2), "t.commands": (0, 1, 2, 3)}
    records = [("t.updates" if i % 3 else "t.commands", f"K-{i % 7}".encode(), str(i).encode())
               for i in range(60)]
    cache: dict[tuple[bytes, int], int] = {}
    groups = batch_by_partition(records, partitions, cache)
    assert sum(map(len, groups.values())) == len(records)
    for (name, partition), batch in groups.items():
        assert all(partition == partition_for_key(key.decode(), partitions[name])
                   for key, _ in batch)
        mine = [(key, value) for topic, key, value in records
                if topic == name and partition_for_key(key.decode(), partitions[name])
                == partition]
        assert batch == mine  # nothing lost, nothing twice, the order kept
    assert cache  # the partitions of the keys are remembered
    assert batch_by_partition(records, partitions, cache) == groups
    assert batch_by_partition([], partitions) == {}
