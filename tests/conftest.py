"""Shared fixtures: a real Kafka broker and a real PostgreSQL for integration and end-to-end
tests."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401 - see below
import pytest

from evcharging.devtools.kafka_broker import KafkaBroker
from evcharging.devtools.postgres import LocalPostgres

# hypothesis is imported here, at the start, not by its pytest plugin's end-of-run summary:
# CPython 3.11's AST compiler shares its recursion counter between threads (gh-106905),
# and a run that never imported hypothesis otherwise compiled it at the very end, beside
# threads the tests had left (aiosqlite's, the broker's log readers), and failed the
# whole run with "SystemError: AST constructor recursion depth mismatch".


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a Kafka broker: ``$KAFKA_BOOTSTRAP``, else one started for the session.

    The broker is real (see ``evcharging.devtools.kafka_broker``); if it cannot be started the
    fixture raises, so the tests using it fail loudly instead of being skipped.
    """
    external = os.environ.get("KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    with KafkaBroker(work_dir=tmp_path_factory.mktemp("kafka")) as broker:
        yield broker.bootstrap


SASL_TOPIC_PREFIXES = ("", "sasl-e2e.")
"""Topic prefixes the SASL broker grants the ACLs of SPEC §11 for."""


@pytest.fixture(scope="session")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A real broker of SPEC §11 for the session: SASL SCRAM-SHA-512 and the ACLs of the
    principals ``central``, ``cp`` and ``driver`` on the topics of each of
    :data:`SASL_TOPIC_PREFIXES` (``sasl_broker.sasl_users`` has the passwords, with the
    super user ``admin`` for setting things up)."""
    with KafkaBroker(
        work_dir=tmp_path_factory.mktemp("kafka-sasl"), sasl=True,
        topic_prefixes=SASL_TOPIC_PREFIXES,
    ) as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    """A real PostgreSQL for the session (``evcharging.devtools.postgres``, free port, new
    cluster without fsync), stopped and deleted at the end; if it cannot be started the
    fixture raises. Its folder is a new one under the system's temp folder: run as root, the
    server runs as the user ``postgres``, who may not enter pytest's ``/tmp/pytest-of-root``."""
    work = Path(tempfile.mkdtemp(prefix="evcharging-postgres-"))
    try:
        with LocalPostgres(work_dir=work, durable=False) as server:
            yield server
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: LocalPostgres) -> Iterator[str]:
    """CENTRAL_DB_URL of a throwaway database for the session, owned by the user
    ``evcharging`` (``postgres_server.create_database`` makes more)."""
    name = f"evcharging_test_{uuid.uuid4().hex[:12]}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


@pytest.fixture
def database_url(postgres_server: LocalPostgres, request: pytest.FixtureRequest
                 ) -> Iterator[str]:
    """CENTRAL_DB_URL of a database of the test's own (named after its module), dropped
    after it: a Central (or several) that starts empty."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")[:30]
    name = f"{module}_{uuid.uuid4().hex[:12]}"
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)
