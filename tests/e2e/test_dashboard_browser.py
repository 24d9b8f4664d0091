"""The live dashboard in a real headless Chromium, against the real services (SPEC §5).

The browser is driven over the DevTools Protocol (``tests/e2e/cdp.py``); every wait is a
JavaScript predicate polled in the page with a deadline. Each test also checks that the
page raised no exception, logged no error and opened no dialog, and that it was never
reloaded: whatever the page shows arrived over its WebSocket (or its polling fallback).

These networks are small, so the page shows cards; ``test_dashboard_scale.py`` drives the
table, the filters and 10,000 CPs (and refreshes ``docs/dashboard.png``).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from evcharging.common.kafka import Topic
from evcharging.common.messages import DriverRequest, DriverStatus, new_id
from tests.e2e.cdp import Browser
from tests.e2e.conftest import DriverProbe, System, eventually

pytestmark = pytest.mark.e2e

CP_ID = "CP-001"

# A fast charger: at 150 kW and 0.59 €/kWh, each 0.5 s telemetry adds about 0.021 kWh
# and 0.012 €, so both shown values (3 and 2 decimals) change with every message.
FAST_CHARGER = {
    "CP_ENGINE_SESSION_SECONDS": "6",
    "CP_ENGINE_KW_RATE": "150",
    "CP_ENGINE_EURO_RATE": "0.59",
}

# Payloads that would run script if the page turned text into markup. The page's CSP
# blocks inline handlers anyway, so "not injected" is checked on the DOM itself.
LOCATION_XSS = "<img src=x onerror=alert(1)>"
REASON_XSS = "<script>alert(2)</script><b>bold</b>"
DRIVER_XSS = "<img src=x onerror=alert(3)>"

MODE_JS = 'document.getElementById("conn").dataset.mode'

RECORD_MODES_JS = """(() => {
  window.__marker = 1;
  window.__modes = [document.getElementById("conn").dataset.mode];
  new MutationObserver(() => window.__modes.push(document.getElementById("conn").dataset.mode))
    .observe(document.getElementById("conn"), {attributes: true, attributeFilter: ["data-mode"]});
  return true;
})()"""


def card_js(cp_id: str, inner: str = "") -> str:
    """JavaScript: the card of `cp_id`, or the element `inner` of it (null when absent)."""
    selector = f'#grid > [data-cp-id="{cp_id}"] {inner}'.strip()
    return f"document.querySelector({json.dumps(selector)})"


def card_text_js(cp_id: str, inner: str) -> str:
    return f"{card_js(cp_id, inner)}?.textContent"


def metrics_js(cp_id: str) -> str:
    """JavaScript: the state and the shown metrics of a card, as an object."""
    return f"""(() => {{
  const card = {card_js(cp_id)};
  if (!card) return null;
  const text = (selector) => card.querySelector(selector).textContent;
  return {{state: text(".cp-state"), kw: text(".cp-kw"), kwh: text(".cp-kwh"),
           euros: text(".cp-euros"), driver: text(".cp-driver")}};
}})()"""


@dataclass(frozen=True)
class Metrics:
    """The numbers on a card, parsed from their text ("150.0 kW", "0.042 kWh", "0.02 €")."""

    kw: float
    kwh: float
    euros: float

    @classmethod
    def parse(cls, shown: dict[str, Any]) -> Metrics:
        return cls(
            kw=_number(shown["kw"], "kW"),
            kwh=_number(shown["kwh"], "kWh"),
            euros=_number(shown["euros"], "€"),
        )


def _number(text: str, unit: str) -> float:
    value, _, shown_unit = text.strip().partition(" ")
    assert shown_unit == unit, f"{text!r} should end with the unit {unit!r}"
    return float(value)


def dashboard_url(system: System) -> str:
    return f"http://127.0.0.1:{system.http_port}/"


@pytest.fixture
async def browser(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Browser]:
    """A headless Chromium; when the test fails, a screenshot and what the page reported."""
    async with Browser() as chromium:
        try:
            yield chromium
        finally:
            report = getattr(request.node, "rep_call", None)
            if report is not None and report.failed:
                with contextlib.suppress(Exception):
                    shot = await chromium.screenshot(tmp_path / "failure.png")
                    sys.stderr.write(f"screenshot of the failing page: {shot}\n")
                sys.stderr.write(
                    f"===== browser\nnavigations: {chromium.navigations}\n"
                    f"problems: {chromium.problems()}\nconsole: {chromium.console}\n"
                    f"{chromium.log_tail()}\n"
                )


async def open_dashboard(browser: Browser, system: System, cp_id: str | None = None) -> None:
    """Load the page, wait for its WebSocket (and the card of `cp_id`), start recording."""
    await browser.navigate(dashboard_url(system))
    await browser.wait_for(f'{MODE_JS} === "ws"', 15, "the dashboard's WebSocket")
    if cp_id is not None:
        await browser.wait_for(
            f'{card_text_js(cp_id, ".cp-state")} === "ACTIVATED"', 15, f"{cp_id} ACTIVATED"
        )
    assert await browser.evaluate(RECORD_MODES_JS) is True


async def assert_same_page(browser: Browser, system: System) -> None:
    """The page loaded once and was never reloaded since :func:`open_dashboard`."""
    assert await browser.evaluate("window.__marker") == 1, "the page was reloaded"
    assert browser.navigations == [dashboard_url(system)], browser.navigations


async def test_live_session_without_reload(
    system: System, driver_probe: DriverProbe, browser: Browser, tmp_path: Path
) -> None:
    system.engine_env.update(FAST_CHARGER)
    await system.start_central()
    await system.start_cp(CP_ID)
    await open_dashboard(browser, system, CP_ID)

    request_id = await driver_probe.request(CP_ID)
    await browser.wait_for(
        f'{card_text_js(CP_ID, ".cp-state")} === "SUPPLYING"', 20, f"{CP_ID} SUPPLYING"
    )

    shown = [await browser.evaluate(metrics_js(CP_ID))]
    screenshot = tmp_path / "dashboard-supplying.png"
    for n in range(3):
        before = shown[-1]
        shown.append(await browser.wait_for(
            f"""(() => {{
  const m = {metrics_js(CP_ID)};
  return m && m.state === "SUPPLYING" && m.kwh !== {json.dumps(before["kwh"])}
    && m.euros !== {json.dumps(before["euros"])} ? m : null;
}})()""",
            5, f"new kWh and € on the card after {before}",
        ))
        if n == 1:
            await browser.screenshot(screenshot)
    samples = [Metrics.parse(m) for m in shown[1:]]  # the first may predate any telemetry
    assert all(m.kw > 0 for m in samples), shown
    assert all(a.kwh < b.kwh for a, b in pairwise(samples)), shown
    assert all(a.euros < b.euros for a, b in pairwise(samples)), shown
    assert {m["driver"] for m in shown} == {driver_probe.driver_id}, shown

    final = await driver_probe.final(request_id, timeout=20)
    assert final.status is DriverStatus.COMPLETED, driver_probe.updates[request_id]
    completed = f'#feed li.feed-item[data-kind="COMPLETED"][data-cp-id="{CP_ID}"]'
    item = await browser.wait_for(
        f"""(() => {{
  const state = {card_text_js(CP_ID, ".cp-state")};
  const li = document.querySelector({json.dumps(completed)});
  return state === "ACTIVATED" && li ? {{
    driver: li.querySelector(".feed-driver").textContent,
    totals: li.querySelector(".feed-totals").textContent,
  }} : null;
}})()""",
        15, f"{CP_ID} ACTIVATED again and a completed session in the feed",
    )
    assert item["driver"] == driver_probe.driver_id
    kwh_text, _, euros_text = item["totals"].partition(" · ")
    assert _number(kwh_text, "kWh") == pytest.approx(final.kwh, abs=0.0011)
    assert _number(euros_text, "€") == pytest.approx(final.euros, abs=0.011)
    assert samples[-1].kwh <= _number(kwh_text, "kWh")

    await assert_same_page(browser, system)
    assert await browser.evaluate("window.__modes") == ["ws"], "the WebSocket dropped"
    assert browser.problems() == []


async def test_user_text_is_shown_as_text(system: System, browser: Browser) -> None:
    await system.start_central()
    await open_dashboard(browser, system)
    cp_id = "CP-XSS"

    response = await system.http.post(
        "/cp/register", json={"cp_id": cp_id, "location": LOCATION_XSS}
    )
    assert response.status_code == 200, response.text
    response = await system.http.post(
        "/cp/fault", json={"cp_id": cp_id, "is_faulty": True, "reason": REASON_XSS}
    )
    assert response.status_code == 200, response.text

    fault_item = f'#feed li.feed-item[data-kind="fault"][data-cp-id="{cp_id}"] .feed-reason'
    shown_js = f"""(() => {{
  const location = {card_text_js(cp_id, ".cp-location")};
  const reason = {card_text_js(cp_id, ".cp-reason")};
  const feed = document.querySelector({json.dumps(fault_item)})?.textContent;
  return location === {json.dumps(LOCATION_XSS)} && reason?.includes({json.dumps(REASON_XSS)})
    && feed === {json.dumps(REASON_XSS)} ? {{location, reason, feed}} : null;
}})()"""
    await browser.wait_for(shown_js, 15, "the card and the feed to show the text (live)")
    await assert_inert(browser)

    # A freshly loaded page renders the same text from the WebSocket's first snapshot.
    await browser.navigate(dashboard_url(system))
    await browser.wait_for(shown_js, 15, "the card and the feed to show the text (snapshot)")
    await assert_inert(browser)

    # Ids cannot carry markup: a driver request with one is refused by the bus validation.
    invalid_before = await invalid_driver_requests(system)
    bad = DriverRequest(request_id=new_id(), driver_id="driver-x", cp_id=cp_id)
    raw = {**bad.model_dump(mode="json"), "driver_id": DRIVER_XSS}
    producer = AIOKafkaProducer(bootstrap_servers=system.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            system.prefix + Topic.DRIVER_REQUESTS.value, json.dumps(raw).encode(),
            key=cp_id.encode(),
        )
    finally:
        await producer.stop()

    async def counted() -> bool:
        return await invalid_driver_requests(system) > invalid_before

    await eventually(counted, 20, "Central to reject the request with an HTML driver id")
    assert DRIVER_XSS not in await browser.evaluate("document.body.textContent")
    await assert_inert(browser)
    assert browser.problems() == []


async def invalid_driver_requests(system: System) -> int:
    health = (await system.http.get("/health")).json()
    return int(health["kafka"]["invalid_by_topic"].get(Topic.DRIVER_REQUESTS.value, 0))


async def assert_inert(browser: Browser) -> None:
    """No element was made from the payloads and no dialog opened."""
    found = await browser.evaluate("""({
  img: document.querySelectorAll('img[src="x"]').length,
  injected: document.querySelectorAll(
    "#grid b, #grid script, #grid img, #feed b, #feed script, #feed img").length,
  scripts: [...document.scripts].map((s) => s.getAttribute("src")),
})""")
    assert found == {"img": 0, "injected": 0, "scripts": ["/static/dashboard.js"]}, found
    assert browser.dialogs == []


async def test_reconnects_after_central_restarts(system: System, browser: Browser) -> None:
    central = await system.start_central()
    await system.start_cp(CP_ID)
    await open_dashboard(browser, system, CP_ID)

    central.signal(signal.SIGKILL)
    await central.wait_exit()
    await browser.wait_for(f'{MODE_JS} !== "ws"', 10, "the page to notice Central is gone")
    assert await browser.evaluate(f"{card_js(CP_ID)} !== null"), "the card vanished"

    await system.start_central()
    await browser.wait_for(
        f'{MODE_JS} === "ws" && {card_text_js(CP_ID, ".cp-state")} === "ACTIVATED"',
        30, "the WebSocket back and the card ACTIVATED",
    )
    # Live events flow over the new socket, not only its first snapshot.
    response = await system.http.post(
        "/cp/register", json={"cp_id": CP_ID, "location": "back after the restart"}
    )
    assert response.status_code == 200, response.text
    await browser.wait_for(
        f'{card_text_js(CP_ID, ".cp-location")} === "back after the restart"', 10,
        "a live update after the reconnection",
    )
    await assert_same_page(browser, system)
    modes = await browser.evaluate("window.__modes")
    assert modes[0] == "ws" and modes[-1] == "ws" and len(modes) >= 3, modes
    # While Central was down the browser logged its refused connections: expected.
    assert browser.problems(allow_sources=frozenset({"network"})) == []
