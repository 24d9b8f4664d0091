"""Smart charging (SPEC §10): the pure plan, exhaustively and property-based, and the job
around it on a real Controller (in-memory SQLite, a recording publisher)."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from evcharging.apps.ev_central import writes
from evcharging.apps.ev_central.allocation import Policy
from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.energy import (
    ALLOCATION_LOCK,
    RESEND_EVERY,
    Charging,
    Energy,
    Plan,
    Sent,
    SetLimit,
    plan,
)
from evcharging.apps.ev_central.metrics import central_metrics
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.common.config import CentralSettings, load_settings, parse_site_limits
from evcharging.common.messages import (
    CarSpec,
    CentralCommand,
    CommandType,
    CPRegistration,
    CPState,
    CPStatus,
    CPTelemetry,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    SessionResult,
    StatusEvent,
    new_id,
)
from evcharging.common.metrics import ServiceMetrics
from tests.polling import poll
from tests.unit.conftest import FlushingController
from tests.unit.fakes import RecordingPublisher

NOW = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
EPS = 1e-6
"""kW: shares are rounded to the watt, a share within a µW of a watt to that watt."""


def cap(session: Charging, limits: Mapping[str, float]) -> float:
    cp_kw = session.cp_kw if session.cp_kw is not None else limits[session.site or ""]
    return cp_kw if session.car_kw is None else min(cp_kw, session.car_kw)


def drawn(result: Plan, sessions: list[Charging], limits: Mapping[str, float],
          site: str) -> float:
    """What a site's sessions can draw under the limits in force (each at most its cap)."""
    total = 0.0
    for s in sessions:
        if s.site == site:
            kw = result.sent[s.session_id].kw
            assert kw is not None
            total += min(kw, cap(s, limits))
    return total


def check_round(limits: Mapping[str, float], sessions: list[Charging],
                before: Mapping[str, Sent], result: Plan) -> None:
    """The invariants of one plan."""
    limited = [s for s in sessions if s.site in limits]
    unlimited = [s for s in sessions if s.site not in limits]
    # Every session at a limited site has a limit in force; nobody else does.
    assert set(result.sent) == {s.session_id for s in limited}
    for site, limit in limits.items():
        assert drawn(result, sessions, limits, site) <= limit + EPS
        assert result.allocated[site] <= limit + EPS
    # A SET_LIMIT only where the limit in force changed.
    by_session = {c.session_id: c for c in result.commands}
    assert len(by_session) == len(result.commands)
    for s in limited:
        old = before.get(s.session_id)
        new = result.sent[s.session_id]
        if s.session_id in by_session:
            assert by_session[s.session_id].kw == new.kw
            assert old is None or old.kw != new.kw
        else:
            assert old is not None and old.kw == new.kw
    # Sessions at sites without a limit: kw null only where a limit was in force.
    for s in unlimited:
        old = before.get(s.session_id)
        command = by_session.get(s.session_id)
        if old is not None and old.kw is not None:
            assert command == SetLimit(s.cp_id, s.session_id, None)
        else:
            assert command is None
    ended = set(before) - {s.session_id for s in sessions}
    assert not ended & set(by_session)


def session(sid: str, site: str | None = "A", cp_kw: float | None = 22.0,
            car_kw: float | None = None, kwh_left: float | None = None,
            departure: datetime | None = None) -> Charging:
    return Charging(sid, f"CP-{sid}", site, cp_kw, car_kw, kwh_left, departure)


# --- worked examples ------------------------------------------------------------------


def test_four_sessions_share_a_limit_and_nothing_is_resent() -> None:
    sessions = [session(f"s{i}") for i in range(4)]
    first = plan({"A": 66.0}, sessions, {})
    assert first.shares == {f"s{i}": 16.5 for i in range(4)}
    assert first.allocated == {"A": 66.0}
    assert [c.kw for c in first.commands] == [16.5] * 4
    again = plan({"A": 66.0}, sessions, first.sent)
    assert again.commands == () and again.sent == first.sent


def test_a_session_that_ends_drops_out_and_the_others_get_its_share() -> None:
    sessions = [session(f"s{i}") for i in range(4)]
    first = plan({"A": 66.0}, sessions, {})
    after = plan({"A": 66.0}, sessions[1:], first.sent)
    assert set(after.sent) == {"s1", "s2", "s3"}
    assert {c.session_id: c.kw for c in after.commands} == {"s1": 22.0, "s2": 22.0, "s3": 22.0}


