"""Operator CLI for Central's TCP control plane (SPEC §6).

Usage::

    python -m evcharging.apps.ev_central.ctl [--host H] [--port P] [--token T]
        [--timeout S] [--json] ping | status [CP_ID] | stop CP_ID [--reason R]
        | resume CP_ID [--reason R]

The settings are :class:`~evcharging.common.config.CtlSettings`, read like every
service's: a flag beats the environment variable, which beats ``.env``, which beats the
default. ``--host`` is ``CENTRAL_CTL_HOST`` (``localhost``; several Centrals separated by
commas, ``h1,h2`` or ``h1:9999,h2:9998``: the next is tried while one cannot be reached,
SPEC §9), ``--port`` Central's own
``CENTRAL_LISTEN_PORT`` (``9999``), ``--token`` ``CENTRAL_API_TOKEN`` or else the shared
``EVCHARGING_API_TOKEN``, ``--timeout`` ``CENTRAL_CTL_TIMEOUT`` (5 s). The global options
may also follow the command (``ctl status --json``).

Exit codes: 0 the answer is ok, 1 Central answered ``ok: false``, 2 usage error,
3 Central is unreachable or gave no valid answer.

:class:`ControlClient` is the reusable part: one connection, one request at a time,
over the ACK/NAK link of :mod:`evcharging.common.link` (the one Central's server uses).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final, Self, TextIO

from pydantic import ValidationError

from evcharging.apps.ev_central.commands import COMMANDS
from evcharging.common.centrals import AnyDoor, CentralAddress
from evcharging.common.config import CtlSettings, add_settings_flags, settings_problems
from evcharging.common.framing import Frame, FramingError, Oversize, decode_message, encode_message
from evcharging.common.link import Link, LinkError, LinkOptions, PeerClosed, Refused

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "CentralUnreachable",
    "ControlClient",
    "ControlError",
    "amain",
    "format_table",
    "main",
]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3

MAX_BAD_ANSWERS: Final = 8
"""Corrupt answer frames tolerated in one exchange before giving up."""


class ControlError(Exception):
    """No valid answer: the connection failed, timed out or broke the protocol."""


class CentralUnreachable(ControlError):
    """The TCP connection to Central could not be opened."""


class ControlClient:
    """A client of the control plane: ``await client.request({"cmd": "PING"})``.

    The connection is opened by the first request (or ``connect``) and kept until
    ``close``; the client is also an async context manager. ``timeout`` bounds the
    connection attempt and each whole request/answer exchange. Requests on one client
    must not overlap (the protocol is one exchange at a time).
    """

    def __init__(
        self, host: str, port: int, timeout: float = 5.0, *, max_retransmits: int = 3
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_retransmits = max_retransmits
        self._link: Link | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._link is not None

    async def connect(self) -> None:
        if self._link is not None:
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout
            )
        except TimeoutError:
            raise CentralUnreachable(
                f"cannot reach Central at {self.address}: no connection within {self.timeout:g}s"
            ) from None
        except OSError as exc:
            why = _os_reason(exc)
            raise CentralUnreachable(f"cannot reach Central at {self.address}: {why}") from exc
        # No per-reply timeout: ``timeout`` bounds each whole exchange.
        self._link = Link(reader, writer, LinkOptions(max_retransmits=self.max_retransmits))

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        link, self._link = self._link, None
        if link is not None:
            link.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await link.writer.wait_closed()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def request(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and return Central's answer (``ok`` true or false).

        Raises :class:`CentralUnreachable` when no connection can be made and
        :class:`ControlError` when no valid answer arrives; the connection is then closed.
        """
        frame = encode_message(obj)
        await self.connect()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._exchange(frame)
        except TimeoutError:
            problem = f"no answer from Central at {self.address} within {self.timeout:g}s"
        except Refused as exc:
            problem = f"Central refused the request {exc.attempts} times (NAK)"
        except PeerClosed:
            problem = f"Central at {self.address} closed the connection"
        except LinkError as exc:
            problem = f"Central at {self.address}: {exc}"
        except (ConnectionError, OSError) as exc:
            problem = f"connection to Central at {self.address} failed: {exc}"
        except ControlError:
            await self.close()
            raise
        await self.close()
        raise ControlError(problem)

    async def _exchange(self, frame: bytes) -> dict[str, Any]:
        link = self._link
        if link is None:
            raise ControlError("not connected")
        await link.send(frame)
        bad = 0
        while True:
            item = await link.receive()
            if item is None:
                raise ControlError(f"Central at {self.address} closed the connection")
            if isinstance(item, Frame):
                try:
                    return decode_message(item.payload)
                except FramingError as exc:
                    raise ControlError(f"Central sent an invalid answer: {exc}") from exc
            if isinstance(item, Oversize):
                raise ControlError("Central sent an oversized answer")
            bad += item.count
            if bad > MAX_BAD_ANSWERS:
                raise ControlError(f"{bad} corrupt answers from Central")


def _os_reason(exc: OSError) -> str:
    """A short reason: 'Connection refused', 'Name or service not known', ..."""
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    return str(exc)


# ---------------------------------------------------------------------- CLI


