"""Central's TCP control plane (SPEC §6): framed JSON requests from operators.

Over 400 lines: the server's connection handling, limits and answers to each command;
the frame codec and the ACK/NAK link layer are :mod:`~evcharging.common.framing` and
:mod:`~evcharging.common.link`.

Every frame is ``STX ‖ esc(payload) ‖ ETX ‖ esc(LRC)`` (see :mod:`evcharging.common.framing`).
One exchange on a connection goes::

    client                         Central
    request frame        ──────▶
                         ◀──────  ACK (frame whole, LRC ok) or NAK (dropped, resend it)
                         ◀──────  answer frame
    ACK or NAK           ──────▶  (on NAK the identical answer is sent again)

The ACK/NAK exchange itself is :mod:`evcharging.common.link`, shared with the ``ctl``
client. Requests are UTF-8 JSON objects with a ``cmd``: ``PING``, ``STATUS`` (all CPs, or
one with ``cp_id``), ``STOP_CP`` (``cp_id``, optional ``reason``) and ``RESUME_CP``
(``cp_id``, optional ``reason``). When Central has an API token every request carries
``"token"``. An optional ``"id"`` (string or integer) is echoed in the answer. Answers
are ``{"ok": true, ...}`` or ``{"ok": false, "error": "...", "code": "..."}``; the codes
are those of :mod:`evcharging.apps.ev_central.errors` plus ``invalid_request``,
``unknown_cmd``, ``forbidden`` and ``internal``. STOP_CP and RESUME_CP are the operator's
commands of :mod:`~evcharging.apps.ev_central.commands`, the same code path as the HTTP
API's.

With more than one Central (SPEC §9) every instance's plane answers for every CP: a command
or a STATUS about a CP another instance owns goes to that instance (its HTTP API, through
:class:`~evcharging.apps.ev_central.network.Network`) and the answer carries the owner's;
``STATUS`` of every CP and ``PING``'s ``cps`` count every instance's CPs.

Safe defaults (SPEC §5, §6), all set by the constructor:

* **Who may change CPs.** With a token, every request must carry it. Without one, the
  mutating commands (STOP_CP, RESUME_CP) are taken from loopback clients only; anyone
  else gets ``{"ok": false, "code": "forbidden"}`` (unless ``allow_anonymous``: protected
  mode off). PING and STATUS are open. Central's settings bind the plane to 127.0.0.1
  unless a host is given.
* **At most ``max_connections`` (256) open connections.** At the cap, the connection idle
  longest (no whole request since it opened or since its last answer, and none being
  answered) is closed to admit the new one and counted (``evicted``), so idle sockets never
  lock an operator out (SPEC §6). Only when every connection is in the middle of a request
  is the new one closed at once (``refused_connections``). The first eviction or refusal of
  a burst is logged, and the end of the burst once more, with how many there were.
* **Failed tokens are throttled** (with a token): an address whose token failed 20 times
  within 10 s is answered ``too_many_requests`` for 10 s from the 20th failure, whatever
  it sends (:class:`~evcharging.common.throttle.AuthThrottle`; ``auth_failures`` and
  ``throttled`` count them).
* **Idle connections are closed**: one that brings no whole request frame for
  ``idle_timeout`` (60 s) is closed and counted (``idle_closed``). Noise and bad frames do
  not keep a connection open.
* **Bad input is logged once per connection.** Bytes outside a frame are ignored and bad
  frames NAKed, as SPEC §6 says; both are counted (``bytes_ignored``, ``frames_bad``) and
  the first of them on a connection is logged, the rest are not, so a flood of bad bytes
  costs one log line. A frame over the 64 KiB limit gets NAK and the connection is closed.

Decisions where SPEC §6 is silent:

* **While Central waits for the ACK/NAK of its answer** a frame the client starts early
  (a pipelined request) is not lost: it is acknowledged and answered, in order, once the
  current answer has been acknowledged (see :mod:`evcharging.common.link`). A client
  that does not reply within ``ack_timeout`` is disconnected, as is one that NAKs the same
  answer more than ``max_retransmits`` times or pipelines more than :data:`MAX_PENDING`
  frames.
* **Answers larger than the 64 KiB payload limit** can only come from ``STATUS`` over a
  very large network. The answer for every CP always carries ``total`` (every CP),
  ``count`` (CPs included) and ``truncated``. Normally all CPs fit; otherwise the list,
  sorted by ``cp_id`` as always, is cut to what fits and ``truncated`` is true: ask per
  ``cp_id`` for the rest. Any other answer that cannot be encoded becomes
  ``{"ok": false, "code": "answer_too_large"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Final, Protocol, Self

from loguru import logger

from evcharging.apps.ev_central.commands import COMMANDS, Command
from evcharging.apps.ev_central.errors import CentralError, Unauthorized
from evcharging.apps.ev_central.limits import Throttled
from evcharging.apps.ev_central.merging import cp_list, merge_cps
from evcharging.apps.ev_central.network import Network, Relayed, run_command
from evcharging.apps.ev_central.schemas import cp_out
from evcharging.apps.ev_central.views import CPView
from evcharging.common.framing import (
    MAX_PAYLOAD,
    Frame,
    FramingError,
    Oversize,
    decode_message,
    encode_message,
)
from evcharging.common.link import (
    MAX_PENDING,
    Link,
    LinkError,
    LinkOptions,
    LinkTimeout,
    Rejected,
)
from evcharging.common.messages import ID_PATTERN, utcnow
from evcharging.common.throttle import AuthThrottle

__all__ = [
    "AUTH_FAILED_TCP",
    "EVICTED_TCP",
    "MAX_PENDING",
    "MUTATING",
    "THROTTLED_TCP",
    "CPView",
    "ControlTarget",
    "Forbidden",
    "TcpControlServer",
    "is_loopback",
]

MAX_REASON: Final = 500
MUTATING: Final = frozenset(COMMANDS)
"""Commands that change a CP: without a token, loopback clients only."""

_ID_RE: Final = re.compile(ID_PATTERN)

AUTH_FAILED_TCP: Final = "auth_failures:tcp"
THROTTLED_TCP: Final = "auth_throttled:tcp"
EVICTED_TCP: Final = "tcp_connections_evicted"
"""Keys the server also counts in its controller's ``stats`` (Central's), for /metrics."""


def _cp(cp: CPView) -> dict[str, Any]:
    """A CP as the STATUS answer shows it: the same shape as HTTP and the WebSocket."""
    return cp_out(cp).model_dump(mode="json")


class ControlTarget(Protocol):
    """What the control plane needs of Central's ``Controller`` (which satisfies it)."""

    def get(self, cp_id: str) -> CPView: ...

    def all_cps(self) -> Sequence[CPView]: ...

    async def stop_cp(self, cp_id: str, reason: str = ...) -> CPView: ...

    async def resume_cp(self, cp_id: str, reason: str = ...) -> CPView: ...


