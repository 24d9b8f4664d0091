"""The ledger's invariants (SPEC §4) as one pure check over what a chaos run observed.

Inputs are plain data: the requests the test sent, Central's ``charging_sessions`` rows,
what the CPs' meters reported on the broker (:class:`MeterLog`) and every driver update
of each request in the order the broker kept them. :func:`check_ledger` returns one
:class:`Breach` per broken invariant; an empty list means the ledger is exact.

The invariants:

* no session row is ACTIVE once things have settled;
* no session is FAILED that its CP's own meter completed (an end status or a heartbeat's
  ``last_session`` said COMPLETED): SPEC §4, the meter is the truth;
* no request has two session rows, and no request's updates name two sessions (the same
  request never starts two sessions);
* a row's kWh and € are the last totals its CP reported for the session: an end report
  (an end status, or a heartbeat's ``last_session``) when there is one, else its last
  telemetry, else nothing (0 and 0); a CP that reports two different ends is a breach too;
* a row belongs to a request the test sent; a request that was answered with anything but
  DENIED has a row;
* every request has a final update (COMPLETED, FAILED or DENIED); all of its final updates
  carry the same status, but that a FAILED the CP's meter completed after all may become
  COMPLETED with a ``corrected:`` update; a later final update that changes the totals
  says ``corrected:``;
  no ACCEPTED or IN_PROGRESS follows a final update;
* the last final status agrees with the row (COMPLETED with COMPLETED; FAILED with
  FAILED or STOPPED); the request's last update is that final status for the row's session, with
  the row's totals;
* with ``exactly_once`` (the rows that restart Central under load): no final update is
  repeated, i.e. no final update equals an earlier one of the same request in status,
  session, totals and reason (a correction is a new update, not a repeat).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from evcharging.common.messages import DriverStatus, DriverUpdate

CORRECTED = "corrected:"
TOLERANCE = 1e-9
"""kWh and € closer than this are equal (far below a cent; the floats travel unchanged)."""


class BreachKind(StrEnum):
    ACTIVE = "session still ACTIVE"
    BILLED = "billed totals differ from the CP's last report"
    METER_CONFLICT = "the CP reported two different ends"
    UNKNOWN_REQUEST = "session for a request nobody sent"
    NO_ROW = "request answered without a session row"
    NO_FINAL = "request without a final status"
    FINAL_CONFLICT = "final updates with different statuses"
    UNMARKED_CORRECTION = "later final update changes totals without 'corrected:'"
    AFTER_FINAL = "ACCEPTED or IN_PROGRESS after the final status"
    STATUS_MISMATCH = "final status disagrees with the session row"
    LAST_UPDATE = "driver's last update does not carry the ledger's totals"
    FAILED_COMPLETED = "session FAILED though its CP completed it"
    TWO_SESSIONS = "one request started two sessions"
    REPEATED_FINAL = "final update repeated"


@dataclass(frozen=True)
class Totals:
    kwh: float
    euros: float

    def matches(self, other: Totals) -> bool:
        return math.isclose(self.kwh, other.kwh, rel_tol=0, abs_tol=TOLERANCE) and math.isclose(
            self.euros, other.euros, rel_tol=0, abs_tol=TOLERANCE
        )

    def __str__(self) -> str:
        return f"{self.kwh:.6f} kWh/{self.euros:.6f} €"


NOTHING = Totals(0.0, 0.0)


@dataclass(frozen=True)
class SessionRow:
    """One ``charging_sessions`` row."""

    session_id: str
    request_id: str
    cp_id: str
    status: str
    kwh: float
    euros: float
    reason: str | None = None

    @property
    def totals(self) -> Totals:
        return Totals(self.kwh, self.euros)


@dataclass
class MeterLog:
    """What the CPs' meters reported per session, in the order the broker kept it."""

    telemetry: dict[str, Totals] = field(default_factory=dict)
    """The last telemetry totals of each session."""
    ends: dict[str, list[Totals]] = field(default_factory=dict)
    """The distinct end totals reported for each session (end status, ``last_session``)."""
    results: dict[str, set[str]] = field(default_factory=dict)
    """How the CP said each session ended (``COMPLETED``, ``STOPPED``, ``FAILED``)."""

    def add_telemetry(self, session_id: str, totals: Totals) -> None:
        self.telemetry[session_id] = totals

    def add_end(self, session_id: str, totals: Totals, result: str | None = None) -> None:
        if result is not None:
            self.results.setdefault(session_id, set()).add(result)
        seen = self.ends.setdefault(session_id, [])
        if not any(t.matches(totals) for t in seen):
            seen.append(totals)

    def last(self, session_id: str) -> Totals | None:
        """The last totals reported for the session: its end if any (no telemetry follows
        an end), else its last telemetry, else None."""
        ends = self.ends.get(session_id)
        if ends:
            return ends[-1]
        return self.telemetry.get(session_id)


