"""Where chargers connect: ``ws(s)://HOST:PORT/ocpp/{charger_id}`` (SPEC §8, Connection).

The handshake, checked in this order:

1. the path must be ``/ocpp/{charger_id}`` with a charger id of
   :data:`~evcharging.apps.ev_ocpp.logic.CHARGER_ID_PATTERN`, else HTTP 404;
2. with a passwords file (security profile 1, or 2 over TLS): a charger absent from the
   file gets 404, a missing or wrong password, or a user name that is not the charger id,
   401 with ``WWW-Authenticate: Basic``;
   without one (protected mode): a charger that is not on a loopback address gets 403,
   unless ``allow_anonymous``;
3. the subprotocol: the first of ``ocpp1.6``, ``ocpp2.0.1`` the charger offers; a charger
   that offers neither gets the handshake without a subprotocol and is closed at once
   (OCPP-J; ``websockets`` alone would answer HTTP 400).

A charger that connects again while its old connection is open replaces it: the old one is
closed (the charger lost it and reconnected).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from loguru import logger
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from evcharging.apps.ev_ocpp.gateway import Gateway
from evcharging.apps.ev_ocpp.link import ChargerLink, V16Link, V201Link
from evcharging.apps.ev_ocpp.logic import CHARGER_ID_PATTERN, PROTOCOLS
from evcharging.common.http import is_loopback

__all__ = ["OcppServer", "PasswordBook", "charger_of_path", "tls_context"]

PATH_PREFIX = "/ocpp/"
CLOSE_PROTOCOL_ERROR = 1002


def charger_of_path(path: str) -> str | None:
    """The charger id of a handshake's path, or None when it is not ``/ocpp/{id}``."""
    path = path.split("?", 1)[0]
    if not path.startswith(PATH_PREFIX):
        return None
    charger_id = path[len(PATH_PREFIX):]
    return charger_id if CHARGER_ID_PATTERN.fullmatch(charger_id) else None


@dataclass(frozen=True)
class _Secret:
    plain: bytes | None = None
    sha256: bytes | None = None

    def matches(self, password: bytes) -> bool:
        if self.sha256 is not None:
            return hmac.compare_digest(hashlib.sha256(password).digest(), self.sha256)
        return self.plain is not None and hmac.compare_digest(password, self.plain)


