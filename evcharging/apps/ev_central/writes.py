"""What Central writes, named by what happened (SPEC §4, §7): the outbox's typed writes.

The controller, housekeeping and energy queue these with ``outbox.write(...)``; a
repository applies any number of them in one transaction. Pure: no SQL here, only the
adapters know how each one is stored (a table from type to statement). Each write checks
its values when it is built, so that a bad value fails the decision that made it, never a
later flush that carries other decisions too.

A write is never changed once built. The classes are slotted dataclasses, not frozen ones:
Central builds thousands a second on its hot path, and a frozen dataclass's ``__init__``
costs about four times as much (0.9 µs against 0.2 µs for four fields; a tuple, the
SQL parameters this replaces, 0.1 µs).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from datetime import datetime

from evcharging.apps.ev_central.records import (
    SESSION_ACTIVE,
    SESSION_STATUSES,
    CPRecord,
    HealthSnapshot,
    SessionRecord,
    amount,
)

__all__ = [
    "CPForgotten",
    "CPUpserted",
    "CentralSaved",
    "ClaimsCut",
    "CompletedByMeter",
    "FaultRecorded",
    "HealthPruned",
    "HealthRecorded",
    "PendingSaved",
    "PendingSettled",
    "RequestLogged",
    "SessionFinished",
    "SessionOpened",
    "SessionStarted",
    "SiteLimitRemoved",
    "SiteLimitSet",
    "TotalsCorrected",
    "Write",
]


@dataclass(slots=True)
class CPUpserted:
    """A CP registered or changed: every field of it but ``registered_at`` (kept from its
    first insert); `now` fills ``registered_at``/``updated_at`` the record leaves unset."""

    cp: CPRecord
    now: datetime


@dataclass(slots=True)
class CPForgotten:
    """A CP known only from the bus was forgotten (a registered CP is never deleted)."""

    cp_id: str


@dataclass(slots=True)
class RequestLogged:
    """A request was decided (ignored when it was decided before)."""

    request_id: str
    driver_id: str
    cp_id: str
    decision: str
    reason: str | None
    ts: datetime


@dataclass(slots=True)
class SessionOpened:
    """A session was accepted (ignored when its session_id or request_id is stored)."""

    session: SessionRecord

    def __post_init__(self) -> None:
        if self.session.status not in SESSION_STATUSES:
            raise ValueError(f"unknown session status {self.session.status!r}")
        amount("kwh", self.session.kwh)
        amount("euros", self.session.euros)


@dataclass(slots=True)
class SessionStarted:
    """A running session is dated by its CP's first report of it (SPEC §4: sessions are
    dated by their CP's times; `first_report` is that report's own time, unclamped)."""

    session_id: str
    started_at: datetime
    first_report: datetime


@dataclass(slots=True)
class SessionFinished:
    """An ACTIVE session ended with a final status (an ended one is left as it is)."""

    session_id: str
    status: str
    _: KW_ONLY
    kwh: float
    euros: float
    reason: str | None
    ended_at: datetime
    meter_final: bool = False

    def __post_init__(self) -> None:
        if self.status == SESSION_ACTIVE or self.status not in SESSION_STATUSES:
            raise ValueError(f"{self.status!r} is not a final session status")
        amount("kwh", self.kwh)
        amount("euros", self.euros)


@dataclass(slots=True)
class TotalsCorrected:
    """An ended session's totals, as a later meter report gives them."""

    session_id: str
    _: KW_ONLY
    kwh: float
    euros: float
    meter_final: bool

    def __post_init__(self) -> None:
        amount("kwh", self.kwh)
        amount("euros", self.euros)


@dataclass(slots=True)
class CompletedByMeter:
    """A session Central had closed FAILED that its CP's meter completed (SPEC §4: a CP
    that completed a session is never recorded FAILED)."""

    session_id: str
    reason: str


@dataclass(slots=True)
class FaultRecorded:
    """A fault, recovery or monitor event of a CP."""

    cp_id: str
    event_type: str
    reason: str | None
    ts: datetime


@dataclass(slots=True)
class HealthRecorded:
    """A CP's health at one moment."""

    snapshot: HealthSnapshot


@dataclass(slots=True)
class HealthPruned:
    """Health snapshots older than `before` are forgotten (the history's retention)."""

    before: datetime


@dataclass(slots=True)
class PendingSaved:
    """An instance's last flush, replacing its one before (one row per instance)."""

    instance: str
    token: str
    """The flush's mark on the offsets it commits: whether Kafka has it (SPEC §4)."""
    offsets: str
    messages: str


@dataclass(slots=True)
class PendingSettled:
    """An instance's last flush is in Kafka, or was sent by its successor (SPEC §9)."""

    instance: str


@dataclass(slots=True)
class CentralSaved:
    """A Central says where it answers and which partitions it owns (SPEC §9)."""

    instance: str
    peer_url: str
    transactional_id: str
    partitions: frozenset[int]
    partition_count: int
    seen_at: datetime


@dataclass(slots=True)
class ClaimsCut:
    """A crashed Central's claims, less the partitions its successor took over."""

    instance: str
    partitions: frozenset[int]


@dataclass(slots=True)
class SiteLimitSet:
    """A site's power limit set or replaced (SPEC §10)."""

    site: str
    kw: float
    now: datetime

    def __post_init__(self) -> None:
        amount("kw", self.kw)


@dataclass(slots=True)
class SiteLimitRemoved:
    """A site's power limit removed (nothing when it has none)."""

    site: str


Write = (
    CPUpserted | CPForgotten | RequestLogged | SessionOpened | SessionStarted
    | SessionFinished | TotalsCorrected | CompletedByMeter | FaultRecorded | HealthRecorded
    | HealthPruned | PendingSaved | PendingSettled | CentralSaved | ClaimsCut | SiteLimitSet
    | SiteLimitRemoved
)
"""One write; a sequence of them is one transaction."""
