"""benchmarks/ocpp_bench.py, the short way (``--quick``: 50 chargers, 20 s), on the real broker.

It must run Central, the OCPP gateway and a CP Fleet of OCPP chargers, and write its report
(markdown tables whose numbers parse and add up), its data (JSON) and its plot (a PNG).
Nothing about speed is asserted: the numbers belong to the machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_bench_fleet import numbers, png_size, tables

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "ocpp_bench.py"


def test_the_ocpp_benchmark_writes_its_report_and_plot(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--kafka-bootstrap", kafka_bootstrap,
         "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"

    (report,) = out.glob("ocpp-*.md")
    (plot,) = out.glob("ocpp-*.png")
    (data,) = out.glob("ocpp-*.json")
    assert report.stem == plot.stem == data.stem
    text = report.read_text(encoding="utf-8")
    assert re.search(r"- \d+ CPUs \(`nproc`\), [\d.]+ GiB of memory, \S", text)
    assert f"]({plot.name})" in text

    boot, requests, targets = tables(text)
    (row,) = boot
    assert row["chargers"] == "50"
    booted, activated = numbers(row["all booted (s)"])[0], numbers(
        row["all ACTIVATED at Central (s)"])[0]
    assert booted > 0 and activated > 0
    for name in ("Heartbeat p50 / p99 (ms)", "MeterValues p50 / p99 (ms)",
                 "remote start → IN_PROGRESS p50 / p99 (ms)"):
        p50, p99 = numbers(row[name])
        assert 0 < p50 <= p99, (name, row[name])

    (row,) = requests
    assert numbers(row["requests/s"]) == [2.0]  # 50 × 0.2 ÷ 5 s sessions
    sent = numbers(row["requests"])[0]
    assert sent > 0
    ended = sum(numbers(row[name])[0] for name in ("COMPLETED", "FAILED", "DENIED",
                                                    "no final status"))
    assert ended == sent  # one outcome each
    assert numbers(row["COMPLETED"])[0] > 0
    assert numbers(row["gateway RSS MiB (max)"])[0] > 0
    cpu, peak = numbers(row["gateway CPU % mean / max"])
    assert 0 <= cpu <= peak

    assert [t["target"] for t in targets] == [
        "gateway RSS ≤ 1 GiB", "Heartbeat p99 < 100 ms", "remote start p99 < 1 s"]
    for target in targets:
        assert re.fullmatch(r"(yes \([\d,]+ \w+ to spare\)|no \([\d,]+ \w+ over\))",
                            target["met"]), target

    # The same numbers as data, and on stdout.
    (result,) = json.loads(data.read_text())["results"]
    assert result["chargers"] == 50 and result["requests"] == sent
    assert result["fleet_health"]["booted_once"] == 50
    assert result["remote_start_ms"]["count"] > 0
    assert "| chargers | all booted (s) |" in run.stdout
    assert f"report: {report}" in run.stdout

    width, height = png_size(plot)
    assert width > 600 and height > 300
