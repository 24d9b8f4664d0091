"""Smart charging on the real broker (SPEC §10): Central's own ``run`` and four CP engines
of one limited site, in this process on topics with a unique prefix.

The test reads the engines' telemetry from the bus. Within two telemetry intervals of
every change (a session starts or ends, the limit changes or is removed) the ``kw`` the
site's CPs report adds up to no more than its limit: from each CP's second report after a
change until the next change, the sum of each CP's highest reported ``kw`` is checked.
Removing the limit gives every CP its full rate back; ``least_laxity`` serves the sessions
that leave first.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import httpx
import pytest

from evcharging.common.config import CentralSettings, CPEngineSettings
from evcharging.common.kafka import KafkaBus, Routes
from evcharging.common.messages import (
    CPTelemetry,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    new_id,
    utcnow,
)
from evcharging.devtools.process import free_port
from tests.integration.services import services
from tests.polling import poll

pytestmark = pytest.mark.integration

KW = 22.0
SITE = "site-L"
TELEMETRY = 0.5
CPS = [f"CP-L{i}" for i in range(1, 5)]
EPS = 0.01


@dataclass
class Network:
    http: httpx.AsyncClient
    bus: KafkaBus
    updates: dict[str, list[DriverUpdate]] = field(default_factory=dict)
    readings: dict[str, list[float]] = field(default_factory=dict)
    """The kW of every telemetry message of a session, by CP, in order."""

    async def start(self, cp_id: str, *, departure: datetime | None = None) -> None:
        """A driver asks to charge 100 kWh (hours at 22 kW: it runs until the end)."""
        request_id = new_id()
        await self.bus.publish(DriverRequest(request_id=request_id, driver_id=f"d-{cp_id}",
                                             cp_id=cp_id, kwh_wanted=100.0,
                                             departure=departure))
        await poll(lambda: any(u.status is DriverStatus.IN_PROGRESS
                               for u in self.updates.get(request_id, [])),
                   timeout=30, what=f"the session on {cp_id} in progress")

    def mark(self) -> dict[str, int]:
        return {cp: len(self.readings.get(cp, [])) for cp in CPS}

    async def reported(self, cps: list[str], since: dict[str, int], count: int) -> None:
        """Wait until each of `cps` sent `count` telemetry messages after `since`."""
        await poll(lambda: all(len(self.readings.get(cp, [])) >= since[cp] + count
                               for cp in cps),
                   timeout=20, what=f"{count} telemetry messages of {cps} since {since}")

    def settled(self, cps: list[str], since: dict[str, int]) -> dict[str, float]:
        """Each CP's highest kW from its second report after `since` on."""
        return {cp: max(self.readings[cp][since[cp] + 1:]) for cp in cps}

    async def phase(self, cps: list[str], since: dict[str, int], limit: float,
                    share: float) -> None:
        """After a change made at `since`: three more reports each, and from the second
        on, the CPs' highest kW add up to at most `limit` and each is `share`."""
        await self.reported(cps, since, 3)
        highest = self.settled(cps, since)
        assert sum(highest.values()) <= limit + EPS, (limit, highest)
        latest = {cp: self.readings[cp][-1] for cp in cps}
        assert latest == pytest.approx(dict.fromkeys(cps, share), abs=EPS), latest


