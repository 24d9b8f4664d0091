"""Smart charging (SPEC §10): site power limits and the SET_LIMITs that keep each site under.

Two parts:

* :func:`plan`, pure: given the sites' limits, the sessions charging at them (what each CP
  and car can take, the energy still wanted, the departure) and the limits last sent, the
  new share of each session (:func:`~evcharging.apps.ev_central.allocation.allocate`) and
  the SET_LIMITs to send, only where the limit in force must change.
* :class:`Energy`, the thin job around it: it keeps the limits (persisted, ``PUT`` /
  ``DELETE /sites/{site}/limit``), an index of the sessions of each limited site (kept by
  the controller's session hooks, O(1) per start or end, nothing per message), and runs
  :func:`plan` for the sites where sessions started (once per site, right before the
  outbox's flush that carries their START_SUPPLYs: their SET_LIMITs are queued behind them
  and leave in the same flush, so no crash sends one without the other),
  at each end (once per tick, for the sites where one happened) — the cost is their
  sessions', never all of Central's — and for every limited site every
  ``CENTRAL_ALLOCATION_INTERVAL``. Its SET_LIMITs leave through the controller's outbox,
  as every command does (recorded, then sent in one Kafka transaction, SPEC §4).

With several Centrals (SPEC §9) one allocates: :class:`Energy` plans and sends only while
its repository holds the network-wide job lock :data:`ALLOCATION_LOCK` (always, on
SQLite). It asks at :meth:`Energy.load` and then once every interval, never on a start:
a start reads the answer of the last check (``leader``). An instance that loses the lock
forgets the limits it sent (the new leader's are in force), so that it sends every limit
again if it gains it back. Across several live Centrals the leader plans the network's
sessions, not only its own: :mod:`~.energy_network` (``network``); then :meth:`reallocate`
asks it for a plan, and each instance's ``sent`` is the limits in force for its own CPs.

What is in force for a session (the limit last sent, or its cap when that is lower) never
adds up to more than its site's limit: a share its session cannot use (its cap is the CP's
rate or the car's acceptance, which only falls while it charges) keeps the limit last sent
when that is higher, so no message is sent for a car slowly tapering; a share below the
session's cap is sent whenever it changes (rounded down to the watt). A session at a site
without a limit gets no SET_LIMIT, except ``kw`` null when its site's limit is removed. A
limit never denies a request: a new session gets its share and the others give way.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from loguru import logger

from evcharging.apps.ev_central import writes
from evcharging.apps.ev_central.allocation import Demand, Policy, allocate
from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.schemas import SiteOut, SiteSummaryOut
from evcharging.apps.ev_central.views import ActiveSession, CPView
from evcharging.common.car import Car
from evcharging.common.messages import CentralCommand, CommandPayload, CommandType, utcnow

if TYPE_CHECKING:
    from evcharging.apps.ev_central.energy_network import EnergyNetwork

__all__ = ["ALLOCATION_LOCK", "Charging", "Energy", "Plan", "Sent", "SetLimit", "charging_of",
           "plan"]

ALLOCATION_LOCK = "allocation"
"""The job lock (SPEC §9) under which one Central allocates for the network."""

RESEND_EVERY = 15
"""Every this many allocation intervals (15 × 2 s = 30 s by default) the leader sends every
limit in force again, changed or not: a SET_LIMIT lost on its way (a charger that timed
out without a REFUSED, a gateway restarted) is healed within that time."""


# --------------------------------------------------------------------------- the pure core


@dataclass(frozen=True, slots=True)
class Charging:
    """A session that charges (or is about to) at a CP, as the allocator needs it."""

    session_id: str
    cp_id: str
    site: str | None
    cp_kw: float | None
    """The CP's rate; None when it is unknown (then the site's limit bounds it)."""
    car_kw: float | None = None
    """What the car accepts at its latest state of charge; None without a car."""
    kwh_left: float | None = None
    departure: datetime | None = None


@dataclass(frozen=True, slots=True)
class SetLimit:
    """One SET_LIMIT to send: the session's limit in kW, None for no limit."""

    cp_id: str
    session_id: str
    kw: float | None


@dataclass(frozen=True, slots=True)
class Sent:
    """The limit last sent for a session (None: ``kw`` null, no limit)."""

    cp_id: str
    kw: float | None