def test_a_new_session_gets_its_share_and_the_others_give_way() -> None:
    sessions = [session(f"s{i}") for i in range(3)]
    first = plan({"A": 44.0}, sessions, {})
    joined = plan({"A": 44.0}, [*sessions, session("s3")], first.sent)
    assert {c.session_id: c.kw for c in joined.commands} == {f"s{i}": 11.0 for i in range(4)}


def test_removed_limit_sends_null_once_and_unlimited_sites_get_nothing() -> None:
    sessions = [session("a1"), session("a2"), session("b1", site="B")]
    first = plan({"A": 30.0}, sessions, {})
    assert {c.session_id for c in first.commands} == {"a1", "a2"}
    removed = plan({}, sessions, first.sent)
    assert set(removed.commands) == {SetLimit("CP-a1", "a1", None), SetLimit("CP-a2", "a2", None)}
    assert removed.sent == {}
    assert plan({}, sessions, removed.sent).commands == ()


def test_a_tapering_car_is_not_sent_a_lower_limit_it_cannot_use_anyway() -> None:
    sessions = [session("a", car_kw=10.0), session("b", car_kw=50.0)]
    first = plan({"A": 40.0}, sessions, {})
    assert first.shares == {"a": 10.0, "b": 22.0}
    tapered = [session("a", car_kw=9.5), session("b", car_kw=50.0)]
    second = plan({"A": 40.0}, tapered, first.sent)
    assert second.commands == ()  # a's limit of 10 kW holds it at 9.5 kW already
    assert second.sent["a"].kw == 10.0


def test_a_constrained_share_is_rounded_down_to_the_watt() -> None:
    sessions = [session(f"s{i}") for i in range(3)]
    result = plan({"A": 10.0}, sessions, {})
    assert {c.kw for c in result.commands} == {3.333}
    assert math.fsum(c.kw or 0.0 for c in result.commands) <= 10.0


def test_least_laxity_serves_the_earlier_departure_first() -> None:
    sessions = [
        session("late", kwh_left=20.0, departure=NOW + timedelta(hours=8)),
        session("soon", kwh_left=20.0, departure=NOW + timedelta(hours=1)),
    ]
    result = plan({"A": 30.0}, sessions, {}, policy=Policy.LEAST_LAXITY, now=NOW)
    assert result.shares == {"soon": 22.0, "late": 8.0}


def test_an_unknown_cp_rate_is_bounded_by_the_limit() -> None:
    result = plan({"A": 50.0}, [session("x", cp_kw=None)], {})
    assert result.shares == {"x": 50.0}


def test_an_unknown_cap_follows_a_lowered_limit() -> None:
    """A CP without a rate (an OCPP charger) and without a car has no known cap: its
    limit must follow the site's limit down (it was kept at the old, higher one)."""
    first = plan({"A": 50.0}, [session("x", cp_kw=None)], {})
    assert first.commands == (SetLimit("CP-x", "x", 50.0),)
    lowered = plan({"A": 30.0}, [session("x", cp_kw=None)], first.sent)
    assert lowered.commands == (SetLimit("CP-x", "x", 30.0),)
    assert lowered.sent["x"].kw == 30.0
    # A car whose acceptance is above the limit is no physical cap either.
    car = plan({"A": 50.0}, [session("y", cp_kw=None, car_kw=60.0)], {})
    assert plan({"A": 30.0}, [session("y", cp_kw=None, car_kw=60.0)],
                car.sent).commands == (SetLimit("CP-y", "y", 30.0),)
    # A car that takes less than the limit is: its higher limit holds it there.
    slow = plan({"A": 50.0}, [session("z", cp_kw=None, car_kw=10.0)], {})
    assert plan({"A": 30.0}, [session("z", cp_kw=None, car_kw=9.0)],
                slow.sent).commands == ()


def test_a_cp_that_moved_sessions_keep_their_limit_only_by_cp() -> None:
    first = plan({"A": 20.0}, [session("a")], {})
    moved = Charging("a", "CP-other", "A", 22.0)  # same session id, another CP: resend
    assert plan({"A": 20.0}, [moved], first.sent).commands == (SetLimit("CP-other", "a", 20.0),)


def test_a_session_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        plan({"A": 1.0}, [session("a"), session("a")], {})


