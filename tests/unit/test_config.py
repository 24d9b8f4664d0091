"""Settings: flag beats variable beats default; --help lists every flag."""

from __future__ import annotations

import pytest
from pydantic_settings import BaseSettings

from evcharging.common.config import (
    CentralSettings,
    CPEngineSettings,
    CPMonitorSettings,
    DriverSettings,
    FleetSettings,
    LoadSettings,
    OcppSettings,
    ServiceSettings,
    build_parser,
    load_settings,
)
from evcharging.common.kafka import KafkaSecurity

TOKEN_VARIABLES: dict[type[BaseSettings], str] = {
    CentralSettings: "CENTRAL_API_TOKEN",
    CPEngineSettings: "CP_ENGINE_API_TOKEN",
    CPMonitorSettings: "CP_MONITOR_API_TOKEN",
    OcppSettings: "OCPP_API_TOKEN",
}
REQUIRED_FLAGS: dict[type[BaseSettings], list[str]] = {
    CentralSettings: [],
    CPEngineSettings: ["--cp-id", "CP-1"],
    CPMonitorSettings: ["--cp-id", "CP-1"],
    OcppSettings: [],
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in ("CENTRAL_HTTP_PORT", "CP_ENGINE_CP_ID", "CP_ENGINE_KW_RATE", "DRIVER_DRIVER_ID",
                 *TOKEN_VARIABLES.values(), "EVCHARGING_API_TOKEN",
                 "CENTRAL_ALLOW_ANONYMOUS", "CP_ENGINE_ALLOW_ANONYMOUS"):
        monkeypatch.delenv(name, raising=False)


def test_seed_flags() -> None:
    central = load_settings(
        CentralSettings,
        ["--kafka-bootstrap", "localhost:9092", "--http-port", "8000", "--listen-port", "9999"],
        "c", "",
    )
    assert (central.http_port, central.listen_port, central.start_timeout) == (8000, 9999, 5.0)
    engine = load_settings(
        CPEngineSettings,
        ["--kafka-bootstrap", "localhost:9092", "--cp-id", "CP-001", "--health-port", "8001"],
        "e", "",
    )
    assert (engine.cp_id, engine.health_port, engine.kw_rate, engine.euro_rate) == (
        "CP-001", 8001, 22.0, 0.30,
    )
    monitor = load_settings(
        CPMonitorSettings,
        ["--cp-id", "CP-001", "--cp-e-host", "localhost", "--cp-e-port", "8001",
         "--central-host", "localhost", "--central-port", "8000"],
        "m", "",
    )
    assert (monitor.health_interval, monitor.health_timeout, monitor.failure_threshold) == (
        5.0, 2.0, 3,
    )
    driver = load_settings(
        DriverSettings,
        ["--driver-id", "driver-alice", "--kafka-bootstrap", "localhost:9092",
         "--requests-file", "requests.txt"],
        "d", "",
    )
    assert (driver.request_interval, driver.request_timeout) == (4.0, 60.0)


def test_flag_beats_variable_beats_dotenv_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(CentralSettings, [], "c", "").http_port == 8000
    with open(".env", "w") as env:
        env.write("CENTRAL_HTTP_PORT=8100\n")
    assert load_settings(CentralSettings, [], "c", "").http_port == 8100
    monkeypatch.setenv("CENTRAL_HTTP_PORT", "8200")
    assert load_settings(CentralSettings, [], "c", "").http_port == 8200
    assert load_settings(CentralSettings, ["--http-port", "8300"], "c", "").http_port == 8300


def test_token_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CENTRAL_API_TOKEN", "s3cret")
    settings = load_settings(CentralSettings, [], "c", "")
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    "argv",
    [
        ["--cp-id", "bad id"],
        ["--cp-id", "CP-1", "--health-port", "70000"],
        ["--cp-id", "CP-1", "--kw-rate", "-3"],
        ["--cp-id", "CP-1", "--telemetry-interval", "0"],
        [],
    ],
)
def test_invalid_settings_exit_with_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(CPEngineSettings, argv, "ev_cp_e", "")
    assert info.value.code == 2
    assert "invalid settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cls", [CentralSettings, CPEngineSettings, CPMonitorSettings, DriverSettings]
)
def test_help_lists_every_setting_with_its_variable(cls: type) -> None:
    text = build_parser(cls, "prog", "").format_help()
    prefix = cls.model_config["env_prefix"]
    for name in cls.model_fields:
        assert "--" + name.replace("_", "-") in text
        assert (prefix + name).upper() in text.replace("\n", "").replace(" ", "")


