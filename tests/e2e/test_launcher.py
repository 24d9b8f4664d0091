"""`python -m evcharging run` as a user runs it: start, charge, Ctrl-C, nothing left behind.

The launcher runs in its own process with its output in a file. Its children are collected
from /proc while it runs; after it exits none of them may be alive, no process may carry
the test's unique topic prefix in its environment, and every port must be free again.
Everything is waited for by polling with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import websockets
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call
from websockets.typing import Subprotocol

from evcharging.devtools.kafka_broker import run_dir
from evcharging.devtools.postgres import postgres_status
from evcharging.devtools.postgres import run_dir as pg_run_dir
from tests.polling import poll, poll_sync

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, poll: float = 0.2) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` after `timeout`."""
    return poll_sync(
        probe, timeout=timeout, what=what, interval=poll, retry_on=(httpx.HTTPError, OSError)
    )


def port_free(port: int) -> bool:
    """Whether a server could listen on `port` (SO_REUSEADDR, as the services bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = int(sock.getsockname()[1])
        if base + count <= 65535 and all(port_free(base + i) for i in range(count)):
            return base
    raise AssertionError(f"no {count} consecutive free ports")


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.update(int(part) for part in path.read_text().split())
        except OSError:
            continue
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_with_env(marker: str) -> list[int]:
    """Every live process whose environment contains `marker` (this test's children)."""
    needle = marker.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes() and alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class Launcher:
    """`python -m evcharging run ...` in its own process, its output in a file."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str]) -> None:
        self.log_path = tmp / "launcher.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "evcharging", "run", *args],
                cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        self.seen: dict[int, str] = {}

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def collect_children(self) -> dict[int, str]:
        for pid in children_of(self.popen.pid):
            # read again: right after fork a child still shows the launcher's command line
            self.seen[pid] = cmdline(pid) or self.seen.get(pid, "")
        return self.seen

    def wait_output(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern, re.MULTILINE)

        def probe() -> re.Match[str] | None:
            self.collect_children()
            if self.popen.poll() is not None:
                raise AssertionError(f"launcher exited ({self.popen.returncode}):\n{self.output()}")
            return regex.search(self.output())

        return wait_for(probe, timeout, f"launcher output {pattern!r}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"launcher still running after {timeout} s:\n{self.output()}"
            ) from None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        for pid in self.seen:  # the test failed: leave nothing behind anyway
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def base_env(prefix: str, tmp: Path) -> dict[str, str]:
    """The user's environment without service settings or a broker, plus fast services."""
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("CENTRAL_", "CP_ENGINE_", "CP_MONITOR_", "DRIVER_", "FLEET_",
                               "LOAD_", "OCPP_"))
        and key != "KAFKA_BOOTSTRAP"
    }
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        "NO_COLOR": "1",
        "CP_ENGINE_SESSION_SECONDS": "2",
        "CP_ENGINE_TELEMETRY_INTERVAL": "0.5",
        "CP_ENGINE_STATUS_INTERVAL": "1",
        "DRIVER_REQUEST_INTERVAL": "0.5",
        "CENTRAL_TOPIC_PREFIX": prefix,
        "CP_ENGINE_TOPIC_PREFIX": prefix,
        "DRIVER_TOPIC_PREFIX": prefix,
        "FLEET_TOPIC_PREFIX": prefix,
        "LOAD_TOPIC_PREFIX": prefix,
        "OCPP_TOPIC_PREFIX": prefix,
        "OCPP_STATUS_INTERVAL": "1",
        "CENTRAL_GROUP_ID": f"{prefix}central",
        "CENTRAL_DB_PATH": str(tmp / "ignored.db"),  # the flag must win
    })
    return env


@pytest.fixture
def prefix() -> str:
    return f"e2e-launcher-{uuid.uuid4().hex[:8]}."


@pytest.fixture
def launchers(request: pytest.FixtureRequest) -> Iterator[list[Launcher]]:
    started: list[Launcher] = []
    yield started
    report = getattr(request.node, "rep_call", None)
    for launcher in started:
        if report is not None and report.failed:
            sys.stderr.write(f"===== launcher output\n{launcher.output()[-20000:]}\n")
        launcher.kill()


def assert_nothing_left(launcher: Launcher, prefix: str, ports: list[int]) -> None:
    survivors = {pid: cmd for pid, cmd in launcher.seen.items() if alive(pid)}
    assert survivors == {}, f"children still alive after the launcher exited: {survivors}"
    stray = processes_with_env(prefix)
    assert stray == [], f"processes of this run still alive: {[cmdline(p) for p in stray]}"
    busy = [port for port in ports if not port_free(port)]
    assert busy == [], f"ports still taken: {busy}"


