"""Central on PostgreSQL (SPEC §9): its own ``run`` with ``CENTRAL_DB_URL=postgresql://…``
on the real server the ``postgres_server`` fixture starts, a CP engine and a driver probe
on the real broker. A session goes ACCEPTED → COMPLETED with the CP's own totals in
PostgreSQL, ``/health`` names the database without its password, and what Central
recorded is there for the next one (the CP registry, the ledger, the outbox's flush).
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from evcharging.apps.ev_central.pg_repository import PostgresRepository
from evcharging.common.config import CentralSettings, CPEngineSettings
from evcharging.common.kafka import Routes
from evcharging.common.messages import DriverRequest, DriverStatus, DriverUpdate, new_id
from evcharging.devtools.process import free_port
from tests.integration.services import services
from tests.polling import poll

pytestmark = pytest.mark.integration

SESSION_SECONDS = 3.0
KW = 22.0
CP = "CP-PG1"


async def test_central_on_postgresql_records_the_ledger_there(
    kafka_bootstrap: str, database_url: str
) -> None:
    prefix = f"central-pg-{uuid.uuid4().hex[:8]}."
    http_port = free_port()
    settings = CentralSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, http_port=http_port,
        listen_port=free_port(), db_url=database_url, group_id=f"central-{prefix}",
        start_timeout=20.0,
    )
    engine = CPEngineSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, cp_id=CP,
        health_port=free_port(), session_seconds=SESSION_SECONDS, telemetry_interval=0.5,
        status_interval=1.0,
    )
    updates: dict[str, list[DriverUpdate]] = {}

    async def collect(update: DriverUpdate) -> None:
        updates.setdefault(update.request_id, []).append(update)

    def final(request_id: str) -> DriverUpdate | None:
        return next((u for u in updates.get(request_id, []) if u.status.is_final), None)

    async with services(settings, [engine], Routes().add(DriverUpdate, collect)) as running:
        http = running.http

        async def activated() -> bool:
            cp = await http.get(f"/cp/{CP}")
            return cp.status_code == 200 and cp.json()["state"] == "ACTIVATED"

        await poll(activated, timeout=30, what=f"{CP} ACTIVATED at Central",
                   retry_on=(httpx.HTTPError,))
        health = (await http.get("/health")).json()
        assert health["database"]["ok"] is True
        assert health["database"]["path"].startswith("postgresql://")
        assert ":***@" in health["database"]["path"]

        request_id = new_id()
        await running.bus.publish(DriverRequest(request_id=request_id, driver_id="probe",
                                                cp_id=CP))
        done: DriverUpdate = await poll(lambda: final(request_id), timeout=30,
                                        what=f"{request_id} final")
        assert updates[request_id][0].status is DriverStatus.ACCEPTED
        assert done.status is DriverStatus.COMPLETED
        assert done.kwh == pytest.approx(KW * SESSION_SECONDS / 3600)

    async with PostgresRepository(database_url) as repo:
        (session,) = await repo.list_sessions(driver_id="probe")
        assert (session.status, session.kwh, session.euros, session.meter_final) == (
            "COMPLETED", done.kwh, done.euros, True)
        assert [cp.cp_id for cp in await repo.load_cps()] == [CP]
        assert await repo.active_sessions() == []
        # It stopped cleanly: everything it decided is in Kafka, so it left no flush to
        # send again and claims no partition (SPEC §9).
        assert await repo.load_flushes() == {}
        (central,) = await repo.load_centrals()
        assert central.partitions == frozenset() and central.partition_count >= 1
