"""The command line: ``python -m evcharging.devtools.kafka_broker fetch|start|stop|status``.

Its output for people goes to stdout (what it did) and stderr (errors); logs go to stderr.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from evcharging.devtools import process
from evcharging.devtools.common import out, run_cli, signals_interrupt
from evcharging.devtools.kafka_broker.broker import KafkaBroker
from evcharging.devtools.kafka_broker.config import (
    CACHE_ENV,
    DEFAULT_PORT,
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    HOST,
    libs_dir,
    repo_root,
    run_dir,
)
from evcharging.devtools.kafka_broker.daemon import broker_status, stop_broker
from evcharging.devtools.kafka_broker.errors import KafkaBrokerError, log_tail
from evcharging.devtools.kafka_broker.jars import fetch_jars
from evcharging.devtools.kafka_broker.sasl import SaslUsers, read_env_passwords, write_env


def _cmd_fetch(args: argparse.Namespace) -> int:
    started = time.monotonic()
    libs = fetch_jars(force=args.force)
    jars = sorted(libs.glob("*.jar"))
    out(f"{len(jars)} jars in {libs} ({time.monotonic() - started:.1f} s)")
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    port: int = args.port or process.free_port()
    work = run_dir(port)
    status = broker_status(work)
    if status.running:
        out(f"already running: pid {status.pid}, bootstrap {status.bootstrap}")
        if args.sasl:
            users = SaslUsers.load(Path(args.data_dir or work / "data").resolve())
            if users is None:
                raise KafkaBrokerError("the running broker has no SASL users (started without "
                                       "--sasl?); stop it and start it with --sasl --reset")
            _write_env(args.env_file, users)
        return 0
    broker = KafkaBroker(
        port,
        work,
        data_dir=args.data_dir,
        start_timeout=args.timeout,
        detach=not args.foreground,
        sasl=args.sasl,
        topic_prefixes=args.topic_prefix or [""],
        # A new storage takes the passwords .env already has (e.g. from `make up`).
        sasl_passwords=read_env_passwords(args.env_file) if args.sasl else None,
    )
    if args.reset and broker.data_dir.exists():
        shutil.rmtree(broker.data_dir)
    if args.foreground:
        return _run_foreground(broker, args.env_file)
    broker.start()
    if broker.sasl:
        _write_env(args.env_file, broker.sasl_users)
    out(
        f"Kafka broker running: bootstrap {broker.bootstrap}, pid {broker.pid}, "
        f"ready in {broker.start_seconds:.1f} s\n"
        f"  log:  {broker.log_file}\n"
        f"  data: {broker.data_dir}\n"
        f"  stop: python -m evcharging.devtools.kafka_broker stop --port {port}"
    )
    return 0


def _write_env(env_file: Path, users: SaslUsers) -> None:
    changed = write_env(env_file, users)
    sasl = "SASL_PLAINTEXT, SCRAM-SHA-512; users central, cp, driver"
    if changed:
        out(f"  sasl: {sasl}; wrote {', '.join(changed)} into {env_file}")
    else:
        out(f"  sasl: {sasl}; {env_file} already holds their passwords")
    out("  clients: KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT (each service reads its password)")


def _run_foreground(broker: KafkaBroker, env_file: Path) -> int:
    # SIGTERM/SIGHUP behave like Ctrl-C: KeyboardInterrupt, then a clean broker stop.
    signals_interrupt()
    try:
        broker.start()
        if broker.sasl:
            _write_env(env_file, broker.sasl_users)
        out(
            f"Kafka broker running: bootstrap {broker.bootstrap}, pid {broker.pid}, "
            f"ready in {broker.start_seconds:.1f} s; log {broker.log_file}; Ctrl-C stops it"
        )
        code = broker.wait()
    except KeyboardInterrupt:
        out("stopping Kafka broker ...")
        broker.stop()
        out("stopped")
        return 0
    finally:
        broker.stop()
    if code in (0, 143):  # SIGTERM from elsewhere, e.g. `stop --port` in another terminal
        out(f"Kafka broker was stopped (exit code {code})")
        return 0
    sys.stderr.write(
        f"Kafka broker exited unexpectedly with code {code}; last lines of {broker.log_file}:\n"
        f"{log_tail(broker.log_file)}\n"
    )
    return 1


def _cmd_stop(args: argparse.Namespace) -> int:
    work = run_dir(args.port)
    if stop_broker(work, timeout=args.timeout):
        out(f"stopped Kafka broker on port {args.port}")
    else:
        out(f"no Kafka broker running on port {args.port} (nothing to stop)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    status = broker_status(run_dir(args.port))
    if status.running:
        answering = process.tcp_accepts(HOST, args.port, 1.0)
        out(
            f"running: pid {status.pid}, bootstrap {status.bootstrap}"
            f"{'' if answering else ' (port not accepting connections yet)'}, "
            f"work dir {status.work_dir}"
        )
        return 0
    out(f"not running (port {args.port})")
    return 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evcharging.devtools.kafka_broker",
        description=(
            "Run a real local Apache Kafka broker (KRaft, combined broker+controller, on\n"
            f"{HOST}) from jars fetched from Maven Central. Needs java 17+ and, once, mvn.\n"
            f"Jar cache: {libs_dir()} (override with ${CACHE_ENV})."
        ),
        epilog=(
            "examples:\n"
            "  %(prog)s start              # daemon on 127.0.0.1:9092\n"
            "  %(prog)s status; echo $?    # 0 running, 1 not\n"
            "  %(prog)s stop\n"
            "  %(prog)s start --port 0 --foreground   # free port, Ctrl-C stops it\n"
            "  %(prog)s start --sasl --reset  # SPEC §11: SCRAM users and ACLs, passwords in .env"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    port_help = "PLAINTEXT port on 127.0.0.1; state in .cache/kafka/run/PORT (default: %(default)s)"
    start = sub.add_parser(
        "start",
        help="start a broker (daemon unless --foreground)",
        description=(
            "Start a broker and wait until it answers Kafka requests. Without --foreground the "
            "java process is detached and this command exits; `stop` ends it."
        ),
    )
    start.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=port_help + "; 0 picks a free port"
    )
    start.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="Kafka data (log.dirs) directory; default .cache/kafka/run/PORT/data",
    )
    start.add_argument(
        "--foreground", action="store_true", help="run until Ctrl-C/SIGTERM, then stop the broker"
    )
    start.add_argument(
        "--reset", action="store_true", help="delete the data directory first (fresh cluster)"
    )
    start.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_START_TIMEOUT,
        help="seconds to wait for the broker to answer (default: %(default)s)",
    )
    start.add_argument(
        "--sasl",
        action="store_true",
        help="require SASL SCRAM-SHA-512 and enforce the ACLs of SPEC §11 (users central, cp, "
        "driver; their passwords go into --env-file); needs fresh storage (--reset)",
    )
    start.add_argument(
        "--env-file",
        type=Path,
        default=repo_root() / ".env",
        help="with --sasl: where KAFKA_CENTRAL_PASSWORD, KAFKA_CP_PASSWORD and "
        "KAFKA_DRIVER_PASSWORD are written, other lines kept (default: %(default)s)",
    )
    start.add_argument(
        "--topic-prefix",
        action="append",
        default=None,
        metavar="PREFIX",
        help="with --sasl: grant the ACLs on the topics named PREFIX<topic> (repeatable; "
        "default: the unprefixed topics only; match the services' *_TOPIC_PREFIX)",
    )
    start.set_defaults(func=_cmd_start)

    stop = sub.add_parser(
        "stop",
        help="stop a daemon broker",
        description="Send SIGTERM to the broker, then SIGKILL if it has not exited in time.",
    )
    stop.add_argument("--port", type=int, default=DEFAULT_PORT, help=port_help)
    stop.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_STOP_TIMEOUT,
        help="seconds to wait after SIGTERM before SIGKILL (default: %(default)s)",
    )
    stop.set_defaults(func=_cmd_stop)

    status = sub.add_parser(
        "status",
        help="say whether a broker runs (exit code 0) or not (1)",
    )
    status.add_argument("--port", type=int, default=DEFAULT_PORT, help=port_help)
    status.set_defaults(func=_cmd_status)

    fetch = sub.add_parser(
        "fetch",
        help="only download the Kafka jars into the cache",
    )
    fetch.add_argument("--force", action="store_true", help="download again even if complete")
    fetch.set_defaults(func=_cmd_fetch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m evcharging.devtools.kafka_broker``."""
    return run_cli(_build_parser(), argv, KafkaBrokerError, quiet_loggers=("aiokafka",))
