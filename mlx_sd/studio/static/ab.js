// Blind A/B: the server picks a pair (same prompt and seed) and which side each source is on; names show after the vote.
// "A" and "B" name the two sources chosen (as in the database and CSV); the page shows images as left and right.
"use strict";

let current = null;   // {a, b, pair, nonce, ...}
let busy = false;
let cast = 0;
const undoable = [];  // nonces of this session's votes, newest last
// Letter keys in either case (Shift, Caps Lock); a/b are the left/right keys of earlier versions.
const KEYS = { a: "left", arrowleft: "left", "1": "left", l: "left", b: "right", arrowright: "right", "2": "right",
               r: "right", t: "tie", arrowdown: "tie", "3": "tie", x: "both_bad", "4": "both_bad" };

function msg(text, error) {
  const m = document.getElementById("msg");
  m.textContent = text;
  m.className = error ? "error" : "muted";
}

function loaded(img) {
  return img.complete && img.naturalWidth ? Promise.resolve() :
    new Promise((ok) => { img.onload = ok; img.onerror = ok; });
}

async function next(skip) {
  const a = document.getElementById("srcA").value, b = document.getElementById("srcB").value;
  const rater = document.getElementById("rater").value.trim();
  const d = await getJSON(`/api/ab/next?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}` +
    `&rater=${encodeURIComponent(rater)}&skip=${encodeURIComponent(skip || "")}`);
  const done = document.getElementById("done");
  done.hidden = !d.done;
  if (!d.pair) {
    document.getElementById("arena").hidden = !d.done;  // all rated: undo stays at hand
    document.getElementById("pairview").hidden = true;
    document.getElementById("progress").textContent = d.done ? `you have rated ${d.rated} of ${d.total} pairs` : "";
    current = null;
    if (d.done) { done.textContent = d.reason; msg(""); } else msg(d.reason, true);
    busy = false;
    document.body.dataset.ready = "1";
    return;
  }
  current = Object.assign({ a, b }, d);
  document.getElementById("prompt").textContent = d.prompt;
  document.getElementById("seed").textContent = d.seed === null ? "" : `(seed ${d.seed})`;
  for (const id of ["revealL", "revealR"]) document.getElementById(id).textContent = "";
  const left = document.getElementById("left"), right = document.getElementById("right");
  left.src = d.left;
  right.src = d.right;
  await Promise.all([loaded(left), loaded(right)]);
  document.getElementById("progress").textContent =
    `${cast} vote(s) cast this session; you have rated ${d.rated} of ${d.total} pairs`;
  document.getElementById("arena").hidden = false;
  document.getElementById("pairview").hidden = false;
  document.getElementById("arena").dataset.pair = d.pair;
  busy = false;
  document.body.dataset.ready = "1";
}

async function vote(answer) {
  if (busy || !current) return;
  const rater = document.getElementById("rater").value.trim();
  if (!rater) { msg("enter a rater name first", true); return; }
  busy = true;
  document.body.dataset.ready = "0";
  localStorage.setItem("studio-rater", rater);
  try {
    const r = await getJSON("/api/ab/vote", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ a: current.a, b: current.b, pair: current.pair, nonce: current.nonce, answer, rater }),
    });
    cast += 1;
    undoable.push(current.nonce);
    document.getElementById("undo").disabled = false;
    document.body.dataset.votes = cast;
    document.getElementById("revealL").textContent = r.left;
    document.getElementById("revealR").textContent = r.right;
    msg(`vote ${r.id} stored`);
    results();
    await new Promise((ok) => setTimeout(ok, 600));  // long enough to read which was which
    await next();
  } catch (e) {
    msg(`vote not stored: ${e.message}`, true);
    busy = false;
    document.body.dataset.ready = "1";
  }
}

async function skip() {
  if (busy || !current) return;
  busy = true;
  document.body.dataset.ready = "0";
  await next(current.pair).catch((e) => { msg(e.message, true); busy = false; });
}

