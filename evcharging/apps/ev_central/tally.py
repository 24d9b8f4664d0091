"""The network's summary kept up as CPs change (SPEC §5: ``/summary`` costs the same at 100
CPs as at 500,000), and the counts Central's limits need (registered CPs, CPs known only
from the bus).

Pure: no I/O, no clock. Each CP the tally holds adds a *part* to the counts: its state,
site, fault, session and monitor (a small tuple, interned, so a million CPs share a few
dozen of them) and its power in integer µkW (so the sums never drift, however long
Central runs). A :class:`~evcharging.apps.ev_central.views.CPView` whose summary fields
are written marks itself here (:meth:`Tally.touch`); the marked CPs are recounted, their
old part taken out and their new one put in, before the next answer (:meth:`Tally.settle`).
A summary therefore costs the CPs that changed since the last one, plus the sites, never
a pass over every CP; a CP that changed a hundred times since is recounted once.

:func:`~evcharging.apps.ev_central.schemas.summarise` is the full recount the tests hold
it to (the same numbers, over any sequence of changes).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from evcharging.apps.ev_central.schemas import SiteSummaryOut, SummaryOut, cp_power_kw, micro_kw
from evcharging.apps.ev_central.views import CPView
from evcharging.common.states import CPState

__all__ = ["Part", "Tally"]

Part = tuple[CPState, str | None, bool, bool, bool]
"""What one CP adds to the counts: state, site, faulty, has a session, monitored."""


def _part(view: CPView) -> Part:
    return (view.state, view.site, view.is_faulty or view.state is CPState.FAULT,
            view.session is not None, view.monitored)


class Tally:
    """The summary's counts over the CPs added to it, kept up as they change."""

    def __init__(self, views: Iterable[CPView] = ()) -> None:
        self.cps = 0
        self.by_state = dict.fromkeys(CPState, 0)
        self.supplying = 0
        self.faulty = 0
        self.sessions = 0
        self.unmonitored = 0
        self.power_ukw = 0
        self._sites: dict[str | None, list[int]] = {}  # site -> [cps, supplying, faulty, µkW]
        self._parts: dict[Part, Part] = {}  # interned parts
        self._dirty: dict[str, CPView] = {}
        self.registered = 0
        """CPs registered by a monitor, the fleet or the gateway (``CENTRAL_MAX_CPS``)."""
        self.unregistered: dict[str, CPView] = {}
        """CPs known only from the bus, by id (``CENTRAL_MAX_UNREGISTERED``)."""
        for view in views:
            self.add(view)

    # ------------------------------------------------------------------ membership

    def add(self, view: CPView) -> None:
        """Count a new CP (the view then tells the tally of its changes)."""
        if view.tally is not None:
            raise ValueError(f"CP {view.cp_id} is counted by a tally already")
        view.tally = self
        self._recount(view)
        self._classify(view, +1)

    def remove(self, view: CPView) -> None:
        """Stop counting a CP (it is forgotten)."""
        if view.tally is not self:
            return
        self._dirty.pop(view.cp_id, None)
        if view.tallied is not None:
            self._count(view.tallied, view.tallied_ukw, -1)
        view.tallied, view.tallied_ukw = None, 0
        self._classify(view, -1)
        view.tally = None

    def reclassify(self, view: CPView) -> None:
        """The view's ``registered`` changed (from the bus to registered)."""
        self._classify(view, -1, registered=not view.registered)
        self._classify(view, +1)

    def _classify(self, view: CPView, sign: int, *, registered: bool | None = None) -> None:
        if view.registered if registered is None else registered:
            self.registered += sign
        elif sign > 0:
            self.unregistered[view.cp_id] = view
        else:
            self.unregistered.pop(view.cp_id, None)

    # ------------------------------------------------------------------ changes

    def touch(self, view: CPView) -> None:
        """A field the summary counts changed: recount the view before the next answer."""
        self._dirty[view.cp_id] = view

    def settle(self) -> None:
        """Recount every CP marked since the last settle."""
        dirty, self._dirty = self._dirty, {}
        for view in dirty.values():
            if view.tally is self:
                self._recount(view)

    def _recount(self, view: CPView) -> None:
        part = _part(view)
        part = self._parts.setdefault(part, part)
        ukw = micro_kw(cp_power_kw(view))
        if view.tallied is part and view.tallied_ukw == ukw:
            return
        if view.tallied is not None:
            self._count(view.tallied, view.tallied_ukw, -1)
        self._count(part, ukw, +1)
        view.tallied, view.tallied_ukw = part, ukw

    def _count(self, part: Part, ukw: int, sign: int) -> None:
        state, site, faulty, session, monitored = part
        supplying = state is CPState.SUPPLYING
        self.cps += sign
        self.by_state[state] += sign
        self.supplying += sign * supplying
        self.faulty += sign * faulty
        self.sessions += sign * session
        self.unmonitored += sign * (not monitored)
        self.power_ukw += sign * ukw
        counts = self._sites.get(site)
        if counts is None:
            counts = self._sites[site] = [0, 0, 0, 0]
        counts[0] += sign
        counts[1] += sign * supplying
        counts[2] += sign * faulty
        counts[3] += sign * ukw
        if counts[0] == 0:
            del self._sites[site]

    # ------------------------------------------------------------------ the answer

    def summary(self, now: datetime) -> SummaryOut:
        """``GET /summary``: the counts as of now (the CPs changed since, recounted)."""
        self.settle()
        return SummaryOut(
            cps=self.cps,
            by_state=dict(self.by_state),
            by_site=[
                SiteSummaryOut(site=name, cps=counts[0], supplying=counts[1],
                               faulty=counts[2], power_kw=round(counts[3] / 1e6, 3))
                for name, counts in sorted(self._sites.items(),
                                           key=lambda item: (item[0] is None, item[0] or ""))
            ],
            supplying=self.supplying,
            power_kw=round(self.power_ukw / 1e6, 3),
            active_sessions=self.sessions,
            faulty=self.faulty,
            unmonitored=self.unmonitored,
            ts=now,
        )
