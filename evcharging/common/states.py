"""The charging point state machine (SPEC §3) as one pure transition table.

This table is the single source of truth for both the CP Engine and Central's view of
a CP. Nothing else writes a CP's state: every change goes through :func:`next_state`,
which refuses every pair that is not in the table with :class:`InvalidTransition`.
"""

from __future__ import annotations

from enum import StrEnum


class CPState(StrEnum):
    DISCONNECTED = "DISCONNECTED"
    ACTIVATED = "ACTIVATED"
    SUPPLYING = "SUPPLYING"
    STOPPED = "STOPPED"
    FAULT = "FAULT"


class CPEvent(StrEnum):
    CONNECT = "CONNECT"
    DISCONNECT = "DISCONNECT"
    START_SUPPLY = "START_SUPPLY"
    STOP_SUPPLY = "STOP_SUPPLY"
    SESSION_COMPLETE = "SESSION_COMPLETE"
    STOP_CP = "STOP_CP"
    RESUME_CP = "RESUME_CP"
    FAULT = "FAULT"
    RECOVER = "RECOVER"


class SessionResult(StrEnum):
    """How a charging session ended."""

    COMPLETED = "COMPLETED"
    STOPPED = "STOPPED"
    FAILED = "FAILED"


S, E = CPState, CPEvent

TRANSITIONS: dict[tuple[CPState, CPEvent], CPState] = {
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
"""Every allowed (state, event) pair and the state it leads to."""

SESSION_ENDINGS: dict[CPEvent, SessionResult] = {
    E.SESSION_COMPLETE: SessionResult.COMPLETED,
    E.STOP_SUPPLY: SessionResult.STOPPED,
    E.STOP_CP: SessionResult.STOPPED,
    E.FAULT: SessionResult.FAILED,
}
"""How a running session ends when one of these events takes a CP out of SUPPLYING."""

del S, E


class InvalidTransition(Exception):
    """A (state, event) pair the state machine refuses; nothing was changed."""

    def __init__(self, state: CPState, event: CPEvent, detail: str = "") -> None:
        self.state = state
        self.event = event
        self.detail = detail
        message = f"{event.value} is not allowed in state {state.value}"
        super().__init__(f"{message}: {detail}" if detail else message)


def next_state(
    state: CPState,
    event: CPEvent,
    *,
    driver_id: str | None = None,
    session_id: str | None = None,
) -> CPState:
    """Return the state that `event` leads to from `state`, or raise InvalidTransition.

    START_SUPPLY is guarded: it needs both a driver and a session.
    """
    target = TRANSITIONS.get((state, event))
    if target is None:
        raise InvalidTransition(state, event)
    if event is CPEvent.START_SUPPLY and not (driver_id and session_id):
        raise InvalidTransition(state, event, "a driver and a session are required")
    return target


def session_result(state: CPState, event: CPEvent) -> SessionResult | None:
    """The result of the running session if `event` ends it, else None."""
    if state is not CPState.SUPPLYING:
        return None
    return SESSION_ENDINGS.get(event)


def allowed_events(state: CPState) -> list[CPEvent]:
    """The events accepted in `state`, in declaration order."""
    return [event for event in CPEvent if (state, event) in TRANSITIONS]


def path(source: CPState, target: CPState) -> list[CPEvent]:
    """The shortest list of events that takes a CP from `source` to `target`.

    Central uses it to follow a CP's reported state through the state machine when it
    missed the steps in between (e.g. after its own restart). The table is strongly
    connected, so a path always exists.
    """
    if source is target:
        return []
    frontier: list[tuple[CPState, list[CPEvent]]] = [(source, [])]
    seen = {source}
    while frontier:
        next_frontier: list[tuple[CPState, list[CPEvent]]] = []
        for state, events in frontier:
            for (from_state, event), to_state in TRANSITIONS.items():
                if from_state is not state or to_state in seen:
                    continue
                if to_state is target:
                    return [*events, event]
                seen.add(to_state)
                next_frontier.append((to_state, [*events, event]))
        frontier = next_frontier
    raise InvalidTransition(source, CPEvent.CONNECT, f"no path to {target.value}")
