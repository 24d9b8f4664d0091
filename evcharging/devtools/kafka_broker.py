"""Run a real, local Apache Kafka broker (KRaft, combined broker+controller) without Docker.

The broker is the genuine Apache Kafka server, started from the jars that Maven fetches from
Maven Central (see ``pom.xml`` next to this module). It needs ``java`` (17+) and, once, ``mvn``.

Jars
    Cached in ``<repo>/.cache/kafka/libs`` (git-ignored), or in the directory named by the
    environment variable ``EVCHARGING_KAFKA_CACHE``. They are fetched on first use (or with
    ``fetch``); a marker file written after a successful copy says the cache is complete, so an
    interrupted download is redone, and a file lock keeps concurrent fetches from colliding.

Command line::

    python -m evcharging.devtools.kafka_broker fetch                  # only download the jars
    python -m evcharging.devtools.kafka_broker start [--port 9092]    # daemon; prints bootstrap
    python -m evcharging.devtools.kafka_broker status [--port 9092]   # exit 0 running, 1 not
    python -m evcharging.devtools.kafka_broker stop [--port 9092]
    python -m evcharging.devtools.kafka_broker start --foreground     # until Ctrl-C / SIGTERM

    A CLI broker keeps its state in ``<repo>/.cache/kafka/run/<port>/`` (``server.properties``,
    ``broker.log``, ``broker.pid``, ``bootstrap`` and, unless ``--data-dir`` says otherwise, the
    Kafka data in ``data/``); its data survives a stop/start, ``start --reset`` wipes it.

From Python (e.g. pytest)::

    from evcharging.devtools.kafka_broker import KafkaBroker

    with KafkaBroker(work_dir=tmp_path) as broker:   # free port, fresh KRaft storage
        use(broker.bootstrap)                         # "127.0.0.1:<port>"

``KafkaBroker.start()`` returns only once the broker answers a real Kafka request (a metadata
request through aiokafka) and raises :class:`KafkaBrokerError` with the tail of the broker log
if it does not; it never leaves a java process behind when it fails.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import fcntl
import functools
import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = [
    "CACHE_ENV",
    "DEFAULT_JVM_OPTS",
    "DEFAULT_PORT",
    "DEFAULT_START_TIMEOUT",
    "DEFAULT_STOP_TIMEOUT",
    "BrokerStatus",
    "KafkaBroker",
    "KafkaBrokerError",
    "broker_status",
    "fetch_jars",
    "find_java",
    "free_port",
    "jars_ready",
    "libs_dir",
    "main",
    "new_cluster_id",
    "run_dir",
    "stop_broker",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_PORT = 9092
DEFAULT_START_TIMEOUT = 90.0
DEFAULT_STOP_TIMEOUT = 20.0
FETCH_TIMEOUT = 900.0
FORMAT_TIMEOUT = 120.0
CACHE_ENV = "EVCHARGING_KAFKA_CACHE"
CDS_ENV = "EVCHARGING_KAFKA_CDS"
POM_PATH = Path(__file__).with_name("pom.xml")

# A small heap and a fast-starting JIT/GC: this broker serves tests and a laptop, not production.
DEFAULT_JVM_OPTS: tuple[str, ...] = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Dorg.slf4j.simpleLogger.showDateTime=true",
    "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd'T'HH:mm:ss.SSS",
)

PROPERTIES_FILE = "server.properties"
LOG_FILE = "broker.log"
PID_FILE = "broker.pid"
BOOTSTRAP_FILE = "bootstrap"
CDS_PENDING_FILE = "cds.pending"
_MARKER_FILE = ".complete"
_MAIN_CLASS = "kafka.Kafka"
_PR_SET_PDEATHSIG = 1
_CDS_STALE_SECONDS = 600.0
_CDS_DUMP_GRACE = 30.0  # extra seconds to stop a broker that writes a class-data archive

_T = TypeVar("_T")


class KafkaBrokerError(RuntimeError):
    """The Kafka jars could not be fetched, or the broker could not be started or stopped."""


class _JavaExited(KafkaBrokerError):
    """A java process (the broker or the storage formatter) exited when it should not have."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code

    @property
    def crashed(self) -> bool:
        """Killed by a signal or aborted (e.g. SIGBUS from a damaged class-data archive)."""
        return self.code < 0 or self.code >= 128


