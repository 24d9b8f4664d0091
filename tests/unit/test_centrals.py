"""Lists of Central addresses and AnyDoor (evcharging/common/centrals.py, SPEC §9), and
the clients' backoff (evcharging/common/backoff.py).

AnyDoor is exercised against real HTTP responders (``asyncio.start_server``) and a dead
port, through a real httpx client.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from loguru import logger
from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt
from tenacity.wait import wait_base

from evcharging.common.backoff import Restartable, doubling, until_done
from evcharging.common.centrals import AnyDoor, CentralAddress, parse_centrals
from evcharging.common.config import CPMonitorSettings, CtlSettings, LoadSettings

# ---------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost", [("localhost", 8000)]),
        ("h1,h2", [("h1", 8000), ("h2", 8000)]),
        ("h1:8000,h2:8001", [("h1", 8000), ("h2", 8001)]),
        (" h1 , h2:9001 ", [("h1", 8000), ("h2", 9001)]),
        ("10.0.0.1:80,central_b", [("10.0.0.1", 80), ("central_b", 8000)]),
        ("[::1]:8001,::1", [("::1", 8001), ("::1", 8000)]),
    ],
)
def test_a_list_of_hosts_takes_the_default_port_where_none_is_given(
    text: str, expected: list[tuple[str, int]]
) -> None:
    addresses = parse_centrals(text, 8000)
    assert [(a.host, a.port) for a in addresses] == expected
    assert all(a.scheme == "http" and a.path == "" for a in addresses)


def test_a_host_with_and_without_the_default_port_is_not_refused() -> None:
    # the settings check lists before they know the port: only what is written counts
    assert [a.url for a in parse_centrals("h1,h1:8000", 8000)] == ["http://h1:8000"] * 2


def test_url_items_keep_their_scheme_port_and_path() -> None:
    addresses = parse_centrals("http://h1:8000/,https://h2,http://[::1]:81/central/", 1)
    assert [a.url for a in addresses] == [
        "http://h1:8000", "https://h2:443", "http://[::1]:81/central",
    ]
    assert addresses[0].hostport == "h1:8000"
    assert addresses[2].hostport == "[::1]:81"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no Central address given"),
        ("  ", "no Central address given"),
        ("h1,,h2", "item 2 of 'h1,,h2' is empty"),
        ("h1,", "item 2 of 'h1,' is empty"),
        ("h1:", "'h1:': the port must be a number from 1 to 65535"),
        ("h1:0", "'h1:0': the port must be a number from 1 to 65535"),
        ("h1:70000", "'h1:70000': the port must be a number from 1 to 65535"),
        ("h1:http", "'h1:http': the port must be a number"),
        ("my host", "'my host': 'my host' is not a host name or address"),
        ("h1/x", "is not a host name or address"),
        ("ftp://h1", "'ftp://h1': a URL item must start with http:// or https://"),
        ("[nothing]:80", "'[nothing]:80': 'nothing' in brackets is not an IPv6 address"),
        ("fe80::1::2:80", "write an IPv6 address in brackets"),
        ("h1,h2,h1", "'h1': Central http://h1:8000 is given twice"),
        ("h1:9,http://h1:9", "'http://h1:9': Central http://h1:9 is given twice"),
    ],
)
def test_a_bad_list_is_refused_naming_the_item(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_centrals(text, 8000)


def test_the_settings_take_lists_and_refuse_bad_ones_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monitor = CPMonitorSettings(cp_id="CP-1", central_host="h1,h2:8001")
    assert [a.url for a in parse_centrals(monitor.central_host, monitor.central_port)] == [
        "http://h1:8000", "http://h2:8001",
    ]
    assert CtlSettings(host="c1,c2").host == "c1,c2"
    assert LoadSettings(central_url="http://a:1, http://b:2").central_url
    with pytest.raises(ValidationError, match="item 2 of 'h1,,h2' is empty"):
        CPMonitorSettings(cp_id="CP-1", central_host="h1,,h2")
    with pytest.raises(ValidationError, match="'b:2': expected an http:// or https:// URL"):
        LoadSettings(central_url="http://a:1,b:2")


# ---------------------------------------------------------------------- AnyDoor


@dataclass
class Responder:
    """A real HTTP/1.1 server on 127.0.0.1 that answers every request with `body`, or
    accepts and never answers (`silent`)."""

    body: bytes
    silent: bool = False
    requests: int = 0
    server: asyncio.Server | None = None
    hangs: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> Responder:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        assert self.server is not None
        for writer in self.hangs:
            writer.close()
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                self.requests += 1
                if self.silent:
                    self.hangs.append(writer)
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(self.body), self.body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def dead_port() -> int:
    """A port of 127.0.0.1 nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def responders() -> AsyncIterator[list[Responder]]:
    started: list[Responder] = []
    yield started
    for responder in started:
        await responder.stop()


