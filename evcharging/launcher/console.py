"""The launcher's terminal: one line per write, behind a fixed-width name, colours optional."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import TextIO

from evcharging.devtools.prometheus import graph_url
from evcharging.launcher.plan import FLEET_THRESHOLD, LaunchOptions, Role, metrics_targets

LAUNCHER = "launcher"
KAFKA = "kafka"
BROKER_LOGGER = "evcharging.devtools.kafka_broker"
"""The local broker's modules log below this name; their lines show as ``kafka | ...``."""
POSTGRES = "postgres"
POSTGRES_LOGGER = "evcharging.devtools.postgres"
"""The local PostgreSQL's modules (--db postgres); their lines show as ``postgres | ...``."""

RESET = "\033[0m"
BOLD = "\033[1m"
DIM = "\033[2m"
RED = "\033[1;31m"
GREEN = "\033[32m"
YELLOW = "\033[33m"
ROLE_COLOURS = {
    Role.CENTRAL: "\033[1;35m",
    Role.OCPP: "\033[35m",
    Role.ENGINE: "\033[36m",
    Role.MONITOR: "\033[32m",
    Role.FLEET: "\033[36m",
    Role.DRIVER: "\033[34m",
    Role.LOAD: "\033[34m",
    Role.PROMETHEUS: "\033[33m",
}


def prefix_width(names: Iterable[str]) -> int:
    return max((len(name) for name in names), default=0)


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


def use_colour(stream: TextIO, environ: Mapping[str, str], choice: str) -> bool:
    """``--color``: always, never, or auto (a terminal, unless NO_COLOR; FORCE_COLOR forces)."""
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
    """The broker modules' log records, as ``kafka | ...`` lines (or ``name | ...``)."""

    def __init__(self, console: Console, name: str = KAFKA) -> None:
        super().__init__(logging.INFO)
        self.console = console
        self.prefix = name

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        colour = YELLOW if record.levelno >= logging.WARNING else None
        for part in text.splitlines() or [""]:
            self.console.line(self.prefix, part, YELLOW, colour)


def route_logs(console: Console) -> None:
    """The local broker's log to the console; the Kafka clients' and httpx's chatter off."""
    broker_log = logging.getLogger(BROKER_LOGGER)
    broker_log.handlers[:] = [_ConsoleLogHandler(console)]
    broker_log.setLevel(logging.INFO)
    broker_log.propagate = False
    postgres_log = logging.getLogger(POSTGRES_LOGGER)
    postgres_log.handlers[:] = [_ConsoleLogHandler(console, POSTGRES)]
    postgres_log.setLevel(logging.INFO)
    postgres_log.propagate = False
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def banner(
    console: Console, options: LaunchOptions, kafka_note: str, db_note: str | None = None
) -> None:
    """What runs and where: shown once the system is up (`db_note`: Central's database,
    without a password; default: the SQLite file)."""
    http, base = options.http_port, options.base_health_port
    cps = options.ids
    shown = ", ".join(cps) if len(cps) <= 4 else f"{cps[0]} .. {cps[-1]}"
    fleet_lines: list[tuple[str, str | None]] = []
    centrals = "Central" if options.centrals == 1 else f"{options.centrals} Centrals"
    if not cps:
        running, health = f"{centrals}, no CP", "no CP"
    elif options.fleet:
        why = (f"> {FLEET_THRESHOLD} CPs; --no-fleet: a process per CP"
               if options.cps > FLEET_THRESHOLD else "--fleet")
        running = f"{centrals}, {len(cps):,} CPs ({shown}, {options.sites} site(s))"
        fleet = f"http://localhost:{options.fleet_port}"
        health = f"{fleet}/cp/{cps[0]}/health  (POST .../fault and .../recover to break it)"
        fleet_lines = [(f"  CP Fleet:  {fleet}/health  (one process for every CP: {why})",
                        None)]
    else:
        running = f"{centrals}, {len(cps)} CP(s) ({shown})"
        health = f"http://localhost:{base}/health" + (
            f" (CP-001); port {base + len(cps) - 1} for {cps[-1]}" if len(cps) > 1 else ""
        )
    rule = "=" * 72  # ASCII: the banner must read well in any terminal and CI log
    lines: list[tuple[str, str | None]] = [
        (rule, BOLD),
        (f"  EV charging network running: {running}, {options.drivers} driver(s)", BOLD),
        (f"  Dashboard: http://localhost:{http}/", GREEN),
        *central_lines(options),
        (f"  Summary:   http://localhost:{http}/summary   (one page of CPs: "
         f"http://localhost:{http}/cp?limit=5)", None),
        (f"  API docs:  http://localhost:{http}/docs", None),
        (f"  TCP control plane: localhost:{options.listen_port}  "
         f"(python -m evcharging.apps.ev_central.ctl {ctl_address(options)} status)",
         None),
        *fleet_lines,
        (f"  CP health: {health}", None),
    ]
    if options.ocpp_url is not None:
        lines += [
            (f"  OCPP:      chargers connect to {options.ocpp_url}", GREEN),
            (f"             (OCPP 1.6J or 2.0.1 subprotocol; connector n is the CP "
             f"<charger-id>.n; gateway http://localhost:{options.ocpp_http_port}/health)",
             None),
        ]
    if options.load is not None:
        until = ("until Ctrl-C" if options.load_duration is None
                 else f"for {options.load_duration:g} s")
        lines.append((f"  Load:      {options.load:g} new drivers/s (ev_load), {until}", None))
    if options.quiet:
        names = " and ".join(
            {Role.CENTRAL: "Central", Role.FLEET: "the fleet"}.get(role, role.short)
            for role in (Role.CENTRAL, Role.FLEET) if role in options.quiet
        )
        lines.append((f"  Logs:      {names}: warnings only (*_LOG_LEVEL=INFO: a line per "
                      "CP change)", None))
    lines += metrics_lines(options)
    lines += [
        (f"  Kafka:     {kafka_note}", None),
        (f"  Database:  {db_note or options.db_path}", None),
        ("  Stop:      Ctrl-C (stops everything in order; twice kills)", BOLD),
        (rule, BOLD),
    ]
    for text, colour in lines:
        console.say(text, colour)