@dataclass(frozen=True)
class Plan:
    shares: dict[str, float]
    """The kW of each session at a limited site, by session id."""
    allocated: dict[str, float]
    """The sum of the shares of each limited site (every limited site, 0 without sessions)."""
    commands: tuple[SetLimit, ...]
    """The SET_LIMITs to send, by site and session."""
    sent: dict[str, Sent]
    """The limits sent after the commands: the next :func:`plan`'s ``sent``. Sessions no
    longer given, and sessions at sites without a limit, are not in it."""


def _floor_watt(kw: float) -> float:
    """`kw` rounded down to the watt; a share a hair under a whole watt (floating-point
    noise, less than a µW) is that watt."""
    watts = kw * 1000.0
    nearest = round(watts)
    return nearest / 1000.0 if abs(watts - nearest) < 1e-6 else math.floor(watts) / 1000.0


def plan(
    limits: Mapping[str, float],
    sessions: Iterable[Charging],
    sent: Mapping[str, Sent],
    *,
    policy: Policy = Policy.EQUAL,
    now: datetime | None = None,
) -> Plan:
    """Share each limited site's power among its sessions; the SET_LIMITs that changed.

    ``sent`` is the previous plan's ``sent`` (empty at first: every session at a limited
    site then gets its limit). ``now`` (aware) is needed by ``least_laxity`` when a
    session has a departure. Raises ValueError on a session given twice.
    """
    by_site: dict[str, list[Charging]] = {}
    commands: list[SetLimit] = []
    seen: set[str] = set()
    for session in sessions:
        if session.session_id in seen:
            raise ValueError(f"session {session.session_id} given twice")
        seen.add(session.session_id)
        if session.site is not None and session.site in limits:
            by_site.setdefault(session.site, []).append(session)
            continue
        before = sent.get(session.session_id)
        if before is not None and before.kw is not None:  # its site's limit is gone
            commands.append(SetLimit(session.cp_id, session.session_id, None))
    shares: dict[str, float] = {}
    allocated = dict.fromkeys(limits, 0.0)
    in_force: dict[str, Sent] = {}
    for site in sorted(by_site, key=str):
        group = sorted(by_site[site], key=lambda s: s.session_id)
        limit = limits[site]
        demands = [
            Demand(s.session_id, cp_kw=limit if s.cp_kw is None else s.cp_kw,
                   car_kw=s.car_kw, kwh_left=s.kwh_left, departure=s.departure)
            for s in group
        ]
        given = allocate(limit, demands, policy=policy, now=now)
        allocated[site] = math.fsum(given.values())
        for session in group:
            share = given[session.session_id]
            shares[session.session_id] = share
            before = sent.get(session.session_id)
            last = before.kw if before is not None and before.cp_id == session.cp_id else None
            # Its physical cap: the CP's rate and the car's acceptance that are known
            # (infinite when neither is: an OCPP charger without a car; the limit given
            # to the allocator above is no cap, a real charger draws what it is allowed).
            known = [kw for kw in (session.cp_kw, session.car_kw) if kw is not None]
            physical = min(known) if known else math.inf
            if share >= physical:
                # All it can take: a limit at or above its cap holds it there already
                # (what is in force, min(last, cap), is the cap, within its share).
                if last is not None and last >= share:
                    in_force[session.session_id] = Sent(session.cp_id, last)
                    continue
                target = share
            else:
                target = _floor_watt(share)
                if last is not None and last == target:
                    in_force[session.session_id] = Sent(session.cp_id, last)
                    continue
            commands.append(SetLimit(session.cp_id, session.session_id, target))
            in_force[session.session_id] = Sent(session.cp_id, target)
    return Plan(shares=shares, allocated=allocated, commands=tuple(commands), sent=in_force)


def charging_of(cp: CPView, session: ActiveSession) -> Charging:
    """What :func:`plan` needs of a CP's session: its car's acceptance at the state of
    charge the CP reported last for it (else at arrival), and the energy still wanted (what
    the driver asked for less what was delivered, at most what fits in the battery)."""
    car_kw: float | None = None
    kwh_left: float | None = None
    if session.kwh_wanted is not None:
        kwh_left = max(0.0, session.kwh_wanted - session.kwh)
    if session.car is not None:
        telemetry = cp.last_telemetry
        soc = session.car.soc
        if (telemetry is not None and telemetry.session_id == session.session_id
                and telemetry.soc is not None):
            soc = telemetry.soc
        car = Car(session.car.battery_kwh, soc, session.car.max_kw)
        car_kw = car.acceptance_kw
        kwh_left = car.room_kwh if kwh_left is None else min(kwh_left, car.room_kwh)
    return Charging(session_id=session.session_id, cp_id=cp.cp_id, site=cp.site,
                    cp_kw=cp.kw_rate, car_kw=car_kw, kwh_left=kwh_left,
                    departure=session.departure)


