"""One network, any door (SPEC §9): what an instance does for a CP another instance owns,
and how it answers for the whole network.

**Changes go to the owner.** A change to a CP (:meth:`Network.change`) runs here when this
instance owns the CP; otherwise it is sent to the owner's same endpoint with the same body,
and the caller gets the owner's status and JSON body as they are (:class:`Relayed`). While
nobody owns the CP (a rebalance), or the owner says it no longer does (503 ``not_owner``)
or does not answer, the door reads the list of Centrals again and tries again, for at most
:data:`WAIT_FOR_OWNER` seconds, then answers 503 ``not_owner`` itself. A ``/fleet`` call
is split by owner (:meth:`Network.fleet`): each part goes to its owner, the answers are
added up.

**Loop guard.** A forwarded request carries :data:`FORWARDED` (the sender's instance). An
instance never forwards such a request again: when it does not own the CP it answers 503
``not_owner``, and the sender, whose list was stale, reads it again and retries.

**Reads for the network.** :meth:`Network.gather` asks each live peer for its own part
(``?scope=local``) concurrently, within :data:`READ_TIMEOUT` seconds; a peer that does not
answer is left out, named in the answer's :data:`PARTIAL` header, counted
(``peer_reads_partial``) and logged once until it answers again. With no live peer (one
Central) nothing is asked.

Why HTTP between instances, not the bus: the caller waits for the owner's answer (a 404,
a 409 from the state machine, the CP after the change), which a command on
``central.commands`` cannot carry back; and the owner's API already checks and answers
every change, so a forwarded change is the change itself, with nothing to keep in step.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from loguru import logger
from tenacity import stop_after_delay

from evcharging.apps.ev_central.commands import Command, Operated
from evcharging.apps.ev_central.errors import NotOwner
from evcharging.apps.ev_central.merging import merge_fleet
from evcharging.apps.ev_central.peers import Directory, Peer
from evcharging.apps.ev_central.schemas import CommandOut, FleetOut, cp_out
from evcharging.common.backoff import doubling, until_done

__all__ = [
    "FORWARDED",
    "PARTIAL",
    "READ_TIMEOUT",
    "WAIT_FOR_OWNER",
    "Gathered",
    "Network",
    "Relayed",
    "run_command",
]

T = TypeVar("T")
Item = TypeVar("Item")

FORWARDED = "X-Evcharging-Forwarded"
"""Header of a request one Central sent another: its instance."""
PARTIAL = "X-Evcharging-Partial"
"""Header of a network-wide answer some peers are missing from: their instances."""
WAIT_FOR_OWNER = 10.0
"""Seconds a change waits for its CP's owner (SPEC §9: a take-over lasts at most 10 s)."""
READ_TIMEOUT = 1.0
"""Seconds a peer gets to send its part of a network-wide read."""
CHANGE_TIMEOUT = 5.0
"""Seconds an owner gets to answer a forwarded change (it writes to the database)."""
RETRY_FIRST, RETRY_MAX = 0.05, 1.0


@dataclass(frozen=True)
class Relayed:
    """An owner's answer to a forwarded request, as it gave it."""

    status: int
    body: Any

    @property
    def not_owner(self) -> bool:
        return (self.status == 503 and isinstance(self.body, dict)
                and self.body.get("code") == "not_owner")


@dataclass
class Gathered:
    """Each answering peer's part of a network-wide read (by instance), and the peers that
    gave none."""

    parts: dict[str, httpx.Response]
    missing: list[str]

    @property
    def asked(self) -> bool:
        """Whether there were peers to ask (else the answer is this instance's alone)."""
        return bool(self.parts or self.missing)

    def parse(self, read: Callable[[Any], T]) -> list[T]:
        """Each part's JSON read by `read`; a part it refuses counts as missing (logged)."""
        parsed = []
        for instance, response in self.parts.items():
            try:
                parsed.append(read(response.json()))
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                logger.warning("Central {} gave an invalid answer to {}: {}", instance,
                               response.request.url.path, str(exc)[:200])
                self.missing.append(instance)
        return parsed

    @property
    def headers(self) -> dict[str, str]:
        """:data:`PARTIAL` naming the peers left out, when some were."""
        return {PARTIAL: ",".join(self.missing)} if self.missing else {}


