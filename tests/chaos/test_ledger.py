"""The ledger check on hand-made data: it passes an exact ledger and names every breach."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from evcharging.common.messages import DriverStatus, DriverUpdate
from tests.chaos.harness import Outcome, format_table
from tests.chaos.ledger import (
    Breach,
    BreachKind,
    MeterLog,
    SessionRow,
    Totals,
    check_ledger,
)

S = DriverStatus


def update(
    request_id: str, status: DriverStatus, kwh: float | None = None, euros: float | None = None,
    *, session_id: str | None = "s1", reason: str | None = None,
) -> DriverUpdate:
    return DriverUpdate(
        request_id=request_id, driver_id="d", cp_id="CP-1", status=status, reason=reason,
        session_id=session_id, kwh=kwh, euros=euros,
    )


def row(session_id: str = "s1", request_id: str = "r1", status: str = "COMPLETED",
        kwh: float = 0.03, euros: float = 0.009) -> SessionRow:
    return SessionRow(session_id, request_id, "CP-1", status, kwh, euros)


def meter(*, telemetry: float | None = 0.02, end: float | None = 0.03) -> MeterLog:
    log = MeterLog()
    if telemetry is not None:
        log.add_telemetry("s1", Totals(0.01, 0.003))
        log.add_telemetry("s1", Totals(telemetry, telemetry * 0.3))
    if end is not None:
        log.add_end("s1", Totals(end, end * 0.3))
        log.add_end("s1", Totals(end, end * 0.3))  # a heartbeat repeating the end
    return log


COMPLETED = [
    update("r1", S.ACCEPTED),
    update("r1", S.IN_PROGRESS, 0.01, 0.003),
    update("r1", S.COMPLETED, 0.03, 0.009),
]
DENIED = [update("r2", S.DENIED, session_id=None, reason="CP busy")]


def kinds(breaches: Sequence[Breach]) -> list[BreachKind]:
    return sorted((b.kind for b in breaches), key=lambda kind: kind.name)


def check(
    updates: dict[str, list[DriverUpdate]],
    rows: list[SessionRow] | None = None,
    log: MeterLog | None = None,
    requests: Sequence[str] | None = None,
    *,
    exactly_once: bool = False,
) -> list[BreachKind]:
    return kinds(check_ledger(
        requests if requests is not None else list(updates),
        [row()] if rows is None else rows,
        meter() if log is None else log,
        updates,
        exactly_once=exactly_once,
    ))


def test_an_exact_ledger_passes() -> None:
    assert check({"r1": COMPLETED, "r2": DENIED}) == []


def test_the_meter_prefers_the_end_report_over_telemetry() -> None:
    assert meter().last("s1") == Totals(0.03, 0.03 * 0.3)
    assert meter(end=None).last("s1") == Totals(0.02, 0.02 * 0.3)
    assert meter(telemetry=None, end=None).last("s1") is None


def test_an_active_row_is_a_breach() -> None:
    assert check({"r1": COMPLETED}, [row(status="ACTIVE")]) == [
        BreachKind.ACTIVE, BreachKind.STATUS_MISMATCH,
    ]


def test_billing_less_than_the_last_report_is_a_breach() -> None:
    billed = row(kwh=0.02, euros=0.006)
    updates = {"r1": [*COMPLETED[:2], update("r1", S.COMPLETED, 0.02, 0.006)]}
    assert check(updates, [billed]) == [BreachKind.BILLED]


def test_without_an_end_report_the_last_telemetry_is_the_bill() -> None:
    updates = {"r1": [*COMPLETED[:2], update("r1", S.FAILED, 0.02, 0.006)]}
    failed = row(status="FAILED", kwh=0.02, euros=0.006)
    assert check(updates, [failed], meter(end=None)) == []
    assert check(updates, [failed]) == [BreachKind.BILLED]


def test_a_session_with_no_report_bills_nothing() -> None:
    updates = {"r1": [update("r1", S.ACCEPTED), update("r1", S.FAILED, 0.0, 0.0)]}
    assert check(updates, [row(status="FAILED", kwh=0.0, euros=0.0)],
                 meter(telemetry=None, end=None)) == []
    updates = {"r1": [update("r1", S.ACCEPTED), update("r1", S.FAILED, 0.01, 0.003)]}
    assert check(updates, [row(status="FAILED", kwh=0.01, euros=0.003)],
                 meter(telemetry=None, end=None)) == [BreachKind.BILLED]


def test_two_different_ends_of_one_session_are_a_breach() -> None:
    log = meter()
    log.add_end("s1", Totals(0.04, 0.012))
    assert check({"r1": COMPLETED}, log=log) == [BreachKind.BILLED, BreachKind.METER_CONFLICT]


def test_a_row_nobody_asked_for_is_a_breach() -> None:
    assert check({"r2": DENIED}, requests=["r2"]) == [BreachKind.UNKNOWN_REQUEST]


def test_a_request_without_a_final_status_is_a_breach() -> None:
    assert check({"r1": COMPLETED[:2]}) == [BreachKind.LAST_UPDATE, BreachKind.NO_FINAL]
    assert check({"r1": COMPLETED, "r3": []}) == [BreachKind.NO_FINAL]


def test_two_final_statuses_are_a_breach() -> None:
    updates = {"r1": [*COMPLETED, update("r1", S.FAILED, 0.03, 0.009, reason="corrected: x")]}
    # A COMPLETED never turns FAILED; the last final (FAILED) disagrees with the row too.
    assert check(updates) == [BreachKind.FINAL_CONFLICT, BreachKind.STATUS_MISMATCH]


def test_a_failed_the_meter_completed_may_become_completed_once_corrected() -> None:
    """SPEC §4: the CP's meter completed a session Central had closed FAILED."""
    log = meter(end=None)
    log.add_end("s1", Totals(0.03, 0.009), "COMPLETED")
    failed = [*COMPLETED[:2], update("r1", S.FAILED, 0.02, 0.006, reason="CP fault: x")]
    flipped = [*failed, update("r1", S.COMPLETED, 0.03, 0.009, reason="corrected: completed")]
    assert check({"r1": flipped}, [row()], log) == []
    unmarked = [*failed, update("r1", S.COMPLETED, 0.03, 0.009, reason="done")]
    assert BreachKind.FINAL_CONFLICT in check({"r1": unmarked}, [row()], log)


