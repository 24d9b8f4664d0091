"""The launcher's pure parts, `.env.example` and `requests.txt` (no broker, no process)."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from evcharging.__main__ import build_parser, main
from evcharging.apps.ev_driver.driver import load_requests
from evcharging.common.config import (
    CentralSettings,
    CPEngineSettings,
    CPMonitorSettings,
    DriverSettings,
    FleetSettings,
    LoadSettings,
    OcppSettings,
)
from evcharging.devtools.kafka_broker.sasl import SaslUsers
from evcharging.devtools.process import free_port, port_free, terminate
from evcharging.launcher.broker import (
    SASL_DATA_DIR,
    StopRequest,
    prepare_broker,
    sasl_child_env,
    stop_broker,
)
from evcharging.launcher.children import (
    RESTART_FIRST_DELAY,
    RESTART_MAX_DELAY,
    Child,
    describe_exit,
    next_delay,
)
from evcharging.launcher.cli import option_warnings, options_from_args, run_command
from evcharging.launcher.console import Console, banner, format_line, prefix_width
from evcharging.launcher.plan import (
    LOAD_FOREVER,
    STOP_ORDER,
    ChildSpec,
    KafkaChoice,
    LaunchError,
    LaunchOptions,
    PortPlan,
    PortUse,
    Role,
    busy_ports,
    child_env,
    child_specs,
    cp_ids,
    driver_ids,
    fleet_ids,
    metrics_targets,
    ocpp_port_uses,
    plan_ports,
    resolve_bootstrap,
    use_fleet,
)
from evcharging.launcher.supervisor import Supervisor, supervise
from tests.polling import poll, poll_sync

ROOT = Path(__file__).resolve().parents[2]
SETTINGS: tuple[type[BaseSettings], ...] = (
    CentralSettings, CPEngineSettings, CPMonitorSettings, DriverSettings, LoadSettings,
    FleetSettings, OcppSettings,
)
REQUIRED = {CPEngineSettings: {"cp_id": "CP-001"}, CPMonitorSettings: {"cp_id": "CP-001"},
            DriverSettings: {"driver_id": "driver-1"}}
LAUNCHER_VARIABLES = {"KAFKA_BOOTSTRAP", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_USERNAME",
                      "KAFKA_SASL_PASSWORD", "KAFKA_SSL_CAFILE", "KAFKA_CENTRAL_PASSWORD",
                      "KAFKA_CP_PASSWORD", "KAFKA_DRIVER_PASSWORD"}
"""Not one service's setting: the broker `make run` should use, and the Kafka security every
service falls back to (SPEC §11; documented in .env.example)."""
COMPOSE_VARIABLES = {"CENTRAL2_HTTP_PORT", "CENTRAL2_LISTEN_PORT", "CP1_HEALTH_PORT",
                     "CP2_HEALTH_PORT", "KAFKA_HOST_PORT",
                     "PROMETHEUS_PORT", "GRAFANA_PORT", "GRAFANA_ADMIN_PASSWORD",
                     "KAFKA_ADMIN_PASSWORD", "KAFKA_BROKER_PASSWORD", "POSTGRES_PASSWORD"}
"""Not a service setting: host ports (and Grafana's password) of docker/docker-compose.yml."""
SERVICE_PREFIXES = ("CENTRAL_", "CP_ENGINE_", "CP_MONITOR_", "DRIVER_", "LOAD_", "FLEET_",
                    "OCPP_")


def env_name(cls: type[BaseSettings], field: str) -> str:
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No service variable and no .env: the launcher sees only what a test sets."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(SERVICE_PREFIXES) or name in LAUNCHER_VARIABLES | {"NO_COLOR"}:
            monkeypatch.delenv(name)
    return tmp_path


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


# --------------------------------------------------------------------------- command line


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "COMMAND" in out
    assert re.search(r"^\s+run\s+start the whole system", out, re.MULTILINE)


def test_sasl_makes_a_secured_broker_and_gives_the_children_their_passwords(
    clean_env: Path,
) -> None:
    """`make run ARGS=--sasl` (SPEC §11): the local broker is a SASL one, with its own
    storage, and the children learn the protocol and the principals' passwords."""
    args = parse("--sasl", "--kafka-port", "0")
    assert args.sasl is True and parse().sasl is False
    options = options_from_args(args, {}, {})
    console = Console(io.StringIO(), colour=False)
    local = prepare_broker(console, options, set(), sasl=True, topic_prefixes=("", "run1."))
    assert local.broker.sasl and local.broker.data_dir.name == SASL_DATA_DIR
    assert not local.keep_data
    plain = prepare_broker(console, options, set())
    assert not plain.broker.sasl and plain.broker.data_dir.name == "data"
    users = SaslUsers({"central": "c", "cp": "p", "driver": "d", "admin": "a"})
    assert sasl_child_env(users) == {
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_CENTRAL_PASSWORD": "c",
        "KAFKA_CP_PASSWORD": "p", "KAFKA_DRIVER_PASSWORD": "d",
    }


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_run_defaults_are_the_services_defaults(clean_env: Path) -> None:
    options = options_from_args(parse(), {}, {})
    assert options == LaunchOptions(
        cps=2, drivers=1, http_port=8000, listen_port=9999, base_health_port=8001,
        requests_file=Path("requests.txt"), db_path=Path("ev_charging.db"), kafka=None,
        kafka_port=None, restart=False, start_timeout=60.0, stop_timeout=10.0, colour="auto",
    )


def test_run_flags(clean_env: Path) -> None:
    args = parse(
        "--cps", "3", "--drivers", "2", "--kafka-bootstrap", "broker:9093", "--http-port", "8100",
        "--listen-port", "9100", "--base-health-port", "8200", "--requests-file", "r.txt",
        "--db-path", "x.db", "--restart", "--start-timeout", "5", "--stop-timeout", "2.5",
        "--kafka-port", "0", "--color", "never",
    )
    options = options_from_args(args, {}, {})
    assert options == LaunchOptions(
        cps=3, drivers=2, http_port=8100, listen_port=9100, base_health_port=8200,
        requests_file=Path("r.txt"), db_path=Path("x.db"),
        kafka=KafkaChoice("broker:9093", "--kafka-bootstrap"), kafka_port=0, restart=True,
        start_timeout=5.0, stop_timeout=2.5, colour="never",
    )


def test_no_drivers(clean_env: Path) -> None:
    assert options_from_args(parse("--no-drivers"), {}, {}).drivers == 0
    # make run passes --drivers first; a later --no-drivers (ARGS) wins.
    assert options_from_args(parse("--drivers", "1", "--no-drivers"), {}, {}).drivers == 0
    assert options_from_args(parse("--drivers", "0"), {}, {}).drivers == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--cps", "-1"], ["--cps", "100001"], ["--cps", "two"], ["--drivers", "-2"],
        ["--http-port", "0"], ["--http-port", "65536"], ["--listen-port", "x"],
        ["--start-timeout", "0"], ["--stop-timeout", "-1"],
        ["--color", "blue"], ["--kafka-port", "70000"], ["--sites", "0"], ["--load", "0"],
        ["--load", "fast"], ["--load-duration", "-5"], ["--fleet-port", "65536"],
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_defaults_follow_the_environment_and_dotenv(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_env / ".env").write_text(
        "CENTRAL_HTTP_PORT=8100\nCP_ENGINE_HEALTH_PORT=8300\nDRIVER_REQUESTS_FILE=mine.txt\n"
    )
    monkeypatch.setenv("CENTRAL_LISTEN_PORT", "9100")
    monkeypatch.setenv("CENTRAL_DB_PATH", "other.db")
    options = options_from_args(parse(), {}, {})
    assert (options.http_port, options.listen_port, options.base_health_port) == (
        8100, 9100, 8300,
    )
    assert (options.requests_file, options.db_path) == (Path("mine.txt"), Path("other.db"))
    flagged = options_from_args(parse("--http-port", "8500", "--db-path", "f.db"), {}, {})
    assert (flagged.http_port, flagged.db_path) == (8500, Path("f.db"))


def test_invalid_settings_in_the_environment(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CENTRAL_HTTP_PORT", "eighty")
    with pytest.raises(LaunchError, match="http_port"):
        options_from_args(parse(), {}, {})


def test_more_than_20_cps_run_in_one_fleet(clean_env: Path) -> None:
    assert [use_fleet(n, None) for n in (0, 2, 20, 21, 10_000)] == [
        False, False, False, True, True,
    ]
    assert use_fleet(2, True) and not use_fleet(500, False)
    engines = options_from_args(parse("--cps", "20"), {}, {})
    assert (engines.fleet, engines.drivers, engines.quiet) == (False, 1, frozenset())
    fleet = options_from_args(parse("--cps", "21"), {}, {})
    assert (fleet.fleet, fleet.drivers, fleet.sites, fleet.fleet_port) == (True, 0, 1, 8100)
    assert fleet.quiet == {Role.CENTRAL, Role.FLEET}  # INFO is a line per CP and session
    assert options_from_args(parse("--cps", "3", "--fleet"), {}, {}).fleet
    forced = options_from_args(parse("--cps", "500", "--fleet", "--no-fleet"), {}, {})
    assert not forced.fleet and forced.drivers == 1  # the last one wins
    assert options_from_args(parse("--cps", "10000", "--drivers", "2"), {}, {}).drivers == 2
    assert options_from_args(parse("--cps", "100000"), {}, {}).cps == 100_000
    with pytest.raises(LaunchError, match=r"at most 999 CPs, not 1000"):
        options_from_args(parse("--cps", "1000", "--no-fleet"), {}, {})


def test_fleet_and_load_defaults_follow_the_environment(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_env / ".env").write_text("FLEET_SITES=8\nFLEET_HTTP_PORT=8200\n")
    monkeypatch.setenv("CENTRAL_LOG_LEVEL", "INFO")  # asked for: not lowered
    options = options_from_args(parse("--cps", "100", "--load", "12.5"), {}, {})
    assert (options.sites, options.fleet_port, options.load) == (8, 8200, 12.5)
    assert options.load_duration is None  # until Ctrl-C
    assert options.quiet == {Role.FLEET}
    flagged = options_from_args(
        parse("--cps", "100", "--sites", "3", "--fleet-port", "8300", "--load", "2"), {}, {}
    )
    assert (flagged.sites, flagged.fleet_port) == (3, 8300)
    monkeypatch.setenv("LOAD_DURATION", "90")
    assert options_from_args(parse("--load", "1"), {}, {}).load_duration == 90
    assert options_from_args(
        parse("--load", "1", "--load-duration", "15"), {}, {}
    ).load_duration == 15


def test_option_warnings(clean_env: Path) -> None:
    requests = clean_env / "requests.txt"
    requests.write_text("CP-001\nCP-002\n")
    fleet = options_from_args(parse("--cps", "50", "--drivers", "1"), {}, {})
    (warning,) = option_warnings(parse("--cps", "50", "--drivers", "1"), fleet)
    assert "names none of this run's CPs (CP-00001, CP-00002 …)" in warning
    assert "unknown CP" in warning and "five digits" in warning
    assert option_warnings(parse("--cps", "50"), options_from_args(parse("--cps", "50"), {}, {})
                           ) == []  # no driver by default with the fleet
    args = parse("--cps", "2", "--sites", "4")
    (warning,) = option_warnings(args, options_from_args(args, {}, {}))
    assert "--sites groups the CP Fleet's CPs" in warning
    requests.write_text("CP-00007\n")
    args = parse("--cps", "50", "--drivers", "1")
    assert option_warnings(args, options_from_args(args, {}, {})) == []


def test_bootstrap_precedence() -> None:
    env = {"KAFKA_BOOTSTRAP": "a:1", "CENTRAL_KAFKA_BOOTSTRAP": "b:2"}
    dotenv: dict[str, str | None] = {"KAFKA_BOOTSTRAP": "c:3", "CENTRAL_KAFKA_BOOTSTRAP": "d:4"}
    assert resolve_bootstrap("f:0", env, dotenv) == KafkaChoice("f:0", "--kafka-bootstrap")
    assert resolve_bootstrap(None, env, dotenv) == KafkaChoice(
        "a:1", "KAFKA_BOOTSTRAP in the environment"
    )
    assert resolve_bootstrap(None, {"CENTRAL_KAFKA_BOOTSTRAP": "b:2"}, dotenv) == KafkaChoice(
        "b:2", "CENTRAL_KAFKA_BOOTSTRAP in the environment"
    )
    assert resolve_bootstrap(None, {}, dotenv) == KafkaChoice("c:3", "KAFKA_BOOTSTRAP in the .env")
    assert resolve_bootstrap(None, {"KAFKA_BOOTSTRAP": " "}, {"CENTRAL_KAFKA_BOOTSTRAP": "d:4"}) \
        == KafkaChoice("d:4", "CENTRAL_KAFKA_BOOTSTRAP in the .env")
    assert resolve_bootstrap(None, {"CP_ENGINE_KAFKA_BOOTSTRAP": "x:1"}, {"X": None}) is None
    assert resolve_bootstrap("", {}, {}) is None


def test_ocpp_starts_the_gateway_after_central_with_its_ports(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert options_from_args(parse(), {}, {}).ocpp_port is None
    options = options_from_args(parse("--ocpp"), {}, {})
    assert (options.ocpp_port, options.ocpp_http_port) == (9000, 9001)
    assert options.ocpp_url == "ws://127.0.0.1:9000/ocpp/<charger-id>"
    options = options_from_args(
        parse("--ocpp", "--ocpp-port", "9100", "--ocpp-http-port", "9101", "--http-port",
              "8100"), {}, {})
    assert options.ocpp_url == "ws://127.0.0.1:9100/ocpp/<charger-id>"
    specs = child_specs(options, "127.0.0.1:9092")
    assert [(s.name, s.role) for s in specs][:2] == [("central", Role.CENTRAL),
                                                      ("ocpp", Role.OCPP)]
    assert specs[1].argv("py") == [
        "py", "-m", "evcharging.apps.ev_ocpp.main", "--kafka-bootstrap", "127.0.0.1:9092",
        "--ws-port", "9100", "--central-host", "localhost", "--central-port", "8100",
        "--http-port", "9101",
    ]
    assert STOP_ORDER.index(Role.OCPP) == STOP_ORDER.index(Role.CENTRAL) - 1
    assert [(u.port, u.flag) for u in ocpp_port_uses(options)] == [
        (9100, "--ocpp-port"), (9101, "--ocpp-http-port")]
    assert ("ocpp", 9101) in metrics_targets(options)
    with pytest.raises(LaunchError, match=r"port 9101 .*OCPP gateway's /health.*--ocpp-http"):
        plan_ports(8000, 9999, 8001, 2, extra=(*ocpp_port_uses(options),
                                               PortUse(9101, "x", "--x")))
    monkeypatch.setenv("OCPP_WS_PORT", "9200")  # the gateway's own setting is the default
    monkeypatch.setenv("OCPP_HTTP_PORT", "9201")
    options = options_from_args(parse("--ocpp"), {}, {})
    assert (options.ocpp_port, options.ocpp_http_port) == (9200, 9201)
    assert "--ocpp-port and --ocpp-http-port place the OCPP gateway" in " ".join(
        option_warnings(parse("--ocpp-port", "9300"), options_from_args(
            parse("--ocpp-port", "9300"), {}, {})))


async def test_banner_with_ocpp_shows_where_chargers_connect() -> None:
    out = io.StringIO()
    banner(Console(out, colour=False), LaunchOptions(cps=2, ocpp_port=9000), "x:1")
    text = out.getvalue()
    assert "OCPP:      chargers connect to ws://127.0.0.1:9000/ocpp/<charger-id>" in text
    assert "gateway http://localhost:9001/health" in text
    assert "ocpp http://localhost:9001/metrics" in text
    out = io.StringIO()
    banner(Console(out, colour=False), LaunchOptions(cps=2), "x:1")
    assert "OCPP" not in out.getvalue()


async def test_the_stop_message_names_the_gateway_before_central() -> None:
    out = io.StringIO()
    sup = Supervisor(LaunchOptions(cps=1, drivers=0, ocpp_port=9000), "x:1",
                     Console(out, colour=False), os.environ, "", False)
    sup.on_signal(signal.SIGTERM)
    assert "stopping CP monitors, CP engines, the OCPP gateway and EV Central" in out.getvalue()


# --------------------------------------------------------------------------- ports


def test_port_plan() -> None:
    plan = plan_ports(8000, 9999, 8001, 3)
    assert plan == PortPlan(8000, 9999, (8001, 8002, 8003))
    assert [(u.port, u.flag) for u in plan.uses()] == [
        (8000, "--http-port"), (9999, "--listen-port"), (8001, "--base-health-port"),
        (8002, "--base-health-port"), (8003, "--base-health-port"),
    ]
    assert "CP-003" in plan.uses()[-1].what
    assert plan_ports(8000, 9999, 8001, 0).health == ()


def test_port_plan_of_a_fleet() -> None:
    plan = plan_ports(8000, 9999, 8001, 10_000, 8100)
    assert plan == PortPlan(8000, 9999, (), 8100)  # no health port per CP
    assert [(u.port, u.flag) for u in plan.uses()] == [
        (8000, "--http-port"), (9999, "--listen-port"), (8100, "--fleet-port"),
    ]
    with pytest.raises(LaunchError, match=r"port 8000 .*HTTP API.*CP Fleet.*--fleet-port"):
        plan_ports(8000, 9999, 8001, 50, 8000)
    busy = busy_ports(plan, is_free=lambda port: port != 8100)
    assert busy == ["port 8100 (the CP Fleet's HTTP port) is already in use; choose another "
                    "with --fleet-port"]


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ((8000, 8000, 8001, 1),
         r"port 8000 .*HTTP API.*TCP control plane.*--listen-port or --http-port"),
        ((8002, 9999, 8001, 2),
         r"port 8002 .*HTTP API.*CP-002.*--base-health-port or --http-port"),
        ((8000, 9999, 65535, 2),
         r"port 65536 .*CP-002.* not a valid TCP port; change --base-health-port"),
    ],
)
def test_port_plan_refuses_collisions_and_bad_ports(
    ports: tuple[int, int, int, int], message: str
) -> None:
    with pytest.raises(LaunchError, match=message):
        plan_ports(*ports)


def test_busy_ports_name_the_port_and_the_flag() -> None:
    plan = plan_ports(8000, 9999, 8001, 2)
    problems = busy_ports(plan, is_free=lambda port: port not in {9999, 8002})
    assert problems == [
        "port 9999 (Central's TCP control plane) is already in use; choose another with "
        "--listen-port",
        "port 8002 (the /health endpoint of CP-002) is already in use; choose another with "
        "--base-health-port",
    ]
    assert busy_ports(plan, is_free=lambda port: True) == []


def test_port_free_sees_a_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_free(port)
    assert port_free(port)


def test_a_busy_port_stops_the_launcher_before_anything_starts(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (clean_env / "requests.txt").write_text("CP-001\n")
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = run_command(parse("--http-port", str(port), "--kafka-bootstrap", "nowhere:1"))
    assert code == 2
    out = capsys.readouterr().out
    assert f"port {port} (Central's dashboard and HTTP API) is already in use" in out
    assert "--http-port" in out
    assert "Kafka" not in out  # nothing was started


def test_a_missing_requests_file_stops_the_launcher(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    http, listen = free_port(), free_port()
    code = run_command(parse("--requests-file", "nope.txt", "--kafka-bootstrap", "nowhere:1",
                             "--http-port", str(http), "--listen-port", str(listen), "--cps", "0"))
    assert code == 2
    out = capsys.readouterr().out
    assert "the requests file nope.txt does not exist" in out
    assert "--requests-file" in out


# --------------------------------------------------------------------------- children


def test_children_get_the_seed_flags() -> None:
    options = LaunchOptions(cps=2, drivers=2, http_port=8100, listen_port=9100,
                            base_health_port=8201, requests_file=Path("r.txt"),
                            db_path=Path("c.db"))
    specs = child_specs(options, "127.0.0.1:9092")
    assert [(s.name, s.role) for s in specs] == [
        ("central", Role.CENTRAL),
        ("cp-e CP-001", Role.ENGINE), ("cp-m CP-001", Role.MONITOR),
        ("cp-e CP-002", Role.ENGINE), ("cp-m CP-002", Role.MONITOR),
        ("driver-1", Role.DRIVER), ("driver-2", Role.DRIVER),
    ]
    by_name = {s.name: s for s in specs}
    assert by_name["central"].argv("py") == [
        "py", "-m", "evcharging.apps.ev_central.main", "--kafka-bootstrap", "127.0.0.1:9092",
        "--http-port", "8100", "--listen-port", "9100", "--db-path", "c.db",
    ]
    assert by_name["cp-e CP-002"].argv("py") == [
        "py", "-m", "evcharging.apps.ev_cp_e.main", "--kafka-bootstrap", "127.0.0.1:9092",
        "--cp-id", "CP-002", "--health-port", "8202",
    ]
    assert by_name["cp-m CP-002"].argv("py") == [
        "py", "-m", "evcharging.apps.ev_cp_m.main", "--cp-id", "CP-002", "--cp-e-host",
        "localhost", "--cp-e-port", "8202", "--central-host", "localhost", "--central-port",
        "8100",
    ]
    assert by_name["driver-2"].argv("py") == [
        "py", "-m", "evcharging.apps.ev_driver.main", "--driver-id", "driver-2",
        "--kafka-bootstrap", "127.0.0.1:9092", "--requests-file", "r.txt",
    ]
    assert by_name["cp-m CP-001"].cp_id == "CP-001"


def test_a_fleet_run_starts_one_fleet_and_the_load() -> None:
    options = LaunchOptions(cps=10_000, drivers=1, http_port=8100, fleet=True, sites=4,
                            fleet_port=8200, load=50, quiet=frozenset({Role.FLEET}))
    specs = child_specs(options, "127.0.0.1:9092")
    assert [(s.name, s.role) for s in specs] == [
        ("central", Role.CENTRAL), ("cp-fleet", Role.FLEET), ("driver-1", Role.DRIVER),
        ("load", Role.LOAD),
    ]
    by_name = {s.name: s for s in specs}
    assert "--log-level" not in by_name["central"].args
    assert by_name["cp-fleet"].argv("py") == [
        "py", "-m", "evcharging.apps.ev_fleet.main", "--kafka-bootstrap", "127.0.0.1:9092",
        "--cps", "10000", "--id-prefix", "CP-", "--http-port", "8200", "--central-host",
        "localhost", "--central-port", "8100", "--sites", "4", "--log-level", "WARNING",
    ]
    assert by_name["load"].argv("py") == [
        "py", "-m", "evcharging.apps.ev_load.main", "--kafka-bootstrap", "127.0.0.1:9092",
        "--rate", "50", "--duration", f"{LOAD_FOREVER:.0f}", "--central-url",
        "http://localhost:8100", "--cps", "10000", "--cp-prefix", "CP-",
    ]
    engines = child_specs(LaunchOptions(cps=3, drivers=0, load=0.5, load_duration=30), "k:1")
    assert [s.role for s in engines].count(Role.ENGINE) == 3
    assert engines[-1].args == (
        "--kafka-bootstrap", "k:1", "--rate", "0.5", "--duration", "30", "--central-url",
        "http://localhost:8000", "--cps", "CP-001,CP-002,CP-003",
    )
    assert LaunchOptions(cps=10_000, fleet=True).ids[::9999] == ["CP-00001", "CP-10000"]
    assert LaunchOptions(cps=12).ids[-1] == "CP-012"
    assert LaunchOptions(cps=10_000, stop_timeout=10).fleet_stop_timeout == 30


def test_every_child_module_parses_its_seed_flags() -> None:
    """The flags the launcher passes are flags the services know (their own parsers)."""
    from evcharging.common.config import build_parser as settings_parser
    from evcharging.devtools.prometheus import build_parser as prometheus_parser

    classes = {Role.CENTRAL: CentralSettings, Role.ENGINE: CPEngineSettings,
               Role.MONITOR: CPMonitorSettings, Role.DRIVER: DriverSettings,
               Role.FLEET: FleetSettings, Role.LOAD: LoadSettings, Role.OCPP: OcppSettings}
    runs = [LaunchOptions(cps=1, drivers=1, load=3, ocpp_port=9000),
            LaunchOptions(cps=30, drivers=1, fleet=True, load=3, load_duration=60,
                          quiet=frozenset(Role)),
            LaunchOptions(cps=2, drivers=1, load=3, prometheus_port=9090)]
    seen = set()
    for options in runs:
        for spec in child_specs(options, "localhost:9092"):
            if spec.role is Role.PROMETHEUS:  # not a service: the devtools' own flags
                assert prometheus_parser().parse_args(list(spec.args)).target
                seen.add(spec.role)
                continue
            parser = settings_parser(classes[spec.role], "x", "")
            parsed = vars(parser.parse_args(list(spec.args)))
            assert len(parsed) * 2 == len(spec.args), spec
            settings = classes[spec.role](**{"cp_id": "CP-001", "driver_id": "d", **parsed})
            assert settings is not None
            seen.add(spec.role)
    assert seen == set(Role)


def test_ids() -> None:
    assert cp_ids(3) == ["CP-001", "CP-002", "CP-003"]
    assert cp_ids(12)[-1] == "CP-012"
    assert cp_ids(0) == []
    assert fleet_ids(2) == ["CP-00001", "CP-00002"]  # as ev_fleet names them
    assert fleet_ids(100_000)[-1] == "CP-100000"
    assert driver_ids(2) == ["driver-1", "driver-2"]


def test_child_env_is_unbuffered_and_keeps_the_rest() -> None:
    env = child_env({"CP_ENGINE_SESSION_SECONDS": "2", "PYTHONUNBUFFERED": "0"})
    assert env == {"CP_ENGINE_SESSION_SECONDS": "2", "PYTHONUNBUFFERED": "1"}


def test_restart_backoff() -> None:
    delays = [RESTART_FIRST_DELAY]
    for _ in range(7):
        delays.append(next_delay(delays[-1]))
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert RESTART_MAX_DELAY == 30


def test_describe_exit() -> None:
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(None) == "no exit code"


# --------------------------------------------------------------------------- output


def test_prefixes_have_a_fixed_width() -> None:
    names = ["central", "cp-e CP-001", "driver-1", "launcher"]
    width = prefix_width(names)
    assert width == len("cp-e CP-001")
    lines = [format_line(name, "hello", width) for name in names]
    assert lines[0] == "central     | hello"
    assert lines[1] == "cp-e CP-001 | hello"
    assert {line.index("|") for line in lines} == {width + 1}
    assert format_line("central", "", width) == "central     |"


def test_prefix_colours() -> None:
    line = format_line("central", "x", 8, "\033[35m", "\033[31m")
    assert line == "\033[35mcentral  |\033[0m \033[31mx\033[0m"


def test_console_writes_whole_lines() -> None:
    out = io.StringIO()
    console = Console(out, colour=False, width=11)
    console.line("cp-m CP-001", "checking", "\033[32m")
    console.error("boom")
    assert out.getvalue() == "cp-m CP-001 | checking\nlauncher    | boom\n"


async def test_relay_prefixes_each_line_and_keeps_the_tail() -> None:
    out = io.StringIO()
    child = Child(ChildSpec("driver-1", Role.DRIVER, ()))
    stream = asyncio.StreamReader(limit=16)
    stream.feed_data("one\r\ntwo € \n".encode() + b"x" * 40 + b"\nlast without newline")
    stream.feed_eof()
    await child.relay(stream, Console(out, colour=False, width=8))
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["driver-1 | one", "driver-1 | two € "]
    assert "".join(line.removeprefix("driver-1 | ") for line in lines[2:-1]) == "x" * 40
    assert lines[-1] == "driver-1 | last without newline"
    assert list(child.tail)[-1] == "last without newline"


# --------------------------------------------------------------------------- files


ASSIGNMENT = re.compile(r"^#\s?([A-Z][A-Z0-9_]*)=(.*)$")


def example_assignments() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        match = ASSIGNMENT.match(line)
        if match:
            assert match[1] not in found, f"{match[1]} appears twice in .env.example"
            found[match[1]] = match[2].strip()
    return found


def test_env_example_names_every_setting_and_nothing_else() -> None:
    settings = {env_name(cls, field) for cls in SETTINGS for field in cls.model_fields}
    named = set(example_assignments())
    assert settings - named == set(), "settings missing from .env.example"
    assert named - settings - LAUNCHER_VARIABLES - COMPOSE_VARIABLES == set(), (
        "names in .env.example that are no setting"
    )


def test_env_example_sets_nothing_when_copied() -> None:
    """Every line is a comment: a copied .env changes nothing until a line is uncommented
    (an active KAFKA_BOOTSTRAP would also stop `make run` from starting its own broker)."""
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        assert not line.strip() or line.lstrip().startswith("#"), line


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda cls: cls.__name__)
def test_env_example_shows_the_defaults(
    cls: type[BaseSettings], clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    required = REQUIRED.get(cls, {})
    defaults = cls(**required).model_dump()
    examples = example_assignments()
    for field in cls.model_fields:
        value = examples[env_name(cls, field)]
        if value:
            monkeypatch.setenv(env_name(cls, field), value)
        else:  # shown empty: required (given by a flag) or unset by default
            assert field in required or cls.model_fields[field].default in (None, ""), field
    assert cls(**required).model_dump() == defaults


def test_requests_txt_parses_with_the_drivers_parser() -> None:
    path = ROOT / "requests.txt"
    assert load_requests(path) == ["CP-001", "CP-002", "CP-001", "CP-003", "CP-002"]
    assert path.read_text(encoding="utf-8").startswith("#")


# --------------------------------------------------------------------------- supervision
# Real but tiny children: stdlib modules run with `python -m`, no service, no broker.

CRASHING = ("json.tool", ("/nonexistent/file.json",))  # argparse error on stderr, exit 2
FINISHING = ("this", ())  # prints the Zen of Python, exit 0
STUBBORN = (  # ignores SIGTERM, says "ready", then sleeps for ten minutes
    "timeit",
    ("-n", "1", "-r", "1", "-s",
     "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True)",
     "import time; time.sleep(600)"),
)


def spec(name: str, role: Role, program: tuple[str, tuple[str, ...]]) -> ChildSpec:
    return ChildSpec(name, role, program[1], module_override=program[0])


async def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    await poll(check, timeout=timeout, what="the child", interval=0.02)


def supervisor(out: io.StringIO, restart: bool = False) -> Supervisor:
    return Supervisor(LaunchOptions(restart=restart, stop_timeout=5), "x:1",
                      Console(out, colour=False, width=11), os.environ, "")


async def test_a_dead_child_is_reported_with_its_last_lines() -> None:
    out = io.StringIO()
    sup = supervisor(out)
    child = sup._launch(spec("cp-e CP-009", Role.ENGINE, CRASHING))
    await wait_until(lambda: child.ended)
    text = out.getvalue()
    assert "cp-e CP-009 | usage:" in text  # relayed, with its prefix
    assert "!!! cp-e CP-009 DIED: exit code 2" in text
    assert re.search(r"launcher    \|     .*can't open '/nonexistent/file.json'", text)
    assert child.failed and child.runs == 1 and child.last_code == 2
    assert "restarting" not in text
    await sup.shutdown()


async def test_central_dying_after_start_is_loud() -> None:
    out = io.StringIO()
    sup = supervisor(out)
    sup.started = True
    child = sup._launch(spec("central", Role.CENTRAL, CRASHING))
    await wait_until(lambda: child.ended)
    assert "EV CENTRAL IS DOWN" in out.getvalue()
    await sup.shutdown()


async def test_restart_with_backoff_until_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("evcharging.launcher.supervisor.RESTART_FIRST_DELAY", 0.05)
    out = io.StringIO()
    sup = supervisor(out, restart=True)
    child = sup._launch(spec("cp-m CP-001", Role.MONITOR, CRASHING))
    await wait_until(lambda: child.runs >= 3)
    await sup.shutdown()
    assert child.ended
    text = out.getvalue()
    assert "restarting cp-m CP-001 in 0.05 s (--restart; restart #1)" in text
    assert "restarting cp-m CP-001 in 0.1 s (--restart; restart #2)" in text
    assert text.count("DIED") >= 2


async def test_a_driver_that_exits_0_has_finished_and_is_not_restarted() -> None:
    out = io.StringIO()
    sup = supervisor(out, restart=True)
    child = sup._launch(spec("driver-1", Role.DRIVER, FINISHING))
    await wait_until(lambda: child.ended)
    text = out.getvalue()
    assert "driver-1    | Beautiful is better than ugly." in text
    assert "driver-1 finished its requests file (exit code 0)" in text
    assert "DIED" not in text and "restarting" not in text
    assert child.runs == 1 and not child.failed
    await sup.shutdown()


async def test_banner_shows_the_urls_and_how_to_stop() -> None:
    out = io.StringIO()
    banner(Console(out, colour=False), LaunchOptions(cps=3), "x:1 (mine)")
    text = out.getvalue()
    assert "Dashboard: http://localhost:8000/" in text
    assert "API docs:  http://localhost:8000/docs" in text
    assert "TCP control plane: localhost:9999" in text
    assert "port 8003 for CP-003" in text
    assert "Ctrl-C" in text


async def test_banner_of_a_fleet_with_load() -> None:
    out = io.StringIO()
    options = LaunchOptions(cps=10_000, drivers=0, fleet=True, sites=4, fleet_port=8200,
                            load=40, quiet=frozenset({Role.CENTRAL, Role.FLEET}))
    banner(Console(out, colour=False), options, "x:1 (mine)")
    text = out.getvalue()
    assert "running: Central, 10,000 CPs (CP-00001 .. CP-10000, 4 site(s)), 0 driver(s)" in text
    assert ("CP Fleet:  http://localhost:8200/health  (one process for every CP: > 20 CPs; "
            "--no-fleet: a process per CP)") in text
    assert "CP health: http://localhost:8200/cp/CP-00001/health  (POST .../fault" in text
    assert "Summary:   http://localhost:8000/summary" in text
    assert "http://localhost:8000/cp?limit=5" in text
    assert "Load:      40 new drivers/s (ev_load), until Ctrl-C" in text
    assert "Logs:      Central and the fleet: warnings only" in text
    out = io.StringIO()
    banner(Console(out, colour=False), LaunchOptions(cps=3, fleet=True, load=1,
                                                     load_duration=20), "x:1")
    assert "(CP-00001, CP-00002, CP-00003, 1 site(s))" in out.getvalue()
    assert "(one process for every CP: --fleet)" in out.getvalue()
    assert "for 20 s" in out.getvalue()


async def test_the_stop_message_names_what_runs() -> None:
    out = io.StringIO()
    options = LaunchOptions(cps=30, drivers=1, fleet=True, load=5)
    sup = Supervisor(options, "x:1", Console(out, colour=False), os.environ, "", True)
    sup.on_signal(signal.SIGTERM)
    assert ("SIGTERM received: stopping the driver load, drivers, the CP Fleet and EV Central, "
            "then the Kafka broker") in out.getvalue()
    assert sup.stopping.is_set()


async def test_a_load_that_ends_is_reported_and_not_restarted() -> None:
    out = io.StringIO()
    sup = supervisor(out, restart=True)
    child = sup._launch(spec("load", Role.LOAD, FINISHING))
    await wait_until(lambda: child.ended)
    text = out.getvalue()
    assert "load finished its run (exit code 0; its summary is above)" in text
    assert "DIED" not in text and "restarting" not in text
    await sup.shutdown()


# --------------------------------------------------------------------------- a second signal
# The first SIGINT/SIGTERM stops in order and waits; the second kills at once (as uvicorn).


async def test_a_second_signal_kills_every_child_at_once() -> None:
    """Real signals to this process, through the handlers `supervise` installs. The child
    ignores SIGTERM and the stop timeout is two minutes: only the second SIGINT ends it."""
    out = io.StringIO()
    options = LaunchOptions(cps=0, drivers=0, http_port=free_port(), start_timeout=120,
                            stop_timeout=120)
    sup = Supervisor(options, "x:1", Console(out, colour=False, width=11), os.environ, "")
    sup.specs = [spec("central", Role.CENTRAL, STUBBORN)]  # Central never answers /health
    run = asyncio.create_task(supervise(sup))
    try:
        central = await poll(lambda: sup.children and "ready" in sup.children[0].tail
                             and sup.children[0], timeout=20, what="the stubborn child")
        os.kill(os.getpid(), signal.SIGINT)
        await poll(lambda: "stopping EV Central: central" in out.getvalue(), timeout=20,
                   what="the ordered stop")
        assert central.running  # SIGTERM was ignored: the launcher waits for it
        os.kill(os.getpid(), signal.SIGINT)
        code, forced = await asyncio.wait_for(run, 20)
    finally:
        for child in sup.children:
            child.kill()
        if not run.done():
            run.cancel()
    assert (code, forced) == (0, True)
    # The launcher sent SIGKILL and the process is gone. (Its exit status is not checked: on
    # a busy machine asyncio's child watcher of Python 3.11 sometimes finds the child
    # already reaped and reports 255 with an "Unknown child process" warning.)
    assert central.killed and central.process is not None
    assert central.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(central.process.pid, 0)
    text = out.getvalue()
    assert "SIGINT received: stopping" in text
    assert "SIGINT again: killing every process now" in text
    assert "killed (SIGKILL): central" in text
    assert "did not stop within" not in text  # killed on the signal, not after the timeout


def test_a_second_signal_while_the_broker_starts_forces_instead_of_interrupting() -> None:
    forced: list[bool] = []
    stop = StopRequest(lambda: forced.append(True))
    with stop.installed():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            poll_sync(lambda: None, timeout=5, what="the KeyboardInterrupt")
        assert stop.requested and not stop.forced
        # The cleanup of the half start is running now: the next signal must not interrupt it.
        os.kill(os.getpid(), signal.SIGINT)
        poll_sync(lambda: forced, timeout=5, what="the forced stop")
    assert stop.forced and forced == [True]


class FakeBroker:
    """What `stop_broker` uses of a KafkaBroker; its stop receives a Ctrl-C."""

    pid = 4242

    def __init__(self) -> None:
        self.killed = False
        self.stopped = False

    def kill(self) -> None:
        self.killed = True

    def stop(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        poll_sync(lambda: self.killed, timeout=5, what="the broker killed by the signal")
        self.stopped = True


def test_a_signal_while_the_broker_stops_kills_it() -> None:
    out = io.StringIO()
    broker = FakeBroker()
    assert stop_broker(Console(out, colour=False), broker) is True  # type: ignore[arg-type]
    assert broker.killed and broker.stopped
    text = out.getvalue()
    assert "stopping the Kafka broker (pid 4242)" in text
    assert "killing the Kafka broker now" in text


def test_terminate_kills_what_ignores_sigterm() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "print('ready', flush=True); time.sleep(600)"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as stubborn:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
        why: list[str] = []
        assert terminate(stubborn.pid, 0.2, alive=lambda: stubborn.poll() is None,
                         before_kill=lambda: why.append("SIGTERM ignored")) is False
        assert stubborn.returncode == -signal.SIGKILL and why == ["SIGTERM ignored"]
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as willing:
        assert terminate(willing.pid, 20, alive=lambda: willing.poll() is None) is True
        assert willing.returncode == -signal.SIGTERM
