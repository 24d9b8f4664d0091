"""The gateway's memory on disk (``OCPP_STATE_FILE``): what a restart must not forget.

A charger goes on charging while the gateway is down and, when it is back, sends the stops
and meter values it queued. So that they settle the sessions they belong to, the gateway
keeps in one JSON file its CPs (state, reason, last session's end), their running sessions
and the transactions it remembers (the most recent :data:`KEPT` and every running one, so a
replayed StartTransaction still gets its first answer).

The file is written whole, atomically (a temporary file renamed over it), at most once a
:data:`SAVE_INTERVAL` after a change (less often when writing it takes long: its encoding
takes at most :data:`MAX_SAVE_SHARE` of the gateway's time) and once more at shutdown. Each
session's and CP's JSON is kept between writes and made again only when it changed
(:class:`SnapshotEncoder`): with thousands of chargers the file holds some ten thousand
transactions, and encoding them all anew every half second took most of the event loop.
A change the ledger cannot lose (a transaction's start or stop, a session's end, a
remote start sent to a charger) is written before the gateway answers it or sends the
CALL: the handler asks for a write (:meth:`StateStore.commit`) and awaits the one that
includes it, a group commit (:mod:`evcharging.apps.ev_ocpp.commit`): a write is due
:attr:`StateStore.commit_delay` (:data:`COMMIT_DELAY` to :data:`MAX_COMMIT_DELAY`) after
the oldest ask, and every change asked meanwhile shares it. The temporary file is
fsynced before the rename (about a millisecond for some megabytes, in the writer's
thread), so a written change survives a crash of the machine too. Any other change (a
meter value, a state) is written within an interval: a crash can lose it, and the
charger's next message (a queued stop, a status) finds the gateway as it was a moment
before. A file that
cannot be read is an error at start: the gateway refuses to start rather than forget
sessions silently.

After a restart every charger is offline until it connects again: running sessions stay
open (SPEC §8), idle CPs are DISCONNECTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from dataclasses import fields
from datetime import datetime
from itertools import compress, islice, repeat
from operator import attrgetter, is_, is_not
from pathlib import Path
from typing import Any

from loguru import logger

from evcharging.apps.ev_ocpp.commit import GroupCommit
from evcharging.apps.ev_ocpp.gateway import Connector, Gateway, PendingStart, Session
from evcharging.common.messages import SessionEnd
from evcharging.common.states import CPState

__all__ = ["COMMIT_DELAY", "KEPT", "MAX_COMMIT_DELAY", "MAX_COMMIT_SHARE", "MAX_SAVE_SHARE",
           "SAVE_INTERVAL", "SnapshotEncoder", "StateStore"]

KEPT = 10_000
"""Ended transactions the file keeps (the most recent ones)."""
SAVE_INTERVAL = 0.5
"""Seconds between two writes while things change."""
MAX_SAVE_SHARE = 0.05
"""The largest share of the event loop's time that encoding the file may take: after a
write that took `t` seconds to encode, the next waits ``max(SAVE_INTERVAL, t /
MAX_SAVE_SHARE)``."""
COMMIT_DELAY = 0.02
"""Seconds from the oldest ask for a durable write to the write (the changes asked
meanwhile share it): what a durable answer waits at least, besides the write itself."""
MAX_COMMIT_DELAY = 0.05
"""The longest that delay grows when encoding the file takes long (see
:data:`MAX_COMMIT_SHARE`)."""
MAX_COMMIT_SHARE = 0.25
"""While durable changes keep coming, the delay is ``encode time / MAX_COMMIT_SHARE``
(within :data:`COMMIT_DELAY`..:data:`MAX_COMMIT_DELAY`): encoding takes at most about this
share of the event loop."""
VERSION = 1

_SESSION_FIELDS = tuple(f.name for f in fields(Session))
_session_values = attrgetter(*_SESSION_FIELDS)
"""A session's fields as one tuple: what its JSON is made from."""


def _dumps(data: object) -> str:
    return json.dumps(data, separators=(",", ":"))


def _session_out(session: Session) -> dict[str, Any]:
    # Not dataclasses.asdict: it deep-copies every value, and the fields are plain values.
    data = {name: getattr(session, name) for name in _SESSION_FIELDS}
    data["started_at"] = session.started_at.isoformat()
    data["last_at"] = session.last_at.isoformat() if session.last_at else None
    data["ended"] = session.ended.model_dump(mode="json") if session.ended else None
    return data


def _end_in(data: dict[str, Any]) -> SessionEnd:
    # The file holds JSON (a result as its text): not the messages' strict Python mode,
    # which takes only a SessionResult and refused every ended session of the file.
    return SessionEnd.model_validate(data, strict=False)


