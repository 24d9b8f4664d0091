"""Central itself on the real broker: its own ``run`` with a CP engine and a driver probe.

Everything runs in this process on topics with a unique prefix (only the broker is
shared): a session goes ACCEPTED → IN_PROGRESS → COMPLETED with the CP's own totals in
the database, and while another process holds the database's write lock the CP's end is
neither lost nor announced early (SPEC §4).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from evcharging.common.config import CentralSettings, CPEngineSettings
from evcharging.common.kafka import KafkaBus, Routes
from evcharging.common.messages import DriverRequest, DriverStatus, DriverUpdate, new_id
from evcharging.devtools.process import free_port
from tests.integration.services import services
from tests.polling import poll

pytestmark = pytest.mark.integration

SESSION_SECONDS = 3.0
KW = 22.0


@dataclass
class Central:
    http: httpx.AsyncClient
    db_path: Path
    bus: KafkaBus
    updates: dict[str, list[DriverUpdate]] = field(default_factory=dict)

    async def request(self, cp_id: str) -> str:
        request_id = new_id()
        await self.bus.publish(DriverRequest(request_id=request_id, driver_id="probe",
                                             cp_id=cp_id))
        return request_id

    async def final(self, request_id: str, timeout: float = 30.0) -> DriverUpdate:
        def final() -> DriverUpdate | None:
            return next((u for u in self.updates.get(request_id, []) if u.status.is_final),
                        None)

        found: DriverUpdate = await poll(final, timeout=timeout, what=f"{request_id} final")
        return found


@pytest.fixture
async def central(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[Central]:
    prefix = f"central-{uuid.uuid4().hex[:8]}."
    http_port = free_port()
    db_path = tmp_path / "central.db"
    settings = CentralSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, http_port=http_port,
        listen_port=free_port(), db_path=db_path, group_id=f"central-{prefix}",
        start_timeout=20.0,
    )
    engine = CPEngineSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, cp_id="CP-I1",
        health_port=free_port(), session_seconds=SESSION_SECONDS, telemetry_interval=0.5,
        status_interval=1.0,
    )
    updates: dict[str, list[DriverUpdate]] = {}

    async def collect(update: DriverUpdate) -> None:
        updates.setdefault(update.request_id, []).append(update)

    async with services(settings, [engine], Routes().add(DriverUpdate, collect)) as running:
        probe = Central(running.http, db_path, running.bus, updates)

        async def activated() -> bool:
            cp = await probe.http.get("/cp/CP-I1")
            return cp.status_code == 200 and cp.json()["state"] == "ACTIVATED"

        await poll(activated, timeout=30, what="CP-I1 ACTIVATED at Central",
                   retry_on=(httpx.HTTPError,))
        yield probe


def session_row(db_path: Path, request_id: str) -> tuple[str, float, float]:
    with sqlite3.connect(db_path) as db:
        row = db.execute("SELECT status, kwh, euros FROM charging_sessions WHERE request_id = ?",
                         (request_id,)).fetchone()
    assert row is not None
    return str(row[0]), float(row[1]), float(row[2])


async def test_a_session_from_request_to_completed_with_the_cps_totals(
    central: Central,
) -> None:
    request_id = await central.request("CP-I1")
    final = await central.final(request_id)
    statuses = [u.status for u in central.updates[request_id]]
    assert statuses[0] is DriverStatus.ACCEPTED and DriverStatus.IN_PROGRESS in statuses
    assert final.status is DriverStatus.COMPLETED
    assert final.kwh == pytest.approx(KW * SESSION_SECONDS / 3600)
    assert session_row(central.db_path, request_id) == ("COMPLETED", final.kwh, final.euros)


async def test_a_locked_database_delays_the_end_and_loses_nothing(central: Central) -> None:
    request_id = await central.request("CP-I1")
    await poll(lambda: any(u.status is DriverStatus.IN_PROGRESS
                           for u in central.updates.get(request_id, [])),
               timeout=20, what="the session runs")
    other = sqlite3.connect(central.db_path, isolation_level=None, timeout=5)
    try:
        other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        # The CP ends the session meanwhile; /health says the database is unusable.

        async def unhealthy() -> dict[str, object] | None:
            answer = await central.http.get("/health")
            body: dict[str, object] = answer.json()
            return body if answer.status_code == 503 else None

        health = await poll(unhealthy, timeout=SESSION_SECONDS + 15,
                            what="/health 503 while the database is locked")
        assert health["status"] != "ok"
        assert not [u for u in central.updates[request_id] if u.status.is_final]
    finally:
        other.execute("ROLLBACK")
        other.close()
    final = await central.final(request_id)
    assert final.status is DriverStatus.COMPLETED
    assert final.kwh == pytest.approx(KW * SESSION_SECONDS / 3600)
    assert session_row(central.db_path, request_id) == ("COMPLETED", final.kwh, final.euros)
    assert [u.status for u in central.updates[request_id]].count(DriverStatus.COMPLETED) == 1
    again = await central.request("CP-I1")  # the CP is free again
    await poll(lambda: any(u.status is DriverStatus.ACCEPTED
                           for u in central.updates.get(again, [])),
               timeout=20, what="a new request is accepted")

