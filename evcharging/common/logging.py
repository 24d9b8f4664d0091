"""Logging for every service: loguru, configured once, with service context.

Each line carries the service name and, where bound, the CP or driver it is about.
``json=True`` writes one JSON object per line (loguru's ``serialize``) for log shippers.
Standard-library loggers (aiokafka, uvicorn) are routed into the same sink.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, ClassVar

from loguru import logger

TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> "
    "<level>{level: <7}</level> "
    "<cyan>{extra[service]}</cyan>{extra[context]} "
    "<level>{message}</level>"
)


class _InterceptHandler(logging.Handler):
    """Send standard-library log records to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).bind(lib=record.name).log(
            level, record.getMessage()
        )


class _DropConnectRetries(logging.Filter):
    """Drop aiokafka's per-attempt errors that the bus reports once in its own words.

    aiokafka logs an ERROR on every failed connection attempt and while a new broker
    elects its group coordinator; evcharging.common.kafka.retry says so once per outage.
    """

    NOISE = ("Unable connect to", "Group Coordinator Request failed",
             "Unable to update metadata from")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


class _SayOncePerKind(logging.Filter):
    """Say aiokafka's retried errors once per kind, then at DEBUG.

    * A broker that verifies transactions (Kafka's default since 3.6) answers a produce
      ``NotEnoughReplicasError`` while the producer's previous transaction is still being
      completed; aiokafka retries it, and the record is written once (the bus counts what
      fails for good in ``publish_errors``). Logged at WARNING every time it buried the log
      of a healthy ``make run``.
    * A consumer group that still holds a member with another partition assignor (a
      Central of an older version, until its session times out) refuses a join with
      ``InconsistentGroupProtocolError``; aiokafka logs an ERROR a second until it is gone.
    """

    NOTES: ClassVar[dict[str, str]] = {
        "Got error produce response": "retried; said once per kind, then at DEBUG",
        "Attempt to join group failed": "retried; said once per kind: another member of "
        "the group uses another partition assignor (an older Central, until its session "
        "times out)",
    }

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = str(record.msg)
        prefix = next((p for p in self.NOTES if text.startswith(p)), None)
        if prefix is None:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        kind = (prefix, type(args[-1]).__name__ if args and isinstance(args[-1], BaseException)
                else str(args[-1]) if args else "")
        if kind in self._seen:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        self._seen.add(kind)
        record.msg = f"{record.msg} ({self.NOTES[prefix]})"
        return True


def _add_context(record: Any) -> None:
    extra = record["extra"]
    extra.setdefault("service", "evcharging")
    parts = [f" {key}={extra[key]}" for key in ("cp_id", "driver_id") if extra.get(key)]
    extra["context"] = "".join(parts)


def setup_logging(
    service: str, level: str = "INFO", json: bool = False, **context: str
) -> None:
    """Configure loguru for one service process; safe to call again."""
    logger.remove()
    logger.configure(extra={"service": service, "context": "", **context}, patcher=_add_context)
    colorize: bool | None = None  # loguru decides: colour on a terminal
    if json or os.environ.get("NO_COLOR"):
        colorize = False
    elif os.environ.get("FORCE_COLOR"):
        colorize = True
    logger.add(
        sys.stderr,
        level=level,
        format=TEXT_FORMAT,
        serialize=json,
        colorize=colorize,
        backtrace=False,
        diagnose=False,
        enqueue=False,
    )
    handler = _InterceptHandler()
    handler.addFilter(_DropConnectRetries())
    handler.addFilter(_SayOncePerKind())
    logging.basicConfig(handlers=[handler], level=logging.WARNING, force=True)
    for noisy in ("aiokafka", "kafka", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(logging.INFO)
