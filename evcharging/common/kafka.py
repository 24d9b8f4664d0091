"""The message bus: Kafka topics of SPEC §2 through aiokafka.

Over 400 lines: the producer, the consumer loop (validation, retries of transient
handler errors, per-batch settling, commits, lag) and topic creation are one adapter of one
port, sharing its retry and logging rules; the port itself is :mod:`evcharging.common.bus`.

* :class:`KafkaBus` owns one producer and creates the topics at start (idempotently).
* :class:`KafkaConsumerLoop` consumes some topics, validates each message with its model,
  hands it to the handler registered for its topic and commits offsets after handling.

A message that fails validation is logged with topic, partition and offset, counted in
:class:`BusStats` and skipped; a handler that raises is logged and counted too. Neither
stops a consumer. While the broker is unreachable, starting retries with backoff and says
so in one log line (then once more every ``_RETRY_LOG_EVERY`` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    InvalidTxnState,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.partitioner import murmur2
from loguru import logger
from pydantic import ValidationError

from evcharging.common.bus import (
    TOPIC_MODELS,
    BusError,
    Fenced,
    Routes,
    Topic,
    TransientError,
    key_of,
    topic_of,
)
from evcharging.common.messages import Message, decode, encode
from evcharging.common.readclock import ReadClock

__all__ = [
    "BusError",
    "BusStats",
    "KafkaBus",
    "KafkaConfig",
    "KafkaConsumerLoop",
    "KafkaSecurity",
    "Routes",
    "Topic",
    "batch_by_partition",
    "committed_offsets",
    "ensure_topics",
    "fence",
    "partition_for_key",
    "partitions_for_keys",
    "repair_topics",
    "retry",
]

_RETRY_LOG_EVERY = 30.0
_RETRY_FIRST_DELAY = 0.1
_RETRY_MAX_DELAY = 5.0
_TOPIC_ALREADY_EXISTS = 36
TRANSACTION_TIMEOUT_MS = 300_000
"""How long the broker lets a transaction stay open before it aborts it (and fences its
producer). Central's transactions last milliseconds; a longer limit lets a stalled Central
(a paused process, a slow disk) finish its flush afterwards instead of being fenced, and
costs nothing when Central crashes: its successor's start aborts the open transaction."""
TRANSACTION_RETRY_BACKOFF_MS = 20
"""How soon Central's transactional producer asks the broker again (aiokafka: 100; 20 is
aiokafka's own wait between transactions). While the broker is down it asks this often
too: about 4 % of a core, its per-attempt errors filtered (evcharging.common.logging)."""
METADATA_MAX_AGE_MS = 5000
TRANSACTION_ATTEMPT_TIMEOUT = 20.0
"""Seconds one transaction may take to be delivered and committed before it is given up
(aborted, and tried again)."""
RENEW_PRODUCER_AFTER = 30.0
"""Seconds of failing transactions after which the producer is replaced (a broker that
lost its data answers the old producer's transactions with errors for ever)."""
REPAIR_TIMEOUT = 10.0
"""Seconds one attempt to recreate lost topics may take (a half-up broker must not hold
the probe, and with it /health, for longer)."""
LOG_APPEND_TIME = 1
"""A record's ``timestamp_type`` when the broker stamped it (topic config
``message.timestamp.type=LogAppendTime``)."""


T = TypeVar("T")


@dataclass
class BusStats:
    """Counters a service can show on its health endpoint."""

    produced: int = 0
    consumed: int = 0
    invalid: int = 0
    handler_errors: int = 0
    handler_retries: int = 0
    publish_errors: int = 0
    dropped_by_rebalance: int = 0
    """Messages fetched before a rebalance and read again after it (not handled twice)."""
    invalid_by_topic: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "produced": self.produced,
            "consumed": self.consumed,
            "invalid": self.invalid,
            "handler_errors": self.handler_errors,
            "handler_retries": self.handler_retries,
            "publish_errors": self.publish_errors,
            "invalid_by_topic": dict(self.invalid_by_topic),
        }


SecurityProtocol = Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL"]


@dataclass(frozen=True)
class KafkaSecurity:
    """How a client authenticates to the broker (SPEC §11): SASL SCRAM-SHA-512, over TLS
    with ``SASL_SSL``; ``PLAINTEXT`` (the default) sends no credentials."""

    protocol: SecurityProtocol = "PLAINTEXT"
    username: str | None = None
    password: str | None = None
    ssl_cafile: str | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> KafkaSecurity:
        """From a service's settings (:class:`~evcharging.common.config.ServiceSettings`:
        ``kafka_security_protocol``, ``kafka_sasl_username``, ``kafka_sasl_password``,
        ``kafka_ssl_cafile``), which checked that SASL has a user and a password."""
        password = settings.kafka_sasl_password
        cafile = settings.kafka_ssl_cafile
        return cls(
            protocol=settings.kafka_security_protocol,
            username=settings.kafka_sasl_username,
            password=password.get_secret_value() if password is not None else None,
            ssl_cafile=str(cafile) if cafile is not None else None,
        )

    def __repr__(self) -> str:  # never show the password in a log line or a traceback
        return (f"KafkaSecurity(protocol={self.protocol!r}, username={self.username!r}, "
                f"password={'***' if self.password else None}, ssl_cafile={self.ssl_cafile!r})")

    def client_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every aiokafka client (producer, consumer, admin) takes."""
        if self.protocol == "PLAINTEXT":
            return {}
        kwargs: dict[str, Any] = {
            "security_protocol": self.protocol,
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": self.username,
            "sasl_plain_password": self.password,
        }
        if self.protocol == "SASL_SSL":
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(cafile=self.ssl_cafile)
        return kwargs


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str
    client_id: str
    topic_prefix: str = ""
    partitions: int = 3
    connect_timeout: float = 300.0
    """How long start() keeps retrying an unreachable broker before BusError."""
    linger_ms: int = 2
    """How long the producer waits to batch messages: 2 ms costs little latency and
    spares the broker thousands of one-message requests a second at 10,000 CPs."""
    max_batch_size: int = 1024 * 1024
    """Bytes the producer buffers per partition. aiokafka keeps one open batch per
    partition and makes ``send`` wait while it is full and not yet sent; with its 16 KiB
    default (about 50 messages) a 10,000-CP fleet under load waited past the request
    timeout and lost tens of thousands of messages (benchmarks/fleet_bench.py). Within
    the broker's default ``message.max.bytes`` (1 MiB + 12)."""

    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    """Credentials for a broker that authenticates its clients (SPEC §11)."""

    @classmethod
    def from_settings(cls, settings: Any, client_id: str, **more: Any) -> KafkaConfig:
        """A service's Kafka settings (:class:`~evcharging.common.config.ServiceSettings`:
        bootstrap, topic prefix and partitions, security), under `client_id`."""
        return cls(bootstrap=settings.kafka_bootstrap, client_id=client_id,
                   topic_prefix=settings.topic_prefix, partitions=settings.topic_partitions,
                   security=KafkaSecurity.from_settings(settings), **more)

    def topic_name(self, topic: Topic) -> str:
        return f"{self.topic_prefix}{topic.value}"

    def client_kwargs(self) -> dict[str, Any]:
        """Bootstrap, client id and security: what every aiokafka client is given."""
        return {"bootstrap_servers": self.bootstrap, "client_id": self.client_id,
                **self.security.client_kwargs()}


