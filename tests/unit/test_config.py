"""Settings: flag beats variable beats default; --help lists every flag."""

from __future__ import annotations

import pytest
from pydantic_settings import BaseSettings

from evcharging.common.config import (
    CentralSettings,
    CPEngineSettings,
    CPMonitorSettings,
    DriverSettings,
    build_parser,
    load_settings,
)

TOKEN_VARIABLES: dict[type[BaseSettings], str] = {
    CentralSettings: "CENTRAL_API_TOKEN",
    CPEngineSettings: "CP_ENGINE_API_TOKEN",
    CPMonitorSettings: "CP_MONITOR_API_TOKEN",
}
REQUIRED_FLAGS: dict[type[BaseSettings], list[str]] = {
    CentralSettings: [],
    CPEngineSettings: ["--cp-id", "CP-1"],
    CPMonitorSettings: ["--cp-id", "CP-1"],
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
