"""The gateway's group commit (no broker, no charger): a durable change is answered only by a
write that began after it, many changes share one write, a failed write answers nobody; the
changes the ledger cannot lose mark the CALL being handled and wait for the broker; a
remote start in flight is in the state file."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from evcharging.apps.ev_ocpp.commit import GroupCommit
from evcharging.apps.ev_ocpp.gateway import HANDLING, Gateway, Handling, PendingStart
from evcharging.apps.ev_ocpp.store import (
    SnapshotEncoder,
    StateStore,
    restore,
    snapshot,
)
from evcharging.common.bus import BusError
from evcharging.common.messages import (
    CentralCommand,
    CommandPayload,
    CommandType,
    Message,
)
from evcharging.common.states import CPState

T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


class WaitRecorder:
    """A publisher that records whether each message waited for the broker."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bool]] = []
        self.fail = False

    async def publish(self, message: Message, *, wait: bool = True) -> None:
        if self.fail:
            raise BusError("simulated outage")
        self.sent.append((type(message).__name__, wait))


async def test_a_write_answers_the_asks_made_before_it_began_and_no_later_one() -> None:
    commits = GroupCommit()
    assert commits.due(0.02) is None and not commits.asked.is_set()
    first = commits.ask(10.0)
    second = commits.ask(10.015)  # shares the write: due from the oldest ask
    assert commits.due(0.02) == pytest.approx(10.02) and commits.asked.is_set()
    covers = commits.begin()
    assert commits.due(0.02) is None and not commits.asked.is_set()
    late = commits.ask(10.03)  # made while the write runs: not in it
    assert commits.due(0.02) == pytest.approx(10.05)
    commits.written(covers)
    assert first.done() and second.done() and not late.done()
    assert commits.waiting == 1
    commits.written(commits.begin())
    assert late.done() and commits.waiting == 0


async def test_a_failed_write_answers_nobody_and_the_next_one_does() -> None:
    commits = GroupCommit()
    change = commits.ask(1.0)
    commits.begin()
    commits.failed(2.0)
    assert not change.done() and commits.due(0.02) == pytest.approx(2.02)
    commits.written(commits.begin())
    assert change.done()


async def test_a_waiter_gone_meanwhile_is_dropped_and_nothing_waits_for_nothing() -> None:
    commits = GroupCommit()
    gone = commits.ask(1.0)
    kept = commits.ask(1.0)
    gone.cancel()  # its charger disconnected while it waited
    commits.written(commits.begin())
    assert kept.result() is None and commits.waiting == 0
    commits.failed(3.0)  # nothing waits: no write is due for a failure alone
    assert commits.due(0.02) is None


async def test_a_save_answers_the_asks_and_holds_their_changes(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    gw = Gateway(WaitRecorder())
    conn = gw.connector("CH", 1)
    await gw.change(conn, CPState.ACTIVATED, "available")
    await gw.start(conn, transaction="7", driver_id="alice", meter_start_wh=0.0, ts=T0,
                   own_session_id="own-7")
    asked = state.commits.ask(0.0)
    await state.save(gw)
    assert asked.done() and state.writes == 1 and not gw.dirty
    data = json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))
    assert data["transactions"][0][:2] == ["CH", "7"]


async def test_a_change_the_ledger_cannot_lose_marks_the_call_and_waits_for_the_broker(
) -> None:
    publisher = WaitRecorder()
    gw = Gateway(publisher)
    conn = gw.connector("CH", 1)
    handling = Handling()
    token = HANDLING.set(handling)
    try:
        await gw.change(conn, CPState.ACTIVATED, "available")  # a state: not durable
        assert not handling.durable
        session = await gw.start(conn, transaction="7", driver_id="alice",
                                 meter_start_wh=0.0, ts=T0, own_session_id="own-7")
        assert handling.durable
        await gw.stop(session, 5000.0, "EVDisconnected", T0)
    finally:
        HANDLING.reset(token)
    assert publisher.sent == [("CPStatus", False), ("CPStatus", True), ("CPStatus", True)]
    await gw.heartbeat(conn)  # outside a CALL: queued, not awaited
    assert publisher.sent[-1] == ("CPStatus", False)


async def test_a_broker_that_fails_does_not_hold_the_answer_for_ever() -> None:
    publisher = WaitRecorder()
    publisher.fail = True
    gw = Gateway(publisher)
    conn = gw.connector("CH", 1)
    token = HANDLING.set(Handling())
    try:
        await asyncio.wait_for(gw.start(conn, transaction="7", driver_id="alice",
                                        meter_start_wh=0.0, ts=T0, own_session_id="own-7"),
                               timeout=5)
    finally:
        HANDLING.reset(token)
    assert gw.stats.publish_failures == 1  # the heartbeats repeat it; the file holds it


async def test_a_remote_start_in_flight_is_kept_and_restored() -> None:
    gw = Gateway(WaitRecorder())
    conn = gw.connector("CH", 1)
    await gw.change(conn, CPState.ACTIVATED, "available")
    conn.pending = PendingStart("central-9", "alice", 1234)
    text = SnapshotEncoder().encode(gw)
    assert text == json.dumps(snapshot(gw), separators=(",", ":"))
    again = Gateway(WaitRecorder())
    restore(again, json.loads(text))
    assert again.connectors["CH.1"].pending == PendingStart("central-9", "alice", 1234)
    # The charger's start after the restart is Central's session, not one "(no request)".
    session = await again.start(again.connectors["CH.1"], transaction="3",
                                driver_id="alice", meter_start_wh=0.0, ts=T0,
                                own_session_id="own-3")
    assert session.session_id == "central-9"


