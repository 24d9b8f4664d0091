"""The collector's tuning for processes with thousands of connections: what exists is
frozen, the thresholds raised, and cycles are still collected."""

from __future__ import annotations

import gc

from evcharging.common.gc_tuning import THRESHOLDS, tune_for_many_connections


class Node:
    def __init__(self) -> None:
        self.me = self


def test_it_freezes_what_exists_raises_the_thresholds_and_still_collects_cycles() -> None:
    before = gc.get_threshold()
    try:
        assert tune_for_many_connections() == before
        assert gc.get_threshold() == THRESHOLDS
        assert gc.get_freeze_count() > 0
        Node()  # a cycle made after the freeze
        assert gc.collect() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
