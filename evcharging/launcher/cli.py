"""``python -m evcharging run``: the flags, their defaults, and the command from start to end.

Over 400 lines: the flags, how they resolve against the services' settings and the one
command that uses them (broker, SASL, supervision, exit codes) read best side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dotenv import dotenv_values
from pydantic import ValidationError

from evcharging.apps.ev_driver.driver import load_requests
from evcharging.common.config import (
    CentralSettings,
    CPEngineSettings,
    DriverSettings,
    FleetSettings,
    LoadSettings,
    OcppSettings,
)
from evcharging.devtools.kafka_broker import DEFAULT_PORT as KAFKA_DEFAULT_PORT
from evcharging.devtools.kafka_broker import KafkaBrokerError
from evcharging.devtools.postgres import DEFAULT_PORT as POSTGRES_DEFAULT_PORT
from evcharging.devtools.postgres import PostgresError
from evcharging.devtools.prometheus import PrometheusNotFound, find_prometheus
from evcharging.launcher.broker import (
    LocalBroker,
    StopRequest,
    kafka_reachable,
    prepare_broker,
    sasl_child_env,
    start_broker,
)
from evcharging.launcher.console import (
    KAFKA,
    LAUNCHER,
    POSTGRES,
    Console,
    prefix_width,
    route_logs,
    use_colour,
)
from evcharging.launcher.database import LocalDatabase, prepare_database, start_database
from evcharging.launcher.plan import (
    DB_KINDS,
    DEFAULT_PROMETHEUS_PORT,
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    EXIT_FAILED,
    EXIT_KILLED,
    EXIT_OK,
    EXIT_USAGE,
    FLEET_THRESHOLD,
    MAX_CENTRALS,
    MAX_CPS,
    MAX_DRIVERS,
    MAX_ENGINES,
    LaunchError,
    LaunchOptions,
    PortUse,
    Role,
    busy_ports,
    central_db_env,
    child_specs,
    hide_password,
    metrics_port_uses,
    ocpp_port_uses,
    plan_ports,
    resolve_bootstrap,
    resolve_database,
    use_fleet,
)
from evcharging.launcher.supervisor import Supervisor, supervise

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


# --------------------------------------------------------------------------- flags


def _count(limit: int, low: int = 0) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be between {low} and {limit}, not {value}")
        return value

    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, not {value}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of drivers per second: {text!r}") from None
    if not 0 < value <= 100_000:
        raise argparse.ArgumentTypeError(f"must be more than 0 (and at most 100000), not {text}")
    return value


def _kafka_port(text: str) -> int:
    return 0 if text.strip() == "0" else _port(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add the ``run`` command to ``python -m evcharging``."""
    parser = subparsers.add_parser(
        "run",
        help="start the whole system locally (Kafka, Central, CPs, drivers); Ctrl-C stops it",
        description=(
            "Start the whole EV charging network on this machine: a Kafka broker (unless one "
            "is configured), with --db postgres a local PostgreSQL for Central, EV Central, "
            "N charging points and M drivers, with every "
            "process's output in this terminal. Up to "
            f"{FLEET_THRESHOLD} CPs each CP is a CP Engine and a CP Monitor process "
            f"(CP-001 …); more than {FLEET_THRESHOLD} run in one CP Fleet process (CP-00001 "
            "…, see --fleet). --load starts the driver load generator too. Ctrl-C stops "
            "everything in order (load, drivers, monitors, engines or fleet, the OCPP "
            "gateway, Central, PostgreSQL, broker); a second Ctrl-C kills. --ocpp also "
            "starts the OCPP gateway for real chargers. --centrals N starts N Centrals "
            "sharing the CPs on PostgreSQL (SPEC §9)."
        ),
        epilog=(
            "Other settings (e.g. CP_ENGINE_SESSION_SECONDS, CENTRAL_API_TOKEN) reach the "
            "services through the environment or .env, as usual; see .env.example. "
            "Examples: make run CPS=3 DRIVERS=2; make run CPS=10000 SITES=8 LOAD=100; "
            "make run DB=postgres; make run CENTRALS=2; "
            "make run ARGS='--restart --http-port 8080'"
        ),
    )
    parser.add_argument("--cps", type=_count(MAX_CPS), default=2, metavar="N",
                        help=f"charging points (default: 2): up to {FLEET_THRESHOLD}, CP-001..CP-N "
                        f"with an engine and a monitor process each (at most {MAX_ENGINES} "
                        f"that way); more than {FLEET_THRESHOLD}, CP-00001..CP-N in one CP "
                        "Fleet process")
    # Not exclusive: the last one given wins (make run passes its flags first, ARGS last).
    parser.add_argument("--fleet", dest="fleet", action="store_const", const=True,
                        default=None, help="run the CPs in one CP Fleet process whatever their "
                        f"number (default: only above {FLEET_THRESHOLD} CPs); ids CP-00001 …, "
                        "monitored by the fleet itself")
    parser.add_argument("--no-fleet", dest="fleet", action="store_const", const=False,
                        help="one CP Engine and one CP Monitor process per CP whatever their "
                        f"number (at most {MAX_ENGINES}); ids CP-001 …")
    parser.add_argument("--sites", type=_count(10_000, low=1), default=None, metavar="S",
                        help="sites the fleet's CPs are grouped into (default: $FLEET_SITES "
                        "or 1; fleet only)")
    parser.add_argument("--fleet-port", type=_port, default=None, metavar="PORT",
                        help="the CP Fleet's HTTP port: /health, /cp/ID/health, /cp/ID/fault, "
                        "/cp/ID/recover (default: $FLEET_HTTP_PORT or 8100)")
    # Not exclusive: the last one given wins, so `make run ARGS=--no-drivers` works although
    # the Makefile passes --drivers first.
    parser.add_argument("--drivers", type=_count(MAX_DRIVERS), default=None, metavar="M",
                        help="drivers driver-1..driver-M over the requests file (default: 1 "
                        "with engines, 0 with the fleet, whose ids the requests file does "
                        "not name)")
    parser.add_argument("--no-drivers", dest="drivers", action="store_const", const=0,
                        help="start no driver (same as --drivers 0)")
    parser.add_argument("--load", type=_rate, default=None, metavar="RATE",
                        help="also start the driver load generator (ev_load): RATE new "
                        "drivers per second, each charging once at a free CP of this run")
    parser.add_argument("--load-duration", type=_seconds, default=None, metavar="S",
                        help="seconds during which the load's drivers arrive (default: "
                        "$LOAD_DURATION when set, else until Ctrl-C); its summary is printed "
                        "at its end")
    parser.add_argument("--prometheus", action="store_true",
                        help="also start a local Prometheus (scripts/ensure_prometheus.sh "
                        "installs it) scraping every service's /metrics; its data goes to "
                        ".cache/prometheus")
    parser.add_argument("--prometheus-port", type=_port, default=DEFAULT_PROMETHEUS_PORT,
                        metavar="PORT", help="its web UI and API (default: %(default)s)")
    parser.add_argument("--ocpp", action="store_true",
                        help="also start the OCPP gateway (evcharging.apps.ev_ocpp): real "
                        "chargers and OCPP simulators connect to "
                        "ws://127.0.0.1:PORT/ocpp/<charger-id> (OCPP 1.6J or 2.0.1) and "
                        "become the CPs <charger-id>.<connector>")
    parser.add_argument("--ocpp-port", type=_port, default=None, metavar="PORT",
                        help="the gateway's WebSocket port (default: $OCPP_WS_PORT or 9000)")
    parser.add_argument("--ocpp-http-port", type=_port, default=None, metavar="PORT",
                        help="the gateway's /health and /metrics (default: $OCPP_HTTP_PORT "
                        "or 9001)")
    parser.add_argument(
        "--kafka-bootstrap", metavar="HOST:PORT", default=None,
        help="use this broker (default: $KAFKA_BOOTSTRAP or $CENTRAL_KAFKA_BOOTSTRAP, also "
        "from .env; when none is set, a local broker is started and stopped with the system)",
    )
    parser.add_argument(
        "--sasl", action="store_true",
        help="who may write to the bus (SPEC §11): the local broker requires SASL "
        "SCRAM-SHA-512 and enforces the ACLs of the principals central, cp and driver, and "
        "the services connect as theirs; with --kafka-bootstrap the services connect with "
        "SASL_PLAINTEXT and the passwords of the environment or .env",
    )
    parser.add_argument(
        "--kafka-port", type=_kafka_port, default=None, metavar="PORT",
        help=f"port of the local broker, 0 for any free one (default: {KAFKA_DEFAULT_PORT} "
        "when free, else any free port)",
    )
    parser.add_argument("--centrals", type=_count(MAX_CENTRALS, low=1), default=1,
                        metavar="N", help="Centrals sharing the CPs by Kafka partition (SPEC "
                        "§9; default: 1): central-1..central-N on consecutive HTTP and TCP "
                        "ports from --http-port and --listen-port, each serving the whole "
                        "network; more than one needs PostgreSQL, so it implies --db postgres")
    parser.add_argument("--http-port", type=_port, default=None, metavar="PORT",
                        help="Central's dashboard and HTTP API; central-i's is PORT+i-1 "
                        "(default: $CENTRAL_HTTP_PORT or 8000)")
    parser.add_argument("--listen-port", type=_port, default=None, metavar="PORT",
                        help="Central's TCP control plane; central-i's is PORT+i-1 (default: "
                        "$CENTRAL_LISTEN_PORT or 9999)")
    parser.add_argument("--base-health-port", type=_port, default=None, metavar="PORT",
                        help="health port of CP-001; CP-00i gets PORT+i-1 (default: "
                        "$CP_ENGINE_HEALTH_PORT or 8001; with --centrals N, the default "
                        "moves past the Centrals' HTTP ports)")
    parser.add_argument("--requests-file", type=Path, default=None, metavar="FILE",
                        help="the drivers' requests file (default: $DRIVER_REQUESTS_FILE or "
                        "requests.txt)")
    parser.add_argument("--db-path", type=Path, default=None, metavar="FILE",
                        help="Central's SQLite file (default: $CENTRAL_DB_PATH or "
                        "ev_charging.db)")
    parser.add_argument("--db", choices=DB_KINDS, default=None,
                        help="Central's database: sqlite (the default; its file is --db-path) "
                        "or postgres: a local PostgreSQL (Debian's, scripts/ensure_postgres.sh "
                        "installs it; data in .cache/postgres/PORT) started before Central and "
                        "stopped after it; a postgresql:// CENTRAL_DB_URL in the environment or "
                        ".env is used instead and nothing is started. --centrals 2 or more "
                        "implies postgres")
    parser.add_argument("--postgres-port", type=_kafka_port, default=None, metavar="PORT",
                        help="port of the local PostgreSQL, 0 for any free one (default: "
                        f"{POSTGRES_DEFAULT_PORT}; one already running there is used and "
                        "left running)")
    parser.add_argument("--restart", action="store_true",
                        help="restart a process that dies (backoff 1 s doubling to 30 s)")
    parser.add_argument("--start-timeout", type=_seconds, default=DEFAULT_START_TIMEOUT,
                        metavar="S", help="seconds to wait for Central, then for the CPs; "
                        "for the fleet's, seconds without one more CP ACTIVATED "
                        "(default: %(default)g)")
    parser.add_argument("--stop-timeout", type=_seconds, default=DEFAULT_STOP_TIMEOUT,
                        metavar="S", help="seconds each process gets to stop before SIGKILL; "
                        "the CP Fleet gets 1 s more per 500 CPs (default: %(default)g)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the name prefixes (default: auto, off when NO_COLOR is "
                        "set or the output is not a terminal)")
    parser.set_defaults(handler=run_command)
    return parser