def test_a_correction_says_so_and_repeats_the_status() -> None:
    late = [*COMPLETED[:2], update("r1", S.COMPLETED, 0.02, 0.006)]
    corrected = [*late, update("r1", S.COMPLETED, 0.03, 0.009, reason="corrected: meter")]
    assert check({"r1": corrected}) == []
    unmarked = [*late, update("r1", S.COMPLETED, 0.03, 0.009, reason="again")]
    assert check({"r1": unmarked}) == [BreachKind.UNMARKED_CORRECTION]
    repeated = [*COMPLETED, update("r1", S.COMPLETED, 0.03, 0.009)]
    assert check({"r1": repeated}) == []


def test_the_last_update_must_carry_the_ledgers_totals() -> None:
    stale = [*COMPLETED[:2], update("r1", S.COMPLETED, 0.02, 0.006)]
    assert check({"r1": stale}) == [BreachKind.LAST_UPDATE]
    other = [*COMPLETED[:2], update("r1", S.COMPLETED, 0.03, 0.009, session_id="s9")]
    assert check({"r1": other}) == [BreachKind.LAST_UPDATE, BreachKind.TWO_SESSIONS]
    no_totals = [*COMPLETED[:2], update("r1", S.COMPLETED)]
    assert check({"r1": no_totals}) == [BreachKind.LAST_UPDATE]


def test_progress_after_the_final_status_is_a_breach() -> None:
    updates = {"r1": [*COMPLETED, update("r1", S.IN_PROGRESS, 0.03, 0.009)]}
    assert check(updates) == [BreachKind.AFTER_FINAL, BreachKind.LAST_UPDATE]


@pytest.mark.parametrize(
    ("final", "status", "agrees"),
    [
        (S.COMPLETED, "COMPLETED", True),
        (S.FAILED, "FAILED", True),
        (S.FAILED, "STOPPED", True),
        (S.COMPLETED, "FAILED", False),
        (S.FAILED, "COMPLETED", False),
        (S.DENIED, "COMPLETED", False),
    ],
)
def test_the_final_status_agrees_with_the_row(
    final: DriverStatus, status: str, agrees: bool
) -> None:
    updates = {"r1": [update("r1", S.ACCEPTED), update("r1", final, 0.03, 0.009)]}
    breaches = check(updates, [row(status=status)])
    assert (BreachKind.STATUS_MISMATCH not in breaches) is agrees


