// KiteQ management console: plain JavaScript, no build step, no third-party code.
// Every value from the broker is rendered with textContent (never as markup).
"use strict";

const SECRET_KEY = "kiteq.adminSecret";
const RATE_POINTS = 60; // samples kept for the rate chart (one per refresh)
const REFRESH_MS = 2000;
const SERIES = [
  ["received", "#1f77b4"],
  ["delivered", "#2ca02c"],
  ["redelivered", "#ff7f0e"],
  ["deadLettered", "#d62728"],
];

const state = {
  samples: [], // {time, totals}
  dlqNext: null,
  timer: null,
};

function $(id) {
  return document.getElementById(id);
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const secret = sessionStorage.getItem(SECRET_KEY);
  if (secret) {
    headers.set("Authorization", "Bearer " + secret);
  }
  const init = {...options, headers, cache: "no-store"};
  if (options.json !== undefined) {
    headers.set("Content-Type", "application/json");
    init.method = "POST";
    init.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    throw new Unauthorized("admin secret required");
  }
  if (response.status === 404) {
    return null;
  }
  if (!response.ok) {
    throw new Error((await response.text()).trim() || "HTTP " + response.status);
  }
  return response.json();
}

// -- formatting ---------------------------------------------------------------------

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().replace(".000Z", "Z") : "";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) {
    return "";
  }
  const s = Math.floor(seconds);
  if (s < 120) {
    return s + " s";
  }
  if (s < 7200) {
    return Math.floor(s / 60) + " min";
  }
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function cell(row, value, className) {
  const td = row.insertCell();
  if (value instanceof Node) {
    td.append(value);
  } else {
    td.textContent = value === null || value === undefined ? "" : String(value);
  }
  if (className) {
    td.className = className;
  }
  return td;
}

function link(text, href) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  return a;
}

function button(text, onClick, className) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.className = className || "";
  b.addEventListener("click", onClick);
  return b;
}

function rows(tableId, items, fill) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  for (const item of items) {
    fill(body.insertRow(), item);
  }
  if (items.length === 0) {
    const empty = body.insertRow();
    const td = cell(empty, "(none)", "empty");
    td.colSpan = $(tableId).tHead ? $(tableId).tHead.rows[0].cells.length : 2;
  }
}

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// -- views --------------------------------------------------------------------------

async function showOverview() {
  const data = await api("api/overview");
  // this broker first, then the cluster's other live brokers (known to the registry;
  // their figures are on their own consoles)
  rows("brokers", data.brokers, (row, b) => {
    cell(row, b.self ? `${b.address} (this broker)` : b.address);
    cell(row, b.cluster);
    cell(row, b.store ?? "—");
    cell(row, b.uptime === undefined ? "—" : duration(b.uptime));
    cell(row, b.threads ?? "—", "num");
  });
  const cards = $("totals");
  cards.replaceChildren();
  for (const [name, value] of Object.entries(data.totals)) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.total = name;
    const label = document.createElement("span");
    label.textContent = name;
    const number = document.createElement("strong");
    number.textContent = String(value);
    card.append(number, label);
    cards.append(card);
  }
  drawRates();
}

function rateSeries() {
  // per-second deltas of the counters between consecutive samples
  const points = [];
  for (let i = 1; i < state.samples.length; i++) {
    const a = state.samples[i - 1];
    const b = state.samples[i];
    const dt = b.time - a.time;
    if (dt <= 0) {
      continue;
    }
    const point = {time: b.time};
    for (const [name] of SERIES) {
      point[name] = Math.max(0, (b.totals[name] - a.totals[name]) / dt);
    }
    points.push(point);
  }
  return points;
}

