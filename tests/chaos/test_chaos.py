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

Issue 14 adds the faults Central must ride through without failing a session: Central
stalled, a full disk under its database, a paused broker, a broker that lost its data,
clocks that are off or stepped (libfaketime, :class:`~tests.chaos.harness.FakeClock`), a
message stamped an hour ahead, a restart under a 1,000-CP fleet, a second Central on the
same database. The stalls last 1.5 times the silence limit (shortened to
``STALL_SILENCE``), as the findings' 45 s did the default 30 s, so a Central that judges
silence by its own clock fails them as it did at full length. Every row also checks that
no session its CP completed is recorded FAILED (:mod:`tests.chaos.ledger`).

Issue 15 puts OCPP chargers behind the OCPP gateway (two chargers played by the `ocpp`
library, :mod:`tests.chaos.chargers`, in 1.6 or 2.0.1): the gateway SIGKILLed mid-session
and restarted, or one charger's connection dropped for 30 s, while the chargers go on
charging and queue what they would send; back, they replay it. Besides the ledger, each
transaction a charger's meter ran must be one COMPLETED session billed exactly its meter
and dated by the charger's own start and stop (:meth:`ChaosRun.meter_problems`). The
``gateway-kill-tx`` row kills the gateway the moment a charger reads the answer to its
transaction's stop, then its next start (1.6 StopTransaction and StartTransaction, 2.0.1
TransactionEvent Ended and Started): a gateway that answered them before they were durable
lost them.

Issue 17 limits a site: ``central-restart-limited`` runs four CPs in one site whose limit
(40 kW) is below their sum (88 kW) and SIGKILLs Central mid-session, then as the next
sessions start (12 s sessions, which outlive the outage). The site's power is summed from
the CPs' own telemetry (:mod:`tests.chaos.power`); after Central is back (``/health`` 200)
it may be over the limit only until two allocation and two telemetry intervals have passed,
or within two telemetry intervals of a session's start (SPEC §10). The worst overshoot of
each round, during the outage and after, is a line of the table.

