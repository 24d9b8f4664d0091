"""The requests file's optional fields (SPEC §10: kwh=, departure=, car=) and the requests the
EV Driver sends with them (no broker: a fake publisher plays Central)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from evcharging.apps.ev_driver import main as driver_main
from evcharging.apps.ev_driver.driver import (
    PlannedRequest,
    RequestsFileError,
    load_plan,
    parse_plan,
    parse_requests,
)
from evcharging.common.config import DriverSettings
from evcharging.common.messages import CarSpec
from tests.unit.test_driver import DRIVER, make_driver


def test_old_lines_and_lines_with_fields() -> None:
    text = (
        "CP-001\n"
        "CP-002 kwh=20 departure=+2h car=60/0.35/11  # all three\n"
        "CP-003   car=77/.5/150 kwh=12.5\n"
        "CP-004 departure=2026-12-07T18:00Z\n"
        "CP-005 departure=+1h30m\n"
        "CP-006 departure=+90m kwh=7\n"
        "CP-007 departure=2026-12-07T19:00+01:00\n"
    )
    plan = parse_plan(text, source="plan.txt")
    assert plan == [
        PlannedRequest("CP-001"),
        PlannedRequest("CP-002", 20.0, timedelta(hours=2), CarSpec(
            battery_kwh=60.0, soc=0.35, max_kw=11.0)),
        PlannedRequest("CP-003", 12.5, None, CarSpec(battery_kwh=77.0, soc=0.5, max_kw=150.0)),
        PlannedRequest("CP-004", departure=datetime(2026, 12, 7, 18, 0, tzinfo=UTC)),
        PlannedRequest("CP-005", departure=timedelta(hours=1, minutes=30)),
        PlannedRequest("CP-006", 7.0, timedelta(minutes=90)),
        PlannedRequest("CP-007", departure=datetime(2026, 12, 7, 18, 0, tzinfo=UTC)),
    ]
    assert parse_requests(text) == [f"CP-00{n}" for n in range(1, 8)]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("CP-001 kwh=0", "kwh_wanted: Input should be greater than 0"),
        ("CP-001 kwh=twenty", "kwh 'twenty' is not a number"),
        ("CP-001 kwh=-3", "kwh '-3' is not a number"),
        ("CP-001 kwh=20001", "kwh_wanted: Input should be less than or equal to 10000"),
        ("CP-001 kwh=1 kwh=2", "kwh given twice"),
        ("CP-001 kwh=", "'kwh=' is not key=value"),
        ("CP-001 speed=fast", "unknown field 'speed' (known: kwh, departure, car)"),
        ("CP-001 car=60/0.35", "car '60/0.35' is not battery_kwh/soc/max_kw"),
        ("CP-001 car=60/1.35/11", "car.soc: Input should be less than or equal to 1"),
        ("CP-001 car=0/0.5/11", "car.battery_kwh: Input should be greater than 0"),
        ("CP-001 car=60/0.5/x", "max_kw 'x' is not a number"),
        ("CP-001 departure=soon", "departure 'soon' is neither +2h, +90m, +1h30m nor"),
        ("CP-001 departure=+", "departure '+' is neither"),
        ("CP-001 departure=+0h", "a departure from now must be later than now"),
        ("CP-001 departure=2026-12-07T18:00", "needs its time zone"),
    ],
)
def test_a_bad_field_is_an_error_naming_the_line(line: str, why: str) -> None:
    with pytest.raises(RequestsFileError) as error:
        parse_plan(f"# plan\nCP-009\n{line}\nCP-010\n", source="plan.txt")
    assert str(error.value).startswith("plan.txt line 3: ")
    assert why in str(error.value)


def test_a_line_with_blanks_but_no_fields_is_still_an_invalid_id_skipped(
    logs: list[tuple[str, str]],
) -> None:
    assert parse_requests("CP-001 and more\nCP-002\n", source="p") == ["CP-002"]
    [warning] = [m for level, m in logs if level == "WARNING"]
    assert "p line 1: skipped invalid CP id 'CP-001 and more'" in warning


async def test_the_driver_sends_the_fields_with_a_departure_from_now(tmp_path: Path) -> None:
    path = tmp_path / "requests.txt"
    path.write_text("CP-001 kwh=20 departure=+2h car=60/0.35/11\nCP-002\n", encoding="utf-8")
    driver, publisher = make_driver()
    before = datetime.now(UTC)
    await asyncio.wait_for(driver.run(load_plan(path)), 5)
    with_fields, plain = publisher.requests
    assert (with_fields.cp_id, with_fields.kwh_wanted) == ("CP-001", 20.0)
    assert with_fields.car == CarSpec(battery_kwh=60.0, soc=0.35, max_kw=11.0)
    assert with_fields.departure == with_fields.ts + timedelta(hours=2)
    assert with_fields.ts >= before
    assert (plain.kwh_wanted, plain.departure, plain.car) == (None, None, None)


async def test_main_run_with_a_bad_field_exits_2_and_sends_nothing(
    tmp_path: Path, logs: list[tuple[str, str]]
) -> None:
    path = tmp_path / "requests.txt"
    path.write_text("CP-001\nCP-002 car=60\n", encoding="utf-8")
    settings = DriverSettings(_env_file=None, driver_id=DRIVER, requests_file=path,
                              kafka_bootstrap="127.0.0.1:1")
    assert await driver_main.run(settings, asyncio.Event()) == 2
    errors = [m for level, m in logs if level == "ERROR"]
    assert len(errors) == 1 and f"{path} line 2: car '60'" in errors[0]
    assert "nothing was sent" in errors[0]
