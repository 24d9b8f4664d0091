"""The TCP control plane (SPEC §6) and its CLI, over real sockets on 127.0.0.1.

Central's side is a real Controller on an in-memory SQLite repository and a recording
publisher. Every read has a timeout; nothing synchronises on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from evcharging.apps.ev_central import ctl
from evcharging.apps.ev_central import tcp_server as tcp_server_module
from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.ctl import CentralUnreachable, ControlClient, ControlError
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.apps.ev_central.schemas import cp_out
from evcharging.apps.ev_central.tcp_server import (
    MAX_PENDING,
    MUTATING,
    TcpControlServer,
    is_loopback,
)
from evcharging.common.framing import (
    ACK,
    DLE,
    ETX,
    MAX_PAYLOAD,
    NAK,
    STX,
    DecodeEvent,
    Frame,
    FrameDecoder,
    decode_message,
    encode_frame,
    encode_message,
    lrc,
)
from evcharging.common.kafka import Topic
from evcharging.common.messages import CentralCommand, CommandType, CPRegistration, CPStatus
from evcharging.common.states import CPState
from evcharging.common.throttle import AuthThrottle
from tests.polling import poll
from tests.unit.conftest import FlushingController
from tests.unit.fakes import RecordingPublisher

TIMEOUT = 5.0
HOST = "127.0.0.1"
TOKEN = "s3cret-token"
CTL_VARIABLES = (
    "CENTRAL_CTL_HOST",
    "CENTRAL_CTL_TIMEOUT",
    "CENTRAL_LISTEN_PORT",
    "CENTRAL_API_TOKEN",
    "EVCHARGING_API_TOKEN",
)


# ---------------------------------------------------------------------- helpers


class RawClient:
    """A byte-level client: tests drive every ACK/NAK by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.events: deque[DecodeEvent] = deque()
        self.buf = bytearray()
        self.raw_frames: list[bytes] = []  # the wire bytes of each answer frame received

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _fill(self) -> None:
        data = await asyncio.wait_for(self.reader.read(64 * 1024), TIMEOUT)
        if not data:
            raise EOFError("Central closed the connection")
        self.buf += data

    async def read_byte(self) -> int:
        if not self.buf:
            await self._fill()
        byte = self.buf[0]
        del self.buf[0]
        return byte

    async def read_event(self) -> DecodeEvent:
        """The next decoder event of the answer stream.

        The wire bytes of the frame are kept in ``raw_frames``; Central sends nothing
        after an answer until it is acknowledged, so what was read is exactly the frame.
        """
        raw = bytearray()
        while not self.events:
            if not self.buf:
                await self._fill()
            chunk = bytes(self.buf)
            self.buf.clear()
            raw += chunk
            self.events.extend(self.decoder.feed(chunk))
        self.raw_frames.append(bytes(raw[raw.find(STX) :]))
        return self.events.popleft()

    async def read_answer(self) -> dict[str, Any]:
        event = await self.read_event()
        assert isinstance(event, Frame), event
        return decode_message(event.payload)

    async def expect_eof(self) -> None:
        assert not self.buf and not self.events
        assert await asyncio.wait_for(self.reader.read(), TIMEOUT) == b""

    async def exchange(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """One whole exchange done right: frame, ACK, answer, ACK."""
        await self.send(encode_message(request))
        assert await self.read_byte() == ACK
        answer = await self.read_answer()
        await self.send(bytes((ACK,)))
        return answer

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_client(port: int) -> AsyncIterator[RawClient]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), TIMEOUT)
    client = RawClient(reader, writer)
    try:
        yield client
    finally:
        await client.close()