def options_from_args(
    args: argparse.Namespace, environ: Mapping[str, str], dotenv: Mapping[str, str | None]
) -> LaunchOptions:
    """Resolve the flags: a flag beats the service's setting (variable, .env, default)."""
    try:
        central = CentralSettings()
        engine = CPEngineSettings(cp_id="CP-001")
        driver = DriverSettings(driver_id="driver-1")
        fleet = FleetSettings()
        load = LoadSettings()
        ocpp = OcppSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise LaunchError(f"invalid settings in the environment or .env: {problems}") from exc

    def pick(flag: Any, setting: Any) -> Any:
        return setting if flag is None else flag

    with_fleet = use_fleet(args.cps, args.fleet)
    if not with_fleet and args.cps > MAX_ENGINES:
        raise LaunchError(
            f"--no-fleet starts an engine and a monitor process per CP: at most {MAX_ENGINES} "
            f"CPs, not {args.cps} (without --no-fleet they run in one CP Fleet process)"
        )
    centrals: int = args.centrals
    if centrals > 1 and args.db == "sqlite":
        raise LaunchError(
            f"--centrals {centrals} shares one database: PostgreSQL, not SQLite (SPEC §9); "
            "drop --db sqlite (a local PostgreSQL is started) or set "
            "CENTRAL_DB_URL=postgresql://..."
        )
    http_port = pick(args.http_port, central.http_port)
    base_health_port = pick(args.base_health_port, engine.health_port)
    if (args.base_health_port is None and "health_port" not in engine.model_fields_set
            and http_port <= base_health_port < http_port + centrals):
        base_health_port = http_port + centrals  # the default 8001 is central-2's
    quiet: set[Role] = set()
    if with_fleet:  # at INFO, Central and the fleet log a line per CP and per session
        quiet |= {role for role, settings in ((Role.CENTRAL, central), (Role.FLEET, fleet))
                  if "log_level" not in settings.model_fields_set}
    return LaunchOptions(
        cps=args.cps,
        drivers=pick(args.drivers, 0 if with_fleet else 1),
        http_port=http_port,
        listen_port=pick(args.listen_port, central.listen_port),
        base_health_port=base_health_port,
        requests_file=pick(args.requests_file, driver.requests_file),
        db_path=pick(args.db_path, central.db_path),
        kafka=resolve_bootstrap(args.kafka_bootstrap, environ, dotenv),
        kafka_port=args.kafka_port,
        restart=args.restart,
        start_timeout=args.start_timeout,
        stop_timeout=args.stop_timeout,
        colour=args.color,
        fleet=with_fleet,
        sites=pick(args.sites, fleet.sites),
        fleet_port=pick(args.fleet_port, fleet.http_port),
        load=args.load,
        load_duration=pick(
            args.load_duration, load.duration if "duration" in load.model_fields_set else None
        ),
        quiet=frozenset(quiet),
        prometheus_port=args.prometheus_port if args.prometheus else None,
        ocpp_port=pick(args.ocpp_port, ocpp.ws_port) if args.ocpp else None,
        ocpp_http_port=pick(args.ocpp_http_port, ocpp.http_port),
        database=resolve_database(args.db or ("postgres" if centrals > 1 else None),
                                  environ, dotenv),
        postgres_port=args.postgres_port,
        centrals=centrals,
    )