def ctl_address(options: LaunchOptions) -> str:
    """``ctl``'s flags for this run's Central(s): ``--port P``, or every TCP plane."""
    if options.centrals == 1:
        return f"--port {options.listen_port}"
    return "--host " + ",".join(f"localhost:{c.listen_port}" for c in options.central_instances)


def central_lines(options: LaunchOptions) -> list[tuple[str, str | None]]:
    """With more than one Central (SPEC §9): each instance's dashboard, TCP plane and
    ``/health`` (its id and partitions); none for one."""
    if options.centrals == 1:
        return []
    lines: list[tuple[str, str | None]] = [
        (f"             (any Central serves the whole network; {options.centrals} share the "
         "CPs by Kafka partition)", None)]
    for central in options.central_instances:
        lines.append((f"  Central {central.instance_id}: dashboard {central.url}  (TCP "
                      f"localhost:{central.listen_port}; {central.url}health: its partitions)",
                      GREEN))
    return lines


def metrics_lines(options: LaunchOptions) -> list[tuple[str, str | None]]:
    """Where each service's Prometheus metrics are, and the run's Prometheus (banner)."""
    ports: dict[str, list[int]] = {}
    for job, port in metrics_targets(options):
        ports.setdefault(job, []).append(port)
    shown = []
    for job, found in ports.items():
        where = (f"http://localhost:{found[0]}/metrics" if len(found) == 1 else
                 f"ports {found[0]}..{found[-1]}/metrics")
        shown.append(f"{job} {where}")
    lines: list[tuple[str, str | None]] = [(f"  Metrics:   {'; '.join(shown)}", None)]
    if options.prometheus_port is None:
        lines.append(("             (--prometheus: a local Prometheus scraping them, the "
                      "monitors' and the load's too)", None))
    else:
        base = f"http://localhost:{options.prometheus_port}"
        lines.append((f"  Prometheus: {base}/  (targets: {base}/targets, alerts: "
                      f"{base}/alerts)", GREEN))
        lines.append((f"  Sessions/s: "
                      f"{graph_url(base, 'sum by (result) (rate(evcharging_sessions_total[1m]))')}",
                      None))
    return lines
