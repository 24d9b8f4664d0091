"""Class-data sharing: a JVM class archive that makes later brokers start ~35 % faster.

Loading and verifying Kafka's and Scala's classes is most of the broker's start time. The first
broker started with a given JVM dumps the classes it loaded into an AppCDS archive when it exits
cleanly (-XX:ArchiveClassesAtExit, into a temporary file that is renamed into the jar cache
only after a clean exit); later brokers and storage formatting map it (-XX:SharedArchiveFile).
A damaged archive makes the JVM die with SIGBUS, so a java crash while using one deletes it and
retries without (see ``KafkaBroker._with_cds``). EVCHARGING_KAFKA_CDS=0 turns this off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import time
from pathlib import Path

from evcharging.devtools.kafka_broker.config import CDS_PENDING_FILE

log = logging.getLogger(__name__)

CDS_ENV = "EVCHARGING_KAFKA_CDS"
_CDS_STALE_SECONDS = 600.0
_CDS_DUMP_GRACE = 30.0  # extra seconds to stop a broker that writes a class-data archive


def cds_enabled() -> bool:
    return os.environ.get(CDS_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def cds_archive(libs: Path, java: str) -> Path:
    """The class-data archive for this JVM build and this jar cache (stored inside the cache)."""
    real = Path(java).resolve()
    ident = [str(real)]
    for part in (real, real.parent.parent / "lib" / "server" / "libjvm.so"):
        with contextlib.suppress(OSError):
            st = part.stat()
            ident.append(f"{st.st_size}:{st.st_mtime_ns}")
    key = hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]
    return libs / f"kafka-{key}.jsa"


def start_cds_dump(archive: Path, work_dir: Path) -> list[str]:
    """JVM options to dump an archive at exit, remembered in ``work_dir`` for whoever stops it."""
    cutoff = time.time() - _CDS_STALE_SECONDS
    for stale in archive.parent.glob("*.jsa.*.tmp"):  # left by brokers nobody stopped
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < cutoff:
                stale.unlink()
    tmp = archive.with_name(f"{archive.name}.{secrets.token_hex(6)}.tmp")
    (work_dir / CDS_PENDING_FILE).write_text(f"{tmp}\n{archive}\n", encoding="utf-8")
    return [f"-XX:ArchiveClassesAtExit={tmp}"]


def stop_grace(work_dir: Path, timeout: float) -> float:
    """``timeout``, plus time to write the class-data archive if this broker dumps one."""
    return timeout + (_CDS_DUMP_GRACE if (work_dir / CDS_PENDING_FILE).is_file() else 0.0)


def finish_cds_dump(work_dir: Path, *, clean_exit: bool) -> None:
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