async def retry(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    first_delay: float = 0.25,
    max_delay: float = 5.0,
) -> T:
    """Run `attempt` until it succeeds, backing off; BusError once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    delay = first_delay
    last_log = -_RETRY_LOG_EVERY
    while True:
        try:
            return await attempt()
        except (KafkaError, OSError) as exc:
            now = time.monotonic()
            if now >= deadline:
                raise BusError(f"{what}: gave up after {timeout:.0f}s: {exc!r}") from exc
            if now - last_log >= _RETRY_LOG_EVERY:
                logger.warning("{} failed ({!r}); retrying with backoff", what, exc)
                last_log = now
            await asyncio.sleep(min(delay, max(deadline - now, 0.0)))
            delay = min(delay * 2, max_delay)


APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}
"""Every topic the project creates is stamped by the broker (SPEC §4): ages are measured
with the broker's append time, never with a producer's clock."""
_NOT_AUTHORIZED = (29, 31)  # TOPIC_ / CLUSTER_AUTHORIZATION_FAILED


class TopicsMissing(KafkaError):  # type: ignore[misc]  # aiokafka has no types
    """The topics do not exist and this client may not create them (SPEC §11)."""


async def ensure_topics(
    config: KafkaConfig, topics: Iterable[Topic], *, stamp: bool = False
) -> dict[str, list[int]]:
    """Create the topics that do not exist yet, stamped with the broker's append time
    (existing ones keep their partitions). A client that may not create topics waits for
    them to appear. With `stamp` (Central), an existing topic that keeps the producer's
    time is changed to the broker's append time.

    Returns the partition ids of each topic, once the broker reports them all.
    """
    names = [config.topic_name(t) for t in topics]

    async def attempt() -> dict[str, list[int]]:
        admin = AIOKafkaAdminClient(**config.client_kwargs())
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [n for n in names if n not in existing]
            if missing:
                await _create(admin, missing, config.partitions)
            if stamp:
                await _stamp(admin, [n for n in names if n in existing])
            for _ in range(100):
                described = await admin.describe_topics(names)
                partitions = {
                    t["topic"]: sorted(p["partition"] for p in t["partitions"])
                    for t in described
                    if t["error_code"] == 0
                    and t["partitions"]
                    and all(p["leader"] >= 0 for p in t["partitions"])
                }
                if all(n in partitions for n in names):
                    return partitions
                await asyncio.sleep(0.1)
            raise BusError(f"topics {names} have no partitions after creation")
        finally:
            await admin.close()

    return await retry(
        f"reaching Kafka at {config.bootstrap}", attempt, timeout=config.connect_timeout
    )


async def repair_topics(
    config: KafkaConfig, expected: Mapping[str, int], found: Mapping[str, int]
) -> None:
    """Create the topics that are gone (0 partitions found) with their expected partition
    count, and add partitions to those that have fewer (e.g. auto-created with one)."""
    admin = AIOKafkaAdminClient(**config.client_kwargs())
    await admin.start()
    try:
        gone = [name for name, count in found.items() if count == 0]
        for name in gone:
            await _create(admin, [name], expected[name])
        fewer = {name: NewPartitions(total_count=expected[name])
                 for name, count in found.items() if 0 < count < expected[name]}
        if fewer:
            await admin.create_partitions(fewer)
            logger.warning("partitions added back: {}", ", ".join(
                f"{name} to {new.total_count}" for name, new in fewer.items()))
            await _stamp(admin, list(fewer))  # auto-created: it kept the producers' time
    finally:
        await admin.close()


async def _create(admin: AIOKafkaAdminClient, names: list[str], partitions: int) -> None:
    response = await admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=1, topic_configs=APPEND_TIME)
         for n in names]
    )
    for error in response.topic_errors:
        name, code = error[0], error[1]
        if code in _NOT_AUTHORIZED:
            raise TopicsMissing(f"topic {name} does not exist and this client may not create "
                                "it; waiting for EV Central to create it")
        if code not in (0, _TOPIC_ALREADY_EXISTS):
            raise BusError(f"could not create topic {name}: error code {code}")
    logger.info("created topics {} ({} partitions each)", ", ".join(names), partitions)


_TOPIC_OVERRIDE = 1
"""DescribeConfigs' config source of a value set on the topic itself (DYNAMIC_TOPIC_CONFIG)."""