def test_run_charges_restarts_and_stops_cleanly(
    kafka_bootstrap: str, tmp_path: Path, prefix: str, launchers: list[Launcher]
) -> None:
    http, listen, health = free_ports(1), free_ports(1), free_ports(2)
    db_path = tmp_path / "central.db"
    requests = tmp_path / "requests.txt"
    requests.write_text("# two charges\nCP-001\nCP-002\n")
    launcher = Launcher(
        tmp_path,
        ["--cps", "2", "--drivers", "1", "--kafka-bootstrap", kafka_bootstrap,
         "--http-port", str(http), "--listen-port", str(listen), "--base-health-port",
         str(health), "--db-path", str(db_path), "--requests-file", str(requests), "--restart"],
        base_env(prefix, tmp_path),
    )
    launchers.append(launcher)

    launcher.wait_output(rf"Dashboard: http://localhost:{http}/", 90)
    out = launcher.output()
    assert f"API docs:  http://localhost:{http}/docs" in out
    assert f"localhost:{listen}" in out
    assert "Ctrl-C" in out
    # One Central is the instance central-1 (SPEC §9), its lines still prefixed "central".
    assert re.search(r"^central +\| .*EV Central ready: .*\(instance central-1, "
                     r"partitions \[0, 1", out, re.MULTILINE), out
    assert re.search(r"^cp-e CP-001 \| ", out, re.MULTILINE)

    with httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=5, trust_env=False) as client:
        assert client.get("/").status_code == 200
        cps = {cp["cp_id"]: cp["state"] for cp in client.get("/cp").json()}
        assert set(cps) == {"CP-001", "CP-002"}
        assert set(cps.values()) <= {"ACTIVATED", "SUPPLYING"}, cps

        def completed() -> list[object] | None:
            launcher.collect_children()
            rows = client.get("/sessions", params={"status": "COMPLETED"}).json()
            return rows or None

        rows = wait_for(completed, 60, "a COMPLETED session")
        assert rows
    assert db_path.exists()
    assert not (tmp_path / "ignored.db").exists()

    # A monitor that dies is reported and, with --restart, started again.
    monitors = {
        pid: cmd for pid, cmd in launcher.collect_children().items()
        if "ev_cp_m.main" in cmd and "CP-002" in cmd
    }
    assert len(monitors) == 1, launcher.seen
    (old_monitor,) = monitors
    os.kill(old_monitor, signal.SIGKILL)
    launcher.wait_output(r"cp-m CP-002 DIED: killed by SIGKILL", 20)
    launcher.wait_output(r"restarting cp-m CP-002 in 1 s", 20)

    def new_monitor() -> int | None:
        for pid in children_of(launcher.popen.pid):
            if pid != old_monitor and "ev_cp_m.main" in cmdline(pid) and "CP-002" in cmdline(pid):
                return pid
        return None

    wait_for(new_monitor, 20, "the restarted monitor")
    launcher.wait_output(r"driver-1 finished its requests file", 60)

    children = launcher.collect_children()
    assert len([cmd for cmd in children.values() if "evcharging.apps" in cmd]) == 7, children
    launcher.popen.send_signal(signal.SIGINT)
    assert launcher.wait_exit(60) == 0
    out = launcher.output()
    order = [out.index(f"stopping {what}") for what in
             ("CP monitors", "CP engines", "EV Central")]
    assert order == sorted(order)
    assert "all 6 processes have stopped" in out  # the restarted monitor counts once
    assert "killed (SIGKILL)" not in out
    assert_nothing_left(launcher, prefix, [http, listen, health, health + 1])