def _add_options(parser: argparse.ArgumentParser) -> None:
    """The global options, on the main parser and on every command; absent stay absent."""
    add_settings_flags(parser, CtlSettings)
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print Central's answer as JSON",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evcharging.apps.ev_central.ctl",
        description="Operate EV Central over its TCP control plane.",
        epilog="Every setting can also be given by its environment variable or in .env; "
        "a flag beats the variable, the variable beats the default. "
        "Exit codes: 0 ok, 1 Central refused, 2 usage error, 3 Central unreachable.",
    )
    _add_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_options(sub)
        return sub

    command("ping", "check that Central answers")
    status = command("status", "show every CP, or one")
    status.add_argument("cp_id", nargs="?", metavar="CP_ID")
    for operator in COMMANDS.values():  # stop, resume: the operator's commands
        sub = command(operator.action, operator.help)
        sub.add_argument("cp_id", metavar="CP_ID")
        sub.add_argument("--reason", help="why (logged and sent to the CP)")
    return parser


def load_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> CtlSettings:
    """The flags given in ``args`` over the environment, ``.env`` and the defaults.

    Invalid settings are a usage error (``parser.error``), as for every service.
    """
    flags = {name: value for name, value in vars(args).items() if name in CtlSettings.model_fields}
    try:
        return CtlSettings(**flags)
    except ValidationError as exc:
        parser.error(f"invalid settings: {settings_problems(CtlSettings, exc)}")


def _request(args: argparse.Namespace, token: str | None) -> dict[str, Any]:
    request: dict[str, Any]
    if args.command == "ping":
        request = {"cmd": "PING"}
    elif args.command == "status":
        request = {"cmd": "STATUS"}
        if args.cp_id:
            request["cp_id"] = args.cp_id
    else:
        name = next(n for n, c in COMMANDS.items() if c.action == args.command)
        request = {"cmd": name, "cp_id": args.cp_id}
        if args.reason:
            request["reason"] = args.reason
    if token:
        request["token"] = token
    return request


def _cell(value: Any, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if digits is not None and isinstance(value, int | float):
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS: Final = ("CP", "STATE", "FAULTY", "BREAKER", "DRIVER", "kW", "kWh", "€")
_NUMERIC: Final = frozenset({"kW", "kWh", "€"})


def _row(cp: Mapping[str, Any]) -> tuple[str, ...]:
    session = cp.get("session") or {}
    return (
        _cell(cp.get("cp_id")),
        _cell(cp.get("state")),
        _cell(cp.get("is_faulty")),
        _cell(cp.get("circuit_breaker_state")),
        _cell(cp.get("current_driver")),
        _cell(session.get("kw"), 1),
        _cell(session.get("kwh"), 3),
        _cell(session.get("euros"), 2),
    )


def format_table(cps: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width table of CPs (the columns of :data:`COLUMNS`), one line per CP."""
    rows = [COLUMNS, *(_row(cp) for cp in cps)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if name in _NUMERIC else cell.ljust(width)
            for name, cell, width in zip(COLUMNS, row, widths, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _render(
    args: argparse.Namespace, central: CentralAddress, answer: Mapping[str, Any], out: TextIO
) -> None:
    if args.command == "ping":
        where = central.hostport
        out.write(f"pong from Central at {where} ({answer.get('cps', '?')} CPs)\n")
    elif args.command == "status":
        cp = answer.get("cp")
        cps = [cp] if isinstance(cp, Mapping) else list(answer.get("cps") or [])
        out.write(format_table(cps) if cps else "no CPs registered\n")
        if isinstance(cp, Mapping):
            for key in ("state_reason", "fault_reason", "circuit_breaker_reason", "last_seen"):
                if cp.get(key):
                    out.write(f"{key}: {cp[key]}\n")
        if answer.get("truncated"):
            out.write(
                f"(showing {answer.get('count')} of {answer.get('total')} CPs; "
                "ask for one with: status CP_ID)\n"
            )
    else:
        cp = answer.get("cp") or {}
        out.write(f"{answer.get('sent')} sent to {args.cp_id} (state {cp.get('state', '?')})\n")


async def amain(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The CLI as a coroutine (for callers that already run an event loop)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        settings = load_settings(parser, args)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    token = settings.token.get_secret_value() if settings.token else None
    request = _request(args, token)
    centrals = AnyDoor.parse(settings.host, settings.port, urls=False)

    async def ask(central: CentralAddress) -> dict[str, Any]:
        async with ControlClient(central.host, central.port, settings.timeout) as client:
            return await client.request(request)

    try:  # the next Central of a list while one cannot be reached (SPEC §9)
        answer = await centrals.call(ask, down=_unreachable)
    except FramingError as exc:  # the request itself cannot be sent (e.g. over 64 KiB)
        err.write(f"{parser.prog}: error: {exc}\n")
        return EXIT_USAGE
    except ControlError as exc:
        err.write(f"{exc}\n")
        return EXIT_UNREACHABLE
    ok = answer.get("ok") is True
    if getattr(args, "json", False):
        out.write(json.dumps(answer, indent=2, ensure_ascii=False) + "\n")
    elif ok:
        _render(args, centrals.current, answer, out)
    else:
        code = answer.get("code")
        err.write(f"error: {answer.get('error', 'unknown error')}{f' ({code})' if code else ''}\n")
    return EXIT_OK if ok else EXIT_ERROR


def _unreachable(exc: BaseException) -> bool:
    return isinstance(exc, CentralUnreachable)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(amain(argv))


if __name__ == "__main__":
    sys.exit(main())
