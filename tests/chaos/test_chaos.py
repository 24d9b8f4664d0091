"""The fault matrix (issue 9): each fault with sessions running, on a real broker and real
processes, then the ledger's invariants (SPEC §4, :mod:`tests.chaos.ledger`).

Every run starts Central and two CPs (engine and monitor each), then plays rounds. In a
round requests come to every CP (one per CP every 1.5 s, answered or not) until the target
CP's session reaches the round's phase (mid-session, just before its end, at its end,
once Central has recorded its end, or as the next session starts: see
:class:`~tests.chaos.harness.Phase`); the fault hits; once it has ended the load stops and
every CP must accept a new request within 30 s; then every request must have its final
status and, once the CPs are idle, the ledger must be exact (checked on everything so far;
a row of the table shows what is new in its round). ``chaos`` marks the full matrix
(``make chaos``); ``chaos_fast`` the shorter subset that runs with ``make test``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.chaos import faults
from tests.chaos.harness import (
    CHAOS_ENGINE,
    RECOVERY_DEADLINE,
    ChaosRun,
    Outcome,
    Phase,
    chaos_system,
    format_table,
)
from tests.chaos.ledger import CORRECTED, describe

CPS = ("CP-1", "CP-2")
SESSION_SECONDS = float(CHAOS_ENGINE["CP_ENGINE_SESSION_SECONDS"])


@dataclass(frozen=True)
class Scenario:
    fault: str
    hold: float
    phases: tuple[Phase, ...]
    """Each a round: the fault hits the target CP's session there; the ledger is checked
    after every round, on everything so far."""
    central_env: dict[str, str] = field(default_factory=dict)
    central_only: bool = False
    """Only Central is hurt (its database stalls): the CPs stay healthy, so no session may
    end FAILED (SPEC §4: running sessions are never failed for Central's own delay)."""
    meter_settles: bool = False
    """Central was down while sessions ended: a session its CP reported COMPLETED must be
    COMPLETED (SPEC §4: a restarted Central first reads what its CPs reported, then closes
    only the sessions no CP claims)."""

    def label(self, phase: Phase) -> str:
        return f"{self.fault} {self.hold:g}s {phase.value}"


MID, LATE, END, RECORDED, NEXT = (
    Phase.MID, Phase.LATE, Phase.END, Phase.RECORDED, Phase.NEXT
)
QUICK_SILENCE = {"CENTRAL_CP_SILENCE_TIMEOUT": "5"}
"""With its monitor dead, a crashed engine is noticed by its silence."""

FULL = [
    Scenario("db-lock", 20, (MID, RECORDED), central_only=True),
    Scenario("central-kill", 5, (MID, LATE, END, NEXT), meter_settles=True),
    Scenario("frozen-engine", 20, (MID, END)),
    Scenario("engine-kill", 3, (MID, LATE, END)),
    Scenario("monitor-kill", 3, (MID, END), QUICK_SILENCE),
    Scenario("broker-kill", 5, (MID, END)),
]
FAST = [
    Scenario("db-lock", 8, (MID,), central_only=True),
    Scenario("central-kill", 4, (LATE,), meter_settles=True),
    Scenario("frozen-engine", 8, (MID,)),
    Scenario("engine-kill", 2, (LATE,)),
    Scenario("monitor-kill", 1, (MID,), QUICK_SILENCE),
    Scenario("broker-kill", 3, (MID,)),
]


def _params() -> list[object]:
    return [
        *(pytest.param(s, id=f"full-{s.fault}", marks=pytest.mark.chaos) for s in FULL),
        *(pytest.param(s, id=f"fast-{s.fault}", marks=pytest.mark.chaos_fast) for s in FAST),
    ]


@contextlib.asynccontextmanager
async def bootstrap_for(
    scenario: Scenario, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[str, faults.Fault]]:
    """The broker of the run and the fault to inject: the broker fault gets a broker of
    its own, the others the session's."""
    if scenario.fault == "broker-kill":
        async with faults.own_broker(tmp_path / "kafka") as broker:
            yield broker.bootstrap, faults.broker_kill(broker)
        return
    inject = {
        "db-lock": faults.db_lock,
        "central-kill": faults.central_kill,
        "frozen-engine": faults.frozen_engine,
        "engine-kill": faults.engine_kill,
        "monitor-kill": faults.monitor_kill,
    }[scenario.fault]
    yield request.getfixturevalue("kafka_bootstrap"), inject


async def one_round(
    run: ChaosRun, scenario: Scenario, phase: Phase, inject: faults.Fault, outcome: Outcome,
    known: set[tuple[str, str]],
) -> None:
    """One fault at `phase`; `known` holds what earlier rounds reported (breaches, and
    failed sessions)."""
    run.start_load()
    await run.wait_phase(phase, faults.target(run))
    window = await inject(run, scenario.hold)
    await run.stop_load()
    recovered = await run.recover(window.end)
    outcome.notes += window.notes
    outcome.problems += window.problems

    detected = window.detect()
    outcome.detection = None if detected is None else detected - window.start
    if detected is None:
        outcome.problems.append("no sign that Central noticed the fault")
    late = [cp for cp, at in recovered.items() if at is None]
    if late:
        outcome.problems.append(
            f"{', '.join(late)} took no new request within {RECOVERY_DEADLINE:g} s"
        )
    else:
        outcome.recovery = max(at for at in recovered.values() if at is not None) - window.end

    unanswered = await run.drain(timeout=SESSION_SECONDS + 45)
    if unanswered:
        outcome.problems.append(f"{len(unanswered)} request(s) without a final status")
    await run.settle()
    rows, breaches = await run.check()
    outcome.breaches = [b for b in breaches if (b.kind.name, b.subject) not in known]
    known.update((b.kind.name, b.subject) for b in breaches)
    if scenario.central_only:
        failed = [r for r in rows if r.status == "FAILED"
                  and ("FAILED", r.session_id) not in known]
        known.update(("FAILED", r.session_id) for r in failed)
        outcome.problems += [
            f"session {r.session_id} on healthy {r.cp_id} ended FAILED for Central's own "
            f"delay: {r.reason!r} (billed {r.totals}); its driver saw "
            f"{describe(run.observer.updates.get(r.request_id, ()))}"
            for r in failed
        ]
    if scenario.meter_settles:
        unsettled = [r for r in rows if r.status != "COMPLETED"
                     and "COMPLETED" in run.observer.results.get(r.session_id, ())
                     and ("UNSETTLED", r.session_id) not in known]
        known.update(("UNSETTLED", r.session_id) for r in unsettled)
        outcome.problems += [
            f"session {r.session_id} on {r.cp_id} is {r.status} though its CP reported it "
            f"COMPLETED: {r.reason!r}; its driver saw "
            f"{describe(run.observer.updates.get(r.request_id, ()))}"
            for r in unsettled
        ]
    outcome.sessions = len(rows)
    outcome.requests = len(run.observer.requests)
    outcome.corrected = sum(
        any((u.reason or "").startswith(CORRECTED) for u in updates)
        for updates in run.observer.updates.values()
    )
    metered = [r for r in rows if r.status == "COMPLETED" and r.kwh > 0
               and run.observer.meter.last(r.session_id) is not None]
    if not metered:  # the check would hold vacuously
        outcome.problems.append("no completed session with a meter reading to check")


@pytest.mark.parametrize("scenario", _params())
async def test_the_ledger_survives(
    scenario: Scenario,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    chaos_outcomes: list[Outcome],
) -> None:
    outcomes: list[Outcome] = []
    known: set[tuple[str, str]] = set()
    async with (
        bootstrap_for(scenario, request, tmp_path) as (bootstrap, inject),
        chaos_system(bootstrap, tmp_path, CPS) as run,
    ):
        await run.start(scenario.central_env)
        for phase in scenario.phases:
            outcome = Outcome(scenario.label(phase))
            outcomes.append(outcome)
            chaos_outcomes.append(outcome)
            try:
                await one_round(run, scenario, phase, inject, outcome, known)
            except BaseException as exc:
                outcome.problems.append(f"aborted: {exc!r}"[:400])
                raise
        assert all(o.ok for o in outcomes), "\n".join(format_table(outcomes))
