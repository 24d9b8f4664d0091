"""The gateway's memory on disk (``OCPP_STATE_FILE``): what a restart must not forget.

A charger goes on charging while the gateway is down and, when it is back, sends the stops
and meter values it queued. So that they settle the sessions they belong to, the gateway
keeps in one JSON file its CPs (state, reason, last session's end), their running sessions
and the transactions it remembers (the most recent :data:`KEPT` and every running one, so a
replayed StartTransaction still gets its first answer).

The file is written whole, atomically (a temporary file renamed over it), at most once a
:data:`SAVE_INTERVAL` after a change and once more at shutdown. A change in the last
interval before a crash can be lost: the charger's next message (a queued stop, a status)
then finds the gateway as it was a moment before. A file that cannot be read is an error at
start: the gateway refuses to start rather than forget sessions silently.

After a restart every charger is offline until it connects again: running sessions stay
open (SPEC §8), idle CPs are DISCONNECTED.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from loguru import logger

from evcharging.apps.ev_ocpp.gateway import Connector, Gateway, Session
from evcharging.common.messages import SessionEnd
from evcharging.common.states import CPState

__all__ = ["KEPT", "SAVE_INTERVAL", "StateStore"]

KEPT = 10_000
"""Ended transactions the file keeps (the most recent ones)."""
SAVE_INTERVAL = 0.5
"""Seconds between two writes while things change."""
VERSION = 1


def _session_out(session: Session) -> dict[str, Any]:
    data = asdict(session)
    data["started_at"] = session.started_at.isoformat()
    data["last_at"] = session.last_at.isoformat() if session.last_at else None
    data["ended"] = session.ended.model_dump(mode="json") if session.ended else None
    return data


def _session_in(data: dict[str, Any]) -> Session:
    data = dict(data)
    data["started_at"] = datetime.fromisoformat(data["started_at"])
    data["last_at"] = datetime.fromisoformat(data["last_at"]) if data["last_at"] else None
    data["ended"] = SessionEnd.model_validate(data["ended"]) if data["ended"] else None
    return Session(**data)


def snapshot(gateway: Gateway) -> dict[str, Any]:
    """Everything the file keeps, as JSON-ready data."""
    items = list(gateway.transactions.items())
    ended = [(k, s) for k, s in items if s is None or s.ended is not None][-KEPT:]
    running = [(k, s) for k, s in items if s is not None and s.ended is None]
    return {
        "version": VERSION,
        "transactions": [
            [charger, tx, _session_out(s) if s is not None else None]
            for (charger, tx), s in [*ended, *running]
        ],
        "connectors": [
            {"charger_id": c.charger_id, "number": c.number, "state": c.state.value,
             "reason": c.reason,
             "last_end": c.last_end.model_dump(mode="json") if c.last_end else None,
             "session": [c.charger_id, c.session.transaction] if c.session else None}
            for c in gateway.connectors.values()
        ],
    }


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
            conn.last_end = SessionEnd.model_validate(item["last_end"])
        if item["session"] is not None:
            conn.session = sessions.get((str(item["session"][0]), str(item["session"][1])))
        if conn.session is not None:
            conn.session.offline = True
        elif conn.state is CPState.ACTIVATED:
            conn.state, conn.reason = CPState.DISCONNECTED, "gateway restarted"
        gateway.add(conn)


class StateStore:
    """Loads the gateway's memory at start and keeps the file up to date."""

    def __init__(self, path: Path) -> None:
        self.path = path

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
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.path)

    async def save(self, gateway: Gateway) -> None:
        gateway.dirty = False
        text = json.dumps(snapshot(gateway), separators=(",", ":"))
        await asyncio.to_thread(self._write, text)

    async def keep_saved(self, gateway: Gateway, interval: float = SAVE_INTERVAL) -> None:
        """Write the file after changes, at most once per `interval` (runs until
        cancelled); a failed write is logged and tried again."""
        failing = False
        while True:
            await asyncio.sleep(interval)
            if not gateway.dirty:
                continue
            try:
                await self.save(gateway)
            except OSError as exc:
                gateway.dirty = True
                if not failing:
                    failing = True
                    logger.error("could not write the state file {}: {} (logged once until "
                                 "it works again)", self.path, exc)
                continue
            if failing:
                failing = False
                logger.info("the state file {} is written again", self.path)
