"""What a run is, before anything starts: its options, ports, children and ids (pure)."""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

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

MAX_CPS = 999
MAX_DRIVERS = 999
DEFAULT_START_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 10.0


class LaunchError(Exception):
    """A problem with the flags or the machine that stops the launcher before it starts."""


class Role(enum.Enum):
    """The kinds of child, in start order; :data:`STOP_ORDER` is the reverse."""

    CENTRAL = ("central", "EV Central", "evcharging.apps.ev_central.main")
    ENGINE = ("cp-e", "CP engines", "evcharging.apps.ev_cp_e.main")
    MONITOR = ("cp-m", "CP monitors", "evcharging.apps.ev_cp_m.main")
    DRIVER = ("driver", "drivers", "evcharging.apps.ev_driver.main")

    def __init__(self, short: str, plural: str, module: str) -> None:
        self.short = short
        self.plural = plural
        self.module = module


STOP_ORDER = (Role.DRIVER, Role.MONITOR, Role.ENGINE, Role.CENTRAL)


@dataclass(frozen=True)
class KafkaChoice:
    """An existing broker the user named, and where it was named."""

    bootstrap: str
    origin: str


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

    def uses(self) -> list[PortUse]:
        uses = [
            PortUse(self.http, "Central's dashboard and HTTP API", "--http-port"),
            PortUse(self.listen, "Central's TCP control plane", "--listen-port"),
        ]
        uses += [
            PortUse(port, f"the /health endpoint of {cp_id}", "--base-health-port")
            for cp_id, port in zip(cp_ids(len(self.health)), self.health, strict=True)
        ]
        return uses


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


@dataclass(frozen=True)
class ChildSpec:
    """One child process: its display name, role and command-line flags."""

    name: str
    role: Role
    args: tuple[str, ...]
    cp_id: str | None = None
    module_override: str | None = None
    """Run this module instead of the role's (tests use it)."""

    @property
    def module(self) -> str:
        return self.module_override or self.role.module

    def argv(self, python: str) -> list[str]:
        return [python, "-m", self.module, *self.args]


def cp_ids(count: int) -> list[str]:
    """``CP-001`` … ``CP-<count>``."""
    return [f"CP-{i:03d}" for i in range(1, count + 1)]


def driver_ids(count: int) -> list[str]:
    """``driver-1`` … ``driver-<count>``."""
    return [f"driver-{i}" for i in range(1, count + 1)]


def plan_ports(http: int, listen: int, base_health: int, cps: int) -> PortPlan:
    """The ports of a run; LaunchError when one is out of range or two collide."""
    plan = PortPlan(http, listen, tuple(range(base_health, base_health + cps)))
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
    """Every child of a run, in start order, with the seed flags of SPEC §1."""
    http = str(options.http_port)
    specs = [
        ChildSpec(
            "central",
            Role.CENTRAL,
            ("--kafka-bootstrap", bootstrap, "--http-port", http,
             "--listen-port", str(options.listen_port), "--db-path", str(options.db_path)),
        )
    ]
    for offset, cp_id in enumerate(cp_ids(options.cps)):
        health = str(options.base_health_port + offset)
        specs.append(ChildSpec(
            f"cp-e {cp_id}", Role.ENGINE,
            ("--kafka-bootstrap", bootstrap, "--cp-id", cp_id, "--health-port", health),
            cp_id,
        ))
        specs.append(ChildSpec(
            f"cp-m {cp_id}", Role.MONITOR,
            ("--cp-id", cp_id, "--cp-e-host", "localhost", "--cp-e-port", health,
             "--central-host", "localhost", "--central-port", http),
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
    return specs


def child_env(environ: Mapping[str, str], colour: bool = False) -> dict[str, str]:
    """The children's environment: the launcher's, with unbuffered Python output.

    With `colour`, the children colour their log lines although they write to a pipe.
    """
    env = dict(environ)
    env["PYTHONUNBUFFERED"] = "1"
    if colour:
        env.setdefault("FORCE_COLOR", "1")
    return env
