"""What a run is, before anything starts: its options, ports, children and ids (pure)."""

from __future__ import annotations

import enum
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from evcharging.apps.ev_fleet.plan import cp_id as fleet_cp_id
from evcharging.devtools.process import port_free

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_KILLED = 130
"""What ``run`` returns (see the package's docstring)."""

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""What stops a run (Ctrl-C, ``kill``, a closed terminal); the second one forces the stop."""

BOOTSTRAP_VARIABLES = ("KAFKA_BOOTSTRAP", "CENTRAL_KAFKA_BOOTSTRAP")
"""Variables that name an existing broker (``KAFKA_BOOTSTRAP`` is the launcher's own)."""

DB_VARIABLE = "CENTRAL_DB_URL"
"""Central's database (SPEC §9); a ``postgresql://`` one here is used as it is."""
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
DB_KINDS = ("sqlite", "postgres")
"""``--db``: Central's SQLite file (the default), or PostgreSQL (a local one the launcher
starts and stops, unless CENTRAL_DB_URL names one)."""

MAX_CENTRALS = 9
"""Centrals of one run (--centrals; SPEC §9): ``central-1`` … on consecutive ports."""
INSTANCE_VARIABLE = "CENTRAL_INSTANCE_ID"
PEER_VARIABLE = "CENTRAL_PEER_URL"
"""What each Central of a run gets in its environment: its id (also its Kafka
``group_instance_id``) and the base URL the other Centrals reach its HTTP API at."""

MAX_ENGINES = 999
"""CPs with --no-fleet: one engine and one monitor process each, ids ``CP-001`` … ``CP-999``."""
MAX_CPS = 100_000
"""CPs in one CP Fleet (its own limit, ``FLEET_CPS``)."""
FLEET_THRESHOLD = 20
"""More CPs than this run in one CP Fleet process unless --no-fleet is given."""
MAX_DRIVERS = 999
DEFAULT_START_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 10.0
FLEET_STOP_EXTRA = 500
"""The CP Fleet gets one more second to stop per this many CPs (it stops them in batches;
10,000 take about 8 s on two cores)."""
FLEET_ID_PREFIX = "CP-"
LOAD_FOREVER = 365 * 24 * 3600.0
"""The load generator's --duration when the run's load has no end: until Ctrl-C."""


class LaunchError(Exception):
    """A problem with the flags or the machine that stops the launcher before it starts."""


class Role(enum.Enum):
    """The kinds of child, in start order; :data:`STOP_ORDER` is the reverse."""

    CENTRAL = ("central", "EV Central", "evcharging.apps.ev_central.main")
    OCPP = ("ocpp", "the OCPP gateway", "evcharging.apps.ev_ocpp.main")
    ENGINE = ("cp-e", "CP engines", "evcharging.apps.ev_cp_e.main")
    MONITOR = ("cp-m", "CP monitors", "evcharging.apps.ev_cp_m.main")
    FLEET = ("cp-fleet", "the CP Fleet", "evcharging.apps.ev_fleet.main")
    DRIVER = ("driver", "drivers", "evcharging.apps.ev_driver.main")
    LOAD = ("load", "the driver load", "evcharging.apps.ev_load.main")
    PROMETHEUS = ("prometheus", "Prometheus", "evcharging.devtools.prometheus")

    def __init__(self, short: str, plural: str, module: str) -> None:
        self.short = short
        self.plural = plural
        self.module = module


STOP_ORDER = (Role.PROMETHEUS, Role.LOAD, Role.DRIVER, Role.MONITOR, Role.ENGINE, Role.FLEET,
              Role.OCPP, Role.CENTRAL)

DEFAULT_PROMETHEUS_PORT = 9090
METRICS_BASE_PORT = 9100
"""With --prometheus, the load generator's ``/metrics`` port; CP-00i's monitor's is this
plus i (the other services serve ``/metrics`` on their HTTP port)."""
PROMETHEUS_INTERVAL = 2.0


@dataclass(frozen=True)
class KafkaChoice:
    """An existing broker the user named, and where it was named."""

    bootstrap: str
    origin: str


@dataclass(frozen=True)
class DatabaseChoice:
    """Central's database: ``sqlite`` (the --db-path file) or ``postgres``; ``url`` is an
    existing PostgreSQL (from ``origin``), None for SQLite or a PostgreSQL to start."""

    kind: str = "sqlite"
    url: str | None = None
    origin: str = "the default"

    @property
    def start_local(self) -> bool:
        """Whether the launcher starts (and stops) a local PostgreSQL for Central."""
        return self.kind == "postgres" and self.url is None


def resolve_database(
    flag: str | None, environ: Mapping[str, str], dotenv: Mapping[str, str | None]
) -> DatabaseChoice:
    """``--db`` against CENTRAL_DB_URL (environment, then .env): a ``postgresql://`` URL is
    used as it is (nothing started) unless ``--db sqlite``; ``--db postgres`` without one
    starts a local PostgreSQL; else SQLite."""
    if flag is not None and flag not in DB_KINDS:
        raise LaunchError(f"--db must be one of {', '.join(DB_KINDS)}, not {flag!r}")
    for where, values in (("environment", environ), (".env", dotenv)):
        value = (values.get(DB_VARIABLE) or "").strip()
        if value.startswith(POSTGRES_SCHEMES) and flag != "sqlite":
            return DatabaseChoice("postgres", value, f"{DB_VARIABLE} in the {where}")
        if value:
            break
    if flag == "postgres":
        return DatabaseChoice("postgres", None, "--db postgres")
    return DatabaseChoice("sqlite", None, "--db sqlite" if flag else "the default")


def hide_password(url: str) -> str:
    """A database URL without its password (banner, logs)."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def central_db_env(choice: DatabaseChoice, url: str | None) -> dict[str, str]:
    """What Central's environment gets for the run's database: CENTRAL_DB_URL of PostgreSQL
    (`url`: the local server's when the launcher started one); for SQLite an empty
    CENTRAL_DB_URL, so that one in .env gives way to --db-path."""
    if choice.kind == "sqlite":
        return {DB_VARIABLE: ""} if choice.origin == "--db sqlite" else {}
    found = choice.url or url
    if not found:
        raise LaunchError("no PostgreSQL URL for Central (the local server did not start)")
    return {DB_VARIABLE: found}


@dataclass(frozen=True)
class CentralInstance:
    """One Central of a run: ``central-i`` on the i-th HTTP and TCP port."""

    index: int
    """1 for the first."""
    http_port: int
    listen_port: int
    alone: bool = True
    """The run's only Central: its launcher name stays ``central``."""

    @property
    def instance_id(self) -> str:
        return f"central-{self.index}"

    @property
    def name(self) -> str:
        """The prefix of its lines (``central`` when it is the only one)."""
        return "central" if self.alone else self.instance_id

    @property
    def url(self) -> str:
        """Its dashboard, as the banner shows it."""
        return f"http://localhost:{self.http_port}/"

    @property
    def peer_url(self) -> str:
        """Where the other Centrals reach its HTTP API (CENTRAL_PEER_URL)."""
        return f"http://127.0.0.1:{self.http_port}"

    def env(self) -> tuple[tuple[str, str], ...]:
        return ((INSTANCE_VARIABLE, self.instance_id), (PEER_VARIABLE, self.peer_url))


def central_instances(http: int, listen: int, count: int = 1) -> list[CentralInstance]:
    """``central-1`` … ``central-<count>``: HTTP ports ``http``, ``http+1``, …, TCP ports
    ``listen``, ``listen+1``, …"""
    return [CentralInstance(i, http + i - 1, listen + i - 1, alone=count == 1)
            for i in range(1, count + 1)]


@dataclass(frozen=True)
class PortUse:
    port: int
    what: str
    flag: str


@dataclass(frozen=True)
class PortPlan:
    """Every port the children will listen on."""

    http: int
    listen: int
    health: tuple[int, ...]
    fleet: int | None = None
    """The CP Fleet's HTTP port (fleet mode only)."""
    extra: tuple[PortUse, ...] = ()
    centrals: int = 1
    """Centrals: ``central-i`` listens on ``http+i-1`` and ``listen+i-1``."""

    def uses(self) -> list[PortUse]:
        uses: list[PortUse] = []
        for central in central_instances(self.http, self.listen, self.centrals):
            whose = "Central's" if central.alone else f"{central.instance_id}'s"
            uses += [
                PortUse(central.http_port, f"{whose} dashboard and HTTP API", "--http-port"),
                PortUse(central.listen_port, f"{whose} TCP control plane", "--listen-port"),
            ]
        if self.fleet is not None:
            uses.append(PortUse(self.fleet, "the CP Fleet's HTTP port", "--fleet-port"))
        uses += [
            PortUse(port, f"the /health endpoint of {cp_id}", "--base-health-port")
            for cp_id, port in zip(cp_ids(len(self.health)), self.health, strict=True)
        ]
        return uses + list(self.extra)


@dataclass(frozen=True)
class LaunchOptions:
    """What ``run`` was asked to do, with every default resolved."""

    cps: int = 2
    drivers: int = 1
    http_port: int = 8000
    listen_port: int = 9999
    base_health_port: int = 8001
    requests_file: Path = Path("requests.txt")
    db_path: Path = Path("ev_charging.db")
    kafka: KafkaChoice | None = None
    kafka_port: int | None = None
    """Port of the local broker; None: 9092 when free, else any free port."""
    restart: bool = False
    start_timeout: float = DEFAULT_START_TIMEOUT
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    colour: str = "auto"
    fleet: bool = False
    """One CP Fleet process runs the CPs (``CP-00001`` …) instead of an engine and a
    monitor per CP (``CP-001`` …)."""
    sites: int = 1
    """Sites of the fleet's CPs."""
    fleet_port: int = 8100
    load: float | None = None
    """Driver arrivals per second of the load generator; None: no load generator."""
    load_duration: float | None = None
    """Seconds of load; None: until the run stops."""
    quiet: frozenset[Role] = frozenset()
    """Children started with ``--log-level WARNING`` (in fleet mode, where INFO is a line
    per CP and per session, unless their ``*_LOG_LEVEL`` is set)."""
    prometheus_port: int | None = None
    """A local Prometheus on this port scrapes every service (--prometheus); None: none."""
    ocpp_port: int | None = None
    """With --ocpp, the OCPP gateway's WebSocket port (chargers connect there); None: no
    gateway."""
    ocpp_http_port: int = 9001
    """The gateway's ``/health`` and ``/metrics`` (with --ocpp)."""
    database: DatabaseChoice = DatabaseChoice()
    """Central's database (--db, CENTRAL_DB_URL)."""
    postgres_port: int | None = None
    """Port of the local PostgreSQL (--db postgres); None: 55432, 0: any free port."""
    centrals: int = 1
    """Centrals sharing the CPs (--centrals; more than one: on PostgreSQL, SPEC §9)."""

    @property
    def central_instances(self) -> list[CentralInstance]:
        """The run's Centrals, ``central-1`` first."""
        return central_instances(self.http_port, self.listen_port, self.centrals)

    @property
    def central_hosts(self) -> str:
        """``--central-host`` of a client: ``localhost`` (with ``--central-port``, the
        first Central's), or every Central's ``localhost:PORT`` (SPEC §9: any door)."""
        if self.centrals == 1:
            return "localhost"
        return ",".join(f"localhost:{c.http_port}" for c in self.central_instances)

    @property
    def central_urls(self) -> str:
        """``--central-url`` of the load generator: every Central's base URL."""
        return ",".join(f"http://localhost:{c.http_port}" for c in self.central_instances)

    @property
    def ocpp_url(self) -> str | None:
        """The URL a charger connects to (with --ocpp), its id at the end."""
        if self.ocpp_port is None:
            return None
        return f"ws://127.0.0.1:{self.ocpp_port}/ocpp/<charger-id>"

    @property
    def fleet_stop_timeout(self) -> float:
        """The CP Fleet's stop timeout: one more second per :data:`FLEET_STOP_EXTRA` CPs."""
        return self.stop_timeout + self.cps / FLEET_STOP_EXTRA

    @property
    def ids(self) -> list[str]:
        """The ids of this run's CPs."""
        return fleet_ids(self.cps) if self.fleet else cp_ids(self.cps)


@dataclass(frozen=True)
class ChildSpec:
    """One child process: its display name, role and command-line flags."""

    name: str
    role: Role
    args: tuple[str, ...]
    cp_id: str | None = None
    module_override: str | None = None
    """Run this module instead of the role's (tests use it)."""
    env: tuple[tuple[str, str], ...] = ()
    """Variables of its own, over the run's environment (a Central's instance id)."""

    @property
    def module(self) -> str:
        return self.module_override or self.role.module

    def argv(self, python: str) -> list[str]:
        return [python, "-m", self.module, *self.args]


def cp_ids(count: int) -> list[str]:
    """``CP-001`` … ``CP-<count>``: the ids of the engines."""
    return [f"CP-{i:03d}" for i in range(1, count + 1)]


def fleet_ids(count: int) -> list[str]:
    """``CP-00001`` … : the ids of a fleet's CPs (as the fleet names them)."""
    return [fleet_cp_id(FLEET_ID_PREFIX, i) for i in range(1, count + 1)]


def use_fleet(cps: int, choice: bool | None) -> bool:
    """Whether a run of `cps` CPs uses the CP Fleet: ``--fleet`` / ``--no-fleet`` when given
    (`choice`), else above :data:`FLEET_THRESHOLD` CPs."""
    return cps > FLEET_THRESHOLD if choice is None else choice


def driver_ids(count: int) -> list[str]:
    """``driver-1`` … ``driver-<count>``."""
    return [f"driver-{i}" for i in range(1, count + 1)]


def plan_ports(
    http: int, listen: int, base_health: int, cps: int, fleet_port: int | None = None,
    extra: tuple[PortUse, ...] = (), centrals: int = 1,
) -> PortPlan:
    """The ports of a run (with `fleet_port`, the CPs are a fleet's and need no health
    ports of their own; `extra`: more, e.g. :func:`metrics_port_uses`; `centrals`: Centrals
    on consecutive ports from `http` and `listen`); LaunchError when one is out of range or
    two collide."""
    health = () if fleet_port is not None else tuple(range(base_health, base_health + cps))
    plan = PortPlan(http, listen, health, fleet_port, extra, centrals)
    for use in plan.uses():
        if not 1 <= use.port <= 65535:
            raise LaunchError(
                f"port {use.port} ({use.what}) is not a valid TCP port; change {use.flag}"
            )
    seen: dict[int, PortUse] = {}
    for use in plan.uses():
        other = seen.setdefault(use.port, use)
        if other is not use:
            raise LaunchError(
                f"port {use.port} would serve both {other.what} and {use.what}; "
                f"change {use.flag if use.flag != other.flag else other.flag}"
                + (f" or {other.flag}" if use.flag != other.flag else "")
            )
    return plan


def busy_ports(plan: PortPlan, is_free: Callable[[int], bool] = port_free) -> list[str]:
    """One message per port of the plan that is already taken."""
    return [
        f"port {use.port} ({use.what}) is already in use; choose another with {use.flag}"
        for use in plan.uses()
        if not is_free(use.port)
    ]


def resolve_bootstrap(
    flag: str | None, environ: Mapping[str, str], dotenv: Mapping[str, str | None]
) -> KafkaChoice | None:
    """The broker the user named: the flag, else the variables (environment, then .env)."""
    if flag and flag.strip():
        return KafkaChoice(flag.strip(), "--kafka-bootstrap")
    for where, values in (("environment", environ), (".env", dotenv)):
        for name in BOOTSTRAP_VARIABLES:
            value = (values.get(name) or "").strip()
            if value:
                return KafkaChoice(value, f"{name} in the {where}")
    return None


def child_specs(options: LaunchOptions, bootstrap: str) -> list[ChildSpec]:
    """Every child of a run, in start order, with the seed flags of SPEC §1; each Central
    gets its instance id and peer URL (SPEC §9) in its environment, and every client of
    Central's API every Central's address."""
    http = str(options.http_port)
    hosts = options.central_hosts

    def quiet(role: Role) -> tuple[str, ...]:
        return ("--log-level", "WARNING") if role in options.quiet else ()

    specs = [
        ChildSpec(
            central.name,
            Role.CENTRAL,
            ("--kafka-bootstrap", bootstrap, "--http-port", str(central.http_port),
             "--listen-port", str(central.listen_port), "--db-path", str(options.db_path),
             *quiet(Role.CENTRAL)),
            env=central.env(),
        )
        for central in options.central_instances
    ]
    if options.ocpp_port is not None:
        specs.append(ChildSpec(
            "ocpp", Role.OCPP,
            ("--kafka-bootstrap", bootstrap, "--ws-port", str(options.ocpp_port),
             "--central-host", hosts, "--central-port", http,
             "--http-port", str(options.ocpp_http_port), *quiet(Role.OCPP)),
        ))
    if options.fleet and options.cps:
        specs.append(ChildSpec(
            "cp-fleet", Role.FLEET,
            ("--kafka-bootstrap", bootstrap, "--cps", str(options.cps),
             "--id-prefix", FLEET_ID_PREFIX, "--http-port", str(options.fleet_port),
             "--central-host", hosts, "--central-port", http,
             "--sites", str(options.sites), *quiet(Role.FLEET)),
        ))
    elif not options.fleet:
        for offset, cp_id in enumerate(cp_ids(options.cps)):
            health = str(options.base_health_port + offset)
            specs.append(ChildSpec(
                f"cp-e {cp_id}", Role.ENGINE,
                ("--kafka-bootstrap", bootstrap, "--cp-id", cp_id, "--health-port", health),
                cp_id,
            ))
            metrics = (("--metrics-port", str(METRICS_BASE_PORT + offset + 1))
                       if options.prometheus_port else ())
            specs.append(ChildSpec(
                f"cp-m {cp_id}", Role.MONITOR,
                ("--cp-id", cp_id, "--cp-e-host", "localhost", "--cp-e-port", health,
                 "--central-host", hosts, "--central-port", http, *metrics),
                cp_id,
            ))
    specs += [
        ChildSpec(
            driver_id, Role.DRIVER,
            ("--driver-id", driver_id, "--kafka-bootstrap", bootstrap,
             "--requests-file", str(options.requests_file)),
        )
        for driver_id in driver_ids(options.drivers)
    ]
    if options.load is not None:
        specs.append(ChildSpec("load", Role.LOAD, load_args(options, bootstrap)))
    if options.prometheus_port is not None:
        targets = [f"--target={job}=127.0.0.1:{port}" for job, port in metrics_targets(options)]
        specs.append(ChildSpec(
            "prometheus", Role.PROMETHEUS,
            ("--port", str(options.prometheus_port), "--interval", f"{PROMETHEUS_INTERVAL:g}",
             *targets),
        ))
    return specs


def metrics_targets(options: LaunchOptions) -> list[tuple[str, int]]:
    """(job, port) of every ``/metrics`` of a run (a monitor's and the load's only with
    --prometheus: they have no other HTTP port)."""
    targets = [("central", central.http_port) for central in options.central_instances]
    if options.ocpp_port is not None:
        targets.append(("ocpp", options.ocpp_http_port))
    if options.fleet and options.cps:
        targets.append(("cp-fleet", options.fleet_port))
    elif not options.fleet:
        targets += [("cp-engine", options.base_health_port + i) for i in range(options.cps)]
        if options.prometheus_port:
            targets += [("cp-monitor", METRICS_BASE_PORT + i + 1) for i in range(options.cps)]
    if options.load is not None and options.prometheus_port:
        targets.append(("load", METRICS_BASE_PORT))
    return targets


def metrics_port_uses(options: LaunchOptions) -> list[PortUse]:
    """The ports --prometheus adds to a run: Prometheus's, the monitors' and the load's."""
    if options.prometheus_port is None:
        return []
    uses = [PortUse(options.prometheus_port, "Prometheus", "--prometheus-port")]
    uses += [PortUse(port, f"the /metrics of {job}", "--prometheus (ports from "
                     f"{METRICS_BASE_PORT})")
             for job, port in metrics_targets(options) if job in ("cp-monitor", "load")]
    return uses


def ocpp_port_uses(options: LaunchOptions) -> list[PortUse]:
    """The ports --ocpp adds to a run: the gateway's WebSocket and HTTP ports."""
    if options.ocpp_port is None:
        return []
    return [PortUse(options.ocpp_port, "the OCPP gateway's WebSocket port", "--ocpp-port"),
            PortUse(options.ocpp_http_port, "the OCPP gateway's /health and /metrics",
                    "--ocpp-http-port")]


def load_args(options: LaunchOptions, bootstrap: str) -> tuple[str, ...]:
    """The load generator's flags: this run's broker, Central and CPs (only those, so a
    database that remembers the CPs of another run does not draw requests to them)."""
    assert options.load is not None
    duration = options.load_duration if options.load_duration is not None else LOAD_FOREVER
    args = ["--kafka-bootstrap", bootstrap, "--rate", f"{options.load:g}",
            "--duration", f"{duration:.10g}",
            "--central-url", options.central_urls]
    if options.cps and options.fleet:  # a count: CP-00001 … as the fleet names them
        args += ["--cps", str(options.cps), "--cp-prefix", FLEET_ID_PREFIX]
    elif options.cps:
        args += ["--cps", ",".join(cp_ids(options.cps))]
    if Role.LOAD in options.quiet:
        args += ["--log-level", "WARNING"]
    if options.prometheus_port is not None:
        args += ["--metrics-port", str(METRICS_BASE_PORT)]
    return tuple(args)


def child_env(environ: Mapping[str, str], colour: bool = False) -> dict[str, str]:
    """The children's environment: the launcher's, with unbuffered Python output.

    With `colour`, the children colour their log lines although they write to a pipe.
    """
    env = dict(environ)
    env["PYTHONUNBUFFERED"] = "1"
    if colour:
        env.setdefault("FORCE_COLOR", "1")
    return env