@dataclass(frozen=True)
class Breach:
    kind: BreachKind
    subject: str
    """The session or request id it is about."""
    detail: str

    def __str__(self) -> str:
        return f"{self.kind.name} {self.subject}: {self.kind.value}; {self.detail}"


def _totals_of(update: DriverUpdate) -> Totals | None:
    if update.kwh is None or update.euros is None:
        return None
    return Totals(update.kwh, update.euros)


def describe(updates: Sequence[DriverUpdate]) -> str:
    parts = []
    for u in updates:
        totals = _totals_of(u)
        text = u.status.value + (f" {totals}" if totals else "")
        if u.status.is_final and u.reason:
            text += f" ({u.reason[:60]})"
        parts.append(text)
    return " → ".join(parts)


def check_rows(rows: Iterable[SessionRow], meter: MeterLog, requests: Collection[str]) -> list[
    Breach
]:
    """The invariants of the session rows alone (they need no driver updates)."""
    breaches: list[Breach] = []
    rows = list(rows)
    sessions_of = Counter(row.request_id for row in rows)
    for row in rows:
        if row.status == "ACTIVE":
            breaches.append(Breach(BreachKind.ACTIVE, row.session_id, f"on {row.cp_id}"))
        if row.status == "FAILED" and "COMPLETED" in meter.results.get(row.session_id, ()):
            breaches.append(Breach(
                BreachKind.FAILED_COMPLETED, row.session_id,
                f"on {row.cp_id}: Central says FAILED ({row.reason!r}), its CP reported "
                f"COMPLETED {meter.last(row.session_id) or NOTHING}",
            ))
        if sessions_of[row.request_id] > 1:
            breaches.append(Breach(BreachKind.TWO_SESSIONS, row.session_id,
                                   f"request {row.request_id} has {sessions_of[row.request_id]}"
                                   f" session rows"))
        ends = meter.ends.get(row.session_id, [])
        if len(ends) > 1:
            breaches.append(Breach(
                BreachKind.METER_CONFLICT, row.session_id,
                f"{row.cp_id} reported {', '.join(map(str, ends))}",
            ))
        expected = meter.last(row.session_id) or NOTHING
        if not row.totals.matches(expected):
            source = ("end report" if ends else "telemetry" if row.session_id in meter.telemetry
                      else "no report")
            breaches.append(Breach(
                BreachKind.BILLED, row.session_id,
                f"{row.status} on {row.cp_id}: billed {row.totals}, CP's last ({source}) "
                f"{expected}; reason {row.reason!r}",
            ))
        if row.request_id not in requests:
            breaches.append(Breach(BreachKind.UNKNOWN_REQUEST, row.session_id,
                                   f"request {row.request_id} on {row.cp_id}"))
    return breaches


