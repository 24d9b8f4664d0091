"""The command line: ``python -m evcharging.devtools.postgres start|stop|status|url``.

Its output for people goes to stdout (what it did) and stderr (errors); logs go to stderr.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence

from evcharging.devtools import process
from evcharging.devtools.common import out, run_cli, signals_interrupt
from evcharging.devtools.postgres.config import (
    BIN_ENV,
    DATABASE,
    DEBIAN_LIB,
    DEFAULT_PORT,
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    HOME_ENV,
    HOST,
    PASSWORDS_FILE,
    Passwords,
    home_dir,
    run_dir,
)
from evcharging.devtools.postgres.daemon import postgres_status, stop_postgres
from evcharging.devtools.postgres.errors import PostgresError, log_tail
from evcharging.devtools.postgres.server import LocalPostgres
from evcharging.devtools.postgres.sql import ensure_user_and_database


def _cmd_start(args: argparse.Namespace) -> int:
    port: int = args.port or process.free_port()
    work = run_dir(port)
    status = postgres_status(work)
    if status.running and args.reset:
        raise PostgresError(f"--reset would delete the cluster of the running server (pid "
                            f"{status.pid}): stop it first (stop --port {port})")
    if status.running:
        passwords = Passwords.load(work)
        if passwords is None:
            raise PostgresError(f"PostgreSQL runs (pid {status.pid}) but "
                                f"{work / PASSWORDS_FILE} is gone: stop it, then start --reset")
        ensure_user_and_database(port, passwords, args.timeout)
        out(f"already running: pid {status.pid}\nCENTRAL_DB_URL={status.url}")
        return 0
    if args.reset and work.exists():
        shutil.rmtree(work)
    server = LocalPostgres(port, work, start_timeout=args.timeout, detach=not args.foreground)
    if args.foreground:
        return _run_foreground(server)
    server.start()
    out(
        f"PostgreSQL running: pid {server.pid}, ready in {server.start_seconds:.1f} s\n"
        f"CENTRAL_DB_URL={server.url}\n"
        f"  log:  {server.log_file}\n"
        f"  data: {server.data_dir}\n"
        f"  stop: python -m evcharging.devtools.postgres stop --port {port}"
    )
    return 0


def _run_foreground(server: LocalPostgres) -> int:
    signals_interrupt()
    try:
        server.start()
        out(f"PostgreSQL running: pid {server.pid}; log {server.log_file}; Ctrl-C stops it\n"
             f"CENTRAL_DB_URL={server.url}")
        code = server.wait()
    except KeyboardInterrupt:
        out("stopping PostgreSQL ...")
        return 0
    finally:
        server.stop()
    sys.stderr.write(f"PostgreSQL exited with code {code}; last lines of {server.log_file}:\n"
                     f"{log_tail(server.log_file)}\n")
    return 0 if code == 0 else 1


def _cmd_stop(args: argparse.Namespace) -> int:
    if stop_postgres(run_dir(args.port), timeout=args.timeout):
        out(f"stopped PostgreSQL on port {args.port}")
    else:
        out(f"no PostgreSQL running on port {args.port} (nothing to stop)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    status = postgres_status(run_dir(args.port))
    if status.running:
        answering = process.tcp_accepts(HOST, args.port, 1.0)
        out(f"running: pid {status.pid}"
             f"{'' if answering else ' (port not accepting connections yet)'}, "
             f"work dir {status.work_dir}\nCENTRAL_DB_URL={status.url}")
        return 0
    out(f"not running (port {args.port})")
    return 1


def _cmd_url(args: argparse.Namespace) -> int:
    status = postgres_status(run_dir(args.port))
    if not status.running or status.url is None:
        raise PostgresError(f"no PostgreSQL running on port {args.port}: start it first")
    out(status.url)
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0..65535")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evcharging.devtools.postgres",
        description=(
            f"Run a local PostgreSQL server on {HOST} for Central (SPEC §9) from Debian's\n"
            f"binaries ({DEBIAN_LIB}/<version>/bin, or ${BIN_ENV});\nstate in "
            f"{home_dir()}/PORT (or ${HOME_ENV}/PORT).\n"
            f"Database and user {DATABASE!r}; prints CENTRAL_DB_URL."
        ),
        epilog=(
            "examples:\n"
            f"  %(prog)s start              # daemon on {HOST}:{DEFAULT_PORT}\n"
            "  %(prog)s status; echo $?    # 0 running, 1 not\n"
            "  export CENTRAL_DB_URL=$(%(prog)s url)\n"
            "  %(prog)s stop\n"
            "  %(prog)s start --port 0 --foreground   # free port, Ctrl-C stops it"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    port_help = f"port on {HOST}; state in .cache/postgres/PORT (default: %(default)s)"

    start = sub.add_parser("start", help="start a server (daemon unless --foreground)",
                           description="Start a server and wait until it answers a query; "
                           "make its cluster first if it has none. On a running server it "
                           "only makes sure the database exists.")
    start.add_argument("--port", type=_port, default=DEFAULT_PORT,
                       help=port_help + "; 0 picks a free port")
    start.add_argument("--foreground", action="store_true",
                       help="run until Ctrl-C/SIGTERM, then stop the server")
    start.add_argument("--reset", action="store_true",
                       help="delete the cluster first (all its data) and make a new one")
    start.add_argument("--timeout", type=_seconds, default=DEFAULT_START_TIMEOUT,
                       help="seconds to wait for the server to answer (default: %(default)s)")
    start.set_defaults(func=_cmd_start)

    stop = sub.add_parser("stop", help="stop a daemon server",
                          description="Fast shutdown (SIGINT), then SIGQUIT and SIGKILL if "
                          "it has not exited in time.")
    stop.add_argument("--port", type=_port, default=DEFAULT_PORT, help=port_help)
    stop.add_argument("--timeout", type=_seconds, default=DEFAULT_STOP_TIMEOUT,
                      help="seconds to wait after SIGINT (default: %(default)s)")
    stop.set_defaults(func=_cmd_stop)

    status = sub.add_parser("status", help="say whether a server runs (exit code 0) or not (1)")
    status.add_argument("--port", type=_port, default=DEFAULT_PORT, help=port_help)
    status.set_defaults(func=_cmd_status)

    url = sub.add_parser("url", help="print only CENTRAL_DB_URL of a running server")
    url.add_argument("--port", type=_port, default=DEFAULT_PORT, help=port_help)
    url.set_defaults(func=_cmd_url)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m evcharging.devtools.postgres``."""
    return run_cli(_build_parser(), argv, PostgresError)