@pytest.fixture
def door_logs() -> Iterator[list[tuple[str, str]]]:
    records: list[tuple[str, str]] = []
    sink_id = logger.add(
        lambda m: records.append((m.record["level"].name, m.record["message"])),
        level="DEBUG", format="{message}", filter="evcharging.common.centrals",
    )
    yield records
    logger.remove(sink_id)


async def get_text(client: httpx.AsyncClient, central: CentralAddress) -> str:
    response = await client.get(f"{central.url}/health", timeout=0.5)
    response.raise_for_status()
    return response.text


async def test_a_call_moves_past_a_dead_central_and_sticks_with_the_one_that_answers(
    responders: list[Responder], door_logs: list[tuple[str, str]]
) -> None:
    b = await Responder(b"B").start()
    c = await Responder(b"C").start()
    responders += [b, c]
    dead = dead_port()
    door = AnyDoor.parse(f"127.0.0.1:{dead},127.0.0.1:{b.port},127.0.0.1:{c.port}", 8000)
    async with httpx.AsyncClient() as client:
        assert await door.call(lambda central: get_text(client, central)) == "B"
        assert door.current.port == b.port
        assert door.switches == 1
        for _ in range(3):  # the one that answered is kept: the dead one is not tried again
            assert await door.call(lambda central: get_text(client, central)) == "B"
    assert door.switches == 1
    assert (b.requests, c.requests) == (4, 0)
    assert door_logs == [
        ("WARNING", f"Central at http://127.0.0.1:{dead} does not answer (connection "
                    f"refused); trying http://127.0.0.1:{b.port}"),
        ("INFO", f"Central at http://127.0.0.1:{b.port} answers; using it"),
    ]


async def test_parallel_calls_sharing_a_door_all_fail_over_and_leave_it_on_the_live_one(
    responders: list[Responder], door_logs: list[tuple[str, str]]
) -> None:
    # The fleet and the gateway share one door: calls in flight together when A dies must
    # not send each other back to A (each failure moved the index on, whoever moved it).
    b = await Responder(b"B").start()
    responders.append(b)
    dead = dead_port()
    door = AnyDoor.parse(f"127.0.0.1:{dead},127.0.0.1:{b.port}", 8000)
    async with httpx.AsyncClient() as client:
        answers = await asyncio.gather(
            *(door.call(lambda central: get_text(client, central)) for _ in range(8)),
            return_exceptions=True,
        )
        assert answers == ["B"] * 8
        assert door.current.port == b.port
        assert door.switches == 1
        assert await door.call(lambda central: get_text(client, central)) == "B"
    assert b.requests == 9
    assert door_logs == [
        ("WARNING", f"Central at http://127.0.0.1:{dead} does not answer (connection "
                    f"refused); trying http://127.0.0.1:{b.port}"),
        ("INFO", f"Central at http://127.0.0.1:{b.port} answers; using it"),
    ]


async def test_a_central_that_times_out_counts_as_not_answering(
    responders: list[Responder], door_logs: list[tuple[str, str]]
) -> None:
    silent = await Responder(b"", silent=True).start()
    b = await Responder(b"B").start()
    responders += [silent, b]
    door = AnyDoor.parse(f"127.0.0.1:{silent.port},127.0.0.1:{b.port}", 8000)
    async with httpx.AsyncClient() as client:
        assert await door.call(lambda central: get_text(client, central)) == "B"
    assert silent.requests == 1
    assert "(timed out)" in door_logs[0][1]


