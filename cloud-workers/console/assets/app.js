// framelink console: the live dashboard. Plain JavaScript, no build step: the first
// server-sent event (`snapshot`) carries the whole fleet, later ones (`delta`) only what changed.
// Everything a device or camera names is inserted as text (never as HTML).
"use strict";

const fleet = { devices: new Map(), cameras: new Map(), workers: new Map(), lag: [], dlqByReason: {}, deadLetters: [], events: [], lagError: null, windowMs: 900000 };
let clockOffset = 0; // server time - our time
let dirty = false;

const $ = (id) => document.getElementById(id);
const now = () => Date.now() + clockOffset;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

// A path segment encoded as the server encodes it (RFC 3986 unreserved characters kept), so a
// thumbnail's URL is the same whichever side made it (and the browser's cache hits).
function enc(s) {
  return encodeURIComponent(s).replace(/[!'()*.]/g, (ch) => "%" + ch.charCodeAt(0).toString(16).toUpperCase());
}

function age(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

function badge(status) { return el("span", { class: "badge " + status }, status); }

function apply(msg) {
  clockOffset = msg.now_ms - Date.now();
  if (msg.full) {
    fleet.devices.clear(); fleet.cameras.clear(); fleet.workers.clear();
    fleet.lag = []; fleet.deadLetters = []; fleet.events = [];
  }
  // Removals first: an entity removed and back within one push is in both lists.
  for (const r of msg.removed) {
    if (r.kind === "device") fleet.devices.delete(r.id);
    else if (r.kind === "worker") fleet.workers.delete(r.id);
    else if (r.kind === "camera") fleet.cameras.delete(r.id);
  }
  if (msg.lag_window_ms) fleet.windowMs = msg.lag_window_ms;
  for (const d of msg.devices) fleet.devices.set(d.id, d);
  for (const w of msg.workers) fleet.workers.set(w.id, w);
  for (const c of msg.cameras) fleet.cameras.set(c.id, c);
  // Beats that moved only a camera's figures: id -> [fps_captured, fps_sent, last_seq, last_frame_ms].
  for (const [id, b] of Object.entries(msg.beats || {})) {
    const c = fleet.cameras.get(id);
    if (c) [c.fps_captured, c.fps_sent, c.last_seq, c.last_frame_ms] = b;
  }
  // Newer results, compactly: id -> [seq, capture_ms, received_ms, latency_ms, width, height].
  for (const [id, r] of Object.entries(msg.results || {})) {
    const c = fleet.cameras.get(id);
    if (!c) continue;
    const [seq, capture_ms, received_ms, latency_ms, width, height] = r;
    c.result = Object.assign({}, c.result, { seq, capture_ms, received_ms, latency_ms, width, height });
    c.thumbnail = "/thumbs/" + enc(c.device) + "/" + enc(c.camera) + "?seq=" + seq;
  }
  fleet.lag.push(...msg.lag);
  const cutoff = now() - fleet.windowMs;
  fleet.lag = fleet.lag.filter((p) => p.at_ms >= cutoff);
  if (msg.dead_letters_by_reason) fleet.dlqByReason = msg.dead_letters_by_reason;
  if (msg.lag_error !== null && msg.lag_error !== undefined) fleet.lagError = msg.lag_error;
  else if (msg.lag.length) fleet.lagError = null;
  fleet.deadLetters = fleet.deadLetters.concat(msg.dead_letters).slice(-50);
  fleet.events = fleet.events.concat(msg.events).slice(-50);
  dirty = true;
}

const ORDER = { offline: 0, stale: 1, live: 2 };

function renderSummary() {
  const count = (m) => { const c = { live: 0, stale: 0, offline: 0 }; for (const x of m.values()) c[x.status]++; return c; };
  for (const [id, name, m] of [["sum-cameras", "cameras", fleet.cameras], ["sum-devices", "devices", fleet.devices], ["sum-workers", "workers", fleet.workers]]) {
    const c = count(m);
    $(id).replaceChildren(name + " ", el("b", {}, c.live), " live · ", el("b", {}, c.stale), " stale · ", el("b", {}, c.offline), " offline");
  }
  const last = fleet.lag[fleet.lag.length - 1];
  $("lag-total").textContent = last ? last.total : "–";
  $("dlq-total").textContent = Object.values(fleet.dlqByReason).reduce((a, b) => a + b, 0);
}

const cards = new Map(); // camera id -> {card, img, ...}

function renderCameras() {
  const box = $("cameras");
  const filter = $("filter").value.trim().toLowerCase();
  const list = [...fleet.cameras.values()]
    .filter((c) => !filter || (c.id + " " + c.status + " " + (c.state || "")).toLowerCase().includes(filter))
    .sort((a, b) => (ORDER[a.status] - ORDER[b.status]) || a.id.localeCompare(b.id));
  if (!list.length) {
    box.replaceChildren(el("p", { class: "empty" }, fleet.cameras.size ? "No camera matches the filter." : "No cameras yet: agents appear here with their first heartbeat or result."));
    cards.clear();
    return;
  }
  const keep = new Set();
  const nodes = [];
  for (const c of list) {
    keep.add(c.id);
    let k = cards.get(c.id);
    if (!k) {
      const img = el("img", { alt: "latest result of " + c.id, loading: "lazy", decoding: "async" });
      const thumb = el("div", { class: "thumb" }, "no result yet");
      k = { img, thumb, title: el("div", { class: "title" }), status: el("span"), seen: el("span"), fps: el("span"), drops: el("span"), result: el("span"), src: null };
      k.card = el("div", { class: "card", "data-id": c.id }, thumb,
        el("div", { class: "meta" }, k.title, el("div", { class: "row" }, k.status, k.seen), el("div", { class: "row" }, k.fps, k.drops), el("div", { class: "row" }, k.result)));
      cards.set(c.id, k);
    }
    k.card.setAttribute("data-status", c.status);
    k.title.textContent = c.id;
    k.title.title = c.state ? "camera state: " + c.state : "";
    k.status.replaceChildren(badge(c.status), c.state && c.state !== "up" ? " " + c.state : "");
    k.seen.textContent = c.last_frame_ms ? "frame " + age(c.last_frame_ms) : (c.result ? "result " + age(c.result.received_ms) : "");
    k.fps.textContent = c.fps_sent != null ? c.fps_sent + " fps sent" : "";
    k.drops.textContent = c.dropped ? c.dropped + " dropped" : "";
    k.drops.title = Object.entries(c.dropped_by_reason || {}).map(([r, n]) => r + ": " + n).join("\n");
    k.result.textContent = c.result ? "#" + c.result.seq + " " + c.result.width + "x" + c.result.height + (c.result.latency_ms != null ? " · " + c.result.latency_ms + " ms" : "") : "";
    if (c.thumbnail && c.thumbnail !== k.src) {
      k.src = c.thumbnail;
      k.img.src = c.thumbnail;
      k.img.setAttribute("data-seq", c.result ? c.result.seq : "");
      if (k.img.parentNode !== k.thumb) k.thumb.replaceChildren(k.img);
    }
    nodes.push(k.card);
  }
  for (const id of [...cards.keys()]) if (!keep.has(id)) cards.delete(id);
  // Re-order only when the order changed (keeps images from reloading).
  const current = [...box.children];
  if (current.length !== nodes.length || current.some((n, i) => n !== nodes[i])) box.replaceChildren(...nodes);
}

function spoolBar(s) {
  const pct = Math.min(100, Math.round((s.fill || 0) * 100));
  const cls = pct >= 95 ? "bar full" : pct >= 80 ? "bar warn" : "bar";
  const bar = el("span", { class: cls, title: bytes(s.bytes) + " of " + bytes(s.cap_bytes) + ", " + s.records + " frames" }, el("span"));
  bar.firstChild.style.width = pct + "%";
  return el("span", {}, bar, " " + pct + " %");
}

function renderDevices() {
  const rows = [...fleet.devices.values()].sort((a, b) => (ORDER[a.status] - ORDER[b.status]) || a.id.localeCompare(b.id)).map((d) =>
    el("tr", { "data-id": d.id, "data-status": d.status },
      el("td", {}, d.id), el("td", {}, badge(d.status)), el("td", {}, age(d.last_seen_ms)),
      el("td", { title: d.link_error || "" }, d.link), el("td", {}, spoolBar(d.spool)), el("td", {}, d.cameras),
      el("td", {}, d.dropped), el("td", {}, d.cpu_percent + " %"), el("td", {}, bytes(d.rss_bytes)), el("td", {}, d.version)));
  $("devices").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 10, class: "empty" }, "No device has sent a heartbeat yet."))]));
}

