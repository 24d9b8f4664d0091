"""Network-wide answers from each Central's own part (SPEC §9: any door answers for every
CP). Pure: the parts come in, one answer goes out, as one Central would give it.

Each instance counts only its own CPs; the CPs of two instances never overlap (a CP has
one owner), so counts add up. Powers are added in whole µkW, as :mod:`~.tally` keeps them,
so a sum of rounded parts is rounded once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from evcharging.apps.ev_central.schemas import (
    FleetOut,
    SiteOut,
    SiteSummaryOut,
    SummaryOut,
    micro_kw,
)
from evcharging.common.states import CPState

__all__ = ["cp_list", "merge_cps", "merge_fleet", "merge_sites", "merge_summaries"]


def _kw(values: Iterable[float]) -> float:
    return round(sum(micro_kw(value) for value in values) / 1e6, 3)


def merge_summaries(parts: Sequence[SummaryOut], now: datetime) -> SummaryOut:
    """The summary of the whole network from each instance's own."""
    by_state = dict.fromkeys(CPState, 0)
    sites: dict[str | None, list[SiteSummaryOut]] = {}
    for part in parts:
        for state, count in part.by_state.items():
            by_state[state] += count
        for site in part.by_site:
            sites.setdefault(site.site, []).append(site)
    by_site = [
        SiteSummaryOut(
            site=name, cps=sum(s.cps for s in same), supplying=sum(s.supplying for s in same),
            faulty=sum(s.faulty for s in same), power_kw=_kw(s.power_kw for s in same),
        )
        for name, same in sorted(sites.items(), key=lambda item: (item[0] is None, item[0] or ""))
    ]
    return SummaryOut(
        cps=sum(p.cps for p in parts),
        by_state=by_state,
        by_site=by_site,
        supplying=sum(p.supplying for p in parts),
        power_kw=_kw(p.power_kw for p in parts),
        active_sessions=sum(p.active_sessions for p in parts),
        faulty=sum(p.faulty for p in parts),
        unmonitored=sum(p.unmonitored for p in parts),
        ts=now,
    )


def merge_sites(parts: Sequence[Sequence[SiteOut]]) -> list[SiteOut]:
    """``GET /sites`` of the network: each site's CPs and power added up over the
    instances; its limit is the network's (any instance's that has one), and what smart
    charging allocates is what each instance allocates to its own sessions, added."""
    sites: dict[str, list[SiteOut]] = {}
    for part in parts:
        for site in part:
            sites.setdefault(site.site, []).append(site)
    merged = []
    for name in sorted(sites):
        same = sites[name]
        limits = [s.limit_kw for s in same if s.limit_kw is not None]
        allocated = [s.allocated_kw for s in same if s.allocated_kw is not None]
        merged.append(SiteOut(
            site=name, limit_kw=limits[0] if limits else None,
            allocated_kw=_kw(allocated) if allocated else None,
            measured_kw=_kw(s.measured_kw for s in same),
            cps=sum(s.cps for s in same), supplying=sum(s.supplying for s in same),
        ))
    return merged


def cp_list(body: Any) -> list[dict[str, Any]]:
    """A peer's ``/cp`` answer, checked: a list of CP objects (ValueError otherwise)."""
    if not isinstance(body, list) or not all(isinstance(cp, dict) and "cp_id" in cp
                                             for cp in body):
        raise ValueError("not a list of CPs")
    return body


def merge_cps(parts: Iterable[Iterable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """CPs (``CPOut`` JSON) of every instance, by ``cp_id`` as ``/cp`` lists them; a CP two
    instances list during a handover once (the first part's, this instance's, wins)."""
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for cp in part:
            merged.setdefault(str(cp["cp_id"]), cp)
    return [merged[cp_id] for cp_id in sorted(merged)]


def merge_fleet(parts: Sequence[FleetOut]) -> FleetOut:
    """One answer of a ``/fleet`` call split by owner."""
    return FleetOut(
        count=sum(p.count for p in parts), new=sum(p.new for p in parts),
        unknown=[cp_id for p in parts for cp_id in p.unknown],
    )
