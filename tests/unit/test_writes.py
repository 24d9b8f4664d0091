"""Central's typed writes (ev_central/writes.py) and how the adapters batch them."""

from __future__ import annotations

from datetime import UTC, datetime

from evcharging.apps.ev_central import sql, writes
from evcharging.apps.ev_central.records import CPRecord, HealthSnapshot
from evcharging.apps.ev_central.writes import Write
from evcharging.common.states import CPState

T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)


def test_every_write_has_a_table_parameters_and_a_statement() -> None:
    kinds = {getattr(writes, name) for name in writes.__all__ if name != "Write"}
    assert set(sql.TABLES) == set(sql.PARAMS) == set(sql.STATEMENTS) == kinds


def test_runs_keep_each_tables_order_and_group_what_follows_itself() -> None:
    def health(cp_id: str) -> writes.HealthRecorded:
        return writes.HealthRecorded(
            HealthSnapshot(cp_id, CPState.ACTIVATED, False, "CLOSED", T0))

    batch: list[Write] = [
        writes.CPUpserted(CPRecord("CP-1"), T0), health("CP-1"),
        writes.CPUpserted(CPRecord("CP-2"), T0), health("CP-2"),
        writes.SessionFinished("S-1", "FAILED", kwh=1.0, euros=0.0, reason="x", ended_at=T0),
        writes.CPForgotten("CP-3"),
        writes.CompletedByMeter("S-1", "corrected"),
        writes.HealthPruned(T0),
        writes.CPUpserted(CPRecord("CP-4"), T0),
        writes.PendingSaved("c-1", "c-1:r:7", "[]", "[]"),
    ]
    runs = sql.runs(batch)
    assert [(kind.__name__, len(params)) for kind, params in runs] == [
        ("CPUpserted", 2), ("CPForgotten", 1), ("CPUpserted", 1),  # cp_registry, in order
        ("HealthRecorded", 2), ("HealthPruned", 1),  # cp_health_history, in order
        ("SessionFinished", 1), ("CompletedByMeter", 1),  # charging_sessions, in order
        ("PendingSaved", 1),
    ]
    assert [params[0][0] for _, params in runs[:3]] == ["CP-1", "CP-3", "CP-4"]
    assert sum(len(params) for _, params in runs) == len(batch)
    assert sql.runs([]) == []
