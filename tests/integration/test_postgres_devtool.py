"""The local PostgreSQL of ``evcharging.devtools.postgres`` (SPEC §9): the session fixture's
database answers real connections, and the command line starts, restarts idempotently,
stops and refuses bad input with a clear error."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from evcharging.devtools import postgres
from evcharging.devtools.postgres import LocalPostgres, PostgresError
from evcharging.devtools.process import free_port

pytestmark = pytest.mark.integration


async def test_the_session_database_answers_as_the_evcharging_user(postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url, timeout=30)
    try:
        row = await conn.fetchrow(
            "SELECT current_user AS who, current_database() AS db, "
            "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser")
        assert row["who"] == "evcharging"
        assert row["db"] == postgres_url.rsplit("/", 1)[1]
        assert row["db"].startswith("evcharging_test_")
        assert row["superuser"] is False
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY, cp text)")
        await conn.execute("INSERT INTO t VALUES (1, 'CP-1')")
        assert await conn.fetchval("SELECT cp FROM t WHERE id = 1") == "CP-1"
        # the network-wide jobs of SPEC §9 take advisory locks
        assert await conn.fetchval("SELECT pg_try_advisory_lock(16)") is True
    finally:
        await conn.close()


async def test_a_wrong_password_is_refused(postgres_server: LocalPostgres) -> None:
    url = postgres_server.url.replace(postgres_server.passwords.user, "wrong", 1)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(url, timeout=30)


async def test_create_database_gives_a_fresh_one_each_time(
    postgres_server: LocalPostgres,
) -> None:
    url = postgres_server.create_database("evcharging_devtool_fresh")
    conn = await asyncpg.connect(url, timeout=30)
    try:
        await conn.execute("CREATE TABLE t (id int)")
    finally:
        await conn.close()
    url = postgres_server.create_database("evcharging_devtool_fresh")  # dropped and made again
    conn = await asyncpg.connect(url, timeout=30)
    try:
        assert await conn.fetchval("SELECT to_regclass('t')") is None
    finally:
        await conn.close()
    postgres_server.drop_database("evcharging_devtool_fresh")
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(url, timeout=30)


@pytest.mark.parametrize("name", ["", "Upper", "1st", "a-b", "x; DROP DATABASE y", "a" * 64])
def test_a_bad_database_name_is_refused(postgres_server: LocalPostgres, name: str) -> None:
    with pytest.raises(PostgresError, match="bad database name"):
        postgres_server.create_database(name)


# --------------------------------------------------------------------------- command line


@pytest.fixture
def home() -> Iterator[Path]:
    """The CLI's state folder for one test (``$EVCHARGING_POSTGRES_HOME``), reachable by the
    user ``postgres`` when we are root; every server left in it is stopped at the end."""
    path = Path(tempfile.mkdtemp(prefix="evcharging-pg-cli-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for work in path.iterdir():
            postgres.stop_postgres(work, timeout=10)
        shutil.rmtree(path, ignore_errors=True)


def cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evcharging.devtools.postgres", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, postgres.HOME_ENV: str(home), **env},
    )


def url_in(out: str) -> str:
    found = re.search(r"^CENTRAL_DB_URL=(postgresql://\S+)$", out, re.MULTILINE)
    assert found, out
    return found.group(1)


async def rows(url: str) -> list[str]:
    conn = await asyncpg.connect(url, timeout=30)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (cp text)")
        return [r["cp"] for r in await conn.fetch("SELECT cp FROM kept ORDER BY cp")]
    finally:
        await conn.close()


async def add_row(url: str, cp: str) -> None:
    conn = await asyncpg.connect(url, timeout=30)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (cp text)")
        await conn.execute("INSERT INTO kept VALUES ($1)", cp)
    finally:
        await conn.close()


async def test_cli_start_restart_stop_keeps_the_data(home: Path) -> None:
    port = str(free_port())
    started = cli(home, "start", "--port", port)
    assert started.returncode == 0, started.stderr
    url = url_in(started.stdout)
    assert url.startswith("postgresql://evcharging:")
    assert url.endswith(f"@127.0.0.1:{port}/evcharging")
    await add_row(url, "CP-1")

    again = cli(home, "start", "--port", port)  # idempotent: the same server, the same URL
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout and url_in(again.stdout) == url
    pid = postgres.postgres_status(home / port).pid
    assert pid is not None and f"pid {pid}" in again.stdout and f"pid {pid}" in started.stdout

    status = cli(home, "status", "--port", port)
    assert status.returncode == 0 and url_in(status.stdout) == url
    refused = cli(home, "start", "--port", port, "--reset")  # not under a running server
    assert refused.returncode == 1 and "stop it first" in refused.stderr
    assert await rows(url) == ["CP-1"]
    only_url = cli(home, "url", "--port", port)
    assert only_url.returncode == 0 and only_url.stdout.strip() == url

    stopped = cli(home, "stop", "--port", port)
    assert stopped.returncode == 0 and "stopped PostgreSQL" in stopped.stdout
    assert not postgres.postgres_status(home / port).running
    with pytest.raises(OSError):
        await asyncpg.connect(url, timeout=30)
    status = cli(home, "status", "--port", port)
    assert status.returncode == 1 and "not running" in status.stdout
    gone = cli(home, "url", "--port", port)
    assert gone.returncode == 1 and "no PostgreSQL running" in gone.stderr
    nothing = cli(home, "stop", "--port", port)
    assert nothing.returncode == 0 and "nothing to stop" in nothing.stdout

    restarted = cli(home, "start", "--port", port)  # the cluster survives a stop
    assert restarted.returncode == 0, restarted.stderr
    assert url_in(restarted.stdout) == url
    assert await rows(url) == ["CP-1"]

    assert cli(home, "stop", "--port", port).returncode == 0
    reset = cli(home, "start", "--port", port, "--reset")  # a new cluster, new passwords
    assert reset.returncode == 0, reset.stderr
    assert url_in(reset.stdout) != url
    assert await rows(url_in(reset.stdout)) == []
    assert cli(home, "stop", "--port", port).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "--port", "99999"], "port 99999 is outside 0..65535"),
        (["start", "--port", "fifty"], "not a port number: 'fifty'"),
        (["status", "--port", "-1"], "port -1 is outside 0..65535"),
        (["start", "--timeout", "0"], "must be more than 0 seconds"),
        (["stop", "--timeout", "soon"], "not a number of seconds: 'soon'"),
        (["restart"], "invalid choice: 'restart'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_get_a_clear_error(home: Path, args: list[str], message: str) -> None:
    result = cli(home, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "usage:" in result.stderr


def test_a_port_in_use_is_refused(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = cli(home, "start", "--port", port)
    assert result.returncode == 1
    assert f"error: port {port} on 127.0.0.1 is already in use" in result.stderr


def test_missing_binaries_say_how_to_install_them(home: Path) -> None:
    result = cli(home, "start", "--port", str(free_port()),
                 **{postgres.BIN_ENV: str(home / "no-such-bin")})
    assert result.returncode == 1
    assert "initdb and postgres are not in" in result.stderr
    assert "scripts/ensure_postgres.sh" in result.stderr


def test_a_cluster_of_another_version_is_not_touched(home: Path) -> None:
    port = free_port()
    data = home / str(port) / "data"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("9\n")
    postgres.Passwords.new().save(home / str(port))
    result = cli(home, "start", "--port", str(port))
    assert result.returncode == 1
    assert "was made by PostgreSQL 9" in result.stderr and "--reset" in result.stderr
    assert (data / "PG_VERSION").read_text() == "9\n"


def test_a_folder_that_is_no_cluster_is_not_touched(home: Path) -> None:
    port = free_port()
    data = home / str(port) / "data"
    data.mkdir(parents=True)
    (data / "notes.txt").write_text("mine\n")
    result = cli(home, "start", "--port", str(port))
    assert result.returncode == 1
    assert "neither empty nor a cluster" in result.stderr
    assert (data / "notes.txt").read_text() == "mine\n"


def test_the_service_user_must_be_able_to_reach_the_folder(home: Path) -> None:
    closed = home / "closed"
    closed.mkdir(mode=0o700)
    other = postgres.RunAs("someone", uid=os.getuid() + 4242, gid=os.getgid() + 4242)
    assert postgres.unreachable_parent(closed / "pg" / "work", other) == closed
    closed.chmod(0o711)
    assert postgres.unreachable_parent(closed / "pg" / "work", other) is None
    assert stat.S_IMODE(closed.stat().st_mode) == 0o711


def test_the_cli_keeps_its_servers_in_the_checkouts_cache(monkeypatch: pytest.MonkeyPatch,
                                                          home: Path) -> None:
    checkout = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(home)  # not found through the working directory
    monkeypatch.delenv(postgres.HOME_ENV, raising=False)
    user = postgres.service_user()
    if user is None or postgres.unreachable_parent(checkout / ".cache", user) is None:
        assert postgres.run_dir(55432) == checkout / ".cache" / "postgres" / "55432"
    else:  # a checkout the server's user may not enter (a clone in `mktemp -d`)
        assert postgres.run_dir(55432).parent.name.startswith("evcharging-postgres-")
    monkeypatch.setenv(postgres.HOME_ENV, str(home))
    assert postgres.run_dir(55432) == home / "55432"


def test_a_checkout_the_server_user_cannot_enter_keeps_its_servers_in_tmp(
    monkeypatch: pytest.MonkeyPatch, home: Path
) -> None:
    from evcharging.devtools.postgres import config

    closed = home / "closed"
    (closed / "checkout").mkdir(parents=True)
    closed.chmod(0o700)
    other = postgres.RunAs("someone", uid=os.getuid() + 4242, gid=os.getgid() + 4242)
    monkeypatch.delenv(postgres.HOME_ENV, raising=False)
    monkeypatch.setattr(config, "repo_root", lambda: closed / "checkout")
    monkeypatch.setattr(config, "service_user", lambda: other)
    first = config.home_dir()
    assert first.parent == Path(tempfile.gettempdir())
    assert first.name.startswith("evcharging-postgres-")
    assert config.home_dir() == first  # the same checkout, the same folder
    closed.chmod(0o711)
    assert config.home_dir() == closed / "checkout" / ".cache" / "postgres"
