"""One local Kafka broker process: :class:`KafkaBroker` (KRaft, combined broker+controller).

``KafkaBroker.start()`` returns only once the broker answers a real Kafka request (a metadata
request through aiokafka) and raises :class:`KafkaBrokerError` with the tail of the broker log
if it does not; it never leaves a java process behind when it fails.

About 500 lines and kept whole: start, stop, kill and granting ACLs share one lock and one
process. Its helpers live in :mod:`.jars`, :mod:`.cds`, :mod:`.probe`, :mod:`.sasl` and
:mod:`.daemon`.
"""

from __future__ import annotations

import atexit
import base64
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from evcharging.devtools import process
from evcharging.devtools.common import spawn_logged
from evcharging.devtools.kafka_broker.cds import (
    cds_archive,
    cds_enabled,
    finish_cds_dump,
    start_cds_dump,
    stop_grace,
)
from evcharging.devtools.kafka_broker.config import (
    BOOTSTRAP_FILE,
    DEFAULT_JVM_OPTS,
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    HOST,
    LOG_FILE,
    MAIN_CLASS,
    PID_FILE,
    PROPERTIES_FILE,
    run_dir,
)
from evcharging.devtools.kafka_broker.daemon import stop_java
from evcharging.devtools.kafka_broker.errors import (
    JavaExited,
    KafkaBrokerError,
    log_tail,
    summary,
)
from evcharging.devtools.kafka_broker.jars import fetch_jars, find_java
from evcharging.devtools.kafka_broker.probe import kafka_answers
from evcharging.devtools.kafka_broker.sasl import (
    SaslUsers,
    acl_entries,
    admin_kwargs,
    create_acls,
)
from evcharging.devtools.kafka_broker.sasl import (
    broker_properties as sasl_broker_properties,
)

log = logging.getLogger(__name__)

FORMAT_TIMEOUT = 120.0


def new_cluster_id() -> str:
    """A random KRaft cluster id: 16 random bytes, base64url without padding."""
    while True:
        cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):  # would read as an option on the command line
            return cluster_id


