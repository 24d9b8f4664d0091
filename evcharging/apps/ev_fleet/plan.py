"""Which CPs a fleet runs: their ids, sites and locations (pure, no I/O).

Ids are ``{prefix}{i:05d}`` for ``i`` from ``first`` to ``first + count - 1``
(``CP-00001`` … ``CP-10000``); two fleets split a network with different ``first``.
``sites`` groups the fleet's CPs into that many sites of consecutive ids, as even as
possible (``site-01`` holds the first block). Each site has a place, and each CP the
location ``"<place>, bay <n>"``, ``n`` counting from 1 within its site.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from evcharging.common.messages import ID_PATTERN

__all__ = ["PLACES", "CPSpec", "cp_id", "fleet_plan", "site_name", "site_place"]

PLACES = (
    "Harbour Road",
    "Station Square",
    "Market Street",
    "Airport Car Park P3",
    "University Campus",
    "Riverside Mall",
    "Hospital Car Park",
    "Old Town Garage",
    "Technology Park",
    "Stadium East",
    "Ring Road Services",
    "Central Library",
    "Business District",
    "Ferry Terminal",
    "Exhibition Centre",
    "Lakeside Retail Park",
)
"""The places of the sites, in order; after the last one they come round again numbered."""

_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True, slots=True)
class CPSpec:
    """One CP of the fleet as Central is told about it."""

    cp_id: str
    site: str
    location: str


def cp_id(prefix: str, number: int) -> str:
    """The id of CP number `number` (``CP-`` and 7 → ``CP-00007``)."""
    return f"{prefix}{number:05d}"


def site_name(site_prefix: str, index: int) -> str:
    """The name of site `index` (1-based): ``site-01``."""
    return f"{site_prefix}{index:02d}"


def site_place(index: int) -> str:
    """The place of site `index` (1-based)."""
    laps, at = divmod(index - 1, len(PLACES))
    return PLACES[at] if laps == 0 else f"{PLACES[at]} {laps + 1}"


def fleet_plan(
    prefix: str, first: int, count: int, sites: int = 1, site_prefix: str = "site-"
) -> list[CPSpec]:
    """The fleet's CPs, in id order. ValueError when an id would not be a valid CP id."""
    if count < 1 or sites < 1 or first < 0:
        raise ValueError("need count >= 1, sites >= 1 and first >= 0")
    for number in (first, first + count - 1):
        if not _ID.match(cp_id(prefix, number)):
            raise ValueError(f"{cp_id(prefix, number)!r} is not a valid CP id ({ID_PATTERN})")
    return list(_specs(prefix, first, count, sites, site_prefix))


def _specs(prefix: str, first: int, count: int, sites: int, site_prefix: str) -> Iterator[CPSpec]:
    site, bay = 0, 0
    for index in range(count):
        block = index * sites // count + 1  # consecutive blocks, sizes differ by at most 1
        if block != site:
            site, bay = block, 0
        bay += 1
        yield CPSpec(
            cp_id(prefix, first + index),
            site_name(site_prefix, site),
            f"{site_place(site)}, bay {bay}",
        )
