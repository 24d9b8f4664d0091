"""ctl's settings (CtlSettings): a flag beats the variable, which beats .env, which beats
the default, as for every service. The CLI's commands are tested in test_tcp_server.py."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest

from evcharging.apps.ev_central import ctl
from evcharging.apps.ev_central.tcp_server import TcpControlServer
from evcharging.common.config import CtlSettings

VARIABLES = (
    "CENTRAL_CTL_HOST",
    "CENTRAL_CTL_TIMEOUT",
    "CENTRAL_LISTEN_PORT",
    "CENTRAL_API_TOKEN",
    "EVCHARGING_API_TOKEN",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # .env is read from the working directory
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def settings(*argv: str) -> CtlSettings:
    parser = ctl.build_parser()
    return ctl.load_settings(parser, parser.parse_args([*argv, "ping"]))


def dotenv(**values: str) -> None:
    Path(".env").write_text("".join(f"{name}={value}\n" for name, value in values.items()))


def token(s: CtlSettings) -> str | None:
    return s.token.get_secret_value() if s.token else None


def test_defaults() -> None:
    s = settings()
    assert (s.host, s.port, s.token, s.timeout) == ("localhost", 9999, None, 5.0)


@pytest.mark.parametrize(
    ("field", "flag", "variable", "values"),
    [
        ("host", "--host", "CENTRAL_CTL_HOST", ("h-dotenv", "h-env", "h-flag")),
        ("port", "--port", "CENTRAL_LISTEN_PORT", (7001, 7002, 7003)),
        ("token", "--token", "CENTRAL_API_TOKEN", ("t-dotenv", "t-env", "t-flag")),
        ("token", "--token", "EVCHARGING_API_TOKEN", ("t-dotenv", "t-env", "t-flag")),
        ("timeout", "--timeout", "CENTRAL_CTL_TIMEOUT", (1.5, 2.5, 3.5)),
    ],
)
def test_flag_beats_variable_beats_dotenv_beats_default(
    monkeypatch: pytest.MonkeyPatch,
    field: str,
    flag: str,
    variable: str,
    values: tuple[Any, Any, Any],
) -> None:
    def value(s: CtlSettings) -> Any:
        return token(s) if field == "token" else getattr(s, field)

    from_dotenv, from_env, from_flag = values
    assert value(settings()) == CtlSettings.model_fields[field].default
    dotenv(**{variable: str(from_dotenv)})
    assert value(settings()) == from_dotenv
    monkeypatch.setenv(variable, str(from_env))
    assert value(settings()) == from_env
    assert value(settings(flag, str(from_flag))) == from_flag
    # a global option may also follow the command
    parser = ctl.build_parser()
    args = parser.parse_args(["status", "CP-1", flag, str(from_flag)])
    assert value(ctl.load_settings(parser, args)) == from_flag


def test_central_token_beats_the_shared_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVCHARGING_API_TOKEN", "shared")
    assert token(settings()) == "shared"
    monkeypatch.setenv("CENTRAL_API_TOKEN", "")  # empty is unset
    assert token(settings()) == "shared"
    monkeypatch.setenv("CENTRAL_API_TOKEN", "central")
    assert token(settings()) == "central"


def test_a_variable_beats_dotenv_whichever_token_name_each_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dotenv(CENTRAL_API_TOKEN="from-dotenv")
    monkeypatch.setenv("EVCHARGING_API_TOKEN", "from-env")
    assert token(settings()) == "from-env"


def test_the_token_stays_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CENTRAL_API_TOKEN", "s3cret")
    assert "s3cret" not in repr(settings())


@pytest.mark.parametrize(
    ("argv", "variables", "named"),
    [
        (["--port", "0"], {}, "port (CENTRAL_LISTEN_PORT)"),
        ([], {"CENTRAL_LISTEN_PORT": "ninety"}, "port (CENTRAL_LISTEN_PORT)"),
        ([], {"CENTRAL_CTL_TIMEOUT": "-1"}, "timeout (CENTRAL_CTL_TIMEOUT)"),
    ],
)
def test_invalid_settings_are_usage_errors(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    variables: dict[str, str],
    named: str,
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        settings(*argv)
    assert info.value.code == ctl.EXIT_USAGE
    err = capsys.readouterr().err
    assert "usage:" in err and "invalid settings" in err and named in err


def test_help_lists_every_setting_with_its_variables() -> None:
    text = " ".join(ctl.build_parser().format_help().split())
    for flag in ("--host", "--port", "--token", "--timeout", "--json"):
        assert flag in text
    for variable in VARIABLES:
        assert variable in text
    assert "CENTRAL_API_TOKEN or EVCHARGING_API_TOKEN" in text


class NoCPs:
    """The least a control plane needs to answer PING."""

    def get(self, cp_id: str) -> NoReturn:
        raise AssertionError("not used")

    def all_cps(self) -> Sequence[Any]:
        return []

    async def stop_cp(self, cp_id: str, reason: str = "") -> NoReturn:
        raise AssertionError("not used")

    async def resume_cp(self, cp_id: str, reason: str = "") -> NoReturn:
        raise AssertionError("not used")


async def test_ctl_finds_central_and_its_token_through_dotenv() -> None:
    async with TcpControlServer(NoCPs(), "127.0.0.1", 0, "dotenv-token") as central:
        dotenv(CENTRAL_LISTEN_PORT=str(central.port), CENTRAL_API_TOKEN="dotenv-token")
        out, err = io.StringIO(), io.StringIO()
        code = await ctl.amain(["--host", "127.0.0.1", "ping"], stdout=out, stderr=err)
        assert (code, err.getvalue()) == (ctl.EXIT_OK, "")
        assert out.getvalue() == f"pong from Central at 127.0.0.1:{central.port} (0 CPs)\n"
        assert central.requests == 1 and central.errors == 0
