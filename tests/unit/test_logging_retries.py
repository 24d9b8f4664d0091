"""aiokafka's retried errors are said once per kind, not on every retry."""

from __future__ import annotations

import logging

from loguru import logger

from evcharging.common.logging import setup_logging

MESSAGE = "Got error produce response on topic-partition %s, retrying. Error: %s"


def test_a_retried_produce_error_is_logged_once_per_kind() -> None:
    setup_logging("test")
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{level} {message}")
    try:
        sender = logging.getLogger("aiokafka.producer.sender")
        for partition in range(3):
            sender.warning(MESSAGE, f"driver.updates-{partition}", "NotEnoughReplicasError")
        sender.warning(MESSAGE, "cp.status-0", "KafkaTimeoutError")
        sender.warning(MESSAGE, "cp.status-1", "KafkaTimeoutError")
        sender.warning("Something else went wrong")
        sender.warning("Something else went wrong")
    finally:
        logger.remove(sink)
    said = [line for line in lines if "Got error produce response" in line]
    assert len(said) == 2
    assert "NotEnoughReplicasError" in said[0] and "said once per kind" in said[0]
    assert said[0].startswith("WARNING") and said[1].startswith("WARNING")
    assert "KafkaTimeoutError" in said[1]
    assert sum("Something else went wrong" in line for line in lines) == 2


def test_a_refused_join_is_logged_once_per_kind_with_why() -> None:
    from aiokafka.errors import InconsistentGroupProtocolError

    setup_logging("test")
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{level} {message}")
    try:
        coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
        for _ in range(5):
            coordinator.error("Attempt to join group failed due to fatal error: %s",
                              InconsistentGroupProtocolError())
    finally:
        logger.remove(sink)
    said = [line for line in lines if "Attempt to join group failed" in line]
    assert len(said) == 1 and said[0].startswith("ERROR")
    assert "another partition assignor" in said[0]
