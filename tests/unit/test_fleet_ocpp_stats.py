"""The OCPP fleet's round trips, whole and since a mark (bench-ocpp leaves the boot storm
out of the second)."""

from __future__ import annotations

from evcharging.apps.ev_fleet.ocpp_fleet import OcppFleetStats


def test_round_trips_since_the_mark_leave_out_what_came_before() -> None:
    stats = OcppFleetStats()
    for _ in range(10):
        stats.observe("Heartbeat", 2.0)  # the boot storm
    assert stats.round_trips(since_mark=True) == {}
    stats.mark()
    for _ in range(10):
        stats.observe("Heartbeat", 0.01)
    assert stats.round_trips()["Heartbeat"] == {"count": 20, "p50_ms": 10.0, "p99_ms": 2000.0}
    assert stats.round_trips(since_mark=True)["Heartbeat"] == {
        "count": 10, "p50_ms": 10.0, "p99_ms": 10.0}
