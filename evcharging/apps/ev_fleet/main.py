"""CP Fleet process: many CP Engines and their monitoring in one process.

    python -m evcharging.apps.ev_fleet.main --kafka-bootstrap localhost:9092 --cps 10000 \\
        --id-prefix CP- --http-port 8100 --central-host localhost --central-port 8000

Each CP is the CP Engine's :class:`~evcharging.apps.ev_cp_e.engine.ChargingPoint`, so
Central cannot tell a fleet's CP from a CP Engine process. They share one Kafka producer
and one ``central.commands`` consumer, which reads only the partitions their ids hash to
and routes each command to its CP by id. One HTTP port serves every CP's health and fault
hooks (:mod:`evcharging.apps.ev_fleet.api`), and the monitoring a CP Monitor does is done
in process (:mod:`evcharging.apps.ev_fleet.monitoring`), with Central's batch routes.

Settings: the fleet's own flags (``FLEET_*``); its CPs follow the CP Engine's settings
(``CP_ENGINE_KW_RATE``, ``_EURO_RATE``, ``_SESSION_SECONDS``, ``_TELEMETRY_INTERVAL``,
``_STATUS_INTERVAL``; ``CP_ENGINE_API_TOKEN`` protects the fleet's HTTP port) and its
monitoring the CP Monitor's (``CP_MONITOR_HEALTH_INTERVAL``, ``_FAILURE_THRESHOLD``;
``CP_MONITOR_API_TOKEN`` goes to Central). Both tokens fall back to
``EVCHARGING_API_TOKEN``.

Start-up: the producer (waiting for the broker), the command consumer (from the latest
offset), the HTTP port, the registration of every CP at Central (``POST /fleet/register``,
up to :data:`REGISTER_WAIT` seconds, then in the background), then the CPs connect,
``--connect-batch`` at a time, with a progress line every few seconds; then the monitoring
and, with ``--fault-rate``, the random faults.

With ``--protocol ocpp1.6`` or ``ocpp2.0.1`` the CPs are OCPP chargers instead, each on its
own WebSocket to the gateway at ``--ocpp-url`` (:mod:`evcharging.apps.ev_fleet.ocpp_fleet`):
no Kafka, no registration, no monitoring (the gateway reports them); the HTTP port serves
``GET /health`` with the chargers' counters and round-trip times.

It runs until SIGINT/SIGTERM (exit 0) or until a background task fails (exit 1: the
consumer, the HTTP server, a monitoring loop). Shutdown order: the monitoring and the random
faults, the CPs (a running session ends STOPPED, an ACTIVATED CP disconnects), the HTTP
server, the consumer, the producer. A second signal forces the exit. Invalid settings exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from loguru import logger
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from evcharging.apps.ev_cp_e.main import start_parts
from evcharging.apps.ev_fleet.api import FleetParts, create_fleet_app
from evcharging.apps.ev_fleet.central import CentralClient
from evcharging.apps.ev_fleet.faults import FaultPlan, FaultStats, inject_faults
from evcharging.apps.ev_fleet.fleet import Fleet
from evcharging.apps.ev_fleet.metrics import FleetCollector
from evcharging.apps.ev_fleet.monitoring import FleetMonitor
from evcharging.apps.ev_fleet.ocpp_fleet import OcppFleet, create_ocpp_fleet_app
from evcharging.apps.ev_fleet.plan import CPSpec, cp_id, fleet_plan
from evcharging.common.bus import Routes
from evcharging.common.centrals import AnyDoor
from evcharging.common.config import (
    CPEngineSettings,
    CPMonitorSettings,
    FleetSettings,
    build_parser,
    settings_problems,
)
from evcharging.common.gc_tuning import tune_for_many_connections
from evcharging.common.http import check_exposure
from evcharging.common.kafka import (
    BusError,
    BusStats,
    KafkaBus,
    KafkaConfig,
    KafkaConsumerLoop,
)
from evcharging.common.logging import setup_logging
from evcharging.common.messages import CentralCommand, CPRegistration
from evcharging.common.metrics import BusCollector, ServiceMetrics, mount_metrics
from evcharging.common.service import (
    EXIT_FAILURE,
    EXIT_OK,
    HttpServer,
    Shutdown,
    Stopped,
    TaskOwner,
    run_service,
    until_stopped,
)

PROG = "python -m evcharging.apps.ev_fleet.main"
DESCRIPTION = (
    "CP Fleet: many simulated charging points (the CP Engine's own) and their\n"
    "monitoring in one process, on one Kafka producer, one command consumer and one\n"
    "HTTP port."
)
S = TypeVar("S", bound=BaseSettings)

REGISTER_WAIT = 10.0
"""Seconds the CPs wait for Central to take their registration before connecting anyway."""

ENGINE_FIELDS = ("kw_rate", "euro_rate", "session_seconds", "telemetry_interval",
                 "status_interval", "api_token")
"""The CP Engine settings the fleet's CPs follow (the rest are an engine process's own)."""
MONITOR_FIELDS = ("health_interval", "failure_threshold", "api_token")
"""The CP Monitor settings the fleet's monitoring follows."""


