"""Byte-level framing for the socket protocol (pure functions, no I/O).

Wire format
-----------
Every message is one frame::

    STX ‖ esc(payload) ‖ ETX ‖ esc(LRC)

* ``STX = 0x02``, ``ETX = 0x03``, ``DLE = 0x10``.
* ``LRC`` is one byte: the XOR of every byte of the *unescaped* payload
  (the LRC of an empty payload is ``0``).
* ``esc`` replaces each byte ``b`` in ``{STX, ETX, DLE}`` with the two bytes
  ``DLE, b ^ 0x20`` (so ``0x02 -> 10 22``, ``0x03 -> 10 23``, ``0x10 -> 10 30``).
  Escaping applies to the LRC byte as well, so the LRC takes one or two bytes
  on the wire. A raw STX or ETX therefore only ever appears as a delimiter.
* The payload is a UTF-8 JSON object of at most :data:`MAX_PAYLOAD` bytes
  (64 KiB, counted unescaped).

For every frame it receives the receiver answers with one byte: ``ACK = 0x06``
when the frame is whole and its LRC matches, ``NAK = 0x15`` otherwise (the
frame is dropped). Bytes before an STX are ignored. A peer that sends an
oversized frame gets NAK and is disconnected.

:class:`FrameDecoder` is the incremental receiver side: feed it whatever the
socket returned and it reports :class:`Frame`, :class:`BadFrame` (answer NAK)
and :class:`Oversize` (answer NAK and close) events. It is a byte-level state
machine, so the events never depend on how the stream was split. Its
:meth:`FrameDecoder.feed_until_reply` serves the side that waits for the ACK/NAK
of a frame it sent: it stops at the first ACK or NAK byte *outside* a frame (the
same byte value inside a frame, e.g. as an LRC, is part of that frame).

Note that the XOR LRC only guarantees detection of corruption that leaves the
frame structure intact (no delimiter or DLE byte created or destroyed). A flip
that creates or removes a framing byte can, rarely, yield another frame whose
LRC happens to match; this is a property of the wire contract, not of the
decoder.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import reduce
from operator import xor
from re import compile as re_compile
from typing import Any, Final, TypeAlias

__all__ = [
    "ACK",
    "DLE",
    "ETX",
    "MAX_PAYLOAD",
    "NAK",
    "REASON_INVALID_ESCAPE",
    "REASON_LRC_MISMATCH",
    "REASON_MISSING_LRC",
    "REASON_TRUNCATED",
    "STX",
    "BadFrame",
    "DecodeEvent",
    "DecoderState",
    "Frame",
    "FrameDecoder",
    "FrameTooLarge",
    "FramingError",
    "Oversize",
    "decode_message",
    "encode_frame",
    "encode_message",
    "escape",
    "lrc",
    "unescape",
]

STX: Final = 0x02
ETX: Final = 0x03
DLE: Final = 0x10
ACK: Final = 0x06
NAK: Final = 0x15

MAX_PAYLOAD: Final = 64 * 1024
"""Largest payload allowed on the wire, in unescaped bytes."""

_ESC_XOR: Final = 0x20
_SPECIALS: Final = frozenset({STX, ETX, DLE})
_ESCAPE_CODES: Final = frozenset(b ^ _ESC_XOR for b in _SPECIALS)  # 0x22, 0x23, 0x30
_SPECIAL_RE: Final = re_compile(b"[\x02\x03\x10]")
_IDLE_STOPS_RE: Final = re_compile(b"[\x02\x06\x15]")  # STX, ACK, NAK

REASON_LRC_MISMATCH: Final = "lrc mismatch"
"""The frame was complete but its LRC did not match the payload."""
REASON_INVALID_ESCAPE: Final = "invalid escape"
"""DLE was followed by a byte that is not a valid escape code."""
REASON_TRUNCATED: Final = "truncated"
"""A raw STX arrived before the frame was complete; a new frame starts there."""
REASON_MISSING_LRC: Final = "missing lrc"
"""A raw ETX arrived where the LRC byte was expected."""


class FramingError(Exception):
    """Malformed escaping, an oversized frame or a payload that is not a JSON object."""


class FrameTooLarge(FramingError):
    """The payload exceeds :data:`MAX_PAYLOAD` bytes."""


# --------------------------------------------------------------------------- helpers


def lrc(data: bytes | bytearray) -> int:
    """Return the XOR of every byte of ``data`` (``0`` for empty data)."""
    return reduce(xor, data, 0)


def escape(data: bytes) -> bytes:
    """Replace each STX/ETX/DLE byte with ``DLE, byte ^ 0x20``."""
    # DLE first: the codes produced for STX/ETX (0x22, 0x23) are not special.
    return (
        data.replace(b"\x10", b"\x10\x30")
        .replace(b"\x02", b"\x10\x22")
        .replace(b"\x03", b"\x10\x23")
    )


def unescape(data: bytes) -> bytes:
    """Invert :func:`escape`.

    Raises :class:`FramingError` on a DLE at the very end or a DLE followed by
    anything but ``0x22``, ``0x23`` or ``0x30``. Other bytes are copied as-is.
    """
    out = bytearray()
    start = 0
    while (pos := data.find(DLE, start)) >= 0:
        out += data[start:pos]
        if pos + 1 >= len(data):
            raise FramingError("dangling DLE at end of data")
        code = data[pos + 1]
        if code not in _ESCAPE_CODES:
            raise FramingError(f"invalid escape DLE 0x{code:02x} at offset {pos}")
        out.append(code ^ _ESC_XOR)
        start = pos + 2
    out += data[start:]
    return bytes(out)


def encode_frame(payload: bytes) -> bytes:
    """Return ``STX ‖ esc(payload) ‖ ETX ‖ esc(lrc(payload))``.

    Raises :class:`FrameTooLarge` if ``payload`` exceeds :data:`MAX_PAYLOAD`.
    """
    if len(payload) > MAX_PAYLOAD:
        raise FrameTooLarge(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    check = escape(bytes((lrc(payload),)))
    return bytes((STX,)) + escape(payload) + bytes((ETX,)) + check


def encode_message(obj: Mapping[str, Any]) -> bytes:
    """Encode ``obj`` as compact UTF-8 JSON and frame it.

    Raises :class:`FrameTooLarge` if the JSON exceeds :data:`MAX_PAYLOAD`;
    ``TypeError``/``ValueError`` from :func:`json.dumps` (unserialisable
    values, NaN/infinity, lone surrogates) propagate unchanged.
    """
    text = json.dumps(dict(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return encode_frame(text.encode("utf-8"))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_message(payload: bytes) -> dict[str, Any]:
    """Parse a frame payload as a UTF-8 JSON object.

    Raises :class:`FramingError` if the payload is not valid UTF-8, not valid
    JSON (``NaN``/``Infinity`` included) or not a JSON object.
    """
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FramingError(f"payload is not UTF-8 JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise FramingError(f"payload is a JSON {type(obj).__name__}, not an object")
    return obj


# --------------------------------------------------------------------------- decoder


@dataclass(frozen=True, slots=True)
class Frame:
    """A whole frame whose LRC matched (answer ACK)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A frame that was dropped (answer NAK). ``reason`` is one of the ``REASON_*`` constants."""

    reason: str


@dataclass(frozen=True, slots=True)
class Oversize:
    """The frame being received exceeds the payload limit (answer NAK and close)."""


DecodeEvent: TypeAlias = Frame | BadFrame | Oversize


class DecoderState(enum.Enum):
    """States of :class:`FrameDecoder`."""

    IDLE = enum.auto()  # outside a frame: skip everything up to the next STX
    IN_PAYLOAD = enum.auto()  # collecting payload bytes
    IN_PAYLOAD_ESC = enum.auto()  # payload DLE seen, escape code expected
    AWAIT_LRC = enum.auto()  # ETX seen, LRC byte (or DLE) expected
    AWAIT_LRC_ESC = enum.auto()  # DLE seen in LRC position, escape code expected


class FrameDecoder:
    """Incremental frame decoder; see the module docstring for the wire format.

    ``feed`` may be called with any split of the stream (down to one byte at a
    time) and returns the same events. Transitions:

    * IDLE: ignore everything except STX, which starts a frame (the bytes ignored
      are counted in ``bytes_ignored``).
    * A raw STX inside a frame (any non-IDLE state) emits
      ``BadFrame("truncated")`` and starts a new frame.
    * A DLE followed by an invalid code, or a raw ETX where the LRC is expected,
      emits ``BadFrame`` and returns to IDLE.
    * When the unescaped payload would exceed ``max_payload`` bytes, ``Oversize``
      is emitted and the decoder returns to IDLE, so the rest of that frame is
      discarded up to the next STX. At most ``max_payload`` bytes are buffered.
    """

    __slots__ = (
        "_buf",
        "_max",
        "_state",
        "bytes_ignored",
        "frames_bad",
        "frames_ok",
        "frames_oversize",
    )

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        if max_payload < 0:
            raise ValueError("max_payload must be >= 0")
        self._max = max_payload
        self._buf = bytearray()
        self._state = DecoderState.IDLE
        self.frames_ok = 0
        self.frames_bad = 0
        self.frames_oversize = 0
        self.bytes_ignored = 0

    @property
    def max_payload(self) -> int:
        return self._max

    @property
    def state(self) -> DecoderState:
        return self._state

    @property
    def in_frame(self) -> bool:
        """True while a frame has been started but not finished."""
        return self._state is not DecoderState.IDLE

    def reset(self) -> None:
        """Forget any partial frame (counters are kept)."""
        self._buf.clear()
        self._state = DecoderState.IDLE

    def feed(self, data: bytes) -> list[DecodeEvent]:
        """Consume ``data`` and return the events it completes, in stream order."""
        return self._feed(data, replies=False)[0]

    def feed_until_reply(self, data: bytes) -> tuple[list[DecodeEvent], int | None, bytes]:
        """Consume ``data`` up to the first ACK or NAK byte that is outside a frame.

        Returns the events of the bytes before it, the ACK/NAK byte (``None`` when
        ``data`` holds none: then all of it was consumed) and the bytes after it, not
        yet consumed. Other bytes outside a frame are ignored, as :meth:`feed` does.
        """
        return self._feed(data, replies=True)

    def _feed(self, data: bytes, *, replies: bool) -> tuple[list[DecodeEvent], int | None, bytes]:
        events: list[DecodeEvent] = []
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state

            if state is DecoderState.IDLE:
                if replies:
                    hit = _IDLE_STOPS_RE.search(data, pos)
                    found = -1 if hit is None else hit.start()
                else:
                    found = data.find(STX, pos)
                if found < 0:
                    self.bytes_ignored += end - pos
                    break
                self.bytes_ignored += found - pos
                if data[found] != STX:
                    return events, data[found], data[found + 1 :]
                self._start_frame()
                pos = found + 1
                continue

            if state is DecoderState.IN_PAYLOAD:
                # Fast path: copy the run of ordinary bytes up to the next special one.
                match = _SPECIAL_RE.search(data, pos)
                stop = end if match is None else match.start()
                if stop > pos:
                    if len(self._buf) + (stop - pos) > self._max:
                        # The byte that overflows ends the frame; what follows it is
                        # outside any frame (ignored), as if fed one byte at a time.
                        pos += self._max - len(self._buf) + 1
                        self._oversize(events)
                        continue
                    self._buf += data[pos:stop]
                    pos = stop
                if match is None:
                    break
                byte = data[pos]
                pos += 1
                if byte == STX:
                    self._bad(events, REASON_TRUNCATED)
                    self._start_frame()
                elif byte == ETX:
                    self._state = DecoderState.AWAIT_LRC
                else:  # DLE
                    self._state = DecoderState.IN_PAYLOAD_ESC
                continue

            byte = data[pos]
            pos += 1
            if byte == STX:
                # Resynchronise: whatever was in progress is lost.
                self._bad(events, REASON_TRUNCATED)
                self._start_frame()
            elif state is DecoderState.IN_PAYLOAD_ESC:
                if byte in _ESCAPE_CODES:
                    if len(self._buf) >= self._max:
                        self._oversize(events)
                    else:
                        self._buf.append(byte ^ _ESC_XOR)
                        self._state = DecoderState.IN_PAYLOAD
                else:
                    self._bad(events, REASON_INVALID_ESCAPE)
            elif state is DecoderState.AWAIT_LRC:
                if byte == ETX:
                    self._bad(events, REASON_MISSING_LRC)
                elif byte == DLE:
                    self._state = DecoderState.AWAIT_LRC_ESC
                else:
                    self._finish(events, byte)
            else:  # AWAIT_LRC_ESC
                if byte in _ESCAPE_CODES:
                    self._finish(events, byte ^ _ESC_XOR)
                else:
                    self._bad(events, REASON_INVALID_ESCAPE)
        return events, None, b""

    # -- transitions --------------------------------------------------------

    def _start_frame(self) -> None:
        self._buf.clear()
        self._state = DecoderState.IN_PAYLOAD

    def _finish(self, events: list[DecodeEvent], received_lrc: int) -> None:
        if lrc(self._buf) == received_lrc:
            self.frames_ok += 1
            events.append(Frame(bytes(self._buf)))
            self.reset()
        else:
            self._bad(events, REASON_LRC_MISMATCH)

    def _bad(self, events: list[DecodeEvent], reason: str) -> None:
        self.frames_bad += 1
        events.append(BadFrame(reason))
        self.reset()

    def _oversize(self, events: list[DecodeEvent]) -> None:
        self.frames_oversize += 1
        events.append(Oversize())
        self.reset()
