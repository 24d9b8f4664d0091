"""What Central holds in memory of each CP and session (the controller decides on these).

A view that belongs to a :class:`~evcharging.apps.ev_central.tally.Tally` (its ``tally``
is set) tells it whenever a field the network's summary counts is written (its state,
site, fault, session, telemetry, monitor, or its session's power), so ``GET /summary``
never goes over every CP: see :data:`SUMMARY_FIELDS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from evcharging.apps.ev_central.records import CPRecord, HealthSnapshot, SessionRecord
from evcharging.common.circuit_breaker import CircuitBreaker
from evcharging.common.messages import (
    CarSpec,
    CPTelemetry,
    SessionEnd,
    SessionStatus,
    utcnow,
)
from evcharging.common.states import CPState

if TYPE_CHECKING:
    from evcharging.apps.ev_central.tally import Part, Tally

__all__ = ["SUMMARY_FIELDS", "ActiveSession", "CPView", "ClosedSession", "car_of"]

SUMMARY_FIELDS = frozenset({"state", "site", "is_faulty", "session", "last_telemetry",
                            "monitor_interval", "monitor_lost"})
"""The fields of a :class:`CPView` the summary depends on: writing one marks the view
for a recount in its tally (a session's ``kw`` does the same for the view it runs on)."""


@dataclass
class ActiveSession:
    """A session from ACCEPTED until its end: pending until the CP confirms SUPPLYING."""

    session_id: str
    request_id: str
    driver_id: str
    cp_id: str
    started_at: datetime
    trial: bool = False
    """It is the one session a HALF_OPEN breaker lets through."""
    confirmed: bool = False
    resumed: bool = False
    """Reloaded after a restart: kept until its CP claims it, reports its end, or shows
    (by a heartbeat) that it does not know it."""
    kw: float = 0.0
    kwh: float = 0.0
    euros: float = 0.0
    first_report: datetime | None = None
    """The CP's own time of its first report of this session: its reports from before
    say nothing about the session (SPEC §4)."""
    last_report: datetime | None = None
    """The CP's own time of its last report of this session."""
    kwh_wanted: float | None = None
    departure: datetime | None = None
    car: CarSpec | None = None
    """What the driver's request said of the charge and the car (SPEC §10)."""
    view: CPView | None = field(default=None, init=False, repr=False, compare=False)
    """The CP it runs on, once set as that CP's ``session``."""

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name == "kw":
            view = self.__dict__.get("view")
            if view is not None:
                view.touched()


def car_of(row: SessionRecord) -> CarSpec | None:
    """The car a session row keeps (SPEC §10), or None when its request gave none."""
    if row.car_battery_kwh is None or row.car_soc is None or row.car_max_kw is None:
        return None
    return CarSpec(battery_kwh=row.car_battery_kwh, soc=row.car_soc, max_kw=row.car_max_kw)


@dataclass
class ClosedSession:
    """A session that has ended, as the ledger holds it (late meter reports correct it)."""

    session_id: str
    request_id: str
    driver_id: str
    cp_id: str
    status: SessionStatus
    reason: str | None
    kwh: float
    euros: float
    meter_final: bool
    """The CP reported the end: its totals are final, telemetry no longer changes them."""

    @classmethod
    def from_row(cls, row: SessionRecord) -> ClosedSession:
        return cls(
            session_id=row.session_id, request_id=row.request_id, driver_id=row.driver_id,
            cp_id=row.cp_id, status=SessionStatus(row.status), reason=row.reason,
            kwh=row.kwh, euros=row.euros, meter_final=row.meter_final,
        )


@dataclass
class CPView:
    """What Central knows of one CP."""

    cp_id: str
    breaker: CircuitBreaker
    state: CPState = CPState.DISCONNECTED
    is_faulty: bool = False
    fault_reason: str | None = None
    location: str | None = None
    site: str | None = None
    protocol: str | None = None
    """``ocpp1.6`` / ``ocpp2.0.1`` for a charger behind the OCPP gateway (SPEC §8)."""
    vendor: str | None = None
    model: str | None = None
    kw_rate: float | None = None
    euro_rate: float | None = None
    health_url: str | None = None
    registered_at: datetime | None = None
    last_seen: datetime | None = None
    """When the broker took in the CP's last message (for people)."""
    last_heard: datetime | None = None
    """The CP's own timestamp of its last message (for people; never compared with
    Central's clock)."""
    heard: list[float | None] = field(default_factory=lambda: [None, None])
    """Where its last message on each CP topic (cp.status, cp.telemetry) stood in the
    read progress of its partition (:meth:`Controller.silence`)."""
    partitions: tuple[int, ...] = ()
    """Its partition on each CP topic, for the partition counts in ``partitions_for``."""
    partitions_for: tuple[int, ...] = ()
    session: ActiveSession | None = None
    last_telemetry: CPTelemetry | None = None
    state_reason: str | None = None
    last_end: SessionEnd | None = None
    """The last session end this CP reported that the ledger has recorded."""
    last_closed: str | None = None
    """The id of the last session that ended on this CP (late meter reports name it)."""
    monitor_interval: float | None = None
    """The health interval its monitor announced (None: no monitor has reported)."""
    monitor_seen: float = 0.0
    """Controller clock reading of the monitor's last report."""
    monitor_lost: bool = False
    snapshot_key: tuple[object, ...] | None = None
    """What the last health snapshot of this CP recorded (no new one while unchanged)."""
    registered: bool = True
    """Registered by a monitor, the fleet or the gateway; False for a CP known only from
    the bus (capped, and forgotten after an hour of silence). Never goes back to False."""
    tally: Tally | None = field(default=None, repr=False, compare=False)
    """The tally that counts this CP in the network's summary (None: none does)."""
    tallied: Part | None = field(default=None, repr=False, compare=False)
    tallied_ukw: int = field(default=0, repr=False, compare=False)
    """What the tally counted for this CP last (its key, its power in µkW)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "registered":
            before = self.__dict__.get("registered")
            object.__setattr__(self, name, value)
            tally = self.__dict__.get("tally")
            if tally is not None and before is not None and before != value:
                tally.reclassify(self)
            return
        object.__setattr__(self, name, value)
        if name in SUMMARY_FIELDS:
            if name == "session" and isinstance(value, ActiveSession):
                object.__setattr__(value, "view", self)
            self.touched()

    def touched(self) -> None:
        """A summary field changed: the tally recounts this CP before its next answer."""
        tally = self.__dict__.get("tally")
        if tally is not None:
            tally.touch(self)

    @property
    def monitored(self) -> bool:
        """Whether a monitor watches this CP: it reported within 3 of its intervals."""
        return self.monitor_interval is not None and not self.monitor_lost

    def record(self) -> CPRecord:
        return CPRecord(
            cp_id=self.cp_id,
            state=self.state,
            location=self.location,
            kw_rate=self.kw_rate,
            euro_rate=self.euro_rate,
            health_url=self.health_url,
            is_faulty=self.is_faulty,
            fault_reason=self.fault_reason,
            registered_at=self.registered_at,
            updated_at=utcnow(),
            state_reason=self.state_reason,
            breaker_state=self.breaker.state,
            breaker_failures=self.breaker.failures,
            breaker_reason=self.breaker.reason,
            site=self.site,
            registered=self.registered,
            protocol=self.protocol,
            vendor=self.vendor,
            model=self.model,
        )

    def health_key(self) -> tuple[object, ...]:
        return (self.state, self.is_faulty, self.breaker.state,
                self.session.session_id if self.session else None)

    def snapshot(self) -> HealthSnapshot:
        self.snapshot_key = self.health_key()
        return HealthSnapshot(
            cp_id=self.cp_id,
            state=self.state,
            is_faulty=self.is_faulty,
            breaker_state=self.breaker.state.value,
            ts=utcnow(),
            session_id=self.session.session_id if self.session else None,
        )