@dataclass(frozen=True)
class FleetConfig:
    """Everything the fleet runs with: its own settings and those its CPs follow."""

    fleet: FleetSettings
    engine: CPEngineSettings
    monitor: CPMonitorSettings

    @property
    def first_id(self) -> str:
        return cp_id(self.fleet.id_prefix, self.fleet.first)


def _epilog() -> str:
    lines = ["Its CPs also follow these CP Engine and CP Monitor settings (variables or .env):"]
    for cls, fields in ((CPEngineSettings, ENGINE_FIELDS), (CPMonitorSettings, MONITOR_FIELDS)):
        for name in fields:
            lines.append(f"  {_variables(cls, name)}: {_describe(cls, name)}")
    lines.append("A flag beats its variable, the variable beats .env, .env beats the default.")
    return "\n".join(lines)


def _variables(cls: type[BaseSettings], name: str) -> str:
    if name == "api_token":
        prefix = str(cls.model_config.get("env_prefix", ""))
        return f"{prefix}API_TOKEN (or EVCHARGING_API_TOKEN)"
    return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def _describe(cls: type[BaseSettings], name: str) -> str:
    info = cls.model_fields[name]
    default = "unset" if info.default is None else str(info.default)
    return f"{info.description} [default: {default}]"


def load_config(argv: Sequence[str] | None) -> FleetConfig:
    """Parse the flags over the environment; invalid settings exit 2 with a clear message."""
    parser = build_parser(FleetSettings, PROG, DESCRIPTION)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _epilog()
    flags = vars(parser.parse_args(argv))
    try:
        fleet = FleetSettings(**flags)
    except ValidationError as exc:
        parser.error(f"invalid settings: {settings_problems(FleetSettings, exc)}")
    first = cp_id(fleet.id_prefix, fleet.first)
    try:
        fleet_plan(fleet.id_prefix, fleet.first, fleet.cps)  # every id valid
    except ValueError as exc:
        parser.error(f"invalid settings: {exc}")
    engine = _follow(parser, CPEngineSettings, first)
    monitor = _follow(parser, CPMonitorSettings, first)
    if fleet.stall_after <= 2 * engine.status_interval:
        parser.error(
            f"invalid settings: stall_after (FLEET_STALL_AFTER) {fleet.stall_after:g} s must be "
            f"above twice CP_ENGINE_STATUS_INTERVAL ({engine.status_interval:g} s): a CP "
            "between two heartbeats would count as stuck"
        )
    return FleetConfig(fleet, engine, monitor)


