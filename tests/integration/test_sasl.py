"""Who may write to the bus (SPEC §11), on a real broker with SASL SCRAM-SHA-512 and ACLs.

Each principal does what §11's table lists, and the broker itself refuses everything else:
writes and reads of other topics, topic creation, consumer groups and transactional ids
outside Central's, a wrong password, a client without SASL. Then a real Central, CP engine
and driver, configured only by ``KAFKA_SECURITY_PROTOCOL`` and the passwords that
``start --sasl`` writes to ``.env``, run a session end to end while a forged command from
the driver's principal is refused. A CP that starts before Central waits for the topics it
may not create, and the command line's ``start --sasl`` writes the passwords into ``.env``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from loguru import logger

from evcharging.apps.ev_central import main as central_main
from evcharging.apps.ev_cp_e import main as engine_main
from evcharging.apps.ev_driver import main as driver_main
from evcharging.common.bus import Topic
from evcharging.common.config import CentralSettings, CPEngineSettings, DriverSettings
from evcharging.common.kafka import BusError, KafkaBus, KafkaConfig, KafkaSecurity, ensure_topics
from evcharging.common.messages import CentralCommand, CommandType
from evcharging.devtools.kafka_broker import KafkaBroker, KafkaBrokerError, run_dir
from evcharging.devtools.kafka_broker.sasl import SaslUsers
from evcharging.devtools.process import free_port
from tests.conftest import SASL_TOPIC_PREFIXES
from tests.polling import poll

pytestmark = pytest.mark.integration

TOPICS = ("driver.requests", "driver.updates", "central.commands", "cp.status", "cp.telemetry")
# SPEC §11's table: principal -> (may write, may read).
RIGHTS = {
    "central": ({"central.commands", "driver.updates"},
                {"driver.requests", "cp.status", "cp.telemetry"}),
    "cp": ({"cp.status", "cp.telemetry"}, {"central.commands"}),
    "driver": ({"driver.requests"}, {"driver.updates"}),
}
CASES = [(principal, topic) for principal in RIGHTS for topic in TOPICS]
E2E_PREFIX = SASL_TOPIC_PREFIXES[1]
TIMEOUT = 30.0


def sasl(broker: KafkaBroker, user: str, password: str | None = None) -> dict[str, Any]:
    """aiokafka arguments of ``user`` on the SASL broker."""
    return {
        "bootstrap_servers": broker.bootstrap,
        **KafkaSecurity(
            "SASL_PLAINTEXT", user, password or broker.sasl_users.password(user)
        ).client_kwargs(),
    }


@pytest.fixture(scope="module")
async def topics(sasl_broker: KafkaBroker) -> AsyncIterator[None]:
    """The five unprefixed topics, created by the super user, each with one message."""
    admin = AIOKafkaAdminClient(**sasl(sasl_broker, "admin"))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        await admin.create_topics([NewTopic(t, 1, 1) for t in TOPICS if t not in existing])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(**sasl(sasl_broker, "admin"))
    await producer.start()
    try:
        for topic in TOPICS:
            await asyncio.wait_for(producer.send_and_wait(topic, b"{}", key=b"seed"), TIMEOUT)
    finally:
        await producer.stop()
    yield


async def write(broker: KafkaBroker, user: str, topic: str, **extra: Any) -> None:
    producer = AIOKafkaProducer(**sasl(broker, user), **extra)
    await producer.start()
    try:
        await asyncio.wait_for(producer.send_and_wait(topic, b"{}", key=b"k"), TIMEOUT)
    finally:
        await producer.stop()


async def read_one(broker: KafkaBroker, user: str, topic: str) -> None:
    consumer = AIOKafkaConsumer(**sasl(broker, user), group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await asyncio.wait_for(consumer.getone(), TIMEOUT)
    finally:
        await consumer.stop()


@pytest.mark.usefixtures("topics")
@pytest.mark.parametrize(("principal", "topic"), CASES)
async def test_a_principal_writes_only_the_topics_of_its_row(
    sasl_broker: KafkaBroker, principal: str, topic: str
) -> None:
    if topic in RIGHTS[principal][0]:
        await write(sasl_broker, principal, topic)
    else:
        with pytest.raises(TopicAuthorizationFailedError):
            await write(sasl_broker, principal, topic)


@pytest.mark.usefixtures("topics")
@pytest.mark.parametrize(("principal", "topic"), CASES)
async def test_a_principal_reads_only_the_topics_of_its_row(
    sasl_broker: KafkaBroker, principal: str, topic: str
) -> None:
    if topic in RIGHTS[principal][1]:
        await read_one(sasl_broker, principal, topic)
    else:
        with pytest.raises(TopicAuthorizationFailedError):
            await read_one(sasl_broker, principal, topic)


@pytest.mark.parametrize("principal", ["central", "cp", "driver", "nobody"])
async def test_a_wrong_password_or_an_unknown_user_is_refused(
    sasl_broker: KafkaBroker, principal: str
) -> None:
    producer = AIOKafkaProducer(**sasl(sasl_broker, principal, "not-the-password"))
    try:
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(producer.start(), TIMEOUT)
    finally:
        await producer.stop()


async def test_a_client_without_sasl_is_refused(sasl_broker: KafkaBroker) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=sasl_broker.bootstrap,
                                request_timeout_ms=3000, metadata_max_age_ms=3000)
    try:
        with pytest.raises((KafkaConnectionError, TimeoutError)):
            await asyncio.wait_for(producer.start(), 10)
    finally:
        await producer.stop()


@pytest.mark.parametrize("principal", ["central", "cp", "driver"])
async def test_only_central_creates_topics(sasl_broker: KafkaBroker, principal: str) -> None:
    name = f"{E2E_PREFIX}{TOPICS[0]}" if principal == "central" else TOPICS[0] + ".new"
    admin = AIOKafkaAdminClient(**sasl(sasl_broker, principal))
    await admin.start()
    try:
        if principal == "central":  # its own topic, under a prefix the broker granted
            if name not in await admin.list_topics():
                response = await admin.create_topics([NewTopic(name, 1, 1)])
                assert [e[1] for e in response.topic_errors] == [0]
            assert name in await admin.list_topics()
        else:
            response = await admin.create_topics([NewTopic(name, 1, 1)])
            assert [e[1] for e in response.topic_errors] == [
                TopicAuthorizationFailedError.errno
            ]
    finally:
        await admin.close()


async def test_topics_are_never_auto_created(sasl_broker: KafkaBroker) -> None:
    name = f"auto-{uuid.uuid4().hex}"
    producer = AIOKafkaProducer(**sasl(sasl_broker, "admin"), request_timeout_ms=2000)
    await producer.start()
    try:
        with pytest.raises((KafkaError, TimeoutError)):
            await asyncio.wait_for(producer.send_and_wait(name, b"{}"), 5)
    finally:
        await producer.stop()
    admin = AIOKafkaAdminClient(**sasl(sasl_broker, "admin"))
    await admin.start()
    try:
        assert name not in await admin.list_topics()
    finally:
        await admin.close()


@pytest.mark.usefixtures("topics")
@pytest.mark.parametrize(("principal", "group"), [
    ("central", "ev-central-sasl-test"),
    ("cp", "ev-central-sasl-test"),
    ("driver", "ev-central-sasl-test"),
    ("central", "someone-else"),
])
async def test_only_central_joins_its_consumer_groups(
    sasl_broker: KafkaBroker, principal: str, group: str
) -> None:
    topic = next(iter(RIGHTS[principal][1]))
    consumer = AIOKafkaConsumer(topic, **sasl(sasl_broker, principal), group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    try:
        if principal == "central" and group.startswith("ev-central"):
            await consumer.start()
            await asyncio.wait_for(consumer.getone(), TIMEOUT)
            await consumer.commit()
        else:
            with pytest.raises(GroupAuthorizationFailedError):
                await consumer.start()
                await asyncio.wait_for(consumer.getone(), TIMEOUT)
    finally:
        await consumer.stop()


@pytest.mark.usefixtures("topics")
@pytest.mark.parametrize(("principal", "transactional_id"), [
    ("central", "ev-central-sasl-test"),
    ("central", "someone-else"),
    ("cp", "ev-central-sasl-test"),
    ("driver", "ev-central-sasl-test"),
])
async def test_only_central_writes_transactions(
    sasl_broker: KafkaBroker, principal: str, transactional_id: str
) -> None:
    topic = next(iter(RIGHTS[principal][0]))
    producer = AIOKafkaProducer(**sasl(sasl_broker, principal),
                                transactional_id=transactional_id)
    try:
        if principal == "central" and transactional_id.startswith("ev-central"):
            await producer.start()
            async with producer.transaction():
                await producer.send(topic, b"{}", key=b"k")
        else:
            with pytest.raises(TransactionalIdAuthorizationFailed):
                await asyncio.wait_for(producer.start(), TIMEOUT)
    finally:
        await producer.stop()


# ---------------------------------------------------------------- the services themselves


@pytest.fixture
def sasl_env(sasl_broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What a user has after ``start --sasl``: the passwords (in the environment here, as
    `.env` would give them) and ``KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT``."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    for principal in ("central", "cp", "driver"):
        monkeypatch.setenv(f"KAFKA_{principal.upper()}_PASSWORD",
                           sasl_broker.sasl_users.password(principal))


async def topics_exist(broker: KafkaBroker, prefix: str) -> bool:
    admin = AIOKafkaAdminClient(**sasl(broker, "admin"))
    await admin.start()
    try:
        return {prefix + t for t in TOPICS} <= set(await admin.list_topics())
    finally:
        await admin.close()


@pytest.mark.usefixtures("sasl_env")
async def test_central_engine_and_driver_charge_on_the_sasl_broker_and_forgery_fails(
    sasl_broker: KafkaBroker, tmp_path: Path
) -> None:
    bootstrap = sasl_broker.bootstrap
    db_path = tmp_path / "central.db"
    stop = asyncio.Event()
    central = CentralSettings(
        kafka_bootstrap=bootstrap, topic_prefix=E2E_PREFIX, http_port=free_port(),
        listen_port=free_port(), db_path=db_path, group_id="ev-central-sasl-e2e",
        start_timeout=20.0,
    )
    assert (central.kafka_sasl_username, central.kafka_security_protocol) == (
        "central", "SASL_PLAINTEXT")
    engine = CPEngineSettings(
        kafka_bootstrap=bootstrap, topic_prefix=E2E_PREFIX, cp_id="CP-S1",
        health_port=free_port(), session_seconds=2.0, telemetry_interval=0.5,
        status_interval=1.0,
    )
    requests = tmp_path / "requests.txt"
    requests.write_text("CP-S1\n", encoding="utf-8")
    driver = DriverSettings(
        kafka_bootstrap=bootstrap, topic_prefix=E2E_PREFIX, driver_id="driver-sasl",
        requests_file=requests, request_interval=0.0, request_timeout=40.0,
    )
    tasks = [asyncio.create_task(central_main.run(central, stop))]
    try:
        await poll(lambda: topics_exist(sasl_broker, E2E_PREFIX), timeout=TIMEOUT,
                   what="Central created its topics")
        tasks.append(asyncio.create_task(engine_main.run(engine, stop)))

        async def activated() -> bool:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{central.http_port}") as c:
                cp = await c.get("/cp/CP-S1")
            return cp.status_code == 200 and cp.json()["state"] == "ACTIVATED"

        await poll(activated, timeout=TIMEOUT, what="CP-S1 ACTIVATED at Central",
                   retry_on=(httpx.HTTPError,))
        # The driver's principal forges a command to the CP: the broker refuses it.
        forger = KafkaBus(KafkaConfig(
            bootstrap=bootstrap, client_id="forger", topic_prefix=E2E_PREFIX,
            security=KafkaSecurity("SASL_PLAINTEXT", "driver",
                                   sasl_broker.sasl_users.password("driver")),
        ))
        await forger.start(topics=())
        try:
            with pytest.raises(BusError, match="TopicAuthorizationFailed"):
                await forger.publish(CentralCommand(cp_id="CP-S1", cmd=CommandType.SHUTDOWN))
        finally:
            await forger.stop()

        assert await asyncio.wait_for(driver_main.run(driver, stop), 60) == 0
        with sqlite3.connect(db_path) as db:
            sessions = db.execute("SELECT status FROM charging_sessions WHERE cp_id = 'CP-S1'"
                                  ).fetchall()
        assert sessions == [("COMPLETED",)]
    finally:
        stop.set()
        codes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    assert codes == [0] * len(tasks), codes


async def test_a_cp_that_starts_before_central_waits_for_its_topics(
    sasl_broker: KafkaBroker,
) -> None:
    """The principal cp may not create topics: its bus waits until Central made them."""
    prefix = f"sasl-late-{uuid.uuid4().hex[:6]}."
    sasl_broker.grant(prefix)
    users = sasl_broker.sasl_users

    def config(principal: str) -> KafkaConfig:
        return KafkaConfig(bootstrap=sasl_broker.bootstrap, client_id=f"late-{principal}",
                           topic_prefix=prefix, connect_timeout=60,
                           security=KafkaSecurity("SASL_PLAINTEXT", principal,
                                                  users.password(principal)))

    waiting: list[str] = []
    sink = logger.add(lambda message: waiting.append(str(message)), level="WARNING")
    cp = KafkaBus(config("cp"))
    starting = asyncio.create_task(cp.start())
    try:
        await poll(lambda: starting.done() or any("may not create" in m for m in waiting),
                   timeout=TIMEOUT, what="the cp's bus waiting for its topics")
        assert not starting.done(), starting
        assert not await topics_exist(sasl_broker, prefix)
        await ensure_topics(config("central"), tuple(Topic))  # Central starts
        await asyncio.wait_for(starting, TIMEOUT)
    finally:
        logger.remove(sink)
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await cp.stop()


def test_the_cli_starts_a_sasl_broker_and_writes_the_passwords_into_env(
    tmp_path: Path,
) -> None:
    """`python -m evcharging.devtools.kafka_broker start --sasl`: the passwords go into the
    .env it is given (its other lines kept); a restart keeps them; `stop` ends it."""
    env = tmp_path / ".env"
    env.write_text("EVCHARGING_API_TOKEN=keep-me\nKAFKA_DRIVER_PASSWORD=chosen-before\n")
    data = tmp_path / "data"

    def cli(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "evcharging.devtools.kafka_broker", *args],
            capture_output=True, text=True, timeout=180, check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    out = cli("start", "--sasl", "--port", "0", "--data-dir", str(data), "--env-file", str(env))
    match = re.search(r"bootstrap 127\.0\.0\.1:(\d+)", out)
    assert match, out
    port = match[1]
    try:
        lines = env.read_text().splitlines()
        assert lines[:2] == ["EVCHARGING_API_TOKEN=keep-me", "KAFKA_DRIVER_PASSWORD=chosen-before"]
        users = SaslUsers.load(data)
        assert users is not None and users.password("driver") == "chosen-before"
        for principal in ("central", "cp"):
            assert f"KAFKA_{principal.upper()}_PASSWORD={users.password(principal)}" in lines
        cli("stop", "--port", port)
        cli("start", "--sasl", "--port", port, "--data-dir", str(data), "--env-file", str(env))
        assert SaslUsers.load(data) == users
        assert env.read_text().splitlines() == lines

        async def central_reaches_it() -> None:
            admin = AIOKafkaAdminClient(
                bootstrap_servers=f"127.0.0.1:{port}",
                **KafkaSecurity("SASL_PLAINTEXT", "central",
                                users.password("central")).client_kwargs())
            await admin.start()
            await admin.close()

        asyncio.run(central_reaches_it())
    finally:
        cli("stop", "--port", port)
    assert "not running" in subprocess.run(
        [sys.executable, "-m", "evcharging.devtools.kafka_broker", "status", "--port", port],
        capture_output=True, text=True, timeout=60, check=False).stdout
    assert not (run_dir(int(port)) / "broker.pid").exists()
    shutil.rmtree(run_dir(int(port)))  # its log and properties (the data was in tmp_path)


def test_a_sasl_broker_refuses_storage_formatted_without_its_users(tmp_path: Path) -> None:
    """Storage a plain broker formatted has no SCRAM users: say so (and how to start fresh)
    instead of starting a broker nobody can log in to."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.properties").write_text("node.id=1\n")
    broker = KafkaBroker(work_dir=tmp_path, sasl=True)
    with pytest.raises(KafkaBrokerError, match=r"formatted without SASL users.*--reset"):
        broker.start()
    assert not broker.running