function drawRates() {
  const canvas = $("rates");
  const ctx = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  const pad = 36;
  ctx.clearRect(0, 0, w, h);
  const points = rateSeries();
  let top = 1;
  for (const p of points) {
    for (const [name] of SERIES) {
      top = Math.max(top, p[name]);
    }
  }
  ctx.strokeStyle = "#ccc";
  ctx.fillStyle = "#555";
  ctx.font = "11px sans-serif";
  ctx.beginPath();
  ctx.moveTo(pad, 8);
  ctx.lineTo(pad, h - pad);
  ctx.lineTo(w - 8, h - pad);
  ctx.stroke();
  ctx.fillText(top.toFixed(top < 10 ? 1 : 0), 2, 14);
  ctx.fillText("0", 2, h - pad);
  const x = (i) => pad + ((w - pad - 8) * i) / Math.max(1, RATE_POINTS - 1);
  const y = (v) => h - pad - ((h - pad - 8) * v) / top;
  const legend = $("rates-legend");
  legend.replaceChildren();
  const offset = RATE_POINTS - points.length;
  for (const [name, color] of SERIES) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach((p, i) => (i === 0 ? ctx.moveTo : ctx.lineTo).call(ctx, x(offset + i), y(p[name])));
    ctx.stroke();
    ctx.fillStyle = color; // a dot per sample: a single one is visible before any line
    points.forEach((p, i) => ctx.fillRect(x(offset + i) - 2, y(p[name]) - 2, 4, 4));
    const item = document.createElement("span");
    item.className = "legend-" + name;
    const last = points.length ? points[points.length - 1][name] : 0;
    item.textContent = name + " " + last.toFixed(1) + "/s";
    item.dataset.color = color;
    legend.append(item);
  }
}

async function showGroups() {
  const data = await api("api/groups");
  rows("topics", data.topics, (row, t) => {
    cell(row, t.topic);
    cell(row, t.backlog, "num");
  });
  rows("groups", data.groups, (row, g) => {
    cell(row, g.topic);
    cell(row, g.group ? link(g.group, "#group/" + encodeURIComponent(g.group)) : "(no group)");
    cell(row, g.consumers, "num");
    cell(row, g.backlog, "num");
    cell(row, g.unacked, "num");
    cell(row, g.waiting, "num");
    cell(row, duration(g.oldestAge), "num");
    cell(row, g.deadLetters ? link(String(g.deadLetters), "#dlq/" + encodeURIComponent(g.group)) : "0", "num");
    cell(
      row,
      g.bindings
        .map((b) => b.type + ":" + b.messageType + (b.watermark ? " ≤" + b.watermark + "/s" : "") + (b.persistent ? "" : " (transient)"))
        .join(", ")
    );
  });
}

async function showGroup(name) {
  const data = await api("api/groups/" + encodeURIComponent(name));
  $("group-name").textContent = name;
  if (data === null) {
    $("group-topics").textContent = "unknown group";
    rows("consumers", [], () => {});
    return;
  }
  $("group-topics").textContent = data.topics.join(", ") || "(no bindings)";
  rows("consumers", data.consumers, (row, c) => {
    cell(row, c.client);
    cell(row, c.peer);
    cell(row, when(c.since));
    cell(row, c.unacked, "num");
    cell(row, c.maxInFlight, "num");
    cell(row, c.consumer ? "consumer" : "producer");
  });
}

function dlqFilter() {
  return {
    topic: $("dlq-topic").value.trim(),
    type: $("dlq-type").value.trim(),
    group: $("dlq-group").value.trim(),
    reason: $("dlq-reason").value,
  };
}

function fillLetter(row, d) {
  cell(row, link(d.id, "#message/" + d.id), "id");
  cell(row, d.topic);
  cell(row, d.type);
  cell(row, d.group || "(none)");
  cell(row, d.reason);
  cell(row, d.attempts, "num");
  cell(row, when(d.deadTime));
  // one letter: this message for this group only (a no_binding letter has no group)
  const one = {ids: [d.id], group: d.group};
  cell(row, button("Redrive…", guarded(() => previewRedrive(one, "message " + d.id)), "redrive-one"));
}

async function showDlq(append) {
  const query = new URLSearchParams(dlqFilter());
  if (append && state.dlqNext) {
    query.set("after", state.dlqNext[0]);
    query.set("afterGroup", state.dlqNext[1]);
  }
  const data = await api("api/dlq?" + query);
  const body = $("dead-letters").tBodies[0];
  if (append) {
    for (const d of data.deadLetters) {
      fillLetter(body.insertRow(), d);
    }
  } else {
    rows("dead-letters", data.deadLetters, fillLetter);
  }
  state.dlqNext = data.next;
  $("dlq-more").hidden = !data.next;
}