function renderWorkers() {
  const rows = [...fleet.workers.values()].sort((a, b) => (ORDER[a.status] - ORDER[b.status]) || a.id.localeCompare(b.id)).map((w) =>
    el("tr", { "data-id": w.id, "data-status": w.status },
      el("td", {}, w.id), el("td", {}, badge(w.status)), el("td", {}, w.health), el("td", {}, w.backend), el("td", {}, w.pipeline || "(re-encode)"),
      el("td", {}, w.delivery), el("td", { class: "wrap" }, w.partitions.join(" ")), el("td", {}, w.fps_in + " / " + w.fps_out),
      el("td", {}, w.lag), el("td", {}, w.in_flight), el("td", {}, Object.values(w.dead_letters).reduce((a, b) => a + b, 0)), el("td", {}, w.cpu_percent + " %")));
  $("workers").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 12, class: "empty" }, "No worker has sent a heartbeat yet."))]));
}

const COLORS = ["#4aa3df", "#2fb67c", "#e0a030", "#d9534f", "#a778d8", "#5bc0be", "#f08a5d", "#b8de6f"];

function renderLag() {
  const svg = $("lag-chart");
  const W = 600, H = 200, pts = fleet.lag;
  svg.setAttribute("data-points", pts.length);
  $("lag-note").textContent = fleet.lagError ? "(" + fleet.lagError + ")" : "last " + Math.round(fleet.windowMs / 60000) + " minutes";
  const ns = "http://www.w3.org/2000/svg";
  const mk = (tag, attrs) => { const e = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };
  const children = [];
  const end = now(), start = end - fleet.windowMs;
  const max = Math.max(10, ...pts.map((p) => p.total));
  for (const f of [0.25, 0.5, 0.75]) children.push(mk("line", { class: "grid-line", x1: 0, x2: W, y1: H * f, y2: H * f }));
  const x = (t) => ((t - start) / (end - start)) * W;
  const y = (v) => H - (v / max) * (H - 10);
  const series = new Map([["total", pts.map((p) => [p.at_ms, p.total])]]);
  for (const p of pts) for (const [tp, v] of Object.entries(p.partitions)) { if (!series.has(tp)) series.set(tp, []); series.get(tp).push([p.at_ms, v]); }
  const legend = [];
  let i = 0;
  for (const [name, s] of series) {
    const color = COLORS[i++ % COLORS.length];
    children.push(mk("polyline", { points: s.map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1)).join(" "), stroke: color, "data-series": name }));
    legend.push(el("span", {}, (() => { const b = el("i"); b.style.background = color; return b; })(), name));
    if (series.size > 9 && i > 8) break;
  }
  const label = mk("text", { x: 4, y: 12 });
  label.textContent = "max " + max;
  children.push(label);
  svg.replaceChildren(...children);
  svg.setAttribute("data-last", pts.length ? pts[pts.length - 1].total : "");
  $("lag-legend").replaceChildren(...legend);
}

