"""`make run CENTRALS=2` (SPEC §9): the launcher's plan of several Centrals (ids, ports,
environment, the clients' address lists, PostgreSQL), its banner, its start and its
supervision. Real Centrals are exercised by tests/e2e/test_launcher.py; the children here are
tiny stdlib programs.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from evcharging.common.centrals import parse_centrals
from evcharging.common.config import (
    CentralSettings,
    CPMonitorSettings,
    FleetSettings,
    LoadSettings,
    OcppSettings,
)
from evcharging.common.config import build_parser as settings_parser
from evcharging.launcher import cli
from evcharging.launcher.cli import options_from_args, run_command
from evcharging.launcher.console import Console, banner
from evcharging.launcher.plan import (
    ChildSpec,
    LaunchError,
    LaunchOptions,
    Role,
    busy_ports,
    central_instances,
    child_specs,
    metrics_targets,
    plan_ports,
)
from evcharging.launcher.supervisor import Supervisor, partitions_settled, supervise
from tests.polling import poll
from tests.unit.test_launcher import LAUNCHER_VARIABLES, SERVICE_PREFIXES, free_port, parse
from tests.unit.test_launcher_postgres import URL, Events, fake_run, run_args

ROOT = Path(__file__).resolve().parents[2]
STAMP = ".venv/.installed"
"""Taken as up to date: these makes must not install anything."""
STUBBORN = (  # says "ready", then sleeps for ten minutes
    "timeit",
    ("-n", "1", "-r", "1", "-s", "print('ready', flush=True)", "import time; time.sleep(600)"),
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No service variable and no .env: the launcher sees only what a test sets."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(SERVICE_PREFIXES) or name in LAUNCHER_VARIABLES | {"NO_COLOR"}:
            monkeypatch.delenv(name)
    return tmp_path


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1."""
    for _ in range(200):
        base = free_port()
        if base + count > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise AssertionError(f"no {count} consecutive free ports")


# --------------------------------------------------------------------------- flags


def test_centrals_flag_implies_a_local_postgresql_and_moves_the_health_ports(
    clean_env: Path,
) -> None:
    one = options_from_args(parse(), {}, {})
    assert one.centrals == 1 and one.database.kind == "sqlite" and one.base_health_port == 8001
    two = options_from_args(parse("--centrals", "2"), {}, {})
    assert two.centrals == 2
    assert two.database.kind == "postgres" and two.database.start_local
    assert two.base_health_port == 8002  # 8001 is central-2's HTTP port
    assert options_from_args(parse("--centrals", "3", "--http-port", "7000"), {},
                             {}).base_health_port == 8001  # no collision: the default stays
    named = options_from_args(parse("--centrals", "2"), {"CENTRAL_DB_URL": URL}, {})
    assert named.database.url == URL and not named.database.start_local
    # A SQLite URL in the environment is one Central's file: a local PostgreSQL instead.
    assert options_from_args(parse("--centrals", "2"), {"CENTRAL_DB_URL": "sqlite:///x.db"},
                             {}).database.start_local
    with pytest.raises(LaunchError, match="--centrals 2 shares one database: PostgreSQL"):
        options_from_args(parse("--centrals", "2", "--db", "sqlite"), {}, {})


