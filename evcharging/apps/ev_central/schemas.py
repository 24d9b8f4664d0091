"""The shapes Central answers with (STYLE 13): one Pydantic model each, shared by the HTTP
API, the TCP plane's ``STATUS`` answer and the dashboard's WebSocket.

:func:`cp_out` is the one way to turn the controller's view of a CP into what a client
sees: ``cp_out(view).model_dump(mode="json")`` is the JSON of ``GET /cp/{cp_id}``, of a
``STATUS`` answer's ``cp`` and of a WebSocket ``cp`` event alike. Timestamps are written by
:func:`~evcharging.common.messages.format_ts` (ISO 8601 UTC with ``Z``).

This module imports nothing of the controller at run time, so the controller can use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from evcharging.common.circuit_breaker import BreakerState
from evcharging.common.http import ErrorDetail, ErrorOut
from evcharging.common.messages import (
    CommandType,
    CPState,
    CPTelemetry,
    SessionStatus,
    format_ts,
)

if TYPE_CHECKING:
    from evcharging.apps.ev_central.repository import FaultEvent, HealthSnapshot, SessionRecord
    from evcharging.apps.ev_central.views import ActiveSession, CPView

__all__ = [
    "ActiveSessionOut",
    "CPChangeOut",
    "CPOut",
    "CommandOut",
    "ErrorDetail",
    "ErrorOut",
    "FaultOut",
    "FleetOut",
    "HealthOut",
    "HistoryOut",
    "MonitorOut",
    "SessionOut",
    "SiteOut",
    "SiteSummaryOut",
    "StatsOut",
    "SummaryOut",
    "TelemetryOut",
    "cp_out",
    "cp_power_kw",
    "cp_site",
    "fault_out",
    "history_out",
    "micro_kw",
    "session_out",
    "summarise",
    "telemetry_out",
]

Timestamp = Annotated[datetime, PlainSerializer(format_ts, return_type=str, when_used="json")]
"""A UTC timestamp, written as ISO 8601 with a ``Z`` suffix."""

class Out(BaseModel):
    """Base of every answer: immutable."""

    model_config = ConfigDict(frozen=True)


# ------------------------------------------------------------------------------ a CP


class TelemetryOut(Out):
    """A CP's latest ``cp.telemetry`` message: power and the running totals of a session."""

    cp_id: str
    kw: float
    kwh: float
    euros: float
    driver_id: str | None = None
    session_id: str | None = None
    ts: Timestamp


class ActiveSessionOut(Out):
    """The session a CP runs, from ACCEPTED on; ``confirmed`` once the CP supplies it."""

    session_id: str
    request_id: str
    driver_id: str
    started_at: Timestamp
    confirmed: bool
    kw: float
    kwh: float
    euros: float


class CPOut(Out):
    """One CP as Central knows it (``GET /cp``, ``GET /cp/{cp_id}``, TCP ``STATUS``, ``/ws``)."""

    cp_id: str
    state: CPState
    state_reason: str | None = Field(None, description="why the CP is in its state, for people")
    is_faulty: bool
    fault_reason: str | None = None
    circuit_breaker_state: BreakerState
    circuit_breaker_reason: str | None = None
    monitored: bool = Field(
        description="false when the CP's monitor has not reported for 3 health intervals"
    )
    site: str | None = Field(None, description="the site the CP belongs to, when known")
    protocol: str | None = Field(
        None, description="ocpp1.6 or ocpp2.0.1 for a charger behind the OCPP gateway; null "
        "for the project's own engines")
    vendor: str | None = Field(None, description="the charger's vendor (OCPP BootNotification)")
    model: str | None = Field(None, description="the charger's model (OCPP BootNotification)")
    location: str | None = None
    kw_rate: float | None = None
    euro_rate: float | None = None
    health_url: str | None = None
    current_driver: str | None = None
    current_session: str | None = None
    session: ActiveSessionOut | None = None
    last_telemetry: TelemetryOut | None = None
    last_seen: Timestamp | None = None
    registered_at: Timestamp | None = None


def telemetry_out(telemetry: CPTelemetry) -> TelemetryOut:
    return TelemetryOut(
        cp_id=telemetry.cp_id,
        kw=telemetry.kw,
        kwh=telemetry.kwh,
        euros=telemetry.euros,
        driver_id=telemetry.driver_id,
        session_id=telemetry.session_id,
        ts=telemetry.ts,
    )


