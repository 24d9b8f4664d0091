"""`make run DB=postgres` (SPEC §9): the launcher's choice of Central's database, the local
PostgreSQL's place in the start and stop order, Central's environment and the banner.

The servers here are fakes standing in for the devtool's (the real one is exercised by
tests/e2e/test_launcher.py); what is checked is the launcher's own logic.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from evcharging.launcher import cli
from evcharging.launcher.cli import options_from_args, run_command
from evcharging.launcher.console import Console, banner
from evcharging.launcher.database import LocalDatabase
from evcharging.launcher.plan import (
    DatabaseChoice,
    LaunchError,
    LaunchOptions,
    central_db_env,
    hide_password,
    resolve_database,
)
from evcharging.launcher.supervisor import Supervisor
from tests.unit.test_launcher import LAUNCHER_VARIABLES, SERVICE_PREFIXES, free_port, parse

URL = "postgresql://evcharging:s3cret@127.0.0.1:55432/evcharging"
SHOWN = "postgresql://evcharging:***@127.0.0.1:55432/evcharging"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No service variable and no .env: the launcher sees only what a test sets."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(SERVICE_PREFIXES) or name in LAUNCHER_VARIABLES | {"NO_COLOR"}:
            monkeypatch.delenv(name)
    return tmp_path


# --------------------------------------------------------------------------- the choice


def test_sqlite_is_the_default_and_postgres_starts_a_local_server() -> None:
    assert resolve_database(None, {}, {}) == DatabaseChoice("sqlite", None, "the default")
    local = resolve_database("postgres", {}, {})
    assert local.kind == "postgres" and local.url is None and local.start_local
    assert not resolve_database("sqlite", {}, {}).start_local


def test_a_postgresql_url_in_the_environment_or_dotenv_is_used_and_nothing_started() -> None:
    for environ, dotenv, where in (({"CENTRAL_DB_URL": URL}, {}, "environment"),
                                   ({}, {"CENTRAL_DB_URL": URL}, ".env")):
        for flag in (None, "postgres"):
            choice = resolve_database(flag, environ, dotenv)
            assert choice == DatabaseChoice("postgres", URL, f"CENTRAL_DB_URL in the {where}")
            assert not choice.start_local
    # The environment beats .env; a sqlite URL there is not a PostgreSQL to use.
    assert resolve_database(None, {"CENTRAL_DB_URL": "sqlite:///x.db"},
                            {"CENTRAL_DB_URL": URL}).kind == "sqlite"
    assert resolve_database("postgres", {"CENTRAL_DB_URL": "sqlite:///x.db"}, {}).start_local
    # --db sqlite wins over a PostgreSQL URL, which Central then must not see.
    forced = resolve_database("sqlite", {"CENTRAL_DB_URL": URL}, {})
    assert forced.kind == "sqlite"
    assert central_db_env(forced, None) == {"CENTRAL_DB_URL": ""}
    with pytest.raises(LaunchError, match="--db must be one of sqlite, postgres"):
        resolve_database("mysql", {}, {})


def test_central_gets_the_url_of_its_database() -> None:
    assert central_db_env(DatabaseChoice(), None) == {}
    assert central_db_env(DatabaseChoice("postgres", None, "--db postgres"), URL) == {
        "CENTRAL_DB_URL": URL}
    assert central_db_env(DatabaseChoice("postgres", URL, "env"), None) == {
        "CENTRAL_DB_URL": URL}
    with pytest.raises(LaunchError):
        central_db_env(DatabaseChoice("postgres", None, "--db postgres"), None)


def test_the_password_never_shows() -> None:
    assert hide_password(URL) == SHOWN
    assert hide_password("postgresql://u@h:1/d") == "postgresql://u@h:1/d"


def test_flags(clean_env: Path) -> None:
    options = options_from_args(parse(), {}, {})
    assert options.database.kind == "sqlite" and options.postgres_port is None
    options = options_from_args(parse("--db", "postgres", "--postgres-port", "0"), {}, {})
    assert options.database.start_local and options.postgres_port == 0
    options = options_from_args(parse("--db", "postgres"), {"CENTRAL_DB_URL": URL}, {})
    assert options.database.url == URL
    with pytest.raises(SystemExit):
        parse("--db", "oracle")


def test_help_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "--db {sqlite,postgres}" in out
    assert "--centrals 2 or more implies postgres" in out
    assert "--postgres-port PORT" in out


# --------------------------------------------------------------------------- banner, signal


def test_banner_shows_the_database_without_its_password() -> None:
    out = io.StringIO()
    banner(Console(out, colour=False), LaunchOptions(cps=1), "x:1",
           f"PostgreSQL {SHOWN} (started by the launcher)")
    text = out.getvalue()
    assert f"Database:  PostgreSQL {SHOWN} (started by the launcher)" in text
    assert "s3cret" not in text
    out = io.StringIO()
    banner(Console(out, colour=False), LaunchOptions(cps=1), "x:1")
    assert "Database:  ev_charging.db" in out.getvalue()


async def test_the_stop_message_names_postgresql_before_the_broker() -> None:
    out = io.StringIO()
    sup = Supervisor(LaunchOptions(cps=1, drivers=0), "x:1", Console(out, colour=False),
                     os.environ, "", True, own_database=True)
    sup.on_signal(signal.SIGINT)
    assert ("stopping CP monitors, CP engines and EV Central, then PostgreSQL and the Kafka "
            "broker") in out.getvalue()


# --------------------------------------------------------------------------- run_command


@dataclass
class Events:
    seen: list[str] = field(default_factory=list)
    central_env: dict[str, str] = field(default_factory=dict)
    db_note: str | None = None


class FakeServer:
    """What the launcher uses of a LocalPostgres."""

    pid = 4243
    log_file = Path("/fake/postgres.log")
    running = True
    url = URL
    start_seconds = 0.5

    def __init__(self, events: Events) -> None:
        self.events = events

    def stop(self) -> None:
        self.events.seen.append("stop postgres")


class FakeKafka:
    bootstrap = "127.0.0.1:1"
    log_file = Path("/fake/kafka.log")
    sasl = False


class FakeLocalBroker:
    broker = FakeKafka()

    def __init__(self, events: Events) -> None:
        self.events = events

    def stop(self, console: Console, *, hurry: bool = False) -> bool:
        self.events.seen.append("stop kafka")
        return False


def fake_run(monkeypatch: pytest.MonkeyPatch, events: Events, *, started: bool) -> None:
    """The broker, the PostgreSQL and the supervised children, recording their order."""

    def prepare_broker(*args: object, **kwargs: object) -> FakeLocalBroker:
        return FakeLocalBroker(events)

    def start_broker(console: Console, local: object) -> None:
        events.seen.append("start kafka")

    def prepare_database(options: LaunchOptions, taken: set[int]) -> LocalDatabase:
        server = FakeServer(events) if started else None
        return LocalDatabase(server, "" if started else URL, 55432, Path("/fake"),  # type: ignore[arg-type]
                             keep_data=True)

    def start_database(console: Console, local: LocalDatabase, timeout: float) -> None:
        events.seen.append("start postgres")
        local.url = URL

    async def supervise(supervisor: Supervisor) -> tuple[int, bool]:
        events.seen.append("central")
        events.central_env = dict(supervisor._env)
        events.db_note = supervisor.db_note
        return 0, False

    for name, fake in (("prepare_broker", prepare_broker), ("start_broker", start_broker),
                       ("prepare_database", prepare_database),
                       ("start_database", start_database), ("supervise", supervise)):
        monkeypatch.setattr(cli, name, fake)


def run_args(*extra: str) -> argparse.Namespace:
    return parse("--cps", "0", "--no-drivers", "--http-port", str(free_port()),
                 "--listen-port", str(free_port()), *extra)


def test_postgres_starts_after_the_broker_before_central_and_stops_in_reverse(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    events = Events()
    fake_run(monkeypatch, events, started=True)
    assert run_command(run_args("--db", "postgres")) == 0
    assert events.seen == ["start kafka", "start postgres", "central", "stop postgres",
                           "stop kafka"]
    assert events.central_env["CENTRAL_DB_URL"] == URL
    assert events.db_note == (f"PostgreSQL {SHOWN} (started by the launcher; log "
                              "/fake/postgres.log)")
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert out.index("PostgreSQL has stopped") < out.index("the Kafka broker has stopped")


def test_a_postgresql_already_running_on_the_port_is_used_and_left_running(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    events = Events()
    fake_run(monkeypatch, events, started=False)
    assert run_command(run_args("--db", "postgres")) == 0
    assert events.seen == ["start kafka", "start postgres", "central", "stop kafka"]
    assert events.central_env["CENTRAL_DB_URL"] == URL
    out = capsys.readouterr().out
    assert "was running before this run: left running" in out
    assert "PostgreSQL has stopped" not in out


def test_a_postgresql_url_of_the_environment_starts_nothing(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = Events()
    fake_run(monkeypatch, events, started=True)
    monkeypatch.setenv("CENTRAL_DB_URL", URL)
    assert run_command(run_args("--db", "postgres", "--kafka-bootstrap", "nowhere:1")) == 0
    assert events.seen == ["central"]
    assert events.central_env["CENTRAL_DB_URL"] == URL
    assert events.db_note == f"PostgreSQL {SHOWN} (from CENTRAL_DB_URL in the environment)"


def test_sqlite_is_unchanged(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = Events()
    fake_run(monkeypatch, events, started=True)
    assert run_command(run_args("--kafka-bootstrap", "nowhere:1")) == 0
    assert events.seen == ["central"]
    assert "CENTRAL_DB_URL" not in events.central_env
    assert events.db_note == "SQLite ev_charging.db"


# --------------------------------------------------------------------------- make run


ROOT = Path(__file__).resolve().parents[2]
STAMP = ".venv/.installed"
"""Taken as up to date: these makes must not install anything."""


def test_make_run_passes_db() -> None:
    """(`make run CENTRALS=2`: tests/unit/test_launcher_centrals.py.)"""
    dry = subprocess.run(["make", "-n", "-o", STAMP, "run", "DB=postgres"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=True)
    assert "-m evcharging run --cps 2" in dry.stdout and "--db postgres" in dry.stdout
