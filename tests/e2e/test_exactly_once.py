"""Exactly once end to end (SPEC §4): Central SIGKILLed under load repeats and loses nothing.

A real Central process and a CP Fleet on the real broker; every CP keeps being asked
for sessions by a test-side driver (``read_committed``, as every driver). Central is
killed with SIGKILL at several moments of the load and restarted at once each time. Once
the load stops and everything settles, every request has exactly one final update, and
no update the driver got is a repeat of another.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import pytest

from evcharging.common.messages import DriverUpdate
from tests.e2e.conftest import DriverProbe, System
from tests.polling import poll

pytestmark = pytest.mark.e2e

CPS = 40
KILLS_AFTER = (1.0, 2.5, 0.2, 0.6, 1.7, 0.05)
"""Seconds of load after each (re)start of Central before it is killed: the kills fall
at different points of its batches, flushes and transactions."""
CORRECTED = "corrected:"


def finals(updates: list[DriverUpdate]) -> list[DriverUpdate]:
    return [u for u in updates
            if u.status.is_final and not (u.reason or "").startswith(CORRECTED)]


async def test_central_killed_under_load_neither_repeats_nor_loses_an_update(
    system: System, driver_probe: DriverProbe
) -> None:
    central = await system.start_central()
    await system.start_fleet(CPS, env={"CP_ENGINE_STATUS_INTERVAL": "1"})
    cp_ids = [f"CP-{n:05d}" for n in range(1, CPS + 1)]

    async def activated() -> bool:
        return await system.count_cps(state="ACTIVATED") == CPS

    await poll(activated, timeout=60, what=f"{CPS} CPs ACTIVATED", interval=0.2)
    sent: list[str] = []
    loading = True

    async def lane(cp_id: str) -> None:
        while loading:
            request_id = await driver_probe.request(cp_id)
            sent.append(request_id)
            await poll(lambda rid=request_id: finals(driver_probe.updates.get(rid, [])),
                       timeout=90, what=f"{request_id} on {cp_id} final", interval=0.1)

    lanes = [asyncio.create_task(lane(cp_id)) for cp_id in cp_ids]
    try:
        for after in KILLS_AFTER:
            await asyncio.sleep(after)  # how long the load runs before this kill
            central.signal(signal.SIGKILL)
            assert await central.wait_exit() == -signal.SIGKILL
            central = await system.start_central()
        await poll(lambda: len(sent) >= 3 * CPS, timeout=60,
                   what="three requests per CP sent", interval=0.2)
        loading = False
        await asyncio.wait_for(asyncio.gather(*lanes), 120)
    finally:
        loading = False
        for task in lanes:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*lanes, return_exceptions=True)
    # One more request after the others are final: what Central sent before it answers
    # this one has been read (Central's answers to one driver share a partition).
    last = await driver_probe.request(cp_ids[0])
    await poll(lambda: finals(driver_probe.updates.get(last, [])), timeout=60,
               what="the last request final")

    problems: list[str] = []
    for request_id in sent:
        updates = driver_probe.updates.get(request_id, [])
        got = finals(updates)
        if len(got) != 1:
            problems.append(f"{request_id}: {len(got)} final updates "
                            f"{[(u.status.value, u.reason) for u in got]}")
        dumped = [u.model_dump_json() for u in updates]
        if len(set(dumped)) != len(dumped):
            problems.append(f"{request_id}: an update repeated: {dumped}")
    assert not problems, "\n".join(problems)
    assert len(sent) >= 3 * CPS
