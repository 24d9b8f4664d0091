"""The OCPP gateway's pure rules (SPEC §8): transaction ids, meter values, states, stop
results, CALLERROR codes, the handshake's path and the passwords file."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from evcharging.apps.ev_ocpp import main as ocpp_main
from evcharging.apps.ev_ocpp.gateway import Gateway, PendingStart, Session
from evcharging.apps.ev_ocpp.logic import (
    connector_state,
    is_valid_id_tag,
    parse_ocpp_time,
    read_meter,
    schema_error_code,
    session_id_of,
    stop_result,
    transaction_id,
    tx_profile_id,
)
from evcharging.apps.ev_ocpp.main import exposure_problem
from evcharging.apps.ev_ocpp.server import PasswordBook, charger_of_path
from evcharging.apps.ev_ocpp.store import StateStore
from evcharging.common.config import OcppSettings, load_settings
from evcharging.common.messages import CentralCommand, CommandPayload, CommandType
from evcharging.common.states import CPState, SessionResult
from tests.unit.fakes import RecordingPublisher

# ----------------------------------------------------------------------------- transaction ids


def test_transaction_id_depends_only_on_its_five_fields() -> None:
    args = ("CH-1", 1, "alice", 1200, "2026-12-07T10:00:00Z")
    tx = transaction_id(*args)
    assert tx == transaction_id(*args)
    assert 1 <= tx <= 2**31 - 1
    # The same instant written another way is the same start.
    assert transaction_id("CH-1", 1, "alice", 1200, "2026-12-07T10:00:00.000+00:00") == tx
    others = {
        transaction_id("CH-2", 1, "alice", 1200, "2026-12-07T10:00:00Z"),
        transaction_id("CH-1", 2, "alice", 1200, "2026-12-07T10:00:00Z"),
        transaction_id("CH-1", 1, "bob", 1200, "2026-12-07T10:00:00Z"),
        transaction_id("CH-1", 1, "alice", 1201, "2026-12-07T10:00:00Z"),
        transaction_id("CH-1", 1, "alice", 1200, "2026-12-07T10:00:01Z"),
    }
    assert tx not in others and len(others) == 5


def test_session_ids_of_charger_sessions_are_stable_ids() -> None:
    sid = session_id_of("CH-1", 42)
    assert sid == session_id_of("CH-1", "42")
    assert sid != session_id_of("CH-2", 42)
    assert len(sid) == 32 and all(c in "0123456789abcdef" for c in sid)


def test_ocpp_times_are_utc() -> None:
    assert parse_ocpp_time("2026-12-07T10:00:00Z") == datetime(2026, 12, 7, 10, tzinfo=UTC)
    assert parse_ocpp_time("2026-12-07T11:00:00+01:00") == datetime(2026, 12, 7, 10, tzinfo=UTC)
    assert parse_ocpp_time("2026-12-07T10:00:00") == datetime(2026, 12, 7, 10, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_ocpp_time("yesterday")


def test_id_tags_are_driver_ids_within_ocpp_limits() -> None:
    assert is_valid_id_tag("driver-alice")
    assert not is_valid_id_tag("a" * 21)  # 1.6's CiString20
    assert is_valid_id_tag("a" * 36, max_length=36)
    assert not is_valid_id_tag("bad tag")
    assert not is_valid_id_tag("")


# ----------------------------------------------------------------------------- meter values


def sample(value: str, **fields: str) -> dict[str, str]:
    return {"value": value, **fields}


def test_energy_in_wh_by_default_and_kwh_when_said() -> None:
    reading = read_meter([{"timestamp": "2026-12-07T10:00:00Z",
                           "sampledValue": [sample("1500")]}])
    assert reading.energy_wh == 1500.0 and reading.power_w is None
    assert reading.ts == datetime(2026, 12, 7, 10, tzinfo=UTC)
    kwh = read_meter([{"sampledValue": [sample("1.5", unit="kWh",
                                               measurand="Energy.Active.Import.Register")]}])
    assert kwh.energy_wh == 1500.0


def test_power_in_w_or_kw_and_phases_summed() -> None:
    reading = read_meter([{"sampledValue": [
        sample("11", measurand="Power.Active.Import", unit="kW"),
        sample("2000", measurand="Energy.Active.Import.Register"),
    ]}])
    assert reading.power_w == 11000.0 and reading.energy_wh == 2000.0
    phases = read_meter([{"sampledValue": [
        sample(v, measurand="Power.Active.Import", unit="W", phase=p)
        for v, p in (("1000", "L1"), ("2000", "L2"), ("3000", "L3"), ("7", "L1-N"))
    ]}])
    assert phases.power_w == 6000.0


def test_2_0_1_unit_of_measure_with_multiplier() -> None:
    reading = read_meter([{"timestamp": "2026-12-07T10:00:00Z", "sampledValue": [
        {"value": 2.5, "measurand": "Energy.Active.Import.Register",
         "unitOfMeasure": {"unit": "kWh"}},
        {"value": 7.2, "measurand": "Power.Active.Import",
         "unitOfMeasure": {"unit": "W", "multiplier": 3}},
    ]}])
    assert reading.energy_wh == 2500.0
    assert reading.power_w == pytest.approx(7200.0)


def test_other_measurands_units_and_garbage_are_left_out() -> None:
    reading = read_meter([{"sampledValue": [
        sample("230", measurand="Voltage", unit="V"),
        sample("12", measurand="Energy.Active.Import.Register", unit="varh"),
        sample("not a number"),
        sample("NaN", measurand="Power.Active.Import"),
    ]}])
    assert reading.energy_wh is None and reading.power_w is None
    assert read_meter([]).energy_wh is None


def test_the_last_sample_wins() -> None:
    reading = read_meter([
        {"timestamp": "2026-12-07T10:00:00Z", "sampledValue": [sample("100")]},
        {"timestamp": "2026-12-07T10:01:00Z", "sampledValue": [sample("300")]},
    ])
    assert reading.energy_wh == 300.0
    assert reading.ts == datetime(2026, 12, 7, 10, 1, tzinfo=UTC)


# ----------------------------------------------------------------------------- states


@pytest.mark.parametrize(("status", "running", "state"), [
    ("Available", False, CPState.ACTIVATED),
    ("Preparing", False, CPState.ACTIVATED),
    ("Finishing", True, CPState.ACTIVATED),
    ("Reserved", False, CPState.ACTIVATED),
    ("Charging", True, CPState.SUPPLYING),
    ("SuspendedEV", True, CPState.SUPPLYING),
    ("SuspendedEVSE", True, CPState.SUPPLYING),
    ("Charging", False, CPState.ACTIVATED),
    ("Occupied", True, CPState.SUPPLYING),
    ("Occupied", False, CPState.ACTIVATED),
    ("Unavailable", False, CPState.STOPPED),
    ("Faulted", True, CPState.FAULT),
    ("Exploded", False, None),
])
def test_status_notification_states(status: str, running: bool, state: CPState | None) -> None:
    assert connector_state(status, session_running=running) is state


@pytest.mark.parametrize(("reason", "by_operator", "result"), [
    (None, False, SessionResult.COMPLETED),
    ("Local", False, SessionResult.COMPLETED),
    ("Remote", False, SessionResult.COMPLETED),
    ("EVDisconnected", False, SessionResult.COMPLETED),
    ("Remote", True, SessionResult.STOPPED),
    ("EmergencyStop", False, SessionResult.FAILED),
    ("PowerLoss", True, SessionResult.FAILED),
    ("Reboot", False, SessionResult.FAILED),
    ("HardReset", False, SessionResult.FAILED),
    ("SoftReset", False, SessionResult.FAILED),
    ("Other", False, SessionResult.FAILED),
])
def test_stop_results(reason: str | None, by_operator: bool, result: SessionResult) -> None:
    assert stop_result(reason, stopped_by_operator=by_operator) is result


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("validator", "path", "v16", "v201"), [
    ("required", [], "OccurenceConstraintViolation", "OccurrenceConstraintViolation"),
    ("type", ["connectorId"], "TypeConstraintViolation", "TypeConstraintViolation"),
    ("maxLength", ["idTag"], "TypeConstraintViolation", "TypeConstraintViolation"),
    ("enum", ["status"], "PropertyConstraintViolation", "PropertyConstraintViolation"),
    ("minimum", ["meterStart"], "PropertyConstraintViolation", "PropertyConstraintViolation"),
    ("additionalProperties", [], "FormationViolation", "FormatViolation"),
    ("type", [], "FormationViolation", "FormatViolation"),
])
def test_schema_error_codes_as_each_version_spells_them(
    validator: str, path: list[str], v16: str, v201: str
) -> None:
    assert schema_error_code(validator, path, "1.6") == v16
    assert schema_error_code(validator, path, "2.0.1") == v201


# ----------------------------------------------------------------------------- handshake


def test_charger_paths() -> None:
    assert charger_of_path("/ocpp/CH-1") == "CH-1"
    assert charger_of_path("/ocpp/CH-1?x=1") == "CH-1"
    for bad in ("/", "/ocpp/", "/ocpp/a/b", "/other/CH-1", "/ocpp/bad id", "/ocpp/" + "a" * 61):
        assert charger_of_path(bad) is None, bad


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_passwords_plain_and_sha256(tmp_path: Path) -> None:
    path = tmp_path / "passwords"
    digest = hashlib.sha256(b"s3cret:with:colons").hexdigest()
    path.write_text(f"# chargers\nCH-1:plain-pass\n\nCH-2:sha256:{digest}\n")
    book = PasswordBook(path)
    assert len(book) == 2 and book.knows("CH-1") and not book.knows("CH-3")
    assert book.check("CH-1", basic("CH-1", "plain-pass"))
    assert not book.check("CH-1", basic("CH-1", "wrong"))
    assert not book.check("CH-1", basic("CH-2", "plain-pass"))  # user must be the charger
    assert not book.check("CH-1", None)
    assert not book.check("CH-1", "Bearer plain-pass")
    assert not book.check("CH-1", "Basic !!!")
    assert book.check("CH-2", basic("CH-2", "s3cret:with:colons"))
    assert not book.check("CH-2", basic("CH-2", digest))


def test_passwords_file_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "passwords"
    path.write_text("CH-1\n")
    with pytest.raises(ValueError, match="line 1"):
        PasswordBook(path)
    path.write_text("CH-1:sha256:abc\n")
    with pytest.raises(ValueError, match="64 hex digits"):
        PasswordBook(path)


# ----------------------------------------------------------------------------- settings


def test_seed_flags_and_protected_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    settings = load_settings(OcppSettings, [
        "--kafka-bootstrap", "localhost:9092", "--ws-port", "9000", "--central-host",
        "localhost", "--central-port", "8000"], "prog", "desc")
    assert (settings.ws_port, settings.http_port, settings.host) == (9000, 9001, "127.0.0.1")
    assert (settings.heartbeat_interval, settings.euro_rate, settings.call_timeout) == (
        60, 0.30, 30.0)
    assert exposure_problem(settings) is None
    exposed = OcppSettings(host="0.0.0.0")
    problem = exposure_problem(exposed)
    assert problem is not None and "OCPP_PASSWORDS_FILE" in problem
    assert exposure_problem(OcppSettings(host="0.0.0.0", allow_anonymous=True)) is None
    assert exposure_problem(OcppSettings(host="0.0.0.0", passwords_file=tmp_path)) is None
    assert asyncio.run(ocpp_main.run(exposed, asyncio.Event())) == 1
    with pytest.raises(ValueError, match="go together"):
        OcppSettings(tls_cert=tmp_path / "cert.pem")


def test_a_state_file_that_cannot_be_read_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="move it away"):
        StateStore(path).load(Gateway(RecordingPublisher()))
    path.write_text('{"version": 99}')
    with pytest.raises(ValueError, match="version"):
        StateStore(path).load(Gateway(RecordingPublisher()))
    StateStore(tmp_path / "none-yet.json").load(Gateway(RecordingPublisher()))  # empty start


def test_the_tx_profile_id_is_fixed_per_connector() -> None:
    assert [tx_profile_id(n) for n in (1, 2, 999)] == [9001, 9002, 9999]


async def test_a_start_at_the_charger_waits_for_centrals_verdict() -> None:
    """SPEC §8: Central's START_SUPPLY of the session accepts it (no CALL), its STOP_SUPPLY
    denies it; none within the decision timeout: Accepted. Central's own session (a
    remote start) does not wait."""
    gateway = Gateway(RecordingPublisher(), decision_timeout=0.05)
    stamp = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)

    async def started(number: int, driver: str) -> Session:
        conn = gateway.connector("CH-9", number)
        conn.state = CPState.ACTIVATED
        return await gateway.start(conn, transaction=f"t{number}", driver_id=driver,
                                   meter_start_wh=0.0, ts=stamp, own_session_id=f"s{number}")

    def verdict(cmd: CommandType, number: int) -> CentralCommand:
        return CentralCommand(cp_id=f"CH-9.{number}", cmd=cmd, payload=CommandPayload(
            driver_id="ann", session_id=f"s{number}"))

    accepted, denied, silent = [await started(n, "ann") for n in (1, 2, 3)]
    for session in (accepted, denied, silent):
        assert gateway.awaits_verdict(session)
    waits = [asyncio.create_task(gateway.verdict(s))
             for s in (accepted, denied, silent)]
    await gateway.handle_command(verdict(CommandType.START_SUPPLY, 1))
    await gateway.handle_command(verdict(CommandType.STOP_SUPPLY, 2))  # then a remote stop
    assert await asyncio.gather(*waits) == [True, False, True]
    assert gateway.stats.verdicts == {"accepted": 1, "denied": 1, "timeout": 1}
    assert gateway.stats.commands[("START_SUPPLY", "done")] == 1
    assert gateway.stats.commands[("STOP_SUPPLY", "refused")] == 1  # no charger connected
    assert (denied.denied, accepted.denied) == (True, False)
    assert await gateway.verdict(denied) is False  # a replay
    # A confirmation that comes after the session is over makes no CALL (no new start).
    await gateway.end(silent, 500.0, SessionResult.COMPLETED, "stopped")
    await gateway.handle_command(verdict(CommandType.START_SUPPLY, 3))
    assert gateway.stats.commands[("START_SUPPLY", "done")] == 2
    assert gateway.stats.commands[("START_SUPPLY", "refused")] == 0

    conn = gateway.connector("CH-9", 4)
    conn.state = CPState.ACTIVATED
    conn.pending = PendingStart("central-s", "bea")
    own = await gateway.start(conn, transaction="t4", driver_id="bea", meter_start_wh=0.0,
                              ts=stamp, own_session_id="s4")
    assert own.session_id == "central-s" and not gateway.awaits_verdict(own)
    assert await gateway.verdict(own) is True
