"""One local PostgreSQL server process: :class:`LocalPostgres`."""

from __future__ import annotations

import atexit
import logging
import os
import pwd
import stat
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from evcharging.devtools import process
from evcharging.devtools.common import spawn_logged
from evcharging.devtools.postgres.config import (
    DATA_DIR,
    DATABASE,
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    HOST,
    INITDB_TIMEOUT,
    LOG_FILE,
    MIN_MAJOR,
    PASSWORDS_FILE,
    SUPERUSER,
    USER,
    Passwords,
    RunAs,
    check_identifier,
    database_url,
    find_bin_dir,
    run_dir,
    server_major,
    service_user,
    unreachable_parent,
)
from evcharging.devtools.postgres.daemon import shut_down
from evcharging.devtools.postgres.errors import PostgresError, log_tail
from evcharging.devtools.postgres.sql import answers, ensure_user_and_database, superuser_sql

log = logging.getLogger(__name__)


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
                ensure_user_and_database(self._port, self._passwords, self._start_timeout)
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

        superuser_sql(self._port, self.passwords, self._start_timeout, work)
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drop the database ``name``, disconnecting whoever is still on it."""
        check_identifier(name)

        async def work(conn: Any) -> None:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

        superuser_sql(self._port, self.passwords, self._start_timeout, work)

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
        self._proc = spawn_logged(self._command(bin_dir), self._work_dir, self.log_file,
                                  detach=self._detach, **_as_user(user))
        self._spawned_at = time.monotonic()
        if not self._detach:
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
                failed = answers(self._port, self._passwords.superuser, min(5.0, remaining))
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
            atexit.unregister(self.stop)
        shut_down(proc.pid, self._stop_timeout, lambda: proc.poll() is None)
        log.info("Stopped PostgreSQL pid %d (%s:%d)", proc.pid, HOST, self._port)


def _as_user(user: RunAs | None) -> dict[str, Any]:
    """``subprocess`` arguments that run a child as ``user`` (none for ourselves)."""
    if user is None:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": [],
            "env": {**os.environ, "HOME": pwd.getpwuid(user.uid).pw_dir, "USER": user.name}}
