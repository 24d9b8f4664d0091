"""More than one Central on one PostgreSQL (issue 16, SPEC §9), for the failover rows of the
chaos matrix and the failover integration test.

:class:`Centrals` starts N Central processes on the run's topics and one PostgreSQL
database (``CENTRAL_DB_URL``), each with its own ``CENTRAL_INSTANCE_ID`` (``central-1`` …,
kept across its restarts), HTTP and TCP ports and ``CENTRAL_PEER_URL``, all in the run's
consumer group. It kills (SIGKILL), stops (SIGTERM) and restarts one, and reads who owns
what from each one's ``/health`` (``"instance"``, ``"partitions"``): :meth:`Centrals.layout`,
:meth:`Centrals.wait_split` (every running instance owns some, none twice, all covered) and
:meth:`Centrals.wait_all_on` (one owns every partition: it took over).

:class:`AnyCentral` is the test's own "any door" (SPEC §9: every instance serves the whole
API): an httpx transport that sends each call to the first instance that answers, so the
harness's ``/cp`` and ``/health`` readers go on when one instance is dead.

:func:`read_pg_rows` reads the ledger (``charging_sessions``) from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg
import httpx

from evcharging.common.kafka import partition_for_key
from evcharging.devtools.process import free_port
from tests.chaos.ledger import SessionRow
from tests.e2e.conftest import Proc, System
from tests.polling import poll

PARTITIONS = 12
"""CENTRAL_TOPIC_PARTITIONS' default: the partitions of every topic Central creates."""
ALL = frozenset(range(PARTITIONS))
TAKEOVER_TARGET = 10.0
"""SPEC §9: after one of two instances is killed, the other owns every partition and
serves every CP within this many seconds."""
READY = r"EV Central .*ready"

Layout = dict[str, frozenset[int]]
"""instance id → the partitions its /health lists (running instances only)."""


def partition_of(cp_id: str) -> int:
    """The CP's partition on Central's topics (Kafka's default partitioner)."""
    return partition_for_key(cp_id, range(PARTITIONS))


def owner_of(layout: Mapping[str, frozenset[int]], cp_id: str) -> str | None:
    return next((i for i, owned in layout.items() if partition_of(cp_id) in owned), None)


def describe_layout(layout: Mapping[str, frozenset[int]]) -> str:
    return ", ".join(f"{i}: {sorted(p)}" for i, p in sorted(layout.items())) or "nobody"


class AnyCentral(httpx.AsyncBaseTransport):
    """Each call to the first of the instances that answers, starting from the one that
    answered last (a connection refused or broken moves it to the next)."""

    def __init__(self, ports: Callable[[], Sequence[int]]) -> None:
        self._ports = ports
        self._inner = httpx.AsyncHTTPTransport()
        self._current = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        ports = list(self._ports())
        body = await request.aread()
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"host"]
        last: httpx.TransportError | None = None
        for step in range(len(ports)):
            index = (self._current + step) % len(ports)
            url = request.url.copy_with(port=ports[index])
            attempt = httpx.Request(request.method, url, headers=headers, content=body,
                                    extensions=request.extensions)
            try:
                response = await self._inner.handle_async_request(attempt)
            except httpx.TransportError as exc:
                last = exc
                continue
            self._current = index
            return response
        assert last is not None, "no Central to call"
        raise last

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class Instance:
    """One Central of the run: its id and ports stay across its restarts."""

    id: str
    http_port: int
    tcp_port: int
    proc: Proc | None = None
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(base_url=self.url, timeout=3)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def running(self) -> bool:
        return (self.proc is not None and self.proc.popen is not None
                and self.proc.popen.poll() is None)


