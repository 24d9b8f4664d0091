"""The broker tool's fixed settings: defaults, the JVM's options, and where things are kept
(the jar cache and each CLI broker's work directory)."""

from __future__ import annotations

import os
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_PORT = 9092
DEFAULT_START_TIMEOUT = 90.0
DEFAULT_STOP_TIMEOUT = 20.0
MAIN_CLASS = "kafka.Kafka"

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

CACHE_ENV = "EVCHARGING_KAFKA_CACHE"
POM_PATH = Path(__file__).resolve().parent.parent / "pom.xml"
"""The Maven project that names the Kafka jars (``evcharging/devtools/pom.xml``)."""

# The files of a broker work directory.
PROPERTIES_FILE = "server.properties"
LOG_FILE = "broker.log"
PID_FILE = "broker.pid"
BOOTSTRAP_FILE = "bootstrap"
CDS_PENDING_FILE = "cds.pending"


def repo_root() -> Path:
    """The checkout this package runs from (else the working directory)."""
    candidate = Path(__file__).resolve().parents[3]
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


def _kafka_home() -> Path:
    return repo_root() / ".cache" / "kafka"


def libs_dir() -> Path:
    """The jar cache: ``$EVCHARGING_KAFKA_CACHE`` or ``<repo>/.cache/kafka/libs``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return _kafka_home() / "libs"


def run_dir(port: int) -> Path:
    """The work directory of the CLI broker listening on ``port``."""
    return _kafka_home() / "run" / str(port)
