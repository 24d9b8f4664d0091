"""The ACK/NAK link layer (evcharging.common.link): the pure Inbox, then Link over sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from evcharging.common.framing import (
    ACK,
    NAK,
    REASON_LRC_MISMATCH,
    REASON_TRUNCATED,
    STX,
    Frame,
    Oversize,
    encode_frame,
)
from evcharging.common.link import (
    Inbox,
    Link,
    LinkOptions,
    LinkTimeout,
    Overrun,
    PeerClosed,
    Received,
    Refused,
    Rejected,
)

TIMEOUT = 5.0
ACK_BYTE = bytes((ACK,))
NAK_BYTE = bytes((NAK,))
PING = encode_frame(b'{"cmd":"PING"}')
PONG = encode_frame(b'{"ok":true}')
CORRUPT = PING[:-1] + bytes((PING[-1] ^ 0x01,))


# ---------------------------------------------------------------------- Inbox (pure)


def drain(inbox: Inbox) -> list[Received]:
    items = []
    while (item := inbox.pop()) is not None:
        items.append(item)
    return items


def test_bad_frames_in_a_row_become_one_rejected() -> None:
    inbox = Inbox()
    inbox.feed(bytes((STX,)) * 5 + PING)  # four cut short by the next STX, one by PING's
    assert len(inbox) == 2
    assert drain(inbox) == [Rejected(5, REASON_TRUNCATED), Frame(b'{"cmd":"PING"}')]


def test_rejected_keeps_growing_until_it_is_taken() -> None:
    inbox = Inbox()
    inbox.feed(CORRUPT)
    inbox.feed(CORRUPT + CORRUPT)
    assert inbox.pop() == Rejected(3, REASON_LRC_MISMATCH)
    inbox.feed(CORRUPT)
    assert drain(inbox) == [Rejected(1, REASON_LRC_MISMATCH)]


def test_order_is_kept_between_frames_bad_frames_and_oversize() -> None:
    inbox = Inbox(max_payload=20)
    inbox.feed(CORRUPT + PING + CORRUPT + CORRUPT + encode_frame(b"x" * 21) + PONG)
    assert drain(inbox) == [
        Rejected(1, REASON_LRC_MISMATCH),
        Frame(b'{"cmd":"PING"}'),
        Rejected(2, REASON_LRC_MISMATCH),
        Oversize(),
        Frame(b'{"ok":true}'),
    ]
    assert inbox.pop() is None


def test_feed_until_reply_queues_what_came_before_and_after() -> None:
    inbox = Inbox()
    assert inbox.feed_until_reply(b"noise" + CORRUPT + ACK_BYTE + PING + NAK_BYTE) == ACK
    # The NAK after the reply is not a reply to anything: noise outside a frame.
    assert drain(inbox) == [Rejected(1, REASON_LRC_MISMATCH), Frame(b'{"cmd":"PING"}')]
    assert inbox.decoder.bytes_ignored == len(b"noise") + 1
    assert inbox.feed_until_reply(PING[:3]) is None
    assert inbox.feed_until_reply(PING[3:] + NAK_BYTE) == NAK
    assert drain(inbox) == [Frame(b'{"cmd":"PING"}')]


# ---------------------------------------------------------------------- Link over a socket


Ends = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def ends() -> AsyncIterator[tuple[Ends, Ends]]:
    """Two connected stream pairs over 127.0.0.1: (near, far)."""
    far: asyncio.Future[Ends] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: far.set_result((r, w)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    near = await asyncio.open_connection("127.0.0.1", port)
    pair = (near, await asyncio.wait_for(far, TIMEOUT))
    try:
        yield pair
    finally:
        for _, writer in pair:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        server.close()
        await server.wait_closed()


async def test_send_and_receive_one_frame(ends: tuple[Ends, Ends]) -> None:
    near, far = Link(*ends[0]), Link(*ends[1])
    sending = asyncio.create_task(near.send(PING))
    assert await far.receive(TIMEOUT) == Frame(b'{"cmd":"PING"}')  # and far ACKed it
    await asyncio.wait_for(sending, TIMEOUT)
    assert near.retransmits == 0


async def test_a_nak_makes_the_sender_send_the_same_frame_again(ends: tuple[Ends, Ends]) -> None:
    near = Link(*ends[0])
    reader, writer = ends[1]
    sending = asyncio.create_task(near.send(PING))
    assert await reader.readexactly(len(PING)) == PING
    writer.write(NAK_BYTE)
    assert await reader.readexactly(len(PING)) == PING
    writer.write(ACK_BYTE)
    await asyncio.wait_for(sending, TIMEOUT)
    assert near.retransmits == 1


async def test_every_attempt_naked_is_refused(ends: tuple[Ends, Ends]) -> None:
    near = Link(*ends[0], LinkOptions(max_retransmits=1))
    reader, writer = ends[1]
    sending = asyncio.create_task(near.send(PING))
    for _ in range(2):
        assert await reader.readexactly(len(PING)) == PING
        writer.write(NAK_BYTE)
    with pytest.raises(Refused, match="2 times") as refused:
        await asyncio.wait_for(sending, TIMEOUT)
    assert refused.value.attempts == 2 and near.retransmits == 1


async def test_no_reply_in_time(ends: tuple[Ends, Ends]) -> None:
    with pytest.raises(LinkTimeout, match=r"no ACK within 0\.1s"):
        await Link(*ends[0], LinkOptions(reply_timeout=0.1)).send(PING)


async def test_peer_closes_instead_of_replying(ends: tuple[Ends, Ends]) -> None:
    ends[1][1].close()
    with pytest.raises(PeerClosed):
        await asyncio.wait_for(Link(*ends[0]).send(PING), TIMEOUT)


async def test_receive_reports_eof_and_timeout(ends: tuple[Ends, Ends]) -> None:
    near = Link(*ends[0])
    with pytest.raises(LinkTimeout, match=r"nothing received within 0\.1s"):
        await near.receive(0.1)
    ends[1][1].close()
    assert await near.receive(TIMEOUT) is None


async def test_bad_frames_are_naked_one_nak_each(ends: tuple[Ends, Ends]) -> None:
    near = Link(*ends[0])
    reader, writer = ends[1]
    writer.write(b"noise" + bytes((STX,)) * 3 + PING)
    assert await near.receive(TIMEOUT) == Rejected(3, REASON_TRUNCATED)
    assert await near.receive(TIMEOUT) == Frame(b'{"cmd":"PING"}')
    assert await reader.readexactly(4) == NAK_BYTE * 3 + ACK_BYTE
    assert near.bytes_ignored == len(b"noise")


async def test_an_oversized_frame_is_naked(ends: tuple[Ends, Ends]) -> None:
    near = Link(*ends[0], LinkOptions(max_payload=4))
    ends[1][1].write(encode_frame(b"12345"))
    assert await near.receive(TIMEOUT) == Oversize()
    assert await ends[1][0].readexactly(1) == NAK_BYTE


async def test_a_frame_sent_while_awaiting_the_reply_is_kept(ends: tuple[Ends, Ends]) -> None:
    near = Link(*ends[0])
    reader, writer = ends[1]
    sending = asyncio.create_task(near.send(PONG))
    await reader.readexactly(len(PONG))
    writer.write(PING + ACK_BYTE)  # the next request first, then the ACK
    await asyncio.wait_for(sending, TIMEOUT)
    assert await near.receive(TIMEOUT) == Frame(b'{"cmd":"PING"}')
    assert await reader.readexactly(1) == ACK_BYTE


async def test_too_many_frames_while_awaiting_the_reply(ends: tuple[Ends, Ends]) -> None:
    near = Link(*ends[0], LinkOptions(max_pending=2))
    ends[1][1].write(PING * 2 + CORRUPT + PING)
    with pytest.raises(Overrun, match="more than 2"):
        await asyncio.wait_for(near.send(PONG), TIMEOUT)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"reply_timeout": 0}, "reply_timeout"),
        ({"max_retransmits": -1}, "max_retransmits"),
        ({"max_pending": -1}, "max_pending"),
    ],
)
def test_invalid_options(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        LinkOptions(**options)
