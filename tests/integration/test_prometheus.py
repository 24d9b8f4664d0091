"""A real Prometheus scraping every kind of service while sessions run on the real broker.

In this process (each service's own ``run``, topics with a unique prefix): Central, a CP
Fleet of four CPs, one CP Engine with its CP Monitor (metrics port on) and the driver load
generator (``--metrics-port``). Prometheus is Debian's binary, started the way ``make run
ARGS=--prometheus`` starts it (``python -m evcharging.devtools.prometheus``, which execs
it), scraping every second. The test asks Prometheus's HTTP API what an operator would:
sessions completed, the ACCEPTED histogram, CPs by state, every target up; and it checks
that every metric the Grafana dashboard names is served by the running services.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from evcharging.apps.ev_central import main as central_main
from evcharging.apps.ev_cp_e import main as engine_main
from evcharging.apps.ev_cp_m import main as monitor_main
from evcharging.apps.ev_fleet import main as fleet_main
from evcharging.apps.ev_load import main as load_main
from evcharging.common.config import (
    CentralSettings,
    CPEngineSettings,
    CPMonitorSettings,
    FleetSettings,
    LoadSettings,
)
from evcharging.common.metrics import FAMILIES
from evcharging.devtools.process import free_port
from tests.polling import poll

pytestmark = [
    pytest.mark.integration,
    # Five services share this process and the load run is stopped mid-run: aiokafka
    # sometimes leaves one connection of that to the garbage collector (seen in about half
    # the runs, not in the services' own tests). It is collected here, at teardown, so the
    # warning neither fails this test nor surfaces in a later one.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "evcharging.json"
RULES = ROOT / "docker" / "prometheus" / "rules.yml"
FLEET_CPS = 4
ENGINE_CP = "CP-P1"
JOBS = {"central", "cp-fleet", "cp-engine", "cp-monitor", "load"}


@dataclass
class Network:
    """The running services: each job's ``host:port`` of ``/metrics``."""

    targets: dict[str, str]
    central: str


@pytest.fixture
async def network(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[Network]:
    prefix = f"prom-{uuid.uuid4().hex[:8]}."
    central_port, fleet_port, engine_port, monitor_port, load_port = (
        free_port() for _ in range(5))
    stop = asyncio.Event()
    common: dict[str, Any] = {"kafka_bootstrap": kafka_bootstrap, "topic_prefix": prefix,
                              "log_level": "WARNING"}
    central = CentralSettings(
        **common, http_port=central_port, listen_port=free_port(),
        db_path=tmp_path / "central.db", group_id=f"central-{prefix}", api_token=None,
    )
    engine = CPEngineSettings(
        **common, cp_id=ENGINE_CP, health_port=engine_port, session_seconds=1.0,
        telemetry_interval=0.5, status_interval=1.0, api_token=None,
    )
    fleet = fleet_main.FleetConfig(
        FleetSettings(**common, cps=FLEET_CPS, http_port=fleet_port,
                      central_host="127.0.0.1", central_port=central_port),
        engine.model_copy(update={"cp_id": "CP-00001"}),
        CPMonitorSettings(cp_id="CP-00001", health_interval=1.0, api_token=None),
    )
    monitor = CPMonitorSettings(
        cp_id=ENGINE_CP, cp_e_host="127.0.0.1", cp_e_port=engine_port,
        central_host="127.0.0.1", central_port=central_port, health_interval=1.0,
        metrics_port=monitor_port, api_token=None, log_level="WARNING",
    )
    tasks = [asyncio.create_task(central_main.run(central, stop), name="central"),
             asyncio.create_task(engine_main.run(engine, stop), name="engine"),
             asyncio.create_task(fleet_main.run(fleet, stop), name="fleet")]
    base = f"http://127.0.0.1:{central_port}"

    async def all_activated() -> bool:
        async with httpx.AsyncClient(base_url=base) as http:
            answer = await http.get("/cp", params={"state": "ACTIVATED"})
            return answer.headers.get("X-Total-Count") == str(FLEET_CPS + 1)

    try:
        await poll(all_activated, timeout=30, what="every CP ACTIVATED at Central",
                   retry_on=(httpx.HTTPError,))
        tasks.append(asyncio.create_task(monitor_main.run(monitor, stop), name="monitor"))
        load = LoadSettings(
            **common, central_url=base, rate=8.0, duration=120.0, seed=7,
            request_timeout=10.0, refresh_interval=1.0, progress_interval=60.0,
            allow_busy=True, connect_timeout=20.0, metrics_port=load_port,
        )
        tasks.append(asyncio.create_task(load_main.run(load, stop, lambda _: None),
                                         name="load"))
        yield Network(
            targets={"central": f"127.0.0.1:{central_port}",
                     "cp-fleet": f"127.0.0.1:{fleet_port}",
                     "cp-engine": f"127.0.0.1:{engine_port}",
                     "cp-monitor": f"127.0.0.1:{monitor_port}",
                     "load": f"127.0.0.1:{load_port}"},
            central=base,
        )
    finally:
        stop.set()
        codes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 40)
        names = [task.get_name() for task in tasks]
        # The load run is stopped before its duration: 130, as after Ctrl-C.
        expected = [130 if name == "load" else 0 for name in names]
        gc.collect()
        assert codes == expected, dict(zip(names, codes, strict=True))


