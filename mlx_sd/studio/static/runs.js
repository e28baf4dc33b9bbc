// Runs page: one SVG chart per metric of metrics.jsonl, every run on it, polled every 2 s while files grow.
// All charts share one step axis (zoom with the wheel or the step boxes, drag to pan, double-click resets).
"use strict";

const METRICS = [
  { key: "loss", title: "training loss", extra: "val_loss", log: true, unit: "loss (MSE)", smooth: true },
  { key: "lr", title: "learning rate", unit: "learning rate", smooth: false },  // a schedule: never averaged
  { key: "grad_norm", title: "gradient norm (before clipping)", unit: "L2 norm", smooth: true },
  { key: "s_per_step", title: "seconds per step", unit: "seconds", smooth: true, firstApart: true },
  { key: "peak_memory_gb", title: "peak memory", unit: "GB", smooth: false },
];
const runs = new Map();  // id -> {name, color, records, gen, shown, problems, error}
const svgNS = "http://www.w3.org/2000/svg";
const W = 560, H = 250, L = 62, R = 12, T = 10, B = 30;
let view = null;         // [x0, x1] steps shown, null = every step
let configs = [];        // /api/config

function fmt(v) {
  if (v === null || v === undefined) return "-";
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

function logTicks(lo, hi) {
  // lo, hi in log10 units: ticks at 1, 2 and 5 times a power of ten, thinned to powers of ten when crowded.
  const out = [];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
    for (const m of [1, 2, 5]) {
      const v = Math.log10(m) + e;
      if (v >= lo - 1e-9 && v <= hi + 1e-9) out.push({ v, m });
    }
  }
  if (out.length > 8) return out.filter((t) => t.m === 1);
  if (out.length < 2) return ticks(10 ** lo, 10 ** hi, 4, false).filter((x) => x > 0).map((x) => ({ v: Math.log10(x) }));
  return out;
}

