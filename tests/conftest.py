"""Shared fixtures: a real Kafka broker for integration and end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import hypothesis  # noqa: F401 - see below
import pytest

from evcharging.devtools.kafka_broker import KafkaBroker

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
