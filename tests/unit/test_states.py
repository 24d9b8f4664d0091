"""The CP state machine, over every (state, event) pair."""

from __future__ import annotations

import itertools

import pytest

from evcharging.common.states import (
    TRANSITIONS,
    CPEvent,
    CPState,
    InvalidTransition,
    SessionResult,
    allowed_events,
    next_state,
    path,
    session_result,
)

S, E = CPState, CPEvent

EXPECTED = {
    (S.DISCONNECTED, E.CONNECT): S.ACTIVATED,
    (S.ACTIVATED, E.START_SUPPLY): S.SUPPLYING,
    (S.SUPPLYING, E.STOP_SUPPLY): S.ACTIVATED,
    (S.SUPPLYING, E.SESSION_COMPLETE): S.ACTIVATED,
    (S.ACTIVATED, E.DISCONNECT): S.DISCONNECTED,
    (S.ACTIVATED, E.STOP_CP): S.STOPPED,
    (S.SUPPLYING, E.STOP_CP): S.STOPPED,
    (S.STOPPED, E.RESUME_CP): S.ACTIVATED,
    (S.DISCONNECTED, E.FAULT): S.FAULT,
    (S.ACTIVATED, E.FAULT): S.FAULT,
    (S.SUPPLYING, E.FAULT): S.FAULT,
    (S.STOPPED, E.FAULT): S.FAULT,
    (S.FAULT, E.RECOVER): S.ACTIVATED,
}

ALL_PAIRS = list(itertools.product(CPState, CPEvent))


def test_table_is_the_spec() -> None:
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS)
def test_every_pair(state: CPState, event: CPEvent) -> None:
    expected = EXPECTED.get((state, event))
    if expected is None:
        with pytest.raises(InvalidTransition) as info:
            next_state(state, event, driver_id="d", session_id="s")
        assert info.value.state is state
        assert info.value.event is event
        assert state.value in str(info.value) and event.value in str(info.value)
    else:
        assert next_state(state, event, driver_id="d", session_id="s") is expected


@pytest.mark.parametrize(
    ("driver_id", "session_id"), [(None, "s"), ("d", None), (None, None), ("", "s")]
)
def test_start_supply_needs_driver_and_session(
    driver_id: str | None, session_id: str | None
) -> None:
    with pytest.raises(InvalidTransition, match="driver and a session"):
        next_state(S.ACTIVATED, E.START_SUPPLY, driver_id=driver_id, session_id=session_id)


@pytest.mark.parametrize(
    ("event", "result"),
    [
        (E.SESSION_COMPLETE, SessionResult.COMPLETED),
        (E.STOP_SUPPLY, SessionResult.STOPPED),
        (E.STOP_CP, SessionResult.STOPPED),
        (E.FAULT, SessionResult.FAILED),
    ],
)
def test_session_endings(event: CPEvent, result: SessionResult) -> None:
    assert session_result(S.SUPPLYING, event) is result


@pytest.mark.parametrize("state", [s for s in CPState if s is not S.SUPPLYING])
def test_no_session_ends_outside_supplying(state: CPState) -> None:
    assert all(session_result(state, e) is None for e in CPEvent)


def test_allowed_events() -> None:
    assert allowed_events(S.FAULT) == [E.RECOVER]
    assert set(allowed_events(S.ACTIVATED)) == {E.START_SUPPLY, E.DISCONNECT, E.STOP_CP, E.FAULT}


@pytest.mark.parametrize(("source", "target"), list(itertools.product(CPState, CPState)))
def test_path_reaches_every_state_through_allowed_events(
    source: CPState, target: CPState
) -> None:
    events = path(source, target)
    state = source
    for event in events:
        state = next_state(state, event, driver_id="d", session_id="s")
    assert state is target
    assert len(events) <= 3
    if source is target:
        assert events == []
