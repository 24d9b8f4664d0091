"""Reading Central's CPs over its HTTP API (SPEC §5): which CPs are ACTIVATED now.

``GET /cp?state=ACTIVATED`` (and ``&site=...``), page by page (``limit``/``offset``,
the total in ``X-Total-Count``). :func:`first_reading` retries while Central is not up
yet; :func:`refresh_loop` reads again every few seconds and keeps the last reading while
Central does not answer (said once per outage). With several Centrals (SPEC §9,
``LOAD_CENTRAL_URL=http://h1:8000,http://h2:8000``) each page is read from the one in use,
moving to the next while one does not answer (:class:`~evcharging.common.centrals.AnyDoor`).
"""

from __future__ import annotations

import asyncio
from functools import partial

import httpx
from loguru import logger
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_before_delay

from evcharging.apps.ev_load.load import CPChooser
from evcharging.common.backoff import doubling
from evcharging.common.centrals import AnyDoor, CentralAddress

__all__ = ["PAGE_SIZE", "CentralError", "activated_cps", "first_reading", "refresh_loop"]

PAGE_SIZE = 1000
"""CPs asked per page (Central's largest page)."""


class CentralError(Exception):
    """Central's API could not be read; `fatal`: trying again cannot help (a 4xx answer)."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class _CP(BaseModel):
    model_config = ConfigDict(extra="ignore")

    cp_id: str


_PAGE = TypeAdapter(list[_CP])


async def _get_cps(
    client: httpx.AsyncClient, params: dict[str, str | int], central: CentralAddress
) -> httpx.Response:
    return await client.get(f"{central.url}/cp", params=params)


async def activated_cps(
    client: httpx.AsyncClient, *, site: str | None = None, page_size: int = PAGE_SIZE,
    centrals: AnyDoor | None = None,
) -> list[str]:
    """The ids of the CPs Central lists as ACTIVATED (of `site`), every page read: from
    `client`'s base URL, or from `centrals` (the one in use, then the next while one does
    not answer) when given.

    Raises :class:`CentralError` for an unreachable Central or an answer that is not a
    page of CPs.
    """
    ids: dict[str, None] = {}
    offset = 0
    while True:
        params: dict[str, str | int] = {"state": "ACTIVATED", "limit": page_size,
                                        "offset": offset}
        if site is not None:
            params["site"] = site
        try:
            if centrals is None:
                response = await client.get("/cp", params=params)
            else:
                response = await centrals.call(partial(_get_cps, client, params))
        except httpx.HTTPError as exc:
            base = str(client.base_url) if centrals is None else centrals.url
            url = base.rstrip("/") + "/cp"
            raise CentralError(f"GET {url} failed: {exc!r}") from exc
        if response.is_error:
            raise CentralError(
                f"GET {response.request.url} answered {response.status_code}: "
                f"{response.text[:200]}",
                fatal=400 <= response.status_code < 500,
            )
        try:
            page = _PAGE.validate_json(response.content)
            total = int(response.headers.get("X-Total-Count", offset + len(page)))
        except (ValidationError, ValueError) as exc:
            raise CentralError(f"GET {response.request.url}: not a list of CPs: {exc}") from exc
        ids.update((cp.cp_id, None) for cp in page)
        offset += len(page)
        if not page or offset >= total:
            return list(ids)


def _may_answer_later(exc: BaseException) -> bool:
    return isinstance(exc, CentralError) and not exc.fatal


async def first_reading(
    client: httpx.AsyncClient, *, site: str | None, timeout: float,
    centrals: AnyDoor | None = None,
) -> list[str]:
    """:func:`activated_cps`, tried again with backoff (0.2 s doubling up to 2 s) while
    Central does not answer (it may be starting), as long as the next try starts within
    `timeout` seconds; CentralError after that, or at once for a 4xx answer. The first
    retry is logged, once."""
    logged = False

    def log_once(state: RetryCallState) -> None:
        nonlocal logged
        if not logged and state.outcome is not None:
            logger.warning("Central's API does not answer yet ({}); retrying",
                           state.outcome.exception())
            logged = True

    retrying = AsyncRetrying(
        retry=retry_if_exception(_may_answer_later),
        wait=doubling(0.2, 2.0),
        stop=stop_before_delay(timeout),
        before_sleep=log_once,
        reraise=True,
    )
    cps: list[str] = await retrying(activated_cps, client, site=site, centrals=centrals)
    return cps


async def refresh_loop(
    client: httpx.AsyncClient, chooser: CPChooser, *, site: str | None, interval: float,
    centrals: AnyDoor | None = None,
) -> None:
    """Read Central's ACTIVATED CPs every `interval` seconds into `chooser`, until
    cancelled; while Central does not answer, the last reading stays."""
    failing = False
    while True:
        await asyncio.sleep(interval)
        try:
            cps = await activated_cps(client, site=site, centrals=centrals)
        except CentralError as exc:
            if not failing:
                logger.warning("cannot read Central's CPs ({}); keeping the last reading",
                               exc)
                failing = True
            continue
        if failing:
            logger.info("Central's CPs can be read again")
            failing = False
        chooser.update(cps)