class InvalidRequest(CentralError):
    code = "invalid_request"


class UnknownCommand(CentralError):
    code = "unknown_cmd"


class Forbidden(CentralError):
    """A mutating command from a non-loopback client while Central has no token."""

    code = "forbidden"
    http_status = 403


class _Closing(Exception):
    """End the connection (protocol violation or timeout); the message is logged."""


@dataclass(slots=True)
class _Client:
    """One connection's peer, as the request handling needs it."""

    name: str
    trusted: bool  # may change CPs without a token: loopback, or allow_anonymous
    address: str = ""  # the peer's address, what the auth throttle counts by
    warned: bool = False  # its bad input has been logged
    active_at: float = 0.0  # loop time it opened or last had a request answered
    busy: bool = False  # a request of it is being answered
    evicted: bool = False  # closed to admit a new connection at the cap


def is_loopback(peername: object) -> bool:
    """Whether a TCP peer address (``getpeername()``) is a loopback one.

    True for 127.0.0.0/8, ``::1`` and IPv4-mapped loopback (``::ffff:127.0.0.1``); False
    for every other address and for anything that is not an address at all.
    """
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return False
    try:
        address = ipaddress.ip_address(peername[0].partition("%")[0])  # drop an IPv6 zone
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


Answer = dict[str, Any]
Handler = Callable[[dict[str, Any]], Awaitable[Answer]]


