"""benchmarks/fleet_bench.py, the short way (``--sizes 100 --quick``), on the real broker.

It must run Central, a CP Fleet and the load generator, and write its report (markdown
tables whose numbers parse and add up), its data (JSON) and its plot (a PNG). Nothing
about speed is asserted: the numbers belong to the machine.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "fleet_bench.py"


def tables(markdown: str) -> list[list[dict[str, str]]]:
    """Every markdown table of the text, as rows of header → cell."""
    found: list[list[dict[str, str]]] = []
    lines = markdown.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("| ") and re.fullmatch(r"\|(-+:?\|)+", lines[i + 1].strip()):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, (c.strip() for c in row.strip("|").split("|")),
                                     strict=True)))
            found.append(rows)
    return found


def numbers(cell: str) -> list[float]:
    """``"1,234 / 5.6"`` → [1234.0, 5.6]; a cell of the report must be numbers."""
    return [float(part.replace(",", "")) for part in cell.split(" / ")]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_fleet_benchmark_writes_its_report_and_plot(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "100", "--quick",
         "--kafka-bootstrap", kafka_bootstrap, "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"

    (report,) = out.glob("fleet-*.md")
    (plot,) = out.glob("fleet-*.png")
    (data,) = out.glob("fleet-*.json")
    assert report.stem == plot.stem == data.stem
    text = report.read_text(encoding="utf-8")
    assert re.search(r"- \d+ CPUs \(`nproc`\), [\d.]+ GiB of memory, \S", text)
    assert re.search(r"- Python 3\.\d+\.\d+ on ", text)
    assert f"![latency, lag and CPU against the number of CPs]({plot.name})" in text

    latency, outcomes, centrals = tables(text)
    (row,) = latency
    assert row["CPs"] == "100"
    assert row["Centrals"] == "1"
    for cell in list(row.values())[1:]:
        assert numbers(cell), cell  # every number measured, and parseable
    assert len(numbers(row["request→ACCEPTED p50 / p90 / p99 (ms)"])) == 3
    p50, p99 = numbers(row["telemetry→IN_PROGRESS p50 / p99 (ms)"])
    assert 0 < p50 <= p99
    asked, _got = numbers(row["drivers/s asked / got"])
    assert asked == 10  # 100 CPs × 0.5 ÷ 5 s sessions

    (row,) = outcomes
    assert row.pop("broker CPU %") == "-"  # a broker the script did not start is not sampled
    counts = {name: numbers(cell) for name, cell in row.items() if name != "CPs"}
    drivers = counts.pop("drivers")[0]
    assert drivers > 0
    ended = sum(counts[name][0] for name in ("completed", "FAILED start not confirmed",
                                             "FAILED other", "DENIED overloaded",
                                             "DENIED other"))
    assert ended + sum(counts["no free CP / timed out"]) == drivers  # one outcome each
    cpu, rss = counts["Central CPU % / RSS MiB"]
    assert cpu >= 0 and rss > 0

    (row,) = centrals  # one Central on SQLite owns every CP
    assert (row["Centrals (database)"], row["instance"]) == ("1 (sqlite)", "central")
    assert row["CPs owned"] == "100"
    assert numbers(row["CPU % (mean)"]) == [round(cpu)]
    assert numbers(row["CPU % per 1,000 owned CPs"])[0] == pytest.approx(cpu * 10, abs=5.01)

    # The same numbers as data, and on stdout.
    results = json.loads(data.read_text())["results"]
    assert [r["cps"] for r in results] == [100]
    assert results[0]["load_summary"]["arrivals"] == drivers
    assert "| CPs | Centrals | to ACTIVATED (s) |" in run.stdout
    assert f"report: {report}" in run.stdout

    width, height = png_size(plot)
    assert width > 600 and height > 300