def _same(a: DriverUpdate, b: DriverUpdate) -> bool:
    """The same update sent twice: status, session, totals and reason alike."""
    ta, tb = _totals_of(a), _totals_of(b)
    return (
        a.status == b.status and a.session_id == b.session_id and a.reason == b.reason
        and ((ta is None and tb is None) or (ta is not None and tb is not None and ta.matches(tb)))
    )


def _same_or_completed_by_meter(before: DriverUpdate, after: DriverUpdate) -> bool:
    """A request keeps its final status, but for one change: a FAILED that its CP's
    meter completed after all becomes COMPLETED, with a 'corrected:' update (SPEC §4: a
    CP that completed a session is never recorded FAILED)."""
    return before.status == after.status or (
        before.status is DriverStatus.FAILED and after.status is DriverStatus.COMPLETED
        and (after.reason or "").startswith(CORRECTED)
    )


def check_request(
    request_id: str, updates: Sequence[DriverUpdate], row: SessionRow | None,
    *, exactly_once: bool = False,
) -> list[Breach]:
    """The invariants of one request's updates against its row (None: no row)."""
    breaches: list[Breach] = []

    def breach(kind: BreachKind) -> None:
        breaches.append(Breach(kind, request_id, describe(updates) or "no update"))

    finals = [i for i, u in enumerate(updates) if u.status.is_final]
    if len({u.session_id for u in updates if u.session_id is not None}) > 1:
        breach(BreachKind.TWO_SESSIONS)
    if exactly_once and any(
        _same(updates[later], updates[earlier])
        for earlier, later in itertools.combinations(finals, 2)
    ):
        breach(BreachKind.REPEATED_FINAL)
    if not finals:
        breach(BreachKind.NO_FINAL)
    else:
        first = finals[0]
        if any(not _same_or_completed_by_meter(updates[before], updates[after])
               for before, after in itertools.pairwise(finals)):
            breach(BreachKind.FINAL_CONFLICT)
        if any(not u.status.is_final for u in updates[first:]):
            breach(BreachKind.AFTER_FINAL)
        for before, after in itertools.pairwise(finals):
            old, new = _totals_of(updates[before]), _totals_of(updates[after])
            changed = new is not None and (old is None or not old.matches(new))
            if changed and not (updates[after].reason or "").startswith(CORRECTED):
                breach(BreachKind.UNMARKED_CORRECTION)
                break
    if row is None:
        if any(u.status is not DriverStatus.DENIED for u in updates):
            breach(BreachKind.NO_ROW)
        return breaches
    if finals:
        final = updates[finals[-1]].status
        agrees = {
            DriverStatus.COMPLETED: ("COMPLETED",),
            DriverStatus.FAILED: ("FAILED", "STOPPED"),
            DriverStatus.DENIED: (),
        }[final]
        if row.status not in agrees:
            breaches.append(Breach(BreachKind.STATUS_MISMATCH, request_id,
                                   f"driver got {final.value}, row {row.session_id} is "
                                   f"{row.status}"))
    last = updates[-1] if updates else None
    last_totals = _totals_of(last) if last is not None else None
    if (
        last is None
        or not last.status.is_final
        or last.session_id != row.session_id
        or last_totals is None
        or not last_totals.matches(row.totals)
    ):
        breaches.append(Breach(
            BreachKind.LAST_UPDATE, request_id,
            f"row {row.session_id} {row.status} {row.totals}; updates {describe(updates)}",
        ))
    return breaches


def check_ledger(
    requests: Collection[str],
    rows: Iterable[SessionRow],
    meter: MeterLog,
    updates: Mapping[str, Sequence[DriverUpdate]],
    *,
    exactly_once: bool = False,
) -> list[Breach]:
    """Every breach of the ledger's invariants; [] when the ledger is exact."""
    rows = list(rows)
    by_request = {row.request_id: row for row in rows}
    breaches = check_rows(rows, meter, requests)
    for request_id in requests:
        breaches += check_request(
            request_id, updates.get(request_id, ()), by_request.get(request_id),
            exactly_once=exactly_once,
        )
    return breaches
