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
remote start sent to a charger) is on disk before the gateway answers it or sends the
CALL. The whole file (some megabytes at 5,000 chargers, 10-20 ms to encode) is too big
to write for each, so such changes go to a journal, ``PATH.journal-N``: the handler asks
for a write (:meth:`StateStore.commit`) and awaits the one that includes it, a group
commit (:mod:`evcharging.apps.ev_ocpp.commit`): :data:`COMMIT_DELAY` after the oldest
ask the current JSON of every transaction and CP such changes touched meanwhile is
appended as one line each, in one write (and fsync) in a thread. A snapshot records the
journal generation that follows it and, once written, removes the older journals; at
start the file is read, then the journals from its generation on are replayed (a last
line cut short by a crash was never answered and is ignored). The snapshot's temporary
file and each append are fsynced (about a millisecond each here, in the writer's thread),
so a written change survives a crash of the machine too. Any other change (a meter
value, a state) is written with the next snapshot: a crash can lose it, and the
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
import glob
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
from evcharging.common.messages import CentralCommand, SessionEnd
from evcharging.common.states import CPState

__all__ = ["COMMIT_DELAY", "KEPT", "MAX_SAVE_SHARE", "SAVE_INTERVAL", "SnapshotEncoder",
           "StateStore"]

KEPT = 10_000
"""Ended transactions the file keeps (the most recent ones)."""
SAVE_INTERVAL = 0.5
"""Seconds between two writes while things change."""
MAX_SAVE_SHARE = 0.05
"""The largest share of the event loop's time that encoding the file may take: after a
write that took `t` seconds to encode, the next waits ``max(SAVE_INTERVAL, t /
MAX_SAVE_SHARE)``."""
COMMIT_DELAY = 0.02
"""Seconds from the oldest ask for a durable write to the journal append (the changes
asked meanwhile share it): what a durable answer waits at least, besides the write."""
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
    out: list[object] = [pending.session_id, pending.driver_id, pending.remote_start_id]
    if pending.limit is not None:  # Central's SET_LIMIT of it: carried out at its start
        out.append(pending.limit.model_dump(mode="json"))
    return out


def _connector_values(c: Connector) -> tuple[object, ...]:
    return (c.charger_id, c.number, c.state, c.reason, c.last_end,
            c.session.transaction if c.session else None, _pending_out(c.pending))


def snapshot(gateway: Gateway, journal: int = 0) -> dict[str, Any]:
    """Everything the file keeps, as JSON-ready data; `journal`: the generation of the
    journal that follows it."""
    return {
        "version": VERSION,
        "journal": journal,
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

    def encode(self, gateway: Gateway, journal: int = 0) -> str:
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
        return (f'{{"version":{VERSION},"journal":{journal:d},"transactions":[{",".join(parts)}],'
                f'"connectors":[{",".join(conn_parts)}]}}')


def journal_lines(gateway: Gateway, transactions: set[tuple[str, str]],
                  connectors: set[str]) -> str:
    """The journal's record of changes the ledger cannot lose: one line each of the
    current JSON of the `transactions` and then of the `connectors` (CPs) they touched."""
    lines: list[str] = []
    for key in transactions:
        if key in gateway.transactions:
            session = gateway.transactions[key]
            lines.append(_dumps(["t", key[0], key[1],
                                 _session_out(session) if session is not None else None]))
    for cp_id in connectors:
        conn = gateway.connectors.get(cp_id)
        if conn is not None:
            lines.append(_dumps(["c", _connector_out(conn)]))
    return "".join(line + "\n" for line in lines)


def replay(data: dict[str, Any], journal: str, name: str) -> dict[str, Any]:
    """`data` (a snapshot) with the records of `journal` applied in order: each is a
    transaction's or a CP's JSON, which replaces the one before. A last line cut short (the
    gateway died while writing it: never answered) is ignored; any other bad line is a
    ValueError naming `name`."""
    transactions = {(str(c), str(t)): [c, t, s] for c, t, s in data["transactions"]}
    connectors = {(str(c["charger_id"]), int(c["number"])): c for c in data["connectors"]}
    lines = journal.split("\n")
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            record = json.loads(line)
            if record[0] == "t":
                key = (str(record[1]), str(record[2]))
                transactions.pop(key, None)  # to the end: the most recent
                transactions[key] = [record[1], record[2], record[3]]
            elif record[0] == "c":
                item = record[1]
                connectors[(str(item["charger_id"]), int(item["number"]))] = item
            else:
                raise ValueError(f"unknown record {record[0]!r}")
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            if number == len(lines) and not journal.endswith("\n"):
                logger.warning("journal {}: its last record was cut short (never "
                               "answered): ignored", name)
                break
            raise ValueError(f"journal {name} line {number}: {exc!r}") from exc
    return {**data, "transactions": list(transactions.values()),
            "connectors": list(connectors.values())}


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
            limit = (CentralCommand.model_validate(pending[3], strict=False)
                     if len(pending) > 3 and pending[3] is not None else None)
            conn.pending = PendingStart(str(pending[0]), str(pending[1]), int(pending[2]),
                                        limit=limit)
        if conn.session is not None:
            conn.session.offline = True
        elif conn.state is CPState.ACTIVATED:
            conn.state, conn.reason = CPState.DISCONNECTED, "gateway restarted"
        gateway.add(conn)


def _sync_directory(directory: Path) -> None:
    """fsync `directory`: the names created, renamed or removed in it are then on disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateStore:
    """Loads the gateway's memory at start and keeps the file (and its journal) up to
    date."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.encoder = SnapshotEncoder()
        self.encode_seconds = 0.0
        """How long the last snapshot took to encode (the event loop's time)."""
        self.commits = GroupCommit()
        self.generation = 0
        """The journal appended to now (``PATH.journal-N``); a snapshot starts the next."""
        self.writes = 0
        """Snapshots written."""
        self.appends = 0
        """Journal records appended (group commits that had something to write)."""
        self._file_lock = threading.Lock()
        """One file operation at a time: one cancelled at shutdown goes on in its thread."""

    @property
    def commit_delay(self) -> float:
        """Seconds from the oldest ask for a durable write to the write."""
        return COMMIT_DELAY

    def journal_path(self, generation: int) -> Path:
        return self.path.with_name(f"{self.path.name}.journal-{generation}")

    def _journals(self) -> dict[int, Path]:
        """The journal files there are, by generation."""
        found: dict[int, Path] = {}
        prefix = self.path.name + ".journal-"
        for item in self.path.parent.glob(glob.escape(prefix) + "*"):
            number = item.name[len(prefix):]
            if number.isdigit():
                found[int(number)] = item
        return found

    def load(self, gateway: Gateway) -> None:
        """Restore `gateway` from the file and the journals that follow it (none yet:
        nothing to restore). OSError or ValueError when one exists and cannot be read."""
        journals = self._journals()
        if not self.path.exists() and not journals:
            logger.info("no state file {} yet: the gateway starts empty", self.path)
            return
        try:
            data: dict[str, Any] = (
                json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists()
                else {"version": VERSION, "journal": 0, "transactions": [], "connectors": []})
            first = int(data.get("journal", 0))
            replayed = 0
            for generation in sorted(g for g in journals if g >= first):
                journal = journals[generation]
                data = replay(data, journal.read_text(encoding="utf-8"), str(journal))
                replayed += 1
            restore(gateway, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"state file {self.path} cannot be read ({exc!r}); move it "
                             "away (and its journals) to start empty") from exc
        # Append to a journal of its own: one of the last run may end in a cut line.
        self.generation = max([first, *journals]) + 1
        running = sum(1 for c in gateway.connectors.values() if c.session is not None)
        logger.info("state file {} and {} journal(s): {} CP(s), {} running session(s), {} "
                    "transaction(s)", self.path, replayed, len(gateway.connectors), running,
                    len(gateway.transactions))

    def _write(self, text: str, generation: int) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        with self._file_lock:
            with temporary.open("w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
            _sync_directory(self.path.parent)  # the rename survives a crash: then unlink
            for older, journal in self._journals().items():  # the snapshot holds them
                if older < generation:
                    journal.unlink(missing_ok=True)

    def _append(self, text: str, generation: int) -> None:
        path = self.journal_path(generation)
        with self._file_lock:
            created = not path.exists()
            with path.open("a", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            if created:  # its name survives a crash too
                _sync_directory(path.parent)

    async def commit(self) -> None:
        """Return once the changes the ledger cannot lose made so far are on disk
        (:meth:`keep_saved` appends them to the journal within :attr:`commit_delay`, in one
        write with every change asked meanwhile)."""
        await self.commits.ask(asyncio.get_running_loop().time())

    def _take(self, gateway: Gateway) -> tuple[set[tuple[str, str]], set[str]]:
        taken = gateway.kept_transactions, gateway.kept_connectors
        gateway.kept_transactions, gateway.kept_connectors = set(), set()
        return taken

    @staticmethod
    def _give_back(gateway: Gateway, taken: tuple[set[tuple[str, str]], set[str]]) -> None:
        gateway.kept_transactions |= taken[0]
        gateway.kept_connectors |= taken[1]

    async def append(self, gateway: Gateway) -> None:
        """Append the changes the ledger cannot lose to the journal (and answer the asks
        made so far); OSError when it could not (they wait for the next write)."""
        covers = self.commits.begin()
        taken = self._take(gateway)
        try:
            text = journal_lines(gateway, *taken)
            if text:
                await asyncio.to_thread(self._append, text, self.generation)
        except BaseException:
            self._give_back(gateway, taken)
            self.commits.failed(asyncio.get_running_loop().time() + SAVE_INTERVAL
                                - self.commit_delay)
            raise
        if text:
            self.appends += 1
        self.commits.written(covers)

    async def save(self, gateway: Gateway) -> None:
        """Write the whole file now; the journals before it are then removed (and the
        asks made so far are answered)."""
        covers = self.commits.begin()
        taken = self._take(gateway)
        gateway.dirty = False
        self.generation += 1  # appends from now on follow this snapshot
        try:
            began = time.perf_counter()
            text = self.encoder.encode(gateway, self.generation)
            self.encode_seconds = time.perf_counter() - began
            await asyncio.to_thread(self._write, text, self.generation)
        except BaseException:
            gateway.dirty = True
            self._give_back(gateway, taken)
            self.commits.failed(asyncio.get_running_loop().time() + SAVE_INTERVAL
                                - self.commit_delay)
            raise
        self.writes += 1
        self.commits.written(covers)

    async def keep_saved(self, gateway: Gateway, interval: float = SAVE_INTERVAL) -> None:
        """Append to the journal :attr:`commit_delay` after an ask for a durable change
        (:meth:`commit`), and write the whole file after changes at most once per
        `interval`, less often when encoding it takes more than :data:`MAX_SAVE_SHARE` of
        the time (runs until cancelled); a failed write is logged and tried again an
        `interval` later (the durable changes wait for it)."""
        loop = asyncio.get_running_loop()
        commits = self.commits
        failing = False
        last = loop.time()
        while True:
            due = commits.due(self.commit_delay)
            if due is not None:  # a durable change waits: the asks meanwhile share it
                await asyncio.sleep(max(0.0, due - loop.time()))
                write = self.append
            else:
                gap = max(interval, self.encode_seconds / MAX_SAVE_SHARE)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(commits.asked.wait(),
                                           max(0.0, last + gap - loop.time()))
                    continue  # asked: written when due
                last = loop.time()
                if not gateway.dirty:
                    continue
                write = self.save
            try:
                await write(gateway)
            except OSError as exc:
                if not failing:
                    failing = True
                    logger.error("could not write the state file {}: {} (logged once until "
                                 "it works again)", self.path, exc)
                continue
            if failing:
                failing = False
                logger.info("the state file {} is written again", self.path)