function filterSelection() {
  const where = dlqFilter();
  const named = Object.entries(where).filter(([, v]) => v).map(([k, v]) => k + "=" + v);
  return [{filter: where}, named.length ? named.join(", ") : "no filter: the whole DLQ"];
}

// selection: {filter} or {ids, group}, what the confirmation then redrives
async function previewRedrive(selection, label) {
  const data = await api("api/dlq/redrive", {json: {...selection, dryRun: true}});
  const panel = $("redrive-panel");
  $("dlq-result").textContent = "";
  panel.hidden = false;
  panel.dataset.request = JSON.stringify({...selection, expect: data.redriven});
  $("redrive-summary").textContent =
    "Dry run: " + data.redriven + " dead letter(s) would be delivered again to their group (" + label + ").";
  const list = $("redrive-list");
  list.replaceChildren();
  for (const [id, group] of data.preview) {
    const item = document.createElement("li");
    item.textContent = id + " → " + (group || "(no group)");
    list.append(item);
  }
  if (data.redriven > data.preview.length) {
    const more = document.createElement("li");
    more.textContent = "… and " + (data.redriven - data.preview.length) + " more";
    list.append(more);
  }
  $("redrive-confirm").disabled = data.redriven === 0;
}

async function confirmRedrive() {
  const panel = $("redrive-panel");
  // the preview's count: the broker moves nothing if the DLQ changed since (409)
  const selection = JSON.parse(panel.dataset.request);
  let data;
  try {
    data = await api("api/dlq/redrive", {json: {...selection, dryRun: false}});
  } catch (error) {
    if (!(error instanceof Unauthorized)) {
      $("redrive-summary").textContent = error.message;
      $("redrive-confirm").disabled = true;
    }
    throw error;
  }
  panel.hidden = true;
  $("dlq-result").textContent = "Redriven: " + data.redriven + " dead letter(s).";
  await showDlq(false);
}

async function showTransactions() {
  const unresolved = $("tx-unresolved").checked ? "1" : "";
  const data = await api("api/transactions?unresolved=" + unresolved);
  $("tx-counts").textContent =
    "Pending: " + data.pending + " · unresolved (checks exhausted or answered UNKNOWN): " + data.unresolved;
  rows("transactions", data.transactions, (row, t) => {
    row.dataset.id = t.id;
    cell(row, link(t.id, "#message/" + t.id), "id");
    cell(row, t.topic);
    cell(row, t.type);
    cell(row, t.group);
    cell(row, when(t.published));
    cell(row, t.checks, "num");
    cell(row, t.unresolved ? "unresolved" : "checking");
    const actions = document.createElement("span");
    actions.append(
      button("Commit", () => resolve(t.id, "commit"), "commit"),
      button("Roll back", () => resolve(t.id, "rollback"), "rollback")
    );
    cell(row, actions);
  });
}

async function resolve(id, resolution) {
  if (!window.confirm(resolution + " " + id + "?")) {
    return;
  }
  const data = await api("api/transactions/" + id + "/" + resolution, {json: {}});
  $("tx-result").textContent =
    (resolution === "commit" ? "Committed " : "Rolled back ") + id + (data.changed ? "." : ": nothing changed (already decided).");
  await showTransactions();
}

