"""EV Driver: asks to charge at each CP of a requests file, one after the other.

For each CP id the driver publishes a :class:`DriverRequest` with a fresh ``request_id`` on
``driver.requests`` and follows the :class:`DriverUpdate` messages that Central sends back
on ``driver.updates`` (fed in through :meth:`Driver.handle_update`, the consumer's
handler) until a final status (COMPLETED, DENIED, FAILED). A request with no update for
``request_timeout`` seconds is given up and counted as timed out: the timer restarts on
every update, so a long charging session that keeps reporting progress is never cut off.
Between two requests the driver waits ``request_interval`` seconds; :meth:`Driver.stop`
ends that wait and the following of the current request at once.

The requests file holds one CP id per line; blank lines and ``#`` comments (whole-line or
trailing) are skipped and surrounding whitespace is stripped. An invalid id is logged and
skipped (as is a line with blanks but no ``key=value`` after its first word). After the
id a line may give the fields of SPEC §10 as ``key=value``, in any order, separated by
blanks::

    CP-001 kwh=20 departure=+2h car=60/0.35/11

* ``kwh=K``: the energy wanted, in kWh (> 0); the session ends when it is delivered.
* ``departure=+2h`` (also ``+90m``, ``+1h30m``: counted from when the request is sent) or
  an ISO 8601 time with its zone (``2026-12-07T18:00Z``): when the car leaves.
* ``car=B/S/M``: the car's battery in kWh, its state of charge at arrival (0–1) and the
  most it takes in kW.

A bad field (an unknown key, one given twice, a value out of range) is an error naming the
line (:class:`RequestsFileError`): nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from loguru import logger
from pydantic import ValidationError

from evcharging.common.bus import BusError, Publisher
from evcharging.common.messages import (
    ID_PATTERN,
    CarSpec,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    new_id,
    utcnow,
)

__all__ = [
    "Driver",
    "DriverSummary",
    "Outcome",
    "PlannedRequest",
    "Publisher",
    "RequestResult",
    "RequestsFileError",
    "load_plan",
    "load_requests",
    "log_summary",
    "parse_plan",
    "parse_requests",
    "plan_text",
]

_CP_ID = re.compile(ID_PATTERN)
_RELATIVE = re.compile(r"\+(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?")
"""``+2h``, ``+90m``, ``+1h30m``, ``+1.5h``."""
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


class Outcome(StrEnum):
    """How one request ended, from the driver's point of view."""

    COMPLETED = "COMPLETED"
    DENIED = "DENIED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    INTERRUPTED = "INTERRUPTED"
    """The driver was stopped while it followed the request."""
    NOT_SENT = "NOT_SENT"
    """Publishing the request failed."""


@dataclass(frozen=True)
class RequestResult:
    cp_id: str
    request_id: str
    outcome: Outcome
    reason: str | None = None
    kwh: float = 0.0
    euros: float = 0.0


@dataclass
class DriverSummary:
    """What a run achieved. ``requests`` counts the requests that were sent."""

    planned: int = 0
    requests: int = 0
    completed: int = 0
    denied: int = 0
    failed: int = 0
    timed_out: int = 0
    interrupted: int = 0
    total_kwh: float = 0.0
    total_euros: float = 0.0
    finished: bool = False
    """Every CP of the file was tried (False when stopped early or the bus failed)."""
    bus_error: str | None = None
    results: list[RequestResult] = field(default_factory=list)

    def correct(
        self, request_id: str, status: DriverStatus, kwh: float, euros: float
    ) -> RequestResult | None:
        """Central corrected a finished request (the CP's meter reported later): its
        totals, or a FAILED the CP's meter completed after all. The result and the run's
        totals follow. None for a request not in this run, or one that ended otherwise
        (DENIED, timed out)."""
        outcome = {DriverStatus.COMPLETED: Outcome.COMPLETED,
                   DriverStatus.FAILED: Outcome.FAILED}.get(status)
        settled = (Outcome.COMPLETED, Outcome.FAILED)
        for index, result in enumerate(self.results):
            if (outcome is None or result.request_id != request_id
                    or result.outcome not in settled):
                continue
            if result.outcome is Outcome.COMPLETED:
                self.total_kwh -= result.kwh
                self.total_euros -= result.euros
            if outcome is Outcome.COMPLETED:
                self.total_kwh += kwh
                self.total_euros += euros
            if outcome is not result.outcome:  # FAILED → COMPLETED by the CP's meter
                self.completed += 1 if outcome is Outcome.COMPLETED else -1
                self.failed += 1 if outcome is Outcome.FAILED else -1
            self.results[index] = replace(result, outcome=outcome, kwh=kwh, euros=euros)
            return self.results[index]
        return None

    def add(self, result: RequestResult) -> None:
        self.results.append(result)
        if result.outcome is Outcome.NOT_SENT:
            return
        self.requests += 1
        match result.outcome:
            case Outcome.COMPLETED:
                self.completed += 1
                self.total_kwh += result.kwh
                self.total_euros += result.euros
            case Outcome.DENIED:
                self.denied += 1
            case Outcome.FAILED:
                self.failed += 1
            case Outcome.TIMED_OUT:
                self.timed_out += 1
            case Outcome.INTERRUPTED:
                self.interrupted += 1