async def _stamp(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    """Change topics that keep the producer's time to the broker's append time. The
    legacy AlterConfigs call replaces a topic's whole configuration, so the topic's own
    settings (retention, cleanup policy, …) are sent back with the change."""
    if not names:
        return
    key = "message.timestamp.type"
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
    )
    changes: dict[str, dict[str, str]] = {}
    for response in responses:
        for error, _, _, name, entries in response.resources:
            if error != 0:
                continue
            current = {entry[0]: entry[1] for entry in entries}
            if current.get(key) == "LogAppendTime":
                continue
            own = {entry[0]: entry[1] for entry in entries
                   if entry[3] == _TOPIC_OVERRIDE and entry[1] is not None}
            changes[name] = {**own, **APPEND_TIME}
    if not changes:
        return
    try:
        responses = await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, configs)
             for name, configs in changes.items()]
        )
        refused = [f"{r[3]}: error code {r[0]}" for response in responses
                   for r in response.resources if r[0] != 0]
        if refused:
            raise BusError("; ".join(refused))
    except (KafkaError, BusError) as exc:
        logger.error("topics {} keep the producers' time and could not be changed ({}): "
                     "their messages are dated when Central reads them",
                     ", ".join(changes), exc)
        return
    logger.warning("topics {} kept the producers' time: changed to the broker's append time",
                   ", ".join(changes))


async def committed_offsets(
    config: KafkaConfig, group_id: str, topics: Iterable[Topic]
) -> dict[tuple[str, int], tuple[int, str]]:
    """The group's committed offsets and their metadata for every partition of `topics`
    ((topic name, partition) → (offset, metadata)); offset 0 and metadata "" where the
    group has none (it starts from the beginning there)."""
    names = [config.topic_name(t) for t in topics]

    async def attempt() -> dict[tuple[str, int], tuple[int, str]]:
        admin = AIOKafkaAdminClient(**config.client_kwargs())
        await admin.start()
        try:
            described = await admin.describe_topics(names)
            partitions = [TopicPartition(t["topic"], p["partition"])
                          for t in described if t["error_code"] == 0
                          for p in t["partitions"]]
            found = await admin.list_consumer_group_offsets(group_id, partitions=partitions)
        finally:
            await admin.close()
        result = {(tp.topic, tp.partition): (0, "") for tp in partitions}
        for tp, committed in found.items():
            if committed.offset >= 0 and (tp.topic, tp.partition) in result:
                result[(tp.topic, tp.partition)] = (committed.offset, committed.metadata or "")
        return result

    return await retry(f"reading the offsets of group {group_id}", attempt,
                       timeout=config.connect_timeout)


async def fence(config: KafkaConfig, transactional_id: str) -> None:
    """Take `transactional_id` from whoever had it: the broker aborts its open
    transaction and refuses its producer from now on (a crashed Central's, whose
    partitions this one gained, SPEC §9)."""

    async def attempt() -> None:
        producer = AIOKafkaProducer(**config.client_kwargs(), transactional_id=transactional_id,
                                    enable_idempotence=True, acks="all",
                                    transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
                                    retry_backoff_ms=TRANSACTION_RETRY_BACKOFF_MS)
        try:
            await producer.start()  # InitProducerId: the old epoch is fenced
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()

    await retry(f"fencing the transactional id {transactional_id}", attempt,
                timeout=config.connect_timeout)