def _dumps(obj: Any) -> bytes:
    """JSON exactly as :func:`encode_message` writes it, to measure sizes."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class TcpControlServer:
    """The TCP control plane of Central; a start/stop object and an async context manager.

    ``port=0`` binds a free port (read it from :attr:`port` after ``start``). An empty
    or ``None`` ``api_token`` means no token is required; then mutating commands are
    taken from clients for which ``is_local(peername)`` holds (loopback ones), or from
    anyone with ``allow_anonymous``. The limits are described in the module docstring;
    :meth:`stats` has every counter since start.
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
        idle_timeout: float = 60.0,
        max_connections: int = 256,
        backlog: int = 256,
        allow_anonymous: bool = False,
        is_local: Callable[[object], bool] = is_loopback,
        auth_throttle: AuthThrottle | None = None,
        network: Network | None = None,
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self._link_options = LinkOptions(reply_timeout=ack_timeout, max_retransmits=max_retransmits)
        self.controller = controller
        self.host = host
        self._port = port
        self._token = api_token.encode() if api_token else None
        self.ack_timeout = ack_timeout
        self.max_retransmits = max_retransmits
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.backlog = backlog
        self.allow_anonymous = allow_anonymous
        self.is_local = is_local
        self.throttle = auth_throttle or AuthThrottle()
        self.network = network or Network(None)
        """The other Centrals (SPEC §9); none by default: every CP is this instance's."""
        shared = getattr(controller, "stats", None)
        self._shared_stats: Counter[str] | None = shared if isinstance(shared, Counter) else None
        """Central's ``stats`` (the controller's), which also count throttling and
        evictions for /metrics; None for a controller without one."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: dict[asyncio.Task[None], _Client] = {}
        """The connections that count against the cap (not those being evicted)."""
        self._links: set[Link] = set()
        self._routes: dict[str, Handler] = {"PING": self._ping, "STATUS": self._status}
        for name, command in COMMANDS.items():
            self._routes[name] = self._operator(command)
        self._burst = 0  # connections refused since the limit was last reached
        self.connections = 0
        self.refused_connections = 0
        self.idle_closed = 0
        self.frames_ok = 0
        self.frames_bad = 0
        self.oversize = 0
        self.requests = 0
        self.errors = 0
        self.forbidden = 0
        self.evicted = 0
        self.auth_failures = 0
        self.throttled = 0
        self._closed_retransmits = 0  # of the connections already closed
        self._closed_bytes_ignored = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound port once started (the one the OS chose when 0 was asked)."""
        return self._port

    @property
    def active_connections(self) -> int:
        return len(self._open)

    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def retransmits(self) -> int:
        """Answers sent again because the client NAKed them."""
        return self._closed_retransmits + sum(link.retransmits for link in self._links)

    @property
    def bytes_ignored(self) -> int:
        """Bytes received outside any frame (noise), ignored."""
        return self._closed_bytes_ignored + sum(link.bytes_ignored for link in self._links)

    def stats(self) -> dict[str, int]:
        return {
            "connections": self.connections,
            "active_connections": self.active_connections,
            "refused_connections": self.refused_connections,
            "idle_closed": self.idle_closed,
            "frames_ok": self.frames_ok,
            "frames_bad": self.frames_bad,
            "oversize": self.oversize,
            "bytes_ignored": self.bytes_ignored,
            "requests": self.requests,
            "errors": self.errors,
            "forbidden": self.forbidden,
            "retransmits": self.retransmits,
            "evicted": self.evicted,
            "auth_failures": self.auth_failures,
            "throttled": self.throttled,
        }

    def _count(self, key: str) -> None:
        if self._shared_stats is not None:
            self._shared_stats[key] += 1

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, self.host, self._port, backlog=self.backlog
        )
        sockets = self._server.sockets
        if sockets:
            self._port = int(sockets[0].getsockname()[1])
        logger.info(
            "TCP control plane listening on {}:{} ({})",
            self.host,
            self._port,
            "token required"
            if self._token
            else "no token: CP changes from anyone"
            if self.allow_anonymous
            else "no token: CP changes from loopback only",
        )

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

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ connections

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # stopping: a late accept gets no handler
            writer.close()
            return
        if len(self._open) >= self.max_connections and not self._make_room():
            self.refused_connections += 1
            self._burst += 1
            if self._burst == 1:
                logger.warning(
                    "TCP control plane: {} connections open, the limit, each in the middle "
                    "of a request; refusing new ones until one is idle (logged once per burst)",
                    self.max_connections,
                )
            writer.close()
            return
        if self._burst and len(self._open) < self.max_connections - 1:
            logger.info("TCP control plane below its limit again ({} connection(s) evicted "
                        "or refused while full)", self._burst)
            self._burst = 0
        self.connections += 1
        peername = writer.get_extra_info("peername")
        client = _Client(
            _show_peer(peername), self.allow_anonymous or self.is_local(peername),
            _peer_address(peername), active_at=asyncio.get_running_loop().time(),
        )
        task = asyncio.create_task(
            self._serve(reader, writer, client), name=f"tcp-control-{self.connections}"
        )
        self._open[task] = client
        self._tasks.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._open.pop(task, None)

    def _make_room(self) -> bool:
        """At the cap: close the connection idle longest (none being answered); whether
        there was one (SPEC §6: idle sockets never lock an operator out)."""
        idle = [(client.active_at, task) for task, client in self._open.items()
                if not client.busy]
        if not idle:
            return False
        _, task = min(idle, key=itemgetter(0))
        victim = self._open.pop(task)
        victim.evicted = True
        task.cancel()
        self.evicted += 1
        self._count(EVICTED_TCP)
        self._burst += 1
        if self._burst == 1:
            idle_for = asyncio.get_running_loop().time() - victim.active_at
            logger.warning(
                "TCP control plane: {} connections open, the limit; closing the one idle "
                "longest ({}, idle {:.1f}s) to admit a new one (logged once per burst)",
                self.max_connections, victim.name, idle_for,
            )
        return True

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: _Client
    ) -> None:
        link = Link(reader, writer, self._link_options)
        self._links.add(link)
        logger.debug("control client {} connected", client.name)
        why = "closed by client"
        try:
            await self._converse(link, client)
        except (_Closing, LinkError) as exc:
            why = str(exc)
        except (ConnectionError, OSError) as exc:
            why = f"connection error: {exc!r}"
        except asyncio.CancelledError:
            why = ("closed to admit a new connection (idle longest at the limit)"
                   if client.evicted else "Central is stopping")
            raise
        except Exception:  # noqa: BLE001 - one broken connection must not stop the server
            # Defensive: _answer already turns handler failures into replies.
            logger.exception("control connection {} failed", client.name)
            why = "internal error"
        finally:
            self._links.discard(link)
            self._closed_retransmits += link.retransmits
            self._closed_bytes_ignored += link.bytes_ignored
            logger.debug("control client {} disconnected: {}", client.name, why)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _converse(self, link: Link, client: _Client) -> None:
        loop = asyncio.get_running_loop()
        idle_until = loop.time() + self.idle_timeout
        while True:
            try:
                item = await link.receive(idle_until - loop.time())
            except LinkTimeout:
                self.idle_closed += 1
                raise _Closing(f"no request for {self.idle_timeout:g}s") from None
            self._note_bad_input(link, client, item)
            if item is None:
                return
            if isinstance(item, Oversize):
                self.oversize += 1
                logger.warning(
                    "control client {} sent a frame over {} bytes: NAK, closing",
                    client.name,
                    MAX_PAYLOAD,
                )
                raise _Closing("oversized frame")
            if isinstance(item, Rejected):
                self.frames_bad += item.count
                continue
            self.frames_ok += 1
            client.busy = True
            try:
                answer = await self._answer(item, client)
                await link.send(_encode_answer(answer))
            finally:
                client.busy = False
            client.active_at = loop.time()
            idle_until = client.active_at + self.idle_timeout

    def _note_bad_input(self, link: Link, client: _Client, item: object) -> None:
        """Log a connection's first bad frame or noise; the rest is only counted."""
        if client.warned or not (isinstance(item, Rejected) or link.bytes_ignored):
            return
        client.warned = True
        what = (
            f"a bad frame ({item.reason}), NAKed"
            if isinstance(item, Rejected)
            else "bytes outside any frame, ignored"
        )
        logger.warning(
            "control client {} sent {}; further bad input on this connection is counted, "
            "not logged",
            client.name,
            what,
        )

    # ------------------------------------------------------------------ requests

    async def _answer(self, frame: Frame, client: _Client) -> Answer:
        """Turn one request frame into its answer; never raises."""
        self.requests += 1
        request_id: Any = None
        cmd: Any = None
        try:
            try:
                request = decode_message(frame.payload)
            except FramingError as exc:
                raise InvalidRequest(f"invalid request: {exc}") from None
            request_id = request.get("id")
            self._check_token(request, client)
            cmd = request.get("cmd")
            if not isinstance(cmd, str):
                raise InvalidRequest("'cmd' must be a string")
            handler = self._routes.get(cmd)
            if handler is None:
                known = ", ".join(self._routes)
                raise UnknownCommand(f"unknown cmd {cmd[:40]!r} (one of {known})")
            if cmd in MUTATING and self._token is None and not client.trusted:
                self.forbidden += 1
                raise Forbidden(
                    f"{cmd} from a remote client needs an API token and Central has none: "
                    f"send {cmd} from Central's host, or set CENTRAL_API_TOKEN and send it"
                )
            answer = await handler(request)
        except CentralError as exc:
            logger.info(
                "control client {}: {} -> {} {}", client.name, _show(cmd), exc.code, exc.message
            )
            answer = {"ok": False, "error": exc.message, "code": exc.code}
        except Exception:  # noqa: BLE001 - a failed request is answered, never fatal
            logger.exception("control request {} from {} failed", _show(cmd), client.name)
            answer = {"ok": False, "error": "internal error", "code": "internal"}
        else:
            logger.debug("control client {}: {} -> ok", client.name, cmd)
        if not answer.get("ok"):
            self.errors += 1
        if isinstance(request_id, str | int) and not isinstance(request_id, bool):
            answer["id"] = request_id
        return answer

    def _check_token(self, request: dict[str, Any], client: _Client) -> None:
        """With a token: Throttled while the client's address is blocked, Unauthorized
        (a failure of its address) when the request does not carry the token."""
        if self._token is None:
            return
        wait = self.throttle.retry_after(client.address)
        if wait > 0:
            self.throttled += 1
            self._count(THROTTLED_TCP)
            raise Throttled(wait)
        token = request.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self._token):
            self.auth_failures += 1
            self._count(AUTH_FAILED_TCP)
            if self.throttle.failed(client.address):
                logger.warning("control client {} failed authentication {} times within "
                               "{:g}s: refused for {:g}s", client.name, self.throttle.failures,
                               self.throttle.window, self.throttle.block)
            raise Unauthorized("unauthorized")

    async def _ping(self, request: dict[str, Any]) -> Answer:
        gathered = await self.network.gather("/summary")
        peers = sum(int(part.get("cps", 0)) for part in gathered.parse(_object))
        answer: Answer = {
            "ok": True,
            "pong": True,
            "ts": utcnow().isoformat().replace("+00:00", "Z"),
            "cps": len(self.controller.all_cps()) + peers,
        }
        return _partial(answer, gathered.missing)

    async def _status(self, request: dict[str, Any]) -> Answer:
        if request.get("cp_id") is not None:
            cp_id = _cp_id(request)

            async def local() -> Answer:
                return {"ok": True, "cp": _cp(self.controller.get(cp_id))}

            answer = await self.network.change(cp_id, local, "GET", f"/cp/{cp_id}")
            if isinstance(answer, Relayed):
                if not 200 <= answer.status < 300:
                    return _relayed(answer)
                return {"ok": True, "cp": answer.body}
            return answer
        gathered = await self.network.gather("/cp")
        own = [_cp(cp) for cp in self.controller.all_cps()]
        cps = merge_cps([own, *gathered.parse(cp_list)]) if gathered.asked else own
        return _partial(_fit_cps(cps), gathered.missing)

    def _operator(self, command: Command) -> Handler:
        """The handler of one operator command: here or at the CP's owner."""

        async def operate(request: dict[str, Any]) -> Answer:
            answer = await run_command(self.network, self.controller, command,
                                       _cp_id(request), _reason(request))
            if isinstance(answer, Relayed):
                return _relayed(answer)
            return answer.model_dump(mode="json")

        return operate


