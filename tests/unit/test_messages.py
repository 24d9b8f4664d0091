"""Message models: strict validation and JSON bytes in and out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evcharging.common.messages import (
    CentralCommand,
    CommandPayload,
    CommandType,
    CPFaultReport,
    CPState,
    CPStatus,
    CPTelemetry,
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    SessionEnd,
    SessionResult,
    ValidationError,
    decode,
    encode,
    format_ts,
)

TS = '"ts": "2026-01-02T03:04:05Z"'


def test_round_trip_and_z_suffix() -> None:
    request = DriverRequest(request_id="r1", driver_id="driver-alice", cp_id="CP-001")
    data = encode(request)
    assert json.loads(data)["ts"].endswith("Z")
    assert decode(DriverRequest, data) == request


def test_plus_zero_offset_is_accepted_and_unknown_fields_ignored() -> None:
    raw = b'{"request_id": "r", "driver_id": "d", "cp_id": "c", "ts": "2026-01-01T00:00:00+00:00",'
    raw += b' "extra": {"nested": true}}'
    message = decode(DriverRequest, raw)
    assert message.ts == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"driver_id": "d", "cp_id": "c"}',
        b'{"request_id": "r", "driver_id": "d", "cp_id": "has space"}',
        b'{"request_id": "r", "driver_id": "d", "cp_id": ""}',
        b'{"request_id": "r", "driver_id": "d", "cp_id": "' + b"x" * 65 + b'"}',
        b'{"request_id": "r", "driver_id": "d", "cp_id": 7}',
        b'{"request_id": "r", "driver_id": "d", "cp_id": "c", "ts": "2026-01-01T00:00:00"}',
        b'{"request_id": "r", "driver_id": "d", "cp_id": "c", "ts": "2026-01-01T02:00:00+02:00"}',
        b'{"request_id": "r", "driver_id": "d", "cp_id": "c", "ts": "yesterday"}',
    ],
)
def test_invalid_requests(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        decode(DriverRequest, raw)


@pytest.mark.parametrize(
    "fields",
    [
        '"kw": -1, "kwh": 0, "euros": 0',
        '"kw": 1, "kwh": -0.1, "euros": 0',
        '"kw": 1, "kwh": 0, "euros": -5',
        '"kw": "22", "kwh": 0, "euros": 0',
        '"kw": NaN, "kwh": 0, "euros": 0',
        '"kwh": 0, "euros": 0',
    ],
)
def test_invalid_telemetry(fields: str) -> None:
    with pytest.raises(ValidationError):
        decode(CPTelemetry, f'{{"cp_id": "CP-001", {fields}, {TS}}}'.encode())


def test_status_and_update_enums() -> None:
    status = decode(CPStatus, f'{{"cp_id": "CP-1", "state": "SUPPLYING", {TS}}}'.encode())
    assert status.state is CPState.SUPPLYING
    with pytest.raises(ValidationError):
        decode(CPStatus, f'{{"cp_id": "CP-1", "state": "CHARGING", {TS}}}'.encode())
    update = decode(
        DriverUpdate,
        f'{{"request_id": "r", "driver_id": "d", "cp_id": "c", "status": "DENIED", {TS}}}'.encode(),
    )
    assert update.status is DriverStatus.DENIED and update.status.is_final
    assert not DriverStatus.IN_PROGRESS.is_final


def test_start_supply_needs_driver_and_session() -> None:
    with pytest.raises(ValidationError, match="START_SUPPLY"):
        CentralCommand(cp_id="CP-1", cmd=CommandType.START_SUPPLY)
    command = CentralCommand(
        cp_id="CP-1", cmd=CommandType.START_SUPPLY,
        payload=CommandPayload(driver_id="d", session_id="s"),
    )
    assert decode(CentralCommand, encode(command)) == command
    stop = decode(CentralCommand, f'{{"cp_id": "CP-1", "cmd": "STOP_CP", {TS}}}'.encode())
    assert stop.payload == CommandPayload()


def test_http_bodies_are_lax_json() -> None:
    report = CPFaultReport.model_validate({"cp_id": "CP-1", "is_faulty": True})
    assert report.reason == ""
    with pytest.raises(ValidationError):
        CPFaultReport.model_validate({"cp_id": "CP-1"})


ids = st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z")
amounts = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)


@given(cp_id=ids, kw=amounts, kwh=amounts, euros=amounts, session=st.none() | ids)
def test_any_valid_telemetry_round_trips(
    cp_id: str, kw: float, kwh: float, euros: float, session: str | None
) -> None:
    message = CPTelemetry(cp_id=cp_id, kw=kw, kwh=kwh, euros=euros, session_id=session)
    assert decode(CPTelemetry, encode(message)) == message


@given(kwh=st.sampled_from([0.0, 1.5, 2.25]), euros=st.sampled_from([0.0, 0.5]),
       result=st.sampled_from(list(SessionResult)), sid=st.sampled_from(["s1", "s2"]))
def test_same_as_says_what_equality_says_of_two_session_ends(
    kwh: float, euros: float, result: SessionResult, sid: str
) -> None:
    end = SessionEnd(session_id="s1", result=SessionResult.COMPLETED, kwh=1.5, euros=0.5)
    other = decode(SessionEnd, encode(SessionEnd(session_id=sid, result=result, kwh=kwh,
                                                 euros=euros)))
    assert end.same_as(other) == (end == other) == other.same_as(end)
    assert end.same_as(end) and not end.same_as(None)


EARLIEST, LATEST = datetime(1900, 1, 1), datetime(2200, 1, 1)  # noqa: DTZ001
"""hypothesis wants naive bounds; the timestamps it draws carry UTC."""


@given(when=st.datetimes(EARLIEST, LATEST, timezones=st.just(UTC)), hours=st.integers(-12, 12))
def test_format_ts_writes_every_timestamp_in_its_one_form(when: datetime, hours: int) -> None:
    expected = when.isoformat(timespec="microseconds").removesuffix("+00:00") + "Z"
    assert format_ts(when) == expected  # from the seconds it remembers, or anew
    assert format_ts(when) == expected
    assert format_ts(when.astimezone(timezone(timedelta(hours=hours)))) == expected
    with pytest.raises(ValueError, match="naive"):
        format_ts(when.replace(tzinfo=None))