def test_run_starts_and_stops_its_own_broker(
    tmp_path: Path, prefix: str, launchers: list[Launcher]
) -> None:
    """No broker named anywhere: the launcher starts one (on a random port here, so that it
    keeps no data) and stops it on Ctrl-C."""
    http, listen, health = free_ports(1), free_ports(1), free_ports(1)
    launcher = Launcher(
        tmp_path,
        ["--cps", "1", "--no-drivers", "--kafka-port", "0", "--http-port", str(http),
         "--listen-port", str(listen), "--base-health-port", str(health),
         "--db-path", str(tmp_path / "central.db")],
        base_env(prefix, tmp_path),
    )
    launchers.append(launcher)
    launcher.wait_output(rf"Dashboard: http://localhost:{http}/", 120)
    match = re.search(r"Kafka: +127\.0\.0\.1:(\d+) \(started by the launcher", launcher.output())
    assert match, launcher.output()
    kafka = int(match[1])
    work_dir = run_dir(kafka)
    assert work_dir.is_dir()
    brokers = [pid for pid, cmd in launcher.collect_children().items() if "kafka.Kafka" in cmd]
    assert len(brokers) == 1, launcher.seen

    launcher.popen.send_signal(signal.SIGINT)
    assert launcher.wait_exit(90) == 0
    assert "the Kafka broker has stopped" in launcher.output()
    assert not alive(brokers[0])
    assert_nothing_left(launcher, prefix, [http, listen, health, kafka])
    assert not work_dir.exists()


def test_run_with_a_fleet_and_the_load_generator(
    kafka_bootstrap: str, tmp_path: Path, prefix: str, launchers: list[Launcher]
) -> None:
    """More than 20 CPs: one CP Fleet process instead of an engine and a monitor per CP,
    waited for with progress lines; --load starts the driver load generator, whose sessions
    complete at the fleet's CPs; Ctrl-C stops the load, the fleet and Central in that order
    and leaves nothing behind."""
    http, listen, fleet = free_ports(1), free_ports(1), free_ports(1)
    launcher = Launcher(
        tmp_path,
        ["--cps", "30", "--sites", "3", "--load", "4", "--kafka-bootstrap", kafka_bootstrap,
         "--http-port", str(http), "--listen-port", str(listen), "--fleet-port", str(fleet),
         "--db-path", str(tmp_path / "central.db")],
        base_env(prefix, tmp_path),
    )
    launchers.append(launcher)
    launcher.wait_output(rf"Dashboard: http://localhost:{http}/", 90)
    out = launcher.output()
    assert "waiting for the CP Fleet's 30 CPs to be ACTIVATED at Central" in out
    assert re.search(r"every CP is ACTIVATED: 30 CPs in [\d.]+ s", out)
    assert "Central, 30 CPs (CP-00001 .. CP-00030, 3 site(s)), 0 driver(s)" in out
    assert f"CP Fleet:  http://localhost:{fleet}/health  (one process for every CP" in out
    assert "Load:      4 new drivers/s (ev_load), until Ctrl-C" in out
    assert "Logs:      Central and the fleet: warnings only" in out
    programs = [cmd for cmd in launcher.collect_children().values() if "evcharging.apps" in cmd]
    assert sorted(cmd.split(" -m ")[1].split()[0] for cmd in programs) == [
        "evcharging.apps.ev_central.main", "evcharging.apps.ev_fleet.main",
        "evcharging.apps.ev_load.main",
    ], programs

    with httpx.Client(timeout=5, trust_env=False) as client:
        page = client.get(f"http://127.0.0.1:{http}/cp", params={"limit": 5})
        assert page.headers["X-Total-Count"] == "30"
        assert [cp["cp_id"] for cp in page.json()] == [f"CP-0000{i}" for i in range(1, 6)]
        assert {cp["site"] for cp in page.json()} == {"site-01"}
        summary = client.get(f"http://127.0.0.1:{http}/summary").json()
        assert summary["cps"] == 30 and len(summary["by_site"]) == 3
        assert client.get(f"http://127.0.0.1:{fleet}/health").json()["cps"] == 30

        def completed() -> list[dict[str, object]] | None:
            launcher.collect_children()
            rows = client.get(f"http://127.0.0.1:{http}/sessions",
                              params={"status": "COMPLETED"}).json()
            return [row for row in rows if str(row["driver_id"]).startswith("load-")] or None

        rows = wait_for(completed, 60, "a COMPLETED session of the load generator")
        assert str(rows[0]["cp_id"]).startswith("CP-000")

    launcher.popen.send_signal(signal.SIGINT)
    assert launcher.wait_exit(90) == 0
    out = launcher.output()
    assert "stopping the driver load, the CP Fleet and EV Central" in out
    order = [out.index(f"stopping {what}: ") for what in
             ("the driver load", "the CP Fleet", "EV Central")]
    assert order == sorted(order)
    assert re.search(r"^load +\| load summary \(stopped early\)", out, re.MULTILINE)
    assert "all 3 processes have stopped" in out
    assert "killed (SIGKILL)" not in out
    assert_nothing_left(launcher, prefix, [http, listen, fleet])


