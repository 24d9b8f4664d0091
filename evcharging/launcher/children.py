"""One child process of the launcher: start it, relay its output, stop it.

Every child runs as ``sys.executable -m <module>`` in the launcher's session but in a process
group of its own, so that Ctrl-C in the terminal reaches the launcher only, and asks the
kernel for SIGTERM when the launcher dies (:class:`~evcharging.devtools.process.DieWithParent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping

from evcharging.launcher.console import BOLD, DIM, LAUNCHER, ROLE_COLOURS, Console
from evcharging.launcher.plan import ChildSpec

RESTART_FIRST_DELAY = 1.0
RESTART_MAX_DELAY = 30.0
STABLE_RUN = 60.0
"""A child that ran this long before dying is restarted after the first delay again."""
TAIL_LINES = 12
LINE_LIMIT = 1024 * 1024
READER_DRAIN = 2.0

STOP_SIGNAL = signal.SIGTERM
"""What a child gets first. Every service treats SIGTERM exactly like SIGINT (a graceful
stop, see ``evcharging.common.service``), but a child that is still importing when the stop
comes simply ends on SIGTERM, where SIGINT would print a KeyboardInterrupt traceback."""


def next_delay(delay: float) -> float:
    """The restart delay after ``delay``: doubled, at most :data:`RESTART_MAX_DELAY`."""
    return min(delay * 2, RESTART_MAX_DELAY)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


async def exited_within(
    process: asyncio.subprocess.Process, timeout: float, hurry: asyncio.Event
) -> bool:
    """Wait for the process to exit, at most `timeout` s or until `hurry` is set."""
    exited = asyncio.ensure_future(process.wait())
    hurried = asyncio.create_task(hurry.wait())
    try:
        await asyncio.wait({exited, hurried}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (exited, hurried):
            task.cancel()
        await asyncio.gather(exited, hurried, return_exceptions=True)
    return process.returncode is not None


class Child:
    """One supervised child: its current process, its last lines and its supervisor task."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.process: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.runs = 0
        self.last_code: int | None = None
        self.stop_requested = False
        self.failed = False
        self.killed = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def ended(self) -> bool:
        """Whether its supervisor gave up (exited for good, not restarting)."""
        return self.task is not None and self.task.done()

    def send(self, sig: signal.Signals) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    def kill(self) -> None:
        if self.running:
            self.killed = True
            self.send(signal.SIGKILL)

    async def run_once(
        self, env: Mapping[str, str], console: Console, preexec: Callable[[], None]
    ) -> int:
        """Start the process, relay its output until it exits; return its exit code."""
        process = await asyncio.create_subprocess_exec(
            *self.spec.argv(sys.executable),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**env, **dict(self.spec.env)},
            limit=LINE_LIMIT,
            start_new_session=False,
            process_group=0,  # Ctrl-C in the terminal reaches the launcher, which stops in order
            preexec_fn=preexec,
        )
        self.process = process
        self.runs += 1
        self.tail.clear()
        assert process.stdout is not None
        reader = asyncio.create_task(self.relay(process.stdout, console), name=f"relay {self.name}")
        try:
            code = await process.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), READER_DRAIN)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        return code

    async def relay(self, stream: asyncio.StreamReader, console: Console) -> None:
        """Copy the output, line by line, behind the child's name; keep the last lines."""
        colour = ROLE_COLOURS[self.spec.role]
        in_long_line = False
        while True:
            try:
                raw = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:  # end of output
                raw = exc.partial
                if not raw:
                    return
            except asyncio.LimitOverrunError as exc:  # a huge line: pass it on in pieces
                raw = await stream.readexactly(max(1, exc.consumed))
                in_long_line = True
            else:
                if in_long_line and raw in (b"\n", b"\r\n"):  # the end of a long line
                    in_long_line = False
                    continue
                in_long_line = False
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self.tail.append(text)
            console.line(self.name, text, colour)

    def report_death(self, console: Console, code: int, ran: float) -> None:
        console.error(
            f"!!! {self.name} DIED: {describe_exit(code)} after {ran:.1f} s; its last lines:"
        )
        for text in self.tail:
            console.line(LAUNCHER, f"    {text}", BOLD, DIM)
        if not self.tail:
            console.line(LAUNCHER, "    (no output)", BOLD, DIM)

    async def stop(self, console: Console, timeout: float, hurry: asyncio.Event) -> None:
        """SIGTERM, up to `timeout` s, then SIGKILL; SIGKILL at once while `hurry` is set.

        Also waits for its supervisor task, which will not restart it.
        """
        self.stop_requested = True
        process = self.process
        if process is not None and process.returncode is None:
            if hurry.is_set():
                self.kill()
            else:
                self.send(STOP_SIGNAL)
            if not await exited_within(process, timeout, hurry):
                if not hurry.is_set():
                    console.warn(f"{self.name} did not stop within {timeout:g} s; killing it")
                self.kill()
                await process.wait()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