# ------------------------------------------------------------------------------ the job


class Energy:
    """Central's site limits and smart charging: :func:`plan` run at the right moments."""

    def __init__(
        self,
        controller: Controller,
        *,
        policy: Policy | str = Policy.EQUAL,
        interval: float = 2.0,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, not {interval!r}")
        self.controller = controller
        self.policy = Policy(policy)
        self.interval = interval
        self.limits: dict[str, float] = {}
        """Every site's limit (kW), by site."""
        self.allocated: dict[str, float] = {}
        """What the last plan gave each limited site's sessions (kW)."""
        self.sent: dict[str, Sent] = {}
        """The limit last sent for each session at a limited site."""
        self._sent_site: dict[str, str] = {}
        """The site each session of ``sent`` was planned with."""
        self._site_sent: dict[str, set[str]] = {}
        """The sessions of ``sent`` by the site they were planned with (``_sent_site``
        inverted): a plan of a site reads its own, never all of ``sent``."""
        self._started: set[str] = set()
        """Limited sites where a session started since the last flush: planned once each,
        right before the outbox's flush that carries their START_SUPPLYs."""
        self._dirty: set[str] = set()
        """Limited sites where a session started or ended since the last plan of them."""
        self._charging: dict[str, dict[str, CPView]] = {}
        """The CPs with a session at each limited site (kept by the session hooks)."""
        self._soon: asyncio.Task[None] | None = None
        self.leader = False
        """Whether this instance held :data:`ALLOCATION_LOCK` at the last check (it
        allocates only then): checked at :meth:`load` and once every interval."""
        self.network: EnergyNetwork | None = None
        """Smart charging across Centrals (set by :class:`~.energy_network.EnergyNetwork`);
        None: this instance's sessions are the network's (one Central)."""
        self._ticks = 0
        self._changed_here = 0
        self._reload_failing = False
        """Bumped by each limit set or removed here (see :meth:`reload_limits`)."""
        controller.session_hooks.append(self._on_session)
        controller.limit_refused_hooks.append(self._on_limit_refused)
        controller.outbox.before_flush.append(self._plan_started)
        controller.site_hooks.append(self._on_site_change)

    # ------------------------------------------------------------------ lifecycle

    async def load(self, overrides: Mapping[str, float] | None = None) -> None:
        """Read the persisted limits, set `overrides` (``CENTRAL_SITE_LIMITS``) over them
        and persist those, and index the running sessions of the limited sites. Called
        once the controller has loaded its CPs and sessions."""
        self.limits = await self.controller.repo.load_site_limits()
        changed = {site: kw for site, kw in (overrides or {}).items()
                   if self.limits.get(site) != kw}
        if changed:
            now = utcnow()
            await self.controller.repo.apply(
                [writes.SiteLimitSet(site, kw, now) for site, kw in changed.items()])
            self.limits.update(changed)
        self.reindex()
        if self.limits:
            logger.info("site limits: {} ({} allocation every {:g}s)",
                        ", ".join(f"{s}={kw:g} kW" for s, kw in sorted(self.limits.items())),
                        self.policy.value, self.interval)
        await self.check_leader()

    def reindex(self) -> None:
        """Index the running sessions of the limited sites anew (after a load, or a
        rebalance that moved CPs, SPEC §9)."""
        self._charging = {site: {} for site in self.limits}
        for cp in self.controller.cps.values():
            if cp.session is not None and cp.site in self._charging:
                self._charging[cp.site][cp.cp_id] = cp

    async def run(self) -> None:
        """Check the lock and reallocate every ``interval`` seconds (Central runs this as
        a task)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.check_leader()
            reloaded = False
            if self.leader or self._networked:
                try:
                    reloaded = await self.reload_limits()  # a PUT/DELETE on another Central
                    self._reload_failing = False
                except Exception as exc:  # noqa: BLE001 - the limits known are kept: logged
                    self.controller.stats["site_limit_reload_errors"] += 1
                    if not self._reload_failing:  # logged once until it works again
                        logger.warning("smart charging: the site limits could not be read: "
                                       "{}", exc)
                    self._reload_failing = True
            self._ticks += 1
            resend = self._ticks % RESEND_EVERY == 0
            if resend:
                self.forget_sent()  # every limit in force is sent again
            if self.network is not None and await self.network.tick(resend=resend):
                if reloaded:  # the network's plan is energy_network's
                    await self.controller.flush()
                continue
            if self._reallocate_logged() or reloaded:
                await self.controller.flush()

    @property
    def _networked(self) -> bool:
        """Whether other live Centrals share the sessions (the leader plans them all)."""
        return self.network is not None and self.network.active

    async def check_leader(self) -> bool:
        """Ask the repository for :data:`ALLOCATION_LOCK` (take it if free, keep it if
        held) and remember the answer in ``leader``; logged when it changes."""
        try:
            held = await self.controller.repo.hold_lock(ALLOCATION_LOCK)
        except Exception as exc:  # noqa: BLE001 - not held, whatever the cause: logged
            if self.leader:
                logger.warning("smart charging: the lock could not be checked: {}", exc)
            held = False
        if held != self.leader:
            self.leader = held
            if held:
                logger.info("smart charging: this instance allocates (it holds the {!r} "
                            "lock)", ALLOCATION_LOCK)
            else:
                logger.warning("smart charging: this instance no longer allocates (the {!r} "
                               "lock is lost)", ALLOCATION_LOCK)
                self.forget_sent()  # the new leader's limits are in force, not these
                self.allocated.clear()
        return held

    async def close(self) -> None:
        if self.network is not None:
            await self.network.close()
        soon, self._soon = self._soon, None
        if soon is not None:
            soon.cancel()
            await asyncio.gather(soon, return_exceptions=True)
        if self.leader:
            self.leader = False
            try:
                await self.controller.repo.release_lock(ALLOCATION_LOCK)
            except Exception as exc:  # noqa: BLE001 - closing anyway: the lock goes with it
                logger.warning("smart charging: releasing the lock failed: {}", exc)

    # ------------------------------------------------------------------ operators

    async def set_limit(self, site: str, kw: float) -> SiteOut:
        """Set a site's limit, share it at once, and record it before answering
        (StorageError: try again)."""
        if site not in self._charging:
            self._charging[site] = {cp.cp_id: cp for cp in self.controller.cps.values()
                                    if cp.site == site and cp.session is not None}
        self._changed_here += 1
        self.limits[site] = kw
        self.controller.outbox.write(writes.SiteLimitSet(site, kw, utcnow()))
        self.controller.stats["site_limits_set"] += 1
        logger.info("site {}: limit {:g} kW", site, kw)
        self.reallocate([site])
        await self.controller.outbox.flush()
        return self.site(site)

    async def remove_limit(self, site: str) -> SiteOut:
        """Remove a site's limit: its sessions get SET_LIMIT ``kw`` null (no limit)."""
        self._changed_here += 1
        self.controller.outbox.write(writes.SiteLimitRemoved(site))
        had = self._drop_limit(site)
        if had is not None:
            logger.info("site {}: limit removed (was {:g} kW)", site, had)
        if self.network is not None and self.network.active:
            self.network.request([site])  # the leader frees the other Centrals' sessions
        await self.controller.outbox.flush()
        return self.site(site)

    def _drop_limit(self, site: str) -> float | None:
        """Forget a site's limit and queue kw null for its sessions; the limit it had."""
        had = self.limits.pop(site, None)
        self.allocated.pop(site, None)
        self._charging.pop(site, None)
        self._dirty.discard(site)
        to_free: dict[str, str] = {}  # session id -> CP id
        self._started.discard(site)
        for sid in list(self._site_sent.get(site, ())):
            sent = self._forget(sid)
            cp = self.controller.cps.get(sent.cp_id)
            if cp is not None and cp.session is not None and cp.session.session_id == sid:
                to_free[sid] = cp.cp_id
        if self.leader and had is not None:
            # Every running session of the site, not only those of ``sent`` (empty after a
            # restart until the first plan, or after the lock was lost): an operator's call,
            # so one pass over the CPs is fine.
            for cp in self.controller.cps.values():
                if cp.site == site and cp.session is not None:
                    to_free.setdefault(cp.session.session_id, cp.cp_id)
        for sid, cp_id in to_free.items():
            self._send(SetLimit(cp_id, sid, None))
        return had

    async def reload_limits(self) -> bool:
        """Read the limits from the repository (one small query) and follow what another
        Central's ``PUT`` / ``DELETE`` changed: a new or changed limit is planned at the
        next plan, a removed one sends kw null. Whether anything changed. Skipped when a
        limit changed here while reading (this instance's own change is newer)."""
        mark = self._changed_here
        stored = await self.controller.repo.load_site_limits()
        if mark != self._changed_here:
            return False
        changed = False
        for site in [site for site in self.limits if site not in stored]:
            had = self._drop_limit(site)
            logger.info("site {}: limit removed elsewhere (was {:g} kW)", site, had)
            changed = True
        for site, kw in stored.items():
            if self.limits.get(site) == kw:
                continue
            if site not in self._charging:
                self._charging[site] = {cp.cp_id: cp for cp in self.controller.cps.values()
                                        if cp.site == site and cp.session is not None}
            self.limits[site] = kw
            logger.info("site {}: limit {:g} kW (set elsewhere)", site, kw)
            changed = True
        return changed

    # ------------------------------------------------------------------ answers

    def sites(self) -> list[SiteOut]:
        """``GET /sites``: every site of a registered CP and every limited site, by name."""
        counts = {s.site: s for s in self.controller.tally.summary(utcnow()).by_site
                  if s.site is not None}
        return [self._site_out(name, counts.get(name))
                for name in sorted(set(counts) | set(self.limits))]

    def site(self, name: str) -> SiteOut:
        found = next((s for s in self.controller.tally.summary(utcnow()).by_site
                      if s.site == name), None)
        return self._site_out(name, found)

    def _site_out(self, name: str, counts: SiteSummaryOut | None) -> SiteOut:
        limit = self.limits.get(name)
        return SiteOut(
            site=name, limit_kw=limit,
            allocated_kw=(round(self.allocated.get(name, 0.0), 3) if limit is not None
                          else None),
            measured_kw=counts.power_kw if counts is not None else 0.0,
            cps=counts.cps if counts is not None else 0,
            supplying=counts.supplying if counts is not None else 0,
        )

    # ------------------------------------------------------------------ allocation

    def reallocate(self, sites: Iterable[str] | None = None) -> int:
        """Plan these limited sites (None: every one) now and queue the SET_LIMITs that
        changed; how many. The cost is their sessions', never all of Central's. Nothing
        while this instance does not hold the allocation lock (``leader``). Across several
        Centrals the leader plans every Central's sessions: asked here, done soon
        (:meth:`~.energy_network.EnergyNetwork.request`)."""
        if self.network is not None and self.network.active:
            self.network.request(sites)
            return 0
        if not self.leader:
            return 0
        chosen = list(self._charging) if sites is None else [
            site for site in dict.fromkeys(sites) if site in self._charging]
        planned = set(chosen)
        sessions: dict[str, Charging] = {}
        for site in chosen:  # grows when a CP moved to another limited site
            cps = self._charging[site]
            for cp_id, cp in list(cps.items()):
                session = cp.session
                if session is None or cp.site != site:
                    del cps[cp_id]  # ended, or the CP moved to another site
                    if session is not None and cp.site in self._charging:
                        self._charging[cp.site][cp_id] = cp
                        if cp.site not in planned:
                            planned.add(cp.site)
                            chosen.append(cp.site)
                if session is not None:
                    sessions[session.session_id] = charging_of(cp, session)
        before = {sid: self.sent[sid] for site in planned
                  for sid in self._site_sent.get(site, ())}
        result = plan({site: self.limits[site] for site in chosen}, sessions.values(), before,
                      policy=self.policy, now=utcnow())
        for command in result.commands:
            self._send(command)
        for sid in before:
            self._forget(sid)
        for sid, sent in result.sent.items():
            self._remember(sid, sessions[sid].site or "", sent)
        self.allocated.update(result.allocated)
        return len(result.commands)

    def _reallocate_logged(self, sites: Iterable[str] | None = None) -> int:
        try:
            return self.reallocate(sites)
        except Exception:  # noqa: BLE001 - a bug here must not stop Central: logged, counted
            self.controller.stats["allocation_errors"] += 1
            logger.exception("smart charging: reallocation failed")
            return 0

    def charging(self) -> list[Charging]:
        """This instance's sessions at its limited sites, and those whose limit in force
        belongs to a site no longer limited (the leader frees them), each once."""
        found: dict[str, Charging] = {}
        for site, cps in self._charging.items():
            for cp in cps.values():
                session = cp.session
                if session is not None and cp.site == site:
                    found.setdefault(session.session_id, charging_of(cp, session))
        for sid, sent in self.sent.items():
            if sid in found:
                continue
            view = self.controller.cps.get(sent.cp_id)
            if view is not None and view.session is not None and view.session.session_id == sid:
                found[sid] = charging_of(view, view.session)
        return list(found.values())

    def apply(self, command: SetLimit, site: str | None) -> None:
        """Send a limit planned elsewhere (the leader, or a provisional share) to one of
        this instance's CPs, and remember it in force (``kw`` None: forgotten)."""
        self._send(command)
        if command.kw is None:
            if command.session_id in self.sent:
                self._forget(command.session_id)
        else:
            self._remember(command.session_id, site or "",
                           Sent(command.cp_id, command.kw))

    def _send(self, command: SetLimit) -> None:
        self.controller.stats["set_limits"] += 1
        self.controller.outbox.send(CentralCommand(
            cp_id=command.cp_id, cmd=CommandType.SET_LIMIT,
            payload=CommandPayload(kw=command.kw, session_id=command.session_id),
        ))

    def _on_session(self, cp: CPView, session: ActiveSession, started: bool) -> None:
        """The controller's hook: a session started on `cp` (its site planned at once) or
        ended (its site planned once this tick)."""
        site = cp.site
        cps = self._charging.get(site) if site is not None else None
        if cps is None or site is None:
            return
        if started:
            cps[cp.cp_id] = cp
            # Planned right before the flush that carries its START_SUPPLY (once per site
            # however many started in the batch): the SET_LIMITs (its share, the others
            # giving way) are queued behind it and leave in the same flush, so a Central
            # killed in between never leaves the new session at full power.
            self._started.add(site)
            return
        if cps.get(cp.cp_id) is cp:
            del cps[cp.cp_id]
        self._dirty.add(site)  # an end only frees power: planned once this tick
        self._schedule()

    def forget_sent(self) -> None:
        """Forget the limits sent: the next plan of each limited site sends them all."""
        self.sent.clear()
        self._sent_site.clear()
        self._site_sent.clear()

    def _forget(self, sid: str) -> Sent:
        """Forget the limit sent for a session (KeyError if none): it and its indexes."""
        sent = self.sent.pop(sid)
        site = self._sent_site.pop(sid)
        of_site = self._site_sent.get(site)
        if of_site is not None:
            of_site.discard(sid)
            if not of_site:
                del self._site_sent[site]
        return sent

    def _remember(self, sid: str, site: str, sent: Sent) -> None:
        if sid in self.sent:
            self._forget(sid)
        self.sent[sid] = sent
        self._sent_site[sid] = site
        self._site_sent.setdefault(site, set()).add(sid)

    def _on_limit_refused(self, cp: CPView, session_id: str | None) -> None:
        """The controller's hook: a CP refused a SET_LIMIT (or timed out): it is not in
        force, so it is forgotten and its site planned again (sent again) this tick."""
        sid = session_id if session_id is not None else (
            cp.session.session_id if cp.session is not None else None)
        if sid is None or sid not in self.sent:
            return
        site = self._sent_site.get(sid)
        self._forget(sid)
        self.controller.stats["set_limits_refused"] += 1
        if site:
            self._dirty.add(site)
            self._schedule()

    def _on_site_change(self, cp: CPView, old: str | None) -> None:
        """The controller's hook: a CP was registered into another site. Its running
        session is indexed with its new site, and both sites are planned this tick."""
        if cp.session is None:
            return
        if old is not None and old in self._charging:
            if self._charging[old].get(cp.cp_id) is cp:
                del self._charging[old][cp.cp_id]
            self._dirty.add(old)
        if cp.site is not None and cp.site in self._charging:
            self._charging[cp.site][cp.cp_id] = cp
            self._dirty.add(cp.site)
        self._schedule()

    def _plan_started(self) -> None:
        """The outbox's hook, right before each flush: plan the sites where sessions
        started since the last one, each once."""
        if self._started:
            sites, self._started = self._started, set()
            self._reallocate_logged(sites)

    def _schedule(self) -> None:
        """Reallocate once the current handler yields: every start and end of this tick
        shares one plan."""
        if self._soon is not None and not self._soon.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous test): the next interval plans it
        self._soon = loop.create_task(self._soon_run(), name="energy-reallocate")

    async def _soon_run(self) -> None:
        await asyncio.sleep(0)
        sites, self._dirty = self._dirty, set()
        if self._reallocate_logged(sites):
            self.controller.outbox.flush_soon()