class _Refused(Exception):
    def __init__(self, answer: Relayed) -> None:
        super().__init__(answer.status)
        self.answer = answer


class Network:
    """This instance's door to the others (see the module's text). With no `directory`
    (unit tests, tools) every CP is this instance's and there are no peers."""

    def __init__(
        self,
        directory: Directory | None,
        *,
        token: str | None = None,
        client: httpx.AsyncClient | None = None,
        stats: Counter[str] | None = None,
        wait_for_owner: float = WAIT_FOR_OWNER,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.directory = directory
        self.instance = directory.me.instance if directory else ""
        self._headers = {FORWARDED: self.instance}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._client = client
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.wait_for_owner = wait_for_owner
        self.read_timeout = read_timeout
        self._silent: set[str] = set()  # peers whose failure was logged

    @property
    def client(self) -> httpx.AsyncClient:
        """The HTTP client to the peers, made at its first use (none with no peers)."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(CHANGE_TIMEOUT, connect=1.0), trust_env=False)
        return self._client

    async def close(self) -> None:
        """Close the client to the peers; safe twice."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def peers(self) -> list[Peer]:
        """The other live Centrals (none without a directory)."""
        if self.directory is None:
            return []
        await self.directory.refresh()
        return self.directory.peers()

    # ------------------------------------------------------------------ one CP

    async def change(
        self,
        cp_id: str,
        local: Callable[[], Awaitable[T]],
        method: str,
        path: str,
        body: Any = None,
        *,
        forwarded: bool = False,
        params: Mapping[str, Any] | None = None,
    ) -> T | Relayed:
        """`local()` when this instance owns the CP, else the owner's answer to the same
        request (reads about one CP too). Raises NotOwner when no owner took it within
        :data:`WAIT_FOR_OWNER` seconds, or at once for a `forwarded` request this instance
        does not own (the loop guard)."""
        directory = self.directory
        if directory is None:
            return await local()
        if forwarded:
            if not directory.ownership.owns(cp_id):
                self.stats["forwarded_not_owner"] += 1
                raise NotOwner(cp_id)
            return await local()
        result: list[T | Relayed] = []

        async def attempt() -> bool:
            owner = await directory.owner_of(cp_id)
            if owner is None:
                return False
            if owner.local:
                try:
                    result.append(await local())
                except NotOwner:
                    directory.invalidate()
                    return False
                return True
            answer = await self._send(owner, method, path, body, params)
            if answer is None or answer.not_owner:
                directory.invalidate()
                return False
            self.stats["forwarded"] += 1
            result.append(answer)
            return True

        if not await self._retry(attempt):
            raise NotOwner(cp_id)
        return result[0]

    async def fleet(
        self,
        items: Sequence[Item],
        cp_id_of: Callable[[Item], str],
        local: Callable[[list[Item]], Awaitable[FleetOut]],
        path: str,
        body_of: Callable[[list[Item]], Any],
        *,
        forwarded: bool = False,
    ) -> FleetOut | Relayed:
        """A ``/fleet`` call split by owner: this instance's part runs here, each other part
        goes to its owner; the answers added up. The first refusal of an owner (a 4xx) is
        the answer (the other parts are taken: owners decide apart)."""
        directory = self.directory
        if directory is None or forwarded:
            return await local(list(items))
        pending = list(items)
        done: list[FleetOut] = []

        async def part(owner: Peer, share: list[Item]) -> FleetOut | None:
            if owner.local:
                try:
                    return await local(share)
                except NotOwner:
                    return None
            answer = await self._send(owner, "POST", path, body_of(share), None)
            if answer is None or answer.not_owner:
                return None
            if answer.status != 200:
                raise _Refused(answer)
            self.stats["forwarded"] += 1
            return FleetOut.model_validate(answer.body)

        async def attempt() -> bool:
            nonlocal pending
            groups = await directory.group(pending, cp_id_of)
            retry = groups.pop(None, [])
            owners = [(owner, share) for owner, share in groups.items() if owner is not None]
            outs = await asyncio.gather(*(part(o, s) for o, s in owners),
                                        return_exceptions=True)
            for (_, share), out in zip(owners, outs, strict=True):
                if isinstance(out, BaseException):
                    raise out
                if out is None:
                    retry += share
                else:
                    done.append(out)
            pending = retry
            if pending:
                directory.invalidate()
            return not pending

        try:
            if not await self._retry(attempt):
                raise NotOwner(cp_id_of(pending[0]))
        except _Refused as refused:
            return refused.answer
        return merge_fleet(done)

    async def _retry(self, attempt: Callable[[], Awaitable[bool]]) -> bool:
        return await until_done(attempt, doubling(RETRY_FIRST, RETRY_MAX),
                                stop=stop_after_delay(self.wait_for_owner), what=None)

    async def _send(
        self, peer: Peer, method: str, path: str, body: Any, params: Mapping[str, Any] | None
    ) -> Relayed | None:
        """The peer's answer to a forwarded request; None when it gave none."""
        try:
            response = await self.client.request(
                method, peer.url + path, json=body, params=params, headers=self._headers)
        except httpx.HTTPError as exc:
            self._failed(peer, exc)
            return None
        self._answered(peer)
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": f"Central {peer.instance} gave no JSON answer",
                       "code": "bad_gateway"}
        return Relayed(response.status_code, payload)

    # ------------------------------------------------------------------ the network

    async def gather(self, path: str, params: Mapping[str, Any] | None = None) -> Gathered:
        """Each live peer's own part of a read (``scope=local``), asked concurrently."""
        peers = await self.peers()
        if not peers:
            return Gathered({}, [])
        query = {**(params or {}), "scope": "local"}
        answers = await asyncio.gather(*(self._read(peer, path, query) for peer in peers))
        gathered = Gathered({}, [])
        for peer, answer in zip(peers, answers, strict=True):
            if answer is None:
                gathered.missing.append(peer.instance)
            else:
                gathered.parts[peer.instance] = answer
        if gathered.missing:
            self.stats["peer_reads_partial"] += 1
        return gathered

    async def _read(self, peer: Peer, path: str, query: Mapping[str, Any]) -> httpx.Response | None:
        try:
            response = await self.client.get(peer.url + path, params=query,
                                              headers=self._headers, timeout=self.read_timeout)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            self._failed(peer, exc)
            return None
        self._answered(peer)
        return response

    def _failed(self, peer: Peer, exc: Exception) -> None:
        self.stats["peer_failures"] += 1
        if peer.instance not in self._silent:
            self._silent.add(peer.instance)
            logger.warning("Central {} at {} does not answer ({}); answering without it "
                           "(logged once until it answers)", peer.instance, peer.url,
                           f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

    def _answered(self, peer: Peer) -> None:
        if peer.instance in self._silent:
            self._silent.discard(peer.instance)
            logger.info("Central {} at {} answers again", peer.instance, peer.url)


async def run_command(
    network: Network,
    controller: Operated,
    command: Command,
    cp_id: str,
    reason: str | None,
    *,
    forwarded: bool = False,
) -> CommandOut | Relayed:
    """Run `command` for the CP where it is decided: the answer here, or its owner's."""

    async def local() -> CommandOut:
        cp = await command.run_local(controller, cp_id, reason)
        return CommandOut(sent=command.name, cp=cp_out(cp))

    body = {"reason": reason} if reason else None
    return await network.change(cp_id, local, "POST", command.path(cp_id), body,
                                forwarded=forwarded)