function renderDlq() {
  const entries = Object.entries(fleet.dlqByReason).sort((a, b) => b[1] - a[1]);
  const max = Math.max(1, ...entries.map((e) => e[1]));
  $("dlq-reasons").replaceChildren(...(entries.length ? entries.map(([r, n]) => {
    const bar = el("span", { class: "bar" }, el("span"));
    bar.firstChild.style.width = Math.round((n / max) * 100) + "%";
    return el("div", { class: "reason", "data-reason": r }, bar, el("span", {}, r + ": " + n));
  }) : [el("p", { class: "empty" }, "None since the console started.")]));
  $("dlq-recent").replaceChildren(...fleet.deadLetters.slice().reverse().slice(0, 10).map((d) =>
    el("tr", {}, el("td", {}, age(d.at_ms)), el("td", {}, d.reason), el("td", {}, d.key), el("td", { class: "wrap" }, d.detail))));
}

// A motion event's box: {x, y, width, height} in the frame's pixels.
function box(b) {
  return b && typeof b === "object" ? b.width + "x" + b.height + " at " + b.x + "," + b.y : "";
}

function renderEvents() {
  $("events").replaceChildren(...fleet.events.slice().reverse().slice(0, 15).map((e) =>
    el("tr", {}, el("td", {}, age(e.at_ms)), el("td", {}, e.device + "/" + e.camera),
      el("td", {}, e.event && e.event.changed_fraction != null ? (e.event.changed_fraction * 100).toFixed(1) + " %" : ""),
      el("td", {}, box(e.event && e.event.bbox)))));
}

