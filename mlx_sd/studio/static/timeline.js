// Validation timeline: a row per (prompt, image index), one image per validation step; a lightbox to enlarge.
"use strict";

let data = null;       // /api/timeline answer
let other = null;      // the same for the run shown beside it (same prompt text and seed), or null
let rows = [];         // [{prompt, image, cells: [{step, epoch, url}]}]
let open = null;       // {row, col} shown in the lightbox

function buildRows() {
  const which = document.getElementById("which").value;
  const byRow = new Map();
  for (const im of data.images) {
    if (which !== "all" && String(im.image) !== which) continue;
    const key = `${im.prompt}/${im.image}`;
    if (!byRow.has(key)) byRow.set(key, { prompt: im.prompt, image: im.image, cells: [] });
    byRow.get(key).cells.push(im);
  }
  rows = [...byRow.values()].sort((a, b) => a.prompt - b.prompt || a.image - b.image);
  for (const r of rows) r.cells.sort((a, b) => a.step - b.step);
}

function renderCompare(box) {
  // Rows keyed by prompt text and seed, so two runs' images of the same validation draw sit together at each step.
  const which = document.getElementById("which").value;
  const key = (im) => `${im.text}\u0000${im.seed}`;
  const theirs = new Map();
  for (const im of other.images) theirs.set(`${key(im)}\u0000${im.step}`, im);
  const rowsBy = new Map();
  for (const im of [...data.images, ...other.images]) {
    if (which !== "all" && String(im.image) !== which) continue;
    if (!rowsBy.has(key(im))) rowsBy.set(key(im), { text: im.text, seed: im.seed, steps: new Set() });
    rowsBy.get(key(im)).steps.add(im.step);
  }
  const mine = new Map(data.images.map((im) => [`${key(im)}\u0000${im.step}`, im]));
  const img = (im, who) => im ? `<img loading="lazy" src="${im.url}" data-run="${who}" data-step="${im.step}" alt="${esc(who)} step ${im.step}">`
    : '<div class="missing">-</div>';
  let html = `<div class="card"><p class="muted">Top: ${esc(data.name)}. Bottom: ${esc(other.name)}. ` +
    "Rows pair images of the same prompt and seed.</p>";
  let n = 0;
  for (const [k, r] of rowsBy) {
    const steps = [...r.steps].sort((a, b) => a - b);
    html += `<h3>${esc(r.text)} <span class="muted">(seed ${r.seed})</span></h3><div class="strip pairstrip" data-row="${n++}">` +
      steps.map((st) => `<div class="cell compare" data-step="${st}">${img(mine.get(`${k}\u0000${st}`), data.name)}` +
        `${img(theirs.get(`${k}\u0000${st}`), other.name)}step ${st}</div>`).join("") + "</div>";
  }
  box.innerHTML = html + "</div>";
}

function render() {
  const box = document.getElementById("timeline");
  if (!data || !data.images.length) {
    box.innerHTML = '<div class="empty">No validation images (validation/epoch*_step*_prompt*_img*.png) yet.</div>';
    return;
  }
  if (other) { renderCompare(box); return; }
  buildRows();
  let html = "", last = -1;
  rows.forEach((r, ri) => {
    if (r.prompt !== last) {
      if (last !== -1) html += "</div>";
      const text = data.prompts[r.prompt] !== undefined ? data.prompts[r.prompt] : `prompt ${r.prompt}`;
      html += `<div class="prompt-block card" data-prompt="${r.prompt}"><h3>prompt ${r.prompt}: ${esc(text)}</h3>`;
      last = r.prompt;
    }
    html += `<div class="strip" data-row="${ri}"><div class="rowlabel">img ${r.image}</div>` + r.cells.map((c, ci) =>
      `<div class="cell"><img loading="lazy" src="${c.url}" data-row="${ri}" data-col="${ci}" data-step="${c.step}"
        alt="prompt ${r.prompt} image ${r.image} step ${c.step}">step ${c.step}</div>`).join("") + "</div>";
  });
  box.innerHTML = html + "</div>";
  if (open) show(Math.min(open.row, rows.length - 1), open.col);
}

function show(row, col) {
  const r = rows[row];
  if (!r) return;
  col = Math.max(0, Math.min(col, r.cells.length - 1));
  open = { row, col };
  const c = r.cells[col];
  const lb = document.getElementById("lightbox");
  lb.querySelector("img").src = c.url;
  lb.querySelector(".cap").textContent = `step ${c.step} (epoch ${c.epoch}) - prompt ${r.prompt}, image ${r.image}` +
    ` - ${col + 1} of ${r.cells.length}: ${data.prompts[r.prompt] || ""}`;
  lb.dataset.step = c.step;
  lb.classList.add("open");
}

function close() {
  open = null;
  document.getElementById("lightbox").classList.remove("open");
}

async function load() {
  const root = document.getElementById("root").value, with_ = document.getElementById("other").value;
  if (root === "") return;
  const d = await getJSON(`/api/timeline?root=${encodeURIComponent(root)}`);
  const o = with_ !== "" && with_ !== root ? await getJSON(`/api/timeline?root=${encodeURIComponent(with_)}`) : null;
  const changed = !data || data.root !== d.root || data.images.length !== d.images.length ||
    (other ? other.root + other.images.length : "") !== (o ? o.root + o.images.length : "");
  data = d;
  other = o;
  const which = document.getElementById("which");
  const idx = [...new Set(d.images.map((i) => i.image))].sort((a, b) => a - b);
  if (which.options.length !== idx.length + 1) {
    which.innerHTML = '<option value="all">all</option>' + idx.map((i) => `<option value="${i}">img ${i}</option>`).join("");
  }
  if (changed) render();
}

async function start() {
  header("/timeline");
  const roots = (await getJSON("/api/roots")).filter((r) => r.is_run);
  const sel = document.getElementById("root");
  sel.innerHTML = roots.map((r) => `<option value="${r.id}">${esc(r.name)}</option>`).join("");
  const want = new URLSearchParams(location.search).get("root");
  if (want !== null) sel.value = want;
  sel.addEventListener("change", () => { data = null; load(); });
  const oth = document.getElementById("other");
  oth.innerHTML += roots.map((r) => `<option value="${r.id}">${esc(r.name)}</option>`).join("");
  const withParam = new URLSearchParams(location.search).get("with");
  if (withParam !== null) oth.value = withParam;
  oth.addEventListener("change", () => { data = null; close(); load(); });
  document.getElementById("which").addEventListener("change", render);
  document.getElementById("timeline").addEventListener("click", (e) => {
    if (e.target.tagName !== "IMG") return;
    if (other) {  // side by side: enlarge the one image clicked
      const lb = document.getElementById("lightbox");
      lb.querySelector("img").src = e.target.src;
      lb.querySelector(".cap").textContent = `${e.target.dataset.run} - step ${e.target.dataset.step}`;
      lb.classList.add("open");
      open = null;
    } else show(+e.target.dataset.row, +e.target.dataset.col);
  });
  document.getElementById("lightbox").addEventListener("click", close);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") close();
    if (!open) return;
    const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
    if (e.key === "Escape") close();
    else if (moves[e.key]) {
      e.preventDefault();
      const [dr, dc] = moves[e.key];
      const row = Math.max(0, Math.min(rows.length - 1, open.row + dr));
      show(row, open.col + dc);
    }
  });
  if (!roots.length) {
    document.getElementById("timeline").innerHTML = '<div class="empty">None of the folders is a training run.</div>';
    return;
  }
  await load();
  setInterval(load, 5000);  // new validation steps appear while training
}

start();
