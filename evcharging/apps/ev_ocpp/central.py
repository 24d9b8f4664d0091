"""The gateway's CPs registered with Central (``POST /fleet/register``, the fleet's client).

A CP is registered when its charger first names it (SPEC §8: a CP is created by its first
StatusNotification). It also reports their liveness, as a monitor does
(:func:`report_liveness`). Registrations wait in a queue and go in one call for all those
waiting; while Central is down or refuses the token they are tried again every
:data:`RETRY` seconds (the client logs the problem once), and statuses flow meanwhile
(Central knows the CP from the bus until its registration lands).

A CP is registered with its charger's site (:class:`SiteBook`: ``OCPP_SITE`` for every
charger, or the charger's line of ``OCPP_SITES_FILE``), so Central's smart charging shares
the site's limit among its sessions (SPEC §10) and its SET_LIMITs reach the charger as
SetChargingProfile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from loguru import logger
from pydantic import StringConstraints

from evcharging.apps.ev_fleet.central import CentralClient, Outcome
from evcharging.apps.ev_ocpp.logic import CHARGER_ID_PATTERN
from evcharging.common.config import SITE_MAX
from evcharging.common.messages import CPRegistration, CPState, FleetMonitorEntry

if TYPE_CHECKING:  # the gateway imports this module
    from evcharging.apps.ev_ocpp.gateway import Gateway

__all__ = ["RETRY", "OcppRegistration", "Registrar", "SiteBook", "report_liveness"]

RETRY = 2.0
"""Seconds between two tries while Central cannot take the registrations."""

Text = Annotated[str, StringConstraints(max_length=50)]


class OcppRegistration(CPRegistration):
    """A CP's registration with what its charger said of itself (SPEC §8: its protocol,
    vendor and model from BootNotification); Central keeps them and shows them on /cp and
    the dashboard."""

    protocol: Text | None = None
    vendor: Text | None = None
    model: Text | None = None


class SiteBook:
    """The site each charger's CPs belong to at Central: the charger's own line of the
    sites file (``charger_id:site``), else the default (``OCPP_SITE``), else none."""

    def __init__(self, default: str | None = None,
                 by_charger: Mapping[str, str] | None = None) -> None:
        self.default = default
        self.by_charger = dict(by_charger or {})

    @classmethod
    def load(cls, default: str | None, path: Path | None) -> SiteBook:
        """The book of `default` and the file at `path` (None: no file), read once at
        start. OSError when it cannot be read, ValueError naming the line at fault."""
        by_charger = cls.parse(path.read_text(encoding="utf-8")) if path is not None else {}
        return cls(default, by_charger)

    @staticmethod
    def parse(text: str) -> dict[str, str]:
        """``charger_id:site`` a line (blank lines and ``#`` comments skipped); the site is
        what follows the first colon, spaces around it dropped, 1 to 64 characters (as
        ``CPRegistration.site``)."""
        sites: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            charger_id, sep, site = (part.strip() for part in line.partition(":"))
            if not sep or not CHARGER_ID_PATTERN.fullmatch(charger_id) or not site:
                raise ValueError(f"sites file line {number}: expected 'charger_id:site' "
                                 "(a charger id of letters, digits, '.', '_' or '-')")
            if len(site) > SITE_MAX:
                raise ValueError(f"sites file line {number}: the site is longer than "
                                 f"{SITE_MAX} characters")
            if charger_id in sites:
                raise ValueError(f"sites file line {number}: charger {charger_id!r} is "
                                 "given twice")
            sites[charger_id] = site
        return sites

    def site_of(self, cp_id: str) -> str | None:
        """The site of the CP ``X.n`` (its charger ``X``'s)."""
        return self.by_charger.get(cp_id.rpartition(".")[0], self.default)


class Registrar:
    """Registers the gateway's CPs with Central, in the background, each with its
    charger's site (`sites`)."""

    def __init__(self, central: CentralClient, *, retry: float = RETRY,
                 sites: SiteBook | None = None) -> None:
        self.central = central
        self.retry = retry
        self.sites = sites if sites is not None else SiteBook()
        self.registered = 0
        self._pending: dict[str, CPRegistration] = {}
        self._wake = asyncio.Event()

    def add(self, registration: CPRegistration) -> None:
        if registration.site is None:
            site = self.sites.site_of(registration.cp_id)
            if site is not None:
                registration = registration.model_copy(update={"site": site})
        self._pending[registration.cp_id] = registration
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = list(self._pending.values())
                outcome, _ = await self.central.register(batch)
                if outcome is Outcome.RETRY:
                    await asyncio.sleep(self.retry)
                    continue
                for registration in batch:
                    if self._pending.get(registration.cp_id) is registration:
                        del self._pending[registration.cp_id]
                if outcome is Outcome.OK:
                    self.registered += len(batch)
                    logger.info("registered {} CP(s) with Central: {}", len(batch),
                                ", ".join(r.cp_id for r in batch[:10]))
                else:
                    logger.error("Central did not take the registration of {} CP(s) ({}); "
                                 "they stay known to it from the bus only", len(batch),
                                 outcome.value)


async def report_liveness(gateway: Gateway, central: CentralClient) -> None:
    """The gateway is its chargers' watchdog (what a CP Monitor is to an engine): every
    status interval it tells Central, in one call, that the CPs of the chargers connected
    now are watched, healthy unless FAULT (SPEC §5 ``monitored``). A charger that goes
    away stops being reported, and Central shows its CPs unmonitored after 3 intervals."""
    interval = gateway.status_interval
    while True:
        await asyncio.sleep(interval)
        entries = [FleetMonitorEntry(cp_id=conn.cp_id, healthy=conn.state is not CPState.FAULT)
                   for charger_id in list(gateway.links)
                   for conn in gateway.of_charger(charger_id)]
        if entries:
            await central.monitor(interval, entries)