def options_topic_prefixes() -> set[str]:
    """The topic prefixes of the run's Kafka services (environment, then .env)."""
    try:
        return {CentralSettings().topic_prefix, FleetSettings().topic_prefix,
                LoadSettings().topic_prefix, DriverSettings(driver_id="driver-1").topic_prefix,
                OcppSettings().topic_prefix,
                CPEngineSettings(cp_id="CP-001").topic_prefix}
    except ValidationError:  # reported by options_from_args already
        return set()


def option_warnings(args: argparse.Namespace, options: LaunchOptions) -> list[str]:
    """What the user asked for that will not do what they may expect."""
    warnings = []
    if (args.ocpp_port is not None or args.ocpp_http_port is not None) and not args.ocpp:
        warnings.append("--ocpp-port and --ocpp-http-port place the OCPP gateway; without "
                        "--ocpp none is started")
    if args.sites is not None and not options.fleet:
        warnings.append("--sites groups the CP Fleet's CPs; with engines (--no-fleet, or "
                        f"{FLEET_THRESHOLD} CPs or fewer) it is ignored")
    if options.drivers:
        try:
            wanted = load_requests(options.requests_file)
        except (OSError, ValueError):
            wanted = []  # the driver itself reports what is wrong with the file
        ids = options.ids
        if wanted and not set(ids).intersection(wanted):
            shown = ", ".join(ids[:2]) + (" …" if len(ids) > 2 else "")
            warnings.append(
                f"the requests file {options.requests_file} names none of this run's CPs "
                f"({shown or 'none'}): Central will deny those requests as 'unknown CP'"
                + (" (the fleet's ids have five digits)" if options.fleet else "")
            )
    return warnings


