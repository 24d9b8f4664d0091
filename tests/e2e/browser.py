"""Headless Chromium for the browser tests, driven by Playwright.

Playwright drives the system's Chromium (``executable_path``): it never downloads a
browser of its own. The binary is ``$EVCHARGING_CHROMIUM``, else ``chromium`` or
``chromium-browser`` on ``PATH``; a missing browser raises :class:`BrowserNotFound`
(``scripts/ensure_chromium.sh`` installs it), so the tests fail instead of being skipped.

What Playwright leaves to the tests lives here: :class:`PageLog`, a record of everything
that went wrong on a page (uncaught exceptions, console errors, browser log errors with
their source, JavaScript dialogs: a dialog is recorded and dismissed at once, so an
injected ``alert()`` never blocks the page and never goes unnoticed) and of its
navigations; :func:`wait_for_js`, a JavaScript predicate awaited with a deadline; and
:func:`start_trace` / :func:`stop_trace`, the page's main-thread tasks from a DevTools
timeline trace. The fixtures (``chromium``, ``page``, ``page_log``) are in conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

from playwright.async_api import Browser, ConsoleMessage, Frame, Page, Playwright, ViewportSize
from playwright.async_api import Dialog as PlaywrightDialog
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

CHROMIUM_ENV = "EVCHARGING_CHROMIUM"
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic"]
VIEWPORT: ViewportSize = {"width": 1400, "height": 1000}
TRACE_CATEGORIES = ["devtools.timeline", "disabled-by-default-devtools.timeline"]

JsonObject = dict[str, Any]


class BrowserNotFound(RuntimeError):
    """No Chromium binary: install one (``scripts/ensure_chromium.sh``)."""


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


async def launch_chromium(playwright: Playwright) -> Browser:
    """The system's headless Chromium (never a browser downloaded by Playwright)."""
    return await playwright.chromium.launch(
        executable_path=find_chromium(), headless=True, args=CHROMIUM_ARGS
    )


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
class ShownDialog:
    """A JavaScript dialog (alert, confirm, prompt, beforeunload) the page opened."""

    type: str
    message: str
    url: str


class PageLog:
    """What went wrong on one page, and the documents its main frame committed."""

    def __init__(self) -> None:
        self.exceptions: list[str] = []
        """Uncaught exceptions and unhandled rejections of the page."""
        self.console: list[ConsoleEntry] = []
        self.dialogs: list[ShownDialog] = []
        self.navigations: list[str] = []
        """URL of every document committed in the main frame (a reload adds one)."""

    async def attach(self, page: Page) -> None:
        """Record `page` from now on (before it loads anything)."""
        page.on("pageerror", self._on_error)
        page.on("console", self._on_console)
        page.on("dialog", self._on_dialog)
        page.on("framenavigated", self._on_navigated)
        # Playwright reports the browser's own log entries as console messages without
        # their source; the Log domain has it ("network" while a server is down, ...).
        session = await page.context.new_cdp_session(page)
        session.on("Log.entryAdded", self._on_log)
        await session.send("Log.enable")

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

    def report(self) -> str:
        """Everything recorded, for a failing test's output."""
        return (
            f"===== browser\nnavigations: {self.navigations}\n"
            f"problems: {self.problems()}\nconsole: {self.console}\n"
        )

    def _on_error(self, error: PlaywrightError) -> None:
        self.exceptions.append(error.stack or f"{error.name}: {error.message}")

    def _on_console(self, message: ConsoleMessage) -> None:
        # Log entries come without arguments: _on_log records them, with their source.
        if message.args:
            self.console.append(ConsoleEntry("console", message.type, message.text))

    def _on_log(self, params: JsonObject) -> None:
        entry = params.get("entry", {})
        text = str(entry.get("text", ""))
        if entry.get("url"):
            text += f" ({entry['url']})"
        self.console.append(ConsoleEntry(str(entry.get("source", "other")),
                                         str(entry.get("level", "info")), text))

    async def _on_dialog(self, dialog: PlaywrightDialog) -> None:
        url = dialog.page.url if dialog.page is not None else ""
        self.dialogs.append(ShownDialog(dialog.type, dialog.message, url))
        try:
            await dialog.dismiss()
        except PlaywrightError as exc:
            self.exceptions.append(f"could not dismiss a dialog: {exc}")

    def _on_navigated(self, frame: Frame) -> None:
        if frame.parent_frame is None:
            self.navigations.append(frame.url)


async def wait_for_js(page: Page, predicate: str, timeout: float, what: str) -> Any:
    """Wait until a JavaScript expression is truthy in `page`, and return its value.

    The expression is evaluated every 100 ms; one that throws counts as "not yet" (the
    element may not exist yet). After `timeout` seconds an AssertionError names `what`
    and the last value.
    """
    guarded = f"() => {{ try {{ return ({predicate}); }} catch (e) {{ return null; }} }}"
    try:
        handle = await page.wait_for_function(guarded, timeout=timeout * 1000, polling=100)
    except PlaywrightTimeoutError:
        try:
            last: Any = await page.evaluate(predicate)
        except PlaywrightError as exc:
            last = exc
        raise AssertionError(
            f"timed out after {timeout:g}s waiting for {what}; last: {last!r}"
        ) from None
    try:
        return await handle.json_value()
    finally:
        await handle.dispose()


@dataclass(frozen=True)
class MainThreadTask:
    """One task the page's main thread ran, from a trace: wall-clock and CPU milliseconds.

    Wall-clock time includes the time the operating system gave other processes; CPU time
    is the page's own work.
    """

    wall_ms: float
    cpu_ms: float


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


def _browser(page: Page) -> Browser:
    browser = page.context.browser
    if browser is None:  # pragma: no cover - only a persistent context has none
        raise RuntimeError("the page's context has no browser to trace")
    return browser


async def start_trace(page: Page) -> None:
    """Record a DevTools timeline trace of `page` until :func:`stop_trace`."""
    await _browser(page).start_tracing(page=page, categories=TRACE_CATEGORIES)


async def stop_trace(page: Page) -> list[MainThreadTask]:
    """End the trace; the tasks the page's main thread ran meanwhile."""
    trace = json.loads(await _browser(page).stop_tracing())
    events: list[JsonObject] = trace["traceEvents"] if isinstance(trace, dict) else trace
    return main_thread_tasks(events)
