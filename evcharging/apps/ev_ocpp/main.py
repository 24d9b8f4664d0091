"""OCPP gateway process: real chargers (OCPP-J 1.6 and 2.0.1) as CPs of the network (SPEC §8).

    python -m evcharging.apps.ev_ocpp.main --kafka-bootstrap localhost:9092 --ws-port 9000 \\
        --central-host localhost --central-port 8000

Chargers connect to ``ws://OCPP_HOST:OCPP_WS_PORT/ocpp/{charger_id}`` (``wss://`` with
``OCPP_TLS_CERT`` and ``OCPP_TLS_KEY``); connector ``n`` of charger ``X`` is the CP ``X.n``,
registered with Central's HTTP API and reported on ``cp.status`` and ``cp.telemetry`` like
an engine; Central's ``central.commands`` for them become CALLs. ``/health`` and
``/metrics`` are served on ``OCPP_HTTP_PORT``.

Without ``OCPP_PASSWORDS_FILE`` the gateway is in protected mode: it accepts chargers on
loopback addresses only, and refuses to start on a non-loopback address unless
``--allow-anonymous``.

Start-up: the producer (waiting for the broker), the command consumer (every partition of
``central.commands``, from the latest offset: the gateway cannot know which chargers will
connect), the HTTP port, then the WebSocket port. Runs until SIGINT/SIGTERM (exit 0) or a
background task fails (exit 1). Shutdown: the WebSocket port (its chargers' idle CPs become
DISCONNECTED), the heartbeats, the HTTP port, the consumer, the producer.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from loguru import logger

from evcharging.apps.ev_cp_e.main import start_parts
from evcharging.apps.ev_fleet.central import CentralClient
from evcharging.apps.ev_ocpp.central import Registrar, SiteBook, report_liveness
from evcharging.apps.ev_ocpp.gateway import Gateway
from evcharging.apps.ev_ocpp.logic import PROTOCOLS
from evcharging.apps.ev_ocpp.metrics import OcppCollector
from evcharging.apps.ev_ocpp.server import OcppServer, PasswordBook, tls_context
from evcharging.apps.ev_ocpp.store import StateStore
from evcharging.common.bus import Routes
from evcharging.common.centrals import AnyDoor
from evcharging.common.config import OcppSettings, load_settings
from evcharging.common.gc_tuning import tune_for_many_connections
from evcharging.common.http import is_loopback
from evcharging.common.kafka import (
    BusError,
    BusStats,
    KafkaBus,
    KafkaConfig,
    KafkaConsumerLoop,
)
from evcharging.common.logging import setup_logging
from evcharging.common.messages import CentralCommand
from evcharging.common.metrics import PREFIX, BusCollector, ServiceMetrics, mount_metrics
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

PROG = "python -m evcharging.apps.ev_ocpp.main"
DESCRIPTION = ("OCPP gateway: real chargers and OCPP simulators (OCPP-J 1.6 and 2.0.1) join "
               "the network as CPs.")


def exposure_problem(settings: OcppSettings) -> str | None:
    """Why the gateway refuses to start on its address (protected mode), or None."""
    if settings.passwords_file is not None or settings.allow_anonymous:
        return None
    if is_loopback(settings.host):
        return None
    return (f"refusing to let chargers connect on {settings.host or 'every address'} without "
            "passwords: anyone who can reach it could pose as a charger. Set "
            "OCPP_PASSWORDS_FILE, listen on 127.0.0.1, or pass --allow-anonymous")


def create_app(gateway: Gateway, server: OcppServer, bus: KafkaBus, registrar: Registrar
               ) -> FastAPI:
    """``/health``: the gateway at a glance, 200 while it listens for chargers and reaches
    Kafka, else 503 (``/metrics`` is mounted by the caller)."""
    app = FastAPI(title="OCPP gateway", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> JSONResponse:
        links = list(gateway.links.values())
        ok = server.listening and bus.connected
        body = {
            "status": "ok" if ok else "starting" if not server.listening else "degraded",
            "listening": server.listening,
            "kafka_connected": bus.connected,
            "url": server.url,
            "chargers": {p: sum(1 for link in links if link.protocol == p) for p in PROTOCOLS},
            "cps": len(gateway.connectors),
            "registrations_pending": registrar.pending,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    return app


async def run(settings: OcppSettings, stop: asyncio.Event) -> int:
    """Run the gateway until `stop` is set or a background task fails; the exit code."""
    problem = exposure_problem(settings)
    if problem is not None:
        logger.critical("{}", problem)
        return EXIT_FAILURE
    try:
        passwords = (PasswordBook(settings.passwords_file)
                     if settings.passwords_file is not None else None)
        tls = (tls_context(settings.tls_cert, settings.tls_key)
               if settings.tls_cert is not None and settings.tls_key is not None else None)
        sites = SiteBook.load(settings.site, settings.sites_file)
    except (OSError, ValueError) as exc:
        logger.critical("OCPP gateway cannot start: {}", exc)
        return EXIT_FAILURE
    stats = BusStats()
    kafka = KafkaConfig.from_settings(settings, "ocpp-gateway")
    bus = KafkaBus(kafka, stats)
    metrics = ServiceMetrics()
    calls = metrics.histogram(PREFIX + "ocpp_call_duration_seconds")
    token = settings.api_token
    central = CentralClient(AnyDoor.parse(settings.central_host, settings.central_port),
                            token.get_secret_value() if token is not None else None)
    registrar = Registrar(central, sites=sites)
    gateway = Gateway(
        bus, euro_rate=settings.euro_rate, heartbeat_interval=settings.heartbeat_interval,
        status_interval=settings.status_interval, call_timeout=settings.call_timeout,
        decision_timeout=settings.decision_timeout, register=registrar.add,
        observe_call=lambda action, seconds: calls.labels(action).observe(seconds),
    )
    store = StateStore(settings.state_file)
    gateway.durable = store.commit  # a transaction's start or stop is answered once written
    try:
        store.load(gateway)
    except (OSError, ValueError) as exc:
        logger.critical("OCPP gateway cannot start: {}", exc)
        return EXIT_FAILURE
    consumer = KafkaConsumerLoop(
        kafka, Routes().add(CentralCommand, gateway.handle_command), group_id=None,
        start_at="latest", stats=stats, observe=metrics.handler_observer(),
    )
    server = OcppServer(gateway, settings.host, settings.ws_port, passwords=passwords,
                        allow_anonymous=settings.allow_anonymous, tls=tls)
    app = create_app(gateway, server, bus, registrar)
    metrics.add(OcppCollector(gateway))
    metrics.add(BusCollector(stats, [consumer], lambda: bus.connected))
    mount_metrics(app, metrics)
    tasks = TaskOwner("OCPP gateway")
    http = HttpServer(app, settings.http_host, settings.http_port, name="OCPP gateway HTTP",
                      tasks=tasks)
    background: list[asyncio.Task[None]] = []
    shutdown = Shutdown(
        ("WebSocket server", server.stop),
        ("heartbeats, registrations and the state file's writer",
         lambda: tasks.cancel(*background)),
        ("state file", lambda: store.save(gateway)),
        ("HTTP server", http.stop),
        ("command consumer task", tasks.close),
        ("command consumer", consumer.stop),
        ("Kafka producer", bus.stop),
        ("Central client", central.aclose),
    )
    try:
        await until_stopped(stop, start_parts(bus, consumer, http))
        tasks.spawn(consumer.run(), "central.commands consumer", forever=True)
        background.append(tasks.spawn(gateway.beat_forever(), "heartbeats", forever=True))
        background.append(tasks.spawn(registrar.run(), "registrations", forever=True))
        background.append(tasks.spawn(report_liveness(gateway, central), "liveness",
                                      forever=True))
        background.append(tasks.spawn(store.keep_saved(gateway), "state file", forever=True))
        await server.start()
        mode = ("Basic auth for " + f"{len(passwords)} charger(s)" if passwords is not None
                else "protected mode (loopback chargers only)" if not settings.allow_anonymous
                else "anonymous chargers allowed")
        logger.info("OCPP gateway running: chargers connect to {} ({}); HTTP on {}:{}",
                    server.url, mode, settings.http_host, http.port)
        if await tasks.wait(stop):
            logger.error("stopping the OCPP gateway after the failure above")
            return EXIT_FAILURE
        return EXIT_OK
    except (BusError, OSError) as exc:
        logger.error("OCPP gateway could not start: {}", exc)
        return EXIT_FAILURE
    except Stopped:
        logger.info("stopped while starting")
        return EXIT_OK
    finally:
        await shutdown.run()
        logger.info("OCPP gateway stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, configure logging and run the gateway; returns the exit code."""
    settings = load_settings(OcppSettings, argv, PROG, DESCRIPTION)
    setup_logging("ev_ocpp", settings.log_level, settings.log_json)
    tune_for_many_connections()  # thousands of chargers' connections (see the module)
    return run_service(lambda stop: run(settings, stop))


if __name__ == "__main__":
    sys.exit(main())