class PasswordBook:
    """The chargers' Basic-auth passwords: ``charger_id:password`` or
    ``charger_id:sha256:<64 hex digits>`` a line; blank lines and ``#`` comments skipped.

    The file is read again when it changes (its modification time), so a charger can be
    added without a restart. A line that is not valid is an error at start (ValueError),
    and later (a bad edit) is logged and the previous book kept.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime = path.stat().st_mtime_ns
        self._secrets = self.parse(path.read_text(encoding="utf-8"))

    @staticmethod
    def parse(text: str) -> dict[str, _Secret]:
        secrets: dict[str, _Secret] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            charger_id, sep, secret = line.partition(":")
            if not sep or not CHARGER_ID_PATTERN.fullmatch(charger_id) or not secret:
                raise ValueError(f"line {number}: expected 'charger_id:password' or "
                                 "'charger_id:sha256:<hex>'")
            if secret.startswith("sha256:"):
                try:
                    digest = bytes.fromhex(secret.removeprefix("sha256:"))
                except ValueError:
                    digest = b""
                if len(digest) != hashlib.sha256().digest_size:
                    raise ValueError(f"line {number}: sha256: needs 64 hex digits")
                secrets[charger_id] = _Secret(sha256=digest)
            else:
                secrets[charger_id] = _Secret(plain=secret.encode())
        return secrets

    def _refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError as exc:
            if self._mtime != -1:
                self._mtime = -1
                logger.error("passwords file {} is gone ({}); keeping the previous "
                             "passwords", self.path, exc)
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            self._secrets = self.parse(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.error("passwords file {} could not be read again ({}); keeping the "
                         "previous passwords", self.path, exc)
            return
        logger.info("passwords file {} read again: {} charger(s)", self.path,
                    len(self._secrets))

    def knows(self, charger_id: str) -> bool:
        self._refresh()
        return charger_id in self._secrets

    def check(self, charger_id: str, authorization: str | None) -> bool:
        """Whether `authorization` is ``Basic`` with user `charger_id` and its password."""
        secret = self._secrets.get(charger_id)
        if secret is None or authorization is None:
            return False
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        return bool(sep) and user == charger_id.encode() and secret.matches(password)

    def __len__(self) -> int:
        return len(self._secrets)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for ``wss://``: TLS 1.2 or later."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def _select(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    for name in PROTOCOLS:
        if name in offered:
            return Subprotocol(name)
    return None  # the handshake goes on without one; the handler closes at once


LINKS: dict[str, type[ChargerLink]] = {"ocpp1.6": V16Link, "ocpp2.0.1": V201Link}
"""The link class of each subprotocol."""


class OcppServer:
    """The WebSocket server of the gateway's chargers."""

    def __init__(
        self,
        gateway: Gateway,
        host: str,
        port: int,
        *,
        passwords: PasswordBook | None = None,
        allow_anonymous: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.gateway = gateway
        self.host = host
        self.requested_port = port
        self.passwords = passwords
        self.allow_anonymous = allow_anonymous
        self.tls = tls
        self._server: Server | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            return self.requested_port
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    @property
    def url(self) -> str:
        scheme = "wss" if self.tls is not None else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{PATH_PREFIX}{{charger_id}}"

    async def start(self) -> None:
        """Listen (OSError when the port is taken)."""
        self._server = await serve(
            self._handle, self.host, self.requested_port, ssl=self.tls,
            process_request=self._process_request, select_subprotocol=_select,
            subprotocols=[Subprotocol(p) for p in PROTOCOLS],
        )
        logger.info("OCPP gateway listening: chargers connect to {}", self.url)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    # ---------------------------------------------------------------- the handshake

    def _refuse(self, connection: ServerConnection, status: HTTPStatus, reason: str,
                text: str) -> Response:
        self.gateway.stats.handshakes_refused[reason] += 1
        logger.info("handshake from {} for {} refused: HTTP {} ({})",
                    _address(connection), connection.request.path if connection.request
                    else "?", status.value, reason)
        return connection.respond(status, text + "\n")

    def _process_request(self, connection: ServerConnection, request: Request
                         ) -> Response | None:
        charger_id = charger_of_path(request.path)
        if charger_id is None:
            return self._refuse(connection, HTTPStatus.NOT_FOUND, "unknown_path",
                                "no such charger: connect to /ocpp/{charger_id}")
        if self.passwords is not None:
            if not self.passwords.knows(charger_id):
                return self._refuse(connection, HTTPStatus.NOT_FOUND, "unknown_charger",
                                    f"unknown charger {charger_id}")
            if not self.passwords.check(charger_id, request.headers.get("Authorization")):
                response = self._refuse(connection, HTTPStatus.UNAUTHORIZED, "unauthorized",
                                        "a valid Basic authorization is required")
                response.headers["WWW-Authenticate"] = 'Basic realm="ocpp", charset="UTF-8"'
                return response
        elif not self.allow_anonymous and not is_loopback(_host(connection)):
            return self._refuse(connection, HTTPStatus.FORBIDDEN, "not_loopback",
                                "protected mode: only chargers on this machine may connect "
                                "(the gateway has no passwords file)")
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        request = connection.request
        charger_id = charger_of_path(request.path if request is not None else "")
        protocol = connection.subprotocol
        link_class = LINKS.get(str(protocol)) if protocol is not None else None
        if charger_id is None or link_class is None:
            self.gateway.stats.handshakes_refused["no_subprotocol"] += 1
            offered = request.headers.get_all("Sec-WebSocket-Protocol") if request else []
            logger.info("charger {} offered no subprotocol the gateway speaks ({}): closed",
                        charger_id, ", ".join(offered) or "none")
            await connection.close(CLOSE_PROTOCOL_ERROR, "no supported OCPP subprotocol")
            return
        link = link_class(charger_id, connection, self.gateway)
        replaced = self.gateway.attach(link)
        if replaced is not None:
            logger.info("charger {} connected again; closing its previous connection",
                        charger_id)
            # In the background: a dead peer's close waits for its timeout, the new
            # connection must not.
            closing = asyncio.create_task(
                replaced._connection.close(1000, "replaced by a new connection"),
                name=f"ocpp-{charger_id}-close-replaced")
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        logger.info("charger {} connected from {} ({})", charger_id, _address(connection),
                    protocol)
        try:
            await link.serve()
        except ConnectionClosed as exc:
            logger.info("charger {} disconnected ({})", charger_id, exc)
        finally:
            await self.gateway.detach(link)


def _host(connection: ServerConnection) -> str | None:
    address = connection.remote_address
    if isinstance(address, tuple) and address:
        return str(address[0])
    return None


def _address(connection: ServerConnection) -> str:
    return _host(connection) or "?"

