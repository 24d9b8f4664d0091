"""Run a real, local PostgreSQL server for Central (SPEC §9) without Docker.

The server is Debian's PostgreSQL 15 (package ``postgresql``; ``scripts/ensure_postgres.sh``
installs it, ``make test`` runs that script): its ``initdb`` and ``postgres`` from
``/usr/lib/postgresql/<version>/bin`` (the newest there), or from ``$EVCHARGING_POSTGRES_BIN``.
It is not Debian's own cluster (``pg_lsclusters``, port 5432): this one has its own data
folder and listens on 127.0.0.1 only, by default on port 55432 so that both can run.

Command line::

    python -m evcharging.devtools.postgres start [--port 55432]   # daemon; prints the URL
    python -m evcharging.devtools.postgres status [--port 55432]  # exit 0 running, 1 not
    python -m evcharging.devtools.postgres url [--port 55432]     # only CENTRAL_DB_URL
    python -m evcharging.devtools.postgres stop [--port 55432]
    python -m evcharging.devtools.postgres start --foreground     # until Ctrl-C / SIGTERM

    A CLI server keeps its state in ``<repo>/.cache/postgres/<port>/`` (or
    ``$EVCHARGING_POSTGRES_HOME/<port>/``): the cluster in
    ``data/``, its log ``postgres.log``, and ``passwords.json`` (mode 600, random passwords
    made with the cluster). The cluster survives a stop/start; ``start --reset`` wipes it.
    ``start`` on a running server only says so (and makes sure the database exists);
    ``start --reset`` refuses to delete a running server's cluster.

Every cluster has the superuser ``postgres`` and the user ``evcharging`` (not a superuser;
it may create databases) who owns the database ``evcharging``. Both log in with a password
(SCRAM-SHA-256) over TCP; there are no Unix sockets. Central's setting is printed:
``CENTRAL_DB_URL=postgresql://evcharging:<password>@127.0.0.1:55432/evcharging``.

PostgreSQL refuses to run as root. Run as root (containers, CI), the tool runs ``initdb`` and
``postgres`` as the system user ``postgres`` that Debian's package creates, and gives that
user the data folder; the folder's parents must let it in (``/tmp`` does; pytest's own
``/tmp/pytest-of-root`` does not). Otherwise everything runs as the current user.

From Python (e.g. pytest)::

    from evcharging.devtools.postgres import LocalPostgres

    with LocalPostgres(work_dir=some_dir) as server:   # free port, new cluster
        url = server.create_database("evcharging_test_1")   # owned by evcharging
        use(server.url)                                      # the evcharging database

``LocalPostgres.start()`` returns only once the server answers a real query (through
asyncpg) and raises :class:`PostgresError` with the tail of its log if it does not; it never
leaves a server process behind when it fails. ``durable=False`` (the tests) skips fsync, which
a crash of the machine, not of the server, would need.

The modules, by responsibility: :mod:`.config` (defaults, paths, binaries, the service user,
passwords), :mod:`.errors`, :mod:`.sql` (what the tool asks the server over asyncpg),
:mod:`.server` (:class:`LocalPostgres`), :mod:`.daemon` (status and stop by work directory),
:mod:`.cli` (the command line).
"""

from evcharging.devtools.postgres.cli import main
from evcharging.devtools.postgres.config import (
    BIN_ENV,
    DATABASE,
    DEFAULT_PORT,
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    HOME_ENV,
    HOST,
    USER,
    Passwords,
    RunAs,
    database_url,
    find_bin_dir,
    home_dir,
    run_dir,
    service_user,
    unreachable_parent,
)
from evcharging.devtools.postgres.daemon import PostgresStatus, postgres_status, stop_postgres
from evcharging.devtools.postgres.errors import PostgresError
from evcharging.devtools.postgres.server import LocalPostgres

__all__ = [
    "BIN_ENV",
    "DATABASE",
    "DEFAULT_PORT",
    "DEFAULT_START_TIMEOUT",
    "DEFAULT_STOP_TIMEOUT",
    "HOME_ENV",
    "HOST",
    "USER",
    "LocalPostgres",
    "Passwords",
    "PostgresError",
    "PostgresStatus",
    "RunAs",
    "database_url",
    "find_bin_dir",
    "home_dir",
    "main",
    "postgres_status",
    "run_dir",
    "service_user",
    "stop_postgres",
    "unreachable_parent",
]