def _follow(parser: argparse.ArgumentParser, cls: type[S], first: str) -> S:
    """The engine's or monitor's settings from the environment (the id is the fleet's)."""
    try:
        return cls(cp_id=first)
    except ValidationError as exc:
        parser.error(f"invalid settings: {settings_problems(cls, exc)}")


def advertised_host(host: str) -> str:
    """The host Central should use to reach the fleet's HTTP port."""
    if host in ("", "0.0.0.0", "::"):
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


async def run(config: FleetConfig, stop: asyncio.Event) -> int:
    """Run the fleet until `stop` is set or a background task fails; the exit code."""
    s = config.fleet
    exposure = check_exposure(
        s.http_host, config.engine.api_token, s.allow_anonymous, env_name="CP_ENGINE_API_TOKEN"
    )
    if exposure is not None:
        logger.critical("{}", exposure)
        return EXIT_FAILURE
    seed = s.seed if s.seed is not None else secrets.randbits(32)
    rng = random.Random(seed)  # noqa: S311 - a simulation, not secrets
    specs = fleet_plan(s.id_prefix, s.first, s.cps, s.sites, s.site_prefix)
    if s.protocol != "kafka":
        return await run_ocpp(config, [spec.cp_id for spec in specs], stop)
    logger.info("CP Fleet: {:,} CPs {} … {} in {} site(s), seed {}", len(specs),
                specs[0].cp_id, specs[-1].cp_id, len({spec.site for spec in specs}), seed)

    stats = BusStats()
    kafka = KafkaConfig.from_settings(s, f"cp-fleet-{config.first_id}")
    bus = KafkaBus(kafka, stats)
    fleet = Fleet(specs, bus, config.engine, rng=random.Random(rng.getrandbits(64)))  # noqa: S311
    metrics = ServiceMetrics()
    consumer = KafkaConsumerLoop(
        kafka,
        Routes().add(CentralCommand, fleet.handle_command),
        group_id=None,
        start_at="latest",
        stats=stats,
        keys=fleet.ids,  # only the partitions this fleet's CPs' commands go to
        observe=metrics.handler_observer(),
    )
    token = config.monitor.api_token
    central = CentralClient(
        AnyDoor.parse(s.central_host, s.central_port),
        token.get_secret_value() if token is not None else None,
    )
    tasks = TaskOwner("CP Fleet")
    by_id = {spec.cp_id: spec for spec in specs}
    fault_stats = FaultStats() if s.fault_rate > 0 else None
    parts = FleetParts(fleet, s.stall_after, bus=stats, kafka_connected=lambda: bus.connected,
                       faults=fault_stats)
    app = create_fleet_app(
        parts, api_token=config.engine.api_token, allow_anonymous=s.allow_anonymous
    )
    metrics.add(FleetCollector(parts))
    metrics.add(BusCollector(stats, [consumer], lambda: bus.connected))
    mount_metrics(app, metrics)  # GET /metrics on the fleet's port
    http = HttpServer(app, s.http_host, s.http_port, name="fleet HTTP", tasks=tasks)
    base_url = f"http://{advertised_host(s.http_host)}"

    def registration(cp: str) -> CPRegistration:
        return _registration(by_id[cp], config.engine, f"{base_url}:{http.port}")

    monitor = FleetMonitor(
        fleet, central, registration,
        health_interval=config.monitor.health_interval,
        failure_threshold=config.monitor.failure_threshold,
        stall_after=s.stall_after,
    )
    parts.monitor = monitor
    faults: list[asyncio.Task[None]] = []
    shutdown = Shutdown(
        ("monitoring", monitor.stop),
        ("random faults", lambda: tasks.cancel(*faults)),
        ("charging points", lambda: fleet.stop(s.connect_batch)),
        ("HTTP server", http.stop),
        ("command consumer task", tasks.close),
        ("command consumer", consumer.stop),
        ("Kafka producer", bus.stop),
        ("Central client", central.aclose),
    )
    try:
        await until_stopped(stop, start_parts(bus, consumer, http))
        tasks.spawn(consumer.run(), "central.commands consumer", forever=True)
        await until_stopped(stop, monitor.register(REGISTER_WAIT))
        await until_stopped(stop, fleet.connect(s.connect_batch))
        monitor.start(tasks)
        if fault_stats is not None:
            loop = asyncio.get_running_loop()
            plan = FaultPlan(fleet.ids, s.fault_rate, s.repair_after, now=loop.time(),
                             rng=random.Random(rng.getrandbits(64)))  # noqa: S311
            faults.append(tasks.spawn(inject_faults(fleet, plan, fault_stats),
                                      "random faults", forever=True))
        logger.info("CP Fleet running: {:,} CPs; HTTP on {}:{}", len(fleet), s.http_host,
                    http.port)
        if await tasks.wait(stop):
            logger.error("stopping the CP Fleet after the failure above")
            return EXIT_FAILURE
        return EXIT_OK
    except (BusError, OSError) as exc:
        logger.error("CP Fleet could not start: {}", exc)
        return EXIT_FAILURE
    except Stopped:
        logger.info("stopped while starting")
        return EXIT_OK
    finally:
        await shutdown.run()
        logger.info("CP Fleet stopped ({})", ", ".join(
            f"{count:,} {state}" for state, count in fleet.counts().items() if count
        ))


