"""Reading Central's CPs over its HTTP API (SPEC §5): which CPs are ACTIVATED now.

``GET /cp?state=ACTIVATED`` (and ``&site=...``), page by page (``limit``/``offset``,
the total in ``X-Total-Count``). :func:`first_reading` retries while Central is not up
yet; :func:`refresh_loop` reads again every few seconds and keeps the last reading while
Central does not answer (said once per outage).
"""

from __future__ import annotations

import asyncio
import time

import httpx
from loguru import logger
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from evcharging.apps.ev_load.load import CPChooser

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


async def activated_cps(
    client: httpx.AsyncClient, *, site: str | None = None, page_size: int = PAGE_SIZE
) -> list[str]:
    """The ids of the CPs Central lists as ACTIVATED (of `site`), every page read.

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
            response = await client.get("/cp", params=params)
        except httpx.HTTPError as exc:
            url = str(client.base_url).rstrip("/") + "/cp"
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


async def first_reading(
    client: httpx.AsyncClient, *, site: str | None, timeout: float
) -> list[str]:
    """:func:`activated_cps`, tried again with backoff for up to `timeout` seconds while
    Central does not answer (it may be starting); CentralError after that, or at once for
    a 4xx answer."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    logged = False
    while True:
        try:
            return await activated_cps(client, site=site)
        except CentralError as exc:
            if exc.fatal or time.monotonic() + delay > deadline:
                raise
            if not logged:
                logger.warning("Central's API does not answer yet ({}); retrying", exc)
                logged = True
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def refresh_loop(
    client: httpx.AsyncClient, chooser: CPChooser, *, site: str | None, interval: float
) -> None:
    """Read Central's ACTIVATED CPs every `interval` seconds into `chooser`, until
    cancelled; while Central does not answer, the last reading stays."""
    failing = False
    while True:
        await asyncio.sleep(interval)
        try:
            cps = await activated_cps(client, site=site)
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
