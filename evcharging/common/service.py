"""What every service process shares: stop signals and an embedded HTTP server.

A service's ``main`` parses its settings and calls :func:`run_service` with a coroutine
function ``main(stop)`` (usually ``lambda stop: run(settings, stop)``), where ``stop`` is an
:class:`asyncio.Event` that SIGINT or SIGTERM sets. ``run`` starts its parts, awaits
the event, then shuts down in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import Any, TypeVar

import uvicorn
from loguru import logger

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")


def run_service(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    """Run `main(stop)` in a fresh event loop; SIGINT/SIGTERM set `stop`. Returns an exit code."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if stop.is_set():
                logger.warning("second {} received; still shutting down", sig.name)
                return
            logger.info("{} received; shutting down", sig.name)
            stop.set()

        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return (await main(stop)) or 0
        finally:
            for sig in HANDLED_SIGNALS:
                loop.remove_signal_handler(sig)

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as loop_runner:
            return loop_runner.run(runner())
    except KeyboardInterrupt:
        return 130


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's faster event loop when it is installed (it comes with uvicorn[standard])."""
    if os.environ.get("EVCHARGING_NO_UVLOOP"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket; OSError (not uvicorn's sys.exit) when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


class Stopped(Exception):
    """A stop signal came while the service was still starting."""


async def until_stopped(stop: asyncio.Event, starting: Awaitable[T]) -> T:
    """Await `starting` (e.g. waiting for the broker); raise Stopped if `stop` is set first."""
    work = asyncio.ensure_future(starting)
    stopped = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not work.done():
            work.cancel()
        await asyncio.gather(stopped, work, return_exceptions=True)
    if work.cancelled():
        raise Stopped
    return work.result()


async def wait_first(
    events: Iterable[asyncio.Event], tasks: Iterable[asyncio.Task[Any]]
) -> set[asyncio.Task[Any]]:
    """Wait until one of `events` is set or one of `tasks` ends; return the ended tasks.

    The services' main loops wait like this for a stop signal (or a SHUTDOWN command)
    while watching the tasks that must not die.
    """
    watched = set(tasks)
    waiters = {asyncio.create_task(event.wait(), name="event-waiter") for event in events}
    try:
        done, _ = await asyncio.wait(watched | waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return done & watched


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: the service owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    """An ASGI app served by uvicorn inside the service's event loop."""

    def __init__(self, app: Any, host: str, port: int, name: str = "http") -> None:
        self.name = name
        self.host = host
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=3,
            # Longer than any monitor's check interval, so a pooled connection is not
            # closed by the server just as the client reuses it.
            timeout_keep_alive=75,
            ws_ping_interval=20.0,
        )
        self._server = _Server(self._config)
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when 0 asked for a free one)."""
        if self._socket is None:
            return int(self._config.port)
        return int(self._socket.getsockname()[1])

    async def start(self) -> None:
        """Bind (raising OSError if the port is taken) and serve in a background task."""
        self._socket = _bind(self.host, int(self._config.port))
        self._task = asyncio.create_task(
            self._server.serve(sockets=[self._socket]), name=f"{self.name}-server"
        )
        while not self._server.started:
            if self._task.done():
                await self._task
                raise OSError(f"{self.name} server on {self.host}:{self.port} did not start")
            await asyncio.sleep(0.01)
        logger.info("{} listening on {}:{}", self.name, self.host, self.port)

    async def stop(self) -> None:
        """Stop serving; safe to call twice."""
        task, self._task = self._task, None
        if task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout=5)
        except TimeoutError:
            self._server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._socket is not None:
            self._socket.close()
            self._socket = None
