"""The fault matrix (issue 9): each fault with sessions running, on a real broker and real
processes, then the ledger's invariants (SPEC §4, :mod:`tests.chaos.ledger`).

Every run: Central and two CPs (engine and monitor each) start; requests come to every CP
(one per CP every 1.5 s, answered or not) until a session runs on each; the fault hits;
once it has ended the load stops and every CP must accept a new request within 30 s;
then every request must have its final status and, once the CPs are idle, the ledger
must be exact. ``chaos`` marks the full matrix (``make chaos``); ``chaos_fast`` the
shorter subset that runs with ``make test``.
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
    chaos_system,
    format_table,
)
from tests.chaos.ledger import CORRECTED

CPS = ("CP-1", "CP-2")
SESSION_SECONDS = float(CHAOS_ENGINE["CP_ENGINE_SESSION_SECONDS"])


@dataclass(frozen=True)
class Scenario:
    fault: str
    hold: float
    central_env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.fault} ({self.hold:g} s)"


FULL = [
    Scenario("db-lock", 20),
    Scenario("central-kill", 5),
    Scenario("frozen-engine", 20),
    Scenario("engine-kill", 3),
    Scenario("monitor-kill", 3, {"CENTRAL_CP_SILENCE_TIMEOUT": "5"}),
    Scenario("broker-kill", 5),
]
FAST = [
    Scenario("db-lock", 8),
    Scenario("central-kill", 4),
    Scenario("frozen-engine", 8),
    Scenario("engine-kill", 2),
    Scenario("monitor-kill", 1, {"CENTRAL_CP_SILENCE_TIMEOUT": "5"}),
    Scenario("broker-kill", 3),
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


async def run_scenario(run: ChaosRun, scenario: Scenario, inject: faults.Fault,
                       outcome: Outcome) -> None:
    await run.start(scenario.central_env)
    run.start_load()
    await run.wait_supplying()

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
    rows, outcome.breaches = await run.check()
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
    outcome = Outcome(scenario.label)
    chaos_outcomes.append(outcome)
    async with (
        bootstrap_for(scenario, request, tmp_path) as (bootstrap, inject),
        chaos_system(bootstrap, tmp_path, CPS) as run,
    ):
        try:
            await run_scenario(run, scenario, inject, outcome)
        except BaseException as exc:
            outcome.problems.append(f"aborted: {exc!r}"[:400])
            raise
        assert outcome.ok, "\n".join(format_table([outcome]))
