"""Durable answers of the OCPP gateway: a CALL whose change the ledger cannot lose is
confirmed only once that change is on the bus and in the state file."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from evcharging.apps.ev_ocpp.gateway import Connector, Gateway, PendingStart, Session
from evcharging.apps.ev_ocpp.link import Refused, V16Link
from evcharging.apps.ev_ocpp.store import StateStore
from evcharging.common.messages import (
    CentralCommand,
    CommandPayload,
    CommandType,
    CPStatus,
    StatusEvent,
)
from evcharging.common.states import CPState
from tests.unit.fakes import RecordingPublisher


class FakeConnection:
    """What a charger's link sends, as the charger would read it."""

    def __init__(self) -> None:
        self.sent: list[list[Any]] = []

    async def send(self, text: str) -> None:
        self.sent.append(json.loads(text))


START = {"connectorId": 1, "idTag": "alice", "meterStart": 1000,
         "timestamp": "2026-12-07T09:00:00Z"}


async def test_a_start_while_the_bus_is_down_is_not_confirmed_and_its_retry_is() -> None:
    publisher = RecordingPublisher()
    gw = Gateway(publisher)
    connection = FakeConnection()
    link = V16Link("CH", connection, gw)
    gw.attach(link)
    conn = gw.connector("CH", 1)
    await gw.change(conn, CPState.ACTIVATED, "available")
    conn.pending = PendingStart("central-1", "alice", 7)
    publisher.fail = True
    await link.route_message(json.dumps([2, "m1", "StartTransaction", START]))
    assert connection.sent[-1][:3] == [4, "m1", "InternalError"]  # the charger retries it
    publisher.fail = False
    await link.route_message(json.dumps([2, "m2", "StartTransaction", START]))
    kind, unique_id, answer = connection.sent[-1]
    assert (kind, unique_id, answer["idTagInfo"]["status"]) == (3, "m2", "Accepted")
    session = conn.session
    assert session is not None and session.session_id == "central-1"
    assert answer["transactionId"] == int(session.transaction)
    started = [s for s in publisher.of(CPStatus) if s.event is StatusEvent.START_SUPPLY]
    assert [s.session_id for s in started] == ["central-1"]  # sent with the retry, once
    await link.route_message(json.dumps([2, "m3", "StartTransaction", START]))
    assert connection.sent[-1][:2] == [3, "m3"]
    assert len([s for s in publisher.of(CPStatus)
                if s.event is StatusEvent.START_SUPPLY]) == 1


async def test_new_journal_names_and_the_snapshots_rename_are_synced_before_unlinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    fsync, unlink = os.fsync, Path.unlink

    def recording_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append("sync directory")
        fsync(fd)

    def recording_unlink(path: Path, missing_ok: bool = False) -> None:
        events.append(f"unlink {path.name}")
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(Path, "unlink", recording_unlink)
    state = StateStore(tmp_path / "state.json")
    gw = Gateway(RecordingPublisher())
    conn = gw.connector("CH", 1)
    await gw.start(conn, transaction="1", driver_id="alice", meter_start_wh=0.0,
                   ts=datetime(2026, 12, 7, 9, 0, tzinfo=UTC), own_session_id="own-1")
    await state.append(gw)  # creates journal 0: its name is synced
    assert events == ["sync directory"]
    gw.keep(conn)
    await state.append(gw)  # the same journal: nothing new in the directory
    assert events == ["sync directory"]
    await state.save(gw)  # the rename is synced before journal 0 goes
    assert events[1:] == ["sync directory", "unlink state.json.journal-0"]


@asynccontextmanager
async def journaled(path: Path, **options: Any) -> AsyncIterator[Gateway]:
    """A gateway whose decisions its writer journals to `path` as they are made.

    Nothing is saved when it ends: what `path` holds then is what a SIGKILL leaves.
    """
    state = StateStore(path)
    gw = Gateway(RecordingPublisher(), **options)
    gw.durable = state.commit
    writer = asyncio.create_task(state.keep_saved(gw, interval=600.0))
    try:
        yield gw
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


async def test_a_remote_start_forgotten_when_its_charger_leaves_stays_forgotten(
    tmp_path: Path,
) -> None:
    async with journaled(tmp_path / "state.json") as gw:
        link = V16Link("CH", FakeConnection(), gw)
        gw.attach(link)
        conn = gw.connector("CH", 1)
        conn.pending = PendingStart("central-1", "alice", 7)
        gw.keep(conn)
        await asyncio.wait_for(gw.durable(), timeout=5)
        await asyncio.wait_for(gw.detach(link), timeout=5)
    again = Gateway(RecordingPublisher())  # SIGKILLed: what the journal holds
    StateStore(tmp_path / "state.json").load(again)
    assert again.connectors["CH.1"].pending is None