def _session_in(data: dict[str, Any]) -> Session:
    data = dict(data)
    data["started_at"] = datetime.fromisoformat(data["started_at"])
    data["last_at"] = datetime.fromisoformat(data["last_at"]) if data["last_at"] else None
    data["ended"] = _end_in(data["ended"]) if data["ended"] else None
    return Session(**data)


def _kept(gateway: Gateway) -> list[tuple[tuple[str, str], Session | None]]:
    """The transactions the file keeps: the most recent :data:`KEPT` ended (or refused)
    ones, then every running one."""
    # In C (map, compress, islice), not a Python loop: the gateway remembers up to
    # 100,000 transactions and this runs at every write. A refused transaction (None)
    # counts as ended: its "end" is taken as True.
    transactions = gateway.transactions
    ended = list(islice(compress(reversed(transactions.items()), map(
        is_not, map(getattr, reversed(transactions.values()), repeat("ended"),
                    repeat(True)), repeat(None))), KEPT))
    ended.reverse()
    running = compress(transactions.items(), map(
        is_, map(getattr, transactions.values(), repeat("ended"), repeat(True)),
        repeat(None)))
    return [*ended, *running]


def _connector_out(c: Connector) -> dict[str, Any]:
    return {"charger_id": c.charger_id, "number": c.number, "state": c.state.value,
            "reason": c.reason,
            "last_end": c.last_end.model_dump(mode="json") if c.last_end else None,
            "session": [c.charger_id, c.session.transaction] if c.session else None,
            "pending": _pending_out(c.pending)}


def _pending_out(pending: PendingStart | None) -> list[object] | None:
    """A remote start sent and not yet started: after a restart the charger's start still
    becomes Central's session."""
    if pending is None:
        return None
    return [pending.session_id, pending.driver_id, pending.remote_start_id]


def _connector_values(c: Connector) -> tuple[object, ...]:
    return (c.charger_id, c.number, c.state, c.reason, c.last_end,
            c.session.transaction if c.session else None, _pending_out(c.pending))


def snapshot(gateway: Gateway) -> dict[str, Any]:
    """Everything the file keeps, as JSON-ready data."""
    return {
        "version": VERSION,
        "transactions": [
            [charger, tx, _session_out(s) if s is not None else None]
            for (charger, tx), s in _kept(gateway)
        ],
        "connectors": [_connector_out(c) for c in gateway.connectors.values()],
    }


_Cached = tuple[object, tuple[object, ...], str]
"""(the session or CP, the values its JSON was made from, its JSON)."""


class SnapshotEncoder:
    """``json.dumps(snapshot(gateway))``, compact, without encoding again what did not
    change: each transaction's and CP's JSON is kept with the values it was made from and
    reused while the same object still has the same values (the sessions' ends are frozen
    messages, compared by value). What the file no longer holds is forgotten once the
    kept JSON is twice what it holds."""

    def __init__(self) -> None:
        self._transactions: dict[tuple[str, str], _Cached] = {}
        self._connectors: dict[str, _Cached] = {}

    def encode(self, gateway: Gateway) -> str:
        cache = self._transactions
        kept = _kept(gateway)
        parts: list[str] = []
        for key, session in kept:
            values = _session_values(session) if session is not None else ()
            hit = cache.get(key)
            if hit is None or hit[0] is not session or hit[1] != values:
                hit = cache[key] = (session, values, _dumps(
                    [key[0], key[1], _session_out(session) if session is not None else None]))
            parts.append(hit[2])
        if len(cache) > 2 * len(kept):  # forget what the file no longer holds
            self._transactions = {key: cache[key] for key, _ in kept}
        conn_cache = self._connectors
        conn_parts: list[str] = []
        for cp_id, conn in gateway.connectors.items():
            conn_values = _connector_values(conn)
            found = conn_cache.get(cp_id)
            if found is None or found[0] is not conn or found[1] != conn_values:
                found = conn_cache[cp_id] = (conn, conn_values, _dumps(_connector_out(conn)))
            conn_parts.append(found[2])
        if len(conn_cache) > len(gateway.connectors):
            self._connectors = {cp_id: conn_cache[cp_id] for cp_id in gateway.connectors}
        return (f'{{"version":{VERSION},"transactions":[{",".join(parts)}],'
                f'"connectors":[{",".join(conn_parts)}]}}')


