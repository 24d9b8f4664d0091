"""docker/: the compose file and the Dockerfile agree with the code (no Docker needed).

These checks read the files and compare them with the settings classes of
``evcharging.common.config``: a renamed flag, a service that points at a host that does
not exist or a port that nothing listens on fails here instead of at ``make up``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from evcharging.apps.ev_fleet.plan import fleet_plan
from evcharging.common.centrals import parse_centrals
from evcharging.common.config import (
    SHARED_TOKEN_ENV,
    CentralSettings,
    CPEngineSettings,
    CPMonitorSettings,
    DriverSettings,
    FleetSettings,
    OcppSettings,
    ServiceSettings,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

KAFKA = "kafka"
KAFKA_SETUP = "kafka-setup"
POSTGRES = "postgres"
"""Central's database (SPEC §9): the official postgres:15 image."""
"""Runs docker/kafka/setup.sh once the broker is healthy: SPEC §11's users and ACLs."""
SETUP_SCRIPT = DOCKER_DIR / "kafka" / "setup.sh"
METRICS_SERVICES = frozenset({"prometheus", "grafana"})
"""Third-party images (checked in tests/unit/test_prometheus_files.py)."""
SETTINGS_BY_MODULE: dict[str, type[BaseSettings]] = {
    "evcharging.apps.ev_central.main": CentralSettings,
    "evcharging.apps.ev_cp_e.main": CPEngineSettings,
    "evcharging.apps.ev_cp_m.main": CPMonitorSettings,
    "evcharging.apps.ev_driver.main": DriverSettings,
    "evcharging.apps.ev_fleet.main": FleetSettings,
    "evcharging.apps.ev_ocpp.main": OcppSettings,
}
# SPEC §1: the seed flags each service must be started with.
SEED_FLAGS: dict[type[BaseSettings], set[str]] = {
    CentralSettings: {"--kafka-bootstrap", "--http-port", "--listen-port"},
    CPEngineSettings: {"--kafka-bootstrap", "--cp-id", "--health-port"},
    CPMonitorSettings: {
        "--cp-id",
        "--cp-e-host",
        "--cp-e-port",
        "--central-host",
        "--central-port",
    },
    DriverSettings: {"--driver-id", "--kafka-bootstrap", "--requests-file"},
    FleetSettings: {
        "--kafka-bootstrap",
        "--cps",
        "--id-prefix",
        "--http-port",
        "--central-host",
        "--central-port",
    },
    OcppSettings: {"--kafka-bootstrap", "--ws-port", "--central-host", "--central-port"},
}
# The ports a service listens on (the others in its settings are ports it connects to).
LISTEN_PORT_FIELDS: dict[type[BaseSettings], tuple[str, ...]] = {
    CentralSettings: ("http_port", "listen_port"),
    CPEngineSettings: ("health_port",),
    FleetSettings: ("http_port",),
    OcppSettings: ("ws_port", "http_port"),
}
# Variables a service may set that are not evcharging settings: Python's own.
ENV_EXCEPTIONS = frozenset({"PYTHONUNBUFFERED"})
EXPECTED_SERVICES = frozenset(
    {
        KAFKA,
        KAFKA_SETUP,
        POSTGRES,
        "central-1",
        "central-2",
        "cp-engine-1",
        "cp-engine-2",
        "cp-monitor-1",
        "cp-monitor-2",
        "cp-fleet",
        "ocpp-gateway",
        "ev-driver",
    }
)
DEPENDS_CONDITIONS = frozenset(
    {"service_started", "service_healthy", "service_completed_successfully"}
)
_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")
CENTRALS = ("central-1", "central-2")
"""The Centrals sharing the work (SPEC §9): each client of Central's API names both."""


# --- reading the files ------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "the compose file is not a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def _app_service_names() -> list[str]:
    """The services that run evcharging code (all but the broker and Prometheus/Grafana);
    [] if unreadable."""
    try:
        found = services()
    except (OSError, yaml.YAMLError, AssertionError, KeyError):
        return []
    return sorted(name for name in found
                  if name not in {KAFKA, KAFKA_SETUP, POSTGRES}
                  and name not in METRICS_SERVICES)


APP_SERVICES = _app_service_names()


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with the default: the file must work with no ``.env``."""

    def default(match: re.Match[str]) -> str:
        if match.group("default") is None:
            pytest.fail(f"${{{match.group('name')}}} in {text!r} has no default")
        return match.group("default")

    return _INTERPOLATION.sub(default, text)


def argv(service: str) -> list[str]:
    """The command, with Compose's ``${VAR:-default}`` at its default (no ``.env``)."""
    command = services()[service].get("command")
    assert command, f"{service} has no command"
    if isinstance(command, str):
        return shlex.split(interpolate(command))
    return [interpolate(str(a)) for a in command]


def module_of(service: str) -> str:
    args = argv(service)
    assert args[:2] == ["python", "-m"], f"{service}: expected `python -m <module>`: {args}"
    return args[2]


