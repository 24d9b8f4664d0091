"""The other Centrals' dashboards, followed for this door's own clients (SPEC §9: every
instance's dashboard shows every CP).

While this instance has dashboard clients, :class:`PeerFeeds` holds one WebSocket to each
live peer's ``/ws?scope=local`` (that instance's own CPs). The CPs, telemetry and feed
events of the peers' deltas go to this door's clients as if they were its own, and each
peer's latest summary is added to this instance's in what the clients get
(:meth:`PeerFeeds.summary`). When a peer comes, goes or reconnects, or this instance's
partitions change, every client gets a fresh snapshot. With no clients, or no peers,
nothing is followed. The protocol the clients see is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from loguru import logger
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from evcharging.apps.ev_central.events import Event, Subscription
from evcharging.apps.ev_central.merging import merge_summaries
from evcharging.apps.ev_central.network import FORWARDED, Network
from evcharging.apps.ev_central.ownership import Ownership
from evcharging.apps.ev_central.peers import Peer
from evcharging.apps.ev_central.schemas import SummaryOut
from evcharging.common.backoff import doubling, until_done

__all__ = ["PeerFeeds"]

LOOK_EVERY = 1.0
"""Seconds between two looks at the list of peers while clients watch."""
MAX_MESSAGE = 64 * 1024 * 1024


class PeerFeeds:
    """See the module's text. :meth:`run` is a task of Central's (it ends cancelled)."""

    def __init__(
        self, network: Network, ownership: Ownership | None = None, *,
        look_every: float = LOOK_EVERY,
    ) -> None:
        self.network = network
        self.look_every = look_every
        self.summaries: dict[str, SummaryOut] = {}
        """Each followed peer's latest summary, by instance."""
        self._subscriptions: set[Subscription] = set()
        self._follows: dict[Peer, asyncio.Task[None]] = {}
        self._silent: set[str] = set()
        if ownership is not None:
            ownership.on_change.append(lambda gained, lost: self.resync())

    # ------------------------------------------------------------------ the clients

    @contextlib.contextmanager
    def attach(self, subscription: Subscription) -> Iterator[None]:
        """A client's subscription also gets the peers' changes while attached."""
        self._subscriptions.add(subscription)
        try:
            yield
        finally:
            self._subscriptions.discard(subscription)

    def summary(self, own: SummaryOut, now: datetime) -> SummaryOut:
        """The network's summary: this instance's and each followed peer's."""
        if not self.summaries:
            return own
        return merge_summaries([own, *self.summaries.values()], now)

    def publish(self, event: Event) -> None:
        for subscription in self._subscriptions:
            subscription.add(event)

    def resync(self) -> None:
        """Every client gets a fresh snapshot."""
        for subscription in self._subscriptions:
            subscription.resync()

    # ------------------------------------------------------------------ the peers

    async def run(self) -> None:
        try:
            while True:
                wanted = set(await self.network.peers()) if self._subscriptions else set()
                for peer in set(self._follows) - wanted:
                    task = self._follows.pop(peer)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                for peer in wanted - set(self._follows):
                    self._follows[peer] = asyncio.create_task(
                        self._follow(peer), name=f"dashboard-peer-{peer.instance}")
                await asyncio.sleep(self.look_every)  # pacing: the list is re-read each look
        finally:
            tasks = list(self._follows.values())
            self._follows.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, peer: Peer) -> None:
        """Follow one peer's own dashboard feed, reconnecting while it is wanted."""
        url = "ws" + peer.url.removeprefix("http") + "/ws?scope=local"

        async def session() -> bool:
            try:
                async with connect(url, open_timeout=2.0, max_size=MAX_MESSAGE, proxy=None,
                                   additional_headers={FORWARDED: self.network.instance},
                                   ) as socket:
                    if peer.instance in self._silent:
                        self._silent.discard(peer.instance)
                        logger.info("dashboard: following Central {} again", peer.instance)
                    async for raw in socket:
                        self._take(peer, json.loads(raw))
            except (OSError, WebSocketException, ValueError, ValidationError) as exc:
                if peer.instance not in self._silent:
                    self._silent.add(peer.instance)
                    logger.warning("dashboard: the feed of Central {} at {} failed ({}); "
                                   "its CPs are left out until it answers (logged once)",
                                   peer.instance, url, type(exc).__name__)
            finally:
                if self.summaries.pop(peer.instance, None) is not None:
                    self.resync()
            return False

        try:
            await until_done(session, doubling(0.5, 5.0), what=None)
        finally:
            if self.summaries.pop(peer.instance, None) is not None:
                self.resync()

    def _take(self, peer: Peer, message: Any) -> None:
        if not isinstance(message, dict):
            raise ValueError("a message that is not a JSON object")
        kind = message.get("type")
        if kind == "snapshot":
            self.summaries[peer.instance] = SummaryOut.model_validate(message["summary"])
            self.resync()
            return
        if kind != "delta":
            return
        if message.get("summary") is not None:
            self.summaries[peer.instance] = SummaryOut.model_validate(message["summary"])
        for cp in message.get("cps", ()):
            self.publish({"type": "cp", "cp": cp})
        for telemetry in message.get("telemetry", ()):
            self.publish({"type": "telemetry", "telemetry": telemetry})
        for event in message.get("events", ()):
            self.publish(event)