def _database_note(options: LaunchOptions, database: LocalDatabase | None) -> str:
    """The banner's database line: where Central's data is, without a password."""
    choice = options.database
    if choice.kind == "sqlite":
        return f"SQLite {options.db_path}"
    if database is None:
        return f"PostgreSQL {hide_password(choice.url or '')} (from {choice.origin})"
    how = ("started by the launcher" if database.server is not None
           else "running before this run, left running")
    log = f"; log {database.server.log_file}" if database.server is not None else ""
    return f"PostgreSQL {hide_password(database.url)} ({how}{log})"


def _start_database(
    console: Console, options: LaunchOptions, uses: list[PortUse]
) -> tuple[LocalDatabase | None, int, bool]:
    """Start the local PostgreSQL of --db postgres: (it, _, _), or (None, exit code,
    killed) when it could not start or a stop signal came first."""
    database: LocalDatabase | None = None

    def kill_half_started() -> None:
        console.warn("killing PostgreSQL now")
        if database is not None:
            database.kill()

    stop = StopRequest(kill_half_started)
    try:
        with stop.installed():
            database = prepare_database(options, {u.port for u in uses})
            start_database(console, database, options.start_timeout)
            if stop.requested:
                raise KeyboardInterrupt
    except LaunchError as exc:
        console.error(f"error: {exc}")
        return None, EXIT_USAGE, False
    except PostgresError as exc:
        console.error(f"could not start the local PostgreSQL: {exc}")
        console.error("(scripts/ensure_postgres.sh installs it; or name one with "
                      "CENTRAL_DB_URL=postgresql://...)")
        return None, EXIT_FAILED, False
    except KeyboardInterrupt:
        killed = stop.forced
        if database is not None and database.server is not None and database.server.running:
            killed = database.stop(console, hurry=killed) or killed
        console.warn("interrupted while starting PostgreSQL; Central was not started")
        return None, EXIT_KILLED if killed else EXIT_OK, killed
    return database, EXIT_OK, False