# --------------------------------------------------------------------------- paths


def _repo_root() -> Path:
    candidate = Path(__file__).resolve().parents[2]
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


def _kafka_home() -> Path:
    return _repo_root() / ".cache" / "kafka"


def libs_dir() -> Path:
    """The jar cache: ``$EVCHARGING_KAFKA_CACHE`` or ``<repo>/.cache/kafka/libs``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return _kafka_home() / "libs"


def run_dir(port: int) -> Path:
    """The work directory of the CLI broker listening on ``port``."""
    return _kafka_home() / "run" / str(port)


# --------------------------------------------------------------------------- jars


def _pom_digest() -> str:
    return hashlib.sha256(POM_PATH.read_bytes()).hexdigest()


def jars_ready(libs: Path | None = None) -> bool:
    """Whether ``libs`` holds a complete download for the current ``pom.xml``."""
    marker = (libs or libs_dir()) / _MARKER_FILE
    try:
        return marker.read_text(encoding="utf-8").strip() == _pom_digest()
    except OSError:
        return False


def fetch_jars(libs: Path | None = None, *, force: bool = False) -> Path:
    """Make sure the Kafka jars are in ``libs`` (default :func:`libs_dir`) and return it.

    Runs Maven once; later calls only check the marker file. Safe to call from several
    processes at once: the download happens under an exclusive file lock.
    """
    libs = libs or libs_dir()
    if not force and jars_ready(libs):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaBrokerError(
            "Maven ('mvn') is not on PATH; it is needed once to fetch the Kafka jars from "
            f"Maven Central into {libs}"
        )
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / f".{libs.name}.lock", "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process that is fetching the Kafka jars into %s", libs)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not force and jars_ready(libs):  # the other process finished the job
                return libs
            _download(mvn, libs, lock.fileno())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return libs


def _download(mvn: str, libs: Path, lock_fd: int) -> None:
    if libs.exists():
        shutil.rmtree(libs)
    libs.mkdir(parents=True)
    cmd = [
        mvn,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(POM_PATH),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={libs}",
        "-DincludeScope=runtime",
    ]
    log.info("Fetching the Kafka jars from Maven Central into %s (once; ~30 s)", libs)
    started = time.monotonic()
    try:
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=FETCH_TIMEOUT,
            check=False,
            pass_fds=(lock_fd,),  # mvn holds the lock even if this process dies first
        )
    except subprocess.TimeoutExpired as exc:
        raise KafkaBrokerError(
            f"mvn did not finish fetching the Kafka jars within {FETCH_TIMEOUT:.0f} s: "
            f"{' '.join(cmd)}"
        ) from exc
    if result.returncode != 0:
        raise KafkaBrokerError(
            f"mvn failed (exit code {result.returncode}) to fetch the Kafka jars.\n"
            f"Command: {' '.join(cmd)}\nOutput:\n{result.stdout.strip()}"
        )
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise KafkaBrokerError(f"mvn succeeded but left no kafka_2.13 jar in {libs}")
    (libs / _MARKER_FILE).write_text(_pom_digest() + "\n", encoding="utf-8")
    log.info("Fetched the Kafka jars in %.1f s", time.monotonic() - started)


# --------------------------------------------------------------------------- helpers


def find_java() -> str:
    """The ``java`` executable: ``$JAVA_HOME/bin/java`` or the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    java = shutil.which("java")
    if java is None:
        raise KafkaBrokerError("'java' (17 or newer) is not on PATH and JAVA_HOME is not set")
    return java


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM does
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _tcp_accepts(port: int, timeout: float, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def new_cluster_id() -> str:
    """A random KRaft cluster id: 16 random bytes, base64url without padding."""
    while True:
        cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):  # would read as an option on the command line
            return cluster_id