def test_exhaustive_small_grids() -> None:
    """Every combination of up to three sessions from a small grid, under a few limits,
    starting from nothing and from every previous plan of the same grid."""
    kinds = [session("x", cp_kw=7.0), session("x", cp_kw=22.0, car_kw=5.0),
             session("x", cp_kw=22.0), session("x", site="B")]
    for limit in (0.0, 10.0, 30.0, 100.0):
        limits = {"A": limit}
        previous: list[dict[str, Sent]] = [{}]
        for n in range(4):
            for combo in itertools.product(kinds, repeat=n):
                sessions = [Charging(f"s{i}", f"CP-{i}", k.site, k.cp_kw, k.car_kw)
                            for i, k in enumerate(combo)]
                for before in previous[-8:]:
                    for policy in Policy:
                        result = plan(limits, sessions, before, policy=policy, now=NOW)
                        check_round(limits, sessions, before, result)
                        assert plan(limits, sessions, result.sent, policy=policy,
                                    now=NOW).commands == ()
                        previous.append(result.sent)


# --- property: rounds of starts, ends, tapering cars and changing limits ---------------

kws = st.floats(0.0, 350.0)


@st.composite
def rounds(draw: st.DrawFn) -> list[tuple[dict[str, float], list[Charging]]]:
    sites = ["A", "B", "C"]
    pool = [
        Charging(f"s{i}", f"CP-{i}", draw(st.sampled_from([*sites, None])),
                 draw(st.none() | kws), draw(st.none() | kws),
                 draw(st.none() | st.floats(0.0, 80.0)),
                 draw(st.none() | st.integers(-60, 600).map(
                     lambda m: NOW + timedelta(minutes=m))))
        for i in range(draw(st.integers(0, 8)))
    ]
    out = []
    for _ in range(draw(st.integers(1, 6))):
        limits = {s: draw(st.floats(0.0, 500.0)) for s in sites if draw(st.booleans())}
        present = [c for c in pool if draw(st.booleans())]
        # A car's acceptance only falls while it charges.
        present = [Charging(c.session_id, c.cp_id, c.site, c.cp_kw,
                            None if c.car_kw is None else c.car_kw * draw(st.floats(0.0, 1.0)),
                            c.kwh_left, c.departure) for c in present]
        out.append((limits, present))
    return out


@settings(max_examples=300, deadline=None)
@given(rounds(), st.sampled_from(list(Policy)))
def test_rounds_never_exceed_a_limit_and_send_only_changes(
    steps: list[tuple[dict[str, float], list[Charging]]], policy: Policy
) -> None:
    sent: dict[str, Sent] = {}
    for limits, sessions in steps:
        result = plan(limits, sessions, sent, policy=policy, now=NOW)
        check_round(limits, sessions, sent, result)
        sent = result.sent


# --- the job on a real Controller --------------------------------------------------------

CAR = CarSpec(battery_kwh=60.0, soc=0.2, max_kw=50.0)


@pytest.fixture
async def controller(bus: RecordingPublisher, repo: SqliteRepository
                     ) -> AsyncIterator[FlushingController]:
    """Central for these tests, under conftest's `energy`."""
    central = FlushingController(bus, repo, CentralOptions(start_timeout=30.0))
    yield central
    await central.close()


@pytest.fixture
def central(controller: FlushingController) -> FlushingController:
    """The name these tests give `controller`."""
    return controller


async def activate(central: Controller, cp_id: str, site: str, kw_rate: float = 22.0) -> None:
    await central.register(CPRegistration(cp_id=cp_id, site=site, kw_rate=kw_rate))
    await central.handle_status(CPStatus(cp_id=cp_id, state=CPState.ACTIVATED))


async def start(central: Controller, bus: RecordingPublisher, cp_id: str,
                **fields: object) -> str:
    req = DriverRequest(request_id=new_id(), driver_id="driver-1", cp_id=cp_id,
                        **fields)  # type: ignore[arg-type]
    await central.handle_request(req)
    update = await bus.wait_for(DriverUpdate, lambda u: u.request_id == req.request_id)
    assert update.status is DriverStatus.ACCEPTED and update.session_id
    await central.handle_status(CPStatus(cp_id=cp_id, state=CPState.SUPPLYING,
                                         session_id=update.session_id, driver_id="driver-1"))
    return update.session_id


def limits_sent(bus: RecordingPublisher, since: int = 0) -> list[CentralCommand]:
    return [c for c in bus.of(CentralCommand, since) if c.cmd is CommandType.SET_LIMIT]


