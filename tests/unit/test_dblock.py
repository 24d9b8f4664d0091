"""One Central per SQLite file (SPEC §4): a second one refuses to start, naming the lock."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from evcharging.apps.ev_central import main as central_main
from evcharging.apps.ev_central.dblock import DatabaseInUse, DatabaseLock
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.common.config import CentralSettings
from tests.polling import poll


async def test_a_second_repository_on_the_same_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "central.db"
    async with SqliteRepository(db, exclusive=True):
        second = SqliteRepository(db, exclusive=True)
        with pytest.raises(DatabaseInUse, match=r"central\.db\.lock"):
            await second.open()
        assert not second.is_open
    async with SqliteRepository(db, exclusive=True) as again:  # let go at close
        assert again.is_open


async def test_readers_without_the_lock_still_open_the_file(tmp_path: Path) -> None:
    """Tools and tests read the database beside a running Central."""
    db = tmp_path / "central.db"
    async with SqliteRepository(db, exclusive=True), SqliteRepository(db) as reader:
        assert await reader.ping()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    db = tmp_path / "central.db"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; "
         "from evcharging.apps.ev_central.dblock import DatabaseLock; "
         "DatabaseLock(Path(sys.argv[1])).acquire(); print('held', flush=True); "
         "sys.stdin.read()", str(db)],  # holds the lock until killed
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock = DatabaseLock(db)
        with pytest.raises(DatabaseInUse, match=f"pid {holder.pid}"):
            lock.acquire()
    finally:
        holder.kill()
        holder.communicate(timeout=10)
    lock.acquire()
    lock.release()


async def test_a_second_central_on_the_same_file_exits_1_naming_the_lock(
    tmp_path: Path, logs: list[tuple[str, str]]
) -> None:
    settings = CentralSettings(_env_file=None, http_port=0, listen_port=0,
                               db_path=tmp_path / "central.db", api_token=None)
    lock = DatabaseLock(settings.db_path)
    lock.acquire()
    try:
        code = await asyncio.wait_for(central_main.run(settings, asyncio.Event()), 10)
    finally:
        lock.release()
    assert code == 1
    await poll(lambda: any(level == "CRITICAL" and "central.db.lock" in message
                           for level, message in logs), timeout=2, what="the refusal logged")