def test_run_with_sasl_charges_on_its_own_secured_broker(
    tmp_path: Path, prefix: str, launchers: list[Launcher]
) -> None:
    """`make run ARGS=--sasl` (SPEC §11): the launcher's broker authenticates and
    authorizes, and the services it starts connect as their principals and charge."""
    http, listen, health = free_ports(1), free_ports(1), free_ports(2)
    requests = tmp_path / "requests.txt"
    requests.write_text("CP-001\nCP-002\n")
    env = base_env(prefix, tmp_path)
    env["CENTRAL_GROUP_ID"] = f"ev-central-{uuid.uuid4().hex[:8]}"  # Central's ACLs' prefix
    launcher = Launcher(
        tmp_path,
        ["--sasl", "--cps", "2", "--drivers", "1", "--kafka-port", "0",
         "--http-port", str(http), "--listen-port", str(listen), "--base-health-port",
         str(health), "--db-path", str(tmp_path / "central.db"),
         "--requests-file", str(requests)],
        env,
    )
    launchers.append(launcher)
    launcher.wait_output(rf"Dashboard: http://localhost:{http}/", 120)
    out = launcher.output()
    assert "SASL SCRAM-SHA-512 and the ACLs of SPEC §11" in out
    match = re.search(r"Kafka: +127\.0\.0\.1:(\d+) \(started by the launcher", out)
    assert match, out
    kafka = int(match[1])
    properties = (run_dir(kafka) / "server.properties").read_text()
    assert "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer" in (
        properties)
    assert "PLAINTEXT://" not in properties.replace("SASL_PLAINTEXT://", "")

    with httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=5, trust_env=False) as client:

        def completed() -> list[object] | None:
            launcher.collect_children()
            rows = client.get("/sessions", params={"status": "COMPLETED"}).json()
            return rows if len(rows) == 2 else None

        wait_for(completed, 90, "both sessions COMPLETED")
    launcher.wait_output(r"driver-1 finished its requests file", 60)
    assert "Authorization" not in launcher.output()

    launcher.popen.send_signal(signal.SIGINT)
    assert launcher.wait_exit(90) == 0
    assert "the Kafka broker has stopped" in launcher.output()
    assert_nothing_left(launcher, prefix, [http, listen, health, health + 1, kafka])
    assert not run_dir(kafka).exists()


async def _charge_point_joins(url: str, central: str) -> dict[str, object]:
    """A 1.6 charger played by the `ocpp` library boots at `url` and reports connector 1
    Available; returns its CP as Central's /cp lists it, once ACTIVATED."""
    async with websockets.connect(url, subprotocols=[Subprotocol("ocpp1.6")]) as ws:
        charger = ChargePoint16(url.rsplit("/", 1)[1], ws)
        listening = asyncio.create_task(charger.start())
        try:
            boot = await charger.call(call.BootNotification(
                charge_point_model="Launcher-1", charge_point_vendor="evcharging-e2e"))
            assert boot.status == "Accepted"
            await charger.call(call.StatusNotification(connector_id=1, error_code="NoError",
                                                       status="Available"))
            async with httpx.AsyncClient(base_url=central, timeout=5, trust_env=False) as http:

                async def activated() -> dict[str, object] | None:
                    rows = (await http.get("/cp")).json()
                    found = [cp for cp in rows if cp["cp_id"] == "CH-E2E.1"]
                    return dict(found[0]) if found and found[0]["state"] == "ACTIVATED" else None

                found: dict[str, object] = await poll(
                    activated, timeout=30, what="CH-E2E.1 ACTIVATED at Central",
                    retry_on=(httpx.HTTPError,))
                return found
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)