def test_an_answer_without_a_row_is_a_breach() -> None:
    assert check({"r1": COMPLETED}, rows=[]) == [BreachKind.NO_ROW]
    assert check({"r2": DENIED}, rows=[]) == []


def test_a_session_its_cp_completed_is_never_failed() -> None:
    log = meter(end=None)
    log.add_end("s1", Totals(0.03, 0.009), "COMPLETED")
    failed = [*COMPLETED[:2], update("r1", S.FAILED, 0.03, 0.009, reason="CP lost")]
    assert check({"r1": failed}, [row(status="FAILED")], log) == [BreachKind.FAILED_COMPLETED]
    assert log.results == {"s1": {"COMPLETED"}}
    assert check({"r1": COMPLETED}, [row()], log) == []
    faulted = meter(end=None)
    faulted.add_end("s1", Totals(0.03, 0.009), "FAILED")
    assert check({"r1": failed}, [row(status="FAILED")], faulted) == []


def test_one_request_with_two_sessions_is_a_breach() -> None:
    twice = [row(), row(session_id="s2")]
    assert BreachKind.TWO_SESSIONS in check({"r1": COMPLETED}, twice)
    other = [update("r1", S.ACCEPTED, session_id="s2"), *COMPLETED]
    assert check({"r1": other}) == [BreachKind.TWO_SESSIONS]


def test_a_repeated_final_update_is_a_breach_only_where_exactly_once_holds() -> None:
    repeated = {"r1": [*COMPLETED, update("r1", S.COMPLETED, 0.03, 0.009)]}
    assert check(repeated) == []
    assert check(repeated, exactly_once=True) == [BreachKind.REPEATED_FINAL]
    late = [*COMPLETED[:2], update("r1", S.COMPLETED, 0.02, 0.006)]
    corrected = {"r1": [*late, update("r1", S.COMPLETED, 0.03, 0.009, reason="corrected: m")]}
    assert check(corrected, exactly_once=True) == []
    twice = {"r1": [*corrected["r1"], corrected["r1"][-1]]}
    assert check(twice, exactly_once=True) == [BreachKind.REPEATED_FINAL]
    denied = {"r2": DENIED * 2}
    assert check(denied, rows=[], exactly_once=True) == [BreachKind.REPEATED_FINAL]


def test_the_table_shows_each_fault_and_its_breaches() -> None:
    good = Outcome("db-lock (20 s)", detection=5.04, recovery=1.26, sessions=9, requests=40,
                   corrected=2)
    bad = Outcome("central-kill (5 s)", detection=None, recovery=None, sessions=3, requests=9,
                  breaches=[Breach(BreachKind.ACTIVE, "s1", "on CP-1")],
                  problems=["CP-1 took no new request within 30 s"])
    lines = format_table([good, bad])
    assert lines[0].split() == ["fault", "detection", "recovery", "sessions", "requests",
                                "corrected", "mismatches", "result"]
    assert lines[2].split() == ["db-lock", "(20", "s)", "5.0", "s", "1.3", "s", "9", "40",
                                "2", "0", "ok"]
    assert lines[3].split()[-8:] == ["s)", "—", "—", "3", "9", "0", "1", "FAIL"]
    assert "ACTIVE s1" in "\n".join(lines)
    assert "CP-1 took no new request" in "\n".join(lines)


def test_the_table_shows_the_take_over_when_a_row_has_several_centrals() -> None:
    one = Outcome("central-kill (5 s)", detection=2.0, recovery=1.0, sessions=3, requests=9)
    two = Outcome("central-kill-one-of-two 0s mid-session", detection=7.1, recovery=8.0,
                  takeover=7.46, sessions=5, requests=20)
    lines = format_table([one, two])
    assert lines[0].split() == ["fault", "detection", "recovery", "take-over", "sessions",
                                "requests", "corrected", "mismatches", "result"]
    assert lines[2].split()[-6:] == ["—", "3", "9", "0", "0", "ok"]
    assert lines[3].split()[-8:] == ["s", "7.5", "s", "5", "20", "0", "0", "ok"]
