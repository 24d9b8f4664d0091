"""The local launcher: ``python -m evcharging run`` (what ``make run`` calls).

It starts the whole network on one machine, with every process's output in one terminal:

1. **Kafka.** The broker named by ``--kafka-bootstrap``, else by ``KAFKA_BOOTSTRAP`` or
   ``CENTRAL_KAFKA_BOOTSTRAP`` (process environment first, then ``.env``). When none is
   named, a local broker is started with :class:`~evcharging.devtools.kafka_broker.KafkaBroker`
   (on 9092 when free, else on a free port) and stopped at the end. It lives where the
   broker CLI keeps the broker of that port, ``.cache/kafka/run/PORT`` (so ``make
   broker-status`` sees it); on a fixed port its data survives between runs, like Central's
   database, and a broker on a port picked at random keeps none.
2. **EV Central**, then wait until ``GET /health`` answers 200.
3. **N charging points**: the engines ``CP-001`` … (health ports ``base``, ``base+1``, …);
   each engine's monitor starts as soon as Central shows that CP ACTIVATED, so that a monitor
   never sees its engine still starting (no false "health check failed" at start-up). The
   launcher waits until Central shows every CP ACTIVATED.
4. **M drivers** ``driver-1`` … over the same requests file.

Every child runs as ``sys.executable -m <module>`` with the seed flags of SPEC §1, in the
launcher's session but in a process group of its own, so that Ctrl-C in the terminal reaches
the launcher only and the launcher stops the children in order: drivers, monitors, engines,
Central (SIGTERM, up to ``--stop-timeout`` s, then SIGKILL), then the broker it started. A
second Ctrl-C kills what is left at once, the broker included. On Linux each child also asks
the kernel for SIGTERM when the launcher dies (``PR_SET_PDEATHSIG``), so a SIGKILLed launcher
leaves nothing behind.

Each child's output (stdout and stderr merged) is relayed line by line, by one reader task
per child, behind a fixed-width name (``central     | …``, ``cp-e CP-001 | …``). A child that
dies is reported with its exit code and last lines; ``--restart`` restarts it with exponential
backoff (1 s doubling to 30 s; back to 1 s after a run of a minute or more). A driver that
exits 0 has finished its requests file; it is reported, not restarted.

Settings other than the flags reach the children through the environment (and their own
``.env``) as usual. The defaults of ``--http-port``, ``--listen-port``, ``--db-path``,
``--base-health-port`` and ``--requests-file`` are the services' own settings
(``CENTRAL_HTTP_PORT`` …), so a port moved in ``.env`` moves for ``make run`` too.

Exit codes: 0 after a stop by Ctrl-C/SIGTERM (or when every process ended cleanly by itself),
1 when the system could not start or every process ended and one of them failed, 2 for bad
flags, a busy port or a missing requests file, 130 when a second Ctrl-C had to kill processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import enum
import io
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import httpx
from dotenv import dotenv_values
from pydantic import ValidationError

from evcharging.common.config import CentralSettings, CPEngineSettings, DriverSettings
from evcharging.devtools.kafka_broker import (
    DEFAULT_PORT as KAFKA_DEFAULT_PORT,
)
from evcharging.devtools.kafka_broker import (
    KafkaBroker,
    KafkaBrokerError,
    free_port,
    jars_ready,
    libs_dir,
    run_dir,
)

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = [
    "BOOTSTRAP_VARIABLES",
    "ChildSpec",
    "KafkaChoice",
    "LaunchError",
    "LaunchOptions",
    "PortPlan",
    "PortUse",
    "Role",
    "add_parser",
    "busy_ports",
    "child_env",
    "child_specs",
    "cp_ids",
    "describe_exit",
    "driver_ids",
    "format_line",
    "next_delay",
    "options_from_args",
    "plan_ports",
    "port_free",
    "prefix_width",
    "resolve_bootstrap",
    "run_command",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_KILLED = 130

BOOTSTRAP_VARIABLES = ("KAFKA_BOOTSTRAP", "CENTRAL_KAFKA_BOOTSTRAP")
"""Variables that name an existing broker (``KAFKA_BOOTSTRAP`` is the launcher's own)."""

MAX_CPS = 999
MAX_DRIVERS = 999
DEFAULT_START_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 10.0
RESTART_FIRST_DELAY = 1.0
RESTART_MAX_DELAY = 30.0
STABLE_RUN = 60.0
"""A child that ran this long before dying is restarted after the first delay again."""
TAIL_LINES = 12
LINE_LIMIT = 1024 * 1024
READER_DRAIN = 2.0
POLL_INTERVAL = 0.25
LAUNCHER = "launcher"
KAFKA = "kafka"

_PR_SET_PDEATHSIG = 1

STOP_SIGNAL = signal.SIGTERM
"""What a child gets first. Every service treats SIGTERM exactly like SIGINT (a graceful
stop, see ``evcharging.common.service``), but a child that is still importing when the stop
comes simply ends on SIGTERM, where SIGINT would print a KeyboardInterrupt traceback."""


class LaunchError(Exception):
    """A problem with the flags or the machine that stops the launcher before it starts."""


class StartupError(Exception):
    """The system did not come up (a child died while starting, or a wait timed out)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while the system was starting."""


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


# --------------------------------------------------------------------------- pure parts


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


def port_free(port: int, host: str = "0.0.0.0") -> bool:
    """Whether a server could listen on ``port`` now (with SO_REUSEADDR, as servers do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


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


def next_delay(delay: float) -> float:
    """The restart delay after ``delay``: doubled, at most :data:`RESTART_MAX_DELAY`."""
    return min(delay * 2, RESTART_MAX_DELAY)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def prefix_width(names: Iterable[str]) -> int:
    return max((len(name) for name in names), default=0)


RESET = "\033[0m"
BOLD = "\033[1m"
DIM = "\033[2m"
RED = "\033[1;31m"
GREEN = "\033[32m"
YELLOW = "\033[33m"
ROLE_COLOURS = {
    Role.CENTRAL: "\033[1;35m",
    Role.ENGINE: "\033[36m",
    Role.MONITOR: "\033[32m",
    Role.DRIVER: "\033[34m",
}


def format_line(
    name: str, text: str, width: int, colour: str | None = None, text_colour: str | None = None
) -> str:
    """``name`` padded to ``width``, a bar, and the text; ANSI colours when given."""
    label = f"{name:<{width}} |"
    if colour:
        label = f"{colour}{label}{RESET}"
    if text and text_colour:
        text = f"{text_colour}{text}{RESET}"
    return f"{label} {text}" if text else label


# --------------------------------------------------------------------------- command line


def _count(limit: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not 0 <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be between 0 and {limit}, not {value}")
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
            "is configured), EV Central, N charging points (engine + monitor each) and M "
            "drivers, with every process's output in this terminal. Ctrl-C stops everything "
            "in order (drivers, monitors, engines, Central, broker); a second Ctrl-C kills."
        ),
        epilog=(
            "Other settings (e.g. CP_ENGINE_SESSION_SECONDS, CENTRAL_API_TOKEN) reach the "
            "services through the environment or .env, as usual; see .env.example. "
            "Examples: make run CPS=3 DRIVERS=2; make run ARGS='--restart --http-port 8080'"
        ),
    )
    parser.add_argument("--cps", type=_count(MAX_CPS), default=2, metavar="N",
                        help="charging points CP-001..CP-N, engine + monitor each (default: 2)")
    # Not exclusive: the last one given wins, so `make run ARGS=--no-drivers` works although
    # the Makefile passes --drivers first.
    parser.add_argument("--drivers", type=_count(MAX_DRIVERS), default=None, metavar="M",
                        help="drivers driver-1..driver-M over the requests file (default: 1)")
    parser.add_argument("--no-drivers", dest="drivers", action="store_const", const=0,
                        help="start no driver (same as --drivers 0)")
    parser.add_argument(
        "--kafka-bootstrap", metavar="HOST:PORT", default=None,
        help="use this broker (default: $KAFKA_BOOTSTRAP or $CENTRAL_KAFKA_BOOTSTRAP, also "
        "from .env; when none is set, a local broker is started and stopped with the system)",
    )
    parser.add_argument(
        "--kafka-port", type=_kafka_port, default=None, metavar="PORT",
        help=f"port of the local broker, 0 for any free one (default: {KAFKA_DEFAULT_PORT} "
        "when free, else any free port)",
    )
    parser.add_argument("--http-port", type=_port, default=None, metavar="PORT",
                        help="Central's dashboard and HTTP API (default: $CENTRAL_HTTP_PORT "
                        "or 8000)")
    parser.add_argument("--listen-port", type=_port, default=None, metavar="PORT",
                        help="Central's TCP control plane (default: $CENTRAL_LISTEN_PORT "
                        "or 9999)")
    parser.add_argument("--base-health-port", type=_port, default=None, metavar="PORT",
                        help="health port of CP-001; CP-00i gets PORT+i-1 (default: "
                        "$CP_ENGINE_HEALTH_PORT or 8001)")
    parser.add_argument("--requests-file", type=Path, default=None, metavar="FILE",
                        help="the drivers' requests file (default: $DRIVER_REQUESTS_FILE or "
                        "requests.txt)")
    parser.add_argument("--db-path", type=Path, default=None, metavar="FILE",
                        help="Central's SQLite file (default: $CENTRAL_DB_PATH or "
                        "ev_charging.db)")
    parser.add_argument("--restart", action="store_true",
                        help="restart a process that dies (backoff 1 s doubling to 30 s)")
    parser.add_argument("--start-timeout", type=_seconds, default=DEFAULT_START_TIMEOUT,
                        metavar="S", help="seconds to wait for Central, then for the CPs "
                        "(default: %(default)g)")
    parser.add_argument("--stop-timeout", type=_seconds, default=DEFAULT_STOP_TIMEOUT,
                        metavar="S", help="seconds each process gets to stop before SIGKILL "
                        "(default: %(default)g)")
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
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise LaunchError(f"invalid settings in the environment or .env: {problems}") from exc

    def pick(flag: Any, setting: Any) -> Any:
        return setting if flag is None else flag

    return LaunchOptions(
        cps=args.cps,
        drivers=1 if args.drivers is None else args.drivers,
        http_port=pick(args.http_port, central.http_port),
        listen_port=pick(args.listen_port, central.listen_port),
        base_health_port=pick(args.base_health_port, engine.health_port),
        requests_file=pick(args.requests_file, driver.requests_file),
        db_path=pick(args.db_path, central.db_path),
        kafka=resolve_bootstrap(args.kafka_bootstrap, environ, dotenv),
        kafka_port=args.kafka_port,
        restart=args.restart,
        start_timeout=args.start_timeout,
        stop_timeout=args.stop_timeout,
        colour=args.color,
    )


def _read_dotenv(path: Path = Path(".env")) -> dict[str, str | None]:
    return dict(dotenv_values(path)) if path.is_file() else {}


def _use_colour(stream: TextIO, environ: Mapping[str, str], choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    if environ.get("NO_COLOR"):
        return False
    if environ.get("FORCE_COLOR"):
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------- output


class Console:
    """The launcher's output: one write per line, so lines never interleave."""

    def __init__(self, stream: TextIO, colour: bool, width: int = len(LAUNCHER)) -> None:
        self.stream = stream
        self.colour = colour
        self.width = width

    def line(self, name: str, text: str, colour: str | None, text_colour: str | None = None
             ) -> None:
        out = format_line(
            name, text, self.width,
            colour if self.colour else None, text_colour if self.colour else None,
        )
        with contextlib.suppress(OSError, ValueError):  # a closed pipe must not stop a shutdown
            self.stream.write(out + "\n")
            self.stream.flush()

    def say(self, text: str, text_colour: str | None = None) -> None:
        self.line(LAUNCHER, text, BOLD, text_colour)

    def ok(self, text: str) -> None:
        self.say(text, GREEN)

    def warn(self, text: str) -> None:
        self.say(text, YELLOW)

    def error(self, text: str) -> None:
        self.say(text, RED)


class _ConsoleLogHandler(logging.Handler):
    """The broker module's log records, as ``kafka | ...`` lines."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        colour = YELLOW if record.levelno >= logging.WARNING else None
        for part in text.splitlines() or [""]:
            self.console.line(KAFKA, part, YELLOW, colour)


# --------------------------------------------------------------------------- processes


class _DieWithParent:
    """``preexec_fn``: the kernel sends the child SIGTERM when the launcher dies (Linux).

    Without it a SIGKILLed launcher would leave its children running. If the launcher died
    between fork and prctl, the child exits at once instead.
    """

    def __init__(self) -> None:
        self._parent = os.getpid()
        self._prctl: Callable[..., int] | None = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                self._prctl = libc.prctl  # looked up now: no dlopen between fork and exec

    def __call__(self) -> None:
        if self._prctl is not None:
            self._prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != self._parent:
            os._exit(1)


class Child:
    """One supervised child: its current process, its last lines and its supervisor task."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.process: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.runs = 0
        self.last_code: int | None = None
        self.stop_requested = False
        self.failed = False
        self.killed = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def ended(self) -> bool:
        """Whether its supervisor gave up (exited for good, not restarting)."""
        return self.task is not None and self.task.done()

    def send(self, sig: signal.Signals) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    def kill(self) -> None:
        if self.running:
            self.killed = True
            self.send(signal.SIGKILL)


class Supervisor:
    """Starts, watches, restarts and stops the children of one run."""

    def __init__(
        self,
        options: LaunchOptions,
        bootstrap: str,
        console: Console,
        environ: Mapping[str, str],
        kafka_note: str,
        own_broker: bool = False,
    ) -> None:
        self.options = options
        self.bootstrap = bootstrap
        self.console = console
        self.kafka_note = kafka_note
        self.own_broker = own_broker
        self.specs = child_specs(options, bootstrap)
        self.children: list[Child] = []
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()
        self.started = False
        self._signals = 0
        self._env = child_env(environ, console.colour)
        self._die_with_parent = _DieWithParent()
        self._base_url = f"http://127.0.0.1:{options.http_port}"

    # ----------------------------------------------------------------- signals

    def on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            self.console.warn(
                f"{sig.name} received: stopping drivers, monitors, engines and Central"
                f"{', then the Kafka broker' if self.own_broker else ''} "
                "(Ctrl-C again kills them at once)"
            )
            self.stopping.set()
            return
        if not self.hurry.is_set():
            self.console.warn(f"{sig.name} again: killing every process now")
        self.hurry.set()
        for child in self.children:
            child.kill()

    # ----------------------------------------------------------------- the run

    async def run(self) -> int:
        """Start everything and supervise until a stop signal; returns the exit code."""
        try:
            await self._start()
        except Interrupted:
            return EXIT_OK
        except StartupError as exc:
            self.console.error(f"the system could not start: {exc}")
            self.console.error("stopping what was started")
            return EXIT_FAILED
        self.started = True
        self._banner()
        return await self._watch()

    async def _start(self) -> None:
        by_role: dict[Role, list[ChildSpec]] = {role: [] for role in Role}
        for spec in self.specs:
            by_role[spec.role].append(spec)
        central = self._launch(by_role[Role.CENTRAL][0])
        self.console.say(f"waiting for Central at {self._base_url}/health ...")
        began = time.monotonic()
        await self._wait_central(central)
        self.console.ok(f"Central is up ({time.monotonic() - began:.1f} s)")
        if by_role[Role.ENGINE]:
            engines = [self._launch(spec) for spec in by_role[Role.ENGINE]]
            monitors = {spec.cp_id or "": spec for spec in by_role[Role.MONITOR]}
            self.console.say(
                f"waiting for {len(engines)} CP(s) to be ACTIVATED "
                "(each monitor starts when its CP is) ..."
            )
            began = time.monotonic()
            await self._wait_cps(central, engines, monitors)
            self.console.ok(
                f"every CP is ACTIVATED ({time.monotonic() - began:.1f} s)"
            )
        for spec in by_role[Role.DRIVER]:
            self._launch(spec)

    async def _wait_central(self, central: Child) -> None:
        url = f"{self._base_url}/health"
        deadline = time.monotonic() + self.options.start_timeout
        last = "no answer yet"
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:
            while True:
                self._check_starting(central)
                try:
                    response = await http.get(url)
                    if response.status_code == 200:
                        return
                    last = f"HTTP {response.status_code}: {response.text[:300]}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if time.monotonic() >= deadline:
                    raise StartupError(
                        f"Central did not answer GET {url} with 200 within "
                        f"{self.options.start_timeout:g} s (last: {last}); see the central "
                        f"lines above; is Kafka reachable at {self.bootstrap}? "
                        "(--start-timeout changes the wait)"
                    )
                await self._pause()

    async def _wait_cps(
        self, central: Child, engines: list[Child], monitors: Mapping[str, ChildSpec]
    ) -> None:
        """Until Central shows every engine's CP ACTIVATED; starts each CP's monitor then."""
        wanted = [engine.spec.cp_id or "" for engine in engines]
        waiting_monitors = dict(monitors)
        started_monitors: list[Child] = []
        deadline = time.monotonic() + self.options.start_timeout
        states: dict[str, str] = {}
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:
            while True:
                self._check_starting(central, *engines, *started_monitors)
                try:
                    response = await http.get(f"{self._base_url}/cp")
                    body = response.json() if response.status_code == 200 else []
                except (httpx.HTTPError, ValueError):
                    body = []
                for cp in body if isinstance(body, list) else []:
                    if isinstance(cp, dict) and isinstance(cp.get("cp_id"), str):
                        # last_seen: heard from since this Central started (not a stale state
                        # reloaded from the database).
                        seen = cp.get("last_seen") is not None
                        states[cp["cp_id"]] = str(cp.get("state")) if seen else "not seen yet"
                for cp_id in list(waiting_monitors):
                    if states.get(cp_id) == "ACTIVATED":
                        started_monitors.append(self._launch(waiting_monitors.pop(cp_id)))
                if all(states.get(cp_id) == "ACTIVATED" for cp_id in wanted):
                    return
                if time.monotonic() >= deadline:
                    summary = ", ".join(
                        f"{cp_id} {states.get(cp_id, 'unknown to Central')}" for cp_id in wanted
                    )
                    raise StartupError(
                        f"not every CP was ACTIVATED within {self.options.start_timeout:g} s "
                        f"({summary}); see the cp-e lines above (--start-timeout changes "
                        "the wait)"
                    )
                await self._pause()

    def _check_starting(self, *children: Child) -> None:
        if self.stopping.is_set():
            raise Interrupted
        for child in children:
            if child.ended:
                raise StartupError(
                    f"{child.name} exited while starting ({describe_exit(child.last_code)}); "
                    "see its lines above"
                )

    async def _pause(self, seconds: float = POLL_INTERVAL) -> None:
        if await self._stopping_within(seconds):
            raise Interrupted

    async def _stopping_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _watch(self) -> int:
        """Until a stop signal, or until every child ended for good."""
        remaining = {child.task for child in self.children if child.task is not None}
        drivers = {c.task for c in self.children if c.spec.role is Role.DRIVER and c.task}
        stopper = asyncio.create_task(self.stopping.wait(), name="stop-signal")
        try:
            while remaining and not self.stopping.is_set():
                done, _ = await asyncio.wait(
                    remaining | {stopper}, return_when=asyncio.FIRST_COMPLETED
                )
                remaining -= done
                if drivers and all(task.done() for task in drivers):
                    drivers = set()
                    if not self.stopping.is_set():
                        self.console.ok(
                            f"every driver is done; the system keeps running. Dashboard: "
                            f"http://localhost:{self.options.http_port}/ (Ctrl-C to stop)"
                        )
        finally:
            stopper.cancel()
            await asyncio.gather(stopper, return_exceptions=True)
        if self.stopping.is_set():
            return EXIT_OK
        failed = [child.name for child in self.children if child.failed]
        self.console.error(
            "every process has ended; nothing left to run"
            + (f" (failed: {', '.join(failed)})" if failed else "")
        )
        return EXIT_FAILED if failed else EXIT_OK

    # ----------------------------------------------------------------- children

    def _launch(self, spec: ChildSpec) -> Child:
        child = Child(spec)
        self.children.append(child)
        child.task = asyncio.create_task(self._supervise(child), name=f"supervise {spec.name}")
        return child

    async def _supervise(self, child: Child) -> None:
        try:
            await self._supervise_loop(child)
        except Exception as exc:  # noqa: BLE001 - a launcher bug must be seen, not swallowed
            child.failed = True
            self.console.error(f"internal error while supervising {child.name}: {exc!r}")

    async def _supervise_loop(self, child: Child) -> None:
        """Run the child; report its death; restart it with backoff if asked to."""
        delay = RESTART_FIRST_DELAY
        while True:
            began = time.monotonic()
            try:
                code = await self._run_once(child)
            except OSError as exc:
                self.console.error(f"cannot start {child.name}: {exc}")
                child.failed = True
                return
            child.last_code = code
            ran = time.monotonic() - began
            if self.stopping.is_set() or child.stop_requested:
                return
            if code == 0:
                if child.spec.role is Role.DRIVER:
                    self.console.ok(f"{child.name} finished its requests file (exit code 0)")
                else:
                    self.console.warn(
                        f"{child.name} exited by itself with exit code 0 (for an engine: "
                        "Central sent SHUTDOWN); not restarted"
                    )
                return
            child.failed = True
            self._report_death(child, code, ran)
            if not self.options.restart:
                if child.spec.role is Role.CENTRAL and self.started:
                    self._central_is_down()
                return
            if ran >= STABLE_RUN:
                delay = RESTART_FIRST_DELAY
            self.console.warn(
                f"restarting {child.name} in {delay:g} s (--restart; restart #{child.runs})"
            )
            if await self._stopping_within(delay):
                return
            delay = next_delay(delay)

    async def _run_once(self, child: Child) -> int:
        process = await asyncio.create_subprocess_exec(
            *child.spec.argv(sys.executable),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._env,
            limit=LINE_LIMIT,
            start_new_session=False,
            process_group=0,  # Ctrl-C in the terminal reaches the launcher, which stops in order
            preexec_fn=self._die_with_parent,
        )
        child.process = process
        child.runs += 1
        child.tail.clear()
        assert process.stdout is not None
        reader = asyncio.create_task(
            self._relay(child, process.stdout), name=f"relay {child.name}"
        )
        try:
            code = await process.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), READER_DRAIN)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        return code

    async def _relay(self, child: Child, stream: asyncio.StreamReader) -> None:
        """Copy the child's output, line by line, behind its name."""
        colour = ROLE_COLOURS[child.spec.role]
        in_long_line = False
        while True:
            try:
                raw = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:  # end of output
                raw = exc.partial
                if not raw:
                    return
            except asyncio.LimitOverrunError as exc:  # a huge line: pass it on in pieces
                raw = await stream.readexactly(max(1, exc.consumed))
                in_long_line = True
            else:
                if in_long_line and raw in (b"\n", b"\r\n"):  # the end of a long line
                    in_long_line = False
                    continue
                in_long_line = False
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            child.tail.append(text)
            self.console.line(child.name, text, colour)

    def _report_death(self, child: Child, code: int, ran: float) -> None:
        self.console.error(
            f"!!! {child.name} DIED: {describe_exit(code)} after {ran:.1f} s; its last lines:"
        )
        for text in child.tail:
            self.console.line(LAUNCHER, f"    {text}", BOLD, DIM)
        if not child.tail:
            self.console.line(LAUNCHER, "    (no output)", BOLD, DIM)

    def _central_is_down(self) -> None:
        for text in (
            "!!! EV CENTRAL IS DOWN: no request can be accepted, the dashboard "
            f"http://localhost:{self.options.http_port}/ is gone, the monitors cannot report.",
            "!!! The other processes keep running. Ctrl-C stops everything; "
            "`--restart` would have restarted Central.",
        ):
            self.console.error(text)

    # ----------------------------------------------------------------- stop

    async def shutdown(self) -> None:
        """Stop every child in order: drivers, monitors, engines, Central."""
        self.stopping.set()
        for role in STOP_ORDER:
            group = [child for child in self.children if child.spec.role is role]
            live = [child.name for child in group if child.running]
            if live and not self.hurry.is_set():
                self.console.say(f"stopping {role.plural}: {', '.join(live)}")
            await asyncio.gather(*(self._stop_child(child) for child in group))
        killed = [child.name for child in self.children if child.killed]
        if killed:
            self.console.warn(f"killed (SIGKILL): {', '.join(killed)}")
        if len(self.children) > 1:
            self.console.ok(f"all {len(self.children)} processes have stopped")
        elif self.children:
            self.console.ok("the process has stopped")

    async def _stop_child(self, child: Child) -> None:
        child.stop_requested = True
        process = child.process
        if process is not None and process.returncode is None:
            if self.hurry.is_set():
                child.kill()
            else:
                child.send(STOP_SIGNAL)
            if not await self._exited_within(process, self.options.stop_timeout):
                if not self.hurry.is_set():
                    self.console.warn(
                        f"{child.name} did not stop within {self.options.stop_timeout:g} s; "
                        "killing it"
                    )
                child.kill()
                await process.wait()
        if child.task is not None:
            await asyncio.gather(child.task, return_exceptions=True)

    async def _exited_within(self, process: asyncio.subprocess.Process, timeout: float) -> bool:
        """Wait for the process to exit, at most `timeout` s or until a second Ctrl-C."""
        exited = asyncio.ensure_future(process.wait())
        hurried = asyncio.create_task(self.hurry.wait())
        try:
            await asyncio.wait(
                {exited, hurried}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (exited, hurried):
                task.cancel()
            await asyncio.gather(exited, hurried, return_exceptions=True)
        return process.returncode is not None

    # ----------------------------------------------------------------- banner

    def _banner(self) -> None:
        options = self.options
        http, base = options.http_port, options.base_health_port
        cps = cp_ids(options.cps)
        if not cps:
            running, health = "Central, no CP", "no CP"
        else:
            shown = ", ".join(cps) if len(cps) <= 4 else f"{cps[0]} .. {cps[-1]}"
            running = f"Central, {len(cps)} CP(s) ({shown})"
            health = f"http://localhost:{base}/health" + (
                f" (CP-001); port {base + len(cps) - 1} for {cps[-1]}" if len(cps) > 1 else ""
            )
        rule = "=" * 72  # ASCII: the banner must read well in any terminal and CI log
        lines = [
            (rule, BOLD),
            (f"  EV charging network running: {running}, {options.drivers} driver(s)", BOLD),
            (f"  Dashboard: http://localhost:{http}/", GREEN),
            (f"  API docs:  http://localhost:{http}/docs", None),
            (f"  TCP control plane: localhost:{options.listen_port}  "
             f"(python -m evcharging.apps.ev_central.ctl --port {options.listen_port} status)",
             None),
            (f"  CP health: {health}", None),
            (f"  Kafka:     {self.kafka_note}", None),
            (f"  Database:  {options.db_path}", None),
            ("  Stop:      Ctrl-C (stops everything in order; twice kills)", BOLD),
            (rule, BOLD),
        ]
        for text, colour in lines:
            self.console.say(text, colour)


# --------------------------------------------------------------------------- the command


async def _supervise(
    options: LaunchOptions, bootstrap: str, console: Console, kafka_note: str, own_broker: bool
) -> tuple[int, bool]:
    supervisor = Supervisor(options, bootstrap, console, os.environ, kafka_note, own_broker)
    loop = asyncio.get_running_loop()
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in handled:
        loop.add_signal_handler(sig, supervisor.on_signal, sig)
    try:
        try:
            code = await supervisor.run()
        finally:
            await supervisor.shutdown()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    return code, supervisor.hurry.is_set()


class _StopRequest:
    """While the broker starts (no event loop of ours runs): remember a stop signal.

    SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt; the flag also catches a signal whose
    KeyboardInterrupt got lost (the broker's readiness probe runs its own event loop, in
    which a cancelled Kafka client may swallow it).
    """

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # once is enough: never interrupt the cleanup of a half start
            return
        self.requested = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.getsignal(sig) for sig in signals}
        for sig in signals:
            signal.signal(sig, self._handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass
class _LocalBroker:
    """The broker this launcher started; its data is kept between runs on a fixed port."""

    broker: KafkaBroker
    keep_data: bool

    def stop(self, console: Console, *, hurry: bool = False) -> None:
        try:
            _stop_broker(console, self.broker, hurry=hurry)
        finally:
            self.discard()

    def discard(self) -> None:
        if not self.keep_data and not self.broker.running:
            shutil.rmtree(self.broker.work_dir, ignore_errors=True)


def _start_broker(console: Console, options: LaunchOptions, taken: set[int]) -> _LocalBroker:
    """Start a broker on 9092 (or --kafka-port); a port picked at random keeps no data."""
    port = options.kafka_port
    keep_data = bool(port)
    if port is None:
        port = KAFKA_DEFAULT_PORT
        if port in taken or not port_free(port, "127.0.0.1"):
            fallback = free_port()
            console.warn(
                f"port {port} is in use (another Kafka broker? then use it with "
                f"--kafka-bootstrap localhost:{port}); starting the local broker on port "
                f"{fallback} instead"
            )
            port = fallback
        else:
            keep_data = True
    elif port == 0:
        port = free_port()
    elif port in taken or not port_free(port, "127.0.0.1"):
        raise LaunchError(f"port {port} (the local Kafka broker) is already in use; "
                          "choose another with --kafka-port")
    work_dir = run_dir(port)  # as `make broker-start` would: `make broker-status` sees it
    console.say(
        "no Kafka broker configured (--kafka-bootstrap, KAFKA_BOOTSTRAP or "
        "CENTRAL_KAFKA_BOOTSTRAP): starting a local one"
    )
    if not jars_ready():
        console.warn(
            f"first run: fetching the Apache Kafka jars with Maven into {libs_dir()}; "
            "this happens once and takes ~30 s"
        )
    console.say(f"starting Kafka on 127.0.0.1:{port} (log: {work_dir / 'broker.log'}) ...")
    local = _LocalBroker(KafkaBroker(port, work_dir), keep_data)
    try:
        local.broker.start()
    except BaseException:
        local.discard()
        raise
    return local


def _stop_broker(console: Console, broker: KafkaBroker, *, hurry: bool = False) -> None:
    """Stop the broker (SIGTERM, then SIGKILL); a Ctrl-C meanwhile, or `hurry`, kills it."""
    pid = broker.pid
    if pid is None:
        console.warn("the Kafka broker is not running any more")
        broker.stop()
        return

    def kill_now(signum: int = 0, frame: FrameType | None = None) -> None:
        console.warn("killing the Kafka broker now")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    if hurry:
        kill_now()
    else:
        console.say(f"stopping the Kafka broker (pid {pid}) ...")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, kill_now)
    try:
        broker.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _kafka_reachable(bootstrap: str, timeout: float = 2.0) -> bool:
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout):
            return True
    except (OSError, ValueError):
        return False