PAD_CHARS = [chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\']


def padded(request: dict[str, Any], lrc_value: int) -> dict[str, Any]:
    """``request`` plus a ``pad`` field chosen so that the payload's LRC is ``lrc_value``."""
    base = lrc(decode_payload(encode_message({**request, "pad": ""})))
    for first in PAD_CHARS:
        for second in PAD_CHARS:
            if ord(first) ^ ord(second) == base ^ lrc_value:
                return {**request, "pad": first + second}
    raise AssertionError(f"no padding gives LRC 0x{lrc_value:02x}")


def decode_payload(frame: bytes) -> bytes:
    events = FrameDecoder().feed(frame)
    assert len(events) == 1 and isinstance(events[0], Frame)
    return events[0].payload


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def commands(bus: RecordingPublisher) -> list[CentralCommand]:
    return [
        m for t, m in bus.messages if t is Topic.CENTRAL_COMMANDS and isinstance(m, CentralCommand)
    ]


# ---------------------------------------------------------------------- fixtures


async def activate(controller: Controller, *cp_ids: str, location: str = "depot") -> None:
    for cp_id in cp_ids:
        await controller.register(CPRegistration(cp_id=cp_id, location=location))
        await controller.handle_status(CPStatus(cp_id=cp_id, state=CPState.ACTIVATED))


@pytest.fixture
async def controller(bus: RecordingPublisher) -> AsyncIterator[Controller]:
    async with SqliteRepository(":memory:") as repo:
        central = FlushingController(bus, repo)
        await activate(central, "CP-002", "CP-001")
        try:
            yield central
        finally:
            await central.close()


@pytest.fixture
async def server(controller: Controller) -> AsyncIterator[TcpControlServer]:
    async with TcpControlServer(controller, HOST, 0, ack_timeout=2.0) as srv:
        yield srv


@pytest.fixture
async def token_server(controller: Controller) -> AsyncIterator[TcpControlServer]:
    async with TcpControlServer(controller, HOST, 0, TOKEN, ack_timeout=2.0) as srv:
        yield srv


@pytest.fixture
async def client(server: TcpControlServer) -> AsyncIterator[RawClient]:
    async with raw_client(server.port) as raw:
        yield raw


# ---------------------------------------------------------------------- requests


async def test_ping(server: TcpControlServer, client: RawClient) -> None:
    answer = await client.exchange({"cmd": "PING"})
    assert answer["ok"] is True and answer["pong"] is True
    assert answer["cps"] == 2
    assert server.port > 0
    assert (server.frames_ok, server.requests, server.errors) == (1, 1, 0)


async def test_request_id_is_echoed(client: RawClient) -> None:
    answer = await client.exchange({"cmd": "PING", "id": 42})
    assert answer["id"] == 42
    answer = await client.exchange({"cmd": "NOPE", "id": "abc"})
    assert answer["ok"] is False and answer["id"] == "abc"


async def test_status_of_every_cp(client: RawClient) -> None:
    answer = await client.exchange({"cmd": "STATUS"})
    assert answer["ok"] is True
    assert [cp["cp_id"] for cp in answer["cps"]] == ["CP-001", "CP-002"]
    assert {cp["state"] for cp in answer["cps"]} == {"ACTIVATED"}
    assert answer["truncated"] is False and answer["total"] == answer["count"] == 2


async def test_status_of_one_cp(client: RawClient, controller: Controller) -> None:
    answer = await client.exchange({"cmd": "STATUS", "cp_id": "CP-002"})
    assert answer == {"ok": True, "cp": cp_out(controller.get("CP-002")).model_dump(mode="json")}


async def test_status_of_unknown_cp(server: TcpControlServer, client: RawClient) -> None:
    answer = await client.exchange({"cmd": "STATUS", "cp_id": "CP-404"})
    assert answer["ok"] is False
    assert answer["code"] == "unknown_cp" and "CP-404" in answer["error"]
    assert server.errors == 1


@pytest.mark.parametrize(
    ("request_obj", "code"),
    [
        ({"cmd": "STOP_CP"}, "invalid_request"),
        ({"cmd": "STOP_CP", "cp_id": 7}, "invalid_request"),
        ({"cmd": "RESUME_CP", "cp_id": "bad id!"}, "invalid_request"),
        ({"cmd": "STATUS", "cp_id": ["CP-001"]}, "invalid_request"),
        ({"cmd": "STOP_CP", "cp_id": "CP-001", "reason": 5}, "invalid_request"),
        ({"cmd": "STOP_CP", "cp_id": "CP-001", "reason": "x" * 501}, "invalid_request"),
        ({"cmd": "STOP_CP", "cp_id": "CP-404"}, "unknown_cp"),
        ({"cmd": "REBOOT"}, "unknown_cmd"),
        ({"cmd": 1}, "invalid_request"),
        ({"command": "PING"}, "invalid_request"),
    ],
)
async def test_invalid_requests(
    client: RawClient, bus: RecordingPublisher, request_obj: dict[str, Any], code: str
) -> None:
    answer = await client.exchange(request_obj)
    assert answer["ok"] is False
    assert answer["code"] == code and answer["error"]
    assert commands(bus) == []


async def test_stop_cp_sends_the_command_on_the_bus(
    client: RawClient, bus: RecordingPublisher
) -> None:
    answer = await client.exchange({"cmd": "STOP_CP", "cp_id": "CP-001", "reason": "maintenance"})
    assert answer["ok"] is True and answer["sent"] == "STOP_CP"
    assert answer["cp"]["cp_id"] == "CP-001"
    [command] = commands(bus)
    assert command.cp_id == "CP-001" and command.cmd is CommandType.STOP_CP
    assert command.payload.reason == "maintenance"


async def test_stop_cp_default_reason(client: RawClient, bus: RecordingPublisher) -> None:
    assert (await client.exchange({"cmd": "STOP_CP", "cp_id": "CP-002"}))["ok"] is True
    [command] = commands(bus)
    assert command.payload.reason == "stopped by operator"


async def test_resume_refused_when_not_stopped(client: RawClient, bus: RecordingPublisher) -> None:
    answer = await client.exchange({"cmd": "RESUME_CP", "cp_id": "CP-001"})
    assert answer["ok"] is False and answer["code"] == "not_allowed"
    assert commands(bus) == []


async def test_resume_a_stopped_cp(
    client: RawClient, bus: RecordingPublisher, controller: Controller
) -> None:
    await controller.handle_status(CPStatus(cp_id="CP-001", state=CPState.STOPPED))
    answer = await client.exchange({"cmd": "RESUME_CP", "cp_id": "CP-001"})
    assert answer["ok"] is True and answer["sent"] == "RESUME_CP"
    assert answer["cp"]["state"] == "STOPPED"  # until the CP reports ACTIVATED
    [command] = commands(bus)
    assert command.cmd is CommandType.RESUME_CP and command.cp_id == "CP-001"


async def test_a_failing_handler_is_answered_and_the_server_goes_on(
    client: RawClient, controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def boom(cp_id: str, reason: str = "") -> None:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(controller, "stop_cp", boom)
    answer = await client.exchange({"cmd": "STOP_CP", "cp_id": "CP-001"})
    assert answer == {"ok": False, "error": "internal error", "code": "internal"}
    assert (await client.exchange({"cmd": "PING"}))["ok"] is True


# ---------------------------------------------------------------------- token


@pytest.mark.parametrize("token", [None, "wrong", "", 12345, TOKEN + "x"])
async def test_token_missing_or_wrong(
    token_server: TcpControlServer, bus: RecordingPublisher, token: Any
) -> None:
    request: dict[str, Any] = {"cmd": "STOP_CP", "cp_id": "CP-001"}
    if token is not None:
        request["token"] = token
    async with raw_client(token_server.port) as raw:
        answer = await raw.exchange(request)
        assert answer == {"ok": False, "error": "unauthorized", "code": "unauthorized"}
        ping = await raw.exchange({"cmd": "PING"})
        assert ping["code"] == "unauthorized"
    assert commands(bus) == []


async def test_right_token(token_server: TcpControlServer, bus: RecordingPublisher) -> None:
    async with raw_client(token_server.port) as raw:
        answer = await raw.exchange({"cmd": "STOP_CP", "cp_id": "CP-001", "token": TOKEN})
        assert answer["ok"] is True
        assert (await raw.exchange({"cmd": "PING", "token": TOKEN}))["pong"] is True
    assert len(commands(bus)) == 1


# ---------------------------------------------------------------------- framing


async def test_request_written_one_byte_at_a_time(client: RawClient) -> None:
    for byte in encode_message({"cmd": "STATUS", "cp_id": "CP-001"}):
        await client.send(bytes((byte,)))
    assert await client.read_byte() == ACK
    answer = await client.read_answer()
    await client.send(bytes((ACK,)))
    assert answer["ok"] is True and answer["cp"]["cp_id"] == "CP-001"


async def test_garbage_before_stx_is_ignored(server: TcpControlServer, client: RawClient) -> None:
    await client.send(b"hello\x00\x06\x15\xff\x03\x10 noise")
    answer = await client.exchange({"cmd": "PING"})
    assert answer["ok"] is True
    assert server.frames_bad == 0


@pytest.mark.parametrize("lrc_value", [STX, ETX, DLE])
async def test_request_whose_lrc_needs_escaping(client: RawClient, lrc_value: int) -> None:
    request = padded({"cmd": "STATUS", "cp_id": "CP-001"}, lrc_value)
    frame = encode_message(request)
    assert frame[-3:] == bytes((ETX, DLE, lrc_value ^ 0x20))  # the LRC really is escaped
    answer = await client.exchange(request)
    assert answer["ok"] is True and answer["cp"]["cp_id"] == "CP-001"


async def test_answers_are_frames_with_matching_lrc(client: RawClient) -> None:
    await client.exchange({"cmd": "STATUS"})
    [raw] = client.raw_frames
    assert raw[0] == STX
    assert raw == encode_frame(decode_payload(raw))


async def test_corrupt_lrc_gets_nak_then_the_retransmission_is_answered(
    server: TcpControlServer, client: RawClient
) -> None:
    good = encode_message({"cmd": "PING"})
    bad = good[:-1] + bytes((good[-1] ^ 0x01,))
    await client.send(bad)
    assert await client.read_byte() == NAK
    answer = await client.exchange({"cmd": "PING"})
    assert answer["ok"] is True
    assert (server.frames_bad, server.frames_ok, server.requests) == (1, 1, 1)


async def test_invalid_escape_gets_nak(server: TcpControlServer, client: RawClient) -> None:
    await client.send(bytes((STX,)) + b'{"cmd":\x10\x41"PING"}' + bytes((ETX, 0x00)))
    assert await client.read_byte() == NAK
    assert (await client.exchange({"cmd": "PING"}))["ok"] is True
    assert server.frames_bad == 1


async def test_client_nak_makes_the_server_resend_the_identical_answer(
    server: TcpControlServer, client: RawClient
) -> None:
    await client.send(encode_message({"cmd": "STATUS"}))
    assert await client.read_byte() == ACK
    first = await client.read_answer()
    await client.send(bytes((NAK,)))
    second = await client.read_answer()
    await client.send(bytes((ACK,)))
    assert client.raw_frames[0] == client.raw_frames[1]
    assert first == second and first["ok"] is True
    assert server.retransmits == 1
    assert (await client.exchange({"cmd": "PING"}))["ok"] is True


async def test_too_many_naks_close_the_connection(controller: Controller) -> None:
    async with (
        TcpControlServer(controller, HOST, 0, max_retransmits=2) as srv,
        raw_client(srv.port) as raw,
    ):
        await raw.send(encode_message({"cmd": "PING"}))
        assert await raw.read_byte() == ACK
        for _ in range(3):  # the answer and two retransmissions
            await raw.read_answer()
            await raw.send(bytes((NAK,)))
        await raw.expect_eof()
        assert srv.retransmits == 2


async def test_no_ack_for_the_answer_closes_the_connection(controller: Controller) -> None:
    async with (
        TcpControlServer(controller, HOST, 0, ack_timeout=0.2) as srv,
        raw_client(srv.port) as raw,
    ):
        await raw.send(encode_message({"cmd": "PING"}))
        assert await raw.read_byte() == ACK
        await raw.read_answer()
        await raw.expect_eof()  # after ack_timeout, without an ACK


async def test_idle_connection_is_closed(controller: Controller) -> None:
    async with (
        TcpControlServer(controller, HOST, 0, idle_timeout=0.2) as srv,
        raw_client(srv.port) as raw,
    ):
        await raw.expect_eof()


async def test_oversize_frame_gets_nak_and_the_connection_is_closed(
    server: TcpControlServer, client: RawClient
) -> None:
    # Exactly one byte over: the decoder gives up on the last byte sent, so the server
    # has read everything when it closes (no reset races the NAK).
    await client.send(bytes((STX,)) + b"a" * (MAX_PAYLOAD + 1))
    assert await client.read_byte() == NAK
    await client.expect_eof()
    assert server.oversize == 1 and server.requests == 0


async def test_largest_request_is_accepted(client: RawClient) -> None:
    base = {"cmd": "PING", "pad": ""}
    overhead = len(json.dumps(base, separators=(",", ":")))
    answer = await client.exchange({**base, "pad": "p" * (MAX_PAYLOAD - overhead)})
    assert answer["ok"] is True


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'"PING"', b"\xff\xfe{}", b""])
async def test_payload_that_is_not_a_json_object(
    server: TcpControlServer, client: RawClient, payload: bytes
) -> None:
    await client.send(encode_frame(payload))
    assert await client.read_byte() == ACK  # the frame itself is whole
    answer = await client.read_answer()
    await client.send(bytes((ACK,)))
    assert answer["ok"] is False and answer["code"] == "invalid_request"
    assert (await client.exchange({"cmd": "PING"}))["ok"] is True
    assert server.frames_ok == 2


