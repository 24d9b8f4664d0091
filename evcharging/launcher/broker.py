"""The Kafka broker of a run: the one the user named, or a local one the launcher starts.

A local broker lives where the broker CLI keeps the broker of that port,
``.cache/kafka/run/PORT`` (so ``make broker-status`` sees it); on a fixed port its data
survives between runs, and a broker on a port picked at random keeps none. While it starts
(no event loop of the launcher runs yet) a first stop signal interrupts the start and a second
one kills the half-started broker; while it stops, a signal kills it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType

from evcharging.devtools.kafka_broker import (
    DEFAULT_PORT,
    KafkaBroker,
    jars_ready,
    libs_dir,
    run_dir,
)
from evcharging.devtools.kafka_broker.sasl import SERVICE_PRINCIPALS, SaslUsers, env_variable
from evcharging.devtools.process import free_port, port_free, tcp_accepts
from evcharging.launcher.console import Console
from evcharging.launcher.plan import STOP_SIGNALS, LaunchError, LaunchOptions


def kafka_reachable(bootstrap: str, timeout: float = 2.0) -> bool:
    """Whether the first broker of ``bootstrap`` accepts TCP connections."""
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        return False
    return tcp_accepts(host.strip("[]") or "localhost", number, timeout)


class StopRequest:
    """While the broker starts: the first stop signal interrupts, a second one forces.

    The first SIGINT, SIGTERM or SIGHUP raises KeyboardInterrupt; the flag also catches a
    signal whose KeyboardInterrupt got lost (the broker's readiness probe runs its own event
    loop, in which a cancelled Kafka client may swallow it). A later signal never interrupts
    the cleanup of a half start: it calls ``force`` (which kills the broker) instead.
    """

    def __init__(self, force: Callable[[], None] = lambda: None) -> None:
        self.requested = False
        self.forced = False
        self.force = force

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            self.forced = True
            self.force()
            return
        self.requested = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass
class LocalBroker:
    """The broker this launcher started; its data is kept between runs on a fixed port."""

    broker: KafkaBroker
    keep_data: bool

    def stop(self, console: Console, *, hurry: bool = False) -> bool:
        """Stop it (see :func:`stop_broker`); True when it had to be killed."""
        try:
            return stop_broker(console, self.broker, hurry=hurry)
        finally:
            self.discard()

    def discard(self) -> None:
        if not self.keep_data and not self.broker.running:
            shutil.rmtree(self.broker.work_dir, ignore_errors=True)


SASL_DATA_DIR = "data-sasl"
"""A SASL broker's storage, next to the plain one's (``data``) in the broker's run folder:
switching between ``make run`` and ``make run ARGS=--sasl`` keeps both."""


def sasl_child_env(users: SaslUsers) -> dict[str, str]:
    """What the children of a run on the launcher's SASL broker need (SPEC §11): the
    protocol and each principal's password (each service picks its own)."""
    env = {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}
    env.update({env_variable(p): users.password(p) for p in SERVICE_PRINCIPALS})
    return env


def prepare_broker(
    console: Console,
    options: LaunchOptions,
    taken: set[int],
    *,
    sasl: bool = False,
    topic_prefixes: Sequence[str] = ("",),
) -> LocalBroker:
    """The broker to start: on 9092 (or --kafka-port); a port picked at random keeps no data.

    With ``sasl`` it is the broker of SPEC §11 (SCRAM users and the ACLs for the topics of
    ``topic_prefixes``), its data in :data:`SASL_DATA_DIR`."""
    port = options.kafka_port
    keep_data = bool(port)
    if port is None:
        port = DEFAULT_PORT
        if port in taken or not port_free(port, "127.0.0.1"):
            fallback = free_port()
            console.warn(
                f"port {port} is in use (another Kafka broker? then use it with "
                f"--kafka-bootstrap localhost:{port}); starting the local broker on port "
                f"{fallback} instead"
            )
            port = fallback
        else:
            keep_data = True
    elif port == 0:
        port = free_port()
    elif port in taken or not port_free(port, "127.0.0.1"):
        raise LaunchError(f"port {port} (the local Kafka broker) is already in use; "
                          "choose another with --kafka-port")
    work = run_dir(port)
    if not sasl:
        return LocalBroker(KafkaBroker(port, work), keep_data)
    broker = KafkaBroker(port, work, data_dir=work / SASL_DATA_DIR, sasl=True,
                         topic_prefixes=topic_prefixes)
    return LocalBroker(broker, keep_data)


def start_broker(console: Console, local: LocalBroker) -> None:
    """Start it and wait until it answers; nothing is left behind when that fails."""
    broker = local.broker
    console.say(
        "no Kafka broker configured (--kafka-bootstrap, KAFKA_BOOTSTRAP or "
        "CENTRAL_KAFKA_BOOTSTRAP): starting a local one"
    )
    if not jars_ready():
        console.warn(
            f"first run: fetching the Apache Kafka jars with Maven into {libs_dir()}; "
            "this happens once and takes ~30 s"
        )
    console.say(f"starting Kafka on 127.0.0.1:{broker.port} (log: {broker.log_file}) ...")
    try:
        broker.start()
    except BaseException:
        local.discard()
        raise


def stop_broker(console: Console, broker: KafkaBroker, *, hurry: bool = False) -> bool:
    """Stop the broker (SIGTERM, then SIGKILL); a stop signal meanwhile, or `hurry`, kills it.

    Returns whether it was killed.
    """
    return stop_killable(
        console, "the Kafka broker", broker.pid, broker.stop, broker.kill, hurry=hurry
    )


def stop_killable(
    console: Console,
    name: str,
    pid: int | None,
    stop: Callable[[], None],
    kill: Callable[[], None],
    *,
    hurry: bool = False,
) -> bool:
    """Run ``stop`` (the clean stop of the process ``pid``, called ``name`` in messages); a
    stop signal meanwhile, or `hurry`, calls ``kill``. Returns whether it was killed."""
    killed = False

    def kill_now(signum: int = 0, frame: FrameType | None = None) -> None:
        nonlocal killed
        killed = True
        console.warn(f"killing {name} now")
        kill()

    if pid is None:
        console.warn(f"{name} is not running any more")
        stop()
        return False
    if hurry:
        kill_now()
    else:
        console.say(f"stopping {name} (pid {pid}) ...")
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, kill_now)
    try:
        stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return killed
