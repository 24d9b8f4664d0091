"""Central's PostgreSQL of a run (``--db postgres``): a local one the launcher starts.

It is the devtool's server (:mod:`evcharging.devtools.postgres`, Debian's PostgreSQL 15) in
the folder where that tool keeps the server of the port, ``.cache/postgres/PORT`` (so
``make postgres-status`` sees it): on 55432 by default, whose cluster survives between runs;
a server on a port picked at random (``--postgres-port 0``) keeps none. A server already
running there (``make postgres-start``) is used and left running. It starts after the
broker and before Central, and stops after Central, before the broker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from evcharging.devtools.postgres import (
    DEFAULT_PORT,
    HOST,
    LocalPostgres,
    Passwords,
    PostgresError,
    postgres_status,
    run_dir,
)
from evcharging.devtools.postgres.sql import ensure_user_and_database
from evcharging.devtools.process import free_port, port_free
from evcharging.launcher.broker import stop_killable
from evcharging.launcher.console import Console
from evcharging.launcher.plan import LaunchError, LaunchOptions


@dataclass
class LocalDatabase:
    """The PostgreSQL of a run: ``server`` is the launcher's own, None for one that was
    already running (used, never stopped)."""

    server: LocalPostgres | None
    url: str
    port: int
    work_dir: Path
    keep_data: bool

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server is not None else None

    def kill(self) -> None:
        """SIGKILL the server at once (a second stop signal)."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self, console: Console, *, hurry: bool = False) -> bool:
        """Stop the launcher's server (fast shutdown; a stop signal meanwhile, or `hurry`,
        kills it); returns whether it was killed. One it did not start keeps running."""
        server = self.server
        if server is None:
            console.say(f"PostgreSQL on {HOST}:{self.port} was running before this run: "
                        "left running")
            return False
        try:
            return stop_killable(console, "PostgreSQL", server.pid, server.stop, self.kill,
                                 hurry=hurry)
        finally:
            self.discard()

    def discard(self) -> None:
        if not self.keep_data and (self.server is None or not self.server.running):
            shutil.rmtree(self.work_dir, ignore_errors=True)


def prepare_database(options: LaunchOptions, taken: set[int]) -> LocalDatabase:
    """The server to start (or the one already running on its port); LaunchError when the
    port is taken by something else."""
    port = options.postgres_port
    keep_data = port != 0
    if port is None:
        port = DEFAULT_PORT
    elif port == 0:
        port = free_port()
    work = run_dir(port)
    status = postgres_status(work)
    if status.running:
        passwords = Passwords.load(status.work_dir)
        if passwords is None or status.url is None:
            raise LaunchError(f"PostgreSQL runs on port {port} (pid {status.pid}) without its "
                              f"passwords file in {work}: stop it (make postgres-stop)")
        return LocalDatabase(None, status.url, port, work, keep_data=True)
    if port in taken or not port_free(port, HOST):
        raise LaunchError(f"port {port} (the local PostgreSQL) is already in use; choose "
                          "another with --postgres-port")
    server = LocalPostgres(port, work, start_timeout=options.start_timeout,
                           stop_timeout=options.stop_timeout)
    return LocalDatabase(server, "", port, work, keep_data)


def start_database(console: Console, local: LocalDatabase, timeout: float) -> None:
    """Start it and wait until it answers (or make sure a running one has Central's user
    and database); nothing is left behind when that fails."""
    server = local.server
    if server is None:
        console.say(f"PostgreSQL already runs on {HOST}:{local.port}: using it")
        passwords = Passwords.load(local.work_dir)
        assert passwords is not None
        ensure_user_and_database(local.port, passwords, timeout)
        return
    console.say(f"starting PostgreSQL on {HOST}:{local.port} (log: {server.log_file}) ...")
    try:
        server.start()
    except BaseException:
        local.discard()
        raise
    local.url = server.url
    console.say(f"PostgreSQL ready in {server.start_seconds or 0:.1f} s")


__all__ = ["LocalDatabase", "PostgresError", "prepare_database", "start_database"]
