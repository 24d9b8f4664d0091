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
    ``start`` on a running server only says so (and makes sure the database exists).

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
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import grp
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from evcharging.devtools import process

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_PORT = 55432
"""Not 5432: Debian's own cluster (``postgresql@15-main``) may hold that one."""
DEFAULT_START_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 20.0
INITDB_TIMEOUT = 120.0
DATABASE = "evcharging"
USER = "evcharging"
SUPERUSER = "postgres"
SERVICE_USER = "postgres"
"""The system user the server runs as when this tool runs as root."""
BIN_ENV = "EVCHARGING_POSTGRES_BIN"
HOME_ENV = "EVCHARGING_POSTGRES_HOME"
DEBIAN_LIB = Path("/usr/lib/postgresql")
MIN_MAJOR = 15

DATA_DIR = "data"
LOG_FILE = "postgres.log"
PASSWORDS_FILE = "passwords.json"
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_T = TypeVar("_T")


class PostgresError(RuntimeError):
    """PostgreSQL could not be found, initialised, started, queried or stopped."""


# --------------------------------------------------------------------------- places


def repo_root() -> Path:
    """The checkout this package runs from (else the working directory)."""
    candidate = Path(__file__).resolve().parents[2]
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


def home_dir() -> Path:
    """Where the CLI's servers live: ``$EVCHARGING_POSTGRES_HOME`` or ``<repo>/.cache/postgres``."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return repo_root() / ".cache" / "postgres"


def run_dir(port: int) -> Path:
    """The work directory of the CLI server listening on ``port``."""
    return home_dir() / str(port)


def find_bin_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The folder with ``initdb`` and ``postgres``: ``explicit``, ``$EVCHARGING_POSTGRES_BIN``,
    the newest ``/usr/lib/postgresql/<version>/bin``, or the one of ``initdb`` on PATH."""
    chosen = explicit or os.environ.get(BIN_ENV)
    if chosen:
        candidates = [Path(chosen)]
    else:
        versions = sorted(
            (int(p.name), p / "bin") for p in DEBIAN_LIB.glob("*") if p.name.isdigit()
        ) if DEBIAN_LIB.is_dir() else []
        candidates = [bin_dir for _, bin_dir in reversed(versions)]
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).resolve().parent)
    for bin_dir in candidates:
        if all(os.access(bin_dir / name, os.X_OK) for name in ("initdb", "postgres")):
            return bin_dir.resolve()
    where = f"${BIN_ENV}={chosen}" if chosen else f"{DEBIAN_LIB}/<version>/bin nor on PATH"
    raise PostgresError(
        f"PostgreSQL's initdb and postgres are not in {where}. Install Debian's PostgreSQL "
        "(`bash scripts/ensure_postgres.sh`, as root: apt-get install postgresql), or point "
        f"${BIN_ENV} at a folder that has them (PostgreSQL {MIN_MAJOR} or newer)."
    )


def server_major(bin_dir: Path) -> int:
    """The major version of ``bin_dir/postgres`` (``postgres (PostgreSQL) 15.18 ...``)."""
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=False,
        timeout=30,
    ).stdout
    found = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    if not found:
        raise PostgresError(f"{bin_dir / 'postgres'} --version said {out.strip()!r}")
    return int(found.group(1))


# --------------------------------------------------------------------------- who runs it


@dataclass(frozen=True)
class RunAs:
    """The system user the server runs as (PostgreSQL refuses root)."""

    name: str
    uid: int
    gid: int


