/*
 * EV Central live dashboard, for networks of a few CPs to tens of thousands.
 *
 * What the page holds:
 *  - the network's summary (GET /summary's shape): the tiles by state and by site, the
 *    numbers of the top bar, and the power chart, which samples it every second;
 *  - one page of the CP list, read from GET /cp?limit=&offset=&state=&site= (the total in
 *    X-Total-Count). Only that page is in the DOM: cards for a small network, a table rows
 *    for a large one (or as chosen). A search by CP id prefix finds its range in the
 *    id-ordered list with a binary search over offsets (a few limit=1 reads);
 *  - the newest FEED_MAX events of the activity feed.
 *
 * It follows Central over the /ws WebSocket: a "snapshot" (summary and feed) first, then at
 * most four "delta" messages a second (the latest state of each CP that changed, the latest
 * telemetry of each CP, the feed events, and now and then a new summary). A delta updates
 * the rows of the CPs on the page; a CP that enters or leaves the page's filter makes the
 * page be read again (at most once a second). While the socket is down the page polls
 * /summary, /cp and /api/feed every 2 s and keeps trying to reconnect with an exponential
 * backoff; the next snapshot re-syncs everything.
 *
 * Every value that comes from Central (ids, reasons, numbers) reaches the page through
 * textContent, attributes set with the DOM API, or the canvas: never as markup.
 */
"use strict";