# ---------------------------------------------------------------------- while awaiting the ACK


async def test_pipelined_requests_are_answered_in_order(client: RawClient) -> None:
    await client.send(
        encode_message({"cmd": "PING", "id": 1}) + encode_message({"cmd": "STATUS", "id": 2})
    )
    assert await client.read_byte() == ACK
    assert (await client.read_answer())["id"] == 1
    await client.send(bytes((ACK,)))
    assert await client.read_byte() == ACK
    assert (await client.read_answer())["id"] == 2
    await client.send(bytes((ACK,)))


@pytest.mark.parametrize("lrc_value", [ACK, NAK])
async def test_frame_sent_before_the_ack_is_kept_even_when_its_lrc_looks_like_a_reply(
    server: TcpControlServer, client: RawClient, lrc_value: int
) -> None:
    await client.send(encode_message({"cmd": "PING", "id": 1}))
    assert await client.read_byte() == ACK
    assert (await client.read_answer())["id"] == 1
    early = encode_message(padded({"cmd": "PING", "id": 2}, lrc_value))
    assert early[-1] == lrc_value
    # noise, then a whole frame whose last byte is ACK/NAK, then the real ACK
    await client.send(b"noise" + early + bytes((ACK,)))
    assert await client.read_byte() == ACK
    assert (await client.read_answer())["id"] == 2
    await client.send(bytes((ACK,)))
    assert server.retransmits == 0
    assert (await client.exchange({"cmd": "PING", "id": 3}))["id"] == 3