async def test_when_no_central_answers_the_last_error_is_raised_and_logged_once(
    door_logs: list[tuple[str, str]]
) -> None:
    first, second = dead_port(), dead_port()
    door = AnyDoor.parse(f"127.0.0.1:{first},127.0.0.1:{second}", 8000)
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                await door.call(lambda central: get_text(client, central))
    # every round tries both once; only the first switch of the outage is a WARNING
    assert door.switches == 3
    assert [level for level, _ in door_logs] == ["WARNING", "DEBUG", "DEBUG"]


async def test_one_address_is_tried_once_and_logs_nothing(
    door_logs: list[tuple[str, str]]
) -> None:
    door = AnyDoor.parse(f"127.0.0.1:{dead_port()}", 8000)
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await door.call(lambda central: get_text(client, central))
    assert door.switches == 0
    assert door_logs == []


async def test_an_answer_that_is_an_error_does_not_move_on(responders: list[Responder]) -> None:
    a = await Responder(b"A").start()
    b = await Responder(b"B").start()
    responders += [a, b]
    door = AnyDoor.parse(f"127.0.0.1:{a.port},127.0.0.1:{b.port}", 8000)

    async def refused(central: CentralAddress) -> str:
        raise PermissionError(f"{central} refused")

    with pytest.raises(PermissionError):
        await door.call(refused)
    assert door.current.port == a.port
    assert door.switches == 0


def test_describe_names_every_address_in_the_order_tried() -> None:
    assert AnyDoor.parse("h1", 8000).describe() == "http://h1:8000"
    assert AnyDoor.parse("h1,h2:9", 8000).describe() == "http://h1:8000 (then http://h2:9)"
    assert AnyDoor.parse("h1,h2", 9999, urls=False).describe() == "h1:9999 (then h2:9999)"


# ---------------------------------------------------------------------- backoff


async def schedule(wait: wait_base, tries: int) -> list[float]:
    """The waits `until_done` asks of `wait` over `tries` failed tries (no sleeping)."""
    waits: list[float] = []

    async def step() -> bool:
        return False

    async def no_sleep(seconds: float) -> None:
        waits.append(seconds)

    retrying = AsyncRetrying(wait=wait, stop=stop_after_attempt(tries), sleep=no_sleep,
                             retry=retry_if_result(lambda done: not done),
                             retry_error_callback=lambda _s: False)
    await retrying(step)
    return waits


async def test_doubling_waits_double_up_to_the_maximum() -> None:
    assert await schedule(doubling(0.5, 10.0), 8) == [0.5, 1, 2, 4, 8, 10, 10]
    jittered = await schedule(doubling(1.0, 30.0, jitter=0.2), 8)
    for got, base in zip(jittered, [1, 2, 4, 8, 16, 30, 30], strict=True):
        assert 0.8 * base <= got <= 1.2 * base
    with pytest.raises(ValueError, match="0 < initial <= maximum"):
        doubling(2.0, 1.0)


async def test_a_restarted_schedule_starts_over_after_the_try_that_restarted_it() -> None:
    backoff = Restartable(doubling(1.0, 30.0))
    waits: list[float] = []
    tries = 0

    async def step() -> bool:
        nonlocal tries
        tries += 1
        if tries == 4:
            backoff.restart()  # e.g. a connection opened on the 4th try
        return tries == 7

    async def no_sleep(seconds: float) -> None:
        waits.append(seconds)

    await AsyncRetrying(wait=backoff, sleep=no_sleep,
                        retry=retry_if_result(lambda done: not done))(step)
    assert waits == [1, 2, 4, 1, 2, 4]


async def test_until_done_stops_on_done_on_stop_and_on_cancellation() -> None:
    results = iter([False, False, True])

    async def step() -> bool:
        return next(results)

    assert await until_done(step, doubling(0.001, 0.002)) is True

    async def never() -> bool:
        return False

    assert await until_done(never, doubling(0.001, 0.002), stop=stop_after_attempt(3)) is False
    started = asyncio.Event()

    async def slow() -> bool:
        started.set()
        return False

    task = asyncio.create_task(until_done(slow, doubling(60.0, 60.0)))
    await started.wait()
    await asyncio.sleep(0)  # into the 60 s wait
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def broken() -> bool:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await until_done(broken, doubling(0.001, 0.002))
