"""More than one Central for the clients of its API (SPEC §9): a list of addresses, and
"any door", the choice of the one that answers.

Whatever calls Central (monitors, the fleet, the gateway, the load generator, ``ctl``)
takes a comma-separated list of Central addresses: ``h1,h2`` (each with the service's
Central port), ``h1:8000,h2:8001``, ``[::1]:8000``, or base URLs
(``http://h1:8000,https://h2``). :func:`parse_centrals` reads it, with an error that names
the item at fault; one address is what the clients always took.

:class:`AnyDoor` holds the list and the address in use (the first at start). A call
(:meth:`AnyDoor.call`) goes to the address in use; when that one does not answer (a
connection error or a timeout: :func:`no_answer`), the same call goes to the next one, and
so on once round the list. The first address that answers is kept for the calls that
follow; when none answers, the last error is raised for the caller's own retry rules.
Calls in flight together (the fleet and the gateway share one door) each walk their own
round from the address in use, and a failure moves that address on only while it still
points at the one that failed, so one call never sends the others back to a dead one. The
first switch of an outage is logged once (WARNING), and the address that answers after a
switch once (INFO); with one address nothing is tried twice and nothing more is logged.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

import httpx
from loguru import logger

__all__ = ["AnyDoor", "CentralAddress", "no_answer", "parse_centrals", "refusal_of"]

T = TypeVar("T")

_HOST: Final = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]{0,252})")
_URL: Final = re.compile(r"(https?)://([^/\s]+)(/\S*)?")


@dataclass(frozen=True)
class CentralAddress:
    """One Central: where its API (or its TCP plane, for ``ctl``) is."""

    host: str
    port: int
    scheme: str = "http"
    path: str = ""
    """A base path of a URL item (``http://h/central`` → ``/central``), else empty."""

    @property
    def hostport(self) -> str:
        """``host:port`` (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL of the HTTP API, without a trailing slash."""
        return f"{self.scheme}://{self.hostport}{self.path}"

    def __str__(self) -> str:
        return self.url


def _port(text: str, item: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{item!r}: the port must be a number from 1 to 65535")
    return int(text)


def _host(text: str, item: str) -> str:
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise ValueError(f"{item!r}: {text!r} in brackets is not an IPv6 address") from None
    if not _HOST.fullmatch(text):
        raise ValueError(f"{item!r}: {text!r} is not a host name or address")
    return text


def _item(item: str, default_port: int) -> CentralAddress:
    url = _URL.fullmatch(item)
    if url is not None:
        scheme, netloc, path = url.group(1), url.group(2), (url.group(3) or "").rstrip("/")
        port = 443 if scheme == "https" else 80
    elif "://" in item:
        raise ValueError(f"{item!r}: a URL item must start with http:// or https://")
    else:
        scheme, netloc, path, port = "http", item, "", default_port
    if netloc.count(":") > 1 and not netloc.startswith("["):
        try:  # a bare IPv6 address, without a port
            return CentralAddress(str(ipaddress.IPv6Address(netloc)), port, scheme, path)
        except ValueError:
            raise ValueError(f"{item!r}: write an IPv6 address in brackets, as "
                             "[::1]:8000") from None
    if netloc.startswith("[") and "]:" in netloc:
        host, _, port_text = netloc.rpartition(":")
        port = _port(port_text, item)
    elif ":" in netloc and not netloc.startswith("["):
        host, _, port_text = netloc.partition(":")
        port = _port(port_text, item)
    else:
        host = netloc
    return CentralAddress(_host(host, item), port, scheme, path)


def parse_centrals(text: str, default_port: int) -> tuple[CentralAddress, ...]:
    """The Centrals of a comma-separated list: ``h1,h2`` (each on `default_port`),
    ``h1:8000,h2:8001``, ``[::1]:8000`` or ``http://h1:8000`` items, in their order.

    ValueError, naming the item, for an empty list or item, a bad host or port, or an
    address written twice.
    """
    if not 1 <= default_port <= 65535:
        raise ValueError(f"the default port {default_port} is not from 1 to 65535")
    items = [part.strip() for part in text.split(",")]
    if items == [""]:
        raise ValueError("no Central address given (expected host, host:port or a "
                         "comma-separated list of them)")
    addresses: list[CentralAddress] = []
    written: set[tuple[CentralAddress, CentralAddress]] = set()
    for number, item in enumerate(items, 1):
        if not item:
            raise ValueError(f"item {number} of {text!r} is empty (expected host or "
                             "host:port between the commas)")
        address = _item(item, default_port)
        # The same Central written twice whatever the default port (h1,h1 or h1:80,h1:80;
        # not h1,h1:8000), so that the settings can check a list before the port is known.
        key = (_item(item, 1), _item(item, 2))
        if key in written:
            raise ValueError(f"{item!r}: Central {address} is given twice")
        written.add(key)
        addresses.append(address)
    return tuple(addresses)


def no_answer(exc: BaseException) -> bool:
    """Whether an HTTP call failed because its Central did not answer (a connection error,
    a timeout, a connection closed before the answer): another Central may."""
    return isinstance(exc, httpx.TransportError | TimeoutError | ConnectionError)


def refusal_of(exc: BaseException) -> str | None:
    """Why a connection failed, when the exception or one of its causes says: a refused
    connection or a host that cannot be resolved; None otherwise."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve the host ({cause.strerror or cause})"
        cause = cause.__cause__ or cause.__context__
    return "connection refused" if "refused" in str(exc).lower() else None


def _reason(exc: BaseException) -> str:
    """A short cause of no answer, from the exception and its causes."""
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return "timed out"
    known = refusal_of(exc)
    if known is not None:
        return known
    text = str(exc)
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


class AnyDoor:
    """Central's addresses and the one in use: :meth:`call` tries the one in use and moves
    to the next while they do not answer (see the module's text)."""

    def __init__(
        self, addresses: Sequence[CentralAddress], *, name: str = "Central", urls: bool = True
    ) -> None:
        if not addresses:
            raise ValueError("AnyDoor needs at least one address")
        self.addresses = tuple(addresses)
        self.name = name
        self.urls = urls
        """Whether the log lines show URLs (an HTTP API), else ``host:port`` (a TCP port)."""
        self.switches = 0
        """How many times the address in use moved on to the next one."""
        self._index = 0
        self._switched = False  # moved on since the last answer (logged once)

    @classmethod
    def parse(
        cls, text: str, default_port: int, *, name: str = "Central", urls: bool = True
    ) -> AnyDoor:
        """The AnyDoor of a list :func:`parse_centrals` reads."""
        return cls(parse_centrals(text, default_port), name=name, urls=urls)

    @property
    def current(self) -> CentralAddress:
        """The address in use: the next call goes there first."""
        return self.addresses[self._index]

    @property
    def url(self) -> str:
        """The base URL of the address in use."""
        return self.current.url

    def show(self, address: CentralAddress) -> str:
        """An address as the log lines show it."""
        return address.url if self.urls else address.hostport

    def describe(self) -> str:
        """The address in use, and the others when there are several (for start lines)."""
        if len(self.addresses) == 1:
            return self.show(self.current)
        others = ", ".join(self.show(a) for a in self.addresses if a != self.current)
        return f"{self.show(self.current)} (then {others})"

    async def call(
        self,
        attempt: Callable[[CentralAddress], Awaitable[T]],
        *,
        down: Callable[[BaseException], bool] = no_answer,
    ) -> T:
        """``await attempt(address)`` at the address in use, then at each next one while
        `down` says the error means no answer; the first result is returned and its
        address kept. Other errors, and the last one when none answers, are raised.

        Each call walks its own round of the list from the address in use when it
        started; a failure moves the shared address in use on only if it still points at
        the address that failed, so parallel calls do not undo each other's switch."""
        count = len(self.addresses)
        start = self._index
        for tried in range(count):
            index = (start + tried) % count
            address = self.addresses[index]
            try:
                result = await attempt(address)
            except Exception as exc:
                if tried == count - 1 or not down(exc):
                    raise
                self._move_on(index, exc)
                continue
            self._answered(index)
            return result
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _move_on(self, index: int, exc: BaseException) -> None:
        """The address at `index` did not answer: the address in use moves on to the next,
        unless another call has already moved it (compare-and-set: calls in flight
        together must not move it twice, back to the dead one, nor log the switch twice)."""
        if self._index != index:
            return
        self._index = (index + 1) % len(self.addresses)
        self.switches += 1
        level = "DEBUG" if self._switched else "WARNING"
        self._switched = True
        logger.log(level, "{} at {} does not answer ({}); trying {}", self.name,
                   self.show(self.addresses[index]), _reason(exc), self.show(self.current))

    def _answered(self, index: int) -> None:
        # Only an answer from the address in use ends the switch: a late answer from one
        # the door has since moved away from does not.
        if self._switched and index == self._index:
            self._switched = False
            logger.info("{} at {} answers; using it", self.name, self.show(self.current))