def _summary(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of java output, without stack frames and config dumps."""
    kept = [line for line in text.splitlines() if line.strip() and not line[:1].isspace()]
    return "\n".join(kept[-lines:]) or "(no output)"


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 256 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return _summary(text, lines)


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, factory()).result()


async def _kafka_answers(bootstrap: str, timeout: float) -> bool:
    """Whether the broker answers a metadata request and lists itself."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="evcharging-kafka-broker-probe",
        request_timeout_ms=max(1000, int(timeout * 1000)),
    )
    try:
        await asyncio.wait_for(admin.start(), timeout)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
        return bool(cluster.get("brokers"))
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await admin.close()


_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    # Loaded once, before fork, so that the child need not dlopen anything.
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _kill_me_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the broker when the spawning thread dies."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _read_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _is_zombie(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except OSError:
        return False
    return any(
        line.startswith("State:") and "Z" in line.split()[1:2] for line in status.splitlines()
    )


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own exited child: reap it
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_broker_process(pid: int, properties: Path) -> bool:
    """Whether ``pid`` is alive and is the broker started with ``properties``."""
    if not _pid_alive(pid):
        return False
    cmdline = _read_cmdline(pid)
    if cmdline is None:  # no /proc: trust the pid file
        return True
    return _MAIN_CLASS in cmdline and str(properties) in cmdline


