"""Two Centrals in one process for unit tests of SPEC §9: each with its own in-memory
repository, recording publisher and controller, owning half the partitions; their HTTP
APIs reach each other through httpx's ASGI transport (:class:`Doors`, no sockets), and
the ``centrals`` rows the directory reads are given (:func:`directory_rows`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import httpx

from evcharging.apps.ev_central.controller import CentralOptions
from evcharging.apps.ev_central.ownership import Ownership
from evcharging.apps.ev_central.records import CentralRecord
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.common.kafka import partition_for_key
from evcharging.common.messages import utcnow
from tests.unit.conftest import FlushingController
from tests.unit.fakes import RecordingPublisher

PARTITIONS = 4
OWNED = {"central-1": {0, 1}, "central-2": {2, 3}}


def url(instance: str) -> str:
    return f"http://{instance}.test"


def cps_of(instance: str, count: int, prefix: str = "CP") -> list[str]:
    """`count` CP ids the instance owns."""
    found = [cp for cp in (f"{prefix}-{n:03d}" for n in range(1000))
             if partition_for_key(cp, range(PARTITIONS)) in OWNED[instance]]
    if len(found) < count:
        raise AssertionError("not enough ids")
    return found[:count]


class Doors(httpx.AsyncBaseTransport):
    """Each request to the app of its host; a host taken away does not answer."""

    def __init__(self) -> None:
        self.apps: dict[str, httpx.ASGITransport] = {}
        self.down: set[str] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host in self.down:
            raise httpx.ConnectError("down", request=request)
        return await self.apps[request.url.host].handle_async_request(request)


def directory_rows() -> Callable[[], Awaitable[list[CentralRecord]]]:
    """What the ``centrals`` table says: both instances live, each with its partitions."""

    async def load() -> list[CentralRecord]:
        seen = utcnow() - timedelta(seconds=1)
        return [CentralRecord(name, url(name), f"tx-{name}", frozenset(parts), PARTITIONS,
                              seen) for name, parts in OWNED.items()]

    return load


@dataclass
class Member:
    """One of the two, before its network and API are built."""

    instance: str
    controller: FlushingController
    bus: RecordingPublisher
    ownership: Ownership


@asynccontextmanager
async def members() -> AsyncIterator[list[Member]]:
    """Both instances' controllers, owning their partitions; closed on exit."""
    made: list[Member] = []
    repos: list[SqliteRepository] = []
    try:
        for name, parts in OWNED.items():
            repo = SqliteRepository(":memory:")
            await repo.open()
            repos.append(repo)
            ownership = Ownership(name, standalone=False)
            ownership.assign(parts, PARTITIONS)
            bus = RecordingPublisher()
            controller = FlushingController(bus, repo, CentralOptions(start_timeout=30.0),
                                            ownership=ownership)
            made.append(Member(name, controller, bus, ownership))
        yield made
    finally:
        for member in made:
            await member.controller.close()
        for repo in repos:
            await repo.close()
