"""The gateway's state file encoder (no broker, no charger): the text it writes is exactly the
snapshot's JSON however the gateway changes between writes, while it reuses what did not
change; the transactions it keeps are the most recent ended ones and every running one."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

import pytest

from evcharging.apps.ev_ocpp import store
from evcharging.apps.ev_ocpp.gateway import Gateway, PendingStart, Session
from evcharging.apps.ev_ocpp.store import SnapshotEncoder, restore, snapshot
from evcharging.common.messages import SessionEnd
from evcharging.common.states import CPState, SessionResult
from tests.unit.fakes import RecordingPublisher

T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


def plain(gw: Gateway) -> str:
    return json.dumps(snapshot(gw), separators=(",", ":"))


async def busy_gateway() -> Gateway:
    """Three chargers: one session ended, one running, one refused transaction."""
    gw = Gateway(RecordingPublisher(), euro_rate=0.5)
    for number, charger in enumerate(("CH-A", "CH-B", "CH-C"), 1):
        conn = gw.connector(charger, 1)
        await gw.change(conn, CPState.ACTIVATED, "available")
        conn.pending = PendingStart(f"central-{number}", "alice")
        await gw.start(conn, transaction=str(number), driver_id="alice",
                       meter_start_wh=1000.0, ts=T0, own_session_id=f"own-{number}")
    ended = gw.connectors["CH-A.1"].session
    assert ended is not None
    await gw.stop(ended, 3000.0, "EVDisconnected", T0 + timedelta(minutes=10))
    gw.remember("CH-C", "99", None)
    return gw


async def test_the_encoded_file_is_the_snapshots_json_as_the_gateway_changes() -> None:
    gw = await busy_gateway()
    encoder = SnapshotEncoder()
    assert encoder.encode(gw) == plain(gw)
    assert encoder.encode(gw) == plain(gw)  # nothing changed: everything reused
    running = gw.connectors["CH-B.1"].session
    assert running is not None
    await gw.meter(running, 2500.0, 11000.0, T0 + timedelta(minutes=5))
    assert encoder.encode(gw) == plain(gw)  # a running session's meter
    await gw.stop(running, 2600.0, "Remote", T0 + timedelta(minutes=6))
    assert encoder.encode(gw) == plain(gw)  # it ended: the CP's last end and state too
    await gw.end(running, 2700.0, SessionResult.COMPLETED, "corrected")
    assert encoder.encode(gw) == plain(gw)  # its end corrected: a new frozen SessionEnd
    other = gw.connectors["CH-C.1"]
    await gw.change(other, CPState.FAULT, "ground fault")
    gw.connector("CH-D", 2)
    assert encoder.encode(gw) == plain(gw)  # a CP's state, and a new CP


async def test_a_session_replaced_by_an_equal_one_is_encoded_from_the_new_one() -> None:
    gw = await busy_gateway()
    encoder = SnapshotEncoder()
    encoder.encode(gw)
    key = ("CH-A", "1")
    old = gw.transactions[key]
    assert old is not None
    gw.transactions[key] = Session(**{**old.__dict__, "driver_id": "bob"})
    assert '"driver_id":"bob"' in encoder.encode(gw)
    assert encoder.encode(gw) == plain(gw)


async def test_the_encoded_file_restores_the_same_gateway() -> None:
    gw = await busy_gateway()
    again = Gateway(RecordingPublisher(), euro_rate=0.5)
    restore(again, json.loads(SnapshotEncoder().encode(gw)))
    assert sorted(again.transactions) == sorted(gw.transactions)  # ended first, then running
    running = again.connectors["CH-B.1"].session
    assert running is not None and running.session_id == "central-2" and running.offline
    assert again.connectors["CH-A.1"].last_end == gw.connectors["CH-A.1"].last_end


def test_the_file_keeps_the_most_recent_ended_transactions_and_every_running_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store, "KEPT", 3)
    gw = Gateway(RecordingPublisher())
    end = SessionEnd(session_id="s", result=SessionResult.COMPLETED, kwh=1.0, euros=0.3)
    expected_running = []
    for n in range(10):
        session = Session(f"s{n}", "alice", "CH.1", str(n), 0.0, T0)
        if n in (1, 6):
            expected_running.append((("CH", str(n)), session))  # running, old and new
        else:
            session.ended = end
        gw.remember("CH", str(n), session if n != 8 else None)
    kept = store._kept(gw)
    items = list(gw.transactions.items())
    assert kept == [items[7], items[8], items[9], *expected_running]


def test_a_sessions_json_is_its_fields_with_dates_and_end_as_text() -> None:
    end = SessionEnd(session_id="s", result=SessionResult.FAILED, kwh=1.5, euros=0.45)
    session = Session("s", "alice", "CH.1", "7", 10.0, T0, kw=7.0, kwh=1.5, euros=0.45,
                      last_wh=1510.0, last_at=T0 + timedelta(minutes=1), stop_cp=True,
                      offline=True, ended=end, seq_no=4)
    expected = asdict(session)  # what the file held before: every field, plain values
    expected.update(started_at=T0.isoformat(),
                    last_at=(T0 + timedelta(minutes=1)).isoformat(),
                    ended=end.model_dump(mode="json"))
    assert store._session_out(session) == expected


async def test_the_encoder_forgets_what_the_file_no_longer_holds() -> None:
    gw = await busy_gateway()
    encoder = SnapshotEncoder()
    encoder.encode(gw)
    for n in range(10):  # the gateway forgets its old transactions for new ones
        gw.transactions.popitem(last=False)
        gw.remember("CH-Z", f"new-{n}", None)
        assert encoder.encode(gw) == plain(gw)
    assert len(encoder._transactions) <= 2 * len(gw.transactions)
