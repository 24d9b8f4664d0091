"""Central's TCP control plane (SPEC §6): framed JSON requests from operators.

Every frame is ``STX ‖ esc(payload) ‖ ETX ‖ esc(LRC)`` (see :mod:`evcharging.common.framing`).
One exchange on a connection goes::

    client                         Central
    request frame        ──────▶
                         ◀──────  ACK (frame whole, LRC ok) or NAK (dropped, resend it)
                         ◀──────  answer frame
    ACK or NAK           ──────▶  (on NAK the identical answer is sent again)

Requests are UTF-8 JSON objects with a ``cmd``: ``PING``, ``STATUS`` (all CPs, or one
with ``cp_id``), ``STOP_CP`` (``cp_id``, optional ``reason``) and ``RESUME_CP``
(``cp_id``, optional ``reason``). When Central has an API token every request carries
``"token"``. An optional ``"id"`` (string or integer) is echoed in the answer. Answers
are ``{"ok": true, ...}`` or ``{"ok": false, "error": "...", "code": "..."}``; the codes
are those of :mod:`evcharging.apps.ev_central.errors` plus ``invalid_request``,
``unknown_cmd`` and ``internal``. STOP_CP and RESUME_CP go through the controller, the
same code path as the HTTP API.

Decisions where SPEC §6 is silent:

* **While Central waits for the ACK/NAK of its answer** it reads the line the way a
  half-duplex receiver does: outside a frame, an ACK or NAK byte is the reply to the
  answer and any other byte is noise, ignored like bytes before an STX. A frame the client
  starts early (a pipelined request) is not lost: its bytes go into the frame decoder,
  and the frame is acknowledged and answered, in order, once the current answer has
  been acknowledged. (An LRC byte that happens to equal ACK/NAK is part of its frame,
  not a reply, because the decoder's state tells the two apart; by the same rule a frame
  the client has started must be finished before its ACK counts.) A client that does not
  reply within ``ack_timeout`` is disconnected, as is one that NAKs the same answer
  more than ``max_retransmits`` times or pipelines more than :data:`MAX_PENDING` frames.
* **Answers larger than the 64 KiB payload limit** can only come from ``STATUS`` over a
  very large network. The answer for every CP always carries ``total`` (every CP),
  ``count`` (CPs included) and ``truncated``. Normally all CPs fit; otherwise the list,
  sorted by ``cp_id`` as always, is cut to what fits and ``truncated`` is true: ask per
  ``cp_id`` for the rest. Any other answer that cannot be encoded becomes
  ``{"ok": false, "code": "answer_too_large"}``.
* A connection that sends nothing for ``idle_timeout`` seconds is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Final, Protocol, Self

from loguru import logger

from evcharging.apps.ev_central.errors import CentralError, Unauthorized
from evcharging.common.framing import (
    ACK,
    MAX_PAYLOAD,
    NAK,
    STX,
    BadFrame,
    DecodeEvent,
    DecoderState,
    FrameDecoder,
    FramingError,
    Oversize,
    decode_message,
    encode_message,
)
from evcharging.common.messages import ID_PATTERN, utcnow

__all__ = ["MAX_PENDING", "CPLike", "ControlTarget", "TcpControlServer"]

MAX_PENDING: Final = 32
"""Most frames a client may pipeline while Central waits for its ACK of an answer."""

READ_SIZE: Final = 64 * 1024
MAX_REASON: Final = 500

_ACK_BYTE: Final = bytes((ACK,))
_NAK_BYTE: Final = bytes((NAK,))
_ID_RE: Final = re.compile(ID_PATTERN)
_IDLE_STOPS: Final = re.compile(b"[\x02\x06\x15]")  # STX, ACK, NAK
_PAYLOAD_STOPS: Final = re.compile(b"[\x02\x03\x10]")  # STX, ETX, DLE


class CPLike(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


class ControlTarget(Protocol):
    """What the control plane needs of Central's ``Controller`` (which satisfies it)."""

    def get(self, cp_id: str) -> CPLike: ...

    def all_cps(self) -> Sequence[CPLike]: ...

    async def stop_cp(self, cp_id: str, reason: str = ...) -> CPLike: ...

    async def resume_cp(self, cp_id: str, reason: str = ...) -> CPLike: ...


