"""The clients of Central's API given a list of Centrals whose first is down (SPEC §9).

A real Central (its own ``run``, on the real broker, topics with a unique prefix) behind a
list that starts with a dead port: the CP Monitor registers and reports its CP, the
fleet's (and the gateway's) client registers CPs, and ``ctl`` pings Central's TCP plane,
each by moving on to the address that answers.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from evcharging.apps.ev_central import ctl
from evcharging.apps.ev_central import main as central_main
from evcharging.apps.ev_cp_m.monitor import Monitor
from evcharging.apps.ev_fleet.central import CentralClient, Outcome
from evcharging.common.config import CentralSettings, CPMonitorSettings
from evcharging.common.messages import CPRegistration
from evcharging.devtools.process import free_port
from tests.polling import poll

pytestmark = pytest.mark.integration


@dataclass
class RunningCentral:
    http: httpx.AsyncClient
    http_port: int
    listen_port: int
    dead_port: int
    """A port nothing listens on, first in every list."""

    async def cp(self, cp_id: str) -> dict[str, object] | None:
        response = await self.http.get(f"/cp/{cp_id}")
        return response.json() if response.status_code == 200 else None


@pytest.fixture
async def central(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RunningCentral]:
    monkeypatch.chdir(tmp_path)  # no .env: no token, loopback clients may change things
    prefix = f"centrals-{uuid.uuid4().hex[:8]}."
    http_port, listen_port = free_port(), free_port()
    stop = asyncio.Event()
    settings = CentralSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, http_port=http_port,
        listen_port=listen_port, db_path=tmp_path / "central.db",
        group_id=f"central-{prefix}", start_timeout=20.0,
    )
    task = asyncio.create_task(central_main.run(settings, stop))
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=5.0)

    async def up() -> bool:
        return (await http.get("/health")).status_code == 200

    try:
        await poll(up, timeout=30, what="Central's /health 200", retry_on=(httpx.HTTPError,))
        yield RunningCentral(http, http_port, listen_port, free_port())
    finally:
        stop.set()
        code = await asyncio.wait_for(task, 30)
        await http.aclose()
        assert code == 0


async def test_the_monitor_reaches_central_past_a_dead_first_address(
    central: RunningCentral,
) -> None:
    settings = CPMonitorSettings(
        cp_id="CP-L1", central_host=f"127.0.0.1:{central.dead_port},127.0.0.1",
        central_port=central.http_port, cp_e_port=free_port(), health_interval=0.2,
        health_timeout=0.2, failure_threshold=2,
    )
    async with Monitor(settings, retry_initial=0.05, retry_max=0.2) as monitor:
        # registered at the second address; its engine is absent, so the CP's fault
        # report follows it there
        cp = await poll(lambda: central.cp("CP-L1"), timeout=15, what="CP-L1 at Central")
        await poll(lambda: monitor.registered, timeout=15, what="the monitor registered")
        assert monitor.central_url == f"http://127.0.0.1:{central.http_port}"
        assert monitor.centrals.switches == 1
        faulty = await poll(
            lambda: _faulty(central, "CP-L1"), timeout=15, what="CP-L1 faulty at Central"
        )
        assert faulty and cp is not None


async def _faulty(central: RunningCentral, cp_id: str) -> bool:
    cp = await central.cp(cp_id)
    return cp is not None and cp.get("is_faulty") is True


async def test_the_fleets_client_registers_past_a_dead_first_address(
    central: RunningCentral,
) -> None:
    client = CentralClient(
        f"http://127.0.0.1:{central.dead_port},http://127.0.0.1:{central.http_port}"
    )
    try:
        outcome, new = await client.register(
            [CPRegistration(cp_id=f"CP-F{i}") for i in range(3)]
        )
        assert (outcome, new) == (Outcome.OK, 3)
        assert client.base_url == f"http://127.0.0.1:{central.http_port}"
        for i in range(3):
            assert await central.cp(f"CP-F{i}") is not None
        faulty = await client.faulty({"CP-F0", "CP-F1"})  # read from the one in use
        assert faulty == {"CP-F0": False, "CP-F1": False}
        assert client.centrals.switches == 1
    finally:
        await client.aclose()


async def test_ctl_pings_the_second_central_when_the_first_cannot_be_reached(
    central: RunningCentral,
) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = await ctl.amain(
        ["--host", f"127.0.0.1:{central.dead_port},127.0.0.1:{central.listen_port}",
         "--timeout", "5", "ping"],
        stdout=out, stderr=err,
    )
    assert code == ctl.EXIT_OK, err.getvalue()
    assert out.getvalue().startswith(f"pong from Central at 127.0.0.1:{central.listen_port}")