def service_user() -> RunAs | None:
    """None when we are not root (the server runs as we do), else the ``postgres`` user."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise PostgresError(
            f"PostgreSQL refuses to run as root, and there is no system user {SERVICE_USER!r} "
            "to run it as (Debian's postgresql package creates it: "
            "`bash scripts/ensure_postgres.sh`); or run this tool as an ordinary user"
        ) from None
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def unreachable_parent(path: Path, user: RunAs) -> Path | None:
    """The first folder above ``path`` that ``user`` may not enter, if any (``path`` itself
    is given to ``user``)."""
    groups = {user.gid, *(g.gr_gid for g in _groups_of(user.name))}
    for folder in reversed(path.parents):
        try:
            st = folder.stat()
        except FileNotFoundError:
            return None  # created later, by us, with the owner fixed
        if st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return folder
    return None


def _groups_of(name: str) -> list[grp.struct_group]:
    return [g for g in grp.getgrall() if name in g.gr_mem]


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Passwords:
    """The cluster's two passwords, made with it and kept beside it (mode 600)."""

    superuser: str
    user: str

    @classmethod
    def new(cls) -> Passwords:
        return cls(secrets.token_urlsafe(18), secrets.token_urlsafe(18))

    @classmethod
    def load(cls, work_dir: Path) -> Passwords | None:
        try:
            raw = json.loads((work_dir / PASSWORDS_FILE).read_text(encoding="utf-8"))
            return cls(str(raw["superuser"]), str(raw["user"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, work_dir: Path) -> None:
        path = work_dir / PASSWORDS_FILE
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(
            json.dumps({"superuser": self.superuser, "user": self.user}) + "\n", encoding="utf-8"
        )


def database_url(port: int, password: str, database: str = DATABASE, user: str = USER) -> str:
    """``postgresql://user:password@127.0.0.1:port/database`` (Central's CENTRAL_DB_URL)."""
    secret = urllib.parse.quote(password, safe="")
    return f"postgresql://{user}:{secret}@{HOST}:{port}/{database}"


def check_identifier(name: str) -> str:
    """``name`` if it is a plain lower-case SQL identifier (a database we create or drop)."""
    if not _IDENTIFIER.fullmatch(name):
        raise PostgresError(
            f"bad database name {name!r}: use 1 to 63 of a-z, 0-9 and _, not starting with a digit"
        )
    return name


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --------------------------------------------------------------------------- SQL over asyncpg


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, factory()).result()


async def _superuser_session(
    port: int, password: str, timeout: float, work: Callable[[Any], Coroutine[Any, Any, _T]]
) -> _T:
    import asyncpg

    conn = await asyncpg.connect(
        host=HOST, port=port, user=SUPERUSER, password=password, database="postgres",
        timeout=timeout, command_timeout=timeout,
    )
    try:
        return await work(conn)
    finally:
        await conn.close()


def _answers(port: int, password: str, timeout: float) -> str | None:
    """None when the server answers ``SELECT 1`` as the superuser, else why not."""
    import asyncpg

    async def select_one(conn: Any) -> int:
        value: int = await conn.fetchval("SELECT 1")
        return value

    try:
        _run_coroutine(lambda: _superuser_session(port, password, timeout, select_one))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _ensure_user_and_database(port: int, passwords: Passwords, timeout: float) -> None:
    async def work(conn: Any) -> None:
        verb = "ALTER" if await conn.fetchval(
            "SELECT 1 FROM pg_roles WHERE rolname = $1", USER) else "CREATE"
        await conn.execute(
            f"{verb} ROLE {USER} LOGIN CREATEDB NOSUPERUSER PASSWORD {_literal(passwords.user)}"
        )
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await conn.execute(f"CREATE DATABASE {DATABASE} OWNER {USER}")

    _sql(port, passwords, timeout, work)


def _sql(port: int, passwords: Passwords, timeout: float,
         work: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    import asyncpg

    try:
        _run_coroutine(lambda: _superuser_session(port, passwords.superuser, timeout, work))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise PostgresError(f"PostgreSQL on {HOST}:{port}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- logs


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` non-empty lines of a log file."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:]) or "(empty log)"


# --------------------------------------------------------------------------- the server


class LocalPostgres:
    """One PostgreSQL server process on ``127.0.0.1:port`` with its cluster in
    ``work_dir/data`` (default :func:`run_dir`); a new cluster is made on first start.

    ``detach=True`` (the CLI's daemon) leaves the server running when this process exits;
    otherwise the kernel stops it if this process dies, and an ``atexit`` hook stops it.
    """

    def __init__(
        self,
        port: int | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        *,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        detach: bool = False,
        durable: bool = True,
        bin_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._port = port if port else process.free_port()
        self._work_dir = Path(work_dir) if work_dir is not None else run_dir(self._port)
        self._work_dir = self._work_dir.resolve()
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._detach = detach
        self._durable = durable
        self._bin_dir = bin_dir
        self._passwords: Passwords | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._spawned_at = 0.0
        self.start_seconds: float | None = None
        """Seconds from spawning the server until it answered (set by :meth:`start`)."""

    @property
    def port(self) -> int:
        return self._port

    @property
    def work_dir(self) -> Path:
        return self._work_dir

    @property
    def data_dir(self) -> Path:
        return self._work_dir / DATA_DIR

    @property
    def log_file(self) -> Path:
        return self._work_dir / LOG_FILE

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs, else ``None``."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def passwords(self) -> Passwords:
        if self._passwords is None:
            raise PostgresError("no passwords yet: the server was never started")
        return self._passwords

    @property
    def url(self) -> str:
        """CENTRAL_DB_URL for the ``evcharging`` database."""
        return self.database_url(DATABASE)

    def database_url(self, database: str) -> str:
        """The URL of ``database`` as the user ``evcharging``."""
        return database_url(self._port, self.passwords.user, database)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        """Make the cluster if new, start the server, wait until it answers, and make sure
        the user and the database ``evcharging`` exist."""
        with self._lock:
            if self._proc is not None:
                raise PostgresError(f"PostgreSQL on {HOST}:{self._port} already started")
            bin_dir = find_bin_dir(self._bin_dir)
            major = server_major(bin_dir)
            if major < MIN_MAJOR:
                raise PostgresError(f"{bin_dir} has PostgreSQL {major}; {MIN_MAJOR}+ is needed")
            if not process.port_free(self._port, HOST):
                raise PostgresError(
                    f"port {self._port} on {HOST} is already in use (another PostgreSQL? "
                    f"`python -m evcharging.devtools.postgres status --port {self._port}`)"
                )
            user = service_user()
            self._prepare_dirs(user)
            self._passwords = self._initdb_if_new(bin_dir, major, user)
            try:
                self._spawn(bin_dir, user)
                self._wait_until_ready()
                _ensure_user_and_database(self._port, self._passwords, self._start_timeout)
            except BaseException:
                self._terminate()
                raise
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), then immediate (SIGQUIT) after
        ``stop_timeout`` s, then SIGKILL. Safe to call twice."""
        with self._lock:
            self._terminate()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the server exits on its own (or ``timeout``); return its exit code."""
        if self._proc is None:
            raise PostgresError("PostgreSQL not started")
        return self._proc.wait(timeout)

    def create_database(self, name: str) -> str:
        """Create the database ``name`` owned by ``evcharging`` (dropped first if it exists);
        return its URL."""
        check_identifier(name)

        async def work(conn: Any) -> None:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {name} OWNER {USER}")

        _sql(self._port, self.passwords, self._start_timeout, work)
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drop the database ``name``, disconnecting whoever is still on it."""
        check_identifier(name)

        async def work(conn: Any) -> None:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

        _sql(self._port, self.passwords, self._start_timeout, work)

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalPostgres({HOST}:{self._port}, pid={self.pid}, work_dir={self._work_dir})"

    # ----------------------------------------------------------------- internals

    def _prepare_dirs(self, user: RunAs | None) -> None:
        if user is not None:
            blocked = unreachable_parent(self._work_dir, user)
            if blocked is not None:
                raise PostgresError(
                    f"PostgreSQL runs as the user {user.name!r} here (it refuses root), and "
                    f"that user may not enter {blocked} (mode "
                    f"{stat.S_IMODE(blocked.stat().st_mode):o}): give it a work directory "
                    "it can reach (under /tmp, or the checkout's .cache)"
                )
        self._work_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            os.chown(self._work_dir, user.uid, user.gid)
            os.chown(self.data_dir, user.uid, user.gid)

    def _initdb_if_new(self, bin_dir: Path, major: int, user: RunAs | None) -> Passwords:
        version_file = self.data_dir / "PG_VERSION"
        passwords = Passwords.load(self._work_dir)
        if version_file.is_file():
            made_by = version_file.read_text(encoding="utf-8").strip()
            if made_by != str(major):
                raise PostgresError(
                    f"{self.data_dir} was made by PostgreSQL {made_by}, and {bin_dir} is "
                    f"{major}: `start --reset` makes a new cluster (its data is lost)"
                )
            if passwords is None:
                raise PostgresError(
                    f"{self.data_dir} has a cluster but {self._work_dir / PASSWORDS_FILE} "
                    "is gone or broken: `start --reset` makes a new cluster"
                )
            return passwords
        if any(self.data_dir.iterdir()):
            raise PostgresError(
                f"{self.data_dir} is neither empty nor a cluster: `start --reset` empties it"
            )
        passwords = Passwords.new()
        passwords.save(self._work_dir)
        pwfile = self._work_dir / "initdb.pw"
        pwfile.touch(mode=0o600)
        pwfile.write_text(passwords.superuser + "\n", encoding="utf-8")
        if user is not None:
            os.chown(pwfile, user.uid, user.gid)
        cmd = [
            str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
            f"--pwfile={pwfile}", "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
            "--encoding=UTF8", "--no-locale",
        ]
        if not self._durable:
            cmd.append("--no-sync")
        try:
            result = subprocess.run(
                cmd, cwd=self._work_dir, capture_output=True, text=True, check=False,
                timeout=INITDB_TIMEOUT, **_as_user(user),
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresError(f"initdb of {self.data_dir} timed out") from exc
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            out = (result.stdout + result.stderr).strip().splitlines()
            raise PostgresError(
                f"initdb failed (exit code {result.returncode}) for {self.data_dir}:\n"
                + "\n".join(out[-20:])
            )
        log.info("Made a PostgreSQL %d cluster in %s", major, self.data_dir)
        return passwords

    def _command(self, bin_dir: Path) -> list[str]:
        settings = {
            "listen_addresses": HOST,
            "unix_socket_directories": "",  # TCP only: no socket path length or /run limits
            "max_connections": "200",
            "shared_buffers": "64MB",
        }
        if not self._durable:
            settings.update({"fsync": "off", "full_page_writes": "off"})
        cmd = [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self._port)]
        for name, value in settings.items():
            cmd += ["-c", f"{name}={value}"]
        return cmd

    def _spawn(self, bin_dir: Path, user: RunAs | None) -> None:
        if self.log_file.exists():
            self.log_file.replace(self.log_file.with_name(LOG_FILE + ".1"))
        # The kernel signals the child when the thread that forked it ends: only the main
        # thread lives as long as this process.
        die_with_parent = process.DieWithParent()
        tie_to_parent = (
            not self._detach
            and threading.current_thread() is threading.main_thread()
            and die_with_parent.supported
        )
        with open(self.log_file, "ab") as log_fh:
            self._proc = subprocess.Popen(
                self._command(bin_dir),
                cwd=self._work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal goes to Python, not to it
                preexec_fn=die_with_parent if tie_to_parent else None,
                **_as_user(user),
            )
        self._spawned_at = time.monotonic()
        if not self._detach:
            import atexit

            atexit.register(self.stop)
        log.info("Started PostgreSQL pid %d on %s:%d", self._proc.pid, HOST, self._port)

    def _wait_until_ready(self) -> None:
        proc = self._proc
        assert proc is not None and self._passwords is not None
        deadline = self._spawned_at + self._start_timeout
        why = "not tried yet"
        while True:
            code = proc.poll()
            if code is not None:
                raise PostgresError(
                    f"PostgreSQL exited with code {code} while starting; last lines of "
                    f"{self.log_file}:\n{log_tail(self.log_file)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PostgresError(
                    f"PostgreSQL did not answer on {HOST}:{self._port} within "
                    f"{self._start_timeout:g} s ({why}); last lines of {self.log_file}:\n"
                    f"{log_tail(self.log_file)}"
                )
            if process.tcp_accepts(HOST, self._port, min(1.0, remaining)):
                failed = _answers(self._port, self._passwords.superuser, min(5.0, remaining))
                if failed is None:
                    self.start_seconds = time.monotonic() - self._spawned_at
                    log.info("PostgreSQL on %s:%d ready in %.1f s", HOST, self._port,
                             self.start_seconds)
                    return
                why = failed
            time.sleep(0.1)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if not self._detach:
            import atexit

            atexit.unregister(self.stop)
        shut_down(proc.pid, self._stop_timeout, lambda: proc.poll() is None)
        log.info("Stopped PostgreSQL pid %d (%s:%d)", proc.pid, HOST, self._port)


def _as_user(user: RunAs | None) -> dict[str, Any]:
    """``subprocess`` arguments that run a child as ``user`` (none for ourselves)."""
    if user is None:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": [],
            "env": {**os.environ, "HOME": pwd.getpwuid(user.uid).pw_dir, "USER": user.name}}


def shut_down(pid: int, timeout: float, alive: Callable[[], bool]) -> bool:
    """Stop the postmaster ``pid``: SIGINT (fast shutdown), after ``timeout`` s SIGQUIT
    (immediate: crash recovery on the next start), then SIGKILL. Returns whether the fast
    shutdown was enough."""
    steps = ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, process.KILL_WAIT))
    for sig, wait in steps:
        if not alive():
            return sig == signal.SIGINT
        if sig != signal.SIGINT:
            log.warning("PostgreSQL (pid %d) still runs; sending %s", pid, sig.name)
        process.signal_pid(pid, sig)
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive():
            return sig == signal.SIGINT
    raise PostgresError(f"PostgreSQL (pid {pid}) survived SIGKILL")


# --------------------------------------------------------------------------- daemons


@dataclass(frozen=True)
class PostgresStatus:
    """What a work directory's ``data/postmaster.pid`` says, checked against the process."""

    work_dir: Path
    running: bool
    pid: int | None = None
    url: str | None = None


def _is_postmaster(pid: int, data_dir: Path) -> bool:
    if not process.pid_alive(pid):
        return False
    cmdline = process.read_cmdline(pid)
    if cmdline is None:  # no /proc: trust the pid file
        return True
    return bool(cmdline) and Path(cmdline[0]).name == "postgres" and str(data_dir) in cmdline


def postgres_status(work_dir: str | os.PathLike[str]) -> PostgresStatus:
    """Whether the server whose state is in ``work_dir`` (see :func:`run_dir`) is running."""
    work = Path(work_dir).resolve()
    data = work / DATA_DIR
    try:
        lines = (data / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return PostgresStatus(work, running=False)
    passwords = Passwords.load(work)
    url = database_url(port, passwords.user) if passwords else None
    return PostgresStatus(work, running=_is_postmaster(pid, data), pid=pid, url=url)


def stop_postgres(
    work_dir: str | os.PathLike[str], timeout: float = DEFAULT_STOP_TIMEOUT
) -> bool:
    """Stop the (daemon) server whose state is in ``work_dir``; False if none was running."""
    status = postgres_status(work_dir)
    if not status.running or status.pid is None:
        return False
    pid, data = status.pid, status.work_dir / DATA_DIR
    shut_down(pid, timeout, lambda: _is_postmaster(pid, data))
    return True


# --------------------------------------------------------------------------- command line


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _cmd_start(args: argparse.Namespace) -> int:
    port: int = args.port or process.free_port()
    work = run_dir(port)
    status = postgres_status(work)
    if status.running and args.reset:
        raise PostgresError(f"--reset would delete the cluster of the running server (pid "
                            f"{status.pid}): stop it first (stop --port {port})")
    if status.running:
        passwords = Passwords.load(work)
        if passwords is None:
            raise PostgresError(f"PostgreSQL runs (pid {status.pid}) but "
                                f"{work / PASSWORDS_FILE} is gone: stop it, then start --reset")
        _ensure_user_and_database(port, passwords, args.timeout)
        _out(f"already running: pid {status.pid}\nCENTRAL_DB_URL={status.url}")
        return 0
    if args.reset and work.exists():
        shutil.rmtree(work)
    server = LocalPostgres(port, work, start_timeout=args.timeout, detach=not args.foreground)
    if args.foreground:
        return _run_foreground(server)
    server.start()
    _out(
        f"PostgreSQL running: pid {server.pid}, ready in {server.start_seconds:.1f} s\n"
        f"CENTRAL_DB_URL={server.url}\n"
        f"  log:  {server.log_file}\n"
        f"  data: {server.data_dir}\n"
        f"  stop: python -m evcharging.devtools.postgres stop --port {port}"
    )
    return 0


def _run_foreground(server: LocalPostgres) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        server.start()
        _out(f"PostgreSQL running: pid {server.pid}; log {server.log_file}; Ctrl-C stops it\n"
             f"CENTRAL_DB_URL={server.url}")
        code = server.wait()
    except KeyboardInterrupt:
        _out("stopping PostgreSQL ...")
        return 0
    finally:
        server.stop()
    sys.stderr.write(f"PostgreSQL exited with code {code}; last lines of {server.log_file}:\n"
                     f"{log_tail(server.log_file)}\n")
    return 0 if code == 0 else 1


def _cmd_stop(args: argparse.Namespace) -> int:
    if stop_postgres(run_dir(args.port), timeout=args.timeout):
        _out(f"stopped PostgreSQL on port {args.port}")
    else:
        _out(f"no PostgreSQL running on port {args.port} (nothing to stop)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    status = postgres_status(run_dir(args.port))
    if status.running:
        answering = process.tcp_accepts(HOST, args.port, 1.0)
        _out(f"running: pid {status.pid}"
             f"{'' if answering else ' (port not accepting connections yet)'}, "
             f"work dir {status.work_dir}\nCENTRAL_DB_URL={status.url}")
        return 0
    _out(f"not running (port {args.port})")
    return 1


def _cmd_url(args: argparse.Namespace) -> int:
    status = postgres_status(run_dir(args.port))
    if not status.running or status.url is None:
        raise PostgresError(f"no PostgreSQL running on port {args.port}: start it first")
    _out(status.url)
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0..65535")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evcharging.devtools.postgres",
        description=(
            f"Run a local PostgreSQL server on {HOST} for Central (SPEC §9) from Debian's\n"
            f"binaries ({DEBIAN_LIB}/<version>/bin, or ${BIN_ENV});\nstate in "
            f"{home_dir()}/PORT (or ${HOME_ENV}/PORT).\n"
            f"Database and user {DATABASE!r}; prints CENTRAL_DB_URL."
        ),
        epilog=(
            "examples:\n"
            f"  %(prog)s start              # daemon on {HOST}:{DEFAULT_PORT}\n"
            "  %(prog)s status; echo $?    # 0 running, 1 not\n"
            "  export CENTRAL_DB_URL=$(%(prog)s url)\n"
            "  %(prog)s stop\n"
            "  %(prog)s start --port 0 --foreground   # free port, Ctrl-C stops it"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    port_help = f"port on {HOST}; state in .cache/postgres/PORT (default: %(default)s)"

    start = sub.add_parser("start", help="start a server (daemon unless --foreground)",
                           description="Start a server and wait until it answers a query; "
                           "make its cluster first if it has none. On a running server it "
                           "only makes sure the database exists.")
    start.add_argument("--port", type=_port, default=DEFAULT_PORT,
                       help=port_help + "; 0 picks a free port")
    start.add_argument("--foreground", action="store_true",
                       help="run until Ctrl-C/SIGTERM, then stop the server")
    start.add_argument("--reset", action="store_true",
                       help="delete the cluster first (all its data) and make a new one")
    start.add_argument("--timeout", type=_seconds, default=DEFAULT_START_TIMEOUT,
                       help="seconds to wait for the server to answer (default: %(default)s)")
    start.set_defaults(func=_cmd_start)

    stop = sub.add_parser("stop", help="stop a daemon server",
                          description="Fast shutdown (SIGINT), then SIGQUIT and SIGKILL if "
                          "it has not exited in time.")
    stop.add_argument("--port", type=_port, default=DEFAULT_PORT, help=port_help)
    stop.add_argument("--timeout", type=_seconds, default=DEFAULT_STOP_TIMEOUT,
                      help="seconds to wait after SIGINT (default: %(default)s)")
    stop.set_defaults(func=_cmd_stop)

    status = sub.add_parser("status", help="say whether a server runs (exit code 0) or not (1)")
    status.add_argument("--port", type=_port, default=DEFAULT_PORT, help=port_help)
    status.set_defaults(func=_cmd_status)

    url = sub.add_parser("url", help="print only CENTRAL_DB_URL of a running server")
    url.add_argument("--port", type=_port, default=DEFAULT_PORT, help=port_help)
    url.set_defaults(func=_cmd_url)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m evcharging.devtools.postgres``."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PostgresError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