# ----------------------------------------------------------------------- safe defaults


def test_every_port_listens_on_loopback_by_default() -> None:
    central = load_settings(CentralSettings, [], "c", "")
    engine = load_settings(CPEngineSettings, ["--cp-id", "CP-1"], "e", "")
    assert (central.http_host, central.listen_host, engine.health_host) == (
        "127.0.0.1", "127.0.0.1", "127.0.0.1",
    )
    assert central.allow_anonymous is False and engine.allow_anonymous is False
    assert central.api_token is None and engine.api_token is None


@pytest.mark.parametrize("cls", [CentralSettings, CPEngineSettings])
def test_allow_anonymous_flag_and_variable(
    cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = REQUIRED_FLAGS[cls]
    assert load_settings(cls, [*base, "--allow-anonymous"], "p", "").allow_anonymous is True
    monkeypatch.setenv(f"{cls.model_config['env_prefix']}ALLOW_ANONYMOUS", "true")
    assert load_settings(cls, base, "p", "").allow_anonymous is True
    assert load_settings(cls, [*base, "--no-allow-anonymous"], "p", "").allow_anonymous is False


def token_of(cls: type[BaseSettings], argv: list[str] | None = None) -> str | None:
    settings = load_settings(cls, [*REQUIRED_FLAGS[cls], *(argv or [])], "p", "")
    token = getattr(settings, "api_token")  # noqa: B009 - not on BaseSettings itself
    return None if token is None else str(token.get_secret_value())


@pytest.mark.parametrize("cls", list(TOKEN_VARIABLES), ids=lambda cls: cls.__name__)
def test_evcharging_api_token_is_every_services_fallback(
    cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert token_of(cls) is None
    with open(".env", "w") as env:
        env.write("EVCHARGING_API_TOKEN=from-dotenv\n")
    assert token_of(cls) == "from-dotenv"
    monkeypatch.setenv("EVCHARGING_API_TOKEN", "shared")
    assert token_of(cls) == "shared"
    monkeypatch.setenv(TOKEN_VARIABLES[cls], "")  # empty means unset: the shared one holds
    assert token_of(cls) == "shared"
    monkeypatch.setenv(TOKEN_VARIABLES[cls], "own")
    assert token_of(cls) == "own"
    assert token_of(cls, ["--api-token", "flag"]) == "flag"
    assert "shared" not in repr(load_settings(cls, REQUIRED_FLAGS[cls], "p", ""))


@pytest.mark.parametrize("cls", list(TOKEN_VARIABLES), ids=lambda cls: cls.__name__)
def test_help_names_both_token_variables(cls: type[BaseSettings]) -> None:
    text = " ".join(build_parser(cls, "prog", "").format_help().split())
    assert f"{TOKEN_VARIABLES[cls]} or EVCHARGING_API_TOKEN" in text


# ------------------------------------------------------------ Kafka security (SPEC §11)

# settings class -> (its prefix, its principal, the flags it needs)
KAFKA_SERVICES: dict[type[ServiceSettings], tuple[str, str, list[str]]] = {
    CentralSettings: ("CENTRAL_", "central", []),
    CPEngineSettings: ("CP_ENGINE_", "cp", ["--cp-id", "CP-1"]),
    FleetSettings: ("FLEET_", "cp", []),
    DriverSettings: ("DRIVER_", "driver", ["--driver-id", "d-1"]),
    LoadSettings: ("LOAD_", "driver", []),
    OcppSettings: ("OCPP_", "cp", []),
}
KAFKA_VARIABLES = ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD",
                   "KAFKA_SSL_CAFILE")


@pytest.fixture
def no_kafka_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for prefix in ("", *(prefix for prefix, _, _ in KAFKA_SERVICES.values())):
        for name in KAFKA_VARIABLES:
            monkeypatch.delenv(prefix + name, raising=False)
    for principal in ("CENTRAL", "CP", "DRIVER"):
        monkeypatch.delenv(f"KAFKA_{principal}_PASSWORD", raising=False)


def security_of(cls: type[ServiceSettings], argv: list[str] | None = None) -> KafkaSecurity:
    settings = load_settings(cls, [*KAFKA_SERVICES[cls][2], *(argv or [])], "p", "")
    return KafkaSecurity.from_settings(settings)


@pytest.mark.usefixtures("no_kafka_env")
@pytest.mark.parametrize("cls", list(KAFKA_SERVICES), ids=lambda cls: cls.__name__)
def test_kafka_security_defaults_to_plaintext_as_the_services_principal(
    cls: type[ServiceSettings],
) -> None:
    security = security_of(cls)
    assert (security.protocol, security.username, security.password) == (
        "PLAINTEXT", KAFKA_SERVICES[cls][1], None)
    assert security.client_kwargs() == {}


@pytest.mark.usefixtures("no_kafka_env")
@pytest.mark.parametrize("cls", list(KAFKA_SERVICES), ids=lambda cls: cls.__name__)
def test_the_protocol_and_the_principals_password_are_all_start_sasl_leaves_to_set(
    cls: type[ServiceSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, principal, _ = KAFKA_SERVICES[cls]
    with open(".env", "w") as env:  # what `kafka_broker start --sasl` writes
        env.write("".join(f"KAFKA_{p.upper()}_PASSWORD=secret-of-{p}\n"
                          for p in ("central", "cp", "driver")))
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    security = security_of(cls)
    assert (security.protocol, security.username, security.password) == (
        "SASL_PLAINTEXT", principal, f"secret-of-{principal}")
    assert security.client_kwargs()["sasl_mechanism"] == "SCRAM-SHA-512"


@pytest.mark.usefixtures("no_kafka_env")
@pytest.mark.parametrize("cls", list(KAFKA_SERVICES), ids=lambda cls: cls.__name__)
def test_kafka_security_precedence_flag_own_variable_shared_variable_principal(
    cls: type[ServiceSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix, principal, _ = KAFKA_SERVICES[cls]
    monkeypatch.setenv(f"KAFKA_{principal.upper()}_PASSWORD", "principal")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    assert security_of(cls).password == "principal"
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "shared")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "someone")
    assert (security_of(cls).username, security_of(cls).password) == ("someone", "shared")
    monkeypatch.setenv(f"{prefix}KAFKA_SASL_PASSWORD", "own-secret")
    monkeypatch.setenv(f"{prefix}KAFKA_SASL_USERNAME", "me")
    monkeypatch.setenv(f"{prefix}KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    assert (security_of(cls).protocol, security_of(cls).username,
            security_of(cls).password) == ("SASL_PLAINTEXT", "me", "own-secret")
    flags = ["--kafka-security-protocol", "PLAINTEXT", "--kafka-sasl-username", "flag-user",
             "--kafka-sasl-password", "flag"]
    assert (security_of(cls, flags).protocol, security_of(cls, flags).username,
            security_of(cls, flags).password) == ("PLAINTEXT", "flag-user", "flag")
    settings = load_settings(cls, KAFKA_SERVICES[cls][2], "p", "")
    assert "own-secret" not in repr(settings) + repr(security_of(cls))


@pytest.mark.usefixtures("no_kafka_env")
@pytest.mark.parametrize("cls", list(KAFKA_SERVICES), ids=lambda cls: cls.__name__)
def test_sasl_without_a_password_is_a_clear_error(
    cls: type[ServiceSettings], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    with pytest.raises(SystemExit) as exit_info:
        security_of(cls)
    assert exit_info.value.code == 2
    assert "needs a SASL user and password" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        security_of(cls, ["--kafka-security-protocol", "TLS"])


@pytest.mark.parametrize("cls", list(KAFKA_SERVICES), ids=lambda cls: cls.__name__)
def test_help_names_the_kafka_security_variables(cls: type[ServiceSettings]) -> None:
    prefix, principal, _ = KAFKA_SERVICES[cls]
    text = " ".join(build_parser(cls, "prog", "").format_help().split())
    assert f"{prefix}KAFKA_SECURITY_PROTOCOL or KAFKA_SECURITY_PROTOCOL" in text
    assert (f"{prefix}KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD or "
            f"KAFKA_{principal.upper()}_PASSWORD") in text
    assert "--kafka-sasl-username" in text and "--kafka-ssl-cafile" in text