async def test_an_encoder_sees_a_remote_start_come_and_go() -> None:
    gw = Gateway(WaitRecorder())
    conn = gw.connector("CH", 1)
    encoder = SnapshotEncoder()
    encoder.encode(gw)
    conn.pending = PendingStart("central-9", "alice", 1234)
    assert '"pending":["central-9","alice",1234]' in encoder.encode(gw)
    conn.pending = None
    assert '"pending":null' in encoder.encode(gw)


async def test_the_writer_answers_many_changes_with_one_append_soon(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    gw = Gateway(WaitRecorder())
    gw.durable = state.commit
    writer = asyncio.create_task(state.keep_saved(gw, interval=600.0))
    try:
        conns = [gw.connector(f"CH-{n}", 1) for n in range(20)]
        for n, conn in enumerate(conns):
            await gw.start(conn, transaction=str(n), driver_id="alice", meter_start_wh=0.0,
                           ts=T0, own_session_id=f"own-{n}")
        # Twenty chargers' answers wait together: one append, well before the interval.
        await asyncio.wait_for(asyncio.gather(*(gw.durable() for _ in conns)), timeout=5)
        assert (state.appends, state.writes) == (1, 0)
        lines = state.journal_path(0).read_text(encoding="utf-8").splitlines()
        assert sorted(line[:4] for line in lines) == ['["c"'] * 20 + ['["t"'] * 20
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    again = Gateway(WaitRecorder())
    StateStore(tmp_path / "state.json").load(again)  # no snapshot yet: the journal alone
    assert len(again.transactions) == 20
    assert all(c.session is not None and c.session.offline for c in again.connectors.values())


async def started(gw: Gateway, charger: str, tx: str) -> None:
    conn = gw.connector(charger, 1)
    await gw.change(conn, CPState.ACTIVATED, "available")
    await gw.start(conn, transaction=tx, driver_id="alice", meter_start_wh=0.0, ts=T0,
                   own_session_id=f"own-{tx}")


async def test_a_restart_reads_the_snapshot_then_the_journals_after_it(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    gw = Gateway(WaitRecorder())
    await started(gw, "CH-A", "1")
    await state.save(gw)  # the snapshot: CH-A's session running
    session = gw.connectors["CH-A.1"].session
    assert session is not None
    await gw.stop(session, 4000.0, "Local", T0)  # durable: journaled, not in the snapshot
    await started(gw, "CH-B", "2")
    await state.append(gw)
    assert state.writes == 1 and state.appends == 1
    again = Gateway(WaitRecorder())
    StateStore(tmp_path / "state.json").load(again)
    ended = again.transactions[("CH-A", "1")]
    assert ended is not None and ended.ended is not None and ended.ended.kwh == 4.0
    assert again.connectors["CH-A.1"].session is None
    assert again.connectors["CH-A.1"].last_end == ended.ended
    running = again.connectors["CH-B.1"].session
    assert running is not None and running.session_id == "own-2"


async def test_a_snapshot_removes_the_journals_it_holds(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    gw = Gateway(WaitRecorder())
    await started(gw, "CH-A", "1")
    await state.append(gw)
    assert state.journal_path(0).exists()
    await state.save(gw)
    assert not state.journal_path(0).exists()
    await started(gw, "CH-B", "2")
    await state.append(gw)
    assert state.journal_path(state.generation).exists()
    data = json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))
    assert data["journal"] == state.generation


async def test_a_journal_line_cut_short_was_never_answered_and_is_ignored(
    tmp_path: Path,
) -> None:
    state = StateStore(tmp_path / "state.json")
    gw = Gateway(WaitRecorder())
    await started(gw, "CH-A", "1")
    await state.append(gw)
    with state.journal_path(0).open("a", encoding="utf-8") as file:
        file.write('["t","CH-B","2",{"session_id":"own')  # killed while writing
    again = Gateway(WaitRecorder())
    restarted = StateStore(tmp_path / "state.json")
    restarted.load(again)
    assert list(again.transactions) == [("CH-A", "1")]
    assert restarted.generation == 1  # appends go to a journal of their own


async def test_a_bad_line_inside_a_journal_refuses_the_start(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    state.journal_path(0).write_text('["x"]\n["c"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="journal-0 line 1"):
        state.load(Gateway(WaitRecorder()))


class QueueLink:
    """The part of a charger's link the gateway hands commands to."""

    def __init__(self) -> None:
        self.queued: list[CentralCommand] = []

    def enqueue(self, cmd: CentralCommand) -> None:
        self.queued.append(cmd)


async def test_a_limit_that_came_before_the_remote_start_is_carried_out_at_the_start() -> None:
    gw = Gateway(WaitRecorder())
    conn = gw.connector("CH", 1)
    await gw.change(conn, CPState.ACTIVATED, "available")
    link = QueueLink()
    gw.links["CH"] = link  # type: ignore[assignment]  # a fake of the link's queue
    limit = CentralCommand(cp_id="CH.1", cmd=CommandType.SET_LIMIT,
                           payload=CommandPayload(session_id="central-9", kw=7.5))
    conn.pending = PendingStart("central-9", "alice", 1234, limit=limit)
    await gw.start(conn, transaction="3", driver_id="alice", meter_start_wh=0.0, ts=T0,
                   own_session_id="own-3")
    assert link.queued == [limit]
