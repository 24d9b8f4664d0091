"""What a load run measured, and how it is shown: pure, no I/O.

* :class:`Tally` counts every event of a run (an arrival, a request sent, an ACCEPTED, an
  outcome) and keeps the latencies. It is the one place a run's numbers go through, so a
  metrics exporter can later read it (or wrap its methods) without touching the run.
* :func:`latency_stats` gives count, p50, p90, p99 and max of some latencies, by the
  nearest-rank method: each percentile is one of the measured values.
* :class:`Summary` is the end of a run as text (for people) and as one JSON object (for
  scripts); :func:`progress_line` is the line shown every few seconds while it runs.

Every arrival ends with exactly one :class:`Outcome`, so once a run is over the outcomes
add up to the arrivals.
"""

from __future__ import annotations

import math
import re
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "MAX_REASONS",
    "LatencyStats",
    "Outcome",
    "RunInfo",
    "Summary",
    "Tally",
    "latency_stats",
    "percentile",
    "progress_line",
    "reason_cause",
]

MAX_REASONS = 20
"""Distinct reasons kept per final status; any further one is counted as ``other``."""

OTHER_REASON = "other"
NO_REASON = "no reason given"


class Outcome(StrEnum):
    """How one driver's visit ended: exactly one per arrival."""

    COMPLETED = "completed"
    FAILED = "failed"
    DENIED = "denied"
    TIMED_OUT = "timed_out"
    """No final update came within the request timeout (or before the run's end)."""
    NO_FREE_CP = "no_free_cp"
    """No CP was known free, so no request was sent."""
    NOT_SENT = "not_sent"
    """Publishing the request raised (the broker refused it at once)."""
    INTERRUPTED = "interrupted"
    """The run was stopped (SIGINT/SIGTERM) while the request was open."""

    @property
    def label(self) -> str:
        return self.value.replace("_", " ").replace("cp", "CP")


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0 < q <= 100) of non-empty `values`, by nearest rank.

    That is the smallest value with at least q % of the values at or below it.
    """
    if not values:
        raise ValueError("no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered) / 100))
    return ordered[rank - 1]


@dataclass(frozen=True)
class LatencyStats:
    """Latencies in seconds; all but `count` are None when nothing was measured."""

    count: int
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    def as_ms(self) -> dict[str, Any]:
        """The JSON form: count and milliseconds (rounded to µs)."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)

        return {"count": self.count, "p50": ms(self.p50), "p90": ms(self.p90),
                "p99": ms(self.p99), "max": ms(self.max)}


def latency_stats(values: Sequence[float]) -> LatencyStats:
    if not values:
        return LatencyStats(0)
    ordered = sorted(values)
    return LatencyStats(
        count=len(ordered),
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p99=percentile(ordered, 99),
        max=ordered[-1],
    )


_CAUSE_END = re.compile(r"[:(]")


def reason_cause(reason: str | None) -> str:
    """The cause a reason names, without its details: the text before the first ``:`` or
    ``(`` (``"CP fault: overheating"`` → ``"CP fault"``; ``"request expired (12s old)"`` →
    ``"request expired"``), so the reasons of many requests group into a few."""
    if reason is None:
        return NO_REASON
    cause = _CAUSE_END.split(reason, maxsplit=1)[0].strip()
    return cause or NO_REASON


def _tally_reason(counter: Counter[str], reason: str | None) -> None:
    cause = reason_cause(reason)
    if cause not in counter and len(counter) >= MAX_REASONS:
        cause = OTHER_REASON
    counter[cause] += 1


@dataclass
class Tally:
    """The counts and latencies of a run so far (latencies in seconds)."""

    arrivals: int = 0
    sent: int = 0
    sent_to_busy: int = 0
    """Requests sent to a CP this run knew busy (only with --allow-busy)."""
    accepted: int = 0
    outcomes: Counter[Outcome] = field(default_factory=Counter)
    denied_reasons: Counter[str] = field(default_factory=Counter)
    failed_reasons: Counter[str] = field(default_factory=Counter)
    ignored_updates: int = 0
    """Updates for other drivers, or for requests of this run already ended."""
    accept_latencies: array[float] = field(default_factory=lambda: array("d"))
    final_latencies: array[float] = field(default_factory=lambda: array("d"))

    @property
    def ended(self) -> int:
        return sum(self.outcomes.values())

    @property
    def open(self) -> int:
        """Arrivals whose outcome is not known yet (their requests are being followed)."""
        return self.arrivals - self.ended

    def arrival(self) -> None:
        self.arrivals += 1

    def request_sent(self, *, to_busy: bool = False) -> None:
        self.sent += 1
        if to_busy:
            self.sent_to_busy += 1

    def request_accepted(self, latency: float) -> None:
        self.accepted += 1
        self.accept_latencies.append(latency)

    def request_ended(
        self, outcome: Outcome, *, latency: float | None = None, reason: str | None = None
    ) -> None:
        """One arrival's outcome; `latency` is publish → final update, for the three final
        statuses; `reason` is the final update's, grouped by cause for DENIED and FAILED."""
        self.outcomes[outcome] += 1
        if latency is not None:
            self.final_latencies.append(latency)
        if outcome is Outcome.DENIED:
            _tally_reason(self.denied_reasons, reason)
        elif outcome is Outcome.FAILED:
            _tally_reason(self.failed_reasons, reason)