def _session_out(session: ActiveSession) -> ActiveSessionOut:
    return ActiveSessionOut(
        session_id=session.session_id,
        request_id=session.request_id,
        driver_id=session.driver_id,
        started_at=session.started_at,
        confirmed=session.confirmed,
        kw=session.kw,
        kwh=session.kwh,
        euros=session.euros,
    )


def cp_site(view: CPView) -> str | None:
    """The site of a CP, when the view knows it."""
    return view.site


def cp_out(
    view: CPView, *, now: datetime | None = None
) -> CPOut:
    """What a client sees of one CP: ``cp_out(view).model_dump(mode="json")`` is its JSON."""
    session = view.session
    return CPOut(
        cp_id=view.cp_id,
        state=view.state,
        state_reason=view.state_reason,
        is_faulty=view.is_faulty,
        fault_reason=view.fault_reason,
        circuit_breaker_state=view.breaker.state,
        circuit_breaker_reason=view.breaker.reason,
        monitored=view.monitored,
        site=cp_site(view),
        protocol=view.protocol,
        vendor=view.vendor,
        model=view.model,
        location=view.location,
        kw_rate=view.kw_rate,
        euro_rate=view.euro_rate,
        health_url=view.health_url,
        current_driver=session.driver_id if session else None,
        current_session=session.session_id if session else None,
        session=_session_out(session) if session else None,
        last_telemetry=telemetry_out(view.last_telemetry) if view.last_telemetry else None,
        last_seen=view.last_seen,
        registered_at=view.registered_at,
    )


class FleetOut(Out):
    """The answer of the ``/fleet`` routes: how many CPs the call carried, how many of
    them were new, and the ids Central does not know (to register again)."""

    ok: Literal[True] = True
    count: int
    new: int = 0
    unknown: list[str] = Field(default_factory=list)


class MonitorOut(Out):
    """The answer of ``POST /cp/{cp_id}/monitor``: the monitor's report was taken."""

    cp_id: str
    monitored: bool


class CPChangeOut(Out):
    """The answer of ``POST /cp/register`` and ``POST /cp/fault``: the CP after the change."""

    ok: Literal[True] = True
    cp: CPOut


class CommandOut(Out):
    """The answer of an operator command: what was sent to the CP, and the CP as it is now
    (its state changes when the CP confirms)."""

    ok: Literal[True] = True
    sent: Literal[CommandType.STOP_CP, CommandType.RESUME_CP]
    cp: CPOut


# ------------------------------------------------------------------------------ tables


class SessionOut(Out):
    """A ``charging_sessions`` row."""

    session_id: str
    request_id: str
    cp_id: str
    driver_id: str
    status: SessionStatus
    started_at: Timestamp
    ended_at: Timestamp | None = None
    kwh: float
    euros: float
    reason: str | None = None
    meter_final: bool = Field(
        False, description="the CP reported the session's end: kwh and euros are its meter's "
        "final totals (else the last totals Central saw; a late report corrects them)"
    )


def session_out(record: SessionRecord) -> SessionOut:
    return SessionOut(
        session_id=record.session_id,
        request_id=record.request_id,
        cp_id=record.cp_id,
        driver_id=record.driver_id,
        status=SessionStatus(record.status),
        started_at=record.started_at,
        ended_at=record.ended_at,
        kwh=record.kwh,
        euros=record.euros,
        reason=record.reason,
        meter_final=record.meter_final,
    )


class FaultOut(Out):
    """A ``fault_events`` row."""

    id: int
    cp_id: str
    event_type: str = Field(description="FAULT, RECOVERY, MONITOR_LOST or MONITOR_BACK")
    reason: str | None = None
    ts: Timestamp


def fault_out(event: FaultEvent) -> FaultOut:
    return FaultOut(
        id=event.id, cp_id=event.cp_id, event_type=str(event.event_type), reason=event.reason,
        ts=event.ts,
    )


class HistoryOut(Out):
    """A ``cp_health_history`` row: one CP's health at one moment."""

    id: int | None = None
    cp_id: str
    state: CPState
    is_faulty: bool
    breaker_state: BreakerState
    session_id: str | None = None
    ts: Timestamp


def history_out(row: HealthSnapshot) -> HistoryOut:
    return HistoryOut(
        id=row.id, cp_id=row.cp_id, state=row.state, is_faulty=row.is_faulty,
        breaker_state=BreakerState(row.breaker_state), session_id=row.session_id, ts=row.ts,
    )


# ------------------------------------------------------------------------------ service