# ---------------------------------------------------------------------- helpers


def _peer_address(peername: object) -> str:
    """The address part of a TCP peer (what the auth throttle counts by)."""
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return str(peername)


def _show_peer(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(peername)


def _show(cmd: Any) -> str:
    return repr(cmd[:40]) if isinstance(cmd, str) else "request"


def _cp_id(request: dict[str, Any]) -> str:
    cp_id = request.get("cp_id")
    if cp_id is None:
        raise InvalidRequest("'cp_id' is required")
    if not isinstance(cp_id, str) or not _ID_RE.fullmatch(cp_id):
        raise InvalidRequest("'cp_id' must be 1-64 of letters, digits, '.', '_' and '-'")
    return cp_id


def _reason(request: dict[str, Any]) -> str | None:
    """The request's reason; None when it gives none (the command's default applies)."""
    reason = request.get("reason")
    if reason is None or reason == "":
        return None
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise InvalidRequest(f"'reason' must be a string of at most {MAX_REASON} characters")
    return reason


def _relayed(answer: Relayed) -> Answer:
    """An owner's HTTP answer as the plane's: its body on success, else its error."""
    body = answer.body if isinstance(answer.body, dict) else {}
    if 200 <= answer.status < 300:
        return {**body, "ok": True}
    return {"ok": False, "error": str(body.get("error", f"HTTP {answer.status}")),
            "code": str(body.get("code", "error"))}


def _partial(answer: Answer, missing: list[str]) -> Answer:
    """Name the Centrals a network-wide answer is missing (they did not answer in time)."""
    if missing:
        answer["partial"] = missing
    return answer


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    return body


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
