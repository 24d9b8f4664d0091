"""The link layer of the TCP control plane (SPEC §6), for both ends of a connection.

One exchange sends a frame until the other end ACKs it and receives a frame, answering
it with ACK (whole, LRC ok) or NAK (dropped)::

    sender                          receiver
    frame                ──────▶
                         ◀──────   ACK, or NAK: the sender sends the identical frame again

Central's server and the ``ctl`` client both speak it through :class:`Link`: the server
receives a request and sends its answer, the client sends a request and receives the
answer. The line is half-duplex in spirit but not trusted to be:

* While a :class:`Link` waits for the ACK/NAK of a frame it sent, an ACK or NAK byte
  outside a frame is the reply, and any other byte is noise, ignored like bytes before an
  STX (so is a second ACK/NAK: a frame gets one reply). A frame the peer starts
  meanwhile (a pipelined request) is not lost: it is decoded into the :class:`Inbox`
  and handed out, acknowledged, by the next :meth:`Link.receive`. An ACK/NAK value
  inside a frame (an LRC byte, say) belongs to that frame, because the decoder's state
  tells the two apart. More than ``max_pending`` items waiting ends the link.
* Bad frames in a row are merged into one :class:`Rejected` (with one NAK written per
  frame, all at once), so a flood of bad bytes costs one event, not one per byte.

:class:`Inbox` is the pure part (no I/O); :class:`Link` adds the reads, writes and timeouts.
Every failure is a :class:`LinkError`, after which the caller closes the connection.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Final, TypeAlias

from evcharging.common.framing import (
    ACK,
    MAX_PAYLOAD,
    NAK,
    BadFrame,
    DecodeEvent,
    Frame,
    FrameDecoder,
    Oversize,
)

__all__ = [
    "MAX_PENDING",
    "READ_SIZE",
    "Inbox",
    "Link",
    "LinkError",
    "LinkOptions",
    "LinkTimeout",
    "Overrun",
    "PeerClosed",
    "Received",
    "Refused",
    "Rejected",
]

MAX_PENDING: Final = 32
"""Most items a peer may queue up while the link waits for the ACK of its own frame."""

READ_SIZE: Final = 64 * 1024

_ACK_BYTE: Final = bytes((ACK,))
_NAK_BYTE: Final = bytes((NAK,))


@dataclass(frozen=True, slots=True)
class Rejected:
    """Bad frames received in a row, each answered with NAK: how many, and the first reason."""

    count: int
    reason: str


Received: TypeAlias = Frame | Rejected | Oversize


class LinkError(Exception):
    """The exchange cannot go on; the caller closes the connection."""


class PeerClosed(LinkError):
    """The peer closed the connection while an ACK/NAK was awaited."""


class LinkTimeout(LinkError):
    """Nothing, or no ACK/NAK, arrived in time."""


class Refused(LinkError):
    """The peer NAKed every attempt to send a frame."""

    def __init__(self, attempts: int) -> None:
        super().__init__(f"frame NAKed {attempts} times")
        self.attempts = attempts


class Overrun(LinkError):
    """The peer queued more than the link keeps, or does not read what it is sent."""


class Inbox:
    """What a peer sent and was decoded but not yet handled (pure: bytes in, items out).

    Frames and oversize frames keep their order; consecutive bad frames become one
    :class:`Rejected`. ``decoder.bytes_ignored`` counts the noise outside frames.
    """

    __slots__ = ("_items", "decoder")

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.decoder = FrameDecoder(max_payload)
        self._items: deque[Received] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def feed(self, data: bytes) -> None:
        self._queue(self.decoder.feed(data))

    def feed_until_reply(self, data: bytes) -> int | None:
        """Feed ``data`` and return the ACK/NAK byte found outside a frame, if any.

        The bytes after the reply are fed as well: they are what the peer sent next.
        """
        events, reply, rest = self.decoder.feed_until_reply(data)
        self._queue(events)
        if reply is not None and rest:
            self.feed(rest)
        return reply

    def pop(self) -> Received | None:
        return self._items.popleft() if self._items else None

    def _queue(self, events: list[DecodeEvent]) -> None:
        items = self._items
        for event in events:
            if not isinstance(event, BadFrame):
                items.append(event)
            elif items and isinstance(last := items[-1], Rejected):
                items[-1] = Rejected(last.count + 1, last.reason)
            else:
                items.append(Rejected(1, event.reason))


@dataclass(frozen=True, slots=True)
class LinkOptions:
    """How a :class:`Link` behaves; checked once, when made.

    ``reply_timeout`` bounds the wait for each ACK/NAK and each write (``None``: the
    caller bounds the whole exchange); a frame is sent at most ``max_retransmits + 1``
    times; ``max_pending`` and ``max_payload`` bound what a peer can make the link keep.
    """

    reply_timeout: float | None = None
    max_retransmits: int = 3
    max_pending: int = MAX_PENDING
    max_payload: int = MAX_PAYLOAD

    def __post_init__(self) -> None:
        if self.reply_timeout is not None and self.reply_timeout <= 0:
            raise ValueError("reply_timeout must be > 0")
        if self.max_retransmits < 0:
            raise ValueError("max_retransmits must be >= 0")
        if self.max_pending < 0:
            raise ValueError("max_pending must be >= 0")


class Link:
    """One end of a framed connection: :meth:`send` a frame, :meth:`receive` the next one.

    The link does not close the connection: its owner does.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        options: LinkOptions = LinkOptions(),  # frozen: one default is shared safely
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.options = options
        self.inbox = Inbox(options.max_payload)
        self.retransmits = 0

    @property
    def bytes_ignored(self) -> int:
        """Bytes received outside any frame (noise), since the link was made."""
        return self.inbox.decoder.bytes_ignored

    async def receive(self, timeout: float | None = None) -> Received | None:
        """The next item the peer sent, already answered.

        A :class:`~evcharging.common.framing.Frame` has been ACKed, each bad frame of a
        :class:`Rejected` NAKed, an :class:`~evcharging.common.framing.Oversize` NAKed
        (close the connection then). ``None``: the peer closed the connection. Raises
        :class:`LinkTimeout` when nothing arrives within ``timeout`` seconds.
        """
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while (item := self.inbox.pop()) is None:
            data = await self._read(deadline, f"nothing received within {timeout or 0:g}s")
            if not data:
                return None
            self.inbox.feed(data)
        if isinstance(item, Frame):
            await self._write(_ACK_BYTE)
        else:
            await self._write(_NAK_BYTE * (item.count if isinstance(item, Rejected) else 1))
        return item

    async def send(self, frame: bytes) -> None:
        """Send ``frame`` until the peer ACKs it; raises :class:`Refused` after the last NAK."""
        attempts = self.options.max_retransmits + 1
        for attempt in range(attempts):
            if attempt:
                self.retransmits += 1
            await self._write(frame)
            if await self._reply() == ACK:
                return
        raise Refused(attempts)

    async def _reply(self) -> int:
        timeout, limit = self.options.reply_timeout, self.options.max_pending
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            data = await self._read(deadline, f"no ACK within {timeout or 0:g}s")
            if not data:
                raise PeerClosed("closed the connection instead of acknowledging")
            reply = self.inbox.feed_until_reply(data)
            if len(self.inbox) > limit:
                raise Overrun(f"more than {limit} frames pipelined")
            if reply is not None:
                return reply

    async def _read(self, deadline: float | None, timed_out: str) -> bytes:
        timeout = None if deadline is None else deadline - asyncio.get_running_loop().time()
        try:
            if timeout is not None and timeout <= 0:
                raise TimeoutError
            return await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
        except TimeoutError:
            raise LinkTimeout(timed_out) from None

    async def _write(self, data: bytes) -> None:
        self.writer.write(data)
        try:
            await asyncio.wait_for(self.writer.drain(), self.options.reply_timeout)
        except TimeoutError:
            raise Overrun("the peer does not read") from None