def _signal_and_wait(pid: int, timeout: float, alive: Callable[[], bool]) -> bool:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL and wait a little more.

    Returns whether the process exited without needing SIGKILL.
    """
    if not alive():
        return True
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        if sig == signal.SIGKILL:
            log.warning("Kafka broker (pid %d) ignored SIGTERM for %g s; killing it", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive():
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        else:
            return sig == signal.SIGTERM
    raise KafkaBrokerError(f"Kafka broker (pid {pid}) survived SIGKILL")


def _write_properties(path: Path, properties: Mapping[str, str]) -> None:
    lines = ["# Written by evcharging.devtools.kafka_broker; rewritten on every start."]
    lines += [f"{key}={value.replace(chr(92), chr(92) * 2)}" for key, value in properties.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- class-data sharing
#
# Loading and verifying Kafka's and Scala's classes is most of the broker's start time. The first
# broker started with a given JVM dumps the classes it loaded into an AppCDS archive when it exits
# cleanly (-XX:ArchiveClassesAtExit, into a temporary file that is renamed into the jar cache
# only after a clean exit); later brokers and storage formatting map it (-XX:SharedArchiveFile),
# which makes them start ~35 % faster. A damaged archive makes the JVM die with SIGBUS, so a java
# crash while using one deletes it and retries without. EVCHARGING_KAFKA_CDS=0 turns this off.


def _cds_enabled() -> bool:
    return os.environ.get(CDS_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def _cds_archive(libs: Path, java: str) -> Path:
    """The class-data archive for this JVM build and this jar cache (stored inside the cache)."""
    real = Path(java).resolve()
    ident = [str(real)]
    for part in (real, real.parent.parent / "lib" / "server" / "libjvm.so"):
        with contextlib.suppress(OSError):
            st = part.stat()
            ident.append(f"{st.st_size}:{st.st_mtime_ns}")
    key = hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]
    return libs / f"kafka-{key}.jsa"


def _start_cds_dump(archive: Path, work_dir: Path) -> list[str]:
    """JVM options to dump an archive at exit, remembered in ``work_dir`` for whoever stops it."""
    cutoff = time.time() - _CDS_STALE_SECONDS
    for stale in archive.parent.glob("*.jsa.*.tmp"):  # left by brokers nobody stopped
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < cutoff:
                stale.unlink()
    tmp = archive.with_name(f"{archive.name}.{secrets.token_hex(6)}.tmp")
    (work_dir / CDS_PENDING_FILE).write_text(f"{tmp}\n{archive}\n", encoding="utf-8")
    return [f"-XX:ArchiveClassesAtExit={tmp}"]


def _stop_grace(work_dir: Path, timeout: float) -> float:
    """``timeout``, plus time to write the class-data archive if this broker dumps one."""
    return timeout + (_CDS_DUMP_GRACE if (work_dir / CDS_PENDING_FILE).is_file() else 0.0)


def _finish_cds_dump(work_dir: Path, *, clean_exit: bool) -> None:
    """Publish the archive a broker wrote as it exited, or discard it if the exit was not clean."""
    pending = work_dir / CDS_PENDING_FILE
    try:
        tmp_name, archive_name = pending.read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):
        return
    pending.unlink(missing_ok=True)
    tmp, archive = Path(tmp_name), Path(archive_name)
    try:
        if clean_exit and tmp.is_file() and tmp.stat().st_size > 0:
            os.replace(tmp, archive)
            log.info("Saved class-data archive %s; later brokers start faster", archive)
        else:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("Could not save class-data archive %s: %s", archive, exc)


# --------------------------------------------------------------------------- broker


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
    ) -> None:
        self._port = port if port else free_port()
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
        self._cds = _cds_enabled() if class_data_sharing is None else class_data_sharing
        self._proc: subprocess.Popen[bytes] | None = None
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
            "auto.create.topics.enable": "true",
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
            if not _port_free(self._port):
                raise KafkaBrokerError(
                    f"port {self._port} on {HOST} is already in use (another broker? "
                    f"`python -m evcharging.devtools.kafka_broker status --port {self._port}`)"
                )
            controller_port = self._controller_port or free_port()
            self._work_dir.mkdir(parents=True, exist_ok=True)
            self._data_dir.mkdir(parents=True, exist_ok=True)
            self._clear_state_files()
            _write_properties(self.properties_file, self.broker_properties(controller_port))
            classpath = f"{libs}{os.sep}*"
            archive = _cds_archive(libs, java) if self._cds else None
            _finish_cds_dump(self._work_dir, clean_exit=False)  # one left by a lost broker
            if not (self._data_dir / "meta.properties").is_file():
                self._with_cds(archive, lambda cds: self._format(java, classpath, cds))
            try:
                self._with_cds(archive, lambda cds: self._launch(java, classpath, cds), dump=True)
                self._write_state_files()
            except BaseException:
                self._terminate()
                raise
        return self

    def stop(self) -> None:
        """Stop the broker: SIGTERM, up to ``stop_timeout`` s for a clean exit, then SIGKILL."""
        with self._lock:
            self._terminate()

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
            except _JavaExited as exc:
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
        step(_start_cds_dump(archive, self._work_dir) if dump and archive is not None else [])

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
            raise _JavaExited(
                f"kafka.tools.StorageTool format failed (exit code {result.returncode}) "
                f"for {self._data_dir}:\n{_summary(result.stdout)}",
                result.returncode,
            )

    def _spawn(self, java: str, classpath: str, cds_opts: Sequence[str]) -> None:
        if self.log_file.exists():
            self.log_file.replace(self.log_file.with_name(LOG_FILE + ".1"))
        tie_to_parent = (
            not self._detach
            and threading.current_thread() is threading.main_thread()
            and _load_libc() is not None
        )
        cmd = [
            java,
            *self._jvm_opts,
            *cds_opts,
            "-cp",
            classpath,
            _MAIN_CLASS,
            str(self.properties_file),
        ]
        with open(self.log_file, "ab") as log_fh:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self._work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal goes to Python, not to java
                preexec_fn=_kill_me_with_parent if tie_to_parent else None,
            )
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
                raise _JavaExited(
                    f"Kafka broker exited with code {code} while starting; last lines of "
                    f"{self.log_file}:\n{_log_tail(self.log_file)}",
                    code,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KafkaBrokerError(
                    f"Kafka broker did not answer on {self.bootstrap} within "
                    f"{self._start_timeout:g} s; last lines of {self.log_file}:\n"
                    f"{_log_tail(self.log_file)}"
                )
            probe = functools.partial(_kafka_answers, self.bootstrap, max(0.5, min(5.0, remaining)))
            if _tcp_accepts(self._port, min(1.0, remaining)) and _run_coroutine(probe):
                self.start_seconds = time.monotonic() - self._spawned_at
                log.info("Kafka broker on %s ready in %.1f s", self.bootstrap, self.start_seconds)
                return
            time.sleep(0.1)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        try:
            timeout = _stop_grace(self._work_dir, self._stop_timeout)
            _signal_and_wait(proc.pid, timeout, lambda: proc.poll() is None)
        finally:
            self._clear_state_files()
            # The JVM exits with 128+15 after a SIGTERM-initiated orderly shutdown.
            _finish_cds_dump(self._work_dir, clean_exit=proc.poll() in (0, 143))
        log.info("Stopped Kafka broker pid %d (%s)", proc.pid, self.bootstrap)

    def _write_state_files(self) -> None:
        assert self._proc is not None
        (self._work_dir / BOOTSTRAP_FILE).write_text(self.bootstrap + "\n", encoding="utf-8")
        (self._work_dir / PID_FILE).write_text(f"{self._proc.pid}\n", encoding="utf-8")

    def _clear_state_files(self) -> None:
        for name in (PID_FILE, BOOTSTRAP_FILE):
            (self._work_dir / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- daemon control


@dataclass(frozen=True)
class BrokerStatus:
    """What the pid file in a broker work directory says, checked against the live process."""

    work_dir: Path
    running: bool
    pid: int | None = None
    bootstrap: str | None = None


def broker_status(work_dir: str | os.PathLike[str]) -> BrokerStatus:
    """Whether the broker whose state is in ``work_dir`` (see :func:`run_dir`) is running."""
    work = Path(work_dir).resolve()
    try:
        pid = int((work / PID_FILE).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return BrokerStatus(work, running=False)
    try:
        bootstrap: str | None = (work / BOOTSTRAP_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        bootstrap = None
    if not _is_broker_process(pid, work / PROPERTIES_FILE):
        return BrokerStatus(work, running=False, pid=pid, bootstrap=bootstrap)
    return BrokerStatus(work, running=True, pid=pid, bootstrap=bootstrap)


def stop_broker(work_dir: str | os.PathLike[str], timeout: float = DEFAULT_STOP_TIMEOUT) -> bool:
    """Stop the (daemon) broker whose state is in ``work_dir``; False if none was running."""
    status = broker_status(work_dir)
    work = status.work_dir
    clean = False
    if status.running and status.pid is not None:
        pid = status.pid
        clean = _signal_and_wait(
            pid,
            _stop_grace(work, timeout),
            lambda: _is_broker_process(pid, work / PROPERTIES_FILE),
        )
        deadline = time.monotonic() + 2.0
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # dead already; give init a moment to reap the zombie
    for name in (PID_FILE, BOOTSTRAP_FILE):
        (work / name).unlink(missing_ok=True)
    _finish_cds_dump(work, clean_exit=clean)
    return status.running


# --------------------------------------------------------------------------- CLI


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _cmd_fetch(args: argparse.Namespace) -> int:
    started = time.monotonic()
    libs = fetch_jars(force=args.force)
    jars = sorted(libs.glob("*.jar"))
    _out(f"{len(jars)} jars in {libs} ({time.monotonic() - started:.1f} s)")
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    port: int = args.port or free_port()
    work = run_dir(port)
    status = broker_status(work)
    if status.running:
        _out(f"already running: pid {status.pid}, bootstrap {status.bootstrap}")
        return 0
    broker = KafkaBroker(
        port,
        work,
        data_dir=args.data_dir,
        start_timeout=args.timeout,
        detach=not args.foreground,
    )
    if args.reset and broker.data_dir.exists():
        shutil.rmtree(broker.data_dir)
    if args.foreground:
        return _run_foreground(broker)
    broker.start()
    _out(
        f"Kafka broker running: bootstrap {broker.bootstrap}, pid {broker.pid}, "
        f"ready in {broker.start_seconds:.1f} s\n"
        f"  log:  {broker.log_file}\n"
        f"  data: {broker.data_dir}\n"
        f"  stop: python -m evcharging.devtools.kafka_broker stop --port {port}"
    )
    return 0


def _run_foreground(broker: KafkaBroker) -> int:
    # SIGTERM/SIGHUP behave like Ctrl-C: KeyboardInterrupt, then a clean broker stop.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        broker.start()
        _out(
            f"Kafka broker running: bootstrap {broker.bootstrap}, pid {broker.pid}, "
            f"ready in {broker.start_seconds:.1f} s; log {broker.log_file}; Ctrl-C stops it"
        )
        code = broker.wait()
    except KeyboardInterrupt:
        _out("stopping Kafka broker ...")
        broker.stop()
        _out("stopped")
        return 0
    finally:
        broker.stop()
    if code in (0, 143):  # SIGTERM from elsewhere, e.g. `stop --port` in another terminal
        _out(f"Kafka broker was stopped (exit code {code})")
        return 0
    sys.stderr.write(
        f"Kafka broker exited unexpectedly with code {code}; last lines of {broker.log_file}:\n"
        f"{_log_tail(broker.log_file)}\n"
    )
    return 1


def _cmd_stop(args: argparse.Namespace) -> int:
    work = run_dir(args.port)
    if stop_broker(work, timeout=args.timeout):
        _out(f"stopped Kafka broker on port {args.port}")
    else:
        _out(f"no Kafka broker running on port {args.port} (nothing to stop)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    status = broker_status(run_dir(args.port))
    if status.running:
        answering = _tcp_accepts(args.port, 1.0)
        _out(
            f"running: pid {status.pid}, bootstrap {status.bootstrap}"
            f"{'' if answering else ' (port not accepting connections yet)'}, "
            f"work dir {status.work_dir}"
        )
        return 0
    _out(f"not running (port {args.port})")
    return 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evcharging.devtools.kafka_broker",
        description=(
            "Run a real local Apache Kafka broker (KRaft, combined broker+controller, on\n"
            f"{HOST}) from jars fetched from Maven Central. Needs java 17+ and, once, mvn.\n"
            f"Jar cache: {libs_dir()} (override with ${CACHE_ENV})."
        ),
        epilog=(
            "examples:\n"
            "  %(prog)s start              # daemon on 127.0.0.1:9092\n"
            "  %(prog)s status; echo $?    # 0 running, 1 not\n"
            "  %(prog)s stop\n"
            "  %(prog)s start --port 0 --foreground   # free port, Ctrl-C stops it"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    port_help = "PLAINTEXT port on 127.0.0.1; state in .cache/kafka/run/PORT (default: %(default)s)"
    start = sub.add_parser(
        "start",
        help="start a broker (daemon unless --foreground)",
        description=(
            "Start a broker and wait until it answers Kafka requests. Without --foreground the "
            "java process is detached and this command exits; `stop` ends it."
        ),
    )
    start.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=port_help + "; 0 picks a free port"
    )
    start.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="Kafka data (log.dirs) directory; default .cache/kafka/run/PORT/data",
    )
    start.add_argument(
        "--foreground", action="store_true", help="run until Ctrl-C/SIGTERM, then stop the broker"
    )
    start.add_argument(
        "--reset", action="store_true", help="delete the data directory first (fresh cluster)"
    )
    start.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_START_TIMEOUT,
        help="seconds to wait for the broker to answer (default: %(default)s)",
    )
    start.set_defaults(func=_cmd_start)

    stop = sub.add_parser(
        "stop",
        help="stop a daemon broker",
        description="Send SIGTERM to the broker, then SIGKILL if it has not exited in time.",
    )
    stop.add_argument("--port", type=int, default=DEFAULT_PORT, help=port_help)
    stop.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_STOP_TIMEOUT,
        help="seconds to wait after SIGTERM before SIGKILL (default: %(default)s)",
    )
    stop.set_defaults(func=_cmd_stop)

    status = sub.add_parser(
        "status",
        help="say whether a broker runs (exit code 0) or not (1)",
    )
    status.add_argument("--port", type=int, default=DEFAULT_PORT, help=port_help)
    status.set_defaults(func=_cmd_status)

    fetch = sub.add_parser(
        "fetch",
        help="only download the Kafka jars into the cache",
    )
    fetch.add_argument("--force", action="store_true", help="download again even if complete")
    fetch.set_defaults(func=_cmd_fetch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m evcharging.devtools.kafka_broker``."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KafkaBrokerError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
