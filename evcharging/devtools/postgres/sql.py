"""What the tool asks the server, over asyncpg as the superuser: does it answer, and
making the user and the database ``evcharging``."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import asyncpg

from evcharging.devtools.postgres.config import DATABASE, HOST, SUPERUSER, USER, Passwords
from evcharging.devtools.postgres.errors import PostgresError

_T = TypeVar("_T")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, factory()).result()


async def _superuser_session(
    port: int, password: str, timeout: float, work: Callable[[Any], Coroutine[Any, Any, _T]]
) -> _T:
    conn = await asyncpg.connect(
        host=HOST, port=port, user=SUPERUSER, password=password, database="postgres",
        timeout=timeout, command_timeout=timeout,
    )
    try:
        return await work(conn)
    finally:
        await conn.close()


def answers(port: int, password: str, timeout: float) -> str | None:
    """None when the server answers ``SELECT 1`` as the superuser, else why not."""
    async def select_one(conn: Any) -> int:
        value: int = await conn.fetchval("SELECT 1")
        return value

    try:
        run_coroutine(lambda: _superuser_session(port, password, timeout, select_one))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def ensure_user_and_database(port: int, passwords: Passwords, timeout: float) -> None:
    async def work(conn: Any) -> None:
        verb = "ALTER" if await conn.fetchval(
            "SELECT 1 FROM pg_roles WHERE rolname = $1", USER) else "CREATE"
        await conn.execute(
            f"{verb} ROLE {USER} LOGIN CREATEDB NOSUPERUSER PASSWORD {_literal(passwords.user)}"
        )
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await conn.execute(f"CREATE DATABASE {DATABASE} OWNER {USER}")

    superuser_sql(port, passwords, timeout, work)


def superuser_sql(port: int, passwords: Passwords, timeout: float,
         work: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    try:
        run_coroutine(lambda: _superuser_session(port, passwords.superuser, timeout, work))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise PostgresError(f"PostgreSQL on {HOST}:{port}: {type(exc).__name__}: {exc}") from exc
