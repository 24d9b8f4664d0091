"""The pure parts of the failover harness (:mod:`tests.chaos.centrals`): when the instances
share the partitions, who owns a CP, and the premise of the failover rows' two CPs."""

from __future__ import annotations

from tests.chaos.centrals import ALL, Centrals, owner_of, partition_of
from tests.chaos.test_chaos import FAILOVER_CPS

LOW, HIGH = frozenset(range(6)), frozenset(range(6, 12))
EVEN, ODD = frozenset(range(0, 12, 2)), frozenset(range(1, 12, 2))


def test_the_instances_share_the_partitions_only_when_each_owns_some_and_none_twice() -> None:
    ids = ["central-1", "central-2"]
    assert Centrals.split({"central-1": LOW, "central-2": HIGH}, ids)
    assert not Centrals.split({"central-1": ALL, "central-2": frozenset()}, ids)
    assert not Centrals.split({"central-1": ALL}, ids)
    assert not Centrals.split({"central-1": LOW | {6}, "central-2": HIGH}, ids)
    assert not Centrals.split({"central-1": LOW - {5}, "central-2": HIGH}, ids)
    assert Centrals.split({"central-1": ALL}, ["central-1"])


def test_the_failover_cps_fall_to_different_instances() -> None:
    """Joined one after the other the two own 0-5 and 6-11 (sticky), joined together the
    even and the odd partitions: either way each owns one of the two CPs."""
    for first, second in ((LOW, HIGH), (EVEN, ODD)):
        layout = {"central-1": first, "central-2": second}
        owners = {owner_of(layout, cp) for cp in FAILOVER_CPS}
        assert owners == {"central-1", "central-2"}, (layout, [partition_of(c) for c in
                                                               FAILOVER_CPS])