async def run_ocpp(config: FleetConfig, ids: list[str], stop: asyncio.Event) -> int:
    """The fleet as OCPP chargers (``--protocol ocpp1.6|ocpp2.0.1``): no Kafka, no
    registration (the gateway does both); ``GET /health`` on the fleet's port."""
    s, engine = config.fleet, config.engine
    password = s.ocpp_password.get_secret_value() if s.ocpp_password is not None else None
    fleet = OcppFleet(ids, s.protocol, s.ocpp_url, kw_rate=engine.kw_rate,
                      session_seconds=engine.session_seconds,
                      telemetry_interval=engine.telemetry_interval, password=password)
    logger.info("CP Fleet: {:,} OCPP chargers ({}) {} … {} at {}", len(ids), s.protocol,
                ids[0], ids[-1], fleet.url)
    tasks = TaskOwner("CP Fleet")
    http = HttpServer(create_ocpp_fleet_app(fleet), s.http_host, s.http_port,
                      name="fleet HTTP", tasks=tasks)
    shutdown = Shutdown(("chargers", fleet.stop), ("HTTP server", http.stop),
                        ("tasks", tasks.close))
    try:
        await until_stopped(stop, http.start())
        await until_stopped(stop, fleet.connect(s.connect_batch))
        logger.info("CP Fleet running: {:,} OCPP chargers; HTTP on {}:{}", len(fleet),
                    s.http_host, http.port)
        if await tasks.wait(stop):
            logger.error("stopping the CP Fleet after the failure above")
            return EXIT_FAILURE
        return EXIT_OK
    except OSError as exc:
        logger.error("CP Fleet could not start: {}", exc)
        return EXIT_FAILURE
    except Stopped:
        logger.info("stopped while starting")
        return EXIT_OK
    finally:
        await shutdown.run()
        logger.info("CP Fleet stopped")


def _registration(spec: CPSpec, engine: CPEngineSettings, base_url: str) -> CPRegistration:
    return CPRegistration(
        cp_id=spec.cp_id,
        site=spec.site,
        location=spec.location,
        kw_rate=engine.kw_rate,
        euro_rate=engine.euro_rate,
        health_url=f"{base_url}/cp/{spec.cp_id}/health",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, configure logging and run the fleet; returns the exit code."""
    config = load_config(argv)
    setup_logging("ev_fleet", config.fleet.log_level, config.fleet.log_json)
    if config.fleet.protocol != "kafka":
        tune_for_many_connections()  # thousands of chargers' WebSockets (see the module)
    return run_service(lambda stop: run(config, stop))


if __name__ == "__main__":
    sys.exit(main())