function smoothed(points, k) {
  // Moving average over the last k finite values; a gap (null) stays a gap.
  const out = [], win = [];
  let sum = 0;
  for (const [x, y] of points) {
    if (y === null) { out.push([x, null]); continue; }
    win.push(y); sum += y;
    if (win.length > k) sum -= win.shift();
    out.push([x, sum / win.length]);
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
  const out = [], firsts = [];
  for (const [id, run] of runs) {
    if (!run.shown) continue;
    for (const [key, dashed] of [[metric.key, false], [metric.extra, true]]) {
      if (!key) continue;
      // A key written as NaN/Infinity arrives as null: a gap in the line, not a point.
      let pts = run.records.filter((r) => key in r && typeof r.step === "number" && (r[key] === null || typeof r[key] === "number"))
        .map((r) => [r.step, r[key]]);
      if (metric.firstApart && pts.length > 1) {  // the first step includes compiling: shown apart, off the axis
        firsts.push({ run: id, name: run.name, color: run.color, step: pts[0][0], value: pts[0][1] });
        pts = pts.slice(1);
      }
      if (pts.length) out.push({ run: id, key, name: `${run.name} ${key}`, color: run.color, dashed, points: pts });
    }
  }
  return { all: out, firsts };
}

function fullRange() {
  const xs = [];
  for (const run of runs.values()) if (run.shown) for (const r of run.records) if (typeof r.step === "number") xs.push(r.step);
  return xs.length ? [Math.min(...xs), Math.max(...xs)] : null;
}

function draw(card, metric) {
  const svg = card.querySelector("svg");
  svg.innerHTML = "";
  const { all, firsts } = series(metric);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const note = card.querySelector(".note");
  note.textContent = firsts.length ? "first step, compile included (left off the axis): " +
    firsts.map((f) => `${f.name} step ${f.step}: ${fmt(f.value)} s`).join("; ") : "";
  card.dataset.points = all.filter((s) => s.key === metric.key).map((s) => s.points.length).join(",");
  const full = fullRange();
  if (!all.length || !full) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", "font-size": 11, fill: "#667085" }, svg).textContent = "no values yet";
    return;
  }
  let [x0, x1] = view || full;
  if (x1 === x0) x1 = x0 + 1;
  const logy = metric.log && document.getElementById("logy").checked;
  const ty = (v) => (logy ? Math.log10(Math.max(v, 1e-12)) : v);
  const ys = all.flatMap((s) => s.points.filter(([x, y]) => y !== null && x >= x0 && x <= x1).map((p) => ty(p[1])));
  if (!ys.length) ys.push(...all.flatMap((s) => s.points.filter((p) => p[1] !== null).map((p) => ty(p[1]))));
  let [y0, y1] = ys.length ? [Math.min(...ys), Math.max(...ys)] : [0, 1];
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  card._scale = { x0, x1, sx, all, ty, sy };
  const yt = logy ? logTicks(y0, y1) : ticks(y0, y1, 5, false).map((v) => ({ v }));
  for (const { v } of yt) {
    el("line", { x1: L, x2: W - R, y1: sy(v), y2: sy(v), stroke: "#eef0f4" }, svg);
    el("text", { x: L - 4, y: sy(v) + 3, "text-anchor": "end", "font-size": 10, fill: "#667085", class: "ytick" }, svg)
      .textContent = fmt(logy ? Number((10 ** v).toPrecision(6)) : v);
  }
  for (const xv of ticks(x0, x1, 6, true)) {
    el("text", { x: sx(xv), y: H - B + 14, "text-anchor": "middle", "font-size": 10, fill: "#667085", class: "xtick" }, svg)
      .textContent = xv;
  }
  el("line", { x1: L, x2: L, y1: T, y2: H - B, stroke: "#9aa3b2" }, svg);
  el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#9aa3b2" }, svg);
  el("text", { x: W - R, y: H - 3, "text-anchor": "end", "font-size": 10, fill: "#667085" }, svg).textContent = "step";
  el("text", { x: 11, y: (T + H - B) / 2, "text-anchor": "middle", "font-size": 10, fill: "#667085", class: "ylabel",
    transform: `rotate(-90 11 ${(T + H - B) / 2})` }, svg).textContent = metric.unit + (logy ? " (log scale)" : "");
  const clipId = `clip-${metric.key}`;
  el("rect", { x: L, y: T - 4, width: W - L - R, height: H - T - B + 8 }, el("clipPath", { id: clipId }, svg));
  const plot = el("g", { "clip-path": `url(#${clipId})` }, svg);
  const smooth = metric.smooth && document.getElementById("smooth").checked;
  const pathOf = (p) => {
    let d = "", pen = false;
    for (const [x, y] of p) {
      if (y === null || (logy && y <= 0)) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${sx(x).toFixed(1)},${sy(ty(y)).toFixed(1)}`;
      pen = true;
    }
    return d;
  };
  for (const s of all) {
    const finite = s.points.filter((p) => p[1] !== null);
    const line = el("path", { d: pathOf(s.points), stroke: s.color, fill: "none", "stroke-width": 1.6, class: "series",
      "data-run": s.run, "data-key": s.key, "data-n": finite.length, "data-gaps": s.points.length - finite.length }, plot);
    if (s.dashed) line.setAttribute("stroke-dasharray", "5 3");
    if (s.dashed || finite.length < 2) {  // sparse series (held-out loss) get a dot per value
      for (const [x, y] of finite) el("circle", { cx: sx(x), cy: sy(ty(y)), r: 3, fill: s.color, class: "marker",
        "data-run": s.run, "data-key": s.key }, plot);
    }
    if (smooth && !s.dashed) {
      line.setAttribute("stroke-opacity", "0.3");
      el("path", { d: pathOf(smoothed(s.points, 20)), stroke: s.color, fill: "none", class: "smooth", "stroke-width": 2.2 }, plot);
    }
  }
  el("line", { class: "cursor", y1: T, y2: H - B, x1: -10, x2: -10, stroke: "#1d2330", "stroke-dasharray": "3 3" }, svg);
}

function drawAll() {
  for (const m of METRICS) draw(document.getElementById(`chart-${m.key}`), m);
  const total = [...runs.values()].reduce((n, r) => n + r.records.length, 0);
  const r = view || fullRange();
  document.getElementById("status").textContent = `${runs.size} run(s), ${total} lines read; updates every 2 s`;
  if (r && document.activeElement.id !== "x0" && document.activeElement.id !== "x1") {
    document.getElementById("x0").value = Math.round(r[0]);
    document.getElementById("x1").value = Math.round(r[1]);
  }
  document.body.dataset.view = view ? view.map(Math.round).join("-") : "all";
  problems();
}

function problems() {
  const box = document.getElementById("problems");
  const items = [];
  for (const run of runs.values()) {
    if (run.error) items.push(`<li class="error">${esc(run.name)}: ${esc(run.error)} (retrying)</li>`);
    for (const p of run.problems) {
      items.push(`<li data-kind="${esc(p.kind)}">${esc(run.name)} line ${p.line}: ` +
        `${p.kind === "skipped" ? "skipped, " : ""}${esc(p.what)}</li>`);
    }
  }
  box.hidden = !items.length;
  box.innerHTML = items.length ? `<b>Lines not drawn as read</b><ul>${items.slice(0, 50).join("")}</ul>` +
    (items.length > 50 ? `<div class="muted">and ${items.length - 50} more</div>` : "") : "";
}

function legend() {
  const box = document.getElementById("legend");
  box.innerHTML = "";
  for (const [id, run] of runs) {
    const lab = document.createElement("label");
    lab.innerHTML = `<input type="checkbox" ${run.shown ? "checked" : ""}><span class="swatch" style="background:${run.color}"></span>${esc(run.name)}` +
      ` <a class="muted" href="/api/metrics.csv?run=${encodeURIComponent(id)}" download title="metrics of this run as CSV">csv</a>`;
    lab.querySelector("input").addEventListener("change", (e) => { run.shown = e.target.checked; drawAll(); });
    box.appendChild(lab);
  }
}

async function refreshRuns() {
  const list = await getJSON("/api/runs");
  let changed = false;
  for (const r of list) {
    if (!runs.has(r.id)) {
      runs.set(r.id, { name: r.name, color: PALETTE[runs.size % PALETTE.length], records: [], gen: -1, shown: true,
                       problems: [], error: null });
      changed = true;
    }
  }
  if (changed) legend();
}

async function pollRun(id, run) {
  // Each run on its own: one run's error never stops the others.
  try {
    const d = await getJSON(`/api/metrics?run=${encodeURIComponent(id)}&from=${run.records.length}&gen=${run.gen}`);
    const had = run.records.length, hadProblems = run.problems.length, hadError = run.error;
    if (d.gen !== run.gen) { run.records = d.records; run.gen = d.gen; }  // a new file: its records replace the old
    else run.records.push(...d.records);
    run.problems = d.problems || [];
    run.error = null;
    return d.gen !== run.gen || run.records.length !== had || run.problems.length !== hadProblems || hadError !== null;
  } catch (e) {
    const changed = run.error !== e.message;
    run.error = e.message;
    return changed;
  }
}

async function poll() {
  const changed = await Promise.all([...runs].map(([id, run]) => pollRun(id, run)));
  if (changed.some(Boolean)) drawAll();
}

// ----------------------------------------------------------------------------- hover, zoom and pan

function stepAt(card, clientX) {
  const svg = card.querySelector("svg"), box = svg.getBoundingClientRect(), s = card._scale;
  const px = ((clientX - box.left) / box.width) * W;
  return s.x0 + ((px - L) / (W - L - R)) * (s.x1 - s.x0);
}

function hover(card, metric, e) {
  const s = card._scale, tip = document.getElementById("tip");
  if (!s) return;
  const step = stepAt(card, e.clientX);
  const rows = [];
  let at = null;
  for (const se of s.all) {
    let best = null;
    for (const p of se.points) if (best === null || Math.abs(p[0] - step) < Math.abs(best[0] - step)) best = p;
    if (!best || Math.abs(best[0] - step) > (s.x1 - s.x0) / 20) continue;
    at = at === null || Math.abs(best[0] - step) < Math.abs(at - step) ? best[0] : at;
    rows.push(`<div><span class="swatch" style="background:${se.color}"></span>${esc(se.name)} ` +
      `<b>${fmt(best[1])}</b> <span class="muted">step ${best[0]}</span></div>`);
  }
  const cursor = card.querySelector(".cursor");
  if (!rows.length) { tip.hidden = true; cursor.setAttribute("x1", -10); cursor.setAttribute("x2", -10); return; }
  const x = s.sx(at);
  cursor.setAttribute("x1", x); cursor.setAttribute("x2", x);
  tip.innerHTML = `<div class="muted">${esc(metric.title)}, step ${at}</div>` + rows.join("");
  tip.hidden = false;
  const left = Math.min(e.pageX + 14, window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 4);
  tip.style.left = `${Math.max(window.scrollX + 4, left)}px`;
  tip.style.top = `${e.pageY + 12}px`;
}

function setView(a, b) {
  const full = fullRange();
  if (!full) return;
  let lo = Math.max(full[0], Math.min(a, b)), hi = Math.min(full[1], Math.max(a, b));
  if (hi - lo < 2) { const mid = (lo + hi) / 2; lo = Math.max(full[0], mid - 1); hi = Math.min(full[1], mid + 1); }
  view = lo <= full[0] && hi >= full[1] ? null : [lo, hi];
  drawAll();
}

function zoomable(card, metric) {
  const svg = card.querySelector("svg");
  let drag = null;
  svg.addEventListener("mousemove", (e) => {
    if (drag) {
      const box = svg.getBoundingClientRect();
      const d = ((e.clientX - drag.x) / box.width) * W / (W - L - R) * (drag.view[1] - drag.view[0]);
      const full = fullRange(), span = drag.view[1] - drag.view[0];
      const lo = Math.min(Math.max(full[0], drag.view[0] - d), full[1] - span);
      view = [lo, lo + span];
      drawAll();
      return;
    }
    hover(card, metric, e);
  });
  svg.addEventListener("mouseleave", () => { document.getElementById("tip").hidden = true; drag = null; });
  svg.addEventListener("wheel", (e) => {
    if (!card._scale) return;
    e.preventDefault();
    const at = stepAt(card, e.clientX), [x0, x1] = [card._scale.x0, card._scale.x1];
    const f = e.deltaY < 0 ? 0.8 : 1.25;
    setView(at - (at - x0) * f, at + (x1 - at) * f);
  }, { passive: false });
  svg.addEventListener("mousedown", (e) => { if (view) drag = { x: e.clientX, view: view.slice() }; });
  window.addEventListener("mouseup", () => { drag = null; });
  svg.addEventListener("dblclick", () => { view = null; drawAll(); });
}

// ----------------------------------------------------------------------------- export

function exportPNG(card, metric) {
  const svg = card.querySelector("svg").cloneNode(true);
  svg.setAttribute("xmlns", svgNS);
  svg.setAttribute("width", W * 2);
  svg.setAttribute("height", H * 2);
  svg.insertBefore(el("rect", { x: 0, y: 0, width: W, height: H, fill: "#fff" }), svg.firstChild);
  const img = new Image();
  img.onload = () => {
    const c = document.createElement("canvas");
    c.width = W * 2; c.height = H * 2;
    c.getContext("2d").drawImage(img, 0, 0);
    const a = document.createElement("a");
    a.href = c.toDataURL("image/png");
    a.download = `${metric.key}.png`;
    document.body.appendChild(a);
    a.click();
    a.remove();
  };
  img.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(new XMLSerializer().serializeToString(svg));
}

// ----------------------------------------------------------------------------- settings

function settings() {
  const box = document.getElementById("settings");
  if (!configs.length) { box.innerHTML = '<div class="muted">No config.json in the runs.</div>'; return; }
  const only = configs.length > 1 && document.getElementById("onlydiff").checked;
  const keys = [...new Set(configs.flatMap((c) => Object.keys(c.config)))].sort();
  const show = (v) => (v === undefined ? "" : typeof v === "string" ? v : JSON.stringify(v));
  let rows = "";
  let shown = 0;
  for (const k of keys) {
    const vals = configs.map((c) => show(c.config[k]));
    const differs = new Set(vals).size > 1;
    if (only && !differs) continue;
    shown += 1;
    rows += `<tr class="${differs ? "diff" : ""}" data-key="${esc(k)}"><td>${esc(k)}</td>${vals.map((v) => `<td>${esc(v)}</td>`).join("")}</tr>`;
  }
  box.innerHTML = `<div class="scroll"><table id="settings-table"><tr><th>setting</th>${configs.map((c) => `<th>${esc(c.name)}</th>`).join("")}</tr>` +
    (rows || `<tr><td colspan="${configs.length + 1}" class="muted">every setting is the same</td></tr>`) + "</table></div>" +
    `<div class="muted">${shown} of ${keys.length} settings shown; highlighted rows differ between runs</div>`;
}

async function start() {
  header("/runs");
  const charts = document.getElementById("charts");
  for (const m of METRICS) {
    const card = document.createElement("div");
    card.className = "card chart";
    card.id = `chart-${m.key}`;
    card.innerHTML = `<h3>${esc(m.title)}${m.extra ? ` <span class="muted">(dashed: ${m.extra})</span>` : ""}` +
      ` <button class="small png" title="save this chart as PNG">PNG</button></h3><svg></svg><div class="note muted"></div>`;
    charts.appendChild(card);
    card.querySelector(".png").addEventListener("click", () => exportPNG(card, m));
    zoomable(card, m);
  }
  for (const id of ["smooth", "logy"]) document.getElementById(id).addEventListener("change", drawAll);
  const onRange = () => setView(+document.getElementById("x0").value, +document.getElementById("x1").value);
  for (const id of ["x0", "x1"]) document.getElementById(id).addEventListener("change", onRange);
  document.getElementById("reset").addEventListener("click", () => { view = null; drawAll(); });
  document.getElementById("onlydiff").addEventListener("change", settings);
  await refreshRuns();
  if (!runs.size) charts.insertAdjacentHTML("beforebegin", '<div class="empty">No metrics.jsonl under the folders given.</div>');
  await poll();
  drawAll();
  configs = await getJSON("/api/config").catch(() => []);
  settings();
  setInterval(poll, 2000);
  setInterval(() => refreshRuns().catch(() => {}), 10000);
}

start();
