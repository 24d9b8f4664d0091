"""The fleet's calls to Central's HTTP API (SPEC §5 and Central's fleet routes).

* ``POST /fleet/register`` ``{"cps": [CPRegistration...]}``: every CP, at start and again
  for the ids Central forgot (answer ``{"ok", "count", "new", "unknown"}``).
* ``POST /fleet/monitor`` ``{"interval", "cps": [{"cp_id", "healthy"}...]}``: the
  liveness of every CP, once per health interval (answer's ``unknown``: register again).
* ``POST /cp/fault`` ``{"cp_id", "is_faulty", "reason"}``: one CP's fault or recovery.
* ``GET /cp`` (pages of 1,000): which of the fleet's CPs Central holds as faulty, read
  once at start so that a restarted fleet tells Central only the recoveries it needs.

Many CPs go in one call, split so that no body passes :data:`MAX_BATCH_BYTES` (Central
refuses bodies over 1 MiB) or 20,000 entries. With a token every call carries
``Authorization: Bearer <token>``.

Central may be several (SPEC §9): the client takes a list of addresses and each call goes to
the one in use, moving to the next while one does not answer
(:class:`~evcharging.common.centrals.AnyDoor`).

Each answer is classified as an :class:`Outcome`; the caller decides what to do. Problems
with Central are logged once, not once per call: an outage (with one line when Central
answers again), a refused token, a rejected body.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

import httpx
from loguru import logger
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from evcharging.apps.ev_cp_m.monitor import describe_http_error, error_code
from evcharging.apps.ev_cp_m.watch import clip
from evcharging.common.centrals import AnyDoor, CentralAddress
from evcharging.common.messages import CPFaultReport, CPRegistration, FleetMonitorEntry

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_ITEMS",
    "PAGE_SIZE",
    "CentralClient",
    "Outcome",
    "batches",
]

MAX_BATCH_BYTES = 768 * 1024
"""Largest body the fleet sends (Central refuses over 1 MiB)."""
MAX_BATCH_ITEMS = 20_000
"""Most CPs per call (Central's limit on its fleet routes)."""
PAGE_SIZE = 1000
"""CPs asked per page of ``GET /cp`` (Central's largest page)."""


class Outcome(Enum):
    OK = "ok"
    RETRY = "retry"
    """Central is down, answered 5xx or refused the token: try again later."""
    UNKNOWN_CP = "unknown CP"
    """404 ``unknown_cp``: Central does not know the CP; register it again."""
    REJECTED = "rejected"
    """Another 4xx: the request itself is wrong; sending it again cannot help."""
    NO_ROUTE = "no route"
    """404 (not about a CP) or 405: a Central without this route."""


@dataclass
class CentralStats:
    """Counters of the calls to Central (read them, do not write them)."""

    calls: int = 0
    errors: int = 0
    """Calls that failed or were refused."""

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class _Faulty(BaseModel):
    model_config = ConfigDict(extra="ignore")

    cp_id: str
    is_faulty: bool = False


_PAGE = TypeAdapter(list[_Faulty])


def batches(
    entries: Sequence[BaseModel],
    *,
    max_items: int = MAX_BATCH_ITEMS,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Iterator[list[bytes]]:
    """The JSON encodings of `entries`, grouped so that each group's list stays under
    `max_bytes` and `max_items` (an entry is never split; one too large goes alone)."""
    group: list[bytes] = []
    size = 0
    for entry in entries:
        data = entry.model_dump_json(exclude_none=True).encode()
        if group and (len(group) >= max_items or size + len(data) + 1 > max_bytes):
            yield group
            group, size = [], 0
        group.append(data)
        size += len(data) + 1
    if group:
        yield group


class CentralClient:
    """Central's HTTP API as the fleet uses it. `central` is its base URL, several
    separated by commas, or an :class:`AnyDoor`. `client` may be injected (tests); the
    client is closed by :meth:`aclose` only when it was created here."""

    def __init__(
        self,
        central: str | AnyDoor,
        token: str | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.centrals = central if isinstance(central, AnyDoor) else AnyDoor.parse(central, 80)
        self.stats = CentralStats()
        self.problem: str | None = None
        """The problem with Central now (``down``, ``auth-401``…), None when it works."""
        self._timeout = timeout
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16)
        )
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._headers = {"Content-Type": "application/json", **self._auth}

    @property
    def base_url(self) -> str:
        """The base URL of the Central in use."""
        return self.centrals.url

    async def aclose(self) -> None:
        if self._owns_client and not self._client.is_closed:
            await self._client.aclose()

    # ---------------------------------------------------------------- the calls

    async def register(self, cps: Sequence[CPRegistration]) -> tuple[Outcome, int]:
        """Register `cps` (several calls when they are many); the outcome of the first
        call that did not succeed, else OK, and how many CPs were new to Central."""
        new = 0
        for group in batches(cps):
            body = b'{"cps":[' + b",".join(group) + b"]}"
            outcome, answer = await self._post(
                "/fleet/register", body, f"registering {len(group):,} CPs", new_route=True
            )
            if outcome is not Outcome.OK:
                return outcome, new
            new += int(answer.get("new", 0)) if isinstance(answer, dict) else 0
        return Outcome.OK, new

    async def monitor(
        self, interval: float, entries: Sequence[FleetMonitorEntry]
    ) -> tuple[Outcome, list[str]]:
        """The liveness of `entries`; the outcome (as for :meth:`register`) and the ids
        Central does not know."""
        unknown: list[str] = []
        head = b'{"interval":' + repr(float(interval)).encode() + b',"cps":['
        for group in batches(entries):
            outcome, answer = await self._post(
                "/fleet/monitor", head + b",".join(group) + b"]}", "reporting liveness",
                new_route=True,
            )
            if outcome is not Outcome.OK:
                return outcome, unknown
            if isinstance(answer, dict) and isinstance(answer.get("unknown"), list):
                unknown.extend(str(cp_id) for cp_id in answer["unknown"])
        return Outcome.OK, unknown

    async def report(self, report: CPFaultReport) -> Outcome:
        """One CP's fault or recovery report."""
        kind = "fault" if report.is_faulty else "recovery"
        outcome, _ = await self._post(
            "/cp/fault", report.model_dump_json().encode(), f"sending a {kind} report"
        )
        return outcome

    async def faulty(self, ids: set[str]) -> dict[str, bool] | None:
        """Whether Central holds each of `ids` as faulty (ids it does not list are left
        out); None when Central could not be read."""
        found: dict[str, bool] = {}
        offset = 0
        while True:
            self.stats.calls += 1
            try:
                response = await self.centrals.call(partial(self._get_page, offset=offset))
                response.raise_for_status()
                page = _PAGE.validate_json(response.content)
                total = int(response.headers.get("X-Total-Count", offset + len(page)))
            except (httpx.HTTPError, ValidationError, ValueError) as exc:
                self.stats.errors += 1
                logger.warning("could not read Central's CPs at {}/cp ({}); every CP's first "
                               "healthy check will be reported", self.base_url, _short(exc))
                return None
            found.update((cp.cp_id, cp.is_faulty) for cp in page if cp.cp_id in ids)
            offset += len(page)
            if not page or offset >= total:
                return found

    # ---------------------------------------------------------------- HTTP

    async def _get_page(self, central: CentralAddress, *, offset: int) -> httpx.Response:
        return await self._client.get(
            f"{central.url}/cp", params={"limit": PAGE_SIZE, "offset": offset},
            headers=self._auth, timeout=self._timeout,
        )

    async def _post(
        self, path: str, body: bytes, what: str, *, new_route: bool = False
    ) -> tuple[Outcome, Any]:
        """POST `body` and classify the answer; the outcome and the JSON answer (or None).

        `new_route`: a 404 that does not name a CP as unknown, or a 405, means a Central
        without the route (:attr:`Outcome.NO_ROUTE`).
        """
        self.stats.calls += 1
        try:
            response = await self.centrals.call(
                lambda central: self._client.post(
                    f"{central.url}{path}", content=body, headers=self._headers,
                    timeout=self._timeout,
                )
            )
        except httpx.HTTPError as exc:
            self.stats.errors += 1
            detail = (
                f"timed out after {self._timeout:g} s"
                if isinstance(exc, httpx.TimeoutException)
                else describe_http_error(exc)
            )
            self._problem("down", "WARNING",
                          f"Central at {self.base_url} is unreachable while {what} ({detail}); "
                          "trying again")
            return Outcome.RETRY, None
        code = response.status_code
        if code < 300:
            self._answered(ok=True)
            try:
                return Outcome.OK, response.json()
            except ValueError:
                return Outcome.OK, None
        self.stats.errors += 1
        if code >= 500:
            self._problem("down", "WARNING",
                          f"Central at {self.base_url} answered HTTP {code} while {what}; "
                          "trying again")
            return Outcome.RETRY, None
        self._answered(ok=False)
        if code in (401, 403):
            self._problem(f"auth-{code}", "ERROR",
                          f"Central refused our credentials (HTTP {code}) while {what}: check "
                          "that CP_MONITOR_API_TOKEN (or EVCHARGING_API_TOKEN) matches "
                          "CENTRAL_API_TOKEN; trying again")
            return Outcome.RETRY, None
        if code == 404 and error_code(response) == "unknown_cp":
            return Outcome.UNKNOWN_CP, None
        if new_route and code in (404, 405):
            return Outcome.NO_ROUTE, None
        if code == 404:
            return Outcome.UNKNOWN_CP, None
        self._problem(f"rejected-{code}", "ERROR",
                      f"Central rejected {what} with HTTP {code}: {clip(response.text)}")
        return Outcome.REJECTED, None

    def _problem(self, kind: str, level: str, message: str) -> None:
        """Log a problem with Central once, until it changes or Central works again."""
        if self.problem != kind:
            self.problem = kind
            logger.log(level, "{}", message)

    def _answered(self, *, ok: bool) -> None:
        """Central answered (2xx when `ok`): an outage is over; a refusal ends on success."""
        if self.problem == "down":
            logger.info("Central at {} answers again", self.base_url)
            self.problem = None
        elif ok:
            self.problem = None


def _short(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPError):
        return describe_http_error(exc)
    return clip(f"{type(exc).__name__}: {exc}")