def test_run_with_ocpp_starts_the_gateway_a_charger_joins(
    kafka_bootstrap: str, tmp_path: Path, prefix: str, launchers: list[Launcher]
) -> None:
    """`make run ARGS=--ocpp`: the OCPP gateway starts after Central, the banner prints the
    URL a charger connects to, a charger played by the `ocpp` library there becomes the CP
    ``CH-E2E.1`` at Central, and Ctrl-C stops the gateway before Central."""
    http, listen, ws_port, gateway_http = (free_ports(1) for _ in range(4))
    launcher = Launcher(
        tmp_path,
        ["--cps", "0", "--no-drivers", "--ocpp", "--ocpp-port", str(ws_port),
         "--ocpp-http-port", str(gateway_http), "--kafka-bootstrap", kafka_bootstrap,
         "--http-port", str(http), "--listen-port", str(listen),
         "--db-path", str(tmp_path / "central.db")],
        base_env(prefix, tmp_path),
    )
    launchers.append(launcher)
    launcher.wait_output(rf"Dashboard: http://localhost:{http}/", 90)
    out = launcher.output()
    url = f"ws://127.0.0.1:{ws_port}/ocpp/"
    assert f"OCPP:      chargers connect to {url}<charger-id>" in out
    assert out.index("Central is up") < out.index("waiting for the OCPP gateway")
    assert re.search(r"^ocpp +\| .*OCPP gateway running", out, re.MULTILINE), out
    programs = [cmd for cmd in launcher.collect_children().values() if "evcharging.apps" in cmd]
    assert sorted(cmd.split(" -m ")[1].split()[0] for cmd in programs) == [
        "evcharging.apps.ev_central.main", "evcharging.apps.ev_ocpp.main"], programs

    cp = asyncio.run(_charge_point_joins(url + "CH-E2E", f"http://127.0.0.1:{http}"))
    assert cp["state"] == "ACTIVATED"

    launcher.popen.send_signal(signal.SIGINT)
    assert launcher.wait_exit(60) == 0
    out = launcher.output()
    assert out.index("stopping the OCPP gateway: ") < out.index("stopping EV Central: ")
    assert "killed (SIGKILL)" not in out
    assert_nothing_left(launcher, prefix, [http, listen, ws_port, gateway_http])


@pytest.fixture
def postgres_port() -> Iterator[int]:
    """A free port for the launcher's PostgreSQL; its folder is removed even if a test fails
    (the launcher removes it itself after a clean stop)."""
    port = free_ports(1)
    yield port
    shutil.rmtree(pg_run_dir(port), ignore_errors=True)


def test_run_with_db_postgres_starts_and_stops_its_own_postgresql(
    kafka_bootstrap: str, tmp_path: Path, prefix: str, launchers: list[Launcher],
    postgres_port: int,
) -> None:
    """`make run DB=postgres`: the launcher starts a local PostgreSQL before Central, which
    uses it; a session completes; Ctrl-C stops Central, then PostgreSQL, and leaves nothing
    behind."""
    http, listen, health = free_ports(1), free_ports(1), free_ports(1)
    requests = tmp_path / "requests.txt"
    requests.write_text("CP-001\n")
    launcher = Launcher(
        tmp_path,
        ["--cps", "1", "--drivers", "1", "--db", "postgres", "--postgres-port", str(postgres_port),
         "--kafka-bootstrap", kafka_bootstrap, "--http-port", str(http),
         "--listen-port", str(listen), "--base-health-port", str(health),
         "--requests-file", str(requests), "--db-path", str(tmp_path / "unused.db")],
        base_env(prefix, tmp_path),
    )
    launchers.append(launcher)
    launcher.wait_output(rf"Dashboard: http://localhost:{http}/", 120)
    out = launcher.output()
    match = re.search(
        r"Database: +PostgreSQL postgresql://evcharging:\*\*\*@127\.0\.0\.1:(\d+)/evcharging "
        r"\(started by the launcher", out)
    assert match, out
    port = int(match[1])
    assert port == postgres_port
    assert out.index("starting PostgreSQL") < out.index("EV Central ready")
    # The postmaster is the one `postgres` child that stays (`postgres --version` and initdb's
    # own `postgres` children come and go before it starts), and the devtool names its pid.
    started = re.findall(r"Started PostgreSQL pid (\d+)", out)
    assert len(started) == 1, out
    postmasters = [pid for pid, cmd in launcher.collect_children().items()
                   if Path(cmd.split(" ")[0]).name == "postgres" and alive(pid)]
    assert postmasters == [int(started[0])], launcher.seen
    work_dir = pg_run_dir(port)
    assert work_dir.is_dir()

    with httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=5, trust_env=False) as client:
        database = client.get("/health").json()["database"]
        assert database["ok"] is True
        assert database["path"] == f"postgresql://evcharging:***@127.0.0.1:{port}/evcharging"

        def completed() -> list[object] | None:
            launcher.collect_children()
            rows = client.get("/sessions", params={"status": "COMPLETED"}).json()
            return rows or None

        assert wait_for(completed, 60, "a COMPLETED session")
    assert not (tmp_path / "unused.db").exists()

    launcher.popen.send_signal(signal.SIGINT)
    assert launcher.wait_exit(60) == 0
    out = launcher.output()
    assert "then PostgreSQL" in out
    assert out.index("stopping EV Central") < out.index("stopping PostgreSQL") \
        < out.index("PostgreSQL has stopped")
    assert "killed (SIGKILL)" not in out
    assert not alive(postmasters[0])
    assert_nothing_left(launcher, prefix, [http, listen, health, port])
    assert not postgres_status(work_dir).running  # its cluster is kept: a port was named


