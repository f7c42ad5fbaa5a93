// streamrec live dashboard: draws every panel of a dashboard definition from /api/panels/<id>.
// Each panel element exposes its state for tests: data-state (loading|drawn|empty|error) and data-rows.
(function () {
  "use strict";
  const PALETTE = ["#58a6ff", "#3fb950", "#e3a008", "#f778ba", "#a371f7", "#39c5cf", "#f85149", "#d29922",
                   "#8b949e", "#56d364"];
  const state = { dash: null, refreshS: 2, minutes: 60, domain: "", ref: 0, inFlight: false, refreshes: 0,
                  charts: {}, timer: null, alerts: [] };
  const $ = (sel) => document.querySelector(sel);

  function fmt(v, unit) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (typeof v !== "number") return String(v);
    const a = Math.abs(v);
    if (unit === "s") {
      if (a >= 86400) return (v / 86400).toFixed(1) + " d";
      if (a >= 3600) return (v / 3600).toFixed(1) + " h";
      if (a >= 60) return (v / 60).toFixed(1) + " min";
      return (a >= 10 ? v.toFixed(0) : v.toFixed(2)) + " s";
    }
    if (unit === "bytes") {
      const units = ["B", "KiB", "MiB", "GiB", "TiB"];
      let x = v, i = 0;
      while (Math.abs(x) >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
      return (Math.abs(x) >= 100 || i === 0 ? x.toFixed(0) : x.toFixed(1)) + " " + units[i];
    }
    if (unit === "short" || unit === "ops") {
      // 3 significant digits at most: "125k", "12.5k", "1.25M" (axis labels must fit their gutter)
      const sig = (x) => (Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 10 ? x.toFixed(1) : x.toFixed(2));
      const s = a >= 1e9 ? sig(v / 1e9) + "G" : a >= 1e6 ? sig(v / 1e6) + "M" : a >= 1e4 ? sig(v / 1e3) + "k"
              : Number.isInteger(v) ? String(v) : v.toFixed(a >= 100 ? 0 : 2);
      return unit === "ops" ? s + "/s" : s;
    }
    if (Number.isInteger(v)) return String(v);
    return a >= 100 ? v.toFixed(1) : v.toFixed(3);
  }

  // ISO time -> "YYYY-MM-DD HH:MM:SS", with milliseconds when it has them (a short run's drift reference
  // can span less than a second)
  function when(v) {
    const m = /^(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(\.\d{3})?/.exec(v);
    return m[1] + " " + m[2] + (m[3] && m[3] !== ".000" ? m[3] : "");
  }

  // thresholds: [[null, colour], [v1, colour], ...] -> colour class of the last step not above v
  function colour(v, thresholds) {
    if (typeof v !== "number" || !thresholds || !thresholds.length) return "";
    let c = thresholds[0][1];
    for (const [t, col] of thresholds) if (t !== null && v >= t) c = col;
    return c;
  }

  function setState(el, st, rows, note) {
    el.dataset.state = st;
    el.dataset.rows = String(rows);
    const n = el.querySelector(".note");
    n.textContent = note || "";
    n.style.display = note ? "flex" : "none";
  }

  function emptyNote(p) {
    return p.needs ? `no data: needs ${p.needs}` : "no data in this window";
  }

  function buildGrid(dash) {
    const grid = $("#grid");
    grid.innerHTML = "";
    for (const p of dash.panels) {
      const el = document.createElement("section");
      el.className = "panel " + p.kind;
      el.id = "panel-" + p.id;
      el.dataset.panelId = p.id;
      el.dataset.kind = p.kind;
      el.dataset.needs = p.needs || "";
      el.style.gridColumn = "span " + p.width;
      const unit = p.unit && p.kind === "timeseries" ? `<span class="unit">(${p.unit === "ops" ? "per s" : p.unit})</span>` : "";
      el.innerHTML = `<h2 title="${p.description || ""}">${p.title}${unit}</h2>` +
        `<div class="body"></div><div class="note"></div>` +
        (p.kind === "stat" ? `<div class="desc">${p.description || ""}</div>` : "");
      grid.appendChild(el);
      setState(el, "loading", 0, "loading…");
    }
  }

  function drawStat(el, p, res) {
    const v = res.rows.length ? res.rows[0][res.columns[0]] : null;
    const body = el.querySelector(".body");
    body.innerHTML = `<div class="value ${colour(v, p.thresholds)}">${fmt(v, p.unit)}</div>`;
    setState(el, res.rows.length ? "drawn" : "empty", res.rows.length, "");
  }

  // a column X with columns X_lo and X_hi (a confidence interval) shows as one cell "X [lo, hi]"
  function intervalColumns(columns) {
    const has = new Set(columns);
    const ci = new Set(columns.filter((c) => has.has(c + "_lo") && has.has(c + "_hi")));
    return { ci, shown: columns.filter((c) => !(/_(lo|hi)$/.test(c) && ci.has(c.slice(0, -3)))) };
  }

  function drawTable(el, p, res) {
    const body = el.querySelector(".body");
    if (!res.rows.length) { body.innerHTML = ""; setState(el, "empty", 0, emptyNote(p)); return; }
    const { ci, shown: cols } = intervalColumns(res.columns);
    const numeric = (c) => res.rows.some((r) => typeof r[c] === "number");
    const th = cols.map((c) => `<th class="${numeric(c) ? "" : "text"}">${c.replace(/_pct$/, " %")}` +
      (ci.has(c) ? ` <span class="ci">[95% CI]</span>` : "") + `</th>`).join("");
    const metricTh = { auc: [[null, "red"], [0.6, "orange"], [0.7, "green"]],
                       cvr_auc: [[null, "red"], [0.6, "orange"], [0.7, "green"]],
                       ne: [[null, "green"], [0.95, "orange"], [1.0, "red"]],
                       cvr_ne: [[null, "green"], [0.95, "orange"], [1.0, "red"]],
                       psi: p.thresholds && p.thresholds.length ? p.thresholds : null };
    const trs = res.rows.map((r) => "<tr>" + cols.map((c) => {
      const v = r[c];
      const cls = typeof v === "number" ? colour(v, metricTh[c]) : (numeric(c) ? "" : "text");
      let shown = typeof v === "string" && /^\d{4}-\d\d-\d\dT/.test(v) ? when(v) : fmt(v, "");
      let title = String(v);
      if (ci.has(c) && typeof v === "number") {
        shown += ` <span class="ci">[${fmt(r[c + "_lo"], "")}, ${fmt(r[c + "_hi"], "")}]</span>`;
        title += ` (95% CI ${r[c + "_lo"]} to ${r[c + "_hi"]})`;
      }
      return `<td class="${cls}" title="${esc(title)}">${shown}</td>`;
    }).join("") + "</tr>").join("");
    body.innerHTML = `<table><thead><tr>${th}</tr></thead><tbody>${trs}</tbody></table>`;
    setState(el, "drawn", res.rows.length, "");
  }

  // y-axis gutter as wide as its widest label (uPlot calls this per layout pass; fixed widths clipped "100.0k/s")
  const measure = document.createElement("canvas").getContext("2d");
  function axisSize(u, values, axisIdx, cycleNum) {
    const axis = u.axes[axisIdx];
    if (cycleNum > 1) return axis._size;  // settled: avoid oscillating layouts
    measure.font = axis.font ? axis.font[0] : "12px system-ui";
    const widest = Math.max(0, ...(values || []).map((v) => measure.measureText(String(v)).width));
    return Math.ceil(widest + (axis.ticks.size || 10) + (axis.gap || 5) + 8);
  }

  // long rows (t, series, value) -> uPlot columns [[t...], [s1...], [s2...]] with nulls for gaps
  function pivot(rows) {
    const ts = [...new Set(rows.map((r) => r.t))].sort((a, b) => a - b);
    const names = [...new Set(rows.map((r) => r.series))].sort();
    const ti = new Map(ts.map((t, i) => [t, i]));
    const cols = names.map(() => new Array(ts.length).fill(null));
    for (const r of rows) cols[names.indexOf(r.series)][ti.get(r.t)] = r.value;
    return { names, data: [ts, ...cols] };
  }

  function drawSeries(el, p, res) {
    const body = el.querySelector(".body");
    if (!res.rows.length) {
      if (state.charts[p.id]) { state.charts[p.id].destroy(); delete state.charts[p.id]; }
      setState(el, "empty", 0, emptyNote(p));
      return;
    }
    const { names, data } = pivot(res.rows);
    if (data[0].length === 1) {  // uPlot stretches one time bucket's axis over years: add an empty minute
      data[0].push(data[0][0] + 60);
      for (let i = 1; i < data.length; i++) data[i].push(null);
    }
    const key = names.join("\u0001");
    let chart = state.charts[p.id];
    const width = Math.max(body.clientWidth, 200);
    if (chart && chart._key === key) {
      chart.setData(data);
    } else {
      if (chart) chart.destroy();
      const few = data[0].length < 20;
      const opts = {
        width, height: 180,
        cursor: { drag: { x: false, y: false } },
        scales: { x: { time: true } },
        legend: { live: true },
        series: [{}].concat(names.map((n, i) => ({
          label: n, stroke: PALETTE[i % PALETTE.length], width: 1.6, spanGaps: true,
          points: { show: few, size: 5 }, value: (u, v) => fmt(v, p.unit) }))),
        axes: [
          { stroke: "#8a93a6", grid: { stroke: "#232834", width: 1 }, ticks: { stroke: "#232834" } },
          { stroke: "#8a93a6", grid: { stroke: "#232834", width: 1 }, ticks: { stroke: "#232834" },
            size: axisSize, values: (u, vals) => vals.map((v) => fmt(v, p.unit)) },
        ],
      };
      body.innerHTML = "";
      chart = new uPlot(opts, data, body);
      chart._key = key;
      state.charts[p.id] = chart;
    }
    setState(el, "drawn", res.rows.length, "");
  }

  async function refreshPanel(p) {
    const el = document.getElementById("panel-" + p.id);
    const q = new URLSearchParams({ minutes: state.minutes, domain: state.domain, ref: state.ref });
    try {
      const r = await fetch(`/api/panels/${p.id}?${q}`);
      const res = await r.json();
      if (!r.ok) throw new Error(res.error || r.statusText);
      if (p.kind === "stat") drawStat(el, p, res);
      else if (p.kind === "table") drawTable(el, p, res);
      else drawSeries(el, p, res);
      return true;
    } catch (e) {
      setState(el, "error", 0, String(e.message || e));
      return false;
    }
  }

  function esc(x) { return String(x).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c])); }

  // banner of firing alerts, and a badge on the panel each rule points at
  async function refreshAlerts() {
    const box = $("#alerts");
    try {
      const r = await fetch(`/api/alerts?${new URLSearchParams({ domain: state.domain })}`);
      const res = await r.json();
      if (!r.ok) throw new Error(res.error || r.statusText);
      state.alerts = res.alerts;
      const firing = res.alerts.filter((a) => a.firing);
      const busDown = res.bus && !res.bus.ok;
      const storeDown = res.store && !res.store.ok;
      box.dataset.firing = String(firing.length + (busDown ? 1 : 0) + (storeDown ? 1 : 0));
      box.dataset.state = "drawn";
      box.dataset.bus = busDown ? "down" : "ok";
      box.dataset.store = storeDown ? "down" : "ok";
      const bus = busDown ? `<span class="badge critical" data-rule="bus"><b>Message bus unreachable</b>` +
        `${esc(res.bus.error)}; newest data ${fmt(res.bus.last_message_age_s, "s")} old</span>` : "";
      const st = storeDown ? `<span class="badge critical" data-rule="store"><b>Metrics store unreachable</b>` +
        `${esc(res.store.error)}; for ${fmt(res.store.down_s, "s")}, retrying</span>` : "";
      box.innerHTML = st + bus + (firing.length ? firing.map((a) =>
        `<span class="badge ${a.severity}" data-rule="${esc(a.rule)}" title="${esc(a.summary)}"><b>${esc(a.title)}</b>` +
        `${esc(a.series)} ${fmt(a.value, "")} ${a.op} ${a.threshold}</span>`).join("")
        : busDown || storeDown ? "" : `<span class="ok">&#10003; no alerts firing</span><span class="muted">(${res.alerts.length} checks)</span>`);
      for (const el of document.querySelectorAll(".panel")) {
        const mine = firing.filter((a) => a.panel === el.dataset.panelId);
        el.classList.toggle("alerting", mine.length > 0);
        el.classList.toggle("critical", mine.some((a) => a.severity === "critical"));
        const h = el.querySelector("h2");
        let b = h.querySelector(".badge");
        if (!mine.length) { if (b) b.remove(); continue; }
        if (!b) { b = document.createElement("span"); h.appendChild(b); }
        b.className = "badge " + (mine.some((a) => a.severity === "critical") ? "critical" : "warning");
        b.textContent = `${mine[0].title}: ${mine.map((a) => a.series).join(", ")}`;
      }
      return true;
    } catch (e) {
      box.dataset.state = "error";
      box.innerHTML = `<span class="badge critical">alerts: ${esc(e.message || e)}</span>`;
      return false;
    }
  }

  async function refresh() {
    if (state.inFlight || !state.dash) return;
    state.inFlight = true;
    const t0 = performance.now();
    try {
      const ok = await Promise.all([...state.dash.panels.map(refreshPanel), refreshAlerts()]);
      state.refreshes += 1;
      document.body.dataset.refreshes = String(state.refreshes);
      const failed = ok.filter((x) => !x).length;
      const st = $("#status");
      st.className = "status" + (failed ? " error" : "");
      st.textContent = failed ? `${failed} panel(s) failed` :
        `updated ${new Date().toLocaleTimeString()} · ${Math.round(performance.now() - t0)} ms`;
    } finally {
      state.inFlight = false;
    }
  }

  function resize() {
    for (const [id, chart] of Object.entries(state.charts)) {
      const body = document.querySelector(`#panel-${id} .body`);
      if (body) chart.setSize({ width: Math.max(body.clientWidth, 200), height: 180 });
    }
  }

  function pickRange(minutes) {
    const sel = $("#range");
    const opts = [...sel.options].map((o) => Number(o.value));
    const best = opts.find((v) => v >= minutes) || opts[opts.length - 1];
    sel.value = String(best);
    return best;
  }

  async function init() {
    const params = new URLSearchParams(location.search);
    const meta = await (await fetch("/api/dashboards")).json();
    const name = params.get("dashboard") || "overview";
    state.dash = meta.dashboards[name];
    state.refreshS = Number(params.get("refresh") || meta.refresh_s) || 2;
    document.title = state.dash.title;
    $("#title").textContent = state.dash.title;
    const dsel = $("#domain");
    for (const d of meta.domains) dsel.insertAdjacentHTML("beforeend", `<option value="${d}">${d}</option>`);
    state.minutes = pickRange(Number(params.get("minutes") || meta.window_minutes));
    state.domain = params.get("domain") || "";
    dsel.value = state.domain;
    $("#range").addEventListener("change", (e) => { state.minutes = Number(e.target.value); refresh(); });
    state.ref = Number(params.get("ref") || 0);
    $("#ref").value = String(state.ref);
    $("#ref").addEventListener("change", (e) => { state.ref = Number(e.target.value); refresh(); });
    dsel.addEventListener("change", (e) => { state.domain = e.target.value; refresh(); });
    window.addEventListener("resize", resize);
    buildGrid(state.dash);
    await refresh();
    state.timer = setInterval(refresh, state.refreshS * 1000);
  }

  window.streamrecDashboard = state;
  init().catch((e) => { const st = $("#status"); st.className = "status error"; st.textContent = String(e); });
})();
