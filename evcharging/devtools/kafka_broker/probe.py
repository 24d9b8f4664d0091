"""Whether a Kafka broker is ready: it answers a metadata request and lists itself."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

_T = TypeVar("_T")


def kafka_answers(
    bootstrap: str, timeout: float, security: Mapping[str, str] | None = None
) -> bool:
    """Whether the broker at ``bootstrap`` answers within ``timeout`` s (blocking);
    ``security`` are aiokafka's SASL arguments for a broker that wants them.

    Works from synchronous code, also when the caller already runs an event loop.
    """
    return _run_coroutine(
        functools.partial(_kafka_answers, bootstrap, timeout, dict(security or {}))
    )


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, factory()).result()


async def _kafka_answers(bootstrap: str, timeout: float, security: dict[str, str]) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="evcharging-kafka-broker-probe",
        request_timeout_ms=max(1000, int(timeout * 1000)),
        **security,
    )
    try:
        await asyncio.wait_for(admin.start(), timeout)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
        return bool(cluster.get("brokers"))
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await admin.close()
