"""Fixtures shared by the unit tests of Central: its two ports, as test doubles."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from loguru import logger

from evcharging.apps.ev_central import housekeeping
from evcharging.apps.ev_central.controller import Controller
from evcharging.apps.ev_central.energy import Energy
from evcharging.apps.ev_central.repository import SqliteRepository
from evcharging.common.messages import CPStatus, CPTelemetry, DriverRequest
from tests.unit.fakes import RecordingPublisher


@pytest.fixture
def logs() -> Iterator[list[tuple[str, str]]]:
    """(level, message) of every log line while the test runs."""
    records: list[tuple[str, str]] = []
    sink_id = logger.add(
        lambda m: records.append((m.record["level"].name, m.record["message"])),
        level="DEBUG",
        format="{message}",
    )
    yield records
    logger.remove(sink_id)


@pytest.fixture
async def repo() -> AsyncIterator[SqliteRepository]:
    """A real SQLite repository in memory (test_repository.py has its own, on a file)."""
    async with SqliteRepository(":memory:") as repository:
        yield repository


@pytest.fixture
def bus() -> RecordingPublisher:
    """A publisher that records what Central would send on Kafka."""
    return RecordingPublisher()


class FlushingController(Controller):
    """Central as its consumer drives it: each message handled, then the batch flushed.

    The flush is one attempt (the consumer retries it): a database that cannot be written
    raises StorageError here, with the decision kept for the next flush.
    """

    async def handle_request(self, request: DriverRequest) -> None:
        await super().handle_request(request)
        await self.outbox.flush()

    async def handle_status(self, status: CPStatus) -> None:
        await super().handle_status(status)
        await self.outbox.flush()

    async def handle_telemetry(self, telemetry: CPTelemetry) -> None:
        await super().handle_telemetry(telemetry)
        await self.outbox.flush()

    async def check_silent_cps(self) -> list[str]:
        marked = housekeeping.check_silent_cps(self)
        await self.outbox.flush()
        return marked

    async def check_monitors(self) -> list[str]:
        lost = housekeeping.check_monitors(self)
        await self.outbox.flush()
        return lost

    async def snapshot_health(self) -> int:
        count = housekeeping.snapshot_health(self)
        await self.outbox.flush()
        return count


@pytest.fixture
async def controller(bus: RecordingPublisher, repo: SqliteRepository
                     ) -> AsyncIterator[FlushingController]:
    """Central with its default options (a test module overrides it for others)."""
    central = FlushingController(bus, repo)
    yield central
    await central.close()


@pytest.fixture
async def energy(controller: Controller) -> AsyncIterator[Energy]:
    """The smart-charging job on `controller`, loaded; its own timer an hour away."""
    job = Energy(controller, interval=3600.0)
    await job.load()
    yield job
    await job.close()
