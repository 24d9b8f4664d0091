"""The chaos table: every fault run in this session, printed at the end of the run."""

from __future__ import annotations

import pytest

from tests.chaos.harness import Outcome, format_table

OUTCOMES = pytest.StashKey[list[Outcome]]()


@pytest.fixture
def chaos_outcomes(request: pytest.FixtureRequest) -> list[Outcome]:
    """Where a chaos test puts its row of the table."""
    return request.config.stash.setdefault(OUTCOMES, [])


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    outcomes = config.stash.get(OUTCOMES, [])
    if not outcomes:
        return
    terminalreporter.section("chaos: the ledger after each fault")
    for line in format_table(outcomes):
        terminalreporter.write_line(line)
