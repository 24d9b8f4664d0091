"""Fixtures shared by the unit tests of Central: its two ports, as test doubles."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from evcharging.apps.ev_central.repository import SqliteRepository
from tests.unit.fakes import RecordingPublisher


@pytest.fixture
async def repo() -> AsyncIterator[SqliteRepository]:
    """A real SQLite repository in memory (test_repository.py has its own, on a file)."""
    async with SqliteRepository(":memory:") as repository:
        yield repository


@pytest.fixture
def bus() -> RecordingPublisher:
    """A publisher that records what Central would send on Kafka."""
    return RecordingPublisher()
