// kvbound's dashboard. Polls dashboard/data (the /v1/memory document plus running totals and the latest memory
// events; kvbound/server/dashboard.py) once a second with fetch, so it can send the API key as a bearer header
// (an EventSource could not). The cards and tables are filled whether or not the chart library loaded; uPlot, when
// present, draws the last HISTORY samples. No framework and no build step: this file is served as it is.
(() => {
  "use strict";
  const POLL_MS = 1000;
  const HISTORY = 300; // samples the charts keep: five minutes at one a second
  const MAX_SESSION_LINES = 8; // the KV chart draws the largest sessions; the table lists every one
  const KEY_STORE = "kvbound.dashboard.key";
  const DATA_URL = new URL("dashboard/data", document.baseURI);
  const PALETTE = ["#2563eb", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#9333ea",
    "#ea580c", "#0d9488"];
  const $ = (id) => document.getElementById(id);

  // -- the API key: from ?key= or #key= (a fragment never reaches the server or its access log), kept for this tab
  // in sessionStorage and taken out of the address bar; or typed into the form a 401 shows
  function storage() {
    try { return window.sessionStorage; } catch { return null; } // blocked storage: the key lives in memory
  }
  let apiKey = "";
  {
    const query = new URLSearchParams(location.search), fragment = new URLSearchParams(location.hash.slice(1));
    apiKey = fragment.get("key") || query.get("key") || storage()?.getItem(KEY_STORE) || "";
    if (query.has("key") || fragment.has("key")) {
      storage()?.setItem(KEY_STORE, apiKey);
      query.delete("key");
      fragment.delete("key");
      const rest = (params, mark) => (params.toString() ? mark + params : "");
      history.replaceState(null, "", location.pathname + rest(query, "?") + rest(fragment, "#"));
    }
  }
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = $("key-input").value.trim();
    storage()?.setItem(KEY_STORE, apiKey);
    poll();
  });

  // -- numbers as the CLI and the logs write them ---------------------------------------------------------------
  // kvbound.kvcache.spec.format_bytes: "512 B", "64.0 KiB", "1.5 MiB". Python rounds half to even; byte counts
  // over powers of 1024 are exact binary fractions, so ×10 is exact and the tie test below is too.
  function formatBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB"];
    let unit = 0;
    while (Math.abs(n) >= 1024 && unit < units.length - 1) { n /= 1024; unit++; }
    if (unit === 0) return `${Math.round(n)} B`;
    const scaled = n * 10, floor = Math.floor(scaled), rest = scaled - floor;
    const tenths = rest > 0.5 || (rest === 0.5 && floor % 2 !== 0) ? floor + 1 : floor;
    return `${(tenths / 10).toFixed(1)} ${units[unit]}`;
  }
  const count = (n) => Number(n).toLocaleString("en-US"); // Python's f"{n:,}"
  const percent = (fraction) => `${(100 * fraction).toFixed(1)}%`;
  const clock = (seconds) => new Date(seconds * 1000).toLocaleTimeString([], {hour12: false});
  // the memory guard's thresholds (kvbound.memory.guard.DEFAULT_THRESHOLDS) colour a bar
  const level = (fraction) => (fraction >= 0.95 ? "critical" : fraction >= 0.8 ? "warning" : "");

  function setStatus(text, kind) {
    const status = $("status");
    status.textContent = text;
    status.className = `status ${kind}`;
  }

  function fillBar(bar, fraction) {
    bar.style.width = `${Math.min(100, 100 * fraction)}%`;
    bar.className = level(fraction);
  }

  function cell(row, field, text, value, className) {
    const td = row.insertCell();
    td.dataset.field = field;
    if (value !== undefined && value !== null) td.dataset.value = value;
    if (className) td.className = className;
    td.textContent = text; // never innerHTML: session ids and messages come from clients
    return td;
  }

  // -- one sample -----------------------------------------------------------------------------------------------
  let previous = null; // {time, generated}: the token rate is the change between two polls

  function tokenRate(data) {
    const sample = {time: data.time, generated: data.totals.generated_tokens};
    const before = previous;
    previous = sample;
    if (!before || sample.time <= before.time || sample.generated < before.generated) return null;
    return (sample.generated - before.generated) / (sample.time - before.time);
  }

  function render(data) {
    const {pool, process, engine, sessions} = data.memory;
    const totals = data.totals;
    const rate = tokenRate(data);
    $("model").textContent = data.model;
    setStatus(`live · updated ${clock(data.time)}`, "live");

    $("kv-budget").textContent = formatBytes(pool.budget_bytes);
    $("kv-capacity").textContent = `${count(pool.capacity_tokens)} tokens · ${count(pool.blocks)} blocks of ` +
      `${pool.block_tokens} · ${pool.dtype}`;
    const share = pool.budget_bytes ? pool.used_bytes / pool.budget_bytes : 0;
    $("kv-used").textContent = formatBytes(pool.used_bytes);
    $("kv-used-share").textContent = `${percent(share)} · ${count(pool.used_blocks)} blocks` +
      (pool.reserved_blocks ? ` + ${count(pool.reserved_blocks)} reserved` : "");
    fillBar($("kv-used-bar"), share);

    $("rss").textContent = formatBytes(process.rss_bytes);
    $("rss-detail").textContent = `peak ${formatBytes(process.peak_rss_bytes)} · weights ` +
      formatBytes(process.weights_bytes) +
      (process.device_allocated_bytes ? ` · device ${formatBytes(process.device_allocated_bytes)}` : "");

    $("token-rate").textContent = rate === null ? "–" : rate.toFixed(1);
    $("generated").textContent = `${count(totals.generated_tokens)} generated · ${engine.active} active, ` +
      `${engine.queued} queued`;
    $("evicted").textContent = count(totals.evicted_tokens);
    $("offloads").textContent = `${count(engine.offloads)} session offloads`;
    const events = totals.memory_events;
    $("event-counts").textContent = count(events.warning + events.critical + events.refused);
    $("event-levels").textContent = `${events.warning} warning · ${events.critical} critical · ` +
      `${events.refused} refused`;

    renderSessions(sessions, pool.budget_bytes);
    renderEvents(data.events);
    remember(data, rate);
    draw();
  }

  function renderSessions(sessions, budget) {
    const body = $("sessions").tBodies[0];
    body.replaceChildren();
    const ordered = [...sessions].sort((a, b) => a.created - b.created || (a.id < b.id ? -1 : 1));
    for (const s of ordered) {
      const row = body.insertRow();
      row.dataset.session = s.id;
      cell(row, "id", s.id);
      cell(row, "state", s.state, s.state, `state-${s.state}`);
      cell(row, "turns", count(s.turns), s.turns, "num");
      cell(row, "kv_tokens", count(s.kv_tokens), s.kv_tokens, "num");
      cell(row, "kv_bytes", formatBytes(s.kv_bytes), s.kv_bytes, "num");
      const fraction = budget ? s.kv_bytes / budget : 0;
      const share = cell(row, "share", percent(fraction), fraction);
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.appendChild(document.createElement("div"));
      fillBar(bar.firstChild, fraction);
      share.prepend(bar);
      const evicted = s.memory ? s.memory.tokens_evicted : null; // null while offloaded
      cell(row, "tokens_evicted", evicted === null ? "–" : count(evicted), evicted, "num");
      cell(row, "offloads", count(s.offloads), s.offloads, "num");
      cell(row, "forecast", s.forecast || (s.memory && s.memory.forecast) || "", undefined, "wide");
    }
    $("no-sessions").hidden = sessions.length > 0;
  }

  function renderEvents(events) {
    const body = $("events").tBodies[0];
    body.replaceChildren();
    for (const event of [...events].reverse().slice(0, 20)) {
      const row = body.insertRow();
      cell(row, "time", clock(event.time));
      cell(row, "kind", event.kind, event.kind, `level-${event.kind}`);
      cell(row, "message", event.message, undefined, "wide");
    }
    $("no-events").hidden = events.length > 0;
  }

  // -- history and charts ---------------------------------------------------------------------------------------
  const past = {time: [], budget: [], used: [], rss: [], rate: [], sessions: new Map()}; // sessions: id → bytes[]
  const colors = new Map(); // session id → its line's colour, kept while it is drawn

  function remember(data, rate) {
    const {pool, process, sessions} = data.memory;
    past.time.push(data.time);
    past.budget.push(pool.budget_bytes);
    past.used.push(pool.used_bytes);
    past.rss.push(process.rss_bytes);
    past.rate.push(rate);
    const now = new Map(sessions.map((s) => [s.id, s.kv_bytes]));
    for (const id of now.keys()) {
      if (!past.sessions.has(id)) past.sessions.set(id, new Array(past.time.length - 1).fill(null));
    }
    for (const [id, values] of past.sessions) values.push(now.has(id) ? now.get(id) : null);
    if (past.time.length > HISTORY) {
      for (const name of ["time", "budget", "used", "rss", "rate"]) past[name].shift();
      for (const [id, values] of past.sessions) {
        values.shift();
        if (values.every((v) => v === null)) past.sessions.delete(id);
      }
    }
  }

  // byte axes tick at powers of two (256 KiB, 512 KiB, …), which format_bytes writes short
  const BINARY_STEPS = Array.from({length: 48}, (_, power) => 2 ** power);
  const charts = new Map(); // element id → {plot, key}: a chart is rebuilt only when its lines change

  function plot(id, lines, data, format, binary = false) {
    const element = $(id);
    const key = lines.map((line) => line.label).join("\n");
    const entry = charts.get(id);
    if (entry && entry.key === key) {
      entry.plot.setData(data);
      return;
    }
    if (entry) entry.plot.destroy();
    // the legend shows the value under the cursor, or the latest one while the cursor is elsewhere
    const show = (u, value, series, index) => {
      if (index === null || index === undefined) value = u.data[series].at(-1);
      return value === null || value === undefined ? "–" : format(value);
    };
    const options = {
      width: element.clientWidth, height: 220,
      series: [{}, ...lines.map((line) => ({label: line.label, stroke: line.color, width: line.width || 1.5,
        dash: line.dash, value: show, spanGaps: false, points: {show: false}}))],
      scales: {x: {time: true}, y: {range: (u, min, max) => [0, max > 0 ? max * 1.08 : 1]}},
      axes: [{}, {size: 80, values: (u, ticks) => ticks.map(format), incrs: binary ? BINARY_STEPS : undefined}],
    };
    charts.set(id, {plot: new uPlot(options, data, element), key});
  }

  function draw() {
    if (typeof uPlot === "undefined") return;
    const latest = (id) => past.sessions.get(id).at(-1) ?? -1;
    const largest = [...past.sessions.keys()].sort((a, b) => latest(b) - latest(a) || (a < b ? -1 : 1))
      .slice(0, MAX_SESSION_LINES).sort();
    for (const id of colors.keys()) if (!largest.includes(id)) colors.delete(id);
    for (const id of largest) {
      if (!colors.has(id)) {
        const used = new Set(colors.values());
        colors.set(id, PALETTE.find((c) => !used.has(c)) || PALETTE[colors.size % PALETTE.length]);
      }
    }
    plot("kv-chart", [
      {label: "budget", color: "#9ca3af", dash: [6, 4]},
      {label: "pool used", color: "#111827", width: 2.5},
      ...largest.map((id) => ({label: id, color: colors.get(id)})),
    ], [past.time, past.budget, past.used, ...largest.map((id) => past.sessions.get(id))], formatBytes, true);
    plot("rss-chart", [{label: "RSS", color: "#7c3aed", width: 2}], [past.time, past.rss], formatBytes, true);
    plot("rate-chart", [{label: "tokens/s", color: "#059669", width: 2}], [past.time, past.rate],
      (v) => v.toFixed(v > 0 && v < 10 ? 1 : 0));
  }

  window.addEventListener("resize", () => {
    for (const [id, {plot: chart}] of charts) chart.setSize({width: $(id).clientWidth, height: 220});
  });

  // -- polling ----------------------------------------------------------------------------------------------------
  let timer = null;

  async function poll() {
    clearTimeout(timer);
    try {
      const headers = apiKey ? {Authorization: `Bearer ${apiKey}`} : {};
      const response = await fetch(DATA_URL, {headers, cache: "no-store"});
      if (response.status === 401) {
        $("key-form").hidden = false;
        setStatus(apiKey ? "the API key was refused" : "this server needs its API key", "error");
      } else if (!response.ok) {
        setStatus(`the server answered ${response.status}; retrying`, "error");
      } else {
        $("key-form").hidden = true;
        render(await response.json());
      }
    } catch (error) {
      setStatus(`cannot reach the server (${error.message}); retrying`, "error");
    }
    timer = setTimeout(poll, POLL_MS);
  }

  if (typeof uPlot === "undefined") {
    $("charts").hidden = true;
    $("charts-note").hidden = false;
  }
  poll();
})();
