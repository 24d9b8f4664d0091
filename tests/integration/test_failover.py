"""Two Centrals on the real broker and PostgreSQL (SPEC §9, issue 16): SIGKILL and rejoin
keep the ledger exact.

Two real Central processes (``central-1``, ``central-2``) share one PostgreSQL database
and one consumer group; a CP Fleet's CPs, with every Central's address, are asked for
sessions all along (the chaos harness's load: one request per CP every 1.5 s). The two
own disjoint sets of partitions that cover 0..11. The instance that owns the first CP is
SIGKILLed while sessions run: the other lists all 12 partitions and has a request on a
CP of the dead one ACCEPTED within 10 s, and every CP takes new sessions. It is started
again with the same id: the partitions are split again, and every CP takes new sessions
from both. After the kill and again after the rejoin, once the load stops and the CPs
are idle, every request has its final status and the ledger in PostgreSQL is exact
(:func:`tests.chaos.ledger.check_ledger`: billed exactly the CPs' meters, no session
ACTIVE, none repeated or started twice), no session is FAILED (the CPs worked all along),
and every CP of the killed instance completed a metered session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import faults
from tests.chaos.centrals import ALL, TAKEOVER_TARGET, describe_layout, owner_of, partition_of
from tests.chaos.harness import FLEET_PACE, ChaosRun, Phase, chaos_system, now
from tests.chaos.ledger import describe

pytestmark = pytest.mark.integration

FLEET = 24
"""CPs of the fleet, all asked for sessions: they fall on most of the 12 partitions."""


def assert_split(layout: dict[str, frozenset[int]], ids: list[str]) -> None:
    owned = [layout.get(i, frozenset()) for i in ids]
    assert all(owned), f"an instance owns nothing: {describe_layout(layout)}"
    assert frozenset().union(*owned) == ALL, f"not every partition owned: {describe_layout(layout)}"
    assert sum(map(len, owned)) == len(ALL), f"a partition owned twice: {describe_layout(layout)}"


async def every_cp_accepts(run: ChaosRun, since: float, what: str) -> None:
    took = await run.recover(since)
    late = [cp for cp, at in took.items() if at is None]
    assert not late, f"{what}: {', '.join(late)} took no new request; " + "; ".join(
        run.answers(cp) for cp in late)


async def exact(run: ChaosRun, orphans: list[str], what: str) -> None:
    """Stop the load; once every request has its final status and the CPs are idle, the
    ledger in PostgreSQL is exact, no session FAILED, and each of `orphans` (the killed
    instance's CPs) completed a metered session."""
    await run.stop_load()
    unanswered = await run.drain(timeout=60)
    assert not unanswered, f"{what}: {len(unanswered)} request(s) without a final status: " + (
        "; ".join(run.observer.whereabouts(r, 0.0) for r in unanswered[:5]))
    await run.settle()
    rows, breaches = await run.check(exactly_once=True)
    assert not breaches, f"{what}:\n" + "\n".join(map(str, breaches))
    failed = [f"{r.session_id} on {r.cp_id}: {r.reason!r}, its driver saw "
              f"{describe(run.observer.updates.get(r.request_id, ()))}"
              for r in rows if r.status == "FAILED"]
    assert not failed, f"{what}: {failed}"
    completed = [r for r in rows if r.status == "COMPLETED" and r.kwh > 0
                 and run.observer.meter.last(r.session_id) is not None]
    assert {r.cp_id for r in completed} >= set(orphans), (
        f"{what}: the killed instance's CPs {orphans} did not all complete a metered session")


async def test_sigkill_and_rejoin_keep_the_ledger_exact(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    cps = tuple(f"CP-{i:05d}" for i in range(1, FLEET + 1))
    async with chaos_system(kafka_bootstrap, tmp_path, cps) as run:
        await run.start(centrals=2, db_url=database_url, fleet=FLEET, fleet_env=FLEET_PACE)
        centrals = run.centrals
        assert centrals is not None
        before = await centrals.layout()
        assert_split(before, centrals.ids)
        victim = owner_of(before, cps[0])
        assert victim is not None
        survivor = centrals.other(victim)
        orphans = [cp for cp in cps if partition_of(cp) in before[victim]]

        run.start_load()
        await run.wait_phase(Phase.MID, cps[0])
        window = await faults.central_kill_one(run, 0)
        assert not window.problems, window.problems
        assert window.takeover is not None and window.takeover <= TAKEOVER_TARGET, window.notes
        assert (await centrals.layout()) == {survivor: ALL}
        await every_cp_accepts(run, window.start, f"after {victim} was killed")
        await exact(run, orphans, f"after {victim} was killed")

        await faults.rejoin(run, victim, window)
        assert not window.problems, window.problems
        assert_split(await centrals.layout(), centrals.ids)
        rejoined = now()
        run.start_load()
        await every_cp_accepts(run, rejoined, f"after {victim} rejoined")
        await exact(run, orphans, f"after {victim} rejoined")
