/*
 * EV Central live dashboard.
 *
 * Follows Central over the /ws WebSocket (a "snapshot" first, then one event per change).
 * While the socket is down it polls GET /cp and GET /api/feed every 2 s and keeps trying
 * to reconnect with an exponential backoff; the next snapshot re-syncs everything.
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
  const CHART_WINDOW_MS = 3 * 60 * 1000;
  const SAMPLE_MS = 1000;
  const STALE_MS = 10000;

  const $ = (id) => document.getElementById(id);
  const els = {
    conn: $("conn"),
    connLabel: document.querySelector("#conn .conn-label"),
    grid: $("grid"),
    gridEmpty: $("grid-empty"),
    feed: $("feed"),
    feedEmpty: $("feed-empty"),
    cardTemplate: $("cp-card-template"),
    statCps: $("stat-cps"),
    statSupplying: $("stat-supplying"),
    statFaulty: $("stat-faulty"),
    statKw: $("stat-kw"),
    chart: $("power-chart"),
  };

  /** cp_id -> the CP as Central describes it (GET /cp), updated by events. */
  const cps = new Map();
  /** cp_id -> the newest finished session seen in the feed (for "last session" on the card). */
  const lastSessions = new Map();
  /** cp_id -> {root, ...elements} of its card. */
  const cards = new Map();
  /** Milliseconds to add to Date.now() to get Central's clock. */
  let serverOffset = 0;
  let mode = null;
  let everConnected = false;

  const serverNow = () => Date.now() + serverOffset;
  const parseTs = (ts) => {
    const t = Date.parse(ts);
    return Number.isFinite(t) ? t : null;
  };
  const num = (value) => {
    const n = Number(value);
    return Number.isFinite(n) ? n : 0;
  };
  const compareIds = (a, b) => a.localeCompare(b, undefined, { numeric: true, sensitivity: "base" });

  function setText(el, text) {
    const value = String(text);
    if (el.textContent !== value) el.textContent = value;
  }

  function setData(el, key, value) {
    if (el.dataset[key] !== value) el.dataset[key] = value;
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

  function totals() {
    let supplying = 0;
    let faulty = 0;
    let kw = 0;
    for (const cp of cps.values()) {
      if (cp.state === "SUPPLYING") supplying += 1;
      if (cp.is_faulty || cp.state === "FAULT") faulty += 1;
      kw += liveValues(cp).kw;
    }
    return { count: cps.size, supplying, faulty, kw };
  }

  function renderStats() {
    const t = totals();
    setText(els.statCps, t.count);
    setText(els.statSupplying, t.supplying);
    setText(els.statFaulty, t.faulty);
    els.statFaulty.parentElement.classList.toggle("is-alert", t.faulty > 0);
    setText(els.statKw, t.kw.toFixed(1));
    const title = t.faulty > 0 ? `(${t.faulty} faulty) EV Central` : "EV Central · Charging network";
    if (document.title !== title) document.title = title;
    els.gridEmpty.hidden = cps.size > 0;
  }

  // ------------------------------------------------------------------ cards

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
      location: q(".cp-location"),
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
    let before = null;
    for (const other of els.grid.children) {
      if (compareIds(other.dataset.cpId, cpId) > 0) {
        before = other;
        break;
      }
    }
    els.grid.insertBefore(root, before);
    cards.set(cpId, card);
    return card;
  }

  function setOptional(el, value, shown) {
    const present = value !== null && value !== undefined && value !== "";
    setText(el, present ? (shown ?? value) : "—");
    el.classList.toggle("is-empty", !present);
    el.title = present ? String(value) : "";
  }

  function renderCard(cp) {
    const card = cards.get(cp.cp_id) || createCard(cp.cp_id);
    const state = String(cp.state || "DISCONNECTED");
    const previous = card.root.dataset.state;
    if (previous !== state) {
      setData(card.root, "state", state);
      if (previous && card.root.isConnected && card.rendered) card.root.classList.add("flash");
    }
    setText(card.state, state);
    setData(card.state, "state", state);
    card.faulty.hidden = !cp.is_faulty;
    card.root.classList.toggle("is-faulty", Boolean(cp.is_faulty));
    card.unmonitored.hidden = cp.monitored !== false;
    setText(card.location, cp.location || "");

    const v = liveValues(cp);
    setMetric(card.kw, v.kw.toFixed(1), "kW");
    setMetric(card.kwh, v.kwh.toFixed(3), "kWh");
    setMetric(card.euros, v.euros.toFixed(2), "€");
    card.root.classList.toggle("is-idle", v.idle);

    setOptional(card.driver, cp.current_driver);
    const sessionId = cp.current_session;
    setOptional(card.session, sessionId, sessionId && sessionId.length > 12 ? `${sessionId.slice(0, 10)}…` : sessionId);

    const breaker = String(cp.circuit_breaker_state || "CLOSED");
    setText(card.breaker, breaker);
    setData(card.breaker, "breaker", breaker);
    card.breaker.title = cp.circuit_breaker_reason ? String(cp.circuit_breaker_reason) : "";

    let reason = null;
    if (cp.is_faulty && cp.fault_reason) reason = `Fault: ${cp.fault_reason}`;
    else if (cp.state_reason && ["FAULT", "STOPPED", "DISCONNECTED"].includes(state)) reason = cp.state_reason;
    card.reason.hidden = !reason;
    setText(card.reason, reason || "");

    const last = lastSessions.get(cp.cp_id);
    const showLast = Boolean(last) && !cp.session;
    card.last.hidden = !showLast;
    if (showLast) {
      setText(card.last, `last: ${num(last.kwh).toFixed(3)} kWh · ${num(last.euros).toFixed(2)} €`);
      card.last.title = `${String(last.result).toLowerCase()} session of ${last.driver_id}`;
    }

    card.rendered = true;
    renderClock(cp, card);
  }

  /** The parts of a card that change with time alone. */
  function renderClock(cp, card) {
    const now = serverNow();
    const started = cp.session ? parseTs(cp.session.started_at) : null;
    setText(card.elapsed, started !== null && cp.state === "SUPPLYING" ? `charging ${duration(now - started)}` : "");
    const seen = parseTs(cp.last_seen);
    setText(card.seen, seen === null ? "not seen yet" : `seen ${ago(now - seen)}`);
    card.root.classList.toggle("is-stale", cp.state === "SUPPLYING" && seen !== null && now - seen > STALE_MS);
  }

  function removeCard(cpId) {
    const card = cards.get(cpId);
    if (card) card.root.remove();
    cards.delete(cpId);
  }

  function upsertCp(cp) {
    if (!cp || typeof cp.cp_id !== "string") return;
    cps.set(cp.cp_id, cp);
    renderCard(cp);
  }

  function replaceCps(list) {
    const seen = new Set();
    for (const cp of Array.isArray(list) ? list : []) {
      if (!cp || typeof cp.cp_id !== "string") continue;
      seen.add(cp.cp_id);
      upsertCp(cp);
    }
    for (const cpId of [...cps.keys()]) {
      if (!seen.has(cpId)) {
        cps.delete(cpId);
        removeCard(cpId);
      }
    }
    renderStats();
  }

  function applyTelemetry(t) {
    if (!t || typeof t.cp_id !== "string") return;
    const cp = cps.get(t.cp_id);
    if (!cp) return;
    cp.last_telemetry = t;
    cp.last_seen = new Date(serverNow()).toISOString();
    if (cp.session && cp.session.session_id === t.session_id) {
      cp.session.kw = t.kw;
      cp.session.kwh = t.kwh;
      cp.session.euros = t.euros;
      cp.session.confirmed = true;
    }
    renderCard(cp);
    renderStats();
  }

  // ------------------------------------------------------------------ feed

  const SESSION_WORDS = { COMPLETED: "Session completed", STOPPED: "Session stopped", FAILED: "Session failed" };

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

  /** Remember the newest finished session of each CP; re-render its card when it changed. */
  function noteSession(item) {
    if (item.type !== "session" || typeof item.cp_id !== "string") return;
    const known = lastSessions.get(item.cp_id);
    const t = parseTs(item.ts) ?? 0;
    if (known && (parseTs(known.ts) ?? 0) > t) return;
    lastSessions.set(item.cp_id, item);
    const cp = cps.get(item.cp_id);
    if (cp) renderCard(cp);
  }

  function isFeedItem(item) {
    return item && typeof item === "object" && ["fault", "recovery", "session"].includes(item.type);
  }

  function buildFeedItem(item) {
    const kind = item.type === "session" ? String(item.result) : item.type;
    const li = node("li", "feed-item");
    li.dataset.kind = kind;
    li.dataset.cpId = String(item.cp_id);
    li.dataset.key = feedKey(item);
    li.feedItem = item;

    const title = node("div", "feed-title");
    const what =
      item.type === "fault" ? "Fault"
        : item.type === "recovery" ? "Recovered"
          : SESSION_WORDS[item.result] || `Session ${String(item.result).toLowerCase()}`;
    title.append(node("span", "feed-cp", item.cp_id), node("span", "feed-what", what));

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
      detail.append(node("span", "feed-reason", item.reason || (item.type === "fault" ? "fault reported" : "recovered")));
    }
    li.append(node("span", "feed-dot"), title, time, detail);
    return li;
  }

  function renderFeedEmpty() {
    els.feedEmpty.hidden = els.feed.children.length > 0;
  }

  /** Add one live item at the top, unless the snapshot already holds it. */
  function pushFeed(item) {
    if (!isFeedItem(item)) return;
    for (const li of els.feed.children) {
      if (li.feedItem && sameEvent(li.feedItem, item)) return;
    }
    noteSession(item);
    const li = buildFeedItem(item);
    li.classList.add("is-new");
    els.feed.prepend(li);
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
    const now = Date.now();
    samples.push({ t: now, kw: totals().kw });
    while (samples.length && samples[0].t < now - CHART_WINDOW_MS - SAMPLE_MS * 2) samples.shift();
  }

  /** The chart's top: four equal round steps (e.g. 0, 50, 100, 150, 200) just above the peak. */
  function niceMax(value) {
    const rawStep = Math.max(value * 1.1, 10) / 4;
    const magnitude = 10 ** Math.floor(Math.log10(rawStep));
    const step = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].map((m) => m * magnitude).find((s) => s >= rawStep);
    return 4 * step;
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

    const pad = { left: 38, right: 10, top: 10, bottom: 22 };
    const w = width - pad.left - pad.right;
    const h = height - pad.top - pad.bottom;
    const now = Date.now();
    const start = now - CHART_WINDOW_MS;
    const peak = samples.reduce((m, s) => Math.max(m, s.kw), 0);
    const top = niceMax(peak);
    const x = (t) => pad.left + ((t - start) / CHART_WINDOW_MS) * w;
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
      ctx.fillText(kw % 1 === 0 ? String(kw) : kw.toFixed(1), pad.left - 7, yy);
    }
    ctx.setLineDash([]);
    ctx.textAlign = "center";
    ctx.textBaseline = "alphabetic";
    for (let m = 3; m >= 0; m -= 1) {
      const xx = x(now - m * 60000);
      ctx.fillStyle = "#5d6a86";
      ctx.textAlign = m === 0 ? "right" : m === 3 ? "left" : "center";
      ctx.fillText(m === 0 ? "now" : `-${m} min`, xx, height - 5);
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

    const label = `${last.kw.toFixed(1)} kW`;
    ctx.font = "600 12px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
    ctx.textAlign = "right";
    ctx.textBaseline = "top";
    ctx.fillStyle = "#e6ebf5";
    ctx.fillText(label, pad.left + w - 2, pad.top + 2);
  }

  // ------------------------------------------------------------------ messages

  function applySnapshot(list, feed, animateFeed) {
    replaceCps(list);
    replaceFeed(feed, animateFeed);
  }

  function handle(msg) {
    if (!msg || typeof msg !== "object") return;
    switch (msg.type) {
      case "snapshot": {
        const ts = parseTs(msg.ts);
        if (ts !== null) serverOffset = ts - Date.now();
        applySnapshot(msg.cps, msg.feed, everConnected);
        everConnected = true;
        stopPolling();
        setMode("ws");
        break;
      }
      case "cp":
        upsertCp(msg.cp);
        renderStats();
        break;
      case "telemetry":
        applyTelemetry(msg.telemetry);
        break;
      case "fault":
      case "recovery":
      case "session":
        pushFeed(msg);
        break;
      default:
        break; // "overflow" and future event types: the server re-sends a snapshot
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
      const [cpRes, feedRes] = await Promise.all([
        fetch("/cp", { cache: "no-store", headers: { Accept: "application/json" } }),
        fetch(`/api/feed?limit=${FEED_MAX}`, { cache: "no-store", headers: { Accept: "application/json" } }),
      ]);
      if (!cpRes.ok || !feedRes.ok) throw new Error(`HTTP ${cpRes.status}/${feedRes.status}`);
      const [list, feed] = await Promise.all([cpRes.json(), feedRes.json()]);
      if (mode === "ws" || pollTimer === null) return;
      const date = parseTs(cpRes.headers.get("Date"));
      if (date !== null && Math.abs(date - Date.now() - serverOffset) > 2000) serverOffset = date - Date.now();
      applySnapshot(list, feed, everConnected);
      everConnected = true;
      setMode("polling");
    } catch (err) {
      if (mode !== "ws") setMode("connecting");
    } finally {
      polling = false;
    }
  }

  // ------------------------------------------------------------------ clock

  function tick() {
    sample();
    for (const [cpId, card] of cards) {
      const cp = cps.get(cpId);
      if (cp) renderClock(cp, card);
    }
    drawChart();
  }

  function start() {
    setMode("connecting");
    renderStats();
    renderFeedEmpty();
    if (typeof ResizeObserver === "function") new ResizeObserver(drawChart).observe(els.chart);
    tick();
    setInterval(tick, SAMPLE_MS);
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