async def test_start_supply_carries_the_car_and_the_session_keeps_it(
    central: Controller, bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    await activate(central, "CP-1", "site-A")
    departure = NOW + timedelta(hours=3)
    sid = await start(central, bus, "CP-1", kwh_wanted=12.5, departure=departure, car=CAR)
    [command] = [c for c in bus.of(CentralCommand) if c.cmd is CommandType.START_SUPPLY]
    assert (command.payload.kwh_wanted, command.payload.departure, command.payload.car) == (
        12.5, departure, CAR)
    row = await repo.get_session(sid)
    assert row is not None
    assert (row.kwh_wanted, row.departure, row.car_battery_kwh, row.car_soc,
            row.car_max_kw) == (12.5, departure, 60.0, 0.2, 50.0)
    # A restarted Central has them with the session it resumes.
    second = FlushingController(bus, repo, CentralOptions())
    await second.load()
    session = second.get("CP-1").session
    assert session is not None
    assert (session.kwh_wanted, session.departure, session.car) == (12.5, departure, CAR)
    await second.close()


async def test_a_request_without_car_fields_starts_as_before(
    central: Controller, bus: RecordingPublisher
) -> None:
    await activate(central, "CP-1", "site-A")
    await start(central, bus, "CP-1")
    [command] = [c for c in bus.of(CentralCommand) if c.cmd is CommandType.START_SUPPLY]
    dumped = command.payload.model_dump(exclude_none=True)
    assert set(dumped) == {"driver_id", "session_id"}


async def test_limit_shares_start_end_and_removal(
    central: Controller, energy: Energy, bus: RecordingPublisher
) -> None:
    for i in range(4):
        await activate(central, f"CP-{i}", "site-A")
    await activate(central, "CP-B", "site-B")
    sids = [await start(central, bus, f"CP-{i}") for i in range(3)]
    await start(central, bus, "CP-B")
    assert limits_sent(bus) == []  # no limit anywhere: no SET_LIMIT
    out = await energy.set_limit("site-A", 33.0)
    assert (out.limit_kw, out.allocated_kw, out.cps, out.supplying) == (33.0, 33.0, 4, 3)
    assert {(c.cp_id, c.payload.session_id, c.payload.kw) for c in limits_sent(bus)} == {
        (f"CP-{i}", sids[i], 11.0) for i in range(3)}
    # A fourth session: it gets its share at once and the others give way.
    mark = len(bus.messages)
    fourth = await start(central, bus, "CP-3")
    got = await poll(lambda: len(limits_sent(bus, mark)) >= 4 and limits_sent(bus, mark),
                     timeout=2.0, what="four SET_LIMITs after a start")
    assert {(c.payload.session_id, c.payload.kw) for c in got} == {
        *((sid, 8.25) for sid in sids), (fourth, 8.25)}
    # A session ends: the others get its share; the ended one gets nothing.
    mark = len(bus.messages)
    await central.handle_status(CPStatus(cp_id="CP-0", state=CPState.ACTIVATED,
                                         event=None, session_id=sids[0], kwh=1.0, euros=0.3,
                                         session_result=SessionResult.COMPLETED))
    got = await poll(lambda: len(limits_sent(bus, mark)) >= 3 and limits_sent(bus, mark),
                     timeout=2.0, what="three SET_LIMITs after an end")
    assert {(c.payload.session_id, c.payload.kw) for c in got} == {
        (sids[1], 11.0), (sids[2], 11.0), (fourth, 11.0)}
    assert energy.sent.keys() == {sids[1], sids[2], fourth}
    # Removed: kw null to each, and nothing more afterwards.
    mark = len(bus.messages)
    out = await energy.remove_limit("site-A")
    assert (out.limit_kw, out.allocated_kw) == (None, None)
    assert {(c.cp_id, c.payload.kw) for c in limits_sent(bus, mark)} == {
        ("CP-1", None), ("CP-2", None), ("CP-3", None)}
    mark = len(bus.messages)
    assert energy.reallocate() == 0
    await central.flush()
    assert limits_sent(bus, mark) == []


async def test_a_start_sends_its_limits_in_its_own_flush_behind_its_start_supply(
    central: Controller, energy: Energy, bus: RecordingPublisher
) -> None:
    """A start's SET_LIMITs (its share, the others giving way) leave in the flush of its
    START_SUPPLY, after it: a Central killed once that flush is out never leaves the site
    over its limit (the chaos row central-restart-limited found a new session at full
    power, unlimited, while Central was down)."""
    await activate(central, "CP-0", "site-A")
    await activate(central, "CP-1", "site-A")
    first = await start(central, bus, "CP-0")
    await energy.set_limit("site-A", 30.0)
    mark = len(bus.messages)
    request = DriverRequest(request_id=new_id(), driver_id="driver-2", cp_id="CP-1")
    await Controller.handle_request(central, request)  # decided: the batch not flushed yet
    await central.outbox.flush()  # the one flush of that batch
    commands = bus.of(CentralCommand, mark)
    assert commands and commands[0].cmd is CommandType.START_SUPPLY, commands
    second = commands[0].payload.session_id
    assert {(c.cp_id, c.payload.session_id, c.payload.kw) for c in commands[1:]} == {
        ("CP-0", first, 15.0), ("CP-1", second, 15.0)}
    assert all(c.cmd is CommandType.SET_LIMIT for c in commands[1:])


async def test_starts_of_one_batch_plan_their_site_once_before_the_flush(
    central: Controller, energy: Energy, bus: RecordingPublisher
) -> None:
    """A burst of starts at one site in one batch plans it once (not once per start, which
    was O(n²) for n starts), right before the flush of their START_SUPPLYs, which carries
    the SET_LIMITs behind them."""
    for i in range(3):
        await activate(central, f"CP-{i}", "site-A")
    await energy.set_limit("site-A", 30.0)
    plans: list[list[str]] = []
    real = energy.reallocate

    def counting(sites: Iterable[str] | None = None) -> int:
        plans.append(sorted(sites) if sites is not None else ["*"])
        return real(sites)

    energy.reallocate = counting  # type: ignore[method-assign]
    mark = len(bus.messages)
    for i in range(3):
        request = DriverRequest(request_id=new_id(), driver_id=f"d-{i}", cp_id=f"CP-{i}")
        await Controller.handle_request(central, request)  # one batch: no flush yet
    assert plans == []
    await central.outbox.flush()
    assert plans == [["site-A"]]
    commands = bus.of(CentralCommand, mark)
    assert [c.cmd for c in commands] == [CommandType.START_SUPPLY] * 3 + [
        CommandType.SET_LIMIT] * 3
    assert {c.payload.kw for c in commands[3:]} == {10.0}
    assert {c.payload.session_id for c in commands[3:]} == {
        c.payload.session_id for c in commands[:3]}


async def test_a_start_plans_its_own_site_only(
    central: Controller, energy: Energy, bus: RecordingPublisher
) -> None:
    for cp_id, site in (("A1", "site-A"), ("B1", "site-B"), ("B2", "site-B")):
        await activate(central, cp_id, site)
    a1 = await start(central, bus, "A1")
    b1 = await start(central, bus, "B1")
    await energy.set_limit("site-A", 10.0)
    await energy.set_limit("site-B", 30.0)
    assert {sid: sent.kw for sid, sent in energy.sent.items()} == {a1: 10.0, b1: 22.0}
    mark = len(bus.messages)
    b2 = await start(central, bus, "B2")
    got = await poll(lambda: len(limits_sent(bus, mark)) >= 2 and limits_sent(bus, mark),
                     timeout=2.0, what="site-B's SET_LIMITs")
    assert {(c.cp_id, c.payload.session_id, c.payload.kw) for c in got} == {
        ("B1", b1, 15.0), ("B2", b2, 15.0)}
    assert energy.sent[a1].kw == 10.0
    assert energy.allocated == {"site-A": 10.0, "site-B": 30.0}
    # A CP that moves to another limited site mid-session is planned with its new site.
    await central.register(CPRegistration(cp_id="B2", site="site-A"))
    mark = len(bus.messages)
    energy.reallocate(["site-B"])
    await central.flush()
    assert {(c.cp_id, c.payload.kw) for c in limits_sent(bus, mark)} == {
        ("A1", 5.0), ("B2", 5.0), ("B1", 22.0)}
    assert energy.allocated == {"site-A": 10.0, "site-B": 22.0}


async def test_a_refused_set_limit_is_sent_again_and_every_limit_is_resent_in_time(
    central: Controller, energy: Energy, bus: RecordingPublisher
) -> None:
    """A SET_LIMIT the CP refused (or timed out on: the gateway answers REFUSED) is not in
    force: it is sent again; and every RESEND_EVERY intervals every limit is sent again,
    so one lost on its way is healed."""
    await activate(central, "CP-1", "site-A")
    await activate(central, "CP-2", "site-A")
    s1 = await start(central, bus, "CP-1")
    s2 = await start(central, bus, "CP-2")
    await energy.set_limit("site-A", 30.0)
    assert energy.sent[s1].kw == 15.0
    mark = len(bus.messages)
    await central.handle_status(CPStatus(
        cp_id="CP-1", state=CPState.SUPPLYING, event=StatusEvent.REFUSED,
        cmd=CommandType.SET_LIMIT, session_id=s1, reason="refused SET_LIMIT: timeout"))
    got = await poll(lambda: limits_sent(bus, mark), timeout=2.0,
                     what="the refused SET_LIMIT sent again")
    assert [(c.cp_id, c.payload.session_id, c.payload.kw) for c in got] == [
        ("CP-1", s1, 15.0)]
    assert energy.sent[s1].kw == 15.0
    assert central.get("CP-1").session is not None  # the session goes on
    # The periodic resend: every limit in force, changed or not.
    mark = len(bus.messages)
    energy.interval = 0.001
    runner = asyncio.create_task(energy.run())
    try:
        got = await poll(lambda: len(limits_sent(bus, mark)) >= 2 and limits_sent(bus, mark),
                         timeout=5.0, what="every limit sent again")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert {(c.payload.session_id, c.payload.kw) for c in got[:2]} == {(s1, 15.0), (s2, 15.0)}
    assert RESEND_EVERY * 2.0 <= 30.0


async def test_a_refused_set_limit_does_not_end_a_session_not_yet_confirmed(
    central: Controller, energy: Energy, bus: RecordingPublisher
) -> None:
    """The SET_LIMITs leave with the START_SUPPLY, before the CP confirms the session: a
    charger refusing (or timing out on) the limit must not fail the session."""
    await activate(central, "CP-1", "site-A")
    await energy.set_limit("site-A", 10.0)
    request = DriverRequest(request_id=new_id(), driver_id="driver-1", cp_id="CP-1")
    await central.handle_request(request)
    session = central.get("CP-1").session
    assert session is not None and not session.confirmed
    mark = len(bus.messages)
    await central.handle_status(CPStatus(
        cp_id="CP-1", state=CPState.ACTIVATED, event=StatusEvent.REFUSED,
        cmd=CommandType.SET_LIMIT, session_id=session.session_id,
        reason="refused SET_LIMIT: timeout"))
    assert central.get("CP-1").session is session
    got = await poll(lambda: limits_sent(bus, mark), timeout=2.0,
                     what="the refused SET_LIMIT sent again")
    assert [(c.payload.session_id, c.payload.kw) for c in got] == [(session.session_id, 10.0)]


async def test_a_removed_limit_reaches_every_running_session_of_its_site(
    central: Controller, energy: Energy, bus: RecordingPublisher
) -> None:
    """DELETE sends kw null to every running session of the site, also those this
    instance has no record of sending a limit to (after a restart, before its first plan)."""
    await activate(central, "CP-1", "site-A")
    await activate(central, "CP-B", "site-B")
    await energy.set_limit("site-A", 10.0)
    sid = await start(central, bus, "CP-1")
    await start(central, bus, "CP-B")
    assert energy.sent[sid].kw == 10.0
    energy.forget_sent()  # as after a restart: nothing known to be sent yet
    mark = len(bus.messages)
    await energy.remove_limit("site-A")
    assert [(c.cp_id, c.payload.session_id, c.payload.kw) for c in limits_sent(bus, mark)] == [
        ("CP-1", sid, None)]


async def test_a_cp_registered_into_a_limited_site_mid_session_is_planned_there(
    central: Controller, energy: Energy, bus: RecordingPublisher
) -> None:
    await activate(central, "A1", "site-A")
    await activate(central, "X", "site-B")  # no limit there
    a1 = await start(central, bus, "A1")
    x = await start(central, bus, "X")
    await energy.set_limit("site-A", 10.0)
    assert {sid: sent.kw for sid, sent in energy.sent.items()} == {a1: 10.0}
    mark = len(bus.messages)
    await central.register(CPRegistration(cp_id="X", site="site-A"))
    got = await poll(lambda: len(limits_sent(bus, mark)) >= 2 and limits_sent(bus, mark),
                     timeout=2.0, what="site-A planned with the CP that joined it")
    assert {(c.cp_id, c.payload.session_id, c.payload.kw) for c in got} == {
        ("A1", a1, 5.0), ("X", x, 5.0)}
    assert energy.allocated["site-A"] == 10.0


async def test_the_leader_follows_limits_set_and_removed_on_another_central(
    central: Controller, energy: Energy, bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    await activate(central, "CP-1", "site-A")
    sid = await start(central, bus, "CP-1")
    energy.interval = 0.001
    runner = asyncio.create_task(energy.run())
    try:
        mark = len(bus.messages)
        await repo.apply([writes.SiteLimitSet("site-A", 7.0, NOW)])  # another Central's PUT
        got = await poll(lambda: limits_sent(bus, mark), timeout=5.0,
                         what="the limit set elsewhere")
        assert [(c.cp_id, c.payload.session_id, c.payload.kw) for c in got][:1] == [
            ("CP-1", sid, 7.0)]
        mark = len(bus.messages)
        await repo.apply([writes.SiteLimitRemoved("site-A")])  # and its DELETE
        got = await poll(lambda: limits_sent(bus, mark), timeout=5.0,
                         what="the limit removed elsewhere")
        assert [(c.cp_id, c.payload.kw) for c in got][:1] == [("CP-1", None)]
        assert "site-A" not in energy.limits
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_sites_lists_registered_and_limited_sites_with_measured_power(
    central: Controller, energy: Energy, bus: RecordingPublisher
) -> None:
    await activate(central, "CP-1", "site-A")
    await activate(central, "CP-2", "site-A")
    sid = await start(central, bus, "CP-1")
    await central.handle_telemetry(CPTelemetry(cp_id="CP-1", kw=7.5, kwh=0.1, euros=0.03,
                                               session_id=sid, driver_id="driver-1"))
    await energy.set_limit("nowhere", 10.0)
    sites = {s.site: s for s in energy.sites()}
    assert sites.keys() == {"site-A", "nowhere"}
    a = sites["site-A"]
    assert (a.limit_kw, a.allocated_kw, a.measured_kw, a.cps, a.supplying) == (
        None, None, 7.5, 2, 1)
    n = sites["nowhere"]
    assert (n.limit_kw, n.allocated_kw, n.measured_kw, n.cps, n.supplying) == (
        10.0, 0.0, 0.0, 0, 0)


async def test_car_acceptance_at_the_latest_soc_frees_power_for_the_others(
    central: Controller, energy: Energy, bus: RecordingPublisher
) -> None:
    await activate(central, "CP-1", "site-A", kw_rate=50.0)
    await activate(central, "CP-2", "site-A", kw_rate=50.0)
    s1 = await start(central, bus, "CP-1", car=CAR)
    s2 = await start(central, bus, "CP-2", car=CAR)
    await energy.set_limit("site-A", 60.0)
    assert energy.sent[s1].kw == energy.sent[s2].kw == 30.0
    # CP-1's car is at 95 %: it takes 50 × 0.05 / 0.2 = 12.5 kW, held there by the car (its
    # 30 kW limit is not resent); CP-2 gets the rest.
    await central.handle_telemetry(CPTelemetry(cp_id="CP-1", kw=12.0, kwh=5.0, euros=1.0,
                                               session_id=s1, driver_id="driver-1", soc=0.95))
    mark = len(bus.messages)
    energy.reallocate()
    await central.flush()
    assert {(c.payload.session_id, c.payload.kw) for c in limits_sent(bus, mark)} == {
        (s2, 47.5)}
    assert energy.allocated["site-A"] == pytest.approx(60.0)


async def test_limits_persist_and_the_setting_overrides_them(
    central: Controller, energy: Energy, bus: RecordingPublisher, repo: SqliteRepository
) -> None:
    await activate(central, "CP-1", "site-A")
    sid = await start(central, bus, "CP-1")
    await energy.set_limit("site-A", 66.0)
    await energy.set_limit("site-B", 150.0)
    await energy.set_limit("site-C", 5.0)
    await energy.remove_limit("site-C")
    second = FlushingController(bus, repo, CentralOptions())
    await second.load()
    again = Energy(second, interval=3600.0)
    await again.load({"site-B": 100.0, "site-D": 7.0})
    assert again.limits == {"site-A": 66.0, "site-B": 100.0, "site-D": 7.0}
    assert await repo.load_site_limits() == again.limits
    # The resumed session at the limited site gets its limit again (nothing was sent yet).
    mark = len(bus.messages)
    assert again.reallocate() == 1
    await second.flush()
    [command] = limits_sent(bus, mark)
    assert (command.cp_id, command.payload.session_id, command.payload.kw) == (
        "CP-1", sid, 22.0)
    await again.close()
    await second.close()


# --- Central's settings of SPEC §10 ------------------------------------------------------


def test_site_limits_setting_parses() -> None:
    assert parse_site_limits("") == {}
    assert parse_site_limits(" site-A=66 , site-B=150.5,") == {"site-A": 66.0, "site-B": 150.5}
    settings = load_settings(CentralSettings, ["--site-limits", "site-A=66,site-B=150",
                                               "--allocation", "least_laxity",
                                               "--allocation-interval", "0.5"], "c", "")
    assert settings.site_limit_map == {"site-A": 66.0, "site-B": 150.0}
    assert (settings.allocation, settings.allocation_interval) == ("least_laxity", 0.5)
    defaults = CentralSettings()
    assert (defaults.site_limit_map, defaults.allocation, defaults.allocation_interval) == (
        {}, "equal", 2.0)


@pytest.mark.parametrize(("argv", "message"), [
    (["--site-limits", "site-A"], "'site-A' is not site=kW"),
    (["--site-limits", "=5"], "is not site=kW"),
    (["--site-limits", "site-A=lots"], "the limit 'lots' is not a number of kW"),
    (["--site-limits", "site-A=-1"], "finite number of kW >= 0"),
    (["--site-limits", "site-A=inf"], "finite number of kW >= 0"),
    (["--site-limits", "a=1,a=2"], "site 'a' is given twice"),
    (["--site-limits", "s" * 65 + "=1"], "longer than 64 characters"),
    (["--allocation", "fair"], "CENTRAL_ALLOCATION"),
    (["--allocation-interval", "0"], "CENTRAL_ALLOCATION_INTERVAL"),
])
def test_bad_energy_settings_stop_with_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(CentralSettings, argv, "ev_central", "")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and message in err, err


# --- the allocation lock (SPEC §9: with several Centrals one allocates) -------------------


class LockedRepository(SqliteRepository):
    """A real SQLite repository whose allocation lock another Central may hold (`held`):
    what a PostgreSQL repository answers, without a second Central."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.held = False
        self.asked = 0

    async def hold_lock(self, name: str) -> bool:
        assert name == ALLOCATION_LOCK
        self.asked += 1
        return self.held


def leader_gauge(metrics: ServiceMetrics) -> float:
    [value] = [sample.value for family in text_string_to_metric_families(
        metrics.render().decode()) for sample in family.samples
        if sample.name == "evcharging_allocation_leader"]
    return float(value)


async def test_without_the_allocation_lock_no_set_limit_is_sent(
    bus: RecordingPublisher, logs: list[tuple[str, str]]
) -> None:
    async with LockedRepository() as repo:
        central = FlushingController(bus, repo, CentralOptions(start_timeout=30.0))
        job = Energy(central, interval=3600.0)
        await job.load({"site-A": 20.0})
        assert (job.leader, repo.asked) == (False, 1)
        for i in range(3):
            await activate(central, f"CP-{i}", "site-A")
        sids = [await start(central, bus, f"CP-{i}") for i in range(2)]
        await job.set_limit("site-A", 22.0)
        assert limits_sent(bus) == [] and job.sent == {}
        assert repo.asked == 1  # a start or a limit reads the last check, never the lock
        metrics = central_metrics(central, process=False, energy=job)
        assert leader_gauge(metrics) == 0.0

        # The lock is free (the other Central stopped): the next check takes it and the
        # interval's plan sends every share, as before.
        repo.held = True
        assert await job.check_leader()
        assert job.reallocate() == 2
        await central.outbox.flush()
        assert {(c.payload.session_id, c.payload.kw) for c in limits_sent(bus)} == {
            (sid, 11.0) for sid in sids}
        assert leader_gauge(metrics) == 1.0
        mark = len(bus.messages)
        third = await start(central, bus, "CP-2")  # planned at once, as before
        assert {(c.payload.session_id, c.payload.kw) for c in limits_sent(bus, mark)} == {
            *((sid, 7.333) for sid in sids), (third, 7.333)}

        # Lost: nothing more is sent, and what was sent is forgotten (the new leader's
        # limits are in force).
        repo.held = False
        assert not await job.check_leader()
        mark = len(bus.messages)
        await central.handle_status(CPStatus(cp_id="CP-2", state=CPState.ACTIVATED,
                                             event=None, session_id=third, kwh=1.0,
                                             euros=0.3, session_result=SessionResult.COMPLETED))
        assert job.reallocate() == 0 and job.sent == {}
        await central.outbox.flush()
        assert limits_sent(bus, mark) == []
        assert leader_gauge(metrics) == 0.0
        gained = [m for _, m in logs if "this instance allocates" in m]
        lost = [m for _, m in logs if "no longer allocates" in m]
        assert (len(gained), len(lost)) == (1, 1)
        await job.close()
        await central.close()
