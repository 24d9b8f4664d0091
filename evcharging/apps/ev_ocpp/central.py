"""The gateway's CPs registered with Central (``POST /fleet/register``, the fleet's client).

A CP is registered when its charger first names it (SPEC §8: a CP is created by its first
StatusNotification). It also reports their liveness, as a monitor does
(:func:`report_liveness`). Registrations wait in a queue and go in one call for all those
waiting; while Central is down or refuses the token they are tried again every
:data:`RETRY` seconds (the client logs the problem once), and statuses flow meanwhile
(Central knows the CP from the bus until its registration lands).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

from loguru import logger
from pydantic import StringConstraints

from evcharging.apps.ev_fleet.central import CentralClient, Outcome
from evcharging.common.messages import CPRegistration, CPState, FleetMonitorEntry

if TYPE_CHECKING:  # the gateway imports this module
    from evcharging.apps.ev_ocpp.gateway import Gateway

__all__ = ["RETRY", "OcppRegistration", "Registrar", "report_liveness"]

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


class Registrar:
    """Registers the gateway's CPs with Central, in the background."""

    def __init__(self, central: CentralClient, *, retry: float = RETRY) -> None:
        self.central = central
        self.retry = retry
        self.registered = 0
        self._pending: dict[str, CPRegistration] = {}
        self._wake = asyncio.Event()

    def add(self, registration: CPRegistration) -> None:
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