@asynccontextmanager
async def network(kafka_bootstrap: str, tmp_path: Path, *,
                  allocation: Literal["equal", "least_laxity"],
                  limit: float) -> AsyncIterator[Network]:
    """Central with ``CENTRAL_SITE_LIMITS`` ``site-L=<limit>`` and four engines of site-L."""
    prefix = f"smart-{uuid.uuid4().hex[:8]}."
    http_port = free_port()
    settings = CentralSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, http_port=http_port,
        listen_port=free_port(), db_path=tmp_path / "central.db", group_id=f"central-{prefix}",
        start_timeout=20.0, site_limits=f"{SITE}={limit:g}", allocation=allocation,
        allocation_interval=1.0,
    )
    engines = [CPEngineSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, cp_id=cp_id,
        health_port=free_port(), kw_rate=KW, telemetry_interval=TELEMETRY, status_interval=1.0,
    ) for cp_id in CPS]
    updates: dict[str, list[DriverUpdate]] = {}
    readings: dict[str, list[float]] = {}

    async def on_update(update: DriverUpdate) -> None:
        updates.setdefault(update.request_id, []).append(update)

    async def on_telemetry(telemetry: CPTelemetry) -> None:
        if telemetry.session_id is not None:
            readings.setdefault(telemetry.cp_id, []).append(telemetry.kw)

    routes = Routes().add(DriverUpdate, on_update).add(CPTelemetry, on_telemetry)
    async with services(settings, engines, routes) as running:
        probe = Network(running.http, running.bus, updates, readings)

        async def ready() -> bool:
            for cp_id in CPS:
                answer = await probe.http.post("/cp/register", json={
                    "cp_id": cp_id, "site": SITE, "kw_rate": KW})
                assert answer.status_code == 200, answer.text
            listed = (await probe.http.get("/cp", params={"site": SITE})).json()
            return len(listed) == len(CPS) and all(cp["state"] == "ACTIVATED"
                                                   for cp in listed)

        await poll(ready, timeout=30, what="the four CPs of site-L ACTIVATED at Central",
                   retry_on=(httpx.HTTPError,))
        yield probe


async def test_four_engines_stay_under_the_limit_through_every_change(
    kafka_bootstrap: str, tmp_path: Path,
) -> None:
    async with network(kafka_bootstrap, tmp_path, allocation="equal", limit=40.0) as net:
        site = (await net.http.get("/sites")).json()
        assert site == [{"site": SITE, "limit_kw": 40.0, "allocated_kw": 0.0,
                         "measured_kw": 0.0, "cps": 4, "supplying": 0}]
        # Sessions start one by one: each gets its share and the others give way.
        for count, share in ((1, KW), (2, 20.0), (3, 40.0 / 3), (4, 10.0)):
            since = net.mark()
            await net.start(CPS[count - 1])
            await net.phase(CPS[:count], since, 40.0, share)
        # The limit changes.
        since = net.mark()
        answer = await net.http.put(f"/sites/{SITE}/limit", json={"kw": 30})
        assert answer.status_code == 200, answer.text
        await net.phase(CPS, since, 30.0, 7.5)

        async def measured() -> dict[str, object] | None:
            [row] = (await net.http.get("/sites")).json()
            return row if row["supplying"] == 4 and row["measured_kw"] <= 30.0 + EPS else None

        row = await poll(measured, timeout=10, what="GET /sites with the site's power")
        assert (row["limit_kw"], row["allocated_kw"]) == (30.0, 30.0)
        # A session ends (the operator stops its CP): the other three share its power.
        since = net.mark()
        answer = await net.http.post(f"/cp/{CPS[3]}/stop")
        assert answer.status_code == 200, answer.text
        await net.phase(CPS[:3], since, 30.0, 10.0)
        # Removed: every CP is back at its full rate within two telemetry intervals.
        since = net.mark()
        answer = await net.http.delete(f"/sites/{SITE}/limit")
        assert answer.status_code == 200, answer.text
        await net.reported(CPS[:3], since, 2)
        assert {cp: net.readings[cp][since[cp] + 1] for cp in CPS[:3]} == dict.fromkeys(
            CPS[:3], KW)


async def test_least_laxity_serves_the_earlier_departures_first(
    kafka_bootstrap: str, tmp_path: Path,
) -> None:
    async with network(kafka_bootstrap, tmp_path, allocation="least_laxity",
                       limit=70.0) as net:
        now = utcnow()
        # 100 kWh wanted by each (4.5 h at 22 kW): the slack is the departure less 4.5 h.
        departures = [now + timedelta(hours=h) for h in (10, 5, 9, 6)]
        since = net.mark()
        for cp_id, departure in zip(CPS, departures, strict=True):
            await net.start(cp_id, departure=departure)
        await net.reported(CPS, since, 3)
        fresh = net.mark()
        await net.reported(CPS, fresh, 2)
        latest = {cp: net.readings[cp][-1] for cp in CPS}
        assert sum(net.settled(CPS, fresh).values()) <= 70.0 + EPS
        # The three that leave first get all they can take, the last one what is left.
        assert latest == pytest.approx({"CP-L1": 4.0, "CP-L2": KW, "CP-L3": KW,
                                        "CP-L4": KW}, abs=EPS), latest