class RequestsFileError(ValueError):
    """A requests file's line with a bad field; the message names the file and the line."""


@dataclass(frozen=True)
class PlannedRequest:
    """One line of a requests file: the CP and the optional fields of SPEC §10."""

    cp_id: str
    kwh_wanted: float | None = None
    departure: datetime | timedelta | None = None
    """When the car leaves: a time, or a delay counted from when the request is sent."""
    car: CarSpec | None = None

    def request(self, request_id: str, driver_id: str, now: datetime) -> DriverRequest:
        """The request to send at `now`."""
        departure = self.departure
        if isinstance(departure, timedelta):
            departure = now + departure
        return DriverRequest(request_id=request_id, driver_id=driver_id, cp_id=self.cp_id,
                             ts=now, kwh_wanted=self.kwh_wanted, departure=departure,
                             car=self.car)

    def describe(self) -> str:
        """The CP id and the fields given, for the log."""
        parts = [self.cp_id]
        if self.kwh_wanted is not None:
            parts.append(f"{self.kwh_wanted:g} kWh wanted")
        if isinstance(self.departure, timedelta):
            parts.append(f"leaving in {self.departure}")
        elif self.departure is not None:
            parts.append(f"leaving at {self.departure.isoformat()}")
        if self.car is not None:
            car = self.car
            parts.append(f"car {car.battery_kwh:g} kWh at {car.soc:.0%}, {car.max_kw:g} kW")
        return ", ".join(parts)


def _departure(text: str) -> datetime | timedelta:
    relative = _RELATIVE.fullmatch(text)
    if relative is not None and text != "+":
        hours, minutes = relative.groups()
        delay = timedelta(hours=float(hours or 0), minutes=float(minutes or 0))
        if delay <= timedelta(0):
            raise ValueError("a departure from now must be later than now")
        return delay
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"departure {text!r} is neither +2h, +90m, +1h30m nor an ISO 8601 "
                         "time such as 2026-12-07T18:00Z") from None
    if when.tzinfo is None:
        raise ValueError(f"departure {text!r} needs its time zone (e.g. a trailing Z)")
    return when.astimezone(UTC)


def _number(key: str, text: str) -> float:
    if _NUMBER.fullmatch(text) is None:
        raise ValueError(f"{key} {text!r} is not a number")
    return float(text)


def _car(text: str) -> CarSpec:
    parts = text.split("/")
    if len(parts) != 3:
        raise ValueError(f"car {text!r} is not battery_kwh/soc/max_kw (e.g. 60/0.35/11)")
    battery, soc, max_kw = (_number(name, part) for name, part in
                            zip(("battery_kwh", "soc", "max_kw"), parts, strict=True))
    try:
        return CarSpec(battery_kwh=battery, soc=soc, max_kw=max_kw)
    except ValidationError as exc:
        raise ValueError(_problems(exc, "car.")) from None


def _problems(exc: ValidationError, prefix: str = "") -> str:
    """A validation error's problems in one line: ``field: message; …``."""
    return "; ".join(
        f"{prefix}{'.'.join(str(p) for p in error['loc']) or 'value'}: {error['msg']}"
        for error in exc.errors())


def _fields(cp_id: str, tokens: Sequence[str]) -> PlannedRequest:
    """The fields after a line's CP id; ValueError naming what is wrong."""
    given: dict[str, str] = {}
    for token in tokens:
        key, _, value = token.partition("=")
        if not value:
            raise ValueError(f"{token!r} is not key=value (kwh=20, departure=+2h, "
                             "car=60/0.35/11)")
        if key not in ("kwh", "departure", "car"):
            raise ValueError(f"unknown field {key!r} (known: kwh, departure, car)")
        if key in given:
            raise ValueError(f"{key} given twice")
        given[key] = value
    try:
        kwh = _number("kwh", given["kwh"]) if "kwh" in given else None
        departure = _departure(given["departure"]) if "departure" in given else None
        car = _car(given["car"]) if "car" in given else None
        planned = PlannedRequest(cp_id, kwh, departure, car)
        planned.request("check", "check", utcnow())  # the message's own ranges
    except ValidationError as exc:
        raise ValueError(_problems(exc)) from None
    return planned