def _setup_stdlib_logging(console: Console) -> None:
    broker_log = logging.getLogger("evcharging.devtools.kafka_broker")
    broker_log.handlers[:] = [_ConsoleLogHandler(console)]
    broker_log.setLevel(logging.INFO)
    broker_log.propagate = False
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def run_command(args: argparse.Namespace) -> int:
    """``python -m evcharging run``: returns the exit code."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")
    console = Console(sys.stdout, _use_colour(sys.stdout, os.environ, args.color))
    try:
        options = options_from_args(args, os.environ, _read_dotenv())
        plan = plan_ports(
            options.http_port, options.listen_port, options.base_health_port, options.cps
        )
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
    names = [LAUNCHER, KAFKA, *(spec.name for spec in child_specs(options, "x"))]
    console.width = prefix_width(names)
    _setup_stdlib_logging(console)
    if os.environ.get("CENTRAL_API_TOKEN") and not os.environ.get("CP_MONITOR_API_TOKEN"):
        console.warn("CENTRAL_API_TOKEN is set but CP_MONITOR_API_TOKEN is not: the monitors "
                     "will be refused by Central")

    local: _LocalBroker | None = None
    if options.kafka is not None:
        bootstrap = options.kafka.bootstrap
        kafka_note = f"{bootstrap} (from {options.kafka.origin})"
        console.say(f"Kafka: using {kafka_note}")
        if not _kafka_reachable(bootstrap):
            console.warn(f"nothing answers at {bootstrap} yet; the services will keep trying")
    else:
        stop = _StopRequest()
        try:
            with stop.installed():
                local = _start_broker(console, options, {u.port for u in plan.uses()})
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
            if local is not None:
                local.stop(console)
            console.warn("interrupted while starting Kafka; nothing else was started")
            return EXIT_OK
        bootstrap = local.broker.bootstrap
        kafka_note = f"{bootstrap} (started by the launcher; log {local.broker.log_file})"
    code, killed = EXIT_FAILED, False
    try:
        code, killed = asyncio.run(
            _supervise(options, bootstrap, console, kafka_note, local is not None)
        )
    except KeyboardInterrupt:  # only in the instant before the handlers are installed
        code = EXIT_OK
    finally:
        if local is not None:
            local.stop(console, hurry=killed)
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
