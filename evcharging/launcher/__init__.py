"""The local launcher: ``python -m evcharging run`` (what ``make run`` calls).

It starts the whole network on one machine, with every process's output in one terminal:

1. **Kafka.** The broker named by ``--kafka-bootstrap``, else by ``KAFKA_BOOTSTRAP`` or
   ``CENTRAL_KAFKA_BOOTSTRAP`` (process environment first, then ``.env``). When none is
   named, a local broker is started with :class:`~evcharging.devtools.kafka_broker.KafkaBroker`
   (on 9092 when free, else on a free port) and stopped at the end. It lives where the
   broker CLI keeps the broker of that port, ``.cache/kafka/run/PORT`` (so ``make
   broker-status`` sees it); on a fixed port its data survives between runs, like Central's
   database, and a broker on a port picked at random keeps none. With ``--sasl`` it is the
   broker of SPEC §11 (SASL SCRAM-SHA-512, the ACLs of the principals central, cp and
   driver; its data in ``data-sasl``) and the children get ``KAFKA_SECURITY_PROTOCOL`` and
   the principals' passwords in their environment.
2. **EV Central**, then wait until ``GET /health`` answers 200. With ``--centrals N``
   (``make run CENTRALS=N``, SPEC §9), N Centrals ``central-1`` … ``central-N`` on HTTP
   ports ``--http-port`` + 0, 1, … and TCP ports ``--listen-port`` + 0, 1, …, each with
   ``CENTRAL_INSTANCE_ID`` and ``CENTRAL_PEER_URL`` in its environment, sharing the run's
   ``CENTRAL_GROUP_ID`` and a PostgreSQL (more than one implies ``--db postgres``); each is
   waited for, the banner shows each one's dashboard, every client of Central's API
   (monitors, fleet, gateway, load) gets every address, and the CPs' default health ports
   move past the Centrals' HTTP ports. ``CENTRAL_INSTANCE_ID=central-1`` with one Central too.
   With ``--ocpp``, then the **OCPP gateway** (``evcharging.apps.ev_ocpp``, prefix ``ocpp``;
   WebSocket port ``--ocpp-port``, default 9000, its ``/health`` on ``--ocpp-http-port``,
   default 9001), waited for until its ``/health`` answers 200; the banner shows the URL a
   charger connects to, ``ws://127.0.0.1:9000/ocpp/<charger-id>``. It stops after the CPs,
   before Central.
3. **N charging points**. Up to :data:`~evcharging.launcher.plan.FLEET_THRESHOLD` (20) CPs,
   or with ``--no-fleet``: the engines ``CP-001`` … (health ports ``base``, ``base+1``, …);
   each engine's monitor starts as soon as Central shows that CP ACTIVATED, so that a monitor
   never sees its engine still starting (no false "health check failed" at start-up). The
   launcher waits until Central shows every CP ACTIVATED. More CPs, or ``--fleet``: one CP
   Fleet process (``evcharging.apps.ev_fleet``) runs ``CP-00001`` … in ``--sites`` sites on
   one HTTP port (``--fleet-port``) and monitors them itself; the launcher waits until
   Central's ``GET /cp?state=ACTIVATED`` counts them all (``X-Total-Count``), with a progress
   line every few seconds. In fleet mode Central and the fleet log warnings only, unless
   ``CENTRAL_LOG_LEVEL`` / ``FLEET_LOG_LEVEL`` is set: at INFO they write a line per CP change.
4. **M drivers** ``driver-1`` … over the same requests file (by default one with engines,
   none with the fleet, whose ids the requests file does not name), and with ``--load RATE``
   the driver load generator (``evcharging.apps.ev_load``) over this run's CPs, until Ctrl-C
   or for ``--load-duration`` seconds.

Every child runs as ``sys.executable -m <module>`` with the seed flags of SPEC §1, in the
launcher's session but in a process group of its own, so that Ctrl-C in the terminal reaches
the launcher only and the launcher stops the children in order: load, drivers, monitors,
engines or fleet, the Central(s) together (SIGTERM, up to ``--stop-timeout`` s, the fleet
one second more per 500 CPs, then SIGKILL), then PostgreSQL and the broker it started. A
second Ctrl-C (or SIGTERM, SIGHUP), at any stage, also while the local broker starts, kills
what is left at once, the broker included, as uvicorn's does. On Linux each child also asks
the kernel for SIGTERM when the launcher dies (``PR_SET_PDEATHSIG``), so a SIGKILLed launcher
leaves nothing behind.

Each child's output (stdout and stderr merged) is relayed line by line, by one reader task
per child, behind a fixed-width name (``central     | …``, ``cp-e CP-001 | …``). A child that
dies is reported with its exit code and last lines; ``--restart`` restarts it with exponential
backoff (1 s doubling to 30 s; back to 1 s after a run of a minute or more). A driver that
exits 0 has finished its requests file, and a load generator that exits 0 its
``--load-duration``; they are reported, not restarted.

Settings other than the flags reach the children through the environment (and their own
``.env``) as usual. The defaults of ``--http-port``, ``--listen-port``, ``--db-path``,
``--base-health-port``, ``--requests-file``, ``--fleet-port``, ``--sites`` and
``--load-duration`` are the services' own settings (``CENTRAL_HTTP_PORT``,
``FLEET_HTTP_PORT`` …), so a port moved in ``.env`` moves for ``make run`` too.

Exit codes: 0 after a stop by Ctrl-C/SIGTERM (or when every process ended cleanly by itself),
1 when the system could not start or every process ended and one of them failed, 2 for bad
flags, a busy port or a missing requests file, 130 when a second Ctrl-C had to kill processes.

The modules, by responsibility: :mod:`.cli` (the flags and the command from start to end),
:mod:`.plan` (options, ports, children and ids: pure), :mod:`.console` (the output),
:mod:`.broker` (the Kafka broker of a run), :mod:`.children` (one child process) and
:mod:`.supervisor` (all of them, and the stop signals). Port and process helpers shared with
the broker tool are in :mod:`evcharging.devtools.process`.
"""

from evcharging.devtools.process import port_free
from evcharging.launcher.children import describe_exit, next_delay
from evcharging.launcher.cli import add_parser, options_from_args, run_command
from evcharging.launcher.console import format_line, prefix_width
from evcharging.launcher.plan import (
    BOOTSTRAP_VARIABLES,
    FLEET_THRESHOLD,
    ChildSpec,
    KafkaChoice,
    LaunchError,
    LaunchOptions,
    PortPlan,
    PortUse,
    Role,
    busy_ports,
    child_env,
    child_specs,
    cp_ids,
    driver_ids,
    fleet_ids,
    plan_ports,
    resolve_bootstrap,
    use_fleet,
)

__all__ = [
    "BOOTSTRAP_VARIABLES",
    "FLEET_THRESHOLD",
    "ChildSpec",
    "KafkaChoice",
    "LaunchError",
    "LaunchOptions",
    "PortPlan",
    "PortUse",
    "Role",
    "add_parser",
    "busy_ports",
    "child_env",
    "child_specs",
    "cp_ids",
    "describe_exit",
    "driver_ids",
    "fleet_ids",
    "format_line",
    "next_delay",
    "options_from_args",
    "plan_ports",
    "port_free",
    "prefix_width",
    "resolve_bootstrap",
    "run_command",
    "use_fleet",
]
