"""``make run ARGS=--prometheus``: the launcher's plan for metrics (pure; no process).

Where every service's ``/metrics`` is, the ports --prometheus adds (checked like the
others), the Prometheus child that scrapes them all, and what the banner says.
"""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import pytest

from evcharging.__main__ import build_parser
from evcharging.devtools import prometheus as devtools_prometheus
from evcharging.devtools.process import free_port
from evcharging.devtools.prometheus import Target
from evcharging.devtools.prometheus import build_parser as prometheus_parser
from evcharging.launcher.cli import options_from_args, run_command
from evcharging.launcher.console import Console, banner
from evcharging.launcher.plan import (
    METRICS_BASE_PORT,
    STOP_ORDER,
    LaunchError,
    LaunchOptions,
    Role,
    child_specs,
    metrics_port_uses,
    metrics_targets,
    plan_ports,
)
from tests.unit.test_launcher import SERVICE_PREFIXES


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(SERVICE_PREFIXES) or name in {"KAFKA_BOOTSTRAP", "NO_COLOR"}:
            monkeypatch.delenv(name)
    return tmp_path


def test_without_prometheus_the_http_ports_serve_metrics_and_nothing_more_starts() -> None:
    options = LaunchOptions(cps=2, load=1)
    assert metrics_targets(options) == [("central", 8000), ("cp-engine", 8001),
                                        ("cp-engine", 8002)]
    assert metrics_port_uses(options) == []
    specs = child_specs(options, "k:1")
    assert Role.PROMETHEUS not in {spec.role for spec in specs}
    assert not any("--metrics-port" in spec.args for spec in specs)


def test_with_prometheus_monitors_and_load_serve_metrics_and_prometheus_scrapes_all() -> None:
    options = LaunchOptions(cps=2, drivers=1, load=1, prometheus_port=9090)
    targets = metrics_targets(options)
    assert targets == [
        ("central", 8000), ("cp-engine", 8001), ("cp-engine", 8002),
        ("cp-monitor", METRICS_BASE_PORT + 1), ("cp-monitor", METRICS_BASE_PORT + 2),
        ("load", METRICS_BASE_PORT),
    ]
    specs = child_specs(options, "k:1")
    by_name = {spec.name: spec for spec in specs}
    monitor = by_name["cp-m CP-002"].args
    assert monitor[monitor.index("--metrics-port") + 1] == str(METRICS_BASE_PORT + 2)
    load = by_name["load"].args
    assert load[load.index("--metrics-port") + 1] == str(METRICS_BASE_PORT)
    prometheus = specs[-1]
    assert prometheus.role is Role.PROMETHEUS and prometheus.module == (
        "evcharging.devtools.prometheus")
    parsed = prometheus_parser().parse_args(list(prometheus.args))
    assert parsed.port == 9090
    assert parsed.target == [Target(job, f"127.0.0.1:{port}") for job, port in targets]
    assert STOP_ORDER[0] is Role.PROMETHEUS  # stopped first: no scrape errors while the
    assert set(STOP_ORDER) == set(Role)      # services stop


def test_a_fleet_run_scrapes_the_fleet() -> None:
    options = LaunchOptions(cps=500, fleet=True, drivers=0, prometheus_port=9090)
    assert metrics_targets(options) == [("central", 8000), ("cp-fleet", 8100)]


def test_the_ports_prometheus_adds_are_checked_like_the_others() -> None:
    options = LaunchOptions(cps=2, prometheus_port=8001)
    with pytest.raises(LaunchError, match="port 8001 would serve both"):
        plan_ports(8000, 9999, 8001, 2, None, tuple(metrics_port_uses(options)))
    fine = LaunchOptions(cps=2, prometheus_port=9090, load=1)
    plan = plan_ports(8000, 9999, 8001, 2, None, tuple(metrics_port_uses(fine)))
    ports = {use.port: use.what for use in plan.uses()}
    assert ports[9090] == "Prometheus"
    assert {METRICS_BASE_PORT, METRICS_BASE_PORT + 1, METRICS_BASE_PORT + 2} <= set(ports)


