"""The live dashboard in a real headless Chromium, against the real services (SPEC §5).

The browser is Debian's Chromium under Playwright (fixtures ``page`` and ``page_log`` in
conftest.py, helpers in ``tests/e2e/browser.py``); every wait has a deadline: Playwright's
``expect`` on an element, or a JavaScript predicate awaited in the page. Each test also
checks that the page raised no exception, logged no error and opened no dialog, and that
it was never reloaded: whatever the page shows arrived over its WebSocket (or its polling
fallback).

These networks are small, so the page shows cards; ``test_dashboard_scale.py`` drives the
table, the filters and 10,000 CPs (and refreshes ``docs/dashboard.png``).
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from playwright.async_api import Page, expect

from evcharging.common.kafka import Topic
from evcharging.common.messages import DriverRequest, DriverStatus, new_id
from tests.e2e.browser import PageLog, wait_for_js
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

RECORD_MODES_JS = """(() => {
  window.__marker = 1;
  window.__modes = [document.getElementById("conn").dataset.mode];
  new MutationObserver(() => window.__modes.push(document.getElementById("conn").dataset.mode))
    .observe(document.getElementById("conn"), {attributes: true, attributeFilter: ["data-mode"]});
  return true;
})()"""


def card_selector(cp_id: str, inner: str = "") -> str:
    """CSS: the card of `cp_id`, or the element `inner` of it."""
    return f'#grid > [data-cp-id="{cp_id}"] {inner}'.strip()


def card_js(cp_id: str, inner: str = "") -> str:
    """JavaScript: the card of `cp_id`, or the element `inner` of it (null when absent)."""
    return f"document.querySelector({json.dumps(card_selector(cp_id, inner))})"


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


async def open_dashboard(page: Page, system: System, cp_id: str | None = None) -> None:
    """Load the page, wait for its WebSocket (and the card of `cp_id`), start recording."""
    await page.goto(dashboard_url(system))
    await expect(page.locator("#conn")).to_have_attribute("data-mode", "ws", timeout=15_000)
    if cp_id is not None:
        await expect(page.locator(card_selector(cp_id, ".cp-state"))).to_have_text(
            "ACTIVATED", timeout=15_000
        )
    assert await page.evaluate(RECORD_MODES_JS) is True


async def assert_same_page(page: Page, page_log: PageLog, system: System) -> None:
    """The page loaded once and was never reloaded since :func:`open_dashboard`."""
    assert await page.evaluate("window.__marker") == 1, "the page was reloaded"
    assert page_log.navigations == [dashboard_url(system)], page_log.navigations


async def test_live_session_without_reload(
    system: System, driver_probe: DriverProbe, page: Page, page_log: PageLog, tmp_path: Path
) -> None:
    system.engine_env.update(FAST_CHARGER)
    await system.start_central()
    await system.start_cp(CP_ID)
    await open_dashboard(page, system, CP_ID)

    request_id = await driver_probe.request(CP_ID)
    await expect(page.locator(card_selector(CP_ID, ".cp-state"))).to_have_text(
        "SUPPLYING", timeout=20_000
    )

    shown = [await page.evaluate(metrics_js(CP_ID))]
    screenshot = tmp_path / "dashboard-supplying.png"
    for n in range(3):
        before = shown[-1]
        shown.append(await wait_for_js(
            page, f"""(() => {{
  const m = {metrics_js(CP_ID)};
  return m && m.state === "SUPPLYING" && m.kwh !== {json.dumps(before["kwh"])}
    && m.euros !== {json.dumps(before["euros"])} ? m : null;
}})()""",
            5, f"new kWh and € on the card after {before}",
        ))
        if n == 1:
            await page.screenshot(path=screenshot)
    samples = [Metrics.parse(m) for m in shown[1:]]  # the first may predate any telemetry
    assert all(m.kw > 0 for m in samples), shown
    assert all(a.kwh < b.kwh for a, b in pairwise(samples)), shown
    assert all(a.euros < b.euros for a, b in pairwise(samples)), shown
    assert {m["driver"] for m in shown} == {driver_probe.driver_id}, shown

    final = await driver_probe.final(request_id, timeout=20)
    assert final.status is DriverStatus.COMPLETED, driver_probe.updates[request_id]
    completed = f'#feed li.feed-item[data-kind="COMPLETED"][data-cp-id="{CP_ID}"]'
    item = await wait_for_js(
        page, f"""(() => {{
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

    await assert_same_page(page, page_log, system)
    assert await page.evaluate("window.__modes") == ["ws"], "the WebSocket dropped"
    assert page_log.problems() == []


async def test_user_text_is_shown_as_text(
    system: System, page: Page, page_log: PageLog
) -> None:
    await system.start_central()
    await open_dashboard(page, system)
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

    async def text_shown() -> None:
        """The card and the feed show the payloads as text."""
        await expect(page.locator(card_selector(cp_id, ".cp-location"))).to_have_text(
            LOCATION_XSS, timeout=15_000
        )
        await expect(page.locator(card_selector(cp_id, ".cp-reason"))).to_contain_text(
            REASON_XSS, timeout=15_000
        )
        await expect(page.locator(fault_item)).to_have_text(REASON_XSS, timeout=15_000)

    await text_shown()  # live
    await assert_inert(page, page_log)

    # A freshly loaded page renders the same text from the WebSocket's first snapshot.
    await page.goto(dashboard_url(system))
    await text_shown()
    await assert_inert(page, page_log)

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
    assert DRIVER_XSS not in await page.evaluate("document.body.textContent")
    await assert_inert(page, page_log)
    assert page_log.problems() == []


async def invalid_driver_requests(system: System) -> int:
    health = (await system.http.get("/health")).json()
    return int(health["kafka"]["invalid_by_topic"].get(Topic.DRIVER_REQUESTS.value, 0))


async def assert_inert(page: Page, page_log: PageLog) -> None:
    """No element was made from the payloads and no dialog opened."""
    found = await page.evaluate("""({
  img: document.querySelectorAll('img[src="x"]').length,
  injected: document.querySelectorAll(
    "#grid b, #grid script, #grid img, #feed b, #feed script, #feed img").length,
  scripts: [...document.scripts].map((s) => s.getAttribute("src")),
})""")
    assert found == {"img": 0, "injected": 0, "scripts": ["/static/dashboard.js"]}, found
    assert page_log.dialogs == []


async def test_reconnects_after_central_restarts(
    system: System, page: Page, page_log: PageLog
) -> None:
    central = await system.start_central()
    await system.start_cp(CP_ID)
    await open_dashboard(page, system, CP_ID)
    conn = page.locator("#conn")

    central.signal(signal.SIGKILL)
    await central.wait_exit()
    # The page notices Central is gone.
    await expect(conn).not_to_have_attribute("data-mode", "ws", timeout=10_000)
    assert await page.locator(card_selector(CP_ID)).count() == 1, "the card vanished"

    await system.start_central()
    # The WebSocket back and the card ACTIVATED.
    await expect(conn).to_have_attribute("data-mode", "ws", timeout=30_000)
    await expect(page.locator(card_selector(CP_ID, ".cp-state"))).to_have_text(
        "ACTIVATED", timeout=30_000
    )
    # Live events flow over the new socket, not only its first snapshot.
    response = await system.http.post(
        "/cp/register", json={"cp_id": CP_ID, "location": "back after the restart"}
    )
    assert response.status_code == 200, response.text
    # A live update after the reconnection.
    await expect(page.locator(card_selector(CP_ID, ".cp-location"))).to_have_text(
        "back after the restart", timeout=10_000
    )
    await assert_same_page(page, page_log, system)
    modes = await page.evaluate("window.__modes")
    assert modes[0] == "ws" and modes[-1] == "ws" and len(modes) >= 3, modes
    # While Central was down the browser logged its refused connections: expected.
    assert page_log.problems(allow_sources=frozenset({"network"})) == []
