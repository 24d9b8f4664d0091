"""What every service process shares: one lifecycle, stop signals and an embedded HTTP server.

A service's ``main`` parses its settings and calls :func:`run_service` with a coroutine
function ``main(stop)`` (usually ``lambda stop: run(settings, stop)``), where ``stop`` is an
:class:`asyncio.Event` that SIGINT or SIGTERM sets. ``run`` follows uvicorn's
``Server.serve``: start up, run, shut down.

* **Start** the parts in order; :func:`until_stopped` lets a stop signal cut a slow start
  (waiting for the broker) short.
* **Run** the background tasks in a :class:`TaskOwner` and wait with
  :meth:`TaskOwner.wait` for the stop signal. A task that fails is logged once, by the
  owner, and ends the wait too: the service then shuts down and exits 1.
* **Shut down** with a :class:`Shutdown`: the steps the service declares run in that
  order, and a failing step is logged without skipping the ones after it.

A second SIGINT/SIGTERM while shutting down forces the exit: the service is cancelled
and the process exits at once with 128 + the signal's number (130, 143), as uvicorn's
second Ctrl+C does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from typing import Any, NoReturn, TypeVar

import uvicorn
from loguru import logger

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORCE_GRACE = 2.0
"""Seconds a forced exit lets the cancelled service unwind before the process ends anyway."""
EXIT_OK = 0
EXIT_FAILURE = 1

T = TypeVar("T")
Step = tuple[str, Callable[[], Awaitable[object]]]
"""A shutdown step: what it stops (for the log) and the call that stops it."""


def run_service(
    main: Callable[[asyncio.Event], Awaitable[int | None]], *, force_grace: float = FORCE_GRACE
) -> int:
    """Run `main(stop)` in a fresh event loop and return its exit code.

    The first SIGINT/SIGTERM sets `stop`. A second one cancels `main` and ends the process
    with 128 + the signal's number as soon as `main` has unwound, or after `force_grace`
    seconds if it does not (a shutdown step deaf to cancellation, a stuck thread).
    """

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        service = asyncio.current_task()
        forced: int | None = None

        def on_signal(sig: signal.Signals) -> None:
            nonlocal forced
            if not stop.is_set():
                logger.info("{} received; shutting down (send it again to force the exit)",
                            sig.name)
                stop.set()
                return
            if forced is not None:
                return
            forced = 128 + sig.value
            logger.warning("second {} received; forcing the exit ({})", sig.name, forced)
            timer = threading.Timer(force_grace, _exit_now, (forced,))
            timer.daemon = True
            timer.start()
            if service is not None:
                service.cancel()

        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            code = (await main(stop)) or EXIT_OK
        except asyncio.CancelledError:
            if forced is None:
                raise
            code = forced
        finally:
            for sig in HANDLED_SIGNALS:
                loop.remove_signal_handler(sig)
        if forced is not None:
            # Not back through asyncio.Runner: it would wait for every leftover task.
            _exit_now(forced)
        return code

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as loop_runner:
            return loop_runner.run(runner())
    except KeyboardInterrupt:
        return 130


def _exit_now(code: int) -> NoReturn:
    """End the process with `code` without waiting for anything (the log is flushed)."""
    for stream in (sys.stderr, sys.stdout):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


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
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY on accepted connections only
    # when the listening socket says it is TCP; without it every answer waited ~40 ms for
    # Nagle's algorithm.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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
    """Wait until one of `events` is set or one of `tasks` ends; return the ended tasks."""
    watched = set(tasks)
    waiters = {asyncio.create_task(event.wait(), name="event-waiter") for event in events}
    try:
        done, _ = await asyncio.wait(watched | waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return done & watched


class TaskOwner:
    """The owner of a service's background tasks (as aiojobs' ``Scheduler`` owns its jobs).

    :meth:`spawn` starts a task and keeps it until it ends. A task that raises, or that was
    spawned ``forever=True`` and returns, has *failed*: the owner logs it once, with its
    traceback, at `level`, keeps the first such exception in :attr:`failure` and sets
    :attr:`failed`, which ends :meth:`wait`. Nobody raises it again. Cancellation is not
    a failure.

    :meth:`close` cancels every task and awaits them all; it is safe to call twice and is
    what leaving ``async with`` does. :meth:`cancel` does the same for some of them. Neither
    cancels the task that calls it. After :meth:`close`, :meth:`spawn` raises RuntimeError.

    A service watches its owner's failures (``await tasks.wait(stop)``); a part that only
    wants its tasks owned (a server's connections, a CP's timers) ignores ``failed`` and
    passes ``level="ERROR"``.
    """

    def __init__(self, name: str = "service", *, level: str = "CRITICAL") -> None:
        self.name = name
        self.level = level
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None
        self.failed_task: str | None = None
        """The name of the task that failed first."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cancelling: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        """How many owned tasks are still running."""
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(
        self, coro: Coroutine[Any, Any, T], name: str, *, forever: bool = False
    ) -> asyncio.Task[T]:
        """Run `coro` as an owned task called `name`.

        `forever`: the task must run until cancelled, so returning counts as a failure.
        """
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.name} is closed: cannot start {name}")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._ended, forever=forever))
        return task

    def _ended(self, task: asyncio.Task[Any], *, forever: bool) -> None:
        self._tasks.discard(task)
        asked_to_stop = task in self._cancelling
        self._cancelling.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            if not forever or asked_to_stop:
                return
            exc = RuntimeError(f"{task.get_name()} ended unexpectedly")
            logger.log(self.level, "{} ended unexpectedly", task.get_name())
        else:
            logger.opt(exception=exc).log(self.level, "{} died ({!r})", task.get_name(), exc)
        if self.failure is None:
            self.failure = exc
            self.failed_task = task.get_name()
        self.failed.set()

    async def wait(self, *events: asyncio.Event) -> bool:
        """Wait until one of `events` is set or an owned task fails; True when one failed."""
        await wait_first([*events, self.failed], ())
        return self.failed.is_set()

    async def cancel(self, *tasks: asyncio.Task[Any]) -> None:
        """Cancel `tasks` and wait until they have ended (their failures are logged)."""
        current = asyncio.current_task()
        ending = [task for task in tasks if task is not current and not task.done()]
        for task in ending:
            self._cancelling.add(task)
            task.cancel()
        if ending:
            await asyncio.wait(ending)

    async def close(self) -> None:
        """Cancel every owned task and wait until all have ended; safe to call twice."""
        self._closed = True
        await self.cancel(*self._tasks)

    async def __aenter__(self) -> TaskOwner:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class Shutdown:
    """A service's shutdown: named steps run once, in the order declared.

    A step that raises is logged and the next steps still run (a failed Kafka close must
    not leave the database open). Cancellation (a forced exit) is not caught.
    """

    def __init__(self, *steps: Step) -> None:
        self._steps = list(steps)
        self._ran = False
        self._failed: list[str] = []

    def add(self, name: str, step: Callable[[], Awaitable[object]]) -> None:
        """Add a step after the others."""
        self._steps.append((name, step))

    async def run(self) -> bool:
        """Run every step in order; True when none failed. A second call does nothing."""
        if not self._ran:
            self._ran = True
            for name, step in self._steps:
                try:
                    await step()
                except Exception as exc:  # noqa: BLE001 - shutdown must reach every step
                    self._failed.append(name)
                    logger.opt(exception=exc).error("stopping the {} failed", name)
        return not self._failed


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: the service owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    """An ASGI app served by uvicorn inside the service's event loop.

    The server runs as a task of `tasks` (the service's :class:`TaskOwner`, or one of its
    own): uvicorn failing, or stopping when :meth:`stop` did not ask it to, is a failure of
    that task, which stops the service like any other.
    """

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        name: str = "http",
        *,
        tasks: TaskOwner | None = None,
    ) -> None:
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
        self._tasks = tasks if tasks is not None else TaskOwner(f"{name} server")
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self._stopping = False

    @property
    def port(self) -> int:
        """The bound port (useful when 0 asked for a free one)."""
        if self._socket is None:
            return int(self._config.port)
        return int(self._socket.getsockname()[1])

    async def start(self) -> None:
        """Bind (raising OSError if the port is taken) and serve in a background task."""
        self._socket = _bind(self.host, int(self._config.port))
        self._stopping = False
        task = self._tasks.spawn(self._serve(self._socket), name=f"{self.name} server")
        self._task = task
        while not self._server.started:
            if task.done():
                cause = None if task.cancelled() else task.exception()
                raise OSError(
                    f"{self.name} server on {self.host}:{self.port} did not start"
                ) from cause
            await asyncio.sleep(0.01)
        logger.info("{} listening on {}:{}", self.name, self.host, self.port)

    async def _serve(self, sock: socket.socket) -> None:
        await self._server.serve(sockets=[sock])
        if not self._stopping:
            raise RuntimeError(f"the {self.name} server stopped by itself")

    async def stop(self) -> None:
        """Stop serving (open connections get 3 s to finish); safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            self._server.should_exit = True
            _, pending = await asyncio.wait({task}, timeout=5)
            if pending:
                self._server.force_exit = True
                await self._tasks.cancel(task)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
