"""Unit tests of the EV Driver with a fake publisher that plays Central (no broker)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from evcharging.apps.ev_driver import main as driver_main
from evcharging.apps.ev_driver.driver import (
    Driver,
    DriverSummary,
    Outcome,
    RequestResult,
    load_requests,
    parse_requests,
)
from evcharging.common.bus import BusError, Topic, topic_of
from evcharging.common.config import DriverSettings
from evcharging.common.messages import DriverRequest, DriverStatus, DriverUpdate, Message

DRIVER = "driver-alice"
S = DriverStatus

Script = Callable[[DriverRequest], list[DriverUpdate]]


def update(request: DriverRequest, status: DriverStatus, **fields: Any) -> DriverUpdate:
    values: dict[str, Any] = {
        "request_id": request.request_id,
        "driver_id": request.driver_id,
        "cp_id": request.cp_id,
        "status": status,
    }
    values.update(fields)
    return DriverUpdate(**values)


def full_session(request: DriverRequest) -> list[DriverUpdate]:
    return [
        update(request, S.ACCEPTED, session_id="s1"),
        update(request, S.IN_PROGRESS, session_id="s1", kw=22.0, kwh=0.5, euros=0.15),
        update(request, S.IN_PROGRESS, session_id="s1", kw=22.0, kwh=1.0, euros=0.30),
        update(request, S.COMPLETED, session_id="s1", kwh=1.2, euros=0.36),
    ]


class FakePublisher:
    """Plays Central: answers each request at once by calling driver.handle_update."""

    def __init__(self, script: Script = full_session) -> None:
        self.script = script
        self.driver: Driver | None = None
        self.published: list[tuple[Topic, Message]] = []
        self.fail = False
        self.on_publish: Callable[[DriverRequest], None] | None = None

    @property
    def requests(self) -> list[DriverRequest]:
        return [m for _, m in self.published if isinstance(m, DriverRequest)]

    async def publish(self, message: Message, *, wait: bool = True) -> None:
        if self.fail:
            raise BusError("could not publish to driver.requests: broker gone")
        self.published.append((topic_of(message), message))
        assert isinstance(message, DriverRequest)
        assert self.driver is not None
        for answer in self.script(message):
            await self.driver.handle_update(answer)
        if self.on_publish is not None:
            self.on_publish(message)


def make_driver(
    script: Script = full_session, *, timeout: float = 2.0, interval: float = 0.0
) -> tuple[Driver, FakePublisher]:
    publisher = FakePublisher(script)
    driver = Driver(DRIVER, publisher, request_timeout=timeout, request_interval=interval)
    publisher.driver = driver
    return driver, publisher


async def run(driver: Driver, cp_ids: list[str], timeout: float = 5.0) -> DriverSummary:
    return await asyncio.wait_for(driver.run(cp_ids), timeout)


# ----------------------------------------------------------------- following requests


async def test_completed_sessions_are_summed(logs: list[tuple[str, str]]) -> None:
    driver, publisher = make_driver()
    summary = await run(driver, ["CP-001", "CP-002"])
    assert [r.cp_id for r in publisher.requests] == ["CP-001", "CP-002"]
    assert all(topic is Topic.DRIVER_REQUESTS for topic, _ in publisher.published)
    assert all(r.driver_id == DRIVER for r in publisher.requests)
    assert len({r.request_id for r in publisher.requests}) == 2
    assert summary.requests == 2
    assert summary.completed == 2
    assert (summary.denied, summary.failed, summary.timed_out) == (0, 0, 0)
    assert summary.total_kwh == pytest.approx(2.4)
    assert summary.total_euros == pytest.approx(0.72)
    assert summary.finished
    messages = [m for _, m in logs]
    assert any("IN_PROGRESS at CP-001: 22.0 kW, 0.500 kWh, 0.15 €" in m for m in messages)
    assert any("COMPLETED at CP-002: 1.200 kWh, 0.36 €" in m for m in messages)
    assert any(m.startswith("summary for driver-alice (done): 2 request(s)") for m in messages)


async def test_completed_without_totals_uses_last_progress() -> None:
    def script(request: DriverRequest) -> list[DriverUpdate]:
        return [
            update(request, S.ACCEPTED),
            update(request, S.IN_PROGRESS, kw=11.0, kwh=0.7, euros=0.21),
            update(request, S.IN_PROGRESS, kw=11.0, kwh=0.9, euros=0.27),
            update(request, S.COMPLETED),
        ]

    driver, _ = make_driver(script)
    summary = await run(driver, ["CP-001"])
    assert summary.completed == 1
    assert summary.total_kwh == pytest.approx(0.9)
    assert summary.total_euros == pytest.approx(0.27)


async def test_denied_and_failed_are_counted_with_reasons(
    logs: list[tuple[str, str]],
) -> None:
    def script(request: DriverRequest) -> list[DriverUpdate]:
        if request.cp_id == "CP-BUSY":
            return [update(request, S.DENIED, reason="CP busy")]
        if request.cp_id == "CP-BAD":
            return [
                update(request, S.ACCEPTED),
                update(request, S.IN_PROGRESS, kw=22.0, kwh=0.1, euros=0.03),
                update(request, S.FAILED, reason="CP faulty <red>x</red>"),
            ]
        return full_session(request)

    driver, _ = make_driver(script)
    summary = await run(driver, ["CP-BUSY", "CP-BAD", "CP-OK"])
    assert (summary.requests, summary.completed, summary.denied, summary.failed) == (3, 1, 1, 1)
    assert summary.total_kwh == pytest.approx(1.2)  # a failed session adds nothing
    assert [r.outcome for r in summary.results] == [
        Outcome.DENIED, Outcome.FAILED, Outcome.COMPLETED,
    ]
    assert summary.results[0].reason == "CP busy"
    messages = [m for _, m in logs]
    assert "DENIED at CP-BUSY: CP busy" in messages
    assert "FAILED at CP-BAD: CP faulty <red>x</red>" in messages  # not parsed as markup


async def test_no_final_status_times_out() -> None:
    def script(request: DriverRequest) -> list[DriverUpdate]:
        return [] if request.cp_id == "CP-SILENT" else [update(request, S.ACCEPTED)]

    driver, _ = make_driver(script, timeout=0.05)
    summary = await run(driver, ["CP-SILENT", "CP-STUCK"])
    assert summary.timed_out == 2
    assert summary.requests == 2
    assert summary.finished
    assert [r.outcome for r in summary.results] == [Outcome.TIMED_OUT, Outcome.TIMED_OUT]


async def test_updates_for_other_drivers_and_requests_are_ignored() -> None:
    def script(request: DriverRequest) -> list[DriverUpdate]:
        other_driver = DriverUpdate(
            request_id=request.request_id, driver_id="driver-bob", cp_id=request.cp_id,
            status=S.COMPLETED, kwh=99.0, euros=99.0,
        )
        unknown_request = update(request, S.COMPLETED, kwh=50.0, euros=50.0).model_copy(
            update={"request_id": "not-mine"}
        )
        return [other_driver, unknown_request, *full_session(request)]

    driver, _ = make_driver(script)
    summary = await run(driver, ["CP-001"])
    assert summary.completed == 1
    assert summary.total_kwh == pytest.approx(1.2)
    assert driver.ignored_updates == 2
    # A late update for a finished request is ignored too.
    late = DriverUpdate(request_id=summary.results[0].request_id, driver_id=DRIVER,
                        cp_id="CP-001", status=S.FAILED, reason="late")
    await driver.handle_update(late)
    assert driver.ignored_updates == 3


async def test_no_wait_after_the_last_request() -> None:
    driver, _ = make_driver(interval=60.0)
    summary = await run(driver, ["CP-001"], timeout=2.0)
    assert summary.completed == 1


async def test_stop_ends_the_interval_wait_early() -> None:
    driver, _ = make_driver(interval=60.0)
    first_result = asyncio.Event()

    def on_log(message: Any) -> None:
        # The driver logs a final update as it records the result, then starts the pause.
        if message.record["message"].startswith("COMPLETED at CP-001"):
            first_result.set()

    sink_id = logger.add(on_log, level="INFO")

    async def stop_once_the_first_result_is_in() -> None:
        await asyncio.wait_for(first_result.wait(), 2.0)
        # first_result is set within the driver's own step, which goes on into the 60 s
        # pause before it yields: so this stop lands in the pause, not in the request.
        driver.stop()

    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        stopper = asyncio.create_task(stop_once_the_first_result_is_in())
        summary = await run(driver, ["CP-001", "CP-002", "CP-003"], timeout=2.0)
        await stopper
    finally:
        logger.remove(sink_id)
    assert loop.time() - began < 2.0  # far from the 60 s interval
    assert [r.outcome for r in summary.results] == [Outcome.COMPLETED]
    assert summary.requests == 1
    assert summary.completed == 1
    assert not summary.finished
    assert summary.planned == 3


async def test_stop_while_following_interrupts_the_request() -> None:
    driver, publisher = make_driver(lambda request: [update(request, S.ACCEPTED)], timeout=60)
    publisher.on_publish = lambda _request: driver.stop()
    summary = await run(driver, ["CP-001", "CP-002"], timeout=2.0)
    assert summary.requests == 1
    assert summary.interrupted == 1
    assert not summary.finished


async def test_stop_while_waiting_for_an_update_wakes_the_driver_at_once() -> None:
    driver, publisher = make_driver(lambda request: [], timeout=60)
    # Called back once the driver waits for the first update of its request.
    publisher.on_publish = lambda _request: asyncio.get_running_loop().call_soon(driver.stop)
    summary = await run(driver, ["CP-001", "CP-002"], timeout=2.0)
    assert [r.outcome for r in summary.results] == [Outcome.INTERRUPTED]
    assert not summary.finished


async def test_publish_failure_stops_the_run_with_a_bus_error() -> None:
    driver, publisher = make_driver()
    publisher.fail = True
    summary = await run(driver, ["CP-001", "CP-002"])
    assert summary.requests == 0
    assert summary.bus_error is not None and "broker gone" in summary.bus_error
    assert not summary.finished
    assert [r.outcome for r in summary.results] == [Outcome.NOT_SENT]


# ----------------------------------------------------------------- requests file


def test_parse_requests_skips_comments_blanks_and_invalid_ids(
    logs: list[tuple[str, str]],
) -> None:
    text = (
        "# my charging plan\n"
        "CP-001\n"
        "\n"
        "   CP-002   # trailing comment\n"
        "\t\n"
        "bad id!\n"
        "cp.three_3\n"
        "#CP-004\n"
        + "x" * 65 + "\n"
        "CP-001\n"
    )
    assert parse_requests(text, source="plan.txt") == ["CP-001", "CP-002", "cp.three_3", "CP-001"]
    warnings = [m for level, m in logs if level == "WARNING"]
    assert len(warnings) == 2
    assert "plan.txt line 6" in warnings[0] and "'bad id!'" in warnings[0]
    assert "plan.txt line 9" in warnings[1]


def test_load_requests_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "requests.txt"
    path.write_text("CP-001\r\nCP-002 # windows line ends\r\n", encoding="utf-8")
    assert load_requests(path) == ["CP-001", "CP-002"]
    with pytest.raises(FileNotFoundError):
        load_requests(tmp_path / "missing.txt")


async def test_main_run_missing_file_exits_2(
    tmp_path: Path, logs: list[tuple[str, str]]
) -> None:
    settings = DriverSettings(
        _env_file=None, driver_id=DRIVER, requests_file=tmp_path / "missing.txt",
        kafka_bootstrap="127.0.0.1:1",
    )
    code = await driver_main.run(settings, asyncio.Event())
    assert code == 2
    assert any(level == "ERROR" and "not found" in m for level, m in logs)


async def test_cli_missing_file_exits_2_and_help_lists_flags(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIVER_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "evcharging.apps.ev_driver.main",
        "--driver-id", "driver-alice", "--kafka-bootstrap", "localhost:9092",
        "--requests-file", str(tmp_path / "requests.txt"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 2, err.decode()
    assert "not found" in err.decode()

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "evcharging.apps.ev_driver.main", "--help",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0
    for flag in ("--driver-id", "--kafka-bootstrap", "--requests-file", "--request-interval",
                 "--request-timeout", "--topic-prefix", "--log-level"):
        assert flag in out.decode()


# ----------------------------------------------------------------- main.run wiring


class FakeKafka:
    """Stands in for KafkaBus and KafkaConsumerLoop in main.run: what the bus publishes,
    `central` answers, and the consumer hands the answers to its handler."""

    def __init__(self, central: Script = full_session) -> None:
        self.central = central
        self.events: list[str] = []
        self.updates: asyncio.Queue[DriverUpdate] = asyncio.Queue()
        self.start_error: Exception | None = None
        self.consumer_error: Exception | None = None

    def bus(self, config: Any) -> Any:
        kafka = self
        assert config.client_id == f"driver-{DRIVER}"

        class Bus:
            async def start(self) -> None:
                kafka.events.append("bus.start")
                if kafka.start_error is not None:
                    raise kafka.start_error

            async def stop(self) -> None:
                kafka.events.append("bus.stop")

            async def publish(self, message: Message, *, wait: bool = True) -> None:
                assert isinstance(message, DriverRequest)
                kafka.events.append(f"publish {message.cp_id}")
                for answer in kafka.central(message):
                    kafka.updates.put_nowait(answer)

        return Bus()

    def consumer(self, config: Any, handlers: Any, *, group_id: Any, start_at: str) -> Any:
        kafka = self
        assert group_id is None and start_at == "latest"
        handler = handlers.handler(Topic.DRIVER_UPDATES)

        class Consumer:
            async def start(self) -> None:
                kafka.events.append("consumer.start")

            async def run(self) -> None:
                kafka.events.append("consumer.run")
                if kafka.consumer_error is not None:
                    raise kafka.consumer_error
                while True:
                    await handler(await kafka.updates.get())

            async def stop(self) -> None:
                kafka.events.append("consumer.stop")

        return Consumer()


@pytest.fixture
def kafka(monkeypatch: pytest.MonkeyPatch) -> FakeKafka:
    fake = FakeKafka()
    monkeypatch.setattr(driver_main, "KafkaBus", fake.bus)
    monkeypatch.setattr(driver_main, "KafkaConsumerLoop", fake.consumer)
    return fake


def driver_settings(tmp_path: Path, text: str = "CP-001\nCP-002\n", **extra: Any) -> Any:
    path = tmp_path / "requests.txt"
    path.write_text(text, encoding="utf-8")
    values: dict[str, Any] = {"driver_id": DRIVER, "requests_file": path,
                              "request_interval": 0.0, "request_timeout": 5.0}
    values.update(extra)
    return DriverSettings(_env_file=None, **values)


async def test_main_run_completes_the_file_and_exits_0(kafka: FakeKafka, tmp_path: Path) -> None:
    code = await asyncio.wait_for(driver_main.run(driver_settings(tmp_path), asyncio.Event()), 5)
    assert code == 0
    assert kafka.events.index("consumer.start") < kafka.events.index("publish CP-001")
    assert kafka.events[-2:] == ["consumer.stop", "bus.stop"]
    assert "publish CP-002" in kafka.events


async def test_main_run_interrupted_exits_130(kafka: FakeKafka, tmp_path: Path) -> None:
    stop = asyncio.Event()

    def central(request: DriverRequest) -> list[DriverUpdate]:
        stop.set()  # SIGINT while the first request is being followed
        return [update(request, S.ACCEPTED)]

    kafka.central = central
    code = await asyncio.wait_for(driver_main.run(driver_settings(tmp_path), stop), 5)
    assert code == 130
    assert "publish CP-002" not in kafka.events
    assert kafka.events[-2:] == ["consumer.stop", "bus.stop"]


async def test_main_run_consumer_death_exits_1(
    kafka: FakeKafka, tmp_path: Path, logs: list[tuple[str, str]]
) -> None:
    kafka.consumer_error = RuntimeError("fetch failed")
    kafka.central = lambda request: []
    code = await asyncio.wait_for(driver_main.run(driver_settings(tmp_path), asyncio.Event()), 5)
    assert code == 1
    assert any(level == "CRITICAL" and "consumer died" in m for level, m in logs)
    assert kafka.events[-2:] == ["consumer.stop", "bus.stop"]


async def test_main_run_driver_crash_exits_1_logged_once(
    kafka: FakeKafka, tmp_path: Path, logs: list[tuple[str, str]]
) -> None:
    def central(request: DriverRequest) -> list[DriverUpdate]:
        raise RuntimeError("driver broke")

    kafka.central = central
    code = await asyncio.wait_for(driver_main.run(driver_settings(tmp_path), asyncio.Event()), 5)
    assert code == 1
    assert [level for level, m in logs if "driver broke" in m] == ["CRITICAL"]
    assert kafka.events[-2:] == ["consumer.stop", "bus.stop"]


async def test_main_run_bus_start_failure_exits_1(kafka: FakeKafka, tmp_path: Path) -> None:
    kafka.start_error = BusError("reaching Kafka: gave up")
    code = await asyncio.wait_for(driver_main.run(driver_settings(tmp_path), asyncio.Event()), 5)
    assert code == 1
    assert not any(e.startswith("publish") for e in kafka.events)


async def test_main_run_stop_while_connecting_exits_130(
    kafka: FakeKafka, tmp_path: Path
) -> None:
    stop = asyncio.Event()
    stop.set()
    code = await asyncio.wait_for(driver_main.run(driver_settings(tmp_path), stop), 5)
    assert code == 130
    assert not any(e.startswith("publish") for e in kafka.events)


async def test_a_correction_after_the_final_status_updates_the_result_and_totals() -> None:
    """SPEC §4: when the CP's meter reports later, Central sends one more update with the
    same status, the new totals and a reason that begins with 'corrected:'."""
    driver, _ = make_driver()
    summary = await driver.run(["CP-001"])
    [result] = summary.results
    assert result.outcome is Outcome.COMPLETED
    await driver.handle_update(DriverUpdate(
        request_id=result.request_id, driver_id=DRIVER, cp_id="CP-001",
        status=DriverStatus.COMPLETED, reason="corrected: the CP's meter reported 0.05 kWh",
        kwh=result.kwh + 0.01, euros=result.euros + 0.003,
    ))
    [corrected] = summary.results
    assert corrected.kwh == pytest.approx(result.kwh + 0.01)
    assert summary.total_kwh == pytest.approx(result.kwh + 0.01)
    assert summary.total_euros == pytest.approx(result.euros + 0.003)
    assert driver.ignored_updates == 0


async def test_a_failed_request_the_cps_meter_completed_is_counted_completed() -> None:
    """Central corrects a FAILED whose CP completed the session (SPEC §4)."""
    summary = DriverSummary()
    summary.results.append(RequestResult("CP-001", "r1", Outcome.FAILED, "CP lost"))
    summary.failed = 1
    corrected = summary.correct("r1", DriverStatus.COMPLETED, 0.06, 0.018)
    assert corrected is not None and corrected.outcome is Outcome.COMPLETED
    assert (summary.completed, summary.failed) == (1, 0)
    assert summary.total_kwh == pytest.approx(0.06)
    assert summary.correct("nobody", DriverStatus.COMPLETED, 1.0, 1.0) is None