class RejectingLink(V16Link):
    """A charger that answers every remote start Rejected."""

    async def remote_start(self, conn: Connector, pending: PendingStart) -> None:
        raise Refused("RemoteStartTransaction Rejected")


async def test_a_rejected_remote_start_is_forgotten_on_disk_before_it_is_refused(
    tmp_path: Path,
) -> None:
    async with journaled(tmp_path / "state.json") as gw:
        link = RejectingLink("CH", FakeConnection(), gw)
        gw.attach(link)
        conn = gw.connector("CH", 1)
        await gw.change(conn, CPState.ACTIVATED, "available")
        start = CentralCommand(cp_id="CH.1", cmd=CommandType.START_SUPPLY,
                               payload=CommandPayload(session_id="central-1",
                                                      driver_id="alice"))
        with pytest.raises(Refused):
            await asyncio.wait_for(link.execute(conn, start), timeout=5)
    again = Gateway(RecordingPublisher())  # SIGKILLed as Central hears of the refusal
    StateStore(tmp_path / "state.json").load(again)
    assert again.connectors["CH.1"].pending is None


class StoppingLink(V16Link):
    """A charger that accepts a remote stop and schedules its unavailability."""

    async def remote_stop(self, session: Session) -> None:
        return None

    async def change_availability(self, conn: Connector, operative: bool) -> bool:
        return False


async def test_a_stop_cp_and_a_denial_are_in_the_journal(tmp_path: Path) -> None:
    t0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
    async with journaled(tmp_path / "state.json", decision_timeout=5.0) as gw:
        link = StoppingLink("CH", FakeConnection(), gw)
        gw.attach(link)
        stopped, denied = gw.connector("CH", 1), gw.connector("CH", 2)
        await gw.change(stopped, CPState.ACTIVATED, "available")
        stopped.pending = PendingStart("central-1", "alice", 7)
        await gw.start(stopped, transaction="1", driver_id="alice", meter_start_wh=0.0,
                       ts=t0, own_session_id="own-1")
        await gw.start(denied, transaction="2", driver_id="bob", meter_start_wh=0.0,
                       ts=t0, own_session_id="own-2")
        session = denied.session
        assert session is not None
        verdict = asyncio.create_task(gw.verdict(session))
        await asyncio.wait_for(gw.durable(), timeout=5)
        stop_cp = CentralCommand(cp_id="CH.1", cmd=CommandType.STOP_CP,
                                 payload=CommandPayload(reason="maintenance"))
        await asyncio.wait_for(link.execute(stopped, stop_cp), timeout=5)
        await gw.handle_command(CentralCommand(
            cp_id="CH.2", cmd=CommandType.STOP_SUPPLY,
            payload=CommandPayload(session_id="own-2")))
        assert await asyncio.wait_for(verdict, timeout=5) is False
    again = Gateway(RecordingPublisher())  # SIGKILLed before the charger's stops
    StateStore(tmp_path / "state.json").load(again)
    first, second = again.connectors["CH.1"].session, again.connectors["CH.2"].session
    assert first is not None and first.stop_cp
    assert second is not None and second.denied


async def test_a_pending_starts_limit_is_in_the_state_file(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    gw = Gateway(RecordingPublisher())
    conn = gw.connector("CH", 1)
    limit = CentralCommand(cp_id="CH.1", cmd=CommandType.SET_LIMIT,
                           payload=CommandPayload(session_id="central-9", kw=7.5))
    conn.pending = PendingStart("central-9", "alice", 1234, limit=limit)
    gw.keep(conn)
    await state.append(gw)  # the journal
    from_journal = Gateway(RecordingPublisher())
    StateStore(tmp_path / "state.json").load(from_journal)
    await state.save(gw)  # the snapshot
    from_snapshot = Gateway(RecordingPublisher())
    StateStore(tmp_path / "state.json").load(from_snapshot)
    for again in (from_journal, from_snapshot):
        pending = again.connectors["CH.1"].pending
        assert pending == PendingStart("central-9", "alice", 1234)
        assert pending is not None and pending.limit == limit
