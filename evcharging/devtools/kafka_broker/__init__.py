"""Run a real, local Apache Kafka broker (KRaft, combined broker+controller) without Docker.

The broker is the genuine Apache Kafka server, started from the jars that Maven fetches from
Maven Central (see ``evcharging/devtools/pom.xml``). It needs ``java`` (17+) and, once, ``mvn``.

Jars
    Cached in ``<repo>/.cache/kafka/libs`` (git-ignored), or in the directory named by the
    environment variable ``EVCHARGING_KAFKA_CACHE``. They are fetched on first use (or with
    ``fetch``); a marker file written after a successful copy says the cache is complete, so an
    interrupted download is redone, and a file lock keeps concurrent fetches from colliding.

Command line::

    python -m evcharging.devtools.kafka_broker fetch                  # only download the jars
    python -m evcharging.devtools.kafka_broker start [--port 9092]    # daemon; prints bootstrap
    python -m evcharging.devtools.kafka_broker status [--port 9092]   # exit 0 running, 1 not
    python -m evcharging.devtools.kafka_broker stop [--port 9092]
    python -m evcharging.devtools.kafka_broker start --foreground     # until Ctrl-C / SIGTERM
    python -m evcharging.devtools.kafka_broker start --sasl --reset  # SPEC §11 (see below)

    A CLI broker keeps its state in ``<repo>/.cache/kafka/run/<port>/`` (``server.properties``,
    ``broker.log``, ``broker.pid``, ``bootstrap`` and, unless ``--data-dir`` says otherwise, the
    Kafka data in ``data/``); its data survives a stop/start, ``start --reset`` wipes it.

From Python (e.g. pytest)::

    from evcharging.devtools.kafka_broker import KafkaBroker

    with KafkaBroker(work_dir=tmp_path) as broker:   # free port, fresh KRaft storage
        use(broker.bootstrap)                         # "127.0.0.1:<port>"

Every broker refuses to create a topic on first use (``auto.create.topics.enable=false``).
``start --sasl`` / ``KafkaBroker(sasl=True)`` is the broker of SPEC §11 (:mod:`.sasl`):
SASL SCRAM-SHA-512 for every client, KRaft's ``StandardAuthorizer``, the users ``central``,
``cp`` and ``driver`` with the ACLs of §11 (``--topic-prefix`` for prefixed topics) and the
super users ``broker`` and ``admin``; the CLI writes the three passwords into ``.env``
(``--env-file``) and a new storage takes the ones ``.env`` already has.

``KafkaBroker.start()`` returns only once the broker answers a real Kafka request (a metadata
request through aiokafka) and raises :class:`KafkaBrokerError` with the tail of the broker log
if it does not; it never leaves a java process behind when it fails.

The modules, by responsibility: :mod:`.config` (defaults and paths), :mod:`.jars` (fetching
the jars, finding java), :mod:`.cds` (the class-data archive), :mod:`.probe` (is it ready),
:mod:`.broker` (:class:`KafkaBroker`), :mod:`.sasl` (users, ACLs, ``.env``), :mod:`.daemon`
(status and stop by work directory), :mod:`.cli` (the command line). Port and process
helpers are :mod:`evcharging.devtools.process`.
"""

from evcharging.devtools.kafka_broker.broker import KafkaBroker, new_cluster_id
from evcharging.devtools.kafka_broker.cli import main
from evcharging.devtools.kafka_broker.config import (
    CACHE_ENV,
    DEFAULT_JVM_OPTS,
    DEFAULT_PORT,
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    libs_dir,
    run_dir,
)
from evcharging.devtools.kafka_broker.daemon import BrokerStatus, broker_status, stop_broker
from evcharging.devtools.kafka_broker.errors import KafkaBrokerError
from evcharging.devtools.kafka_broker.jars import fetch_jars, find_java, jars_ready
from evcharging.devtools.process import free_port

__all__ = [
    "CACHE_ENV",
    "DEFAULT_JVM_OPTS",
    "DEFAULT_PORT",
    "DEFAULT_START_TIMEOUT",
    "DEFAULT_STOP_TIMEOUT",
    "BrokerStatus",
    "KafkaBroker",
    "KafkaBrokerError",
    "broker_status",
    "fetch_jars",
    "find_java",
    "free_port",
    "jars_ready",
    "libs_dir",
    "main",
    "new_cluster_id",
    "run_dir",
    "stop_broker",
]