def parse_plan(text: str, source: str = "requests") -> list[PlannedRequest]:
    """The requests of a requests file's text, in order; invalid CP ids are logged and
    skipped, a bad field raises :class:`RequestsFileError` naming its line."""
    plan: list[PlannedRequest] = []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        cp_id = tokens[0]
        if _CP_ID.fullmatch(cp_id) is None or not all("=" in t for t in tokens[1:]):
            # Blanks without key=value fields: an id with blanks, as before the fields.
            logger.warning("{} line {}: skipped invalid CP id {!r}", source, number,
                           " ".join(tokens))
            continue
        try:
            plan.append(_fields(cp_id, tokens[1:]))
        except ValueError as exc:
            raise RequestsFileError(f"{source} line {number}: {exc}") from None
    return plan


def parse_requests(text: str, source: str = "requests") -> list[str]:
    """The CP ids of a requests file's text, in order (see :func:`parse_plan`)."""
    return [planned.cp_id for planned in parse_plan(text, source)]


def load_plan(path: Path) -> list[PlannedRequest]:
    """Read a requests file (UTF-8); raises OSError (e.g. FileNotFoundError) or
    UnicodeDecodeError when it cannot be read, RequestsFileError for a bad field."""
    return parse_plan(path.read_text(encoding="utf-8"), source=str(path))


def load_requests(path: Path) -> list[str]:
    """The CP ids of a requests file (see :func:`load_plan`)."""
    return [planned.cp_id for planned in load_plan(path)]


