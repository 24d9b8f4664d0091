"""Shared service plumbing: start-up that a stop signal interrupts, the task owner, the
ordered shutdown, the HTTP server, and the process's signals (in child processes)."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator

import pytest
from fastapi import FastAPI
from loguru import logger

from evcharging.common.service import (
    HttpServer,
    Shutdown,
    Stopped,
    TaskOwner,
    until_stopped,
    wait_first,
)


async def test_until_stopped_cancels_start_up_when_stop_is_set() -> None:
    stop = asyncio.Event()
    started = asyncio.Event()
    cancelled = False

    async def slow_start() -> None:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled = True
            raise

    async def set_stop() -> None:
        await started.wait()
        stop.set()

    setter = asyncio.create_task(set_stop())
    with pytest.raises(Stopped):
        await until_stopped(stop, slow_start())
    await setter
    assert cancelled


async def test_until_stopped_passes_results_and_errors_through() -> None:
    async def fail() -> None:
        raise OSError("port taken")

    async def answer() -> int:
        return 42

    with pytest.raises(OSError, match="port taken"):
        await until_stopped(asyncio.Event(), fail())
    assert await until_stopped(asyncio.Event(), answer()) == 42


async def test_http_server_reports_a_taken_port_as_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpServer(FastAPI(), "127.0.0.1", port)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await server.start()
        await server.stop()


async def test_wait_first_returns_on_an_event_and_cancels_its_waiters() -> None:
    stop = asyncio.Event()
    forever = asyncio.create_task(asyncio.Event().wait())
    stop.set()
    assert await wait_first([stop], [forever]) == set()
    assert not forever.done()
    forever.cancel()


async def test_wait_first_returns_the_task_that_ended() -> None:
    async def die() -> None:
        raise RuntimeError("consumer broke")

    dying = asyncio.create_task(die())
    assert await wait_first([asyncio.Event()], [dying]) == {dying}
    assert isinstance(dying.exception(), RuntimeError)


# ----------------------------------------------------------------------------- TaskOwner


@pytest.fixture
def logs() -> Iterator[list[tuple[str, str, bool]]]:
    """(level, message, has a traceback) of every log line while the test runs."""
    records: list[tuple[str, str, bool]] = []
    sink_id = logger.add(
        lambda m: records.append(
            (m.record["level"].name, m.record["message"], m.record["exception"] is not None)
        ),
        level="DEBUG",
        format="{message}",
    )
    yield records
    logger.remove(sink_id)


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_a_failing_task_is_logged_once_and_ends_the_wait(
    logs: list[tuple[str, str, bool]],
) -> None:
    async def boom() -> None:
        raise RuntimeError("consumer broke")

    async with TaskOwner("test") as tasks:
        survivor = tasks.spawn(_forever(), "survivor")
        tasks.spawn(boom(), "consumer", forever=True)
        assert await asyncio.wait_for(tasks.wait(asyncio.Event()), 2) is True
        assert isinstance(tasks.failure, RuntimeError)
        assert not survivor.done()  # a failure stops the service, not the other tasks
    assert survivor.cancelled()
    lines = [(level, msg, tb) for level, msg, tb in logs if "consumer broke" in msg]
    assert lines == [("CRITICAL", "consumer died (RuntimeError('consumer broke'))", True)]


async def test_a_forever_task_that_returns_has_failed(logs: list[tuple[str, str, bool]]) -> None:
    async def done_early() -> None:
        return None

    async with TaskOwner("test", level="ERROR") as tasks:
        tasks.spawn(done_early(), "housekeeping", forever=True)
        tasks.spawn(done_early(), "one-off")  # not forever: returning is its job
        assert await asyncio.wait_for(tasks.wait(), 2) is True
    assert [(level, msg) for level, msg, _ in logs] == [
        ("ERROR", "housekeeping ended unexpectedly")
    ]
    assert str(tasks.failure) == "housekeeping ended unexpectedly"


async def test_wait_returns_false_on_an_event_and_close_twice_is_harmless() -> None:
    stop = asyncio.Event()
    tasks = TaskOwner("test")
    running = [tasks.spawn(_forever(), f"task-{i}", forever=True) for i in range(3)]
    stop.set()
    assert await tasks.wait(stop) is False
    assert len(tasks) == 3
    await tasks.close()
    assert all(task.cancelled() for task in running)
    assert len(tasks) == 0 and tasks.failure is None and tasks.closed
    await tasks.close()
    coro = _forever()
    with pytest.raises(RuntimeError, match="closed"):
        tasks.spawn(coro, "late")
    assert coro.cr_frame is None  # closed, so no "never awaited" warning


async def test_cancel_stops_some_tasks_and_a_task_asked_to_stop_may_return() -> None:
    waiting = asyncio.Event()

    async def polite() -> None:
        try:
            waiting.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return  # ends normally when cancelled: not a failure

    async with TaskOwner("test") as tasks:
        first = tasks.spawn(polite(), "polite", forever=True)
        second = tasks.spawn(_forever(), "other", forever=True)
        await asyncio.wait_for(waiting.wait(), 2)
        await tasks.cancel(first)
        assert first.done() and not second.done()
        assert not tasks.failed.is_set()


async def test_close_from_an_owned_task_does_not_wait_for_itself() -> None:
    tasks = TaskOwner("test")
    other = tasks.spawn(_forever(), "other")

    async def closer() -> str:
        await tasks.close()
        return "closed"

    closing = tasks.spawn(closer(), "closer")
    assert await asyncio.wait_for(closing, 2) == "closed"
    assert other.cancelled()


# ----------------------------------------------------------------------------- Shutdown


async def test_shutdown_runs_every_step_in_order_despite_a_failure(
    logs: list[tuple[str, str, bool]],
) -> None:
    done: list[str] = []

    def step(name: str, fail: bool = False) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            done.append(name)
            if fail:
                raise OSError("broker gone")

        return run

    shutdown = Shutdown(("server", step("server")), ("consumer", step("consumer", fail=True)))
    shutdown.add("database", step("database"))
    assert await shutdown.run() is False
    assert done == ["server", "consumer", "database"]
    assert [(level, msg, tb) for level, msg, tb in logs] == [
        ("ERROR", "stopping the consumer failed", True)
    ]
    assert await shutdown.run() is False  # a second run does nothing
    assert done == ["server", "consumer", "database"]


# ----------------------------------------------------------------------------- HttpServer


async def test_http_server_stops_cleanly_and_twice() -> None:
    async with TaskOwner("test") as tasks:
        server = HttpServer(FastAPI(), "127.0.0.1", 0, name="api", tasks=tasks)
        await server.start()
        assert len(tasks) == 1
        await server.stop()
        await server.stop()
        assert len(tasks) == 0
        assert not tasks.failed.is_set()


async def test_http_server_failure_is_a_failure_of_its_owner(
    logs: list[tuple[str, str, bool]],
) -> None:
    async with TaskOwner("test") as tasks:
        server = HttpServer(FastAPI(), "127.0.0.1", 0, name="api", tasks=tasks)
        await server.start()

        async def broken_tick(counter: int) -> bool:
            raise RuntimeError("uvicorn broke")

        server._server.on_tick = broken_tick  # type: ignore[method-assign]
        assert await asyncio.wait_for(tasks.wait(asyncio.Event()), 5) is True
        await server.stop()
    assert [msg for _, msg, tb in logs if "uvicorn broke" in msg and tb] == [
        "api server died (RuntimeError('uvicorn broke'))"
    ]


async def test_http_server_that_stops_by_itself_has_failed() -> None:
    async with TaskOwner("test") as tasks:
        server = HttpServer(FastAPI(), "127.0.0.1", 0, name="api", tasks=tasks)
        await server.start()
        server._server.should_exit = True  # as if uvicorn decided to quit on its own
        assert await asyncio.wait_for(tasks.wait(asyncio.Event()), 5) is True
        assert str(tasks.failure) == "the api server stopped by itself"
        await server.stop()


# ----------------------------------------------------------------------------- run_service

CHILD = """
import asyncio, sys
from loguru import logger
from evcharging.common.service import Shutdown, TaskOwner, run_service

