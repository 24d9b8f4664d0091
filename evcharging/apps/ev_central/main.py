"""EV Central: ``python -m evcharging.apps.ev_central.main --help``.

Start order: database, Kafka producer, controller (reloads the registry), HTTP API,
dashboard and ``/metrics``, TCP control plane, then the Kafka consumer and the
housekeeping task. It runs until SIGINT/SIGTERM (exit 0) or until a background task fails
(exit 1). Shutdown: stop accepting (TCP, HTTP), the background tasks, the controller,
Kafka, then the database.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from evcharging.apps.ev_central import housekeeping
from evcharging.apps.ev_central.api import create_api
from evcharging.apps.ev_central.controller import CentralOptions, Controller
from evcharging.apps.ev_central.energy import Energy
from evcharging.apps.ev_central.energy_network import EnergyNetwork
from evcharging.apps.ev_central.metrics import central_metrics, timed_requests
from evcharging.apps.ev_central.network import Network
from evcharging.apps.ev_central.outbox import Committed
from evcharging.apps.ev_central.ownership import Ownership
from evcharging.apps.ev_central.peer_feeds import PeerFeeds
from evcharging.apps.ev_central.peers import Directory
from evcharging.apps.ev_central.pg_repository import PostgresRepository
from evcharging.apps.ev_central.rebalance import Membership, Rebalancer, Self
from evcharging.apps.ev_central.repository import (
    DatabaseInUse,
    Repository,
    SqliteRepository,
    StorageError,
)
from evcharging.apps.ev_central.tcp_server import TcpControlServer
from evcharging.common.assignor import SamePartitionAssignor
from evcharging.common.config import CentralSettings, load_settings
from evcharging.common.gc_tuning import tune_for_many_connections
from evcharging.common.http import check_exposure
from evcharging.common.kafka import (
    BusError,
    BusStats,
    KafkaBus,
    KafkaConfig,
    KafkaConsumerLoop,
    Routes,
    Topic,
    committed_offsets,
    fence,
)
from evcharging.common.logging import setup_logging
from evcharging.common.messages import CPStatus, CPTelemetry, DriverRequest
from evcharging.common.metrics import BusCollector, mount_metrics
from evcharging.common.readclock import ReadClock
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

DESCRIPTION = "EV Central: the controller of the EV charging network."
READY_WAIT = 30.0
"""Seconds Central waits for its first partitions before it says it is ready anyway."""
SESSION_TIMEOUT_MS = 6000
"""How long the group waits for a silent instance before its partitions move: with a
rebalance and the successor's loading, inside SPEC §9's 10 s take-over."""
BATCH_MAX = 4000
"""The most messages Central handles in one batch (one transaction): about 0.3 s of work.
Unbounded, a backlog read with 12 partitions came as one batch of tens of thousands,
handled for seconds without answering HTTP (the fleet's liveness reports timed out)."""


def make_repository(url: str) -> tuple[Repository, str]:
    """The repository of CENTRAL_DB_URL (SPEC §9) and where it is, without a password:
    ``sqlite:///PATH`` (one Central per file: a file lock) or ``postgresql://…``."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        return SqliteRepository(Path(path), exclusive=True), path
    postgres = PostgresRepository(url)
    return postgres, postgres.url


async def run(settings: CentralSettings, stop: asyncio.Event) -> int:
    for host in (settings.http_host, settings.listen_host):
        refused = check_exposure(host, settings.api_token, settings.allow_anonymous,
                                 env_name="CENTRAL_API_TOKEN")
        if refused is not None:
            logger.critical("{}", refused)
            return EXIT_FAILURE
    stats = BusStats()
    kafka = KafkaConfig.from_settings(settings, "ev-central")
    token = settings.api_token.get_secret_value() if settings.api_token else None
    repository, where = make_repository(settings.database_url)
    try:
        await repository.open()  # one Central per SQLite file: a second one stops here
    except (DatabaseInUse, StorageError) as exc:
        logger.critical("{}", exc)
        return EXIT_FAILURE
    async with repository as repo:
        # Exactly once (SPEC §4): decisions leave with the offsets they consumed, in one
        # Kafka transaction; the id is this instance's, as its place in the group is.
        me = Self(instance=settings.instance, peer_url=settings.own_url,
                  transactional_id=f"{settings.group_id}-central-{settings.instance}",
                  legacy_transactional_id=f"{settings.group_id}-central")
        bus = KafkaBus(kafka, stats, stamp_topics=True,
                       transactional_id=me.transactional_id,
                       offsets_group=settings.group_id)
        readclock = ReadClock()
        ownership = Ownership(settings.instance, standalone=False)
        controller = Controller(
            bus,
            repo,
            CentralOptions(
                start_timeout=settings.start_timeout,
                breaker_failure_threshold=settings.breaker_failure_threshold,
                breaker_reset_timeout=settings.breaker_reset_timeout,
                request_max_age=settings.request_max_age,
                cp_silence_timeout=settings.cp_silence_timeout,
                shed_after=settings.shed_after,
                max_cps=settings.max_cps,
                max_unregistered=settings.max_unregistered,
            ),
            readclock=readclock,
            ownership=ownership,
        )
        energy = Energy(controller, policy=settings.allocation,
                        interval=settings.allocation_interval)
        metrics = central_metrics(controller, repo, energy=energy)
        ownership.on_change.append(lambda gained, lost: energy.reindex())

        async def read_committed() -> Committed:
            return await committed_offsets(kafka, settings.group_id, consumer.topics)

        rebalancer = Rebalancer(
            controller, me, read_committed=read_committed,
            fence=lambda transactional_id: fence(kafka, transactional_id),
            partition_count=lambda: readclock.partition_counts.get(Topic.CP_STATUS, 0),
        )
        consumer = KafkaConsumerLoop(
            kafka,
            Routes()
            .add(DriverRequest, timed_requests(controller, metrics))
            .add(CPStatus, controller.handle_status)
            .add(CPTelemetry, controller.handle_telemetry),
            group_id=settings.group_id,
            group_instance_id=settings.instance,
            assignor=SamePartitionAssignor(settings.instance),
            session_timeout_ms=SESSION_TIMEOUT_MS,
            rebalance=rebalancer,
            start_at="earliest",
            stats=stats,
            on_consumed=controller.outbox.consumed,  # committed by its transactions
            after_batch=controller.flush,  # the batch's decisions, in one transaction
            observe=metrics.handler_observer(),
            clock=readclock,
            max_records=BATCH_MAX,  # a backlog in steps of ~0.3 s, not one of seconds
        )
        async def recreated(names: list[str]) -> None:
            """The broker lost its topics and Central recreated them (SPEC §4): read them
            from offset 0 again, and commit that, not the lost topics' offsets."""
            controller.outbox.restart_topics(names)
            await consumer.restart_topics(names)

        bus.on_recreated = recreated
        metrics.add(BusCollector(stats, [consumer], lambda: bus.connected))

        async def health() -> dict[str, Any]:
            # At most 1 s for the database, behind a big write included: /health answers
            # within its 2 s whatever floods Central (SPEC §5).
            db_ok, busy = await repo.probe(within=1.0)
            kafka_ok = bus.connected and bus.topics_ok
            return {
                "status": "ok" if db_ok and kafka_ok else "degraded",
                "instance": settings.instance,
                "partitions": sorted(ownership.owned),
                "kafka": {"connected": bus.connected, "topics_ok": bus.topics_ok,
                          "topics_problem": bus.topics_problem,
                          "bootstrap": settings.kafka_bootstrap, **stats.as_dict()},
                "database": {"ok": db_ok, "busy": busy, "path": where},
                "tcp": tcp.stats(),
            }

        tasks = TaskOwner("EV Central")
        # Any door (SPEC §9, network.py); on SQLite this Central is alone: nobody to ask.
        directory = (None if isinstance(repo, SqliteRepository)
                     else Directory(ownership, repo.load_centrals))
        network = Network(directory, token=token, stats=controller.stats)
        feeds = PeerFeeds(network, ownership)
        app = create_api(controller, api_token=token, health=health, energy=energy,
                         network=network, feeds=feeds)
        mount_metrics(app, metrics)
        EnergyNetwork(energy, network, token=token).mount(app)  # smart charging, §9
        http = HttpServer(app, settings.http_host, settings.http_port, name="HTTP API",
                          tasks=tasks)
        tcp = TcpControlServer(controller, settings.listen_host, settings.listen_port, token,
                               allow_anonymous=settings.allow_anonymous, network=network)
        shutdown = Shutdown(
            ("TCP control plane", tcp.stop),
            ("HTTP API", http.stop),
            ("background tasks", tasks.close),
            ("smart charging", energy.close),
            ("controller", controller.close),
            ("claims", rebalancer.leave),
            ("Kafka consumer", consumer.stop),
            ("Kafka producer", bus.stop),
            ("peers", network.close),
        )
        try:
            await until_stopped(stop, bus.start())
            # The CPs, their sessions and the flushes a crash left (this instance's or
            # another's) are loaded as the group assigns partitions (rebalance.py).
            await energy.load(settings.site_limit_map)
            await http.start()
            await tcp.start()
            await until_stopped(stop, consumer.start())
            tasks.spawn(consumer.run(), "Kafka consumer", forever=True)
            tasks.spawn(
                housekeeping.run(controller, settings.health_snapshot_interval,
                                 settings.history_retention_days),
                "housekeeping", forever=True,
            )
            tasks.spawn(energy.run(), "smart charging", forever=True)
            tasks.spawn(feeds.run(), "dashboard peers", forever=True)
            tasks.spawn(Membership(rebalancer).run(), "membership", forever=True)
            # Ready once the group has given this instance its partitions and their CPs
            # are loaded (another instance may hold them all: then ready without), unless
            # it is stopped or a task fails first.
            ended = asyncio.ensure_future(tasks.wait(stop))
            settled = asyncio.ensure_future(ownership.wait_settled(READY_WAIT))
            try:
                await asyncio.wait({ended, settled}, return_when=asyncio.FIRST_COMPLETED)
                if not ended.done():
                    if not settled.result():
                        logger.warning("no partitions assigned within {:g}s (the group's "
                                       "other Centrals may hold them all)", READY_WAIT)
                    logger.info("EV Central ready: dashboard http://localhost:{}/ (instance "
                                "{}, partitions {})", http.port, settings.instance,
                                sorted(ownership.owned))
                return EXIT_FAILURE if await ended else EXIT_OK
            finally:
                for waiting in (ended, settled):
                    waiting.cancel()
        except OSError as exc:
            logger.critical("{} (change --http-port / --listen-port)", exc)
            return EXIT_FAILURE
        except Stopped:
            logger.info("stopped while starting")
            return EXIT_OK
        except BusError as exc:
            logger.critical("{}", exc)
            return EXIT_FAILURE
        finally:
            logger.info("shutting down")
            await shutdown.run()
            logger.info("EV Central stopped")


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(
        CentralSettings, argv, "python -m evcharging.apps.ev_central.main", DESCRIPTION
    )
    setup_logging("ev_central", settings.log_level, settings.log_json)
    tune_for_many_connections()  # tens of thousands of CPs' views and sessions (see the module)
    return run_service(lambda stop: run(settings, stop))


if __name__ == "__main__":
    sys.exit(main())
