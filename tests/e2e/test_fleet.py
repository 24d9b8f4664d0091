"""A CP Fleet of 1,000 CPs as a real process, with a real Central, on the real broker.

Central cannot tell the fleet's CPs from CP Engine processes: they all become ACTIVATED,
registered with their sites, watched by the fleet's monitoring; drivers charge at them
(commands reach each CP through the fleet's one keyed consumer); a fault raised on the
fleet's HTTP port reaches Central as the CP's FAULT state and as the monitoring's fault
report, and so does its recovery; SIGINT disconnects them all and the fleet exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import httpx
import pytest

from evcharging.common.messages import DriverStatus
from tests.e2e.conftest import DriverProbe, System, eventually

pytestmark = pytest.mark.e2e

CPS = 1000
SESSION_SECONDS = 3.0  # FAST_ENGINE's
KW = 22.0
FLEET_ENV = {
    # A heartbeat every 2 s: 500 statuses/s from the fleet, on the CI's 2 cores.
    "CP_ENGINE_STATUS_INTERVAL": "2",
    "FLEET_SITES": "4",
}


async def test_a_fleet_of_1000_cps_charges_faults_recovers_and_disconnects(
    system: System,
    driver_probe: DriverProbe,
    record_property: pytest.RecordProperty,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await system.start_central()
    started = time.monotonic()
    fleet = await system.start_fleet(CPS, env=FLEET_ENV)

    async def all_activated() -> bool:
        return await system.count_cps(state="ACTIVATED") == CPS

    await eventually(all_activated, 60, f"{CPS} CPs ACTIVATED at Central")
    to_activated = time.monotonic() - started
    record_property("fleet_time_to_all_activated_s", round(to_activated, 2))
    with capsys.disabled():
        sys.stdout.write(f"\n{CPS} fleet CPs ACTIVATED at Central {to_activated:.1f} s after "
                         "the fleet process started\n")

    # Registered before connecting: every CP has its site, location and health URL.
    assert await system.count_cps(site="site-04") == CPS // 4
    cp = await system.cp("CP-00751")
    assert cp is not None
    assert cp["site"] == "site-04" and cp["location"].endswith(", bay 1")
    assert cp["health_url"] == system.fleet_url("/cp/CP-00751/health")
    await system.wait_cp("CP-01000", lambda cp: cp["monitored"], "monitored by the fleet", 20)
    async with httpx.AsyncClient(timeout=5) as client:
        health = (await client.get(system.fleet_url("/health"))).json()
        assert health["states"]["ACTIVATED"] == CPS
        assert health["monitoring"]["views"]["HEALTHY"] == CPS

        # Sessions at CPs on every partition of central.commands.
        cps = ["CP-00001", "CP-00333", "CP-00500", "CP-00999"]
        requests = [await driver_probe.request(cp_id) for cp_id in cps]
        finals = await asyncio.gather(*(driver_probe.final(r, timeout=40) for r in requests))
        for final in finals:
            assert final.status is DriverStatus.COMPLETED, driver_probe.updates
            assert final.kwh == pytest.approx(KW * SESSION_SECONDS / 3600, rel=1e-6)

        # A fault raised on the fleet's port: the CP's FAULT state reaches Central over
        # Kafka, and the fleet's monitoring reports the fault over HTTP.
        faulted = await client.post(system.fleet_url("/cp/CP-00042/fault"),
                                    json={"reason": "e2e coolant leak"})
        assert faulted.status_code == 200, faulted.text
        assert (await client.get(system.fleet_url("/cp/CP-00042/health"))).status_code == 503
        cp = await system.wait_cp(
            "CP-00042", lambda cp: cp["state"] == "FAULT" and cp["is_faulty"],
            "FAULT and reported faulty", 20,
        )
        assert cp["fault_reason"] == "CP reports FAULT: e2e coolant leak"
        denied = await driver_probe.final(await driver_probe.request("CP-00042"), timeout=20)
        assert denied.status is DriverStatus.DENIED

        recovered = await client.post(system.fleet_url("/cp/CP-00042/recover"))
        assert recovered.status_code == 200, recovered.text
        await system.wait_cp(
            "CP-00042", lambda cp: cp["state"] == "ACTIVATED" and not cp["is_faulty"],
            "recovered", 20,
        )
        assert await system.count_cps(state="ACTIVATED") == CPS

    fleet.signal(signal.SIGINT)
    assert await fleet.wait_exit(60) == 0
    assert "1,000 CPs stopped" in fleet.log()

    async def all_disconnected() -> bool:
        return await system.count_cps(state="DISCONNECTED") == CPS

    await eventually(all_disconnected, 30, f"{CPS} CPs DISCONNECTED at Central")
