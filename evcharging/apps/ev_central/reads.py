"""What both repository adapters share (SPEC §7): the reads (the queries, their filters
and the rows' conversion to records), ping, probe and the async context manager, written
once.

An adapter mixes :class:`SqlReads` in and gives it :meth:`SqlReads._rows`, which runs one
query written with SQLite's ``?`` placeholders (the PostgreSQL adapter numbers them) on its
own connection, and :attr:`SqlReads._INSERTION_ORDER`, the column that breaks ties of equal
times in the order of insertion (SQLite's ``rowid``, PostgreSQL's ``seq``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, ClassVar, Self

from evcharging.apps.ev_central import sql
from evcharging.apps.ev_central.records import (
    SESSION_ACTIVE,
    CentralRecord,
    CPRecord,
    FaultEvent,
    HealthSnapshot,
    PendingRow,
    SessionRecord,
    clamp,
    ts_parse,
    ts_text,
)

__all__ = ["SqlReads"]

_FAULTS = "SELECT id, cp_id, event_type, reason, timestamp FROM fault_events"


class SqlReads:
    """The read methods of :class:`~evcharging.apps.ev_central.repository.Repository`,
    with ping, probe and ``async with`` (open, then close)."""

    _INSERTION_ORDER: ClassVar[str]
    """The column of the order of insertion (a literal: it is put into the SQL)."""

    _PING_ERRORS: ClassVar[tuple[type[BaseException], ...]]
    """What a failed ping raises (the adapter's StorageError among them)."""

    write_error: str | None

    async def _rows(self, query: str, *params: Any) -> Sequence[sql.Row]:
        """The rows of `query` (``?`` placeholders) with `params`."""
        raise NotImplementedError

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def probe(self, within: float) -> tuple[bool, bool]:
        """``(usable, busy)`` within `within` seconds: a ping that does not answer in
        time (it may queue behind a transaction in progress) finds the database *busy*,
        usable unless the last write failed."""
        try:
            async with asyncio.timeout(within):
                return await self.ping(), False
        except TimeoutError:
            return self.write_error is None, True

    async def ping(self) -> bool:
        """Whether the database is usable: it answers ``SELECT 1`` and the last write
        did not fail (SQLite in WAL mode: a reader is not stopped by another process's
        lock)."""
        if self.write_error is not None:
            return False
        try:
            rows = await self._rows("SELECT 1 AS one")
        except self._PING_ERRORS:
            return False
        return len(rows) == 1 and rows[0]["one"] == 1

    async def load_cps(self) -> list[CPRecord]:
        """Every registered CP, by cp_id."""
        return [sql.cp_from_row(row) for row in await self._rows(sql.SQL_LOAD_CPS)]

    async def get_session(self, session_id: str) -> SessionRecord | None:
        rows = await self._rows(f"{sql.SQL_SELECT_SESSIONS} WHERE session_id = ?", session_id)
        return sql.session_from_row(rows[0]) if rows else None

    async def active_sessions(self) -> list[SessionRecord]:
        """Every ACTIVE session, oldest first."""
        rows = await self._rows(
            f"{sql.SQL_SELECT_SESSIONS} WHERE status = ?"
            f" ORDER BY start_time, {self._INSERTION_ORDER}",
            SESSION_ACTIVE,
        )
        return [sql.session_from_row(row) for row in rows]

    async def recent_request_ids(self, within: timedelta) -> list[str]:
        """The ids of the requests decided within `within` of the newest one, oldest
        first (measured on the log's own dates, never on this process's clock)."""
        newest = await self._rows("SELECT MAX(timestamp) AS newest FROM request_log")
        if not newest or newest[0]["newest"] is None:
            return []
        since = ts_parse(str(newest[0]["newest"])) - within
        order = f"timestamp, {self._INSERTION_ORDER}"  # a literal column
        rows = await self._rows(
            f"SELECT request_id FROM request_log WHERE timestamp >= ? ORDER BY {order}",  # noqa: S608
            ts_text(since),
        )
        return [str(row["request_id"]) for row in rows]

    async def list_sessions(
        self,
        *,
        limit: int = 50,
        cp_id: str | None = None,
        driver_id: str | None = None,
        status: str | None = None,
    ) -> list[SessionRecord]:
        """Sessions newest first, optionally filtered; at most `limit` (1..1000)."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("cp_id", cp_id), ("driver_id", driver_id), ("status", status)):
            if value is not None:
                clauses.append(f"{column} = ?")  # column names are the literals above
                params.append(str(value))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        query = (f"{sql.SQL_SELECT_SESSIONS}{where}"
                 f" ORDER BY start_time DESC, {self._INSERTION_ORDER} DESC LIMIT ?")
        params.append(clamp(limit))
        return [sql.session_from_row(row) for row in await self._rows(query, *params)]

    async def list_faults(self, *, limit: int = 50, cp_id: str | None = None) -> list[FaultEvent]:
        """Fault events newest first; at most `limit` (1..1000)."""
        where = "" if cp_id is None else " WHERE cp_id = ?"
        query = f"{_FAULTS}{where} ORDER BY timestamp DESC, id DESC LIMIT ?"
        params = (clamp(limit),) if cp_id is None else (cp_id, clamp(limit))
        return [sql.fault_from_row(row) for row in await self._rows(query, *params)]

    async def cp_history(self, cp_id: str, *, limit: int = 50) -> list[HealthSnapshot]:
        """A CP's health snapshots newest first; at most `limit` (1..1000)."""
        rows = await self._rows(sql.SQL_CP_HISTORY, cp_id, clamp(limit))
        return [sql.health_from_row(row) for row in rows]

    async def load_flushes(self) -> dict[str, PendingRow]:
        """Each instance's last flush, by instance ('' for a Central from before §9)."""
        rows = await self._rows(sql.SQL_LOAD_PENDING)
        return {str(row["instance"]): PendingRow(str(row["instance"]), str(row["token"]),
                                                 str(row["offsets"]), str(row["messages"]))
                for row in rows}

    async def load_centrals(self) -> list[CentralRecord]:
        """The Centrals that share the work, as each last said (SPEC §9)."""
        return [CentralRecord(
            instance=str(row["instance"]), peer_url=str(row["peer_url"]),
            transactional_id=str(row["transactional_id"]),
            partitions=frozenset(int(p) for p in json.loads(str(row["partitions"]))),
            partition_count=int(row["partition_count"]),
            seen_at=ts_parse(str(row["seen_at"])),
        ) for row in await self._rows(sql.SQL_LOAD_CENTRALS)]

    async def load_site_limits(self) -> dict[str, float]:
        """Every site's power limit in kW (SPEC §10), by site."""
        rows = await self._rows(sql.SQL_LOAD_SITE_LIMITS)
        return {str(row["site"]): float(row["kw"]) for row in rows}