async def test_ack_and_next_request_in_one_segment(client: RawClient) -> None:
    await client.send(encode_message({"cmd": "PING", "id": 1}))
    assert await client.read_byte() == ACK
    await client.read_answer()
    await client.send(bytes((ACK,)) + encode_message({"cmd": "PING", "id": 2}))
    assert await client.read_byte() == ACK
    assert (await client.read_answer())["id"] == 2
    await client.send(bytes((ACK,)))


async def test_too_many_pipelined_frames_close_the_connection(client: RawClient) -> None:
    await client.send(encode_message({"cmd": "PING"}))
    assert await client.read_byte() == ACK
    await client.read_answer()
    await client.send(encode_message({"cmd": "PING"}) * (MAX_PENDING + 1))
    await client.expect_eof()


# ---------------------------------------------------------------------- large answers


# 150 CPs of about 800 bytes each do not fit in one 64 KiB answer.
BIG_NETWORK = [f"CP-{i:04d}" for i in range(150)]
LONG_LOCATION = "L" * 500


async def test_status_too_large_for_one_frame_is_truncated(
    controller: Controller, client: RawClient
) -> None:
    await activate(controller, *BIG_NETWORK, location=LONG_LOCATION)
    answer = await client.exchange({"cmd": "STATUS"})
    assert answer["ok"] is True and answer["truncated"] is True
    assert answer["total"] == len(BIG_NETWORK) + 2
    assert 0 < answer["count"] == len(answer["cps"]) < answer["total"]
    assert [cp["cp_id"] for cp in answer["cps"]] == sorted(controller.cps)[: answer["count"]]
    assert len(decode_payload(client.raw_frames[-1])) <= MAX_PAYLOAD
    # the rest is reachable one CP at a time
    last = await client.exchange({"cmd": "STATUS", "cp_id": BIG_NETWORK[-1]})
    assert last["ok"] is True and last["cp"]["location"] == LONG_LOCATION


async def test_an_answer_that_cannot_be_framed_becomes_an_error(
    client: RawClient, controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    def huge(cp: object) -> dict[str, Any]:
        return {"cp_id": "CP-001", "blob": "x" * (MAX_PAYLOAD + 1)}

    monkeypatch.setattr(tcp_server_module, "_cp", huge)
    answer = await client.exchange({"cmd": "STATUS", "cp_id": "CP-001", "id": 9})
    assert answer["ok"] is False and answer["code"] == "answer_too_large"
    assert answer["id"] == 9


# ---------------------------------------------------------------------- many clients, shutdown


async def test_200_clients_at_once(server: TcpControlServer) -> None:
    async def one(n: int) -> None:
        async with raw_client(server.port) as raw:
            assert (await raw.exchange({"cmd": "PING", "id": n}))["id"] == n
            status = await raw.exchange({"cmd": "STATUS"})
            assert status["ok"] is True and len(status["cps"]) == 2

    await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(200))), 30)
    assert server.connections == 200
    assert server.requests == 400 and server.errors == 0


async def test_stop_closes_open_connections(controller: Controller) -> None:
    srv = TcpControlServer(controller, HOST, 0)
    await srv.start()
    async with raw_client(srv.port) as first, raw_client(srv.port) as second:
        assert (await first.exchange({"cmd": "PING"}))["ok"] is True
        await second.send(bytes((STX,)) + b'{"cmd":')  # in the middle of a frame
        await srv.stop()
        await first.expect_eof()
        await second.expect_eof()
        assert srv.active_connections == 0 and not srv.serving
        await srv.stop()  # safe twice
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection(HOST, srv.port), TIMEOUT)


async def test_stop_before_start_is_harmless(controller: Controller) -> None:
    srv = TcpControlServer(controller, HOST, 0)
    await srv.stop()
    assert not srv.serving and srv.active_connections == 0
    # The early stop leaves nothing behind: the server still starts and answers.
    async with srv, raw_client(srv.port) as raw:
        assert srv.serving
        assert (await raw.exchange({"cmd": "PING"}))["pong"] is True
    assert not srv.serving and srv.connections == 1


# ---------------------------------------------------------------------- safe defaults


@contextlib.contextmanager
def warnings_logged() -> Iterator[list[str]]:
    """The messages Central logs at WARNING and above while the block runs."""
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    try:
        yield messages
    finally:
        logger.remove(sink)


def remote(peername: object) -> bool:
    """A peer check for which no client is local, as if all came from another host."""
    return False