logger.remove()
logger.add(sys.stderr, format="{level} {message}")
mode = sys.argv[1]

async def stuck() -> None:
    logger.info("stuck in a shutdown step")
    await asyncio.Event().wait()

async def deaf() -> None:
    logger.info("stuck in a shutdown step")
    while True:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            logger.info("ignoring the cancellation")

async def boom() -> None:
    raise RuntimeError("boom in a task")

async def main(stop: asyncio.Event) -> int:
    async with TaskOwner("child") as tasks:
        if mode == "fail":
            tasks.spawn(boom(), "doomed task")
        logger.info("ready")
        failed = await tasks.wait(stop)
        if mode != "fail":
            await Shutdown(("stuck part", deaf if mode == "deaf" else stuck)).run()
    return 1 if failed else 0

sys.exit(run_service(main, force_grace=0.3))
"""


class Child:
    """A small service process; tests synchronise on its log lines, with a deadline."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, mode: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, mode,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def wait_for_line(self, text: str, timeout: float = 20.0) -> None:
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.lines):
                line = await self.proc.stderr.readline()
                assert line, f"the child exited before logging {text!r}: {self.lines}"
                self.lines.append(line.decode())

    async def exit_code(self, timeout: float = 10.0) -> int:
        assert self.proc.stderr is not None
        rest = await asyncio.wait_for(self.proc.stderr.read(), timeout)
        self.lines.extend(rest.decode().splitlines(keepends=True))
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()

    @property
    def output(self) -> str:
        return "".join(self.lines)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_a_second_signal_forces_the_exit(sig: signal.Signals, code: int) -> None:
    child = await Child.start("stuck")
    try:
        await child.wait_for_line("ready")
        child.proc.send_signal(sig)
        await child.wait_for_line("stuck in a shutdown step")
        child.proc.send_signal(sig)
        assert await child.exit_code() == code, child.output
    finally:
        child.kill()
        await child.proc.wait()
    assert f"second {sig.name} received; forcing the exit ({code})" in child.output


async def test_a_forced_exit_does_not_wait_for_a_step_deaf_to_cancellation() -> None:
    child = await Child.start("deaf")
    try:
        await child.wait_for_line("ready")
        child.proc.send_signal(signal.SIGINT)
        await child.wait_for_line("stuck in a shutdown step")
        child.proc.send_signal(signal.SIGINT)
        await child.wait_for_line("ignoring the cancellation")
        assert await child.exit_code() == 130, child.output
    finally:
        child.kill()
        await child.proc.wait()


async def test_a_failed_task_makes_the_process_exit_1_with_one_traceback() -> None:
    child = await Child.start("fail")
    try:
        assert await child.exit_code(timeout=20) == 1, child.output
    finally:
        child.kill()
        await child.proc.wait()
    assert child.output.count("RuntimeError: boom in a task") == 1, child.output
    assert "CRITICAL doomed task died (RuntimeError('boom in a task'))" in child.output


async def test_answers_do_not_wait_for_nagle() -> None:
    """Accepted connections get TCP_NODELAY (the listening socket names IPPROTO_TCP), so a
    small answer is not held back ~40 ms; checked on the socket, not by timing."""
    import socket as socket_module

    from evcharging.common.service import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket_module.IPPROTO_TCP
    finally:
        sock.close()