@dataclass(frozen=True)
class RunInfo:
    """How a run went, besides its tally."""

    rate: float
    """Arrivals per second asked for."""
    duration: float
    seed: int
    elapsed: float
    """Seconds from the first arrival's schedule to the end of the run."""
    arrival_seconds: float
    """Seconds during which drivers arrived (the duration, unless stopped early or late)."""
    allow_busy: bool = False
    stopped_early: bool = False


def _round(value: float, digits: int = 3) -> float:
    return round(value, digits)


@dataclass(frozen=True)
class Summary:
    """The end of a run: :meth:`as_dict` for ``--json``, :meth:`text` for people."""

    tally: Tally
    info: RunInfo
    publish_errors: int = 0
    """Messages the producer failed to deliver (at once or later)."""

    @property
    def achieved_rate(self) -> float:
        seconds = self.info.arrival_seconds
        return self.tally.arrivals / seconds if seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        tally, info = self.tally, self.info
        return {
            "seed": info.seed,
            "rate": info.rate,
            "duration": info.duration,
            "elapsed": _round(info.elapsed),
            "stopped_early": info.stopped_early,
            "allow_busy": info.allow_busy,
            "arrivals": tally.arrivals,
            "achieved_rate": _round(self.achieved_rate),
            "sent": tally.sent,
            "sent_to_busy": tally.sent_to_busy,
            "accepted": tally.accepted,
            "open": tally.open,
            "outcomes": {outcome.value: tally.outcomes[outcome] for outcome in Outcome},
            "denied_by_reason": dict(tally.denied_reasons.most_common()),
            "failed_by_reason": dict(tally.failed_reasons.most_common()),
            "latency_ms": {
                "accepted": latency_stats(tally.accept_latencies).as_ms(),
                "final": latency_stats(tally.final_latencies).as_ms(),
            },
            "publish_errors": self.publish_errors,
            "ignored_updates": tally.ignored_updates,
        }

    def text(self) -> str:
        tally, info = self.tally, self.info
        how = "stopped early" if info.stopped_early else "done"
        lines = [
            f"load summary ({how}): {tally.arrivals} drivers in {info.arrival_seconds:.1f} s "
            f"({info.rate:g}/s asked, {self.achieved_rate:.2f}/s achieved, seed {info.seed}); "
            f"run took {info.elapsed:.1f} s",
            f"  requests sent {tally.sent}"
            + (f" ({tally.sent_to_busy} to a busy CP)" if info.allow_busy else "")
            + f", accepted {tally.accepted}, publish errors {self.publish_errors}, "
            f"ignored updates {tally.ignored_updates}",
            "  outcomes: " + _outcomes_text(tally),
        ]
        for name, reasons in (("denied", tally.denied_reasons), ("failed", tally.failed_reasons)):
            if reasons:
                lines.append(f"  {name} by reason: " + ", ".join(
                    f"{reason} {count}" for reason, count in reasons.most_common()))
        lines.append(f"  {'latency (ms)':<22}{'count':>7}{'p50':>10}{'p90':>10}{'p99':>10}"
                     f"{'max':>10}")
        for label, values in (("request → ACCEPTED", tally.accept_latencies),
                              ("request → final", tally.final_latencies)):
            stats = latency_stats(values)
            cells = "".join(f"{_ms(v):>10}" for v in (stats.p50, stats.p90, stats.p99, stats.max))
            lines.append(f"  {label:<22}{stats.count:>7}{cells}")
        return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _outcomes_text(tally: Tally) -> str:
    return ", ".join(f"{outcome.label} {tally.outcomes[outcome]}" for outcome in Outcome)


def progress_line(tally: Tally, elapsed: float, *, free_cps: int, known_cps: int) -> str:
    """One line on a running load: time, arrival rate so far, open requests, outcomes."""
    rate = tally.arrivals / elapsed if elapsed > 0 else 0.0
    return (
        f"[{elapsed:7.1f} s] {tally.arrivals} arrived ({rate:.1f}/s), {tally.open} open, "
        f"{tally.accepted} accepted; {_outcomes_text(tally)}; free CPs {free_cps}/{known_cps}"
    )
