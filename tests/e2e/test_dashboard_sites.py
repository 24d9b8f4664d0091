"""The dashboard's site tiles with a site limit (SPEC §10), in a real headless Chromium
against a real Central started with ``CENTRAL_SITE_LIMITS``: a limited site's tile shows
its limit against its allocation and measured power, follows ``PUT`` and ``DELETE
/sites/{site}/limit`` without a reload, and an unlimited site's tile shows none."""

from __future__ import annotations

import json

import pytest
from playwright.async_api import Page

from tests.e2e.browser import PageLog, wait_for_js
from tests.e2e.conftest import System

pytestmark = pytest.mark.e2e

MODE_JS = 'document.getElementById("conn").dataset.mode'


def limit_js(site: str) -> str:
    """The limit, allocated and measured power a site's tile shows ("limit=…, …"), or ""
    when it shows none; null: no tile."""
    return f"""(() => {{
  const tile = document.querySelector('.site-tile[data-site={json.dumps(site)}]');
  if (!tile) return null;
  const box = tile.querySelector(".site-limit");
  if (!box || box.hidden) return "";
  const labels = [...box.querySelectorAll(".site-limit-label")].map((e) => e.textContent);
  const values = [...box.querySelectorAll(".site-limit-value")].map((e) => e.textContent);
  return labels.map((label, i) => `${{label}}=${{values[i]}}`).join(", ");
}})()"""


async def test_a_limited_sites_tile_shows_limit_allocation_and_measured_power(
    system: System, page: Page, page_log: PageLog
) -> None:
    await system.start_central({"CENTRAL_SITE_LIMITS": "site-L=66"})
    for cp_id, site in (("CP-L1", "site-L"), ("CP-F1", "site-F")):
        answer = await system.http.post("/cp/register", json={
            "cp_id": cp_id, "site": site, "kw_rate": 22})
        assert answer.status_code == 200, answer.text
    url = f"http://127.0.0.1:{system.http_port}/"
    await page.goto(url)
    await wait_for_js(page, f'{MODE_JS} === "ws"', 15, "the dashboard's WebSocket")
    expected = "limit=66.0 kW, alloc=0.0 kW, measured=0.0 kW"
    await wait_for_js(page, f"{limit_js('site-L')} === {json.dumps(expected)}", 15,
                      "site-L's tile with its limit")
    assert await page.evaluate(limit_js("site-F")) == ""
    # A new limit and a removed one reach the open page.
    answer = await system.http.put("/sites/site-F/limit", json={"kw": 150})
    assert answer.status_code == 200, answer.text
    await wait_for_js(
        page, f"{limit_js('site-F')} === "
        f"{json.dumps('limit=150.0 kW, alloc=0.0 kW, measured=0.0 kW')}",
        15, "site-F's tile with its new limit")
    answer = await system.http.delete("/sites/site-L/limit")
    assert answer.status_code == 200, answer.text
    await wait_for_js(page, f"{limit_js('site-L')} === \"\"", 15, "site-L's limit removed")
    assert page_log.navigations == [url]
    assert page_log.problems() == []
