"""Smart charging across Centrals (SPEC §9, §10): one instance allocates, under the advisory
lock, from the network-wide view every instance serves, and each limit reaches its CP
through the CP's owner.

**Each instance serves its own part** (internal calls between Centrals, protected as
mutating calls are, with the shared ``CENTRAL_API_TOKEN``, and left out of the public
document):

* ``GET /energy/charging``: this instance's sessions at limited sites, as :func:`plan`
  takes them, each with the limit in force it last sent its CP (:class:`PartOut`);
* ``POST /energy/limits``: limits for its own CPs (:class:`LimitsIn`): queued through its
  outbox (recorded, then sent in its Kafka transaction, SPEC §4), remembered as in force,
  and its share of each site's allocation kept for ``/sites``; a CP it does not own: 503
  ``not_owner`` and nothing is taken (the sender refreshes its directory and plans again);
* ``POST /energy/replan?site=S``: the leader plans at once (after reading the limits
  again); an instance that is not the leader answers 409 ``not_leader``.

**The leader** (:class:`~.energy.Energy` ``leader``), every interval and on demand, gathers
its own part and every live peer's concurrently (:meth:`~.network.Network.gather`: short
timeouts, a missing peer logged once and counted), runs the pure :func:`plan` over their
union (:func:`merge_parts`) and delivers each SET_LIMIT through the CP's owner: its own
through its outbox, the others' in one ``POST /energy/limits`` per owner
(:func:`by_owner`). A peer that gave no part is planned without: its sessions keep their
limits, and the kW in force there (as it last told) is kept out of its sites' limits
(:func:`reserve`), so the others' new shares never take it.

**Starts at any instance** (the leader included): right before the flush that carries the
START_SUPPLY, a session that starts at a limited site gets a provisional limit in the same
flush (:func:`provisional_share`: an equal share of the limit among the site's sessions the
instance last learned of, network-wide, and never more than what their limits in force
leave free), then the leader is asked to plan (``/energy/replan``, fire and forget). An end
asks the same. Every instance refreshes its view of the network's sessions every interval.

With no live peer (one Central, SQLite or PostgreSQL) none of this runs: ``active`` is
False and :class:`~.energy.Energy` plans its own sessions as it always did.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, FastAPI, Query, Request
from loguru import logger
from pydantic import BaseModel, Field, StringConstraints

from evcharging.apps.ev_central.energy import Charging, Energy, Sent, SetLimit, plan
from evcharging.apps.ev_central.errors import CentralError, NotOwner
from evcharging.apps.ev_central.network import FORWARDED, Gathered, Network
from evcharging.apps.ev_central.peers import Peer
from evcharging.apps.ev_central.views import ActiveSession, CPView
from evcharging.common.http import GuardedRoute
from evcharging.common.messages import ID_PATTERN, utcnow

__all__ = [
    "LIMITS_PATH",
    "PART_PATH",
    "REPLAN_PATH",
    "ChargingOut",
    "EnergyNetwork",
    "LimitIn",
    "LimitsIn",
    "NotLeader",
    "Part",
    "PartOut",
    "Union",
    "allocated_by_owner",
    "by_owner",
    "merge_parts",
    "provisional_share",
    "reserve",
]

PART_PATH = "/energy/charging"
LIMITS_PATH = "/energy/limits"
REPLAN_PATH = "/energy/replan"
POST_TIMEOUT = 2.0
"""Seconds an owner gets to take a batch of limits (it writes them to its database)."""
RETRY_AFTER = 0.2
"""Seconds before planning again after an owner refused limits (not_owner) or failed."""

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


# --------------------------------------------------------------------------- the pure core


@dataclass(frozen=True)
class Part:
    """One instance's part of the network's input: its sessions at limited sites and the
    limits in force it sent for them (by session id)."""

    instance: str
    sessions: tuple[Charging, ...]
    sent: Mapping[str, Sent]
    leader: bool = False


@dataclass(frozen=True)
class Union:
    """Every part's sessions (each once), their limits in force, and who owns each."""

    sessions: list[Charging]
    sent: dict[str, Sent]
    owner: dict[str, str]
    """Session id → the instance whose part gave it (the owner of its CP)."""