@pytest.mark.parametrize(
    ("peername", "local"),
    [
        (("127.0.0.1", 50000), True),
        (("127.255.1.2", 1), True),
        (("::1", 50000, 0, 0), True),
        (("::ffff:127.0.0.1", 50000, 0, 0), True),
        (("0:0:0:0:0:0:0:1", 1, 0, 0), True),
        (("192.0.2.2", 50000), False),
        (("10.0.0.1", 50000), False),
        (("0.0.0.0", 50000), False),
        (("::", 50000, 0, 0), False),
        (("::ffff:10.0.0.1", 50000, 0, 0), False),
        (("fe80::1%eth0", 50000, 0, 2), False),
        (("2001:db8::1", 50000, 0, 0), False),
        (("localhost", 50000), False),  # a name, not an address
        (("127.0.0.1.evil.example", 1), False),
        ((b"127.0.0.1", 1), False),
        ((), False),
        ("", False),  # a Unix socket's peer
        ("127.0.0.1", False),
        (None, False),
    ],
)
def test_is_loopback(peername: object, local: bool) -> None:
    assert is_loopback(peername) is local


async def test_the_default_peer_check_is_loopback(server: TcpControlServer) -> None:
    assert server.is_local is is_loopback


@pytest.mark.parametrize("cmd", sorted(MUTATING))
async def test_without_token_remote_clients_cannot_change_cps(
    controller: Controller, bus: RecordingPublisher, cmd: str
) -> None:
    await controller.handle_status(CPStatus(cp_id="CP-001", state=CPState.STOPPED))
    async with (
        TcpControlServer(controller, HOST, 0, is_local=remote) as srv,
        raw_client(srv.port) as raw,
    ):
        answer = await raw.exchange({"cmd": cmd, "cp_id": "CP-001", "id": 5})
        assert answer["ok"] is False and answer["code"] == "forbidden" and answer["id"] == 5
        assert cmd in answer["error"] and "CENTRAL_API_TOKEN" in answer["error"]
        # reading stays open to everyone
        assert (await raw.exchange({"cmd": "PING"}))["pong"] is True
        status = await raw.exchange({"cmd": "STATUS", "cp_id": "CP-001"})
        assert status["ok"] is True and status["cp"]["state"] == "STOPPED"
        assert (await raw.exchange({"cmd": "STATUS"}))["total"] == 2
        assert srv.stats()["forbidden"] == 1 and srv.errors == 1
    assert commands(bus) == []


async def test_allow_anonymous_lets_remote_clients_change_cps_without_token(
    controller: Controller, bus: RecordingPublisher
) -> None:
    async with (
        TcpControlServer(controller, HOST, 0, allow_anonymous=True, is_local=remote) as srv,
        raw_client(srv.port) as raw,
    ):
        answer = await raw.exchange({"cmd": "STOP_CP", "cp_id": "CP-001"})
        assert answer["ok"] is True and srv.forbidden == 0
    assert [c.cmd for c in commands(bus)] == [CommandType.STOP_CP]


async def test_without_token_loopback_clients_change_cps(
    server: TcpControlServer, client: RawClient, bus: RecordingPublisher
) -> None:
    answer = await client.exchange({"cmd": "STOP_CP", "cp_id": "CP-001"})
    assert answer["ok"] is True and server.forbidden == 0
    assert [c.cmd for c in commands(bus)] == [CommandType.STOP_CP]


async def test_with_token_remote_clients_change_cps_with_it(
    controller: Controller, bus: RecordingPublisher
) -> None:
    async with (
        TcpControlServer(controller, HOST, 0, TOKEN, is_local=remote) as srv,
        raw_client(srv.port) as raw,
    ):
        refused = await raw.exchange({"cmd": "STOP_CP", "cp_id": "CP-001"})
        assert refused["code"] == "unauthorized"
        answer = await raw.exchange({"cmd": "STOP_CP", "cp_id": "CP-001", "token": TOKEN})
        assert answer["ok"] is True and srv.forbidden == 0
    assert [c.cmd for c in commands(bus)] == [CommandType.STOP_CP]


async def test_limits_default_to_the_spec(server: TcpControlServer) -> None:
    assert (server.max_connections, server.idle_timeout) == (256, 60.0)
    with pytest.raises(ValueError, match="max_connections"):
        TcpControlServer(server.controller, HOST, 0, max_connections=0)


async def test_stats_has_every_counter(server: TcpControlServer, client: RawClient) -> None:
    await client.exchange({"cmd": "PING"})
    assert server.stats() == {
        "connections": 1,
        "active_connections": 1,
        "refused_connections": 0,
        "idle_closed": 0,
        "frames_ok": 1,
        "frames_bad": 0,
        "oversize": 0,
        "bytes_ignored": 0,
        "requests": 1,
        "errors": 0,
        "forbidden": 0,
        "retransmits": 0,
        "evicted": 0,
        "auth_failures": 0,
        "throttled": 0,
    }


async def test_at_the_cap_the_connection_idle_longest_is_closed_for_a_new_one(
    controller: Controller,
) -> None:
    cap = 256  # the default (SPEC §6)
    async with contextlib.AsyncExitStack() as stack:
        srv = await stack.enter_async_context(TcpControlServer(controller, HOST, 0))
        assert srv.max_connections == cap
        held = [await stack.enter_async_context(raw_client(srv.port)) for _ in range(cap)]
        await poll(lambda: srv.active_connections == cap, timeout=TIMEOUT, what="256 open")
        assert (await held[0].exchange({"cmd": "PING"}))["ok"] is True  # no longer idlest
        with warnings_logged() as warnings:
            for n in range(3):  # one burst of three evictions
                operator = await stack.enter_async_context(raw_client(srv.port))
                assert (await operator.exchange({"cmd": "PING", "id": n}))["id"] == n
                await held[1 + n].expect_eof()  # the idle longest, in the order they opened
        assert srv.stats()["evicted"] == 3 and srv.refused_connections == 0
        assert controller.stats["tcp_connections_evicted"] == 3
        assert srv.active_connections == cap and srv.connections == cap + 3
        assert len([w for w in warnings if "idle longest" in w]) == 1
        # the connection that had a request answered lately was kept, and still works
        assert (await held[0].exchange({"cmd": "PING"}))["ok"] is True