class KafkaBus:
    """A producer of typed messages, keyed as SPEC §2 says. An async context manager.

    While started it asks the broker for metadata every ``probe_interval`` seconds, so
    :attr:`connected` turns False within ``probe_interval + PROBE_TIMEOUT`` seconds of the
    broker becoming unreachable (a health endpoint reports it), and True again once it
    answers. Each change is logged once, as is the first failed delivery of an outage.
    """

    PROBE_TIMEOUT = 3.0

    def __init__(
        self,
        config: KafkaConfig,
        stats: BusStats | None = None,
        *,
        probe_interval: float = 2.0,
        stamp_topics: bool = False,
        transactional_id: str | None = None,
        offsets_group: str | None = None,
    ) -> None:
        if (transactional_id is None) != (offsets_group is None):
            raise ValueError("a transactional bus needs both transactional_id and offsets_group")
        self.config = config
        self.stats = stats or BusStats()
        self.probe_interval = probe_interval
        self.stamp_topics = stamp_topics
        """Central's bus (SPEC §4): at start, change existing topics that keep the
        producer's time to the broker's append time; while running, watch the topics and
        recreate them when the broker lost or changed them (:attr:`topics_ok`)."""
        self._expected: dict[str, int] = {}
        self.on_recreated: Callable[[list[str]], Awaitable[None]] | None = None
        """Told the names of the topics it recreated: they start again from offset 0."""
        self.topics_problem: str | None = None
        """Why the topics are not as Central made them (None: they are)."""
        self.transactional_id = transactional_id
        """With it, messages leave only by :meth:`commit_transaction`, with the consumed
        offsets of ``offsets_group`` (SPEC §4, exactly once); :meth:`publish` refuses."""
        self.offsets_group = offsets_group
        self._producer: AIOKafkaProducer | None = None
        self._connected = False
        self._probe_task: asyncio.Task[None] | None = None
        self._probe_stop = asyncio.Event()
        self._delivery_failing = False
        self._committed_at = time.monotonic()
        """When a transaction last committed (or the producer started)."""
        self._topic_names: dict[type[Message], str] = {}
        self._partition_cache: dict[tuple[bytes, int], int] = {}
        """(key, partition count) → index among the sorted partitions (murmur2 is Python)."""

    @property
    def connected(self) -> bool:
        """Whether the broker answered the last probe (False before start and after stop)."""
        return self._connected

    async def start(self, topics: Iterable[Topic] = tuple(Topic)) -> None:
        found = await ensure_topics(self.config, topics, stamp=self.stamp_topics)
        self._expected = {name: len(partitions) for name, partitions in found.items()}
        self._producer = await self._new_producer()
        self._connected = True
        self._committed_at = time.monotonic()
        logger.info("Kafka producer connected to {}", self.config.bootstrap)
        self._probe_stop = asyncio.Event()
        self._probe_task = asyncio.create_task(self._probe_loop(), name="kafka-probe")

    async def _new_producer(self) -> AIOKafkaProducer:
        """A started producer (transactional: registered with the transaction
        coordinator, which fences any older producer of the same id)."""

        async def attempt() -> AIOKafkaProducer:
            delivery: dict[str, Any] = {"acks": 1} if self.transactional_id is None else {
                "transactional_id": self.transactional_id,
                "enable_idempotence": True,
                "acks": "all",
                "transaction_timeout_ms": TRANSACTION_TIMEOUT_MS,
                # A transaction follows the last one at once: the broker answers
                # CONCURRENT_TRANSACTIONS until the last one's markers are written (and
                # Kafka 4's partition verification NOT_ENOUGH_REPLICAS now and then);
                # aiokafka's default 100 ms before asking again doubled make bench's p90.
                "retry_backoff_ms": TRANSACTION_RETRY_BACKOFF_MS,
            }
            producer = AIOKafkaProducer(
                **self.config.client_kwargs(),
                **delivery,
                linger_ms=self.config.linger_ms,
                max_batch_size=self.config.max_batch_size,
                request_timeout_ms=15000,
            )
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            return producer

        return await retry(
            f"connecting a producer to {self.config.bootstrap}",
            attempt,
            timeout=self.config.connect_timeout,
        )

    async def _renew_producer(self) -> None:
        """Replace a transactional producer whose transactions keep failing: a broker
        that lost its data has no transaction coordinator state for it any more, and
        answers its transactions with errors aiokafka retries for ever."""
        old, self._producer = self._producer, None
        logger.warning("transactions have failed for {:.0f}s: starting a new transactional "
                       "producer", time.monotonic() - self._committed_at)
        if old is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await old.stop()
        self._producer = await self._new_producer()
        self._committed_at = time.monotonic()

    async def stop(self) -> None:
        """Flush and close; safe to call twice."""
        producer, self._producer = self._producer, None
        probe, self._probe_task = self._probe_task, None
        self._connected = False
        if probe is not None:
            # Let a probe in flight finish rather than cancel it inside aiokafka's connection
            # code (which can leave a connection open); cancel only if it overruns.
            self._probe_stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(probe), self.PROBE_TIMEOUT + 1)
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
        if producer is not None:
            await producer.stop()

    async def _probe_loop(self) -> None:
        while not self._probe_stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._probe_stop.wait(), self.probe_interval)
            if self._probe_stop.is_set():
                return
            reachable = await self._probe()
            if self._probe_stop.is_set():
                return
            if reachable != self._connected:
                if reachable:
                    logger.info("Kafka at {} answers again", self.config.bootstrap)
                else:
                    logger.error("Kafka at {} does not answer", self.config.bootstrap)
            self._connected = reachable

    async def _probe(self) -> bool:
        producer = self._producer
        if producer is None:
            return False
        try:
            async with asyncio.timeout(self.PROBE_TIMEOUT):
                metadata = await producer.client.fetch_all_metadata()
        except (KafkaError, OSError, TimeoutError):
            return False
        if self.stamp_topics:
            await self._check_topics(metadata)
        return True

    @property
    def topics_ok(self) -> bool:
        """Whether the topics are as Central found or made them at start."""
        return self.topics_problem is None

    async def _check_topics(self, metadata: Any) -> None:
        """Recreate topics the broker lost, and add partitions it dropped (SPEC §4): a
        broker that lost its data must not leave Central reading nothing."""
        wrong: dict[str, int] = {}
        for name, expected in self._expected.items():
            partitions = metadata.partitions_for_topic(name)
            count = len(partitions) if partitions else 0
            if count > expected:  # partitions can't be taken away: go on with them
                logger.error("topic {} has {} partitions, more than the {} Central made: "
                             "its keys now map to other partitions", name, count, expected)
                self._expected[name] = count
            elif count < expected:
                wrong[name] = count
        if not wrong:
            if self.topics_problem is not None:
                logger.warning("topics are back as they were: {}", ", ".join(self._expected))
                self.topics_problem = None
            return
        problem = "; ".join(f"{name} has {count} partition(s), not {self._expected[name]}"
                            if count else f"{name} is gone" for name, count in wrong.items())
        if self.topics_problem is None:
            logger.error("the broker lost or changed Central's topics ({}): recreating them",
                         problem)
        self.topics_problem = problem
        try:
            async with asyncio.timeout(REPAIR_TIMEOUT):
                await repair_topics(self.config, {n: self._expected[n] for n in wrong}, wrong)
        except (KafkaError, BusError, OSError, TimeoutError) as exc:
            logger.debug("repairing the topics failed: {!r}", exc)
            return
        recreated = [name for name, count in wrong.items() if count == 0]
        if recreated and self.on_recreated is not None:
            await self.on_recreated(recreated)

    async def __aenter__(self) -> KafkaBus:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def publish(self, message: Message, *, wait: bool = True) -> None:
        """Send one message on its model's topic, keyed as SPEC §2 says.

        With ``wait`` (the default) this returns once the broker has acknowledged it and
        raises BusError when it could not be delivered. Without, it returns as soon as the
        message is queued in the producer (which keeps the order per partition); a failed
        delivery is then logged and counted in ``stats.publish_errors``.
        """
        if self._producer is None:
            raise BusError("the bus is not started")
        if self.transactional_id is not None:
            raise BusError("a transactional bus sends with commit_transaction")
        topic = topic_of(message)
        key = key_of(message)
        try:
            delivery = await self._producer.send(
                self.config.topic_name(topic), encode(message), key=key
            )
            if wait:
                await delivery
            else:
                delivery.add_done_callback(lambda done: self._delivered(topic, done))
        except KafkaError as exc:
            self.stats.publish_errors += 1
            raise BusError(f"could not publish to {topic.value}: {exc!r}") from exc
        self.stats.produced += 1

    @property
    def transactional(self) -> bool:
        """Whether messages leave only in transactions (:meth:`commit_transaction`)."""
        return self.transactional_id is not None

    async def commit_transaction(
        self,
        messages: Sequence[Message],
        offsets: Mapping[tuple[str, int], int],
        *,
        metadata: str,
        payloads: Sequence[bytes] | None = None,
    ) -> None:
        """Send `messages` and commit the consumer group's `offsets` (each with
        `metadata`) in ONE Kafka transaction: a ``read_committed`` reader sees all of it
        or none. BusError when it did not commit (it was aborted: try again); Fenced when
        this producer may never send again (another instance took its transactional id).
        Not to be called again before a call has returned.

        `payloads`, when given, are the messages already encoded (:func:`encode`, one
        each, in order): the outbox encodes them once for its database row and for Kafka.
        The messages leave in one record batch per partition (:func:`batch_by_partition`),
        each partition's in their order, not one ``send`` each."""
        producer = self._producer
        if producer is None or self.offsets_group is None:
            raise BusError("the transactional bus is not started")
        if payloads is None:
            payloads = [encode(m) for m in messages]
        elif len(payloads) != len(messages):
            raise ValueError(f"{len(payloads)} payloads for {len(messages)} messages")
        began = False
        try:
            # The whole attempt has a deadline: a broker that lost its data can leave a
            # step (the offsets' coordinator, say) waiting for ever.
            async with asyncio.timeout(TRANSACTION_ATTEMPT_TIMEOUT):
                await producer.begin_transaction()
                began = True
                deliveries = await self._send_batches(producer, messages, payloads)
                if offsets:
                    await producer.send_offsets_to_transaction(
                        {TopicPartition(t, p): (o, metadata) for (t, p), o in offsets.items()},
                        self.offsets_group,
                    )
                await asyncio.gather(*deliveries)
                await producer.commit_transaction()
        except (KafkaError, AssertionError, TimeoutError) as exc:  # aiokafka asserts states
            self.stats.publish_errors += 1
            if self._fenced(producer, exc):
                raise Fenced(f"transactional id {self.transactional_id}: {exc!r}") from exc
            if (isinstance(exc, (TimeoutError, InvalidTxnState, OutOfOrderSequenceNumber))
                    or self._broken(producer)
                    or time.monotonic() - self._committed_at > RENEW_PRODUCER_AFTER):
                await self._renew_producer()  # the old one's transaction dies with it
                raise BusError(f"transaction aborted: {exc!r}") from exc
            if began:
                try:
                    async with asyncio.timeout(TRANSACTION_ATTEMPT_TIMEOUT):
                        await producer.abort_transaction()
                except (KafkaError, AssertionError, TimeoutError):
                    if self._fenced(producer, exc):
                        raise Fenced(f"transactional id {self.transactional_id}: "
                                     f"{exc!r}") from exc
                    await self._renew_producer()
            raise BusError(f"transaction aborted: {exc!r}") from exc
        self._committed_at = time.monotonic()
        self.stats.produced += len(messages)

    async def _send_batches(
        self, producer: AIOKafkaProducer, messages: Sequence[Message],
        payloads: Sequence[bytes],
    ) -> list[asyncio.Future[Any]]:
        """Queue the messages in record batches, one per partition (a full one is queued
        and the next begun), with the partition aiokafka's default partitioner would
        choose; the futures of their deliveries. Order is kept within each partition."""
        known: dict[str, tuple[int, ...]] = {}
        keyed: list[tuple[str, bytes, bytes]] = []
        for message, payload in zip(messages, payloads, strict=True):
            name = self._topic_names.get(type(message))
            if name is None:
                name = self._topic_names[type(message)] = self.config.topic_name(
                    topic_of(message))
            if name not in known:
                known[name] = tuple(sorted(await producer.partitions_for(name)))
            keyed.append((name, key_of(message), payload))
        deliveries: list[asyncio.Future[Any]] = []
        for (name, partition), records in batch_by_partition(
                keyed, known, self._partition_cache).items():
            batch = producer.create_batch()
            for key, payload in records:
                if batch.append(key=key, value=payload, timestamp=None) is not None:
                    continue
                if batch.record_count() == 0:
                    raise MessageSizeTooLargeError(
                        f"a message of {len(payload)} bytes does not fit a record batch")
                deliveries.append(await producer.send_batch(batch, name, partition=partition))
                batch = producer.create_batch()
                if batch.append(key=key, value=payload, timestamp=None) is None:
                    raise MessageSizeTooLargeError(
                        f"a message of {len(payload)} bytes does not fit a record batch")
            batch.close()
            deliveries.append(await producer.send_batch(batch, name, partition=partition))
        return deliveries

    @staticmethod
    def _fenced(producer: AIOKafkaProducer, exc: BaseException) -> bool:
        """Another producer took this transactional id (another Central): never send
        again. Any other fatal state of aiokafka's (a broker that lost its data and knows
        the producer no more) is :meth:`_broken`, and a new producer mends it."""
        fenced = (ProducerFenced, TransactionalIdAuthorizationFailed)
        if isinstance(exc, fenced):
            return True
        return isinstance(KafkaBus._fatal_cause(producer), fenced)

    @staticmethod
    def _broken(producer: AIOKafkaProducer) -> bool:
        txn_manager = getattr(producer, "_txn_manager", None)
        return bool(txn_manager is not None and txn_manager.is_fatal_error())

    @staticmethod
    def _fatal_cause(producer: AIOKafkaProducer) -> BaseException | None:
        """Why aiokafka's transaction manager turned fatal, if it did."""
        txn_manager = getattr(producer, "_txn_manager", None)
        waiter = getattr(txn_manager, "_transaction_waiter", None)
        if not KafkaBus._broken(producer) or waiter is None or not waiter.done():
            return None
        return None if waiter.cancelled() else waiter.exception()

    async def flush(self) -> None:
        """Wait until every message sent so far has been delivered (or has failed)."""
        if self._producer is not None:
            await self._producer.flush()

    def _delivered(self, topic: Topic, delivery: asyncio.Future[Any]) -> None:
        if delivery.cancelled():
            return
        exc = delivery.exception()
        if exc is None:
            if self._delivery_failing:
                self._delivery_failing = False
                logger.info("messages are delivered again")
            return
        self.stats.publish_errors += 1
        if not self._delivery_failing:  # once per outage, not once per message
            self._delivery_failing = True
            logger.error("a message to {} was not delivered: {!r} (further failures are "
                         "counted, not logged, until delivery works again)", topic.value, exc)


