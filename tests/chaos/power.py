"""A limited site's power as its own CPs report it (SPEC §10), and when it was over its limit.

The truth is the CPs' telemetry: each CP counts the ``kw`` of the latest report of its latest
session, and 0 once that session's end is reported (a report of a session after its end
changes nothing). The site's power is the sum over its CPs, a step function of the CPs' own
times (``ts``: every CP of a run is a process on the same host, so their clocks agree, and
no reader's delay reorders two CPs' reports). An :class:`Overshoot` is a stretch of that
function above the limit: from the report that took the sum over to the one that brought it
back (or the last report, when it never came back).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

EPS_KW = 0.01
"""Shares are rounded down to the watt; a sum within this of the limit is at it."""


@dataclass(frozen=True, slots=True)
class Report:
    """What one CP said of its session's power, at its own time (POSIX seconds)."""

    at: float
    cp_id: str
    session_id: str
    kw: float | None
    """The power from now on; None: the session ended."""


@dataclass(frozen=True, slots=True)
class Overshoot:
    start: float
    end: float
    peak_kw: float
    """The most the site's power was above its limit in this stretch."""
    cps: tuple[str, ...]
    """The CPs the site's power summed at its peak."""

    @property
    def seconds(self) -> float:
        return self.end - self.start


def overshoots(reports: Sequence[Report], limit: float) -> list[Overshoot]:
    """Every stretch of the site's power above `limit` (more than :data:`EPS_KW`)."""
    found: list[Overshoot] = []
    current: dict[str, tuple[str, float]] = {}
    ended: set[str] = set()
    start: float | None = None
    peak = 0.0
    peak_cps: tuple[str, ...] = ()
    last = 0.0
    for report in sorted(reports, key=lambda r: r.at):
        last = report.at
        if report.session_id in ended:
            continue
        if report.kw is None:
            ended.add(report.session_id)
            if current.get(report.cp_id, ("", 0.0))[0] == report.session_id:
                del current[report.cp_id]
        else:
            current[report.cp_id] = (report.session_id, report.kw)
        total = sum(kw for _sid, kw in current.values())
        if total > limit + EPS_KW:
            if start is None:
                start, peak, peak_cps = report.at, 0.0, ()
            if total - limit > peak:
                peak = total - limit
                peak_cps = tuple(f"{cp}={kw:g}" for cp, (_sid, kw) in sorted(current.items()))
        elif start is not None:
            found.append(Overshoot(start, report.at, peak, peak_cps))
            start = None
    if start is not None:
        found.append(Overshoot(start, last, peak, peak_cps))
    return found


def session_starts(reports: Iterable[Report]) -> list[float]:
    """When each session first reported its power (a change of the site's sharing)."""
    first: dict[str, float] = {}
    for report in reports:
        if report.kw is not None and report.at < first.get(report.session_id, float("inf")):
            first[report.session_id] = report.at
    return sorted(first.values())


def describe(overshoot: Overshoot | None, origin: float) -> str:
    if overshoot is None:
        return "none"
    return (f"+{overshoot.peak_kw:.2f} kW for {overshoot.seconds:.2f} s "
            f"(from {overshoot.start - origin:+.1f} s; {', '.join(overshoot.cps)})")
