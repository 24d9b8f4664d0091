"""Operator CLI for Central's TCP control plane (SPEC §6).

Usage::

    python -m evcharging.apps.ev_central.ctl [--host H] [--port P] [--token T]
        [--timeout S] [--json] ping | status [CP_ID] | stop CP_ID [--reason R]
        | resume CP_ID [--reason R]

``--host``, ``--port`` and ``--token`` default to the environment variables
``CENTRAL_CTL_HOST`` (else ``localhost``), ``CENTRAL_LISTEN_PORT`` (else ``9999``) and
``CENTRAL_API_TOKEN``; a flag beats the variable. The global options may also follow the
command (``ctl status --json``).

Exit codes: 0 the answer is ok, 1 Central answered ``ok: false``, 2 usage error,
3 Central is unreachable or gave no valid answer.

:class:`ControlClient` is the reusable part: one connection, one request at a time,
with the ACK/NAK exchange of SPEC §6 on both directions.
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
from types import TracebackType
from typing import Any, Final, Self, TextIO

from evcharging.common.framing import (
    ACK,
    NAK,
    BadFrame,
    Frame,
    FrameDecoder,
    FramingError,
    Oversize,
    decode_message,
    encode_message,
)

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

DEFAULT_HOST: Final = "localhost"
DEFAULT_PORT: Final = 9999
MAX_BAD_ANSWERS: Final = 8
"""Corrupt answer frames tolerated in one exchange before giving up."""

_READ_SIZE: Final = 64 * 1024


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
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def connect(self) -> None:
        if self._writer is not None:
            return
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout
            )
        except TimeoutError:
            raise CentralUnreachable(
                f"cannot reach Central at {self.address}: no connection within {self.timeout:g}s"
            ) from None
        except OSError as exc:
            why = _os_reason(exc)
            raise CentralUnreachable(f"cannot reach Central at {self.address}: {why}") from exc

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
                await self._send_request(frame)
                return await self._read_answer()
        except TimeoutError:
            await self.close()
            raise ControlError(
                f"no answer from Central at {self.address} within {self.timeout:g}s"
            ) from None
        except (ConnectionError, OSError) as exc:
            await self.close()
            raise ControlError(f"connection to Central at {self.address} failed: {exc}") from exc
        except ControlError:
            await self.close()
            raise

    def _streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            raise ControlError("not connected")
        return self._reader, self._writer

    async def _send_request(self, frame: bytes) -> None:
        reader, writer = self._streams()
        for _ in range(self.max_retransmits + 1):
            writer.write(frame)
            await writer.drain()
            reply = await self._read_reply(reader)
            if reply == ACK:
                return
        raise ControlError(f"Central refused the request {self.max_retransmits + 1} times (NAK)")

    async def _read_reply(self, reader: asyncio.StreamReader) -> int:
        while True:
            data = await reader.read(1)
            if not data:
                raise ControlError(f"Central at {self.address} closed the connection")
            if data[0] in (ACK, NAK):
                return data[0]
            # Anything else before the ACK/NAK is line noise; Central sends none.

    async def _read_answer(self) -> dict[str, Any]:
        reader, writer = self._streams()
        decoder = FrameDecoder()
        bad = 0
        while True:
            data = await reader.read(_READ_SIZE)
            if not data:
                raise ControlError(f"Central at {self.address} closed the connection")
            for event in decoder.feed(data):
                if isinstance(event, Frame):
                    writer.write(bytes((ACK,)))
                    await writer.drain()
                    try:
                        return decode_message(event.payload)
                    except FramingError as exc:
                        raise ControlError(f"Central sent an invalid answer: {exc}") from exc
                if isinstance(event, Oversize):
                    writer.write(bytes((NAK,)))
                    raise ControlError("Central sent an oversized answer")
                if isinstance(event, BadFrame):
                    bad += 1
                    if bad > MAX_BAD_ANSWERS:
                        raise ControlError(f"{bad} corrupt answers from Central")
                    writer.write(bytes((NAK,)))
                    await writer.drain()


def _os_reason(exc: OSError) -> str:
    """A short reason: 'Connection refused', 'Name or service not known', ..."""
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    return str(exc)


# ---------------------------------------------------------------------- CLI


def _env_port() -> int | None:
    value = os.environ.get("CENTRAL_LISTEN_PORT")
    if not value:
        return DEFAULT_PORT
    try:
        port = int(value)
    except ValueError:
        return None
    return port if 0 < port < 65536 else None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port {port} out of range 1-65535")
    return port


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("timeout must be > 0")
    return value


def _add_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The global options; on the subcommands they only override when given."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    env_token = os.environ.get("CENTRAL_API_TOKEN") or None
    parser.add_argument(
        "--host",
        default=default(os.environ.get("CENTRAL_CTL_HOST") or DEFAULT_HOST),
        help="Central's host [CENTRAL_CTL_HOST; default: localhost]",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=default(_env_port()),
        help="Central's TCP control port [CENTRAL_LISTEN_PORT; default: 9999]",
    )
    parser.add_argument(
        "--token",
        default=default(env_token),
        help="API token when Central requires one; prefer the variable, flags show in ps "
        "[CENTRAL_API_TOKEN; default: unset]",
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=default(5.0),
        help="seconds to wait for Central [default: 5]",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print Central's answer as JSON",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evcharging.apps.ev_central.ctl",
        description="Operate EV Central over its TCP control plane.",
        epilog="Exit codes: 0 ok, 1 Central refused, 2 usage error, 3 Central unreachable.",
    )
    _add_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_options(sub, defaults=False)
        return sub

    command("ping", "check that Central answers")
    status = command("status", "show every CP, or one")
    status.add_argument("cp_id", nargs="?", metavar="CP_ID")
    stop = command("stop", "stop a CP (administrative STOP_CP)")
    stop.add_argument("cp_id", metavar="CP_ID")
    stop.add_argument("--reason", help="why (logged and sent to the CP)")
    resume = command("resume", "resume a stopped CP (RESUME_CP)")
    resume.add_argument("cp_id", metavar="CP_ID")
    resume.add_argument("--reason", help="why (logged and sent to the CP)")
    return parser


def _request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any]
    if args.command == "ping":
        request = {"cmd": "PING"}
    elif args.command == "status":
        request = {"cmd": "STATUS"}
        if args.cp_id:
            request["cp_id"] = args.cp_id
    else:
        request = {"cmd": "STOP_CP" if args.command == "stop" else "RESUME_CP"}
        request["cp_id"] = args.cp_id
        if args.reason:
            request["reason"] = args.reason
    if args.token:
        request["token"] = args.token
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


def _render(args: argparse.Namespace, answer: Mapping[str, Any], out: TextIO) -> None:
    if args.command == "ping":
        out.write(f"pong from Central at {args.host}:{args.port} ({answer.get('cps', '?')} CPs)\n")
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
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.port is None:
        err.write(f"{parser.prog}: error: CENTRAL_LISTEN_PORT is not a valid port\n")
        return EXIT_USAGE
    request = _request(args)
    try:
        async with ControlClient(args.host, args.port, args.timeout) as client:
            answer = await client.request(request)
    except FramingError as exc:  # the request itself cannot be sent (e.g. over 64 KiB)
        err.write(f"{parser.prog}: error: {exc}\n")
        return EXIT_USAGE
    except ControlError as exc:
        err.write(f"{exc}\n")
        return EXIT_UNREACHABLE
    ok = answer.get("ok") is True
    if args.json:
        out.write(json.dumps(answer, indent=2, ensure_ascii=False) + "\n")
    elif ok:
        _render(args, answer, out)
    else:
        code = answer.get("code")
        err.write(f"error: {answer.get('error', 'unknown error')}{f' ({code})' if code else ''}\n")
    return EXIT_OK if ok else EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(amain(argv))


if __name__ == "__main__":
    sys.exit(main())
