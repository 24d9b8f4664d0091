"""Garbage collection for a process that holds thousands of long-lived connections.

CPython's cyclic collector, with its default thresholds (700, 10, 10), ran a full
collection every few seconds in the OCPP gateway at 5,000 chargers: each went through every
object of every connection (some 270 ms of CPU, and twice that of event loop stall on a
busy machine), and collections took a quarter of the gateway's CPU (gc.callbacks, bench-ocpp).
The CP Fleet playing the chargers paid the same. Almost none of it found garbage: the
connections live for hours and reference counting frees what a message leaves behind.

:func:`tune_for_many_connections`:

* freezes what exists at start (modules, settings, pydantic's schemas), so that no
  collection walks it again (:func:`gc.freeze`);
* raises the thresholds to :data:`THRESHOLDS`: a young collection every
  :data:`THRESHOLDS`\\[0] new container objects (a few milliseconds), the older generations
  ten and a hundred times less often. Cycles are still collected, later.
"""

from __future__ import annotations

import gc

__all__ = ["THRESHOLDS", "tune_for_many_connections"]

THRESHOLDS = (20_000, 10, 100)
"""gc.set_threshold's three thresholds (CPython's defaults: 700, 10, 10)."""


def tune_for_many_connections() -> tuple[int, int, int]:
    """Freeze what exists now and raise the collector's thresholds (call it once the
    process has started, before its connections); the thresholds it had."""
    before = gc.get_threshold()
    gc.collect()  # what is garbage now is not frozen with the rest
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    return before
