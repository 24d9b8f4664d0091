"""The driver load generator against a real Central and real CP engines on a real broker.

Three CPs and 1 s sessions serve about 3 requests a second; drivers arrive at 5 a second
with --allow-busy, so the run sees sessions completed and requests DENIED "CP busy".
Everything runs in this process (Central's and the engines' own ``run``), on topics with a
unique prefix; only the broker is shared.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from evcharging.apps.ev_central import main as central_main
from evcharging.apps.ev_cp_e import main as engine_main
from evcharging.apps.ev_load import main as load_main
from evcharging.common.config import CentralSettings, CPEngineSettings, LoadSettings
from evcharging.devtools.process import free_port
from tests.polling import poll

pytestmark = pytest.mark.integration

CP_IDS = ("CP-L1", "CP-L2", "CP-L3", "CP-L4")
LOADED = CP_IDS[:3]
"""The CPs the load is restricted to (--cps); CP-L4 must see no request."""


@dataclass
class System:
    prefix: str
    http_port: int
    tasks: list[asyncio.Task[int]]


@pytest.fixture
async def system(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[System]:
    """Central and four CP engines (1 s sessions), all ACTIVATED."""
    prefix = f"load-{uuid.uuid4().hex[:8]}."
    http_port = free_port()
    stop = asyncio.Event()
    central = CentralSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, http_port=http_port,
        listen_port=free_port(), db_path=tmp_path / "central.db",
        group_id=f"central-{prefix}", log_level="WARNING",
    )
    tasks = [asyncio.create_task(central_main.run(central, stop), name="central")]
    for cp_id in CP_IDS:
        engine = CPEngineSettings(
            kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, cp_id=cp_id,
            health_port=free_port(), session_seconds=1.0, telemetry_interval=0.5,
            status_interval=1.0,
        )
        tasks.append(asyncio.create_task(engine_main.run(engine, stop), name=cp_id))

    async def all_activated() -> bool:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
            answer = await http.get("/cp", params={"state": "ACTIVATED"})
            return answer.headers.get("X-Total-Count") == str(len(CP_IDS))

    try:
        await poll(all_activated, timeout=20, what="four ACTIVATED CPs at Central",
                   retry_on=(httpx.HTTPError,))
        yield System(prefix, http_port, tasks)
    finally:
        stop.set()
        codes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        assert codes == [0] * len(tasks), codes


async def test_load_against_a_real_central(kafka_bootstrap: str, system: System) -> None:
    settings = LoadSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=system.prefix,
        central_url=f"http://127.0.0.1:{system.http_port}",
        rate=5.0, duration=5.0, seed=1234, request_timeout=10.0,
        refresh_interval=1.0, progress_interval=1.0, json_summary=True,
        cps=",".join(LOADED), connect_timeout=20.0, allow_busy=True,
    )
    out: list[str] = []
    code = await asyncio.wait_for(load_main.run(settings, asyncio.Event(), out.append), 40)

    assert code == 0
    assert len(out) == 1, "with --json the summary is the only output"
    summary: dict[str, Any] = json.loads(out[0])
    outcomes = summary["outcomes"]
    assert summary["seed"] == 1234 and summary["stopped_early"] is False
    assert summary["arrivals"] > 0
    assert sum(outcomes.values()) == summary["arrivals"], "every arrival has one outcome"
    assert summary["open"] == 0
    assert outcomes["not_sent"] == outcomes["interrupted"] == 0
    sent = summary["sent"]
    # --allow-busy: an arrival that finds no free CP is sent to a busy one, and DENIED.
    assert outcomes["no_free_cp"] == 0 and sent == summary["arrivals"]
    assert summary["sent_to_busy"] > 0 and summary["denied_by_reason"].get("CP busy", 0) > 0
    assert sent == sum(outcomes[k] for k in ("completed", "failed", "denied", "timed_out"))
    assert summary["accepted"] > 0 and outcomes["completed"] > 0
    assert outcomes["timed_out"] == 0
    assert sum(summary["denied_by_reason"].values()) == outcomes["denied"]
    assert sum(summary["failed_by_reason"].values()) == outcomes["failed"]
    latency = summary["latency_ms"]
    assert latency["accepted"]["count"] == summary["accepted"]
    assert latency["final"]["count"] == outcomes["completed"] + outcomes["failed"] + outcomes[
        "denied"]
    accepted = latency["accepted"]
    assert 0 < accepted["p50"] <= accepted["p90"] <= accepted["p99"] <= accepted["max"]
    # A completed session lasts about 1 s (session_seconds), so request → final does too.
    assert latency["final"]["max"] >= 900
    assert summary["publish_errors"] == 0

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{system.http_port}") as http:
        sessions = (await http.get("/sessions", params={"limit": 1000})).json()
    assert len(sessions) == summary["accepted"]
    assert {s["cp_id"] for s in sessions} <= set(LOADED), "--cps restricts the CPs"
    assert all(s["driver_id"].startswith("load-") for s in sessions)
