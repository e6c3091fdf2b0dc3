// The processor's live dashboard: one WebSocket (/ws) for everything that changes, /api/history
// for the last hour of 1-minute windows, /api/limits for the alarm limits drawn on the charts.
// Plain JavaScript, no build step; uPlot (vendored) draws the charts.
"use strict";

(() => {
  const ORDER = ["pH", "BOD", "COD", "TSS", "TDS", "temperature", "flow_rate"];
  const LABEL = { temperature: "Temperature", flow_rate: "Flow rate" };
  const HOUR = 3600;
  const WARN = "#e3b341";
  const CRIT = "#ff6a5c";
  const AVG = "#4fc3f7";
  const GRID = "#2d3642";
  const AXIS = "#8b98a5";

  const query = new URLSearchParams(location.search);
  const onlyPlant = query.get("plant") || "";
  const token = readToken();
  const plants = new Map(); // plant id -> Plant
  const alarms = new Map(); // alarm id -> newest event of an active alarm
  let clockOffset = 0; // server time - browser time, ms
  let backoff = 1000;

  const $ = (sel, root = document) => root.querySelector(sel);
  const now = () => (Date.now() + clockOffset) / 1000;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function readToken() {
    const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem("edge-gateway-token", decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem("edge-gateway-token") || "";
  }

  class AuthError extends Error {}

  async function api(path) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const r = await fetch(path, { headers, cache: "no-store" });
    if (r.status === 401) throw new AuthError("access token needed");
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return r.json();
  }

  // -- formatting ---------------------------------------------------------------------------

  function fmt(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "—";
    const a = Math.abs(v);
    return v.toFixed(a >= 100 ? 0 : a >= 10 ? 1 : 2);
  }

  function ago(seconds) {
    if (!Number.isFinite(seconds)) return "";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  // 24-hour clock times, as control rooms read them
  const clock = (t) =>
    new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  const hhmm = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
  const seconds = (rfc3339) => Date.parse(rfc3339) / 1000;
  const label = (p) => LABEL[p] || p;

  function level(value, lim) {
    if (!lim || value === null || value === undefined) return "ok";
    if ((lim.high_critical ?? Infinity) < value || (lim.low_critical ?? -Infinity) > value) return "critical";
    if ((lim.high_warning ?? Infinity) < value || (lim.low_warning ?? -Infinity) > value) return "warning";
    return "ok";
  }

  // -- one parameter of one plant: its tile and chart ----------------------------------------

  class Param {
    constructor(plant, name) {
      this.plant = plant;
      this.name = name;
      this.sensors = new Map(); // sensor id -> newest reading
      this.windows = new Map(); // window start -> {min, max, avg, count}
      this.last = null; // newest closed window
      this.chart = null;
      this.tile = el("div", "tile");
      this.tile.dataset.parameter = name;
      this.tile.dataset.level = "ok";
      const head = el("div", "tile-head");
      head.append(el("span", "tile-name", label(name)));
      this.quality = el("span", "q");
      head.append(this.quality);
      const row = el("div", "value-row");
      this.value = el("span", "value", "—");
      this.unit = el("span", "unit", "");
      this.age = el("span", "age", "");
      row.append(this.value, this.unit, this.age);
      this.agg = el("div", "agg");
      this.others = el("div", "agg");
      this.chartBox = el("div", "chart");
      this.tile.append(head, row, this.agg, this.others, this.chartBox);
    }

    limits() {
      return this.plant.limits[this.name];
    }

    newest() {
      let best = null;
      for (const r of this.sensors.values()) if (!best || r.t > best.t) best = r;
      return best;
    }

    // The newest value known: a reading (this instance's sensors), or else the latest value of
    // the newest closed window (sensors another processor instance owns reach us only so).
    newestTime() {
      const r = this.newest();
      const w = this.last;
      return Math.max(r ? r.t : -Infinity, w ? w.latestTime : -Infinity);
    }

    render() {
      const r = this.newest();
      const w = this.last;
      if (w && (!r || w.latestTime > r.t)) {
        this.value.textContent = fmt(w.latest);
        this.unit.textContent = w.unit || "";
        this.quality.textContent = "1-min";
        this.quality.className = "q";
        this.quality.title = "latest value of the last closed 1-minute window";
        this.tile.dataset.level = level(w.latest, this.limits());
        this.others.textContent = `sensor: ${w.latestSensorId}`;
      } else if (r) {
        this.value.textContent = fmt(r.value);
        this.unit.textContent = r.unit || "";
        this.quality.textContent = r.quality;
        this.quality.className = "q " + r.quality;
        this.quality.title = (r.qualityReasons || []).join(", ");
        this.tile.dataset.level = r.quality === "bad" ? "bad" : level(r.value, this.limits());
        this.sensorNote(r);
      }
      if (w) {
        this.agg.replaceChildren(
          `Minute ${hhmm(w.windowStart)}: avg `, el("b", "", fmt(w.avg)), `, range ${fmt(w.min)}–${fmt(w.max)}`,
        );
        this.agg.title = `1-minute window from ${clock(w.windowStart)}: ${w.count} readings`;
      }
      this.ticking();
    }

    sensorNote(newest) {
      const parts = [];
      for (const [id, r] of [...this.sensors].sort()) {
        parts.push(this.sensors.size > 1 || r.quality !== "good" ? `${id} ${fmt(r.value)} ${r.quality}` : id);
      }
      this.others.textContent = (this.sensors.size > 1 ? "sensors: " : "sensor: ") + parts.join(" · ");
      if (newest.quality !== "good" && newest.qualityReasons && newest.qualityReasons.length) {
        this.others.textContent += ` (${newest.qualityReasons.join(", ")})`;
      }
    }

    ticking() {
      const t = this.newestTime();
      if (!Number.isFinite(t)) return;
      const age = now() - t;
      this.age.textContent = ago(age);
      this.age.classList.toggle("stale", age > 300);
    }

    addWindow(w) {
      this.windows.set(w.windowStart, { min: w.min, max: w.max, avg: w.avg, count: w.count });
      if (!this.last || w.windowStart >= this.last.windowStart) this.last = w;
      for (const start of this.windows.keys()) if (start < now() - 2 * HOUR) this.windows.delete(start);
    }

    data() {
      const xs = [], mins = [], maxs = [], avgs = [];
      let prev = null;
      for (const s of [...this.windows.keys()].sort((a, b) => a - b)) {
        const w = this.windows.get(s);
        if (prev !== null && s - prev > 60) {
          xs.push(prev + 60); mins.push(null); maxs.push(null); avgs.push(null); // a gap, not a line
        }
        xs.push(s); mins.push(w.min); maxs.push(w.max); avgs.push(w.avg);
        prev = s;
      }
      return [xs, mins, maxs, avgs];
    }

    draw() {
      if (!this.chart) {
        if (!this.windows.size || !this.chartBox.isConnected) return;
        this.chart = makeChart(this, this.chartBox);
        new ResizeObserver(() => this.resize()).observe(this.chartBox);
      } else {
        this.chart.setData(this.data());
      }
    }

    resize() {
      const w = this.chartBox.clientWidth, h = this.chartBox.clientHeight;
      if (this.chart && w > 0 && h > 0) this.chart.setSize({ width: w, height: h });
    }
  }

  function yRange(min, max, lim) {
    lim = lim || {};
    const hiLim = lim.high_warning ?? lim.high_critical;
    const loLim = lim.low_warning ?? lim.low_critical;
    let lo = min, hi = max;
    if (lo === null || hi === null || !Number.isFinite(lo)) {
      lo = loLim ?? 0;
      hi = hiLim ?? 1;
    }
    if (hiLim !== undefined) hi = Math.max(hi, hiLim);
    if (loLim !== undefined) lo = Math.min(lo, loLim);
    const pad = (hi - lo) * 0.1 || Math.abs(hi) * 0.1 || 1;
    return [lo >= 0 && lo - pad < 0 ? 0 : lo - pad, hi + pad];
  }

  function drawLimits(u, lim) {
    if (!lim) return;
    const ctx = u.ctx, dpr = devicePixelRatio || 1;
    const { left, top, width, height } = u.bbox;
    ctx.save();
    ctx.lineWidth = 1.5 * dpr;
    ctx.setLineDash([6 * dpr, 4 * dpr]);
    for (const [key, color] of [["high_critical", CRIT], ["low_critical", CRIT], ["high_warning", WARN], ["low_warning", WARN]]) {
      const v = lim[key];
      if (v === undefined || v === null) continue;
      const y = Math.round(u.valToPos(v, "y", true)) + 0.5;
      if (y < top || y > top + height) continue;
      ctx.strokeStyle = color;
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(left + width, y);
      ctx.stroke();
    }
    ctx.restore();
  }

  function makeChart(param, box) {
    const axis = { stroke: AXIS, grid: { stroke: GRID, width: 1 }, ticks: { stroke: GRID, width: 1 }, font: "11px system-ui" };
    const opts = {
      width: box.clientWidth || 300,
      height: box.clientHeight || 150,
      padding: [8, 10, 0, 0],
      legend: { show: false },
      cursor: { points: { show: false }, drag: { x: false, y: false, setScale: false } },
      scales: {
        x: { time: true, range: () => [now() - HOUR, now()] },
        y: { range: (u, min, max) => yRange(min, max, param.limits()) },
      },
      axes: [
        { ...axis, space: 60, values: (u, splits) => splits.map(hhmm) },
        { ...axis, size: 48, ticks: { show: false } },
      ],
      series: [
        {},
        { label: "min", stroke: "rgba(79,195,247,0.45)", width: 1, points: { show: false } },
        { label: "max", stroke: "rgba(79,195,247,0.45)", width: 1, points: { show: false } },
        { label: "avg", stroke: AVG, width: 2, points: { show: false } },
      ],
      bands: [{ series: [2, 1], fill: "rgba(79,195,247,0.22)" }],
      hooks: { draw: [(u) => drawLimits(u, param.limits())] },
    };
    return new uPlot(opts, param.data(), box);
  }

  // -- one plant -------------------------------------------------------------------------------

  class Plant {
    constructor(id) {
      this.id = id;
      this.params = new Map();
      this.gateways = new Map();
      this.prediction = null;
      this.limits = {};
      this.section = el("section", "plant");
      this.section.dataset.plant = id;
      const head = el("div", "plant-head");
      head.append(el("h2", "", id));
      this.pills = el("div", "pills");
      head.append(this.pills);
      this.tiles = el("div", "tiles");
      this.alarmsPanel = panel("Active alarms");
      this.alarmsPanel.classList.add("alarms");
      this.predictionPanel = panel("Reuse prediction");
      this.predictionPanel.classList.add("prediction");
      this.gatewaysPanel = panel("Gateways");
      this.gatewaysPanel.classList.add("gateways");
      const side = el("div", "side");
      side.append(this.alarmsPanel, this.predictionPanel, this.gatewaysPanel);
      const body = el("div", "plant-body");
      body.append(this.tiles, side);
      this.section.append(head, body);
      insertSorted($("#plants"), this.section, (s) => s.dataset.plant, id);
      $("#empty").hidden = true;
      this.renderAlarms();
      this.renderPrediction();
      this.renderGateways();
    }

    param(name) {
      let p = this.params.get(name);
      if (!p) {
        p = new Param(this, name);
        this.params.set(name, p);
        const rank = (n) => { const i = ORDER.indexOf(n); return (i < 0 ? 100 : i).toString().padStart(3, "0") + n; };
        insertSorted(this.tiles, p.tile, (t) => rank(t.dataset.parameter), rank(name));
      }
      return p;
    }

    async load() {
      const id = encodeURIComponent(this.id);
      try {
        const [lim, hist] = await Promise.all([api(`/api/limits?plant=${id}`), api(`/api/history?plant=${id}`)]);
        this.limits = lim.limits || {};
        for (const w of hist.windows || []) this.param(w.parameter).addWindow(w);
      } catch (e) {
        if (e instanceof AuthError) return needToken();
        console.warn("history of", this.id, e);
      }
      for (const p of this.params.values()) { p.render(); p.draw(); }
    }

    renderAlarms() {
      const mine = [...alarms.values()].filter((a) => a.plantId === this.id);
      mine.sort((a, b) => (a.level === b.level ? seconds(b.timestamp) - seconds(a.timestamp) : a.level === "critical" ? -1 : 1));
      const nodes = mine.map((a) => {
        const row = el("div", "alarm");
        row.dataset.alarm = a.alarmId;
        row.append(el("span", `pill ${a.level}`, a.level === "critical" ? "CRITICAL" : "WARNING"), el("span", "msg", a.message));
        const ack = a.acknowledged ? " · acknowledged" : "";
        row.append(el("span", "when", `${a.sensorId} · since ${clock(seconds(a.timestamp))}${ack}`));
        return row;
      });
      if (!nodes.length) nodes.push(el("div", "none", "None"));
      this.alarmsPanel.replaceChildren(this.alarmsPanel.firstChild, ...nodes);
      const crit = mine.filter((a) => a.level === "critical").length;
      const warn = mine.length - crit;
      const pills = [];
      if (crit) pills.push(el("span", "pill critical", `${crit} critical`));
      if (warn) pills.push(el("span", "pill warning", `${warn} warning`));
      if (!mine.length) pills.push(el("span", "pill ok", "no active alarms"));
      this.pills.replaceChildren(...pills);
      renderSummary();
    }

    renderPrediction() {
      const p = this.prediction;
      const nodes = [];
      if (!p) {
        nodes.push(el("div", "none", "No prediction yet"));
      } else {
        nodes.push(el("div", "cls", String(p.prediction ?? "—")));
        const conf = Number(p.confidence);
        if (Number.isFinite(conf)) {
          const pct = Math.round((conf <= 1 ? conf * 100 : conf));
          const bar = el("div", "bar");
          const fill = el("span");
          fill.style.width = `${Math.max(0, Math.min(100, pct))}%`;
          bar.append(fill);
          nodes.push(bar, el("div", "meta", `confidence ${pct} %`));
        }
        const when = p.timestamp ? ` · ${clock(typeof p.timestamp === "number" ? p.timestamp : seconds(p.timestamp))}` : "";
        nodes.push(el("div", "meta", `model ${p.model || "?"}${when}`));
      }
      this.predictionPanel.replaceChildren(this.predictionPanel.firstChild, ...nodes);
    }

    renderGateways() {
      if (!this.gateways.size) {
        this.gatewaysPanel.replaceChildren(this.gatewaysPanel.firstChild, el("div", "none", "No readings yet"));
        return;
      }
      const table = el("table", "gw");
      const head = el("tr");
      for (const h of ["gateway", "link", "last reading", "delay"]) head.append(el("th", "", h));
      table.append(head);
      for (const [id, g] of [...this.gateways].sort()) {
        const since = now() - seconds(g.lastArrival);
        const [cls, text] = since < 90 ? ["up", "up"] : since < 600 ? ["late", "quiet"] : ["down", "silent"];
        const row = el("tr");
        row.dataset.gateway = id;
        const last = el("td", "", ago(now() - seconds(g.lastReading)));
        last.title = `measured ${clock(seconds(g.lastReading))}, received ${clock(seconds(g.lastArrival))}`;
        row.append(el("td", "gw-id", id || "(no gateway id)"), el("td", `link ${cls}`, text), last,
          el("td", "", `${g.delaySeconds < 10 ? g.delaySeconds.toFixed(1) : Math.round(g.delaySeconds)} s`));
        table.append(row);
      }
      this.gatewaysPanel.replaceChildren(this.gatewaysPanel.firstChild, table);
    }
  }

  function panel(title) {
    const p = el("div", "panel");
    p.append(el("h3", "", title));
    return p;
  }

  function insertSorted(parent, node, keyOf, key) {
    const after = [...parent.children].find((c) => c !== node && c.dataset && keyOf(c) !== undefined && keyOf(c) > key);
    parent.insertBefore(node, after || null);
  }

  function plantOf(id) {
    if (onlyPlant && id !== onlyPlant) return null;
    let p = plants.get(id);
    if (!p) {
      p = new Plant(id);
      plants.set(id, p);
      p.load();
    }
    return p;
  }

  function renderSummary() {
    const all = [...alarms.values()].filter((a) => plants.has(a.plantId));
    const crit = all.filter((a) => a.level === "critical").length;
    const pills = [el("span", "pill", `${plants.size} plant${plants.size === 1 ? "" : "s"}`)];
    if (crit) pills.push(el("span", "pill critical", `${crit} critical`));
    if (all.length - crit) pills.push(el("span", "pill warning", `${all.length - crit} warning`));
    if (!all.length) pills.push(el("span", "pill ok", "no active alarms"));
    $("#summary").replaceChildren(...pills);
  }

  // -- messages from the feed ------------------------------------------------------------------

  function applyStatus(m) {
    const plant = plantOf(m.plantId);
    if (!plant) return;
    const touched = new Set();
    for (const r of m.sensors || []) {
      const p = plant.param(r.parameter);
      p.sensors.set(r.sensorId, { ...r, t: seconds(r.timestamp) });
      touched.add(p);
    }
    for (const p of touched) p.render();
    for (const g of m.gateways || []) plant.gateways.set(g.gatewayId, g);
    plant.renderGateways();
  }

  function applyAggregate(w) {
    const plant = plantOf(w.plantId);
    if (!plant) return;
    const p = plant.param(w.parameter);
    p.addWindow(w);
    p.render();
    p.draw();
  }

  function applyAlert(a) {
    if (a.state === "raised" || a.state === "re-raised") alarms.set(a.alarmId, { ...a, acknowledged: false });
    else if (a.state === "acknowledged" && alarms.has(a.alarmId)) alarms.get(a.alarmId).acknowledged = true;
    else alarms.delete(a.alarmId);
    const plant = plantOf(a.plantId);
    if (plant) plant.renderAlarms();
  }

  function applyPrediction(m) {
    const plant = plantOf(m.plantId);
    if (!plant) return;
    plant.prediction = m;
    plant.renderPrediction();
  }

  function applySnapshot(s) {
    clockOffset = Date.parse(s.serverTime) - Date.now();
    for (const id of s.plants || []) plantOf(id);
    for (const st of s.status || []) applyStatus(st);
    for (const w of s.aggregates || []) applyAggregate(w);
    alarms.clear();
    for (const a of s.alarms || []) alarms.set(a.alarmId, a);
    for (const p of plants.values()) p.renderAlarms();
    for (const m of s.predictions || []) applyPrediction(m);
    renderSummary();
  }

  const handlers = {
    snapshot: applySnapshot,
    status: applyStatus,
    aggregate: applyAggregate,
    alert: applyAlert,
    prediction: applyPrediction,
  };

  // -- connection ------------------------------------------------------------------------------

  function setConn(state, text) {
    $("#conn").dataset.state = state;
    $("#conn-text").textContent = text;
  }

  function needToken() {
    setConn("down", "Access token needed: open this page as /#token=…");
  }

  function connect() {
    const q = new URLSearchParams();
    if (onlyPlant) q.set("plant", onlyPlant);
    if (token) q.set("token", token);
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const qs = q.toString();
    const ws = new WebSocket(`${proto}//${location.host}/ws${qs ? "?" + qs : ""}`);
    ws.onopen = () => {
      backoff = 1000;
      setConn("live", "Live");
    };
    ws.onmessage = (ev) => {
      const m = JSON.parse(ev.data);
      const handle = handlers[m.type];
      if (handle) handle(m);
      $("#conn-text").textContent = `Live · ${clock(now())}`;
    };
    ws.onclose = (ev) => {
      setConn("down", ev.reason ? `Reconnecting (${ev.reason})…` : "Reconnecting…");
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 15000);
    };
  }

  async function start() {
    try {
      await api("/api/limits"); // says at once whether a token is needed
    } catch (e) {
      if (e instanceof AuthError) return needToken();
    }
    connect();
    setInterval(() => {
      for (const plant of plants.values()) {
        for (const p of plant.params.values()) p.ticking();
        plant.renderGateways();
      }
    }, 1000);
    setInterval(() => {
      for (const plant of plants.values()) for (const p of plant.params.values()) p.draw();
    }, 30000); // the hour's window slides even when nothing new closes
  }

  renderSummary();
  start();
})();