async function undo() {
  if (busy || !undoable.length) return;
  busy = true;
  document.body.dataset.ready = "0";
  try {
    const r = await getJSON("/api/ab/undo", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ nonce: undoable[undoable.length - 1] }) });
    undoable.pop();
    cast -= 1;
    document.body.dataset.votes = cast;
    document.getElementById("undo").disabled = !undoable.length;
    msg(`vote ${r.undone} undone`);
    results();
    await next();
  } catch (e) {
    msg(`not undone: ${e.message}`, true);
    busy = false;
    document.body.dataset.ready = "1";
  }
}

function cell(v, digits) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }

let resultsAsked = 0;

async function results() {
  const ask = ++resultsAsked;
  const d = await getJSON("/api/ab/results?rounds=1000");
  if (ask !== resultsAsked) return;  // a newer request is on its way; its answer counts more votes
  const box = document.getElementById("results");
  box.dataset.votes = d.votes;
  if (!d.votes) { box.innerHTML = '<div class="muted">No votes yet.</div>'; return; }
  const ratings = `<div class="card"><h3>Bradley-Terry scores (Elo scale, 95% bootstrap interval, ${d.bootstrap_rounds} rounds)</h3>
    <table id="ranking"><tr><th>#</th><th>source</th><th>score</th><th>95% interval</th><th>battles</th></tr>` +
    d.ratings.map((r, i) => `<tr><td>${i + 1}</td><td class="name">${esc(r.name)}</td><td>${cell(r.score, 0)}</td>
      <td>${cell(r.lo, 0)} .. ${cell(r.hi, 0)}</td><td>${r.battles}</td></tr>`).join("") + "</table></div>";
  const pairs = `<div class="card"><h3>Votes per comparison (${d.votes} in all)</h3><table id="pairs">
    <tr><th>A vs B</th><th>A wins</th><th>B wins</th><th>ties</th><th>both bad</th></tr>` +
    d.pairs.map((p) => `<tr><td>${esc(p.a)} vs ${esc(p.b)}</td><td>${p.a_wins}</td><td>${p.b_wins}</td>
      <td>${p.ties}</td><td>${p.both_bad}</td></tr>`).join("") + "</table></div>";
  const m = d.matrix;
  const matrix = `<div class="card"><h3>Win fraction of row over column (decisive votes only)</h3><table id="matrix">
    <tr><th></th>${m.names.map((n) => `<th>${esc(n)}</th>`).join("")}</tr>` +
    m.names.map((n, i) => `<tr><td>${esc(n)}</td>${m.win_fraction[i].map((f, j) =>
      `<td title="${m.battles[i][j]} battles">${i === j ? "" : cell(f, 2)}</td>`).join("")}</tr>`).join("") +
    "</table></div>";
  box.innerHTML = ratings + pairs + matrix;
}

async function start() {
  header("/ab");
  const sources = await getJSON("/api/sources");
  const opts = sources.map((s) => `<option value="${s.id}">${esc(s.name)} (${s.count})</option>`).join("");
  const A = document.getElementById("srcA"), B = document.getElementById("srcB");
  A.innerHTML = opts;
  B.innerHTML = opts;
  if (sources.length > 1) B.value = sources[sources.length - 1].id;
  document.getElementById("rater").value = localStorage.getItem("studio-rater") || "";
  const begin = () => {
    if (A.value === B.value) { msg("choose two different sources", true); return; }
    if (!document.getElementById("rater").value.trim()) { msg("enter a rater name first", true); return; }
    msg("");
    busy = true;
    document.getElementById("rater").blur();  // the answer keys work at once
    next().catch((e) => { msg(e.message, true); busy = false; });
  };
  document.getElementById("start").addEventListener("click", begin);
  document.getElementById("rater").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); begin(); } });
  for (const btn of document.querySelectorAll("[data-answer]")) btn.addEventListener("click", () => vote(btn.dataset.answer));
  document.getElementById("skip").addEventListener("click", skip);
  document.getElementById("undo").addEventListener("click", undo);
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || e.ctrlKey || e.metaKey || e.altKey) return;
    if (document.getElementById("arena").hidden) return;
    const key = e.key.toLowerCase();
    if (key === "s") { e.preventDefault(); skip(); return; }
    if (key === "u") { e.preventDefault(); undo(); return; }
    const answer = KEYS[key];
    if (answer) { e.preventDefault(); vote(answer); }
  });
  await results();
}

start();
