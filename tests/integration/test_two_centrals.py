"""Two Centrals, any door (SPEC §9, issue 16): two real Central processes on the real
broker and one PostgreSQL database, with an API token, own disjoint halves of the
partitions. CPs registered through either door land at their owners; their reports come
on the bus, as engines send them. A ``POST /cp/{id}/stop`` sent to the instance that does
not own the CP reaches the owner: STOP_CP is on ``central.commands`` and the caller gets
the owner's 200 answer; so does a STOP_CP sent to that instance's TCP plane. ``/cp``
(every CP, paged) and ``/summary`` are the same at both doors, and each door's dashboard
WebSocket counts every CP."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from evcharging.apps.ev_central.ctl import ControlClient
from evcharging.common.kafka import KafkaBus, KafkaConfig, KafkaConsumerLoop, Routes
from evcharging.common.messages import CentralCommand, CommandType, CPState, CPStatus
from tests.chaos.centrals import Centrals, owner_of
from tests.e2e.conftest import System
from tests.polling import poll

pytestmark = pytest.mark.integration

TOKEN = "two-centrals-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PER_CENTRAL = 3


@asynccontextmanager
async def two_centrals(
    kafka_bootstrap: str, tmp_path: Path, database_url: str
) -> AsyncIterator[Centrals]:
    system = System(kafka_bootstrap, tmp_path)
    centrals = Centrals(system, database_url, 2)
    try:
        await centrals.start_all({"CENTRAL_API_TOKEN": TOKEN})
        yield centrals
    except BaseException:
        sys.stderr.write(system.logs())  # the processes' logs, for a failed test
        raise
    finally:
        await centrals.close()
        await system.close()


def pick(layout: dict[str, frozenset[int]], owner: str, count: int) -> list[str]:
    """`count` CP ids `owner` owns."""
    ids = (f"CP-TWO-{n:03d}" for n in range(10_000))
    return [cp for cp in ids if owner_of(layout, cp) == owner][:count]


async def same_everywhere(centrals: Centrals, path: str, **params: Any) -> Any:
    """The one answer both doors give to `path` (``ts`` aside), once they agree."""
    answers = []
    for instance in centrals.instances.values():
        response = await instance.http.get(path, params=params)
        response.raise_for_status()
        body = response.json()
        if isinstance(body, dict):
            body.pop("ts", None)
        answers.append((body, response.headers.get("X-Total-Count"),
                        response.headers.get("X-Evcharging-Partial")))
    first = answers[0]
    return first if all(answer == first for answer in answers) else None


async def test_any_door_two_centrals(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    async with two_centrals(kafka_bootstrap, tmp_path, database_url) as centrals:
        layout = await centrals.layout()
        one, two = (centrals.instances[i] for i in ("central-1", "central-2"))
        mine, theirs = pick(layout, one.id, PER_CENTRAL), pick(layout, two.id, PER_CENTRAL)
        every = sorted(mine + theirs)

        # Registrations through either door reach the owner.
        for cp_id in mine + theirs[:1]:
            answer = await one.http.post("/cp/register", headers=AUTH,
                                         json={"cp_id": cp_id, "site": "depot"})
            assert answer.status_code == 200, answer.text
        fleet = await two.http.post("/fleet/register", headers=AUTH, json={
            "cps": [{"cp_id": cp_id, "site": "depot"} for cp_id in theirs[1:]]})
        assert fleet.status_code == 200, fleet.text
        assert fleet.json()["count"] == PER_CENTRAL - 1

        config = KafkaConfig(bootstrap=kafka_bootstrap, client_id="probe",
                             topic_prefix=centrals.system.prefix)
        commands: list[CentralCommand] = []

        async def collect(command: CentralCommand) -> None:
            commands.append(command)

        bus = KafkaBus(config)
        await bus.start()
        consumer = KafkaConsumerLoop(config, Routes().add(CentralCommand, collect),
                                     start_at="earliest")
        await consumer.start()
        reading = asyncio.create_task(consumer.run())
        try:
            said = -1.0

            async def all_activated() -> bool:
                """Every CP ACTIVATED; until then each says so every second, as the CPs'
                engines do (their status interval)."""
                nonlocal said
                listed = await one.http.get("/cp", params={"state": "ACTIVATED"})
                activated = [cp["cp_id"] for cp in listed.json()]
                if activated == every:
                    return True
                if time.monotonic() - said >= 1.0:
                    said = time.monotonic()
                    for cp_id in sorted(set(every) - set(activated)):
                        await bus.publish(CPStatus(cp_id=cp_id, state=CPState.ACTIVATED))
                return False

            await poll(all_activated, timeout=30, what="every CP ACTIVATED at central-1's door",
                       retry_on=(httpx.HTTPError,))

            # A stop sent to the instance that does not own the CP reaches its owner.
            target = theirs[0]
            stop = await one.http.post(f"/cp/{target}/stop", headers=AUTH,
                                       json={"reason": "any door"})
            assert stop.status_code == 200, stop.text
            assert stop.json()["sent"] == "STOP_CP"
            assert stop.json()["cp"]["cp_id"] == target
            await poll(lambda: [c for c in commands if c.cp_id == target
                                and c.cmd is CommandType.STOP_CP], timeout=20,
                       what=f"STOP_CP for {target} on central.commands")
            refused = await one.http.post(f"/cp/{target}/stop", json={})
            assert refused.status_code == 401  # the door checks the token before forwarding

            # So does the TCP plane's (its answer carries the owner's).
            other = theirs[1]
            async with ControlClient("127.0.0.1", one.tcp_port) as control:
                reply = await control.request({"cmd": "STOP_CP", "cp_id": other,
                                               "token": TOKEN})
                assert reply["ok"] is True, reply
                assert (reply["sent"], reply["cp"]["cp_id"]) == ("STOP_CP", other)
                status = await control.request({"cmd": "STATUS", "token": TOKEN})
                assert [cp["cp_id"] for cp in status["cps"]] == every
            await poll(lambda: [c for c in commands if c.cp_id == other
                                and c.cmd is CommandType.STOP_CP], timeout=20,
                       what=f"STOP_CP for {other} on central.commands")

            # Both doors answer for the whole network, the same.
            body, total, partial = await poll(lambda: same_everywhere(centrals, "/cp"),
                                              timeout=20, what="/cp the same at both doors")
            assert [cp["cp_id"] for cp in body] == every
            assert (total, partial) == (str(len(every)), None)
            page, total, _ = await poll(
                lambda: same_everywhere(centrals, "/cp", limit=2, offset=2),
                timeout=20, what="a page of /cp the same at both doors")
            assert [cp["cp_id"] for cp in page] == every[2:4]
            assert total == str(len(every))
            summary, _, partial = await poll(lambda: same_everywhere(centrals, "/summary"),
                                             timeout=20, what="/summary the same at both doors")
            assert summary["cps"] == len(every)
            assert sum(summary["by_state"].values()) == len(every)
            assert [site["cps"] for site in summary["by_site"]] == [len(every)]
            assert partial is None
            for instance in (one, two):
                local = (await instance.http.get("/summary", params={"scope": "local"})).json()
                assert local["cps"] == PER_CENTRAL
                answer = await instance.http.get(f"/cp/{target}")
                assert answer.status_code == 200
                assert answer.json()["cp_id"] == target

            # Each door's dashboard counts every CP (its peer's through the peer's feed).
            for instance in (one, two):
                url = "ws" + instance.url.removeprefix("http") + "/ws"
                async with connect(url, proxy=None) as socket:
                    async def network_snapshot(socket: Any = socket) -> bool:
                        message = json.loads(await socket.recv())
                        return bool(message["type"] == "snapshot"
                                    and message["summary"]["cps"] == len(every))

                    await poll(network_snapshot, timeout=20,
                               what=f"{instance.id}'s dashboard counts every CP")
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            await consumer.stop()
            await bus.stop()