def test_a_health_port_the_user_chose_is_kept_and_a_collision_named(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = options_from_args(parse("--centrals", "2", "--base-health-port", "8001"), {}, {})
    assert chosen.base_health_port == 8001
    with pytest.raises(LaunchError, match=r"port 8001 would serve both central-2's dashboard "
                       r"and HTTP API and the /health endpoint of CP-001"):
        plan_ports(8000, 9999, chosen.base_health_port, 2, centrals=2)
    monkeypatch.setenv("CP_ENGINE_HEALTH_PORT", "8001")
    assert options_from_args(parse("--centrals", "2"), {}, {}).base_health_port == 8001


@pytest.mark.parametrize("value", ["0", "10", "two"])
def test_bad_centrals_are_usage_errors(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse("--centrals", value)
    assert exit_info.value.code == 2
    assert "--centrals" in capsys.readouterr().err


def test_help_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "--centrals N" in out
    assert "more than one needs PostgreSQL, so it implies --db postgres" in out
    assert "not built yet" not in out


# --------------------------------------------------------------------------- the plan


def test_each_central_has_its_id_ports_and_peer_url() -> None:
    (alone,) = central_instances(8000, 9999)
    assert (alone.name, alone.instance_id, alone.http_port, alone.listen_port) == (
        "central", "central-1", 8000, 9999)
    assert dict(alone.env()) == {"CENTRAL_INSTANCE_ID": "central-1",
                                 "CENTRAL_PEER_URL": "http://127.0.0.1:8000"}
    three = central_instances(8000, 9999, 3)
    assert [(c.name, c.http_port, c.listen_port) for c in three] == [
        ("central-1", 8000, 9999), ("central-2", 8001, 10000), ("central-3", 8002, 10001)]
    assert [dict(c.env())["CENTRAL_PEER_URL"] for c in three] == [
        "http://127.0.0.1:8000", "http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert three[1].url == "http://localhost:8001/"


def test_one_central_keeps_its_flags_and_name_and_gets_its_instance_id() -> None:
    specs = child_specs(LaunchOptions(cps=1, drivers=0, load=1), "k:1")
    central = specs[0]
    assert (central.name, central.role) == ("central", Role.CENTRAL)
    assert central.args == ("--kafka-bootstrap", "k:1", "--http-port", "8000", "--listen-port",
                            "9999", "--db-path", "ev_charging.db")
    assert dict(central.env) == {"CENTRAL_INSTANCE_ID": "central-1",
                                 "CENTRAL_PEER_URL": "http://127.0.0.1:8000"}
    monitor = next(s for s in specs if s.role is Role.MONITOR)
    assert monitor.args[-4:] == ("--central-host", "localhost", "--central-port", "8000")
    load = next(s for s in specs if s.role is Role.LOAD)
    assert load.args[load.args.index("--central-url") + 1] == "http://localhost:8000"


def test_two_centrals_and_every_client_knows_both() -> None:
    options = LaunchOptions(cps=1, drivers=1, centrals=2, base_health_port=8002, load=2,
                            ocpp_port=9000)
    specs = child_specs(options, "k:1")
    assert [(s.name, s.role) for s in specs] == [
        ("central-1", Role.CENTRAL), ("central-2", Role.CENTRAL), ("ocpp", Role.OCPP),
        ("cp-e CP-001", Role.ENGINE), ("cp-m CP-001", Role.MONITOR),
        ("driver-1", Role.DRIVER), ("load", Role.LOAD)]
    by_name = {s.name: s for s in specs}
    assert by_name["central-2"].argv("py") == [
        "py", "-m", "evcharging.apps.ev_central.main", "--kafka-bootstrap", "k:1",
        "--http-port", "8001", "--listen-port", "10000", "--db-path", "ev_charging.db"]
    assert dict(by_name["central-2"].env) == {"CENTRAL_INSTANCE_ID": "central-2",
                                              "CENTRAL_PEER_URL": "http://127.0.0.1:8001"}
    both = "localhost:8000,localhost:8001"
    for name in ("ocpp", "cp-m CP-001"):
        args = by_name[name].args
        assert args[args.index("--central-host") + 1] == both, name
    load = by_name["load"].args
    assert load[load.index("--central-url") + 1] == "http://localhost:8000,http://localhost:8001"
    # The drivers talk to Central over Kafka only.
    assert not any("central" in arg for arg in by_name["driver-1"].args)
    fleet = child_specs(LaunchOptions(cps=30, fleet=True, centrals=3), "k:1")
    args = next(s for s in fleet if s.role is Role.FLEET).args
    assert args[args.index("--central-host") + 1] == (
        "localhost:8000,localhost:8001,localhost:8002")


def test_the_clients_parse_the_address_lists_they_are_given() -> None:
    """The lists are the clients' own syntax (SPEC §9): their parsers and
    common.centrals.parse_centrals read them as both Centrals."""
    classes = {Role.CENTRAL: CentralSettings, Role.MONITOR: CPMonitorSettings,
               Role.FLEET: FleetSettings, Role.LOAD: LoadSettings, Role.OCPP: OcppSettings}
    for options in (LaunchOptions(cps=1, drivers=0, centrals=2, base_health_port=8002,
                                  load=1, ocpp_port=9000),
                    LaunchOptions(cps=30, drivers=0, centrals=2, fleet=True)):
        for spec in child_specs(options, "localhost:9092"):
            if spec.role not in classes:
                continue
            parsed = vars(settings_parser(classes[spec.role], "x", "").parse_args(
                list(spec.args)))
            settings = classes[spec.role](**{"cp_id": "CP-001", **parsed})
            if isinstance(settings, LoadSettings):
                addresses = parse_centrals(settings.central_url, 8000)
            elif isinstance(settings, CPMonitorSettings | FleetSettings | OcppSettings):
                addresses = parse_centrals(settings.central_host, settings.central_port)
            else:
                continue
            assert [a.url for a in addresses] == ["http://localhost:8000",
                                                  "http://localhost:8001"], spec.name


def test_the_port_plan_has_every_centrals_ports() -> None:
    plan = plan_ports(8000, 9999, 8002, 2, centrals=2)
    assert [(u.port, u.flag) for u in plan.uses()] == [
        (8000, "--http-port"), (9999, "--listen-port"), (8001, "--http-port"),
        (10000, "--listen-port"), (8002, "--base-health-port"), (8003, "--base-health-port")]
    assert busy_ports(plan, is_free=lambda port: port != 10000) == [
        "port 10000 (central-2's TCP control plane) is already in use; choose another with "
        "--listen-port"]
    with pytest.raises(LaunchError, match=r"port 10000 would serve both central-1's "
                       r"dashboard and HTTP API and central-2's TCP control plane"):
        plan_ports(10000, 9999, 8001, 0, centrals=2)
    assert plan_ports(8000, 9999, 8001, 2).uses()[0].what == "Central's dashboard and HTTP API"


def test_prometheus_scrapes_every_central() -> None:
    options = LaunchOptions(cps=0, drivers=0, centrals=2, prometheus_port=9090)
    assert metrics_targets(options) == [("central", 8000), ("central", 8001)]
    (prometheus,) = [s for s in child_specs(options, "k:1") if s.role is Role.PROMETHEUS]
    assert [a for a in prometheus.args if a.startswith("--target")] == [
        "--target=central=127.0.0.1:8000", "--target=central=127.0.0.1:8001"]


# --------------------------------------------------------------------------- the banner


def test_the_banner_shows_each_centrals_dashboard() -> None:
    out = io.StringIO()
    banner(Console(out, colour=False), LaunchOptions(cps=2, centrals=2, base_health_port=8002),
           "x:1", "PostgreSQL postgresql://evcharging:***@127.0.0.1:55432/evcharging")
    text = out.getvalue()
    assert "EV charging network running: 2 Centrals, 2 CP(s) (CP-001, CP-002)" in text
    assert "Central central-1: dashboard http://localhost:8000/  (TCP localhost:9999" in text
    assert "Central central-2: dashboard http://localhost:8001/  (TCP localhost:10000" in text
    assert "http://localhost:8001/health: its partitions" in text
    assert "ctl --host localhost:9999,localhost:10000 status" in text
    assert "CP health: http://localhost:8002/health (CP-001)" in text
    out = io.StringIO()
    banner(Console(out, colour=False), LaunchOptions(cps=2), "x:1")
    assert "running: Central, 2 CP(s)" in out.getvalue()
    assert "Central central-1:" not in out.getvalue()
    assert "ctl --port 9999 status" in out.getvalue()


# --------------------------------------------------------------------------- run_command


def test_two_centrals_start_after_postgresql_with_their_environment(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run CENTRALS=2` with nothing else: the broker, a local PostgreSQL, then the
    two Centrals (their URL in the environment), stopped in reverse."""
    events = Events()
    fake_run(monkeypatch, events, started=True)
    seen: list[list[ChildSpec]] = []
    recording = cli.supervise  # fake_run's: records the order and Central's environment

    async def supervise_specs(supervisor: Supervisor) -> tuple[int, bool]:
        seen.append(supervisor.specs)
        return await recording(supervisor)

    monkeypatch.setattr(cli, "supervise", supervise_specs)
    http, listen = free_ports(2), free_ports(2)
    args = parse("--cps", "0", "--no-drivers", "--centrals", "2", "--http-port", str(http),
                 "--listen-port", str(listen))
    assert run_command(args) == 0
    assert events.seen == ["start kafka", "start postgres", "central", "stop postgres",
                           "stop kafka"]
    assert events.central_env["CENTRAL_DB_URL"] == URL
    (specs,) = seen
    assert [(s.name, dict(s.env)) for s in specs] == [
        ("central-1", {"CENTRAL_INSTANCE_ID": "central-1",
                       "CENTRAL_PEER_URL": f"http://127.0.0.1:{http}"}),
        ("central-2", {"CENTRAL_INSTANCE_ID": "central-2",
                       "CENTRAL_PEER_URL": f"http://127.0.0.1:{http + 1}"})]


def test_a_busy_port_of_the_second_central_stops_the_launcher(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    http = free_ports(2)
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", http + 1))
        listener.listen()
        code = run_command(run_args("--centrals", "2", "--kafka-bootstrap", "nowhere:1",
                                    "--http-port", str(http)))
    assert code == 2
    out = capsys.readouterr().out
    assert f"port {http + 1} (central-2's dashboard and HTTP API) is already in use" in out
    assert "PostgreSQL" not in out  # nothing was started


def test_make_run_passes_centrals_and_stays_as_it_was_without() -> None:
    # Under `make test` the outer make's variables (ARGS=...) and flags reach a child make
    # through the environment: the dry run must not see them.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ARGS")}

    def dry(*variables: str) -> str:
        return subprocess.run(["make", "--no-print-directory", "-n", "-o", STAMP, "run",
                               *variables], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=30, check=True
                              ).stdout.replace("\\\n", " ")

    two = " ".join(dry("CENTRALS=2").split())
    assert "-m evcharging run --cps 2 --centrals 2" in two
    plain = " ".join(dry().split())
    assert "--centrals" not in plain and "--db" not in plain
    assert plain.endswith("-m evcharging run --cps 2")
    assert "--db postgres" in " ".join(dry("DB=postgres", "CENTRALS=2").split())


# --------------------------------------------------------------------------- supervision
# Real tiny children: `python -m http.server` answering GET /health from a file, and timeit.


def health_server(directory: Path, port: int) -> tuple[str, tuple[str, ...]]:
    return ("http.server", ("--bind", "127.0.0.1", "--directory", str(directory), str(port)))


async def test_each_central_is_waited_for_and_stopped_with_the_others(tmp_path: Path) -> None:
    """Both Centrals start, each /health is waited for (what it says of its instance and
    partitions is shown), the banner names both, and a stop signal stops both."""
    http = free_ports(2)
    options = LaunchOptions(cps=0, drivers=0, centrals=2, http_port=http,
                            listen_port=free_ports(2), start_timeout=30, stop_timeout=5)
    out = io.StringIO()
    sup = Supervisor(options, "x:1", Console(out, colour=False, width=11), os.environ, "")
    for i, spec in enumerate(sup.specs):
        folder = tmp_path / spec.name
        folder.mkdir()
        (folder / "health").write_text(json.dumps(
            {"status": "ok", "instance": spec.name, "partitions": [i, i + 2]}))
        module, args = health_server(folder, http + i)
        sup.specs[i] = ChildSpec(spec.name, spec.role, args, module_override=module,
                                 env=spec.env)
    run = asyncio.create_task(supervise(sup))
    try:
        await poll(lambda: "Central central-2: dashboard" in out.getvalue(), timeout=30,
                   what="the banner", retry_on=())
        text = out.getvalue()
        assert f"waiting for Central central-1 at http://127.0.0.1:{http}/health" in text
        assert re.search(r"Central central-1 is up \([\d.]+ s\): instance central-1$", text,
                         re.MULTILINE), text
        assert "Central central-2 is up" in text
        assert re.search(r"the Centrals share the partitions \([\d.]+ s\): central-1 \[0, 2\], "
                         r"central-2 \[1, 3\]", text), text
        assert [c.name for c in sup.centrals] == ["central-1", "central-2"]
        assert all(c.running for c in sup.centrals)
        sup.on_signal(signal.SIGINT)
        code, forced = await asyncio.wait_for(run, 30)
    finally:
        for child in sup.children:
            child.kill()
        if not run.done():
            run.cancel()
    assert (code, forced) == (0, False)
    assert "stopping EV Central: central-1, central-2" in out.getvalue()
    assert "all 2 processes have stopped" in out.getvalue()


def test_a_settled_group_owns_each_partition_once_and_spreads_them() -> None:
    assert partitions_settled([[0, 2], [1, 3]])
    assert partitions_settled([[0], [], []])  # one partition, three Centrals: one owns it
    assert not partitions_settled([[0, 1, 2, 3], []])  # still joining: central-2 owns nothing yet
    assert not partitions_settled([[0, 1], [1, 2, 3]])  # handing over: 1 owned twice
    assert not partitions_settled([[], []])


async def test_a_central_that_dies_while_the_other_runs_is_reported_not_fatal() -> None:
    out = io.StringIO()
    sup = Supervisor(LaunchOptions(centrals=2, stop_timeout=5), "x:1",
                     Console(out, colour=False, width=11), os.environ, "")
    sup.started = True
    alive = sup._launch(ChildSpec("central-1", Role.CENTRAL, STUBBORN[1],
                                  module_override=STUBBORN[0]))
    dying = sup._launch(ChildSpec("central-2", Role.CENTRAL, ("/nonexistent/file.json",),
                                  module_override="json.tool"))
    sup.centrals = [alive, dying]
    try:
        await poll(lambda: dying.ended, timeout=20, what="central-2's end")
        text = out.getvalue()
        assert "!!! central-2 DIED: exit code 2" in text
        assert ("!!! central-2 IS DOWN: its CPs go over to central-1, which serves the whole "
                "network") in text
        assert "EV CENTRAL IS DOWN" not in text
        assert alive.running
    finally:
        sup.hurry.set()
        await sup.shutdown()


async def test_each_central_gets_its_own_environment() -> None:
    out = io.StringIO()
    sup = Supervisor(LaunchOptions(), "x:1", Console(out, colour=False, width=11),
                     {**os.environ, "CENTRAL_INSTANCE_ID": "from-the-user"}, "")
    printing = ("timeit", ("-n", "1", "-r", "1", "-s",
                           "import os; print('id', os.environ['CENTRAL_INSTANCE_ID'], "
                           "os.environ['CENTRAL_PEER_URL'], flush=True)", "pass"))
    child = sup._launch(ChildSpec("central-2", Role.CENTRAL, printing[1],
                                  module_override=printing[0],
                                  env=central_instances(8000, 9999, 2)[1].env()))
    await poll(lambda: child.ended, timeout=20, what="the child's end")
    assert "id central-2 http://127.0.0.1:8001" in out.getvalue()
    await sup.shutdown()