def test_the_banner_says_where_the_metrics_and_prometheus_are() -> None:
    out = io.StringIO()
    banner(Console(out, colour=False), LaunchOptions(cps=2), "x:1")
    text = out.getvalue()
    assert "central http://localhost:8000/metrics" in text
    assert "cp-engine ports 8001..8002/metrics" in text
    assert "--prometheus" in text
    out = io.StringIO()
    banner(Console(out, colour=False), LaunchOptions(cps=1, load=2, prometheus_port=9191), "x")
    text = out.getvalue()
    assert f"cp-monitor http://localhost:{METRICS_BASE_PORT + 1}/metrics" in text
    assert f"load http://localhost:{METRICS_BASE_PORT}/metrics" in text
    assert "Prometheus: http://localhost:9191/" in text
    assert "http://localhost:9191/classic/graph?g0.expr=sum+by+%28result%29" in text


def test_the_flag_resolves_the_port(clean_env: Path) -> None:
    def options(*argv: str) -> LaunchOptions:
        return options_from_args(build_parser().parse_args(["run", *argv]), {}, {})

    assert options().prometheus_port is None
    assert options("--prometheus").prometheus_port == 9090
    assert options("--prometheus", "--prometheus-port", "9191").prometheus_port == 9191
    assert options("--prometheus-port", "9191").prometheus_port is None


def test_a_missing_prometheus_stops_the_launcher_before_anything_starts(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EVCHARGING_PROMETHEUS", str(clean_env / "no-such-prometheus"))
    ports = [str(free_port()) for _ in range(3)]
    code = run_command(build_parser().parse_args(
        ["run", "--prometheus", "--cps", "0", "--no-drivers", "--kafka-bootstrap", "nowhere:1",
         "--http-port", ports[0], "--listen-port", ports[1], "--prometheus-port", ports[2]]))
    assert code == 2
    out = capsys.readouterr().out
    assert "--prometheus: no Prometheus binary" in out
    assert "scripts/ensure_prometheus.sh" in out
    assert "Kafka" not in out


# --------------------------------------------------------------------------- the child


class Execd(Exception):
    """os.execv was called (the test stops there instead of becoming Prometheus)."""


def test_the_child_writes_its_config_empties_its_data_and_becomes_prometheus(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[list[str]] = []

    def execv(path: str, argv: list[str]) -> None:
        calls.append([path, *argv])
        raise Execd

    monkeypatch.setattr(devtools_prometheus.os, "execv", execv)
    port = free_port()
    stale = clean_env / ".cache" / "prometheus" / str(port) / "data" / "old-block"
    stale.mkdir(parents=True)
    with pytest.raises(Execd):
        devtools_prometheus.main(["--port", str(port), "--target", "central=127.0.0.1:8000",
                                  "--interval", "1"])
    folder = (clean_env / ".cache" / "prometheus" / str(port)).resolve()
    (call,) = calls
    assert call[0] == call[1] and Path(call[0]).name == "prometheus"
    assert f"--config.file={folder / 'prometheus.yml'}" in call
    assert f"--storage.tsdb.path={folder / 'data'}" in call
    assert f"--web.listen-address=127.0.0.1:{port}" in call
    assert not stale.exists() and (folder / "data").is_dir()  # a fresh run
    config = json.loads((folder / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    assert config["rule_files"] == [str(devtools_prometheus.RULES_FILE)]
    assert f"Prometheus on http://localhost:{port}/" in capsys.readouterr().out


def test_the_child_refuses_a_busy_port_and_a_missing_binary(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert devtools_prometheus.main(["--port", str(port)]) == 2
    assert f"port {port} is already in use" in capsys.readouterr().err
    monkeypatch.setenv("EVCHARGING_PROMETHEUS", "no-such-prometheus")
    assert devtools_prometheus.main(["--port", str(free_port())]) == 2
    assert "scripts/ensure_prometheus.sh" in capsys.readouterr().err