def settings_class(service: str) -> type[BaseSettings]:
    module = module_of(service)
    assert module in SETTINGS_BY_MODULE, f"{service} runs {module}, not an evcharging service"
    return SETTINGS_BY_MODULE[module]


def cli_args(service: str) -> list[str]:
    return argv(service)[3:]


def flag_values(service: str) -> dict[str, str | None]:
    """``--flag value`` / ``--flag=value`` / a boolean ``--flag`` of the command."""
    cls = settings_class(service)
    booleans = {
        f
        for name, info in cls.model_fields.items()
        if info.annotation is bool
        for f in (_flag(name), "--no-" + name.replace("_", "-"))
    }
    args = cli_args(service)
    values: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        token = args[i]
        assert token.startswith("--"), f"{service}: unexpected positional argument {token!r}"
        if "=" in token:
            name, value = token.split("=", 1)
            values[name] = value
        elif token in booleans:
            values[token] = None
        else:
            assert i + 1 < len(args), f"{service}: {token} has no value"
            values[token] = args[i + 1]
            i += 1
        i += 1
    return values


def environment(service: str) -> dict[str, str]:
    env = services()[service].get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _env_name(cls: type[BaseSettings], field: str) -> str:
    return (str(cls.model_config.get("env_prefix", "")) + field).upper()


def container_settings(
    service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> BaseSettings:
    """The settings the container would start with: its flags over its `environment:`."""
    cls = settings_class(service)
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    for name in list(os.environ):
        if name.upper().startswith(prefix):
            monkeypatch.delenv(name)
    for name, value in environment(service).items():
        monkeypatch.setenv(name, value)
    try:
        return load_settings(cls, cli_args(service), module_of(service), "")
    except SystemExit:
        pytest.fail(f"{service}: its command or environment is rejected (see stderr)")


def given_values(service: str) -> dict[str, str | bool]:
    """Field → the value the command or `environment:` gives it (text; bool for switches)."""
    cls = settings_class(service)
    fields = cls.model_fields
    by_variable = {_env_name(cls, name): name for name in fields}
    given: dict[str, str | bool] = {
        by_variable[variable]: value
        for variable, value in environment(service).items()
        if variable in by_variable
    }
    for flag, value in flag_values(service).items():
        name = flag.removeprefix("--").replace("-", "_")
        if value is not None:
            given[name] = value
        elif name in fields:
            given[name] = True
        else:  # --no-<switch>
            given[name.removeprefix("no_")] = False
    return given


def _as_text(value: object) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def depends_on(service: str) -> dict[str, str]:
    """Target → condition (the short list form means service_started)."""
    deps = services()[service].get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def host_ports(service: str) -> Iterator[tuple[str, str]]:
    """(host port, protocol) of every published port with a fixed host port."""
    for entry in services()[service].get("ports") or []:
        if isinstance(entry, dict):
            if entry.get("published"):
                yield interpolate(str(entry["published"])), entry.get("protocol", "tcp")
            continue
        spec, _, protocol = interpolate(str(entry)).partition("/")
        parts = spec.split(":")
        if len(parts) >= 2:
            yield parts[-2], protocol or "tcp"


def container_ports(service: str) -> set[int]:
    ports = set()
    for entry in services()[service].get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(interpolate(str(entry)).partition("/")[0].split(":")[-1]))
    return ports


def volumes(service: str) -> list[dict[str, Any]]:
    """Every volume of a service in the long form (type, source, target, read_only)."""
    found = []
    for entry in services()[service].get("volumes") or []:
        if isinstance(entry, dict):
            found.append(entry)
            continue
        source, target, *mode = str(entry).split(":")
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        found.append(
            {
                "type": kind,
                "source": source,
                "target": target,
                "read_only": "ro" in (mode[0].split(",") if mode else []),
            }
        )
    return found


