"""benchmarks/energy_bench.py in its quick mode: the report and its numbers add up."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from evcharging.common.car import FULL_SOC

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "energy_bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("energy_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["energy_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def read(out: Path) -> tuple[str, dict[str, Any]]:
    (md,) = out.glob("energy-*.md")
    (js,) = out.glob("energy-*.json")
    (png,) = out.glob("energy-*.png")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    return md.read_text(encoding="utf-8"), json.loads(js.read_text(encoding="utf-8"))


def test_a_quick_run_reports_numbers_that_add_up(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    text, data = read(tmp_path)
    scenario, runs = data["scenario"], {r["name"]: r for r in data["runs"]}
    arrivals = data["arrivals"]
    assert set(runs) == {"equal", "least_laxity", "uncontrolled"}
    assert scenario["chargers"] == 6 and scenario["step"] == 300
    assert scenario["limit_kw"] == pytest.approx(0.5 * 6 * scenario["charger_kw"])
    assert len(arrivals) == scenario["cars"] > 0
    wanted = {a["session_id"]: a["kwh_wanted"] for a in arrivals}
    assert scenario["kwh_wanted"] == pytest.approx(math.fsum(wanted.values()), abs=1e-3)
    hours = scenario["step"] / 3600
    for run in runs.values():
        delivered = run["delivered"]
        assert set(delivered) == set(wanted)
        # every car stops at what it wanted; the table's total is the cars' sum
        assert all(delivered[s] <= wanted[s] + 1e-9 for s in wanted)
        assert run["kwh_delivered"] == pytest.approx(math.fsum(delivered.values()), abs=1e-3)
        assert run["kwh_delivered"] <= run["kwh_wanted"] + 1e-9
        # the energy the site measured is the energy the cars got
        assert math.fsum(run["power_kw"]) * hours == pytest.approx(
            math.fsum(delivered.values()), abs=1e-2)
        assert len(run["power_kw"]) == 86_400 // scenario["step"]
        assert run["cars_short"] == sum(1 for s in wanted if delivered[s] < 0.9 * wanted[s])
        assert run["peak_kw"] == pytest.approx(max(run["power_kw"]), abs=1e-3)
        if run["limited"]:
            assert run["peak_kw"] <= scenario["limit_kw"] + 1e-6
            assert run["minutes_above_limit"] == 0
        # and the markdown table says the same
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {run['name']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3] == f"{run['kwh_delivered']:.1f}"
        assert cells[5] == f"{run['cars_short']} of {len(arrivals)}"
        assert cells[6] == f"{run['peak_kw']:.1f}"
    # no limit: nobody gets less than under one (the same cars, each at its most)
    for s in wanted:
        assert runs["uncontrolled"]["delivered"][s] >= runs["equal"]["delivered"][s] - 1e-6
    assert [s["limit_fraction"] for s in data["sweep"]] == [0.5, 0.25, 0.15]
    for entry in data["sweep"]:
        assert {t["days"] for t in entry["runs"].values()} == {3}
    assert "## Several days, tighter limits" in text
    assert "acnportal was not asked for" in text
    assert "| equal |" in capsys.readouterr().out


def test_without_acnportal_the_report_says_exactly_why(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "acnportal", None)  # import acnportal raises
    assert bench.main(["--quick", "--acnportal", "--days", "0", "--out", str(tmp_path)]) == 0
    text, data = read(tmp_path)
    error = data["acnportal_error"]
    assert error.startswith(("ImportError: ", "ModuleNotFoundError: "))
    assert "acnportal" in error
    assert f"acnportal could not be run: `{error}`" in text
    assert [r["name"] for r in data["runs"]] == ["equal", "least_laxity", "uncontrolled"]
    assert data["sweep"] == []


def test_the_day_is_the_same_for_a_seed_and_plausible(bench: ModuleType) -> None:
    def day(seed: int) -> Any:
        return bench.draw_scenario(seed=seed, chargers=16, charger_kw=11.0, limit_fraction=0.5,
                                   step=60, cars=21)

    assert day(3) == day(3)
    assert day(3) != day(4)
    for seed in range(10):
        scenario = day(seed)
        assert len(scenario.arrivals) + scenario.turned_away == 21
        by_station: dict[str, list[tuple[int, int]]] = {}
        for a in scenario.arrivals:
            assert 0 <= a.arrival < a.departure <= scenario.steps
            assert 0 < a.kwh_wanted <= (FULL_SOC - a.car.soc) * a.car.battery_kwh + 1e-3
            by_station.setdefault(a.station, []).append((a.arrival, a.departure))
        for stays in by_station.values():  # one car at a time per charger
            stays.sort()
            assert all(b[0] >= a[1] for a, b in itertools.pairwise(stays))
