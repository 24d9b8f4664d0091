"""The message-bus port: topics, the one Publisher protocol and a typed handler registry.

Each message model travels on exactly one topic (SPEC §2), so a publisher is handed only
the message and finds its topic and key here, and a consumer is given :class:`Routes`
that map a model to a ``Handler[M]`` for that very model: mypy checks every route.
:mod:`evcharging.common.kafka` is the adapter the product runs on; unit tests use a
recording double.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from evcharging.common.messages import (
    CentralCommand,
    CPStatus,
    CPTelemetry,
    DriverRequest,
    DriverUpdate,
    Message,
)

__all__ = [
    "TOPIC_KEYS",
    "TOPIC_MODELS",
    "BusError",
    "Fenced",
    "Handler",
    "Publisher",
    "Routes",
    "Topic",
    "TransientError",
    "key_of",
    "topic_of",
]


class Topic(StrEnum):
    DRIVER_REQUESTS = "driver.requests"
    DRIVER_UPDATES = "driver.updates"
    CENTRAL_COMMANDS = "central.commands"
    CP_STATUS = "cp.status"
    CP_TELEMETRY = "cp.telemetry"


TOPIC_MODELS: dict[Topic, type[Message]] = {
    Topic.DRIVER_REQUESTS: DriverRequest,
    Topic.DRIVER_UPDATES: DriverUpdate,
    Topic.CENTRAL_COMMANDS: CentralCommand,
    Topic.CP_STATUS: CPStatus,
    Topic.CP_TELEMETRY: CPTelemetry,
}
"""The model each topic carries."""

_TOPICS: dict[type[Message], Topic] = {model: topic for topic, model in TOPIC_MODELS.items()}

TOPIC_KEYS: dict[Topic, str] = {
    Topic.DRIVER_REQUESTS: "cp_id",
    Topic.DRIVER_UPDATES: "driver_id",
    Topic.CENTRAL_COMMANDS: "cp_id",
    Topic.CP_STATUS: "cp_id",
    Topic.CP_TELEMETRY: "cp_id",
}
"""The field of each topic's message that is its Kafka key."""

M = TypeVar("M", bound=Message)
M_contra = TypeVar("M_contra", bound=Message, contravariant=True)

Handler = Callable[[M], Awaitable[None]]
"""Handles one validated message of model M."""


class BusError(Exception):
    """The bus could not do what was asked (e.g. the broker stayed unreachable)."""


class Fenced(BusError):
    """A transactional producer may never send again: another instance with the same
    transactional id took over (or the broker refused the id). Nothing it had not
    committed is visible; the process must stop rather than decide on."""


class TransientError(Exception):
    """A handler could not finish now but may later (e.g. the database is locked).

    The consumer retries the same message with backoff and does not commit its offset, so
    the decision is neither lost nor taken twice (handlers are idempotent). Any other
    exception is a bug in the handler or the message: it is logged, counted and skipped.
    """


def topic_of(message: Message | type[Message]) -> Topic:
    """The topic a message (or model) travels on; TypeError for a model with none."""
    model = message if isinstance(message, type) else type(message)
    try:
        return _TOPICS[model]
    except KeyError:
        raise TypeError(f"{model.__name__} is not a bus message") from None


def key_of(message: Message) -> bytes:
    """The Kafka key of a message (SPEC §2: cp_id, or driver_id on driver.updates)."""
    return str(getattr(message, TOPIC_KEYS[topic_of(message)])).encode()


class Publisher(Protocol):
    """Where a service sends its messages (``KafkaBus`` in the product).

    With ``wait`` the call returns once the broker has the message and raises
    :class:`BusError` when it could not be delivered; without, it returns once the message
    is queued (order per key is kept) and a failed delivery is logged and counted.
    """

    async def publish(self, message: Message, *, wait: bool = True) -> None: ...


class Routes:
    """Which handler gets each consumed model; one handler per model (and so per topic)."""

    def __init__(self) -> None:
        self._handlers: dict[Topic, Handler[Any]] = {}

    def add(self, model: type[M], handler: Handler[M]) -> Routes:
        """Route `model`'s topic to `handler`; returns self, so calls chain."""
        topic = topic_of(model)
        if topic in self._handlers:
            raise ValueError(f"{model.__name__} already has a handler")
        self._handlers[topic] = handler
        return self

    @property
    def topics(self) -> list[Topic]:
        return list(self._handlers)

    def handler(self, topic: Topic) -> Handler[Any]:
        return self._handlers[topic]

    def __iter__(self) -> Iterator[Topic]:
        return iter(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)