def restore(gateway: Gateway, data: dict[str, Any]) -> None:
    """Fill an empty gateway from a snapshot; every charger is offline."""
    if data.get("version") != VERSION:
        raise ValueError(f"unknown state file version {data.get('version')!r}")
    sessions: dict[tuple[str, str], Session] = {}
    for charger, tx, session_data in data["transactions"]:
        session = _session_in(session_data) if session_data is not None else None
        gateway.transactions[(str(charger), str(tx))] = session
        if session is not None:
            sessions[(str(charger), str(tx))] = session
    for item in data["connectors"]:
        conn = Connector(str(item["charger_id"]), int(item["number"]),
                         CPState(item["state"]), item["reason"])
        if item["last_end"] is not None:
            conn.last_end = _end_in(item["last_end"])
        if item["session"] is not None:
            conn.session = sessions.get((str(item["session"][0]), str(item["session"][1])))
        pending = item.get("pending")  # absent from a file of an older gateway
        if pending is not None and conn.session is None:
            conn.pending = PendingStart(str(pending[0]), str(pending[1]), int(pending[2]))
        if conn.session is not None:
            conn.session.offline = True
        elif conn.state is CPState.ACTIVATED:
            conn.state, conn.reason = CPState.DISCONNECTED, "gateway restarted"
        gateway.add(conn)


class StateStore:
    """Loads the gateway's memory at start and keeps the file up to date."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.encoder = SnapshotEncoder()
        self.encode_seconds = 0.0
        """How long the last write took to encode (the event loop's time)."""
        self.commits = GroupCommit()
        self.writes = 0
        """Writes completed (the gateway's ``/metrics`` may read it)."""
        self._file_lock = threading.Lock()
        """One write at a time: a write cancelled at shutdown goes on in its thread."""

    @property
    def commit_delay(self) -> float:
        """Seconds from the oldest ask for a durable write to the write."""
        return min(MAX_COMMIT_DELAY, max(COMMIT_DELAY, self.encode_seconds / MAX_COMMIT_SHARE))

    def load(self, gateway: Gateway) -> None:
        """Restore `gateway` from the file (none yet: nothing to restore). OSError or
        ValueError when the file exists and cannot be read."""
        if not self.path.exists():
            logger.info("no state file {} yet: the gateway starts empty", self.path)
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            restore(gateway, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"state file {self.path} cannot be read ({exc!r}); move it "
                             "away to start empty") from exc
        running = sum(1 for c in gateway.connectors.values() if c.session is not None)
        logger.info("state file {}: {} CP(s), {} running session(s), {} transaction(s)",
                    self.path, len(gateway.connectors), running, len(gateway.transactions))

    def _write(self, text: str) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        with self._file_lock:
            with temporary.open("w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)

    async def commit(self) -> None:
        """Return once a write of the file that includes every change made so far has
        completed (:meth:`keep_saved` writes it within :attr:`commit_delay`, shared with
        every change asked meanwhile)."""
        await self.commits.ask(asyncio.get_running_loop().time())

    async def save(self, gateway: Gateway) -> None:
        """Write the file now (the changes asked to be durable so far are then)."""
        covers = self.commits.begin()
        gateway.dirty = False
        try:
            began = time.perf_counter()
            text = self.encoder.encode(gateway)
            self.encode_seconds = time.perf_counter() - began
            await asyncio.to_thread(self._write, text)
        except BaseException:
            gateway.dirty = True
            self.commits.failed(asyncio.get_running_loop().time() + SAVE_INTERVAL
                                - self.commit_delay)
            raise
        self.writes += 1
        self.commits.written(covers)

    async def keep_saved(self, gateway: Gateway, interval: float = SAVE_INTERVAL) -> None:
        """Write the file :attr:`commit_delay` after an ask for a durable change
        (:meth:`commit`), and after other changes at most once per `interval`, less often
        when encoding it takes more than :data:`MAX_SAVE_SHARE` of the time (runs until
        cancelled); a failed write is logged and tried again an `interval` later (the
        durable changes wait for it)."""
        loop = asyncio.get_running_loop()
        commits = self.commits
        failing = False
        last = loop.time()
        while True:
            due = commits.due(self.commit_delay)
            if due is not None:  # a durable change waits: the asks meanwhile share it
                await asyncio.sleep(max(0.0, due - loop.time()))
            else:
                gap = max(interval, self.encode_seconds / MAX_SAVE_SHARE)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(commits.asked.wait(),
                                           max(0.0, last + gap - loop.time()))
                    continue  # asked: written when due
                if not gateway.dirty:
                    last = loop.time()
                    continue
            try:
                await self.save(gateway)
            except OSError as exc:
                if not failing:
                    failing = True
                    logger.error("could not write the state file {}: {} (logged once until "
                                 "it works again)", self.path, exc)
                last = loop.time()
                continue
            last = loop.time()
            if failing:
                failing = False
                logger.info("the state file {} is written again", self.path)