def seconds(duration: str | int | float) -> float:
    """A compose duration (``20s``, ``1m30s``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def kafka_env() -> dict[str, str]:
    return {k: interpolate(v) for k, v in environment(KAFKA).items()}


def internal_listener() -> tuple[str, int]:
    """host and port the broker advertises to the other containers."""
    names = {KAFKA, services()[KAFKA].get("hostname", KAFKA)}
    for listener in kafka_env()["KAFKA_ADVERTISED_LISTENERS"].split(","):
        _, _, address = listener.partition("://")
        host, _, port = address.rpartition(":")
        if host in names:
            return host, int(port)
    pytest.fail("Kafka advertises no listener on its service name for the other containers")


# --- the compose file -------------------------------------------------------------------


def test_compose_file_parses_and_has_every_service() -> None:
    assert isinstance(services(), dict)
    missing = EXPECTED_SERVICES - services().keys()
    assert not missing, f"services missing from the compose file: {sorted(missing)}"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_command_runs_an_existing_module(service: str) -> None:
    module = module_of(service)
    assert importlib.util.find_spec(module) is not None, f"{service}: no module {module}"
    settings_class(service)


@pytest.mark.parametrize("service", APP_SERVICES)
def test_command_flags_are_real_and_include_the_seed_flags(service: str) -> None:
    cls = settings_class(service)
    known = {_flag(name) for name in cls.model_fields}
    known |= {
        "--no-" + name.replace("_", "-")
        for name, info in cls.model_fields.items()
        if info.annotation is bool
    }
    passed = set(flag_values(service))
    assert passed <= known, f"{service}: unknown flags {sorted(passed - known)}"
    assert SEED_FLAGS[cls] <= passed, f"{service}: seed flags missing: {SEED_FLAGS[cls] - passed}"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_command_and_environment_make_valid_settings(
    service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The container starts with valid settings of its service, holding every value its
    command and its `environment:` give (a flag beating the variable of the same field)."""
    cls = settings_class(service)
    settings = container_settings(service, monkeypatch, tmp_path)
    assert type(settings) is cls
    expected = given_values(service)
    assert expected, f"{service}: its command and environment set nothing"
    actual = {name: getattr(settings, name) for name in expected}
    shown = {
        name: value if isinstance(value, bool) else _as_text(value)
        for name, value in actual.items()
    }
    assert shown == expected, f"{service}: the settings differ from its command and environment"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_environment_variables_are_settings_of_the_service(service: str) -> None:
    cls = settings_class(service)
    known = {_env_name(cls, name) for name in cls.model_fields} | ENV_EXCEPTIONS
    unknown = set(environment(service)) - known
    assert not unknown, f"{service}: {sorted(unknown)} are not settings of {cls.__name__}"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_dotenv_is_optional_and_is_the_repository_one(service: str) -> None:
    entries = services()[service].get("env_file")
    assert entries, f"{service} does not read .env"
    for entry in entries if isinstance(entries, list) else [entries]:
        assert isinstance(entry, dict), f"{service}: use the long form, a missing .env fails"
        assert entry.get("required") is False, f"{service}: .env must be optional"
        assert (DOCKER_DIR / entry["path"]).resolve() == ROOT / ".env"


def test_no_two_services_publish_the_same_host_port() -> None:
    owners: dict[tuple[str, str], str] = {}
    for service in services():
        for port in host_ports(service):
            assert port not in owners, f"{service} and {owners[port]} both publish {port}"
            owners[port] = service