async def test_at_the_cap_the_idle_one_goes_not_those_with_recent_requests(
    controller: Controller,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        srv = await stack.enter_async_context(
            TcpControlServer(controller, HOST, 0, max_connections=3))
        a, b, c = [await stack.enter_async_context(raw_client(srv.port)) for _ in range(3)]
        await poll(lambda: srv.active_connections == 3, timeout=TIMEOUT, what="3 open")
        for raw in (c, a):  # b alone never asks anything
            assert (await raw.exchange({"cmd": "PING"}))["ok"] is True
        d = await stack.enter_async_context(raw_client(srv.port))
        assert (await d.exchange({"cmd": "STATUS"}))["ok"] is True
        await b.expect_eof()
        e = await stack.enter_async_context(raw_client(srv.port))
        assert (await e.exchange({"cmd": "PING"}))["ok"] is True
        await c.expect_eof()  # c's request came before a's
        for raw in (a, d):
            assert (await raw.exchange({"cmd": "PING"}))["ok"] is True
        assert srv.evicted == 2 and srv.active_connections == 3


async def test_at_the_cap_with_every_connection_mid_request_a_new_one_is_refused(
    controller: Controller,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        srv = await stack.enter_async_context(
            TcpControlServer(controller, HOST, 0, max_connections=2, ack_timeout=5.0))
        held = [await stack.enter_async_context(raw_client(srv.port)) for _ in range(2)]
        for raw in held:  # each reads its answer and never acknowledges it: busy
            await raw.send(encode_message({"cmd": "PING"}))
            assert await raw.read_byte() == ACK
            assert (await raw.read_answer())["pong"] is True
        with warnings_logged() as warnings:
            async with raw_client(srv.port) as extra:
                await extra.expect_eof()  # closed at once
        assert srv.refused_connections == 1 and srv.evicted == 0
        assert len([w for w in warnings if "refusing" in w]) == 1
        for raw in held:  # the requests in progress were not cut
            await raw.send(bytes((ACK,)))
            assert (await raw.exchange({"cmd": "PING"}))["ok"] is True


async def test_idle_connection_is_closed_and_counted(controller: Controller) -> None:
    async with (
        TcpControlServer(controller, HOST, 0, idle_timeout=0.3) as srv,
        raw_client(srv.port) as raw,
    ):
        assert (await raw.exchange({"cmd": "PING"}))["ok"] is True  # a request, then silence
        await raw.expect_eof()
        await poll(lambda: srv.active_connections == 0, timeout=TIMEOUT, what="handler done")
        assert srv.stats()["idle_closed"] == 1


async def test_bad_frames_do_not_keep_a_connection_open(controller: Controller) -> None:
    async with (
        TcpControlServer(controller, HOST, 0, idle_timeout=0.3) as srv,
        raw_client(srv.port) as raw,
    ):
        with pytest.raises((EOFError, ConnectionError)):  # until Central closes
            async with asyncio.timeout(TIMEOUT):
                while True:
                    await raw.send(bytes((STX, STX)))
                    assert await raw.read_byte() == NAK
        assert srv.idle_closed == 1 and srv.frames_bad > 0


async def flood(raw: RawClient, junk: bytes, naks: int) -> dict[str, Any]:
    """Send ``junk`` then a PING; expect ``naks`` NAKs, then the PING's ACK and answer."""

    async def read() -> dict[str, Any]:
        for _ in range(naks):
            assert await raw.read_byte() == NAK
        assert await raw.read_byte() == ACK
        return await raw.read_answer()

    reading = asyncio.create_task(read())  # Central answers while the flood is still sent
    await raw.send(junk + encode_message({"cmd": "PING"}))
    answer = await asyncio.wait_for(reading, TIMEOUT)
    await raw.send(bytes((ACK,)))
    return answer


async def test_a_flood_of_stx_is_logged_once_and_counted(
    server: TcpControlServer, client: RawClient
) -> None:
    junk = bytes((STX,)) * (100 * 1024)
    with warnings_logged() as warnings:
        # Each STX cuts the frame the one before started short: one bad frame, one NAK each.
        answer = await flood(client, junk, naks=len(junk))
        assert answer["ok"] is True
        assert (await flood(client, junk, naks=len(junk)))["ok"] is True
    assert len(warnings) == 1 and "bad frame" in warnings[0]
    assert server.stats()["frames_bad"] == 2 * len(junk) and server.frames_ok == 2


async def test_a_flood_of_noise_is_logged_once_and_counted(
    server: TcpControlServer, client: RawClient
) -> None:
    noise = random.Random(9).randbytes(100 * 1024).replace(bytes((STX,)), b"")
    with warnings_logged() as warnings:
        assert (await flood(client, noise, naks=0))["ok"] is True
        assert (await flood(client, noise, naks=0))["ok"] is True
    assert len(warnings) == 1 and "outside any frame" in warnings[0]
    assert server.stats()["bytes_ignored"] == 2 * len(noise) and server.frames_bad == 0


async def test_bad_input_is_logged_once_per_connection(server: TcpControlServer) -> None:
    with warnings_logged() as warnings:
        for _ in range(2):
            async with raw_client(server.port) as raw:
                await flood(raw, bytes((STX,)) * 10 + b"noise", naks=10)
    assert len(warnings) == 2
    assert server.frames_bad == 20 and server.bytes_ignored == 0  # noise inside a frame


async def test_oversize_frame_is_counted_and_logged(server: TcpControlServer) -> None:
    with warnings_logged() as warnings:
        async with raw_client(server.port) as raw:
            await raw.send(bytes((STX,)) + b"a" * (MAX_PAYLOAD + 1))
            assert await raw.read_byte() == NAK
            await raw.expect_eof()
    assert server.stats()["oversize"] == 1
    assert len(warnings) == 1 and "over" in warnings[0]


# ---------------------------------------------------------------------- ControlClient


async def test_control_client_exchanges(server: TcpControlServer, bus: RecordingPublisher) -> None:
    async with ControlClient(HOST, server.port, TIMEOUT) as central:
        assert (await central.request({"cmd": "PING"}))["pong"] is True
        assert (await central.request({"cmd": "STOP_CP", "cp_id": "CP-001"}))["ok"] is True
        refused = await central.request({"cmd": "RESUME_CP", "cp_id": "CP-002"})
        assert refused["ok"] is False and refused["code"] == "not_allowed"
    assert server.connections == 1
    assert [c.cmd for c in commands(bus)] == [CommandType.STOP_CP]


async def test_control_client_connects_lazily_and_closes_twice(server: TcpControlServer) -> None:
    central = ControlClient(HOST, server.port, TIMEOUT)
    assert not central.connected
    assert (await central.request({"cmd": "PING"}))["ok"] is True
    assert central.connected
    await central.close()
    await central.close()


async def test_control_client_unreachable() -> None:
    port = free_port()
    with pytest.raises(CentralUnreachable, match=f"cannot reach Central at {HOST}:{port}"):
        await ControlClient(HOST, port, TIMEOUT).request({"cmd": "PING"})


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_central(script: Script) -> AsyncIterator[tuple[int, list[BaseException]]]:
    """A fake Central running ``script`` on its one connection; failures are collected."""
    failures: list[BaseException] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(script(reader, writer), TIMEOUT)
        except BaseException as exc:
            failures.append(exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            done.set()

    fake = await asyncio.start_server(handle, HOST, 0)
    try:
        yield int(fake.sockets[0].getsockname()[1]), failures
        await asyncio.wait_for(done.wait(), TIMEOUT)
    finally:
        fake.close()
        await fake.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> DecodeEvent:
    decoder = FrameDecoder()
    while True:
        events = decoder.feed(await reader.read(1))
        if events:
            return events[0]


async def test_control_client_retransmits_and_naks_a_corrupt_answer() -> None:
    answer = encode_message({"ok": True, "pong": True})
    corrupt = answer[:-1] + bytes((answer[-1] ^ 0xFF,))

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await read_request(reader)
        assert isinstance(first, Frame)
        writer.write(bytes((NAK,)))  # pretend it was damaged: the client sends it again
        second = await read_request(reader)
        assert second == first
        writer.write(bytes((ACK,)) + corrupt)
        assert await reader.readexactly(1) == bytes((NAK,))
        writer.write(answer)
        assert await reader.readexactly(1) == bytes((ACK,))

    async with (
        scripted_central(script) as (port, failures),
        ControlClient(HOST, port, TIMEOUT) as central,
    ):
        assert await central.request({"cmd": "PING"}) == {"ok": True, "pong": True}
    assert failures == []


async def test_control_client_gives_up_after_repeated_naks() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(4):
            assert isinstance(await read_request(reader), Frame)
            writer.write(bytes((NAK,)))
        await reader.read()

    async with scripted_central(script) as (port, failures):
        central = ControlClient(HOST, port, TIMEOUT)
        with pytest.raises(ControlError, match="4 times"):
            await central.request({"cmd": "PING"})
        assert not central.connected
    assert failures == []


async def test_control_client_times_out() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers; ends when the client gives up

    async with scripted_central(script) as (port, failures):
        with pytest.raises(ControlError, match="no answer from Central"):
            await ControlClient(HOST, port, 0.3).request({"cmd": "PING"})
    assert failures == []


async def test_control_client_connection_closed() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(bytes((ACK,)))

    async with scripted_central(script) as (port, failures):
        with pytest.raises(ControlError, match="closed the connection"):
            await ControlClient(HOST, port, TIMEOUT).request({"cmd": "PING"})
    assert failures == []


# ---------------------------------------------------------------------- the CLI


async def run_ctl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await ctl.amain(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _no_ctl_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in CTL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


async def test_ctl_ping(server: TcpControlServer) -> None:
    code, out, err = await run_ctl("--host", HOST, "--port", str(server.port), "ping")
    assert code == 0 and out.startswith("pong from Central") and err == ""


async def test_ctl_status_table(server: TcpControlServer) -> None:
    code, out, _ = await run_ctl("--host", HOST, "--port", str(server.port), "status")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["CP", "STATE", "FAULTY", "BREAKER", "DRIVER", "kW", "kWh", "€"]
    assert [row.split()[:4] for row in rows] == [
        ["CP-001", "ACTIVATED", "no", "CLOSED"],
        ["CP-002", "ACTIVATED", "no", "CLOSED"],
    ]


async def test_ctl_status_one_as_json_with_options_after_the_command(
    server: TcpControlServer, controller: Controller
) -> None:
    code, out, _ = await run_ctl(
        "status", "CP-001", "--json", "--host", HOST, "--port", str(server.port)
    )
    assert code == 0
    assert json.loads(out) == {
        "ok": True, "cp": cp_out(controller.get("CP-001")).model_dump(mode="json"),
    }


async def test_ctl_status_unknown_cp(server: TcpControlServer) -> None:
    code, out, err = await run_ctl("--host", HOST, "--port", str(server.port), "status", "CP-9")
    assert code == 1 and out == ""
    assert "unknown CP 'CP-9'" in err and "unknown_cp" in err


async def test_ctl_json_error_answer(server: TcpControlServer) -> None:
    code, out, _ = await run_ctl(
        "--json", "--port", str(server.port), "--host", HOST, "resume", "CP-001"
    )
    assert code == 1 and json.loads(out)["code"] == "not_allowed"


async def test_ctl_stop_and_resume(
    server: TcpControlServer, bus: RecordingPublisher, controller: Controller
) -> None:
    port = str(server.port)
    code, out, _ = await run_ctl(
        "--host", HOST, "--port", port, "stop", "CP-001", "--reason", "cable check"
    )
    assert code == 0 and "STOP_CP sent to CP-001" in out
    assert commands(bus)[-1].payload.reason == "cable check"
    code, _, err = await run_ctl("--host", HOST, "--port", port, "resume", "CP-001")
    assert code == 1 and "not_allowed" in err
    await controller.handle_status(CPStatus(cp_id="CP-001", state=CPState.STOPPED))
    code, out, _ = await run_ctl("--host", HOST, "--port", port, "resume", "CP-001")
    assert code == 0 and "RESUME_CP sent to CP-001" in out
    assert [c.cmd for c in commands(bus)] == [CommandType.STOP_CP, CommandType.RESUME_CP]


async def test_ctl_token_from_flag_and_environment(
    token_server: TcpControlServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = str(token_server.port)
    code, _, err = await run_ctl("--host", HOST, "--port", port, "ping")
    assert code == 1 and "unauthorized" in err
    code, _, _ = await run_ctl("--host", HOST, "--port", port, "--token", "nope", "ping")
    assert code == 1
    code, _, _ = await run_ctl("--host", HOST, "--port", port, "--token", TOKEN, "ping")
    assert code == 0
    monkeypatch.setenv("CENTRAL_API_TOKEN", TOKEN)
    monkeypatch.setenv("CENTRAL_CTL_HOST", HOST)
    monkeypatch.setenv("CENTRAL_LISTEN_PORT", port)
    assert (await run_ctl("ping"))[0] == 0


async def test_ctl_truncated_status_says_so(
    server: TcpControlServer, controller: Controller
) -> None:
    await activate(controller, *BIG_NETWORK, location=LONG_LOCATION)
    code, out, _ = await run_ctl("--host", HOST, "--port", str(server.port), "status")
    assert code == 0 and f"of {len(BIG_NETWORK) + 2} CPs" in out.splitlines()[-1]


async def test_ctl_unreachable() -> None:
    port = free_port()
    code, out, err = await run_ctl("--host", HOST, "--port", str(port), "--timeout", "2", "ping")
    assert code == 3 and out == ""
    assert err.startswith(f"cannot reach Central at {HOST}:{port}: ")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["stop"],
        ["status", "CP-1", "CP-2"],
        ["reboot"],
        ["--port", "abc", "ping"],
        ["--port", "70000", "ping"],
        ["--timeout", "0", "ping"],
    ],
)
async def test_ctl_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert (await run_ctl(*argv))[0] == 2
    assert "usage:" in capsys.readouterr().err


async def test_ctl_bad_port_in_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CENTRAL_LISTEN_PORT", "ninety")
    assert (await run_ctl("ping"))[0] == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "port (CENTRAL_LISTEN_PORT)" in err


async def test_ctl_request_too_large_is_a_usage_error(server: TcpControlServer) -> None:
    code, _, err = await run_ctl(
        "--host",
        HOST,
        "--port",
        str(server.port),
        "stop",
        "CP-001",
        "--reason",
        "r" * (MAX_PAYLOAD + 1),
    )
    assert code == 2 and "exceeds" in err


async def test_ctl_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert (await run_ctl("--help"))[0] == 0
    assert "CENTRAL_LISTEN_PORT" in capsys.readouterr().out


async def test_ctl_main_runs_its_own_loop(
    server: TcpControlServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--host", HOST, "--port", str(server.port), "--json", "ping"]
    assert await asyncio.wait_for(asyncio.to_thread(ctl.main, argv), TIMEOUT) == 0
    assert json.loads(capsys.readouterr().out)["pong"] is True


def test_format_table_of_a_charging_cp() -> None:
    cp = {
        "cp_id": "CP-7",
        "state": "SUPPLYING",
        "is_faulty": False,
        "circuit_breaker_state": "CLOSED",
        "current_driver": "driver-alice",
        "session": {"kw": 22.0, "kwh": 1.23456, "euros": 0.37},
    }
    header, row = ctl.format_table([cp]).splitlines()
    assert row.split() == [
        "CP-7",
        "SUPPLYING",
        "no",
        "CLOSED",
        "driver-alice",
        "22.0",
        "1.235",
        "0.37",
    ]
    assert len(header) == len(row)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_an_address_failing_the_token_20_times_in_10s_is_refused_for_10s(
    controller: Controller,
) -> None:
    clock = FakeClock()
    async with (
        TcpControlServer(controller, HOST, 0, TOKEN,
                         auth_throttle=AuthThrottle(clock=clock)) as srv,
        raw_client(srv.port) as raw,
        raw_client(srv.port) as second,
    ):
        for n in range(20):
            clock.now += 0.45
            answer = await raw.exchange({"cmd": "PING", "token": "wrong", "id": n})
            assert answer["code"] == "unauthorized" and answer["id"] == n
        blocked_at = clock.now
        # refused whatever it sends, on this connection and any other from its address
        for client in (raw, second):
            refused = await client.exchange({"cmd": "STATUS", "token": TOKEN})
            assert refused["ok"] is False and refused["code"] == "too_many_requests"
            assert "10s" in refused["error"]
        clock.now = blocked_at + 10.0
        assert (await raw.exchange({"cmd": "PING", "token": TOKEN}))["pong"] is True
    assert (srv.auth_failures, srv.throttled) == (20, 2)
    assert srv.stats()["throttled"] == 2
    assert controller.stats["auth_failures:tcp"] == 20
    assert controller.stats["auth_throttled:tcp"] == 2


async def test_without_a_token_the_tcp_plane_throttles_nothing(controller: Controller) -> None:
    async with TcpControlServer(controller, HOST, 0) as srv, raw_client(srv.port) as raw:
        for _ in range(25):
            assert (await raw.exchange({"cmd": "PING", "token": "anything"}))["ok"] is True
        assert srv.throttle.failed_total == 0 and srv.auth_failures == 0