def merge_parts(parts: Iterable[Part]) -> Union:
    """The union of the parts. A session two parts give (a CP handed over between two
    reads) is taken from the first, the owner's part first (the caller's own)."""
    sessions: list[Charging] = []
    sent: dict[str, Sent] = {}
    owner: dict[str, str] = {}
    for part in parts:
        for session in part.sessions:
            if session.session_id in owner:
                continue
            owner[session.session_id] = part.instance
            sessions.append(session)
            before = part.sent.get(session.session_id)
            if before is not None:
                sent[session.session_id] = before
    return Union(sessions, sent, owner)


def _drawn(session: Charging, sent: Sent | None) -> float:
    """The most a session may draw now: its limit in force, else its CP's rate (0 when
    neither is known)."""
    if sent is not None and sent.kw is not None:
        known = [kw for kw in (sent.kw, session.cp_kw, session.car_kw) if kw is not None]
        return min(known)
    known = [kw for kw in (session.cp_kw, session.car_kw) if kw is not None]
    return min(known) if known else 0.0


def reserve(limits: Mapping[str, float], union: Union,
            absent: Iterable[Part]) -> dict[str, float]:
    """The limits to plan with when the `absent` parts (peers that did not answer, as they
    last told) are left out: each site's limit less what their sessions may draw there
    (their limits in force), at least 0. Sessions the union has (taken over) count once,
    in the union."""
    kept = dict(limits)
    for part in absent:
        for session in part.sessions:
            if session.session_id in union.owner or session.site not in kept:
                continue
            site = session.site
            kept[site] = max(0.0, kept[site] - _drawn(session, part.sent.get(session.session_id)))
    return kept


def by_owner(commands: Iterable[SetLimit], owner: Mapping[str, str]) -> dict[str, list[SetLimit]]:
    """The SET_LIMITs by the instance that owns each one's CP (in their order); a command
    of a session no part gave is dropped."""
    groups: dict[str, list[SetLimit]] = {}
    for command in commands:
        instance = owner.get(command.session_id)
        if instance is not None:
            groups.setdefault(instance, []).append(command)
    return groups


def allocated_by_owner(shares: Mapping[str, float], union: Union, limits: Iterable[str],
                       instances: Iterable[str]) -> dict[str, dict[str, float]]:
    """Each instance's part of each limited site's allocation (every limited site, 0
    without sessions there): what ``/sites`` of the instance says, so that the parts add
    up to the site's allocation (:func:`~.merging.merge_sites`)."""
    sites = list(limits)
    parts: dict[str, dict[str, list[float]]] = {
        instance: {site: [] for site in sites} for instance in instances}
    for session in union.sessions:
        share = shares.get(session.session_id)
        instance = union.owner[session.session_id]
        if share is None or session.site is None:
            continue
        parts.setdefault(instance, {site: [] for site in sites}).setdefault(
            session.site, []).append(share)
    return {instance: {site: math.fsum(kws) for site, kws in by_site.items()}
            for instance, by_site in parts.items()}


def provisional_share(limit: float, others: Sequence[float], new: int = 1) -> float:
    """The limit of each of `new` sessions starting at a site whose other sessions may draw
    `others` kW (their limits in force): an equal share of the limit among them all, never
    more than what the others leave free (rounded down to the watt; 0 when nothing is)."""
    if new < 1:
        raise ValueError(f"new must be at least 1, not {new!r}")
    equal = limit / (len(others) + new)
    free = max(0.0, limit - math.fsum(others)) / new
    return math.floor(min(equal, free) * 1000.0 + 1e-6) / 1000.0


# ------------------------------------------------------------------------------ the wire


