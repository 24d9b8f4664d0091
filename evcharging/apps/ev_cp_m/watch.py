"""What a CP's monitoring decides from its health checks, with no I/O.

One :class:`Watch` per charging point holds what its monitoring believes about the CP
(:class:`HealthView`), the count of consecutive failed checks, the fault or recovery
report that Central has not accepted yet and what Central was last told. The CP Monitor
(one CP, checked over HTTP) and the CP Fleet (many CPs, checked in process) both feed it
the outcome of each check and do what it says: log one line, deliver the queued report.

The rules (the CP Monitor's, SPEC §5):

* ``failure_threshold`` consecutive failed checks declare the CP faulty and queue one
  fault report; further failures report nothing more (one report per fault).
* The first check that passes after a fault queues one recovery report. Passing again
  after fewer failures than the threshold reports nothing.
* The very first check that passes queues a recovery too: Central may still hold a fault
  an earlier run reported (Central ignores a recovery for a CP that is not faulty).
* Only the newest undelivered report is kept, and a report that says what Central was
  last told with success is not queued at all: Central always gets the latest truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from evcharging.common.messages import CPFaultReport

__all__ = [
    "RECOVERY_REASON",
    "STARTUP_HEALTHY_REASON",
    "Change",
    "Failure",
    "HealthView",
    "Step",
    "Watch",
    "clip",
    "kind",
]

STARTUP_HEALTHY_REASON = "health checks pass (monitor started)"
RECOVERY_REASON = "health checks pass again"
MAX_REASON = 500


class HealthView(StrEnum):
    """What the monitoring currently believes about its CP."""

    UNKNOWN = "UNKNOWN"
    """No check has finished yet."""
    HEALTHY = "HEALTHY"
    FAILING = "FAILING"
    """Some consecutive checks failed, fewer than the threshold."""
    FAULT = "FAULT"
    """The threshold was reached and a fault report was queued."""


class Change(StrEnum):
    """What one check changed (callers pick their log level or counters from it)."""

    FIRST_HEALTHY = "first healthy"
    """The first check passed (a recovery report is queued, unless Central knows)."""
    HEALTHY = "healthy"
    """Passed, as before."""
    RECOVERED = "recovered"
    """Passed after a fault: a recovery report is queued."""
    PASSED_AGAIN = "passed again"
    """Passed after fewer failures than the threshold: nothing is reported."""
    FAILING = "failing"
    """The first failure after a pass."""
    STILL_FAILING = "still failing"
    FAULT = "fault"
    """The threshold was reached: a fault report is queued."""
    STILL_FAULT = "still fault"
    """Failed again after the fault was declared: nothing more is reported."""


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one health check failed."""

    reason: str
    cp_reports_fault: bool = False
    """The CP itself says it is in FAULT: its reason is the fault's (no count added)."""


@dataclass(frozen=True, slots=True)
class Step:
    """What one check changed and what to log about it (the report is in ``pending``)."""

    change: Change
    level: str
    """The log level the CP Monitor uses for it (DEBUG for routine checks)."""
    message: str
    superseded: CPFaultReport | None = None
    """An undelivered report the check replaced (the caller may say so)."""


