"""The Kafka jars, fetched once from Maven Central with ``mvn``, and the ``java`` to run them.

The jars are cached in :func:`~.config.libs_dir`. A marker file written after a successful copy
says the cache is complete for the current ``pom.xml``, so an interrupted download is redone,
and a file lock keeps concurrent fetches from colliding.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from evcharging.devtools.kafka_broker.config import POM_PATH, libs_dir
from evcharging.devtools.kafka_broker.errors import KafkaBrokerError

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 900.0
_MARKER_FILE = ".complete"


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