class ChargingOut(BaseModel):
    """A session as :func:`plan` takes it, and the limit in force its owner sent."""

    session_id: str
    cp_id: str
    site: str | None
    cp_kw: float | None
    car_kw: float | None = None
    kwh_left: float | None = None
    departure: datetime | None = None
    kw: float | None = None
    """The limit in force (None: none sent)."""

    @classmethod
    def of(cls, session: Charging, sent: Sent | None) -> ChargingOut:
        return cls(session_id=session.session_id, cp_id=session.cp_id, site=session.site,
                   cp_kw=session.cp_kw, car_kw=session.car_kw, kwh_left=session.kwh_left,
                   departure=session.departure,
                   kw=sent.kw if sent is not None and sent.cp_id == session.cp_id else None)

    def charging(self) -> Charging:
        return Charging(session_id=self.session_id, cp_id=self.cp_id, site=self.site,
                        cp_kw=self.cp_kw, car_kw=self.car_kw, kwh_left=self.kwh_left,
                        departure=self.departure)


class PartOut(BaseModel):
    """``GET /energy/charging``: an instance's part of the network's sessions."""

    instance: str
    leader: bool
    sessions: list[ChargingOut]

    def part(self) -> Part:
        return Part(self.instance, tuple(s.charging() for s in self.sessions),
                    {s.session_id: Sent(s.cp_id, s.kw) for s in self.sessions
                     if s.kw is not None}, self.leader)


class LimitIn(BaseModel):
    cp_id: Id
    session_id: Id
    kw: Annotated[float | None, Field(ge=0, allow_inf_nan=False)] = None
    site: str | None = None
    """The site it was planned with."""


class LimitsIn(BaseModel):
    """``POST /energy/limits``: the leader's limits for the receiver's CPs, and the
    receiver's part of each limited site's allocation."""

    limits: list[LimitIn] = Field(default_factory=list)
    allocated: dict[str, float] = Field(default_factory=dict)


class NotLeader(CentralError):
    """Another Central allocates (it holds the lock): ask it."""

    code = "not_leader"
    http_status = 409


# ------------------------------------------------------------------------------ the job