class Watch:
    """The monitoring of one CP: feed it :meth:`passed` and :meth:`failed`, deliver
    :attr:`pending`, and tell it with :meth:`delivered` / :meth:`not_delivered` /
    :meth:`dropped` how that went."""

    __slots__ = (
        "central_believes_faulty",
        "consecutive_failures",
        "cp_id",
        "failure_threshold",
        "pending",
        "view",
    )

    def __init__(
        self,
        cp_id: str,
        failure_threshold: int,
        *,
        central_believes_faulty: bool | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.cp_id = cp_id
        self.failure_threshold = failure_threshold
        self.view = HealthView.UNKNOWN
        self.consecutive_failures = 0
        self.pending: CPFaultReport | None = None
        """The newest report Central has not accepted yet, if any."""
        self.central_believes_faulty = central_believes_faulty
        """What Central was last told with success (or is known to hold); None: uncertain."""

    # ---------------------------------------------------------------- checks

    def passed(self) -> Step:
        """A health check passed."""
        previous, failures = self.view, self.consecutive_failures
        self.consecutive_failures = 0
        self.view = HealthView.HEALTHY
        if previous is HealthView.FAULT:
            superseded = self._queue(is_faulty=False, reason=RECOVERY_REASON)
            return Step(Change.RECOVERED, "INFO",
                        f"CP {self.cp_id} recovered: {RECOVERY_REASON}; "
                        "reporting the recovery to Central", superseded)
        if previous is HealthView.FAILING:
            return Step(Change.PASSED_AGAIN, "INFO",
                        f"health checks pass again after {failures} failure(s); "
                        "no fault reported")
        if previous is HealthView.UNKNOWN:
            superseded = self._queue(is_faulty=False, reason=STARTUP_HEALTHY_REASON)
            return Step(Change.FIRST_HEALTHY, "INFO", f"CP {self.cp_id} is healthy", superseded)
        return Step(Change.HEALTHY, "DEBUG", "health check ok")

    def failed(self, failure: Failure) -> Step:
        """A health check failed."""
        self.consecutive_failures += 1
        count, threshold = self.consecutive_failures, self.failure_threshold
        if self.view is HealthView.FAULT:
            return Step(Change.STILL_FAULT, "DEBUG",
                        f"health check failed again ({count} in a row): {failure.reason}")
        if count >= threshold:
            reason = (
                failure.reason
                if failure.cp_reports_fault
                else f"health check failed {count} times: {failure.reason}"
            )
            self.view = HealthView.FAULT
            superseded = self._queue(is_faulty=True, reason=reason)
            return Step(Change.FAULT, "WARNING",
                        f"CP {self.cp_id} is faulty ({reason}); reporting the fault to Central",
                        superseded)
        if self.view is not HealthView.FAILING:
            self.view = HealthView.FAILING
            return Step(Change.FAILING, "INFO",
                        f"health check failed ({count}/{threshold}): {failure.reason}")
        return Step(Change.STILL_FAILING, "DEBUG",
                    f"health check failed ({count}/{threshold}): {failure.reason}")

    def _queue(self, *, is_faulty: bool, reason: str) -> CPFaultReport | None:
        """Queue a report; returns the undelivered one it replaces, if any."""
        superseded = self.pending
        if self.central_believes_faulty is is_faulty:
            # Central already holds this truth (the opposite report never got through).
            self.pending = None
        else:
            self.pending = CPFaultReport(
                cp_id=self.cp_id, is_faulty=is_faulty, reason=clip(reason, MAX_REASON)
            )
        return superseded

    # ---------------------------------------------------------------- delivery

    def delivered(self, report: CPFaultReport) -> None:
        """Central accepted `report`."""
        self.central_believes_faulty = report.is_faulty
        if self.pending is report:
            self.pending = None

    def central_holds(self, is_faulty: bool) -> None:
        """Central is known to hold the CP as faulty (or not), e.g. read from its API: a
        pending report that says the same is not needed any more."""
        self.central_believes_faulty = is_faulty
        if self.pending is not None and self.pending.is_faulty is is_faulty:
            self.pending = None

    def not_delivered(self) -> None:
        """A report may or may not have arrived: what Central holds is uncertain."""
        self.central_believes_faulty = None

    def dropped(self, report: CPFaultReport) -> None:
        """Central rejected `report` for good (sending it again cannot help)."""
        if self.pending is report:
            self.pending = None


def kind(report: CPFaultReport) -> str:
    """``fault`` or ``recovery``, for log lines."""
    return "fault" if report.is_faulty else "recovery"


def clip(text: str, limit: int = 200) -> str:
    """`text` on one line, at most `limit` characters (an ellipsis marks a cut)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