StartAt = Literal["earliest", "latest"]


class Rebalance(Protocol):
    """What a group member does when a rebalance takes its partitions and gives new ones
    (Central, SPEC §9). Both run while the loop handles no batch."""

    async def revoked(self) -> None:
        """Every partition is about to be given up: settle what was read."""

    async def assigned(self, assigned: frozenset[TopicPartition]) -> Mapping[
            TopicPartition, int]:
        """These are the partitions now: get ready to read them; returns the offsets
        to read some of them from (the others resume at the group's committed offsets)."""
        ...


class _Restarts(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka has no types
    """Keeps a recreated topic's partitions from being read from a stale offset, and
    tells a :class:`Rebalance` of each rebalance, between batches."""

    def __init__(self, loop: KafkaConsumerLoop) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        loop = self._loop
        if loop.rebalance is not None:
            async with loop._batch_lock:
                loop._generation += 1
                await loop.rebalance.revoked()

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        loop = self._loop
        if loop.rebalance is not None:
            async with loop._batch_lock:
                loop._generation += 1
                start = await loop.rebalance.assigned(frozenset(assigned))
                consumer = loop._consumer
                if consumer is not None:
                    for tp, offset in start.items():
                        consumer.seek(tp, offset)
        await loop._reassigned(assigned)


def partition_for_key(key: str, partitions: Sequence[int]) -> int:
    """The partition a producer sends `key` to: Kafka's default partitioner (murmur2 of
    the key's bytes, positive, modulo the partition count), as aiokafka and Java do it."""
    ordered = sorted(partitions)
    index = int(murmur2(key.encode())) & 0x7FFFFFFF
    return ordered[index % len(ordered)]


PARTITION_CACHE_MAX = 100_000
"""Keys whose partition :func:`batch_by_partition` remembers before it starts afresh."""


def batch_by_partition(
    records: Iterable[tuple[str, bytes, bytes]],
    partitions: Mapping[str, Sequence[int]],
    cache: dict[tuple[bytes, int], int] | None = None,
) -> dict[tuple[str, int], list[tuple[bytes, bytes]]]:
    """Group (topic name, key, value) records by the partition Kafka's default
    partitioner sends each key to (as :func:`partition_for_key`; `partitions`: each
    topic's partition ids, sorted), keeping their order within each partition; groups in
    the order of their first record. `cache` remembers each key's partition index."""
    groups: dict[tuple[str, int], list[tuple[bytes, bytes]]] = {}
    memo: dict[tuple[bytes, int], int] = {} if cache is None else cache
    for name, key, value in records:
        ordered = partitions[name]
        count = len(ordered)
        index = memo.get((key, count))
        if index is None:
            if len(memo) >= PARTITION_CACHE_MAX:
                memo.clear()
            index = memo[(key, count)] = (int(murmur2(key)) & 0x7FFFFFFF) % count
        group = groups.get((name, ordered[index]))
        if group is None:
            group = groups[(name, ordered[index])] = []
        group.append((key, value))
    return groups


def partitions_for_keys(keys: Iterable[str], partitions: Sequence[int]) -> list[int]:
    """The partitions that messages with these keys go to, in order."""
    return sorted({partition_for_key(key, partitions) for key in keys})


class KafkaConsumerLoop:
    """Consume `handlers`' topics; each message is validated, handled, then committed.

    With a ``group_id`` the loop joins a consumer group and resumes from the group's
    committed offsets (``start_at`` applies when the group has none). A
    ``group_instance_id`` makes it a static member: a restart after a crash takes the
    place of the dead member at once instead of waiting for its session to time out.
    Offsets of handled messages are committed at most every ``commit_interval`` seconds
    while messages flow, and at once when the topics go quiet or the loop is cancelled.
    ``before_commit`` runs before each commit: Central flushes its producer there, so the
    answers to the messages it commits have reached the broker. ``after_batch`` runs after
    the messages of each batch were handled and before their offsets may be committed
    (Central writes the batch's decisions there, in one transaction); while it has not
    finished, the batch's offsets are not committed, not even at shutdown. ``on_lag`` is
    told after each fetch how many messages are still unread on the assigned partitions
    (:attr:`lag` per partition; 0 when the loop has caught up). ``observe`` is told each
    handled message's topic and the seconds its handler took, retries included (metrics).
    ``on_consumed`` (Central's transactional outbox) is told each partition's next offset
    as soon as a message is handled; the loop then commits nothing itself: the offsets
    leave with the decisions they caused, in one Kafka transaction (SPEC §4, exactly
    once). Every consumer reads ``read_committed``: a transaction is seen whole or not.
    Without a group it reads every partition itself, from ``start_at``, and commits
    nothing: that suits a client that only wants what happens from now on (a driver, a
    CP engine).
    """

    def __init__(
        self,
        config: KafkaConfig,
        routes: Routes,
        *,
        group_id: str | None = None,
        group_instance_id: str | None = None,
        start_at: StartAt = "latest",
        stats: BusStats | None = None,
        fetch_max_wait_ms: int = 100,
        before_commit: Callable[[], Awaitable[None]] | None = None,
        commit_interval: float = 0.2,
        keys: Iterable[str] | None = None,
        after_batch: Callable[[], Awaitable[None]] | None = None,
        on_lag: Callable[[int], None] | None = None,
        observe: Callable[[Topic, float], None] | None = None,
        on_consumed: Callable[[TopicPartition, int], None] | None = None,
        clock: ReadClock | None = None,
        assignor: Any = None,
        session_timeout_ms: int = 10000,
        rebalance: Rebalance | None = None,
        max_records: int | None = None,
    ) -> None:
        if not routes:
            raise ValueError("a consumer needs at least one topic")
        if keys is not None and group_id is not None:
            raise ValueError("keys select partitions by hand: they need group_id=None")
        self.config = config
        self.routes = routes
        self.keys = None if keys is None else frozenset(keys)
        """With keys, only the partitions these message keys go to are read (a CP engine
        or a fleet reads the central.commands of its own CPs, not every command)."""
        self.group_id = group_id
        self.group_instance_id = group_instance_id
        self.start_at = start_at
        self.stats = stats or BusStats()
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._before_commit = before_commit
        self._after_batch = after_batch
        self._on_lag = on_lag
        self._observe = observe
        if on_consumed is not None and group_id is None:
            raise ValueError("on_consumed commits a group's offsets: it needs a group_id")
        self._on_consumed = on_consumed
        self.clock = clock
        """Told each message's append time and each partition's read progress (Central
        measures ages and silences with it, SPEC §4)."""
        self._answered: dict[TopicPartition, int | None] = {}
        self._recreated: set[str] = set()
        """Topics Central recreated after the broker lost them (:meth:`restart_topics`)."""
        self._new_era: dict[TopicPartition, int] = {}
        """Where this loop got to in a recreated topic's partitions."""
        self.lag: dict[TopicPartition, int] = {}
        """Messages not yet read, per assigned partition, as of the last fetch."""
        self._positions: dict[TopicPartition, int] = {}
        self._unsettled = False
        """Messages were handled whose batch's after_batch has not finished."""
        self.commit_interval = commit_interval
        self._handled: dict[TopicPartition, int] = {}
        self._last_commit = 0.0
        self._names = {config.topic_name(t): t for t in routes}
        self._consumer: AIOKafkaConsumer | None = None
        self._assigned = asyncio.Event()
        self.assignor = assignor
        """The group's partition assignor (None: aiokafka's round robin)."""
        self.session_timeout_ms = session_timeout_ms
        self.rebalance = rebalance
        self.max_records = max_records
        """The most messages one batch hands out (None: all that were fetched). A
        backlog then comes in batches of a bounded time to handle: Central, whose batch
        is handled without a pause and then flushed in one transaction, answers HTTP and
        runs its watchdogs between them instead of seconds later."""
        self._batch_lock = asyncio.Lock()
        """Held while a batch is handled and while a rebalance is told: never both."""
        self._generation = 0
        """Counts rebalances: a batch fetched before one is not handled after it."""

    @property
    def topics(self) -> Sequence[Topic]:
        return self.routes.topics

    async def start(self) -> None:
        partitions = await ensure_topics(self.config, self.routes.topics)
        if self.clock is not None:
            for name, topic in self._names.items():
                self.clock.partition_counts[topic] = len(partitions[name])

        async def attempt() -> AIOKafkaConsumer:
            consumer = AIOKafkaConsumer(
                **self.config.client_kwargs(),
                group_id=self.group_id,
                group_instance_id=self.group_instance_id,
                enable_auto_commit=False,
                isolation_level="read_committed",  # a transaction is seen whole or not
                auto_offset_reset=self.start_at,
                fetch_max_wait_ms=self._fetch_max_wait_ms,
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=1000,
                **({} if self.assignor is None
                   else {"partition_assignment_strategy": (self.assignor,)}),
                # Notice within seconds that topics were lost and recreated (or gained
                # partitions), not after aiokafka's default 5 minutes.
                metadata_max_age_ms=METADATA_MAX_AGE_MS,
            )
            try:
                await consumer.start()
                if self.group_id is None:
                    await self._assign_all(consumer, partitions)
                else:
                    consumer.subscribe(list(self._names), listener=_Restarts(self))
            except BaseException:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                raise
            return consumer

        self._consumer = await retry(
            f"connecting a consumer to {self.config.bootstrap}",
            attempt,
            timeout=self.config.connect_timeout,
        )
        if self.group_id is None:
            self._assigned.set()

    async def _assign_all(
        self, consumer: AIOKafkaConsumer, known: Mapping[str, Sequence[int]]
    ) -> None:
        partitions = [
            TopicPartition(name, p)
            for name in self._names
            for p in (known[name] if self.keys is None
                      else partitions_for_keys(self.keys, known[name]))
        ]
        consumer.assign(partitions)
        if self.start_at == "latest":
            await consumer.seek_to_end(*partitions)
        else:
            await consumer.seek_to_beginning(*partitions)
        # Resolve the positions now, so that nothing published after start() is missed.
        for tp in partitions:
            await consumer.position(tp)

    async def restart_topics(self, names: Iterable[str]) -> None:
        """These topics were recreated (the broker lost them): their partitions start
        again at offset 0, so read them from the beginning, now and after any rebalance
        (the group's committed offsets, from before, must not skip new messages)."""
        consumer = self._consumer
        self._recreated.update(names)
        if consumer is None:
            return
        for tp in consumer.assignment():
            if tp.topic in self._recreated:
                self._positions.pop(tp, None)
                self._new_era[tp] = 0
                consumer.seek(tp, 0)
        logger.warning("reading the recreated topics {} from their beginning",
                       ", ".join(sorted(set(names))))

    async def _reassigned(self, assigned: Iterable[TopicPartition]) -> None:
        """A rebalance gave these partitions: a recreated topic's are read from where
        this loop got to since the topic came back, never from an older committed
        offset."""
        consumer = self._consumer
        if consumer is None:
            return
        for tp in assigned:
            if tp.topic in self._recreated:
                consumer.seek(tp, self._new_era.get(tp, 0))

    async def wait_assigned(self, timeout: float = 30.0) -> None:
        """Wait until this consumer has partitions to read (a group member got its share)."""
        await asyncio.wait_for(self._assigned.wait(), timeout)

    async def stop(self) -> None:
        """Close; safe to call twice."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def __aenter__(self) -> KafkaConsumerLoop:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def run(self) -> None:
        """Consume until cancelled."""
        consumer = self._consumer
        if consumer is None:
            raise BusError("the consumer is not started")
        try:
            await self._consume(consumer)
        finally:
            # Cancelled (shutdown) or failed: commit what was handled, so that a restart
            # handles again only what was not; but not a batch whose after_batch did not
            # finish (its decisions may be unrecorded: a restart decides them again).
            if not self._unsettled:
                await self._commit(consumer)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        failing_since: float | None = None
        while True:
            generation = self._generation
            try:
                batch = await consumer.getmany(timeout_ms=1000, max_records=self.max_records)
            except KafkaError as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    logger.warning("consuming {} failed ({!r}); retrying", list(self._names), exc)
                elif time.monotonic() - failing_since > self.config.connect_timeout:
                    raise BusError(f"consuming failed for too long: {exc!r}") from exc
                await asyncio.sleep(1.0)
                continue
            if failing_since is not None:
                logger.info("consuming {} again", list(self._names))
                failing_since = None
            if consumer.assignment():
                self._assigned.set()
            async with self._batch_lock:
                if generation != self._generation:
                    # A rebalance happened while this batch was fetched: not handled now.
                    # Each partition still assigned reads again from the batch's first
                    # record (fetched before the rebalance, that is where the committed
                    # offsets put it anyway; fetched after, the position had moved past
                    # them); the others come again to their new owner.
                    self._unread(consumer, batch)
                    continue
                await self._handle_batch(batch)
            await self._measure_lag(consumer)
            if self.clock is not None:
                self._tell_progress(consumer, self.clock)
            # Commit at most every commit_interval while messages flow, and at once when
            # the topics go quiet.
            if not batch or time.monotonic() - self._last_commit >= self.commit_interval:
                await self._commit(consumer)

    def _unread(self, consumer: AIOKafkaConsumer,
                batch: Mapping[TopicPartition, Sequence[Any]]) -> None:
        assigned = consumer.assignment()
        for tp, records in batch.items():
            if records:
                self.stats.dropped_by_rebalance += len(records)
                if tp in assigned:
                    consumer.seek(tp, records[0].offset)

    async def _handle_batch(self, batch: Mapping[TopicPartition, Sequence[Any]]) -> None:
        clock = self.clock
        if clock is not None:
            clock.tick()
        # Per message (tens of thousands a second at Central): what it needs, in locals.
        names, handle, on_consumed = self._names, self._handle, self._on_consumed
        handled, positions, recreated = self._handled, self._positions, self._recreated
        for tp, records in batch.items():
            if records:
                self._unsettled = True
            topic = names[tp.topic]
            for record in records:
                if clock is not None:
                    clock.arrived(topic, record.partition,
                                  record.timestamp / 1000
                                  if record.timestamp_type == LOG_APPEND_TIME else None)
                await handle(record.topic, record.partition, record.offset, record.value)
                if clock is not None:
                    clock.handled()
                next_offset = record.offset + 1
                if recreated and record.topic in recreated:
                    self._new_era[tp] = next_offset
                handled[tp] = next_offset
                if on_consumed is not None:
                    on_consumed(tp, next_offset)
                positions[tp] = next_offset
        if self._after_batch is not None and self._unsettled:
            await self._after_batch()
        self._unsettled = False

    def _tell_progress(self, consumer: AIOKafkaConsumer, clock: ReadClock) -> None:
        """Tell the clock which partitions the broker answered a fetch for since the
        last batch, and which of them Central has read to the end; and which it no
        longer reads (given up in a rebalance, or gone with a lost topic)."""
        assigned = consumer.assignment()
        owned = {(self._names[tp.topic], tp.partition) for tp in assigned}
        for topic, partition in clock.known():
            if (topic, partition) not in owned:
                clock.forget(topic, partition)
        for tp in assigned:
            answered_at = consumer.last_poll_timestamp(tp)
            answered = answered_at is not None and answered_at != self._answered.get(tp)
            self._answered[tp] = answered_at
            clock.fetched(self._names[tp.topic], tp.partition, answered=answered,
                          caught_up=self.lag.get(tp, 1) == 0)

    async def _measure_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Unread messages per partition: the partition's end (as of the last fetch)
        less the position after what was handled."""
        assigned = consumer.assignment()
        for tp in list(self.lag):
            if tp not in assigned:
                del self.lag[tp]
                self._positions.pop(tp, None)
        for tp in assigned:
            # read_committed: the end is the last stable offset (a transaction's marker
            # is never handed out, and the consumer's position steps over it).
            stable = consumer.last_stable_offset(tp)
            end = stable if stable is not None and stable >= 0 else consumer.highwater(tp)
            if end is None:
                continue
            try:
                position = self._positions[tp] = await consumer.position(tp)
            except KafkaError:
                position = self._positions.get(tp)
                if position is None:
                    continue
            self.lag[tp] = max(0, end - position)
        if self._on_lag is not None:
            self._on_lag(sum(self.lag.values()))

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        offsets, self._handled = self._handled, {}
        self._last_commit = time.monotonic()
        if self.group_id is None or self._on_consumed is not None or not offsets:
            return  # with on_consumed, the offsets leave in the outbox's transactions
        try:
            if self._before_commit is not None:
                await self._before_commit()
            await consumer.commit(offsets)
        except KafkaError as exc:
            logger.warning("could not commit offsets {}: {!r}", offsets, exc)

    async def _handle(self, name: str, partition: int, offset: int, value: bytes | None) -> None:
        topic = self._names[name]
        self.stats.consumed += 1
        try:
            message = decode(TOPIC_MODELS[topic], value or b"")
        except ValidationError as exc:
            self.stats.invalid += 1
            self.stats.invalid_by_topic[topic.value] = (
                self.stats.invalid_by_topic.get(topic.value, 0) + 1
            )
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "message"
            logger.warning(
                "skipped invalid message on {} partition {} offset {}: {}: {} ({} error(s))",
                name, partition, offset, where, first["msg"], exc.error_count(),
            )
            return
        handler = self.routes.handler(topic)
        started = time.perf_counter()
        delay = _RETRY_FIRST_DELAY
        retries = 0
        while True:
            try:
                await handler(message)
            except TransientError as exc:
                # Not committed, not skipped: the same message again, after a pause.
                self.stats.handler_retries += 1
                if retries == 0:
                    logger.warning(
                        "handler for {} cannot finish partition {} offset {} now ({}); "
                        "retrying with backoff, offset not committed",
                        name, partition, offset, exc,
                    )
                retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_DELAY)
                continue
            except Exception:  # noqa: BLE001 - one bad message must not stop the consumer
                self.stats.handler_errors += 1
                logger.exception(
                    "handler for {} failed on partition {} offset {}", name, partition, offset
                )
            if retries:
                logger.info("handler for {} done with offset {} after {} retries",
                            name, offset, retries)
            if self._observe is not None:
                self._observe(topic, time.perf_counter() - started)
            return
