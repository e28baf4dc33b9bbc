// Runs page: one SVG chart per metric of metrics.jsonl, every run on it, polled every 2 s while files grow.
"use strict";

const METRICS = [
  { key: "loss", title: "training loss", extra: "val_loss", log: true },
  { key: "lr", title: "learning rate" },
  { key: "grad_norm", title: "gradient norm (before clipping)" },
  { key: "s_per_step", title: "seconds per step" },
  { key: "peak_memory_gb", title: "peak memory (GB)" },
];
const runs = new Map();  // id -> {name, color, records, shown}
const svgNS = "http://www.w3.org/2000/svg";

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? Number(v.toExponential(2)).toExponential() : Number(v.toPrecision(3)).toString();
}

function ticks(lo, hi, n, integer) {
  // Round values (1, 2 or 5 times a power of ten) inside [lo, hi]; whole numbers for steps.
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 5, 10].find((m) => m * mag >= raw) * mag;
  if (integer) step = Math.max(1, Math.round(step));
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function smoothed(points, k) {
  const out = [];
  let sum = 0;
  for (let i = 0; i < points.length; i++) {
    sum += points[i][1];
    if (i >= k) sum -= points[i - k][1];
    out.push([points[i][0], sum / Math.min(i + 1, k)]);
  }
  return out;
}

function el(tag, attrs, parent) {
  const e = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function series(metric) {
  const out = [];
  for (const [id, run] of runs) {
    if (!run.shown) continue;
    for (const [key, dashed] of [[metric.key, false], [metric.extra, true]]) {
      if (!key) continue;
      const pts = run.records.filter((r) => typeof r[key] === "number" && isFinite(r[key]) && typeof r.step === "number")
        .map((r) => [r.step, r[key]]);
      if (pts.length) out.push({ run: id, key, name: `${run.name} ${key}`, color: run.color, dashed, points: pts });
    }
  }
  return out;
}

function draw(card, metric) {
  const svg = card.querySelector("svg");
  svg.innerHTML = "";
  const all = series(metric);
  const W = 560, H = 240, L = 56, R = 12, T = 10, B = 28;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const logy = metric.log && document.getElementById("logy").checked;
  const ty = (v) => (logy ? Math.log10(Math.max(v, 1e-12)) : v);
  const xs = all.flatMap((s) => s.points.map((p) => p[0]));
  const ys = all.flatMap((s) => s.points.map((p) => ty(p[1])));
  card.dataset.points = all.filter((s) => s.key === metric.key).map((s) => s.points.length).join(",");
  if (!xs.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent = "no values yet";
    return;
  }
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  for (const yv of ticks(y0, y1, 5, false)) {
    el("line", { x1: L, x2: W - R, y1: sy(yv), y2: sy(yv), class: "grid" }, svg);
    el("text", { x: L - 4, y: sy(yv) + 3, "text-anchor": "end" }, svg).textContent = fmt(logy ? 10 ** yv : yv);
  }
  for (const xv of ticks(x0, x1, 6, true)) {
    el("text", { x: sx(xv), y: H - B + 14, "text-anchor": "middle" }, svg).textContent = xv;
  }
  el("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }, svg);
  el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }, svg);
  el("text", { x: W - R, y: H - 2, "text-anchor": "end" }, svg).textContent = "step";
  const smooth = document.getElementById("smooth").checked;
  for (const s of all) {
    const pts = (p) => p.map(([x, y]) => `${sx(x).toFixed(1)},${sy(ty(y)).toFixed(1)}`).join(" ");
    const line = el("polyline", { points: pts(s.points), stroke: s.color, class: "series",
      "data-run": s.run, "data-key": s.key, "data-n": s.points.length }, svg);
    if (s.dashed) line.setAttribute("stroke-dasharray", "5 3");
    if (s.dashed || s.points.length < 2) {  // sparse series (held-out loss) get a dot per value
      for (const [x, y] of s.points) el("circle", { cx: sx(x), cy: sy(ty(y)), r: 3, fill: s.color, class: "marker",
        "data-run": s.run, "data-key": s.key }, svg);
    }
    if (smooth && !s.dashed) {
      line.setAttribute("stroke-opacity", "0.3");
      el("polyline", { points: pts(smoothed(s.points, 20)), stroke: s.color, class: "smooth", "stroke-width": 2.2 }, svg);
    }
    el("title", {}, line).textContent = `${s.name}: ${s.points.length} points, last ${fmt(s.points[s.points.length - 1][1])}`;
  }
}

function drawAll() {
  for (const m of METRICS) draw(document.getElementById(`chart-${m.key}`), m);
  const total = [...runs.values()].reduce((n, r) => n + r.records.length, 0);
  document.getElementById("status").textContent = `${runs.size} run(s), ${total} lines read; updates every 2 s`;
}

function legend() {
  const box = document.getElementById("legend");
  box.innerHTML = "";
  for (const [id, run] of runs) {
    const lab = document.createElement("label");
    lab.innerHTML = `<input type="checkbox" ${run.shown ? "checked" : ""}><span class="swatch" style="background:${run.color}"></span>${esc(run.name)}`;
    lab.querySelector("input").addEventListener("change", (e) => { run.shown = e.target.checked; drawAll(); });
    box.appendChild(lab);
  }
}

async function refreshRuns() {
  const list = await getJSON("/api/runs");
  let changed = false;
  for (const r of list) {
    if (!runs.has(r.id)) {
      runs.set(r.id, { name: r.name, color: PALETTE[runs.size % PALETTE.length], records: [], shown: true });
      changed = true;
    }
  }
  if (changed) legend();
}

async function poll() {
  let grew = false;
  try {
    for (const [id, run] of runs) {
      const d = await getJSON(`/api/metrics?run=${encodeURIComponent(id)}&from=${run.records.length}`);
      if (d.total < run.records.length) { run.records = []; grew = true; continue; }  // file replaced
      if (d.records.length) { run.records.push(...d.records); grew = true; }
    }
  } catch (e) {
    document.getElementById("status").textContent = `server unreachable (${e.message}); retrying`;
  }
  if (grew) drawAll();
}

async function start() {
  header("/runs");
  const charts = document.getElementById("charts");
  for (const m of METRICS) {
    const card = document.createElement("div");
    card.className = "card chart";
    card.id = `chart-${m.key}`;
    card.innerHTML = `<h3>${esc(m.title)}${m.extra ? ` <span class="muted">(dashed: ${m.extra})</span>` : ""}</h3><svg></svg>`;
    charts.appendChild(card);
  }
  for (const id of ["smooth", "logy"]) document.getElementById(id).addEventListener("change", drawAll);
  await refreshRuns();
  if (!runs.size) charts.insertAdjacentHTML("beforebegin", '<div class="empty">No metrics.jsonl under the folders given.</div>');
  await poll();
  drawAll();
  setInterval(poll, 2000);
  setInterval(refreshRuns, 10000);
}

start();