Issue 16 runs several Centrals on one PostgreSQL (SPEC §9; :mod:`tests.chaos.centrals`), on
two CPs whose partitions fall to different instances (``FAILOVER_CPS``):
``central-kill-one-of-two`` SIGKILLs the instance that owns the target CP mid-session and
leaves it dead (``-fleet``: under the 1,000-CP fleet and the load generator's 40 drivers a
second); the other must list every partition on its ``/health`` and have a request
on a CP the dead one owned ACCEPTED within 10 s (the take-over column; the CPs work all
along, so no session may fail and none may be shown faulty or disconnected).
``central-rejoin`` then restarts it with the same id (its partitions come back);
``central-rolling-restart`` SIGTERMs one, waits for the other to serve its partitions,
restarts it, then the same for the other; ``postgres-restart`` stops PostgreSQL mid-session
and starts it again (two Centrals, or one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from evcharging.common.messages import DriverStatus
from evcharging.devtools.postgres import LocalPostgres
from tests.chaos import faults
from tests.chaos.harness import (
    CHAOS_ENGINE,
    FLEET_PACE,
    RECOVERY_DEADLINE,
    ChaosRun,
    FakeClock,
    Outcome,
    Phase,
    chaos_system,
    format_table,
    now,
)
from tests.chaos.ledger import CORRECTED, describe
from tests.polling import poll

CPS = ("CP-1", "CP-2")
OCPP_CPS = ("CH-1.1", "CH-2.1")
"""Connector 1 of the chargers CH-1 and CH-2 (the OCPP rows)."""
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
    calm: bool = False
    """The CPs work all along: Central must not show any of them faulty or disconnected
    from the fault on (SPEC §4: while Central cannot read, write or publish, no CP becomes
    silent)."""
    quiet: bool = False
    """Calm, and there is nothing to notice: no detection time; and unless `behind`,
    Central must not deny a request "Central overloaded" or "request expired"."""
    behind: bool = False
    """The fault holds Central back for a moment: shedding requests is right then."""
    exactly_once: bool = False
    """Central restarts under load: no final update may be repeated (SPEC §4)."""
    loses_data: bool = False
    """The fault deletes the broker's data: a request the broker acknowledged just before
    and lost with it reached nobody, and no final status can be asked for it."""
    fleet: int = 0
    """The CPs are the first `follow` of a CP Fleet of this many (0: two CPs, an engine and
    a monitor each)."""
    follow: int = 40
    fleet_env: dict[str, str] = field(default_factory=lambda: dict(FLEET_PACE))
    steps: tuple[str, ...] = ()
    """What each round does, for its label, where the hold alone does not say it."""
    driver_load: float = 0.0
    """Drivers a second of the load generator (ev_load) on the whole fleet, during each
    round's first DRIVER_LOAD_SECONDS, beside the test's own requests."""
    ocpp: str = ""
    """The CPs are OCPP chargers of this protocol behind the OCPP gateway (issue 15); the
    ledger is held to the chargers' own meters and times too."""
    site_limit: float = 0.0
    """The run's CPs are LIMITED_CPS, all in SITE with this limit (kW, set with
    ``CENTRAL_SITE_LIMITS``) below the sum of their rates (issue 17): the site's power, by the
    CPs' own telemetry, is checked with :func:`~tests.chaos.faults.limit_kept`."""
    session: float = 0.0
    """The engines' session length in seconds, when not CHAOS_ENGINE's."""
    centrals: int = 0
    """That many Centrals on PostgreSQL (issue 16); 0: one on SQLite."""
    known_bug: str = ""
    """A bug of the system this row finds that is not fixed yet: the row is expected to
    fail, and says so in the table (strict: once the bug is fixed the row fails as XPASS
    until this is removed)."""

    def label(self, phase: Phase, index: int = 0) -> str:
        what = self.steps[index] if self.steps else f"{self.hold:g}s"
        if self.ocpp:
            what = f"{self.ocpp} {what}"
        return f"{self.fault} {what} {phase.value}"

    @property
    def id(self) -> str:
        return f"{self.fault}-{self.ocpp}" if self.ocpp else self.fault


MID, LATE, END, RECORDED, NEXT = (
    Phase.MID, Phase.LATE, Phase.END, Phase.RECORDED, Phase.NEXT
)
QUICK_SILENCE = {"CENTRAL_CP_SILENCE_TIMEOUT": "5"}
"""With its monitor dead, a crashed engine is noticed by its silence."""
STALL_S = 10.0
"""The silence limit of the stall rows: they last 1.5 times it (2 times for the disk),
as the findings' 45 s (60 s) did the default 30 s."""
STALL_SILENCE = {"CENTRAL_CP_SILENCE_TIMEOUT": f"{STALL_S:g}"}
STALL = 1.5 * STALL_S
CENTRAL_STEPS = (120, 0)
"""Central's clock: +120 s off the true time, then back (a step of -120 s)."""
CP_BEHIND = -60
DRIVER_BEHIND = -3
FLEET = 1000
DRIVER_LOAD = 40.0
"""Drivers a second on the 1,000-CP fleet (with 6 s sessions about 240 supply at once):
Central always has a batch in hand, so a kill finds work handled and not yet committed."""
DRIVER_LOAD_SECONDS = 20.0
DB_TMPFS_MIB = 64
OCPP16, OCPP201 = "ocpp1.6", "ocpp2.0.1"
LIMITED_CPS = ("CP-1", "CP-2", "CP-3", "CP-4")
SITE = "site-chaos"
SITE_LIMIT = 40.0
"""Below the four CPs' 88 kW: two sessions get 20 kW each, three 13.333, four 10."""
ALLOCATION_INTERVAL = 2.0
TELEMETRY_INTERVAL = float(CHAOS_ENGINE["CP_ENGINE_TELEMETRY_INTERVAL"])
LIMITED_SESSION = 12.0
"""The full limited row's sessions outlive the outage: a CP left over the limit when
Central died is still running when Central is back, and must be brought under it (the
fast row keeps 6 s sessions, to stay under 40 s)."""
LIMITED = {"CENTRAL_SITE_LIMITS": f"{SITE}={SITE_LIMIT:g}",
           "CENTRAL_ALLOCATION_INTERVAL": f"{ALLOCATION_INTERVAL:g}"}
FAILOVER_CPS = ("CP-1", "CP-5")
"""Partitions 6 and 1 of 12: two instances that join one after the other (0-5 and 6-11)
or together (even and odd) own one each; the first is the target, whose owner the
failover faults hit."""

def failover(fault: str, hold: float, phases: tuple[Phase, ...], centrals: int = 2,
             steps: tuple[str, ...] = (), fleet: int = 0, driver_load: float = 0.0) -> Scenario:
    """A row of several Centrals: SPEC §9, no session lost, failed, left open or billed
    twice because an instance stopped, crashed or joined, and §4 across the handover (no
    CP shown silent, no final update repeated)."""
    return Scenario(fault, hold, phases, centrals=centrals, steps=steps, central_only=True,
                    calm=True, meter_settles=True, exactly_once=True, fleet=fleet,
                    driver_load=driver_load)


FULL = [
    Scenario("db-lock", 20, (MID, RECORDED), central_only=True),
    Scenario("central-kill", 5, (MID, LATE, END, NEXT), meter_settles=True),
    Scenario("frozen-engine", 20, (MID, END)),
    Scenario("engine-kill", 3, (MID, LATE, END)),
    Scenario("monitor-kill", 3, (MID, END), QUICK_SILENCE),
    Scenario("broker-kill", 5, (MID, END)),
    # issue 14
    Scenario("central-stall", STALL, (MID,), STALL_SILENCE, central_only=True, calm=True),
    Scenario("disk-full", 2 * STALL_S, (MID,), STALL_SILENCE, central_only=True, calm=True),
    Scenario("broker-pause", STALL, (MID,), STALL_SILENCE, central_only=True, calm=True),
    Scenario("broker-lost", 3, (MID,), STALL_SILENCE, central_only=True, calm=True,
             loses_data=True),
    Scenario("central-clock", 12, (MID, MID), central_only=True, quiet=True,
             steps=("+120s", "-120s")),
    Scenario("cp-clock", 15, (MID,), central_only=True, quiet=True, steps=(f"{CP_BEHIND:+d}s",)),
    Scenario("driver-clock", 1, (MID,), central_only=True, quiet=True,
             steps=(f"{DRIVER_BEHIND:+d}s",)),
    Scenario("future-stamp", 8, (MID,), central_only=True, quiet=True, behind=True,
             steps=("+1h",), fleet=FLEET, follow=2, driver_load=DRIVER_LOAD),
    Scenario("central-kill-fleet", 0, (END, MID), meter_settles=True, exactly_once=True,
             fleet=FLEET, steps=(f"restart at once, {FLEET:,} CPs",) * 2,
             driver_load=DRIVER_LOAD),
    Scenario("second-central", 20, (MID,), central_only=True, quiet=True),
    # issue 15: OCPP chargers behind the gateway
    Scenario("gateway-kill", 5, (MID,), meter_settles=True, exactly_once=True, ocpp=OCPP16),
    Scenario("gateway-kill", 5, (MID,), meter_settles=True, exactly_once=True, ocpp=OCPP201),
    Scenario("gateway-kill-tx", 5, (LATE, END), meter_settles=True, exactly_once=True,
             ocpp=OCPP16, steps=("5s at its stop's answer,", "5s at the next start's answer,")),
    Scenario("gateway-kill-tx", 5, (LATE, END), meter_settles=True, exactly_once=True,
             ocpp=OCPP201,
             steps=("5s at its stop's answer,", "5s at the next start's answer,")),
    Scenario("charger-drop", 30, (MID,), meter_settles=True, exactly_once=True, ocpp=OCPP16),
    Scenario("charger-drop", 30, (MID,), meter_settles=True, exactly_once=True,
             ocpp=OCPP201),
    # issue 17: Central killed while a site is limited
    Scenario("central-restart-limited", 5, (MID, NEXT), LIMITED, meter_settles=True,
             exactly_once=True, site_limit=SITE_LIMIT, session=LIMITED_SESSION),
    # issue 16: several Centrals on PostgreSQL
    failover("central-kill-one-of-two", 5, (LATE,)),
    failover("central-kill-one-of-two-fleet", 5, (MID,), fleet=FLEET, driver_load=DRIVER_LOAD,
             steps=(f"5s, {FLEET:,} CPs,",)),
    failover("central-rejoin", 3, (MID, END), steps=("SIGKILL, back after 3s,",) * 2),
    failover("central-rolling-restart", 0, (MID,), steps=("SIGTERM each in turn,",)),
    failover("postgres-restart", 5, (MID, RECORDED)),
    failover("postgres-restart-one-central", 5, (MID,), centrals=1),
]
FAST = [
    Scenario("db-lock", 8, (MID,), central_only=True),
    Scenario("central-kill", 4, (LATE,), meter_settles=True),
    Scenario("frozen-engine", 8, (MID,)),
    Scenario("engine-kill", 2, (LATE,)),
    Scenario("monitor-kill", 1, (MID,), QUICK_SILENCE),
    Scenario("broker-kill", 3, (MID,)),
    # issue 14: the cheap ones
    Scenario("driver-clock", 1, (MID,), central_only=True, quiet=True,
             steps=(f"{DRIVER_BEHIND:+d}s",)),
    Scenario("future-stamp", 6, (MID,), central_only=True, quiet=True, behind=True,
             steps=("+1h",)),
    # issue 15: one row per OCPP version, the drop shortened (its 30 s row is full-only)
    Scenario("gateway-kill", 4, (MID,), meter_settles=True, exactly_once=True, ocpp=OCPP16),
    Scenario("charger-drop", 10, (MID,), meter_settles=True, exactly_once=True,
             ocpp=OCPP201),
    # issue 17: one round, Central killed as the next (6 s) sessions start
    Scenario("central-restart-limited", 3, (NEXT,), LIMITED, meter_settles=True,
             exactly_once=True, site_limit=SITE_LIMIT),
    # issue 16: the take-over, short
    failover("central-kill-one-of-two", 0, (MID,)),
]


def _params() -> list[object]:
    def marks(scenario: Scenario, mark: pytest.MarkDecorator) -> list[pytest.MarkDecorator]:
        if scenario.known_bug:
            return [mark, pytest.mark.xfail(strict=True, reason=scenario.known_bug)]
        return [mark]

    return [
        *(pytest.param(s, id=f"full-{s.id}", marks=marks(s, pytest.mark.chaos)) for s in FULL),
        *(pytest.param(s, id=f"fast-{s.id}", marks=marks(s, pytest.mark.chaos_fast))
          for s in FAST),
    ]


@dataclass
class Rig:
    """What a fault needs set up before the run starts."""

    bootstrap: str
    inject: faults.Fault
    central_env: dict[str, str] = field(default_factory=dict)
    engine_envs: dict[str, dict[str, str]] = field(default_factory=dict)
    db_dir: Path | None = None
    """Where Central's database lives, when not in the test's folder."""
    db_url: str = ""
    """The PostgreSQL database of a run of several Centrals (issue 16)."""


BROKER_FAULTS = {
    "broker-kill": faults.broker_kill,
    "broker-pause": faults.broker_pause,
    "broker-lost": faults.broker_lost,
}
PLAIN_FAULTS: dict[str, faults.Fault] = {
    "db-lock": faults.db_lock,
    "central-kill": faults.central_kill,
    "frozen-engine": faults.frozen_engine,
    "engine-kill": faults.engine_kill,
    "monitor-kill": faults.monitor_kill,
    "central-stall": faults.central_stall,
    "future-stamp": faults.future_stamp,
    "central-kill-fleet": faults.central_kill,
    "second-central": faults.second_central,
    "gateway-kill": faults.gateway_kill,
    "charger-drop": faults.charger_drop,
}
FAILOVER_FAULTS: dict[str, faults.Fault] = {
    "central-kill-one-of-two": faults.central_kill_one,
    "central-kill-one-of-two-fleet": faults.central_kill_one,
    "central-rejoin": faults.central_rejoin,
    "central-rolling-restart": faults.central_rolling_restart,
}


@contextlib.asynccontextmanager
async def rig_for(
    scenario: Scenario, request: pytest.FixtureRequest, tmp_path: Path, cps: tuple[str, ...]
) -> AsyncIterator[Rig]:
    """The broker of the run and the fault to inject: the broker faults get a broker of
    their own, the others the session's; a clock fault its clock, the full disk its
    tmpfs."""
    if scenario.fault in BROKER_FAULTS:
        async with faults.own_broker(tmp_path / "kafka") as broker:
            yield Rig(broker.bootstrap, BROKER_FAULTS[scenario.fault](broker))
        return
    bootstrap: str = request.getfixturevalue("kafka_bootstrap")
    if scenario.fault.startswith("postgres-restart"):
        async with faults.own_postgres() as own:
            yield Rig(bootstrap, faults.postgres_restart(own), db_url=own.url)
        return
    if scenario.fault in FAILOVER_FAULTS:
        server: LocalPostgres = request.getfixturevalue("postgres_server")
        name = f"chaos_{uuid.uuid4().hex[:12]}"
        url = await asyncio.to_thread(server.create_database, name)
        try:
            yield Rig(bootstrap, FAILOVER_FAULTS[scenario.fault], db_url=url)
        finally:
            await asyncio.to_thread(server.drop_database, name)
        return
    if scenario.fault in PLAIN_FAULTS:
        yield Rig(bootstrap, PLAIN_FAULTS[scenario.fault])
    elif scenario.fault == "central-restart-limited":
        yield Rig(bootstrap, faults.central_restart_limited, engine_envs={
            cp: {"CP_ENGINE_SESSION_SECONDS": f"{scenario.session:g}"} for cp in cps
        } if scenario.session else {})
    elif scenario.fault == "gateway-kill-tx":
        yield Rig(bootstrap, faults.gateway_kill_as(("stop", "start")))
    elif scenario.fault == "disk-full":
        with faults.tmpfs(tmp_path / "disk", DB_TMPFS_MIB) as disk:
            yield Rig(bootstrap, faults.disk_full(disk), db_dir=disk.path)
    elif scenario.fault == "central-clock":
        clock = FakeClock(tmp_path / "central.faketime")
        yield Rig(bootstrap, faults.clock_steps(clock, CENTRAL_STEPS), central_env=clock.env())
    elif scenario.fault == "cp-clock":
        clock = FakeClock(tmp_path / "engine.faketime", CP_BEHIND)
        yield Rig(bootstrap, faults.wrong_clock,
                  engine_envs={faults.target_of(cps): clock.env()})
    elif scenario.fault == "driver-clock":
        clock = FakeClock(tmp_path / "driver.faketime", DRIVER_BEHIND)
        yield Rig(bootstrap, faults.driver_clock(clock, cps, requests=3))
    else:
        raise AssertionError(f"no rig for the fault {scenario.fault!r}")


async def one_round(
    run: ChaosRun, scenario: Scenario, phase: Phase, inject: faults.Fault, outcome: Outcome,
    known: set[tuple[str, str]],
) -> None:
    """One fault at `phase`; `known` holds what earlier rounds reported (breaches, and
    failed sessions)."""
    began = now()
    run.start_load()
    load = (run.start_driver_load(scenario.driver_load, DRIVER_LOAD_SECONDS, scenario.fleet)
            if scenario.driver_load else None)
    try:
        await run.wait_phase(phase, faults.target(run))
    except AssertionError:
        outcome.problems.append(f"before the fault, {run.answers(faults.target(run))}")
        raise
    window = await inject(run, scenario.hold)
    await run.stop_load()
    recovered = await run.recover(window.end)
    outcome.notes += window.notes
    outcome.problems += window.problems
    if load is not None and load.popen is not None and load.popen.poll() not in (None, 0):
        outcome.problems.append(f"the load generator exited {load.popen.returncode}: "
                                f"{load.log()[-300:]!r}")
    outcome.takeover = window.takeover

    detected = window.detect()
    outcome.detection = None if detected is None else detected - window.start
    if detected is None and not scenario.quiet:
        outcome.problems.append("no sign that Central noticed the fault")
    late = [cp for cp, at in recovered.items() if at is None]
    if late:
        outcome.problems.append(
            f"{', '.join(late)} took no new request within {RECOVERY_DEADLINE:g} s"
        )
    else:
        outcome.recovery = max(at for at in recovered.values() if at is not None) - window.end

    unanswered = [r for r in await run.drain(timeout=SESSION_SECONDS + 45)
                  if ("NO_FINAL", r) not in known]
    if scenario.loses_data:
        lost = [r for r in unanswered if run.observer.sent_at.get(r, window.end) < window.end
                and not run.observer.updates.get(r)]
        if lost:
            outcome.notes.append(f"{len(lost)} request(s) sent before the broker lost its "
                                 "data reached nobody (lost with it)")
            known.update(("NO_FINAL", r) for r in lost)
            unanswered = [r for r in unanswered if r not in lost]
    if unanswered:
        outcome.problems.append(
            f"{len(unanswered)} request(s) without a final status (times from the fault): "
            + "; ".join(run.observer.whereabouts(r, window.start) for r in unanswered[:6]))
    await run.settle()
    rows, breaches = await run.check(exactly_once=scenario.exactly_once)
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
    if scenario.calm or scenario.quiet:
        outcome.problems += calm_problems(
            run, window.start, known, shedding=scenario.behind or not scenario.quiet
        )
    if scenario.meter_settles:
        # FAILED ones are the ledger's breach FAILED_COMPLETED, in every row
        unsettled = [r for r in rows if r.status not in ("COMPLETED", "FAILED")
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
    if scenario.site_limit:
        notes, problems = faults.limit_kept(run, window, began, scenario.site_limit,
                                            allocation=ALLOCATION_INTERVAL,
                                            telemetry=TELEMETRY_INTERVAL)
        outcome.notes += notes
        outcome.problems += problems
    if scenario.ocpp:
        charged = [p for p in await run.meter_problems() if ("METER", p) not in known]
        known.update(("METER", p) for p in charged)
        outcome.problems += charged
        ran = sum(tx.stopped is not None for c in run.chargers.values() for tx in c.transactions)
        outcome.notes.append(f"{ran} transaction(s) of the chargers' meters held against "
                             "Central's sessions so far")
    metered = [r for r in rows if r.status == "COMPLETED" and r.kwh > 0
               and run.observer.meter.last(r.session_id) is not None]
    if not metered:  # the check would hold vacuously
        outcome.problems.append("no completed session with a meter reading to check")


SHED = ("Central overloaded", "request expired")


def calm_problems(
    run: ChaosRun, start: float, known: set[tuple[str, str]], *, shedding: bool
) -> list[str]:
    """CPs shown faulty or disconnected from `start` on; unless `shedding` is allowed,
    requests denied as if Central were behind."""
    problems = []
    shown: dict[tuple[str, str], list[float]] = {}
    for sign in run.watcher.signs:
        alarming = ((sign.kind == "state" and sign.value in ("DISCONNECTED", "FAULT"))
                    or (sign.kind == "faulty" and sign.value is True))
        if sign.at < start or not alarming or sign.cp_id not in run.cps:
            continue
        key = ("SHOWN", f"{sign.cp_id} {sign.kind} {sign.at}")
        if key not in known:
            known.add(key)
            shown.setdefault((str(sign.cp_id), f"{sign.kind} {sign.value}"), []).append(sign.at)
    problems += [f"{cp_id} shown {what} {len(times)} time(s), first {times[0] - start:.1f} s "
                 f"into the fault" for (cp_id, what), times in shown.items()]
    shed: dict[str, list[str]] = {}
    for request_id in run.observer.requests if not shedding else ():
        final = run.observer.final(request_id)
        if (final is not None and final.status is DriverStatus.DENIED
                and (final.reason or "").startswith(SHED)
                and ("SHED", request_id) not in known):
            known.add(("SHED", request_id))
            shed.setdefault((final.reason or "").split(" (")[0], []).append(final.driver_id)
    problems += [f"{len(ids)} request(s) DENIED {reason!r} though Central was not behind "
                 f"(drivers {', '.join(sorted(set(ids)))})" for reason, ids in shed.items()]
    return problems


CLOCK_CHILD = """
import asyncio, sys, time
async def main():
    for _ in range(400):  # asyncio's timers run on the monotonic clock, which stays true
        print(f"{time.time() - time.monotonic():.3f}", flush=True)
        await asyncio.sleep(0.05)  # the child's printing pace
asyncio.run(main())
"""


async def test_a_fake_clock_steps_a_running_process(tmp_path: Path) -> None:
    """The clock faults' premise: a process started with FakeClock.env() sees its wall
    clock jump when the test steps it, while asyncio (monotonic) runs on undisturbed."""
    clock = FakeClock(tmp_path / "clock")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLOCK_CHILD, env={**os.environ, **clock.env()},
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    stdout = child.stdout

    async def offset() -> float:
        return float(await asyncio.wait_for(stdout.readline(), 10))

    try:
        base = await offset()
        for step in (120, -3, 0):
            clock.step(step)

            async def stepped(step: int = step) -> bool:
                return abs(await offset() - base - step) < 0.5

            await poll(stepped, timeout=10, what=f"the child's clock {step:+d} s off")
    finally:
        child.kill()
        await child.wait()


@pytest.mark.parametrize("scenario", _params())
async def test_the_ledger_survives(
    scenario: Scenario,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    chaos_outcomes: list[Outcome],
) -> None:
    outcomes: list[Outcome] = []
    known: set[tuple[str, str]] = set()
    cps = (tuple(f"CP-{i:05d}" for i in range(1, scenario.follow + 1)) if scenario.fleet
           else OCPP_CPS if scenario.ocpp else LIMITED_CPS if scenario.site_limit
           else FAILOVER_CPS if scenario.centrals else CPS)
    async with (
        rig_for(scenario, request, tmp_path, cps) as rig,
        chaos_system(rig.bootstrap, tmp_path, cps) as run,
    ):
        if rig.db_dir is not None:
            run.system.db_path = rig.db_dir / "central.db"
        run.engine_envs.update(rig.engine_envs)
        await run.start({**scenario.central_env, **rig.central_env}, fleet=scenario.fleet,
                        fleet_env=scenario.fleet_env, ocpp=scenario.ocpp,
                        centrals=scenario.centrals, db_url=rig.db_url)
        if scenario.site_limit:
            await run.join_site(SITE)
        for index, phase in enumerate(scenario.phases):
            outcome = Outcome(scenario.label(phase, index))
            outcomes.append(outcome)
            chaos_outcomes.append(outcome)
            try:
                await one_round(run, scenario, phase, rig.inject, outcome, known)
            except BaseException as exc:
                outcome.problems.append(f"aborted: {exc!r}"[:400])
                raise
        assert all(o.ok for o in outcomes), "\n".join(format_table(outcomes))