class EnergyNetwork:
    """:class:`~.energy.Energy` across Centrals (see the module's text)."""

    def __init__(self, energy: Energy, network: Network, *, token: str | None = None) -> None:
        self.energy = energy
        self.controller = energy.controller
        self.network = network
        self.active = False
        """Other live Centrals share the sessions (as the last look found)."""
        self.view: dict[str, Part] = {}
        """Each live peer's last part: it stands for the peer while the peer does not
        answer, until the peer is no longer live (its CPs then have another owner, which
        reports them)."""
        self._headers = {FORWARDED: network.instance}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._started: dict[str, tuple[str, str]] = {}
        """Sessions started since the last flush at limited sites: id → (CP id, site)."""
        self._plan_lock = asyncio.Lock()
        self._wanted = False
        self._runner: asyncio.Task[None] | None = None
        self._ask_wanted = False
        self._asking: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._posted: dict[str, dict[str, float]] = {}
        """The allocation last given to each peer (sent again only when it changes)."""
        self._silent: set[str] = set()
        self.leader_instance: str | None = None
        """The peer that said it allocates, at the last look."""
        energy.network = self
        self.controller.session_hooks.append(self._on_session)
        self.controller.outbox.before_flush.append(self._provisional)

    # ------------------------------------------------------------------ the routes

    def mount(self, app: FastAPI) -> None:
        """Add the internal routes to Central's app (out of its public document)."""
        router = APIRouter(route_class=GuardedRoute)

        @router.get(PART_PATH, include_in_schema=False)
        async def part(request: Request) -> PartOut:
            request.app.state.access.check(request, "POST")  # between Centrals only
            return self.part_out()

        @router.post(LIMITS_PATH, include_in_schema=False)
        async def limits(body: LimitsIn) -> dict[str, int]:
            return await self.take(body)

        @router.post(REPLAN_PATH, include_in_schema=False, status_code=202)
        async def replan(
            site: Annotated[list[str] | None, Query(description="sites that changed")] = None,
        ) -> dict[str, bool]:
            if not self.energy.leader:
                raise NotLeader("this Central does not allocate (another holds the lock)")
            self.controller.stats["energy_replans_asked"] += 1
            self._spawn(self._replan_asked())
            return {"planning": True}

        app.include_router(router)

    def local_part(self) -> Part:
        sessions = self.energy.charging()
        sent = self.energy.sent
        return Part(self.network.instance, tuple(sessions),
                    {s.session_id: sent[s.session_id] for s in sessions
                     if s.session_id in sent}, self.energy.leader)

    def part_out(self) -> PartOut:
        part = self.local_part()
        return PartOut(instance=part.instance, leader=part.leader, sessions=[
            ChargingOut.of(s, part.sent.get(s.session_id)) for s in part.sessions])

    async def take(self, body: LimitsIn) -> dict[str, int]:
        """The leader's limits for this instance's CPs: all or none (NotOwner)."""
        ownership = self.controller.ownership
        for limit in body.limits:
            if not ownership.owns(limit.cp_id):
                self.controller.stats["energy_limits_not_owner"] += 1
                raise NotOwner(limit.cp_id)
        queued = skipped = 0
        for limit in body.limits:
            cp = self.controller.cps.get(limit.cp_id)
            if cp is None or cp.session is None or cp.session.session_id != limit.session_id:
                skipped += 1  # ended meanwhile: the engine would ignore it
                continue
            self.energy.apply(SetLimit(limit.cp_id, limit.session_id, limit.kw),
                              limit.site or cp.site)
            queued += 1
        for site, kw in body.allocated.items():
            if site in self.energy.limits:
                self.energy.allocated[site] = kw
        self.controller.stats["energy_limits_taken"] += queued
        if queued:
            await self.controller.outbox.flush()  # recorded, then sent, before answering
        return {"queued": queued, "skipped": skipped}

    # ------------------------------------------------------------------ the view

    async def tick(self, *, resend: bool = False) -> bool:
        """Every interval (Energy's ``run``): look for peers, refresh the view of their
        sessions, and plan for the network when this instance allocates. Whether other
        Centrals share the sessions (else Energy plans its own)."""
        try:
            peers = await self.network.peers()
            self.active = bool(peers)
            if not self.active:
                self.view.clear()
                return False
            gathered = await self.network.gather(PART_PATH)
            self._learn(gathered, peers)
            if self.energy.leader:
                async with self._plan_lock:
                    await self._plan(gathered, resend=resend)
        except Exception:  # noqa: BLE001 - a bug here must not stop Central: logged, counted
            self.controller.stats["allocation_errors"] += 1
            logger.exception("smart charging across Centrals: the tick failed")
        return self.active

    def _learn(self, gathered: Gathered, peers: Sequence[Peer]) -> None:
        parts = {p.instance: p for p in gathered.parse(
            lambda body: PartOut.model_validate(body).part())}
        self.view.update(parts)
        live = {peer.instance for peer in peers}
        for instance in [i for i in self.view if i not in live]:
            del self.view[instance]
        leaders = [p.instance for p in parts.values() if p.leader]
        self.leader_instance = leaders[0] if leaders else None

    # ------------------------------------------------------------------ planning

    def request(self, sites: Iterable[str] | None = None) -> None:
        """Plan the network soon: here when this instance allocates, else ask the leader
        (after this instance's queued decisions are recorded). Coalesced."""
        del sites  # the network's plan covers every limited site
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous test): the next interval plans it
        if self.energy.leader:
            self._wanted = True
            if self._runner is None or self._runner.done():
                self._runner = asyncio.get_running_loop().create_task(
                    self._run_plans(), name="energy-network-plan")
        else:
            self._ask_wanted = True
            if self._asking is None or self._asking.done():
                self._asking = asyncio.get_running_loop().create_task(
                    self._run_asks(), name="energy-network-ask")

    async def _run_asks(self) -> None:
        while self._ask_wanted:
            self._ask_wanted = False
            await self._ask_leader()

    async def _run_plans(self) -> None:
        while self._wanted:
            self._wanted = False
            await asyncio.sleep(0)  # every start and end of this tick share one plan
            await self.replan()

    async def _replan_asked(self) -> None:
        try:
            if await self.energy.reload_limits():  # a PUT/DELETE at the asking Central
                self.controller.outbox.flush_soon()  # a removed limit's kw null
        except Exception as exc:  # noqa: BLE001 - planned with the limits known: logged
            logger.warning("smart charging: the site limits could not be read: {}", exc)
        self.request()

    async def replan(self, *, resend: bool = False) -> int:
        """Gather every part and plan the network now (the leader); how many SET_LIMITs."""
        if not self.energy.leader:
            return 0
        try:
            async with self._plan_lock:
                peers = await self.network.peers()
                gathered = await self.network.gather(PART_PATH)
                self._learn(gathered, peers)
                return await self._plan(gathered, resend=resend)
        except Exception:  # noqa: BLE001 - a bug here must not stop Central: logged, counted
            self.controller.stats["allocation_errors"] += 1
            logger.exception("smart charging across Centrals: planning failed")
            return 0

    async def _plan(self, gathered: Gathered, *, resend: bool) -> int:
        own = self.local_part()
        answered = {instance: part for instance, part in self.view.items()
                    if instance in gathered.parts and instance not in gathered.missing}
        absent = [part for instance, part in self.view.items() if instance not in answered]
        union = merge_parts([own, *answered.values()])
        limits = reserve(self.energy.limits, union, absent)
        result = plan(limits, union.sessions, {} if resend else union.sent,
                      policy=self.energy.policy, now=utcnow())
        groups = by_owner(result.commands, union.owner)
        site_of = {s.session_id: s.site for s in union.sessions}
        allocated = allocated_by_owner(result.shares, union, self.energy.limits,
                                       [own.instance, *answered])
        # This instance's own: through its outbox, in force once queued.
        for command in groups.pop(own.instance, []):
            self.energy.apply(command, site_of.get(command.session_id))
        self.energy.allocated.update(allocated.get(own.instance, {}))
        # The others': one POST per owner, concurrently.
        peers = {peer.instance: peer for peer in await self.network.peers()}
        posts = []
        for instance in answered:
            commands = groups.get(instance, [])
            share = allocated.get(instance, {})
            if not commands and self._posted.get(instance) == share:
                continue
            peer = peers.get(instance)
            if peer is None:
                continue
            posts.append(self._post(peer, commands, share, site_of))
        delivered = await asyncio.gather(*posts)
        count = len(result.commands)
        if not all(delivered):
            self._retry_soon()
        if count:
            self.controller.outbox.flush_soon()
        return count

    async def _post(self, peer: Peer, commands: list[SetLimit], share: dict[str, float],
                    site_of: Mapping[str, str | None]) -> bool:
        body = LimitsIn(limits=[LimitIn(cp_id=c.cp_id, session_id=c.session_id, kw=c.kw,
                                        site=site_of.get(c.session_id)) for c in commands],
                        allocated=share)
        try:
            answer = await self.network.client.post(
                peer.url + LIMITS_PATH, json=body.model_dump(mode="json"),
                headers=self._headers, timeout=POST_TIMEOUT)
        except httpx.HTTPError as exc:
            self._failed(peer, f"{type(exc).__name__}: {exc}")
            return False
        if answer.status_code != 200:
            if answer.status_code == 503 and self.network.directory is not None:
                self.network.directory.invalidate()  # it gave the CPs up: read who has them
            self._failed(peer, f"{answer.status_code} {answer.text[:200]}")
            return False
        if peer.instance in self._silent:
            self._silent.discard(peer.instance)
            logger.info("smart charging: Central {} takes limits again", peer.instance)
        self._posted[peer.instance] = share
        self._in_force_at(peer.instance, commands)
        self.controller.stats["set_limits_forwarded"] += len(commands)
        return True

    def _in_force_at(self, instance: str, commands: Iterable[SetLimit]) -> None:
        """The view of a peer's part, with the limits it just took in force."""
        part = self.view.get(instance)
        if part is None:
            return
        sent = dict(part.sent)
        for command in commands:
            if command.kw is None:
                sent.pop(command.session_id, None)
            else:
                sent[command.session_id] = Sent(command.cp_id, command.kw)
        self.view[instance] = Part(part.instance, part.sessions, sent, part.leader)

    def _failed(self, peer: Peer, why: str) -> None:
        self.controller.stats["set_limits_forward_failures"] += 1
        self._posted.pop(peer.instance, None)
        if peer.instance not in self._silent:
            self._silent.add(peer.instance)
            logger.warning("smart charging: Central {} did not take its CPs' limits ({}); "
                           "planning again (logged once until it takes them)",
                           peer.instance, why)

    def _retry_soon(self) -> None:
        async def later() -> None:
            await asyncio.sleep(RETRY_AFTER)  # pacing: the directory is read again meanwhile
            self.request()

        self._spawn(later())

    # ------------------------------------------------------------------ starts and ends

    def _on_session(self, cp: CPView, session: ActiveSession, started: bool) -> None:
        """The controller's hook: a session that starts at a limited site gets a
        provisional limit right before the flush carrying its START_SUPPLY."""
        if started and self.active and cp.site is not None and cp.site in self.energy.limits:
            self._started[session.session_id] = (cp.cp_id, cp.site)

    def _provisional(self) -> None:
        """The outbox's hook (after Energy's, which asked for a plan): the provisional
        limits of the sessions started since the last flush, queued behind their
        START_SUPPLYs."""
        if not self._started:
            return
        started, self._started = self._started, {}
        try:
            self._give_provisional(started)
        except Exception:  # noqa: BLE001 - a bug here must not stop Central: logged, counted
            self.controller.stats["allocation_errors"] += 1
            logger.exception("smart charging: provisional limits failed")

    def _give_provisional(self, started: Mapping[str, tuple[str, str]]) -> None:
        by_site: dict[str, list[tuple[str, str]]] = {}
        for sid, (cp_id, site) in started.items():
            cp = self.controller.cps.get(cp_id)
            if (cp is None or cp.session is None or cp.session.session_id != sid
                    or cp.site != site or site not in self.energy.limits):
                continue  # ended or moved before its flush
            by_site.setdefault(site, []).append((sid, cp_id))
        if not by_site:
            return
        own = self.local_part()
        parts = [own, *self.view.values()]
        union = merge_parts(parts)
        for site, new in by_site.items():
            new_ids = {sid for sid, _ in new}
            others = [_drawn(s, union.sent.get(s.session_id)) for s in union.sessions
                      if s.site == site and s.session_id not in new_ids]
            kw = provisional_share(self.energy.limits[site], others, len(new))
            for sid, cp_id in new:
                self.energy.apply(SetLimit(cp_id, sid, kw), site)
                self.controller.stats["set_limits_provisional"] += 1

    async def _ask_leader(self) -> None:
        """Ask the leader to plan now, once this instance's queued decisions (a start, a
        limit set here) are recorded; fire and forget (the next interval plans anyway)."""
        try:
            await self.controller.outbox.flush()
        except Exception as exc:  # noqa: BLE001 - asked anyway: its flush retries
            logger.debug("smart charging: flush before asking the leader failed: {}", exc)
        peers = await self.network.peers()
        known = [p for p in peers if p.instance == self.leader_instance]
        for peer in known or peers:
            try:
                answer = await self.network.client.post(
                    peer.url + REPLAN_PATH, headers=self._headers, timeout=POST_TIMEOUT)
            except httpx.HTTPError as exc:
                logger.debug("smart charging: Central {} not asked to plan: {}",
                             peer.instance, exc)
                continue
            if answer.status_code == 202:
                self.leader_instance = peer.instance
                self.controller.stats["energy_replans_requested"] += 1
                return
        self.controller.stats["energy_replans_unanswered"] += 1

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel what is under way (asks, plans)."""
        tasks = [*self._tasks, *(t for t in (self._runner, self._asking) if t is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

