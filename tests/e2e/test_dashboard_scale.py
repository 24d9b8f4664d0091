"""The dashboard at scale, in a real headless Chromium (SPEC §5, issue 10).

No Kafka and no CP processes: :mod:`tests.e2e.netsim` serves the real Central app over a
controller whose registry holds simulated CPs, and changes them at a given rate through
the controller's hub, as the controller publishes its changes. The browser is driven over
the DevTools Protocol (:mod:`tests.e2e.cdp`); every wait is a JavaScript predicate polled
in the page with a deadline, or the simulation's own count of changes.

Set ``EVCHARGING_SCREENSHOT=docs/dashboard.png`` to refresh the documentation picture
with the screenshot of :func:`test_filters_search_and_paging` (a 200-CP network, taken
after a minute and a half of power history).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from evcharging.common.messages import CPState
from tests.e2e.cdp import Browser
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

MODE_JS = 'document.getElementById("conn").dataset.mode'
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
                    f"===== browser\nproblems: {chromium.problems()}\n"
                    f"console: {chromium.console}\n{chromium.log_tail()}\n"
                )


async def open_dashboard(browser: Browser, network: SimulatedNetwork) -> None:
    await browser.navigate(network.url)
    await browser.wait_for(f'{MODE_JS} === "ws"', 15, "the dashboard's WebSocket")
    await browser.wait_for(
        'document.querySelectorAll("#cp-rows > tr, #grid > .card").length > 0', 15,
        "the first page of CPs",
    )


async def rows(browser: Browser) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = await browser.evaluate(ROWS_JS)
    return found


def js_rows_all(condition: str) -> str:
    """JavaScript: the rows (not leaving the page) when there are some and all meet
    `condition` (an expression of ``r``), else null."""
    return f"""(() => {{
  const rows = {ROWS_JS}.filter((r) => !r.leaving);
  return rows.length > 0 && rows.every((r) => {condition}) ? rows : null;
}})()"""


async def click(browser: Browser, selector: str) -> None:
    assert await browser.evaluate(
        f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
        " if (!el) return false; el.click(); return true; })()"
    ), f"nothing to click at {selector}"


async def choose(browser: Browser, select_id: str, value: str) -> None:
    assert await browser.evaluate(f"""(() => {{
  const select = document.getElementById({json.dumps(select_id)});
  select.value = {json.dumps(value)};
  select.dispatchEvent(new Event("change"));
  return select.value === {json.dumps(value)};
}})()"""), f"{select_id} has no option {value!r}"


async def search(browser: Browser, prefix: str) -> None:
    await browser.evaluate(f"""(() => {{
  const input = document.getElementById("filter-search");
  input.value = {json.dumps(prefix)};
  input.dispatchEvent(new Event("input"));
}})()""")


def page_info_is(total: int, size: int, offset: int = 0) -> str:
    """JavaScript: whether the pager says "first–last of total" for that page."""
    last = min(offset + size, total)
    text = f"{offset + 1}–{last} of {total:,}" if total else "0 of 0"
    return f"{PAGE_INFO_JS} === {json.dumps(text)}"


async def summary(network: SimulatedNetwork) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=network.url, timeout=5) as http:
        response = await http.get("/summary")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --------------------------------------------------------------------------- 10,000 CPs


async def test_ten_thousand_cps_stay_responsive(
    browser: Browser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with simulated_network(10_000, 8) as network, churning(network, 2000):
        await open_dashboard(browser, network)
        await browser.wait_for(f'{PAGE_INFO_JS}.endsWith(" of 10,000")', 10, "the pager")
        shown = await browser.evaluate("""({
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

        assert await browser.evaluate(MEASURE_JS) is True
        await browser.start_trace()
        start = network.changes

        # The operator works meanwhile: filter, search, clear, page, switch views.
        await click(browser, '#state-tiles [data-state="SUPPLYING"]')
        await browser.wait_for(js_rows_all('r.state === "SUPPLYING"'), 10, "SUPPLYING rows")
        await search(browser, "CP-01")
        await browser.wait_for(
            js_rows_all('r.state === "SUPPLYING" && r.id.startsWith("CP-01")'), 10,
            "SUPPLYING rows of CP-01…",
        )
        await click(browser, "#filter-clear")
        await browser.wait_for(
            f'{PAGE_INFO_JS}.startsWith("1–") && {PAGE_INFO_JS}.endsWith(" of 10,000")', 10,
            "the whole list again",
        )
        size = len(await rows(browser))
        await click(browser, "#page-next")
        await browser.wait_for(
            f'{ROWS_JS}[0]?.id === "CP-{size:05d}"', 10, "the second page",
        )
        await click(browser, '.seg-btn[data-view="cards"]')
        await browser.wait_for(f"{CARDS_JS}.length === 50", 10, "a page of 50 cards")
        await click(browser, '.seg-btn[data-view="table"]')
        await browser.wait_for(f"{ROWS_JS}.length === {size}", 10, "the table again")

        await poll(
            lambda: network.changes - start >= MEASURE_CHANGES, timeout=30,
            what=f"{MEASURE_CHANGES} CP changes pushed through the hub", interval=0.1,
        )
        measured = await browser.evaluate("window.__measure")
        changes = network.changes - start
        tasks = await browser.stop_trace()
        await browser.screenshot(tmp_path / "dashboard-10000.png")
        assert browser.problems() == []  # before Central stops under the page

    worst_task = max(measured["longTasks"], default=0.0)
    worst = max(worst_task, measured["worstGap"])
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
    # The page's own work, whatever else runs on the machine:
    assert busiest.cpu_ms <= FRAME_BUDGET_MS, report
    # And as the operator sees it (wall clock: a machine starved by other processes, its
    # load average well above its CPUs, stretches frames beyond the page's own work).
    assert worst <= FRAME_BUDGET_MS, f"{report}\n{measured}"


# --------------------------------------------------------------------------- filters


async def test_filters_search_and_paging(browser: Browser, tmp_path: Path) -> None:
    async with simulated_network(200, 8) as network:
        await open_dashboard(browser, network)
        expected = await summary(network)
        tiles = await browser.evaluate("""Object.fromEntries(
  [...document.querySelectorAll("#state-tiles [data-state]")].map(
    (t) => [t.dataset.state, t.querySelector(".tile-value").textContent]))""")
        assert tiles == {state: str(n) for state, n in expected["by_state"].items()}
        sites = await browser.evaluate(
            '[...document.querySelectorAll("#site-tiles .site-tile")].map((t) => ['
            't.dataset.site, t.querySelector(".site-cps").textContent])'
        )
        assert sites == [[s["site"], f"{s['cps']} CPs"] for s in expected["by_site"]]
        assert await browser.evaluate('document.getElementById("list-wrap").dataset.view') \
            == "table"
        size = len(await rows(browser))
        assert await browser.evaluate(page_info_is(200, size))

        # A site: its 25 CPs, CP-00050 to CP-00074.
        await choose(browser, "filter-site", "site-C")
        await browser.wait_for(page_info_is(25, size), 10, "site-C")
        assert {r["site"] for r in await rows(browser)} == {"site-C"}
        # A prefix within it, found by the page's binary search over /cp.
        await search(browser, "CP-0005")
        await browser.wait_for(page_info_is(10, size), 10, "CP-0005… of site-C")
        assert [r["id"] for r in await rows(browser)] == [f"CP-000{n}" for n in range(50, 60)]
        await choose(browser, "filter-site", "")
        await search(browser, "CP-0019")  # the end of the list
        last_ten = [f"CP-00{n}" for n in range(190, 200)]
        await browser.wait_for(
            f"{ROWS_JS}.map((r) => r.id).join() === {json.dumps(','.join(last_ten))}", 10,
            "CP-0019…",
        )
        assert await browser.evaluate(page_info_is(10, size))
        await choose(browser, "filter-site", "site-C")
        await search(browser, "CP-0004")
        await browser.wait_for(
            '!document.getElementById("list-nomatch").hidden', 10, "no match"
        )
        assert await rows(browser) == []
        # A state, with the state tile: as many rows as the tile says.
        await click(browser, "#filter-clear")
        await click(browser, '#state-tiles [data-state="FAULT"]')
        faulty = expected["by_state"]["FAULT"]
        await browser.wait_for(page_info_is(faulty, size), 10, "FAULT")
        assert {r["state"] for r in await rows(browser)} == {"FAULT"}

        # Live: a CP that faults enters the filtered page; one that recovers leaves it.
        newcomer = next(v for v in network.controller.cps.values()
                        if v.state is CPState.ACTIVATED)
        network.fault(newcomer, "<b>bold</b><img src=x onerror=alert(1)>")
        await browser.wait_for(
            f'{ROWS_JS}.some((r) => r.id === {json.dumps(newcomer.cp_id)})', 10,
            f"{newcomer.cp_id} on the FAULT page",
        )
        await browser.wait_for(page_info_is(faulty + 1, size), 10, "one more FAULT")
        note = await browser.evaluate(
            f'document.querySelector(\'#cp-rows > tr[data-cp-id="{newcomer.cp_id}"] .t-note\')'
            ".textContent"
        )
        assert note == "Fault: <b>bold</b><img src=x onerror=alert(1)>"
        assert await browser.evaluate(
            'document.querySelectorAll("#cp-rows b, #cp-rows img, #feed b, #feed img").length'
        ) == 0
        network.recover(newcomer)
        await browser.wait_for(page_info_is(faulty, size), 10, "the recovered CP gone")
        assert newcomer.cp_id not in {r["id"] for r in await rows(browser)}

        # Pages.
        await click(browser, "#filter-clear")
        await browser.wait_for(page_info_is(200, size), 10, "all CPs")
        await click(browser, "#page-next")
        await browser.wait_for(page_info_is(200, size, size), 10, "the second page")
        assert (await rows(browser))[0]["id"] == f"CP-{size:05d}"
        await click(browser, "#page-prev")
        await browser.wait_for(page_info_is(200, size), 10, "the first page")

        target = os.environ.get(SCREENSHOT_ENV)
        shot = tmp_path / "dashboard-200.png"
        async with churning(network, CHURN):
            if target:  # the documentation picture: a minute and a half of power history
                start = network.changes
                await poll(
                    lambda: network.changes - start >= CHART_FILL * CHURN,
                    timeout=CHART_FILL * 2, what="the power chart's history", interval=1,
                )
            await browser.screenshot(shot)
        assert browser.dialogs == []
        assert browser.problems() == []
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


async def test_a_small_network_shows_cards(browser: Browser) -> None:
    async with simulated_network(12, 2) as network:
        await open_dashboard(browser, network)
        assert await browser.evaluate(CARDS_JS) == network.ids
        assert await browser.evaluate(page_info_is(12, 50))
        await click(browser, '.seg-btn[data-view="table"]')
        await browser.wait_for(f"{ROWS_JS}.length === 12", 10, "the table")
        assert await browser.evaluate(CARDS_JS) == []  # only the visible view has nodes
        await click(browser, '.seg-btn[data-view="cards"]')
        await browser.wait_for(f"{CARDS_JS}.length === 12", 10, "the cards again")
        # A CP registered meanwhile joins the page at its place, without a reload.
        network.add("CP-00005b", site="site-A")
        await browser.wait_for(
            f'{CARDS_JS}.indexOf("CP-00005b") === 6 && {page_info_is(13, 50)}', 10,
            "the new CP's card",
        )
        assert browser.problems() == []