@pytest.mark.parametrize("service", APP_SERVICES)
def test_published_and_checked_ports_are_the_ones_the_service_listens_on(
    service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = container_settings(service, monkeypatch, tmp_path)
    listening = {getattr(settings, f) for f in LISTEN_PORT_FIELDS.get(type(settings), ())}
    published = container_ports(service)
    assert published <= listening, f"{service} publishes {published}, listens on {listening}"
    check = services()[service].get("healthcheck")
    if check and not check.get("disable"):
        test = check["test"]
        words = shlex.split(test) if isinstance(test, str) else [str(w) for w in test]
        if "-c" in words:  # a `python -c` check: it must at least compile
            compile(words[words.index("-c") + 1], f"{service} healthcheck", "exec")
        assert any(str(port) in " ".join(words) for port in listening), (
            f"{service}: the healthcheck does not ask any port the service listens on"
        )


@pytest.mark.parametrize("service", [s for s in APP_SERVICES if s.startswith("cp-monitor")])
def test_monitor_points_at_its_engine_and_at_central(
    service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monitor = container_settings(service, monkeypatch, tmp_path)
    assert isinstance(monitor, CPMonitorSettings)
    engine_service = monitor.cp_e_host
    assert engine_service in services(), f"{service}: no service {engine_service}"
    assert settings_class(engine_service) is CPEngineSettings, f"{engine_service} is no engine"
    engine = container_settings(engine_service, monkeypatch, tmp_path)
    assert isinstance(engine, CPEngineSettings)
    assert monitor.cp_id == engine.cp_id, f"{service} watches {engine.cp_id} as {monitor.cp_id}"
    assert monitor.cp_e_port == engine.health_port

    assert_points_at_every_central(service, monitor.central_host, monitor.central_port,
                                   monkeypatch, tmp_path)
    assert engine_service in depends_on(service)


def assert_points_at_every_central(
    service: str, hosts: str, port: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A client of Central's API (SPEC §9): its address list names every Central service,
    each on the port that Central listens on, and it waits for each to be healthy."""
    addresses = parse_centrals(hosts, port)
    assert [a.host for a in addresses] == list(CENTRALS), f"{service}: --central-host {hosts}"
    for address in addresses:
        assert address.host in services(), f"{service}: no service {address.host}"
        assert settings_class(address.host) is CentralSettings
        central = container_settings(address.host, monkeypatch, tmp_path)
        assert isinstance(central, CentralSettings)
        assert address.port == central.http_port, f"{service}: {address} is not its HTTP port"
        assert depends_on(service).get(address.host) == "service_healthy", service


def test_fleet_points_at_central_and_its_cps_are_new_ones(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The CP Fleet registers at Central's HTTP API and reports there (its monitoring), so
    it names Central's service and port and waits for Central to be healthy; its CP ids
    (CP-00001 …) are none of the engines'; the health URLs it registers name its host."""
    fleets = [s for s in APP_SERVICES if settings_class(s) is FleetSettings]
    assert fleets == ["cp-fleet"]
    (service,) = fleets
    fleet = container_settings(service, monkeypatch, tmp_path)
    assert isinstance(fleet, FleetSettings)
    assert fleet.cps == 100  # FLEET_CPS's default, from the command's ${FLEET_CPS:-100}
    assert "${FLEET_CPS:-" in services()[service]["command"]
    assert _env_name(FleetSettings, "cps") == "FLEET_CPS"
    assert_points_at_every_central(service, fleet.central_host, fleet.central_port,
                                   monkeypatch, tmp_path)
    assert services()[service].get("hostname") == service
    ids = {spec.cp_id for spec in fleet_plan(fleet.id_prefix, fleet.first, fleet.cps)}
    engines = set()
    for other in APP_SERVICES:
        engine = container_settings(other, monkeypatch, tmp_path)
        if isinstance(engine, CPEngineSettings):
            engines.add(engine.cp_id)
    assert engines and not ids & engines, f"the fleet and an engine share {ids & engines}"
    check = " ".join(services()[service]["healthcheck"]["test"])
    assert f"127.0.0.1:{fleet.http_port}/health" in check


@pytest.mark.parametrize("service", APP_SERVICES)
def test_a_service_listening_on_every_interface_gets_the_token_from_dotenv(
    service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Protected mode (SPEC §5): a service on 0.0.0.0 refuses to start without a token (or
    --allow-anonymous). In containers the token is EVCHARGING_API_TOKEN, which `make up`
    writes into .env and every container reads through env_file."""
    settings = container_settings(service, monkeypatch, tmp_path)
    hosts = {name: getattr(settings, name) for name in type(settings).model_fields
             if name.endswith("_host") and name not in {"central_host", "cp_e_host"}}
    if not any(host in {"0.0.0.0", "::", ""} for host in hosts.values()):
        return
    assert getattr(settings, "allow_anonymous", False) is False, f"{service}: protected mode off"
    # A fleet's port is its CPs': it takes the CP Engine's token (CP_ENGINE_API_TOKEN).
    token_class = CPEngineSettings if isinstance(settings, FleetSettings) else type(settings)
    token = token_class.model_fields.get("api_token")
    assert token is not None, f"{service} listens on {hosts} but takes no token"
    assert SHARED_TOKEN_ENV in str(token.validation_alias), (
        f"{service}: its token does not fall back to {SHARED_TOKEN_ENV}"
    )
    assert services()[service].get("env_file"), f"{service} does not read .env"
    up = re.search(r"^up:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert up and "evcharging.devtools.env_token .env" in up[1], "make up writes no token"


def test_ocpp_gateway_is_protected_by_passwords_and_keeps_its_state_on_a_volume(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The OCPP gateway (SPEC §8) listens on 0.0.0.0 in its container, so its protected
    mode wants a passwords file: ocpp-passwords.txt of the repository, mounted read-only
    (`make up` creates it, git and the image leave it out). Its state file is on a named
    volume (the code is read-only), it points at Central and waits for it, publishes its
    two ports on the host's loopback only, and its healthcheck asks its /health."""
    gateways = [s for s in APP_SERVICES if settings_class(s) is OcppSettings]
    assert gateways == ["ocpp-gateway"]
    (service,) = gateways
    gateway = container_settings(service, monkeypatch, tmp_path)
    assert isinstance(gateway, OcppSettings)
    assert gateway.host == "0.0.0.0" and gateway.http_host == "0.0.0.0"
    assert gateway.allow_anonymous is False
    assert gateway.passwords_file is not None
    mounts = [v for v in volumes(service)
              if PurePosixPath(v["target"]) == PurePosixPath(str(gateway.passwords_file))]
    assert len(mounts) == 1, f"{service}: nothing is mounted at {gateway.passwords_file}"
    (mount,) = mounts
    assert mount["type"] == "bind" and mount.get("read_only") is True
    assert mount.get("bind", {}).get("create_host_path") is False  # never a directory
    source = (DOCKER_DIR / mount["source"]).resolve()
    assert source.parent == ROOT
    up = re.search(r"^up:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert up and f"test -e {source.name} ||" in up[1] and f"> {source.name}" in up[1]
    assert source.name in (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert source.name in DOCKERIGNORE.read_text(encoding="utf-8").split()

    state = PurePosixPath(str(gateway.state_file))
    assert state.is_absolute()
    named = {PurePosixPath(v["target"]) for v in volumes(service) if v["type"] == "volume"}
    assert state.parent in named, f"{service}: {state} is not on a named volume"

    assert_points_at_every_central(service, gateway.central_host, gateway.central_port,
                                   monkeypatch, tmp_path)
    published = [interpolate(str(p)) for p in services()[service]["ports"]]
    assert published == [f"127.0.0.1:{gateway.ws_port}:{gateway.ws_port}",
                         f"127.0.0.1:{gateway.http_port}:{gateway.http_port}"]
    assert "${OCPP_WS_PORT:-9000}" in str(services()[service]["ports"][0])
    check = " ".join(services()[service]["healthcheck"]["test"])
    assert f"127.0.0.1:{gateway.http_port}/health" in check
    exposed = next(args for k, args in dockerfile_instructions() if k == "EXPOSE").split()
    assert {str(gateway.ws_port), str(gateway.http_port)} <= set(exposed)


def test_each_engine_has_its_own_cp_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    engines = [s for s in APP_SERVICES if settings_class(s) is CPEngineSettings]
    assert engines
    ids = []
    for service in engines:
        engine = container_settings(service, monkeypatch, tmp_path)
        assert isinstance(engine, CPEngineSettings)
        ids.append(engine.cp_id)
    assert len(ids) == len(set(ids)), f"two engines share a CP id: {ids}"


def test_depends_on_targets_exist_and_healthy_means_a_healthcheck() -> None:
    for service in services():
        for target, condition in depends_on(service).items():
            assert target in services(), f"{service} depends on a missing service {target}"
            assert condition in DEPENDS_CONDITIONS, f"{service}: bad condition {condition}"
            if condition == "service_healthy":
                check = services()[target].get("healthcheck")
                assert check and not check.get("disable"), (
                    f"{service} waits for {target} to be healthy, but it has no healthcheck"
                )


@pytest.mark.parametrize("service", APP_SERVICES)
def test_services_wait_for_a_healthy_kafka(service: str) -> None:
    assert depends_on(service).get(KAFKA) == "service_healthy"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_restart_and_stop_policies(service: str) -> None:
    spec = services()[service]
    is_driver = settings_class(service) is DriverSettings
    if is_driver:  # it goes through its file once and exits
        assert spec.get("restart") == "no"
    else:
        assert spec.get("restart") in {"unless-stopped", "on-failure", "always"}
    # SIGTERM is handled: give the service time to drain before SIGKILL.
    assert seconds(spec.get("stop_grace_period", "10s")) >= 10


def test_kafka_is_apache_kafka_4_in_kraft_mode_with_a_real_healthcheck() -> None:
    kafka = services()[KAFKA]
    assert re.fullmatch(r"apache/kafka:4\.\d+(\.\d+)?", kafka["image"]), kafka["image"]
    env = kafka_env()
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    assert env.get("CLUSTER_ID")
    for name, value in env.items():
        if name.endswith(("_REPLICATION_FACTOR", "_MIN_ISR")):
            assert value == "1", f"a single broker needs {name}=1"
    test = kafka["healthcheck"]["test"]
    words = " ".join(test if isinstance(test, list) else [test])
    assert re.search(r"kafka-(broker-api-versions|topics)\.sh", words), words
    # SPEC §11: it authenticates, as admin on the listener whose users need no setup.
    port = listener_port("INTERNAL")
    assert f"localhost:{port}" in words, "the healthcheck should ask the INTERNAL listener"
    assert "--command-config /tmp/admin.properties" in words
    assert "/tmp/admin.properties" in kafka_script()


@pytest.mark.parametrize("service", APP_SERVICES)
def test_kafka_bootstrap_is_the_internal_listener(service: str) -> None:
    bootstrap = flag_values(service).get("--kafka-bootstrap")
    if bootstrap is None:
        assert not issubclass(settings_class(service), ServiceSettings), (
            f"{service} uses Kafka but its command does not say where the broker is"
        )
        return
    host, port = internal_listener()
    for address in bootstrap.split(","):
        assert address == f"{host}:{port}", f"{service}: --kafka-bootstrap {bootstrap}"


def test_named_volumes_are_declared_and_central_keeps_its_database_on_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    declared = set(compose().get("volumes") or {})
    for service in services():
        for volume in volumes(service):
            if volume["type"] == "volume":
                assert volume["source"] in declared, f"{service}: {volume['source']} undeclared"
    centrals = [s for s in APP_SERVICES if settings_class(s) is CentralSettings]
    assert centrals
    for service in centrals:
        settings = container_settings(service, monkeypatch, tmp_path)
        assert isinstance(settings, CentralSettings)
        db = PurePosixPath(str(settings.db_path))
        assert db.is_absolute(), f"{service}: the database is not on a volume: {db}"
        targets = {PurePosixPath(v["target"]) for v in volumes(service) if v["type"] == "volume"}
        assert db.parent in targets, f"{service}: {db} is not on a named volume"


def test_the_centrals_use_the_postgres_service_once_it_is_healthy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SPEC §9: a `postgres` service (postgres:15, data on a volume, pg_isready) and two
    Centrals whose CENTRAL_DB_URL names it, started once it is healthy; the password comes
    from .env (`make up` writes it), the same one on both sides."""
    postgres = services()[POSTGRES]
    assert re.fullmatch(r"postgres:15(\.\d+)?", postgres["image"]), postgres["image"]
    test = postgres["healthcheck"]["test"]
    assert "pg_isready" in " ".join(test if isinstance(test, list) else [test])
    data = [v for v in volumes(POSTGRES) if v["target"] == "/var/lib/postgresql/data"]
    assert data and data[0]["type"] == "volume"
    env = environment(POSTGRES)
    assert env["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:?run make up}"
    centrals = [s for s in APP_SERVICES if settings_class(s) is CentralSettings]
    assert centrals == list(CENTRALS)
    for central in centrals:
        assert depends_on(central).get(POSTGRES) == "service_healthy"
        settings = container_settings(central, monkeypatch, tmp_path)
        assert isinstance(settings, CentralSettings)
        url = urlsplit(settings.database_url)
        assert url.scheme == "postgresql"
        assert url.hostname == POSTGRES and url.port == 5432
        assert url.username == env["POSTGRES_USER"] and url.path == f"/{env['POSTGRES_DB']}"
        assert url.password == "${POSTGRES_PASSWORD:-}"  # the same variable, from .env
    from evcharging.devtools.env_token import POSTGRES_VARIABLES

    assert POSTGRES_VARIABLES == ("POSTGRES_PASSWORD",)  # `make up` writes it


def test_two_centrals_share_the_work_each_with_its_id_peer_url_and_ports(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SPEC §9: central-1 and central-2 share one consumer group and one database; each has
    its own instance id (its host name), a peer URL the other can reach (its service name
    and HTTP port), its own host ports and its own volume, and the same topic partitions
    (from .env, not set per service)."""
    found = {}
    for service in CENTRALS:
        settings = container_settings(service, monkeypatch, tmp_path)
        assert isinstance(settings, CentralSettings)
        found[service] = settings
        assert settings.instance_id == service
        assert services()[service].get("hostname") == service
        assert settings.own_url == f"http://{service}:{settings.http_port}"
        assert settings.http_host == "0.0.0.0"  # the other Central reaches it
        assert {f"{settings.http_port}", f"{settings.listen_port}"} == {
            str(port) for port in container_ports(service)}
        assert "CENTRAL_TOPIC_PARTITIONS" not in environment(service)
    first, second = found.values()
    assert first.group_id == second.group_id
    assert first.database_url == second.database_url
    published = [port for service in CENTRALS for port, _ in host_ports(service)]
    assert len(published) == 4 and len(set(published)) == 4, published
    assert published[:2] == ["8000", "9999"]  # CENTRAL_HTTP_PORT, CENTRAL_LISTEN_PORT
    data = [{v["source"] for v in volumes(service) if v["type"] == "volume"}
            for service in CENTRALS]
    assert data[0] and data[1] and not data[0] & data[1], data
    clients = [s for s in APP_SERVICES
               if settings_class(s) in {CPMonitorSettings, FleetSettings, OcppSettings}]
    assert len(clients) == 4, clients
    for client in clients:
        settings = container_settings(client, monkeypatch, tmp_path)
        assert isinstance(settings, CPMonitorSettings | FleetSettings | OcppSettings)
        assert_points_at_every_central(client, settings.central_host, settings.central_port,
                                       monkeypatch, tmp_path)


def test_driver_requests_file_is_mounted_from_the_repository(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    drivers = [s for s in APP_SERVICES if settings_class(s) is DriverSettings]
    assert drivers
    for service in drivers:
        settings = container_settings(service, monkeypatch, tmp_path)
        assert isinstance(settings, DriverSettings)
        mounts = [
            v
            for v in volumes(service)
            if PurePosixPath(v["target"]) == PurePosixPath(str(settings.requests_file))
        ]
        assert mounts, f"{service}: nothing is mounted at {settings.requests_file}"
        (mount,) = mounts
        assert mount["type"] == "bind" and mount.get("read_only") is True
        source = (DOCKER_DIR / mount["source"]).resolve()
        assert source.is_file(), f"{service}: the requests file {source} does not exist"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_build_context_and_dockerfile(service: str) -> None:
    build = services()[service].get("build")
    assert isinstance(build, dict), f"{service}: build the one evcharging image"
    assert (DOCKER_DIR / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE


# --- the Dockerfile ---------------------------------------------------------------------


def test_dockerfile_base_user_workdir_env_and_cmd() -> None:
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [args for k, args in instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must not run as root"
    assert ("WORKDIR", "/app") in instructions
    env: dict[str, str] = {}
    for k, args in instructions:
        if k == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args) if "=" in pair)
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert "CMD" in keywords


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    found = []
    for keyword, args in dockerfile_instructions():
        if keyword in {"COPY", "ADD"}:
            words = shlex.split(args)
            if any(w.startswith("--from=") for w in words):
                continue
            words = [w for w in words if not w.startswith("--")]
            found.append((words[:-1], words[-1]))
    return found


def test_dockerfile_copy_sources_exist_and_are_not_ignored() -> None:
    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for sources, _ in _copies():
        for source in sources:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), f"COPY {source}: no such file in the build context"
            hits = [p for p in ignored if not p.startswith("!") and fnmatch.fnmatch(path, p)]
            assert not hits, f"COPY {source} is excluded by .dockerignore ({hits})"


def test_dockerfile_installs_requirements_before_copying_the_code() -> None:
    instructions = dockerfile_instructions()
    install = next(
        i
        for i, (k, args) in enumerate(instructions)
        if k == "RUN" and re.search(r"pip install .*-r requirements\.txt", args)
    )
    assert "--no-cache-dir" in instructions[install][1]
    copies = [i for i, (k, args) in enumerate(instructions) if k == "COPY"]
    requirements = next(i for i in copies if "requirements.txt" in instructions[i][1])
    code = next(i for i in copies if "evcharging" in instructions[i][1])
    assert requirements < install < code, "requirements first, in their own layer"


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    for entry in (".venv", ".cache", ".git", ".pytest_cache", "*.db", ".env"):
        assert entry in ignored, f".dockerignore should exclude {entry}"


# --- who may write to the bus (SPEC §11) ------------------------------------------------

KAFKA_PRINCIPALS: dict[type[BaseSettings], str] = {
    CentralSettings: "central",
    CPEngineSettings: "cp",
    FleetSettings: "cp",
    OcppSettings: "cp",
    DriverSettings: "driver",
}
"""The principal of each kind of Kafka service (SPEC §11's table)."""
KAFKA_SERVICES = [s for s in APP_SERVICES if issubclass(settings_class(s), ServiceSettings)]


def kafka_script() -> str:
    """The shell script the broker's container runs before the image's start script."""
    command = services()[KAFKA]["command"]
    assert isinstance(command, list) and command[:2] == ["bash", "-c"], command
    return str(command[2])


def listener_port(name: str) -> int:
    for listener in kafka_env()["KAFKA_LISTENERS"].split(","):
        listener_name, _, address = listener.partition("://")
        if listener_name == name:
            return int(address.rpartition(":")[2])
    pytest.fail(f"Kafka has no {name} listener")


def test_every_listener_authenticates_and_acls_decide() -> None:
    env = kafka_env()
    protocols = dict(pair.partition(":")[::2]
                     for pair in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    listeners = {item.partition("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    assert listeners == set(protocols)
    assert set(protocols.values()) == {"SASL_PLAINTEXT"}, "a listener lets anyone in"
    for name in listeners:
        mechanisms = env[f"KAFKA_LISTENER_NAME_{name}_SASL_ENABLED_MECHANISMS"].split(",")
        assert set(mechanisms) <= {"SCRAM-SHA-512", "PLAIN"}, (name, mechanisms)
    services_listener = internal_listener()
    assert services_listener == ("kafka", listener_port("CLIENT"))
    assert env["KAFKA_LISTENER_NAME_CLIENT_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"] == (
        "org.apache.kafka.metadata.authorizer.StandardAuthorizer")
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert env["KAFKA_SUPER_USERS"] == "User:broker;User:admin"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "INTERNAL"
    # The image makes every KAFKA_* variable a property and drops values holding "=": the
    # JAAS file is written by the container's command from variables named otherwise.
    jaas = env["KAFKA_OPTS"].removeprefix("-Djava.security.auth.login.config=")
    script = kafka_script()
    assert f"cat > {jaas} <<JAAS" in script
    for login in ("plain.PlainLoginModule", "scram.ScramLoginModule"):
        assert f"org.apache.kafka.common.security.{login} required" in script
    for user, variable in (("broker", "EV_BROKER_PASSWORD"), ("admin", "EV_ADMIN_PASSWORD")):
        assert f'user_{user}="$${{{variable}' in script
        assert environment(KAFKA)[variable] == "${KAFKA_" + user.upper() + "_PASSWORD:-}"
    assert script.rstrip().endswith("exec /etc/kafka/docker/run")
    assert not any(name.startswith("KAFKA_") and "PASSWORD" in name for name in env)


@pytest.mark.parametrize("service", KAFKA_SERVICES)
def test_each_service_is_its_principal_with_its_password_from_dotenv(
    service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cls = settings_class(service)
    principal = KAFKA_PRINCIPALS[cls]
    env = environment(service)
    prefix = str(cls.model_config.get("env_prefix", ""))
    assert env.get(f"{prefix}KAFKA_SECURITY_PROTOCOL") == "SASL_PLAINTEXT"
    assert env.get(f"{prefix}KAFKA_SASL_PASSWORD") == (
        "${KAFKA_" + principal.upper() + "_PASSWORD:-}")
    settings = container_settings(service, monkeypatch, tmp_path)
    assert getattr(settings, "kafka_sasl_username") == principal  # noqa: B009
    assert depends_on(service).get(KAFKA_SETUP) == "service_completed_successfully"


def test_kafka_setup_runs_the_script_after_the_broker_with_dotenv() -> None:
    setup = services()[KAFKA_SETUP]
    assert setup["image"] == services()[KAFKA]["image"]
    assert depends_on(KAFKA_SETUP) == {KAFKA: "service_healthy"}
    assert setup.get("restart") == "no"
    (mount,) = volumes(KAFKA_SETUP)
    assert (DOCKER_DIR / mount["source"]).resolve() == SETUP_SCRIPT
    assert mount.get("read_only") is True
    assert setup["entrypoint"] == ["bash", mount["target"]]
    (entry,) = setup["env_file"]
    assert (DOCKER_DIR / entry["path"]).resolve() == ROOT / ".env"
    assert environment(KAFKA_SETUP)["KAFKA_SETUP_BOOTSTRAP"] == (
        f"kafka:{listener_port('INTERNAL')}")


def _run_setup(tmp_path: Path, prefix: str) -> list[list[str]]:
    """docker/kafka/setup.sh with stand-ins for kafka-configs.sh and kafka-acls.sh that
    record their arguments (one JSON list per line)."""
    import json
    import subprocess

    record = tmp_path / "calls.jsonl"
    for tool in ("kafka-configs.sh", "kafka-acls.sh"):
        stub = tmp_path / tool
        stub.write_text(
            "#!/usr/bin/env python3\nimport json, sys\n"
            f"open({str(record)!r}, 'a').write(json.dumps([{tool!r}, *sys.argv[1:]]) + '\\n')\n",
            encoding="utf-8",
        )
        stub.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "KAFKA_BIN": str(tmp_path),
           "KAFKA_ADMIN_PASSWORD": "a", "KAFKA_CENTRAL_PASSWORD": "c",
           "KAFKA_CP_PASSWORD": "p", "KAFKA_DRIVER_PASSWORD": "d",
           "CENTRAL_TOPIC_PREFIX": prefix}
    result = subprocess.run(["bash", str(SETUP_SCRIPT)], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]


def _option_values(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == option]


@pytest.mark.parametrize("prefix", ["", "run1."])
def test_kafka_setup_grants_the_acls_of_the_devtool_broker(
    tmp_path: Path, prefix: str
) -> None:
    """One table of SPEC §11: what Compose's setup grants is what `start --sasl` grants."""
    from evcharging.devtools.kafka_broker.sasl import acl_entries

    calls = _run_setup(tmp_path, prefix)
    users = {(_option_values(c, "--entity-name")[0], _option_values(c, "--add-config")[0])
             for c in calls if c[0] == "kafka-configs.sh"}
    assert users == {("central", "SCRAM-SHA-512=[password=c]"),
                     ("cp", "SCRAM-SHA-512=[password=p]"),
                     ("driver", "SCRAM-SHA-512=[password=d]")}
    names = {"TOPIC": "--topic", "GROUP": "--group", "TRANSACTIONAL_ID": "--transactional-id"}
    granted = set()
    for call in calls:
        if call[0] != "kafka-acls.sh":
            continue
        assert "--add" in call and _option_values(call, "--bootstrap-server") == ["kafka:9094"]
        pattern = (_option_values(call, "--resource-pattern-type") or ["literal"])[0].upper()
        resources = [(kind, name) for kind, option in names.items()
                     for name in _option_values(call, option)]
        if "--cluster" in call:
            resources.append(("CLUSTER", "kafka-cluster"))
        for principal in _option_values(call, "--allow-principal"):
            for operation in _option_values(call, "--operation"):
                for kind, name in resources:
                    op = re.sub(r"(?<!^)([A-Z])", r"_\1", operation).upper()
                    granted.add((principal.removeprefix("User:"), kind, pattern, name, op))
    expected = {(e.principal, e.resource_type, e.pattern_type, e.name, e.operation)
                for e in acl_entries(prefix)}
    assert granted == expected


def test_make_up_writes_every_password_compose_reads() -> None:
    from evcharging.devtools.env_token import KAFKA_PASSWORDS

    text = COMPOSE_FILE.read_text(encoding="utf-8")
    read = set(re.findall(r"\$\{(KAFKA_\w+_PASSWORD)", text))
    script = SETUP_SCRIPT.read_text(encoding="utf-8")
    read |= set(re.findall(r"(KAFKA_\w+_PASSWORD)", script)) - {"KAFKA_${user^^}_PASSWORD"}
    read |= {f"KAFKA_{user.upper()}_PASSWORD" for user in ("central", "cp", "driver")}
    assert read == set(KAFKA_PASSWORDS)
    up = re.search(r"^up:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert up and "evcharging.devtools.env_token .env" in up[1]
