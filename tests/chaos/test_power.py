"""The limited site's power as the chaos row reads it (:mod:`tests.chaos.power`): pure."""

from __future__ import annotations

import pytest

from tests.chaos.power import Overshoot, Report, describe, overshoots, session_starts


def shape(found: list[Overshoot]) -> list[tuple[float, float, float, tuple[str, ...]]]:
    return [(o.start, o.end, round(o.peak_kw, 6), o.cps) for o in found]


def test_the_latest_report_of_each_cp_adds_up_and_an_end_counts_zero() -> None:
    reports = [
        Report(0.0, "A", "a1", 20.0),
        Report(0.1, "B", "b1", 20.0),
        Report(1.0, "C", "c1", 22.0),  # over 40: 62
        Report(1.2, "A", "a1", 10.0),  # 52
        Report(1.3, "B", "b1", 10.0),  # 42
        Report(1.4, "C", "c1", 20.0),  # 40: back at the limit
        Report(2.0, "A", "a2", 22.0),  # A's next session: 52
        Report(2.5, "C", "c1", None),  # C ends: 32
    ]
    found = overshoots(reports, 40.0)
    assert shape(found) == [
        (1.0, 1.4, 22.0, ("A=20", "B=20", "C=22")),
        (2.0, 2.5, 12.0, ("A=22", "B=10", "C=20")),
    ]
    assert found[0].seconds == pytest.approx(0.4)
    assert session_starts(reports) == [0.0, 0.1, 1.0, 2.0]


def test_reports_are_taken_in_the_cps_time_order_and_late_ones_change_nothing() -> None:
    reports = [
        Report(3.0, "A", "a1", None),  # read first, happened last
        Report(1.0, "A", "a1", 30.0),
        Report(2.0, "B", "b1", 30.0),  # 60 from 2.0 until A's end at 3.0
        Report(3.5, "A", "a1", 30.0),  # read after its end: it ran no longer
    ]
    assert shape(overshoots(reports, 40.0)) == [(2.0, 3.0, 20.0, ("A=30", "B=30"))]


def test_a_sum_within_a_watt_rounding_is_at_the_limit_and_an_open_stretch_ends_last() -> None:
    at_limit = [Report(0.0, "A", "a1", 13.333), Report(0.0, "B", "b1", 13.333),
                Report(0.0, "C", "c1", 13.334 + 0.005)]
    assert overshoots(at_limit, 40.0) == []
    still = [Report(0.0, "A", "a1", 50.0), Report(4.0, "A", "a1", 45.0)]
    [stretch] = overshoots(still, 40.0)
    assert (stretch.start, stretch.end, stretch.peak_kw) == (0.0, 4.0, 10.0)
    assert describe(stretch, origin=-1.0) == "+10.00 kW for 4.00 s (from +1.0 s; A=50)"
    assert describe(None, 0.0) == "none"