(() => {
  const POLL_MS = 2000;
  const WS_GRACE_MS = 3000;
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 15000;
  const FEED_MAX = 60;
  const FEED_BURST = 20; // the newest items of one message: a busy network's feed scrolls anyway
  const CHART_WINDOW_MS = 10 * 60 * 1000;
  const CHART_MIN_WINDOW_MS = 60 * 1000;
  const SAMPLE_MS = 1000;
  const STALE_MS = 10000;
  const CARD_LIMIT = 50; // "auto" shows cards up to this many CPs, a table above
  const CARD_PAGE = 50;
  const ROW_PX = 34;
  const MIN_ROWS = 10;
  const MAX_ROWS = 100;
  const REFRESH_MS = 1000; // a page is read again at most this often on its own
  const SEARCH_DEBOUNCE_MS = 250;
  const SEEK_WAYS = 3; // two searches at once: six requests, a browser's connections per host
  const SITE_TILES_MAX = 12;
  const SITES_MS = 2000;
  const STATES = ["ACTIVATED", "SUPPLYING", "STOPPED", "FAULT", "DISCONNECTED"];
  const FETCH_OPTIONS = { cache: "no-store", headers: { Accept: "application/json" } };

  const $ = (id) => document.getElementById(id);
  const els = {
    conn: $("conn"),
    connLabel: document.querySelector("#conn .conn-label"),
    statCps: $("stat-cps"),
    statSupplying: $("stat-supplying"),
    statSessions: $("stat-sessions"),
    statFaulty: $("stat-faulty"),
    statUnmonitored: $("stat-unmonitored"),
    statKw: $("stat-kw"),
    statKwUnit: $("stat-kw-unit"),
    stateTiles: $("state-tiles"),
    siteTiles: $("site-tiles"),
    sitesNote: $("sites-note"),
    sitesEmpty: $("sites-empty"),
    filterState: $("filter-state"),
    filterSite: $("filter-site"),
    filterSearch: $("filter-search"),
    filterClear: $("filter-clear"),
    viewButtons: [...document.querySelectorAll(".seg-btn[data-view]")],
    layout: document.querySelector(".layout"),
    points: document.querySelector(".points"),
    listWrap: $("list-wrap"),
    grid: $("grid"),
    table: $("cp-table"),
    rows: $("cp-rows"),
    gridEmpty: $("grid-empty"),
    noMatch: $("list-nomatch"),
    listStatus: $("list-status"),
    pagePrev: $("page-prev"),
    pageNext: $("page-next"),
    pageInfo: $("page-info"),
    feed: $("feed"),
    feedEmpty: $("feed-empty"),
    cardTemplate: $("cp-card-template"),
    rowTemplate: $("cp-row-template"),
    chart: $("power-chart"),
    powerNote: $("power-note"),
  };

  const count = new Intl.NumberFormat("en-US");

  /** Milliseconds to add to Date.now() to get Central's clock. */
  let serverOffset = 0;
  let mode = null;
  let everConnected = false;

  /** The network's summary (GET /summary), or null before the first one. */
  let summary = null;
  /** What the operator asked to see; `offset` is the index of the page's first CP. */
  const view = { state: "", site: "", prefix: "", offset: 0, choice: null };
  /** The page shown: the CPs of `filter` from `offset` on, in id order (the server's). */
  const list = {
    filter: { state: "", site: "", prefix: "" },
    items: [],
    byId: new Map(),
    total: 0,
    offset: 0,
    loaded: false,
    /** Ids on the page that no longer match its filter (until it is read again). */
    leaving: new Set(),
  };
  /** cp_id -> the newest finished session seen in the feed ("last session" on a card). */
  const lastSessions = new Map();

  const serverNow = () => Date.now() + serverOffset;
  const parseTs = (ts) => {
    const t = Date.parse(ts);
    return Number.isFinite(t) ? t : null;
  };
  const num = (value) => {
    const n = Number(value);
    return Number.isFinite(n) ? n : 0;
  };
  const isCp = (cp) => Boolean(cp) && typeof cp === "object" && typeof cp.cp_id === "string";

  function setText(el, text) {
    const value = String(text);
    if (el.textContent !== value) el.textContent = value;
  }

  function setData(el, key, value) {
    if (el.dataset[key] !== value) el.dataset[key] = value;
  }

  // Writes only what changed: an unchanged write still invalidates style and layout.
  function setAttr(el, name, value) {
    if (el.getAttribute(name) !== value) el.setAttribute(name, value);
  }

  function setTitle(el, value) {
    if (el.title !== value) el.title = value;
  }

  function setHidden(el, hidden) {
    if (el.hidden !== hidden) el.hidden = hidden;
  }

  function setTransform(el, value) {
    if (el.style.transform !== value) el.style.transform = value;
  }

  function node(tag, className, text) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined && text !== null) el.textContent = String(text);
    return el;
  }

  /** "12.345" + " kWh" as two spans (number and unit), built once and then updated. */
  function setMetric(el, value, unit) {
    let n = el.firstChild;
    if (!n || n.nodeType !== Node.ELEMENT_NODE) {
      el.replaceChildren(node("span", "num"), node("span", "unit", ` ${unit}`));
      n = el.firstChild;
    }
    setText(n, value);
  }

  function duration(ms) {
    const total = Math.max(0, Math.floor(ms / 1000));
    const h = Math.floor(total / 3600);
    const m = Math.floor((total % 3600) / 60);
    const s = total % 60;
    const mm = String(m).padStart(2, "0");
    const ss = String(s).padStart(2, "0");
    return h > 0 ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
  }

  function ago(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s}s ago`;
    if (s < 3600) return `${Math.floor(s / 60)}m ago`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
    return `${Math.floor(s / 86400)}d ago`;
  }

  function clockTime(t) {
    const d = new Date(t);
    const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
    const today = new Date().toDateString() === d.toDateString();
    return today ? time : `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
  }

  /** A power as [number, unit]: "812.4" kW, "3,768" kW, "172.1" MW. */
  function power(kw) {
    if (kw >= 10000) return [(kw / 1000).toFixed(1), "MW"];
    if (kw >= 1000) return [count.format(Math.round(kw)), "kW"];
    return [kw.toFixed(1), "kW"];
  }

  const powerText = (kw) => power(kw).join(" ");

  // ------------------------------------------------------------------ rendering schedule

  let frameRequested = false;
  let summaryDirty = false;
  let listDirty = false;
  const dirtyIds = new Set();

  /** Draw what changed at the next frame: many messages between two frames cost one draw. */
  function scheduleRender() {
    if (frameRequested) return;
    frameRequested = true;
    requestAnimationFrame(render);
  }

  function render() {
    frameRequested = false;
    if (summaryDirty) {
      summaryDirty = false;
      renderSummary();
    }
    if (listDirty) {
      listDirty = false;
      dirtyIds.clear();
      renderList();
    } else if (dirtyIds.size > 0) {
      for (const cpId of dirtyIds) {
        const cp = list.byId.get(cpId);
        if (cp) renderItem(cp);
      }
      dirtyIds.clear();
    }
  }

  // ------------------------------------------------------------------ connection mode

  const MODE_LABELS = {
    ws: "Live",
    polling: "Polling · live link down",
    connecting: "Reconnecting…",
  };

  function setMode(next) {
    if (mode === next) return;
    mode = next;
    els.conn.dataset.mode = next;
    const label = next === "connecting" && !everConnected ? "Connecting…" : MODE_LABELS[next];
    setText(els.connLabel, label);
    els.conn.title =
      next === "ws" ? "Live updates over WebSocket"
        : next === "polling" ? `WebSocket down: polling every ${POLL_MS / 1000} s while reconnecting`
          : "Central is not answering; retrying";
  }

  // ------------------------------------------------------------------ summary

  const stateTiles = new Map();
  const siteTiles = new Map();
  /** The limited sites of GET /sites (SPEC §10): name → {limit_kw, allocated_kw, measured_kw}. */
  const siteLimits = new Map();

  function buildStateTiles() {
    for (const state of STATES) {
      const tile = node("button", "tile state-tile");
      tile.type = "button";
      tile.dataset.state = state;
      tile.setAttribute("aria-pressed", "false");
      const label = node("span", "tile-label", state);
      const value = node("span", "tile-value", "0");
      const share = node("span", "tile-share", "");
      const bar = node("span", "tile-bar");
      const fill = node("span", "tile-bar-fill");
      bar.append(fill);
      tile.append(label, value, share, bar);
      tile.addEventListener("click", () => setFilter({ state: view.state === state ? "" : state }));
      els.stateTiles.append(tile);
      stateTiles.set(state, { tile, value, share, fill });
    }
  }

  function setSummary(next) {
    if (!next || typeof next !== "object") return;
    summary = next;
    summaryDirty = true;
    scheduleRender();
    // The list's total follows from the summary for one filter at a time: a difference
    // means CPs entered or left the filtered list.
    const expected = expectedTotal(list.filter);
    if (list.loaded && expected !== null && expected !== list.total) requestLoad();
  }

  function expectedTotal(filter) {
    if (!summary || filter.prefix || (filter.state && filter.site)) return null;
    if (filter.state) return num(summary.by_state?.[filter.state]);
    if (filter.site) {
      const site = (summary.by_site || []).find((s) => s.site === filter.site);
      return site ? num(site.cps) : 0;
    }
    return num(summary.cps);
  }

  function renderSummary() {
    const s = summary;
    if (!s) return;
    const total = num(s.cps);
    setText(els.statCps, count.format(total));
    setText(els.statSupplying, count.format(num(s.supplying)));
    setText(els.statSessions, count.format(num(s.active_sessions)));
    setText(els.statFaulty, count.format(num(s.faulty)));
    setText(els.statUnmonitored, count.format(num(s.unmonitored)));
    const [kwValue, kwUnit] = power(num(s.power_kw));
    setText(els.statKw, kwValue);
    setText(els.statKwUnit, ` ${kwUnit}`);
    els.statFaulty.parentElement.classList.toggle("is-alert", num(s.faulty) > 0);
    els.statUnmonitored.parentElement.classList.toggle("is-warn", num(s.unmonitored) > 0);
    const title = num(s.faulty) > 0 ? `(${count.format(num(s.faulty))} faulty) EV Central` : "EV Central · Charging network";
    if (document.title !== title) document.title = title;

    for (const state of STATES) {
      const t = stateTiles.get(state);
      const n = num(s.by_state?.[state]);
      setText(t.value, count.format(n));
      const pct = total > 0 ? (100 * n) / total : 0;
      setText(t.share, total > 0 ? `${pct < 10 && pct > 0 ? pct.toFixed(1) : Math.round(pct)}%` : "");
      setTransform(t.fill, `scaleX(${pct / 100})`);
      setAttr(t.tile, "aria-pressed", String(view.state === state));
    }
    renderSites(Array.isArray(s.by_site) ? s.by_site : []);
    renderFilterOptions();
    renderEmpty();
    els.listWrap.toggleAttribute("data-small", total <= CARD_LIMIT);
    updateView();
    renderPager();
  }

  function siteName(site) {
    return site.site === null || site.site === undefined ? null : String(site.site);
  }

  function renderSites(sites) {
    const shown = sites.slice(0, SITE_TILES_MAX);
    const keep = new Set();
    shown.forEach((site, index) => {
      const name = siteName(site);
      const key = name === null ? "\u0000" : name;
      keep.add(key);
      let t = siteTiles.get(key);
      if (!t) {
        const tile = node("button", "tile site-tile");
        tile.type = "button";
        const head = node("span", "site-name", name === null ? "No site" : name);
        const kw = node("span", "site-kw");
        const value = node("span", "site-cps", "0");
        const supplying = node("span", "site-supplying");
        const faulty = node("span", "site-faulty");
        const detail = node("span", "site-detail");
        detail.append(value, supplying, faulty);
        const bar = node("span", "tile-bar");
        const fill = node("span", "tile-bar-fill");
        bar.append(fill);
        // A limited site: its limit against its allocation and measured power.
        const limit = node("span", "site-limit");
        const cells = node("span", "site-limit-cells");
        const cell = (label) => {
          const value = node("span", "site-limit-value");
          cells.append(node("span", "site-limit-label", label), value);
          return value;
        };
        const limitValue = cell("limit");
        const allocatedValue = cell("alloc");
        const measuredValue = cell("measured");
        const limitBar = node("span", "site-limit-bar");
        const measured = node("span", "site-limit-measured");
        const allocated = node("span", "site-limit-allocated");
        limitBar.append(measured, allocated);
        limit.append(cells, limitBar);
        limit.hidden = true;
        tile.append(head, kw, detail, bar, limit);
        if (name === null) {
          tile.disabled = true;
          tile.title = "CPs that belong to no known site";
        } else {
          tile.title = name;
          tile.dataset.site = name;
          tile.addEventListener("click", () => setFilter({ site: view.site === name ? "" : name }));
        }
        t = { tile, value, supplying, faulty, kw, fill, limit, limitValue, allocatedValue, measuredValue, measured, allocated };
        siteTiles.set(key, t);
      }
      if (els.siteTiles.children[index] !== t.tile) els.siteTiles.insertBefore(t.tile, els.siteTiles.children[index] || null);
      const cps = num(site.cps);
      const supplying = num(site.supplying);
      setText(t.value, `${count.format(cps)} CP${cps === 1 ? "" : "s"}`);
      setText(t.supplying, ` · ${count.format(supplying)} supplying`);
      const faulty = num(site.faulty);
      setText(t.faulty, faulty > 0 ? ` · ${count.format(faulty)} faulty` : "");
      t.tile.classList.toggle("has-faults", faulty > 0);
      setText(t.kw, powerText(num(site.power_kw)));
      setTransform(t.fill, `scaleX(${cps > 0 ? supplying / cps : 0})`);
      setAttr(t.tile, "aria-pressed", String(name !== null && view.site === name));
      renderSiteLimit(t, name === null ? undefined : siteLimits.get(name));
    });
    for (const [key, t] of siteTiles) {
      if (!keep.has(key)) {
        t.tile.remove();
        siteTiles.delete(key);
      }
    }
    setHidden(els.sitesEmpty, sites.length > 0);
    const named = sites.filter((s) => siteName(s) !== null).length;
    setText(els.sitesNote, sites.length > SITE_TILES_MAX
      ? `${SITE_TILES_MAX} of ${count.format(sites.length)} shown · the Site filter lists all`
      : `${count.format(named)} site${named === 1 ? "" : "s"}`);
  }

  /** A site tile's limit, allocated and measured power side by side, and a bar of the
   * measured power against the limit with the allocation as a mark. */
  function renderSiteLimit(t, limited) {
    setHidden(t.limit, !limited);
    t.tile.classList.toggle("is-limited", Boolean(limited));
    if (!limited) return;
    const limit = num(limited.limit_kw);
    const allocated = num(limited.allocated_kw);
    const measured = num(limited.measured_kw);
    setText(t.limitValue, powerText(limit));
    setText(t.allocatedValue, powerText(allocated));
    setText(t.measuredValue, powerText(measured));
    const scale = (kw) => (limit > 0 ? Math.min(1, Math.max(0, kw / limit)) : kw > 0 ? 1 : 0);
    setTransform(t.measured, `scaleX(${scale(measured)})`);
    setTransform(t.allocated, `translateX(${(100 * scale(allocated)).toFixed(2)}%)`);
    t.limit.classList.toggle("is-over", measured > limit + 0.01);
    setAttr(t.limit, "title", `Power limit ${powerText(limit)}: smart charging allocates ${powerText(allocated)}, the CPs report ${powerText(measured)}`);
  }

  /** GET /sites every SITES_MS: the limits are few and change rarely, so they are polled
   * rather than carried by the WebSocket's deltas. */
  async function loadSiteLimits() {
    try {
      const res = await fetch("/sites", FETCH_OPTIONS);
      if (!res.ok) return;
      const sites = await res.json();
      if (!Array.isArray(sites)) return;
      siteLimits.clear();
      for (const site of sites) {
        if (site && site.limit_kw !== null && site.limit_kw !== undefined) siteLimits.set(String(site.site), site);
      }
      summaryDirty = true;
      scheduleRender();
    } catch {
      // Central is not answering: the connection's state says so; the next round retries.
    }
  }

  let siteOptionsKey = "";

  function renderFilterOptions() {
    const s = summary;
    // State options: fixed, with counts.
    if (els.filterState.options.length === 1) {
      for (const state of STATES) els.filterState.add(new Option(state, state));
    }
    for (const option of els.filterState.options) {
      if (!option.value) continue;
      setText(option, `${option.value} (${count.format(num(s.by_state?.[option.value]))})`);
    }
    // Site options: rebuilt when the sites change, counts updated in place.
    const sites = (s.by_site || []).filter((site) => siteName(site) !== null);
    const key = sites.map((site) => siteName(site)).join("\u0000");
    if (key !== siteOptionsKey) {
      siteOptionsKey = key;
      const options = [new Option("All sites", "")];
      for (const site of sites) options.push(new Option(siteName(site), siteName(site)));
      if (view.site && !sites.some((site) => siteName(site) === view.site)) {
        options.push(new Option(view.site, view.site)); // keep the chosen one while it is empty
      }
      els.filterSite.replaceChildren(...options);
      els.filterSite.value = view.site;
    }
    const bySite = new Map(sites.map((site) => [siteName(site), num(site.cps)]));
    for (const option of els.filterSite.options) {
      if (!option.value) continue;
      setText(option, `${option.value} (${count.format(bySite.get(option.value) ?? 0)})`);
    }
  }

  // ------------------------------------------------------------------ filters and view

  function currentView() {
    if (view.choice) return view.choice;
    const total = summary ? num(summary.cps) : list.total;
    return total <= CARD_LIMIT ? "cards" : "table";
  }

  /** Cards: CARD_PAGE. Table: the rows that fit between the table's head and the pager. */
  function pageSize() {
    if (currentView() === "cards") return CARD_PAGE;
    const wrap = els.listWrap.getBoundingClientRect();
    const below = els.points.getBoundingClientRect().bottom - wrap.bottom // the pager
      + parseFloat(getComputedStyle(els.layout).paddingBottom);
    const head = Math.max(els.table.tHead.offsetHeight, 28);
    const room = window.innerHeight - (wrap.top + window.scrollY) - head - below;
    return Math.max(MIN_ROWS, Math.min(MAX_ROWS, Math.floor(room / ROW_PX)));
  }

  let shownView = null;
  let shownPageSize = 0;

  /** Show the cards or the table; read the page again when its size changes with it. */
  function updateView() {
    const next = currentView();
    for (const button of els.viewButtons) {
      setAttr(button, "aria-pressed", String(button.dataset.view === next));
    }
    if (next === shownView) return;
    shownView = next;
    els.grid.hidden = next !== "cards";
    els.table.hidden = next !== "table";
    els.listWrap.dataset.view = next;
    // Only the visible one holds nodes.
    if (next === "cards") {
      els.rows.replaceChildren();
      rows.clear();
    } else {
      els.grid.replaceChildren();
      cards.clear();
    }
    const size = pageSize();
    if (list.loaded && size !== shownPageSize) {
      if (list.items.length > size) { // the first rows of the same page: shown until it is read
        for (const cp of list.items.splice(size)) list.byId.delete(cp.cp_id);
      }
      shownPageSize = size;
      requestLoad({ now: true });
    }
    listDirty = true;
    scheduleRender();
  }

  function setFilter(change) {
    Object.assign(view, change);
    view.offset = 0;
    els.filterState.value = view.state;
    els.filterSite.value = view.site;
    if (els.filterSearch.value.trim() !== view.prefix) els.filterSearch.value = view.prefix;
    els.filterClear.disabled = !(view.state || view.site || view.prefix);
    summaryDirty = true; // the tiles show which filter is on
    scheduleRender();
    requestLoad({ now: true });
  }

  function matches(cp, filter) {
    return (!filter.state || cp.state === filter.state)
      && (!filter.site || cp.site === filter.site)
      && (!filter.prefix || cp.cp_id.startsWith(filter.prefix));
  }

  // ------------------------------------------------------------------ reading a page

  let loadGen = 0;
  /** While a page is read: the changes that arrive meanwhile, applied to it when it comes. */
  let loading = null;
  let loadAgain = false;
  let lastLoadAt = 0;
  let refreshTimer = null;

  /** Read the page again: at once (`now`), or within REFRESH_MS of the last read. */
  function requestLoad({ now = false } = {}) {
    if (now) {
      clearTimeout(refreshTimer);
      refreshTimer = null;
      loadPage();
      return;
    }
    if (loading) {
      loadAgain = true;
      return;
    }
    if (refreshTimer !== null) return;
    const wait = Math.max(0, lastLoadAt + REFRESH_MS - Date.now());
    refreshTimer = setTimeout(() => {
      refreshTimer = null;
      loadPage();
    }, wait);
  }

  async function loadPage() {
    const gen = ++loadGen;
    const buffer = { cps: new Map(), telemetry: new Map() };
    loading = buffer;
    loadAgain = false;
    lastLoadAt = Date.now();
    const filter = { state: view.state, site: view.site, prefix: view.prefix };
    if (frameRequested) render(); // the page's size depends on the layout above the list
    const size = pageSize();
    if (!list.loaded || filterKey(filter) !== filterKey(list.filter)) setText(els.listStatus, "Loading…");
    try {
      const page = await readPage(filter, view.offset, size);
      if (gen !== loadGen) return;
      applyPage(filter, page, size, buffer);
      setText(els.listStatus, "");
    } catch (err) {
      if (gen !== loadGen) return;
      setText(els.listStatus, "Central did not answer; retrying");
      if (mode === "ws") requestLoad();
    } finally {
      if (gen === loadGen) {
        loading = null;
        if (loadAgain) requestLoad();
      }
    }
  }

  const filterKey = (f) => `${f.state}\u0000${f.site}\u0000${f.prefix}`;
  const lastPageOffset = (total, size) => Math.max(0, Math.floor((total - 1) / size) * size);

  async function getCps(base, offset, limit) {
    const params = new URLSearchParams(base);
    params.set("limit", String(limit));
    params.set("offset", String(offset));
    const response = await fetch(`/cp?${params}`, FETCH_OPTIONS);
    if (!response.ok) throw new Error(`GET /cp: HTTP ${response.status}`);
    const items = await response.json();
    const total = Number(response.headers.get("X-Total-Count"));
    const valid = Array.isArray(items) ? items.filter(isCp) : [];
    return { items: valid, total: Number.isFinite(total) ? total : valid.length };
  }

  /** The CPs of `filter` from `offset` on (the last page when there are fewer). */
  async function readPage(filter, offset, size) {
    const base = new URLSearchParams();
    if (filter.state) base.set("state", filter.state);
    if (filter.site) base.set("site", filter.site);
    if (!filter.prefix) {
      let page = await getCps(base, offset, size);
      if (offset > 0 && offset >= page.total) {
        offset = lastPageOffset(page.total, size);
        page = await getCps(base, offset, size);
      }
      return { items: page.items, total: page.total, offset };
    }
    const [lo, hi] = await prefixRange(base, filter.prefix);
    const total = hi - lo;
    if (offset >= total) offset = lastPageOffset(total, size);
    const limit = Math.min(size, total - offset);
    const items = limit > 0 ? (await getCps(base, lo + offset, limit)).items : [];
    return { items: items.filter((cp) => cp.cp_id.startsWith(filter.prefix)), total, offset };
  }

  /**
   * [first, end) offsets of the ids starting with `prefix` in the list GET /cp gives (in id
   * order, as JavaScript compares strings: the ids are ASCII). Two searches over offsets
   * side by side, each reading SEEK_WAYS single CPs at once per round: about
   * log(N) / log(SEEK_WAYS + 1) rounds (7 for 10,000 CPs).
   */
  async function prefixRange(base, prefix) {
    const { total } = await getCps(base, 0, 1);
    const idAt = async (index) => (await getCps(base, index, 1)).items[0]?.cp_id;
    /** The first offset whose id is not below `target` (the list's length if none). */
    const lowerBound = async (target) => {
      let lo = 0;
      let hi = total; // the answer is in [lo, hi]
      while (lo < hi) {
        const step = (hi - lo) / (SEEK_WAYS + 1);
        const probes = [...new Set(Array.from({ length: SEEK_WAYS }, (_, k) => lo + Math.floor(step * (k + 1))))];
        const ids = await Promise.all(probes.map(idAt));
        let next = hi;
        for (let k = 0; k < probes.length; k += 1) {
          if (ids[k] === undefined || ids[k] >= target) { // undefined: the list shrank meanwhile
            next = probes[k];
            break;
          }
          lo = probes[k] + 1;
        }
        hi = next;
      }
      return lo;
    };
    const last = prefix.charCodeAt(prefix.length - 1);
    const after = prefix.slice(0, -1) + String.fromCharCode(last + 1); // first id past the prefix
    return Promise.all([lowerBound(prefix), lowerBound(after)]);
  }

  function applyPage(filter, page, size, buffer) {
    view.offset = page.offset;
    list.filter = filter;
    list.offset = page.offset;
    list.total = page.total;
    list.items = page.items.map((cp) => buffer.cps.get(cp.cp_id) || cp);
    list.byId = new Map(list.items.map((cp) => [cp.cp_id, cp]));
    list.leaving.clear();
    list.loaded = true;
    shownPageSize = size;
    for (const t of buffer.telemetry.values()) applyTelemetry(t);
    for (const cp of buffer.cps.values()) placeCp(cp); // may ask for another read
    listDirty = true;
    scheduleRender();
  }

  /** The whole filtered list is on the page: changes can be applied without a read. */
  function pageIsComplete() {
    return list.offset === 0 && list.items.length === list.total && list.leaving.size === 0;
  }

  /** A CP's new state: update its row, or see whether it enters or leaves the page. */
  function placeCp(cp) {
    const cpId = cp.cp_id;
    const index = list.byId.has(cpId) ? list.items.findIndex((c) => c.cp_id === cpId) : -1;
    const match = matches(cp, list.filter);
    if (index >= 0) {
      list.items[index] = cp;
      list.byId.set(cpId, cp);
      dirtyIds.add(cpId);
      if (match) {
        if (list.leaving.delete(cpId)) listDirty = true;
      } else if (list.offset === 0 && list.items.length === list.total) {
        list.items.splice(index, 1);
        list.byId.delete(cpId);
        list.total -= 1;
        listDirty = true;
      } else if (!list.leaving.has(cpId)) {
        list.leaving.add(cpId);
        listDirty = true;
        requestLoad();
      }
      return;
    }
    if (!match) return;
    if (pageIsComplete()) {
      let at = list.items.findIndex((c) => c.cp_id > cpId);
      if (at < 0) at = list.items.length;
      list.items.splice(at, 0, cp);
      list.byId.set(cpId, cp);
      list.total += 1;
      if (list.items.length > shownPageSize) list.byId.delete(list.items.pop().cp_id);
      listDirty = true;
      return;
    }
    const lastId = list.items.length ? list.items[list.items.length - 1].cp_id : "";
    if (list.items.length < shownPageSize || cpId < lastId) requestLoad();
  }

  function onCp(cp) {
    if (!isCp(cp)) return;
    if (loading) {
      loading.cps.set(cp.cp_id, cp);
      loading.telemetry.delete(cp.cp_id); // the CP's JSON carries its latest telemetry
    }
    if (list.loaded) placeCp(cp);
  }

  function applyTelemetry(t) {
    const cp = list.byId.get(t.cp_id);
    if (!cp) return;
    cp.last_telemetry = t;
    cp.last_seen = new Date(serverNow()).toISOString();
    if (cp.session && cp.session.session_id === t.session_id) {
      cp.session.kw = t.kw;
      cp.session.kwh = t.kwh;
      cp.session.euros = t.euros;
      cp.session.confirmed = true;
    }
    dirtyIds.add(cp.cp_id);
  }

  function onTelemetry(t) {
    if (!t || typeof t.cp_id !== "string") return;
    if (loading) loading.telemetry.set(t.cp_id, t);
    applyTelemetry(t);
  }

  // ------------------------------------------------------------------ CP values

  /** Power and running totals of the CP's session now; zeros while it does not supply. */
  function liveValues(cp) {
    const session = cp.session;
    const telemetry = cp.last_telemetry;
    if (session) {
      const kw = cp.state === "SUPPLYING" ? num(session.kw) : 0;
      return { kw, kwh: num(session.kwh), euros: num(session.euros), idle: false };
    }
    if (cp.state === "SUPPLYING" && telemetry) {
      return { kw: num(telemetry.kw), kwh: num(telemetry.kwh), euros: num(telemetry.euros), idle: false };
    }
    return { kw: 0, kwh: 0, euros: 0, idle: true };
  }

  /** Why the CP is as it is, for people (a fault's reason, a stop's), or null. */
  function reasonOf(cp, state) {
    if (cp.is_faulty && cp.fault_reason) return `Fault: ${cp.fault_reason}`;
    if (cp.state_reason && ["FAULT", "STOPPED", "DISCONNECTED"].includes(state)) return String(cp.state_reason);
    return null;
  }

  // ------------------------------------------------------------------ the list

  /** cp_id -> {root, ...elements} of its card / its table row (only the page's). */
  const cards = new Map();
  const rows = new Map();

  function renderEmpty() {
    const empty = !summary || num(summary.cps) === 0;
    setHidden(els.gridEmpty, !empty || list.items.length > 0);
    setHidden(els.noMatch, empty || !list.loaded || list.items.length > 0);
  }

  function renderList() {
    renderEmpty();
    if (shownView === "cards") syncNodes(els.grid, cards, createCard);
    else syncNodes(els.rows, rows, createRow);
    for (const cp of list.items) renderItem(cp);
    renderPager();
  }

  /** Make `parent` hold exactly the page's nodes, in order, reusing the ones it has. */
  function syncNodes(parent, made, create) {
    const wanted = new Set(list.items.map((cp) => cp.cp_id));
    for (const [cpId, item] of made) {
      if (!wanted.has(cpId)) {
        item.root.remove();
        made.delete(cpId);
      }
    }
    list.items.forEach((cp, index) => {
      const item = made.get(cp.cp_id) || create(cp.cp_id);
      made.set(cp.cp_id, item);
      if (parent.children[index] !== item.root) parent.insertBefore(item.root, parent.children[index] || null);
    });
  }

  function renderItem(cp) {
    const card = cards.get(cp.cp_id);
    if (card) renderCard(cp, card);
    const row = rows.get(cp.cp_id);
    if (row) renderRow(cp, row);
  }

  function renderPager() {
    const total = list.total;
    const first = list.items.length ? list.offset + 1 : 0;
    const last = list.offset + list.items.length;
    setText(els.pageInfo, total === 0 ? "0 of 0" : `${count.format(first)}–${count.format(last)} of ${count.format(total)}`);
    const atStart = list.offset <= 0;
    const atEnd = list.offset + list.items.length >= total;
    if (els.pagePrev.disabled !== atStart) els.pagePrev.disabled = atStart;
    if (els.pageNext.disabled !== atEnd) els.pageNext.disabled = atEnd;
  }

  function createCard(cpId) {
    const root = els.cardTemplate.content.firstElementChild.cloneNode(true);
    root.dataset.cpId = cpId;
    const q = (selector) => root.querySelector(selector);
    const card = {
      root,
      id: q(".cp-id"),
      state: q(".cp-state"),
      faulty: q(".cp-faulty"),
      unmonitored: q(".cp-unmonitored"),
      where: q(".cp-where"),
      site: q(".cp-site"),
      location: q(".cp-location"),
      charger: q(".cp-charger"),
      kw: q(".cp-kw"),
      kwh: q(".cp-kwh"),
      euros: q(".cp-euros"),
      driver: q(".cp-driver"),
      session: q(".cp-session"),
      breaker: q(".cp-breaker"),
      reason: q(".cp-reason"),
      elapsed: q(".cp-elapsed"),
      last: q(".cp-last"),
      seen: q(".cp-seen"),
    };
    setText(card.id, cpId);
    card.id.title = cpId;
    root.addEventListener("animationend", () => root.classList.remove("flash"));
    return card;
  }

  /** "OCPP 1.6 · Vendor Model" for a charger behind the OCPP gateway, else "". */
  function chargerOf(cp) {
    if (!cp.protocol) return "";
    const protocol = String(cp.protocol).replace(/^ocpp/i, "OCPP ");
    const made = [cp.vendor, cp.model].filter(Boolean).join(" ");
    return made ? `${protocol} · ${made}` : protocol;
  }

  function setOptional(el, value, shown) {
    const present = value !== null && value !== undefined && value !== "";
    setText(el, present ? (shown ?? value) : "—");
    el.classList.toggle("is-empty", !present);
    setTitle(el, present ? String(value) : "");
  }

  function setState(item, state) {
    const previous = item.root.dataset.state;
    if (previous !== state) {
      setData(item.root, "state", state);
      if (previous && item.root.isConnected && item.rendered) item.root.classList.add("flash");
    }
    setText(item.state, state);
    setData(item.state, "state", state);
  }

  function setBreaker(el, cp) {
    const breaker = String(cp.circuit_breaker_state || "CLOSED");
    setText(el, breaker);
    setData(el, "breaker", breaker);
    setTitle(el, cp.circuit_breaker_reason ? String(cp.circuit_breaker_reason) : "");
  }

  function renderCard(cp, card) {
    const state = String(cp.state || "DISCONNECTED");
    setState(card, state);
    setHidden(card.faulty, !cp.is_faulty);
    card.root.classList.toggle("is-faulty", Boolean(cp.is_faulty));
    card.root.classList.toggle("is-leaving", list.leaving.has(cp.cp_id));
    setHidden(card.unmonitored, cp.monitored !== false);
    setText(card.site, cp.site || "");
    setText(card.location, cp.location || "");
    const charger = chargerOf(cp);
    setText(card.charger, charger);
    setTitle(card.charger, charger);
    setHidden(card.where, !cp.site && !cp.location && !charger);

    const v = liveValues(cp);
    setMetric(card.kw, v.kw.toFixed(1), "kW");
    setMetric(card.kwh, v.kwh.toFixed(3), "kWh");
    setMetric(card.euros, v.euros.toFixed(2), "€");
    card.root.classList.toggle("is-idle", v.idle);

    setOptional(card.driver, cp.current_driver);
    const sessionId = cp.current_session;
    setOptional(card.session, sessionId, sessionId && sessionId.length > 12 ? `${sessionId.slice(0, 10)}…` : sessionId);
    setBreaker(card.breaker, cp);

    const reason = reasonOf(cp, state);
    setHidden(card.reason, !reason);
    setText(card.reason, reason || "");

    const last = lastSessions.get(cp.cp_id);
    const showLast = Boolean(last) && !cp.session;
    setHidden(card.last, !showLast);
    if (showLast) {
      setText(card.last, `last: ${num(last.kwh).toFixed(3)} kWh · ${num(last.euros).toFixed(2)} €`);
      setTitle(card.last, `${String(last.result).toLowerCase()} session of ${last.driver_id}`);
    }

    card.rendered = true;
    renderCardClock(cp, card);
  }

  /** The parts of a card that change with time alone. */
  function renderCardClock(cp, card) {
    const now = serverNow();
    const started = cp.session ? parseTs(cp.session.started_at) : null;
    setText(card.elapsed, started !== null && cp.state === "SUPPLYING" ? `charging ${duration(now - started)}` : "");
    const seen = parseTs(cp.last_seen);
    setText(card.seen, seen === null ? "not seen yet" : `seen ${ago(now - seen)}`);
    card.root.classList.toggle("is-stale", cp.state === "SUPPLYING" && seen !== null && now - seen > STALE_MS);
  }

  function createRow(cpId) {
    const root = els.rowTemplate.content.firstElementChild.cloneNode(true);
    root.dataset.cpId = cpId;
    const q = (selector) => root.querySelector(selector);
    const row = {
      root,
      id: q(".cp-id"),
      site: q(".t-site"),
      state: q(".cp-state"),
      faulty: q(".cp-faulty"),
      unmonitored: q(".cp-unmonitored"),
      kw: q(".cp-kw"),
      kwh: q(".cp-kwh"),
      euros: q(".cp-euros"),
      driver: q(".cp-driver"),
      breaker: q(".cp-breaker"),
      reason: q(".cp-reason"),
      seen: q(".cp-seen"),
    };
    setText(row.id, cpId);
    root.title = cpId;
    root.addEventListener("animationend", () => root.classList.remove("flash"));
    return row;
  }

  function renderRow(cp, row) {
    const state = String(cp.state || "DISCONNECTED");
    setState(row, state);
    setHidden(row.faulty, !cp.is_faulty);
    row.root.classList.toggle("is-faulty", Boolean(cp.is_faulty));
    row.root.classList.toggle("is-leaving", list.leaving.has(cp.cp_id));
    setHidden(row.unmonitored, cp.monitored !== false);
    setOptional(row.site, cp.site);
    const v = liveValues(cp);
    setText(row.kw, v.kw.toFixed(1));
    setText(row.kwh, v.idle ? "—" : v.kwh.toFixed(3));
    setText(row.euros, v.idle ? "—" : v.euros.toFixed(2));
    row.root.classList.toggle("is-idle", v.idle);
    setOptional(row.driver, cp.current_driver);
    setBreaker(row.breaker, cp);
    const note = reasonOf(cp, state) || cp.location || "";
    setText(row.reason, note);
    setTitle(row.reason, note);
    row.rendered = true;
    renderRowClock(cp, row);
  }

  function renderRowClock(cp, row) {
    const seen = parseTs(cp.last_seen);
    setText(row.seen, seen === null ? "—" : ago(serverNow() - seen));
    row.root.classList.toggle("is-stale", cp.state === "SUPPLYING" && seen !== null && serverNow() - seen > STALE_MS);
  }

  // ------------------------------------------------------------------ feed

  const SESSION_WORDS = { COMPLETED: "Session completed", STOPPED: "Session stopped", FAILED: "Session failed" };
  const FEED_TYPES = new Set(["fault", "recovery", "session", "monitor"]);

  function feedKey(item) {
    if (item.type === "session") return `s|${item.session_id}|${item.result}`;
    return `${item.type}|${item.cp_id}|${item.reason}|${item.ts}`;
  }

  /** The same happening, told once by the database and once live (timestamps differ slightly). */
  function sameEvent(a, b) {
    if (a.type !== b.type || a.cp_id !== b.cp_id) return false;
    if (a.type === "session") return a.session_id === b.session_id && a.result === b.result;
    const ta = parseTs(a.ts);
    const tb = parseTs(b.ts);
    return a.reason === b.reason && ta !== null && tb !== null && Math.abs(ta - tb) < 5000;
  }

  /** Remember the newest finished session of each CP shown (for its card's "last" line). */
  function noteSession(item) {
    if (item.type !== "session" || typeof item.cp_id !== "string") return;
    const known = lastSessions.get(item.cp_id);
    const t = parseTs(item.ts) ?? 0;
    if (known && (parseTs(known.ts) ?? 0) > t) return;
    lastSessions.set(item.cp_id, item);
    if (list.byId.has(item.cp_id)) dirtyIds.add(item.cp_id);
  }

  function isFeedItem(item) {
    return Boolean(item) && typeof item === "object" && FEED_TYPES.has(item.type) && typeof item.cp_id === "string";
  }

  function feedKind(item) {
    if (item.type === "session") return String(item.result);
    if (item.type === "monitor") return item.monitored ? "monitor-back" : "monitor-lost";
    return item.type;
  }

  function feedWhat(item) {
    if (item.type === "fault") return "Fault";
    if (item.type === "recovery") return "Recovered";
    if (item.type === "monitor") return item.monitored ? "Monitor back" : "Monitor lost";
    return SESSION_WORDS[item.result] || `Session ${String(item.result).toLowerCase()}`;
  }

  function buildFeedItem(item) {
    const li = node("li", "feed-item");
    li.dataset.kind = feedKind(item);
    li.dataset.cpId = String(item.cp_id);
    li.dataset.key = feedKey(item);
    li.feedItem = item;

    const title = node("div", "feed-title");
    title.append(node("span", "feed-cp", item.cp_id), node("span", "feed-what", feedWhat(item)));

    const time = node("time", "feed-time");
    const t = parseTs(item.ts);
    if (t !== null) {
      time.dateTime = new Date(t).toISOString();
      time.textContent = clockTime(t);
      time.title = new Date(t).toLocaleString();
    }

    const detail = node("div", "feed-detail");
    if (item.type === "session") {
      const totalsText = `${num(item.kwh).toFixed(3)} kWh · ${num(item.euros).toFixed(2)} €`;
      detail.append(node("span", "feed-driver", item.driver_id), document.createTextNode(" · "),
        node("span", "feed-totals", totalsText));
      if (item.reason) detail.append(document.createTextNode(" — "), node("span", "feed-reason", item.reason));
      detail.title = `session ${item.session_id}`;
    } else {
      const fallback = item.type === "fault" ? "fault reported" : item.type === "recovery" ? "recovered" : "";
      detail.append(node("span", "feed-reason", item.reason || fallback));
    }
    li.append(node("span", "feed-dot"), title, time, detail);
    return li;
  }

  function renderFeedEmpty() {
    setHidden(els.feedEmpty, els.feed.children.length > 0);
  }

  /** Add live items (oldest first) at the top, unless the feed already holds them. */
  function pushFeed(items) {
    const fresh = items.filter(isFeedItem).slice(-FEED_BURST);
    if (fresh.length === 0) return;
    const shown = [...els.feed.children].map((li) => li.feedItem).filter(Boolean);
    const fragment = document.createDocumentFragment();
    const animate = fresh.length <= 5;
    for (const item of fresh) {
      if (shown.some((other) => sameEvent(other, item))) continue;
      noteSession(item);
      const li = buildFeedItem(item);
      if (animate) li.classList.add("is-new");
      fragment.prepend(li);
    }
    els.feed.prepend(fragment);
    while (els.feed.children.length > FEED_MAX) els.feed.lastElementChild.remove();
    renderFeedEmpty();
  }

  /** Make the feed show exactly `items` (newest first), reusing the nodes already shown. */
  function replaceFeed(items, animate) {
    const wanted = (Array.isArray(items) ? items : []).filter(isFeedItem).slice(0, FEED_MAX);
    wanted.forEach(noteSession);
    const existing = [...els.feed.children];
    const used = new Set();
    const nodes = wanted.map((item) => {
      const key = feedKey(item);
      let li = existing.find((n) => !used.has(n) && n.dataset.key === key);
      if (!li) li = existing.find((n) => !used.has(n) && n.feedItem && sameEvent(n.feedItem, item));
      if (li) {
        used.add(li);
        return li;
      }
      const fresh = buildFeedItem(item);
      if (animate) fresh.classList.add("is-new");
      return fresh;
    });
    for (const li of existing) if (!used.has(li)) li.remove();
    nodes.forEach((li, index) => {
      if (els.feed.children[index] !== li) els.feed.insertBefore(li, els.feed.children[index] || null);
    });
    renderFeedEmpty();
  }

  // ------------------------------------------------------------------ power chart

  const samples = [];

  function sample() {
    if (!summary) return;
    const now = Date.now();
    samples.push({ t: now, kw: num(summary.power_kw) });
    while (samples.length && samples[0].t < now - CHART_WINDOW_MS - SAMPLE_MS * 2) samples.shift();
  }

  /** The chart's top: four equal round steps (e.g. 0, 50, 100, 150, 200) just above the peak. */
  function niceMax(value) {
    const rawStep = Math.max(value * 1.1, 10) / 4;
    const magnitude = 10 ** Math.floor(Math.log10(rawStep));
    const step = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].map((m) => m * magnitude).find((s) => s >= rawStep);
    return 4 * step;
  }

  /** The time axis: as long as the samples go back, from one to ten minutes. */
  function chartWindow(now) {
    const span = samples.length ? now - samples[0].t : 0;
    const minutes = Math.min(10, Math.max(1, Math.ceil(span / 60000)));
    return Math.min(CHART_WINDOW_MS, Math.max(CHART_MIN_WINDOW_MS, minutes * 60000));
  }

  function axisLabel(v) {
    if (v >= 10000) return `${Math.round(v / 1000)}k`;
    if (v >= 1000) return `${(v / 1000).toFixed(1).replace(/\.0$/, "")}k`;
    return v % 1 === 0 ? String(v) : v.toFixed(1);
  }

  function drawChart() {
    const canvas = els.chart;
    const dpr = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
      canvas.width = Math.round(width * dpr);
      canvas.height = Math.round(height * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const pad = { left: 40, right: 10, top: 10, bottom: 22 };
    const w = width - pad.left - pad.right;
    const h = height - pad.top - pad.bottom;
    const now = Date.now();
    const windowMs = chartWindow(now);
    const minutes = windowMs / 60000;
    const start = now - windowMs;
    const peakKw = samples.reduce((m, s) => (s.t >= start ? Math.max(m, s.kw) : m), 0);
    const scale = peakKw >= 10000 ? 1000 : 1; // the axis in MW for a large network
    setText(els.powerNote, `${scale === 1 ? "kW" : "MW"} · last ${minutes === 1 ? "minute" : `${minutes} minutes`}`);
    const top = niceMax(peakKw / scale) * scale;
    const x = (t) => pad.left + ((t - start) / windowMs) * w;
    const y = (kw) => pad.top + h - (kw / top) * h;

    ctx.font = "11px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let i = 0; i <= 4; i += 1) {
      const kw = (top / 4) * i;
      const yy = Math.round(y(kw)) + 0.5;
      ctx.strokeStyle = i === 0 ? "#2e3b5c" : "rgba(46, 59, 92, 0.55)";
      ctx.setLineDash(i === 0 ? [] : [3, 4]);
      ctx.beginPath();
      ctx.moveTo(pad.left, yy);
      ctx.lineTo(pad.left + w, yy);
      ctx.stroke();
      ctx.fillStyle = "#5d6a86";
      ctx.fillText(axisLabel(kw / scale), pad.left - 7, yy);
    }
    ctx.setLineDash([]);
    ctx.textBaseline = "alphabetic";
    const stepMs = minutes <= 1 ? 15000 : minutes <= 2 ? 30000 : minutes <= 5 ? 60000 : 120000;
    for (let back = Math.floor(windowMs / stepMs) * stepMs; back >= 0; back -= stepMs) {
      const xx = x(now - back);
      ctx.fillStyle = "#5d6a86";
      ctx.textAlign = back === 0 ? "right" : back === windowMs ? "left" : "center";
      const label = back === 0 ? "now" : back < 60000 ? `-${back / 1000}s` : `-${back / 60000} min`;
      ctx.fillText(label, xx, height - 5);
    }

    const points = samples.filter((s) => s.t >= start - SAMPLE_MS * 2);
    if (points.length === 0) return;
    const last = points[points.length - 1];

    ctx.save();
    ctx.beginPath();
    ctx.rect(pad.left, pad.top - 4, w + 4, h + 8);
    ctx.clip();

    const gradient = ctx.createLinearGradient(0, pad.top, 0, pad.top + h);
    gradient.addColorStop(0, "rgba(79, 157, 255, 0.38)");
    gradient.addColorStop(1, "rgba(79, 157, 255, 0.02)");
    ctx.beginPath();
    ctx.moveTo(x(points[0].t), y(0));
    for (const p of points) ctx.lineTo(x(p.t), y(p.kw));
    ctx.lineTo(x(last.t), y(0));
    ctx.closePath();
    ctx.fillStyle = gradient;
    ctx.fill();

    ctx.beginPath();
    points.forEach((p, i) => (i === 0 ? ctx.moveTo(x(p.t), y(p.kw)) : ctx.lineTo(x(p.t), y(p.kw))));
    ctx.strokeStyle = "#4f9dff";
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.stroke();

    ctx.beginPath();
    ctx.arc(x(last.t), y(last.kw), 3.5, 0, Math.PI * 2);
    ctx.fillStyle = "#38bdf8";
    ctx.fill();
    ctx.restore();

    ctx.font = "600 12px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
    ctx.textAlign = "right";
    ctx.textBaseline = "top";
    ctx.fillStyle = "#e6ebf5";
    ctx.fillText(powerText(last.kw), pad.left + w - 2, pad.top + 2);
  }

  // ------------------------------------------------------------------ messages

  function handle(msg) {
    if (!msg || typeof msg !== "object") return;
    switch (msg.type) {
      case "snapshot": {
        const ts = parseTs(msg.ts);
        if (ts !== null) serverOffset = ts - Date.now();
        setSummary(msg.summary);
        replaceFeed(msg.feed, everConnected);
        everConnected = true;
        stopPolling();
        setMode("ws");
        updateView();
        requestLoad({ now: true }); // the page may have changed while nobody told us
        break;
      }
      case "delta": {
        if (Array.isArray(msg.cps)) for (const cp of msg.cps) onCp(cp);
        if (Array.isArray(msg.telemetry)) for (const t of msg.telemetry) onTelemetry(t);
        if (Array.isArray(msg.events)) pushFeed(msg.events);
        if (msg.summary) setSummary(msg.summary);
        scheduleRender();
        break;
      }
      default:
        break; // future message types
    }
  }

  // ------------------------------------------------------------------ WebSocket

  let socket = null;
  let attempt = 0;
  let reconnectTimer = null;
  let graceTimer = null;

  function wsUrl() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    return `${scheme}${window.location.host}/ws`;
  }

  function connect() {
    reconnectTimer = null;
    if (mode !== "polling") setMode("connecting");
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (err) {
      onSocketDown();
      return;
    }
    socket = ws;
    clearTimeout(graceTimer);
    graceTimer = setTimeout(() => {
      if (mode !== "ws") startPolling();
    }, WS_GRACE_MS);
    ws.addEventListener("open", () => {
      attempt = 0;
    });
    ws.addEventListener("message", (event) => {
      if (socket !== ws) return;
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      handle(msg);
    });
    ws.addEventListener("close", () => {
      if (socket !== ws) return;
      socket = null;
      onSocketDown();
    });
  }

  function onSocketDown() {
    clearTimeout(graceTimer);
    if (mode === "ws") setMode("connecting");
    startPolling();
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt) * (0.8 + Math.random() * 0.4);
    attempt = Math.min(attempt + 1, 10);
    if (reconnectTimer === null) reconnectTimer = setTimeout(connect, delay);
  }

  // ------------------------------------------------------------------ polling fallback

  let pollTimer = null;
  let polling = false;

  function startPolling() {
    if (pollTimer !== null) return;
    pollTimer = setInterval(poll, POLL_MS);
    poll();
  }

  function stopPolling() {
    if (pollTimer !== null) clearInterval(pollTimer);
    pollTimer = null;
  }

  async function poll() {
    if (polling || mode === "ws") return;
    polling = true;
    try {
      const [summaryRes, feedRes] = await Promise.all([
        fetch("/summary", FETCH_OPTIONS),
        fetch(`/api/feed?limit=${FEED_MAX}`, FETCH_OPTIONS),
      ]);
      if (!summaryRes.ok || !feedRes.ok) throw new Error(`HTTP ${summaryRes.status}/${feedRes.status}`);
      const [fresh, feed] = await Promise.all([summaryRes.json(), feedRes.json()]);
      if (mode === "ws" || pollTimer === null) return;
      const date = parseTs(summaryRes.headers.get("Date"));
      if (date !== null && Math.abs(date - Date.now() - serverOffset) > 2000) serverOffset = date - Date.now();
      setSummary(fresh);
      replaceFeed(feed, everConnected);
      everConnected = true;
      setMode("polling");
      updateView();
      requestLoad({ now: true });
    } catch (err) {
      if (mode !== "ws") setMode("connecting");
    } finally {
      polling = false;
    }
  }

  // ------------------------------------------------------------------ controls

  function bindControls() {
    els.filterState.addEventListener("change", () => setFilter({ state: els.filterState.value }));
    els.filterSite.addEventListener("change", () => setFilter({ site: els.filterSite.value }));
    let searchTimer = null;
    els.filterSearch.addEventListener("input", () => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => {
        const prefix = els.filterSearch.value.trim();
        if (prefix !== view.prefix) setFilter({ prefix });
      }, SEARCH_DEBOUNCE_MS);
    });
    els.filterClear.addEventListener("click", () => setFilter({ state: "", site: "", prefix: "" }));
    for (const button of els.viewButtons) {
      button.addEventListener("click", () => {
        view.choice = button.dataset.view;
        view.offset = Math.floor(view.offset / CARD_PAGE) * CARD_PAGE;
        updateView();
      });
    }
    els.pagePrev.addEventListener("click", () => {
      view.offset = Math.max(0, list.offset - shownPageSize);
      requestLoad({ now: true });
    });
    els.pageNext.addEventListener("click", () => {
      view.offset = list.offset + shownPageSize;
      requestLoad({ now: true });
    });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        if (list.loaded && pageSize() !== shownPageSize) requestLoad({ now: true });
      }, 200);
    });
  }

  // ------------------------------------------------------------------ clock

  function tick() {
    sample();
    for (const [cpId, card] of cards) {
      const cp = list.byId.get(cpId);
      if (cp) renderCardClock(cp, card);
    }
    for (const [cpId, row] of rows) {
      const cp = list.byId.get(cpId);
      if (cp) renderRowClock(cp, row);
    }
    drawChart();
  }

  function start() {
    setMode("connecting");
    buildStateTiles();
    bindControls();
    renderFeedEmpty();
    updateView();
    renderPager();
    if (typeof ResizeObserver === "function") new ResizeObserver(drawChart).observe(els.chart);
    tick();
    setInterval(tick, SAMPLE_MS);
    loadSiteLimits();
    setInterval(loadSiteLimits, SITES_MS);
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