def test_run_with_two_centrals_on_its_own_postgresql(
    kafka_bootstrap: str, tmp_path: Path, prefix: str, launchers: list[Launcher],
    postgres_port: int,
) -> None:
    """`make run CENTRALS=2` (SPEC §9): a local PostgreSQL, then central-1 and central-2 on
    consecutive ports, each with its instance id; the banner shows both dashboards, both
    answer /health, the CP's monitor is given both addresses; Ctrl-C stops both Centrals,
    then PostgreSQL, and leaves nothing behind."""
    http, listen, health = free_ports(2), free_ports(2), free_ports(1)
    env = base_env(prefix, tmp_path)
    env["CENTRAL_TOPIC_PARTITIONS"] = "4"
    launcher = Launcher(
        tmp_path,
        ["--centrals", "2", "--cps", "1", "--no-drivers", "--postgres-port",
         str(postgres_port), "--kafka-bootstrap", kafka_bootstrap, "--http-port", str(http),
         "--listen-port", str(listen), "--base-health-port", str(health),
         "--db-path", str(tmp_path / "unused.db")],
        env,
    )
    launchers.append(launcher)
    launcher.wait_output(rf"Central central-2: dashboard http://localhost:{http + 1}/", 150)
    out = launcher.output()
    assert f"Central central-1: dashboard http://localhost:{http}/  (TCP localhost:{listen}" in (
        out)
    assert "running: 2 Centrals, 1 CP(s) (CP-001)" in out
    assert re.search(r"Database: +PostgreSQL postgresql://evcharging:\*\*\*@127\.0\.0\.1:"
                     rf"{postgres_port}/evcharging \(started by the launcher", out), out
    assert out.index("starting PostgreSQL") < out.index("waiting for Central central-1")
    assert re.search(r"Central central-2 is up \([\d.]+ s\): instance central-2", out), out
    assert out.index("the Centrals share the partitions") < out.index("waiting for 1 CP(s)")
    assert re.search(r"^central-1 +\| ", out, re.MULTILINE)
    assert re.search(r"^central-2 +\| ", out, re.MULTILINE)
    programs = [cmd for cmd in launcher.collect_children().values() if "evcharging.apps" in cmd]
    centrals = [cmd for cmd in programs if "ev_central.main" in cmd]
    assert len(centrals) == 2, programs
    (monitor,) = [cmd for cmd in programs if "ev_cp_m.main" in cmd]
    assert f"--central-host localhost:{http},localhost:{http + 1}" in monitor

    ports = (http, http + 1)
    with httpx.Client(timeout=5, trust_env=False) as client:
        reports = [client.get(f"http://127.0.0.1:{port}/health").json() for port in ports]
        for index, body in enumerate(reports, start=1):
            assert body["database"]["ok"] is True, body
            assert body["database"]["path"].startswith("postgresql://"), body
            assert body["instance"] == f"central-{index}", body

        def shared() -> list[set[int]] | None:
            owned = [set(client.get(f"http://127.0.0.1:{port}/health").json()["partitions"])
                     for port in ports]
            disjoint = not owned[0] & owned[1]
            return owned if disjoint and owned[0] | owned[1] == set(range(4)) else None

        # SPEC §9: each owns some of the 4 partitions, none twice, together all of them.
        owned = wait_for(shared, 60, "the two Centrals sharing the 4 partitions")
        assert all(owned), owned
        # Any door: each answers for the whole network, the CP its partner owns included.
        for port in ports:
            page = client.get(f"http://127.0.0.1:{port}/cp")
            assert [cp["cp_id"] for cp in page.json()] == ["CP-001"], (port, page.text)
            assert "X-Evcharging-Partial" not in page.headers, port

    launcher.popen.send_signal(signal.SIGINT)
    assert launcher.wait_exit(90) == 0
    out = launcher.output()
    assert "stopping EV Central: central-1, central-2" in out
    assert out.index("stopping EV Central") < out.index("stopping PostgreSQL") \
        < out.index("PostgreSQL has stopped")
    assert "killed (SIGKILL)" not in out
    assert_nothing_left(launcher, prefix, [http, http + 1, listen, listen + 1, health,
                                           postgres_port])
    assert not (tmp_path / "unused.db").exists()
