"""A minimal Chrome DevTools Protocol client: headless Chromium driven without Selenium.

Only what the browser end-to-end tests need: one page, ``navigate``, ``evaluate``,
``wait_for`` (a JavaScript predicate polled with a deadline), ``screenshot``, a trace of
the page's main-thread tasks (``start_trace`` / ``stop_trace``), and a record
of everything that went wrong on the page (uncaught exceptions, console errors, browser
log errors, JavaScript dialogs: a dialog is recorded and dismissed at once, so an
injected ``alert()`` never blocks the page and never goes unnoticed).

:class:`Browser` is an async context manager: it launches Chromium in its own process
group with a throw-away profile, talks to the page over the DevTools WebSocket
(``websockets``' asyncio client), and on exit kills the whole process group and removes
the profile, whatever happened. The binary is ``$EVCHARGING_CHROMIUM``, else ``chromium``
or ``chromium-browser`` on ``PATH``; a missing browser raises :class:`BrowserNotFound`
(``scripts/ensure_chromium.sh`` installs it), so the tests fail instead of being skipped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.polling import poll

CHROMIUM_ENV = "EVCHARGING_CHROMIUM"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--remote-debugging-port=0",
)

JsonObject = dict[str, Any]


class BrowserNotFound(RuntimeError):
    """No Chromium binary: install one (``scripts/ensure_chromium.sh``)."""


class CDPError(RuntimeError):
    """Chromium did not start, a command failed, or the DevTools connection went away."""


class JavaScriptError(CDPError):
    """An expression given to :meth:`Browser.evaluate` threw."""


@dataclass(frozen=True)
class ConsoleEntry:
    """One console message (``console.*`` call) or browser log entry of the page."""

    source: str  # "console" for console.* calls, else the Log domain's source ("network", ...)
    level: str  # "log", "info", "warning", "error", ...
    text: str

    @property
    def is_error(self) -> bool:
        return self.level in {"error", "assert"}


@dataclass(frozen=True)
class MainThreadTask:
    """One task the page's main thread ran, from a trace: wall-clock and CPU milliseconds.

    Wall-clock time includes the time the operating system gave other processes; CPU time
    is the page's own work.
    """

    wall_ms: float
    cpu_ms: float


TRACE_CATEGORIES = "devtools.timeline,disabled-by-default-devtools.timeline"


def main_thread_tasks(events: list[JsonObject]) -> list[MainThreadTask]:
    """The top-level tasks of every renderer main thread in trace `events`."""
    threads = {
        (event.get("pid"), event.get("tid"))
        for event in events
        if event.get("ph") == "M" and event.get("name") == "thread_name"
        and event.get("args", {}).get("name") == "CrRendererMain"
    }
    return [
        MainThreadTask(wall_ms=event.get("dur", 0) / 1000, cpu_ms=event.get("tdur", 0) / 1000)
        for event in events
        if event.get("ph") == "X" and event.get("name") == "RunTask"
        and (event.get("pid"), event.get("tid")) in threads
    ]


@dataclass(frozen=True)
class Dialog:
    """A JavaScript dialog (alert, confirm, prompt, beforeunload) the page opened."""

    type: str
    message: str
    url: str


def find_chromium() -> str:
    """The Chromium binary to drive; raises :class:`BrowserNotFound` when there is none."""
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        path = shutil.which(configured)
        if path is None:
            raise BrowserNotFound(f"${CHROMIUM_ENV}={configured!r} is not an executable")
        return path
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise BrowserNotFound(
            "Chromium is needed for the browser end-to-end tests and was not found on PATH "
            f"(nor set in ${CHROMIUM_ENV}). Install it with scripts/ensure_chromium.sh "
            "(Debian/Ubuntu: apt-get install chromium)."
        )
    return path


class Browser:
    """One headless Chromium with one page, driven over the DevTools Protocol."""

    def __init__(
        self,
        binary: str | None = None,
        *,
        window_size: tuple[int, int] = (1400, 1000),
        launch_timeout: float = 30.0,
        command_timeout: float = 15.0,
    ) -> None:
        self.binary = binary or find_chromium()
        self.window_size = window_size
        self.launch_timeout = launch_timeout
        self.command_timeout = command_timeout
        self.exceptions: list[str] = []
        """Uncaught exceptions and unhandled rejections of the page."""
        self.console: list[ConsoleEntry] = []
        self.dialogs: list[Dialog] = []
        self.navigations: list[str] = []
        """URL of every document committed in the main frame (a reload adds one)."""
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[JsonObject]] = {}
        self._waiters: dict[str, list[asyncio.Future[JsonObject]]] = {}
        self._closed_reason: str | None = None
        self._trace: list[JsonObject] | None = None
        self._handlers: dict[str, Callable[[JsonObject], None]] = {
            "Tracing.dataCollected": self._on_trace_data,
            "Runtime.consoleAPICalled": self._on_console,
            "Runtime.exceptionThrown": self._on_exception,
            "Log.entryAdded": self._on_log,
            "Page.javascriptDialogOpening": self._on_dialog,
            "Page.frameNavigated": self._on_navigated,
        }

    # ------------------------------------------------------------------ life cycle

    async def __aenter__(self) -> Browser:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Launch Chromium, find its DevTools port and attach to its page."""
        self._tmp = Path(tempfile.mkdtemp(prefix="evcharging-chromium-"))
        profile = self._tmp / "profile"
        profile.mkdir()
        width, height = self.window_size
        with (self._tmp / "chromium.log").open("wb") as log:
            self._proc = subprocess.Popen(
                [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                 f"--window-size={width},{height}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # its own process group: close() kills every child
            )
        deadline = time.monotonic() + self.launch_timeout
        port = await self._devtools_port(profile / "DevToolsActivePort", deadline)
        ws_url = await self._page_ws_url(port, deadline)
        self._ws = await connect(
            ws_url, max_size=None, compression=None, ping_interval=None,
            open_timeout=max(1.0, deadline - time.monotonic()),
        )
        self._reader = asyncio.create_task(self._read(self._ws), name="cdp-reader")
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        # --window-size is the outer window: pin the viewport so screenshots have that size.
        await self.send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False,
        })

    async def close(self) -> None:
        """Close the connection, kill Chromium's process group, remove the profile. Idempotent."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 2)
            self._ws = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        self._fail_pending("browser closed")
        if self._proc is not None:
            proc, self._proc = self._proc, None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # renderers and helpers die with it
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL of our own child
                proc.kill()
                proc.wait(5)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of Chromium's own stderr/stdout (while the browser is open)."""
        if self._tmp is None or not (self._tmp / "chromium.log").exists():
            return ""
        return (self._tmp / "chromium.log").read_text(errors="replace")[-chars:]

    async def _devtools_port(self, path: Path, deadline: float) -> int:
        """Chromium writes its port (first line) to ``DevToolsActivePort`` once it listens."""

        def port() -> int | None:
            self._check_alive("before opening its DevTools port")
            first = path.read_text().split("\n", 1)[0].strip()
            return int(first) if first.isdigit() and int(first) > 0 else None

        try:
            found: int = await poll(
                port, timeout=max(deadline - time.monotonic(), 0.0),
                what=f"Chromium's {path.name}", retry_on=(OSError,),
            )
        except AssertionError as exc:
            raise CDPError(f"{exc}\n{self.log_tail()}") from None
        return found

    async def _page_ws_url(self, port: int, deadline: float) -> str:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            async def page_url() -> str | None:
                self._check_alive("before listing its pages")
                for target in (await http.get("/json/list")).json():
                    if target.get("type") == "page" and target.get("webSocketDebuggerUrl"):
                        return str(target["webSocketDebuggerUrl"])
                return None

            try:
                url: str = await poll(
                    page_url, timeout=max(deadline - time.monotonic(), 0.0),
                    what=f"a page target on DevTools port {port}",
                    retry_on=(httpx.HTTPError, ValueError),
                )
            except AssertionError as exc:
                raise CDPError(str(exc)) from None
        return url

    def _check_alive(self, when: str) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise CDPError(f"Chromium exited ({self._proc.returncode}) {when}:\n{self.log_tail()}")

    # ------------------------------------------------------------------ protocol

    async def send(self, method: str, params: JsonObject | None = None) -> JsonObject:
        """Send one command and return its ``result``; raises :class:`CDPError` on an error."""
        future = await self._send(method, params)
        try:
            return await asyncio.wait_for(future, self.command_timeout)
        except TimeoutError:
            raise CDPError(f"{method}: no answer within {self.command_timeout}s") from None

    async def _send(self, method: str, params: JsonObject | None) -> asyncio.Future[JsonObject]:
        if self._ws is None or self._closed_reason is not None:
            raise CDPError(f"{method}: not connected ({self._closed_reason or 'not started'})")
        message_id = next(self._ids)
        future: asyncio.Future[JsonObject] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        try:
            await self._ws.send(json.dumps({"id": message_id, "method": method,
                                            "params": params or {}}))
        except ConnectionClosed as exc:
            self._pending.pop(message_id, None)
            raise CDPError(f"{method}: DevTools connection closed ({exc})") from exc
        return future

    def _expect(self, event: str) -> asyncio.Future[JsonObject]:
        """A future for the next `event`; register it before causing the event."""
        future: asyncio.Future[JsonObject] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(event, []).append(future)
        return future

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                message: JsonObject = json.loads(raw)
                if "id" in message:
                    future = self._pending.pop(int(message["id"]), None)
                    if future is None or future.done():
                        continue
                    if "error" in message:
                        future.set_exception(CDPError(f"DevTools error: {message['error']}"))
                    else:
                        future.set_result(message.get("result", {}))
                elif "method" in message:
                    await self._on_event(message["method"], message.get("params", {}))
        except ConnectionClosed:
            pass
        finally:
            self._fail_pending("DevTools connection closed")

    def _fail_pending(self, reason: str) -> None:
        self._closed_reason = self._closed_reason or reason
        for future in [*self._pending.values(),
                       *itertools.chain.from_iterable(self._waiters.values())]:
            if not future.done():
                future.set_exception(CDPError(reason))
        self._pending.clear()
        self._waiters.clear()

    async def _on_event(self, method: str, params: JsonObject) -> None:
        handler = self._handlers.get(method)
        if handler is not None:
            handler(params)
        for future in self._waiters.pop(method, []):
            if not future.done():
                future.set_result(params)
        if method == "Page.javascriptDialogOpening":
            # Dismiss at once, without waiting for the answer here (it arrives through
            # this very reader); a failure to dismiss is recorded as a page problem.
            future = await self._send("Page.handleJavaScriptDialog", {"accept": False})
            future.add_done_callback(self._note_dismiss_failure)

    def _note_dismiss_failure(self, future: asyncio.Future[JsonObject]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.exceptions.append(f"could not dismiss a dialog: {future.exception()}")

    def _on_console(self, params: JsonObject) -> None:
        text = " ".join(_describe(arg) for arg in params.get("args", []))
        self.console.append(ConsoleEntry("console", str(params.get("type", "log")), text))

    def _on_exception(self, params: JsonObject) -> None:
        details = params.get("exceptionDetails", {})
        self.exceptions.append(_exception_text(details))

    def _on_log(self, params: JsonObject) -> None:
        entry = params.get("entry", {})
        text = str(entry.get("text", ""))
        if entry.get("url"):
            text += f" ({entry['url']})"
        self.console.append(ConsoleEntry(str(entry.get("source", "other")),
                                         str(entry.get("level", "info")), text))

    def _on_trace_data(self, params: JsonObject) -> None:
        if self._trace is not None:
            self._trace.extend(params.get("value", []))

    def _on_dialog(self, params: JsonObject) -> None:
        self.dialogs.append(Dialog(str(params.get("type", "")), str(params.get("message", "")),
                                   str(params.get("url", ""))))

    def _on_navigated(self, params: JsonObject) -> None:
        frame = params.get("frame", {})
        if not frame.get("parentId"):
            self.navigations.append(str(frame.get("url", "")))

    # ------------------------------------------------------------------ page API

    async def navigate(self, url: str, timeout: float = 30.0) -> None:
        """Load `url` in the page and wait for its ``load`` event."""
        loaded = self._expect("Page.loadEventFired")
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigating to {url} failed: {result['errorText']}")
        try:
            await asyncio.wait_for(loaded, timeout)
        except TimeoutError:
            raise CDPError(f"{url} did not finish loading within {timeout}s") from None

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited), as JSON-like Python data."""
        result = await self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True,
        })
        if "exceptionDetails" in result:
            raise JavaScriptError(f"{_exception_text(result['exceptionDetails'])}\n"
                                  f"in: {expression}")
        value = result.get("result", {})
        return value.get("value")

    async def wait_for(
        self, predicate: str, timeout: float = 10.0, what: str | None = None,
        interval: float = 0.1,
    ) -> Any:
        """Poll a JavaScript expression until it is truthy, and return its value.

        An expression that throws counts as "not yet" (the element may not exist yet);
        after `timeout` seconds an AssertionError names `what` and the last outcome.
        """
        return await poll(
            lambda: self.evaluate(predicate), timeout=timeout, what=what or predicate,
            interval=interval, retry_on=(JavaScriptError,),
        )

    async def screenshot(self, path: Path | str) -> Path:
        """Save a PNG of the viewport to `path` (parent folders are created)."""
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(result["data"]))
        return target

    async def start_trace(self) -> None:
        """Record a DevTools timeline trace until :meth:`stop_trace`."""
        self._trace = []
        await self.send("Tracing.start", {
            "categories": TRACE_CATEGORIES, "transferMode": "ReportEvents",
        })

    async def stop_trace(self) -> list[MainThreadTask]:
        """End the trace; the tasks the page's main thread ran meanwhile."""
        complete = self._expect("Tracing.tracingComplete")
        await self.send("Tracing.end")
        try:
            await asyncio.wait_for(complete, self.command_timeout)
        except TimeoutError:
            raise CDPError(f"the trace did not complete within {self.command_timeout}s") from None
        events, self._trace = self._trace or [], None
        return main_thread_tasks(events)

    # ------------------------------------------------------------------ what went wrong

    def problems(self, *, allow_sources: frozenset[str] = frozenset()) -> list[str]:
        """Exceptions, dialogs and error-level console/log entries, as readable lines.

        `allow_sources` names log sources whose errors are expected (e.g. ``{"network"}``
        while the server is deliberately down).
        """
        lines = [f"exception: {text}" for text in self.exceptions]
        lines += [f"dialog: {d.type} {d.message!r} ({d.url})" for d in self.dialogs]
        lines += [
            f"{entry.source} {entry.level}: {entry.text}"
            for entry in self.console
            if entry.is_error and entry.source not in allow_sources
        ]
        return lines


def _describe(remote: JsonObject) -> str:
    """A Runtime.RemoteObject as text, the way the console would show it."""
    if "value" in remote:
        value = remote["value"]
        return value if isinstance(value, str) else json.dumps(value)
    return str(remote.get("unserializableValue") or remote.get("description")
               or remote.get("type", "?"))


def _exception_text(details: JsonObject) -> str:
    exception = details.get("exception", {})
    text = exception.get("description") or details.get("text", "exception")
    where = details.get("url", "")
    if where:
        text += f" at {where}:{details.get('lineNumber', 0) + 1}"
    return str(text)