@dataclass
class Prometheus:
    url: str
    http: httpx.AsyncClient

    async def query(self, promql: str) -> list[dict[str, Any]]:
        answer = await self.http.get(f"{self.url}/api/v1/query", params={"query": promql})
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "success", (promql, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, promql: str) -> float:
        """The single value of a scalar-like query (0 while it has no result)."""
        result = await self.query(promql)
        assert len(result) <= 1, (promql, result)
        return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture
async def prometheus(network: Network, tmp_path: Path) -> AsyncIterator[Prometheus]:
    port = free_port()
    argv = [sys.executable, "-m", "evcharging.devtools.prometheus", "--port", str(port),
            "--interval", "1", "--dir", str(tmp_path / "prometheus"), "--log-level", "warn"]
    for job, address in network.targets.items():
        argv += ["--target", f"{job}={address}"]
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            async def ready() -> bool:
                assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
                return (await http.get(f"{url}/-/ready")).status_code == 200

            await poll(ready, timeout=30, what="Prometheus ready", retry_on=(httpx.HTTPError,))
            yield Prometheus(url, http)
    finally:
        process.send_signal(signal.SIGTERM)  # the wrapper exec'd: this is Prometheus itself
        try:
            code = process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise
        finally:
            log.close()
        assert code == 0, (tmp_path / "prometheus.log").read_text()


async def test_prometheus_answers_an_operators_questions(prometheus: Prometheus) -> None:
    async def every_target_up() -> dict[str, float]:
        result = await prometheus.query("up")
        up = {r["metric"]["job"]: float(r["value"][1]) for r in result}
        return up if set(up) == JOBS and all(v == 1 for v in up.values()) else {}

    await poll(every_target_up, timeout=30, what="every target scraped and up",
               interval=0.5)

    async def completed() -> float:
        return await prometheus.value('sum(evcharging_sessions_total{result="COMPLETED"})')

    await poll(completed, timeout=40, what="sessions COMPLETED in Prometheus", interval=0.5)
    accepted = await prometheus.value("sum(evcharging_accept_latency_seconds_count)")
    assert accepted >= 1
    p99 = await prometheus.value(
        "histogram_quantile(0.99, sum by (le) (evcharging_accept_latency_seconds_bucket))")
    assert 0 < p99 <= 30
    assert await prometheus.value("sum(evcharging_load_accept_latency_seconds_count)") >= 1

    by_state = {r["metric"]["state"]: float(r["value"][1])
                for r in await prometheus.query('sum by (state) (evcharging_cps{job="central"})')}
    assert set(by_state) == {"DISCONNECTED", "ACTIVATED", "SUPPLYING", "STOPPED", "FAULT"}
    assert sum(by_state.values()) == FLEET_CPS + 1
    fleet = await prometheus.value('sum(evcharging_fleet_cps{job="cp-fleet"})')
    assert fleet == FLEET_CPS
    assert await prometheus.value('sum(evcharging_cp_state{job="cp-engine"})') == 1
    assert await prometheus.value('sum(evcharging_monitor_checks_total{job="cp-monitor"})') > 0
    assert await prometheus.value('sum(evcharging_monitor_checks_total{job="cp-fleet"})') > 0
    handled = await prometheus.query(
        'sum by (topic) (evcharging_handler_duration_seconds_count{job="central"})')
    assert {r["metric"]["topic"] for r in handled} >= {"driver.requests", "cp.status"}

    # Every query of the dashboard and every alert rule is valid PromQL on this data.
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            await prometheus.query(target["expr"])
    rules = (await prometheus.http.get(f"{prometheus.url}/api/v1/rules")).json()
    loaded = [rule for group in rules["data"]["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in loaded} >= {"CentralLagging", "CPFaultBurst",
                                                  "MonitorLost", "DatabaseErrors"}
    assert all(rule["health"] == "ok" for rule in loaded), loaded


async def test_every_metric_the_dashboard_names_is_served(network: Network) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    named = {
        name for panel in dashboard["panels"] for target in panel["targets"]
        for name in re.findall(r"\bevcharging_[a-z0-9_]+", target["expr"])
    }
    served: set[str] = set()
    async with httpx.AsyncClient(timeout=5.0) as http:
        for job, address in network.targets.items():
            answer = await http.get(f"http://{address}/metrics")
            assert answer.status_code == 200, job
            for family in text_string_to_metric_families(answer.text):
                catalogued = FAMILIES.get(family.name) or FAMILIES.get(family.name + "_total")
                if family.name.startswith("evcharging_"):
                    assert catalogued is not None, f"{job} serves {family.name}, not catalogued"
                    served |= catalogued.series
    assert named, "the dashboard names no metric"
    assert named <= served, f"named by the dashboard, served by nobody: {named - served}"