def _write_properties(path: Path, properties: Mapping[str, str]) -> None:
    lines = ["# Written by evcharging.devtools.kafka_broker; rewritten on every start."]
    lines += [f"{key}={value.replace(chr(92), chr(92) * 2)}" for key, value in properties.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class KafkaBroker:
    """One local Kafka broker process (KRaft, ``process.roles=broker,controller``, node 1).

    ``port`` is the PLAINTEXT port on 127.0.0.1 (default: a free one, chosen now so that
    :attr:`bootstrap` is known before :meth:`start`). ``work_dir`` holds ``server.properties``,
    ``broker.log``, ``broker.pid`` and ``bootstrap`` (default: :func:`run_dir`); ``data_dir`` the
    KRaft storage (default ``work_dir/data``; formatted when it has no ``meta.properties``, reused
    otherwise). ``properties`` override or extend the generated broker configuration.

    Unless ``detach`` is true the broker is tied to this Python process: it is stopped at
    interpreter exit and, when started from the main thread on Linux, the kernel also sends it
    SIGTERM if this process dies without cleaning up. ``detach=True`` is for daemons (the CLI).
    ``class_data_sharing`` (default: on unless ``$EVCHARGING_KAFKA_CDS=0``) keeps an AppCDS
    archive next to the jars to cut the JVM's start time.

    ``sasl=True`` makes it a broker of SPEC §11 (see :mod:`.sasl`): clients authenticate with
    SCRAM-SHA-512 over ``SASL_PLAINTEXT`` and may do what the ACLs granted for the topics of
    each of ``topic_prefixes`` allow (:meth:`grant` adds a prefix later); :attr:`sasl_users`
    has the passwords: random ones, or ``sasl_passwords`` (user -> password) when the storage
    is formatted; a formatted storage keeps its own. Topics are never auto-created, with or
    without SASL.
    """

    def __init__(
        self,
        port: int | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        controller_port: int | None = None,
        properties: Mapping[str, str] | None = None,
        jvm_opts: Sequence[str] = DEFAULT_JVM_OPTS,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        libs: str | os.PathLike[str] | None = None,
        detach: bool = False,
        class_data_sharing: bool | None = None,
        sasl: bool = False,
        topic_prefixes: Sequence[str] = ("",),
        sasl_passwords: Mapping[str, str] | None = None,
    ) -> None:
        self._port = port if port else process.free_port()
        self._work_dir = Path(work_dir) if work_dir is not None else run_dir(self._port)
        self._work_dir = self._work_dir.resolve()
        self._data_dir = (
            Path(data_dir).resolve() if data_dir is not None else self._work_dir / "data"
        )
        self._controller_port = controller_port
        self._extra_properties = dict(properties or {})
        self._jvm_opts = tuple(jvm_opts)
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._libs = Path(libs) if libs is not None else None
        self._detach = detach
        self._cds = cds_enabled() if class_data_sharing is None else class_data_sharing
        self._sasl = sasl
        self._topic_prefixes = tuple(topic_prefixes)
        self._sasl_passwords = dict(sasl_passwords or {})
        self._users: SaslUsers | None = None
        self._java_classpath: tuple[str, str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping: subprocess.Popen[bytes] | None = None
        """The process :meth:`stop` is waiting for (for :meth:`kill`)."""
        self._lock = threading.Lock()
        self._spawned_at = 0.0
        self.start_seconds: float | None = None
        """Seconds from spawning java until the broker answered (set by :meth:`start`)."""

    # ----------------------------------------------------------------- properties

    @property
    def port(self) -> int:
        return self._port

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:<port>"``, for ``bootstrap_servers``."""
        return f"{HOST}:{self._port}"

    @property
    def pid(self) -> int | None:
        """The java process id while the broker runs, else ``None``."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def sasl(self) -> bool:
        return self._sasl

    @property
    def sasl_users(self) -> SaslUsers:
        """The SCRAM users and their passwords (a SASL broker, once started)."""
        if self._users is None:
            raise KafkaBrokerError("no SASL users: not a SASL broker, or not started yet")
        return self._users

    @property
    def work_dir(self) -> Path:
        return self._work_dir

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def log_file(self) -> Path:
        return self._work_dir / LOG_FILE

    @property
    def properties_file(self) -> Path:
        return self._work_dir / PROPERTIES_FILE

    def broker_properties(self, controller_port: int) -> dict[str, str]:
        """The ``server.properties`` this broker runs with."""
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "listeners": f"PLAINTEXT://{HOST}:{self._port},CONTROLLER://{HOST}:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self._port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
            "log.dirs": str(self._data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "auto.create.topics.enable": "false",  # SPEC §11: topics are created on purpose
            "group.initial.rebalance.delay.ms": "0",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "share.coordinator.state.topic.num.partitions": "1",
            # Kafka insists on strictly more than 1 MiB per cleaner thread.
            "log.cleaner.dedupe.buffer.size": str(2 * 1024 * 1024),
            "num.network.threads": "2",
            "num.io.threads": "4",
        }
        if self._users is not None:
            props.update(sasl_broker_properties(self._users, HOST, self._port, controller_port))
        props.update(self._extra_properties)
        return props

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        """Fetch the jars if needed, format storage if new, start java, wait until it answers."""
        with self._lock:
            if self._proc is not None:
                raise KafkaBrokerError(f"broker on {self.bootstrap} already started")
            libs = fetch_jars(self._libs)
            java = find_java()
            if not process.port_free(self._port, HOST):
                raise KafkaBrokerError(
                    f"port {self._port} on {HOST} is already in use (another broker? "
                    f"`python -m evcharging.devtools.kafka_broker status --port {self._port}`)"
                )
            controller_port = self._controller_port or process.free_port()
            self._work_dir.mkdir(parents=True, exist_ok=True)
            self._data_dir.mkdir(parents=True, exist_ok=True)
            self._clear_state_files()
            formatted = (self._data_dir / "meta.properties").is_file()
            self._users = self._load_users(formatted)
            _write_properties(self.properties_file, self.broker_properties(controller_port))
            self.properties_file.chmod(0o600)  # holds the broker's own password with SASL
            classpath = f"{libs}{os.sep}*"
            archive = cds_archive(libs, java) if self._cds else None
            finish_cds_dump(self._work_dir, clean_exit=False)  # one left by a lost broker
            if not formatted:
                self._with_cds(archive, lambda cds: self._format(java, classpath, cds))
                if self._users is not None:
                    self._users.save(self._data_dir)
            self._java_classpath = (java, classpath)
            try:
                self._with_cds(archive, lambda cds: self._launch(java, classpath, cds), dump=True)
                if self._users is not None:
                    self._grant(*self._topic_prefixes)
                self._write_state_files()
            except BaseException:
                self._terminate()
                raise
        return self

    def grant(self, *topic_prefixes: str) -> None:
        """Create the ACLs of SPEC §11 for the topics named ``<prefix><topic>``, for each
        of ``topic_prefixes`` (one java run, about 1.5 s)."""
        with self._lock:
            if self._proc is None or self._users is None:
                raise KafkaBrokerError("grant needs a running SASL broker")
            self._grant(*topic_prefixes)

    def stop(self) -> None:
        """Stop the broker: SIGTERM, up to ``stop_timeout`` s for a clean exit, then SIGKILL."""
        with self._lock:
            self._terminate()

    def kill(self) -> None:
        """SIGKILL java now, also while :meth:`start` or :meth:`stop` waits for it (a second
        Ctrl-C's handler calls this); :meth:`stop` still cleans up after it."""
        proc = self._proc or self._stopping
        if proc is not None and proc.returncode is None:  # not reaped: the pid is still its
            process.signal_pid(proc.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the broker exits on its own (or ``timeout``); return its exit code."""
        proc = self._proc
        if proc is None:
            raise KafkaBrokerError("broker not started")
        return proc.wait(timeout)

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
        return f"KafkaBroker({self.bootstrap!r}, pid={self.pid}, work_dir={self._work_dir})"

    # ----------------------------------------------------------------- internals

    def _with_cds(
        self, archive: Path | None, step: Callable[[list[str]], None], *, dump: bool = False
    ) -> None:
        """Run a java ``step`` with class-data-sharing options (see the section comment)."""
        if archive is not None and archive.is_file():
            try:
                step([f"-XX:SharedArchiveFile={archive}"])
                return
            except JavaExited as exc:
                if not exc.crashed:
                    raise
                log.warning(
                    "java crashed (exit code %d) using class-data archive %s; "
                    "deleting the archive and retrying without it",
                    exc.code,
                    archive,
                )
                archive.unlink(missing_ok=True)
                self._terminate()
        step(start_cds_dump(archive, self._work_dir) if dump and archive is not None else [])

    def _load_users(self, formatted: bool) -> SaslUsers | None:
        """The SCRAM users of a SASL broker: those of its storage, or new ones to format."""
        if not self._sasl:
            return None
        users = SaslUsers.load(self._data_dir)
        if users is None and formatted:
            raise KafkaBrokerError(
                f"{self._data_dir} was formatted without SASL users; a SASL broker needs fresh "
                "storage (`start --sasl --reset` wipes it)"
            )
        return users or SaslUsers.new(self._sasl_passwords)

    def _grant(self, *topic_prefixes: str) -> None:
        assert self._users is not None and self._java_classpath is not None
        java, classpath = self._java_classpath
        started = time.monotonic()
        create_acls(
            java,
            classpath,
            self.bootstrap,
            self._users,
            [entry for prefix in topic_prefixes for entry in acl_entries(prefix)],
            cwd=self._work_dir,
            jvm_opts=("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xshare:auto"),
        )
        log.info(
            "ACLs of SPEC §11 in place for topic prefixes %s on %s (%.1f s)",
            ", ".join(repr(prefix) for prefix in topic_prefixes),
            self.bootstrap,
            time.monotonic() - started,
        )

    def _launch(self, java: str, classpath: str, cds_opts: Sequence[str]) -> None:
        self._spawn(java, classpath, cds_opts)
        self._wait_until_ready()

    def _format(self, java: str, classpath: str, cds_opts: Sequence[str]) -> None:
        cmd = [
            java,
            *self._jvm_opts,
            *cds_opts,
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            new_cluster_id(),
            "-c",
            str(self.properties_file),
            "--standalone",
            *(self._users.format_args() if self._users is not None else ()),
        ]
        try:
            result = subprocess.run(
                cmd,
                cwd=self._work_dir,  # where a crashing JVM drops its hs_err_pid*.log
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=FORMAT_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise KafkaBrokerError(f"formatting {self._data_dir} timed out") from exc
        if result.returncode != 0:
            raise JavaExited(
                f"kafka.tools.StorageTool format failed (exit code {result.returncode}) "
                f"for {self._data_dir}:\n{summary(result.stdout)}",
                result.returncode,
            )

    def _spawn(self, java: str, classpath: str, cds_opts: Sequence[str]) -> None:
        cmd = [
            java,
            *self._jvm_opts,
            *cds_opts,
            "-cp",
            classpath,
            MAIN_CLASS,
            str(self.properties_file),
        ]
        self._proc = spawn_logged(cmd, self._work_dir, self.log_file, detach=self._detach)
        self._spawned_at = time.monotonic()
        if not self._detach:
            atexit.register(self.stop)
        log.info("Started Kafka broker pid %d on %s", self._proc.pid, self.bootstrap)

    def _wait_until_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = self._spawned_at + self._start_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise JavaExited(
                    f"Kafka broker exited with code {code} while starting; last lines of "
                    f"{self.log_file}:\n{log_tail(self.log_file)}",
                    code,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KafkaBrokerError(
                    f"Kafka broker did not answer on {self.bootstrap} within "
                    f"{self._start_timeout:g} s; last lines of {self.log_file}:\n"
                    f"{log_tail(self.log_file)}"
                )
            security = admin_kwargs(self._users) if self._users is not None else {}
            if process.tcp_accepts(HOST, self._port, min(1.0, remaining)) and kafka_answers(
                self.bootstrap, max(0.5, min(5.0, remaining)), security
            ):
                self.start_seconds = time.monotonic() - self._spawned_at
                log.info("Kafka broker on %s ready in %.1f s", self.bootstrap, self.start_seconds)
                return
            time.sleep(0.1)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        self._stopping = proc
        try:
            timeout = stop_grace(self._work_dir, self._stop_timeout)
            stop_java(proc.pid, timeout, lambda: proc.poll() is None)
        finally:
            self._stopping = None
            self._clear_state_files()
            # The JVM exits with 128+15 after a SIGTERM-initiated orderly shutdown.
            finish_cds_dump(self._work_dir, clean_exit=proc.poll() in (0, 143))
        log.info("Stopped Kafka broker pid %d (%s)", proc.pid, self.bootstrap)

    def _write_state_files(self) -> None:
        assert self._proc is not None
        (self._work_dir / BOOTSTRAP_FILE).write_text(self.bootstrap + "\n", encoding="utf-8")
        (self._work_dir / PID_FILE).write_text(f"{self._proc.pid}\n", encoding="utf-8")

    def _clear_state_files(self) -> None:
        for name in (PID_FILE, BOOTSTRAP_FILE):
            (self._work_dir / name).unlink(missing_ok=True)