class Driver:
    """One EV driver: sends its requests one by one and follows each to its end."""

    def __init__(
        self,
        driver_id: str,
        publisher: Publisher,
        *,
        request_timeout: float = 60.0,
        request_interval: float = 4.0,
    ) -> None:
        if _CP_ID.fullmatch(driver_id) is None:
            raise ValueError(f"invalid driver id {driver_id!r}")
        if request_timeout <= 0 or request_interval < 0:
            raise ValueError("need request_timeout > 0 and request_interval >= 0")
        self.driver_id = driver_id
        self.request_timeout = request_timeout
        self.request_interval = request_interval
        self._publisher = publisher
        self._waiting: dict[str, asyncio.Queue[DriverUpdate | None]] = {}
        """The updates of each request being followed; None in a queue means "stop"."""
        self._stopping = asyncio.Event()
        self.ignored_updates = 0
        self._summary: DriverSummary | None = None
        """The run in progress: a late correction of a finished request updates it."""

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Stop following the current request and send no more; run() returns soon."""
        self._stopping.set()
        for queue in self._waiting.values():
            queue.put_nowait(None)

    async def handle_update(self, update: DriverUpdate) -> None:
        """Consumer handler for driver.updates: route an update to the request it is for."""
        if update.driver_id != self.driver_id:
            logger.debug("ignored an update for driver {}", update.driver_id)
            self.ignored_updates += 1
            return
        queue = self._waiting.get(update.request_id)
        if (queue is None and self._summary is not None
                and (update.reason or "").startswith("corrected:")):
            corrected = self._summary.correct(
                update.request_id, update.status, update.kwh or 0.0, update.euros or 0.0
            )
            if corrected is not None:
                logger.info("{} at {} corrected by Central: {} kWh, {} € ({})",
                            update.status.value, update.cp_id, _num(update.kwh, 4),
                            _num(update.euros, 4), update.reason or "no reason given")
                return
        if queue is None:
            logger.debug(
                "ignored a {} update for unknown or finished request {}",
                update.status.value, update.request_id,
            )
            self.ignored_updates += 1
            return
        queue.put_nowait(update)

    async def run(self, requests: Iterable[str | PlannedRequest]) -> DriverSummary:
        """Request a charge at each CP in order (a CP id, or a line of a requests file with
        its fields); returns (and logs) the summary."""
        plan = [PlannedRequest(r) if isinstance(r, str) else r for r in requests]
        summary = self._summary = DriverSummary(planned=len(plan))
        for index, planned in enumerate(plan):
            if self.stopping:
                break
            result = await self._request(planned)
            summary.add(result)
            if result.outcome is Outcome.NOT_SENT:
                summary.bus_error = result.reason
                break
            if index + 1 < len(plan) and self.request_interval > 0:
                await self._pause(self.request_interval)
        else:
            summary.finished = True
        log_summary(self.driver_id, summary)
        return summary

    async def _request(self, planned: PlannedRequest) -> RequestResult:
        cp_id = planned.cp_id
        request_id = new_id()
        queue: asyncio.Queue[DriverUpdate | None] = asyncio.Queue()
        # Registered before publishing, so an answer that arrives at once is not lost.
        self._waiting[request_id] = queue
        try:
            request = planned.request(request_id, self.driver_id, utcnow())
            try:
                await self._publisher.publish(request)
            except BusError as exc:
                logger.error("could not send the request for {}: {}", cp_id, exc)
                return RequestResult(cp_id, request_id, Outcome.NOT_SENT, reason=str(exc))
            logger.info("requested a charge at {} (request {})", planned.describe(), request_id)
            return await self._follow(cp_id, request_id, queue)
        finally:
            del self._waiting[request_id]

    async def _follow(
        self, cp_id: str, request_id: str, queue: asyncio.Queue[DriverUpdate | None]
    ) -> RequestResult:
        last_progress: DriverUpdate | None = None
        while True:
            update = await self._next_update(queue)
            if update is None:
                if self.stopping:
                    logger.warning("stopped while following the request at {}", cp_id)
                    return RequestResult(cp_id, request_id, Outcome.INTERRUPTED)
                logger.warning(
                    "no answer for the request at {} within {:g} s; giving up",
                    cp_id, self.request_timeout,
                )
                return RequestResult(cp_id, request_id, Outcome.TIMED_OUT)
            _log_update(update)
            status = update.status
            if status is DriverStatus.IN_PROGRESS:
                last_progress = update
            if not status.is_final:
                continue
            if status is DriverStatus.COMPLETED:
                kwh = _first(update.kwh, last_progress.kwh if last_progress else None)
                euros = _first(update.euros, last_progress.euros if last_progress else None)
                return RequestResult(cp_id, request_id, Outcome.COMPLETED, update.reason,
                                     kwh=kwh, euros=euros)
            if status is DriverStatus.DENIED:
                return RequestResult(cp_id, request_id, Outcome.DENIED, update.reason)
            return RequestResult(cp_id, request_id, Outcome.FAILED, update.reason,
                                 kwh=update.kwh or 0.0, euros=update.euros or 0.0)

    async def _next_update(
        self, queue: asyncio.Queue[DriverUpdate | None]
    ) -> DriverUpdate | None:
        """The next update, or None on timeout or stop (stop() puts None in the queue)."""
        try:
            async with asyncio.timeout(self.request_timeout):
                return await queue.get()
        except TimeoutError:
            return None

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less when stop() is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


def _first(*values: float | None) -> float:
    return next((v for v in values if v is not None), 0.0)


def _log_update(update: DriverUpdate) -> None:
    """One update, coloured by status (the values are never parsed as markup)."""
    log = logger.opt(colors=True)
    cp_id, reason = update.cp_id, update.reason or "no reason given"
    match update.status:
        case DriverStatus.ACCEPTED:
            log.info("<cyan>ACCEPTED at {} (session {})</cyan>", cp_id, update.session_id or "-")
        case DriverStatus.IN_PROGRESS:
            log.info(
                "<blue>IN_PROGRESS at {}: {} kW, {} kWh, {} €</blue>",
                cp_id, _num(update.kw, 1), _num(update.kwh, 3), _num(update.euros, 2),
            )
        case DriverStatus.COMPLETED:
            log.info(
                "<green>COMPLETED at {}: {} kWh, {} €</green>",
                cp_id, _num(update.kwh, 3), _num(update.euros, 2),
            )
        case DriverStatus.DENIED:
            log.info("<yellow>DENIED at {}: {}</yellow>", cp_id, reason)
        case DriverStatus.FAILED:
            log.info("<red>FAILED at {}: {}</red>", cp_id, reason)


def _num(value: float | None, digits: int) -> str:
    return "?" if value is None else f"{value:.{digits}f}"


def log_summary(driver_id: str, summary: DriverSummary) -> None:
    """Log the summary of a run in one line."""
    how = "done" if summary.finished else "stopped early"
    logger.info(
        "summary for {} ({}): {} request(s) of {} planned: {} completed, {} denied, "
        "{} failed, {} timed out, {} interrupted; {:.3f} kWh, {:.2f} €",
        driver_id, how, summary.requests, summary.planned, summary.completed,
        summary.denied, summary.failed, summary.timed_out, summary.interrupted,
        summary.total_kwh, summary.total_euros,
    )


def plan_text(cp_ids: Sequence[str]) -> str:
    """A short description of a plan for the start-up log line."""
    return ", ".join(cp_ids) if len(cp_ids) <= 10 else f"{', '.join(cp_ids[:10])}, …"