class InvalidRequest(CentralError):
    code = "invalid_request"


class UnknownCommand(CentralError):
    code = "unknown_cmd"


class _Closing(Exception):
    """End the connection (protocol violation or timeout); the message is logged."""


Answer = dict[str, Any]
Handler = Callable[[dict[str, Any]], Awaitable[Answer]]


def _dumps(obj: Any) -> bytes:
    """JSON exactly as :func:`encode_message` writes it, to measure sizes."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class TcpControlServer:
    """The TCP control plane of Central; a start/stop object and an async context manager.

    ``port=0`` binds a free port (read it from :attr:`port` after ``start``). An empty
    or ``None`` ``api_token`` means no token is required. Counters since start:
    ``connections`` accepted, ``frames_ok`` (ACKed), ``frames_bad`` (NAKed), ``oversize``
    (NAKed and closed), ``requests`` answered, ``errors`` (answers with ``ok: false``) and
    ``retransmits`` of answers the client NAKed.
    """

    def __init__(
        self,
        controller: ControlTarget,
        host: str,
        port: int,
        api_token: str | None = None,
        *,
        ack_timeout: float = 5.0,
        max_retransmits: int = 3,
        idle_timeout: float = 300.0,
        backlog: int = 256,
    ) -> None:
        if ack_timeout <= 0 or idle_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        if max_retransmits < 0:
            raise ValueError("max_retransmits must be >= 0")
        self.controller = controller
        self.host = host
        self._port = port
        self._token = api_token.encode() if api_token else None
        self.ack_timeout = ack_timeout
        self.max_retransmits = max_retransmits
        self.idle_timeout = idle_timeout
        self.backlog = backlog
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._routes: dict[str, Handler] = {
            "PING": self._ping,
            "STATUS": self._status,
            "STOP_CP": self._stop_cp,
            "RESUME_CP": self._resume_cp,
        }
        self.connections = 0
        self.frames_ok = 0
        self.frames_bad = 0
        self.oversize = 0
        self.requests = 0
        self.errors = 0
        self.retransmits = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound port once started (the one the OS chose when 0 was asked)."""
        return self._port

    @property
    def active_connections(self) -> int:
        return len(self._tasks)

    @property
    def serving(self) -> bool:
        return self._server is not None

    def stats(self) -> dict[str, int]:
        return {
            "connections": self.connections,
            "active_connections": self.active_connections,
            "frames_ok": self.frames_ok,
            "frames_bad": self.frames_bad,
            "oversize": self.oversize,
            "requests": self.requests,
            "errors": self.errors,
            "retransmits": self.retransmits,
        }

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, self.host, self._port, backlog=self.backlog
        )
        sockets = self._server.sockets
        if sockets:
            self._port = int(sockets[0].getsockname()[1])
        logger.info("TCP control plane listening on {}:{}", self.host, self._port)

    async def stop(self) -> None:
        """Stop accepting, close every connection and wait for its handler; safe twice."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
            logger.info("TCP control plane stopped ({} connection(s) closed)", len(tasks))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ connections

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # stopping: a late accept gets no handler
            writer.close()
            return
        self.connections += 1
        task = asyncio.create_task(
            self._serve(reader, writer), name=f"tcp-control-{self.connections}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        logger.debug("control client {} connected", peer)
        why = "closed by client"
        try:
            await self._converse(reader, writer, peer)
        except _Closing as exc:
            why = str(exc)
        except (ConnectionError, OSError) as exc:
            why = f"connection error: {exc!r}"
        except asyncio.CancelledError:
            why = "Central is stopping"
            raise
        except Exception:  # noqa: BLE001 - one broken connection must not stop the server
            # Defensive: _answer already turns handler failures into replies.
            logger.exception("control connection {} failed", peer)
            why = "internal error"
        finally:
            logger.debug("control client {} disconnected: {}", peer, why)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        decoder = FrameDecoder()
        pending: deque[DecodeEvent] = deque()
        while True:
            if not pending:
                try:
                    data = await asyncio.wait_for(reader.read(READ_SIZE), self.idle_timeout)
                except TimeoutError:
                    raise _Closing(f"idle for {self.idle_timeout:g}s") from None
                if not data:
                    return
                pending.extend(decoder.feed(data))
                continue
            event = pending.popleft()
            if isinstance(event, Oversize):
                self.oversize += 1
                logger.warning(
                    "control client {} sent a frame over {} bytes; closing", peer, MAX_PAYLOAD
                )
                await self._send(writer, _NAK_BYTE)
                raise _Closing("oversized frame")
            if isinstance(event, BadFrame):
                self.frames_bad += 1
                logger.warning("control client {} sent a bad frame ({}): NAK", peer, event.reason)
                await self._send(writer, _NAK_BYTE)
                continue
            self.frames_ok += 1
            writer.write(_ACK_BYTE)
            answer = await self._answer(event.payload, peer)
            await self._deliver(_encode_answer(answer), reader, writer, decoder, pending, peer)

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        try:
            await asyncio.wait_for(writer.drain(), self.ack_timeout)
        except TimeoutError:
            raise _Closing("client does not read") from None

    async def _deliver(
        self,
        frame: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: FrameDecoder,
        pending: deque[DecodeEvent],
        peer: str,
    ) -> None:
        """Send an answer until the client ACKs it; see the module docstring."""
        loop = asyncio.get_running_loop()
        for attempt in range(self.max_retransmits + 1):
            if attempt:
                self.retransmits += 1
                logger.debug("control client {} NAKed the answer; resending ({})", peer, attempt)
            await self._send(writer, frame)
            deadline = loop.time() + self.ack_timeout
            reply: int | None = None
            while reply is None:
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    data = await asyncio.wait_for(reader.read(READ_SIZE), remaining)
                except TimeoutError:
                    raise _Closing(f"no ACK for the answer within {self.ack_timeout:g}s") from None
                if not data:
                    raise _Closing("closed by client before acknowledging the answer")
                reply, rest = _split_reply(decoder, data, pending)
                if len(pending) > MAX_PENDING:
                    raise _Closing(f"more than {MAX_PENDING} frames pipelined")
            pending.extend(decoder.feed(rest))
            if reply == ACK:
                return
        raise _Closing(f"answer NAKed {self.max_retransmits + 1} times")

    # ------------------------------------------------------------------ requests

    async def _answer(self, payload: bytes, peer: str) -> Answer:
        """Turn one request payload into its answer; never raises."""
        self.requests += 1
        request_id: Any = None
        cmd: Any = None
        try:
            try:
                request = decode_message(payload)
            except FramingError as exc:
                raise InvalidRequest(f"invalid request: {exc}") from None
            request_id = request.get("id")
            self._authorize(request)
            cmd = request.get("cmd")
            if not isinstance(cmd, str):
                raise InvalidRequest("'cmd' must be a string")
            handler = self._routes.get(cmd)
            if handler is None:
                known = ", ".join(self._routes)
                raise UnknownCommand(f"unknown cmd {cmd[:40]!r} (one of {known})")
            answer = await handler(request)
        except CentralError as exc:
            logger.info("control client {}: {} -> {} {}", peer, _show(cmd), exc.code, exc.message)
            answer = {"ok": False, "error": exc.message, "code": exc.code}
        except Exception:  # noqa: BLE001 - a failed request is answered, never fatal
            logger.exception("control request {} from {} failed", _show(cmd), peer)
            answer = {"ok": False, "error": "internal error", "code": "internal"}
        else:
            logger.debug("control client {}: {} -> ok", peer, cmd)
        if not answer.get("ok"):
            self.errors += 1
        if isinstance(request_id, str | int) and not isinstance(request_id, bool):
            answer["id"] = request_id
        return answer

    def _authorize(self, request: dict[str, Any]) -> None:
        if self._token is None:
            return
        token = request.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self._token):
            raise Unauthorized("unauthorized")

    async def _ping(self, request: dict[str, Any]) -> Answer:
        return {
            "ok": True,
            "pong": True,
            "ts": utcnow().isoformat().replace("+00:00", "Z"),
            "cps": len(self.controller.all_cps()),
        }

    async def _status(self, request: dict[str, Any]) -> Answer:
        if request.get("cp_id") is not None:
            cp = self.controller.get(_cp_id(request))
            return {"ok": True, "cp": cp.as_dict()}
        return _fit_cps([cp.as_dict() for cp in self.controller.all_cps()])

    async def _stop_cp(self, request: dict[str, Any]) -> Answer:
        cp = await self.controller.stop_cp(_cp_id(request), _reason(request, "stopped by operator"))
        return {"ok": True, "sent": "STOP_CP", "cp": cp.as_dict()}

    async def _resume_cp(self, request: dict[str, Any]) -> Answer:
        cp = await self.controller.resume_cp(
            _cp_id(request), _reason(request, "resumed by operator")
        )
        return {"ok": True, "sent": "RESUME_CP", "cp": cp.as_dict()}


# ---------------------------------------------------------------------- helpers


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _show(cmd: Any) -> str:
    return repr(cmd[:40]) if isinstance(cmd, str) else "request"


def _cp_id(request: dict[str, Any]) -> str:
    cp_id = request.get("cp_id")
    if cp_id is None:
        raise InvalidRequest("'cp_id' is required")
    if not isinstance(cp_id, str) or not _ID_RE.fullmatch(cp_id):
        raise InvalidRequest("'cp_id' must be 1-64 of letters, digits, '.', '_' and '-'")
    return cp_id


def _reason(request: dict[str, Any], default: str) -> str:
    reason = request.get("reason")
    if reason is None or reason == "":
        return default
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise InvalidRequest(f"'reason' must be a string of at most {MAX_REASON} characters")
    return reason


def _fit_cps(cps: list[dict[str, Any]]) -> Answer:
    """The STATUS answer for every CP, cut to the payload limit (module docstring)."""
    total = len(cps)
    answer: Answer = {"ok": True, "cps": cps, "total": total, "count": total, "truncated": False}
    # Room for the envelope: the other keys, a request id echoed later, digits of counts.
    budget = MAX_PAYLOAD - len(_dumps({**answer, "cps": []})) - 256
    used = 0
    for count, cp in enumerate(cps):
        used += len(_dumps(cp)) + 1  # the item and its comma
        if used > budget:
            answer.update(cps=cps[:count], count=count, truncated=True)
            break
    return answer


def _encode_answer(answer: Answer) -> bytes:
    try:
        return encode_message(answer)
    except (FramingError, TypeError, ValueError) as exc:
        logger.error("control answer could not be encoded: {}", exc)
        fallback: Answer = {
            "ok": False,
            "error": "answer too large or not encodable; ask per cp_id",
            "code": "answer_too_large",
        }
        if isinstance(answer.get("id"), str | int):
            fallback["id"] = answer["id"]
        return encode_message(fallback)


def _split_reply(
    decoder: FrameDecoder, data: bytes, pending: deque[DecodeEvent]
) -> tuple[int | None, bytes]:
    """Find the client's ACK/NAK of an answer in ``data``.

    Returns the reply byte (or None when ``data`` holds none) and the bytes after it.
    Bytes before the reply go into ``decoder`` (their events into ``pending``), so an
    ACK/NAK value inside a frame, e.g. as an LRC byte, is never taken for a reply.
    """
    pos, end = 0, len(data)
    while pos < end:
        state = decoder.state
        if state is DecoderState.IDLE:
            match = _IDLE_STOPS.search(data, pos)
            if match is None:
                return None, b""
            pos = match.start()
            if data[pos] != STX:
                return data[pos], data[pos + 1 :]
            stop = pos + 1
        elif state is DecoderState.IN_PAYLOAD:
            match = _PAYLOAD_STOPS.search(data, pos)
            stop = end if match is None else match.start() + 1
        else:  # an escape code or the LRC comes next: one byte at a time
            stop = pos + 1
        pending.extend(decoder.feed(data[pos:stop]))
        pos = stop
    return None, b""
