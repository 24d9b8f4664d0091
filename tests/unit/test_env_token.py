"""`make up` writes a random API token into .env when there is none (SPEC §5)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from evcharging.devtools.env_token import (
    KAFKA_PASSWORDS,
    VARIABLE,
    ensure_kafka_passwords,
    ensure_token,
    main,
)

ROOT = Path(__file__).resolve().parents[2]


def tokens(path: Path) -> list[str]:
    return [line.split("=", 1)[1] for line in path.read_text().splitlines()
            if line.startswith(f"{VARIABLE}=")]


def test_a_missing_env_is_made_from_the_example_with_a_token(tmp_path: Path) -> None:
    example = tmp_path / ".env.example"
    example.write_text("# CENTRAL_HTTP_PORT=8000\n")
    env = tmp_path / ".env"
    done = ensure_token(env, example)
    assert done is not None and "created" in done and VARIABLE in done
    assert env.read_text().startswith("# CENTRAL_HTTP_PORT=8000\n")
    [token] = tokens(env)
    assert len(token) >= 40
    assert stat.S_IMODE(env.stat().st_mode) == 0o600


def test_an_existing_token_is_kept_and_nothing_is_written(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(f"{VARIABLE}=mine\n")
    assert ensure_token(env, tmp_path / "none") is None
    assert tokens(env) == ["mine"]


def test_an_empty_or_commented_token_gets_a_new_one(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(f"# {VARIABLE}=\n{VARIABLE}=\nOTHER=1")
    ensure_token(env, tmp_path / "none")
    assert [t for t in tokens(env) if t] and env.read_text().count("OTHER=1\n") == 1
    first = tokens(env)[-1]
    ensure_token(env, tmp_path / "none")  # a second `make up` keeps it
    assert tokens(env)[-1] == first


def test_it_runs_with_the_plain_system_python(tmp_path: Path) -> None:
    """`make up` runs it before any virtualenv exists: standard library only."""
    env = tmp_path / ".env"
    result = subprocess.run(
        [sys.executable, "-S", "-m", "evcharging.devtools.env_token", str(env),
         str(ROOT / ".env.example")],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote a random {VARIABLE}" in result.stderr
    assert len(tokens(env)) == 1


def test_make_up_writes_the_token_before_compose_starts() -> None:
    lines = (ROOT / "Makefile").read_text().split("\nup:", 1)[1].split("\n\n", 1)[0]
    recipe = [line.strip() for line in lines.splitlines()[1:]]
    token = next(i for i, line in enumerate(recipe) if "evcharging.devtools.env_token" in line)
    compose = next(i for i, line in enumerate(recipe) if "docker compose" in line)
    assert token < compose
    assert "--env-file .env " in recipe[compose]


def passwords(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if line.startswith("KAFKA_") and "=" in line)


def test_the_kafka_passwords_are_written_once_and_kept(tmp_path: Path) -> None:
    """SPEC §11: `make up` gives every Kafka user of Compose a password in .env."""
    env = tmp_path / ".env"
    env.write_text("KAFKA_CP_PASSWORD=mine\nOTHER=1")
    done = ensure_kafka_passwords(env)
    assert done is not None and "KAFKA_CENTRAL_PASSWORD" in done and "KAFKA_CP_" not in done
    first = passwords(env)
    assert set(first) == set(KAFKA_PASSWORDS) and first["KAFKA_CP_PASSWORD"] == "mine"
    assert all(len(v) >= 24 for k, v in first.items() if k != "KAFKA_CP_PASSWORD")
    assert len(set(first.values())) == len(KAFKA_PASSWORDS)
    assert "OTHER=1\n" in env.read_text()
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert ensure_kafka_passwords(env) is None  # a second `make up` keeps them
    assert passwords(env) == first


def test_make_up_writes_the_postgres_password_once(tmp_path: Path) -> None:
    """SPEC §9: Compose's PostgreSQL and Central's CENTRAL_DB_URL read POSTGRES_PASSWORD."""
    env, example = tmp_path / ".env", tmp_path / ".env.example"
    example.write_text("# nothing\n")
    assert main([str(env), str(example)]) == 0
    written = [line for line in env.read_text().splitlines()
               if line.startswith("POSTGRES_PASSWORD=")]
    assert len(written) == 1 and len(written[0].split("=", 1)[1]) >= 24
    assert main([str(env), str(example)]) == 0
    assert [line for line in env.read_text().splitlines()
            if line.startswith("POSTGRES_PASSWORD=")] == written