class Centrals:
    """`count` Centrals of `system` on the PostgreSQL database `db_url`."""

    def __init__(self, system: System, db_url: str, count: int = 2) -> None:
        self.system = system
        self.db_url = db_url
        self.env: dict[str, str] = {}
        self.instances = {
            f"central-{n}": Instance(f"central-{n}", free_port(), free_port())
            for n in range(1, count + 1)
        }
        first = next(iter(self.instances.values()))
        # the System's own port is the first instance's (what its helpers print)
        system.http_port, system.tcp_port = first.http_port, first.tcp_port

    @property
    def ids(self) -> list[str]:
        return list(self.instances)

    def ports(self) -> list[int]:
        return [i.http_port for i in self.instances.values()]

    @property
    def addresses(self) -> str:
        """The clients' list of Central addresses (``--central-host``)."""
        return ",".join(f"127.0.0.1:{i.http_port}" for i in self.instances.values())

    @property
    def urls(self) -> str:
        """The same as base URLs (the load generator's ``--central-url``)."""
        return ",".join(i.url for i in self.instances.values())

    def any_door(self) -> httpx.AsyncClient:
        """A client of the whole API that goes to whichever instance answers."""
        first = next(iter(self.instances.values()))
        return httpx.AsyncClient(base_url=first.url, timeout=5,
                                 transport=AnyCentral(self.ports))

    def running(self) -> list[str]:
        return [i.id for i in self.instances.values() if i.running]

    def exited(self) -> str:
        """The instances that were started and are no longer running, with their exit
        codes (for a failure's text), or an empty string."""
        gone = [f"{i.id} exited {i.proc.popen.returncode} (log {i.proc.log_path})"
                for i in self.instances.values()
                if i.proc is not None and i.proc.popen is not None
                and i.proc.popen.poll() is not None]
        return f"; {', '.join(gone)}" if gone else ""

    def other(self, instance_id: str) -> str:
        return next(i for i in self.instances if i != instance_id)

    # ---------------------------------------------------------------- lifecycle

    async def start_all(self, env: dict[str, str] | None = None, timeout: float = 60.0) -> Layout:
        """Every instance, one after the other; returns once they share the partitions."""
        self.env = dict(env or {})
        for instance_id in self.instances:
            await self.start(instance_id)
        return await self.wait_split(timeout)

    async def start(self, instance_id: str) -> Proc:
        """Start (or restart) the instance with its id and ports; returns once it logs that
        it is ready and its /health answers."""
        instance = self.instances[instance_id]
        assert not instance.running, f"{instance_id} is running"
        env = self.system.env({
            **self.env,
            "CENTRAL_DB_URL": self.db_url,
            "CENTRAL_INSTANCE_ID": instance_id,
            "CENTRAL_PEER_URL": instance.url,
        })
        proc = Proc(instance_id, [
            "-m", "evcharging.apps.ev_central.main", "--kafka-bootstrap", self.system.bootstrap,
            "--http-port", str(instance.http_port), "--listen-port", str(instance.tcp_port),
        ], env, self.system.tmp).start()
        self.system.procs.append(proc)
        instance.proc = proc
        await proc.wait_log(READY, timeout=60)
        await poll(lambda: self.health(instance_id), timeout=30,
                   what=f"{instance_id}'s /health", retry_on=(httpx.HTTPError, OSError))
        return proc

    async def kill(self, instance_id: str) -> None:
        """SIGKILL the instance and reap it."""
        proc = self.instances[instance_id].proc
        assert proc is not None
        proc.signal(signal.SIGKILL)
        await proc.wait_exit()

    async def terminate(self, instance_id: str, timeout: float = 30.0) -> int:
        """SIGTERM the instance (an orderly stop); returns its exit code."""
        proc = self.instances[instance_id].proc
        assert proc is not None
        proc.signal(signal.SIGTERM)
        return await proc.wait_exit(timeout)

    async def close(self) -> None:
        for instance in self.instances.values():
            await instance.http.aclose()

    # ---------------------------------------------------------------- who owns what

    async def health(self, instance_id: str) -> dict[str, object] | None:
        """The instance's /health body (200 or 503), None when it does not answer."""
        try:
            answer = await self.instances[instance_id].http.get("/health")
        except (httpx.HTTPError, OSError):
            return None
        try:
            body = answer.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    async def owned(self, instance_id: str) -> frozenset[int] | None:
        """The partitions the instance's /health lists; None when it does not answer."""
        body = await self.health(instance_id)
        if body is None:
            return None
        assert body.get("instance") == instance_id, (
            f"{instance_id}'s /health says instance {body.get('instance')!r}")
        partitions = body.get("partitions")
        assert isinstance(partitions, list), f"{instance_id}'s /health has no partitions: {body}"
        return frozenset(int(p) for p in partitions)

    async def layout(self) -> Layout:
        """What each running instance owns now (asked at once)."""
        ids = self.running()
        answers = await asyncio.gather(*(self.owned(i) for i in ids))
        return {i: owned for i, owned in zip(ids, answers, strict=True) if owned is not None}

    @staticmethod
    def split(layout: Layout, expected: Sequence[str]) -> bool:
        """Every expected instance owns some partitions, none is owned twice, all are
        owned."""
        owned = [layout.get(i, frozenset()) for i in expected]
        return (all(owned) and sum(len(p) for p in owned) == PARTITIONS
                and frozenset().union(*owned) == ALL)

    async def wait_split(self, timeout: float = 60.0) -> Layout:
        """Until the running instances share the partitions (:meth:`split`)."""
        expected = self.running()
        last: Layout = {}

        async def shared() -> Layout | None:
            nonlocal last
            last = await self.layout()
            return last if self.split(last, expected) else None

        try:
            result: Layout = await poll(shared, timeout=timeout, interval=0.1,
                                        what=f"{', '.join(expected)} to share the partitions")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last: {describe_layout(last)}{self.exited()}"
                                 ) from None
        return result

    async def wait_all_on(self, instance_id: str, timeout: float) -> float:
        """Until the instance's /health lists every partition; returns when (monotonic)."""
        last: frozenset[int] | None = None

        async def everything() -> float | None:
            nonlocal last
            last = await self.owned(instance_id)
            return time.monotonic() if last == ALL else None

        try:
            at: float = await poll(everything, timeout=timeout, interval=0.05,
                                   what=f"{instance_id} to own every partition")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it listed {sorted(last or ())}{self.exited()}"
                                 ) from None
        return at


ROWS = ("SELECT session_id, request_id, cp_id, status, kwh, euros, reason"
        " FROM charging_sessions")


async def read_pg_rows(db_url: str) -> list[SessionRow]:
    """Every ``charging_sessions`` row in the PostgreSQL database `db_url`."""
    conn = await asyncpg.connect(db_url, timeout=10)
    try:
        records = await conn.fetch(ROWS)
    finally:
        await conn.close()
    return [SessionRow(r["session_id"], r["request_id"], r["cp_id"], r["status"], r["kwh"],
                       r["euros"], r["reason"]) for r in records]