class HealthOut(Out):
    """``GET /health``: ``ok`` (200) only while Kafka and the database are usable, else
    ``degraded`` (503) with what is known; further fields are the probe's."""

    model_config = ConfigDict(frozen=True, extra="allow")

    status: Literal["ok", "degraded"]
    cps: int = Field(description="CPs Central knows")
    kafka: dict[str, Any] | None = None
    database: dict[str, Any] | None = None
    error: str | None = Field(None, description="why the probe gave no answer")
    code: str | None = None


class StatsOut(Out):
    """``GET /stats``: counters of Central's decisions and of HTTP errors since start."""

    controller: dict[str, int]
    http_errors: int


# ------------------------------------------------------------------------------ summary


class SiteSummaryOut(Out):
    """The CPs of one site in ``GET /summary``."""

    site: str | None = Field(description="the site's name; null for the CPs of no known site")
    cps: int
    supplying: int
    faulty: int
    power_kw: float = Field(description="power the site's CPs deliver now")


class SiteOut(Out):
    """One site in ``GET /sites`` and the answer of ``PUT``/``DELETE /sites/{site}/limit``
    (SPEC §10)."""

    site: str
    limit_kw: float | None = Field(description="the site's power limit; null: none")
    allocated_kw: float | None = Field(
        description="what smart charging shares among the site's sessions now (null "
        "without a limit)")
    measured_kw: float = Field(
        description="the sum of the latest telemetry kW of the site's supplying CPs")
    cps: int
    supplying: int


class SummaryOut(Out):
    """``GET /summary`` and the dashboard's WebSocket: the whole network in a few numbers.

    Computed from Central's memory in one pass over the CPs (O(N) per call)."""

    cps: int = Field(description="CPs Central knows")
    by_state: dict[CPState, int] = Field(description="CPs in each state (every state listed)")
    by_site: list[SiteSummaryOut] = Field(
        description="CPs of each site, by site name; the CPs of no known site last"
    )
    supplying: int
    power_kw: float = Field(description="power the network delivers now (supplying CPs)")
    active_sessions: int = Field(description="sessions from ACCEPTED until their end")
    faulty: int = Field(description="CPs reported faulty or in FAULT")
    unmonitored: int = Field(description="CPs whose monitor has not reported lately")
    ts: Timestamp


def cp_power_kw(view: CPView) -> float:
    """The power a CP delivers now: its session's (or last telemetry's) while SUPPLYING."""
    if view.state is not CPState.SUPPLYING:
        return 0.0
    if view.session is not None:
        return view.session.kw
    return view.last_telemetry.kw if view.last_telemetry is not None else 0.0


def micro_kw(kw: float) -> int:
    """A power in whole µkW, so that sums of many never drift (a non-finite one, which no
    valid report carries, as 0)."""
    return round(kw * 1_000_000) if math.isfinite(kw) else 0


def summarise(views: Iterable[CPView], now: datetime) -> SummaryOut:
    """The :class:`SummaryOut` of `views`, in one pass over them (O(N): ``GET /summary``
    answers from :class:`~evcharging.apps.ev_central.tally.Tally`, kept up as CPs change,
    and is held to this full recount by the tests)."""
    by_state = dict.fromkeys(CPState, 0)
    sites: dict[str | None, list[int]] = {}  # site -> [cps, supplying, faulty, µkW]
    total = supplying = sessions = faulty = unmonitored = 0
    power = 0
    for view in views:
        total += 1
        by_state[view.state] += 1
        kw = micro_kw(cp_power_kw(view))
        is_supplying = view.state is CPState.SUPPLYING
        is_faulty = view.is_faulty or view.state is CPState.FAULT
        site = sites.get(view.site)
        if site is None:
            site = sites[view.site] = [0, 0, 0, 0]
        site[0] += 1
        site[1] += is_supplying
        site[2] += is_faulty
        site[3] += kw
        supplying += is_supplying
        faulty += is_faulty
        sessions += view.session is not None
        unmonitored += not view.monitored
        power += kw
    return SummaryOut(
        cps=total,
        by_state=by_state,
        by_site=[
            SiteSummaryOut(site=name, cps=counts[0], supplying=counts[1],
                           faulty=counts[2], power_kw=round(counts[3] / 1e6, 3))
            for name, counts in sorted(sites.items(), key=lambda item: (item[0] is None,
                                                                        item[0] or ""))
        ],
        supplying=supplying,
        power_kw=round(power / 1e6, 3),
        active_sessions=sessions,
        faulty=faulty,
        unmonitored=unmonitored,
        ts=now,
    )