function render() {
  if (dirty) {
    dirty = false;
    renderSummary(); renderCameras(); renderDevices(); renderWorkers(); renderLag(); renderDlq(); renderEvents();
  }
}

function connect() {
  const es = new EventSource("/api/stream");
  const onMessage = (ev) => { apply(JSON.parse(ev.data)); $("conn").textContent = "live"; $("conn").dataset.state = "live"; };
  es.addEventListener("snapshot", onMessage);
  es.addEventListener("delta", onMessage);
  es.onerror = () => { $("conn").textContent = "reconnecting…"; $("conn").dataset.state = "reconnecting"; };
}

// Large-image jobs: polled (they change little and only while someone waits for one).
let jobsEnabled = true;

function renderJobs(list) {
  const rows = list.map((j) => {
    const pct = j.total ? Math.round(100 * (j.done + j.failed) / j.total) : 0;
    const bar = el("progress", { max: 100, value: pct, title: j.done + " done, " + j.failed + " failed of " + j.total });
    const actions = el("td", {});
    if (j.status === "done") actions.append(el("a", { href: "/api/jobs/" + enc(j.job_id) + "/result", download: j.job_id + ".png" }, "result"));
    if (j.status === "queuing" || j.status === "running") {
      const b = el("button", { type: "button", class: "link" }, "cancel");
      b.addEventListener("click", () => fetch("/api/jobs/" + enc(j.job_id), { method: "DELETE" }).then(pollJobs));
      actions.append(b);
    }
    const why = j.reason || (j.errors && j.errors.length ? j.errors.map((e) => "tile " + e.tile + ": " + e.reason).join("; ") : "");
    return el("tr", { "data-id": j.job_id, "data-status": j.status },
      el("td", {}, j.job_id), el("td", {}, (j.name || "") + " " + j.width + "×" + j.height),
      el("td", {}, j.pipeline), el("td", { title: why }, j.status), el("td", {}, bar, " " + pct + " %"),
      el("td", {}, j.done + "/" + j.total + (j.failed ? " (" + j.failed + " failed)" : "")),
      el("td", {}, j.seconds.toFixed(1) + " s"), actions);
  });
  $("jobs").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 8, class: "empty" }, "No job yet: upload an image above, or POST it to /api/jobs."))]));
}

// Polls can overlap (the timer and an upload's own refresh): an answer older than the one
// shown is dropped, so the table never steps back to a job's earlier state.
let jobsAsked = 0, jobsShown = 0;

function pollJobs() {
  if (!jobsEnabled) return Promise.resolve();
  const asked = ++jobsAsked;
  return fetch("/api/jobs").then((r) => {
    if (r.status === 404) { jobsEnabled = false; $("jobs-section").hidden = true; return null; }
    return r.ok ? r.json() : null; // 503 while the console reads its jobs back: next time
  }).then((list) => {
    if (!list || asked < jobsShown) return;
    jobsShown = asked;
    renderJobs(list);
  }).catch(() => {});
}

function submitJob(ev) {
  ev.preventDefault();
  const form = new FormData();
  form.append("pipeline", $("job-pipeline").value);
  if ($("job-tile").value) form.append("tile", $("job-tile").value);
  form.append("image", $("job-file").files[0]);
  $("job-message").textContent = "uploading…";
  fetch("/api/jobs", { method: "POST", body: form }).then((r) => r.json().then((b) => {
    $("job-message").textContent = r.ok ? "job " + b.job_id + ": " + b.tiles + " tiles" : (b.error || "refused: HTTP " + r.status);
    pollJobs();
  })).catch((e) => { $("job-message").textContent = "upload failed: " + e; });
}

document.addEventListener("DOMContentLoaded", () => {
  $("job-form").addEventListener("submit", submitJob);
  pollJobs();
  setInterval(pollJobs, 1000);
  $("filter").addEventListener("input", () => { dirty = true; });
  connect();
  setInterval(render, 250);
  // Ages and the chart's time axis move with the clock.
  setInterval(() => { dirty = true; }, 1000);
});
