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
skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from loguru import logger

from evcharging.common.bus import BusError, Publisher
from evcharging.common.messages import (
    ID_PATTERN,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    new_id,
)

__all__ = [
    "Driver",
    "DriverSummary",
    "Outcome",
    "Publisher",
    "RequestResult",
    "load_requests",
    "log_summary",
    "parse_requests",
    "plan_text",
]

_CP_ID = re.compile(ID_PATTERN)


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


def parse_requests(text: str, source: str = "requests") -> list[str]:
    """The CP ids of a requests file's text, in order; invalid ids are logged and skipped."""
    cp_ids: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        cp_id = line.split("#", 1)[0].strip()
        if not cp_id:
            continue
        if _CP_ID.fullmatch(cp_id) is None:
            logger.warning("{} line {}: skipped invalid CP id {!r}", source, number, cp_id)
            continue
        cp_ids.append(cp_id)
    return cp_ids


def load_requests(path: Path) -> list[str]:
    """Read a requests file (UTF-8); raises OSError (e.g. FileNotFoundError) or
    UnicodeDecodeError when it cannot be read."""
    return parse_requests(path.read_text(encoding="utf-8"), source=str(path))


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

    async def run(self, cp_ids: Iterable[str]) -> DriverSummary:
        """Request a charge at each CP in order; returns (and logs) the summary."""
        plan = list(cp_ids)
        summary = self._summary = DriverSummary(planned=len(plan))
        for index, cp_id in enumerate(plan):
            if self.stopping:
                break
            result = await self._request(cp_id)
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

    async def _request(self, cp_id: str) -> RequestResult:
        request_id = new_id()
        queue: asyncio.Queue[DriverUpdate | None] = asyncio.Queue()
        # Registered before publishing, so an answer that arrives at once is not lost.
        self._waiting[request_id] = queue
        try:
            request = DriverRequest(request_id=request_id, driver_id=self.driver_id, cp_id=cp_id)
            try:
                await self._publisher.publish(request)
            except BusError as exc:
                logger.error("could not send the request for {}: {}", cp_id, exc)
                return RequestResult(cp_id, request_id, Outcome.NOT_SENT, reason=str(exc))
            logger.info("requested a charge at {} (request {})", cp_id, request_id)
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
