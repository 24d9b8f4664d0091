"""A simulated charging network inside one real Central, for the dashboard's browser tests.

Central is the real app (:func:`~evcharging.apps.ev_central.api.create_api` over a
:class:`~evcharging.apps.ev_central.controller.Controller` with an in-memory SQLite
repository and a recording publisher), served by uvicorn on ``127.0.0.1:0``. No Kafka and
no engines: the CPs are :class:`~evcharging.apps.ev_central.views.CPView` objects put in
the controller's registry, and :meth:`SimulatedNetwork.churn` changes them at a given rate
and publishes what the controller publishes on a change (a ``cp`` event with the CP's
``CPOut``, its telemetry, session ends, faults and recoveries) through the controller's
own hub, only while someone is subscribed, as the controller does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

from evcharging.apps.ev_central.api import create_api
from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.apps.ev_central.views import ActiveSession, CPView
from evcharging.common.circuit_breaker import CircuitBreaker
from evcharging.common.messages import CPState, CPTelemetry, format_ts, new_id, utcnow
from evcharging.common.service import HttpServer
from tests.unit.fakes import RecordingPublisher

CHARGER_KW = (11.0, 22.0, 50.0, 150.0)
FAULT_REASONS = (
    "CP reports FAULT: overcurrent on phase L2",
    "engine unreachable (3 health checks failed)",
    "isolation monitor tripped",
)
TICK = 0.05
"""Seconds between two bursts of changes (the rate is kept whatever the tick's delay)."""


def site_name(index: int) -> str:
    return f"site-{chr(ord('A') + index)}" if index < 26 else f"site-{index:03d}"


@dataclass
class SimulatedNetwork:
    """`cps` CPs over `sites` sites in a real Central at :attr:`url`."""

    controller: Controller
    server: HttpServer
    rng: random.Random
    changes: int = 0
    """CP changes published so far (``cp`` events)."""
    ids: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/"

    def populate(self, cps: int, sites: int) -> None:
        """Register `cps` CPs (``CP-00000`` ...) in a realistic mix of states."""
        width = max(5, len(str(cps - 1)))
        for n in range(cps):
            view = self._view(f"CP-{n:0{width}d}", site_name(n * sites // cps), n)
            roll = self.rng.random()
            if roll < 0.30:
                self._start_session(view, started_ago=self.rng.uniform(10, 1800))
            elif roll < 0.34:
                self._fault(view, self.rng.choice(FAULT_REASONS))
            elif roll < 0.38:
                view.state = CPState.STOPPED
                view.state_reason = "maintenance: connector replacement"
            elif roll < 0.43:
                view.state = CPState.DISCONNECTED
                view.state_reason = "no heartbeat for 30 s"
            if self.rng.random() < 0.01:
                view.monitor_lost = True
            self.controller.cps[view.cp_id] = view
            self.controller.tally.add(view)  # /summary counts what the tally holds
            self.ids.append(view.cp_id)

    def _view(self, cp_id: str, site: str, n: int) -> CPView:
        kw_rate = self.rng.choice(CHARGER_KW)
        now = utcnow()
        return CPView(
            cp_id=cp_id,
            breaker=CircuitBreaker(),
            state=CPState.ACTIVATED,
            site=site,
            location=f"bay {n % 24 + 1}",
            kw_rate=kw_rate,
            euro_rate=0.59 if kw_rate >= 50 else 0.39,
            registered_at=now - timedelta(days=3),
            last_seen=now,
            monitor_interval=1.0,
        )

    # ------------------------------------------------------------------ changes by hand

    def add(self, cp_id: str, site: str) -> CPView:
        """A new CP registers (ACTIVATED)."""
        view = self._view(cp_id, site, len(self.controller.cps))
        self.controller.cps[cp_id] = view
        self.controller.tally.add(view)
        self.controller.changed(view)
        return view

    def fault(self, view: CPView, reason: str) -> None:
        """`view` reports a fault."""
        self._fault(view, reason)
        self.controller.event("fault", view, reason)
        self.controller.changed(view)

    def recover(self, view: CPView) -> None:
        """`view` recovers from its fault (ACTIVATED)."""
        self._recover(view)
        self.controller.event("recovery", view, "health checks pass")
        self.controller.changed(view)

    # ------------------------------------------------------------------ one CP's change

    def _start_session(self, view: CPView, started_ago: float = 0.0) -> None:
        kw = (view.kw_rate or 22.0) * self.rng.uniform(0.55, 1.0)
        hours = started_ago / 3600
        view.state = CPState.SUPPLYING
        view.state_reason = None
        view.session = ActiveSession(
            session_id=new_id(), request_id=new_id(),
            driver_id=f"driver-{self.rng.randrange(1, 500):03d}", cp_id=view.cp_id,
            started_at=utcnow() - timedelta(seconds=started_ago), confirmed=True,
            kw=round(kw, 1), kwh=round(kw * hours, 3),
            euros=round(kw * hours * (view.euro_rate or 0.4), 2),
        )

    def _fault(self, view: CPView, reason: str) -> None:
        view.state = CPState.FAULT
        view.is_faulty = True
        view.fault_reason = reason
        view.state_reason = reason
        view.session = None
        view.breaker.trip(reason)

    def _recover(self, view: CPView) -> None:
        view.state = CPState.ACTIVATED
        view.is_faulty = False
        view.fault_reason = None
        view.state_reason = None
        view.breaker.recover()

    def change(self, view: CPView) -> None:
        """One plausible change of `view`, published as the controller would."""
        hub = self.controller.hub
        listening = hub.subscribers > 0
        now = utcnow()
        view.last_seen = now
        roll = self.rng.random()
        if view.state is CPState.SUPPLYING and view.session is not None:
            session = view.session
            if roll < 0.10 and session.kwh > 0.2:
                result = "COMPLETED" if roll < 0.09 else "STOPPED"
                if listening:
                    hub.publish({
                        "type": "session", "result": result, "cp_id": view.cp_id,
                        "driver_id": session.driver_id, "session_id": session.session_id,
                        "kwh": session.kwh, "euros": session.euros, "reason": None,
                        "ts": format_ts(now),
                    })
                view.session = None
                view.state = CPState.ACTIVATED
                view.breaker.record_success()  # a trial session closes a HALF_OPEN breaker
            elif roll < 0.11:
                reason = self.rng.choice(FAULT_REASONS)
                self._fault(view, reason)
                if listening:
                    hub.publish({"type": "fault", "cp_id": view.cp_id, "reason": reason,
                                 "monitored": view.monitored, "ts": format_ts(now)})
            else:
                session.kw = round((view.kw_rate or 22.0) * self.rng.uniform(0.55, 1.0), 1)
                minutes = self.rng.uniform(0.5, 3.0)  # of charging since its last change
                session.kwh = round(session.kwh + session.kw * minutes / 60, 4)
                session.euros = round(session.kwh * (view.euro_rate or 0.4), 4)
                view.last_telemetry = CPTelemetry(
                    cp_id=view.cp_id, kw=session.kw, kwh=session.kwh, euros=session.euros,
                    driver_id=session.driver_id, session_id=session.session_id, ts=now,
                )
                if listening:
                    hub.publish({"type": "telemetry",
                                 "telemetry": view.last_telemetry.model_dump(mode="json")})
        elif view.state is CPState.ACTIVATED:
            if roll < 0.25:
                self._start_session(view)
            elif roll < 0.26:
                view.state = CPState.STOPPED
                view.state_reason = "stopped by operator"
        elif view.state is CPState.FAULT:
            if roll < 0.15:
                self._recover(view)
                if listening:
                    hub.publish({"type": "recovery", "cp_id": view.cp_id,
                                 "reason": "health checks pass", "monitored": view.monitored,
                                 "ts": format_ts(now)})
        elif roll < 0.15:  # STOPPED or DISCONNECTED
            view.state = CPState.ACTIVATED
            view.state_reason = None
        self.controller.changed(view)  # the `cp` event, only while someone listens
        self.changes += 1

    async def churn(self, per_second: float) -> None:
        """Change random CPs at `per_second`, until cancelled."""
        views = list(self.controller.cps.values())
        started = time.monotonic()
        done = 0
        while True:
            due = int((time.monotonic() - started) * per_second)
            for _ in range(due - done):
                self.change(self.rng.choice(views))
            done = due
            await asyncio.sleep(TICK)  # pacing of the stream, not a synchronisation


@contextlib.asynccontextmanager
async def simulated_network(
    cps: int, sites: int, *, seed: int = 7
) -> AsyncIterator[SimulatedNetwork]:
    """A served Central with `cps` simulated CPs over `sites` sites."""
    async with SqliteRepository(":memory:") as repo:
        controller = Controller(RecordingPublisher(), repo)
        server = HttpServer(create_api(controller), "127.0.0.1", 0, name="netsim-central")
        network = SimulatedNetwork(controller, server, random.Random(seed))
        network.populate(cps, sites)
        await server.start()
        try:
            yield network
        finally:
            await server.stop()
            await controller.close()


@contextlib.asynccontextmanager
async def churning(network: SimulatedNetwork, per_second: float) -> AsyncIterator[None]:
    """Run :meth:`SimulatedNetwork.churn` for the block's duration."""
    task = asyncio.create_task(network.churn(per_second), name="netsim-churn")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