def _read_dotenv(path: Path = Path(".env")) -> dict[str, str | None]:
    return dict(dotenv_values(path)) if path.is_file() else {}


# --------------------------------------------------------------------------- the command


def run_command(args: argparse.Namespace) -> int:
    """``python -m evcharging run``: returns the exit code."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")
    console = Console(sys.stdout, use_colour(sys.stdout, os.environ, args.color))
    try:
        options = options_from_args(args, os.environ, _read_dotenv())
        plan = plan_ports(
            options.http_port, options.listen_port, options.base_health_port, options.cps,
            options.fleet_port if options.fleet and options.cps else None,
            tuple(metrics_port_uses(options) + ocpp_port_uses(options)),
            centrals=options.centrals,
        )
        if options.prometheus_port is not None:
            try:
                find_prometheus()
            except PrometheusNotFound as exc:
                raise LaunchError(f"--prometheus: {exc}") from exc
        problems = busy_ports(plan)
        if problems:
            raise LaunchError("; ".join(problems))
        if options.drivers and not options.requests_file.is_file():
            raise LaunchError(
                f"the requests file {options.requests_file} does not exist (--requests-file, "
                "DRIVER_REQUESTS_FILE; or --no-drivers)"
            )
    except LaunchError as exc:
        console.error(f"error: {exc}")
        return EXIT_USAGE
    for warning in option_warnings(args, options):
        console.warn(warning)
    names = [LAUNCHER, KAFKA, POSTGRES, *(spec.name for spec in child_specs(options, "x"))]
    console.width = prefix_width(names)
    route_logs(console)
    if os.environ.get("CENTRAL_API_TOKEN") and not os.environ.get("CP_MONITOR_API_TOKEN"):
        console.warn("CENTRAL_API_TOKEN is set but CP_MONITOR_API_TOKEN is not: the monitors "
                     "will be refused by Central")
    if (options.ocpp_port is not None and os.environ.get("CENTRAL_API_TOKEN")
            and not (os.environ.get("OCPP_API_TOKEN") or os.environ.get("EVCHARGING_API_TOKEN"))):
        console.warn("CENTRAL_API_TOKEN is set but OCPP_API_TOKEN (or EVCHARGING_API_TOKEN) "
                     "is not: Central will refuse the OCPP gateway's CPs")

    local: LocalBroker | None = None
    child_environ = dict(os.environ)
    # The topics the services name (their prefix, as .env or the environment says).
    topic_prefixes = sorted({"", *options_topic_prefixes()})
    if options.kafka is not None:
        bootstrap = options.kafka.bootstrap
        kafka_note = f"{bootstrap} (from {options.kafka.origin})"
        console.say(f"Kafka: using {kafka_note}")
        if args.sasl:
            child_environ.setdefault("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
        if not kafka_reachable(bootstrap):
            console.warn(f"nothing answers at {bootstrap} yet; the services will keep trying")
    else:

        def kill_half_started() -> None:
            console.warn("killing the Kafka broker now")
            if local is not None:
                local.broker.kill()

        stop = StopRequest(kill_half_started)
        try:
            with stop.installed():
                local = prepare_broker(console, options, {u.port for u in plan.uses()},
                                       sasl=args.sasl, topic_prefixes=topic_prefixes)
                start_broker(console, local)
                if stop.requested:
                    raise KeyboardInterrupt
        except LaunchError as exc:
            console.error(f"error: {exc}")
            return EXIT_USAGE
        except KafkaBrokerError as exc:
            console.error(f"could not start the local Kafka broker: {exc}")
            console.error(
                "(or use a running broker: --kafka-bootstrap HOST:PORT or KAFKA_BOOTSTRAP)"
            )
            return EXIT_FAILED
        except KeyboardInterrupt:
            killed = stop.forced
            if local is not None and local.broker.running:
                killed = local.stop(console, hurry=killed) or killed
            console.warn("interrupted while starting Kafka; nothing else was started")
            return EXIT_KILLED if killed else EXIT_OK
        bootstrap = local.broker.bootstrap
        kafka_note = f"{bootstrap} (started by the launcher; log {local.broker.log_file})"
        if local.broker.sasl:
            child_environ.update(sasl_child_env(local.broker.sasl_users))
            kafka_note += "; SASL SCRAM-SHA-512 and the ACLs of SPEC §11"
            console.say("Kafka: SASL and ACLs on; the services connect as central, cp and driver")
    code, killed = EXIT_FAILED, False
    database: LocalDatabase | None = None
    try:
        if options.database.start_local:
            database, code, killed = _start_database(console, options, plan.uses())
            if database is None:
                return code
        db_url = database.url if database is not None else None
        child_environ.update(central_db_env(options.database, db_url))
        db_note = _database_note(options, database)
        console.say(f"Central's database: {db_note}")
        supervisor = Supervisor(
            options, bootstrap, console, child_environ, kafka_note, local is not None,
            db_note=db_note, own_database=database is not None and database.server is not None,
        )
        code, killed = asyncio.run(supervise(supervisor))
    except KeyboardInterrupt:  # only in the instant before the handlers are installed
        code = EXIT_OK
    finally:
        # In start order reversed: Central (above), PostgreSQL, then the broker.
        if database is not None:
            killed = database.stop(console, hurry=killed) or killed
        if local is not None:
            killed = local.stop(console, hurry=killed) or killed
    if database is not None and database.server is not None:
        console.ok("PostgreSQL has stopped")
    if local is not None:
        console.ok("the Kafka broker has stopped")
    if killed:
        console.warn(f"stopped by force (exit code {EXIT_KILLED})")
        return EXIT_KILLED
    if code == EXIT_OK:
        console.ok("everything has stopped; bye")
    else:
        console.error(f"exit code {code}")
    return code
