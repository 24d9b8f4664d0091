"""The dashboard at scale, in a real headless Chromium (SPEC §5, issue 10).

No Kafka and no CP processes: :mod:`tests.e2e.netsim` serves the real Central app over a
controller whose registry holds simulated CPs, and changes them at a given rate through
the controller's hub, as the controller publishes its changes. The browser is Debian's
Chromium under Playwright (fixtures ``page`` and ``page_log`` in conftest.py, helpers in
:mod:`tests.e2e.browser`); every wait has a deadline: Playwright's ``expect`` on an
element, a JavaScript predicate awaited in the page, or the simulation's own count of
changes.

Set ``EVCHARGING_SCREENSHOT=docs/dashboard.png`` to refresh the documentation picture
with the screenshot of :func:`test_filters_search_and_paging` (a 200-CP network, taken
after a minute and a half of power history).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect

from evcharging.common.messages import CPState
from tests.e2e.browser import PageLog, start_trace, stop_trace, wait_for_js
from tests.e2e.netsim import SimulatedNetwork, churning, simulated_network
from tests.polling import poll

pytestmark = pytest.mark.e2e

SCREENSHOT_ENV = "EVCHARGING_SCREENSHOT"
CHART_FILL = 90
"""Seconds of power history the documentation picture shows."""
CHURN = 100
"""CP changes per second in the 200-CP network while its picture is taken."""
FRAME_BUDGET_MS = 100.0
MEASURE_CHANGES = 10_000
"""CP changes the frame measurement spans (5 s at 2,000 changes per second)."""

PAGE_INFO_JS = 'document.getElementById("page-info").textContent'
ROWS_JS = """[...document.querySelectorAll("#cp-rows > tr")].map((r) => ({
  id: r.dataset.cpId, state: r.dataset.state, leaving: r.classList.contains("is-leaving"),
  site: r.querySelector(".t-site").textContent,
}))"""
CARDS_JS = '[...document.querySelectorAll("#grid > .card")].map((c) => c.dataset.cpId)'

# Long frames: every long task (over 50 ms) the page runs, the longest gap between two
# animation frames, and how many changes the list's DOM went through meanwhile.
MEASURE_JS = """(() => {
  const m = window.__measure = { worstGap: 0, longTasks: [], frames: 0, mutations: 0 };
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) m.longTasks.push(entry.duration);
  }).observe({ type: "longtask" });
  let last = performance.now();
  const frame = (t) => {
    m.worstGap = Math.max(m.worstGap, t - last);
    last = t;
    m.frames += 1;
    requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
  new MutationObserver((records) => { m.mutations += records.length; }).observe(
    document.getElementById("list-wrap"),
    { subtree: true, childList: true, characterData: true, attributes: true });
  return true;
})()"""


async def open_dashboard(page: Page, network: SimulatedNetwork) -> None:
    """Load the page; wait for its WebSocket and the first page of CPs."""
    await page.goto(network.url)
    await expect(page.locator("#conn")).to_have_attribute("data-mode", "ws", timeout=15_000)
    await expect(page.locator("#cp-rows > tr, #grid > .card").first).to_be_attached(
        timeout=15_000
    )


async def rows(page: Page) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = await page.evaluate(ROWS_JS)
    return found


def js_rows_all(condition: str) -> str:
    """JavaScript: the rows (not leaving the page) when there are some and all meet
    `condition` (an expression of ``r``), else null."""
    return f"""(() => {{
  const rows = {ROWS_JS}.filter((r) => !r.leaving);
  return rows.length > 0 && rows.every((r) => {condition}) ? rows : null;
}})()"""


async def choose(page: Page, select_id: str, value: str) -> None:
    """Pick the option `value` of a select, as the operator does."""
    chosen = await page.locator(f"#{select_id}").select_option(value)
    assert chosen == [value], f"{select_id} has no option {value!r}: {chosen}"


def page_info_text(total: int, size: int, offset: int = 0) -> str:
    """What the pager says for that page: "first–last of total"."""
    last = min(offset + size, total)
    return f"{offset + 1}–{last} of {total:,}" if total else "0 of 0"


async def expect_page_info(
    page: Page, total: int, size: int, offset: int = 0, timeout: float = 10
) -> None:
    await expect(page.locator("#page-info")).to_have_text(
        page_info_text(total, size, offset), timeout=timeout * 1000
    )


async def page_info(page: Page) -> str | None:
    return await page.locator("#page-info").text_content()


def page_info_is(total: int, size: int, offset: int = 0) -> str:
    """JavaScript: whether the pager says "first–last of total" for that page."""
    return f"{PAGE_INFO_JS} === {json.dumps(page_info_text(total, size, offset))}"


async def summary(network: SimulatedNetwork) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=network.url, timeout=5) as http:
        response = await http.get("/summary")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --------------------------------------------------------------------------- 10,000 CPs


async def test_ten_thousand_cps_stay_responsive(
    page: Page, page_log: PageLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pager = page.locator("#page-info")
    async with simulated_network(10_000, 8) as network, churning(network, 2000):
        await open_dashboard(page, network)
        await expect(pager).to_have_text(re.compile(r" of 10,000$"), timeout=10_000)
        shown = await page.evaluate("""({
  view: document.getElementById("list-wrap").dataset.view,
  cps: document.getElementById("stat-cps").textContent,
  rows: document.querySelectorAll("#cp-rows > tr").length,
  cards: document.querySelectorAll("#grid > .card").length,
  nodes: document.getElementsByTagName("*").length,
})""")
        assert shown["view"] == "table" and shown["cards"] == 0, shown
        assert shown["cps"] == "10,000", shown
        assert 10 <= shown["rows"] <= 100, shown  # one page of rows, not 10,000
        assert shown["nodes"] < 3000, shown

        assert await page.evaluate(MEASURE_JS) is True
        await start_trace(page)
        start = network.changes

        # The operator works meanwhile: filter, search, clear, page, switch views.
        await page.locator('#state-tiles [data-state="SUPPLYING"]').click()
        await wait_for_js(page, js_rows_all('r.state === "SUPPLYING"'), 10, "SUPPLYING rows")
        await page.locator("#filter-search").fill("CP-01")
        await wait_for_js(
            page, js_rows_all('r.state === "SUPPLYING" && r.id.startsWith("CP-01")'), 10,
            "SUPPLYING rows of CP-01…",
        )
        await page.locator("#filter-clear").click()
        # The whole list again.
        await expect(pager).to_have_text(re.compile(r"^1–.* of 10,000$"), timeout=10_000)
        size = len(await rows(page))
        await page.locator("#page-next").click()
        await expect(page.locator("#cp-rows > tr").first).to_have_attribute(
            "data-cp-id", f"CP-{size:05d}", timeout=10_000
        )  # the second page
        await page.locator('.seg-btn[data-view="cards"]').click()
        await expect(page.locator("#grid > .card")).to_have_count(50, timeout=10_000)
        await page.locator('.seg-btn[data-view="table"]').click()
        await expect(page.locator("#cp-rows > tr")).to_have_count(size, timeout=10_000)

        await poll(
            lambda: network.changes - start >= MEASURE_CHANGES, timeout=30,
            what=f"{MEASURE_CHANGES} CP changes pushed through the hub", interval=0.1,
        )
        measured = await page.evaluate("window.__measure")
        changes = network.changes - start
        tasks = await stop_trace(page)
        await page.screenshot(path=tmp_path / "dashboard-10000.png")
        assert page_log.problems() == []  # before Central stops under the page

    worst_task = max(measured["longTasks"], default=0.0)
    busiest = max(tasks, key=lambda task: task.cpu_ms)
    load = os.getloadavg()[0]
    report = (
        f"10,000 CPs, {changes} changes: worst frame {measured['worstGap']:.1f} ms "
        f"(requestAnimationFrame gap), longest task {worst_task:.1f} ms, "
        f"{len(measured['longTasks'])} long task(s), {measured['frames']} frames, "
        f"{measured['mutations']} DOM mutations; the busiest of {len(tasks)} main-thread "
        f"tasks used {busiest.cpu_ms:.1f} ms of CPU ({busiest.wall_ms:.1f} ms wall); "
        f"load average {load:.1f} on {os.cpu_count()} CPUs; screenshot {tmp_path}"
    )
    with capsys.disabled():
        sys.stdout.write(f"\n{report}\n")
    assert measured["mutations"] > 0, "the page did not change while it was measured"
    assert len(tasks) > 100, "the trace recorded no main-thread tasks"
    # The page's own work, whatever else runs on the machine. The frames as the operator
    # sees them (wall clock, `worst`) are printed above, not asserted: a machine shared
    # with other processes stretches them beyond the page's own work, and a speed goal
    # measured by the wall clock belongs in a benchmark, not in a test.
    assert busiest.cpu_ms <= FRAME_BUDGET_MS, f"{report}\n{measured}"


# --------------------------------------------------------------------------- filters


async def test_filters_search_and_paging(
    page: Page, page_log: PageLog, tmp_path: Path
) -> None:
    async with simulated_network(200, 8) as network:
        await open_dashboard(page, network)
        expected = await summary(network)
        tiles = await page.evaluate("""Object.fromEntries(
  [...document.querySelectorAll("#state-tiles [data-state]")].map(
    (t) => [t.dataset.state, t.querySelector(".tile-value").textContent]))""")
        assert tiles == {state: str(n) for state, n in expected["by_state"].items()}
        sites = await page.evaluate(
            '[...document.querySelectorAll("#site-tiles .site-tile")].map((t) => ['
            't.dataset.site, t.querySelector(".site-cps").textContent])'
        )
        assert sites == [[s["site"], f"{s['cps']} CPs"] for s in expected["by_site"]]
        assert await page.evaluate('document.getElementById("list-wrap").dataset.view') \
            == "table"
        size = len(await rows(page))
        assert await page_info(page) == page_info_text(200, size)
        search = page.locator("#filter-search")

        # A site: its 25 CPs, CP-00050 to CP-00074.
        await choose(page, "filter-site", "site-C")
        await expect_page_info(page, 25, size)
        assert {r["site"] for r in await rows(page)} == {"site-C"}
        # A prefix within it, found by the page's binary search over /cp.
        await search.fill("CP-0005")
        await expect_page_info(page, 10, size)
        assert [r["id"] for r in await rows(page)] == [f"CP-000{n}" for n in range(50, 60)]
        await choose(page, "filter-site", "")
        await search.fill("CP-0019")  # the end of the list
        last_ten = [f"CP-00{n}" for n in range(190, 200)]
        await wait_for_js(
            page, f"{ROWS_JS}.map((r) => r.id).join() === {json.dumps(','.join(last_ten))}",
            10, "CP-0019…",
        )
        assert await page_info(page) == page_info_text(10, size)
        await choose(page, "filter-site", "site-C")
        await search.fill("CP-0004")
        await expect(page.locator("#list-nomatch")).to_be_visible(timeout=10_000)
        assert await rows(page) == []
        # A state, with the state tile: as many rows as the tile says.
        await page.locator("#filter-clear").click()
        await page.locator('#state-tiles [data-state="FAULT"]').click()
        faulty = expected["by_state"]["FAULT"]
        await expect_page_info(page, faulty, size)
        assert {r["state"] for r in await rows(page)} == {"FAULT"}

        # Live: a CP that faults enters the filtered page; one that recovers leaves it.
        newcomer = next(v for v in network.controller.cps.values()
                        if v.state is CPState.ACTIVATED)
        network.fault(newcomer, "<b>bold</b><img src=x onerror=alert(1)>")
        newcomer_row = page.locator(f'#cp-rows > tr[data-cp-id="{newcomer.cp_id}"]')
        await expect(newcomer_row).to_be_attached(timeout=10_000)  # on the FAULT page
        await expect_page_info(page, faulty + 1, size)
        note = await newcomer_row.locator(".t-note").text_content()
        assert note == "Fault: <b>bold</b><img src=x onerror=alert(1)>"
        assert await page.locator(
            "#cp-rows b, #cp-rows img, #feed b, #feed img"
        ).count() == 0
        network.recover(newcomer)
        await expect_page_info(page, faulty, size)  # the recovered CP gone
        assert newcomer.cp_id not in {r["id"] for r in await rows(page)}

        # Pages.
        await page.locator("#filter-clear").click()
        await expect_page_info(page, 200, size)
        await page.locator("#page-next").click()
        await expect_page_info(page, 200, size, size)
        assert (await rows(page))[0]["id"] == f"CP-{size:05d}"
        await page.locator("#page-prev").click()
        await expect_page_info(page, 200, size)

        target = os.environ.get(SCREENSHOT_ENV)
        shot = tmp_path / "dashboard-200.png"
        async with churning(network, CHURN):
            if target:  # the documentation picture: a minute and a half of power history
                start = network.changes
                await poll(
                    lambda: network.changes - start >= CHART_FILL * CHURN,
                    timeout=CHART_FILL * 2, what="the power chart's history", interval=1,
                )
            await page.screenshot(path=shot)
        assert page_log.dialogs == []
        assert page_log.problems() == []
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


async def test_a_small_network_shows_cards(page: Page, page_log: PageLog) -> None:
    async with simulated_network(12, 2) as network:
        await open_dashboard(page, network)
        assert await page.evaluate(CARDS_JS) == network.ids
        assert await page_info(page) == page_info_text(12, 50)
        await page.locator('.seg-btn[data-view="table"]').click()
        await expect(page.locator("#cp-rows > tr")).to_have_count(12, timeout=10_000)
        assert await page.evaluate(CARDS_JS) == []  # only the visible view has nodes
        await page.locator('.seg-btn[data-view="cards"]').click()
        await expect(page.locator("#grid > .card")).to_have_count(12, timeout=10_000)
        # A CP registered meanwhile joins the page at its place, without a reload.
        network.add("CP-00005b", site="site-A")
        await wait_for_js(
            page, f'{CARDS_JS}.indexOf("CP-00005b") === 6 && {page_info_is(13, 50)}', 10,
            "the new CP's card",
        )
        assert page_log.problems() == []