async function showMessage(id) {
  $("message-error").textContent = "";
  if (!id) {
    $("message-found").hidden = true;
    return;
  }
  $("message-id").value = id;
  const data = await api("api/messages/" + encodeURIComponent(id));
  if (data === null) {
    $("message-found").hidden = true;
    $("message-error").textContent = "No message " + id + " on this broker (never seen, or its history was pruned).";
    return;
  }
  $("message-found").hidden = false;
  const info = [["state", data.state]];
  if (data.message) {
    for (const [k, v] of Object.entries(data.message)) {
      info.push([k, k === "published" || k === "expires" ? when(v) : v]);
    }
  }
  rows("message-info", info, (row, [k, v]) => {
    cell(row, k, "key");
    cell(row, v);
  });
  rows("message-groups", Object.entries(data.groups), (row, [group, g]) => {
    cell(row, group);
    cell(row, g.state);
    cell(row, g.attempts, "num");
  });
  const timeline = $("timeline");
  timeline.replaceChildren();
  for (const e of data.history) {
    const item = document.createElement("li");
    item.className = "event event-" + e.kind;
    const time = document.createElement("time");
    time.textContent = when(e.time);
    const kind = document.createElement("strong");
    kind.textContent = e.kind;
    const detail = document.createElement("span");
    detail.textContent = [
      e.group && "group " + e.group,
      e.attempt && "attempt " + e.attempt,
      e.connection && "via " + e.connection,
      e.detail,
    ].filter(Boolean).join(" · ");
    item.append(time, kind, detail);
    timeline.append(item);
  }
}

// -- routing ------------------------------------------------------------------------

function route() {
  const [view, ...rest] = (location.hash.slice(1) || "overview").split("/");
  return {view, arg: decodeURIComponent(rest.join("/"))};
}

async function sample() {
  // the rate chart needs samples whichever view is open
  const data = await api("api/overview");
  state.samples.push({time: data.time, totals: data.totals});
  if (state.samples.length > RATE_POINTS + 1) {
    state.samples.shift();
  }
}

async function render(full) {
  const {view, arg} = route();
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== "view-" + view;
  }
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.view === view || (view === "group" && a.dataset.view === "groups"));
  }
  try {
    await sample();
    $("login").hidden = true;
    $("logout").hidden = !sessionStorage.getItem(SECRET_KEY);
    if (view === "overview") {
      await showOverview();
    } else if (view === "groups") {
      await showGroups();
    } else if (view === "group") {
      await showGroup(arg);
    } else if (view === "dlq" && full) {
      if (arg) {
        $("dlq-group").value = arg;
      }
      await showDlq(false);
    } else if (view === "transactions" && full) {
      await showTransactions();
    } else if (view === "message" && full) {
      await showMessage(arg);
    }
    document.body.dataset.view = view;
    setStatus("updated " + new Date().toLocaleTimeString());
  } catch (error) {
    showError(error);
  }
}

function showLogin() {
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = true;
  }
  $("login").hidden = false;
  $("logout").hidden = true;
  if (sessionStorage.getItem(SECRET_KEY)) {
    $("login-error").textContent = "The broker refused that secret.";
    sessionStorage.removeItem(SECRET_KEY);
  }
  setStatus("not logged in", true);
}

function guarded(action) {
  return async (event) => {
    if (event) {
      event.preventDefault();
    }
    try {
      await action();
    } catch (error) {
      showError(error);
    }
  };
}

// a refused secret asks for another one; any other failure shows in the status line
function showError(error) {
  if (error instanceof Unauthorized) {
    showLogin();
  } else {
    setStatus(error.message, true);
  }
}

function start() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(SECRET_KEY, $("login-secret").value);
    $("login-secret").value = "";
    $("login-error").textContent = "";
    render(true);
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(SECRET_KEY);
    showLogin();
  });
  $("dlq-filter").addEventListener("submit", guarded(() => showDlq(false)));
  $("dlq-more").addEventListener("click", guarded(() => showDlq(true)));
  $("dlq-preview").addEventListener("click", guarded(() => previewRedrive(...filterSelection())));
  $("redrive-confirm").addEventListener("click", guarded(confirmRedrive));
  $("redrive-cancel").addEventListener("click", () => ($("redrive-panel").hidden = true));
  $("tx-unresolved").addEventListener("change", guarded(showTransactions));
  $("message-form").addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = "message/" + $("message-id").value.trim();
  });
  window.addEventListener("hashchange", () => render(true));
  render(true);
  // live views refresh on their own; forms and lists with actions refresh on demand
  state.timer = setInterval(() => {
    if ($("login").hidden) {
      render(false);
    }
  }, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
