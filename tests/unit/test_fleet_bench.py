"""benchmarks/fleet_bench.py's pure parts: the options, the CPs each Central owns, the rows
of the Centrals' table (the runs themselves: tests/e2e/test_bench_fleet.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from evcharging.common.kafka import partition_for_key

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "fleet_bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fleet_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fleet_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_centrals_default_to_one_on_sqlite_and_several_share_postgres(bench: ModuleType) -> None:
    one = bench.parse_args(["--sizes", "100"])
    assert one.centrals == (1,) and one.db_for(1) == "sqlite" and one.partitions == 12
    both = bench.parse_args(["--sizes", "10000", "--centrals", "1,2"])
    assert both.centrals == (1, 2)
    assert (both.db_for(1), both.db_for(2)) == ("sqlite", "postgres")
    forced = bench.parse_args(["--sizes", "100", "--centrals", "1,2", "--db", "postgres"])
    assert (forced.db_for(1), forced.db_for(2)) == ("postgres", "postgres")


@pytest.mark.parametrize("argv", [
    ["--centrals", "0"], ["--centrals", "one"], ["--centrals", ","],
    ["--centrals", "2", "--db", "sqlite"], ["--centrals", "4", "--partitions", "3"],
])
def test_bad_centrals_are_refused(bench: ModuleType, argv: list[str],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "100", *argv])
    assert "--" in capsys.readouterr().err


def test_the_cps_of_each_partition_are_the_producers_choice(bench: ModuleType) -> None:
    counts = bench.cps_by_partition(1000, 12)
    assert sum(counts.values()) == 1000 and set(counts) <= set(range(12))
    assert counts[partition_for_key("CP-00001", range(12))] >= 1
    assert all(n > 1000 / 12 / 2 for n in counts.values())  # murmur2 spreads them


def test_each_central_gets_a_row_with_its_share(bench: ModuleType) -> None:
    usage = {"central-1": bench.Usage(cpu=[40.0, 50.0], rss=[100.0]),
             "central-2": bench.Usage(cpu=[30.0, 30.0], rss=[90.0]),
             "fleet": bench.Usage(cpu=[60.0], rss=[150.0])}
    result = bench.SizeResult(
        cps=10_000, to_activated_s=5.0, rate=500.0, achieved_rate=499.0,
        load={"latency_ms": {"accepted": {"p50": 100.0, "p90": 200.0, "p99": 300.0}}},
        telemetry_ms=[], lag=[(0.0, 10.0, 0.5), (1.0, 30.0, 0.25)], supplying=[],
        usage=usage, load_avg=[1.0], central_stats={}, fleet_health={}, centrals=2,
        db="postgres", partitions=12,
        owned={"central-1": [0, 1, 2, 3, 4, 5], "central-2": [6, 7, 8, 9, 10, 11]},
        owned_cps={"central-1": 5_000, "central-2": 4_000},
        consumed={"central-1": 90_000}, load_seconds=20.0,
    )
    assert result.central_names() == ["central-1", "central-2"]
    assert result.central_cpu() == pytest.approx(75.0)
    assert result.cpu_per_1000("central-1") == pytest.approx(9.0)  # 45 % for 5,000 CPs
    assert result.cpu_per_1000("central-2") == pytest.approx(7.5)
    first, second = bench.centrals_rows(result)
    header = bench.CENTRALS_HEADER
    row = dict(zip(header, first, strict=True))
    assert row["instance"] == "central-1" and row["partitions"] == "6 of 12"
    assert row["CPs owned"] == "5,000" and row["CPU % per 1,000 owned CPs"] == "9.00"
    assert row["all Centrals: CPU % per 1,000 CPs"] == "7.50"
    assert row["request→ACCEPTED p50 / p99 (ms)"] == "100.0 / 300.0"
    assert row["Central lag p50 / max (msgs)"] == "10 / 30"
    assert row["PostgreSQL CPU %"] == "-"
    assert row["messages handled / CPU µs each"] == "90,000 / 100"  # 45 % of 20 s
    assert result.cpu_us_per_message("central-2") is None  # its /health did not say
    assert dict(zip(header, second, strict=True))["CPU % per 1,000 owned CPs"] == "7.50"
    assert result.as_dict()["central_cpu_percent_per_1000_owned_cps"] == {
        "central-1": pytest.approx(9.0), "central-2": pytest.approx(7.5)}
