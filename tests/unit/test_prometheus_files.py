"""docker/prometheus and docker/grafana agree with the code and with the compose file.

Read statically (no Docker): the scrape targets are services that serve ``/metrics`` on
that port, the Grafana data source is that Prometheus, and every metric the dashboard and
the alert rules name is one the code defines (:mod:`evcharging.common.metrics`).
``promtool`` (Debian's prometheus package, ``scripts/ensure_prometheus.sh``) checks the
config and the rules and runs the rules' own unit tests.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from evcharging.common.config import (
    CentralSettings,
    CPEngineSettings,
    CPMonitorSettings,
    DriverSettings,
    FleetSettings,
    OcppSettings,
)
from evcharging.common.metrics import series_names
from evcharging.devtools.prometheus import (
    RULES_FILE,
    Target,
    graph_url,
    scrape_config,
    write_config,
)
from tests.unit.test_docker_files import (
    APP_SERVICES,
    DOCKER_DIR,
    container_settings,
    interpolate,
    services,
    settings_class,
    volumes,
)

PROMETHEUS_DIR = DOCKER_DIR / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TESTS = PROMETHEUS_DIR / "rules.test.yml"
GRAFANA_DIR = DOCKER_DIR / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "evcharging.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "evcharging.yml"

PROMETHEUS_SERVICE = "prometheus"
GRAFANA_SERVICE = "grafana"
PROMETHEUS_PORT = 9090
GRAFANA_PORT = 3000
PROMQL_BUILTINS = {"up"}
"""Series Prometheus makes itself."""
WANTED_PANELS = {
    "Network power", "Sessions per second", "Request → ACCEPTED (Central)", "Central lag",
    "Faults and recoveries", "CPs by state", "Unmonitored CPs",
}
WANTED_ALERTS = {"CentralLagging", "CPFaultBurst", "MonitorLost", "DatabaseErrors"}
_METRIC = re.compile(r"\b(evcharging_[a-z0-9_]+|up)\b(?!\s*\()")

# The ports each kind of evcharging service serves /metrics on.
METRICS_PORT_FIELD: dict[type[Any], str] = {
    CentralSettings: "http_port",
    CPEngineSettings: "health_port",
    CPMonitorSettings: "metrics_port",
    FleetSettings: "http_port",
    OcppSettings: "http_port",
}
NO_METRICS = frozenset({DriverSettings})
"""Services with no HTTP port, so no /metrics (one driver process)."""


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def panels() -> list[dict[str, Any]]:
    return list(dashboard()["panels"])


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def metrics_in(expr: str) -> set[str]:
    """The series an expression selects (names, not functions or label values)."""
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    return set(_METRIC.findall(without_labels))


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: run scripts/ensure_prometheus.sh"
    return found


def run_promtool(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60, check=False)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# ----------------------------------------------------------------------------- compose


def test_compose_runs_the_official_images_pinned_to_a_version() -> None:
    for name, repository in ((PROMETHEUS_SERVICE, "prom/prometheus"),
                             (GRAFANA_SERVICE, "grafana/grafana")):
        image = services()[name]["image"]
        assert re.fullmatch(rf"{re.escape(repository)}:v?\d+\.\d+\.\d+", image), image


@pytest.mark.parametrize(("service", "port"), [(PROMETHEUS_SERVICE, PROMETHEUS_PORT),
                                               (GRAFANA_SERVICE, GRAFANA_PORT)])
def test_metrics_services_publish_on_loopback_only_and_check_their_own_port(
    service: str, port: int
) -> None:
    (published,) = services()[service]["ports"]
    host_ip, host_port, container_port = interpolate(published).split(":")
    assert host_ip == "127.0.0.1"
    assert int(container_port) == port and host_port.isdigit()
    test = " ".join(services()[service]["healthcheck"]["test"])
    assert f"localhost:{port}/" in test
    spec = services()[service]
    assert spec.get("restart") == "unless-stopped"
    assert "build" not in spec and "env_file" not in spec  # third-party: no evcharging .env


def _bind_targets(service: str) -> dict[PurePosixPath, Path]:
    return {PurePosixPath(v["target"]): (DOCKER_DIR / v["source"]).resolve()
            for v in volumes(service) if v["type"] == "bind"}


def test_prometheus_mounts_its_config_and_rules_read_only() -> None:
    binds = _bind_targets(PROMETHEUS_SERVICE)
    assert binds[PurePosixPath("/etc/prometheus")] == PROMETHEUS_DIR.resolve()
    assert all(v.get("read_only") for v in volumes(PROMETHEUS_SERVICE) if v["type"] == "bind")
    command = services()[PROMETHEUS_SERVICE]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    assert any(v["type"] == "volume" and v["target"] == "/prometheus"
               for v in volumes(PROMETHEUS_SERVICE))
    assert "--storage.tsdb.path=/prometheus" in command
    assert services()[PROMETHEUS_SERVICE]["depends_on"]["central-1"]["condition"]
    assert services()[PROMETHEUS_SERVICE]["depends_on"]["central-2"]["condition"]


def test_grafana_mounts_its_provisioning_and_dashboards() -> None:
    binds = _bind_targets(GRAFANA_SERVICE)
    assert binds[PurePosixPath("/etc/grafana/provisioning")] == (GRAFANA_DIR / "provisioning"
                                                                 ).resolve()
    folder = load_yaml(DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"]
    assert binds[PurePosixPath(folder)] == DASHBOARD.parent.resolve()
    env = {k: interpolate(str(v)) for k, v in services()[GRAFANA_SERVICE]["environment"].items()}
    home = PurePosixPath(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == PurePosixPath(folder) and (DASHBOARD.parent / home.name).is_file()
    assert services()[GRAFANA_SERVICE]["depends_on"] == {
        PROMETHEUS_SERVICE: {"condition": "service_healthy"}}


# ----------------------------------------------------------------------------- scraping


def _scrape_targets() -> dict[str, list[str]]:
    config = load_yaml(PROMETHEUS_CONFIG)
    return {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
            for job in config["scrape_configs"]}


def test_every_scrape_target_is_a_service_that_serves_metrics_there(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for job, targets in _scrape_targets().items():
        for target in targets:
            host, _, port = target.rpartition(":")
            if host == "localhost":  # Prometheus itself
                assert job == PROMETHEUS_SERVICE and int(port) == PROMETHEUS_PORT
                continue
            assert host in services(), f"{job}: no service {host}"
            settings = container_settings(host, monkeypatch, tmp_path)
            field = METRICS_PORT_FIELD.get(type(settings))
            assert field, f"{job}: {host} ({type(settings).__name__}) serves no /metrics"
            assert getattr(settings, field) == int(port), f"{job}: {host} is not on {port}"
            if isinstance(settings, CPMonitorSettings):
                assert settings.metrics_host == "0.0.0.0", f"{host}: Prometheus cannot reach it"


def test_every_service_with_a_metrics_port_is_scraped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    scraped = {t.rpartition(":")[0] for ts in _scrape_targets().values() for t in ts}
    for service in APP_SERVICES:
        cls = settings_class(service)
        if cls in NO_METRICS:
            continue
        assert cls in METRICS_PORT_FIELD, f"{service}: where does {cls.__name__} serve /metrics?"
        settings = container_settings(service, monkeypatch, tmp_path)
        if getattr(settings, METRICS_PORT_FIELD[cls]):
            assert service in scraped, f"Prometheus does not scrape {service}"
    assert {"central-1", "central-2", "cp-engine-1", "cp-monitor-1", "cp-fleet"} <= scraped


def test_grafana_data_source_is_the_compose_prometheus_and_the_dashboard_uses_it() -> None:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://{PROMETHEUS_SERVICE}:{PROMETHEUS_PORT}"
    used = {json.dumps(panel["datasource"], sort_keys=True) for panel in panels()}
    used |= {json.dumps(t["datasource"], sort_keys=True) for p in panels() for t in p["targets"]}
    assert used == {json.dumps({"type": "prometheus", "uid": source["uid"]}, sort_keys=True)}


# ----------------------------------------------------------------------------- the dashboard


def test_dashboard_has_the_panels_an_operator_needs() -> None:
    data = dashboard()
    assert data["uid"] and data["title"]
    titles = {panel["title"] for panel in panels()}
    assert titles >= WANTED_PANELS, f"missing panels: {WANTED_PANELS - titles}"
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_metric_the_dashboard_names_is_one_the_code_defines() -> None:
    defined = series_names() | PROMQL_BUILTINS
    for expr in dashboard_exprs():
        named = metrics_in(expr)
        assert named, f"no metric in {expr!r}"
        assert named <= defined, f"{expr!r}: not defined: {sorted(named - defined)}"


def test_every_metric_the_rules_name_is_one_the_code_defines() -> None:
    defined = series_names() | PROMQL_BUILTINS
    alerts = {rule["alert"] for rule in rules()}
    assert alerts >= WANTED_ALERTS
    for rule in rules():
        named = metrics_in(rule["expr"])
        assert named and named <= defined, f"{rule['alert']}: {sorted(named - defined)}"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_metric_names_are_found_in_promql() -> None:
    assert metrics_in('sum by (le) (rate(evcharging_accept_latency_seconds_bucket[1m]))') == {
        "evcharging_accept_latency_seconds_bucket"}
    assert metrics_in('up{job="evcharging_x"} == 0') == {"up"}


# ----------------------------------------------------------------------------- promtool


def test_promtool_accepts_the_config_and_the_rules() -> None:
    out = run_promtool("check", "config", PROMETHEUS_CONFIG.name, cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in out
    assert re.search(r"SUCCESS: \d+ rules found", run_promtool("check", "rules", str(RULES)))


def test_the_alert_rules_fire_when_they_should() -> None:
    """rules.test.yml: each alert fires on a made-up history, and not before its time."""
    tested = {case["alertname"] for test in load_yaml(RULES_TESTS)["tests"]
              for case in test["alert_rule_test"]}
    assert {rule["alert"] for rule in rules()} <= tested, "every alert has a test"
    assert "SUCCESS" in run_promtool("test", "rules", RULES_TESTS.name, cwd=PROMETHEUS_DIR)


def test_the_local_prometheus_config_is_valid(tmp_path: Path) -> None:
    assert RULES.resolve() == RULES_FILE
    config = scrape_config([Target.parse("central=127.0.0.1:8000"),
                            Target.parse("cp-engine=127.0.0.1:8001"),
                            Target.parse("cp-engine=127.0.0.1:8002")],
                           interval=1.0, rule_files=[RULES])
    assert [job["job_name"] for job in config["scrape_configs"]] == ["central", "cp-engine"]
    assert config["scrape_configs"][1]["static_configs"][0]["targets"] == [
        "127.0.0.1:8001", "127.0.0.1:8002"]
    path = write_config(tmp_path / "prometheus.yml", config)
    assert "SUCCESS" in run_promtool("check", "config", str(path))


@pytest.mark.parametrize("text", ["central", "central=", "=h:1", "central=host", "c=h:x"])
def test_a_bad_target_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="JOB=HOST:PORT"):
        Target.parse(text)


def test_graph_url_opens_the_classic_ui() -> None:
    url = graph_url("http://localhost:9090/", "sum(rate(evcharging_sessions_total[1m]))")
    assert url.startswith("http://localhost:9090/classic/graph?g0.expr=sum%28rate%28")
