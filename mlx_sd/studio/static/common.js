// Shared by the three pages: the header, JSON fetching, HTML escaping.
"use strict";

function header(active) {
  const pages = [["/runs", "Runs"], ["/timeline", "Validation timeline"], ["/ab", "Blind A/B"]];
  const h = document.createElement("header");
  h.innerHTML = "<b>mlx-sd-studio</b>" + pages.map(([href, label]) =>
    `<a href="${href}" class="${href === active ? "on" : ""}">${label}</a>`).join("");
  document.body.prepend(h);
}

async function getJSON(url, options) {
  const r = await fetch(url, Object.assign({ cache: "no-store" }, options || {}));
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || body.detail || `${r.status} ${r.statusText}`);
  return body;
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

const PALETTE = ["#2457c5", "#d1495b", "#2a9d8f", "#e9a23b", "#7b2cbf", "#4d908e", "#c2185b", "#6d597a", "#577590", "#bc6c25"];
