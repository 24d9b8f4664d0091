"""CP Monitor: the watchdog of one charging point. It speaks HTTP only (no Kafka).

Over 400 lines: the monitor's three loops and their HTTP calls with the outage rules;
its decisions are the pure :mod:`~evcharging.apps.ev_cp_m.watch`.

Three owned tasks run side by side (in a :class:`~evcharging.common.service.TaskOwner`: one
that fails is logged once and stops the monitor, whose process then exits 1):

* the **checker** GETs the CP Engine's ``/health`` every ``health_interval`` seconds. A
  check fails on a connection error, a timeout (``health_timeout``, for the whole call) or
  any answer but 200 (the engine answers 503 while in FAULT). After ``failure_threshold``
  consecutive failures the CP is declared faulty and one fault report is queued; the first
  check that passes after that queues one recovery report.
* the **Central link** registers the CP (``POST /cp/register``) and delivers the queued
  reports (``POST /cp/fault``). Every call is retried with exponential backoff (0.5 s
  doubling up to 10 s) until Central takes it. Only the newest undelivered report is kept:
  when the CP recovers before its fault report got through, Central is told the latest
  truth. A 404 (Central does not know the CP, e.g. it lost its registry) makes the monitor
  register again and then retry; a 401/403 is logged as an error about the API token and
  retried (Central may be restarted with the right token). Other 4xx answers to a report
  are logged and the report is dropped, since sending it again cannot help.
* the **liveness reporter** tells Central every ``health_interval`` that the monitor is
  alive (``POST /cp/{cp_id}/monitor`` with ``{"interval", "healthy"}``, ``healthy`` being
  whether the last health check passed), so that Central can show which CPs are watched
  (SPEC §5 ``monitored``). It starts once the CP is registered. A 404 naming the CP as
  unknown makes the monitor register again; a 404 or 405 for the route itself means an
  older Central without it: logged once, tried again every ``liveness_retry`` seconds
  (60), while everything else goes on.

The decisions (threshold, one report per fault, the recovery, the newest report wins) are
:class:`~evcharging.apps.ev_cp_m.watch.Watch`'s, which the CP Fleet's in-process
monitoring uses too; this module does the HTTP around them.

Central may be several (SPEC §9: ``CP_MONITOR_CENTRAL_HOST=h1,h2`` or ``h1:8000,h2:8001``):
each call goes to the Central in use and moves to the next while one does not answer
(:class:`~evcharging.common.centrals.AnyDoor`); the backoff applies when none answers.

While Central is unreachable the monitor keeps checking and logs one warning per outage,
plus one line when Central answers again. State changes of its view of the CP
(healthy → failing → FAULT → recovered) are logged at INFO (the fault itself at WARNING);
each check is logged at DEBUG.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from enum import Enum
from typing import Any

import httpx
from loguru import logger

from evcharging.apps.ev_cp_m.watch import (
    RECOVERY_REASON,
    STARTUP_HEALTHY_REASON,
    Change,
    Failure,
    HealthView,
    Step,
    Watch,
    clip,
    kind,
)
from evcharging.common.backoff import doubling, until_done
from evcharging.common.centrals import AnyDoor, refusal_of
from evcharging.common.config import CPMonitorSettings
from evcharging.common.messages import CPFaultReport, CPRegistration, MonitorReport
from evcharging.common.service import TaskOwner

__all__ = [
    "RECOVERY_REASON",
    "STARTUP_HEALTHY_REASON",
    "HealthView",
    "Monitor",
    "MonitorStats",
    "connect_reason",
    "describe_http_error",
    "error_code",
]

_MAX_DETAIL = 200


@dataclass
class MonitorStats:
    """Counters of one monitor (read them, do not write them)."""

    checks: int = 0
    failures: int = 0
    """Failed health checks, in total."""
    reports_sent: int = 0
    """Fault and recovery reports that Central accepted."""
    fault_reports_sent: int = 0
    recovery_reports_sent: int = 0
    report_attempts: int = 0
    registrations: int = 0
    """Successful registrations (more than one when Central forgot the CP)."""
    central_errors: int = 0
    """Calls to Central that failed or were refused."""
    liveness_sent: int = 0
    """Liveness reports Central accepted."""

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class _Outcome(Enum):
    OK = "ok"
    RETRY = "retry"
    """Central is down, answered 5xx or refused the token: try again after a backoff."""
    UNKNOWN_CP = "unknown CP"
    """404: Central does not know the CP; register again."""
    REJECTED = "rejected"
    """Another 4xx: the request itself is wrong."""
    NO_ROUTE = "no route"
    """404 (not about the CP) or 405 for a route a Central may not have: an older Central."""


class Monitor:
    """Watch one CP Engine and report its faults and recoveries to Central.

    ``client`` may be injected (tests pass one with an ``httpx.MockTransport``); the monitor
    closes only a client it created itself. ``retry_initial``/``retry_max`` bound the
    backoff of calls to Central; ``liveness_retry`` is how often the liveness report is
    tried again on a Central that lacks its route. Use ``start()``/``stop()``,
    ``async with``, or ``run(stop)``.
    """

    def __init__(
        self,
        settings: CPMonitorSettings,
        client: httpx.AsyncClient | None = None,
        *,
        retry_initial: float = 0.5,
        retry_max: float = 10.0,
        central_timeout: float = 5.0,
        liveness_retry: float = 60.0,
    ) -> None:
        if retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("need 0 < retry_initial <= retry_max")
        self.settings = settings
        self.stats = MonitorStats()
        self.watch = Watch(settings.cp_id, settings.failure_threshold)
        """What the monitor believes about its CP (the decisions, shared with the fleet)."""
        self.health_url = f"http://{settings.cp_e_host}:{settings.cp_e_port}/health"
        self.centrals = AnyDoor.parse(settings.central_host, settings.central_port)
        """Central's addresses (SPEC §9: a list; a call moves on while one does not answer)."""
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._central_timeout = central_timeout
        self._liveness_retry = liveness_retry
        self._liveness_unsupported = False
        self._headers: dict[str, str] = {}
        if settings.api_token is not None:
            self._headers["Authorization"] = f"Bearer {settings.api_token.get_secret_value()}"
        self._registered = asyncio.Event()
        self._wake = asyncio.Event()
        self._central_problem: str | None = None
        self._tasks = TaskOwner(f"monitor {settings.cp_id}")
        self._started = False
        self._stopped = False

    # ----------------------------------------------------------------- lifecycle

    @property
    def central_url(self) -> str:
        """The base URL of the Central in use."""
        return self.centrals.url

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    @property
    def view(self) -> HealthView:
        """What the monitor currently believes about its CP."""
        return self.watch.view

    @property
    def consecutive_failures(self) -> int:
        return self.watch.consecutive_failures

    @property
    def pending_report(self) -> CPFaultReport | None:
        """The newest report Central has not accepted yet, if any."""
        return self.watch.pending

    @property
    def running(self) -> bool:
        return len(self._tasks) > 0

    async def start(self) -> None:
        """Start the checker, the Central link and the liveness reporter; returns at once."""
        if self._stopped:
            raise RuntimeError("a stopped monitor cannot start again")
        if self._started:
            raise RuntimeError("the monitor is already started")
        self._started = True
        s = self.settings
        logger.info(
            "monitoring {} at {} every {:g} s (timeout {:g} s, fault after {} failures); "
            "reporting to Central at {}",
            s.cp_id, self.health_url, s.health_interval, s.health_timeout,
            s.failure_threshold, self.centrals.describe(),
        )
        self._tasks.spawn(self._check_loop(), f"monitor {s.cp_id} health checks", forever=True)
        self._tasks.spawn(self._central_loop(), f"monitor {s.cp_id} Central link", forever=True)
        self._tasks.spawn(self._liveness_loop(), f"monitor {s.cp_id} liveness", forever=True)

    async def stop(self) -> None:
        """Cancel and await the tasks, then close the client if it is ours. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self._tasks.close()
        if self.watch.pending is not None:
            logger.warning(
                "stopping with an undelivered {} report", kind(self.watch.pending)
            )
        if self._owns_client and not self._client.is_closed:
            await self._client.aclose()
        if self._started:
            logger.info("monitor stopped ({})", self.stats.as_dict())

    async def __aenter__(self) -> Monitor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def run(self, stop: asyncio.Event) -> bool:
        """Monitor until `stop` is set or one of its tasks fails (logged once, with its
        traceback); returns whether one failed."""
        await self.start()
        try:
            return await self._tasks.wait(stop)
        finally:
            await self.stop()

    # ----------------------------------------------------------------- health checks

    async def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.health_interval
        next_at = loop.time()
        while True:
            await self.check_once()
            next_at += interval
            now = loop.time()
            if next_at < now:  # a slow check: do not fire the missed ones in a burst
                next_at = now
            await asyncio.sleep(next_at - now)

    async def check_once(self) -> bool:
        """Run one health check, update the view and queue a report if needed."""
        self.stats.checks += 1
        failure = await self._probe()
        if failure is None:
            self._apply(self.watch.passed())
            return True
        self.stats.failures += 1
        self._apply(self.watch.failed(failure))
        return False

    async def _probe(self) -> Failure | None:
        timeout = self.settings.health_timeout
        try:
            async with asyncio.timeout(timeout):
                response = await self._client.get(self.health_url, timeout=timeout)
        except (TimeoutError, httpx.TimeoutException):
            return Failure(f"timed out after {timeout:g} s")
        except httpx.ConnectError as exc:
            return Failure(connect_reason(exc))
        except httpx.HTTPError as exc:
            return Failure(describe_http_error(exc))
        if response.status_code == 200:
            logger.debug("health check ok: {}", clip(response.text, 120))
            return None
        return _unhealthy(response)

    def _apply(self, step: Step) -> None:
        """Log what a check changed; wake the Central link when a report is queued."""
        if step.change is not Change.HEALTHY:  # the probe logged that, with the body
            logger.log(step.level, "{}", step.message)
        if step.superseded is not None:
            logger.info("the undelivered {} report is superseded by a {} report",
                        kind(step.superseded),
                        "fault" if step.change is Change.FAULT else "recovery")
        if self.watch.pending is not None:
            self._wake.set()

    # ----------------------------------------------------------------- Central link

    async def _central_loop(self) -> None:
        wait = doubling(self._retry_initial, self._retry_max)
        while True:
            if self._registered.is_set() and self.watch.pending is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Tried with backoff until one call gets somewhere; the schedule starts over
            # for the next (a fresh registration's reports go at once, without a pause).
            await until_done(self._central_step, wait)

    async def _central_step(self) -> bool:
        """One call to Central: register, else deliver the pending report. Whether it
        got somewhere (registered, the report delivered or dropped, nothing to do)."""
        if not self._registered.is_set():
            if await self._register() is _Outcome.OK:
                self._registered.set()
                return True
            return False
        report = self.watch.pending
        if report is None:
            return True
        outcome = await self._report(report)
        if outcome is _Outcome.UNKNOWN_CP:
            self._registered.clear()
            return False
        if outcome is _Outcome.RETRY:
            return False
        self.watch.dropped(report)  # delivered (already forgotten) or rejected
        return True

    async def _register(self) -> _Outcome:
        body = CPRegistration(cp_id=self.settings.cp_id, health_url=self.health_url)
        outcome = await self._post("/cp/register", body.model_dump(mode="json", exclude_none=True),
                                   "registering the CP")
        if outcome is _Outcome.OK:
            self.stats.registrations += 1
            logger.info("registered {} at Central {}", self.settings.cp_id, self.central_url)
        elif outcome is _Outcome.UNKNOWN_CP:
            self._problem("register-404", "error",
                          f"Central at {self.central_url} has no /cp/register (HTTP 404); "
                          "retrying with backoff")
        return outcome

    async def _report(self, report: CPFaultReport) -> _Outcome:
        self.stats.report_attempts += 1
        what = kind(report)
        outcome = await self._post("/cp/fault", report.model_dump(mode="json"),
                                   f"sending a {what} report")
        if outcome is _Outcome.OK:
            self.watch.delivered(report)
            self.stats.reports_sent += 1
            if report.is_faulty:
                self.stats.fault_reports_sent += 1
            else:
                self.stats.recovery_reports_sent += 1
            logger.info("{} report delivered to Central: {}", what, report.reason)
            return outcome
        self.watch.not_delivered()  # it may or may not have arrived
        if outcome is _Outcome.UNKNOWN_CP:
            logger.warning("Central does not know {} (HTTP 404); registering it again",
                           self.settings.cp_id)
        elif outcome is _Outcome.REJECTED:
            logger.error("Central rejected the {} report; dropping it", what)
        return outcome

    # ----------------------------------------------------------------- liveness

    async def _liveness_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            if not self._registered.is_set():
                await self._registered.wait()
                next_at = loop.time()
            outcome = await self._report_liveness()
            next_at += (
                self._liveness_retry
                if outcome is _Outcome.NO_ROUTE
                else self.settings.health_interval
            )
            now = loop.time()
            next_at = max(next_at, now)
            await asyncio.sleep(next_at - now)

    async def _report_liveness(self) -> _Outcome:
        """Tell Central once that this monitor is alive."""
        cp_id = self.settings.cp_id
        report = MonitorReport(
            interval=self.settings.health_interval, healthy=self.view is HealthView.HEALTHY
        )
        outcome = await self._post(f"/cp/{cp_id}/monitor", report.model_dump(mode="json"),
                                   "reporting liveness", liveness=True)
        if outcome is _Outcome.OK:
            self.stats.liveness_sent += 1
            if self._liveness_unsupported:
                self._liveness_unsupported = False
                logger.info("Central at {} takes liveness reports now", self.central_url)
        elif outcome is _Outcome.NO_ROUTE:
            if not self._liveness_unsupported:
                self._liveness_unsupported = True
                logger.warning(
                    "Central at {} has no /cp/{{cp_id}}/monitor route (an older Central?): "
                    "it cannot show that {} is monitored; fault reports go on, and the "
                    "liveness report is tried again every {:g} s",
                    self.central_url, cp_id, self._liveness_retry,
                )
        elif outcome is _Outcome.UNKNOWN_CP:
            logger.warning("Central does not know {} (HTTP 404); registering it again", cp_id)
            self._registered.clear()
            self._wake.set()
        return outcome

    # ----------------------------------------------------------------- HTTP calls

    async def _post(
        self, path: str, body: dict[str, Any], what: str, *, liveness: bool = False
    ) -> _Outcome:
        """POST to Central and classify the answer; problems are logged once per kind.

        For the `liveness` report, a route an older Central lacks, a 404 that does not name
        the CP as unknown or a 405 is :attr:`_Outcome.NO_ROUTE` rather than a reason to
        register again, and a failed report is simply sent again at the next interval.
        """
        retrying = (
            "trying again every health interval"
            if liveness
            else f"retrying with backoff up to {self._retry_max:g} s"
        )
        try:
            response = await self.centrals.call(
                lambda central: self._client.post(
                    f"{central.url}{path}", json=body, headers=self._headers,
                    timeout=self._central_timeout,
                )
            )
        except httpx.HTTPError as exc:
            self.stats.central_errors += 1
            detail = (
                f"timed out after {self._central_timeout:g} s"
                if isinstance(exc, httpx.TimeoutException)
                else describe_http_error(exc)
            )
            self._problem("down", "warning",
                          f"Central at {self.central_url} is unreachable while {what} "
                          f"({detail}); {retrying}")
            return _Outcome.RETRY
        code = response.status_code
        if code < 300:
            self._central_answered(ok=True)
            return _Outcome.OK
        self.stats.central_errors += 1
        if code >= 500:
            self._problem("down", "warning",
                          f"Central at {self.central_url} answered HTTP {code} while {what}; "
                          f"{retrying}")
            return _Outcome.RETRY
        self._central_answered(ok=False)
        if code in (401, 403):
            hint = (
                "check that CP_MONITOR_API_TOKEN (--api-token) matches CENTRAL_API_TOKEN"
                if self._headers
                else "Central requires an API token: set CP_MONITOR_API_TOKEN (--api-token)"
            )
            self._problem(f"auth-{code}", "error",
                          f"Central refused our credentials (HTTP {code}) while {what}: "
                          f"{hint}; retrying with backoff")
            return _Outcome.RETRY
        if liveness and (
            code == 405 or (code == 404 and error_code(response) != "unknown_cp")
        ):
            return _Outcome.NO_ROUTE
        if code == 404:
            return _Outcome.UNKNOWN_CP
        self._problem(f"rejected-{code}", "error",
                      f"Central rejected {what} with HTTP {code}: "
                      f"{clip(response.text, _MAX_DETAIL)}")
        return _Outcome.REJECTED

    def _problem(self, kind: str, level: str, message: str) -> None:
        """Log a problem with Central once, until it changes or Central works again."""
        if self._central_problem != kind:
            self._central_problem = kind
            logger.log(level.upper(), "{}", message)

    def _central_answered(self, *, ok: bool) -> None:
        """Central answered (2xx when `ok`): an outage is over; a refusal ends on success."""
        if self._central_problem == "down":
            logger.info("Central at {} answers again", self.central_url)
            self._central_problem = None
        elif ok:
            self._central_problem = None


def error_code(response: httpx.Response) -> object:
    """The ``code`` of a JSON error answer (``{"error", "code"}``), None without one."""
    with contextlib.suppress(ValueError):
        body = response.json()
        if isinstance(body, dict):
            return body.get("code")
    return None


def describe_http_error(exc: httpx.HTTPError) -> str:
    """A short cause of a failed HTTP call."""
    if isinstance(exc, httpx.ConnectError):
        return connect_reason(exc)
    text = str(exc)
    return clip(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, _MAX_DETAIL)


def connect_reason(exc: BaseException) -> str:
    """A short cause of a failed connection, from the exception and its causes."""
    known = refusal_of(exc)
    if known is not None:
        return known
    text = str(exc)
    return f"cannot connect ({clip(text, _MAX_DETAIL)})" if text else "cannot connect"


def _unhealthy(response: httpx.Response) -> Failure:
    """Why a non-200 health answer failed; uses the engine's body when it has one."""
    state: object = None
    reason: object = None
    with contextlib.suppress(ValueError):
        body = response.json()
        if isinstance(body, dict):
            state = body.get("state")
            reason = body.get("reason") or body.get("fault_reason") or body.get("detail")
    if state == "FAULT":
        text = "CP reports FAULT" + (f": {clip(str(reason), _MAX_DETAIL)}" if reason else "")
        return Failure(text, cp_reports_fault=True)
    text = f"HTTP {response.status_code}"
    if state:
        text += f" (state {clip(str(state), 40)})"
    return Failure(text)
